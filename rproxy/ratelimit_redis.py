"""
Rate limits shared through Redis: the GCRA of L{rproxy.ratelimit} in one
Lua script, so a decision is one round trip (C{EVALSHA}) and atomic, on
Redis's clock (processes and nodes need not agree on the time).

Redis must never stall traffic: a decision waits at most the limit's
C{redis_timeout}, and when Redis is known to be down (the probe of
L{rproxy.store.links.RedisProbe} says so, or a command just failed) the
process's own buckets decide at once, until the probe sees Redis again.

The store a process uses is registered here by L{rproxy.store.manager.Stores}
(L{use}); filters read L{current} per request, so a Redis configured or
gone after a frontend was built is noticed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from rproxy.ratelimit import Decision

__all__ = ["SCRIPT", "SCRIPT_SHA", "SharedBuckets", "use", "current"]

# KEYS[1]: the key's TAT (microseconds on Redis's clock, as an integer
# string); ARGV[1]: the interval, ARGV[2]: the tolerance (burst *
# interval), both in microseconds.  Returns {allowed, remaining,
# retry_after, reset} (the last two in microseconds).  The key expires
# when its TAT passes: it then holds nothing.
SCRIPT = b"""
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local diff = now - (new_tat - tolerance)
if diff < 0 then
  return {0, 0, math.ceil(-diff), math.ceil(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor(diff / interval + 1e-9), 0, math.ceil(new_tat - now)}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest()


class SharedBuckets:
    """
    A Redis client and its probe, as the limits use them.

    @ivar errors: commands that failed or timed out.
    """

    def __init__(self, redis: Any, probe: Any, clock: Any) -> None:
        self.redis = redis
        self.probe = probe
        self.clock = clock
        self.errors = 0

    def usable(self) -> bool:
        """
        False while Redis is known to be down: decide locally, at once.
        """
        return self.probe is None or self.probe.usable()

    def check(self, key: bytes, interval: float, tolerance: float, timeout: float) -> defer.Deferred[Decision]:
        """
        One GCRA decision for C{key} in Redis.  Fails (after at most
        C{timeout} seconds) when Redis does not answer: the caller decides
        locally then; the probe is told.
        """
        args = (int(interval * 1e6) or 1, int(tolerance * 1e6))
        try:
            d = self.redis.evalsha(SCRIPT_SHA, (key,), args)
        except Exception:  # noqa: BLE001 - a client that cannot even queue the command
            d = defer.fail()
        d.addErrback(self._no_script, key, args)
        d.addTimeout(timeout, self.clock)
        d.addCallbacks(_decision, self._failed)
        return d

    def _no_script(self, failure: Failure, key: bytes, args: tuple[int, int]) -> Any:
        # a Redis that restarted (or was flushed) has forgotten the script:
        # EVAL loads it again (once; then EVALSHA finds it)
        message = failure.getErrorMessage() or ""
        if "NOSCRIPT" in message or "No script" in message:
            return self.redis.eval(SCRIPT, (key,), args)
        return failure

    def _failed(self, failure: Failure) -> Failure:
        if not failure.check(defer.CancelledError):
            self.errors += 1
            if self.probe is not None:
                self.probe.failed(failure.type.__name__)
        return failure


def _decision(reply: Any) -> Decision:
    allowed, remaining, retry_after, reset = (int(x) for x in reply)
    return Decision(bool(allowed), remaining, retry_after / 1e6, reset / 1e6)


#: the store of this process's Redis (set by the stores), or None
current: SharedBuckets | None = None


def use(store: SharedBuckets | None) -> None:
    """
    Share the limits through C{store} from now on (None: no Redis).
    """
    global current
    current = store
