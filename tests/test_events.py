"""
Events through Redis Streams into PostgreSQL, against the harness's servers:
at-least-once delivery, idempotent writes, re-delivery after a consumer
crash, and a bounded buffer while Redis is down.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.events import (
    HEARTBEATS,
    REQUESTS,
    EventConsumer,
    EventSink,
    Rejected,
    heartbeat_row,
    rejected,
    request_row,
    write_heartbeat,
)
from rproxy.store.postgres import connection, migrate
from tests.support import async_test, reactor, turn, wait_for
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
    async def test_heartbeats_postgres_refuses_are_dropped(self) -> None:
        """
        Heartbeats that cannot be written (cpu 1e39, refused before
        PostgreSQL; 1e-50, refused by its real column with SQLSTATE 22003)
        are dropped and counted, the others written, every entry
        acknowledged: nothing is left pending to be claimed again.  (The
        refused one stayed pending, retried every 30 s, forever.)
        """
        conn, redis = await self.setup()
        sink = EventSink(redis, reactor)
        self.addCleanup(sink.stop)
        for cpu in (1.0, 1e39, 2.0, 1e-50, 3.0):
            sink.emit(HEARTBEATS, beat("gpu-01", 1_700_000_000 + cpu % 10, cpu=cpu))
            await wait_for(lambda: not sink.buffer)  # one entry each
        await wait_for(lambda: sink.sent == 5)
        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", write_heartbeat(conn), reactor)
        self.assertEqual(await consumer.poll(), 3)
        self.assertEqual(consumer.rejected, 2)
        self.assertEqual(await conn.runQuery("SELECT cpu FROM heartbeats ORDER BY cpu"), [(1.0,), (2.0,), (3.0,)])
        self.assertEqual((await redis.execute_command("XPENDING", HEARTBEATS, "writers"))[0], 0)

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
    async def test_clean_stop_sends_the_buffer(self) -> None:
        """Events emitted just before a clean stop reach Redis: none is dropped."""
        conn, redis = await self.setup()
        await redis.execute_command("PING")
        sink = EventSink(redis, reactor)
        for i in range(5):
            sink.emit(HEARTBEATS, beat("gpu-05", 1_700_000_400 + i))
        await sink.stop()
        self.assertEqual((sink.sent, sink.dropped), (5, 0))
        entries = await redis.execute_command("XRANGE", HEARTBEATS, "-", "+")
        self.assertEqual(sum(len(json.loads(fields[1])) for _, fields in entries), 5)

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

    @async_test
    async def test_redis_restart_under_an_event_stream(self) -> None:
        """
        Redis stopped (it persists nothing) and started again while
        heartbeats stream in and a consumer writes them every second: every
        emitted event reaches PostgreSQL or is counted as dropped, and what
        Redis lost unread was sent again.
        """
        conn, redis = await self.setup()
        sink = EventSink(redis, reactor)
        self.addCleanup(sink.stop)
        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", write_heartbeat(conn), reactor)
        running = [True]

        async def consume() -> None:
            while running[0]:
                try:
                    await consumer.poll()
                except Exception:  # noqa: BLE001 - Redis down: the next poll tries again
                    pass
                await turn(delay=1.0)

        consuming = defer.Deferred.fromCoroutine(consume())
        emitted = 0

        async def emit_for(seconds: float) -> None:
            nonlocal emitted
            end = reactor.seconds() + seconds
            while reactor.seconds() < end:
                for _ in range(5):
                    sink.emit(HEARTBEATS, beat("gpu-05", 1_700_001_000 + emitted))
                    emitted += 1
                await turn(delay=0.01)

        await emit_for(2.5)
        self.redis.stop()  # type: ignore[attr-defined]
        await emit_for(0.5)
        self.redis.start()  # type: ignore[attr-defined]
        await emit_for(2.0)

        async def written() -> int:
            rows = await conn.runQuery("SELECT count(DISTINCT event_id) FROM heartbeats WHERE agent_id = 'gpu-05'")
            return int(rows[0][0])

        count = 0
        for _ in range(150):
            count = await written()
            if count + sink.dropped >= emitted:
                break
            await turn(delay=0.2)
        running[0] = False
        await consuming
        self.assertEqual((count + sink.dropped, sink.dropped), (emitted, 0))
        self.assertGreater(sink.resent, 0)


class FakeStreams:
    """
    The Redis commands the sink uses, answered at once; C{run_id} and the
    group's C{read} position are set by the test.
    """

    def __init__(self) -> None:
        self.run_id = "r1"
        self.read = "0-0"
        self.pending_from: str | None = None  # the first entry read and not acknowledged
        self.refuse_adds = False
        self.hold_adds = False  # XADDs answered when the test fires them (held)
        self.held: list[defer.Deferred[Any]] = []
        self.added: list[list[dict[str, Any]]] = []

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        if args[0] == "XADD" and self.refuse_adds:
            return defer.fail(ConnectionError("Lost connection"))
        if args[0] == "XADD":
            self.added.append(json.loads(args[-1]))
            if self.hold_adds:
                self.held.append(defer.Deferred())
                return self.held[-1]
            return defer.succeed(f"5-{len(self.added) - 1}")
        if args[0] == "INFO":
            return defer.succeed(f"# Server\r\nredis_version:7.0\r\nrun_id:{self.run_id}\r\n")
        if args[:2] == ("XINFO", "GROUPS"):
            pending = 0 if self.pending_from is None else 1
            return defer.succeed([["name", "writers", "pending", pending, "last-delivered-id", self.read]])
        if args == ("XPENDING", HEARTBEATS, "writers"):
            return defer.succeed([1, self.pending_from, self.read, [["c1", "1"]]])
        raise AssertionError(f"unexpected command {args}")


class SinkDeliveryTests(SynchronousTestCase):
    def sink(self, **kwargs: Any) -> tuple[EventSink, FakeStreams, Clock]:
        clock, redis = Clock(), FakeStreams()
        sink = EventSink(redis, clock, **kwargs)
        self.addCleanup(sink.stop)
        for i in range(250):
            sink.emit(HEARTBEATS, beat("a", i))
        clock.advance(0.01)  # one flush: entries of 100, 100 and 50 events
        self.assertEqual([len(e) for e in redis.added], [100, 100, 50])
        return sink, redis, clock

    def sending(self) -> tuple[EventSink, FakeStreams, Clock]:
        """
        L{sink}, then an XADD of one event held unanswered, with three
        more events buffered behind it.
        """
        sink, redis, clock = self.sink()
        redis.hold_adds = True
        sink.emit(HEARTBEATS, beat("a", 1000))
        clock.advance(0.01)
        for i in range(1, 4):
            sink.emit(HEARTBEATS, beat("a", 1000 + i))
        return sink, redis, clock

    def test_restart_sends_unread_entries_again(self) -> None:
        """
        After the group read the first entry, a Redis with a new run_id gets
        the other two entries' events again, with their own ids.
        """
        sink, redis, clock = self.sink()
        redis.read = "5-0"
        clock.advance(1.0)
        self.assertEqual(len(sink.unconfirmed), 2)
        redis.run_id = "r2"
        redis.added.clear()
        clock.advance(1.0)
        clock.advance(0)
        again = [e["at"] for entry in redis.added for e in entry]
        self.assertEqual(again, list(range(100, 250)))
        self.assertEqual((sink.resent, sink.dropped, sink.sent), (150, 0, 400))

    def test_restart_during_the_check(self) -> None:
        """
        Redis restarts between the check's run_id and its read of the
        groups (a command waits for the reconnection, then asks the new
        Redis, whose group has read what was sent to it since): the kept
        entries are not forgotten on the new Redis's word but sent again.
        (They were forgotten, and those the old Redis lost unread were lost
        without a count: the Redis restart test caught it once.)
        """
        sink, redis, clock = self.sink()
        original = redis.execute_command

        def restarting(*args: Any) -> defer.Deferred[Any]:
            if args[:2] == ("XINFO", "GROUPS"):
                redis.run_id, redis.read = "r2", "9-0"
            return original(*args)

        redis.execute_command = restarting  # type: ignore[method-assign]
        redis.added.clear()
        clock.advance(1.0)
        clock.advance(0)
        self.assertEqual([e["at"] for entry in redis.added for e in entry], list(range(250)))
        self.assertEqual((sink.resent, sink.dropped), (250, 0))

    def test_restart_seen_while_a_send_is_under_way(self) -> None:
        """
        The delivery check sees a restarted Redis while an XADD is under
        way: the lost entries' events go in front of the buffer, and when
        the XADD is answered, its own events are the ones taken as sent,
        not as many of those in front (they were, and never sent: the Redis
        restart test lost 5 events, one emit's, without a count).
        """
        sink, redis, clock = self.sink()
        redis.hold_adds = True
        for i in range(5):
            sink.emit(HEARTBEATS, beat("a", 1000 + i))
        clock.advance(0.01)
        self.assertEqual(len(redis.held), 1)
        redis.run_id = "r2"
        clock.advance(0.99)  # the next check, before the XADD's timeout
        self.assertEqual(sink.resent, 250)
        redis.hold_adds = False
        redis.added.clear()
        redis.held[0].callback(["6-0"])
        clock.advance(0)
        self.assertEqual([e["at"] for entry in redis.added for e in entry], list(range(250)))
        self.assertEqual((len(sink.buffer), sink.dropped, sink.sent), (0, 0, 250 + 5 + 250))

    def test_read_but_unacknowledged_entries_are_kept(self) -> None:
        """
        Entries the group read but did not acknowledge are kept (their
        consumer may fail before writing them), and a restarted Redis gets
        them again; once acknowledged they are forgotten.
        """
        sink, redis, clock = self.sink()
        redis.read, redis.pending_from = "5-2", "5-1"
        clock.advance(1.0)
        self.assertEqual([key for _, key, _ in sink.unconfirmed], [(5, 1), (5, 2)])
        redis.run_id = "r2"
        redis.added.clear()
        clock.advance(1.0)
        clock.advance(0)
        self.assertEqual([e["at"] for entry in redis.added for e in entry], list(range(100, 250)))
        redis.read, redis.pending_from = "5-9", None
        clock.advance(1.0)
        self.assertEqual(list(sink.unconfirmed), [])

    def test_restart_overflow_is_counted(self) -> None:
        """What a restarted Redis lost beyond the buffer's room is counted as dropped; the newest are sent."""
        sink, redis, clock = self.sink(buffer_limit=260)
        clock.advance(1.0)  # run_id r1 seen, nothing read
        redis.refuse_adds = True
        for i in range(200):
            sink.emit(HEARTBEATS, beat("a", 1000 + i))
        clock.advance(0.01)
        self.assertEqual(len(sink.buffer), 200)
        redis.run_id = "r2"
        clock.advance(1.0)
        self.assertEqual((sink.resent, sink.dropped, len(sink.buffer)), (60, 190, 260))
        self.assertEqual([e["at"] for _, e in list(sink.buffer)[:60]], list(range(190, 250)))

    def test_kept_entries_are_bounded(self) -> None:
        """Entries no group reads are kept up to keep_limit events, the oldest forgotten first."""
        sink, redis, clock = self.sink(keep_limit=120)
        self.assertEqual([batch[0]["at"] for _, _, batch in sink.unconfirmed], [200])

    def test_timed_out_check_goes_no_further(self) -> None:
        """
        A delivery check whose XINFO outlives the check's timeout stops
        there: it asks Redis nothing more (it took the cancelling for "no
        such stream" and went on to the next stream).
        """
        sink, redis, clock = self.sink()
        sink.emit(REQUESTS, {"at": 1})
        clock.advance(0.01)  # kept entries in two streams
        asked: list[str] = []
        original = redis.execute_command

        def hanging(*args: Any) -> defer.Deferred[Any]:
            asked.append(args[0])
            return defer.Deferred() if args[0] == "XINFO" else original(*args)

        redis.execute_command = hanging  # type: ignore[method-assign]
        clock.advance(1.0)  # the next check: INFO, then the first XINFO hangs
        self.assertEqual(asked, ["INFO", "XINFO"])
        clock.advance(1.0)  # its timeout
        self.assertEqual(asked, ["INFO", "XINFO"])

    def test_stop_sends_what_is_buffered(self) -> None:
        """
        Events buffered when the sink stops (waiting for the next flush)
        are sent, not dropped: a clean stop with Redis up loses nothing.
        """
        sink, redis, clock = self.sink()
        for i in range(7):
            sink.emit(HEARTBEATS, beat("a", 1000 + i))
        self.successResultOf(sink.stop())
        self.assertEqual([e["at"] for e in redis.added[-1]], list(range(1000, 1007)))
        self.assertEqual((sink.sent, sink.dropped, len(sink.buffer), clock.getDelayedCalls()), (257, 0, 0, []))

    def test_stop_waits_for_the_send_under_way(self) -> None:
        """
        Stopped while an XADD is under way, with more events behind it:
        the stop waits for that send, then the rest go too.
        """
        sink, redis, clock = self.sending()
        stopped = sink.stop(grace=1.0)
        self.assertNoResult(stopped)
        redis.held[0].callback(["6-0"])
        self.assertNoResult(stopped)
        redis.held[1].callback(["6-1"])
        self.successResultOf(stopped)
        self.assertEqual((sink.sent, sink.dropped, clock.getDelayedCalls()), (254, 0, []))

    def test_stop_gives_up_after_the_grace(self) -> None:
        """
        A Redis that does not answer within the grace: the buffer is
        dropped then, the events of the send under way when it fails.
        """
        sink, redis, clock = self.sending()
        stopped = sink.stop(grace=0.5)
        clock.advance(0.5)
        self.successResultOf(stopped)
        self.assertEqual((sink.dropped, len(sink.buffer)), (3, 0))
        clock.advance(0.5)  # the XADD's own timeout
        self.assertEqual((sink.sent, sink.dropped, clock.getDelayedCalls()), (250, 4, []))

    def test_stop_with_redis_down_drops_at_once(self) -> None:
        """When the last send failed (Redis down), stopping drops the buffer at once."""
        sink, redis, clock = self.sink()
        redis.refuse_adds = True
        for i in range(7):
            sink.emit(HEARTBEATS, beat("a", 1000 + i))
        clock.advance(0.01)
        self.assertEqual(len(sink.buffer), 7)
        self.successResultOf(sink.stop())
        self.assertEqual((sink.dropped, len(sink.buffer), clock.getDelayedCalls()), (7, 0, []))

    def test_client_that_raises(self) -> None:
        """A client that raises instead of answering keeps the events buffered, as a failed send does."""
        clock = Clock()
        sink = EventSink(None, clock)
        sink.emit(HEARTBEATS, beat("a", 1000))
        clock.advance(0.01)
        self.assertEqual((len(sink.buffer), sink._in_flight, sink.dropped), (1, 0, 0))
        self.successResultOf(sink.stop())
        self.assertEqual((len(sink.buffer), sink.dropped, clock.getDelayedCalls()), (0, 1, []))


class DataError(Exception):
    """
    What psycopg2 raises for a value PostgreSQL refuses (SQLSTATE 22003).
    """

    pgcode = "22003"


class OneRead:
    """
    The Redis commands a consumer uses: one read of C{entries}, then
    nothing; the XACKs are recorded.
    """

    def __init__(self, entries: list[tuple[str, list[Any]]]) -> None:
        self.entries = entries
        self.acks: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        if args[0] == "XGROUP":
            return defer.succeed("OK")
        if args[0] == "XAUTOCLAIM":
            return defer.succeed(["0-0", []])
        if args[0] == "XREADGROUP":
            entries, self.entries = self.entries, []
            return defer.succeed([[HEARTBEATS, entries]] if entries else None)
        if args[0] == "XACK":
            self.acks.append(args[3:])
            return defer.succeed(len(args) - 3)
        raise AssertionError(args)


class RowTests(SynchronousTestCase):
    """
    An event's row is checked to fit its table before it is written.
    """

    def test_heartbeats_that_cannot_be_written(self) -> None:
        """
        Values the heartbeats table refuses (or would take as infinity)
        are L{Rejected}, naming the field; a good one passes.
        """
        good = {**beat("a", 1_700_000_000.5), "_id": "e1"}
        self.assertEqual(heartbeat_row("x", good), ("a", 1_700_000_000.5, 1.0, 2.0, 3.0, 0.5, 1, "e1"))
        for change, why in (({"cpu": 1e39}, "cpu: 1e+39 is out of range"),
                            ({"agent_id": 5}, "agent_id: expected a string"),
                            ({"at": "x"}, "at: expected a number, not str"),
                            ({"at": float("inf")}, "at: inf is out of range"),
                            ({"at": -1}, "at: -1 is out of range"),
                            ({"load": float("nan")}, "load: nan is out of range"),
                            ({"active_streams": 2**31}, "active_streams: 2147483648 is out of range"),
                            ({"memory": True}, "memory: expected a number, not bool")):
            error = self.assertRaises(Rejected, heartbeat_row, "x", {**good, **change})
            self.assertEqual(str(error), why)
        self.assertRaises(Rejected, heartbeat_row, "x", {"cpu": 1.0})  # no agent, no time

    def test_requests_that_cannot_be_written(self) -> None:
        good = {"at": 1_700_000_000, "key": "team", "agent_id": "a", "tunnel": "t", "method": "POST",
                "target": "/v1/x", "bytes_in": 10, "bytes_out": 20, "duration": 0.25, "model": "m", "_id": "e2"}
        self.assertEqual(request_row("x", good),
                         ("e2", 1_700_000_000.0, "t", "team", "a", "m", "POST", "/v1/x", 10, 20, 0.25))
        for change, why in (({"bytes_in": 2**63}, "bytes_in: 9223372036854775808 is out of range"),
                            ({"bytes_out": 1.5}, "bytes_out: expected a whole number"),
                            ({"duration": 1e39}, "duration: 1e+39 is out of range"),
                            ({"model": ["m"]}, "model: expected a string"),
                            ({"key": None}, "key: expected a string"),
                            ({"at": 1e300}, "at: 1e+300 is out of range")):
            error = self.assertRaises(Rejected, request_row, "x", {**good, **change})
            self.assertEqual(str(error), why)

    def test_what_is_the_events_fault(self) -> None:
        """
        A malformed event and PostgreSQL's data (22) and integrity (23)
        errors are the event's fault; an outage is not.
        """
        class Lost(Exception):
            pgcode = "08006"

        self.assertEqual([rejected(e) for e in (Rejected("x"), KeyError("at"), DataError(), ConnectionError(),
                                                Lost(), defer.CancelledError())],
                         [True, True, True, False, False, False])


class ConsumerRejectTests(SynchronousTestCase):
    """
    The Redis Streams consumer drops an event that can never be written,
    and keeps retrying one that failed for an outage.
    """

    def test_refused_event_is_acknowledged_once(self) -> None:
        """
        An event PostgreSQL refuses for its data is logged, counted and
        acknowledged with its entry; the others are written.  (It was
        left pending: claimed again every 30 s, forever.)
        """
        entries = [("7-0", ["data", json.dumps([{"n": 0}, {"n": 1}])]), ("7-1", ["data", json.dumps({"n": 2})]),
                   ("7-2", ["data", "{not json"])]
        redis = OneRead(entries)
        written: list[int] = []

        async def handle(entry_id: str, event: dict[str, Any]) -> None:
            if event["n"] == 1:
                raise DataError('"1e+39" is out of range for type real')
            written.append(event["n"])

        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", handle, Clock())
        logged = capture_warnings(self)
        self.assertEqual(self.successResultOf(defer.Deferred.fromCoroutine(consumer.poll())), 2)
        self.assertEqual((written, redis.acks, consumer.rejected), ([0, 2], [("7-0", "7-1", "7-2")], 2))
        self.assertEqual(len(logged), 2)

    def test_outage_leaves_the_rest_pending(self) -> None:
        """
        A write failing for an outage stops the read: the entries written
        before it are acknowledged, it and the rest are not (claimed
        again later).
        """
        entries = [(f"7-{i}", ["data", json.dumps({"n": i})]) for i in range(3)]
        redis = OneRead(entries)

        async def handle(entry_id: str, event: dict[str, Any]) -> None:
            if event["n"] == 1:
                raise ConnectionError("PostgreSQL went away")

        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", handle, Clock())
        self.failureResultOf(defer.Deferred.fromCoroutine(consumer.poll()), ConnectionError)
        self.assertEqual((redis.acks, consumer.rejected, consumer.processed), ([("7-0",)], 0, 1))


def capture_warnings(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """
    The warnings logged while C{case} runs.
    """
    from twisted.logger import LogLevel, globalLogPublisher

    logged: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return logged


class FailingAcks:
    """
    The Redis commands a consumer uses: one read of three entries, and an
    XACK that fails (Redis went away) and records what it was asked.
    """

    def __init__(self) -> None:
        self.acks: list[tuple[Any, ...]] = []
        self.entries = [
            (f"7-{i}", ["data", json.dumps([{"n": 2 * i}, {"n": 2 * i + 1}])]) for i in range(3)
        ]

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        if args[0] == "XGROUP":
            return defer.succeed("OK")
        if args[0] == "XAUTOCLAIM":
            return defer.succeed(["0-0", []])
        if args[0] == "XREADGROUP":
            return defer.succeed([[HEARTBEATS, self.entries]])
        if args[0] == "XACK":
            self.acks.append(args[3:])
            return defer.fail(ConnectionError("Lost connection"))
        raise AssertionError(args)


class ConsumerAckTests(SynchronousTestCase):
    """
    A consumer writes every event it read before acknowledging them.
    """

    def test_failed_ack_loses_no_event(self) -> None:
        """
        With XACK failing, every event of the read is still written (the
        group has them delivered: a restarted Redis would not give them
        again), and one XACK names every entry.
        """
        written: list[tuple[str, Any]] = []

        async def handle(entry_id: str, event: dict[str, Any]) -> None:
            written.append((entry_id, event["n"]))

        redis = FailingAcks()
        consumer = EventConsumer(redis, HEARTBEATS, "writers", "c1", handle, Clock())
        self.failureResultOf(defer.Deferred.fromCoroutine(consumer.poll()), ConnectionError)
        self.assertEqual(written, [(f"7-{i}#{j}", 2 * i + j) for i in range(3) for j in range(2)])
        self.assertEqual(redis.acks, [("7-0", "7-1", "7-2")])
