"""
What a reverse proxy changes in the heads it forwards.

Requests: hop-by-hop fields are dropped (Connection and every field it
names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
Upgrade unless upgrading, Expect, which rproxy answers itself), the framing
is set by rproxy (Content-Length or chunked), X-Forwarded-For is appended
to, X-Forwarded-Proto and X-Forwarded-Host are set, Via is added, and Host
is kept (or set to the server's, per frontend).

Responses: the same hop-by-hop rule, rproxy's own framing and Connection
field, and Via.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["HOP_BY_HOP", "request_head", "response_head", "connection_tokens"]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # rproxy sets the framing itself
        b"expect",
    }
)

_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created", 202: b"Accepted",
    204: b"No Content", 206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found",
    303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """
    The lower-case field names listed in Connection fields.
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


_HOP_BY_HOP_KEEP_UPGRADE = HOP_BY_HOP - {b"upgrade"}


def _kept(headers: list[tuple[bytes, bytes]], keep_upgrade: bool) -> list[tuple[bytes, bytes]]:
    # one pass, lower-casing each name once; Connection's tokens (rare
    # beyond keep-alive/close) only cost a second pass when present
    drop = _HOP_BY_HOP_KEEP_UPGRADE if keep_upgrade else HOP_BY_HOP
    kept = []
    named: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")} - {b"", b"keep-alive", b"close"}
                if tokens:
                    named = tokens if named is None else named | tokens
            continue
        kept.append((lower, name, value))
    if named:
        if keep_upgrade:
            named.discard(b"upgrade")
        return [(n, v) for lower, n, v in kept if lower not in named]
    return [(n, v) for _, n, v in kept]


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    client_ip: str,
    proto: bytes,
    chunked: bool,
    content_length: int | None,
    upgrade: bool = False,
    host: bytes | None = None,
    set_headers: Iterable[tuple[bytes, bytes]] = (),
    remove_headers: Iterable[bytes] = (),
) -> bytes:
    """
    The request head to send upstream (HTTP/1.1, keep-alive unless upgrading).
    """
    remove = {n.lower() for n in remove_headers} | {n.lower() for n, _ in set_headers}
    out = []
    forwarded_for = []
    original_host = b""
    for name, value in _kept(headers, upgrade):
        lower = name.lower()
        if lower == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        if lower in (b"x-forwarded-proto", b"x-forwarded-host", b"via") or lower in remove:
            if lower == b"via":
                out.append((name, value))
            continue
        if lower == b"host":
            original_host = value
            if host is not None:
                value = host
        out.append((name, value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", proto))
    if original_host:
        out.append((b"X-Forwarded-Host", original_host))
    out.append((b"Via", b"1.1 rproxy"))
    out.extend(set_headers)
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    elif content_length is not None:
        out.append((b"Content-Length", str(content_length).encode()))
    if upgrade:
        out.append((b"Connection", b"upgrade"))
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [n + b": " + v for n, v in out]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def response_head(
    status: int,
    reason_phrase: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    version: tuple[int, int],
    framing: str,
    content_length: int | None = None,
    close: bool = False,
    upgrade: bool = False,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    The response head for the client.

    @param framing: C{"length"} (Content-Length), C{"chunked"}, C{"close"}
        (the body ends when the connection does) or C{"none"} (no body).
    """
    out = _kept(headers, upgrade)
    out.append((b"Via", b"1.1 rproxy"))
    out.extend(extra)
    if framing == "length":
        out.append((b"Content-Length", str(content_length).encode()))
    elif framing == "chunked":
        out.append((b"Transfer-Encoding", b"chunked"))
    elif framing == "none" and content_length is not None:
        out.append((b"Content-Length", str(content_length).encode()))  # HEAD: the entity's length
    if upgrade:
        out.append((b"Connection", b"upgrade"))
    elif close:
        out.append((b"Connection", b"close"))
    elif version == (1, 0):
        out.append((b"Connection", b"keep-alive"))
    line = b"HTTP/%d.%d %d %s" % (version[0], version[1], status, reason_phrase or reason(status))
    return b"\r\n".join([line] + [n + b": " + v for n, v in out]) + b"\r\n\r\n"


def error_response(status: int, message: str, version: tuple[int, int] = (1, 1),
                   extra: Iterable[tuple[bytes, bytes]] = (), close: bool = True) -> bytes:
    """
    A small JSON error response generated by rproxy itself.
    """
    body = b'{"error": "' + message.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8", "replace") + b'"}\n'
    headers = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"), *extra]
    head = response_head(status, reason(status), headers, version=version, framing="length",
                         content_length=len(body), close=close)
    return head + body
