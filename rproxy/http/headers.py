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

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["HOP_BY_HOP", "HTTP11", "request_head", "response_head", "response_fields", "scan_response_head",
           "finish_scanned_head", "server_host", "chunk"]

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
        b"http2-settings",  # (an h2c upgrade's, which rproxy declines)
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


_NAMING_NOTHING = frozenset({b"close", b"keep-alive", b"Close", b"Keep-Alive", b"keep-alive, close"})


def _named(value: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """
    Add the field names a Connection field lists (beyond keep-alive and
    close, which name no field) to C{named}.
    """
    if value in _NAMING_NOTHING:
        return named  # the common case, without taking the value apart
    tokens = {t.strip().lower() for t in value.split(b",")} - {b"", b"keep-alive", b"close"}
    if not tokens:
        return named
    return tokens if named is None else named | tokens


def _drop_named(lines: list[bytes], named: set[bytes], first: int, upgrade: bool) -> list[bytes]:
    # rare: Connection named a field; lines[first:] are "Name: value"; an
    # upgrade keeps Upgrade even when Connection names it
    if upgrade:
        named = named - {b"upgrade"}
    return lines[:first] + [line for line in lines[first:] if line.partition(b":")[0].lower() not in named]


# The fields a request's rewrite looks at; every other field is copied
# as it is (unless a route removes it), lower-casing its name once.
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"host"})
_REQUEST_SPECIAL = HOP_BY_HOP | _FORWARDED
_PROTO_LINES = {b"http": b"X-Forwarded-Proto: http", b"https": b"X-Forwarded-Proto: https"}
# the version of almost every message: compared by identity first
HTTP11 = (1, 1)


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    proto: bytes,
    chunked: bool,
    content_length: int | None,
    upgrade: bool = False,
    host: bytes | None = None,
    set_headers: Iterable[tuple[bytes, bytes]] = (),
    remove: frozenset[bytes] = frozenset(),
) -> bytes:
    """
    The request head to send upstream (HTTP/1.1, keep-alive unless upgrading).

    @param remove: lower-case names of fields to drop (a route's
        C{remove_headers} and the names of C{set_headers}); with
        C{x-forwarded-for}, the client's field is dropped and rproxy's
        names C{client_ip} alone.
    """
    lines = [method + b" " + target + b" HTTP/1.1"]
    forwarded_for = b""
    original_host = b""
    named: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in _REQUEST_SPECIAL:
            if lower == b"host":
                original_host = value
                if lower in remove:
                    continue
                if host is not None:
                    value = host
            elif lower == b"x-forwarded-for":
                if lower not in remove:  # (removed: from a peer not trusted to set it)
                    forwarded_for += value + b", "
                continue
            elif lower == b"connection":
                named = _named(value, named)
                continue
            elif lower != b"upgrade" or not upgrade:
                continue  # hop-by-hop, framing, or set by rproxy below
        elif lower in remove:
            continue
        lines.append(name + b": " + value)
    if named:
        lines = _drop_named(lines, named, 1, upgrade)
    lines.append(b"X-Forwarded-For: " + forwarded_for + client_ip if forwarded_for else b"X-Forwarded-For: " + client_ip)
    lines.append(_PROTO_LINES.get(proto) or b"X-Forwarded-Proto: " + proto)
    if original_host:
        lines.append(b"X-Forwarded-Host: " + original_host)
    lines.append(b"Via: 1.1 rproxy")
    for name, value in set_headers:
        lines.append(name + b": " + value)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    if upgrade:
        lines.append(b"Connection: upgrade")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def response_fields(
    headers: list[tuple[bytes, bytes]], upgrade: bool = False
) -> tuple[list[bytes], bytes | None, bool]:
    """
    One pass over a response's fields: the C{Name: value} lines to pass
    on (hop-by-hop and framing fields dropped), the Content-Length value
    (or None) and whether Transfer-Encoding was present.
    """
    lines: list[bytes] = []
    length: bytes | None = None
    encoded = False
    named: set[bytes] | None = None
    for name, value in headers:
        if len(name) in _HOP_LENGTHS:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == b"content-length":
                    length = value
                elif lower == b"transfer-encoding":
                    encoded = True
                elif lower == b"connection":
                    named = _named(value, named)
                elif lower == b"upgrade" and upgrade:
                    lines.append(name + b": " + value)
                continue
        lines.append(name + b": " + value)
    if named:
        lines = _drop_named(lines, named, 0, upgrade)
    return lines, length, encoded


