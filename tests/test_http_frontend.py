"""
Unit tests of the HTTP frontend on fake transports and a fake clock: the
real HTTPConnection, Exchange and UpstreamConnection, with clients and
servers played by the test.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.http.connection import HTTPConnection
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.upstream import UpstreamConnection, UpstreamPool
from rproxy.pool import Pool

GET = b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Transport(StringTransport):
    """
    A StringTransport that, like a TCP transport, lets a producer be
    unregistered when none is, and counts pauses of its reading.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.7", 5555))
        self.aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Harness:
    """
    One HTTP frontend on a MemoryReactorClock, its pools and upstream pool.
    """

    def __init__(self, http: dict[str, Any] | None = None, servers: list[Any] | None = None,
                 backend: dict[str, Any] | None = None, **frontend: Any) -> None:
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [dict({"name": "be", "servers": servers or [{"address": "127.0.0.1:8001", "name": "s0"}],
                               "health_check": {"type": "none"}}, **(backend or {}))],
            "frontends": [dict({"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be",
                                "http": http or {}}, **frontend)],
        })
        self.config = config
        self.clock = MemoryReactorClock()
        self.pools = {b.name: Pool(b, self.clock) for b in config.backends}
        self.pool = self.pools["be"]
        self.upstreams = UpstreamPool(self.clock, self.clock)
        self.frontend = HTTPFrontend(config.frontends[0], self.pools, self.clock, self.clock, self.upstreams)

    def client(self) -> tuple[HTTPConnection, Transport]:
        conn = self.frontend.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        transport = Transport()
        conn.makeConnection(transport)
        return conn, transport

    def connects(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.clock.tcpClients]

    def upstream(self) -> tuple[UpstreamConnection, Transport]:
        """
        Complete the oldest connect the frontend started.
        """
        _, _, factory, _, _ = self.clock.tcpClients.pop(0)
        conn = factory.buildProtocol(None)
        transport = Transport()
        conn.makeConnection(transport)
        return conn, transport

    def refuse(self) -> None:
        """
        Refuse the oldest connect the frontend started.
        """
        _, _, factory, _, _ = self.clock.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def close(self, conn: Any) -> None:
        conn.connectionLost(Failure(error.ConnectionDone()))


def head_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


class HostHeaderTests(SynchronousTestCase):
    def forwarded_host(self, address: str, **backend: Any) -> bytes:
        h = Harness(http={"host_header": "server"}, servers=[address], backend=backend)
        conn, _ = h.client()
        conn.dataReceived(GET)
        _, server = h.upstream()
        [host] = [line for line in server.value().split(b"\r\n") if line.lower().startswith(b"host:")]
        return host

    def test_server_port_kept(self) -> None:
        """host_header: server sends the server's host and port."""
        self.assertEqual(self.forwarded_host("127.0.0.1:19382"), b"Host: 127.0.0.1:19382")

    def test_default_port_left_out(self) -> None:
        """Port 80 of plain HTTP is the scheme default and is left out."""
        self.assertEqual(self.forwarded_host("app.internal:80"), b"Host: app.internal")

    def test_ipv6_bracketed(self) -> None:
        """An IPv6 server is named in brackets, with its port."""
        self.assertEqual(self.forwarded_host("[::1]:8080"), b"Host: [::1]:8080")


