"""
Load-balancing algorithms.

A balancer chooses one server among I{candidates}: the servers of a pool
that may take a connection right now (up, not ejected, not draining, under
their connection limit).  The pool filters; the balancer only chooses, so
every algorithm is health-aware by construction and none does any I/O.

Each balancer keeps whatever state its algorithm needs between picks,
keyed by server name, so that the candidate set may change from one pick
to the next (a server goes down, a reload adds one) without a rebuild.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = [
    "Candidate",
    "Balancer",
    "RoundRobin",
    "SmoothWeighted",
    "LeastConnections",
    "WeightedRandom",
    "PowerOfTwo",
    "ConsistentHash",
    "make_balancer",
    "hash_fraction",
]


class Candidate(Protocol):
    """
    What a balancer needs to know of a server.
    """

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def active(self) -> int: ...


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        """
        Choose one of C{candidates}, or L{None} when there are none.

        @param key: the hash key (source address, header or cookie value)
            for hashing balancers; others ignore it.
        """


def _weighted(candidates: Sequence[Candidate]) -> list[Candidate]:
    """
    The candidates with a positive weight; if every weight is zero, all of
    them (a weight of 0 means "only when nothing else is left").
    """
    positive = [c for c in candidates if c.weight > 0]
    return positive or list(candidates)


class RoundRobin:
    """
    Classic weighted round-robin: each server takes C{weight} consecutive
    turns.  With equal weights this is a plain rotation.
    """

    def __init__(self) -> None:
        self._turn = 0
        self._input: Sequence[Candidate] | None = None
        self._for: list[Candidate] = []
        self._weights: list[int] = []
        self._sequence: list[int] = []

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        if candidates is not self._input:
            # a pool hands out the same list while its candidates do not
            # change: the rotation is rebuilt only when they do
            self._input = candidates
            chosen = _weighted(candidates)
            weights = [c.weight for c in chosen]
            if chosen != self._for or weights != self._weights:
                self._for, self._weights = chosen, weights
                self._sequence = [i for i, w in enumerate(weights) for _ in range(max(w, 1))]
        if not self._sequence:
            return None
        turn = self._turn
        self._turn = turn + 1
        sequence = self._sequence
        return self._for[sequence[turn % len(sequence)]]


class SmoothWeighted:
    """
    nginx's smooth weighted round-robin: weights 5:1:1 give
    a a b a c a a rather than a a a a a b c.
    """

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        candidates = _weighted(candidates)
        if not candidates:
            return None
        total = 0
        best: Candidate | None = None
        best_weight = 0
        current = self._current
        for c in candidates:
            weight = max(c.weight, 1)
            w = current.get(c.name, 0) + weight
            current[c.name] = w
            total += weight
            if best is None or w > best_weight:
                best, best_weight = c, w
        assert best is not None
        current[best.name] = best_weight - total
        if len(current) > 4 * len(candidates) + 16:
            live = {c.name for c in candidates}
            for name in [n for n in current if n not in live]:
                del current[name]
        return best


class LeastConnections:
    """
    Fewest active connections relative to weight; ties rotate so that an
    idle pool still spreads new connections.
    """

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        candidates = _weighted(candidates)
        if not candidates:
            return None
        n = len(candidates)
        self._turn += 1
        best: Candidate | None = None
        best_load = 0.0
        for i in range(n):
            c = candidates[(self._turn + i) % n]
            load = c.active / max(c.weight, 1)
            if best is None or load < best_load:
                best, best_load = c, load
        return best


class WeightedRandom:
    """
    Random choice in proportion to weight.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        candidates = _weighted(candidates)
        if not candidates:
            return None
        return _weighted_choice(self._rng, candidates)


def _weighted_choice(rng: random.Random, candidates: Sequence[Candidate]) -> Candidate:
    total = sum(max(c.weight, 1) for c in candidates)
    point = rng.random() * total
    for c in candidates:
        point -= max(c.weight, 1)
        if point < 0:
            return c
    return candidates[-1]


class PowerOfTwo:
    """
    Power of two choices: draw two servers at random (by weight) and take
    the less loaded, which avoids least-connections' herd on a server that
    just came up while staying close to it in balance.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        candidates = _weighted(candidates)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        first = _weighted_choice(self._rng, candidates)
        rest = [c for c in candidates if c is not first]
        second = _weighted_choice(self._rng, rest)
        if second.active / max(second.weight, 1) < first.active / max(first.weight, 1):
            return second
        return first


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def hash_fraction(key: bytes) -> float:
    """
    Where C{key} falls in [0, 1), by a hash independent of the ring's: the
    same key always gets the same place (a slow start takes the keys below
    its fraction, L{rproxy.pool.Pool}).
    """
    digest = hashlib.blake2b(key, digest_size=8, person=b"rproxy-ramp").digest()
    return int.from_bytes(digest, "big") / 2.0**64


class ConsistentHash:
    """
    Ring hash (Ketama-style): each server owns C{replicas * weight} points on
    a 64-bit ring, and a key goes to the first point at or after its hash.

    The points depend only on server names, so when one of N servers leaves
    the candidate set (down, or removed by a reload) only the keys it owned,
    about 1/N, move; the others keep their server.  A key with no value
    (no header, no cookie) is spread at random.
    """

    def __init__(self, replicas: int = 160, rng: random.Random | None = None) -> None:
        self._replicas = replicas
        self._rng = rng or random.Random()
        self._ring_for: tuple[tuple[str, int], ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, candidates: Sequence[Candidate]) -> None:
        identity = tuple((c.name, max(c.weight, 1)) for c in candidates)
        if identity == self._ring_for:
            return
        points: list[tuple[int, str]] = []
        for name, weight in identity:
            encoded = name.encode("utf-8")
            for i in range(self._replicas * weight):
                points.append((_hash64(b"%s-%d" % (encoded, i)), name))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [n for _, n in points]
        self._ring_for = identity

    def pick(self, candidates: Sequence[Candidate], key: bytes | None = None) -> Candidate | None:
        candidates = _weighted(candidates)
        if not candidates:
            return None
        if key is None:
            return _weighted_choice(self._rng, candidates)
        self._ring(candidates)
        index = bisect.bisect_left(self._points, _hash64(key))
        if index == len(self._points):
            index = 0
        owner = self._owners[index]
        for c in candidates:
            if c.name == owner:
                return c
        raise AssertionError("ring out of date")  # pragma: no cover


def make_balancer(algorithm: str, rng: random.Random | None = None) -> Balancer:
    """
    The balancer for an algorithm name from the configuration.
    """
    factories: dict[str, Callable[[], Balancer]] = {
        "round-robin": RoundRobin,
        "weighted-round-robin": SmoothWeighted,
        "least-connections": LeastConnections,
        "random": lambda: WeightedRandom(rng),
        "p2c": lambda: PowerOfTwo(rng),
        "ip-hash": lambda: ConsistentHash(rng=rng),
        "hash": lambda: ConsistentHash(rng=rng),
    }
    return factories[algorithm]()
