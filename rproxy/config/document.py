"""
The whole document: every section read, then the checks that span
sections (names a frontend refers to, duplicate names and listeners).
"""

from __future__ import annotations

import difflib
from typing import Any

from rproxy.config.endpoints import Endpoint, parse_endpoint
from rproxy.config.frontends import read_frontend
from rproxy.config.model import BackendConfig, Config, FrontendConfig, TokenPoolConfig
from rproxy.config.reader import Section, Sources
from rproxy.config.sections import read_admin, read_backend, read_global, read_stores
from rproxy.config.telemetry import read_telemetry
from rproxy.config.tokenpools import read_token_pool
from rproxy.config.values import ConfigError, brief

__all__ = ["validate", "overlap", "listeners"]


def _ephemeral(listen: str) -> bool:
    """
    Whether a listen string asks for port 0 (any free port), which two
    frontends may both do.
    """
    return parse_endpoint(listen).port == 0


def validate(data: object, sources: Sources) -> Config:
    """
    Build a L{Config} from a parsed document and what was read for it.
    Pure: no file, no environment, no clock.

    @raise ConfigError: listing every problem found, each with its key path.
    """
    if data is None:
        raise ConfigError(["config: the document is empty: expected a mapping of sections (global, admin, "
                           "backends, frontends, ...)"])
    errors: list[str] = []
    top = Section(data, "", errors, sources)
    global_ = read_global(top.section("global"))
    admin = read_admin(top.section("admin"))

    backends: list[BackendConfig] = []
    for path, raw in top.items("backends"):
        backend = read_backend(top, path, raw)
        if backend is None:
            continue
        if any(b.name == backend.name for b in backends):
            errors.append(f"{path}.name: duplicate backend name {brief(backend.name)}")
            continue
        backends.append(backend)

    frontends: list[FrontendConfig] = []
    names = {b.name for b in backends}
    for path, raw in top.items("frontends"):
        frontend = read_frontend(top, path, raw, global_)
        if frontend is None:
            continue
        if any(f.name == frontend.name for f in frontends):
            errors.append(f"{path}.name: duplicate frontend name {brief(frontend.name)}")
            continue
        for i, route in enumerate(frontend.routes):
            if route.backend not in names:
                errors.append(f"{path}.routes[{i}].backend: no backend named {brief(route.backend)}")
        if frontend.backend not in names and frontend.backend:  # (none: protocol detect, tls_passthrough)
            close = difflib.get_close_matches(frontend.backend, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}.backend: no backend named {brief(frontend.backend)}{hint}")
            continue
        if frontend.listen and not _ephemeral(frontend.listen) and any(
            f.listen == frontend.listen for f in frontends
        ):
            errors.append(f"{path}.listen: {brief(frontend.listen)} is already used by another frontend")
            continue
        frontends.append(frontend)
    from rproxy.config.l4 import check_references

    errors += check_references(frontends, names, lambda name: _item_path(top, "frontends", name))
    from rproxy.tunnel.config import read_api_keys, read_tunnels

    api_keys = read_api_keys(top)
    tunnels = read_tunnels(top)
    stores = read_stores(top)
    from rproxy.config.cluster import read_cluster, worker_port_errors

    cluster = read_cluster(top, stores, tunnels)
    errors += worker_port_errors(global_.workers, cluster, tunnels, lambda name: _item_path(top, "tunnels", name),
                                 listeners=listeners(top, admin.listen, frontends, tunnels))
    telemetry = read_telemetry(top)
    if stores is None or stores.postgres_dsn is None:
        for backend in backends:
            if backend.source == "postgres":
                errors.append(f"{_item_path(top, 'backends', backend.name)}.source: postgres needs stores.postgres.dsn "
                              "(or DATABASE_URL)")
    token_pools: list[TokenPoolConfig] = []
    for path, raw in top.items("token_pools"):
        pool = read_token_pool(top, path, raw)
        if pool is None:
            continue
        if any(p.name == pool.name for p in token_pools):
            errors.append(f"{path}.name: duplicate token pool name {brief(pool.name)}")
            continue
        token_pools.append(pool)
    pool_names = sorted(p.name for p in token_pools)
    for frontend in frontends:
        if frontend.token_pool is not None and frontend.token_pool not in pool_names:
            close = difflib.get_close_matches(frontend.token_pool, pool_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{_item_path(top, 'frontends', frontend.name)}.token_pool: no token pool named "
                          f"{brief(frontend.token_pool)}{hint}")
    top.finish()
    if not errors:
        errors += _shared_sockets(top, admin.listen, frontends, tunnels)
    if errors:
        raise ConfigError(errors)
    return Config(
        global_=global_,
        admin=admin,
        backends=tuple(backends),
        frontends=tuple(frontends),
        api_keys=api_keys,
        tunnels=tunnels,
        stores=stores,
        token_pools=tuple(token_pools),
        cluster=cluster,
        telemetry=telemetry,
    )


def _item_path(top: Section, key: str, name: str) -> str:
    """
    The key path of the element of list C{key} named C{name}.
    """
    for i, raw in enumerate(top.data.get(key) or []):
        if isinstance(raw, dict) and raw.get("name") == name:
            return f"{key}[{i}]"
    return key


_TCP_KINDS = ("tcp", "tcp6", "ssl")
_WILDCARDS = ("", "0.0.0.0", "::")


def overlap(a: Endpoint, b: Endpoint) -> bool:
    """
    Whether two listeners cannot both bind: the same TCP port on the same
    interface or on a wildcard one, or the same UNIX socket path.
    """
    if a.kind in _TCP_KINDS and b.kind in _TCP_KINDS:
        return bool(a.port) and a.port == b.port and (
            a.interface == b.interface or a.interface in _WILDCARDS or b.interface in _WILDCARDS)
    return a.kind == b.kind == "unix" and a.get("address") == b.get("address")


def listeners(top: Section, admin: str | None, frontends: list[FrontendConfig],
              tunnels: tuple[Any, ...]) -> list[tuple[str, str]]:
    """
    Every listener the document configures, as (key path, listen string):
    the admin port, the frontends, each tunnel's control, proxy and public
    ports.
    """
    found: list[tuple[str, str]] = [("admin.listen", admin)] if admin else []
    found += [(f"{_item_path(top, 'frontends', f.name)}.listen", f.listen) for f in frontends]
    for i, tunnel in enumerate(tunnels):
        found += [(f"tunnels[{i}].{role}", getattr(tunnel, role)) for role in ("control", "proxy", "public")]
    return found


def _shared_sockets(top: Section, admin: str | None, frontends: list[FrontendConfig],
                    tunnels: tuple[Any, ...]) -> list[str]:
    """
    Listeners of a valid document that would take the same socket (rproxy
    would not start): each reported at the later one's key path.
    """
    parsed = [(path, listen, parse_endpoint(listen)) for path, listen in listeners(top, admin, frontends, tunnels)]
    errors = []
    for j, (path, listen, endpoint) in enumerate(parsed):
        for other_path, other_listen, other in parsed[:j]:
            if listen == other_listen and path.startswith("frontends") and other_path.startswith("frontends"):
                continue  # reported above, as a frontend listen used twice
            if overlap(endpoint, other):
                errors.append(f"{path}: {brief(listen)} is already used by {other_path}")
                break
    return errors