class DirectRouteTests(SynchronousTestCase):
    def test_release_wakes_waiter(self) -> None:
        """
        A direct route takes its slot through the pool, so the slot it
        gives back goes to a request waiting for that server.
        """
        h = Harness(http={"direct_routes": True},
                    servers=[{"address": "127.0.0.1:8001", "name": "s0", "max_connections": 1}])
        direct, direct_t = h.client()
        direct.dataReceived(b"GET /backend/s0/a HTTP/1.1\r\nHost: x\r\n\r\n")
        server = h.pool.servers[0]
        self.assertEqual(server.active, 1)
        waiting, waiting_t = h.client()
        waiting.dataReceived(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((h.pool.waiting, len(h.clock.tcpClients)), (1, 1))
        upstream, up = h.upstream()
        self.assertTrue(up.value().startswith(b"GET /a HTTP/1.1\r\n"))
        up.clear()
        upstream.dataReceived(OK)
        self.assertTrue(direct_t.value().endswith(b"ok"))
        # the freed slot went to the waiting request, which now reuses the
        # upstream connection the direct route returned to the idle pool
        self.assertEqual((h.pool.waiting, server.active), (0, 1))
        self.assertTrue(up.value().startswith(b"GET /b HTTP/1.1\r\n"), up.value())
        upstream.dataReceived(OK)
        self.assertTrue(waiting_t.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(server.active, 0)

    def test_full_pinned_server_is_503(self) -> None:
        """A direct route to a server at its max_connections gets 503."""
        h = Harness(http={"direct_routes": True},
                    servers=[{"address": "127.0.0.1:8001", "name": "s0", "max_connections": 1}])
        first, _ = h.client()
        first.dataReceived(b"GET /backend/s0/a HTTP/1.1\r\nHost: x\r\n\r\n")
        second, second_t = h.client()
        second.dataReceived(b"GET /backend/s0/a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(second_t.value().startswith(b"HTTP/1.1 503 "), second_t.value())
        self.assertIn(b"server s0 is full", second_t.value())
        self.assertEqual(h.pool.servers[0].active, 1)


class CallbackFailureTests(SynchronousTestCase):
    """
    A success callback that raises is caught behind it: one logged line,
    502 to the client, the server slot given back.
    """

    def setUp(self) -> None:
        self.logged = EventLoggingObserver()
        globalLogPublisher.addObserver(self.logged)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged)

    def errors(self) -> list[str]:
        return [e["log_format"].format(**e) for e in self.logged if e["log_level"].name == "error"]

    def test_server_pick(self) -> None:
        """A server pick whose callback raises answers 502 and frees the slot."""
        h = Harness(servers=[{"address": "127.0.0.1:8001", "name": "s0", "max_connections": 1}])
        first, _ = h.client()
        first.dataReceived(GET)
        conn, t = h.client()
        conn.dataReceived(GET)  # waits for the slot

        def broken(server: Any) -> None:
            raise RuntimeError("pick broke")

        h.upstreams.take_idle = broken  # type: ignore[method-assign]
        upstream, _ = h.upstream()
        upstream.dataReceived(OK)  # the first ends; its slot goes to the waiter
        self.assertTrue(t.value().startswith(b"HTTP/1.1 502 "), t.value())
        self.assertEqual(self.errors(), ["frontend fe: choosing a server failed: RuntimeError: pick broke"])
        self.assertEqual(h.pool.servers[0].active, 0)

    def test_connect(self) -> None:
        """A connect whose callback raises answers 502 and frees the slot."""
        h = Harness()
        d: defer.Deferred[Any] = defer.Deferred()
        h.upstreams.get = lambda *a: d  # type: ignore[method-assign]
        conn, t = h.client()
        conn.dataReceived(GET)
        d.callback(object())  # not a connection: connected() raises
        self.assertTrue(t.value().startswith(b"HTTP/1.1 502 "), t.value())
        [line] = self.errors()
        self.assertTrue(line.startswith("frontend fe: connecting to a server failed: AttributeError"), line)
        self.assertEqual(h.pool.servers[0].active, 0)

    def test_token_lease(self) -> None:
        """A token lease whose callback raises answers 502."""
        h = Harness()
        d: defer.Deferred[Any] = defer.Deferred()

        class Tokens:
            def try_lease(self) -> None:
                return None

            def lease(self) -> defer.Deferred[Any]:
                return d

        h.frontend.tokens = Tokens()  # type: ignore[assignment]
        conn, t = h.client()
        conn.dataReceived(GET)
        d.callback(object())  # a lease without a token: _leased raises
        self.assertTrue(t.value().startswith(b"HTTP/1.1 502 "), t.value())
        [line] = self.errors()
        self.assertTrue(line.startswith("frontend fe: leasing a token failed: AttributeError"), line)


class RetryBudgetTests(SynchronousTestCase):
    def serve(self, h: Harness, n: int) -> None:
        """n requests on one keep-alive connection, answered 200."""
        conn, _ = h.client()
        upstream = None
        for _ in range(n):
            conn.dataReceived(GET)
            if upstream is None:
                upstream, _ = h.upstream()
            upstream.dataReceived(OK)
        self.assertEqual(h.frontend.counted_requests, n)

    def allowed(self, h: Harness) -> int:
        n = 0
        while h.frontend.retry_budget_allows():
            n += 1
        return n

    def test_window_slides(self) -> None:
        """
        The budget is 20% of the requests of the last 10 s: the requests of
        the second before still count after it ends, and are forgotten 10 s
        later (then the minimum of 3 holds).
        """
        h = Harness()
        self.serve(h, 100)
        h.clock.advance(1.5)
        self.assertEqual(self.allowed(h), 20)
        h.clock.advance(5)
        self.assertEqual(self.allowed(h), 0)
        h.clock.advance(10)
        self.assertEqual(self.allowed(h), 3)

    def test_refused_connect_needs_no_budget(self) -> None:
        """
        A refused connect is retried on another server whatever the method
        (a POST with its body here) and with the budget spent.
        """
        h = Harness(servers=["127.0.0.1:8001", "127.0.0.1:8002"], backend={"algorithm": "round-robin"})
        self.assertEqual(self.allowed(h), 3)
        conn, t = h.client()
        conn.dataReceived(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        first = h.connects()[0]
        h.refuse()
        self.assertEqual(len(h.connects()), 1)
        self.assertNotEqual(h.connects()[0], first)
        upstream, up = h.upstream()
        self.assertTrue(up.value().startswith(b"POST /p HTTP/1.1\r\n"))
        self.assertTrue(up.value().endswith(b"\r\n\r\nbody"))
        upstream.dataReceived(OK)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual((h.frontend.retries_total, h.frontend.budgeted_retries), (1, 3))

    def test_timed_out_connect_takes_budget(self) -> None:
        """A connect that timed out is retried only within the budget."""
        h = Harness(servers=["127.0.0.1:8001", "127.0.0.1:8002"], backend={"algorithm": "round-robin"})
        self.assertEqual(self.allowed(h), 3)
        conn, t = h.client()
        conn.dataReceived(GET)
        _, _, factory, _, _ = h.clock.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
        self.assertTrue(t.value().startswith(b"HTTP/1.1 502 "), t.value())


class BoundsTests(SynchronousTestCase):
    def test_pipelined_requests_pause_reading(self) -> None:
        """
        A client that pipelines many requests is paused once more than
        QUEUE_EVENTS are queued and resumed when the queue has drained to
        half of it; every request is answered in order.
        """
        from rproxy.http.connection import QUEUE_EVENTS

        h = Harness()
        conn, t = h.client()
        n = 4 * QUEUE_EVENTS
        conn.dataReceived(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n)))
        self.assertEqual(t.producerState, "paused")
        self.assertEqual(len(conn.events), n - 1)
        upstream, up = h.upstream()
        answered = 0
        while t.producerState == "paused":
            upstream.dataReceived(OK)
            answered += 1
        self.assertEqual(len(conn.events), QUEUE_EVENTS // 2)
        self.assertEqual(answered, n - 1 - QUEUE_EVENTS // 2)
        while conn.exchange is not None:
            upstream.dataReceived(OK)
        self.assertEqual(t.value().count(b"HTTP/1.1 200 OK\r\n"), n)
        self.assertEqual([line.split()[1] for line in up.value().split(b"\r\n") if line.startswith(b"GET ")],
                         [b"/%d" % i for i in range(n)])

    def test_interim_responses_capped(self) -> None:
        """
        Past MAX_INTERIM interim responses to one request the exchange
        fails: 502 to the client, the server's connection aborted; up to
        MAX_INTERIM pass on.
        """
        from rproxy.http.upstream import MAX_INTERIM

        early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        h = Harness()
        conn, t = h.client()
        conn.dataReceived(GET)
        upstream, up = h.upstream()
        upstream.dataReceived(early * MAX_INTERIM + OK)
        self.assertEqual(t.value(), b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nVia: 1.1 rproxy\r\n\r\n" * MAX_INTERIM
                         + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 rproxy\r\n\r\nok")
        t.clear()
        conn.dataReceived(GET)
        for _ in range(MAX_INTERIM + 1000):
            if up.aborted:
                break
            upstream.dataReceived(early)
        self.assertTrue(up.aborted)
        self.assertEqual(t.value().count(b" 103 Early Hints\r\n"), MAX_INTERIM)
        self.assertIn(b"HTTP/1.1 502 ", t.value())
        self.assertTrue(t.disconnecting)


class DrainTests(SynchronousTestCase):
    def test_soft_stop(self) -> None:
        """
        On drain an idle keep-alive connection closes at once; a busy one
        gets its response with Connection: close, is served nothing more
        and closes; the drain ends when both are gone, not at grace.
        """
        h = Harness()
        idle, idle_t = h.client()
        idle.dataReceived(GET)
        upstream, _ = h.upstream()
        upstream.dataReceived(OK)
        busy, busy_t = h.client()
        busy.dataReceived(GET)
        drained = h.frontend.drain(10.0)
        self.assertTrue(idle_t.disconnecting)
        self.assertFalse(busy_t.disconnecting)
        h.close(idle)
        busy.dataReceived(GET)  # pipelined behind the one in flight: not served
        upstream.dataReceived(OK)
        self.assertEqual(busy_t.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 rproxy\r\n"
                                         b"Connection: close\r\n\r\nok")
        self.assertTrue(busy_t.disconnecting)
        self.assertFalse(busy_t.aborted)
        self.assertNoResult(drained)
        h.close(busy)
        self.successResultOf(drained)
        self.assertEqual(h.clock.seconds(), 0)

    def test_head_already_sent(self) -> None:
        """
        A response whose head went out before the drain ends the
        connection once complete.
        """
        h = Harness()
        conn, t = h.client()
        conn.dataReceived(GET)
        upstream, _ = h.upstream()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
        h.frontend.drain(10.0)
        self.assertFalse(t.disconnecting)
        upstream.dataReceived(b"ok")
        self.assertTrue(t.value().endswith(b"\r\n\r\nokok"))
        self.assertTrue(t.disconnecting)


class SlowReaderTests(SynchronousTestCase):
    def test_unread_answers_hold_back_the_next_request(self) -> None:
        """
        While the client's transport holds more unread answers than it
        buffers (it pauses the connection, its producer), no further
        request starts; when they drain, the next one does.
        """
        h = Harness()
        conn, t = h.client()
        self.assertIs(t.producer, conn)
        conn.dataReceived(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
        upstream, up = h.upstream()
        conn.pauseProducing()  # the transport's buffer went past its limit
        upstream.dataReceived(OK)
        self.assertEqual(up.value().count(b"GET /"), 1)
        self.assertIsNone(conn.exchange)
        conn.resumeProducing()  # the client read what was buffered
        self.assertEqual(up.value().count(b"GET /"), 2)
        upstream.dataReceived(OK)
        upstream.dataReceived(OK)
        self.assertEqual(t.value().count(b"HTTP/1.1 200 OK\r\n"), 3)

    def test_body_source_takes_the_producer_slot(self) -> None:
        """
        A response body longer than one read makes the server's transport
        the client's producer; the connection takes the slot back after.
        """
        h = Harness()
        conn, t = h.client()
        conn.dataReceived(GET)
        upstream, up = h.upstream()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.assertIs(t.producer, up)
        upstream.dataReceived(b"cd")
        self.assertIs(t.producer, conn)
        self.assertTrue(t.value().endswith(b"\r\n\r\nabcd"))

    def test_close_gives_up_the_producer_slot(self) -> None:
        """
        Before closing, the connection unregisters itself (a transport
        with a producer would wait for it and never close).
        """
        h = Harness()
        conn, t = h.client()
        conn.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        upstream, _ = h.upstream()
        upstream.dataReceived(OK)
        self.assertTrue(t.disconnecting)
        self.assertIsNone(t.producer)
