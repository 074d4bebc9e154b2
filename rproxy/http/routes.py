"""
Routing of HTTP requests to backends: by host (exact, or C{*.suffix}) and
path prefix, first match wins, else the frontend's default backend; and
the VK gateway's direct route C{/backend/{server}/...} to one named server
with the prefix stripped.
"""

from __future__ import annotations

import attrs

__all__ = ["Route", "RouteTable", "normalize_host"]


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

    def matches(self, host: bytes, path: bytes) -> bool:
        if self.host is not None:
            pattern = self.host.encode().lower()
            if pattern.startswith(b"*."):
                if not (host.endswith(pattern[1:]) and len(host) > len(pattern) - 1):
                    return False
            elif host != pattern:
                return False
        return self.path_prefix is None or path.startswith(self.path_prefix.encode())


class RouteTable:
    def __init__(self, routes: tuple[Route, ...], default: str | None) -> None:
        self.routes = routes
        self.default = default

    def match(self, host: bytes | None, target: bytes) -> Route | None:
        """
        The route for a request, or None when nothing matches and there is
        no default backend.
        """
        name = normalize_host(host)
        path = target.split(b"?", 1)[0]
        for route in self.routes:
            if route.matches(name, path):
                return route
        if self.default is None:
            return None
        return Route(backend=self.default)


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
