"""
Tests for connects that fail for want of local resources (descriptor limit):
L{rproxy.shortage}, and how the TCP and HTTP frontends treat them.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.upstream import UpstreamPool
from rproxy.pool import Pool
from rproxy.shortage import LocalConnectError, ShortageLog
from rproxy.tcp import TCPFrontend
from tests.support import backends_config


class RefusingReactor(MemoryReactorClock):
    """
    A reactor at the descriptor limit: its connectTCP raises EMFILE (or
    C{exc}) from the C{fail_from}-th call on.
    """

    def __init__(self, exc: Exception | None = None, fail_from: int = 1) -> None:
        super().__init__()
        self.exc = exc or OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.fail_from = fail_from
        self.connects = 0

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        self.connects += 1
        if self.connects >= self.fail_from:
            raise self.exc
        return super().connectTCP(*args, **kwargs)


class LogCapture:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tracebacks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "log_failure" in e]

    def matching(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in (e.get("log_format") or "")]


class ClientTransport(StringTransport):
    """
    A StringTransport that, like a real TCP transport, lets a protocol
    unregister when no producer is registered.
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


def client(frontend: TCPFrontend) -> tuple[Any, StringTransport]:
    proto = frontend.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = ClientTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return proto, transport


class TCPFrontendShortageTests(SynchronousTestCase):
    """
    An L4 client whose server connect cannot start is closed, and nothing
    is blamed on the server.
    """

    def setUp(self) -> None:
        data = backends_config(8080, passive={"consecutive_failures": 1})
        self.config = config_from_mapping(data)
        self.reactor = RefusingReactor()
        self.pool = Pool(self.config.backends[0], self.reactor)
        self.frontend = TCPFrontend(self.config.frontends[0], self.pool, self.reactor, self.reactor)
        self.logs = LogCapture(self)

    def test_emfile_closes_the_client(self) -> None:
        """
        EMFILE on connect: the client is aborted on the next reactor turn
        and uncounted once gone; the server is neither charged nor ejected
        (even with consecutive_failures 1), and nothing logs a traceback.
        """
        proto, transport = client(self.frontend)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0)
        self.assertTrue(transport.disconnected)
        server = self.pool.servers[0]
        self.assertEqual((server.active, server.connect_failures, server.consecutive_failures), (0, 0, 0))
        self.assertEqual(server.state(self.reactor.seconds()), "up")
        self.assertEqual(self.frontend.connect_errors, 0)
        proto.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual((self.frontend.active, len(self.frontend.connections)), (0, 0))
        self.assertEqual(self.logs.tracebacks(), [])

    def test_logged_once_per_episode(self) -> None:
        """Many clients closed for one shortage make one log line."""
        for _ in range(20):
            client(self.frontend)
        self.reactor.advance(0)
        self.assertEqual(len(self.logs.matching("out of local resources")), 1)
        self.assertEqual(self.frontend.shortage.total, 20)  # type: ignore[union-attr]

    def test_pick_callback_error_closes_the_client(self) -> None:
        """
        A server slot that comes from the wait queue, then fails to be used
        (here a reactor bug), is logged, given back, and the client closed.
        """
        data = backends_config(8080)
        data["backends"][0]["servers"][0]["max_connections"] = 1
        config = config_from_mapping(data)
        reactor = RefusingReactor(RuntimeError("reactor bug"), fail_from=2)
        pool = Pool(config.backends[0], reactor)
        frontend = TCPFrontend(config.frontends[0], pool, reactor, reactor)
        first, _ = client(frontend)
        second, transport = client(frontend)
        self.assertEqual(pool.waiting, 1)
        # the first client's connect is refused: its slot goes to the waiter
        connecting = reactor.tcpClients[0][2]
        connecting.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertTrue(transport.disconnected)
        self.assertEqual(pool.servers[0].active, 0)
        [logged] = self.logs.tracebacks()
        self.assertTrue(logged["log_failure"].check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        for proto in (first, second):
            proto.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(frontend.active, 0)


class HTTPFrontendShortageTests(SynchronousTestCase):
    """
    The HTTP frontend connects through the same connect_tcp: at the
    descriptor limit its client gets a 502 and nothing hangs or raises.
    """

    def test_emfile_answers_502(self) -> None:
        """
        EMFILE on the upstream connect: 502 on the next reactor turn, the
        server stays up and is not ejected, no traceback.
        """
        data = backends_config(8080)
        data["frontends"][0]["protocol"] = "http"
        config = config_from_mapping(data)
        reactor = RefusingReactor()
        pool = Pool(config.backends[0], reactor)
        frontend = HTTPFrontend(config.frontends[0], {"web": pool}, reactor, reactor, UpstreamPool(reactor, reactor))
        logs = LogCapture(self)
        proto, transport = client(frontend)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        reactor.advance(0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 "), transport.value()[:40])
        self.assertTrue(transport.disconnecting)
        server = pool.servers[0]
        self.assertEqual((server.up, server.active, server.state(reactor.seconds())), (True, 0, "up"))
        self.assertEqual(logs.tracebacks(), [])


class ShortageLogTests(SynchronousTestCase):
    """
    L{ShortageLog}: one line per episode, then a count now and then.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.shortage = ShortageLog(Logger(), self.clock, "test", quiet=10)
        self.reason = LocalConnectError(errno.EMFILE, "Too many open files")

    def lines(self) -> list[tuple[str, Any]]:
        return [(e["log_format"].split(":")[1].strip(), e.get("n")) for e in self.logs.events if e.get("what") == "test"]

    def test_episodes(self) -> None:
        """
        The first failure logs, later ones within the quiet time only count,
        one summary line per quiet time while failures go on, and a failure
        after a quiet time starts a new episode.
        """
        for _ in range(5):
            self.shortage.failed(self.reason)
            self.clock.advance(1)
        self.assertEqual(self.lines(), [("out of local resources, not the server's fault", None)])
        for _ in range(6):
            self.shortage.failed(self.reason)
            self.clock.advance(1)
        self.assertEqual(self.lines()[1:], [("still out of local resources", 10)])
        self.clock.advance(30)
        self.shortage.failed(Failure(self.reason))
        self.assertEqual(len(self.lines()), 3)
        self.assertEqual(self.lines()[2][0], "out of local resources, not the server's fault")
        self.assertEqual(self.shortage.total, 12)


class HTTPShortageEjectionTests(SynchronousTestCase):
    """
    Local connect failures on the HTTP path are not the server's: however
    many in a row, the server is neither charged nor passively ejected.
    """

    def test_repeated_emfile_does_not_eject(self) -> None:
        """
        Ten EMFILE connects in a row (the passive threshold is 2) leave
        every server up, not ejected, with no failure counted.
        """
        data = backends_config(8080, 8081, 8082, passive={"consecutive_failures": 2})
        data["frontends"][0]["protocol"] = "http"
        config = config_from_mapping(data)
        reactor = RefusingReactor()
        pool = Pool(config.backends[0], reactor)
        frontend = HTTPFrontend(config.frontends[0], {"web": pool}, reactor, reactor, UpstreamPool(reactor, reactor))
        logs = LogCapture(self)
        for _ in range(10):
            proto, transport = client(frontend)
            proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reactor.advance(0)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 "), transport.value()[:40])
        now = reactor.seconds()
        self.assertEqual(
            [(s.state(now), s.consecutive_failures, s.connect_failures, s.active) for s in pool.servers],
            [("up", 0, 0, 0)] * 3,
        )
        self.assertEqual(frontend.connect_errors, 0)
        self.assertEqual(logs.tracebacks(), [])