_HOP_LENGTHS = frozenset(len(name) for name in HOP_BY_HOP)


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
    A response head for the client from a list of fields (rproxy's own
    answers; a server's head is rewritten as bytes, L{scan_response_head}).

    @param framing: C{"length"} (Content-Length), C{"chunked"}, C{"close"}
        (the body ends when the connection does) or C{"none"} (no body).
    """
    block = b"".join([b"\r\n" + line for line in response_fields(headers, upgrade)[0]])
    if framing == "length" or (framing == "none" and content_length is not None):
        # (a HEAD response's Content-Length is the entity's length)
        extra = (*extra, (b"Content-Length", b"%d" % content_length))  # type: ignore[str-bytes-safe]
    line = b"HTTP/1.1 %d %s" % (status, reason_phrase or reason(status))
    return finish_scanned_head(status, line, block, version, framing, close, upgrade, extra)


# The fields of a response head that rproxy acts on (each match runs to
# the end of its line): the hop-by-hop ones are dropped; Content-Length
# stays (llhttp refuses it beside Transfer-Encoding, and no rewrite changes
# a body's length); Transfer-Encoding goes (rproxy re-chunks the body).
_ACTED_ON = re.compile(b"\r\n(" + b"|".join(sorted(HOP_BY_HOP)) + b"):([^\r]*)")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def scan_response_head(head: bytes, upgrade: bool = False) -> tuple[bytes, bytes, bool, bool]:
    """
    Split a response head (as llhttp accepted it: CRLF line ends, no
    obs-fold, no space before a colon; without its final blank line) into
    its status line and the fields to pass on, each preceded by CRLF:
    hop-by-hop fields (and those a Connection field names) removed,
    Upgrade kept when upgrading.  Also tells whether Content-Length and
    Transfer-Encoding were present.

    One regular-expression pass over the lower-cased bytes finds the few
    fields to act on; the others are kept as the server wrote them.

    @raise ValueError: a Transfer-Encoding other than chunked alone.
    """
    cut = head.find(b"\r\n")
    if cut == -1:
        return head, b"", False, False
    block = head[cut:]
    low = block.lower()
    has_length = encoded = False
    spans = []
    named: set[bytes] | None = None
    for match in _ACTED_ON.finditer(low):
        name = match.group(1)
        if name == b"content-length":
            has_length = True
            continue
        if name == b"connection":
            value = match.group(2).strip()
            if value not in _PLAIN_CONNECTION:
                named = _named(value, named)
        elif name == b"transfer-encoding":
            if encoded or match.group(2).strip(b" \t") != b"chunked":
                # (re-chunked, the body would lose the other coding: nginx answers 502 too)
                raise ValueError("a transfer coding other than chunked")
            encoded = True
        elif upgrade and name == b"upgrade":
            continue
        spans.append(match.span())
    if named:
        # the framing is not for Connection to remove
        named -= {b"content-length", b"upgrade"} if upgrade else {b"content-length"}
        for name in named:
            spans += [m.span() for m in re.finditer(b"\r\n" + re.escape(name) + b":[^\r]*", low)]
    if len(spans) == 1:
        start, end = spans[0]
        block = block[:start] + block[end:]
    elif spans:
        spans.sort()
        kept = []
        last = 0
        for start, end in spans:
            if start >= last:
                kept.append(block[last:start])
                last = end
        kept.append(block[last:])
        block = b"".join(kept)
    return head[:cut], block, has_length, encoded


def finish_scanned_head(
    status: int,
    line: bytes,
    block: bytes,
    version: tuple[int, int],
    framing: str,
    close: bool = False,
    upgrade: bool = False,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    The response head for the client from L{scan_response_head}'s parts:
    the server's status line when it speaks the client's version, Via,
    C{extra} fields, rproxy's framing and Connection field.
    """
    if (version is not HTTP11 and version != HTTP11) or line[:9] != b"HTTP/1.1 ":
        phrase = line.split(b" ", 2)[2] if line.count(b" ") >= 2 else b""
        line = b"HTTP/%d.%d %d %s" % (version[0], version[1], status, phrase or reason(status))
    key = (framing, close, upgrade, version)
    tail = _TAILS.get(key)
    if tail is None:
        tail = _TAILS[key] = _tail(framing, close, upgrade, version)
    if extra:
        return b"".join((line, block, b"\r\nVia: 1.1 rproxy", *(b"\r\n" + n + b": " + v for n, v in extra), tail))
    return b"".join((line, block, b"\r\nVia: 1.1 rproxy", tail))


def _tail(framing: str, close: bool, upgrade: bool, version: tuple[int, int]) -> bytes:
    # what follows Via and the extra fields: framing, Connection, blank line
    out = b""
    if framing == "chunked":
        out += b"\r\nTransfer-Encoding: chunked"
    if upgrade:
        out += b"\r\nConnection: upgrade"
    elif close:
        out += b"\r\nConnection: close"
    elif version == (1, 0):
        out += b"\r\nConnection: keep-alive"
    return out + b"\r\n\r\n"


# finish_scanned_head's tails by (framing, close, upgrade, version): a few
_TAILS: dict[tuple[str, bool, bool, tuple[int, int]], bytes] = {}


def error_response(status: int, message: str, version: tuple[int, int] = (1, 1),
                   extra: Iterable[tuple[bytes, bytes]] = (), close: bool = True) -> bytes:
    """
    A small JSON error response generated by rproxy itself.
    """
    # (json.dumps: control characters and lone surrogates in a message, such
    # as a server's error text, escaped as JSON wants them)
    body = json.dumps({"error": message}).encode("ascii") + b"\n"
    headers = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"), *extra]
    head = response_head(status, reason(status), headers, version=version, framing="length",
                         content_length=len(body), close=close)
    return head + body


def server_host(server: Any, tls: bool) -> bytes:
    """
    The Host value naming C{server} (C{http.host_header: server}): host and
    port, the port left out only when it is the scheme's default, since
    servers that check Host (WebSocket handshakes, virtual hosts) compare
    both.
    """
    host = server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    if server.port == (443 if tls else 80):
        return host.encode()
    return f"{host}:{server.port}".encode()


def chunk(data: bytes) -> bytes:
    """
    C{data} as one chunk of a chunked body.
    """
    # nothing for no data: an empty chunk would read as the end of the body
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
