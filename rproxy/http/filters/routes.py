"""
Routes and header rules: the pool a request goes to, by host and path
prefix (first match wins), and the header fields its route sets or
removes on the way to the server.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.routes import RouteTable

__all__ = ["RouteFilter", "HeaderRules"]


class RouteFilter(Filter):
    """
    Chooses the pool by the frontend's routes (unless an earlier filter
    chose one); no match is a 404.
    """

    def __init__(self, routes: RouteTable, pools: dict[str, Any]) -> None:
        self.routes = routes
        self.pools = pools

    def choose(self, exchange: Any) -> None:
        if exchange.pool is not None:
            return
        head = exchange.head
        route = self.routes.match(head.host, head.target)
        if route is None:
            exchange.fail(404, "no route")
            return
        exchange.route = route
        exchange.pool = self.pools[route.backend]


class HeaderRules(Filter):
    """
    The header fields the chosen route sets (replacing the client's) or
    removes, on the way to the server; in the chain only when some route
    has rules.
    """

    @staticmethod
    def wanted(routes: RouteTable) -> bool:
        rules = [*routes.routes, *([routes.default] if routes.default is not None else [])]
        return any(rule.set_headers or rule.remove for rule in rules)

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        route = exchange.route
        if route is None:
            return set_headers, remove
        if set_headers or remove:
            return (*set_headers, *route.set_headers), remove | route.remove
        return route.set_headers, route.remove
