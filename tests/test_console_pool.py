"""
Tests for the operator's side of L{rproxy.pool}: drain, maint, ready and
runtime weight, and what a reload does to them.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import BackendConfig, ServerConfig
from rproxy.pool import AdminError, NoServerAvailable, Pool


def server(name: str, **kw: object) -> ServerConfig:
    return ServerConfig(name=name, address=f"{name}:80", host=name, port=80, **kw)  # type: ignore[arg-type]


def backend(*servers: ServerConfig, **kw: object) -> BackendConfig:
    return BackendConfig(name="web", servers=servers, **kw)  # type: ignore[arg-type]


class AdminStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def picks(self, pool: Pool, n: int = 6) -> list[str]:
        names = []
        for _ in range(n):
            chosen = self.successResultOf(pool.acquire())
            names.append(chosen.name)
            pool.release(chosen)
        return names

    def test_drain_takes_no_new_connections_open_ones_stay(self) -> None:
        """A drained server is not picked again; its open connection stays counted until released."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        held = self.successResultOf(pool.acquire())
        self.assertEqual(held.name, "a")
        pool.set_admin("a", state="drain")
        self.assertEqual(set(self.picks(pool)), {"b"})
        self.assertEqual((held.active, held.state(0), held.admin_state), (1, "draining", "drain"))
        pool.release(held)
        self.assertEqual(held.active, 0)

    def test_maint_then_ready(self) -> None:
        """maint keeps a server out and reports maintenance; ready brings it back."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        pool.set_admin("b", state="maint")
        self.assertEqual(set(self.picks(pool)), {"a"})
        self.assertEqual(pool.server("b").state(0), "maintenance")  # type: ignore[union-attr]
        pool.set_admin("b", state="ready")
        self.assertEqual(set(self.picks(pool)), {"a", "b"})

    def test_every_server_drained_means_no_server(self) -> None:
        """With every server drained the pool has no server to give."""
        pool = Pool(backend(server("a")), self.clock)
        pool.set_admin("a", state="drain")
        self.failureResultOf(pool.acquire(), NoServerAvailable)
        self.assertEqual(pool.healthy_count(), 0)

    def test_ready_serves_waiters(self) -> None:
        """A connection waiting for a slot gets the server set back to ready."""
        pool = Pool(backend(server("a", max_connections=1), server("b")), self.clock)
        pool.set_admin("b", state="drain")
        held = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        self.assertNoResult(waiting)
        pool.set_admin("b", state="ready")
        self.assertEqual(self.successResultOf(waiting).name, "b")
        pool.release(held)

    def test_weight_changes_the_share(self) -> None:
        """A runtime weight changes the round-robin share at once."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        self.assertEqual(self.picks(pool, 4).count("a"), 2)
        pool.set_admin("a", weight=3)
        self.assertEqual(self.picks(pool, 8).count("a"), 6)
        self.assertEqual(pool.stats()["backends"][0]["weight"], 3)  # type: ignore[index]

    def test_weight_zero_only_when_nothing_else(self) -> None:
        """Weight 0 takes traffic only when no other server can."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        pool.set_admin("a", weight=0)
        self.assertEqual(set(self.picks(pool)), {"b"})

    def test_refusals(self) -> None:
        """Unknown server, unknown state and weights out of range are refused with a reason, nothing applied."""
        pool = Pool(backend(server("a")), self.clock)
        cases = [
            (("zz",), {"state": "drain"}, "backend 'web' has no server 'zz'"),
            (("a",), {"state": "down"}, "state must be one of ready, drain, maint"),
            (("a",), {"weight": 1001}, "weight must be an integer from 0 to 1000"),
            (("a",), {"weight": -1}, "weight must be an integer from 0 to 1000"),
            (("a",), {"weight": True}, "weight must be an integer from 0 to 1000"),
            (("a",), {"state": "drain", "weight": 2.5}, "weight must be an integer from 0 to 1000"),
        ]
        for args, kwargs, message in cases:
            with self.assertRaises(AdminError) as caught:
                pool.set_admin(*args, **kwargs)  # type: ignore[arg-type]
            self.assertEqual(str(caught.exception), message)
        a = pool.servers[0]
        self.assertEqual((a.admin_state, a.weight), ("ready", 1))

    def test_state_survives_reload_of_unchanged_server(self) -> None:
        """A reload that leaves a server's configuration as it was keeps its drain and weight."""
        config = backend(server("a"), server("b"))
        pool = Pool(config, self.clock)
        pool.set_admin("a", state="drain", weight=5)
        pool.update(backend(server("a"), server("b"), server("c")))
        a = pool.server("a")
        assert a is not None
        self.assertEqual((a.admin_state, a.weight, a.weight_set), ("drain", 5, True))
        self.assertEqual(set(self.picks(pool)), {"b", "c"})

    def test_changed_server_takes_the_file(self) -> None:
        """A reload that changes a server's configuration drops the runtime state and weight."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        pool.set_admin("a", state="maint", weight=5)
        pool.update(backend(server("a", weight=2), server("b")))
        a = pool.server("a")
        assert a is not None
        self.assertEqual((a.admin_state, a.weight, a.weight_set), ("ready", 2, False))

    def test_describe_uses_config_words(self) -> None:
        """describe() names backend, servers and algorithm, with the last check's result."""
        pool = Pool(backend(server("a")), self.clock)
        self.clock.advance(10)
        a = pool.servers[0]
        a.last_check_ok, a.last_check_reason, a.last_check_at = False, "tcp check timed out after 1.0s", 7.0
        pool.set_admin("a", state="drain")
        described = pool.describe()
        self.assertEqual(described["algorithm"], "round-robin")
        entry = described["servers"][0]
        self.assertEqual((entry["name"], entry["state"], entry["admin_state"], entry["last_check"]),
                         ("a", "draining", "drain",
                          {"ok": False, "reason": "tcp check timed out after 1.0s", "ago": 3.0}))
