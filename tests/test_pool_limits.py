"""
Tests for the circuit breaker and slow start of L{rproxy.pool}, on a fake
clock.
"""

from __future__ import annotations

import collections

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config.limits import CircuitBreakerConfig
from rproxy.pool import CircuitOpen, Pool, QueueFull
from tests.test_pool import backend, server


class CircuitBreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_max_connections(self) -> None:
        """
        max_connections slots on the backend's servers, then CircuitOpen at
        once (a QueueFull: the engines answer 503 with its message), for
        try_acquire too; a release makes room.
        """
        pool = Pool(backend(server("a"), server("b"), circuit_breaker=CircuitBreakerConfig(max_connections=2)),
                    self.clock)
        first = self.successResultOf(pool.acquire())
        self.assertIsNotNone(pool.try_acquire())
        self.assertIsNone(pool.try_acquire())
        failure = self.failureResultOf(pool.acquire(), CircuitOpen)
        self.assertTrue(failure.check(QueueFull))
        self.assertEqual(str(failure.value), "circuit breaker: max_connections 2 reached")
        self.assertEqual(pool.breaker.opened["max_connections"], 1)  # type: ignore[union-attr]
        pool.release(first)
        self.assertEqual(pool.in_use, 1)
        self.successResultOf(pool.acquire())

    def test_max_pending(self) -> None:
        """
        With every server full, max_pending wait; the next is refused at
        once, before the queue's own size.
        """
        pool = Pool(backend(server("a", max_connections=1), circuit_breaker=CircuitBreakerConfig(max_pending=2)),
                    self.clock)
        held = self.successResultOf(pool.acquire())
        waiting = [pool.acquire(), pool.acquire()]
        failure = self.failureResultOf(pool.acquire(), CircuitOpen)
        self.assertEqual(str(failure.value), "circuit breaker: max_pending 2 reached")
        pool.release(held)
        self.assertIs(self.successResultOf(waiting[0]), held)

    def test_max_retries(self) -> None:
        """
        A retry (an acquire excluding servers already tried) is refused when
        max_retries are in flight; first attempts are not.
        """
        pool = Pool(backend(server("a"), server("b"), circuit_breaker=CircuitBreakerConfig(max_retries=1)),
                    self.clock)
        breaker = pool.breaker
        assert breaker is not None
        breaker.retries = 1
        self.assertIsNone(pool.try_acquire(exclude=["a"]))
        failure = self.failureResultOf(pool.acquire(exclude=["a"]), CircuitOpen)
        self.assertEqual(str(failure.value), "circuit breaker: max_retries 1 reached")
        self.assertIsNotNone(pool.try_acquire())
        breaker.retries = 0
        self.assertEqual(self.successResultOf(pool.acquire(exclude=["a"])).name, "b")

    def test_reload_keeps_counts(self) -> None:
        """
        A reload changes the thresholds, not the counts; removing the
        breaker removes the limit.
        """
        config = backend(server("a"), circuit_breaker=CircuitBreakerConfig(max_connections=1))
        pool = Pool(config, self.clock)
        self.successResultOf(pool.acquire())
        breaker = pool.breaker
        pool.update(backend(server("a"), circuit_breaker=CircuitBreakerConfig(max_connections=2)))
        self.assertIs(pool.breaker, breaker)
        self.successResultOf(pool.acquire())
        self.failureResultOf(pool.acquire(), CircuitOpen)
        pool.update(backend(server("a")))
        self.assertIsNone(pool.breaker)
        self.successResultOf(pool.acquire())


class SlowStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def shares(self, pool: Pool, picks: int = 2000, key: bool = False) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for i in range(picks):
            server = pool.pick(b"client-%d" % i if key else None)
            assert server is not None
            counts[server.name] += 1
        return counts

    def test_linear_ramp(self) -> None:
        """
        A server back up after being down takes 0 picks at first, about
        f of its share at fraction f of the window, and all of it after.
        """
        pool = Pool(backend(server("a"), server("b"), slow_start=30.0), self.clock)
        a, b = pool.servers
        pool.set_up(b, False, "test")
        pool.set_up(b, True, "test")
        self.assertEqual(self.shares(pool)["b"], 0)
        self.assertEqual(pool.ramp_fraction(b), 0.0)
        seen = []
        for elapsed in (7.5, 15.0, 22.5):
            self.clock.advance(7.5)
            seen.append(self.shares(pool)["b"] / 2000)
            self.assertAlmostEqual(pool.ramp_fraction(b), elapsed / 30)
        # round-robin over two servers: b's full share is 1/2; at fraction
        # f it is in f of the picks and takes about half of those
        for got, fraction in zip(seen, (0.25, 0.5, 0.75), strict=True):
            self.assertTrue(abs(got - fraction / 2) < 0.05, seen)
        self.clock.advance(7.5)
        self.assertEqual(self.shares(pool)["b"], 1000)
        self.assertEqual(pool.ramp_fraction(b), 1.0)
        self.assertEqual(pool.describe()["servers"][1]["effective_weight"], 1)

    def test_back_from_maintenance(self) -> None:
        """
        A server an operator puts back to ready from maint ramps up too.
        """
        pool = Pool(backend(server("a"), server("b"), slow_start=30.0), self.clock)
        pool.set_admin("b", state="maint")
        pool.set_admin("b", state="ready")
        self.assertEqual(self.shares(pool, 100)["b"], 0)
        self.clock.advance(15)
        self.assertTrue(15 <= self.shares(pool, 100)["b"] <= 35)

    def test_effective_weight_reported(self) -> None:
        pool = Pool(backend(server("a", weight=10), slow_start=10.0), self.clock)
        [a] = pool.servers
        pool.set_up(a, False, "test")
        pool.set_up(a, True, "test")
        self.clock.advance(4)
        self.assertEqual(pool.describe()["servers"][0]["effective_weight"], 4.0)

    def test_only_server_is_not_starved(self) -> None:
        """
        A ramping server that is the only one up still takes every pick.
        """
        pool = Pool(backend(server("a"), server("b"), slow_start=30.0), self.clock)
        a, b = pool.servers
        pool.set_up(a, False, "test")
        pool.set_up(b, False, "test")
        pool.set_up(b, True, "test")
        self.assertEqual(self.shares(pool, 10)["b"], 10)

    def test_hashing_keys_move_and_stay(self) -> None:
        """
        In a hashing pool, the keys a ramping server takes are a growing
        set: a key that moved to it stays there as the ramp goes on.
        """
        pool = Pool(backend(server("a"), server("b"), algorithm="hash", slow_start=30.0), self.clock)
        a, b = pool.servers
        pool.set_up(b, False, "test")
        pool.set_up(b, True, "test")
        owners = []
        for _ in range(3):
            self.clock.advance(10)
            owners.append({i for i in range(2000) if pool.pick(b"client-%d" % i).name == "b"})  # type: ignore[union-attr]
        self.assertTrue(owners[0] <= owners[1] <= owners[2])
        self.assertTrue(0 < len(owners[0]) < len(owners[1]) < len(owners[2]), [len(o) for o in owners])

    def test_no_ramp_without_slow_start_or_at_start(self) -> None:
        """
        Servers up from the start, or in pools without slow_start, take
        their share at once.
        """
        pool = Pool(backend(server("a"), server("b"), slow_start=30.0), self.clock)
        self.assertEqual(self.shares(pool, 10)["b"], 5)
        plain = Pool(backend(server("a"), server("b")), self.clock)
        plain.set_up(plain.servers[1], False, "test")
        plain.set_up(plain.servers[1], True, "test")
        self.assertEqual(self.shares(plain, 10)["b"], 5)
