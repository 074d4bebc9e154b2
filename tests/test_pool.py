"""
Tests for L{rproxy.pool}: slots, queueing, backups, passive ejection, reload.
"""

from __future__ import annotations

import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import BackendConfig, PassiveConfig, ServerConfig
from rproxy.pool import NoServerAvailable, Pool, QueueFull, QueueTimeout


def server(name: str, **kw: object) -> ServerConfig:
    return ServerConfig(name=name, address=f"{name}:80", host=name, port=80, **kw)  # type: ignore[arg-type]


def backend(*servers: ServerConfig, **kw: object) -> BackendConfig:
    return BackendConfig(name="web", servers=servers, **kw)  # type: ignore[arg-type]


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_acquire_counts_and_release(self) -> None:
        """acquire takes a slot on the chosen server, release gives it back."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        first = self.successResultOf(pool.acquire())
        second = self.successResultOf(pool.acquire())
        self.assertEqual([first.name, second.name], ["a", "b"])
        self.assertEqual((first.active, first.total), (1, 1))
        pool.release(first)
        self.assertEqual((first.active, first.total), (0, 1))

    def test_down_servers_are_skipped(self) -> None:
        """A server marked down is never picked; with none up, acquire fails."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        a, b = pool.servers
        pool.set_up(a, False, "test")
        self.assertEqual({self.successResultOf(pool.acquire()).name for _ in range(4)}, {"b"})
        pool.set_up(b, False, "test")
        self.failureResultOf(pool.acquire(), NoServerAvailable)

    def test_backup_only_when_no_primary(self) -> None:
        """Backups take traffic only when no primary is up."""
        pool = Pool(backend(server("a"), server("bk", backup=True)), self.clock)
        a, bk = pool.servers
        self.assertEqual({self.successResultOf(pool.acquire()).name for _ in range(4)}, {"a"})
        pool.set_up(a, False, "test")
        self.assertEqual(self.successResultOf(pool.acquire()).name, "bk")
        pool.set_up(a, True, "test")
        self.assertEqual(self.successResultOf(pool.acquire()).name, "a")

    def test_exclude(self) -> None:
        """Servers already tried by a connection are excluded."""
        pool = Pool(backend(server("a"), server("b")), self.clock)
        self.assertEqual(self.successResultOf(pool.acquire(exclude=["a"])).name, "b")
        self.failureResultOf(pool.acquire(exclude=["a", "b"]), NoServerAvailable)

    def test_queue_when_full(self) -> None:
        """
        When every server is at max_connections, acquirers wait FIFO and get
        the slot that the next release frees.
        """
        pool = Pool(backend(server("a", max_connections=1), queue_size=2), self.clock)
        held = self.successResultOf(pool.acquire())
        first, second = pool.acquire(), pool.acquire()
        self.assertNoResult(first)
        self.failureResultOf(pool.acquire(), QueueFull)
        self.assertEqual(pool.waiting, 2)
        pool.release(held)
        self.assertIs(self.successResultOf(first), held)
        self.assertNoResult(second)
        pool.release(held)
        self.successResultOf(second)
        self.assertEqual(pool.waiting, 0)

    def test_queue_timeout(self) -> None:
        """A waiter gets QueueTimeout after queue_timeout."""
        pool = Pool(backend(server("a", max_connections=1), queue_timeout=2.0), self.clock)
        self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        self.clock.advance(1.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.2)
        self.failureResultOf(waiting, QueueTimeout)
        self.assertEqual((pool.waiting, self.clock.getDelayedCalls()), (0, []))

    def test_cancel_leaves_queue(self) -> None:
        """Cancelling a waiter (its client left) removes it and its timer."""
        pool = Pool(backend(server("a", max_connections=1)), self.clock)
        held = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual((pool.waiting, self.clock.getDelayedCalls()), (0, []))
        pool.release(held)
        self.assertEqual(held.active, 0)

    def test_waiters_fail_when_all_go_down(self) -> None:
        """Waiters fail at once when no server is up any more."""
        pool = Pool(backend(server("a", max_connections=1)), self.clock)
        held = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        pool.set_up(held, False, "test")
        pool.release(held)
        self.failureResultOf(waiting, NoServerAvailable)


class PassiveEjectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        passive = PassiveConfig(consecutive_failures=3, ejection=10.0, max_ejection=25.0, max_ejection_percent=50)
        self.pool = Pool(backend(server("a"), server("b"), server("c"), server("d"), passive=passive), self.clock)

    def fail_n(self, s: object, times: int) -> None:
        for _ in range(times):
            self.pool.record_failure(s, "refused")  # type: ignore[arg-type]

    def test_ejection_grows_on_repeat(self) -> None:
        """
        Consecutive failures eject a server for a cooldown that grows with
        each ejection, capped at max_ejection.
        """
        a = self.pool.servers[0]
        self.fail_n(a, 2)
        self.assertEqual(a.state(self.clock.seconds()), "up")
        self.fail_n(a, 1)
        self.assertEqual(a.state(self.clock.seconds()), "ejected")
        self.assertNotIn(a, self.pool.candidates())
        self.clock.advance(10)
        self.assertEqual(a.state(self.clock.seconds()), "up")
        self.fail_n(a, 3)
        self.assertEqual(a.ejected_until - self.clock.seconds(), 20.0)
        self.clock.advance(20)
        self.fail_n(a, 3)
        self.assertEqual(a.ejected_until - self.clock.seconds(), 25.0)

    def test_success_resets_count(self) -> None:
        """A success between failures resets the consecutive count."""
        a = self.pool.servers[0]
        self.fail_n(a, 2)
        self.pool.record_success(a)
        self.fail_n(a, 2)
        self.assertEqual(a.state(self.clock.seconds()), "up")

    def test_max_ejection_percent(self) -> None:
        """At most max_ejection_percent of the servers are ejected at once."""
        for s in self.pool.servers:
            self.fail_n(s, 3)
        now = self.clock.seconds()
        self.assertEqual([s.ejected(now) for s in self.pool.servers], [True, True, False, False])

    def test_waiters_wake_when_ejection_ends(self) -> None:
        """A queue waiting while a server is ejected is served when it returns."""
        passive = PassiveConfig(consecutive_failures=1, ejection=5.0, max_ejection_percent=100)
        pool = Pool(
            backend(server("a", max_connections=1), server("b", max_connections=1), passive=passive,
                    queue_timeout=10.0),
            self.clock,
        )
        held_a = self.successResultOf(pool.acquire())
        self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        pool.record_failure(held_a, "reset")
        pool.release(held_a)
        self.assertNoResult(waiting)
        self.clock.advance(5)
        self.assertIs(self.successResultOf(waiting), held_a)


class ReloadTests(SynchronousTestCase):
    def test_moved_servers_told(self) -> None:
        """
        on_moved hears of the servers whose connections must not be kept:
        a changed address, all on a changed tls or send_proxy, removed
        ones, all when the pool closes; not of a weight change.
        """
        from rproxy.config import UpstreamTLSConfig

        pool = Pool(backend(server("a"), server("b"), server("c")), Clock())
        a, b, c = pool.servers
        told: list[str] = []
        pool.on_moved(lambda s: told.append(s.name))
        moved_b = ServerConfig(name="b", address="b2:80", host="b2", port=80)
        pool.update(backend(server("a", weight=3), moved_b, server("c")))
        self.assertEqual(told, ["b"])
        pool.update(backend(server("a", weight=3), moved_b))
        self.assertEqual(told, ["b", "c"])
        pool.update(backend(server("a", weight=3), moved_b, send_proxy="v2"))
        pool.update(backend(server("a", weight=3), moved_b, send_proxy="v2", tls=UpstreamTLSConfig()))
        self.assertEqual(told, ["b", "c", "a", "b", "a", "b"])
        pool.close()
        self.assertEqual(told[6:], ["a", "b"])

    def test_update_keeps_state_by_name(self) -> None:
        """
        A reload keeps servers with the same name (and their counters),
        adds new ones and marks removed ones draining without touching
        their open connections.
        """
        clock = Clock()
        pool = Pool(backend(server("a"), server("b")), clock, random.Random(0))
        a, b = pool.servers
        self.successResultOf(pool.acquire())
        self.successResultOf(pool.acquire())
        removed = pool.update(backend(server("a", weight=5), server("c"), algorithm="least-connections"))
        self.assertEqual(removed, [b])
        self.assertTrue(b.draining)
        self.assertEqual(b.active, 1)
        self.assertIs(pool.servers[0], a)
        self.assertEqual((a.weight, a.total), (5, 1))
        self.assertEqual([s.name for s in pool.servers], ["a", "c"])
        # least connections now: c is idle
        self.assertEqual(self.successResultOf(pool.acquire()).name, "c")
        pool.release(b)
        self.assertEqual(b.active, 0)
