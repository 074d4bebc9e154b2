"""
Events through a real Kafka-protocol broker (tansu, from the harness) into
a real PostgreSQL: an agent's heartbeats through the tunnel, and the broker
killed and restarted under traffic.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import task
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from rproxy.events import HEARTBEATS, REQUESTS
from rproxy.store.postgres import PostgresKeys, connection, migrate
from rproxy.tunnel.wire import Heartbeat, Login
from tests.servers import KafkaServer, PostgresServer, RedisServer
from tests.support import ServiceMixin, async_test, connect, reactor, turn, wait_for
from tests.test_e2e_tunnel import FakeAgent
from tests.test_servers import started

log = Logger()


class KafkaTests(ServiceMixin, TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.pg: Any = started(PostgresServer)
        self.addCleanup(self.pg.close)
        self.kafka: Any = started(KafkaServer)
        self.addCleanup(self.kafka.close)

    async def start(self, **stores: Any) -> Any:
        self.service = await self.start_service({
            "stores": {"postgres": {"dsn": self.pg.dsn},
                       # a short session: the group forms in ~3 s instead of ~20 s
                       "kafka": {"bootstrap_servers": self.kafka.bootstrap, "session_timeout": "6s",
                                 "delivery_timeout": "60s"}, **stores},
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        redis = "up" if "redis" in stores else "off"
        await wait_for(lambda: self.service.stores.status() == {"postgres": "up", "redis": redis, "kafka": "up"},
                       timeout=30)
        self.conn = connection(reactor)
        await self.conn.connect(self.pg.dsn)
        self.addCleanup(self.conn.close)
        return self.service

    async def count(self, sql: str) -> int:
        return int((await self.conn.runQuery(sql))[0][0] or 0)

    async def settle(self, sql: str, wanted: Any, timeout: float = 60.0) -> int:
        """
        Poll C{sql} until it returns C{wanted()} (or stops changing past
        the timeout); return its last value.
        """
        deadline = time.monotonic() + timeout
        value = await self.count(sql)
        while value != wanted() and time.monotonic() < deadline:
            await turn(delay=0.2)
            value = await self.count(sql)
        return value

    @async_test
    async def test_agent_heartbeats_through_kafka(self) -> None:
        """An agent's heartbeats reach the heartbeats and agents tables through Kafka, each once."""
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)
        try:
            await migrate(conn)
            _, plain = await PostgresKeys(conn).create("team")
        finally:
            conn.close()
        service = await self.start()
        fake = FakeAgent()
        await connect(service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="gpu-09", api_key=plain))
        await wait_for(lambda: bool(fake.messages))
        for cpu in (10.0, 20.0, 30.0):
            fake.send(Heartbeat(cpu=cpu, memory=50.0, disk=5.0))
        rows = await self.settle("SELECT count(*) FROM heartbeats WHERE agent_id = 'gpu-09'", lambda: 3)
        self.assertEqual(rows, 3)
        self.assertEqual(await self.conn.runQuery("SELECT max(cpu) FROM heartbeats"), [(30.0,)])
        self.assertEqual(await self.conn.runQuery("SELECT id FROM agents"), [("gpu-09",)])
        sink = service.stores.kafka
        self.assertEqual((sink.dropped, sink.lost, sink.in_flight), (0, 0, 0))

    @async_test
    async def test_events_that_cannot_be_written_are_passed(self) -> None:
        """
        Heartbeats that cannot be written (cpu 1e39, refused before
        PostgreSQL; 1e-50, refused by its real column) are dropped and
        counted, once each, and the events behind them written; the
        writer jammed on the first for good (its offset never committed,
        retried 10 times a second, across restarts too).
        """
        service = await self.start()
        sink = service.stores.kafka
        for i, cpu in enumerate((1e39, 1.0, 1e-50, 2.0)):
            sink.emit(HEARTBEATS, {"agent_id": "gpu-1", "at": 1_700_000_000 + i, "cpu": cpu})
            await wait_for(lambda: not sink.buffer)  # a record each
        sink.emit(REQUESTS, {"at": 1_700_000_000, "key": "team", "agent_id": "gpu-1", "duration": 0.01})
        rows = await self.settle("SELECT (SELECT count(*) FROM heartbeats) + (SELECT count(*) FROM request_events)",
                                 lambda: 3)
        self.assertEqual(rows, 3)
        self.assertEqual(await self.conn.runQuery("SELECT cpu FROM heartbeats ORDER BY cpu"), [(1.0,), (2.0,)])
        self.assertEqual(service.stores.events_rejected(), {"kafka": 2})
        from prometheus_client.exposition import generate_latest

        self.assertIn('rproxy_events_rejected_total{sink="kafka"} 2.0', generate_latest(service.registry).decode())

    @async_test
    async def test_broker_killed_and_restarted_under_traffic(self) -> None:
        """
        With the broker killed for 3 s under 400 events a second (while
        the group is writing) and
        restarted empty, every event is sent (later) or counted as dropped,
        what the broker lost is sent again, and PostgreSQL holds each
        acknowledged event exactly once (request stats counted once each).
        """
        service = await self.start()
        sink = service.stores.kafka
        emitted: list[str] = []

        def traffic() -> None:
            now = reactor.seconds()
            for i in range(20):
                if i % 5:
                    event = {"agent_id": f"gpu-{i % 3}", "at": now, "cpu": 1.0}
                    sink.emit(HEARTBEATS, event)
                else:
                    event = {"at": now, "key": "team", "agent_id": "gpu-1", "method": "POST", "target": "/v1/x",
                             "bytes_in": 10, "bytes_out": 20, "duration": 0.01}
                    sink.emit(REQUESTS, event)
                if "_id" in event:
                    emitted.append(event["_id"])

        loop = task.LoopingCall(traffic)
        loop.start(0.05)
        self.addCleanup(lambda: loop.running and loop.stop())
        # the group is writing (some events committed, the latest not yet) when the broker dies
        await wait_for(lambda: sink.confirmed > 0, timeout=30)
        confirmed = sink.confirmed
        self.kafka.stop()
        killed = reactor.seconds()
        await turn(delay=3.0)
        during = sink.sent
        self.kafka.start()
        await wait_for(lambda: sink.sent > during + 100, timeout=30)
        recovered = reactor.seconds() - killed
        await turn(delay=2.0)
        loop.stop()
        await wait_for(lambda: not sink.buffer and not sink.in_flight, timeout=70)
        expected = sink.sent - sink.lost
        rows = await self.settle("SELECT (SELECT count(*) FROM heartbeats) + (SELECT count(*) FROM request_events)",
                                 lambda: expected)
        requests = await self.count("SELECT count(*) FROM request_events")
        counted = await self.count("SELECT sum(requests) FROM stats")
        log.info("kafka restart: emitted {emitted}, sent {sent}, dropped {dropped}, resent {resent} ({confirmed} committed before the kill), lost {lost}, "
                 "rows {rows}, sending again {recovered:.1f}s after the kill", emitted=sink.emitted, sent=sink.sent,
                 dropped=sink.dropped, resent=sink.resent, confirmed=confirmed, lost=sink.lost, rows=rows,
                 recovered=recovered)
        self.assertEqual(sink.emitted, sink.sent + sink.dropped)
        self.assertEqual(sink.emitted, len(emitted))
        self.assertEqual(sink.dropped, 0)  # 3 s of events fit in the buffer: all sent later
        self.assertEqual(sink.lost, 0)
        # the broker came back empty: what it held uncommitted went again, what was committed did not
        self.assertGreater(sink.resent, 0)
        self.assertLessEqual(sink.resent + confirmed, sink.emitted)
        self.assertEqual(rows, expected)
        self.assertEqual(counted, requests)  # each request record added to the stats once
        stored = {row[0] for row in await self.conn.runQuery(
            "SELECT event_id FROM heartbeats UNION ALL SELECT event_id FROM request_events")}
        self.assertEqual(len(stored), rows)
        self.assertTrue(stored <= set(emitted))

    @async_test
    async def test_both_sinks_write_each_event_once(self) -> None:
        """With events to Redis Streams and Kafka both, each event reaches PostgreSQL through both, written once."""
        redis = started(RedisServer)
        self.addCleanup(redis.close)
        service = await self.start(redis={"url": redis.url}, events="both")
        ids = []
        for i in range(200):
            event = {"agent_id": "gpu-2", "at": 1_700_000_000 + i, "cpu": float(i)}
            service.stores.events.emit(HEARTBEATS, event)
            ids.append(event["_id"])
        await wait_for(lambda: service.stores.kafka.sent == 200 and service.stores.events.sinks[0].sent == 200,
                       timeout=30)
        # both consumers run; each has written every event (or found it written)
        await wait_for(lambda: service.stores.kafka.sent and service.stores._kafka_consumer.processed >= 200
                       and service.stores._consumer is not None and service.stores._consumer.processed >= 200,
                       timeout=60)
        rows = await self.conn.runQuery("SELECT event_id FROM heartbeats")
        self.assertEqual(sorted(r[0] for r in rows), sorted(ids))


class BrokerDownTests(ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_refused_connections_are_counted_not_logged(self) -> None:
        """
        With no broker at all, librdkafka's clients (producer, offsets
        reader, group member) repeat the refused connection at every
        backoff, 60-odd times a second: 4 s of it log one error line and
        the state change, at any level, and count the rest.
        """
        import socket

        from twisted.logger import globalLogPublisher

        pg: Any = started(PostgresServer)
        self.addCleanup(pg.close)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
        sock.close()
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service = await self.start_service({
            "stores": {"postgres": {"dsn": pg.dsn}, "kafka": {"bootstrap_servers": f"127.0.0.1:{closed}"}},
        })
        sink = service.stores.kafka
        await wait_for(lambda: service.stores.postgres_state == "up", timeout=30)
        sink.emit(HEARTBEATS, {"agent_id": "gpu-1", "at": reactor.seconds()})
        await turn(delay=4.0)
        lines = [e["log_format"] for e in logged if "kafka" in e.get("log_format", "")]
        self.assertEqual(sorted(lines), ["kafka: no broker reachable; {n} event(s) waiting",
                                         "kafka: {source}: {why} (the next errors are counted, logged at most "
                                         "once a minute)"])
        self.assertGreater(sink.errors.count, 10)
