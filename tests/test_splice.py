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
