"""
Keeping the stores connected: one reconnect loop for PostgreSQL's
connections and a probe loop that says whether Redis answers.

A store that goes away must cost a bounded number of connections and no
time on the traffic path.  L{PostgresLink} therefore runs exactly one
attempt at a time (connect C{size} connections, then prepare them: schema
migrations, LISTEN), backs off with jitter up to a cap between failed
attempts, and closes a set of connections before it opens the next one.
L{RedisProbe} pings Redis (every C{up_interval} while it answers, every
C{down_interval} while it does not), and the key chain asks it before
waiting on Redis, so a Redis known to be down costs nothing per request.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.store.postgres import ConnectionSet

__all__ = ["PostgresLink", "RedisProbe", "backoff", "why"]

log = Logger()


def backoff(attempt: int, rng: random.Random, base: float = 0.5, cap: float = 10.0) -> float:
    """
    Seconds to wait after the C{attempt}th failure in a row: exponential,
    capped, with "equal jitter" (half fixed, half random), so processes
    that lost the same server do not all come back in step, yet never
    retry in a tight loop.
    """
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def why(failure: Failure) -> str:
    """
    The first line of a failure's message (database errors run to
    several), or its type's name: what a log line should say.
    """
    text = (failure.getErrorMessage() or "").strip().splitlines()
    return text[0] if text else failure.type.__name__


class PostgresLink:
    """
    C{size} connections to PostgreSQL kept up by one reconnect loop.

    Invariants: at most one attempt is running or scheduled at any time
    (a connection lost while connecting fails that attempt; one lost while
    up starts the next one); the set of an attempt is closed before the
    next attempt opens its connections, so the link never holds more than
    C{size} connections.

    @param new_connection: makes one unconnected connection, given the
        function to call when that connection is lost.
    @param prepare: run on a freshly connected set before it is used
        (migrations, LISTEN); its failure fails the attempt.
    @param on_up: the set is ready to serve.
    @param on_down: the set in use (or the one just prepared) is gone;
        nothing may use it any more.  Called again harmlessly.
    """

    def __init__(self, clock: Any, new_connection: Callable[[Callable[[Any], None]], Any], dsn: str, size: int,
                 prepare: Callable[[ConnectionSet], Any], on_up: Callable[[ConnectionSet], None],
                 on_down: Callable[[], None], rng: random.Random | None = None, base: float = 0.5,
                 cap: float = 10.0, attempt_timeout: float = 15.0) -> None:
        self._clock = clock
        self._new_connection = new_connection
        self._dsn = dsn
        self._size = size
        self._prepare = prepare
        self._on_up = on_up
        self._on_down = on_down
        self._rng = rng or random.Random()
        self._base = base
        self._cap = cap
        self._attempt_timeout = attempt_timeout
        #: "idle", "connecting", "up", "waiting" (for the next attempt) or "stopped"
        self.state = "idle"
        #: the set of the attempt running, or the one in use
        self.conns: ConnectionSet | None = None
        self.failures = 0
        self.attempts = 0
        self._broken = False
        self._retry: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._logged_down = False

    def start(self) -> None:
        if self.state == "idle":
            self._attempt()

    def _attempt(self) -> None:
        self._retry = None
        if self.state == "stopped":
            return
        assert self.conns is None, "a set is still open"
        self.state = "connecting"
        self.attempts += 1
        self._broken = False
        conns = self.conns = ConnectionSet([self._new_connection(self._lost) for _ in range(self._size)])
        self._deadline = self._clock.callLater(self._attempt_timeout, self._timed_out, conns)
        d = defer.Deferred.fromCoroutine(self._bring_up(conns))
        d.addCallbacks(self._connected, self._failed, callbackArgs=(conns,), errbackArgs=(conns,))
        d.addErrback(lambda f: log.failure("stores: handling a PostgreSQL attempt failed", f))

    async def _bring_up(self, conns: ConnectionSet) -> None:
        results = await defer.DeferredList([c.connect(self._dsn) for c in conns.connections], consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        if conns is self.conns:
            await self._prepare(conns)

    def _connected(self, _: Any, conns: ConnectionSet) -> None:
        if conns is not self.conns or self.state != "connecting":
            return  # an attempt that timed out or was stopped
        if self._broken:
            self._failed(Failure(ConnectionError("a connection was lost while connecting")), conns)
            return
        self._cancel_deadline()
        self.state = "up"
        self.failures = 0
        self._logged_down = False
        log.info("stores: PostgreSQL is up ({size} connections)", size=self._size)
        self._on_up(conns)

    def _failed(self, failure: Failure, conns: ConnectionSet) -> None:
        if conns is not self.conns or self.state != "connecting":
            return
        self._cancel_deadline()
        self._close()
        self._on_down()  # prepare may have handed the set out (LISTEN)
        self.failures += 1
        delay = backoff(self.failures, self._rng, self._base, self._cap)
        if not self._logged_down:
            self._logged_down = True
            log.warn("stores: PostgreSQL unavailable ({why}); static keys and cached data serve; retrying",
                     why=why(failure))
        self._wait(delay)

    def _timed_out(self, conns: ConnectionSet) -> None:
        self._deadline = None
        self._failed(Failure(TimeoutError(f"no answer within {self._attempt_timeout:g}s")), conns)

    def _lost(self, conn: Any) -> None:
        """
        One connection of a set went away: while connecting, the attempt
        fails when it ends; while up, the whole set is closed and the next
        attempt scheduled (sets are replaced as a whole).
        """
        conns = self.conns
        if conns is None or conn not in conns:
            return  # a set already closed
        if self.state == "connecting":
            self._broken = True
            return
        if self.state != "up":
            return
        self._close()
        self._on_down()
        log.warn("stores: PostgreSQL connection lost; retrying")
        self._logged_down = True
        self.failures = 1
        self._wait(backoff(1, self._rng, self._base, self._cap))

    def _wait(self, delay: float) -> None:
        if self.state == "stopped":
            return
        self.state = "waiting"
        self._retry = self._clock.callLater(delay, self._attempt)

    def _close(self) -> None:
        conns, self.conns = self.conns, None
        if conns is not None:
            conns.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def stop(self) -> None:
        """
        No more attempts; the connections are closed.
        """
        was_up = self.state == "up"
        self.state = "stopped"
        self._cancel_deadline()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._close()
        if was_up:
            self._on_down()


class RedisProbe:
    """
    Whether Redis answers, kept current by pinging it, and told at once by
    callers whose commands failed.  While Redis is down it is pinged every
    C{down_interval}, so its return is noticed within C{down_interval} plus
    the client's reconnect delay.

    @ivar state: "connecting", "up" or "down".
    @ivar postgres: whether key checks go to PostgreSQL while Redis is
        down (else to the static keys only): what the log says.
    @ivar events: whether events go to Redis (they wait while it is down).
    """

    def __init__(self, redis: Any, clock: Any, up_interval: float = 2.0, down_interval: float = 0.5,
                 timeout: float = 1.0, postgres: bool = True, events: bool = True) -> None:
        self.redis = redis
        self.clock = clock
        self.postgres = postgres
        self.events = events
        self.up_interval = up_interval
        self.down_interval = down_interval
        self.timeout = timeout
        self.state = "connecting"
        self.pings = 0
        self._last_ping = float("-inf")
        self._loop: task.LoopingCall | None = None

    def usable(self) -> bool:
        """
        False when Redis is known to be down: do not wait on it.
        """
        return self.state != "down"

    def failed(self, why: str) -> None:
        """
        A command timed out or failed: Redis is down until a ping answers.
        """
        self._set("down", why)

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.down_interval, now=True).addErrback(
            lambda f: log.failure("stores: the Redis probe loop stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> Any:
        now = self.clock.seconds()
        if self.state == "up" and now - self._last_ping < self.up_interval:
            return None
        self._last_ping = now
        self.pings += 1
        try:
            d = self.redis.ping()
        except Exception as e:  # noqa: BLE001 - a client that cannot even queue the ping: down
            self._set("down", type(e).__name__)
            return None
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(lambda _: self._set("up", ""), lambda f: self._set("down", self._why(f)))
        return d  # the loop waits for it, so pings never overlap

    def _why(self, failure: Failure) -> str:
        """
        Why a ping failed, in words: its timeout's (whose message is
        the raw arguments of C{TimeoutError}) or its failure's (L{why}).
        """
        if failure.check(defer.TimeoutError):
            return f"no answer within {self.timeout:g}s"
        return why(failure)

    def _set(self, state: str, why: str) -> None:
        if state == self.state:
            return
        self.state = state
        if state == "up":
            log.info("stores: Redis is up")
        else:
            log.warn("stores: Redis unavailable ({why}); key checks go to {fallback}{events}", why=why,
                     fallback="PostgreSQL" if self.postgres else "the static keys",
                     events=", events wait" if self.events else "")
