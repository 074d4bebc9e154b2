"""
Rate limits shared through Redis: the GCRA of L{rproxy.ratelimit} in one
Lua script, so a decision is one round trip (C{EVALSHA}) and atomic, on
Redis's clock (processes and nodes need not agree on the time).

The decisions have a connection of their own, L{GCRAConnection}: a
pipelined RESP client that sends only this script and reads only its
replies.  txredisapi (what the stores use) costs some 30 us of CPU per
command on this path; this costs a few, and the proxy's one thread is
what a shared limit would otherwise slow down.

Redis must never stall traffic: a decision waits at most the limit's
C{redis_timeout} (one timer per connection, not one per request: replies
come in order), and when Redis is known to be down (the stores' probe,
L{rproxy.store.links.RedisProbe}, says so, a command just failed or timed
out, or this connection is not up) the process's own buckets decide at
once.

The store a process uses is registered here by L{rproxy.store.manager.Stores}
(L{start}, L{stop}); filters read L{current} per request.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
from typing import Any
from urllib.parse import urlparse

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.ratelimit import Decision

__all__ = ["SCRIPT", "SCRIPT_SHA", "SharedBuckets", "GCRAConnection", "RedisError", "LATENCY_BUCKETS", "start",
           "stop", "current"]

log = Logger()

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
_EVALSHA = b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + SCRIPT_SHA.encode() + b"\r\n$1\r\n1\r\n"
_EVAL = b"*6\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(SCRIPT), SCRIPT)
# replies kept waiting while their request is not answered
MAX_IN_FLIGHT = 10_000
# the histogram of decision round trips (seconds); the last is +Inf
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, float("inf"))


class RedisError(Exception):
    """
    Redis answered an error (C{-ERR ...}).
    """


def _command(prefix: bytes, key: bytes, interval: int, tolerance: int) -> bytes:
    a, b = b"%d" % interval, b"%d" % tolerance
    return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (prefix, len(key), key, len(a), a, len(b), b)


def _plain(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class _Pending:
    __slots__ = ("deferred", "sent", "deadline", "retry")

    def __init__(self, deferred: defer.Deferred[Any] | None, sent: float, deadline: float,
                 retry: bytes | None) -> None:
        self.deferred = deferred  # None: a reply to skip (AUTH, SELECT, or one that timed out)
        self.sent = sent
        self.deadline = deadline
        self.retry = retry  # the command as EVAL, if Redis forgot the script


class GCRAConnection(Protocol):
    """
    One pipelined connection to Redis running the GCRA script: commands
    written as they come (Twisted sends one turn's writes together),
    replies matched to them in order.
    """

    def __init__(self, store: SharedBuckets) -> None:
        self.store = store
        self._buffer = b""
        self._pending: collections.deque[_Pending] = collections.deque()
        self._timer: IDelayedCall | None = None
        self.lost = False

    def connectionMade(self) -> None:
        store = self.store
        if store.password is not None:
            self.transport.write(_plain(b"AUTH", store.password.encode()))  # type: ignore[union-attr]
            self._pending.append(_Pending(None, 0.0, float("inf"), None))
        if store.db:
            self.transport.write(_plain(b"SELECT", b"%d" % store.db))  # type: ignore[union-attr]
            self._pending.append(_Pending(None, 0.0, float("inf"), None))
        store.connected(self)

    def check(self, key: bytes, interval: int, tolerance: int, timeout: float) -> defer.Deferred[Decision]:
        if len(self._pending) >= MAX_IN_FLIGHT:
            return defer.fail(RedisError("too many commands in flight"))
        d: defer.Deferred[Decision] = defer.Deferred()
        clock = self.store.clock
        now = clock.seconds()
        deadline = now + timeout
        self.transport.write(_command(_EVALSHA, key, interval, tolerance))  # type: ignore[union-attr]
        self._pending.append(_Pending(d, now, deadline, None if self.store.script_loaded else
                                      _command(_EVAL, key, interval, tolerance)))
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(timeout, self._expire)
        elif timer.getTime() > deadline:
            timer.reset(timeout)  # (a shorter timeout than those in flight)
        return d

    def _expire(self) -> None:
        """
        Fail the commands past their deadline (their replies, when they
        come, are skipped); look again at the next deadline.
        """
        self._timer = None
        now = self.store.clock.seconds()
        late = 0
        following = float("inf")
        for pending in self._pending:
            d = pending.deferred
            if d is None:
                continue
            if pending.deadline <= now:
                pending.deferred = None
                late += 1
                if not d.called:
                    self.store.failed("TimeoutError")
                    d.errback(defer.TimeoutError("no answer from Redis within the limit's redis_timeout"))
            elif pending.deadline < following:
                following = pending.deadline
        if following != float("inf"):
            self._timer = self.store.clock.callLater(max(0.0, following - now), self._expire)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        size = len(buf)
        pending = self._pending
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            kind = buf[pos]
            reply: Any
            if kind == 42:  # *: the script's array of integers
                count = int(buf[pos + 1:end])
                values = []
                at = end + 2
                for _ in range(count):
                    line_end = buf.find(b"\r\n", at)
                    if line_end < 0:
                        break
                    values.append(int(buf[at + 1:line_end]))
                    at = line_end + 2
                else:
                    pos = at
                    reply = values
                    self._answer(pending.popleft(), reply)
                    continue
                break  # incomplete
            if kind == 36:  # $: a bulk string (not expected): skip it
                length = int(buf[pos + 1:end])
                if length >= 0:
                    if size < end + 2 + length + 2:
                        break
                    end = end + 2 + length
                reply = None
            elif kind == 45:  # -: an error
                reply = RedisError(buf[pos + 1:end].decode("utf-8", "replace"))
            else:  # + or :
                reply = None
            pos = end + 2
            if not pending:
                self._protocol_error("a reply nobody asked for")
                return
            self._answer(pending.popleft(), reply)
        self._buffer = buf[pos:] if pos < size else b""
        if len(self._buffer) > 65536:
            self._protocol_error("an oversized reply")

    def _answer(self, pending: _Pending, reply: Any) -> None:
        d = pending.deferred
        if isinstance(reply, RedisError):
            if pending.retry is not None and str(reply).startswith("NOSCRIPT"):
                # Redis (restarted, flushed) forgot the script: EVAL loads it
                # again, in this command's place in the order
                self.transport.write(pending.retry)  # type: ignore[union-attr]
                self._pending.append(pending)
                self.store.script_loaded = False
                return
            if str(reply).startswith("NOSCRIPT"):
                self.store.script_loaded = False  # (flushed: the next commands carry the EVAL)
            if d is not None and not d.called:
                self.store.errors += 1  # (an answer: Redis is up)
                d.errback(reply)
            return
        if d is None or d.called:
            return  # timed out (or cancelled) before the reply came
        store = self.store
        if pending.retry is not None:
            store.script_loaded = True
        elapsed = store.clock.seconds() - pending.sent
        store.latency_sum += elapsed
        store.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        if isinstance(reply, list) and len(reply) == 4:
            allowed, remaining, retry_after, reset = reply
            d.callback(Decision(allowed == 1, remaining, retry_after / 1e6, reset / 1e6))
        else:
            store.errors += 1
            d.errback(RedisError(f"unexpected reply {reply!r}"))

    def _protocol_error(self, what: str) -> None:
        log.warn("rate limits: Redis sent {what}; reconnecting", what=what)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, collections.deque()
        for p in pending:
            if p.deferred is not None and not p.deferred.called:
                self.store.failed("ConnectionLost")
                p.deferred.errback(error.ConnectionLost("the Redis connection was lost"))
        self.store.disconnected(self)


class _Factory(ReconnectingClientFactory):
    maxDelay = 1.0
    noisy = False

    def __init__(self, store: SharedBuckets) -> None:
        self.store = store

    def buildProtocol(self, addr: Any) -> GCRAConnection:
        self.resetDelay()
        conn = GCRAConnection(self.store)
        conn.factory = self
        return conn


class SharedBuckets:
    """
    The limits' view of Redis: its connection (when up) and the stores'
    probe.

    @ivar errors: commands that failed, timed out or found no connection.
    """

    def __init__(self, clock: Any, probe: Any = None, password: str | None = None, db: int = 0) -> None:
        self.clock = clock
        self.probe = probe
        self.password = password
        self.db = db
        self.connection: GCRAConnection | None = None
        self.script_loaded = False
        self.errors = 0
        # round trips of the decisions answered (LATENCY_BUCKETS)
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self._factory: _Factory | None = None
        self._connector: Any = None

    @classmethod
    def connect(cls, reactor: Any, url: str, clock: Any = None, probe: Any = None) -> SharedBuckets:
        """
        Connect to the Redis at C{url} (C{redis://[:password@]host[:port][/db]}),
        and stay connected (reconnecting within a second of its return).
        """
        parsed = urlparse(url)
        store = cls(clock or reactor, probe, parsed.password, int((parsed.path or "/0").lstrip("/") or 0))
        store._factory = _Factory(store)
        store._factory.clock = reactor
        store._connector = reactor.connectTCP(parsed.hostname or "127.0.0.1", parsed.port or 6379, store._factory)
        return store

    def close(self) -> None:
        if self._factory is not None:
            self._factory.stopTrying()
        if self.connection is not None:
            self.connection.transport.loseConnection()  # type: ignore[union-attr]
        elif self._connector is not None:
            self._connector.disconnect()

    def connected(self, connection: GCRAConnection) -> None:
        self.connection = connection

    def disconnected(self, connection: GCRAConnection) -> None:
        if self.connection is connection:
            self.connection = None
            self.script_loaded = False

    def usable(self) -> bool:
        """
        False while Redis is known to be down: decide locally, at once.
        """
        return self.connection is not None and (self.probe is None or self.probe.usable())

    def check(self, key: bytes, interval: float, tolerance: float, timeout: float) -> defer.Deferred[Decision]:
        """
        One GCRA decision for C{key} in Redis.  Fails (after at most
        C{timeout} seconds) when Redis does not answer: the caller decides
        locally then; the probe is told.
        """
        connection = self.connection
        if connection is None:
            self.failed("ConnectionLost")
            return defer.fail(error.ConnectionLost("no connection to Redis"))
        return connection.check(key, int(interval * 1e6) or 1, int(tolerance * 1e6), timeout)

    def failed(self, why: str) -> None:
        """
        A decision found no connection, timed out or was lost: counted,
        and the probe told (Redis is down until a ping answers).
        """
        self.errors += 1
        if self.probe is not None:
            self.probe.failed(why)


#: the store of this process's Redis (set by the stores), or None
current: SharedBuckets | None = None


def start(reactor: Any, clock: Any, url: str, probe: Any) -> SharedBuckets:
    """
    Share the limits through the Redis at C{url} from now on.
    """
    global current
    current = SharedBuckets.connect(reactor, url, clock, probe)
    return current


def stop(store: SharedBuckets | None) -> None:
    """
    Stop sharing through C{store} (it is closed).
    """
    global current
    if store is None:
        return
    if current is store:
        current = None
    store.close()
