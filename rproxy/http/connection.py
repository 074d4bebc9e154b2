"""
A client connection of the HTTP engine.

L{HTTPConnection} reads requests with the strict L{RequestReader} and
serves them one at a time, in order: each becomes an
L{rproxy.http.exchange.Exchange}.  Pipelined requests wait, bounded: past
L{QUEUE_LIMIT} buffered body bytes or L{QUEUE_EVENTS} queued heads and
chunks the client is paused.  While no response body streams, the
connection is its transport's producer (L{HTTPConnection.gate}), so a
client that reads no answers holds a bounded amount of memory.  After a
101 its events go to the one splice (L{rproxy.splice.splice_protocols}).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.http.exchange import Exchange
from rproxy.http.reader import Body, EndOfMessage, HTTPError, RequestHead, RequestReader, Upgrade
from rproxy.http.state import AWAITING, DONE, SENDING, UPGRADED
from rproxy.splice import Relayed, SpliceEnd
from rproxy.tcp import _nodelay, _peer
from rproxy.tls import tls_failure

if TYPE_CHECKING:
    from rproxy.http.frontend import HTTPFrontend

__all__ = ["HTTPConnection", "QUEUE_LIMIT", "QUEUE_EVENTS"]

# how connections usually end (not worth a look for a TLS failure)
_ORDINARY_ENDS = frozenset({error.ConnectionDone, error.ConnectionLost})

QUEUE_LIMIT = 256 * 1024
# pipelined requests read ahead of the one being served: past this many
# queued events (heads and body chunks) the client is paused until the
# queue is half as long
QUEUE_EVENTS = 64


@implementer(IPushProducer)
class HTTPConnection(Relayed, Protocol):
    """
    A client connection of an HTTP frontend.
    """

    def __init__(self, frontend: HTTPFrontend, peer: Any = None) -> None:
        # every field is set here, none left to a class default: reading
        # an instance's own field is the fast path of attribute access
        self.peer = peer  # the client's address, as the port accepted it
        self.exchange: Exchange | None = None
        self.counted = False
        self.closing = False
        self.closing_after_response = False
        self.upgraded_exchange: Exchange | None = None
        # the token-pool lease held for the connection's life (the
        # token filter's; released when the connection ends)
        self.lease: Any = None
        # the tracing filter's state of the current request (rproxy.http.filters.tracing)
        self.trace: Any = None
        # after a 101: the splice end this connection's events go to
        self.relay: SpliceEnd | None = None
        self.lost = False
        self.queue_timer: IDelayedCall | None = None
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
        # a filter waiting for the current request's body (read_ahead)
        self.body_waiter: tuple[int, defer.Deferred[bytes | None]] | None = None

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

    def refuse(self) -> None:
        self.idle_abort()

    def peer_name(self) -> str:
        return _peer(self.transport)

    # -- reading -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        relay = self.relay
        if relay is not None:
            relay.dataReceived(data)
            return
        if self.closing:
            return
        reader = self.reader
        try:
            events = reader.feed(data)
        except HTTPError as e:
            self.events.clear()
            exchange = self.exchange
            if exchange is not None and exchange.state > AWAITING:
                self.abort()
            else:
                if exchange is not None:
                    exchange.abandon()
                self.refused(e, exchange)
            return
        queue = self.events
        queue.extend(events)
        if reader.body_fed:
            self.queued += reader.body_fed
        if self.body_waiter is not None:
            self._read_ahead()
            if self.body_waiter is not None:
                return  # (reading goes on to the waiter's limit)
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
        events = self.events
        try:
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
                    exchange.begin()
                elif exchange is None:
                    events.popleft()  # the rest of a request already answered
                    if kind is Body:
                        self.queued -= len(event.data)
                elif kind is Body:
                    state = exchange.state
                    if state < SENDING:
                        break  # not connected yet
                    events.popleft()
                    self.queued -= len(event.data)
                    if state < UPGRADED:
                        exchange.send_body(event.data)
                elif kind is EndOfMessage:
                    if exchange.state < SENDING:
                        if exchange.head.has_body:
                            break
                        events.popleft()
                        continue
                    events.popleft()
                    exchange.end_request()
                elif kind is Upgrade:
                    # what follows an upgrade request waits for the server's
                    # 101 (upgraded() sends it then): a server that does not
                    # switch must not read it as requests nobody checked;
                    # the connection closes after such an answer.  Reading
                    # stops meanwhile (the kernel holds the rest; the splice
                    # reads on)
                    if not self.paused:
                        self.paused = True
                        self.transport.pauseProducing()  # type: ignore[union-attr]
                    break
                else:
                    events.popleft()
        finally:
            self.pumping = False
        if (self.paused and self.queued < QUEUE_LIMIT // 2 and len(events) <= QUEUE_EVENTS // 2
                and not (events and events[0].__class__ is Upgrade)):
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def read_ahead(self, limit: int) -> defer.Deferred[bytes | None]:
        """
        The current request's body, read ahead of the upstream (its events
        stay queued for it): fires with the whole body once it is in, or
        with None as soon as more than C{limit} bytes of it are (a filter
        that routes by the body, such as a tunnel's model).
        """
        d: defer.Deferred[bytes | None] = defer.Deferred(lambda _: self._cancel_read_ahead())
        exchange = self.exchange
        if exchange is not None and (exchange.head.header(b"expect") or b"").lower() == b"100-continue":
            # the client waits for this before it sends the body
            exchange.continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        self.body_waiter = (limit, d)
        self._read_ahead()
        return d

    def _cancel_read_ahead(self) -> None:
        self.body_waiter = None

    def _read_ahead(self) -> None:
        assert self.body_waiter is not None
        limit, d = self.body_waiter
        size = 0
        parts = []
        for event in self.events:
            kind = type(event)
            if kind is Body:
                size += len(event.data)
                if size > limit:
                    break
                parts.append(event.data)
            elif kind is EndOfMessage:
                self.body_waiter = None
                d.callback(b"".join(parts))
                return
            else:
                break
        else:
            if not self.closing:
                return  # more to come
        self.body_waiter = None
        d.callback(None)

    def exchange_done(self, exchange: Exchange, now: float | None = None) -> None:
        frontend = self.frontend
        if self.exchange is exchange:
            self.exchange = None
            frontend.active_requests -= 1
        if self.closing_after_response or not exchange.head.keep_alive or exchange.head.upgrade:
            # (an upgrade request the server did not switch: the reader
            # stopped after it, see pump)
            self.ungate()
            self.closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        timeout = frontend.header_timeout  # (_arm_head_timer, without a call)
        if timeout > 0 and self.head_deadline is None:
            self.head_deadline = frontend.deadline(timeout, now)
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
        if self.paused:
            # (paused for the bytes held until the 101: the splice takes over)
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    # -- answering ---------------------------------------------------------

    def refused(self, error: HTTPError, exchange: Exchange | None) -> None:
        """
        The reader refused a request: it is counted and logged as a request
        (the one in flight, whose body broke a rule, or what the reader
        knew of a head it refused), and answered with the error.
        """
        if exchange is None:
            exchange = Exchange(self, self.reader.refused_head())
        exchange.state = DONE
        exchange.status = error.status
        self.frontend.count_refused(exchange)
        self.send_error(error.status, error.reason)

    def send_error(self, status: int, message: str, retry_after: bool = False,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if self.exchange is not None:
            self.exchange = None
            self.frontend.active_requests -= 1
        self.closing = True
        self.events.clear()
        extra = [(b"Retry-After", b"1")] if retry_after else []
        extra += headers
        self.head_deadline = None
        self.frontend.log.info(
            "frontend {frontend}: {status} for {peer}: {message}",
            frontend=self.frontend.name, status=status, peer=_peer(self.transport), message=message,
        )
        # (the gate or a response body's source: a transport with a
        # producer would not close)
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.gated = self.write_paused = False
        self.transport.write(self.frontend.error_response(status, message, extra=extra))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.head_deadline = None
        if reason is not None and reason.value.__class__ not in _ORDINARY_ENDS:
            failed = tls_failure(reason)
            if failed is not None:
                # (no request to log it with: a handshake refused, plain HTTP on a TLS port)
                self.frontend.log.info("frontend {frontend}: TLS with {peer} failed: {why}",
                                       frontend=self.frontend.name, peer=_peer(self.transport), why=failed)
        relay, self.relay = self.relay, None
        if relay is not None:
            if relay.peer is not None:
                self.delivered += relay.peer.received  # what the server sent after its 101
            relay.connectionLost(reason)
        for exchange in (self.exchange, self.upgraded_exchange):
            if exchange is None:
                continue
            if exchange is self.exchange:
                self.frontend.active_requests -= 1
            if exchange.state is UPGRADED:
                exchange.release_server()
            else:
                exchange.abandon()
        self.exchange = self.upgraded_exchange = None
        self.reader.close()
        for f in self.frontend.chain.closed:
            f.closed(self)
        self.frontend.forget(self)  # type: ignore[arg-type]
