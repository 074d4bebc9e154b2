"""
Routing of HTTP requests to backends: by host (exact, or C{*.suffix}) and
path prefix, first match wins, else the frontend's default backend; and
the VK gateway's direct route C{/backend/{server}/...} to one named server
with the prefix stripped.
"""

from __future__ import annotations

import attrs

__all__ = ["Route", "Rule", "RouteTable", "normalize_host"]


def normalize_host(host: bytes | None) -> bytes:
    """
    Lower case, without the port (IPv6 literals keep their brackets).
    """
    if not host:
        return b""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    return host.split(b":", 1)[0]


@attrs.frozen
class Route:
    backend: str
    host: str | None = None
    path_prefix: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    access: object = None  # allow/deny lists (rproxy.cidr.AccessList), None: everyone
    policy: object = None  # auth, redirect, rewrite (rproxy.config.access.Policy), None: none
    rate_limits: tuple[object, ...] = ()  # rproxy.config.limits.RateLimitConfig


class Rule:
    """
    A route ready for requests: its names and header rules as bytes,
    made once per configuration instead of once per request.
    """

    __slots__ = ("backend", "host", "wildcard", "prefix", "set_headers", "remove", "access", "policy")

    def __init__(self, route: Route) -> None:
        self.backend = route.backend
        self.access = route.access
        self.policy = route.policy
        pattern = route.host.encode().lower() if route.host is not None else None
        self.wildcard = pattern is not None and pattern.startswith(b"*.")
        self.host = pattern[1:] if self.wildcard else pattern  # "*.x.com" -> ".x.com"
        self.prefix = route.path_prefix.encode() if route.path_prefix is not None else None
        self.set_headers = tuple((k.encode(), v.encode()) for k, v in route.set_headers)
        # a header that is set is also removed first
        self.remove = frozenset({k.lower().encode() for k in route.remove_headers}
                                | {k.lower() for k, _ in self.set_headers})

    def matches(self, host: bytes, path: bytes) -> bool:
        pattern = self.host
        if pattern is not None:
            if self.wildcard:
                if not (host.endswith(pattern) and len(host) > len(pattern)):
                    return False
            elif host != pattern:
                return False
        return self.prefix is None or path.startswith(self.prefix)


class RouteTable:
    def __init__(self, routes: tuple[Route, ...], default: str | None) -> None:
        self.routes = tuple(Rule(r) for r in routes)
        self.default = Rule(Route(backend=default)) if default is not None else None

    def match(self, host: bytes | None, target: bytes) -> Rule | None:
        """
        The route for a request, or None when nothing matches and there is
        no default backend.
        """
        if not self.routes:
            return self.default
        name = normalize_host(host)
        path = target.split(b"?", 1)[0]
        for route in self.routes:
            if route.matches(name, path):
                return route
        return self.default


def direct_target(target: bytes) -> tuple[str, bytes] | None:
    """
    C{/backend/NAME/rest} -> (NAME, C{/rest}); None for other targets.
    """
    if not target.startswith(b"/backend/"):
        return None
    rest = target[len(b"/backend/") :]
    name, slash, tail = rest.partition(b"/")
    if not name:
        return None
    query = b""
    if b"?" in name:
        name, _, query = name.partition(b"?")
        tail, slash = b"", b""
        query = b"?" + query
    try:
        decoded = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return decoded, b"/" + tail + query if (slash or query) else b"/"
