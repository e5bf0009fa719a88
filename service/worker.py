"""A supervised worker (`python -m service.worker SETTINGS FD`): one whole server on the
supervisor's listening socket, with the settings it was given on its command line."""

from __future__ import annotations

import json
import socket
import sys

from service.config import Settings
from service.server import serve_worker


def main(argv: list[str]) -> int:
    settings = Settings.from_env(json.loads(argv[0]))
    listener = socket.socket(fileno=int(argv[1]))
    return serve_worker(settings, listener)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
