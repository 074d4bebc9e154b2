"""
The stores' connection life cycles with a clock and recording fakes: one
PostgreSQL reconnect loop whatever fails, each set closed before the next
opens; a Redis known to be down skipped by key checks, and its return
noticed by the probe within two seconds.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.store.auth import KeyChain
from rproxy.store.links import PostgresLink, RedisProbe, backoff
from rproxy.store.postgres import KeyRecord


class FakeConnection:
    """
    A txpostgres connection as the link sees it: C{connect} answers when
    the test says; C{close} reports the connection lost, as txpostgres'
    does.
    """

    def __init__(self, number: int, on_lost: Any, events: list[tuple[str, int]]) -> None:
        self.number = number
        self.on_lost = on_lost
        self.events = events
        self.connecting: defer.Deferred[Any] | None = None
        self.closed = 0

    def connect(self, dsn: str) -> defer.Deferred[Any]:
        self.events.append(("connect", self.number))
        self.connecting = defer.Deferred()
        return self.connecting

    def close(self) -> None:
        self.events.append(("close", self.number))
        self.closed = 1
        self.on_lost(self)

    def refused(self) -> None:
        """The server is gone: lost first, then the connect fails (txpostgres' order)."""
        self.on_lost(self)
        assert self.connecting is not None
        self.connecting.errback(ConnectionRefusedError("refused"))


class LinkHarness:
    def __init__(self, size: int = 4, prepare: Any = None) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, int]] = []
        self.made: list[FakeConnection] = []
        self.ups: list[Any] = []
        self.downs = 0
        self.prepared: list[defer.Deferred[None]] = []
        self.link = PostgresLink(self.clock, self.new, "dsn", size, prepare or self.prepare, self.ups.append,
                                 self.down, rng=random.Random(7))

    def new(self, on_lost: Any) -> FakeConnection:
        conn = FakeConnection(len(self.made), on_lost, self.events)
        self.made.append(conn)
        return conn

    def prepare(self, conns: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.prepared.append(d)
        return d

    def down(self) -> None:
        self.downs += 1

    def current(self) -> list[FakeConnection]:
        return self.made[-4:]

    def open_connections(self) -> int:
        connected = {n for kind, n in self.events if kind == "connect"}
        closed = {n for kind, n in self.events if kind == "close"}
        return len(connected - closed)

    def answer_all(self) -> None:
        for conn in self.current():
            assert conn.connecting is not None
            conn.connecting.callback(conn)


class PostgresLinkTests(SynchronousTestCase):
    def test_refused_attempts_make_one_loop(self) -> None:
        """
        While PostgreSQL refuses, each failed attempt (its connections both
        lost and failed) schedules exactly one next attempt, and closes its
        connections before the next attempt opens any.
        """
        h = LinkHarness()
        h.link.start()
        for attempt in range(12):
            self.assertEqual(h.link.state, "connecting")
            for conn in h.current():
                conn.refused()
            self.assertEqual(h.link.state, "waiting")
            self.assertEqual(h.open_connections(), 0)
            pending = [c for c in h.clock.getDelayedCalls() if c.active()]
            self.assertEqual(len(pending), 1, f"attempt {attempt}: {len(pending)} timers")
            h.clock.advance(pending[0].getTime() - h.clock.seconds())
        self.assertEqual(h.link.attempts, 13)
        self.assertEqual(len(h.made), 13 * 4)
        # per attempt: four connects, then four closes, never interleaved with the next
        for attempt in range(12):
            block = h.events[attempt * 8:attempt * 8 + 8]
            self.assertEqual([kind for kind, _ in block], ["connect"] * 4 + ["close"] * 4)

    def test_lost_while_up_replaces_the_set(self) -> None:
        """
        One connection lost while up closes the whole set once (the closes'
        own lost reports change nothing), calls on_down once, and the next
        set is opened only after the backoff.
        """
        h = LinkHarness()
        h.link.start()
        h.answer_all()
        h.prepared[0].callback(None)
        self.assertEqual((h.link.state, len(h.ups), h.open_connections()), ("up", 1, 4))
        first = h.current()
        h.events.clear()
        first[2].on_lost(first[2])
        self.assertEqual(h.events, [("close", n) for n in (0, 1, 2, 3)])
        self.assertEqual((h.link.state, h.downs, h.open_connections()), ("waiting", 1, 0))
        self.assertEqual(len([c for c in h.clock.getDelayedCalls() if c.active()]), 1)
        h.clock.advance(backoff(1, random.Random(0), cap=10.0) * 2)
        self.assertEqual(h.events[4:], [("connect", n) for n in (4, 5, 6, 7)])
        h.answer_all()
        h.prepared[1].callback(None)
        self.assertEqual((h.link.state, len(h.ups), h.link.failures), ("up", 2, 0))

    def test_lost_during_prepare_fails_the_attempt(self) -> None:
        """A connection lost while the set is being prepared fails that attempt instead of going up with it."""
        h = LinkHarness()
        h.link.start()
        h.answer_all()
        h.current()[3].on_lost(h.current()[3])
        self.assertEqual(h.link.state, "connecting")
        h.prepared[0].callback(None)
        self.assertEqual((h.link.state, h.ups, h.open_connections()), ("waiting", [], 0))

    def test_attempt_timeout(self) -> None:
        """An attempt that never answers is given up after attempt_timeout, its connections closed."""
        h = LinkHarness()
        h.link.start()
        h.clock.advance(15.0)
        self.assertEqual((h.link.state, h.open_connections()), ("waiting", 0))
        # a late answer of the abandoned attempt changes nothing
        h.answer_all()
        self.assertEqual((h.link.state, h.prepared), ("waiting", []))

    def test_stop_closes_and_ends_the_loop(self) -> None:
        """stop() while connecting closes the set; nothing is left scheduled and a late answer is ignored."""
        h = LinkHarness()
        h.link.start()
        h.link.stop()
        self.assertEqual((h.open_connections(), h.clock.getDelayedCalls()), (0, []))
        h.answer_all()
        self.assertEqual((h.link.state, h.ups), ("stopped", []))

    def test_backoff_is_capped_and_jittered(self) -> None:
        """Delays grow from half a second, stay within [ceiling/2, ceiling] and never pass the cap."""
        rng = random.Random(3)
        delays = [backoff(n, rng, base=0.5, cap=10.0) for n in range(1, 40)]
        for n, delay in enumerate(delays, 1):
            ceiling = min(10.0, 0.5 * 2 ** (n - 1))
            self.assertTrue(ceiling / 2 <= delay <= ceiling, (n, delay))
        self.assertGreater(len(set(delays[10:])), 1)


class FakeRedis:
    """Redis commands whose answers the test gives; records what was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, defer.Deferred[Any]]] = []
        self.broken = False

    def _ask(self, name: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.asked.append((name, d))
        return d

    def ping(self) -> defer.Deferred[Any]:
        if self.broken:
            self.asked.append(("ping", defer.Deferred()))
            raise RuntimeError("not connected")
        return self._ask("ping")

    def get(self, key: str) -> defer.Deferred[Any]:
        return self._ask("get")

    def set(self, key: str, value: str, expire: int) -> defer.Deferred[Any]:
        return self._ask("set")


class FakePostgresKeys:
    async def check(self, key: str) -> KeyRecord | None:
        return KeyRecord(id=1, name="team", level=0) if key == "good" else None


class NoStaticKeys:
    def check(self, key: str) -> None:
        return None


class RedisProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis()
        self.probe = RedisProbe(self.redis, self.clock)
        keys: Any = FakePostgresKeys()
        self.chain = KeyChain(NoStaticKeys(), keys, self.redis, clock=self.clock)
        self.chain.redis_probe = self.probe

    def test_known_down_is_skipped(self) -> None:
        """
        The check in flight when Redis goes away waits for its timeout;
        the checks after it do not wait at all and ask Redis nothing.
        """
        first = defer.Deferred.fromCoroutine(self.chain.check("good"))
        self.assertNoResult(first)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(first).name, "team")
        self.assertEqual(self.probe.state, "down")
        asked = len(self.redis.asked)
        for _ in range(3):
            self.assertEqual(self.successResultOf(defer.Deferred.fromCoroutine(self.chain.check("good"))).name, "team")
        self.assertEqual(len(self.redis.asked), asked)
        self.assertEqual(self.chain.redis_errors, 4)

    def test_return_noticed_within_two_seconds(self) -> None:
        """While down the probe pings every half second; the first answer makes Redis usable again."""
        self.probe.start()
        self.addCleanup(self.probe.stop)
        self.assertEqual([name for name, _ in self.redis.asked], ["ping"])
        self.clock.advance(1.0)  # the ping times out
        self.assertEqual(self.probe.state, "down")
        self.assertFalse(self.probe.usable())
        back = self.clock.seconds()
        for _ in range(4):  # Redis answers the next ping, whenever it comes
            self.clock.advance(0.5)
            name, d = self.redis.asked[-1]
            if not d.called:
                d.callback("PONG")
                break
        self.assertEqual(self.probe.state, "up")
        self.assertLessEqual(self.clock.seconds() - back, 2.0)
        self.assertTrue(self.probe.usable())
        # up: a ping every two seconds, no more
        before = self.probe.pings
        self.clock.pump([0.5] * 8)
        for _, d in self.redis.asked:
            if not d.called:
                d.callback("PONG")
        self.assertLessEqual(self.probe.pings - before, 2)

    def test_down_logged_in_words(self) -> None:
        """
        A ping that times out is logged as no answer within the timeout,
        the keys' fallback named (PostgreSQL, or the static keys without
        it), and the events' wait said only when events go to Redis.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        lines = []
        for postgres, events in ((True, True), (False, True), (True, False)):
            probe = RedisProbe(self.redis, self.clock, postgres=postgres, events=events)
            probe.start()
            self.clock.advance(1.0)  # the ping times out
            probe.stop()
            lines += [formatEvent(e) for e in logged if "Redis unavailable" in e.get("log_format", "")]
            del logged[:]
        self.assertEqual(lines, [
            "stores: Redis unavailable (no answer within 1s); key checks go to PostgreSQL, events wait",
            "stores: Redis unavailable (no answer within 1s); key checks go to the static keys, events wait",
            "stores: Redis unavailable (no answer within 1s); key checks go to PostgreSQL"])  # (no events to Redis)

    def test_probe_survives_a_ping_that_raises(self) -> None:
        """A client that raises instead of answering marks Redis down and the loop keeps probing."""
        self.redis.broken = True
        self.probe.start()
        self.addCleanup(self.probe.stop)
        self.clock.pump([0.5] * 4)
        self.assertEqual((self.probe.state, len(self.redis.asked)), ("down", 5))


