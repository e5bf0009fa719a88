"""A private Docker engine for `make docker-test`: started, used and removed by one process.

dockerd listens on a socket in a temporary folder, keeps its images and state there, and
touches no network: no bridge, no NAT, no iptables rules; containers use the host network.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    print(f"==> {title}", flush=True)
    started = time.monotonic()
    yield
    print(f"    ({time.monotonic() - started:.0f} s)", flush=True)


class Engine:
    """`with Engine(docker, folder) as engine:` runs dockerd for the block, then removes it all."""

    def __init__(self, client: Path, folder: Path) -> None:
        self.client = client
        self.folder = folder
        self.host = f"unix://{folder}/docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Engine:
        self.folder.mkdir(parents=True)
        with (self.folder / "dockerd.log").open("wb") as log:
            self.process = subprocess.Popen(
                ["dockerd", f"--host={self.host}", f"--data-root={self.folder}/data",
                 f"--exec-root={self.folder}/exec", f"--pidfile={self.folder}/docker.pid",
                 "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                 "--userland-proxy=false"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.succeeds("version"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.__exit__(None, None, None)
                sys.exit(f"dockerd did not start; its log:\n{tail}")
            time.sleep(0.5)
        print(f"    dockerd (pid {self.process.pid}) on {self.host}")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None:
            print(f"\n--- dockerd log: last warnings and errors ---\n{self.log_tail()}")
        if self.process is not None and self.process.poll() is None:
            for container in self._run(("ps", "--all", "--quiet"), 60).stdout.split():
                self.succeeds("rm", "--force", container)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        containerd = self.folder / "exec" / "containerd" / "containerd.pid"
        if containerd.exists():  # dockerd stops its containerd; this covers a killed dockerd
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(containerd.read_text()), signal.SIGKILL)
        for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = mount.split()[1]
            if target.startswith(f"{self.folder}/"):
                subprocess.run(["umount", "--lazy", target], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.folder)], check=False)
        print("    dockerd stopped; its images, containers and state are removed")

    def log_tail(self) -> str:
        """dockerd's last warnings and errors (its info lines are gRPC chatter)."""
        lines = (self.folder / "dockerd.log").read_text(errors="replace").splitlines()
        return "\n".join([line for line in lines if "level=info" not in line][-15:])

    def _run(self, args: tuple[object, ...], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.client, *map(str, args)],
            env={**os.environ, "DOCKER_HOST": self.host},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def docker(self, *args: object, timeout: float = 120) -> str:
        """Run a docker command; its output, or exit with it when the command fails."""
        result = self._run(args, timeout)
        if result.returncode:
            sys.exit(f"FAILED: docker {' '.join(map(str, args))}\n{result.stdout}")
        return result.stdout.strip()

    def succeeds(self, *args: object) -> bool:
        return self._run(args, 60).returncode == 0

    def inspect(self, name: str, template: str) -> str:
        return self.docker("inspect", "--format", template, name)

    def health(self, name: str) -> str:
        return self.inspect(name, "{{.State.Health.Status}}")

    def size(self, image: str) -> int:
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", image))

    def build(self, context: Path, tag: str, args: dict[str, str]) -> None:
        """BuildKit, as current Docker uses by default; the build reaches no network."""
        flags = [f"--build-arg={key}={value}" for key, value in args.items()]
        command = ["build", "--progress=plain", "--network=none", *flags, "--tag", tag, context]
        log = self.folder / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
        with log.open("w") as sink:
            result = subprocess.run(
                [self.client, *map(str, command)],
                env={**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"},
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=900,
                check=False,
            )
        lines = log.read_text(errors="replace").splitlines()
        if result.returncode:
            sys.exit(f"FAILED: docker build {tag}\n" + "\n".join(lines[-40:]))
        for line in lines:  # BuildKit prints a RUN's output as "#<step> <seconds> <text>"
            said = re.match(r"#\d+ [\d.]+ (installing from docker/wheelhouse.*|torch \d.*)", line)
            if said:
                print(f"    build: {said[1]}")
