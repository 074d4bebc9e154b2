"""
The admin port's HTTP requests: the bearer key and the size of a body are
checked as soon as the request head is complete, before twisted.web reads
the body.

twisted.web reads a whole body (into memory, or a temporary file past
100 kB) before any resource sees the request, so a check made in C{render}
comes after a client without the key has sent whatever it liked.  Only the
/api/v1 resources take a body, and they need the key; so when
C{admin.api_key} is set, a request that announces a body without the key
is answered 401 from its head, whatever its path, and a body past
L{MAX_BODY} (announced by Content-Length, or reached by chunks) is answered
413.  Either answer closes the connection, the body unread.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request, Site

__all__ = ["MAX_BODY", "AdminRequest", "AdminSite", "bearer_ok"]

log = Logger()

# the largest body the admin API reads: its bodies are a few small fields
MAX_BODY = 64 * 1024

_REASONS = {401: b"Unauthorized", 413: b"Content Too Large"}


def bearer_ok(header: bytes | None, expected: str | None) -> bool:
    """
    Whether an Authorization value carries the admin key (compared in
    constant time); with no key configured (None) the API is open.
    """
    if expected is None:
        return True
    scheme, _, token = (header or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected.encode())


def refusal(status: int, message: str) -> bytes:
    """
    A complete JSON error response that closes the connection, for a request
    whose body will not be read.
    """
    body = json.dumps({"error": message}).encode("ascii") + b"\n"
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
            b"Content-Type: application/json", b"Cache-Control: no-store",
            b"Content-Length: %d" % len(body), b"Connection: close"]
    if status == 401:
        head.append(b'WWW-Authenticate: Bearer realm="rproxy"')
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class AdminRequest(Request):
    """
    A twisted.web request that refuses a body it should not read from its
    head (see the module docstring), and stops counting bytes into
    C{content} once it has refused.
    """

    refused: int | None = None
    _received = 0

    def gotLength(self, length: int | None) -> None:
        # length: 0 without a body, None for chunked, else Content-Length
        if length != 0:
            expected = self.channel.site.api_key()
            if not bearer_ok(self.requestHeaders.getRawHeaders(b"authorization", [None])[0], expected):
                self._refuse(401, "missing or invalid bearer token")
                return
            if length is not None and length > MAX_BODY:
                self._refuse(413, f"the body is larger than {MAX_BODY // 1024} KiB")
                return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused is not None:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse(413, f"the body is larger than {MAX_BODY // 1024} KiB")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused is None:
            super().requestReceived(command, path, version)

    def _refuse(self, status: int, message: str) -> None:
        self.refused = status
        self.content = BytesIO()
        # the channel would answer "100 Continue" after the head otherwise
        self.requestHeaders.removeHeader(b"expect")
        peer = self.channel.transport.getPeer()
        log.info("admin: refused a request from {peer} before its body: {status} {message}",
                 peer=getattr(peer, "host", peer), status=status, message=message)
        self.channel.transport.write(refusal(status, message))
        # stops reading: what the client still sends is never parsed
        self.channel.loseConnection()


class AdminSite(Site):
    """
    The admin port's site: L{AdminRequest}s, the key read from the running
    configuration at each request (a reload may change it), and no access
    log (probes are scraped every few seconds).
    """

    def __init__(self, resource: Any, api_key: Callable[[], str | None], reactor: Any) -> None:
        # the reactor also runs the channels' idle timeouts
        super().__init__(resource, requestFactory=AdminRequest, reactor=reactor)
        self.api_key = api_key
        self.noisy = False
        self.displayTracebacks = False

    def log(self, request: Request) -> None:
        """
        Probes are scraped every few seconds; keep them out of the log.
        """
