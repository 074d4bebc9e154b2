"""
The HTTP/1.1 frontend: a reverse proxy with per-server keep-alive pools.

One L{HTTPConnection} per client connection reads requests with the strict
L{RequestReader}; requests are served one at a time, in order (pipelined
ones wait, bounded: past L{QUEUE_LIMIT} buffered body bytes or
L{QUEUE_EVENTS} queued heads and chunks the client is paused).  Each
request becomes an L{Exchange}: route, take a server slot from the pool,
take an idle upstream connection of that server or open one, send the
rewritten head, stream the body, stream the response back, and return the
upstream connection to the pool if both messages were complete and both
sides allow keep-alive.  A server may send at most L{MAX_INTERIM} interim
(1xx) responses before its answer.

Bodies stream both ways with backpressure: the client's transport is the
producer of the upstream transport while a request body flows, and the
upstream's transport is the producer of the client's while a response
body flows.

Errors are answered, never a traceback: 400/413/414/431/505 from the
reader, 404 no route, 502 connect failure or invalid or lost upstream
response, 503 no server up (Retry-After), 504 C{response_timeout}.
Idempotent requests not yet sent are retried on another server after a
connect failure, and on a new connection after a reused one turned out to
be closed, within C{retries} and a retry budget; after a refused connect
any request is retried, outside the budget (nothing was sent).

A drain is a soft stop: idle keep-alive connections close, busy ones get
C{Connection: close} on the response in flight and close after it.
"""

from __future__ import annotations

import bisect
import collections
import json
import time
from typing import Any

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IProtocolNegotiationFactory, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.http.accesslog import AccessLogFile, escape
from rproxy.http.headers import (
    error_response,
    finish_scanned_head,
    request_head,
    response_head,
    scan_response_head,
)
from rproxy.http.reader import Body, EndOfMessage, HTTPError, RequestHead, RequestReader, Upgrade
from rproxy.http.routes import RouteTable, Rule, direct_target
from rproxy.pool import NoServerAvailable, Pool, QueueFull, QueueTimeout, Server
from rproxy.shortage import is_local
from rproxy.tcp import TCPFrontend, _nodelay, _peer
from rproxy.tls import HTTP_ALPN, client_tls_options
from rproxy.tokenpool import Lease, NoTokens, TokenPool, TokenQueueFull, TokenQueueTimeout
from rproxy.transport import connect_tcp

__all__ = ["HTTPFrontend", "HTTPConnection", "UpstreamPool"]

QUEUE_LIMIT = 256 * 1024
# pipelined requests read ahead of the one being served: past this many
# queued events (heads and body chunks) the client is paused until the
# queue is half as long
QUEUE_EVENTS = 64
# interim (1xx) responses a server may send before its final response
MAX_INTERIM = 16
MAX_RESPONSE_FIELDS = 200
# request duration histogram buckets (seconds); the last is +Inf
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    float("inf"))
# the retry budget: RETRY_RATIO percent of the requests of the last
# RETRY_WINDOW seconds, at least RETRY_MIN
RETRY_WINDOW = 10.0
RETRY_RATIO = 20
RETRY_MIN = 3
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_CHUNK_END = b"0\r\n\r\n"
_AUTHORIZATION = frozenset({b"authorization"})
_HASHING = frozenset({"ip-hash", "hash"})
_EMPTY_LINE = (b"\r", b"\n")


# The access log has a namespace of its own, so that it can be routed apart.
_access = Logger(namespace="rproxy.access")

CORS_HEADERS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Expose-Headers", b"*"),
]


def _cookie(head: RequestHead, name: bytes) -> bytes | None:
    """
    The value of cookie C{name} in the request, or None.
    """
    for key, value in head.headers:
        if key.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            cookie_name, eq, cookie_value = part.strip().partition(b"=")
            if eq and cookie_name == name:
                return cookie_value.strip().strip(b'"')
    return None


def server_host(server: Server, tls: bool) -> bytes:
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


def _chunk(data: bytes) -> bytes:
    # nothing for no data: an empty chunk would read as the end of the body
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


