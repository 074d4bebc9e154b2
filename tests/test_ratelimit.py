"""
Tests for L{rproxy.ratelimit}: the GCRA arithmetic on a fake clock, the
bounded key table, concurrency counts and the RateLimit header values.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from rproxy.ratelimit import (
    Concurrency,
    LocalBuckets,
    gcra,
    policy_header,
    retry_after,
    state_header,
)


class GCRATests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """
        A fresh key gets C{burst} requests at once, remaining counting down;
        the next is refused until one interval has passed, then one more
        is allowed per interval.
        """
        interval, burst = 0.1, 3
        tat, now = 0.0, 1000.0
        remaining = []
        for _ in range(burst):
            decision, tat = gcra(tat, now, interval, burst * interval)
            self.assertTrue(decision.allowed)
            remaining.append(decision.remaining)
        self.assertEqual(remaining, [2, 1, 0])
        refused, same = gcra(tat, now, interval, burst * interval)
        self.assertFalse(refused.allowed)
        self.assertEqual(same, tat)  # a refusal costs nothing
        self.assertAlmostEqual(refused.retry_after, interval)
        self.assertAlmostEqual(refused.reset, burst * interval)
        decision, tat = gcra(tat, now + interval, interval, burst * interval)
        self.assertTrue(decision.allowed)
        self.assertEqual(decision.remaining, 0)
        self.assertFalse(gcra(tat, now + interval, interval, burst * interval)[0].allowed)

    def test_refills_to_burst_only(self) -> None:
        """
        However long a key was idle, it gets at most C{burst} at once.
        """
        tat = 0.0
        now = 50.0
        allowed = 0
        for _ in range(20):
            decision, tat = gcra(tat, now, 1.0, 5.0)
            allowed += decision.allowed
        self.assertEqual(allowed, 5)

    def test_long_run_rate(self) -> None:
        """
        Requests arriving faster than the rate are allowed at the rate:
        100/s for 10 s at 1000 requests a second allow burst + 1000.
        """
        interval, burst = 0.01, 10
        tat, allowed = 0.0, 0
        for i in range(10_000):
            decision, tat = gcra(tat, i / 1000, interval, burst * interval)
            allowed += decision.allowed
        self.assertTrue(abs(allowed - (burst + 1000)) <= 1, allowed)

    def test_exact_float_steps(self) -> None:
        """
        Intervals that are not exact in binary (1/3 s) still give the
        whole burst, and remaining never goes one short.
        """
        interval = 1 / 3
        tat = 0.0
        decisions = []
        for _ in range(3):
            decision, tat = gcra(tat, 7.0, interval, 3 * interval)
            decisions.append((decision.allowed, decision.remaining))
        self.assertEqual(decisions, [(True, 2), (True, 1), (True, 0)])


class LocalBucketsTests(SynchronousTestCase):
    def test_keys_are_separate(self) -> None:
        buckets = LocalBuckets(1.0, 1)
        self.assertTrue(buckets.check(b"a", 0.0).allowed)
        self.assertFalse(buckets.check(b"a", 0.0).allowed)
        self.assertTrue(buckets.check(b"b", 0.0).allowed)

    def test_bounded_idle_first(self) -> None:
        """
        At most C{max_keys} keys are held: a new key in a full table drops
        the idle keys first (not counted: they held nothing), then the
        oldest (counted: they start afresh).
        """
        buckets = LocalBuckets(1.0, 1, max_keys=10)
        for i in range(10):
            buckets.check(b"old%d" % i, 0.0)  # idle from t=1
        for i in range(5):
            buckets.check(b"new%d" % i, 5.0)  # busy until t=6
        self.assertEqual((len(buckets), buckets.evicted), (5, 0))
        for i in range(5, 10):
            buckets.check(b"new%d" % i, 5.0)
        buckets.check(b"newest", 5.0)  # all busy: the oldest go
        self.assertEqual(len(buckets), 10)
        self.assertEqual(buckets.evicted, 1)
        self.assertNotIn(b"new0", buckets.tats)
        self.assertFalse(buckets.check(b"new9", 5.0).allowed)  # kept, still limited
        self.assertTrue(buckets.check(b"new0", 5.0).allowed)  # starts afresh

    def test_random_keys_do_not_grow_memory(self) -> None:
        """
        A client sending a fresh key each request holds at most max_keys
        entries.
        """
        rng = random.Random(7)
        buckets = LocalBuckets(1.0, 10, max_keys=1000)
        for i in range(20_000):
            buckets.check(rng.randbytes(16), i * 0.001)
            self.assertLessEqual(len(buckets), 1000)
        self.assertLessEqual(len(buckets), 1000)

    def test_idle_eviction_is_free(self) -> None:
        """
        Evicting a key whose TAT has passed is not counted: it held nothing.
        """
        buckets = LocalBuckets(1.0, 1, max_keys=1)
        buckets.check(b"a", 0.0)
        buckets.check(b"b", 10.0)
        self.assertEqual(buckets.evicted, 0)
        self.assertEqual(buckets.sweep(20.0), 1)
        self.assertEqual(len(buckets), 0)


class ConcurrencyTests(SynchronousTestCase):
    def test_acquire_release(self) -> None:
        slots = Concurrency(2)
        self.assertTrue(slots.acquire(b"a"))
        self.assertTrue(slots.acquire(b"a"))
        self.assertFalse(slots.acquire(b"a"))
        self.assertTrue(slots.acquire(b"b"))
        slots.release(b"a")
        self.assertTrue(slots.acquire(b"a"))
        for _ in range(2):
            slots.release(b"a")
        slots.release(b"b")
        self.assertEqual(slots.active, {})  # keys with nothing in flight are not held


class HeaderTests(SynchronousTestCase):
    def test_values(self) -> None:
        """
        The draft's structured fields: quota and window, remaining and
        seconds to reset (rounded up); Retry-After at least 1.
        """
        self.assertEqual(policy_header("ip", 200, 2.0), b'"ip";q=200;w=2')
        self.assertEqual(policy_header("ip", 10, 0.1), b'"ip";q=10;w=1')
        self.assertEqual(state_header("ip", 57, 0.25), b'"ip";r=57;t=1')
        self.assertEqual(state_header("ip", 0, 0.0), b'"ip";r=0;t=0')
        self.assertEqual(retry_after(0.01), b"1")
        self.assertEqual(retry_after(2.5), b"3")
        self.assertEqual(retry_after(3.0), b"3")
