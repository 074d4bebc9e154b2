"""
Tests for L{rproxy.health}.
"""

from __future__ import annotations

import errno
import itertools
import os
import random

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import BackendConfig, HealthCheckConfig, ServerConfig, UpstreamTLSConfig
from rproxy.health import HealthChecker, HealthState, ProbeFailed
from rproxy.pool import Pool, Server
from rproxy.shortage import LocalConnectError
from tests.support import self_signed_pem


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
        self.tls: list[object] = []

    def __call__(self, server: Server, config: HealthCheckConfig, tls: object) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.calls.append((server.name, d))
        self.tls.append(tls)
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

    def test_observer_error_does_not_stop_checks(self) -> None:
        """
        An observer that raises once is logged, and the checks (and their
        verdicts) go on.
        """
        raised: list[str] = []

        def observe(server: Server, seconds: float, ok: bool) -> None:
            if not raised:
                raised.append(server.name)
                raise RuntimeError("observer bug")
            self.observed.append((server.name, seconds, ok))

        checker = HealthChecker(self.pool, self.clock, self.prober, observe, random.Random(4))
        checker.start()
        for _ in range(4):
            self.run_round({"a": False, "b": True})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len([n for n, _ in self.prober.calls if n == raised[0]]), 4)
        self.assertFalse(self.pool.servers[0].up)
        checker.stop()

    def test_local_failures_count_neither_way(self) -> None:
        """
        Probes that could not start for want of local resources (EMFILE, as
        Twisted's connector and ours report it) neither take an up server
        down nor bring a down one up; they are logged once.
        """
        self.checker.start()
        a, b = self.pool.servers
        for _ in range(3):
            self.run_round({"a": False, "b": True})
        self.assertEqual((a.up, b.up), (False, True))
        for i in range(10):
            for _ in range(100):
                pending = [d for _, d in self.prober.calls if not d.called]
                if len(pending) == 2:
                    break
                self.clock.advance(0.1)
            for _, d in self.prober.calls:
                if not d.called:
                    if i % 2:
                        d.errback(error.ConnectBindError(errno.EMFILE, "Too many open files"))
                    else:
                        d.errback(LocalConnectError(errno.EMFILE, "Too many open files"))
        self.assertEqual((a.up, b.up), (False, True))
        self.assertEqual((a.check_failures, b.check_failures), (3, 0))
        self.assertEqual(len([e for e in self.events if "not the server's fault" in str(e.get("log_format"))]), 1)
        self.assertEqual(self.checker.shortage.total, 20)
        self.assertEqual(len(self.observed), 6)
        for _ in range(2):
            self.run_round({"a": True, "b": True})
        self.assertTrue(a.up)

    def test_checks_go_on_after_a_synchronous_error(self) -> None:
        """A prober that raises counts as a failed check and the loop goes on."""
        calls: list[str] = []

        def prober(server: Server, config: HealthCheckConfig, tls: object) -> defer.Deferred[object]:
            calls.append(server.name)
            raise ValueError("prober bug")

        pool = make_pool(self.clock, self.check)
        HealthChecker(pool, self.clock, prober, rng=random.Random(1)).start()
        self.clock.pump([0.1] * 100)
        self.assertEqual(calls.count("a"), 5)
        self.assertEqual(pool.servers[0].down_reason, "tcp check failed: prober bug")


class HealthCheckTLSTests(SynchronousTestCase):
    """
    The TLS settings of http checks are loaded at start and on reload,
    not per probe.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.prober = FakeProber()
        self.ca = self.mktemp()
        self_signed_pem(self.ca)
        self.check = HealthCheckConfig(type="http", interval=2.0, timeout=1.0, jitter=0,
                                       tls=UpstreamTLSConfig(ca=self.ca, server_name="localhost"))
        self.pool = make_pool(self.clock, self.check)
        self.checker = HealthChecker(self.pool, self.clock, self.prober, rng=random.Random(4))

    def probe_rounds(self, n: int) -> None:
        for _ in range(n):
            self.clock.advance(2.0)
            for _, d in self.prober.calls:
                if not d.called:
                    d.callback(None)

    def test_loaded_once_and_on_reload(self) -> None:
        """
        Every probe gets the options loaded at start, even once the CA file
        is gone; a reload (sync) loads them again.
        """
        self.checker.start()
        self.probe_rounds(1)
        first = self.prober.tls[0]
        self.assertIsNotNone(first)
        os.remove(self.ca)
        self.probe_rounds(3)
        self.assertEqual(len(self.prober.tls), 8)
        self.assertTrue(all(tls is first for tls in self.prober.tls))
        self.assertTrue(all(s.up for s in self.pool.servers))
        self_signed_pem(self.ca)
        self.checker.sync()
        self.prober.tls.clear()
        self.probe_rounds(1)
        self.assertEqual(len(self.prober.tls), 2)
        self.assertIsNot(self.prober.tls[0], first)

    def test_unloadable_ca_fails_the_checks(self) -> None:
        """A CA that cannot be loaded is logged once and every check fails with it."""
        os.remove(self.ca)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.checker.start()
        self.probe_rounds(4)
        self.assertEqual(self.prober.calls, [])
        self.assertFalse(self.pool.servers[0].up)
        self.assertIn("No such file", self.pool.servers[0].down_reason)
        self.assertEqual(len([e for e in events if "cannot load the TLS" in str(e.get("log_format"))]), 1)
