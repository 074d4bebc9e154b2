"""
Direct routes (C{http.direct_routes}): a target C{/backend/NAME/rest} goes
to the server named NAME, as C{/rest}; through the pool (whose release
wakes the requests waiting for a slot on it) and never retried elsewhere.

NAME is looked up in the frontend's own backends only (its default and
its routes' backends), never in another frontend's; and the configuration
refuses direct routes on a frontend whose routes carry C{allow}/C{deny}
or C{auth} (L{rproxy.config.access}), which a direct route would go
around.  The frontend's own policies apply to direct routes as to any
request.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.routes import direct_target

__all__ = ["DirectRouteFilter"]


class DirectRouteFilter(Filter):
    def __init__(self, pools: dict[str, Any]) -> None:
        self.pools = pools
        # (the frontend's route table, its pools), made again when it changes
        self._own: tuple[Any, tuple[Any, ...]] = (None, ())

    def own_pools(self, frontend: Any) -> tuple[Any, ...]:
        """
        The pools of C{frontend}'s default backend and of its routes.
        """
        routes = frontend.routes
        if self._own[0] is not routes:
            pools = [frontend.pool]
            for rule in routes.routes:
                pool = self.pools.get(rule.backend)
                if pool is not None and pool not in pools:
                    pools.append(pool)
            self._own = (routes, tuple(pools))
        return self._own[1]

    def choose(self, exchange: Any) -> None:
        direct = direct_target(exchange.target)
        if direct is None:
            return
        name, exchange.target = direct
        exchange.pinned = name
        pool = next((p for p in self.own_pools(exchange.frontend) if any(s.name == name for s in p.servers)), None)
        if pool is None:
            exchange.fail(404, f"no server named {name}")
            return
        exchange.pool = pool
