"""
Upstream connections of the HTTP engine, and the keep-alive pool per peer.

The engine asks a connector (L{IUpstreamConnector}) for a connection to the
peer it chose: L{IUpstreamConnector.take_idle} returns a kept-alive one at
once (the common case, no Deferred to pay for), L{IUpstreamConnector.get}
opens one; acquiring is kept apart from using (Envoy's C{GenericConnPool}).
What comes back is an L{UpstreamConnection}: the engine starts an exchange
on it (L{UpstreamConnection.start}), writes the request to its C{transport}
and is called back with the response (C{response_head}, C{response_body},
C{response_end}, C{switch_protocols}, C{upstream_failed}); when both
messages were complete and both sides allow it, the connection goes back
to the connector (L{IUpstreamConnector.put}).  L{UpstreamPool} connects
to servers over TCP or TLS; another connector (a tunnel's agents) gives
connections with the same interface.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from rproxy.http.headers import finish_scanned_head, scan_response_head
from rproxy.http.state import DUPLEX, RESPONDING, SWITCHING, UPGRADED
from rproxy.pool import Pool, Server
from rproxy.splice import Relayed, SpliceEnd
from rproxy.tcp import _nodelay
from rproxy.tls import client_tls_options
from rproxy.transport import connect_tcp

if TYPE_CHECKING:
    from rproxy.http.exchange import Exchange

__all__ = ["IUpstreamConnector", "PeerRefused", "UpstreamConnection", "UpstreamPool", "MAX_INTERIM", "MAX_RESPONSE_FIELDS"]

# interim (1xx) responses a server may send before its final response
MAX_INTERIM = 16
MAX_RESPONSE_FIELDS = 200
_EMPTY_LINE = (b"\r", b"\n")
_LONG_HEAD = 4 * MAX_RESPONSE_FIELDS


class PeerRefused(error.ConnectionRefusedError):
    """
    A connector's peer refused, nothing was sent; the message is for the
    client (the engine tries another peer whatever the method, and
    answers it when none is left).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "refused"


class IUpstreamConnector(Interface):
    """
    Where the engine gets connections to a chosen peer, and gives them back.
    """

    opened = Attribute("connections opened so far")
    reused = Attribute("connections taken from the idle pool so far")

    def take_idle(peer: Any) -> Any:
        """
        An idle kept-alive connection to C{peer}, marked reused, or None.
        """

    def get(peer: Any, pool: Any, timeout: float) -> defer.Deferred[Any]:
        """
        A connection to C{peer}: an idle one, or one opened within
        C{timeout} seconds; fails with the connect's failure (cancellable).
        """

    def put(conn: Any, now: float | None = None) -> None:
        """
        Keep C{conn} for the next request to its peer (or close it).
        """

    def discard(conn: Any) -> None:
        """
        Forget C{conn}, which has closed.
        """


