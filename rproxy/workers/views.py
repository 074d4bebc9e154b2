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

Connection limits are the machine's: a frontend's C{max_connections} L is
split over the k slots that serve it (each admits L // k, the first L % k
one more; with L below the worker count only L slots serve it, one
connection each), and C{global.max_connections} G over every worker alike
(at least one each).  The machine then never holds more than L (or G)
connections, as one process would not; a worker whose share is full
queues or refuses as one process does, even while another worker has room
(the kernel chooses the worker by a hash of the client's address).
"""

from __future__ import annotations

import attrs

from rproxy.config import Config, FrontendConfig

__all__ = ["master_view", "worker_view", "serving_slots", "limit_share"]


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
    if frontend.max_connections:
        count = min(count, frontend.max_connections)
    if frontend.token_pool:
        for pool in config.token_pools:
            if pool.name == frontend.token_pool:
                return range(max(1, min(count, len(pool.credentials))))
    return range(count)


def limit_share(limit: int, slot: int, slots: int) -> int:
    """
    Slot C{slot}'s share of C{limit} split over C{slots} (0: no limit).
    """
    if not limit:
        return 0
    return max(1, limit // slots + (1 if slot < limit % slots else 0))


def worker_view(config: Config, slot: int, count: int) -> Config:
    """
    Slot C{slot}'s part: its frontends with their share of each
    connection limit, every pool, its share of each token pool's
    credentials; no tunnel, no admin port.
    """
    frontends = []
    for frontend in config.frontends:
        slots = serving_slots(config, frontend, count)
        if slot in slots:
            frontends.append(attrs.evolve(
                frontend, max_connections=limit_share(frontend.max_connections, slot, len(slots))))
    token_pools = []
    for pool in config.token_pools:
        share = max(1, min(count, len(pool.credentials)))
        if slot < share:
            token_pools.append(attrs.evolve(pool, credentials=pool.credentials[slot::share]))
    return attrs.evolve(
        config,
        global_=attrs.evolve(config.global_, max_connections=limit_share(config.global_.max_connections, slot, count)),
        frontends=tuple(frontends),
        token_pools=tuple(token_pools),
        tunnels=(),
        admin=attrs.evolve(config.admin, listen=None),
    )
