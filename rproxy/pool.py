"""
Pools of servers: who is up, who is busy, who gets the next connection.

A L{Pool} is the runtime side of one C{backends:} entry.  It owns its
L{Server}s, asks its balancer to choose among the ones that can take a
connection, keeps a bounded FIFO of connections waiting for a server slot
when every server is at its C{max_connections}, and applies passive
ejection (consecutive connect failures take a server out for a cooldown
that grows each time it happens again).

Invariants:
  - C{Server.active} counts the connections a server holds right now: it
    goes up in L{Pool.acquire} and down in L{Pool.release}, exactly once
    each per connection.
  - A server that is down, ejected, draining (removed by a reload), set
    to C{drain} or C{maint} by an operator, or full is never picked.
  - An operator's C{admin_state} and runtime weight stay with the server
    while a reload leaves its configuration unchanged; a reload that
    changes it gives the file the last word.
  - Backups are picked only when no primary can be.
  - Passive ejection never takes out more than C{max_ejection_percent} of
    the pool's servers.
  - A backend's circuit breaker (Envoy's thresholds, L{CircuitBreaker})
    refuses at once, with the threshold named (L{CircuitOpen}), what would
    exceed one: C{max_connections} slots taken on its servers,
    C{max_pending} waiting in the queue, C{max_retries} retries in flight
    (counted by the HTTP engine's filter); C{max_requests} is checked by
    that filter when a request is routed here.
  - A server that comes back (down -> up, or back to ready from drain or
    maint) with C{slow_start} set takes
    a share of new connections that grows linearly from 0 to its full
    weight over the window (HAProxy's C{slowstart}): during the ramp it is
    a candidate in that fraction of picks (for hashing pools: for that
    fraction of the keys, so the keys that move to it stay).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rproxy.balance import Balancer, hash_fraction, make_balancer
from rproxy.config import BackendConfig, ServerConfig

__all__ = ["Server", "Pool", "NoServerAvailable", "QueueFull", "QueueTimeout", "AdminError", "ADMIN_STATES",
           "MAX_WEIGHT", "CircuitOpen", "CircuitBreaker", "THRESHOLDS"]

_NEVER = float("inf")

# what an operator may set (HAProxy's "set server ... state"): ready takes
# connections; drain takes no new ones and lets open ones finish; maint
# is drain the operator means to last (the server is being worked on)
ADMIN_STATES = ("ready", "drain", "maint")
# the configuration's bound on weight (backends[].servers[].weight)
MAX_WEIGHT = 1000


class AdminError(ValueError):
    """
    An operator's change a pool cannot make: no such server, an unknown
    state, a weight out of range.
    """


class NoServerAvailable(Exception):
    """
    No server of the pool is up.
    """


class QueueFull(Exception):
    """
    Every server is at its connection limit and the wait queue is full.
    """


class CircuitOpen(QueueFull):
    """
    A threshold of the backend's circuit breaker is reached: refused at
    once (a kind of L{QueueFull}, so callers answer 503 with the message).
    """


# the circuit breaker's thresholds, in the order they are checked
THRESHOLDS = ("max_connections", "max_pending", "max_requests", "max_retries")


class CircuitBreaker:
    """
    The thresholds of one backend and what they are compared with; one per
    pool for its lifetime (a reload changes the thresholds, not the counts).

    @ivar requests: HTTP requests routed to the backend and not over yet
        (kept by L{rproxy.http.filters.circuitbreaker}).
    @ivar retries: retries in flight to the backend (same).
    @ivar opened: threshold name -> requests refused by it.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.requests = 0
        self.retries = 0
        self.opened: dict[str, int] = dict.fromkeys(THRESHOLDS, 0)

    def trip(self, threshold: str) -> CircuitOpen:
        """
        Count a refusal by C{threshold}; the exception that says why.
        """
        self.opened[threshold] += 1
        return CircuitOpen(f"circuit breaker: {threshold} {getattr(self.config, threshold)} reached")

    def refusal(self, in_use: int, retry: bool) -> str | None:
        """
        The threshold a new slot would exceed, or None.
        """
        config = self.config
        if config.max_connections and in_use >= config.max_connections:
            return "max_connections"
        if retry and config.max_retries and self.retries >= config.max_retries:
            return "max_retries"
        return None