class PendingPostgresKeys:
    """PostgreSQL lookups that answer when the test says."""

    def __init__(self) -> None:
        self.asked: list[defer.Deferred[Any]] = []

    async def check(self, key: str) -> KeyRecord | None:
        d: defer.Deferred[KeyRecord | None] = defer.Deferred()
        self.asked.append(d)
        return await d


class CancelledCheckTests(SynchronousTestCase):
    """
    A key check cancelled because its client went away (a reset while
    the check waited) is not a store failure.
    """

    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        self.clock = Clock()
        self.redis = FakeRedis()
        self.probe = RedisProbe(self.redis, self.clock)
        self.postgres = PendingPostgresKeys()
        keys: Any = self.postgres
        self.chain = KeyChain(NoStaticKeys(), keys, self.redis, clock=self.clock)
        self.chain.redis_probe = self.probe
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def assert_no_outage(self, check: defer.Deferred[Any]) -> None:
        self.failureResultOf(check, defer.CancelledError)
        self.assertTrue(self.probe.usable())
        self.assertEqual((self.chain.redis_errors, self.chain.postgres_errors), (0, 0))
        self.assertEqual([e["log_format"] for e in self.logged if "auth" in e.get("log_format", "")], [])
        self.clock.advance(5.0)  # no timeout fires later for the cancelled check
        self.assertEqual((self.chain.redis_errors, self.chain.postgres_errors), (0, 0))

    def test_cancelled_redis_read(self) -> None:
        """Cancelled while Redis is read: Redis stays usable, PostgreSQL is not asked, nothing counted or logged."""
        check = self.chain.lookup("good")
        self.assertEqual([name for name, _ in self.redis.asked], ["get"])
        check.cancel()
        self.assert_no_outage(check)
        self.assertEqual(self.postgres.asked, [])

    def test_cancelled_postgres_check(self) -> None:
        """Cancelled while PostgreSQL is asked (Redis missed): nothing counted or logged, nothing cached."""
        check = self.chain.lookup("good")
        self.redis.asked[0][1].callback(None)  # not cached
        self.assertEqual(len(self.postgres.asked), 1)
        check.cancel()
        self.assert_no_outage(check)
        self.assertEqual([name for name, _ in self.redis.asked], ["get"])

    def test_timeout_is_still_an_outage(self) -> None:
        """A Redis read that times out (the chain's own cancelling) still marks Redis down."""
        check = self.chain.lookup("good")
        self.clock.advance(1.0)
        self.assertFalse(self.probe.usable())
        self.assertEqual(self.chain.redis_errors, 1)
        self.postgres.asked[0].callback(None)
        self.assertIsNone(self.successResultOf(check))
        from twisted.logger import formatEvent

        self.assertEqual([formatEvent(e) for e in self.logged if "Redis unavailable" in e.get("log_format", "")], [
            "stores: Redis unavailable (a key check: no answer within 1s); key checks go to PostgreSQL, events wait",
            "auth: Redis unavailable (no answer within 1s); asking PostgreSQL",
        ])  # (in words, not TimeoutError's raw arguments)