class UpstreamConnection(Relayed, Protocol):
    """
    One connection to a server; serves one exchange at a time.
    """

    def __init__(self, upstreams: UpstreamPool, server: Server, pool: Pool) -> None:
        # every field set here (see HTTPConnection.__init__)
        self.exchange: Exchange | None = None
        # after a 101: the splice end this connection's events go to
        self.relay: SpliceEnd | None = None
        self.parser: Any = None
        # the parser read its last response to the end and can read the next
        # (not after a HEAD answer, whose body llhttp would wait for)
        self.parser_clean = False
        self.reused = False
        # never kept for another request: opened with a PROXY protocol
        # header for one client (send_proxy), or to what a reload changed
        # (UpstreamPool.moved)
        self.private = False
        self.lost = False
        self.idle_since = 0.0
        self.raw = b""  # the bytes of the current response since its head began
        self.head_start = -1  # where the head being read begins in raw; -1: not reading one
        self.informational = False
        self.interim = 0  # interim responses to the current request
        # a read is being parsed (feeding), and the connection was given
        # the next request during it (see on_message_begin)
        self.feeding = False
        self.restarted = False
        # the parser was replaced during a read (see start): the old one
        # may still call back with the end of the message it was reading
        self.stale = False
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
        if self.feeding:
            self.restarted = True
        if not self.parser_clean:
            # (during a read: the exchange ended at the head of a bodiless
            # response, a HEAD's, a 204's, and the old parser, still
            # reading, calls back this object for the rest of that read)
            self.stale = self.feeding
            self.parser = httptools.HttpResponseParser(self)
        self.parser_clean = False
        self.raw = b""
        self.head_start = 0
        self.informational = False
        self.interim = 0

    def on_message_begin(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.state >= UPGRADED or self.restarted:
            # more after the response: this server cannot be trusted with
            # another request.  (restarted: the response ended in this
            # read, the connection went back to the pool and a pipelined
            # request took it at once; bytes read before that request was
            # sent cannot be its response)
            raise ValueError("data after the response")

    def on_headers_complete(self) -> None:
        # the head is in self.raw (llhttp has just read all of it, strict
        # about CRLF): cut it out at its blank line
        raw, start = self.raw, self.head_start
        while raw[start:start + 1] in _EMPTY_LINE:
            start += 1  # the empty lines llhttp skips before a message
        end = raw.find(b"\r\n\r\n", start)
        head = raw[start:end]
        self.head_start = end + 4
        # (a field takes at least 4 bytes: only a long head can have too many)
        if len(head) > _LONG_HEAD and head.count(b"\r\n") > MAX_RESPONSE_FIELDS:
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
        exchange = self.exchange
        if exchange is None or self.stale:
            # a body after a bodiless response's head (a HEAD's): not this
            # exchange's, nor the next's
            raise ValueError("data after the response")
        exchange.response_body(data)

    def on_message_complete(self) -> None:
        if self.stale:
            self.stale = False  # the bodiless response's end, not the next one's
            return
        if self.informational:
            self.informational = False
            return
        self.parser_clean = True
        if self.exchange is not None:
            self.exchange.response_end()

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.dataReceived(data)
            return
        exchange = self.exchange
        if exchange is None:
            # bytes from an idle server: it cannot be trusted with a request
            self.transport.abortConnection()  # type: ignore[union-attr]
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
            self.feeding = True
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            if self.exchange is not None:
                self.exchange.switch_protocols(data[offset:])
        except (httptools.HttpParserError, ValueError) as e:
            exchange.flush()
            if self.exchange is not None:
                if self.restarted:
                    # a request sent on this connection during this read,
                    # whose server then sent what no request asked for: it
                    # may have acted on the request; not sent again (502)
                    self.exchange.got_bytes = True
                self.exchange.upstream_failed(f"invalid response: {e}", invalid=True)
            elif not self.lost:
                # the exchange had ended (the connection may be idle in
                # the pool already): what followed it was not a response
                self.lost = True
                self.upstreams.discard(self)
                self.transport.abortConnection()  # type: ignore[union-attr]
        finally:
            self.feeding = self.restarted = self.stale = False
            if exchange.batch is not None:
                exchange.flush()
        if DUPLEX <= exchange.state <= RESPONDING and not exchange.producing:
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
        relay = self.relay
        if relay is not None:
            self.relay = None
            relay.connectionLost(reason)
            return
        exchange = self.exchange
        if exchange is None:
            return
        if parser is not None and DUPLEX <= exchange.state <= SWITCHING:
            # a close-delimited body ends here
            try:
                parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if exchange.close_delimited and exchange.state < UPGRADED:
                exchange.response_end()
                return
        if exchange.state < UPGRADED:
            exchange.upstream_failed(reason.getErrorMessage() if reason else "connection lost")


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, conn: UpstreamConnection, d: defer.Deferred[UpstreamConnection]) -> None:
        self.conn = conn
        self.d = d

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return self.conn

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.conn.upstreams.forget(self.conn)
        if not self.d.called:
            self.d.errback(reason)


class UpstreamPool:
    """
    The connector to servers: idle keep-alive connections per server,
    shared by the HTTP frontends (an L{IUpstreamConnector}).  It knows
    every connection it opened, until it closes, so that a reload that
    moves a server (L{moved}) reaches the busy ones too, at no cost per
    request.
    """

    def __init__(self, reactor: Any, clock: Any, max_idle: int = 256, idle_timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[Server, list[UpstreamConnection]] = collections.defaultdict(list)
        # every connection opened and not yet closed (connecting, busy, idle)
        self.open: dict[Server, set[UpstreamConnection]] = {}
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

    def get(self, server: Server, pool: Pool, timeout: float,
            proxy_header: bytes | None = None) -> defer.Deferred[UpstreamConnection]:
        """
        An idle connection to C{server}, or a new one; with
        C{proxy_header}, always a new one that starts with it.
        """
        if proxy_header is None:
            idle = self.take_idle(server)
            if idle is not None:
                return defer.succeed(idle)
        self.opened += 1
        d: defer.Deferred[UpstreamConnection] = defer.Deferred()
        conn = UpstreamConnection(self, server, pool)
        conn._connected = d
        self.open.setdefault(server, set()).add(conn)
        factory: Any = _UpstreamFactory(conn, d)
        tls = pool.config.tls
        if tls is not None:
            factory = TLSMemoryBIOFactory(self._tls_options(tls, server), True, factory)
        if proxy_header is not None:
            from rproxy.handoff import HeaderFirstFactory

            conn.private = True
            factory = HeaderFirstFactory(factory, proxy_header)
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
        if conn.lost or conn.server.draining or conn.private:
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
        self.forget(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """
        C{conn} is closed, or never connected: no longer one of L{open}.
        """
        conns = self.open.get(conn.server)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.open[conn.server]

    def moved(self, server: Server) -> None:
        """
        A reload changed where or how C{server}'s connections go (its
        address, the backend's TLS or PROXY header) or removed it: its idle
        connections close now, and the others close when their exchange
        ends instead of serving another request (nginx and HAProxy send
        nothing to an old address after a reload).
        """
        for conn in self.open.get(server, ()):
            conn.private = True
        for conn in self.idle.pop(server, ()):
            conn.transport.loseConnection()  # type: ignore[union-attr]

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