class QueueTimeout(Exception):
    """
    A connection waited C{queue_timeout} for a server slot and got none.
    """


@attrs.define(eq=False)
class Server:
    """
    One backend server and its live state.
    """

    config: ServerConfig
    pool_name: str
    up: bool = True
    draining: bool = False
    active: int = 0
    total: int = 0
    connect_failures: int = 0
    consecutive_failures: int = 0
    check_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    last_ejection_end: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    down_reason: str = ""
    # set by the operator (runtime API, dashboard): ready | drain | maint
    admin_state: str = "ready"
    # the balancers' weight: the configuration's unless an operator set one
    weight: int = -1
    weight_set: bool = False
    # the last active health check: None before the first one
    last_check_ok: bool | None = None
    last_check_reason: str = ""
    last_check_at: float = 0.0
    # slow start: when the server last came up, and its share's credit
    ramp_start: float = 0.0
    ramp_credit: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.weight < 0:
            self.weight = self.config.weight

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def full(self) -> bool:
        limit = self.config.max_connections
        return limit > 0 and self.active >= limit

    def usable(self, now: float) -> bool:
        """
        Up, not ejected, not draining and ready (it may still be full).
        """
        return (self.up and not self.draining and self.admin_state == "ready"
                and not self.ejected_until > now)

    def state(self, now: float) -> str:
        if self.draining or self.admin_state == "drain":
            return "draining"
        if self.admin_state == "maint":
            return "maintenance"
        if not self.up:
            return "down"
        if self.ejected(now):
            return "ejected"
        return "up"


@attrs.define(eq=False)
class _Waiter:
    deferred: defer.Deferred[Server]
    key: bytes | None
    exclude: frozenset[str]
    timeout: IDelayedCall | None = None


