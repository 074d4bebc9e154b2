"""
What part of one configuration each process runs (pure).

The master runs what must exist once per machine: health checks (its pools
are the machine's view of server state), tunnels (one process holds every
agent session), the stores' admin API and the admin port.  Workers run the
frontends and their pools, and no tunnel, admin port or health check.

Token pools are partitioned: with k = min(workers, credentials) slots
serving a token-pool frontend, slot i logs in with credentials i, i+k,
i+2k...; a token then belongs to one process, whose lease table already
guarantees one connection per token, so no token is used by two
connections at once anywhere.  Slots past k get neither the frontend nor
its sockets (they would hold no token to give).
"""

from __future__ import annotations

import attrs

from rproxy.config import Config, FrontendConfig

__all__ = ["master_view", "worker_view", "serving_slots"]


def master_view(config: Config) -> Config:
    """
    The master's part: everything but frontends and token pools (the
    admin port is the master's own, merged over the workers).
    """
    return attrs.evolve(config, frontends=(), token_pools=())


def serving_slots(config: Config, frontend: FrontendConfig, count: int) -> range:
    """
    The worker slots that serve C{frontend}.
    """
    if frontend.token_pool:
        for pool in config.token_pools:
            if pool.name == frontend.token_pool:
                return range(max(1, min(count, len(pool.credentials))))
    return range(count)


def worker_view(config: Config, slot: int, count: int) -> Config:
    """
    Slot C{slot}'s part: its frontends, every pool, its share of each
    token pool's credentials; no tunnel, no admin port.
    """
    frontends = tuple(f for f in config.frontends if slot in serving_slots(config, f, count))
    token_pools = []
    for pool in config.token_pools:
        share = max(1, min(count, len(pool.credentials)))
        if slot < share:
            token_pools.append(attrs.evolve(pool, credentials=pool.credentials[slot::share]))
    return attrs.evolve(
        config,
        frontends=frontends,
        token_pools=tuple(token_pools),
        tunnels=(),
        admin=attrs.evolve(config.admin, listen=None),
    )