class PeriodicJobTests(SynchronousTestCase):
    def test_failures_are_logged_and_the_job_goes_on(self) -> None:
        """
        A periodic store job (event writing, retention) that raises or
        fails is logged and runs again at its next interval.
        """
        from types import SimpleNamespace

        from twisted.logger import globalLogPublisher
        from twisted.python.failure import Failure

        from rproxy.store.manager import Stores

        clock = Clock()
        config: Any = SimpleNamespace(postgres_dsn=None, redis_url=None, auth_cache_ttl=300.0, pool_size=4)
        stores = Stores(config, NoStaticKeys(), clock, clock)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        runs: list[int] = []

        def job() -> Any:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("boom")
            if len(runs) == 2:
                return defer.fail(Failure(ValueError("relation does not exist\nDETAIL: more")))
            return None

        loop = stores._periodic(job, 1.0, now=True, what="heartbeat retention")
        self.addCleanup(loop.stop)
        clock.pump([1.0, 1.0, 1.0])
        self.assertEqual(len(runs), 4)
        self.assertTrue(loop.running)
        warnings = [e["why"] for e in logged if e.get("what") == "heartbeat retention"]
        self.assertEqual(warnings, ["boom", "relation does not exist"])


class ListeningConnection:
    """What LiveBackends asks of a connection set, answered at once."""

    def addNotifyObserver(self, observer: Any) -> None:
        pass

    def removeNotifyObserver(self, observer: Any) -> None:
        pass

    def runOperation(self, sql: str) -> defer.Deferred[None]:
        return defer.succeed(None)


class LiveResyncTests(SynchronousTestCase):
    def test_resync_survives_an_error(self) -> None:
        """The periodic re-read of live pools logs an error and runs again; detach ends it."""
        from rproxy.store.backends import LiveBackends

        clock = Clock()
        calls: list[int] = []

        def pools() -> list[str]:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return []

        live = LiveBackends(clock, pools, lambda pool, servers: None, interval=30.0)
        self.successResultOf(defer.Deferred.fromCoroutine(live.attach(ListeningConnection())))
        clock.pump([30.0, 30.0])
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        live.detach()
        self.assertEqual(clock.getDelayedCalls(), [])
