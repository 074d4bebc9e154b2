"""
One request and its response through the HTTP engine.

The engine's part of an exchange: run the filters' phases (see
L{rproxy.http.filters} for their contract), take a server slot in the
chosen pool, take a connection to that server from the connector, send the
rewritten head, stream the body both ways with backpressure, and hand the
upstream connection back for keep-alive.  Its lifecycle is the one
C{state} field (L{rproxy.http.state}); the other fields are facts about
the request, the response or the current attempt.

This module is the way through; what goes wrong (502, 503, 504, a client
gone) and the retries are L{rproxy.http.failures}, the exchange's base
class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from rproxy.http.failures import IDEMPOTENT, ExchangeFailures
from rproxy.http.headers import (
    chunk,
    finish_scanned_head,
    request_head,
    response_head,
    scan_response_head,
    server_host,
)
from rproxy.http.reader import RequestHead
from rproxy.http.state import (
    AWAITING,
    CONNECTING,
    DONE,
    DUPLEX,
    PICKING,
    RESPONDING,
    ROUTING,
    SENDING,
    SWITCHING,
    UPGRADED,
)
from rproxy.pool import Pool, Server
from rproxy.proxyproto import header_for
from rproxy.splice import splice_protocols

if TYPE_CHECKING:
    from rproxy.http.connection import HTTPConnection
    from rproxy.http.upstream import UpstreamConnection

__all__ = ["Exchange", "IDEMPOTENT"]

_CHUNK_END = b"0\r\n\r\n"
_NO_REMOVE: frozenset[bytes] = frozenset()


class Exchange(ExchangeFailures):
    """
    One request and its response.

    @ivar state: where the exchange is (L{rproxy.http.state}).
    @ivar pool: the pool the choose-upstream phase chose.
    @ivar pinned: a server the request must go to (no other is tried).
    @ivar prefer: a server to try first, if it has a slot.
    @ivar key: the consistent-hash key, for hashing pools.
    @ivar route: what a filter chose the pool by (filters' business).
    @ivar notes: per-request values of filters (None until one needs it).
    @ivar client_host: the client's address as policies see it (allow
        lists, logs, hashing): the peer's, unless the peer is a trusted
        proxy (C{trusted_proxies}), whose X-Forwarded-For then names it.
    """

    # slots, every one set in __init__: an exchange is made per request and
    # its fields are read many times (a slot is the cheapest to read)
    __slots__ = (
        "client", "frontend", "head", "target", "tried", "started", "upstream", "server", "pool", "route",
        "state", "close_delimited", "got_bytes", "producing", "batch", "deadline", "status", "notes",
        "_pending", "_step", "attempts", "pinned", "prefer", "key", "framing", "keep_upstream", "continued",
        "delivered_before", "client_host", "chain",
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
        self.route: Any = None
        self.state = ROUTING
        self.close_delimited = False  # the response's body ends with the connection
        self.got_bytes = False  # the current attempt's server sent something
        self.producing = False  # the upstream transport is the client's producer
        # client writes made while one upstream read is parsed go out in one
        # send(); flushed at the end of that read and before the exchange ends
        self.batch: list[bytes] | None = None
        self.deadline: float | None = None
        self.status = 0
        self.notes: dict[str, Any] | None = None
        self._pending: defer.Deferred[Any] | None = None
        self._step = 0  # the next request-phase filter (after a wait)
        self.attempts = 0
        self.pinned: str | None = None
        self.prefer: str | None = None
        self.key: bytes | None = None
        self.framing = "none"
        self.keep_upstream = False
        self.continued = False  # a 100 Continue went to the client (read_ahead)
        self.delivered_before = client.delivered  # the response's bytes are what is added
        self.client_host: str = client.peer_host
        # the filters of the phases after the request phase (attempt,
        # upstream_request, attempt_end, log): a request-phase filter with
        # nothing more to do for this request may narrow it (tracing)
        self.chain = frontend.chain

    # -- the filters' phases -----------------------------------------------

    def begin(self, _: object = None) -> None:
        """
        Run the request phase, then choose the upstream (and again from the
        next request filter when the one that made it wait is done).
        """
        self._pending = None
        if self.state is not ROUTING:
            return  # answered (or abandoned) while a filter waited
        chain = self.frontend.chain
        step = self._step
        if step:
            filters = chain.request[step:]
        else:
            if self.head.method == b"CONNECT":
                self.fail(405, "CONNECT is not supported")
                return
            filters = chain.request
        for f in filters:
            step += 1
            waiting = f.request(self)
            if self.state is not ROUTING:
                return  # the filter answered
            if waiting is not None:
                self._step = step
                self._pending = waiting
                waiting.addCallback(self.begin)
                waiting.addErrback(self._callback_failed, f.doing)
                return
        for f in chain.choose:
            f.choose(self)
            if self.state is not ROUTING:
                return
        if self.pool is None:
            self.fail(404, "no route")
            return
        self.acquire()

    # -- upstream ------------------------------------------------------------

    def acquire(self) -> None:
        pool = self.pool
        assert pool is not None
        self.state = PICKING
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
        if self.prefer is not None and not self.tried:
            server = pool.try_acquire_named(self.prefer)
            if server is not None:
                self.got_server(server)
                return
        server = pool.try_acquire(self.key, self.tried)
        if server is not None:
            self.got_server(server)
            return
        d = pool.acquire(self.key, self.tried)
        self._pending = d
        d.addCallbacks(self.got_server, self.no_server)
        d.addErrback(self._callback_failed, "choosing a server")

    def got_server(self, server: Server) -> None:
        self._pending = None
        if self.state is DONE:
            assert self.pool is not None
            self.pool.release(server)
            return
        self.server = server
        self.tried.append(server.config.name)
        self.attempts += 1
        self.state = CONNECTING
        frontend = self.frontend
        attempt = self.chain.attempt
        if attempt:
            for f in attempt:
                f.attempt(self, server)
        upstreams = frontend.upstreams
        send_proxy = self.pool.config.send_proxy  # type: ignore[union-attr]
        if send_proxy is None:
            idle = upstreams.take_idle(server)
            if idle is not None:
                self.connected(idle)
                return
            d = upstreams.get(server, self.pool, frontend.config.connect_timeout)
        else:
            # a connection of this client's own, opened with a PROXY protocol header
            d = upstreams.get(server, self.pool, frontend.config.connect_timeout,
                              header_for(send_proxy, self.client.peer, self.client.transport.getHost()))
        self._pending = d
        d.addCallbacks(self.connected, self.connect_failed)
        d.addErrback(self._callback_failed, "connecting to a server")

    def connected(self, upstream: UpstreamConnection) -> None:
        self._pending = None
        server = self.server
        assert server is not None and self.pool is not None
        if not upstream.reused:
            self.pool.record_success(server)
        if self.state is DONE:
            upstream.transport.loseConnection()  # type: ignore[union-attr]
            self.release_server()
            return
        self.upstream = upstream
        upstream.start(self)
        head = self.head
        frontend = self.frontend
        client = self.client
        set_headers: tuple[tuple[bytes, bytes], ...] = ()
        remove = _NO_REMOVE
        for f in self.chain.upstream_request:
            set_headers, remove = f.upstream_request(self, set_headers, remove)
        transport = upstream.transport
        transport.write(request_head(  # type: ignore[union-attr]
            head.method, self.target, head.headers, client.peer_ip, frontend.scheme, head.chunked,
            head.content_length, head.upgrade,
            server_host(server, self.pool.config.tls is not None) if frontend.host_is_server else None,
            set_headers, remove,
        ))
        timeout = frontend.response_timeout
        if timeout > 0:
            self.deadline = frontend.deadline(timeout)
        if head.has_body:
            self.state = SENDING
            if not self.continued and (head.header(b"expect") or b"").lower() == b"100-continue":
                client.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
            transport.registerProducer(client.transport, True)  # type: ignore[union-attr]
        else:
            self.state = AWAITING
        if not client.pumping:
            # (a pump up the stack, the common case, sees the body itself)
            client.pump()

    # -- request body ------------------------------------------------------

    def send_body(self, data: bytes) -> None:
        assert self.upstream is not None
        self.upstream.transport.write(chunk(data) if self.head.chunked else data)  # type: ignore[union-attr]

    def end_request(self) -> None:
        """
        The request's body has ended (SENDING -> AWAITING, DUPLEX -> RESPONDING).
        """
        state = self.state
        if state is SENDING:
            self.state = AWAITING
        elif state is DUPLEX:
            self.state = RESPONDING
        upstream = self.upstream
        if upstream is None:
            return
        if self.head.has_body:
            upstream.transport.unregisterProducer()  # type: ignore[union-attr]
        if self.head.chunked:
            upstream.transport.write(_CHUNK_END)  # type: ignore[union-attr]

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
        if status == 101:
            if not self.head.upgrade:
                self.upstream_failed("101 Switching Protocols to a request that did not ask", invalid=True)
                return
            self.deadline = None
            self.status = status
            self.state = SWITCHING  # the head goes out in switch_protocols
            return
        try:
            line, block, has_length, encoded = scan_response_head(raw_head)
        except ValueError as e:
            self.upstream_failed(str(e), invalid=True)
            return
        self.deadline = None
        self.status = status
        self.state = RESPONDING if self.state is AWAITING else DUPLEX
        head = self.head
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
        # (after an upgrade request that gets no 101 the reader is stopped:
        # what follows it is not read as requests, the connection closes)
        close = not head.keep_alive or framing == "close" or client.closing_after_response or head.upgrade
        client.closing_after_response = close
        extra: list[tuple[bytes, bytes]] = []
        for f in self.frontend.chain.response:
            f.response(self, extra)
        data = finish_scanned_head(status, line, block, head.version, framing, close, False, extra)
        batch = self.batch
        if batch is not None:
            batch.append(data)
        else:
            client.transport.write(data)  # type: ignore[union-attr]
        if no_body:
            # llhttp does not know this response has no body (HEAD): it is
            # complete now; any byte that follows is an error
            self.response_end()

    def response_body(self, data: bytes) -> None:
        if self.state >= UPGRADED:
            return
        self.client.delivered += len(data)
        framing = self.framing
        if framing == "none":
            return
        if framing == "chunked":
            data = chunk(data)
        batch = self.batch
        if batch is not None:
            batch.append(data)
        else:
            self.client.transport.write(data)  # type: ignore[union-attr]

    def response_end(self) -> None:
        state = self.state
        if state >= SWITCHING:
            return
        self.deadline = None
        if self.producing:
            self.producing = False
            self.client.transport.unregisterProducer()  # type: ignore[union-attr]
            self.client.gate()
        if self.framing == "chunked":
            self.write(_CHUNK_END)
        batch = self.batch
        if batch:
            self.batch = None
            self.client.transport.write(b"".join(batch))  # type: ignore[union-attr]
        else:
            self.batch = None
        if state is DUPLEX:
            # the server answered before the request body ended: do not
            # reuse that connection, and stop reading the client
            self.keep_upstream = False
            self.client.closing_after_response = True
        self.complete()

    def switch_protocols(self, rest: bytes) -> None:
        """
        101 from the server: the one splice joins the two connections from
        now on (SWITCHING -> UPGRADED).
        """
        upstream, client = self.upstream, self.client
        assert upstream is not None
        self.flush()
        if self.state is not SWITCHING:
            self.upstream_failed("unexpected protocol switch", invalid=True)
            return
        try:
            line, block, _, _ = scan_response_head(upstream.head, upgrade=True)
        except ValueError as e:
            self.upstream_failed(str(e), invalid=True)
            return
        self.deadline = None
        self.state = UPGRADED
        head = finish_scanned_head(101, line, block, version=(1, 1), framing="none", upgrade=True)
        client.transport.write(head)  # type: ignore[union-attr]
        if rest:
            client.delivered += len(rest)
            client.transport.write(rest)  # type: ignore[union-attr]
        if self.head.has_body:
            upstream.transport.unregisterProducer()  # type: ignore[union-attr]
        client.ungate()
        upstream.parser = None  # (it calls back the connection: no cycle left)
        splice_protocols(client, upstream)
        client.upgraded(self)
        self.frontend.count(self)

    # -- endings -----------------------------------------------------------

    def complete(self) -> None:
        """
        The response has ended (or a filter answered): -> DONE.
        """
        if self.state is DONE:
            return
        request_done = self.state is RESPONDING or self.state is ROUTING
        self.state = DONE
        frontend = self.frontend
        now = frontend.clock.seconds()
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            if self.keep_upstream and request_done and not upstream.lost:
                frontend.upstreams.put(upstream, now)
            else:
                upstream.exchange = None
                upstream.transport.loseConnection()  # type: ignore[union-attr]
        self.release_server(self.status < 500)
        frontend.count(self, now)
        self.client.exchange_done(self, now)

    def answer(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        """
        A filter answers the request itself, with C{body} (none for HEAD),
        and the connection stays open for the next (ROUTING -> DONE).
        """
        self.status = status
        head = self.head
        close = self.answer_closes()
        # (an empty body but for 204 and 304, which have none: without a
        # length the client would read one to the close)
        length = None if status in (204, 304) else len(body)
        data = response_head(status, reason, headers, version=head.version, framing="none", close=close,
                             content_length=length)
        if body and head.method != b"HEAD":
            data += body
        self.client.transport.write(data)  # type: ignore[union-attr]
        self.complete()

    def answer_closes(self) -> bool:
        """
        Whether the connection closes after an answer a filter gives: the
        client asked, the connection is closing, or it was an upgrade
        request (after one the reader has stopped).
        """
        return not self.head.keep_alive or self.client.closing_after_response or self.head.upgrade

    def release_server(self, ok: bool | None = None, outcome: int | str | None = None) -> None:
        """
        Give back the server slot, which ends the current attempt (its
        C{outcome}: the response's status by default, "aborted" if none
        came); C{ok} False (a 5xx answer) or True (any other) feeds passive
        outlier ejection, None leaves it alone.
        """
        server, pool = self.server, self.pool
        self.server = None
        if server is not None and pool is not None:
            attempt_end = self.chain.attempt_end
            if attempt_end:
                if outcome is None:
                    outcome = self.status or "aborted"
                for f in attempt_end:
                    f.attempt_end(self, server, outcome)
            if ok is False:
                pool.record_failure(server, f"answered {self.status}")
            pool.release(server, ok is True)

    def _attempt_over(self, server: Server, outcome: int | str) -> None:
        for f in self.chain.attempt_end:
            f.attempt_end(self, server, outcome)
