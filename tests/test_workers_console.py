"""
Tests for L{rproxy.workers.console}: the master's dashboard shows the
machine (every worker's counters summed, server state from the master),
sampled once per interval whoever watches.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.http.frontend import DURATION_BUCKETS
from rproxy.service import RProxyService
from rproxy.workers.console import MachineConsole
from rproxy.workers.merge import merge_counters, merge_token_rows


def row(total: int, active: int, ok: int, errors: int, fast: int) -> dict[str, Any]:
    """A worker's counters of frontend web: C{ok} 200s and C{errors} 503s, C{fast} of them in the first bucket."""
    durations = [0] * len(DURATION_BUCKETS)
    durations[0] = fast
    durations[-1] = ok + errors - fast
    return {"name": "web", "protocol": "http", "listen": "tcp:0", "address": None, "backend": "web",
            "total": total, "active": active, "connect_errors": 0, "classes": [0, ok, 0, 0, errors, 0],
            "durations": durations}


class FakeSlot:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process = object()


class FakeMaster:
    """
    A master whose workers' answers the test sets; counts the requests.
    """

    tunnels_in_workers = False  # (no cluster: the master holds the tunnels)

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "web", "health_check": {"type": "none"}, "servers": ["127.0.0.1:9001"]}],
        })
        self.inner = RProxyService(config, self.reactor, registry=CollectorRegistry())
        self.inner.startService()
        self.slots = [FakeSlot(0), FakeSlot(1)]
        self.answers: list[dict[str, Any] | None] = [None, None]
        self.asked = 0

    async def reports(self, timeout: float = 2.0, op: str = "report") -> list[dict[str, Any] | None]:
        assert op == "console"
        self.asked += 1
        return list(self.answers)

    def carried_totals(self, op: str, answers: list[dict[str, Any] | None]) -> dict[tuple[Any, ...], float]:
        return {}  # (no worker died: MasterService's carry is tested in test_workers_units)

    def answer(self, slot: int, frontend: dict[str, Any], connections: int) -> None:
        server = {"name": "127.0.0.1:9001", "active_connections": connections, "total_connections": connections}
        self.answers[slot] = {"op": "console", "slot": slot, "frontends": [frontend],
                              "backends": [{"name": "web", "servers": [server]}],
                              "token_pools": [{"name": "t", "total": 1, "in_use": slot, "available": 1 - slot,
                                               "waiting": 0, "credentials_out": [f"u{slot}"]}],
                              "ready": []}


class MachineConsoleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.master = FakeMaster()
        self.addCleanup(self.master.inner.stopService)
        self.console = MachineConsole(self.master, self.master.reactor)  # type: ignore[arg-type]
        self.console.start()
        self.addCleanup(self.console.stop)

    def test_sums_every_worker(self) -> None:
        """Requests/s, error rate, open connections and server counts are the machine's, not one process's."""
        self.master.answer(0, row(10, 1, 0, 0, 0), 1)
        self.master.answer(1, row(5, 2, 0, 0, 0), 2)
        self.master.reactor.advance(1)
        self.master.answer(0, row(70, 3, 54, 6, 60), 3)
        self.master.answer(1, row(45, 4, 36, 4, 40), 4)
        self.master.reactor.advance(1)
        snapshot = json.loads(self.console.snapshot_bytes())
        front = snapshot["frontends"][0]
        self.assertEqual((front["total_connections"], front["open_connections"]), (115, 7))
        self.assertEqual(front["now"]["requests_per_s"], 100.0)
        self.assertEqual(front["now"]["error_rate"]["5xx"], 0.1)
        self.assertEqual(front["history"][-1][1:3], [100.0, 0])
        server = snapshot["backends"][0]["servers"][0]
        self.assertEqual((server["active_connections"], server["total_connections"]), (7, 7))
        self.assertEqual(snapshot["token_pools"], [{"name": "t", "total": 2, "in_use": 1, "available": 1,
                                                    "waiting": 0, "credentials_out": ["u0", "u1"]}])
        self.assertEqual(snapshot["process"]["problems"], [])

    def test_once_per_interval_whoever_watches(self) -> None:
        """A hundred viewers in one interval cost one question to each worker and one JSON."""
        self.master.answer(0, row(1, 0, 0, 0, 0), 0)
        self.master.answer(1, row(1, 0, 0, 0, 0), 0)
        asked = self.master.asked
        first = self.console.snapshot_bytes()
        for _ in range(100):
            self.assertIs(self.console.snapshot_bytes(), first)
        self.assertEqual(self.master.asked, asked)
        self.master.reactor.advance(1)
        self.assertEqual(self.master.asked, asked + 1)
        self.assertIsNot(self.console.snapshot_bytes(), first)

    def test_a_worker_missing(self) -> None:
        """A worker that does not answer is a problem on the page; the others are still counted."""
        self.master.answer(0, row(3, 1, 0, 0, 0), 0)
        self.master.reactor.advance(1)
        snapshot = json.loads(self.console.snapshot_bytes())
        self.assertEqual(snapshot["process"]["problems"], ["worker 1: not ready"])
        self.assertEqual(snapshot["frontends"][0]["total_connections"], 3)

    def test_a_failing_sample_goes_on(self) -> None:
        """A sample that fails is logged; the next interval samples again."""
        self.master.reports = lambda **kw: defer.fail(RuntimeError("boom"))  # type: ignore[method-assign]
        self.master.reactor.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.master.reactor.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.console.running)


class MergeCounterTests(SynchronousTestCase):
    def test_merge_counters(self) -> None:
        """Counts, classes and histograms add up per frontend; a frontend one worker lacks is kept."""
        a, b = row(10, 1, 4, 1, 2), row(5, 2, 3, 0, 3)
        other = dict(row(1, 0, 0, 0, 0), name="l4")
        merged = merge_counters([[a], [b, other]])
        self.assertEqual([m["name"] for m in merged], ["web", "l4"])
        self.assertEqual((merged[0]["total"], merged[0]["active"], merged[0]["classes"]),
                         (15, 3, [0, 7, 0, 0, 1, 0]))
        self.assertEqual(merged[0]["durations"][0], 5)
        self.assertEqual(a["total"], 10)  # the inputs are left alone

    def test_merge_token_rows(self) -> None:
        rows = merge_token_rows([[{"name": "t", "total": 2, "credentials_out": ["b"]}],
                                 [{"name": "t", "total": 1, "credentials_out": ["a", "b"]}]])
        self.assertEqual(rows, [{"name": "t", "total": 3, "credentials_out": ["a", "b"]}])
