"""
Events through Redis Streams into PostgreSQL, against the harness's servers:
at-least-once delivery, idempotent writes, re-delivery after a consumer
crash, and a bounded buffer while Redis is down.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from rproxy.events import HEARTBEATS, EventConsumer, EventSink, write_heartbeat
from rproxy.store.postgres import connection, migrate
from tests.support import async_test, reactor, wait_for
from tests.test_servers import BothServers


def beat(agent: str, at: float, cpu: float = 1.0) -> dict[str, Any]:
    return {"agent_id": agent, "at": at, "cpu": cpu, "memory": 2.0, "disk": 3.0, "load": 0.5, "active_streams": 1}


class EventTests(BothServers, TestCase):
    timeout = 120

    async def setup(self) -> tuple[Any, Any]:
        import txredisapi

        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(conn.close)
        await migrate(conn)
        redis = txredisapi.lazyConnection("127.0.0.1", self.redis.port, reconnect=True)  # type: ignore[attr-defined]
        self.addCleanup(redis.disconnect)
        return conn, redis

    @async_test
    async def test_heartbeats_reach_postgres(self) -> None:
        """Heartbeats emitted into the stream are written once each, with the agent's last_seen."""
        conn, redis = await self.setup()
        sink = EventSink(redis, reactor)
        self.addCleanup(sink.stop)
        for i in range(25):
            sink.emit(HEARTBEATS, beat("gpu-01", 1_700_000_000 + i, cpu=i))
        await wait_for(lambda: sink.sent == 25)
        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", write_heartbeat(conn), reactor)
        self.assertEqual(await consumer.poll(), 25)
        self.assertEqual(await consumer.poll(), 0)
        rows = await conn.runQuery("SELECT count(*), max(cpu) FROM heartbeats WHERE agent_id = 'gpu-01'")
        self.assertEqual(rows, [(25, 24.0)])
        seen = await conn.runQuery("SELECT extract(epoch FROM last_seen)::bigint FROM agents WHERE id = 'gpu-01'")
        self.assertEqual(seen, [(1_700_000_024,)])

    @async_test
    async def test_crashed_consumer_is_redelivered_once(self) -> None:
        """
        Entries read by a consumer that crashed before acknowledging are
        claimed by another; a duplicate write changes nothing.
        """
        conn, redis = await self.setup()
        sink = EventSink(redis, reactor)
        self.addCleanup(sink.stop)
        for i in range(5):
            sink.emit(HEARTBEATS, beat("gpu-02", 1_700_000_100 + i))
        await wait_for(lambda: sink.sent == 5)
        written: list[str] = []
        real = write_heartbeat(conn)

        async def crash_after_write(entry_id: str, event: dict[str, Any]) -> None:
            await real(entry_id, event)
            written.append(entry_id)
            if len(written) == 3:
                raise RuntimeError("consumer crashed before its ack")

        crashing = EventConsumer(redis, HEARTBEATS, "writers", "crashing", crash_after_write, reactor)
        with self.assertRaises(RuntimeError):
            await crashing.poll()
        survivor = EventConsumer(redis, HEARTBEATS, "writers", "survivor", real, reactor, claim_idle=0.0)
        handled = await survivor.poll()
        # the unacknowledged entry again (its events written before the crash
        # are written again, changing nothing) and any after it
        self.assertGreaterEqual(handled, 3)
        self.assertLessEqual(handled, 5)
        rows = await conn.runQuery("SELECT count(*) FROM heartbeats WHERE agent_id = 'gpu-02'")
        self.assertEqual(rows, [(5,)])
        pending = await redis.execute_command("XPENDING", HEARTBEATS, "writers")
        self.assertEqual(pending[0], 0)

    @async_test
    async def test_redis_down_buffers_then_drops(self) -> None:
        """While Redis is down events wait in a bounded buffer, the excess counted as dropped."""
        conn, redis = await self.setup()
        await redis.execute_command("PING")
        self.redis.stop()  # type: ignore[attr-defined]
        sink = EventSink(redis, reactor, buffer_limit=10)
        self.addCleanup(sink.stop)
        for i in range(15):
            sink.emit(HEARTBEATS, beat("gpu-03", 1_700_000_200 + i))
        self.assertEqual((len(sink.buffer), sink.dropped), (10, 5))
        self.redis.start()  # type: ignore[attr-defined]
        await wait_for(lambda: sink.sent == 10, timeout=30)
        entries = await redis.execute_command("XRANGE", HEARTBEATS, "-", "+")
        events = [e for _, fields in entries for e in json.loads(dict(zip(fields[::2], fields[1::2], strict=True))["data"])]
        self.assertEqual(sorted(e["at"] for e in events), [1_700_000_200 + i for i in range(10)])
        self.assertLess(len(entries), 10)  # batched: fewer entries than events

    @async_test
    async def test_stop_ends_retries(self) -> None:
        """
        A sink stopped while a send to a dead Redis is in flight schedules
        no retry when that send fails (it would outlive the service).
        """
        conn, redis = await self.setup()
        await redis.execute_command("PING")
        self.redis.stop()  # type: ignore[attr-defined]
        self.addCleanup(self.redis.start)  # type: ignore[attr-defined]
        sink = EventSink(redis, reactor)
        self.addCleanup(sink.stop)
        sink.emit(HEARTBEATS, beat("gpu-04", 1_700_000_300))
        await wait_for(lambda: sink._flushing, timeout=5)
        sink.stop()
        await wait_for(lambda: not sink._flushing, timeout=10)
        self.assertIsNone(sink._timer)
        sink.emit(HEARTBEATS, beat("gpu-04", 1_700_000_301))
        self.assertIsNone(sink._timer)
