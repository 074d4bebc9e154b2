"""
What part of one configuration each process runs (pure).

The master runs what must exist once per machine: health checks (its pools
are the machine's view of server state), the stores' admin API and the
admin port.  Workers run the frontends and their pools, and no admin port
or health check.

Tunnels run in the master (one process holds every agent session), unless
a C{cluster:} is configured (L{tunnels_in_workers}): then every worker runs
them as a node of the cluster of its own, C{<node_id>-w<slot>}
(L{worker_cluster}), the agents and users landing on any worker through
the control and public sockets the master binds and every worker adopts
(L{shared_listeners}), and streams between workers going through Redis as
between machines.  Each worker listens on a proxy port of its own
(L{worker_proxy}): a data connection must reach the worker that asked for
it, so each worker names its own proxy address in every
C{request_new_proxy_conn}.

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

from collections.abc import Iterator

import attrs

from rproxy.config import Config, FrontendConfig, parse_endpoint

__all__ = ["master_view", "worker_view", "serving_slots", "limit_share", "tunnels_in_workers",
           "shared_listeners", "tunnel_socket", "worker_proxy", "worker_cluster"]


def tunnels_in_workers(config: Config) -> bool:
    """
    Whether the workers run the tunnels (a cluster is configured, so
    that they can share their agents), rather than the master.
    """
    return config.cluster is not None and bool(config.tunnels)  # (a cluster has stores.redis)


def master_view(config: Config) -> Config:
    """
    The master's part: everything but frontends and token pools (the
    admin port is the master's own, merged over the workers), and but
    tunnels when the workers run them.
    """
    if tunnels_in_workers(config):
        return attrs.evolve(config, frontends=(), token_pools=(), tunnels=())
    return attrs.evolve(config, frontends=(), token_pools=())


def tunnel_socket(tunnel: str, role: str) -> str:
    """
    The name of a tunnel port's shared sockets (beside the frontends').
    """
    return f"tunnel {tunnel} {role}"


def shared_listeners(config: Config, count: int) -> Iterator[tuple[str, str, range]]:
    """
    Every listener the master binds for its workers, as (name, listen
    string, the slots serving it): the frontends, and with tunnels in the
    workers each tunnel's control and public ports.
    """
    for frontend in config.frontends:
        yield frontend.name, frontend.listen, serving_slots(config, frontend, count)
    if tunnels_in_workers(config):
        for tunnel in config.tunnels:
            yield tunnel_socket(tunnel.name, "control"), tunnel.control, range(count)
            yield tunnel_socket(tunnel.name, "public"), tunnel.public, range(count)


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


def worker_proxy(listen: str, slot: int) -> str:
    """
    Slot C{slot}'s own proxy listener for a tunnel whose proxy port is
    C{listen}: the same address with the port plus the slot (port 0
    stays 0: a port of its own, chosen when it binds).
    """
    endpoint = parse_endpoint(listen)
    if not endpoint.port:
        return listen

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    rest = "".join(f":{name}={esc(value)}" for name, value in endpoint.params if name != "port")
    return f"{endpoint.kind}:{endpoint.port + slot}{rest}"


def worker_cluster(cluster: object, slot: int) -> object:
    """
    Slot C{slot}'s node of the cluster: C{<node_id>-w<slot>}, advertising
    its own proxy port (the advertised port plus the slot; 0 stays 0, the
    port its listener bound).
    """
    host, port = cluster.advertise_proxy  # type: ignore[attr-defined]
    return attrs.evolve(cluster, node_id=f"{cluster.node_id}-w{slot}",  # type: ignore[attr-defined]
                        advertise_proxy=(host, port + slot if port else 0))


def worker_view(config: Config, slot: int, count: int) -> Config:
    """
    Slot C{slot}'s part: its frontends with their share of each
    connection limit, every pool, its share of each token pool's
    credentials, no admin port; no tunnel, unless the workers run them
    (L{tunnels_in_workers}): then every tunnel, with a proxy port of its
    own, as a node of the cluster of its own.
    """
    tunnels: tuple[object, ...] = ()
    cluster = config.cluster
    if tunnels_in_workers(config):
        tunnels = tuple(attrs.evolve(t, proxy=worker_proxy(t.proxy, slot)) for t in config.tunnels)
        cluster = worker_cluster(config.cluster, slot)
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
        tunnels=tunnels,
        cluster=cluster,
        admin=attrs.evolve(config.admin, listen=None),
    )
