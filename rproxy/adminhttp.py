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
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from rproxy.service import RProxyService

__all__ = ["MAX_BODY", "AdminRequest", "AdminSite", "ApiError", "ApiLeaf", "Leaf", "bearer_ok", "checked_text",
           "finish", "json_body", "json_response"]

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

    def __init__(self, resource: Any, api_key: Callable[[], str | None], reactor: Any,
                 console: Any = None) -> None:
        # the reactor also runs the channels' idle timeouts
        super().__init__(resource, requestFactory=AdminRequest, reactor=reactor)
        self.api_key = api_key
        self.noisy = False
        self.displayTracebacks = False
        self.console = console

    def startFactory(self) -> None:
        # the dashboard samples while the port listens (and only then)
        super().startFactory()
        if self.console is not None:
            self.console.start()

    def stopFactory(self) -> None:
        if self.console is not None:
            self.console.stop()
        super().stopFactory()

    def log(self, request: Request) -> None:
        """
        Probes are scraped every few seconds; keep them out of the log.
        """


# -- the resources' common parts ------------------------------------------


def json_response(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def refuse_unless_read(request: Request, subpaths: bool = False) -> bytes | None:
    """
    The JSON refusal of a request a read-only page does not answer: 405
    for a method other than GET and HEAD, 404 for a path below the page
    (unless C{subpaths}); None when the page should answer.
    """
    if request.method not in (b"GET", b"HEAD"):
        request.setHeader(b"allow", b"GET, HEAD")
        return json_response(request, 405, {"error": "method not allowed"})
    if not subpaths and request.postpath not in ([], [b""]):
        return json_response(request, 404, {"error": "not found"})
    return None


class Leaf(Resource):
    isLeaf = True

    def __init__(self, service: RProxyService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Request) -> bytes:
        refused = refuse_unless_read(request)
        if refused is not None:
            return refused
        return self.render_get(request)

    def render_get(self, request: Request) -> bytes:
        raise NotImplementedError


class ApiLeaf(Leaf):
    """
    /api/v1 resources: when C{admin.api_key} is set they need
    C{Authorization: Bearer <api_key>} (compared in constant time); a
    request with a body is refused earlier, from its head (L{AdminRequest}).
    """

    def unauthorized(self, request: Request) -> bytes | None:
        """
        The 401 answer when the bearer token is missing or wrong, else None.
        """
        if bearer_ok(request.getHeader(b"authorization"), self.service.config.admin.api_key):
            return None
        request.setHeader(b"www-authenticate", b'Bearer realm="rproxy"')
        return json_response(request, 401, {"error": "missing or invalid bearer token"})

    def render(self, request: Request) -> bytes:
        refused = self.unauthorized(request)
        return refused if refused is not None else super().render(request)


class ApiError(Exception):
    """
    An answer other than success, raised where the input is found wanting:
    C{status} and a message for C{{"error": ...}}.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def checked_text(value: str, what: str) -> str:
    """
    C{value} if PostgreSQL can hold it: text has no NUL character, and a
    lone surrogate (JSON's C{"\\ud800"}) has no UTF-8 form.
    """
    if "\0" in value:
        raise ApiError(400, f"{what}: NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{what}: not valid Unicode (a lone surrogate)") from None
    return value


class _NotJSON(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def json_body(request: Request) -> dict[str, Any]:
    """
    The request's JSON object (L{AdminRequest} has bounded its size), every
    string in it, names included, checked by L{checked_text}.
    """
    raw = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY // 1024} KiB")
    try:
        body = json.loads(raw or b"null", parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, "the body must be a JSON object (this one is nested too deeply)") from None
    except _NotJSON as e:
        raise ApiError(400, f"the body must be a JSON object ({e})") from None
    except ValueError:  # not JSON, not UTF-8, an integer past Python's 4300 digits
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    # iterative: the parser accepts nesting as deep as Python's recursion limit
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            checked_text(value, where)
        elif isinstance(value, dict):
            for name, item in value.items():
                checked_text(name, f"{where or 'the body'}: a field name")
                stack.append((f"{where}.{name}" if where else name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return body


def finish(request: Request, status: int, body: Any) -> None:
    if request.finished or getattr(request, "rproxy_gone", False):
        return
    request.write(json_response(request, status, body))
    request.finish()
