"""
Rate limits of an HTTP frontend and its routes (C{rate_limit:}): requests
per key (client address, API key, a header's value) by GCRA
(L{rproxy.ratelimit}), and requests in flight per key.

A request over a limit is answered 429 with C{Retry-After} and the
C{RateLimit-Policy} / C{RateLimit} fields of
draft-ietf-httpapi-ratelimit-headers, on its kept connection, the body the
frontend's error shape (OpenAI's on a tunnel's C{mode: http} port);
allowed responses carry the latter two as well (unless the limit says
C{headers: false}).  With a Redis
registered (L{rproxy.ratelimit_redis}) the rates are shared by every
process using it; when Redis is down or slower than C{redis_timeout} the
process's own buckets decide, and that is counted.

Concurrency is counted in this process only: a slot is taken once every
rate allowed the request and given back in the log phase (or when the
client connection closes first).

An API key is the C{Authorization: Bearer} token, hashed at once: neither
the key nor its hash is logged or sent to Redis in the clear.  A request
without the key or header a limit is keyed on is limited by its client
address instead.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from rproxy import ratelimit_redis
from rproxy.http.filters import Filter
from rproxy.ratelimit import (
    Concurrency,
    Decision,
    LocalBuckets,
    gcra,
    policy_header,
    retry_after,
    state_header,
)

__all__ = ["RateLimitFilter", "Limit", "limits_of"]

_NOTE = "ratelimit"

# frontend -> {(scope, config): Limit}: buckets and counts outlive the
# filter, which is rebuilt whenever the frontend is configured again
_LIMITS: weakref.WeakKeyDictionary[Any, dict[tuple[str, Any], Limit]] = weakref.WeakKeyDictionary()
# client connection -> [(concurrency, key)] it holds (given back by the
# log phase, or by closed() if the client went away first)
_HELD: dict[Any, list[tuple[Concurrency, bytes]]] = {}


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16, person=b"rproxy-limit").digest()



def _ip(exchange: Any) -> bytes:
    """
    The client's address as policies see it (behind a trusted proxy, the
    one its X-Forwarded-For names: L{rproxy.http.exchange.Exchange.client_host}).
    """
    client = exchange.client
    host = exchange.client_host
    return client.peer_ip if host is client.peer_host else host.encode("ascii", "replace")  # type: ignore[no-any-return]

class Limit:
    """
    One configured limit ready for requests, and its counts.

    @ivar scope: C{frontend} or C{routes[N]}.
    @ivar allowed, limited: requests it allowed and refused.
    @ivar fallbacks: decisions made locally because Redis was down or slow.
    """

    def __init__(self, frontend: str, scope: str, config: Any) -> None:
        self.config = config
        self.name = config.name
        self.scope = scope
        key = config.key
        self.by_ip = key == "ip"
        self.by_bearer = key == "api_key"
        self.header = key[len("header:"):].encode() if key.startswith("header:") else None
        self.buckets = LocalBuckets(config.interval, config.burst, config.max_keys) if config.count else None
        self.concurrency = Concurrency(config.concurrent) if config.concurrent else None
        self.interval = config.interval if config.count else 0.0
        self.tolerance = self.interval * config.burst
        # the tolerance as compared (a TAT computed as 1e-12 too late is on time)
        self.slack = self.tolerance + 1e-9 * self.interval
        self.shared = config.shared
        self.timeout = config.redis_timeout
        self.headers = config.headers and self.buckets is not None
        self.policy = policy_header(config.name, config.burst, self.tolerance) if self.buckets is not None else b""
        self.redis_prefix = f"rproxy:ratelimit:{frontend}:{scope}:{config.name}:".encode()
        self.allowed = 0
        self.limited = 0
        self.fallbacks = 0

    def key(self, exchange: Any) -> bytes:
        """
        The key of a request for this limit (bounded in size).
        """
        if self.by_ip:
            return _ip(exchange)
        if self.by_bearer:
            value = exchange.head.header(b"authorization")
            if value is not None and value[:7].lower() == b"bearer ":
                token = value[7:].strip()
                if token:
                    return b"k" + _digest(token)
        else:
            value = exchange.head.header(self.header)
            if value is not None:
                return b"h" + _digest(value)
        return b"i" + _ip(exchange)


def limits_of(frontend: Any) -> list[Limit]:
    """
    The limits of a frontend (for metrics), in the order configured.
    """
    return list(_LIMITS.get(frontend, {}).values())


def _limit(frontend: Any, scope: str, config: Any) -> Limit:
    known = _LIMITS.setdefault(frontend, {})
    limit = known.get((scope, config))
    if limit is None:
        limit = known[(scope, config)] = Limit(frontend.name, scope, config)
    return limit


class RateLimitFilter(Filter):
    """
    The frontend's limits and its routes' (a route's limits apply to the
    requests its rule matches, as the route filter will match them).
    Made by L{make}, which leaves out the phases the configuration does
    not need (no response phase without headers on allowed responses, no
    log and closed phases without concurrency limits): a phase a filter
    does not define costs the engine nothing.
    """

    doing = "checking a rate limit"

    @staticmethod
    def wanted(config: Any) -> bool:
        return bool(getattr(config, "rate_limits", ())) or any(
            getattr(r, "rate_limits", ()) for r in getattr(config, "routes", ()))

    @staticmethod
    def make(frontend: Any, shared: Any = None) -> RateLimitFilter:
        """
        The filter for C{frontend}'s configuration; C{shared}: a
        L{rproxy.ratelimit_redis.SharedBuckets} to use instead of the
        process's (tests).
        """
        config = frontend.config
        configs = [*getattr(config, "rate_limits", ()),
                   *(c for r in getattr(config, "routes", ()) for c in getattr(r, "rate_limits", ()))]
        headers = any(c.headers and c.count for c in configs)
        concurrent = any(c.concurrent for c in configs)
        cls = {(False, False): RateLimitFilter, (True, False): _WithHeaders, (False, True): _WithConcurrency,
               (True, True): _WithBoth}[headers, concurrent]
        return cls(frontend, shared)

    def __init__(self, frontend: Any, shared: Any = None) -> None:
        config = frontend.config
        self.clock = frontend.clock
        # (the frontend's errors: the 429's body has their shape)
        self.error_response = frontend.error_response
        self.limits = tuple(_limit(frontend, "frontend", c) for c in getattr(config, "rate_limits", ()))
        # (a frontend without a route table, as a tunnel's may be, has
        # only its own limits)
        self.routes = getattr(frontend, "routes", None)
        rules = self.routes.routes if self.routes is not None else ()
        # Rule -> the frontend's limits and the route's (the route table's
        # rules are in the order of config.routes)
        self.by_rule = {
            rule: self.limits + tuple(_limit(frontend, f"routes[{i}]", c) for c in route.rate_limits)
            for i, (rule, route) in enumerate(zip(rules, getattr(config, "routes", ()), strict=False))
            if getattr(route, "rate_limits", ())
        }
        # (tests pass a store; else the process's, read per request)
        self._shared = shared
        # the common case, decided inline: one rate limit on the frontend
        single = self.limits[0] if len(self.limits) == 1 and not self.by_rule else None
        if single is not None and (single.buckets is None or single.concurrency is not None):
            single = None
        self.single = single
        self.local_only = single is not None and not single.shared
        if single is not None:
            # (read once per request: kept as attributes)
            self.by_ip = single.by_ip
            self.tats = single.buckets.tats  # type: ignore[union-attr]
            self.max_keys = single.buckets.max_keys  # type: ignore[union-attr]
            self.interval = single.interval
            self.slack = single.slack
            self.headers = single.headers
        # drop the counts of limits no longer configured
        known = _LIMITS.get(frontend, {})
        live = {id(limit) for limits in (self.limits, *self.by_rule.values()) for limit in limits}
        for k in [k for k, limit in known.items() if id(limit) not in live]:
            del known[k]

    # -- request ------------------------------------------------------------

    def request(self, exchange: Any) -> Any:
        limit = self.single
        if limit is None:
            return self._request(exchange)
        if not self.local_only:
            shared = self._shared if self._shared is not None else ratelimit_redis.current
            if shared is not None:
                return self._single_shared(exchange, limit, shared)
        # GCRA inline (L{rproxy.ratelimit.gcra}, same arithmetic)
        if self.by_ip:
            # (L{_ip}, inline: the client's address as policies see it)
            client, host = exchange.client, exchange.client_host
            key = client.peer_ip if host is client.peer_host else host.encode("ascii", "replace")
        else:
            key = limit.key(exchange)
        now = self.clock.seconds()
        tats = self.tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys:
                limit.buckets.make_room(now)  # type: ignore[union-attr]
            tat = now
        elif tat < now:
            tat = now
        new_tat = tat + self.interval
        if new_tat - self.slack > now:
            self._decide(exchange, (limit,), (key,), [(limit, gcra(tat, now, self.interval, limit.tolerance)[0])])
            return None
        tats[key] = new_tat
        limit.allowed += 1
        if self.headers:
            notes = exchange.notes
            if notes is None:
                notes = exchange.notes = {}
            notes[_NOTE] = (None, ((limit, int((now - new_tat + limit.tolerance) / self.interval + 1e-9),
                                    new_tat - now),))
        return None

    def _single_shared(self, exchange: Any, limit: Limit, shared: Any) -> Any:
        """
        The one limit, shared: Redis decides (the local bucket counts the
        request too, and decides if Redis cannot).
        """
        key = _ip(exchange) if self.by_ip else limit.key(exchange)
        now = self.clock.seconds()
        tats = self.tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys:
                limit.buckets.make_room(now)  # type: ignore[union-attr]
            tat = now
        elif tat < now:
            tat = now
        new_tat = tat + self.interval
        if new_tat - self.slack <= now:
            tats[key] = new_tat
        if not shared.usable():
            limit.fallbacks += 1
            self._decide(exchange, (limit,), (key,), [(limit, gcra(tat, now, self.interval, limit.tolerance)[0])])
            return None
        d = shared.check(limit.redis_prefix + key, self.interval, limit.tolerance, limit.timeout)
        d.addCallbacks(self._shared_answer, self._shared_failed, callbackArgs=(exchange, limit),
                       errbackArgs=(exchange, limit, key, tat, now))
        return d

    def _shared_answer(self, decision: Decision, exchange: Any, limit: Limit) -> None:
        if not decision.allowed:
            limit.limited += 1
            self._refuse_rate(exchange, limit, decision)
            return
        limit.allowed += 1
        if self.headers:
            notes = exchange.notes
            if notes is None:
                notes = exchange.notes = {}
            notes[_NOTE] = (None, ((limit, decision.remaining, decision.reset),))

    def _shared_failed(self, failure: Failure, exchange: Any, limit: Limit, key: bytes, tat: float,
                       now: float) -> Any:
        if failure.check(defer.CancelledError):
            return failure  # the exchange ended while waiting
        limit.fallbacks += 1
        self._decide(exchange, (limit,), (key,), [(limit, gcra(tat, now, self.interval, limit.tolerance)[0])])
        return None

    def _request(self, exchange: Any) -> Any:
        limits = self.limits
        if self.by_rule:
            head = exchange.head
            limits = self.by_rule.get(self.routes.match(head.host, head.target), limits)
        if not limits:
            return None
        shared = self._shared if self._shared is not None else ratelimit_redis.current
        if shared is not None and not shared.usable():
            shared = None
        now = self.clock.seconds()
        keys = []
        waits: list[Any] = []
        decisions: list[tuple[Limit, Decision]] = []
        for limit in limits:
            key = limit.key(exchange)
            keys.append(key)
            buckets = limit.buckets
            if buckets is None:
                continue
            # (the local bucket counts every request, so that it has this
            # process's recent past when Redis goes away)
            local = buckets.check(key, now)
            if limit.shared and shared is not None:
                d = shared.check(limit.redis_prefix + key, limit.interval, limit.tolerance, limit.timeout)
                d.addCallbacks(_paired, self._fallback, callbackArgs=(limit,), errbackArgs=(limit, local))
                waits.append(d)
                continue
            if limit.shared and (self._shared is not None or ratelimit_redis.current is not None):
                limit.fallbacks += 1  # Redis is known to be down
            decisions.append((limit, local))
        if len(waits) == 1 and not decisions:
            return waits[0].addCallback(self._decide_one, exchange, limits, keys)
        if waits:
            gathered = defer.gatherResults(waits, consumeErrors=True)
            gathered.addCallback(lambda results: self._decide(exchange, limits, keys, decisions + results))
            gathered.addErrback(_first_error)
            return gathered
        self._decide(exchange, limits, keys, decisions)
        return None

    def _fallback(self, failure: Failure, limit: Limit, local: Decision) -> tuple[Limit, Decision]:
        if failure.check(defer.CancelledError):
            return failure  # type: ignore[return-value]  # the exchange ended while waiting
        limit.fallbacks += 1
        return limit, local

    def _decide_one(self, result: tuple[Limit, Decision], exchange: Any, limits: Sequence[Limit],
                    keys: Sequence[bytes]) -> None:
        self._decide(exchange, limits, keys, [result])

    def _decide(self, exchange: Any, limits: Sequence[Limit], keys: Sequence[bytes],
                decisions: list[tuple[Limit, Decision]]) -> None:
        refused = None
        for limit, decision in decisions:
            if not decision.allowed and (refused is None or decision.retry_after > refused[1].retry_after):
                refused = (limit, decision)
        if refused is not None:
            limit, decision = refused
            limit.limited += 1
            self._refuse_rate(exchange, limit, decision)
            return
        held = None
        for limit, key in zip(limits, keys, strict=True):
            concurrency = limit.concurrency
            if concurrency is None:
                continue
            if not concurrency.acquire(key):
                for taken, taken_key in held or ():
                    taken.release(taken_key)
                limit.limited += 1
                self._refuse(exchange, b"1", [], f"too many requests in flight (limit {limit.name!r})")
                return
            if held is None:
                held = []
            held.append((concurrency, key))
        for limit in limits:
            limit.allowed += 1
        if held is not None:
            _HELD.setdefault(exchange.client, []).extend(held)
        shown = tuple((limit, d.remaining, d.reset) for limit, d in decisions if limit.headers)
        if held is not None or shown:
            notes = exchange.notes
            if notes is None:
                notes = exchange.notes = {}
            notes[_NOTE] = (held, shown)

    def _refuse_rate(self, exchange: Any, limit: Limit, decision: Decision) -> None:
        after = retry_after(decision.retry_after)
        self._refuse(exchange, after, [
            (b"RateLimit-Policy", limit.policy),
            (b"RateLimit", state_header(limit.name, 0, decision.reset)),
        ], f"rate limit {limit.name!r} exceeded: retry after {after.decode()} s")

    def _refuse(self, exchange: Any, after: bytes, fields: list[tuple[bytes, bytes]], message: str) -> None:
        """
        429 on the kept connection, its body the frontend's error (rproxy's
        JSON error; an OpenAI-shaped one on a tunnel's C{mode: http}
        port, which the OpenAI SDKs show): as any other error rproxy
        answers there, but the connection stays open for the next request.
        """
        client = exchange.client
        head = exchange.head
        if head.has_body:
            # the body is not read: the connection cannot carry another request
            client.closing_after_response = True
        exchange.status = 429
        close = exchange.answer_closes()
        response = self.error_response(429, message, version=head.version, close=close,
                                       extra=[(b"Retry-After", after), *fields])
        if head.method == b"HEAD":
            response = response[:response.index(b"\r\n\r\n") + 4]  # (a HEAD response has no body)
        client.transport.write(response)
        exchange.complete()


class _WithHeaders(RateLimitFilter):
    """
    ... and the C{RateLimit} fields on allowed responses.
    """

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        notes = exchange.notes
        noted = notes.get(_NOTE) if notes is not None else None
        if noted is None or not noted[1]:
            return
        shown = noted[1]
        if len(shown) == 1:
            limit, remaining, reset = shown[0]
            extra.append((b"RateLimit-Policy", limit.policy))
            extra.append((b"RateLimit", state_header(limit.name, remaining, reset)))
            return
        extra.append((b"RateLimit-Policy", b", ".join(limit.policy for limit, _, _ in shown)))
        extra.append((b"RateLimit", b", ".join(state_header(limit.name, r, t) for limit, r, t in shown)))


class _WithConcurrency(RateLimitFilter):
    """
    ... and concurrency slots given back when the exchange or its client
    connection ends.
    """

    def log(self, exchange: Any, backend: str) -> None:
        notes = exchange.notes
        noted = notes.pop(_NOTE, None) if notes is not None else None
        if noted is None or noted[0] is None:
            return
        held = _HELD.get(exchange.client)
        for concurrency, key in noted[0]:
            concurrency.release(key)
            if held:
                try:
                    held.remove((concurrency, key))
                except ValueError:
                    pass
        if held is not None and not held:
            del _HELD[exchange.client]

    def closed(self, connection: Any) -> None:
        for concurrency, key in _HELD.pop(connection, ()):
            concurrency.release(key)


class _WithBoth(_WithHeaders, _WithConcurrency):
    pass


def _paired(decision: Decision, limit: Limit) -> tuple[Limit, Decision]:
    return limit, decision


def _first_error(failure: Failure) -> Failure:
    if failure.check(defer.FirstError):
        return failure.value.subFailure  # type: ignore[no-any-return]
    return failure
