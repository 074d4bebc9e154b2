"""
Section readers for frontends: listen address, TLS, HTTP options, routes.
"""

from __future__ import annotations

from typing import Any

import attrs

from rproxy.config import values as v
from rproxy.config.access import read_frontend_policy, read_networks, read_route_policy
from rproxy.config.endpoints import listen
from rproxy.config.limits import read_rate_limits
from rproxy.config.model import PROTOCOLS, FrontendConfig, GlobalConfig, HTTPOptions
from rproxy.config.reader import MISSING, Section
from rproxy.config.sections import header_pairs
from rproxy.config.values import brief

__all__ = ["read_access", "read_access_log", "read_frontend", "read_frontend_tls", "read_http", "read_routes"]


def read_access(section: Section) -> Any:
    """
    C{allow:} and C{deny:} lists of networks (C{10.0.0.0/8}, C{::1}):
    an L{rproxy.cidr.AccessList}, or None when neither is given.
    """
    from rproxy.cidr import AccessList, CIDRSet

    allow, deny = read_networks(section, "allow"), read_networks(section, "deny")
    if allow is None and deny is None:
        return None
    return AccessList(CIDRSet(allow or ()), CIDRSet(deny or ()))


def read_frontend_tls(section: Section) -> tuple[tuple[str, str], ...]:
    raw = section.raw("tls")
    if raw is MISSING or raw is None:
        return ()
    tls = section.child(raw, section.key_path("tls"))
    pairs = []
    cert, key = tls.file("cert", required=True), tls.file("key", required=True)
    if cert and key:
        pairs.append((cert, key))
    for path, item in tls.items("sni"):
        extra = tls.child(item, path)
        cert, key = extra.file("cert", required=True), extra.file("key", required=True)
        extra.finish()
        if cert and key:
            pairs.append((cert, key))
    tls.finish()
    # the certificates themselves are loaded once the document is valid
    # (rproxy.config.load.check_certificates)
    return tuple(pairs)


def read_frontend(parent: Section, path: str, raw: object, global_: GlobalConfig) -> FrontendConfig | None:
    section = parent.child(raw, path)
    if not section.ok:
        return None
    name = section.value("name", v.name)
    protocol = section.value("protocol", v.choice(PROTOCOLS), "tcp")
    http = read_http(section.section("http"))
    routes = read_routes(section, protocol)
    tls = read_frontend_tls(section)
    access = read_access(section)
    from rproxy.config.l4 import read_frontend_l4

    l4 = read_frontend_l4(section, protocol)
    frontend = FrontendConfig(
        name=name or "",
        listen=section.value("listen", listen),
        backend=section.value("backend", v.name,
                              "" if protocol == "detect" or section.has("tls_passthrough") else MISSING),
        protocol=protocol,
        http=http,
        routes=routes,
        tls=tls,
        max_connections=section.value("max_connections", v.int_in(0), 0),
        queue_size=section.value("queue_size", v.int_in(0), 128),
        queue_timeout=section.value("queue_timeout", v.duration, 5.0),
        retries=section.value("retries", v.int_in(0, 10), 2),
        connect_timeout=section.value("connect_timeout", v.positive_duration, global_.connect_timeout),
        idle_timeout=section.value("idle_timeout", v.duration, global_.idle_timeout),
        token_pool=section.value("token_pool", v.name, None),
        access=access,
        policy=read_frontend_policy(section, protocol),
        **l4,
        rate_limits=read_rate_limits(section, protocol),
    )
    if frontend.token_pool is not None and protocol != "http":
        section.error("token_pool", "token pools need protocol: http")
    section.finish()
    if not (name and (frontend.backend or protocol == "detect" or frontend.tls_passthrough)):
        return None
    return frontend


# The least max_head: the head the reader counts (target, names, values, 4
# bytes a field) of curl's GET is about 60 bytes, of a Firefox page load
# without cookies about 430; below 1 KiB ordinary requests get 431.  A
# request target is at least "/" (or "*").
MIN_HEAD = 1024
MIN_TARGET = 1


def read_http(section: Section) -> HTTPOptions:
    d = HTTPOptions()
    body_limit = section.nullable("max_body", v.size, d.max_body)
    options = HTTPOptions(
        max_target=section.value("max_target", v.size_at_least(MIN_TARGET), d.max_target),
        max_head=section.value("max_head", v.size_at_least(MIN_HEAD), d.max_head),
        max_headers=section.value("max_headers", v.int_in(1, 10000), d.max_headers),
        max_body=body_limit,
        header_timeout=section.value("header_timeout", v.duration, d.header_timeout),
        response_timeout=section.value("response_timeout", v.duration, d.response_timeout),
        retries=section.value("retries", v.int_in(0, 10), d.retries),
        host_header=section.value("host_header", v.choice(("client", "server")), d.host_header),
        direct_routes=section.value("direct_routes", v.boolean, d.direct_routes),
        sticky_cookie=section.value("sticky_cookie", v.cookie_name, None),
        sticky_secret=section.value("sticky_secret", v.text, None),
        cors=section.value("cors", v.boolean, d.cors),
    )
    access_log, access_log_path = _read_access_log(section)
    section.finish()
    return attrs.evolve(options, access_log=access_log, access_log_path=access_log_path)


_ACCESS_LOG_FORMATS = ("off", "combined", "json")


def _read_access_log(section: Section) -> tuple[str, str | None]:
    """
    C{access_log: FORMAT} (to the twistd log) or C{access_log: {format:
    FORMAT, path: FILE}} (a file of its own, so that JSON lines carry no
    log prefix).
    """
    raw = section.raw("access_log")
    if raw is MISSING:
        return "off", None
    if not isinstance(raw, dict):
        return section.value("access_log", v.choice(_ACCESS_LOG_FORMATS), "off"), None
    log = section.section("access_log")
    format_ = log.value("format", v.choice(_ACCESS_LOG_FORMATS), "off")
    path = log.value("path", _log_path, None)
    if format_ == "off" and path is not None:
        log.error("path", "the access log is off (format: off); set format: combined or json")
    log.finish()
    return format_, path


# (a tunnel's mode http reads the same key)
read_access_log = _read_access_log


def _log_path(value: object) -> str:
    path = v.text(value)
    if any(c in path for c in "\0\r\n"):
        raise ValueError(f"{brief(path)} is not a file path")
    return path


def read_routes(section: Section, protocol: str) -> tuple[Any, ...]:
    from rproxy.http.routes import Route

    routes = []
    for path, raw in section.items("routes"):
        if protocol != "http":
            section.errors.append(f"{path}: routes need protocol: http")
            continue
        route = section.child(raw, path)
        if not route.ok:
            continue
        pairs = header_pairs(route.section("set_headers"))
        remove = []
        for item_path, item in route.items("remove_headers"):
            if isinstance(item, str) and item:
                remove.append(item)
            else:
                section.errors.append(f"{item_path}: expected a header name")
        host = route.value("host", v.text, None)
        prefix = route.value("path_prefix", v.url_path, None)
        backend = route.value("backend", v.name)
        access = read_access(route)
        policy = read_route_policy(route)
        rate_limits = read_rate_limits(route)
        route.finish()
        if backend:
            routes.append(Route(backend=backend, host=host, path_prefix=prefix,
                                set_headers=pairs, remove_headers=tuple(remove), access=access, policy=policy,
                                rate_limits=rate_limits))
    return tuple(routes)
