"""The HTTP/1.1 wire format: reading request heads and writing response heads."""

from __future__ import annotations

import asyncio
import email.utils
import http
import time
from collections.abc import Callable
from dataclasses import dataclass

_BODY_LIMIT = 1024 * 1024


@dataclass
class ParsedRequest:
    """The head of one HTTP request and its arrival time on the monotonic clock.

    Header names are lowercase. ``target`` is the request target as sent, such as
    ``/library/os.html?x=1``.
    """

    method: str
    target: str
    version: str
    headers: dict[str, str]
    arrival: float

    @property
    def keep_alive(self) -> bool:
        """Whether the client allows the connection to stay open after the response."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    @property
    def hostname(self) -> str | None:
        """The ``Host`` header in lowercase without its port, or None when absent."""
        value = self.headers.get("host", "").strip().lower()
        if not value:
            return None
        if value.startswith("["):
            return value.partition("]")[0] + "]"
        return value.rpartition(":")[0] if ":" in value else value


@dataclass
class BadRequest:
    """A request that could not be parsed: the server responds with ``status`` and closes."""

    status: int
    reason: str
    arrival: float


async def read_request(
    reader: asyncio.StreamReader, clock: Callable[[], float]
) -> ParsedRequest | BadRequest | None:
    """Read one request head and skip its body; return None at the end of the stream.

    A request body (rare for GET) is read and dropped, up to 1 MiB. Chunked request
    bodies are not supported and give a 501.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        return BadRequest(431, "request head too large", clock())
    arrival = clock()

    # RFC 9112 lets a server ignore empty lines before the request line.
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return BadRequest(400, "invalid request line", arrival)
    method, target, version = parts

    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            return BadRequest(400, "invalid header line", arrival)
        headers[name.strip().lower()] = value.strip()

    if "transfer-encoding" in headers:
        return BadRequest(501, "request bodies with Transfer-Encoding are not supported", arrival)
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or int(length_text) > _BODY_LIMIT:
        return BadRequest(400, "invalid or too large Content-Length", arrival)
    if int(length_text):
        await reader.readexactly(int(length_text))

    return ParsedRequest(method, target, version, headers, arrival)


def http_date(epoch_seconds: float) -> str:
    """Return an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) for epoch seconds."""
    return email.utils.formatdate(epoch_seconds, usegmt=True)


def encode_head(
    status: int,
    content_type: str,
    content_length: int,
    keep_alive: bool,
    extra_headers: list[tuple[str, str]],
) -> bytes:
    """Return the status line and headers of a response, ending with the blank line."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"

    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Date: {http_date(time.time())}",
        "Server: faultsite",
        f"Content-Type: {content_type}",
        f"Content-Length: {content_length}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
