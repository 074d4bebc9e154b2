"""
Tests for L{rproxy.transport.PendingConnect}: a real non-blocking socket
driven by a fake reactor and clock, so every outcome is deterministic.
"""

from __future__ import annotations

import socket

from twisted.internet import error
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.transport import ImmediateSendConnection, PendingConnect


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.writers: set[object] = set()
        self.readers: set[object] = set()

    def addWriter(self, w: object) -> None:
        self.writers.add(w)

    def removeWriter(self, w: object) -> None:
        self.writers.discard(w)

    def addReader(self, r: object) -> None:
        self.readers.add(r)

    def removeReader(self, r: object) -> None:
        self.readers.discard(r)


class RecordingFactory:
    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.protocols: list[Protocol] = []

    def buildProtocol(self, addr: object) -> Protocol:
        proto = Protocol()
        self.protocols.append(proto)
        return proto

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.failures.append(reason)


class PendingConnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.factory = RecordingFactory()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]

    def test_timeout(self) -> None:
        """With no writability event before the timeout, the connect fails once."""
        pending = PendingConnect(self.reactor, "127.0.0.1", self.port, self.factory, 0.5)
        self.assertIn(pending, self.reactor.writers)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.factory.failures), 1)
        self.factory.failures[0].trap(error.TimeoutError)
        self.assertEqual((self.reactor.writers, self.reactor.getDelayedCalls()), (set(), []))
        pending.stopConnecting()
        self.assertEqual(len(self.factory.failures), 1)

    def test_connected(self) -> None:
        """Writability with no socket error hands the socket to a transport."""
        pending = PendingConnect(self.reactor, "127.0.0.1", self.port, self.factory, 5)
        accepted, _ = self.listener.accept()
        self.addCleanup(accepted.close)
        pending.doWrite()
        [proto] = self.factory.protocols
        self.assertIsInstance(proto.transport, ImmediateSendConnection)
        self.assertEqual(proto.transport.getPeer().port, self.port)
        self.assertIn(proto.transport, self.reactor.readers)
        self.assertEqual((self.reactor.writers, self.reactor.getDelayedCalls()), (set(), []))
        proto.transport.write(b"hi")
        self.assertEqual(accepted.recv(2), b"hi")
        pending.stopConnecting()
        self.assertEqual(self.factory.failures, [])
        proto.transport.socket.close()

    def test_refused(self) -> None:
        """A refused connect is reported as ConnectionRefusedError, never synchronously."""
        self.listener.close()
        pending = PendingConnect(self.reactor, "127.0.0.1", self.port, self.factory, 5)
        self.assertEqual(self.factory.failures, [])
        # whichever way the kernel reports it: at once, or on the next event
        self.reactor.advance(0)
        if not self.factory.failures:
            pending.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(len(self.factory.failures), 1)
        self.factory.failures[0].trap(error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_connecting(self) -> None:
        """stopConnecting reports a UserError once and frees everything."""
        pending = PendingConnect(self.reactor, "127.0.0.1", self.port, self.factory, 5)
        pending.stopConnecting()
        pending.stopConnecting()
        self.assertEqual(len(self.factory.failures), 1)
        self.factory.failures[0].trap(error.UserError)
        self.assertEqual((self.reactor.writers, self.reactor.getDelayedCalls()), (set(), []))
        self.assertEqual(pending.fileno(), -1)
