"""
Routes and header rules: the pool a request goes to, by host and path
prefix (first match wins), and the header fields its route sets or
removes on the way to the server.

L{NormalTarget} comes first, before any policy: the target every filter
matches and the server is sent is the request's in normal form
(L{rproxy.http.routes.request_target}), so that a path spelt another way
cannot take another route, with other policies, than the one the server
reads it as.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.routes import BadTarget, RouteTable, request_target

__all__ = ["NormalTarget", "RouteFilter", "HeaderRules"]


class NormalTarget(Filter):
    """
    Puts the request's target in normal form in C{exchange.target} (what
    the routes match and the server is sent; C{head.target} stays as the
    client wrote it, for the access log).  An absolute-form target
    (C{GET http://a.example/x}) becomes C{/x} and its host replaces the
    Host field (RFC 9112 3.2.2).  A target that is none of a path, an
    absolute http(s) URL or C{*}, or a malformed percent-encoding: 400.
    """

    def request(self, exchange: Any) -> None:
        head = exchange.head
        try:
            authority, exchange.target = request_target(head.target)
        except BadTarget as e:
            exchange.fail(400, str(e))
            return
        if authority is not None:
            head.host = authority
            head.headers = [*(field for field in head.headers if field[0].lower() != b"host"), (b"Host", authority)]


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
        routes = self.routes
        # (without routes, the default: no call to match)
        route = routes.match(exchange.head.host, exchange.target) if routes.routes else routes.default
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
