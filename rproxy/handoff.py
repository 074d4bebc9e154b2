"""
Protocols that read the first bytes of a connection themselves and then
hand it to the protocol that serves it.

L{Handoff} is the base: until L{Handoff.hand_to} it reads (bounded, with a
timeout), then every event goes to the protocol it built, which sees a
transport whose C{getPeer}/C{getHost} may be replaced (L{HandedTransport}).
Two uses:

  - L{ProxyProtocolFactory} (C{proxy_protocol: true}): the PROXY protocol
    header first (L{rproxy.proxyproto}), then the frontend's protocol is
    built with the client's real address, so whatever reads the peer
    (C{buildProtocol}'s C{addr}, C{transport.getPeer()}: logs,
    X-Forwarded-For, allow lists, hashing) sees the client, not the proxy.
  - L{rproxy.detect}: the protocol of a C{protocol: detect} frontend.

Why not C{twisted.protocols.haproxy}: its wrapper builds the wrapped
protocol and calls its C{connectionMade} at accept, before the header is
read, so a frontend would admit the connection (and a TCP frontend connect
to a server) with the proxy's address, and C{buildProtocol} gets the
proxy's address; it has no header timeout, closes without saying why, and
refuses a header whose first read is shorter than 8 (v1) or 16 (v2) bytes.

Half-close: the transport asks its protocol for C{IHalfCloseableProtocol}
at the moment of a FIN; L{Handoff.__conform__} answers with the inner
protocol when it provides it (also when it starts to later, as an HTTP
connection does after a 101), so a FIN reaches it as it would without
this layer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import address as tw_address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.cidr import CIDRSet
from rproxy.proxyproto import V1_MAX_LENGTH, V2_MAX_LENGTH, InvalidProxyHeader, ProxyHeader, parse

__all__ = ["Deadlines", "Handoff", "HandedTransport", "ProxyProtocolFactory", "ProxyProtocolReceiver", "address_of",
           "listening_factory", "HeaderFirstFactory"]


class HandedTransport:
    """
    A transport as seen by a handed-to protocol: the real one, with
    C{getPeer}/C{getHost} answering the addresses given (everything else
    goes to the real transport).
    """

    # methods kept once looked up, so that the data path does not go
    # through __getattr__ again
    _DIRECT = frozenset(("write", "writeSequence", "loseConnection", "abortConnection", "pauseProducing",
                         "resumeProducing", "stopProducing", "registerProducer", "unregisterProducer"))

    def __init__(self, transport: Any, peer: Any, host: Any) -> None:
        d = self.__dict__
        d["_transport"] = transport
        d["_peer"] = peer
        d["_host"] = host

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._transport, name)
        if name in self._DIRECT:
            self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._transport, name, value)


def address_of(pair: tuple[str, int], like: Any = None) -> Any:
    """
    A Twisted address for (host, port) (IPv6 when the host has a colon).
    """
    host, port = pair
    if ":" in host:
        return tw_address.IPv6Address("TCP", host, port)
    return tw_address.IPv4Address("TCP", host, port)


class Deadlines:
    """
    The timeouts of one factory's connections with one timer, not one per
    connection (a sweep every quarter of the timeout while any is
    pending): a connection is cut at most a quarter of its timeout late,
    and accepting one costs a dict entry instead of a reactor call.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.pending: dict[Handoff, float] = {}
        self._timer: IDelayedCall | None = None

    def add(self, conn: Handoff, timeout: float) -> None:
        self.pending[conn] = self.clock.seconds() + timeout
        if self._timer is None:
            tick = max(0.01, timeout / 4)
            self._timer = self.clock.callLater(tick, self._sweep, tick)

    def discard(self, conn: Handoff) -> None:
        self.pending.pop(conn, None)

    def _sweep(self, tick: float) -> None:
        self._timer = None
        now = self.clock.seconds()
        late = [conn for conn, deadline in self.pending.items() if now >= deadline]
        for conn in late:
            del self.pending[conn]
            conn._expire()
        if self.pending:
            self._timer = self.clock.callLater(tick, self._sweep, tick)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class Handoff(Protocol):
    """
    Reads the start of a connection, then hands it over.

    Subclasses implement L{first_bytes} (called with everything read so
    far) and L{expired}; they call L{hand_to} with the factory to serve
    the connection, or L{reject} with a reason.

    @ivar limit: the most bytes read before a decision.
    @ivar timeout: seconds to wait for it (0: no limit).
    @ivar deadlines: the factory's L{Deadlines}, which enforces it.
    """

    log = Logger()
    limit = 4096
    timeout = 5.0
    deadlines: Deadlines | None = None
    inner: Protocol | None = None
    buffer = b""
    done = False

    def __init__(self, clock: Any, addr: Any) -> None:
        self.clock = clock
        self.addr = addr

    def connectionMade(self) -> None:
        if self.timeout > 0 and self.deadlines is not None:
            self.deadlines.add(self, self.timeout)

    def _expire(self) -> None:
        if self.inner is None and not self.done:
            self.expired()

    def _stop_timer(self) -> None:
        if self.deadlines is not None:
            self.deadlines.discard(self)

    def dataReceived(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self.done:
            return
        self.buffer += data
        self.first_bytes(self.buffer)
        if not self.done and len(self.buffer) > self.limit:
            self.reject(f"{len(self.buffer)} bytes without a decision (at most {self.limit})")

    # -- for subclasses ----------------------------------------------------

    def first_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def expired(self) -> None:
        raise NotImplementedError

    def peer_name(self) -> str:
        peer = self.addr
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def reject(self, why: str) -> None:
        """
        Close the connection unserved, with one log line.
        """
        self.done = True
        self._stop_timer()
        self.buffer = b""
        self.rejected(why)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def rejected(self, why: str) -> None:
        """
        Log and count a rejection (subclasses).
        """

    def hand_to(self, factory: Any, rest: bytes, peer: Any = None, host: Any = None) -> None:
        """
        Build C{factory}'s protocol for this connection and give it the
        connection and C{rest}, the bytes read that are its own.  With
        C{peer} (and C{host}), it is built for that client address and
        sees them in C{getPeer()}/C{getHost()}; without, it gets the
        transport itself.

        From then on the transport delivers its events to that protocol
        directly when it can (its C{protocol} attribute is this one, as
        with Twisted's and rproxy's TCP transports): nothing is left in
        between on the data path.  Otherwise this protocol passes them on.
        """
        self.done = True
        self._stop_timer()
        self.buffer = b""
        transport = self.transport
        assert transport is not None
        inner = factory.buildProtocol(peer if peer is not None else self.addr)
        if inner is None:
            transport.loseConnection()
            return
        self.inner = inner
        if getattr(transport, "protocol", None) is self:
            transport.protocol = inner  # type: ignore[attr-defined]
        if peer is not None:
            inner.makeConnection(HandedTransport(transport, peer, host if host is not None else transport.getHost()))
        else:
            inner.makeConnection(transport)
        if rest and self.connected:
            inner.dataReceived(rest)

    # -- events after the handoff ------------------------------------------

    def __conform__(self, interface: Any) -> Any:
        if interface is IHalfCloseableProtocol:
            inner = self.inner
            if inner is not None and IHalfCloseableProtocol.providedBy(inner):
                return inner
        return None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0
        self._stop_timer()
        inner = self.inner
        if inner is not None:
            inner.connectionLost(reason)
        elif not self.done:
            self.done = True
            self.lost_early(reason)

    def lost_early(self, reason: Failure) -> None:
        """
        The connection closed before the handoff (subclasses).
        """


class ProxyProtocolReceiver(Handoff):
    """
    Reads a PROXY protocol header, then hands the connection to the
    frontend's factory with the client's address.
    """

    limit = max(V1_MAX_LENGTH, 16 + V2_MAX_LENGTH)

    def __init__(self, factory: ProxyProtocolFactory, addr: Any) -> None:
        super().__init__(factory.clock, addr)
        self.factory = factory
        self.timeout = factory.timeout
        self.deadlines = factory.deadlines

    def first_bytes(self, data: bytes) -> None:
        try:
            parsed = parse(data)
        except InvalidProxyHeader as e:
            self.reject(str(e))
            return
        if parsed is None:
            return  # (parse never waits past a header's bound)
        header, length = parsed
        peer, host = self._addresses(header)
        self.factory.accepted += 1
        self.hand_to(self.factory.wrapped, data[length:], peer, host)

    def _addresses(self, header: ProxyHeader) -> tuple[Any, Any]:
        if header.command == "LOCAL" or header.source is None or header.destination is None:
            return None, None  # the proxy's own connection (a health check), or UNKNOWN
        return address_of(header.source), address_of(header.destination)

    def expired(self) -> None:
        if self.buffer:
            self.reject(f"no complete PROXY header within {self.timeout:g}s ({len(self.buffer)} bytes)")
        else:
            self.reject(f"no PROXY header within {self.timeout:g}s")

    def rejected(self, why: str) -> None:
        self.factory.rejected += 1
        self.log.info("frontend {frontend}: closing {peer}: {why}", frontend=self.factory.name,
                      peer=self.peer_name(), why=why)

    def lost_early(self, reason: Failure) -> None:
        if self.buffer:
            self.rejected(f"closed after {len(self.buffer)} bytes of a PROXY header")


@implementer(IProtocolNegotiationFactory)
class ProxyProtocolFactory(Factory):
    """
    Wraps a frontend's factory (its TLS factory, if it terminates TLS: the
    header comes before the TLS handshake) so its connections start with a
    PROXY protocol header (v1 or v2, either accepted), read within
    C{timeout} seconds; a missing or malformed header closes the
    connection with one logged line.  With C{sources} (C{proxy_protocol:
    {from: [...]}}), a connection from a peer outside those networks is
    closed at accept, one line: only the proxies there may name a client
    (nginx's C{set_real_ip_from}).

    @ivar accepted: headers read.
    @ivar rejected: connections closed for a missing or malformed header,
        or from a peer not in C{sources}.
    """

    noisy = False
    log = Logger()

    def __init__(self, wrapped: Any, clock: Any, timeout: float = 5.0, name: str = "",
                 frontend: Any = None, max_pending: int = 10000, sources: tuple[Any, ...] | None = None) -> None:
        self.wrapped = wrapped
        self.clock = clock
        self.timeout = timeout
        self.sources = sources
        self._sources: tuple[Any, CIDRSet | None] = (None, None)  # (networks, their set)
        self.name = name or getattr(wrapped, "name", "?")
        # with a frontend: its current config.proxy_protocol decides, per
        # connection (a reload turns the header on or off at once)
        self.frontend = frontend
        self.max_pending = max_pending
        self.accepted = 0
        self.rejected = 0
        self.deadlines = Deadlines(clock)

    def doStart(self) -> None:
        super().doStart()
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()
        if not self.numPorts:
            self.deadlines.stop()

    def acceptableProtocols(self) -> list[bytes]:
        negotiation = IProtocolNegotiationFactory(self.wrapped, None)
        return list(negotiation.acceptableProtocols()) if negotiation is not None else []

    def buildProtocol(self, addr: Any) -> Any:
        if self.frontend is not None:
            options = self.frontend.config.proxy_protocol
            if options is None:
                return self.wrapped.buildProtocol(addr)
            self.timeout = options.timeout
            self.sources = options.sources
        if self.sources is not None and getattr(addr, "host", "") not in self._trusted(self.sources):
            self.rejected += 1
            self.log.info("frontend {frontend}: refusing {peer}: not in proxy_protocol.from (only those proxies "
                          "may send a PROXY header)", frontend=self.name,
                          peer=f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}")
            return None
        if len(self.deadlines.pending) >= self.max_pending:
            # (each holds a descriptor and up to 4 KiB until its timeout)
            self.rejected += 1
            self.log.info("frontend {frontend}: refusing {peer}: {n} connections wait for their PROXY header",
                          frontend=self.name, peer=f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}",
                          n=len(self.deadlines.pending))
            return None
        return ProxyProtocolReceiver(self, addr)


    def _trusted(self, sources: tuple[Any, ...]) -> CIDRSet:
        cached, cidrs = self._sources
        if cached is not sources or cidrs is None:
            cidrs = CIDRSet(sources)
            self._sources = (sources, cidrs)
        return cidrs


