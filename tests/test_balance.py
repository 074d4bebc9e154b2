"""
Tests for L{rproxy.balance}: distributions with a fixed seed, remapping.
"""

from __future__ import annotations

import collections
import random

import attrs
from twisted.trial.unittest import SynchronousTestCase

from rproxy.balance import (
    ConsistentHash,
    LeastConnections,
    PowerOfTwo,
    RoundRobin,
    SmoothWeighted,
    WeightedRandom,
    make_balancer,
)


@attrs.define(eq=False)
class S:
    name: str
    weight: int = 1
    active: int = 0


def counts(balancer: object, servers: list[S], n: int, key: bytes | None = None) -> dict[str, int]:
    c: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        c[balancer.pick(servers, key).name] += 1  # type: ignore[attr-defined]
    return dict(c)


class _Within:
    def assertWithin(self, value: float, target: float, delta: float) -> None:
        if abs(value - target) > delta:
            self.fail(f"{value} is not within {delta} of {target}")  # type: ignore[attr-defined]


class WeightTests(_Within, SynchronousTestCase):
    """
    Every balancer honours weights 3:1 within 2% over 10,000 picks.
    """

    def check_ratio(self, balancer: object) -> None:
        servers = [S("a", 3), S("b", 1)]
        c = counts(balancer, servers, 10000)
        self.assertWithin(c["a"] / 10000, 0.75, 0.02)
        self.assertWithin(c["b"] / 10000, 0.25, 0.02)

    def test_round_robin(self) -> None:
        """Round-robin gives each server weight consecutive turns."""
        self.check_ratio(RoundRobin())
        servers = [S("a", 3), S("b", 1)]
        rr = RoundRobin()
        self.assertEqual([rr.pick(servers).name for _ in range(8)], list("aaabaaab"))  # type: ignore[union-attr]

    def test_smooth_weighted(self) -> None:
        """nginx's smooth WRR interleaves: 5:1:1 gives a a b a c a a."""
        self.check_ratio(SmoothWeighted())
        servers = [S("a", 5), S("b", 1), S("c", 1)]
        swrr = SmoothWeighted()
        self.assertEqual([swrr.pick(servers).name for _ in range(7)], list("aabacaa"))  # type: ignore[union-attr]

    def test_random(self) -> None:
        """Weighted random with a fixed seed."""
        self.check_ratio(WeightedRandom(random.Random(1)))

    def test_p2c_with_equal_load(self) -> None:
        """With equal load, p2c follows the weights."""
        self.check_ratio(PowerOfTwo(random.Random(2)))

    def test_hash_without_key(self) -> None:
        """A hash balancer with no key spreads by weight."""
        self.check_ratio(ConsistentHash(rng=random.Random(3)))

    def test_hash_with_keys(self) -> None:
        """A hash balancer over many keys gives weight-proportional shares."""
        servers = [S("a", 3), S("b", 1)]
        ring = ConsistentHash()
        c = collections.Counter(ring.pick(servers, b"client-%d" % i).name for i in range(10000))  # type: ignore[union-attr]
        self.assertWithin(c["a"] / 10000, 0.75, 0.05)

    def test_least_connections_weighted(self) -> None:
        """Least-connections compares active connections per unit of weight."""
        a, b = S("a", 3, active=5), S("b", 1, active=2)
        lc = LeastConnections()
        # a: 5/3 = 1.67 < b: 2/1
        self.assertIs(lc.pick([a, b]), a)
        a.active = 7
        self.assertIs(lc.pick([a, b]), b)

    def test_least_connections_ties_rotate(self) -> None:
        """Idle servers share new connections instead of one taking all."""
        servers = [S("a"), S("b"), S("c")]
        self.assertEqual(sorted(counts(LeastConnections(), servers, 300).values()), [100, 100, 100])

    def test_p2c_prefers_less_loaded(self) -> None:
        """p2c never picks the busier of the two it drew."""
        busy, idle = S("busy", active=10), S("idle", active=0)
        self.assertEqual(counts(PowerOfTwo(random.Random(5)), [busy, idle], 100), {"idle": 100})

    def test_zero_weight(self) -> None:
        """Weight 0 servers are used only when nothing else is left."""
        for algorithm in ("round-robin", "weighted-round-robin", "least-connections", "random", "p2c", "hash"):
            b = make_balancer(algorithm, random.Random(0))
            self.assertEqual(set(counts(b, [S("a", 0), S("b", 1)], 50, b"k")), {"b"}, algorithm)
            self.assertEqual(set(counts(b, [S("a", 0)], 5, b"k")), {"a"}, algorithm)

    def test_empty(self) -> None:
        """No candidates, no pick."""
        for algorithm in ("round-robin", "weighted-round-robin", "least-connections", "random", "p2c", "hash"):
            self.assertIsNone(make_balancer(algorithm).pick([], b"k"))


class ConsistentHashTests(_Within, SynchronousTestCase):
    def test_stable(self) -> None:
        """The same key goes to the same server while the set is unchanged."""
        servers = [S(f"s{i}") for i in range(5)]
        ring = ConsistentHash()
        first = [ring.pick(servers, b"k%d" % i).name for i in range(1000)]  # type: ignore[union-attr]
        other = ConsistentHash()
        second = [other.pick(servers, b"k%d" % i).name for i in range(1000)]  # type: ignore[union-attr]
        self.assertEqual(first, second)

    def test_removal_remaps_one_nth(self) -> None:
        """
        Removing one of N servers moves about 1/N of the keys, and only keys
        that the removed server owned.
        """
        n = 10
        servers = [S(f"10.0.0.{i}:80") for i in range(n)]
        ring = ConsistentHash()
        keys = [b"192.168.%d.%d" % (i // 256, i % 256) for i in range(10000)]
        before = {k: ring.pick(servers, k).name for k in keys}  # type: ignore[union-attr]
        removed = servers[3]
        after = {k: ring.pick([s for s in servers if s is not removed], k).name for k in keys}  # type: ignore[union-attr]
        moved = [k for k in keys if before[k] != after[k]]
        self.assertTrue(all(before[k] == removed.name for k in moved))
        self.assertWithin(len(moved) / len(keys), 1 / n, 0.03)
        # and adding it back restores the original mapping
        again = {k: ring.pick(servers, k).name for k in keys}  # type: ignore[union-attr]
        self.assertEqual(again, before)
