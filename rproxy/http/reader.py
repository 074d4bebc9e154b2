"""
A strict, sans-I/O reader of HTTP/1.x requests.

Bytes go in (L{RequestReader.feed}); events come out: a L{RequestHead},
zero or more L{Body} chunks, then L{EndOfMessage}, per request, in order,
for as many pipelined requests as the bytes hold; or an L{Upgrade} with the
bytes that follow an upgrade request's head.  Anything malformed or
ambiguous raises L{HTTPError} with the status to answer (then close):

  400  malformed or ambiguous framing: llhttp in strict mode refuses
       Content-Length with Transfer-Encoding, differing or malformed
       Content-Length, Transfer-Encoding other than a final chunked, bad
       chunk sizes or extensions, obs-fold, bare CR or LF, whitespace
       before the colon, NUL and other control bytes, invalid header
       names; on top of it this reader refuses Transfer-Encoding on
       HTTP/1.0, a missing or repeated Host on HTTP/1.1, a Host that is
       not a host[:port], and header names that only differ from
       Transfer-Encoding or Content-Length by "_" or "-" (servers that
       fold "_" into "-" would frame the body differently), and
       Transfer-Encoding fields that do not end in chunked;
  413  a body longer than C{max_body};
  414  a request target longer than C{max_target};
  431  more than C{max_headers} header fields, or a head larger than
       C{max_head} bytes;
  501  a Transfer-Encoding other than chunked alone (C{gzip, chunked}:
       rproxy re-frames bodies and would drop the other coding), as
       nginx answers;
  505  an HTTP version other than 1.0 and 1.1.

Upgrades: an upgrade request without a body becomes an L{Upgrade} event
after its head, with the bytes that follow it.  Two kinds are declined,
read as the plain requests they also are (their Upgrade field dropped
upstream, as hop-by-hop fields are), and the bytes after them parsed as
usual: an upgrade to C{h2c} (which would open an HTTP/2 channel behind
the proxy's back, past every per-request policy: "h2c smuggling"; Envoy
declines it too), and an upgrade request with a body (C{curl --http2 -d}:
llhttp leaves such a body unparsed, so it would be forwarded unread).

httptools (llhttp) does the byte-level parsing: it is strict by default
and the issue's expected choice; this module adds limits and the checks
above, and turns callbacks into events.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import httptools

from rproxy.http.headers import HTTP11

__all__ = ["HTTPError", "RequestHead", "Body", "EndOfMessage", "Upgrade", "RequestReader"]

_FRAMING = (b"transfer-encoding", b"content-length")
_CHUNKED = frozenset({b"chunked", b"Chunked", b"CHUNKED"})
_VERSIONS = {"1.1": HTTP11, "1.0": (1, 0)}
# common fields with nothing to check, skipped at once
_ORDINARY = frozenset({
    b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"connection", b"cookie",
    b"authorization", b"content-type", b"referer", b"origin", b"cache-control", b"x-forwarded-for",
    b"if-none-match", b"if-modified-since", b"pragma",
})
# Host values already found valid (a few per site; cleared when large)
_valid_hosts: set[bytes] = set()
# (RequestHead: a field not given is looked up in the headers)
_SCAN: Any = object()
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{1,5})?$")


class HTTPError(Exception):
    """
    The request must be refused with C{status} (and the connection closed).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class RequestHead:
    """
    A request's head as the reader validated it.

    @ivar suspicious_body: a body on a method whose body some servers
        ignore (GET, HEAD): the proxy forwards it once and does not reuse
        that upstream connection.
    """

    # a plain class: one is made per request, and a positional __init__
    # over slots is the cheapest way to make one
    __slots__ = ("method", "target", "version", "headers", "keep_alive", "chunked", "content_length", "upgrade",
                 "suspicious_body", "has_body", "host", "traceparent")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: tuple[int, int],
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool = True,
        chunked: bool = False,
        content_length: int | None = None,
        upgrade: bool = False,
        suspicious_body: bool = False,
        host: bytes | None = None,
        traceparent: Any = _SCAN,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = content_length
        self.upgrade = upgrade
        self.suspicious_body = suspicious_body
        self.has_body = chunked or (content_length is not None and content_length != 0)
        # the Host field's value (None without one)
        self.host = host if host is not None else self.header(b"host")
        # the traceparent field's value (None without one), for tracing
        self.traceparent = traceparent if traceparent is not _SCAN else self.header(b"traceparent")

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.version!r}, {len(self.headers)} fields)"

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of header C{name} (lower case), or None.
        """
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Body:
    """
    Some bytes of a request body (one per llhttp callback).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return type(other) is Body and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"Body({self.data!r})"


@attrs.frozen
class EndOfMessage:
    pass


@attrs.frozen
class Upgrade:
    """
    The head was an upgrade (or CONNECT) request; C{rest} are bytes that
    follow it, which belong to the upgraded protocol if the server
    switches (the engine holds them until it does).
    """

    rest: bytes


_END = EndOfMessage()


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")


