"""uvicorn's HTTP protocol with one change: a request too malformed to reach the app (broken
framing, a wrong Content-Length) is answered with problem+json instead of plain text."""

from __future__ import annotations

import msgspec

from service.api.schemas import Problem

try:  # httptools (faster) when installed, as uvicorn[standard] does; h11 otherwise
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornProtocol
except ImportError:  # pragma: no cover - depends on the environment
    from uvicorn.protocols.http.h11_impl import (  # type: ignore[assignment]
        H11Protocol as UvicornProtocol,
    )


def malformed_response(message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = msgspec.json.encode(
        Problem(
            type="https://convserve.dev/problems/malformed-request",
            title="Bad request",
            status=400,
            detail=f"malformed HTTP request ({message}); the connection is closed",
        )
    )
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: application/problem+json\r\n",
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class ProblemHttpProtocol(UvicornProtocol):
    """Module level, so worker processes can unpickle the uvicorn config that names it."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(malformed_response(msg, self.server_state.default_headers))
        self.transport.close()
