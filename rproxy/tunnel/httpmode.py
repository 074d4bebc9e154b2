"""
The HTTP side of a C{mode: http} tunnel, sans I/O: what the public
connection sends on to the agent's service, what comes back to the client,
and the errors rproxy answers itself.

One request per public connection: the request the strict reader parsed is
sent on rebuilt from its parts (head fields as read, a chunked body
re-chunked), so bytes the reader did not take as part of that request
(a second, smuggled request behind it) never reach the service; both the
service and the client are told C{Connection: close}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import httptools

from rproxy.http.headers import reason
from rproxy.http.reader import HTTPError, RequestHead, RequestReader

__all__ = ["OneRequestReader", "openai_error", "model_of", "request_head", "chunk", "LAST_CHUNK", "ResponseHeads", "looks_like_json"]

LAST_CHUNK = b"0\r\n\r\n"
MAX_RESPONSE_HEAD = 64 * 1024
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
# bodies that cannot hold a JSON "model" field: never read for one
_NOT_JSON = (b"multipart/", b"audio/", b"image/", b"video/", b"application/octet-stream")
_ERROR_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    431: ("invalid_request_error", "headers_too_large"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    505: ("invalid_request_error", "http_version_not_supported"),
}


class _Complete(Exception):
    """
    Raised from the parser's callback to stop it at the end of the first
    request.
    """


class OneRequestReader(RequestReader):
    """
    A strict reader of the first request of a connection only: parsing
    stops at its end, so bytes after it (which are never forwarded) can
    neither fail nor hide it.
    """

    complete = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.complete = True
        if not self._parser.should_upgrade():
            # an upgrade's parse ends by itself, with the bytes after its head
            raise _Complete()

    def feed(self, data: bytes) -> list[object]:
        if self.complete and not self._events:
            return []
        try:
            return super().feed(data)
        except HTTPError:
            if not self.complete:
                raise
            events, self._events = self._events, []
            return events


def openai_error(status: int, message: str, extra: Iterable[tuple[bytes, bytes]] = (),
                 code: str | None = None) -> bytes:
    """
    A complete response (then close) whose body is an OpenAI-style error,
    C{{"error": {"message", "type", "code"}}}: the shape the OpenAI SDKs
    read the message from (they show only the status code otherwise).
    """
    kind, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                   str(status)))
    body = json.dumps({"error": {"message": message, "type": kind, "code": code or default_code}}).encode() + b"\n"
    lines = [b"HTTP/1.1 %d %s" % (status, reason(status)), b"Content-Type: application/json",
             b"Cache-Control: no-store", b"Content-Length: %d" % len(body), b"Connection: close"]
    lines += [name + b": " + value for name, value in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def looks_like_json(head: RequestHead) -> bool:
    """
    Whether a request's body may hold a JSON C{model} field: any body but
    those whose Content-Type says it is a file or a form (clients send
    JSON as text/plain or without a type too).
    """
    content_type = (head.header(b"content-type") or b"").strip().lower()
    return head.has_body and not content_type.startswith(_NOT_JSON)


def model_of(body: bytes) -> str | None:
    """
    The C{model} field of a JSON request body, if it has one.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) and model else None


def request_head(head: RequestHead, drop_expect: bool = False) -> bytes:
    """
    C{head} as the service gets it: its fields as read, but for
    Connection (and Keep-Alive, Proxy-Connection) replaced by
    C{Connection: close}; an upgrade keeps its Connection field.
    """
    lines = [b"%s %s HTTP/%d.%d" % (head.method, head.target, head.version[0], head.version[1])]
    for name, value in head.headers:
        lower = name.lower()
        if (lower in _HOP and not head.upgrade) or (drop_expect and lower == b"expect"):
            continue
        lines.append(name + b": " + value)
    if not head.upgrade:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """
    C{data} as one chunk of a chunked body.
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


class _ResponseEnd(Exception):
    pass


class ResponseHeads:
    """
    Feed the service's response bytes in; take out what goes to the
    client.  Interim (1xx) heads pass as they are; the final head gets
    C{Connection: close}; after a 101 the bytes pass unchanged.  The
    response's framing is followed (llhttp) so that the exchange can end
    with the response even if the service keeps its connection open.

    @ivar state: C{"head"} while a head is awaited, then C{"body"},
        C{"upgraded"}, or C{"done"} once the response is complete.
    """

    # whether any byte of the response went to the client
    started = False

    def __init__(self, head_request: bool = False) -> None:
        self.state = "head"
        self._buffer = b""
        self._head_request = head_request
        self._parser = httptools.HttpResponseParser(self)
        self._interim = False

    # -- llhttp callbacks, to find the response's end ---------------------

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200
        if self._head_request and not self._interim:
            raise _ResponseEnd()

    def on_message_complete(self) -> None:
        if not self._interim:
            raise _ResponseEnd()

    def _follow(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _ResponseEnd):
                raise ValueError(f"malformed response: {e}") from None
            if self.state == "body":
                self.state = "done"
            else:
                self._ended = True
        except httptools.HttpParserError as e:
            raise ValueError(f"malformed response: {e}") from None

    _ended = False

    def feed(self, data: bytes) -> bytes:
        """
        @raise ValueError: a response that is malformed, or whose head is
            longer than L{MAX_RESPONSE_HEAD}.
        """
        if self.state in ("upgraded", "done"):
            return data
        if self.state == "body":
            self._follow(data)
            return data
        self._follow(data)
        buffer = self._buffer + data
        out: list[bytes] = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_RESPONSE_HEAD:
                    raise ValueError(f"response head longer than {MAX_RESPONSE_HEAD} bytes")
                self._buffer = buffer
                return b"".join(out)
            head, buffer = buffer[:end], buffer[end + 4 :]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"malformed status line {lines[0][:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                out.append(head + b"\r\n\r\n")
                self.started = True
                continue
            if status == 101:
                self.state = "upgraded"
                out.append(head + b"\r\n\r\n")
            else:
                self.state = "done" if self._ended else "body"
                kept = [lines[0]] + [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in _HOP]
                out.append(b"\r\n".join(kept) + b"\r\nConnection: close\r\n\r\n")
            out.append(buffer)
            self._buffer = b""
            self.started = True
            return b"".join(out)
