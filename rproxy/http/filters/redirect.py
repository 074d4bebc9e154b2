"""
Redirects (C{redirect:} on a frontend or a route), answered by rproxy
without a server: to the same host and target over another scheme (a
request already on it goes on, so that the redirect cannot loop), or to a
fixed location.  A trusted proxy (C{trusted_proxies}) tells the scheme the
client used in X-Forwarded-Proto.
"""

from __future__ import annotations

import re
from typing import Any

from rproxy.cidr import CIDRSet
from rproxy.config.access import RedirectConfig
from rproxy.http.filters import Filter
from rproxy.http.filters.access import route_of
from rproxy.http.headers import reason
from rproxy.http.routes import RouteTable, normalize_host

__all__ = ["RedirectFilter", "redirect_location"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# a host name or an IPv6 literal: nothing a Location could be bent by
_HOST = re.compile(rb"^(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])\Z")


def redirect_location(redirect: RedirectConfig, host: bytes, target: bytes) -> bytes:
    """
    The Location of C{redirect} for a request to C{host} (normalized: lower
    case, no port) and C{target}.
    """
    if not target.startswith(b"/"):
        target = b"/"  # (an absolute-form or asterisk-form target)
    if redirect.location is not None:
        return redirect.location.encode().replace(b"{host}", host).replace(b"{target}", target)
    scheme = redirect.scheme or "https"
    port = redirect.port
    suffix = b"" if port is None or port == _DEFAULT_PORTS[scheme] else b":" + str(port).encode()
    return scheme.encode() + b"://" + host + suffix + target


class RedirectFilter(Filter):
    """
    @ivar redirect: the frontend's redirect, or None; a route's own
        replaces it (its C{status} 0: none on that route).
    """

    def __init__(self, redirect: RedirectConfig | None, routes: RouteTable, scheme: bytes,
                 trusted: CIDRSet | None) -> None:
        self.redirect = redirect
        self.routes = routes
        self.scheme = scheme.decode()
        self.trusted = trusted
        self.by_route = any(_own(rule) is not None for rule in routes.routes)

    @staticmethod
    def wanted(redirect: RedirectConfig | None, routes: RouteTable) -> bool:
        return redirect is not None or any(_own(rule) is not None for rule in routes.routes)

    def request(self, exchange: Any) -> None:
        redirect = self.redirect
        if self.by_route:
            rule = route_of(self.routes, exchange)
            own = _own(rule) if rule is not None else None
            if own is not None:
                redirect = own
        if redirect is None or not redirect.status:
            return
        head = exchange.head
        if redirect.scheme is not None and self._scheme(exchange) == redirect.scheme:
            return
        host = normalize_host(head.host)
        if (redirect.location is None or "{host}" in redirect.location) and not _HOST.match(host):
            exchange.fail(400, "no Host to redirect to" if not host else "a Host that cannot be redirected to")
            return
        location = redirect_location(redirect, host, exchange.target)
        exchange.answer(redirect.status, reason(redirect.status), [(b"Location", location)])

    def _scheme(self, exchange: Any) -> str:
        """
        The scheme the client used: the listener's, or what a trusted
        proxy says in X-Forwarded-Proto.
        """
        trusted = self.trusted
        if trusted and exchange.client.peer_host in trusted:
            proto = exchange.head.header(b"x-forwarded-proto")
            if proto:
                first = proto.split(b",")[0].strip().lower()
                if first in (b"http", b"https"):
                    return first.decode()
        return self.scheme


def _own(rule: Any) -> RedirectConfig | None:
    policy = rule.policy
    return policy.redirect if policy is not None else None
