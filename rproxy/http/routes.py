"""
Routing of HTTP requests to backends: by host (exact, or C{*.suffix}) and
path prefix, first match wins, else the frontend's default backend; and
the VK gateway's direct route C{/backend/{server}/...} to one named server
with the prefix stripped.

Routes match the target in its normal form (L{request_target}), which is
also what the server is sent, so that a path spelt another way (C{/%61dmin},
C{//admin}, C{/x/../admin}, C{http://host/admin}) takes the route its
server will read it as, with that route's policies.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["Route", "Rule", "RouteTable", "normalize_host", "normalize_path", "request_target", "BadTarget"]

# RFC 3986 2.3
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(rb"%(..)?", re.DOTALL)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)\Z", re.DOTALL)


class BadTarget(ValueError):
    """
    A request target that is neither a path, an absolute http(s) URL nor
    C{*}; or one with a malformed percent-encoding.
    """


def _percent(match: re.Match[bytes]) -> bytes:
    digits = match.group(1)
    if digits is None or digits[0] not in _HEX or digits[1] not in _HEX:
        raise BadTarget("a malformed percent-encoding in the path")
    byte = int(digits, 16)
    if byte in _UNRESERVED:
        return bytes((byte,))
    return b"%" + digits.upper()


def normalize_path(path: bytes) -> bytes:
    """
    C{path} (starting with C{/}) in its normal form, as RFC 3986 section 6.2.2
    has it, with Envoy's C{merge_slashes}: percent-encoded unreserved
    characters decoded (C{%61} is C{a}; others, C{%2F} included, stay
    encoded, in upper case), C{.} and C{..} segments resolved (a C{..}
    above the root stays at the root, as nginx does), runs of slashes
    merged.  A path already normal is returned as it is, at the cost of
    three scans.

    @raise BadTarget: a C{%} not followed by two hexadecimal digits.
    """
    if b"%" in path:
        path = _PERCENT.sub(_percent, path)
    if b"//" not in path and b"/." not in path:
        return path
    kept: list[bytes] = []
    segments = path.split(b"/")
    for segment in segments[1:]:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment and segment != b".":
            kept.append(segment)
    normal = b"/" + b"/".join(kept)
    if kept and segments[-1] in (b"", b".", b".."):
        normal += b"/"  # (/a/b/.. is /a/, as the RFC resolves it)
    return normal


def request_target(target: bytes) -> tuple[bytes | None, bytes]:
    """
    The host a request target names (an absolute-form target's authority;
    None: the Host field's) and the target in origin form, its path
    normalized (L{normalize_path}; the query is left as it is); C{*} is
    left alone.

    @raise BadTarget: a target of another form, or an absolute URL that is
        not http(s), has no host or has user information.
    """
    if target[:1] == b"/":
        path, question, query = target.partition(b"?")
        normal = normalize_path(path)
        return None, target if normal is path else normal + question + query
    if target == b"*":
        return None, target
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        raise BadTarget("a request target that is not a path")
    scheme, authority, rest = absolute.groups()
    if scheme.lower() not in (b"http", b"https"):
        raise BadTarget("an absolute target that is not http or https")
    if not authority or b"@" in authority:
        raise BadTarget("an absolute target without a host, or with user information")
    if rest[:1] != b"/":
        rest = b"/" + rest
    return authority, request_target(rest)[1]


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
        # (a prefix is matched against normal paths: written in normal form)
        self.prefix = _normal_prefix(route.path_prefix.encode()) if route.path_prefix is not None else None
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
        no default backend, or the target is not one (L{BadTarget}).  The
        target is matched in its normal form (L{request_target}), and an
        absolute-form target's host is the one matched (RFC 9112 3.2.2).
        """
        if not self.routes:
            return self.default
        try:
            authority, target = request_target(target)
        except BadTarget:
            return None
        name = normalize_host(authority if authority is not None else host)
        path = target.split(b"?", 1)[0]
        for route in self.routes:
            if route.matches(name, path):
                return route
        return self.default


def _normal_prefix(prefix: bytes) -> bytes:
    if not prefix.startswith(b"/"):
        return prefix
    try:
        normal = normalize_path(prefix)
    except BadTarget:
        return prefix
    # a prefix ending in a slash keeps it
    return normal + b"/" if prefix.endswith(b"/") and not normal.endswith(b"/") else normal


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