def _codings_refused(headers: list[tuple[bytes, bytes]]) -> int:
    """
    The status refusing a request's transfer codings (all its
    Transfer-Encoding fields), 0 for chunked alone: 501 for other codings
    before a final chunked (rproxy re-frames a body and would drop them),
    400 for a list llhttp lets through but that frames nothing.  The
    obsolete C{identity} coding (no coding) is left out.
    """
    names = [coding.strip(b" \t").lower() for name, value in headers if name.lower() == b"transfer-encoding"
             for coding in value.split(b",")]
    names = [n for n in names if n != b"identity"] or names  # (the coding that does nothing)
    if names == [b"chunked"]:
        return 0
    if names[-1] == b"chunked" and b"chunked" not in names[:-1] and all(_TOKEN.fullmatch(n) for n in names[:-1]):
        return 501
    return 400


def _h2c(headers: list[tuple[bytes, bytes]]) -> bool:
    """
    Whether an Upgrade field offers h2c.
    """
    for name, value in headers:
        if name.lower() == b"upgrade" and b"h2c" in value.lower():
            return True
    return False


class RequestReader:
    """
    Feed request bytes in, take events out.  Not reusable after an error.
    """

    def __init__(
        self,
        max_target: int = 8192,
        max_head: int = 64 * 1024,
        max_headers: int = 100,
        max_body: int | None = None,
        require_host: bool = True,
        bodiless_end: bool = True,
    ) -> None:
        """
        @param bodiless_end: whether a request without a body gets an
            L{EndOfMessage} after its L{RequestHead}; without one, a head
            whose C{has_body} is false is the whole request.
        """
        self.require_host = require_host
        self.bodiless_end = bodiless_end
        self.max_target = max_target
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[object] = []
        self._error: HTTPError | None = None
        # body bytes in the events of the last feed()
        self.body_fed = 0
        self._in_head = self._in_body = False
        # the head of an upgrade request this reader declined (it is read
        # as a plain request), until llhttp stops after it
        self._declined: RequestHead | None = None
        # llhttp reads a made-up head (the declined request's framing):
        # its callbacks make no event
        self._replaying = False
        # an upgrade request was read: every later byte is an Upgrade's
        self.upgraded = False

    def _fail(self, status: int, reason: str) -> None:
        # httptools wraps exceptions raised in callbacks; keep ours to
        # re-raise it from feed()
        self._error = HTTPError(status, reason)
        raise self._error

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_fed = 0
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body_size = 0
        self._in_body = False

    def on_url(self, url: bytes) -> None:
        target = self._target = self._target + url if self._target else url
        if len(target) > self.max_target:
            self._fail(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # the head's size and field count are checked when it is complete:
        # until then what is kept is bounded by one read (and by max_head
        # across reads, in feed())
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._replaying:
            self._replaying = False
            self._in_head = False
            self._in_body = True
            return
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._fail(505, "HTTP Version Not Supported")
        headers = self._headers
        if len(headers) > self.max_headers:
            self._fail(431, "Request Header Fields Too Large")
        chunked = False
        content_length: int | None = None
        host = traceparent = None
        hosts = 0
        upgrade = odd_codings = False
        size = len(self._target)
        for name, value in headers:
            size += len(name) + len(value)
            lower = name.lower()
            if lower in _ORDINARY:
                continue
            if lower == b"host":
                host = value
                hosts += 1
            elif lower == b"transfer-encoding":
                if chunked or value not in _CHUNKED:
                    odd_codings = True
                chunked = True
            elif lower == b"content-length":
                content_length = int(value)
            elif lower == b"traceparent":
                if traceparent is None:  # (the first, as header() gives)
                    traceparent = value
            elif lower == b"upgrade":
                upgrade = True
            elif (
                lower[:1] in (b"t", b"c")
                and lower.replace(b"_", b"").replace(b"-", b"") in (b"transferencoding", b"contentlength")
            ):
                # Transfer_Encoding, Content__Length...: a server that folds
                # "_" into "-" would frame the body differently
                self._fail(400, f"suspicious header name {name[:40]!r}")
        if size + 4 * len(headers) > self.max_head:
            self._fail(431, "Request Header Fields Too Large")
        if odd_codings:
            status = _codings_refused(headers)
            if status:
                self._fail(status, "Transfer-Encoding other than chunked" if status == 501
                           else "invalid Transfer-Encoding")
        if chunked and version == (1, 0):
            self._fail(400, "Transfer-Encoding on HTTP/1.0")
        if hosts != 1 and version == (1, 1) and (hosts or self.require_host):
            self._fail(400, "missing Host" if not hosts else "repeated Host")
        if host is not None and host not in _valid_hosts:
            if not _HOST.match(host):
                self._fail(400, "invalid Host")
            if len(_valid_hosts) >= 4096:
                _valid_hosts.clear()
            _valid_hosts.add(host)
        if content_length is not None and self.max_body is not None and content_length > self.max_body:
            self._fail(413, "Content Too Large")
        method = parser.get_method()
        # (llhttp upgrades a CONNECT, or a request with an Upgrade field and
        # Connection: upgrade: it is not asked about the others)
        declined = False
        if upgrade or method == b"CONNECT":
            upgrade = parser.should_upgrade()
            if upgrade and method != b"CONNECT" and (chunked or content_length or _h2c(headers)):
                upgrade = False
                declined = True
        head = RequestHead(
            method, self._target, version, headers, parser.should_keep_alive(), chunked, content_length, upgrade,
            (chunked or (content_length is not None and content_length != 0)) and method in (b"GET", b"HEAD"), host,
            traceparent,
        )
        if declined:
            self._declined = head
        self._events.append(head)
        self._in_head = False
        self._in_body = True

    def on_body(self, data: bytes) -> None:
        self._body_size += len(data)
        self.body_fed += len(data)
        if self.max_body is not None and self._body_size > self.max_body:
            self._fail(413, "Content Too Large")
        self._events.append(Body(data))

    def on_message_complete(self) -> None:
        self._in_body = False
        events = self._events
        if self.bodiless_end or not events or events[-1].__class__ is not RequestHead or events[-1].has_body:
            events.append(_END)

    # -- the interface ----------------------------------------------------

    def feed(self, data: bytes) -> list[object]:
        """
        Parse C{data}; return the events it completes.

        @raise HTTPError: the request must be refused.
        """
        if self.upgraded:
            # (llhttp would read on as HTTP; these bytes are the new protocol's)
            self.body_fed = 0
            return [Upgrade(data)]
        continuing = self._in_head
        self.body_fed = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            if self._declined is None:
                self._events.append(Upgrade(data[offset:]))
                self.upgraded = True
            else:
                self._read_on(data[offset:])
        except httptools.HttpParserError as e:
            self._parse_error(e)
        if self._in_head:
            # httptools keeps a partial header line to itself: count what
            # a head that spans feeds has taken, so a head trickling in
            # (slowloris) is bounded by max_head plus one read; and the
            # fields kept so far by max_headers
            if continuing:
                self._head_fed += len(data)
            if self._head_fed > self.max_head or len(self._headers) > self.max_headers:
                self._error = HTTPError(431, "Request Header Fields Too Large")
                raise self._error
        events, self._events = self._events, []
        return events

    def _parse_error(self, e: Exception) -> None:
        if self._error is not None:
            raise self._error from None
        raise HTTPError(400, f"Bad Request: {e}") from None

    def _read_on(self, rest: bytes) -> None:
        """
        llhttp stopped after a declined upgrade request (it stops after any
        upgrade request's head, leaving a body unread): read on with a new
        parser, first through a made-up head with the declined request's
        framing (which makes no event), so its body and what follows are
        read as usual.
        """
        head = self._declined
        assert head is not None
        while head is not None:
            self._declined = None
            self._parser = httptools.HttpRequestParser(self)
            if head.has_body:
                # llhttp has already called it complete: its body is still to come
                events = self._events
                if events and events[-1] is _END:
                    events.pop()
                self._replaying = True
                framing = (b"Transfer-Encoding: chunked" if head.chunked
                           else b"Content-Length: %d" % head.content_length)  # type: ignore[str-bytes-safe]
                self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing
                                       + (b"\r\n\r\n" if head.keep_alive else b"\r\nConnection: close\r\n\r\n"))
            try:
                self._parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as upgrade:
                offset = upgrade.args[0] if upgrade.args else len(rest)
                rest = rest[offset:]
                head = self._declined
                if head is None:
                    self._events.append(Upgrade(rest))
                    self.upgraded = True
            except httptools.HttpParserError as e:
                self._parse_error(e)

    def refused_head(self) -> RequestHead:
        """
        What is known of the request whose head was being read when it was
        refused (for the access log): its method, target and version once
        its request line was read (the target cut at C{max_target}), its
        header fields so far; C{b"-"} for a method and target not known.
        """
        parser = self._parser
        if not self._in_head or parser is None:
            return RequestHead(b"-", b"-", (1, 1), [], keep_alive=False)
        method, target, version = b"-", self._target[:self.max_target] or b"-", (1, 1)
        if self._target:
            method = parser.get_method()
            major, _, minor = parser.get_http_version().partition(".")
            if major.isdigit() and minor.isdigit() and major != "0":
                version = (int(major), int(minor))
        return RequestHead(method, target, version, list(self._headers), keep_alive=False)

    def close(self) -> None:
        """
        Let go of the parser.  It and this reader refer to each other (it
        calls back this reader's methods): a reader whose connection has
        ended would otherwise wait for Python's cycle collector, and a
        proxy that closes thousands of connections a second would make it
        run often and long.  The reader reads no more after this.
        """
        self._parser = None
        self._events = []

    @property
    def in_head(self) -> bool:
        """
        Whether part of a request head has arrived but not all of it.
        """
        return self._in_head

    @property
    def in_body(self) -> bool:
        """
        Whether a request's body is being read (for timeouts: the head
        timeout no longer applies).
        """
        return self._in_body
