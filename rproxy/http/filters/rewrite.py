"""
Path rewriting (C{strip_prefix}, C{add_prefix} on a route): the target
sent to the server, once the route is chosen; the query string is kept.
C{strip_prefix: /api} takes C{/api} off C{/api} and C{/api/...} only (not
off C{/apis}); what is left is at least C{/}.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.routes import RouteTable

__all__ = ["RewriteFilter", "rewrite"]


def rewrite(target: bytes, strip: bytes | None, add: bytes | None) -> bytes:
    """
    C{target} with C{strip} taken off the front of its path (when the path
    is it or goes on below it) and C{add} put in front.  Targets that are
    not origin-form (C{*}, an absolute URL) are left alone.
    """
    if not target.startswith(b"/"):
        return target
    path, question, query = target.partition(b"?")
    if strip is not None and path.startswith(strip) and (len(path) == len(strip) or path[len(strip)] == 0x2F):
        path = path[len(strip):] or b"/"
    if add is not None:
        path = add + path
    return path + question + query


class RewriteFilter(Filter):
    """
    Rewrites C{exchange.target} for the routes that have prefixes; runs
    after the route filter (a direct route chose no route: untouched).
    """

    def __init__(self, routes: RouteTable) -> None:
        self.prefixes: dict[Any, tuple[bytes | None, bytes | None]] = {}
        for rule in routes.routes:
            policy = rule.policy
            if policy is not None and (policy.strip_prefix or policy.add_prefix):
                self.prefixes[rule] = (policy.strip_prefix.encode() if policy.strip_prefix else None,
                                       policy.add_prefix.encode() if policy.add_prefix else None)

    @staticmethod
    def wanted(routes: RouteTable) -> bool:
        return any(rule.policy is not None and (rule.policy.strip_prefix or rule.policy.add_prefix)
                   for rule in routes.routes)

    def choose(self, exchange: Any) -> None:
        prefixes = self.prefixes.get(exchange.route)
        if prefixes is not None:
            exchange.target = rewrite(exchange.target, *prefixes)
