"""
The HTTP engine as a state machine: the real HTTPConnection, Exchange and
UpstreamConnection, with recording fakes for the filters, the connector
and the transports; each test asserts the exact sequence of calls and the
exchange's state at each of them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.http.filters import Chain, Filter
from rproxy.http.filters.ratelimit import RateLimitFilter
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.state import (
    AWAITING,
    CONNECTING,
    DONE,
    DUPLEX,
    NAMES,
    PICKING,
    ROUTING,
    SENDING,
    UPGRADED,
)
from rproxy.http.upstream import UpstreamConnection
from rproxy.pool import Pool
from rproxy.tcp import TCPFrontend

GET = b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingTransport(StringTransport):
    """
    A transport that appends C{("NAME.write", data)}, C{("NAME.close",)}...
    to the shared record.
    """

    def __init__(self, record: list[tuple[Any, ...]], name: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.7", 5555))
        self.record = record
        self.name = name

    def write(self, data: bytes) -> None:
        self.record.append((f"{self.name}.write", data))
        super().write(data)

    def loseConnection(self) -> None:
        self.record.append((f"{self.name}.close",))
        super().loseConnection()

    def abortConnection(self) -> None:
        self.record.append((f"{self.name}.abort",))
        super().loseConnection()

    def loseWriteConnection(self) -> None:
        self.record.append((f"{self.name}.shut_write",))

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class RecordingFilter(Filter):
    """
    Takes part in every phase, recording ("NAME.phase", state name); what
    it does besides can be set per phase.
    """

    def __init__(self, record: list[tuple[Any, ...]], name: str, pool: Pool | None = None,
                 on_request: Any = None) -> None:
        self.record = record
        self.name = name
        self.pool = pool
        self.on_request = on_request

    def request(self, exchange: Any) -> Any:
        self.record.append((f"{self.name}.request", NAMES[exchange.state]))
        return self.on_request(exchange) if self.on_request is not None else None

    def choose(self, exchange: Any) -> None:
        self.record.append((f"{self.name}.choose", NAMES[exchange.state]))
        if self.pool is not None:
            exchange.pool = self.pool

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        self.record.append((f"{self.name}.upstream_request", NAMES[exchange.state]))
        return (*set_headers, (b"X-" + self.name.encode(), b"1")), remove

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        self.record.append((f"{self.name}.response", NAMES[exchange.state], exchange.status))

    def log(self, exchange: Any, backend: str) -> None:
        self.record.append((f"{self.name}.log", NAMES[exchange.state], backend, exchange.status))

    def closed(self, connection: Any) -> None:
        self.record.append((f"{self.name}.closed",))


class RecordingConnector:
    """
    An upstream connector that records its calls; C{get} hands out
    Deferreds the test fires with L{connect}.
    """

    opened = reused = 0

    def __init__(self, record: list[tuple[Any, ...]]) -> None:
        self.record = record
        self.idle: list[UpstreamConnection] = []
        self.pending: list[tuple[Any, Any, defer.Deferred[Any]]] = []

    def take_idle(self, peer: Any) -> Any:
        self.record.append(("connector.take_idle", peer.name))
        if self.idle:
            conn = self.idle.pop()
            conn.reused = True
            return conn
        return None

    def get(self, peer: Any, pool: Any, timeout: float) -> defer.Deferred[Any]:
        self.record.append(("connector.get", peer.name))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((peer, pool, d))
        return d

    def put(self, conn: Any, now: float | None = None) -> None:
        self.record.append(("connector.put", conn.server.name))
        conn.exchange = None
        self.idle.append(conn)

    def discard(self, conn: Any) -> None:
        self.record.append(("connector.discard", conn.server.name))

    def connect(self) -> UpstreamConnection:
        """
        Complete the oldest connect with a new upstream connection.
        """
        peer, pool, d = self.pending.pop(0)
        conn = UpstreamConnection(self, peer, pool)  # type: ignore[arg-type]
        conn.makeConnection(RecordingTransport(self.record, "upstream"))
        d.callback(conn)
        return conn


class Engine:
    """
    One HTTP frontend whose filters and connector record into one list.
    """

    def __init__(self, filters: int = 1, **http: Any) -> None:
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "be", "servers": [{"address": "127.0.0.1:8001", "name": "s0"}],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be",
                           "http": http}],
        })
        self.clock = MemoryReactorClock()
        self.pool = Pool(config.backends[0], self.clock)
        self.record: list[tuple[Any, ...]] = []
        self.connector = RecordingConnector(self.record)
        self.frontend = HTTPFrontend(config.frontends[0], {"be": self.pool}, self.clock, self.clock,
                                     self.connector)  # type: ignore[arg-type]
        self.filters = [RecordingFilter(self.record, f"f{i}", self.pool if i == 0 else None)
                        for i in range(filters)]
        self.frontend.chain = Chain(self.filters)

    def client(self) -> tuple[Any, RecordingTransport]:
        conn = self.frontend.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
        transport = RecordingTransport(self.record, "client")
        conn.makeConnection(transport)
        return conn, transport

    def take(self) -> list[tuple[Any, ...]]:
        record, self.record[:] = list(self.record), []
        return record


class ExchangeStateTests(SynchronousTestCase):
    def test_keep_alive_request(self) -> None:
        """
        A GET goes through every phase in order, the connector is asked for
        an idle connection then a new one, and the connection goes back to
        it after the response; the client connection stays open.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(GET)
        exchange = conn.exchange
        self.assertEqual(exchange.state, CONNECTING)
        self.assertEqual(e.take(), [
            ("f0.request", "ROUTING"), ("f0.choose", "ROUTING"),
            ("connector.take_idle", "s0"), ("connector.get", "s0"),
        ])
        upstream = e.connector.connect()
        self.assertEqual(exchange.state, AWAITING)
        self.assertEqual(e.take(), [
            ("f0.upstream_request", "CONNECTING"),
            ("upstream.write", b"GET /x HTTP/1.1\r\nHost: example\r\nX-Forwarded-For: 10.0.0.7\r\n"
                               b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: example\r\nVia: 1.1 rproxy\r\n"
                               b"X-f0: 1\r\n\r\n"),
        ])
        upstream.dataReceived(OK)
        self.assertEqual(exchange.state, DONE)
        self.assertEqual(e.take(), [
            ("f0.response", "RESPONDING", 200),
            ("client.write", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 rproxy\r\n\r\nok"),
            ("connector.put", "s0"),
            ("f0.log", "DONE", "be", 200),
        ])
        self.assertIsNone(conn.exchange)
        self.assertFalse(client.disconnecting)

    def test_response_coding_other_than_chunked_is_502(self) -> None:
        """
        A response whose Transfer-Encoding is not chunked alone (gzip,
        chunked) is a 502, as from nginx: re-chunked, its body would reach
        the client without its gzip coding; that connection is not reused.
        """
        for coding in (b"gzip, chunked", b"chunked, chunked"):
            e = Engine()
            conn, client = e.client()
            conn.dataReceived(GET)
            upstream = e.connector.connect()
            upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
                                  b"2\r\nok\r\n0\r\n\r\n")
            self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "), (coding, client.value()[:40]))
            self.assertNotIn(("connector.put", "s0"), e.take())

    def test_second_request_reuses_the_connection(self) -> None:
        """The next request takes the idle connection: no connect."""
        e = Engine()
        conn, _ = e.client()
        conn.dataReceived(GET)
        upstream = e.connector.connect()
        upstream.dataReceived(OK)
        e.take()
        conn.dataReceived(GET)
        self.assertEqual(conn.exchange.state, AWAITING)
        self.assertEqual([r[0] for r in e.take()], [
            "f0.request", "f0.choose", "connector.take_idle", "f0.upstream_request", "upstream.write",
        ])

    def test_extra_response_is_not_the_next_requests(self) -> None:
        """
        A server that answers a request with two responses in one read,
        while the client has pipelined a second request: the first
        response ends, the connection goes back to the pool and the second
        request takes it at once, in that same read.  The rest of the read
        arrived before that request was sent, so it is not its response
        (it was given the extra response before): the connection is
        aborted and the second request answered 502, not sent again (the
        server may have acted on it; a retry would run it twice).
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(GET + GET.replace(b"/x", b"/y"))
        upstream = e.connector.connect()
        e.take()
        upstream.dataReceived(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
        record = e.take()
        writes = [r[1] for r in record if r[0] == "client.write"]
        self.assertEqual(writes[0], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 rproxy\r\n\r\nok")
        self.assertEqual([w[:12] for w in writes[1:]], [b"HTTP/1.1 502"])
        self.assertIn(("upstream.abort",), record)
        self.assertNotIn(("connector.get", "s0"), record)
        self.assertIsNone(conn.exchange)

    def test_body_after_a_head_response_is_not_the_next_requests(self) -> None:
        """
        A HEAD answered with a Content-Length and (wrongly) that many body
        bytes in the same read, while the client has pipelined a GET: the
        HEAD's exchange ends at the head, the GET takes the connection with
        a new parser, and the old parser's body and end are not the GET's
        (they made it end with no response, and the client's next response
        went to the wrong request): the connection is aborted and the GET
        answered 502 (sent already, not sent again).
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(GET.replace(b"GET", b"HEAD") + GET.replace(b"/x", b"/y"))
        upstream = e.connector.connect()
        e.take()
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        record = e.take()
        writes = [r[1] for r in record if r[0] == "client.write"]
        self.assertEqual(writes[0], b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 rproxy\r\n\r\n")
        self.assertEqual([w[:12] for w in writes[1:]], [b"HTTP/1.1 502"])
        self.assertIn(("upstream.abort",), record)
        self.assertNotIn(("connector.get", "s0"), record)
        self.assertEqual([r[1:] for r in record if r[0] == "f0.log"], [("DONE", "be", 200), ("DONE", "be", 502)])

    def test_pipelined_after_a_bodiless_response(self) -> None:
        """
        A 204 ends its exchange at its head and the pipelined next request
        takes the connection during that read: the old parser's end of the
        204 is not taken for the next response, and the connection serves
        the next request (no abort, no new connection).
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(GET + GET.replace(b"/x", b"/y"))
        upstream = e.connector.connect()
        e.take()
        upstream.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        record = e.take()
        self.assertNotIn(("upstream.abort",), record)
        self.assertEqual(record[-1], ("upstream.write", b"GET /y HTTP/1.1\r\nHost: example\r\n"
                                      b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"
                                      b"X-Forwarded-Host: example\r\nVia: 1.1 rproxy\r\nX-f0: 1\r\n\r\n"))
        upstream.dataReceived(OK)
        self.assertEqual([r for r in e.take() if r[0] == "client.write"], [
            ("client.write", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 rproxy\r\n\r\nok")])
        self.assertFalse(client.disconnecting)

    def test_filter_answers_and_stops_the_chain(self) -> None:
        """
        A filter that answers in the request phase ends the exchange: no
        later filter runs, no server is asked, the connection stays open.
        """
        e = Engine(filters=2)
        e.filters[0].on_request = lambda exchange: exchange.answer(204, b"No Content", [])
        conn, client = e.client()
        conn.dataReceived(GET)
        self.assertEqual(e.take(), [
            ("f0.request", "ROUTING"),
            ("client.write", b"HTTP/1.1 204 No Content\r\nVia: 1.1 rproxy\r\n\r\n"),
            ("f0.log", "DONE", "-", 204), ("f1.log", "DONE", "-", 204),
        ])
        self.assertFalse(client.disconnecting)
        self.assertEqual(e.pool.servers[0].active, 0)

    def test_filter_waits(self) -> None:
        """
        A filter returning a Deferred holds the chain until it fires; the
        next filter runs after.
        """
        e = Engine(filters=2)
        wait: defer.Deferred[None] = defer.Deferred()
        e.filters[0].on_request = lambda exchange: wait
        conn, _ = e.client()
        conn.dataReceived(GET)
        self.assertEqual(e.take(), [("f0.request", "ROUTING")])
        self.assertEqual(conn.exchange.state, ROUTING)
        wait.callback(None)
        self.assertEqual(e.take(), [
            ("f1.request", "ROUTING"), ("f0.choose", "ROUTING"), ("f1.choose", "ROUTING"),
            ("connector.take_idle", "s0"), ("connector.get", "s0"),
        ])
        self.assertEqual(conn.exchange.state, CONNECTING)

    def test_client_gone_while_a_filter_waits(self) -> None:
        """The wait is cancelled when the client goes; nothing else runs."""
        e = Engine(filters=2)
        wait: defer.Deferred[None] = defer.Deferred(lambda d: e.record.append(("wait.cancel",)))
        e.filters[0].on_request = lambda exchange: wait
        conn, _ = e.client()
        conn.dataReceived(GET)
        exchange = conn.exchange
        e.take()
        logged = EventLoggingObserver()
        globalLogPublisher.addObserver(logged)
        self.addCleanup(globalLogPublisher.removeObserver, logged)
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(exchange.state, DONE)
        self.assertEqual(e.take(), [("wait.cancel",), ("f0.closed",), ("f1.closed",)])
        self.assertEqual([e for e in logged if e["log_level"].name == "error"], [])

    def test_no_pool_chosen_is_404(self) -> None:
        """A chain that chooses no pool answers 404 and closes."""
        e = Engine()
        e.filters[0].pool = None
        conn, client = e.client()
        conn.dataReceived(GET)
        record = e.take()
        self.assertEqual(record[:2], [("f0.request", "ROUTING"), ("f0.choose", "ROUTING")])
        self.assertEqual(record[2], ("f0.log", "DONE", "-", 404))
        self.assertTrue(record[3][1].startswith(b"HTTP/1.1 404 "), record[3])
        self.assertEqual(record[4:], [("client.close",)])

    def test_body_answered_early(self) -> None:
        """
        A server that answers while the request body still flows: SENDING,
        then DUPLEX; the answer ends the exchange, the server connection is
        closed rather than kept, and the client is closed after it.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        upstream = e.connector.connect()
        exchange = conn.exchange
        self.assertEqual(exchange.state, SENDING)
        e.take()
        upstream.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(exchange.state, DONE)
        self.assertEqual(e.take(), [
            ("f0.response", "DUPLEX", 413),
            ("client.write", b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nVia: 1.1 rproxy\r\n\r\n"),
            ("upstream.close",),
            ("f0.log", "DONE", "be", 413),
            ("client.close",),
        ])

    def test_duplex_then_request_end(self) -> None:
        """A response head while the body flows is DUPLEX; the body's end makes it RESPONDING."""
        e = Engine()
        conn, _ = e.client()
        conn.dataReceived(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
        upstream = e.connector.connect()
        exchange = conn.exchange
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.assertEqual(exchange.state, DUPLEX)
        conn.dataReceived(b"c")
        self.assertEqual(NAMES[exchange.state], "RESPONDING")
        upstream.dataReceived(b"cd")
        self.assertEqual(exchange.state, DONE)
        self.assertEqual(e.take()[-2:], [("connector.put", "s0"), ("f0.log", "DONE", "be", 200)])

    def test_reused_connection_closed_retries(self) -> None:
        """
        A kept-alive connection that turns out closed before any byte of
        the answer: back to PICKING, a new connection, the request sent
        again.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(GET)
        e.connector.connect().dataReceived(OK)
        conn.dataReceived(GET)
        exchange = conn.exchange
        [idle] = [c for c in e.frontend.pool.servers]  # (one server)
        reused = exchange.upstream
        self.assertTrue(reused.reused)
        e.take()
        reused.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(exchange.state, CONNECTING)
        self.assertEqual(e.take(), [
            ("connector.discard", "s0"),
            ("connector.take_idle", "s0"), ("connector.get", "s0"),
        ])
        upstream = e.connector.connect()
        upstream.dataReceived(OK)
        self.assertEqual(client.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertEqual(e.frontend.retries_total, 1)
        self.assertEqual(idle.active, 0)

    def test_state_names_in_order(self) -> None:
        """The states are ordered as the exchange moves through them."""
        self.assertEqual([ROUTING, PICKING, CONNECTING, SENDING, AWAITING, DUPLEX], list(range(6)))
        self.assertEqual(NAMES[UPGRADED], "UPGRADED")


UPGRADE = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


class UpgradeSpliceTests(SynchronousTestCase):
    """
    After a 101 the two connections are the one splice's: bytes both ways,
    half-close passed on, byte counts kept, references dropped at the end.
    """

    def upgraded(self) -> tuple[Engine, Any, RecordingTransport, UpstreamConnection, Any]:
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(UPGRADE)
        upstream = e.connector.connect()
        exchange = conn.exchange
        upstream.dataReceived(SWITCH + b"hi")
        self.assertEqual(exchange.state, UPGRADED)
        e.take()
        return e, conn, client, upstream, exchange

    def test_bytes_both_ways(self) -> None:
        """Bytes pass both ways after the 101, and the 101's trailing bytes first."""
        e, conn, client, upstream, _ = self.upgraded()
        self.assertTrue(client.value().endswith(b"\r\n\r\nhi"))
        conn.dataReceived(b"ping")
        upstream.dataReceived(b"pong")
        self.assertEqual(e.take(), [("upstream.write", b"ping"), ("client.write", b"pong")])
        self.assertIs(client.producer, upstream.transport)
        self.assertIs(upstream.transport.producer, client)

    def test_client_half_close(self) -> None:
        """
        A client FIN becomes a write shutdown towards the server; the
        server's later bytes still reach the client; the server's FIN then
        closes both.
        """
        e, conn, client, upstream, _ = self.upgraded()
        self.assertTrue(IHalfCloseableProtocol.providedBy(conn))
        self.assertTrue(IHalfCloseableProtocol.providedBy(upstream))
        conn.readConnectionLost()
        self.assertEqual(e.take(), [("upstream.shut_write",)])
        upstream.dataReceived(b"last words")
        upstream.readConnectionLost()
        self.assertEqual(e.take(), [("client.write", b"last words"), ("upstream.close",), ("client.close",)])

    def test_end_counts_and_unlinks(self) -> None:
        """
        When both connections are gone the server slot is free, the bytes
        the server sent count as delivered, and no end refers to the other.
        """
        e, conn, client, upstream, _ = self.upgraded()
        self.assertEqual(conn.delivered, 2)  # "hi", after the 101's head
        upstream.dataReceived(b"12345")
        relay = conn.relay
        upstream.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(e.take(), [("client.write", b"12345"), ("connector.discard", "s0"), ("client.close",)])
        before = conn.delivered
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(conn.delivered - before, 5)  # "12345" through the splice ("hi" counted before)
        self.assertIsNone(relay.peer)
        self.assertIsNone(conn.relay)
        self.assertIsNone(upstream.relay)
        self.assertEqual(e.pool.servers[0].active, 0)
        self.assertEqual(len(e.frontend.connections), 0)

    def test_bytes_after_upgrade_request_wait_for_101(self) -> None:
        """
        What follows an upgrade request goes upstream only after the 101,
        in order: a server that has not switched never reads it.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(UPGRADE + b"early")
        upstream = e.connector.connect()
        conn.dataReceived(b" and later")
        writes = [r[1] for r in e.take() if r[0] == "upstream.write"]
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].startswith(b"GET /chat HTTP/1.1\r\n"))
        self.assertNotIn(b"early", writes[0])
        upstream.dataReceived(SWITCH)
        self.assertEqual([r for r in e.take() if r[0] == "upstream.write"],
                         [("upstream.write", b"early"), ("upstream.write", b" and later")])

    def test_no_switch_closes_and_holds_back(self) -> None:
        """
        An upgrade request answered without a 101: the bytes that followed
        it (a smuggled request here) never reach the server, the answer
        says Connection: close and the client connection closes after it;
        the server's connection, which read nothing unchecked, is kept.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(UPGRADE + b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream = e.connector.connect()
        upstream.dataReceived(OK)
        record = e.take()
        self.assertEqual([r for r in record if r[0] == "upstream.write" and b"/admin" in r[1]], [])
        self.assertIn(b"Connection: close\r\n", client.value())
        self.assertIn(("client.close",), record)
        self.assertIn(("connector.put", "s0"), record)

    def test_answered_upgrade_request_closes(self) -> None:
        """
        An upgrade request a filter answers itself (no server): the
        connection closes after the answer, the bytes after it unread.
        """
        e = Engine()
        e.filters[0].on_request = lambda exchange: exchange.answer(401, b"Unauthorized", [])
        conn, client = e.client()
        conn.dataReceived(UPGRADE + b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
        record = e.take()
        self.assertFalse([r for r in record if r[0].startswith("connector")])
        self.assertTrue(client.value().startswith(b"HTTP/1.1 401 "))
        self.assertIn(b"Connection: close\r\n", client.value())
        self.assertIn(("client.close",), record)

    def test_reading_stops_until_101(self) -> None:
        """
        Bytes after an upgrade request stop the reading until the server
        answers (the kernel holds the rest, not the queue): one read is
        held, and the 101 sends it on and reads again.
        """
        e = Engine()
        conn, client = e.client()
        conn.dataReceived(UPGRADE)
        upstream = e.connector.connect()
        conn.dataReceived(b"x" * 65536)
        self.assertEqual(client.producerState, "paused")
        self.assertEqual(sum(len(ev.rest) for ev in conn.events), 65536)
        upstream.dataReceived(SWITCH)
        self.assertEqual(client.producerState, "producing")
        self.assertIn(("upstream.write", b"x" * 65536), e.take())

    def test_no_body_bytes_counted_after_upgrade(self) -> None:
        """The reads after an upgrade request count no body bytes (a pipelined body before it is not counted again)."""
        e = Engine()
        conn, _ = e.client()
        conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + UPGRADE)
        for _ in range(10):
            conn.dataReceived(b"a")
        self.assertEqual(conn.reader.body_fed, 0)
        self.assertLessEqual(conn.queued, 5)

    def test_rate_limited_upgrade_request_says_close(self) -> None:
        """
        A 429 to an upgrade request says Connection: close, as the
        connection then closes (the reader stopped after that request).
        """
        e = Engine(filters=0)
        limited = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "be", "servers": ["127.0.0.1:8001"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be",
                           "rate_limit": {"key": "ip", "rate": "1/m", "shared": False}}],
        }).frontends[0]
        e.frontend.config = limited
        e.frontend.chain = Chain([RateLimitFilter.make(e.frontend), RecordingFilter(e.record, "f0", e.pool)])
        conn, _ = e.client()
        conn.dataReceived(GET)
        conn, client = e.client()
        conn.dataReceived(UPGRADE + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 429 "), client.value()[:40])
        self.assertIn(b"\r\nConnection: close\r\n", client.value())
        self.assertIn(("client.close",), e.take())

    def test_pre_upgrade_connection_is_not_half_closeable(self) -> None:
        """Before a 101 a FIN ends the connection (Twisted's default), as before."""
        e = Engine()
        conn, _ = e.client()
        self.assertFalse(IHalfCloseableProtocol.providedBy(conn))


class CompositionTests(SynchronousTestCase):
    def test_http_frontend_is_no_tcp_frontend(self) -> None:
        """Both frontends own an Admission; neither inherits the other."""
        from rproxy.admission import Admission

        e = Engine()
        self.assertNotIsInstance(e.frontend, TCPFrontend)
        self.assertIsInstance(e.frontend.admission, Admission)
        conn, _ = e.client()
        self.assertEqual((e.frontend.active, e.frontend.total, len(e.frontend.connections)), (1, 1, 1))
        self.assertIn(conn, e.frontend.admission.connections)


class AttemptRecorder(Filter):
    """Takes part in the attempt phases only, recording them."""

    def __init__(self, record: list[tuple[Any, ...]]) -> None:
        self.record = record

    def attempt(self, exchange: Any, server: Any) -> None:
        self.record.append(("attempt", server.name, exchange.attempts))

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        self.record.append(("attempt_end", server.name, outcome))


class AttemptPhaseTests(SynchronousTestCase):
    """
    The attempt phases: one C{attempt} and exactly one C{attempt_end} per
    upstream attempt, retries included, with the outcome.
    """

    def engine(self) -> tuple[Engine, list[tuple[Any, ...]]]:
        e = Engine()
        attempts: list[tuple[Any, ...]] = []
        e.frontend.chain = Chain([*e.filters, AttemptRecorder(attempts)])
        return e, attempts

    def test_answered(self) -> None:
        """An answered request: its attempt ends with the status."""
        e, attempts = self.engine()
        conn, _ = e.client()
        conn.dataReceived(GET)
        self.assertEqual(attempts, [("attempt", "s0", 1)])
        e.connector.connect().dataReceived(OK)
        self.assertEqual(attempts, [("attempt", "s0", 1), ("attempt_end", "s0", 200)])

    def test_retry_after_a_closed_kept_connection(self) -> None:
        """A reused connection found closed ends one attempt; the retry is a second."""
        e, attempts = self.engine()
        conn, _ = e.client()
        conn.dataReceived(GET)
        e.connector.connect().dataReceived(OK)
        conn.dataReceived(GET)
        reused = conn.exchange.upstream
        attempts.clear()
        reused.connectionLost(Failure(error.ConnectionDone()))
        e.connector.connect().dataReceived(OK)
        self.assertEqual([a[:2] for a in attempts], [
            ("attempt_end", "s0"), ("attempt", "s0"), ("attempt_end", "s0")])
        self.assertTrue(attempts[0][2].startswith("upstream: "), attempts[0])
        self.assertEqual(attempts[1][2], 2)
        self.assertEqual(attempts[2][2], 200)

    def test_connect_failed(self) -> None:
        """A failed connect ends the attempt with its reason."""
        e, attempts = self.engine()
        conn, client = e.client()
        conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 1\r\n\r\nx")
        _, _, d = e.connector.pending.pop(0)
        d.errback(Failure(error.TimeoutError()))
        self.assertEqual(len(attempts), 2)
        self.assertEqual(attempts[1][:2], ("attempt_end", "s0"))
        self.assertTrue(attempts[1][2].startswith("connect: "), attempts[1])
        self.assertIn(b"502", client.value())

    def test_client_gone(self) -> None:
        """A client that goes away mid-attempt ends it as aborted."""
        e, attempts = self.engine()
        conn, _ = e.client()
        conn.dataReceived(GET)
        e.connector.connect()
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(attempts, [("attempt", "s0", 1), ("attempt_end", "s0", "aborted")])
