"""
Tests for L{rproxy.console}: rates and percentiles from counter deltas,
one snapshot per sample whoever asks, a sampler that survives a failure.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.console import Console, quantile
from rproxy.http.frontend import DURATION_BUCKETS
from rproxy.service import RProxyService


class QuantileTests(SynchronousTestCase):
    def test_empty(self) -> None:
        """An empty histogram has no quantile."""
        self.assertIsNone(quantile((1.0, 2.0, float("inf")), [0, 0, 0], 0.5))

    def test_interpolates_within_bucket(self) -> None:
        """The median of ten values all in (1, 2] is taken halfway through that bucket."""
        self.assertEqual(quantile((1.0, 2.0, float("inf")), [0, 10, 0], 0.5), 1.5)

    def test_p99_in_upper_bucket(self) -> None:
        """p99 of 99 fast and one slow request falls at the top of the fast bucket; p100 in the slow one."""
        bounds = (0.01, 0.1, 1.0, float("inf"))
        self.assertAlmostEqual(quantile(bounds, [99, 0, 1, 0], 0.99), 0.01)  # type: ignore[arg-type]
        self.assertEqual(quantile(bounds, [99, 0, 1, 0], 1.0), 1.0)

    def test_overflow_bucket(self) -> None:
        """Values past the last finite bound are reported as that bound."""
        self.assertEqual(quantile((1.0, float("inf")), [0, 5], 0.5), 1.0)


def service() -> tuple[RProxyService, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    config = config_from_mapping({
        "admin": {"listen": None},
        "backends": [{"name": "web", "health_check": {"type": "none"}, "servers": ["127.0.0.1:9001"]}],
        "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"}],
    })
    svc = RProxyService(config, reactor, registry=CollectorRegistry())
    svc.startService()
    return svc, reactor


class ConsoleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service, self.clock = service()
        self.addCleanup(self.service.stopService)
        self.frontend: Any = self.service.frontends["web"]
        self.console = Console(self.service, self.clock)

    def answer(self, status: int, seconds: float, count: int) -> None:
        """Count C{count} requests as the HTTP frontend does when it answers."""
        import bisect

        self.frontend.requests[("web", status)] += count
        self.frontend.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += count
        self.frontend.admission.total += count

    def test_rates_from_deltas(self) -> None:
        """One second with 90 fast 200s and 10 slow 503s: 100 requests/s, 10% 5xx, p50 fast, p99 slow."""
        self.answer(200, 0.5, 7)  # before the first sample: not counted
        self.console.start()
        self.addCleanup(self.console.stop)
        self.clock.advance(1)
        self.answer(200, 0.004, 90)
        self.answer(503, 0.8, 10)
        self.clock.advance(1)
        front = json.loads(self.console.snapshot_bytes())["frontends"][0]
        now = front["now"]
        self.assertEqual((now["requests_per_s"], now["error_rate"]), (50.0, {"4xx": 0.0, "5xx": 0.1}))
        self.assertEqual(front["history"][-1][1:4], [100.0, 0, 10])
        self.assertLess(now["p50_ms"], 5)
        self.assertGreater(now["p99_ms"], 500)
        self.assertEqual(self.console.samples, 3)

    def test_one_snapshot_per_sample(self) -> None:
        """Any number of viewers within a sample get the same bytes, built once."""
        self.console.start()
        self.addCleanup(self.console.stop)
        built = []
        real = self.console.snapshot

        def counting() -> dict[str, Any]:
            built.append(1)
            return real()

        self.console.snapshot = counting  # type: ignore[method-assign]
        first = self.console.snapshot_bytes()
        for _ in range(20):
            self.assertIs(self.console.snapshot_bytes(), first)
        self.clock.advance(1)
        self.assertIsNot(self.console.snapshot_bytes(), first)
        self.assertEqual(len(built), 2)

    def test_history_is_bounded(self) -> None:
        """The chart keeps five minutes of samples, not more."""
        self.console.start()
        self.addCleanup(self.console.stop)
        self.clock.pump([1.0] * 400)
        front = json.loads(self.console.snapshot_bytes())["frontends"][0]
        self.assertEqual(len(front["history"]), 300)

    def test_a_failing_sample_is_logged_and_sampling_goes_on(self) -> None:
        """A sample that raises is logged; the next interval samples again."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.console.start()
        self.addCleanup(self.console.stop)
        broken = {"web": object()}  # no counters: the sample fails
        self.service.frontends, real = broken, self.service.frontends  # type: ignore[assignment]
        self.clock.advance(1)
        self.service.frontends = real
        self.clock.advance(1)
        self.assertEqual(self.console.samples, 2)
        self.assertEqual(len([e for e in events if e.get("log_failure") is not None]), 1)
        self.flushLoggedErrors(AttributeError)

    def test_without_loop_samples_on_demand(self) -> None:
        """A resource tree with no running loop (tests, a closed admin port) still gets fresh figures."""
        self.console.snapshot_bytes()
        self.clock.advance(1)
        self.answer(200, 0.004, 5)
        body = json.loads(self.console.snapshot_bytes())
        self.assertEqual(body["frontends"][0]["history"][-1][1], 5.0)