class Pool:
    """
    The servers of one backend, with their balancer and wait queue.
    """

    log = Logger()

    def __init__(
        self,
        config: BackendConfig,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.config = config
        self.balancer: Balancer = make_balancer(config.algorithm, rng)
        self.servers: list[Server] = [Server(s, config.name) for s in config.servers]
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._wake: IDelayedCall | None = None
        self.queue_full_total = 0
        self.queue_timeout_total = 0
        self.no_server_total = 0
        self._listeners: list[Callable[[Server, bool, str], None]] = []
        self._moved_listeners: list[Callable[[Server], None]] = []
        # candidates() without exclusions is cached while nothing that
        # decides it changes: _version moves on every up/down, ejection and
        # reload; the cache also ends when the next ejection does.  Pools
        # with per-server limits are not cached (fullness changes per
        # connection).
        self._version = 0
        self._cache: tuple[int, float, list[Server]] | None = None
        self._limited = any(s.max_connections for s in config.servers)
        self.breaker: CircuitBreaker | None = (CircuitBreaker(config.circuit_breaker)
                                               if config.circuit_breaker is not None else None)
        # slots taken on the servers (the sum of their active counts)
        self.in_use = 0
        # servers in their slow start ramp
        self._ramping: list[Server] = []
        self._ramp_balancer: Balancer | None = None

    @property
    def name(self) -> str:
        return self.config.name

    # -- choosing --------------------------------------------------------

    def candidates(self, exclude: Iterable[str] = ()) -> list[Server]:
        """
        The servers that could take a connection now: usable and not full;
        primaries if any of them qualifies, else backups.
        """
        cacheable = not exclude and not self._limited
        if cacheable:
            cache = self._cache
            # (no clock reading while no server is ejected: the common case)
            if cache is not None and cache[0] == self._version and (
                cache[1] == _NEVER or self._clock.seconds() < cache[1]
            ):
                return cache[2]
        now = self._clock.seconds()
        primaries: list[Server] = []
        backups: list[Server] = []
        for s in self.servers:
            if s.usable(now) and not s.full() and s.name not in exclude:
                (backups if s.config.backup else primaries).append(s)
        result = primaries or backups
        if cacheable:
            until = min((s.ejected_until for s in self.servers if s.ejected_until > now), default=_NEVER)
            self._cache = (self._version, until, result)
        return result

    def pick(self, key: bytes | None = None, exclude: Iterable[str] = ()) -> Server | None:
        """
        Choose a server without taking a slot on it.
        """
        candidates = self.candidates(exclude)
        chosen: Server | None = self.balancer.pick(candidates, key)  # type: ignore[assignment]
        if self._ramping and chosen is not None:
            chosen = self._ramp(chosen, candidates, key)
        return chosen

    def any_up(self, exclude: Iterable[str] = ()) -> bool:
        """
        Whether some server is usable (perhaps full), not counting excluded ones.
        """
        now = self._clock.seconds()
        return any(s.usable(now) and s.name not in exclude for s in self.servers)

    def try_acquire(self, key: bytes | None = None, exclude: Iterable[str] = ()) -> Server | None:
        """
        Take a connection slot on a server if one is free now, without
        waiting (the common case, with no Deferred to pay for).
        """
        if self._waiters:
            return None  # first come, first served
        breaker = self.breaker
        if breaker is not None and breaker.refusal(self.in_use, bool(exclude)) is not None:
            return None  # acquire() says why
        cache = self._cache
        if (cache is not None and not exclude and not self._limited and cache[0] == self._version
                and cache[1] == _NEVER):
            candidates = cache[2]  # (candidates(), without a call while no server is ejected)
        else:
            candidates = self.candidates(exclude)
        server: Server | None = self.balancer.pick(candidates, key)  # type: ignore[assignment]
        if self._ramping and server is not None:
            server = self._ramp(server, candidates, key)
        if server is not None:
            server.active += 1
            server.total += 1
            self.in_use += 1
        return server

    def try_acquire_named(self, name: str) -> Server | None:
        """
        Take a slot on the server called C{name} if it can take one now
        (a sticky cookie's server); None if it is unknown, down or full.
        """
        breaker = self.breaker
        if breaker is not None and breaker.refusal(self.in_use, False) is not None:
            return None
        now = self._clock.seconds()
        for server in self.servers:
            if server.name == name:
                if server.usable(now) and not server.full():
                    self._take(server)
                    return server
                return None
        return None

    def acquire(self, key: bytes | None = None, exclude: Iterable[str] = ()) -> defer.Deferred[Server]:
        """
        Take a connection slot on a server, waiting in the queue if every
        usable server is full.

        @return: a Deferred firing with the L{Server} (whose C{active} is
            already counted) or failing with L{NoServerAvailable},
            L{QueueFull} or L{QueueTimeout}.  Cancelling it leaves the
            queue.
        """
        exclude = frozenset(exclude)
        breaker = self.breaker
        if breaker is not None:
            threshold = breaker.refusal(self.in_use, bool(exclude))
            if threshold is not None:
                return defer.fail(breaker.trip(threshold))
        server = None if self._waiters else self.pick(key, exclude)
        if server is not None:
            self._take(server)
            return defer.succeed(server)
        if not self.any_up(exclude):
            self.no_server_total += 1
            return defer.fail(NoServerAvailable(f"no server of backend {self.name!r} is up"))
        if breaker is not None and breaker.config.max_pending and len(self._waiters) >= breaker.config.max_pending:
            return defer.fail(breaker.trip("max_pending"))
        if len(self._waiters) >= self.config.queue_size:
            self.queue_full_total += 1
            return defer.fail(QueueFull(f"backend {self.name!r}: every server is full and the queue too"))

        def cancel(d: defer.Deferred[Server]) -> None:
            self._drop_waiter(waiter)

        waiter = _Waiter(defer.Deferred(cancel), key, exclude)

        def expire() -> None:
            waiter.timeout = None
            self._drop_waiter(waiter)
            self.queue_timeout_total += 1
            waiter.deferred.errback(
                QueueTimeout(f"backend {self.name!r}: no server slot within {self.config.queue_timeout}s")
            )

        waiter.timeout = self._clock.callLater(self.config.queue_timeout, expire)
        self._waiters.append(waiter)
        return waiter.deferred

    def _take(self, server: Server) -> None:
        server.active += 1
        server.total += 1
        self.in_use += 1

    def _drop_waiter(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        if waiter.timeout is not None and waiter.timeout.active():
            waiter.timeout.cancel()
        waiter.timeout = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def release(self, server: Server, succeeded: bool = False) -> None:
        """
        Give back the slot taken by L{acquire}; C{succeeded}: after a
        success, recorded first (L{record_success}).
        """
        if succeeded and (server.consecutive_failures or server.ejections):
            self.record_success(server)  # (nothing to record otherwise)
        server.active -= 1
        self.in_use -= 1
        if self._waiters:
            self._serve_waiters()

    def _serve_waiters(self) -> None:
        breaker = self.breaker
        while self._waiters:
            waiter = self._waiters[0]
            if breaker is not None and breaker.config.max_connections and \
                    self.in_use >= breaker.config.max_connections:
                return
            server = self.pick(waiter.key, waiter.exclude)
            if server is None:
                if not self.any_up(waiter.exclude):
                    self._drop_waiter(waiter)
                    self.no_server_total += 1
                    waiter.deferred.errback(NoServerAvailable(f"no server of backend {self.name!r} is up"))
                    continue
                return
            self._drop_waiter(waiter)
            self._take(server)
            waiter.deferred.callback(server)

    # -- slow start ------------------------------------------------------

    def _start_ramp(self, server: Server) -> None:
        """
        C{server} has just become able to take connections again: its
        share starts from 0 (with C{slow_start}).
        """
        if self.config.slow_start > 0:
            server.ramp_start = self._clock.seconds()
            server.ramp_credit = 0.0
            if server not in self._ramping:
                self._ramping.append(server)

    def ramp_fraction(self, server: Server, now: float | None = None) -> float:
        """
        How far C{server} is through its slow start: 0 when it just came
        up, 1 when the window is over (or there is none).
        """
        window = self.config.slow_start
        if window <= 0 or server not in self._ramping:
            return 1.0
        if now is None:
            now = self._clock.seconds()
        return min(1.0, max(0.0, (now - server.ramp_start) / window))

    def _ramp(self, chosen: Server, candidates: list[Server], key: bytes | None) -> Server:
        """
        The balancer chose C{chosen}: if it is ramping at fraction C{f} of
        its window, it keeps C{f} of the picks it gets (its credit grows
        by C{f} each time and a kept pick costs 1; with a key, hashing
        pools, it keeps the keys whose hash falls below C{f}, so a key
        that moved stays); the others are chosen again among the rest.
        So its share is C{f} times its full share whatever the algorithm.
        A ramping server that is the only candidate keeps every pick.
        """
        ramping = self._ramping
        if chosen not in ramping:
            return chosen
        now = self._clock.seconds()
        window = self.config.slow_start
        elapsed = now - chosen.ramp_start
        if window <= 0 or elapsed >= window:
            ramping.remove(chosen)
            return chosen
        fraction = elapsed / window
        if key is not None:
            if hash_fraction(key) < fraction:
                return chosen
        else:
            chosen.ramp_credit += fraction
            if chosen.ramp_credit >= 1.0:
                chosen.ramp_credit -= 1.0
                return chosen
        rest = [s for s in candidates if s is not chosen and s not in ramping]
        if not rest:
            return chosen
        # (a balancer of its own: a second pick must not move the main
        # one's rotation, or round-robin would hand the ramping server the
        # next turn)
        if self._ramp_balancer is None:
            self._ramp_balancer = make_balancer(self.config.algorithm, self._rng)
        again: Server | None = self._ramp_balancer.pick(rest, key)  # type: ignore[assignment]
        return again if again is not None else chosen

    # -- health ----------------------------------------------------------

    def on_state_change(self, listener: Callable[[Server, bool, str], None]) -> None:
        """
        Call C{listener(server, up, reason)} whenever a server goes up or down.
        """
        self._listeners.append(listener)

    def on_moved(self, listener: Callable[[Server], None]) -> None:
        """
        Call C{listener(server)} for each server a reload leaves whose open
        connections must not serve another request: one whose address
        changed, every one when the backend's C{tls} or C{send_proxy}
        changed (their connections lead to what the file no longer names,
        or speak what it no longer asks for), removed ones, and every one
        of a pool that closes (its backend removed).
        """
        self._moved_listeners.append(listener)

    def set_up(self, server: Server, up: bool, reason: str) -> None:
        """
        Record the verdict of the active health check.
        """
        if server.up == up:
            return
        server.up = up
        self._version += 1
        server.down_reason = "" if up else reason
        if up and server.admin_state == "ready":
            self._start_ramp(server)
        if up:
            self.log.info(
                "server {server} of backend {backend} is up: {reason}",
                server=server.name, backend=self.name, reason=reason,
            )
            self._serve_waiters()
        else:
            self.log.warn(
                "server {server} of backend {backend} is down: {reason}",
                server=server.name, backend=self.name, reason=reason,
            )
        for listener in self._listeners:
            listener(server, up, reason)

    def record_success(self, server: Server) -> None:
        """
        A connection to C{server} was established.
        """
        server.consecutive_failures = 0
        if server.ejections and self._clock.seconds() - server.last_ejection_end > self.config.passive.max_ejection:
            server.ejections = 0

    def record_failure(self, server: Server, reason: str) -> None:
        """
        A connection to C{server} failed; eject it after enough in a row.
        """
        server.connect_failures += 1
        server.consecutive_failures += 1
        passive = self.config.passive
        now = self._clock.seconds()
        if (
            passive.consecutive_failures == 0
            or server.consecutive_failures < passive.consecutive_failures
            or server.ejected(now)
        ):
            return
        ejected = sum(1 for s in self.servers if s.ejected(now))
        if (ejected + 1) * 100 > passive.max_ejection_percent * len(self.servers):
            return
        server.ejections += 1
        self._version += 1
        cooldown = min(passive.ejection * server.ejections, max(passive.max_ejection, passive.ejection))
        server.ejected_until = now + cooldown
        server.last_ejection_end = server.ejected_until
        server.consecutive_failures = 0
        self.log.warn(
            "server {server} of backend {backend} ejected for {cooldown}s after "
            "{count} consecutive failures: {reason}",
            server=server.name, backend=self.name, cooldown=cooldown,
            count=passive.consecutive_failures, reason=reason,
        )
        self._schedule_wake(cooldown)

    def _schedule_wake(self, delay: float) -> None:
        """
        Re-examine the queue when an ejection ends.
        """
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= self._clock.seconds() + delay:
                return
            self._wake.cancel()

        def wake() -> None:
            self._wake = None
            self._serve_waiters()

        self._wake = self._clock.callLater(delay, wake)

    # -- operator --------------------------------------------------------

    def server(self, name: str) -> Server | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    def set_admin(self, name: str, state: str | None = None, weight: int | None = None,
                  by: str = "the admin API") -> Server:
        """
        An operator's change to server C{name}: its C{admin_state}, its
        weight, or both (checked before either is applied).  C{drain} and
        C{maint} stop new connections at once; open ones finish as they
        would.  Each change is logged once.

        @raise AdminError: no such server, unknown state, weight out of range.
        """
        server = self.server(name)
        if server is None:
            raise AdminError(f"backend {self.name!r} has no server {name!r}")
        if state is not None and state not in ADMIN_STATES:
            raise AdminError(f"state must be one of {', '.join(ADMIN_STATES)}")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)
                                   or not 0 <= weight <= MAX_WEIGHT):
            raise AdminError(f"weight must be an integer from 0 to {MAX_WEIGHT}")
        if state is not None and state != server.admin_state:
            self.log.info("server {server} of backend {backend}: {state} (was {before}), set by {by}",
                          server=name, backend=self.name, state=state, before=server.admin_state, by=by)
            server.admin_state = state
            if state == "ready" and server.up:
                self._start_ramp(server)  # back from drain or maintenance (HAProxy's rule too)
        if weight is not None and weight != server.weight:
            self.log.info("server {server} of backend {backend}: weight {weight} (was {before}), set by {by}",
                          server=name, backend=self.name, weight=weight, before=server.weight, by=by)
            server.weight = weight
            server.weight_set = weight != server.config.weight
        self._version += 1
        self._serve_waiters()
        return server

    # -- reload ----------------------------------------------------------

    def update(self, config: BackendConfig) -> list[Server]:
        """
        Apply a new configuration of this backend in place.

        Servers are matched by name: kept ones keep their state and their
        open connections; new ones start up; removed ones are marked
        draining and returned, so their open connections finish untouched.
        The L{on_moved} listeners hear of the servers whose connections
        must not be kept for another request.
        """
        if config.algorithm != self.config.algorithm:
            self.balancer = make_balancer(config.algorithm, self._rng)
            self._ramp_balancer = None
        reconnect_all = (config.tls, config.send_proxy) != (self.config.tls, self.config.send_proxy)
        old = {s.name: s for s in self.servers}
        servers = []
        moved = []
        for server_config in config.servers:
            server = old.pop(server_config.name, None)
            if server is None:
                server = Server(server_config, config.name)
            elif reconnect_all or server.config.address != server_config.address:
                moved.append(server)
            if server.config != server_config:
                # the file changed this server: its values win over the
                # operator's
                if server.admin_state != "ready" or server.weight_set:
                    self.log.info("server {server} of backend {backend}: changed by the reload; "
                                  "{state} and weight {weight} set at runtime are dropped",
                                  server=server.name, backend=config.name, state=server.admin_state,
                                  weight=server.weight)
                server.config = server_config
                server.admin_state = "ready"
                server.weight = server_config.weight
                server.weight_set = False
            servers.append(server)
        for server in old.values():
            server.draining = True
        self.servers = servers
        self.config = config
        self._limited = any(s.max_connections for s in config.servers)
        if config.circuit_breaker is None:
            self.breaker = None
        elif self.breaker is None:
            self.breaker = CircuitBreaker(config.circuit_breaker)
        else:
            self.breaker.config = config.circuit_breaker
        if config.slow_start <= 0:
            self._ramping = []
        else:
            self._ramping = [s for s in self._ramping if s in servers]
        self._version += 1
        self._tell_moved(moved + list(old.values()))
        self._serve_waiters()
        return list(old.values())

    def close(self) -> None:
        """
        Fail every waiter and cancel timers (the pool is going away); the
        L{on_moved} listeners hear of every server.
        """
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        while self._waiters:
            waiter = self._waiters[0]
            self._drop_waiter(waiter)
            waiter.deferred.errback(NoServerAvailable(f"backend {self.name!r} was removed"))
        self._tell_moved(self.servers)

    def _tell_moved(self, servers: list[Server]) -> None:
        for server in servers:
            for listener in self._moved_listeners:
                listener(server)

    # -- reporting -------------------------------------------------------

    def healthy_count(self) -> int:
        now = self._clock.seconds()
        return sum(1 for s in self.servers if s.usable(now))

    def describe(self) -> dict[str, Any]:
        """
        The pool in the configuration's words (backend, server, algorithm),
        for /health and the dashboard.
        """
        now = self._clock.seconds()
        return {
            "name": self.name,
            "algorithm": self.config.algorithm,
            "servers_total": len(self.servers),
            "servers_up": self.healthy_count(),
            "waiting": len(self._waiters),
            "servers": [
                {
                    "name": s.name,
                    "address": s.config.address,
                    "weight": s.weight,
                    "configured_weight": s.config.weight,
                    "effective_weight": round(s.weight * self.ramp_fraction(s, now), 2),
                    "backup": s.config.backup,
                    "state": s.state(now),
                    "admin_state": s.admin_state,
                    "healthy": s.up,
                    "reason": s.down_reason,
                    "last_check": None if s.last_check_ok is None else {
                        "ok": s.last_check_ok, "reason": s.last_check_reason,
                        "ago": round(now - s.last_check_at, 3)},
                    "active_connections": s.active,
                    "total_connections": s.total,
                    "connect_failures": s.connect_failures,
                    "ejections": s.ejections,
                }
                for s in self.servers
            ],
        }

    def stats(self) -> dict[str, object]:
        """
        The pool as the VK gateway's C{/stats} shows it.
        """
        now = self._clock.seconds()
        return {
            "name": self.name,
            "load_balancer": self.config.algorithm,
            "total_backends": len(self.servers),
            "healthy_backends": self.healthy_count(),
            "waiting": len(self._waiters),
            "backends": [
                {
                    "server_id": s.name,
                    "server_name": s.name,
                    "server_url": s.config.address,
                    "weight": s.weight,
                    "backup": s.config.backup,
                    "state": s.state(now),
                    "admin_state": s.admin_state,
                    "is_healthy": s.usable(now),
                    "reason": s.down_reason,
                    "consecutive_failures": max(s.consecutive_failures, s.check_failures),
                    "active_connections": s.active,
                    "total_connections": s.total,
                    "connect_failures": s.connect_failures,
                    "ejections": s.ejections,
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                }
                for s in self.servers
            ],
        }
