"""Shared test helpers: real images, the bundled store, a real uvicorn server process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import nn

from service.training import load_mnist_sample, split

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_STORE = ROOT / "model_store"
DATA = Path(__file__).resolve().parent / "data"
ARTIFACTS = ROOT / "artifacts"  # screenshots and plots tests leave for people to look at


def png_bytes(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


@dataclass(frozen=True)
class Digit:
    image: Image.Image  # 28x28 L, white digit on black as in MNIST
    label: int


def resent(image: Image.Image) -> bytes:
    """The same pixels as png_bytes(image), in other bytes (a text chunk): the response cache
    has not seen them, so they are decoded and run again, with the same answer."""
    info = PngImagePlugin.PngInfo()
    info.add_text("convserve-test", "sent again")
    return png_bytes(image, pnginfo=info)


def held_out_digits(count: int, seed: int = 0) -> list[Digit]:
    """Digits from the split the bundled models never trained on (same seed as training)."""
    data = load_mnist_sample()
    _, held = split(len(data.targets), 0.2, seed)
    digits = []
    for index in held[:count]:
        pixels = (data.images[index, 0] * 255).round().astype(np.uint8)
        digits.append(Digit(Image.fromarray(pixels), int(data.targets[index])))
    return digits


def run_cli(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` from this checkout, as a user's shell would run it (`env` on
    top of this process's environment); never a traceback."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    environ = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run(
        [sys.executable, "-m", "service", *map(str, args)],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    grpc: str = ""  # host:port of its gRPC service ("" when CONVSERVE_GRPC_PORT=0)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(
    url: str, timeout: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def wait_listening(address: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {address} after {timeout}s")


@contextlib.contextmanager
def running_server(
    tmp_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[ServerProcess]:
    """`convserve serve` as a real process on a free port (and a free gRPC port: never the
    default 8001 another server may hold); stopped (SIGKILL if need be) after."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    environ = {
        **os.environ,
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_GRPC_PORT": str(free_port()),
        "CONVSERVE_HOST": "127.0.0.1",
        **(env or {}),
    }
    grpc_port = environ["CONVSERVE_GRPC_PORT"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env={**environ, "PYTHONPATH": str(ROOT)} if cwd is not None else environ,
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    grpc = f"127.0.0.1:{grpc_port}" if grpc_port != "0" else ""
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log, grpc)
    try:
        wait_ready(server.url, process=process)
        if server.grpc:  # started right after the HTTP socket: a moment later
            wait_listening(server.grpc, process)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def child_pids(server: ServerProcess, module: str) -> set[int]:
    """The supervisor's children running `python -m <module>` (service.front: the workers,
    service.modelhost: the model process), not their decoders."""
    pids: set[int] = set()
    for children in Path(f"/proc/{server.process.pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in children.read_text().split())
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.add(pid)
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (decoding may run in children)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended between the listing and the read
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found[1]) * 1024 if found else 0
    return total


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def digit_picture(digit: Digit, size: int = 112) -> Image.Image:
    """A held-out digit enlarged to an RGB picture, dark on light like ink on paper."""
    inverted = Image.fromarray(255 - np.asarray(digit.image))
    return inverted.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def encodings(picture: Image.Image) -> dict[str, tuple[str, bytes]]:
    """The same picture in every format and mode the service promises to read."""
    grey = picture.convert("L")
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    ink = 255 - np.asarray(grey)  # alpha: strokes opaque black, paper transparent
    rgba = Image.fromarray(np.dstack([np.zeros_like(ink)] * 3 + [ink]).astype(np.uint8))
    other = Image.new("RGB", picture.size, "white")
    frames = [picture.convert("P"), other.convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rotated = picture.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with Orientation 6: "rotate 90 degrees clockwise to display"
    return {
        "jpeg": ("image/jpeg", png_bytes(picture, "JPEG", quality=95)),
        "jpeg-progressive": (
            "image/jpeg",
            png_bytes(picture, "JPEG", quality=95, progressive=True),
        ),
        "jpeg-cmyk": ("image/jpeg", png_bytes(picture.convert("CMYK"), "JPEG", quality=95)),
        "jpeg-exif-rotated": ("image/jpeg", png_bytes(rotated, "JPEG", quality=95, exif=exif)),
        "png": ("image/png", png_bytes(picture)),
        "png-grey": ("image/png", png_bytes(grey)),
        "png-16bit": ("image/png", png_bytes(sixteen)),
        "png-alpha": ("image/png", png_bytes(rgba)),
        "png-palette": ("image/png", png_bytes(picture.convert("P"))),
        "gif-animated": ("image/gif", gif.getvalue()),
        "webp": ("image/webp", png_bytes(picture, "WEBP", lossless=True)),
        "bmp": ("image/bmp", png_bytes(picture, "BMP")),
        "tiff": ("image/tiff", png_bytes(picture, "TIFF")),
        "octet-stream": ("application/octet-stream", png_bytes(picture)),
    }


def exchange(url: str, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on one connection; read until the server closes it or goes quiet."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(raw)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


class TinyCNN(nn.Module):
    """A small CNN for the model files the import commands name; `channels_last`: NHWC."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        logits: torch.Tensor = self.head(features)
        return logits


def rotated_digits(folder: Path, count: int = 400, angle: float = 50) -> None:
    """An ImageFolder of held-out digits drawn another way (rotated): one folder per label,
    as `convserve train --from digits --data FOLDER` reads (the bundled network saw upright
    digits only)."""
    for index, digit in enumerate(held_out_digits(count)):
        labelled = folder / str(digit.label)
        labelled.mkdir(parents=True, exist_ok=True)
        digit.image.rotate(angle).save(labelled / f"{index}.png")


def graph_torch_cannot_run(path: Path) -> None:
    """TinyCNN as an ONNX graph whose pooling is GlobalMaxPool, an op onnx2torch has no
    converter for: `convserve import` serves it on ONNX Runtime, without heatmaps."""
    import onnx

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            TinyCNN().eval(), (torch.randn(1, 3, 32, 32),), dynamo=True, input_names=["input"]
        )
    assert program is not None
    model = program.model_proto
    nodes = model.graph.node
    index, mean = next((i, n) for i, n in enumerate(nodes) if n.op_type == "ReduceMean")
    nodes.remove(mean)
    nodes.insert(index, onnx.helper.make_node("Flatten", ["pooled"], [mean.output[0]]))
    nodes.insert(index, onnx.helper.make_node("GlobalMaxPool", [mean.input[0]], ["pooled"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def model_files(root: Path) -> None:
    """model.onnx (batch fixed at 1), model.pt (TorchScript), model.pt2 (torch.export),
    keras.onnx (NHWC), with labels.txt and labels.json."""
    torch.manual_seed(0)
    tiny, image = TinyCNN().eval(), torch.randn(1, 3, 32, 32)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation
        program = torch.onnx.export(tiny, (image,), dynamo=True, input_names=["input"])
        assert program is not None
        program.save(str(root / "model.onnx"), external_data=False)
        torch.jit.trace(tiny, image).save(str(root / "model.pt"))  # type: ignore[no-untyped-call]
        torch.export.save(torch.export.export(tiny, (image,)), str(root / "model.pt2"))
        nhwc = TinyCNN(channels_last=True).eval()
        program = torch.onnx.export(
            nhwc, (image.permute(0, 2, 3, 1),), dynamo=True, input_names=["input"]
        )
        assert program is not None
        program.save(str(root / "keras.onnx"), external_data=False)
    labels = [f"kind {index}" for index in range(10)]
    (root / "labels.txt").write_text("\n".join(labels))
    (root / "labels.json").write_text(json.dumps(labels))


def digits_versions(root: Path, relabelled: tuple[int, ...] = ()) -> Path:
    """A store at `root` holding the bundled digits network as v1 and v2 (and v3 with
    `relabelled=(3,)`...): each a copy of it, except that the versions in `relabelled` name
    their classes backwards ('9' for class 0), so that they disagree with v1 on every image."""
    import shutil

    count = 2 + sum(1 for v in relabelled if v > 2)
    for version in range(1, count + 1):
        folder = root / "digits" / str(version)
        shutil.copytree(BUNDLED_STORE / "digits" / "1", folder)
        if version in relabelled:
            spec = json.loads((folder / "model.json").read_text())
            spec["labels"] = spec["labels"][::-1]
            (folder / "model.json").write_text(json.dumps(spec, indent=2))
    return root
