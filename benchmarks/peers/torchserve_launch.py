"""TorchServe peer: archive the handler, write config.properties, run TorchServe in front.

    python benchmarks/peers/torchserve_launch.py --model-dir DIR --port N --threads T \
        --run-dir RUN [--max-batch-size 32] [--max-delay-ms 5]

One model `peer`, one worker (minWorkers = maxWorkers = 1), batchSize = max batch size,
maxBatchDelay = the delay rounded to whole milliseconds (TorchServe's unit). Inference on
127.0.0.1:N (POST /predictions/peer); management and metrics on free local ports; token
authorization off. Everything TorchServe writes (logs, pid file, sockets, the unpacked
archive) stays under RUN; logging is cut to warnings (LOG4J2 below). Runs in the
foreground, so the caller owns the JVM's process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from peer_model import arguments, say

HERE = Path(__file__).resolve().parent
# Warnings and errors to stdout only. TorchServe's default writes an access-log line, a dozen
# metric lines and every worker output line per request; convserve is measured at log level
# warning, so the peer is too.
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="org.apache" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    options = arguments()
    run: Path = options.run_dir.resolve()
    store = run / "model_store"
    temp = run / "tmp"
    for folder in (store, temp):
        folder.mkdir(parents=True, exist_ok=True)
    settings = {"model_dir": str(options.model_dir), "threads": options.threads,
                "max_batch_size": options.max_batch_size,
                "events": os.environ.get("PEER_EVENTS", str(run / "events.log"))}  # fmt: skip
    (run / "peer.json").write_text(json.dumps(settings))
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "torch-model-archiver"), "--model-name", "peer", "--version", "1.0",
         "--handler", str(HERE / "torchserve_handler.py"),
         "--extra-files", f"{HERE / 'peer_model.py'},{run / 'peer.json'}",
         "--export-path", str(store), "--force"],
        check=True,
    )  # fmt: skip
    delay = max(1, round(options.max_delay_ms))
    models = {"peer": {"1.0": {
        "defaultVersion": True, "marName": "peer.mar", "minWorkers": 1, "maxWorkers": 1,
        "batchSize": options.max_batch_size, "maxBatchDelay": delay, "responseTimeout": 300,
    }}}  # fmt: skip
    logging = run / "log4j2.xml"
    logging.write_text(LOG4J2)
    config = run / "config.properties"
    config.write_text(
        "\n".join([
            f"inference_address=http://127.0.0.1:{options.port}",
            f"management_address=http://127.0.0.1:{free_port()}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            f"model_store={store}",
            "load_models=peer.mar",
            f"models={json.dumps(models)}",
            "default_workers_per_model=1",
            "disable_token_authorization=true",
            "job_queue_size=1000",
            "install_py_dep_per_model=false",
        ]) + "\n"
    )  # fmt: skip
    os.environ["TMPDIR"] = str(temp)  # pid file (Python side): private to this run
    os.environ["TEMP"] = str(temp)  # java.io.tmpdir: unpacked archive, worker sockets
    os.environ["LOG_LOCATION"] = str(run / "logs")
    os.environ["METRICS_LOCATION"] = str(run / "logs")
    say(f"torchserve port={options.port} batchSize={options.max_batch_size} maxBatchDelay={delay}")
    command = [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs",
               "--ts-config", str(config), "--model-store", str(store), "--disable-token-auth",
               "--log-config", str(logging)]  # fmt: skip
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
