"""A grpc.aio server on CONVSERVE_GRPC_PORT, in the event loop of the process's uvicorn.

Every front worker runs its own, all bound to the one port with SO_REUSEPORT (the kernel
spreads connections among them, as it does for no one else's socket: grpc binds it itself);
the single process binds it alone. The drain is uvicorn's (service.server): once it begins,
ModelInfer is refused and readiness is false; the server stops after the admitted requests.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from service.config import Settings
from service.grpc_v2.inference_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from service.grpc_v2.servicer import Fetch, Inference
from service.inference import Requests

log = logging.getLogger("convserve")


def asgi_get(app: Any) -> Fetch:
    """GET a path of an ASGI app in this process, as if a client had asked for it."""

    async def fetch(path: str) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"grpc"), (b"accept", b"application/json")],
            "client": None,
            "server": None,
            "state": {},
        }
        status = 500
        chunks: list[bytes] = []
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await app(scope, receive, send)
        return status, b"".join(chunks)

    return fetch


async def start_grpc(
    settings: Settings, requests: Requests, app: Any, *, shared: bool
) -> grpc.aio.Server:
    """Serve GRPCInferenceService on settings.grpc_port; `shared`: with the other workers."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if shared else 0),
        ]
    )
    servicer = Inference(requests, asgi_get(app))
    add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    address = f"{settings.host}:{settings.grpc_port}"
    if ":" in settings.host:
        address = f"[{settings.host}]:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address} (CONVSERVE_GRPC_PORT): {exc}") from None
    await server.start()
    log.info("gRPC: Open Inference Protocol on %s", address)
    return server
