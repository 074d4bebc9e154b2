"""
Rate limits without I/O: the GCRA decision, a bounded table of buckets
per key, and concurrent-request counts per key.

GCRA (the generic cell rate algorithm, as redis-cell and Envoy's
descriptors do it) keeps one number per key, its I{theoretical arrival
time} (TAT): a request at C{now} is allowed when C{max(TAT, now) +
interval - tolerance <= now}, where C{interval} is the time one request
"costs" (the period over the rate's count) and C{tolerance} is C{burst *
interval}; allowing it moves the TAT on by one interval.  That is a token
bucket of C{burst} tokens refilled at the rate, stored as one time
instead of a count and a time, so the same arithmetic runs here (the local
limit, clock passed in) and in one Redis Lua script
(L{rproxy.ratelimit_redis}) on the server's clock.

Nothing a client sends can grow memory without bound: L{LocalBuckets}
holds at most C{max_keys} keys, those whose TAT has passed going first (they
hold no state: forgetting them changes nothing), then the oldest; and
L{Concurrency} holds only the keys with requests in flight.
"""

from __future__ import annotations

import itertools
import math

import attrs

__all__ = ["Decision", "gcra", "LocalBuckets", "Concurrency", "policy_header", "state_header", "retry_after"]

# a remaining count computed as 2.9999999 is 3
_EPSILON = 1e-9


@attrs.frozen
class Decision:
    """
    What a limit says of one request.

    @ivar allowed: whether it may go on.
    @ivar remaining: requests still allowed at once after this one.
    @ivar retry_after: seconds until a request would be allowed (0 when
        this one was).
    @ivar reset: seconds until the bucket is full again.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset: float


def gcra(tat: float, now: float, interval: float, tolerance: float) -> tuple[Decision, float]:
    """
    Decide one request.

    @param tat: the key's theoretical arrival time (0 or any past time
        for a key never seen).
    @param now: the time, on the clock C{tat} was made with.
    @param interval: seconds per request (the rate's period over its count).
    @param tolerance: C{burst * interval}.
    @return: the decision, and the key's new TAT (unchanged when refused).
    """
    if tat < now:
        tat = now
    new_tat = tat + interval
    diff = now - (new_tat - tolerance)
    if diff < -_EPSILON * interval:
        return Decision(False, 0, -diff, tat - now), tat
    return Decision(True, int(max(diff, 0.0) / interval + _EPSILON), 0.0, new_tat - now), new_tat


class LocalBuckets:
    """
    The TATs of one limit's keys in this process, at most C{max_keys}: when
    a new key finds the table full, the keys whose TAT has passed (they
    hold nothing) are dropped; if that frees less than a tenth of the
    table, the oldest keys go too.  A plain dict: the hot path is one
    C{get} and one store.

    @ivar tats: key -> theoretical arrival time.
    @ivar evicted: keys forgotten while still holding state (their TAT in
        the future): each such key starts afresh.
    """

    def __init__(self, interval: float, burst: int, max_keys: int = 100_000) -> None:
        self.interval = interval
        self.burst = burst
        self.tolerance = burst * interval
        self.max_keys = max_keys
        self.tats: dict[bytes, float] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.tats)

    def check(self, key: bytes, now: float) -> Decision:
        """
        Decide a request of C{key} at C{now} and remember the outcome.
        """
        tats = self.tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys:
                self.make_room(now)
            tat = 0.0
        decision, new_tat = gcra(tat, now, self.interval, self.tolerance)
        tats[key] = new_tat
        return decision

    def make_room(self, now: float) -> None:
        """
        Drop the idle keys; then, if fewer than a tenth of the table went,
        the oldest ones down to nine tenths of C{max_keys}.
        """
        tats = self.tats
        self.sweep(now)
        target = self.max_keys - max(1, self.max_keys // 10)
        if len(tats) > target:
            excess = len(tats) - target
            for key in list(itertools.islice(tats, excess)):
                del tats[key]
            self.evicted += excess

    def sweep(self, now: float) -> int:
        """
        Forget the keys whose TAT has passed (they hold nothing); returns
        how many.
        """
        stale = [k for k, tat in self.tats.items() if tat <= now]
        for key in stale:
            del self.tats[key]
        return len(stale)


class Concurrency:
    """
    Requests in flight per key, at most C{limit} each; only keys with a
    request in flight are held.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: dict[bytes, int] = {}

    def acquire(self, key: bytes) -> bool:
        """
        Take a slot for C{key}, if it has one free.
        """
        held = self.active.get(key, 0)
        if held >= self.limit:
            return False
        self.active[key] = held + 1
        return True

    def release(self, key: bytes) -> None:
        held = self.active.get(key, 0) - 1
        if held > 0:
            self.active[key] = held
        else:
            self.active.pop(key, None)


def retry_after(seconds: float) -> bytes:
    """
    A C{Retry-After} value: whole seconds, rounded up, at least 1.
    """
    return b"%d" % max(1, math.ceil(seconds - _EPSILON))


def policy_header(name: str, quota: int, window: float) -> bytes:
    """
    A C{RateLimit-Policy} item (draft-ietf-httpapi-ratelimit-headers):
    C{"NAME";q=QUOTA;w=WINDOW}, the window in whole seconds (at least 1).
    """
    return b'"%s";q=%d;w=%d' % (name.encode("ascii", "replace"), quota, max(1, math.ceil(window - _EPSILON)))


def state_header(name: str, remaining: int, reset: float) -> bytes:
    """
    A C{RateLimit} item: C{"NAME";r=REMAINING;t=SECONDS} (until the quota
    is whole again, rounded up).
    """
    return b'"%s";r=%d;t=%d' % (name.encode("ascii", "replace"), remaining, max(0, math.ceil(reset - _EPSILON)))
