"""
The access-policy filters of a frontend's configuration, for
L{rproxy.http.frontend.default_filters}: each left out when nothing in
the frontend or its routes asks for it.
"""

from __future__ import annotations

from typing import Any

from rproxy.cidr import CIDRSet
from rproxy.http.filters import Filter
from rproxy.http.filters.access import AccessFilter, ClientAddress
from rproxy.http.filters.auth import AuthFilter
from rproxy.http.filters.redirect import RedirectFilter
from rproxy.http.filters.routes import NormalTarget
from rproxy.passwords import checker_for

__all__ = ["access_filters", "auth_filters"]


def access_filters(frontend: Any) -> list[Filter]:
    """
    The target in normal form (when routes or direct routes look at it),
    who the client is (C{trusted_proxies}), whether it may come in
    (C{allow}/C{deny}), and redirects: before any other policy.
    """
    config = frontend.config
    policy = config.policy
    routes = frontend.routes
    filters: list[Filter] = []
    if routes.routes or config.http.direct_routes:
        filters.append(NormalTarget())
    trusted = CIDRSet(policy.trusted_proxies) if policy is not None and policy.trusted_proxies is not None else None
    if trusted is not None:
        filters.append(ClientAddress(trusted))
    if AccessFilter.wanted(config.access, routes):
        filters.append(AccessFilter(frontend, config.access, routes))
    redirect = policy.redirect if policy is not None else None
    if RedirectFilter.wanted(redirect, routes):
        filters.append(RedirectFilter(redirect, routes, frontend.scheme, trusted))
    return filters


def auth_filters(frontend: Any) -> list[Filter]:
    """
    Authentication (C{auth}), when the frontend or a route asks for it.
    """
    policy = frontend.config.policy
    auth = policy.auth if policy is not None else None
    routes = frontend.routes
    if not AuthFilter.wanted(auth, routes):
        return []
    basic = (auth is not None and auth.basic is not None) or any(
        rule.policy is not None and rule.policy.auth is not None and rule.policy.auth.basic is not None
        for rule in routes.routes)
    return [AuthFilter(frontend, auth, routes, checker_for(frontend.reactor) if basic else None)]
