"""
The HTTP side of a backend's circuit breaker (L{rproxy.pool.CircuitBreaker}):
counts the requests routed to each backend (C{max_requests}, checked here
once the route is chosen) and the retries in flight to it (C{max_retries},
checked by the pool when a retry takes a slot).  Over a threshold the
request is answered 503 at once, the threshold named.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter

__all__ = ["CircuitBreakerFilter"]

_NOTE = "circuit_breaker"
# client connection -> the breaker its exchange counts a request on: the
# log phase gives it back, or closed() when the client went away.  Shared
# by the filters of every configuration, so that a reload in between
# loses nothing.
_HELD: dict[Any, Any] = {}


class CircuitBreakerFilter(Filter):
    """
    In the chain when some pool has a circuit breaker; placed after the
    filters that choose the pool.
    """

    @staticmethod
    def wanted(pools: dict[str, Any]) -> bool:
        return any(getattr(pool, "breaker", None) is not None for pool in pools.values())  # (a tunnel's peers: none)

    def choose(self, exchange: Any) -> None:
        pool = exchange.pool
        breaker = pool.breaker if pool is not None else None
        if breaker is None:
            return
        limit = breaker.config.max_requests
        if limit and breaker.requests >= limit:
            exchange.fail(503, str(breaker.trip("max_requests")), retry_after=True)
            return
        breaker.requests += 1
        notes = exchange.notes
        if notes is None:
            notes = exchange.notes = {}
        notes[_NOTE] = breaker
        _HELD[exchange.client] = breaker

    def attempt(self, exchange: Any, server: Any) -> None:
        if exchange.attempts > 1:
            breaker = exchange.pool.breaker
            if breaker is not None:
                breaker.retries += 1

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        if exchange.attempts > 1:
            breaker = exchange.pool.breaker
            if breaker is not None and breaker.retries > 0:
                breaker.retries -= 1

    def log(self, exchange: Any, backend: str) -> None:
        notes = exchange.notes
        if notes is not None:
            breaker = notes.pop(_NOTE, None)
            if breaker is not None:
                breaker.requests -= 1
                _HELD.pop(exchange.client, None)

    def closed(self, connection: Any) -> None:
        breaker = _HELD.pop(connection, None)
        if breaker is not None:
            breaker.requests -= 1
