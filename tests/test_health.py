"""
Tests for L{rproxy.health}.
"""

from __future__ import annotations

import itertools
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import BackendConfig, HealthCheckConfig, ServerConfig
from rproxy.health import HealthChecker, HealthState, ProbeFailed
from rproxy.pool import Pool, Server


class HealthStateTests(SynchronousTestCase):
    def test_fall_then_rise(self) -> None:
        """Down after fall failures in a row, up after rise successes in a row."""
        state = HealthState(rise=2, fall=3)
        self.assertEqual([state.record(False), state.record(False)], [None, None])
        self.assertIs(state.record(False), False)
        self.assertEqual([state.record(False), state.record(True)], [None, None])
        self.assertIs(state.record(True), True)
        self.assertTrue(state.up)

    def test_flapping_does_not_change_state(self) -> None:
        """Alternating results never reach fall or rise."""
        state = HealthState(rise=2, fall=2)
        self.assertEqual({state.record(i % 2 == 0) for i in range(20)}, {None})


class FakeProber:
    """
    Records probes; each returns a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred[object]]] = []

    def __call__(self, server: Server, config: HealthCheckConfig) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.calls.append((server.name, d))
        return d


def make_pool(clock: Clock, check: HealthCheckConfig) -> Pool:
    servers = tuple(
        ServerConfig(name=n, address=f"127.0.0.1:{p}", host="127.0.0.1", port=p) for n, p in (("a", 1), ("b", 2))
    )
    return Pool(BackendConfig(name="web", servers=servers, health_check=check), clock)


class HealthCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prober = FakeProber()
        self.observed: list[tuple[str, float, bool]] = []
        self.check = HealthCheckConfig(interval=2.0, timeout=1.0, rise=2, fall=3, jitter=0.1)
        self.pool = make_pool(self.clock, self.check)
        self.checker = HealthChecker(
            self.pool, self.clock, self.prober,
            lambda s, t, ok: self.observed.append((s.name, t, ok)), random.Random(4),
        )
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def run_round(self, results: dict[str, bool]) -> None:
        """Advance until every server has a pending probe, then settle them."""
        for _ in range(100):
            if {name for name, d in self.prober.calls if not d.called} >= set(results):
                break
            self.clock.advance(0.1)
        for name, d in self.prober.calls:
            if not d.called:
                if results[name]:
                    d.callback(None)
                else:
                    d.errback(ProbeFailed("status 500, expected 200"))

    def test_fall_marks_down_once_and_logs_once(self) -> None:
        """
        Three failed checks take a server down; the change is logged once,
        with the reason, and further failures log nothing.
        """
        self.checker.start()
        a = self.pool.servers[0]
        for _ in range(5):
            self.run_round({"a": False, "b": True})
        self.assertFalse(a.up)
        self.assertTrue(self.pool.servers[1].up)
        downs = [e for e in self.events if "is down" in e.get("log_format", "")]  # type: ignore[operator]
        self.assertEqual(len(downs), 1)
        self.assertEqual(downs[0]["reason"], "tcp check failed: status 500, expected 200")
        for _ in range(2):
            self.run_round({"a": True, "b": True})
        self.assertTrue(a.up)
        ups = [e for e in self.events if "is up" in e.get("log_format", "")]  # type: ignore[operator]
        self.assertEqual(len(ups), 1)

    def test_timeout(self) -> None:
        """A probe that does not answer within timeout counts as failed."""
        self.checker.start()
        a = self.pool.servers[0]
        for _ in range(3):
            for _ in range(100):
                pending = [d for n, d in self.prober.calls if n == "a" and not d.called]
                if pending:
                    break
                self.clock.advance(0.1)
            self.clock.advance(1.0)
            for name, d in self.prober.calls:
                if name == "b" and not d.called:
                    d.callback(None)
        self.assertFalse(a.up)
        self.assertEqual(a.down_reason, "tcp check timed out after 1.0s")

    def test_interval_with_jitter(self) -> None:
        """Checks repeat every interval, within the jitter."""
        self.checker.start()
        times: list[float] = []
        for _ in range(400):
            self.clock.advance(0.01)
            for name, d in self.prober.calls:
                if name == "a" and not d.called:
                    times.append(self.clock.seconds())
                    d.callback(None)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertTrue(gaps)
        for gap in gaps:
            self.assertTrue(1.79 <= gap <= 2.21, gap)

    def test_stop_cancels_everything(self) -> None:
        """stop() cancels timers and probes in flight."""
        self.checker.start()
        self.clock.advance(1.0)
        self.checker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for _, d in self.prober.calls:
            self.assertTrue(d.called)

    def test_sync_follows_pool(self) -> None:
        """After a reload, removed servers stop being checked and new ones start."""
        self.checker.start()
        servers = (ServerConfig(name="c", address="127.0.0.1:3", host="127.0.0.1", port=3),)
        self.pool.update(BackendConfig(name="web", servers=servers, health_check=self.check))
        self.checker.sync()
        self.prober.calls.clear()
        self.clock.advance(10)
        self.assertEqual({n for n, _ in self.prober.calls}, {"c"})

    def test_observe_durations(self) -> None:
        """Each finished probe is reported with its duration and result."""
        self.checker.start()
        self.run_round({"a": True, "b": False})
        self.assertEqual(sorted((n, ok) for n, _, ok in self.observed), [("a", True), ("b", False)])

    def test_none_type_checks_nothing(self) -> None:
        """health_check type none schedules no probes."""
        pool = make_pool(self.clock, HealthCheckConfig(type="none"))
        HealthChecker(pool, self.clock, self.prober).start()
        self.clock.advance(100)
        self.assertEqual(self.prober.calls, [])
