"""
Direct routes (C{http.direct_routes}): a target C{/@NAME/rest} goes to the
server named NAME, whatever pool it is in, as C{/rest}; through the pool
(whose release wakes the requests waiting for a slot on it) and never
retried elsewhere.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.routes import direct_target

__all__ = ["DirectRouteFilter"]


class DirectRouteFilter(Filter):
    def __init__(self, pools: dict[str, Any]) -> None:
        self.pools = pools

    def choose(self, exchange: Any) -> None:
        direct = direct_target(exchange.target)
        if direct is None:
            return
        name, exchange.target = direct
        exchange.pinned = name
        pool = next((p for p in self.pools.values() if any(s.name == name for s in p.servers)), None)
        if pool is None:
            exchange.fail(404, f"no server named {name}")
            return
        exchange.pool = pool