class UpstreamConnection(Protocol):
    """
    One connection to a server; serves one exchange at a time.
    """

    def __init__(self, upstreams: UpstreamPool, server: Server, pool: Pool) -> None:
        # every field set here (see HTTPConnection.__init__)
        self.exchange: Exchange | None = None
        self.parser: Any = None
        # the parser read its last response to the end and can read the next
        # (not after a HEAD answer, whose body llhttp would wait for)
        self.parser_clean = False
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.raw = b""  # the bytes of the current response since its head began
        self.head_start = -1  # where the head being read begins in raw; -1: not reading one
        self.informational = False
        self.interim = 0  # interim responses to the current request
        self.head = b""
        self.transport = None
        self.upstreams = upstreams
        self.server = server
        self.pool = pool
        self._connected: defer.Deferred[UpstreamConnection] | None = None

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        d, self._connected = self._connected, None
        if d is not None:
            d.callback(self)

    # -- one response ------------------------------------------------------

    def start(self, exchange: Exchange) -> None:
        self.exchange = exchange
        if not self.parser_clean:
            self.parser = httptools.HttpResponseParser(self)
        self.parser_clean = False
        self.raw = b""
        self.head_start = 0
        self.informational = False
        self.interim = 0

    def on_message_begin(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.response_done:
            # more after the response: this server cannot be trusted with
            # another request
            raise ValueError("data after the response")

    def on_headers_complete(self) -> None:
        # the head is in self.raw (llhttp has just read all of it, strict
        # about CRLF): cut it out at its blank line
        raw, start = self.raw, self.head_start
        while raw.startswith(_EMPTY_LINE, start):
            start += 1  # the empty lines llhttp skips before a message
        end = raw.find(b"\r\n\r\n", start)
        head = raw[start:end]
        self.head_start = end + 4
        # (a field takes at least 4 bytes: only a long head can have too many)
        if len(head) > 4 * MAX_RESPONSE_FIELDS and head.count(b"\r\n") > MAX_RESPONSE_FIELDS:
            raise ValueError(f"more than {MAX_RESPONSE_FIELDS} header fields")
        status = self.parser.get_status_code()
        exchange = self.exchange
        if 100 <= status < 200 and status != 101:
            # interim responses (103 Early Hints...) go on to HTTP/1.1
            # clients; 100 Continue does not: rproxy answers Expect itself
            self.informational = True
            self.interim += 1
            if self.interim > MAX_INTERIM:
                raise ValueError(f"more than {MAX_INTERIM} interim responses")
            # the next head starts after this one: drop this one's bytes
            self.raw = raw[self.head_start:]
            self.head_start = 0
            if status != 100 and exchange is not None and exchange.head.version >= (1, 1):
                line, block, _, _ = scan_response_head(head)
                exchange.write(finish_scanned_head(status, line, block, version=(1, 1), framing="none"))
            return
        self.raw = b""
        self.head_start = -1  # the head is complete
        self.head = head
        if exchange is not None:
            exchange.response_head(self, status, head, self.parser.should_keep_alive())

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(data)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.parser_clean = True
        if self.exchange is not None:
            self.exchange.response_end()

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # bytes from an idle server: it cannot be trusted with a request
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if exchange.upgraded:
            exchange.client.transport.write(data)  # type: ignore[union-attr]
            return
        exchange.got_bytes = True
        exchange.batch = []
        try:
            if self.head_start >= 0:
                # keep the head's bytes; llhttp sets no limit on a head: a
                # server's is bounded like a client's (max_head), checked
                # when it spans reads (one read is bounded by the transport)
                if self.raw:
                    raw = self.raw = self.raw + data
                    if len(raw) - self.head_start > exchange.frontend.max_head + len(data):
                        raise ValueError("response head too large")
                else:
                    self.raw = data
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            if self.exchange is not None:
                self.exchange.switch_protocols(data[offset:])
        except (httptools.HttpParserError, ValueError) as e:
            exchange.flush()
            if self.exchange is not None:
                self.exchange.upstream_failed(f"invalid response: {e}", invalid=True)
            elif not self.lost:
                # the exchange had ended (the connection may be idle in
                # the pool already): what followed it was not a response
                self.lost = True
                self.upstreams.discard(self)
                self.transport.abortConnection()  # type: ignore[union-attr]
        finally:
            exchange.flush()
        if exchange.response_started and not (exchange.response_done or exchange.producing or exchange.finished):
            # a body longer than this read: the client's transport pauses
            # this one while it cannot keep up (a response read whole
            # needs no producer)
            exchange.producing = True
            client = exchange.client
            client.ungate()
            client.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.upstreams.discard(self)
        # the parser calls back this object: drop it, or the two wait for
        # the cycle collector (see RequestReader.close)
        parser, self.parser = self.parser, None
        self.parser_clean = False
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.upgraded:
            exchange.client.transport.loseConnection()  # type: ignore[union-attr]
            return
        if parser is not None and exchange.response_started and not exchange.response_done:
            # a close-delimited body ends here
            try:
                parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if exchange.close_delimited and not exchange.response_done:
                exchange.response_end()
                return
        if not exchange.response_done:
            exchange.upstream_failed(reason.getErrorMessage() if reason else "connection lost")


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: UpstreamConnection, d: defer.Deferred[UpstreamConnection]) -> None:
        self.conn = conn
        self.d = d

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return self.conn

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.d.called:
            self.d.errback(reason)