def listening_factory(frontend: Any, factory: Any) -> Any:
    """
    What a frontend's listener should call: C{factory} (the frontend, or
    its TLS layer) behind a L{ProxyProtocolFactory} that reads a header
    first while the frontend's C{config.proxy_protocol} says so (checked
    at each accept: a reload that turns it on or off keeps the listener;
    off, it costs one call per accept and nothing after).  The frontend
    keeps it in C{proxy_protocol} (for its figures); at most
    C{global.max_connections} connections wait for their header.
    """
    options = frontend.config.proxy_protocol
    limit = getattr(getattr(frontend, "limit", None), "limit", None) or 10000
    wrapped = ProxyProtocolFactory(factory, frontend.clock, options.timeout if options is not None else 5.0,
                                   frontend.name, frontend=frontend, max_pending=limit,
                                   sources=options.sources if options is not None else None)
    frontend.proxy_protocol = wrapped
    return wrapped


class _HeaderFirst(Handoff):
    """
    Writes a header on a new connection, then hands it to the protocol
    it was opened for (the client side of L{HeaderFirstFactory}).
    """

    timeout = 0.0

    def __init__(self, factory: HeaderFirstFactory, addr: Any) -> None:
        super().__init__(None, addr)
        self.factory = factory

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(self.factory.header)
        self.hand_to(self.factory.wrapped, b"")


class HeaderFirstFactory(ClientFactory):
    """
    Wraps a client factory (a TLS one included: the header goes before the
    handshake) so that each connection starts with C{header}, a PROXY
    protocol header for the server (C{send_proxy}).
    """

    noisy = False

    def __init__(self, wrapped: Any, header: bytes) -> None:
        self.wrapped = wrapped
        self.header = header

    def buildProtocol(self, addr: Any) -> _HeaderFirst:
        return _HeaderFirst(self, addr)

    def startedConnecting(self, connector: Any) -> None:
        self.wrapped.startedConnecting(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.wrapped.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.wrapped.clientConnectionLost(connector, reason)
