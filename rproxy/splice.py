"""
The one bidirectional pump.

Two L{SpliceEnd} protocols, one per connection, forward each other's bytes.
Whoever the two ends are (a client and a backend, an agent's data
connection and a public client, an upgraded WebSocket), the rules are the
same:

  - Backpressure: each transport is registered as the streaming producer
    of the other, so when one side's write buffer passes Twisted's
    C{bufferSize} (64 KiB) the other side stops reading until it drains.
    Memory per spliced pair is bounded by about two buffers plus one read.
  - Half-close: a FIN from one side (C{readConnectionLost}) becomes a
    write shutdown towards the other side (L{shut_write}: a TCP FIN, or a
    TLS close_notify); the pair closes when both directions have finished.
  - Teardown: when either connection is lost, the other is closed after
    it has flushed what it holds.

Before L{splice} is called the end's reading must be paused (its bytes stay
in the kernel), which is how the frontend holds a client while it picks
and connects to a backend.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

__all__ = ["SpliceEnd", "EarlyDataEnd", "Relay", "Relayed", "splice", "splice_protocols", "shut_write", "EARLY_DATA_LIMIT"]

# What an end may receive before it is spliced; past this its reading is
# paused (the rest waits in the kernel).
EARLY_DATA_LIMIT = 64 * 1024


@implementer(IHalfCloseableProtocol)
class SpliceEnd(Protocol):
    """
    One side of a splice.

    @ivar received: bytes read from this side's connection (and so
        written to the peer).
    """

    peer: SpliceEnd | None = None
    received = 0
    read_closed = False
    lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.unspliced_data(data)

    def unspliced_data(self, data: bytes) -> None:
        """
        Bytes arrived before the splice was made (reading should have been
        paused); subclasses decide.  The default drops the connection.
        """
        self.transport.abortConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.read_closed = True
        peer = self.peer
        if peer is None:
            self.unspliced_eof()
        elif peer.read_closed:
            _close_pair(self, peer)
        else:
            shut_write(peer)

    def unspliced_eof(self) -> None:
        """
        The connection sent FIN before the splice was made.
        """
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        peer = self.peer
        if peer is not None and peer.read_closed and self.read_closed:
            _close_pair(self, peer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.transport.unregisterProducer()  # type: ignore[union-attr]
            peer.transport.loseConnection()  # type: ignore[union-attr]
        self.end_lost(reason)
        if peer is None or peer.lost:
            # both ends are done: the references between them would
            # otherwise be a cycle left for Python's collector
            self.unlink()
            if peer is not None:
                peer.unlink()

    def end_lost(self, reason: Failure) -> None:
        """
        Called once this end's connection is gone; for subclasses.
        """

    def unlink(self) -> None:
        """
        Drop references to the other end; called when neither is needed
        any more (subclasses drop theirs too).
        """
        self.peer = None


def shut_write(end: SpliceEnd) -> None:
    """
    End what is written to C{end}'s connection and keep reading from it.

    An end already lost is left alone: its connection is closed (writing to
    it would register a closed descriptor with the reactor), and its loss
    has already asked the other end to close.  That happens when the FIN
    is read in the same reactor turn in which the peer went away: a read
    event returned by one poll is handled even after the loss stopped
    reading.

    TLS has no write shutdown of its own: C{loseWriteConnection} on a TLS
    transport is the TCP connection's beneath it (reached through
    C{ProtocolWrapper.__getattr__}), a FIN that cuts the TLS stream without
    a close_notify, on a socket that may already be closed when the TLS
    layer has finished.  TLS ends its writing with close_notify, which the
    TLS transport's C{loseConnection} sends once what is buffered is
    written, while it keeps delivering what the peer sends until the
    peer's own close_notify.  The producer registered on it (this end's
    peer, whose reading just ended) is unregistered first, since the TLS
    transport waits for its producer before it shuts down.
    """
    if end.lost:
        return
    transport = end.transport
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport.unregisterProducer()
        transport.loseConnection()
    else:
        transport.loseWriteConnection()  # type: ignore[union-attr]


def _close_pair(a: SpliceEnd, b: SpliceEnd) -> None:
    # A transport with a registered producer may wait for that producer
    # instead of closing; unregister first so both really close.
    for end in (a, b):
        if not end.lost:
            end.transport.unregisterProducer()  # type: ignore[union-attr]
    for end in (a, b):
        if not end.lost:
            end.transport.loseConnection()  # type: ignore[union-attr]


def splice(a: SpliceEnd, b: SpliceEnd) -> None:
    """
    Join two connected ends and resume reading on both.
    """
    a.peer = b
    b.peer = a
    a.transport.registerProducer(b.transport, True)  # type: ignore[union-attr]
    b.transport.registerProducer(a.transport, True)  # type: ignore[union-attr]
    a.transport.resumeProducing()  # type: ignore[union-attr]
    b.transport.resumeProducing()  # type: ignore[union-attr]


class EarlyDataEnd(SpliceEnd):
    """
    An end that keeps the bytes it receives before the splice (up to
    L{EARLY_DATA_LIMIT}, then reading pauses), and hands them to its peer
    first when L{join} splices them; a FIN received that early follows them.
    """

    _early: list[bytes] | None = None
    _early_size = 0
    _paused = False

    def unspliced_data(self, data: bytes) -> None:
        if self._early is None:
            self._early = []
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= EARLY_DATA_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def unspliced_eof(self) -> None:
        # with nothing received there is nothing to deliver
        if not self._early_size:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def join(self, peer: SpliceEnd) -> None:
        """
        Write the early bytes to C{peer}, splice, and pass on an early FIN.
        """
        early, self._early = self._early, None
        if early:
            peer.transport.write(b"".join(early))  # type: ignore[union-attr]
        splice(self, peer)
        if self.read_closed:
            shut_write(peer)


class Relay(SpliceEnd):
    """
    The splice end of a connection whose protocol is another object (an
    HTTP connection after a 101): that protocol hands this end its events
    (C{dataReceived}, C{readConnectionLost}, C{writeConnectionLost},
    C{connectionLost}); the pump's rules are this module's.
    """

    def __init__(self, transport: object) -> None:
        self.transport = transport  # type: ignore[assignment]


class Relayed:
    """
    The half-close events of a protocol that L{splice_protocols} may
    splice: passed to its C{relay} once it has one (they only come then:
    the protocol provides L{IHalfCloseableProtocol} from the splice on).
    """

    relay: SpliceEnd | None

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.readConnectionLost()

    def writeConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.writeConnectionLost()


def splice_protocols(a: Protocol, b: Protocol) -> tuple[Relay, Relay]:
    """
    Splice two connected protocols that have been speaking something else
    (an HTTP client connection and its server's, after a 101): each gets
    a L{Relay} as its C{relay} attribute, to which it must pass its
    events from now on, and provides L{IHalfCloseableProtocol} from now
    on (so that a FIN reaches the relay as a half-close; before, a FIN
    ended the connection).  Returns the two relays.
    """
    ends = Relay(a.transport), Relay(b.transport)
    for protocol, end in zip((a, b), ends, strict=True):
        protocol.relay = end  # type: ignore[attr-defined]
        alsoProvides(protocol, IHalfCloseableProtocol)
    splice(*ends)
    return ends
