"""
Tests for L{rproxy.transport.PendingConnect}: a real non-blocking socket
driven by a fake reactor and clock, so every outcome is deterministic.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.shortage import LocalConnectError, is_local
from rproxy.transport import ImmediateSendConnection, PendingConnect, connect_tcp


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


class RefusingReactor(MemoryReactorClock):
    """
    A reactor whose connectTCP raises, as a reactor at the descriptor limit
    may: C{EMFILE} unless told otherwise.
    """

    def __init__(self, exc: Exception | None = None) -> None:
        super().__init__()
        self.exc = exc or OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


class ConnectTCPFailureTests(SynchronousTestCase):
    """
    connect_tcp never raises to its caller for a connect that cannot start.
    """

    def test_emfile_reported_from_the_reactor(self) -> None:
        """
        A reactor raising EMFILE: connect_tcp returns, and the factory hears
        of it once, on the next reactor turn, as a local error.
        """
        reactor = RefusingReactor()
        factory = RecordingFactory()
        connect_tcp(reactor, "127.0.0.1", 80, factory, 5)
        self.assertEqual(factory.failures, [])
        reactor.advance(0)
        [reason] = factory.failures
        reason.trap(LocalConnectError)
        self.assertTrue(is_local(reason))
        self.assertEqual(reason.value.osError, errno.EMFILE)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_other_os_errors_are_the_servers(self) -> None:
        """An OSError that is no shortage (EHOSTUNREACH) is an ordinary connect error."""
        reactor = RefusingReactor(OSError(errno.EHOSTUNREACH, "No route to host"))
        factory = RecordingFactory()
        connect_tcp(reactor, "127.0.0.1", 80, factory, 5)
        reactor.advance(0)
        [reason] = factory.failures
        reason.trap(error.ConnectError)
        self.assertFalse(is_local(reason))

    def test_stop_connecting_before_the_report(self) -> None:
        """Cancelling first reports a UserError once, and nothing after."""
        reactor = RefusingReactor()
        factory = RecordingFactory()
        connector = connect_tcp(reactor, "127.0.0.1", 80, factory, 5)
        connector.stopConnecting()
        connector.stopConnecting()
        reactor.advance(0)
        [reason] = factory.failures
        reason.trap(error.UserError)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_local_errnos(self) -> None:
        """Descriptors, buffers, memory and local ports are ours; a refusal is the server's."""
        for number in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL):
            self.assertTrue(is_local(error.getConnectError((number, os.strerror(number)))), number)
            self.assertTrue(is_local(OSError(number, "x")), number)
        self.assertTrue(is_local(error.ConnectBindError(errno.EMFILE, "Too many open files")))
        self.assertFalse(is_local(error.ConnectionRefusedError(errno.ECONNREFUSED, "refused")))
        self.assertFalse(is_local(error.TimeoutError()))


class DescriptorLimitTests(TestCase):
    """
    At a real descriptor limit, on the real reactor.
    """

    def test_emfile_on_the_real_reactor(self) -> None:
        """
        With no descriptor left, connect_tcp to an IP address returns (no
        OSError escapes) and the factory gets a LocalConnectError.
        """
        from tests.support import reactor

        factory = RecordingFactory()
        reported: defer.Deferred[list[Failure]] = defer.Deferred()
        factory.clientConnectionFailed = lambda connector, reason: reported.callback([reason])  # type: ignore[method-assign]
        free = os.dup(0)
        os.close(free)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # every descriptor below the lowest free one is in use
        resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
        try:
            connect_tcp(reactor, "127.0.0.1", 9, factory, 5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        def check(reasons: list[Failure]) -> None:
            [reason] = reasons
            reason.trap(LocalConnectError)
            self.assertEqual(reason.value.osError, errno.EMFILE)

        return reported.addCallback(check)
