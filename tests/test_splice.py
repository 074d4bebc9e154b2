"""
Tests for L{rproxy.splice}, with string transports.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.splice import SpliceEnd, splice


class HalfCloseTransport(StringTransport):
    """
    A string transport that records half-closes and starts paused, as a
    frontend's connection is before the splice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.producerState = "paused"

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Ends(SpliceEnd):
    def __init__(self) -> None:
        self.lost_reasons: list[Failure] = []

    def end_lost(self, reason: Failure) -> None:
        self.lost_reasons.append(reason)


class SpliceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a, self.b = Ends(), Ends()
        self.ta, self.tb = HalfCloseTransport(), HalfCloseTransport()
        self.a.makeConnection(self.ta)
        self.b.makeConnection(self.tb)
        splice(self.a, self.b)

    def test_producers_registered_both_ways(self) -> None:
        """Each transport is the streaming producer of the other; both resume."""
        self.assertIs(self.ta.producer, self.tb)
        self.assertIs(self.tb.producer, self.ta)
        self.assertTrue(self.ta.streaming and self.tb.streaming)
        self.assertEqual((self.ta.producerState, self.tb.producerState), ("producing", "producing"))

    def test_bytes_both_ways_counted(self) -> None:
        """Bytes read on one end are written to the other and counted."""
        self.a.dataReceived(b"hello")
        self.b.dataReceived(b"world!")
        self.assertEqual((self.tb.value(), self.ta.value()), (b"hello", b"world!"))
        self.assertEqual((self.a.received, self.b.received), (5, 6))

    def test_half_close_propagates(self) -> None:
        """
        A FIN from one end shuts down writing towards the other only; the
        other direction keeps flowing.
        """
        self.a.readConnectionLost()
        self.assertTrue(self.tb.write_closed)
        self.assertFalse(self.ta.disconnecting or self.tb.disconnecting)
        self.b.dataReceived(b"late reply")
        self.assertEqual(self.ta.value(), b"late reply")

    def test_both_halves_close_the_pair(self) -> None:
        """When both ends sent FIN, both connections close, producers unregistered."""
        self.a.readConnectionLost()
        self.b.readConnectionLost()
        self.assertTrue(self.ta.disconnecting and self.tb.disconnecting)
        self.assertIsNone(self.ta.producer)
        self.assertIsNone(self.tb.producer)

    def test_loss_closes_peer(self) -> None:
        """When one connection is lost, the other is closed after flushing."""
        reason = Failure(error.ConnectionLost())
        self.a.connectionLost(reason)
        self.assertTrue(self.tb.disconnecting)
        self.assertIsNone(self.tb.producer)
        self.assertEqual(self.a.lost_reasons, [reason])

    def test_unspliced_data_aborts(self) -> None:
        """Bytes on an end with no peer abort that connection only."""
        lone = Ends()
        transport = HalfCloseTransport()
        lone.makeConnection(transport)
        lone.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)


class LostPeerTests(SynchronousTestCase):
    """
    A FIN that arrives after the peer's connection is gone.
    """

    def test_fin_after_peer_lost_leaves_peer_alone(self) -> None:
        """
        A FIN read in the reactor turn in which the peer was lost (one poll
        returns both events) does not shut down writing on the peer's
        closed connection; this end was already asked to close.
        """
        a, b = Ends(), Ends()
        ta, tb = HalfCloseTransport(), HalfCloseTransport()
        a.makeConnection(ta)
        b.makeConnection(tb)
        splice(a, b)
        b.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(ta.disconnecting)
        a.readConnectionLost()
        self.assertFalse(tb.write_closed)


class TLSHalfCloseTests(SynchronousTestCase):
    """
    A FIN spliced towards a TLS connection.
    """

    def setUp(self) -> None:
        from twisted.internet import protocol, ssl
        from twisted.internet.task import Clock
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test import iosim

        from rproxy.tls import self_signed

        cert_pem, key_pem = self_signed("localhost", days=1)
        server_options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        client_options = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(cert_pem))

        self.plain, self.tls_end = Ends(), Ends()
        self.plain_transport = HalfCloseTransport()
        self.plain.makeConnection(self.plain_transport)

        class Peer(protocol.Protocol):
            def __init__(self) -> None:
                self.received = b""
                self.reasons: list[Failure] = []

            def dataReceived(self, data: bytes) -> None:
                self.received += data

            def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
                self.reasons.append(reason)

        self.peer = Peer()
        clock = Clock()  # TLS transports gather small writes until the next turn
        server_factory = TLSMemoryBIOFactory(
            server_options, False, protocol.Factory.forProtocol(lambda: self.tls_end), clock
        )
        client_factory = TLSMemoryBIOFactory(
            client_options, True, protocol.Factory.forProtocol(lambda: self.peer), clock
        )
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=clock,
        )
        self.pump.flush()
        splice(self.plain, self.tls_end)

    def test_fin_becomes_close_notify(self) -> None:
        """
        The FIN reaches the TLS peer as a close_notify after the bytes
        before it (not as a TCP FIN beneath the TLS layer, which the peer
        never sees as an orderly end), and what the peer sent before it
        learned of the end still reaches the plain side.
        """
        self.plain.dataReceived(b"request")
        self.peer.transport.write(b"late reply")
        self.plain.readConnectionLost()
        self.pump.flush()
        self.assertEqual(self.peer.received, b"request")
        self.assertEqual(len(self.peer.reasons), 1)
        self.peer.reasons[0].trap(error.ConnectionDone)
        self.assertEqual(self.plain_transport.value(), b"late reply")
        self.assertTrue(self.tls_end.lost)