class UpstreamPool:
    """
    Idle keep-alive connections per server, shared by the HTTP frontends.
    """

    def __init__(self, reactor: Any, clock: Any, max_idle: int = 256, idle_timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[Server, list[UpstreamConnection]] = collections.defaultdict(list)
        self.opened = 0
        self.reused = 0
        self._sweep: IDelayedCall | None = None
        self._tls_cache: dict[Any, Any] = {}

    def take_idle(self, server: Server) -> UpstreamConnection | None:
        """
        An idle keep-alive connection to C{server}, if there is one (the
        common case, with no Deferred to pay for).
        """
        idle = self.idle.get(server)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn.reused = True
                self.reused += 1
                return conn
        return None

    def get(self, server: Server, pool: Pool, timeout: float) -> defer.Deferred[UpstreamConnection]:
        conn = self.take_idle(server)
        if conn is not None:
            return defer.succeed(conn)
        self.opened += 1
        d: defer.Deferred[UpstreamConnection] = defer.Deferred()
        conn = UpstreamConnection(self, server, pool)
        conn._connected = d
        factory: Any = _UpstreamFactory(conn, d)
        tls = pool.config.tls
        if tls is not None:
            factory = TLSMemoryBIOFactory(self._tls_options(tls, server), True, factory)
        connector = connect_tcp(self.reactor, server.host, server.port, factory, timeout)

        def cancel(result: Any) -> Any:
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                connector.stopConnecting()
            return result

        d.addErrback(cancel)
        return d

    def _tls_options(self, tls: Any, server: Server) -> Any:
        key = (tls, tls.server_name or server.host)
        options = self._tls_cache.get(key)
        if options is None:
            options = self._tls_cache[key] = client_tls_options(key[1], tls.ca, tls.verify)
        return options

    def put(self, conn: UpstreamConnection, now: float | None = None) -> None:
        if conn.lost or conn.server.draining:
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        idle = self.idle[conn.server]
        if len(idle) >= self.max_idle:
            conn.transport.loseConnection()  # type: ignore[union-attr]
            return
        conn.exchange = None
        conn.idle_since = now if now is not None else self.clock.seconds()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_timeout / 2, self.sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        idle = self.idle.get(conn.server)
        if idle and conn in idle:
            idle.remove(conn)

    def sweep(self) -> None:
        self._sweep = None
        cutoff = self.clock.seconds() - self.idle_timeout
        for idle in self.idle.values():
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                idle.remove(conn)
                conn.transport.loseConnection()  # type: ignore[union-attr]
        if any(self.idle.values()):
            self._sweep = self.clock.callLater(self.idle_timeout / 2, self.sweep)

    def close(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for idle in self.idle.values():
            for conn in idle:
                conn.transport.loseConnection()  # type: ignore[union-attr]
            idle.clear()

    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())


class Exchange:
    """
    One request and its response.
    """

    # slots, every one set in __init__: an exchange is made per request and
    # its fields are read many times (a slot is the cheapest to read)
    __slots__ = (
        "client", "frontend", "head", "target", "tried", "started", "upstream", "server", "pool", "route",
        "ready_for_body", "request_done", "response_started", "response_done", "close_delimited", "got_bytes",
        "upgraded", "switching", "finished", "producing", "batch", "deadline", "status", "token", "_pending",
        "attempts", "pinned", "framing", "keep_upstream", "upgrade_rest", "delivered_before",
    )

    def __init__(self, client: HTTPConnection, head: RequestHead) -> None:
        self.client = client
        self.frontend = frontend = client.frontend
        self.head = head
        self.target = head.target
        self.tried: list[str] = []
        self.started = frontend.clock.seconds()
        self.upstream: UpstreamConnection | None = None
        self.server: Server | None = None
        self.pool: Pool | None = None
        self.route: Rule | None = None  # None for a direct route
        self.ready_for_body = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.close_delimited = False
        self.got_bytes = False
        self.upgraded = False
        self.switching = False
        self.finished = False
        self.producing = False  # the upstream transport is the client's producer
        # client writes made while one upstream read is parsed go out in one
        # send(); flushed at the end of that read and before the exchange ends
        self.batch: list[bytes] | None = None
        self.deadline: float | None = None
        self.status = 0
        self.token: str | None = None  # the bearer token this request carries (token pools)
        self._pending: defer.Deferred[Any] | None = None
        self.attempts = 0
        self.pinned: str | None = None  # the server a direct route names
        self.framing = "none"
        self.keep_upstream = False
        self.upgrade_rest = b""
        self.delivered_before = client.delivered  # the response's bytes are what is added

    # -- request side ------------------------------------------------------

    def begin(self) -> None:
        frontend = self.frontend
        head = self.head
        if frontend.plain and frontend.tokens is None and head.method != b"CONNECT":
            # no CORS, token pool or direct routes to look at: route now
            self.dispatch()
            return
        if head.method == b"CONNECT":
            self.fail(405, "CONNECT is not supported")
            return
        if (
            frontend.cors
            and head.method == b"OPTIONS"
            and head.header(b"origin") is not None
            and head.header(b"access-control-request-method") is not None
        ):
            self.preflight()
            return
        tokens = frontend.tokens
        if tokens is not None:
            lease = self.client.lease
            if lease is None:
                lease = tokens.try_lease()
                if lease is None:
                    self._wait_token(tokens.lease())
                    return
                self.client.lease = lease
            elif not lease.ready():
                self._wait_token(lease.wait())
                return
            self.token = lease.token
        self.dispatch()

    def _wait_token(self, d: defer.Deferred[Lease]) -> None:
        self._pending = d
        d.addCallbacks(self._leased, self._no_token)
        d.addErrback(self._callback_failed, "leasing a token")

    def _leased(self, lease: Lease) -> None:
        self._pending = None
        client = self.client
        if client.lease is None:
            if client.lost:
                lease.release()
                return
            client.lease = lease
        if self.finished:
            return
        self.token = lease.token
        self.dispatch()

    def _no_token(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(defer.CancelledError):
            return
        if reason.check(TokenQueueTimeout, TokenQueueFull, NoTokens):
            self.fail(503, reason.getErrorMessage(), retry_after=True)
        else:
            self.frontend.log.failure("leasing a token failed", reason)
            self.fail(502, "no token")

    def _callback_failed(self, reason: Failure, what: str) -> None:
        """
        What a callback of a lease, a server pick or a connect raised (a
        bug): one line in the log, the exchange's resources given back,
        and the client answered 502 (or cut, if its answer had begun).
        """
        self._pending = None
        self.frontend.log.error(
            "frontend {frontend}: {what} failed: {why}",
            frontend=self.frontend.name, what=what, why=f"{reason.type.__name__}: {reason.getErrorMessage()}",
        )
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.exchange = None
            if not upstream.lost:
                upstream.transport.abortConnection()  # type: ignore[union-attr]
        self.release_server()
        if not (self.finished or self.response_started):
            self.fail(502, f"internal error {what}")
            return
        self.finished = True
        if not self.client.lost:
            self.client.abort()

    def dispatch(self) -> None:
        frontend = self.frontend
        head = self.head
        direct = direct_target(head.target) if frontend.direct_routes else None
        if direct is not None:
            name, self.target = direct
            self.pinned = name
            pool = next((p for p in frontend.pools.values() if any(s.name == name for s in p.servers)), None)
            if pool is None:
                self.fail(404, f"no server named {name}")
                return
            self.pool = pool
        else:
            route = frontend.routes.match(head.host, head.target)
            if route is None:
                self.fail(404, "no route")
                return
            self.route = route
            self.pool = frontend.pools[route.backend]
        self.acquire()

    def acquire(self) -> None:
        pool = self.pool
        assert pool is not None
        if self.pinned is not None:
            # through the pool, whose release wakes the requests waiting
            # for a slot on it
            server = pool.try_acquire_named(self.pinned)
            if server is None:
                named = next((s for s in pool.servers if s.name == self.pinned), None)
                full = named is not None and named.usable(self.frontend.clock.seconds())
                self.fail(503, f"server {self.pinned} is {'full' if full else 'not up'}", retry_after=True)
                return
            self.got_server(server)
            return
        sticky = self.frontend.sticky
        if sticky is not None and not self.tried:
            wanted = _cookie(self.head, sticky)
            if wanted:
                server = pool.try_acquire_named(wanted.decode("ascii", "replace"))
                if server is not None:
                    self.got_server(server)
                    return
        key = self.hash_key(pool) if pool.config.algorithm in _HASHING else None
        server = pool.try_acquire(key, self.tried)
        if server is not None:
            self.got_server(server)
            return
        d = pool.acquire(key, self.tried)
        self._pending = d
        d.addCallbacks(self.got_server, self.no_server)
        d.addErrback(self._callback_failed, "choosing a server")

    def hash_key(self, pool: Pool) -> bytes | None:
        """
        The consistent-hash key of this request for a hashing C{pool}
        (source_ip, header:NAME or cookie:NAME; acquire asks only those).
        """
        kind, _, name = pool.config.hash_key.partition(":")
        if kind == "header":
            return self.head.header(name.lower().encode())
        if kind == "cookie":
            return _cookie(self.head, name.encode())
        return self.client.peer_ip

    def no_server(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(defer.CancelledError):
            return
        if reason.check(NoServerAvailable, QueueFull, QueueTimeout):
            self.fail(503, reason.getErrorMessage(), retry_after=True)
        else:
            self.frontend.log.failure("choosing a server failed", reason)
            self.fail(502, "no server")

    def got_server(self, server: Server) -> None:
        self._pending = None
        if self.finished:
            assert self.pool is not None
            self.pool.release(server)
            return
        self.server = server
        self.tried.append(server.config.name)
        self.attempts += 1
        idle = self.frontend.upstreams.take_idle(server)
        if idle is not None:
            self.connected(idle)
            return
        d = self.frontend.upstreams.get(server, self.pool, self.frontend.config.connect_timeout)  # type: ignore[arg-type]
        self._pending = d
        d.addCallbacks(self.connected, self.connect_failed)
        d.addErrback(self._callback_failed, "connecting to a server")

    def connect_failed(self, reason: Failure) -> None:
        self._pending = None
        if reason.check(defer.CancelledError):
            return
        server, pool = self.server, self.pool
        assert server is not None and pool is not None
        self.server = None
        if is_local(reason):
            # our own shortage (descriptors, ...): not the server's fault,
            # and another server would fail the same way
            pool.release(server)
            self.frontend.shortage_failed(reason)
            if not self.finished:
                self.fail(502, "out of local resources")
            return
        pool.record_failure(server, reason.getErrorMessage())
        pool.release(server)
        self.frontend.connect_errors += 1
        if self.finished:
            return
        # a refused connect sent nothing: trying another server is safe
        # whatever the method, and costs the refusing server nothing, so
        # it takes no retry budget (HAProxy's and nginx's rule)
        if (
            (self.may_retry() if not reason.check(error.ConnectionRefusedError) else self.may_retry_refused())
            and pool.any_up(self.tried)
        ):
            self.frontend.retries_total += 1
            self.acquire()
            return
        self.fail(502, f"cannot connect to {server.name}")

    def may_retry(self) -> bool:
        return (
            self.pinned is None
            and self.head.method in IDEMPOTENT
            and not self.head.has_body
            and self.attempts <= self.frontend.config.http.retries
            and self.frontend.retry_budget_allows()
        )

    def may_retry_refused(self) -> bool:
        return self.pinned is None and self.attempts <= self.frontend.config.http.retries

    def connected(self, upstream: UpstreamConnection) -> None:
        self._pending = None
        server = self.server
        assert server is not None and self.pool is not None
        if not upstream.reused:
            self.pool.record_success(server)
        if self.finished:
            upstream.transport.loseConnection()  # type: ignore[union-attr]
            self.release_server()
            return
        self.upstream = upstream
        upstream.start(self)
        head = self.head
        frontend = self.frontend
        route = self.route
        if route is not None:
            set_headers, remove = route.set_headers, route.remove
        else:
            set_headers, remove = (), frozenset()
        if self.token is not None:
            # replaces whatever Authorization the client sent
            set_headers = (*set_headers, (b"Authorization", b"Bearer " + self.token.encode("ascii")))
            remove = remove | _AUTHORIZATION
        transport = upstream.transport
        transport.write(request_head(  # type: ignore[union-attr]
            head.method, self.target, head.headers, self.client.peer_ip, frontend.scheme, head.chunked,
            head.content_length, head.upgrade,
            server_host(server, self.pool.config.tls is not None) if frontend.host_is_server else None,
            set_headers, remove,
        ))
        if frontend.response_timeout > 0:
            self.deadline = frontend.deadline(frontend.response_timeout)
        self.ready_for_body = True
        if head.has_body:
            client = self.client
            if (head.header(b"expect") or b"").lower() == b"100-continue":
                client.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
            transport.registerProducer(client.transport, True)  # type: ignore[union-attr]
        if self.upgrade_rest:
            transport.write(self.upgrade_rest)  # type: ignore[union-attr]
        if not self.client.pumping:
            # (a pump up the stack, the common case, sees the body itself)
            self.client.pump()

    def send_body(self, data: bytes) -> None:
        assert self.upstream is not None
        self.upstream.transport.write(_chunk(data) if self.head.chunked else data)  # type: ignore[union-attr]

    def end_request(self) -> None:
        self.request_done = True
        upstream = self.upstream
        if upstream is None:
            return
        if self.head.has_body:
            upstream.transport.unregisterProducer()  # type: ignore[union-attr]
        if self.head.chunked:
            upstream.transport.write(_CHUNK_END)  # type: ignore[union-attr]
        if self.response_done:
            self.complete()

    # -- response side -----------------------------------------------------

    def write(self, data: bytes) -> None:
        batch = self.batch
        if batch is not None:
            batch.append(data)
        else:
            self.client.transport.write(data)  # type: ignore[union-attr]

    def flush(self) -> None:
        batch, self.batch = self.batch, None
        if batch:
            self.client.transport.write(b"".join(batch))  # type: ignore[union-attr]

    def response_head(self, upstream: UpstreamConnection, status: int, raw_head: bytes, keep_alive: bool) -> None:
        if status == 101 and not self.head.upgrade:
            self.upstream_failed("101 Switching Protocols to a request that did not ask", invalid=True)
            return
        self.deadline = None
        self.response_started = True
        self.status = status
        if status == 401 and self.token is not None and self.client.lease is not None:
            self.client.lease.unauthorized(self.token)
        if status == 101:
            self.switching = True  # the head goes out in switch_protocols
            return
        head = self.head
        line, block, has_length, encoded = scan_response_head(raw_head)
        # (interim answers never get here: on_headers_complete passes them on)
        no_body = status == 204 or status == 304 or head.method == b"HEAD"
        if no_body:
            framing = "none"
        elif has_length:
            framing = "length"
        elif encoded:
            framing = "chunked" if head.version != (1, 0) else "close"
        else:
            self.close_delimited = True
            framing = "chunked" if head.version != (1, 0) else "close"
        self.framing = framing
        self.keep_upstream = keep_alive and not self.close_delimited and not head.suspicious_body
        client = self.client
        close = not head.keep_alive or framing == "close" or client.closing_after_response
        client.closing_after_response = close
        frontend = self.frontend
        extra: list[tuple[bytes, bytes]] = []
        sticky = frontend.sticky
        if sticky is not None and self.server is not None and self.pinned is None:
            name = self.server.name.encode()
            if _cookie(head, sticky) != name:
                extra.append((b"Set-Cookie", sticky + b"=" + name + b"; Path=/; HttpOnly"))
        if frontend.cors:
            extra += CORS_HEADERS
        self.write(finish_scanned_head(status, line, block, head.version, framing, close, False, extra))
        if no_body:
            # llhttp does not know this response has no body (HEAD): it is
            # complete now; any byte that follows is an error
            self.response_end()

    def response_body(self, data: bytes) -> None:
        if self.response_done:
            return
        self.client.delivered += len(data)
        framing = self.framing
        if framing == "chunked":
            self.write(_chunk(data))
        elif framing != "none":
            self.write(data)

    def response_end(self) -> None:
        if self.response_done or self.switching:
            return
        self.response_done = True
        self.deadline = None
        if self.producing:
            self.producing = False
            self.client.transport.unregisterProducer()  # type: ignore[union-attr]
            self.client.gate()
        if self.framing == "chunked":
            self.write(_CHUNK_END)
        self.flush()
        if self.request_done or not self.ready_for_body:
            self.complete()
        else:
            # the server answered before the request body ended: do not
            # reuse that connection, and stop reading the client
            self.keep_upstream = False
            self.client.closing_after_response = True
            self.complete()

    def switch_protocols(self, rest: bytes) -> None:
        """
        101 from the server: splice the two connections from now on.
        """
        upstream, client = self.upstream, self.client
        assert upstream is not None
        self.flush()
        if not self.switching or self.finished:
            self.upstream_failed("unexpected protocol switch", invalid=True)
            return
        self.deadline = None
        self.switching = False
        self.upgraded = True
        self.response_started = self.response_done = True
        line, block, _, _ = scan_response_head(upstream.head, upgrade=True)
        head = finish_scanned_head(101, line, block, version=(1, 1), framing="none", upgrade=True)
        client.transport.write(head)  # type: ignore[union-attr]
        if rest:
            client.transport.write(rest)  # type: ignore[union-attr]
        if self.head.has_body:
            upstream.transport.unregisterProducer()  # type: ignore[union-attr]
        client.ungate()
        client.transport.registerProducer(upstream.transport, True)  # type: ignore[union-attr]
        upstream.transport.registerProducer(client.transport, True)  # type: ignore[union-attr]
        client.upgraded(self)
        self.frontend.count(self)

    # -- endings -----------------------------------------------------------

    def complete(self) -> None:
        if self.finished:
            return
        self.finished = True
        frontend = self.frontend
        now = frontend.clock.seconds()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            if self.keep_upstream and self.request_done and not upstream.lost:
                frontend.upstreams.put(upstream, now)
            else:
                upstream.exchange = None
                upstream.transport.loseConnection()  # type: ignore[union-attr]
        self.release_server(ok=self.status < 500)
        frontend.count(self, now)
        self.client.exchange_done(self, now)

    def release_server(self, ok: bool | None = None) -> None:
        """
        Give back the server slot; C{ok} False (a 5xx answer) or True (any
        other) feeds passive outlier ejection, None leaves it alone.
        """
        server, pool = self.server, self.pool
        self.server = None
        if server is not None and pool is not None:
            if ok is False:
                pool.record_failure(server, f"answered {self.status}")
            elif ok:
                pool.record_success(server)
            pool.release(server)

    def upstream_failed(self, why: str, invalid: bool = False) -> None:
        self.flush()
        upstream, server, pool = self.upstream, self.server, self.pool
        if self.finished:
            return
        self.deadline = None
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            if not upstream.lost:
                upstream.transport.abortConnection()  # type: ignore[union-attr]
        if self.response_started:
            # the head is out: all the client can be told is a cut
            self.finished = True
            self.release_server()
            self.frontend.count(self)
            self.client.abort()
            return
        retry = (
            upstream is not None and upstream.reused and not self.got_bytes and self.may_retry()
        )
        if server is not None and pool is not None:
            pool.release(server)
            self.server = None
            if not retry:
                pool.record_failure(server, why)
        if retry:
            # a kept-alive connection the server had closed: try a fresh one
            self.ready_for_body = False
            self.frontend.retries_total += 1
            self.tried = self.tried[:-1]
            self.acquire()
            return
        self.fail(502, f"upstream: {why}")

    def timed_out(self) -> None:
        self.deadline = None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.transport.abortConnection()  # type: ignore[union-attr]
        self.release_server()
        self.fail(504, f"no response within {self.frontend.config.http.response_timeout}s")

    def preflight(self) -> None:
        """
        Answer a CORS preflight here (the VK gateway's permissive CORS).
        """
        self.finished = True
        self.status = 204
        requested = self.head.header(b"access-control-request-headers")
        headers = [
            (b"Access-Control-Allow-Origin", b"*"),
            (b"Access-Control-Allow-Methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
            (b"Access-Control-Allow-Headers", requested or b"*"),
            (b"Access-Control-Max-Age", b"86400"),
        ]
        close = not self.head.keep_alive or self.client.closing_after_response
        self.client.transport.write(response_head(  # type: ignore[union-attr]
            204, b"No Content", headers, version=self.head.version, framing="none", close=close))
        self.request_done = True
        self.frontend.count(self)
        self.client.exchange_done(self)

    def fail(self, status: int, message: str, retry_after: bool = False) -> None:
        """
        Answer the client with an error and close its connection.
        """
        if self.finished and status != 504:
            return
        self.finished = True
        self.status = status
        self.deadline = None
        if self._pending is not None:
            d, self._pending = self._pending, None
            d.cancel()
        self.frontend.count(self)
        self.client.send_error(status, message, retry_after)

    def abandon(self) -> None:
        """
        The client went away.
        """
        if self.finished:
            return
        self.finished = True
        self.deadline = None
        if self._pending is not None:
            d, self._pending = self._pending, None
            d.cancel()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            if not upstream.lost:
                upstream.transport.abortConnection()  # type: ignore[union-attr]
        self.release_server()


@implementer(IPushProducer)
class HTTPConnection(Protocol):
    """
    A client connection of an HTTP frontend.
    """

    def __init__(self, frontend: HTTPFrontend, peer: Any = None) -> None:
        # every field is set here, none left to a class default: reading
        # an instance's own field is the fast path of attribute access
        self.peer = peer  # the client's address, as the port accepted it
        self.exchange: Exchange | None = None
        self.backend = None  # (TCPFrontend's bookkeeping)
        self.counted = False
        self.closing = False
        self.closing_after_response = False
        self.upgraded_exchange: Exchange | None = None
        self.lease: Lease | None = None  # the token-pool lease held for the connection's life
        self.lost = False
        self._queue_timer: IDelayedCall | None = None
        self.head_deadline: float | None = None
        self.quiet_ticks = 0
        self.last_total = -1
        self.pumping = False
        self.transport = None
        self.frontend = frontend
        http = frontend.config.http
        # without an EndOfMessage after a bodiless request's head: the head
        # is the whole request
        self.reader = RequestReader(http.max_target, http.max_head, http.max_headers, http.max_body,
                                    bodiless_end=False)
        self.events: collections.deque[Any] = collections.deque()
        self.queued = 0
        self.paused = False
        # this connection is its transport's producer between response
        # bodies; write_paused: the client is not reading its answers
        self.gated = False
        self.write_paused = False
        self.received = 0
        self.delivered = 0

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        # the address the port accepted from (getPeer() would make another)
        peer = self.peer if self.peer is not None else self.transport.getPeer()  # type: ignore[union-attr]
        self.peer_host = getattr(peer, "host", "unix")
        self.peer_ip = self.peer_host.encode("ascii", "replace")
        self.frontend.admit(self)

    def start(self) -> None:
        self.counted = True
        self.gate()
        self._arm_head_timer()
        self.pump()

    # -- the client reading its answers ------------------------------------

    def gate(self) -> None:
        """
        Be the transport's producer while no response body streams: when
        the answers the client has not read fill the transport's buffer,
        the transport pauses this connection and no next request starts
        until they drain, so a client that sends requests (pipelined or
        not) and reads no answer holds a bounded amount of memory.
        """
        if not (self.gated or self.closing or self.lost):
            self.gated = True
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def ungate(self) -> None:
        """
        Give the producer slot up: to a response body's source, or before a
        close (a transport with a producer waits for it to go before
        closing).
        """
        if self.gated:
            self.gated = False
            self.write_paused = False
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        if self.events and self.exchange is None:
            self.pump()

    def stopProducing(self) -> None:
        self.write_paused = False

    def _arm_head_timer(self, now: float | None = None) -> None:
        frontend = self.frontend
        timeout = frontend.header_timeout
        if timeout > 0 and self.head_deadline is None:
            self.head_deadline = frontend.deadline(timeout, now)

    def head_timed_out(self) -> None:
        self.head_deadline = None
        if self.exchange is None and self.upgraded_exchange is None and not self.events:
            if self.reader.in_head:
                self.send_error(408, "request head not received in time")
            else:
                self.ungate()
                self.transport.loseConnection()  # type: ignore[union-attr]

    def activity(self) -> int | None:
        if self.exchange is not None or self.upgraded_exchange is not None:
            return None
        return self.received + self.delivered

    def idle_abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _abort(self) -> None:
        self.idle_abort()

    # -- reading -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        upgraded = self.upgraded_exchange
        if upgraded is not None:
            if upgraded.upstream is not None:
                upgraded.upstream.transport.write(data)  # type: ignore[union-attr]
            return
        if self.closing:
            return
        reader = self.reader
        try:
            events = reader.feed(data)
        except HTTPError as e:
            self.events.clear()
            if self.exchange is not None and self.exchange.response_started:
                self.abort()
            else:
                if self.exchange is not None:
                    self.exchange.abandon()
                    self.exchange = None
                self.frontend.count_status(e.status)
                self.send_error(e.status, e.reason)
            return
        queue = self.events
        queue.extend(events)
        if reader.body_fed:
            self.queued += reader.body_fed
        if (self.queued > QUEUE_LIMIT or len(queue) > QUEUE_EVENTS) and not self.paused:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.pump()

    def pump(self) -> None:
        """
        Hand queued events to the current exchange, starting the next one
        when the previous has finished.
        """
        if not self.counted or self.closing or self.pumping:
            # (a pump further up the stack looks at the queue again when
            # the call that led here returns)
            return
        self.pumping = True
        try:
            self._pump()
        finally:
            self.pumping = False
        if self.paused and self.queued < QUEUE_LIMIT // 2 and len(self.events) <= QUEUE_EVENTS // 2:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _pump(self) -> None:
        events = self.events
        while events and not self.closing:
            event = events[0]
            exchange = self.exchange
            kind = type(event)
            if kind is RequestHead:
                if exchange is not None or self.closing_after_response or self.write_paused:
                    break
                events.popleft()
                self.head_deadline = None
                self.exchange = exchange = Exchange(self, event)
                self.frontend.active_requests += 1
                if not event.has_body:
                    exchange.request_done = True  # (no EndOfMessage follows)
                exchange.begin()
            elif exchange is None:
                events.popleft()  # the rest of a request already answered
                if kind is Body:
                    self.queued -= len(event.data)
            elif kind is Body:
                if not exchange.ready_for_body:
                    break
                events.popleft()
                self.queued -= len(event.data)
                exchange.send_body(event.data)
            elif kind is EndOfMessage:
                if not exchange.ready_for_body and not exchange.finished:
                    if exchange.head.has_body:
                        break
                    exchange.request_done = True
                    events.popleft()
                    continue
                events.popleft()
                exchange.end_request()
            elif isinstance(event, Upgrade):
                events.popleft()
                exchange.upgrade_rest = event.rest
                if exchange.upstream is not None:
                    exchange.upstream.transport.write(event.rest)  # type: ignore[union-attr]
            else:
                events.popleft()

    def exchange_done(self, exchange: Exchange, now: float | None = None) -> None:
        if self.exchange is exchange:
            self.exchange = None
            self.frontend.active_requests -= 1
        if self.closing_after_response or not exchange.head.keep_alive:
            self.ungate()
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._arm_head_timer(now)
        if self.events:
            self.pump()

    def drain(self) -> None:
        """
        Serve no request after the one in flight (if any), and close.
        """
        if self.upgraded_exchange is not None or self.lost:
            return  # a spliced stream ends when its ends do, or at grace
        self.closing_after_response = True
        if self.exchange is None:
            self.ungate()
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def upgraded(self, exchange: Exchange) -> None:
        self.upgraded_exchange = exchange
        self.head_deadline = None
        if self.exchange is exchange:
            self.exchange = None
            self.frontend.active_requests -= 1
        rest = [e for e in self.events if isinstance(e, Upgrade)]
        self.events.clear()
        for event in rest:
            if exchange.upstream is not None and event.rest:
                exchange.upstream.transport.write(event.rest)  # type: ignore[union-attr]

    # -- answering ---------------------------------------------------------

    def send_error(self, status: int, message: str, retry_after: bool = False) -> None:
        if self.exchange is not None:
            self.exchange = None
            self.frontend.active_requests -= 1
        self.closing = True
        self.events.clear()
        extra = [(b"Retry-After", b"1")] if retry_after else []
        self.head_deadline = None
        self.frontend.log.info(
            "frontend {frontend}: {status} for {peer}: {message}",
            frontend=self.frontend.name, status=status, peer=_peer(self.transport), message=message,
        )
        # (the gate or a response body's source: a transport with a
        # producer would not close)
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.gated = self.write_paused = False
        self.transport.write(error_response(status, message, extra=extra))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.head_deadline = None
        for exchange in (self.exchange, self.upgraded_exchange):
            if exchange is None:
                continue
            if exchange is self.exchange:
                self.frontend.active_requests -= 1
            if exchange.upgraded and exchange.upstream is not None:
                exchange.upstream.transport.loseConnection()  # type: ignore[union-attr]
                exchange.release_server()
            else:
                exchange.abandon()
        self.exchange = self.upgraded_exchange = None
        self.reader.close()
        if self.lease is not None:
            self.lease.release()
        self.frontend.forget(self)  # type: ignore[arg-type]


@implementer(IProtocolNegotiationFactory)
class HTTPFrontend(TCPFrontend):
    """
    The factory of one C{protocol: http} frontend.  Admission, limits and
    draining are the TCP frontend's.
    """

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN may select on a TLS listener of this frontend: HTTP/1.1,
        the one version it speaks (a client offering only h2 still
        connects, without ALPN).
        """
        return list(HTTP_ALPN)

    def __init__(self, config: Any, pools: dict[str, Pool], reactor: Any, clock: Any,
                 upstreams: UpstreamPool, limit: Any = None) -> None:
        pool = pools[config.backend] if config.backend else next(iter(pools.values()))
        super().__init__(config, pool, reactor, clock, limit)
        self.pools = pools
        self.upstreams = upstreams
        self.tokens: TokenPool | None = None
        self.access_file: AccessLogFile | None = None
        self.configure(config)
        self.active_requests = 0
        self.retries_total = 0
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self._deadlines: IDelayedCall | None = None
        self.counted_requests = 0
        self.budgeted_retries = 0
        # (time, counted_requests, budgeted_retries) about once a second,
        # the last RETRY_WINDOW seconds of them: the retry budget's window
        self._ticks: collections.deque[tuple[float, int, int]] = collections.deque()
        self._next_tick = 0.0

    def configure(self, config: Any) -> None:
        self.config = config
        self.routes = RouteTable(config.routes, config.backend)
        http = config.http
        self.direct_routes = http.direct_routes
        # read once per request: kept as attributes
        self.header_timeout = http.header_timeout
        self.response_timeout = http.response_timeout
        self.access_log = http.access_log != "off"
        self._access_file(http.access_log_path if self.access_log else None)
        self.host_is_server = http.host_header == "server"
        self.cors = http.cors
        self.max_head = http.max_head
        # nothing but routes between a request and its pool (token pools
        # are looked at apart: they are attached after configure)
        self.plain = not (self.cors or self.direct_routes)
        self.sticky = http.sticky_cookie.encode() if http.sticky_cookie is not None else None
        self.scheme = b"https" if config.listen.startswith("ssl:") or config.tls else b"http"

    def _access_file(self, path: str | None) -> None:
        """
        Log requests to the file at C{path} (None: to the process log);
        the same path again is reopened, for log rotation.
        """
        current = self.access_file
        if current is not None and current.path == path:
            current.reopen()
            return
        if current is not None:
            current.close()
            self.access_file = None
        if path is None:
            return
        try:
            self.access_file = AccessLogFile(path, self.clock)
        except OSError as e:
            self.log.error("frontend {frontend}: access log {path}: cannot open: {why}; logging to the process log",
                           frontend=self.name, path=path, why=e.strerror or e)

    def reopen_access_log(self) -> None:
        """
        Start a new access log file at the same path (after a rotation).
        """
        if self.access_file is not None:
            self.access_file.reopen()

    def buildProtocol(self, addr: object) -> HTTPConnection:  # type: ignore[override]
        return HTTPConnection(self, addr)

    def deadline(self, timeout: float, now: float | None = None) -> float:
        """
        The time C{timeout} seconds from C{now} (the clock's time if None),
        with the sweep that enforces header and response timeouts running.
        """
        if self._deadlines is None:
            http = self.config.http
            timeouts = [t for t in (http.header_timeout, http.response_timeout) if t > 0]
            tick = min(1.0, max(0.02, min(timeouts, default=1.0) / 4))
            self._deadlines = self.clock.callLater(tick, self._sweep_deadlines, tick)
        return (now if now is not None else self.clock.seconds()) + timeout

    def _sweep_deadlines(self, tick: float) -> None:
        """
        One timer per frontend instead of two per request: a request head
        or a response is late by at most a quarter of its timeout.
        """
        self._deadlines = None
        now = self.clock.seconds()
        pending = False
        for conn in list(self.connections):
            if not isinstance(conn, HTTPConnection):
                continue
            if conn.head_deadline is not None:
                if now >= conn.head_deadline:
                    conn.head_timed_out()
                else:
                    pending = True
            exchange = conn.exchange
            if exchange is not None and exchange.deadline is not None:
                if now >= exchange.deadline:
                    exchange.timed_out()
                else:
                    pending = True
        if pending:
            self._deadlines = self.clock.callLater(tick, self._sweep_deadlines, tick)

    def retry_budget_allows(self) -> bool:
        """
        Whether one more retry fits the budget: retries may add at most 20%
        to the requests of the last L{RETRY_WINDOW} seconds (and at least 3
        are always allowed), so that an outage does not multiply load.  A
        sliding window (Envoy's retry budget), not one that restarts: just
        after a server dies, the requests of the seconds before still
        count.
        """
        now = self.clock.seconds()
        if now >= self._next_tick:
            self._tick(now)
        _, requests, retries = self._ticks[0]
        allowed = max(RETRY_MIN, (self.counted_requests - requests) * RETRY_RATIO // 100)
        if self.budgeted_retries - retries >= allowed:
            return False
        self.budgeted_retries += 1
        return True

    def _tick(self, now: float) -> None:
        """
        Note the counts now, and forget what is older than the window
        (whose oldest tick is where the window's counts start).
        """
        ticks = self._ticks
        ticks.append((now, self.counted_requests, self.budgeted_retries))
        start = now - RETRY_WINDOW
        while ticks[0][0] < start:
            ticks.popleft()
        self._next_tick = now + 1.0

    def count(self, exchange: Exchange, now: float | None = None) -> None:
        pool = exchange.pool
        backend = pool.config.name if pool is not None else "-"
        if self.access_log:
            self.log_access(exchange, backend)
        key = (backend, exchange.status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if now is None:
            now = self.clock.seconds()
        if now >= self._next_tick:
            self._tick(now)
        self.counted_requests += 1
        seconds = now - exchange.started
        self.duration_sum += seconds
        self.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def log_access(self, exchange: Exchange, backend: str) -> None:
        """
        One line for the request: nginx's combined format followed by
        backend/server and seconds, or a JSON object; C{bytes} is the
        response body passed on from the server.
        """
        head = exchange.head
        now = self.clock.seconds()
        seconds = now - exchange.started
        server = exchange.tried[-1] if exchange.tried else "-"
        sent = exchange.client.delivered - exchange.delivered_before
        if self.config.http.access_log == "json":
            record = {
                "client": exchange.client.peer_host, "method": head.method.decode("latin-1"),
                "target": head.target.decode("latin-1"), "version": f"{head.version[0]}.{head.version[1]}",
                "status": exchange.status, "bytes": sent, "backend": backend,
                "server": server, "duration": round(seconds, 6), "frontend": self.name,
                "user_agent": (head.header(b"user-agent") or b"").decode("latin-1"),
            }
            line = json.dumps(record, sort_keys=True)
            if self.access_file is not None:
                self.access_file.write(line)
            else:
                _access.info("{record}", record=line)
            return
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
        referer = escape(head.header(b"referer") or b"-")
        agent = escape(head.header(b"user-agent") or b"-")
        line = (
            f'{exchange.client.peer_host} - - [{when}] "{escape(head.method)} '
            f'{escape(head.target)} HTTP/{head.version[0]}.{head.version[1]}" {exchange.status} '
            f'{sent} "{referer}" "{agent}" {backend}/{server} {seconds:.6f}'
        )
        if self.access_file is not None:
            self.access_file.write(line)
        else:
            _access.info("{line}", line=line)

    def count_status(self, status: int) -> None:
        self.requests[("-", status)] += 1

    def bytes_totals(self) -> tuple[int, int]:
        out, back = self.closed_bytes_out, self.closed_bytes_in
        for conn in self.connections:
            out += conn.received
            back += getattr(conn, "delivered", 0)
        return out, back

    def forget(self, conn: Any) -> None:
        self.closed_bytes_in += getattr(conn, "delivered", 0)
        super().forget(conn)
        if not self.connections and self._deadlines is not None:
            if self._deadlines.active():
                self._deadlines.cancel()
            self._deadlines = None

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        A soft stop (HAProxy's and nginx's): idle keep-alive connections
        close now; busy ones finish the request in flight, whose response
        says C{Connection: close}, and close after it.  What is left at
        the end of C{grace} is cut (L{TCPFrontend.drain}).
        """
        for conn in list(self.connections):
            if isinstance(conn, HTTPConnection):
                conn.drain()
        drained = super().drain(grace)
        drained.addBoth(self._close_access_log)
        return drained

    def _close_access_log(self, result: Any) -> Any:
        # every request is logged once the connections are gone
        if self.access_file is not None:
            self.access_file.close()
        return result

