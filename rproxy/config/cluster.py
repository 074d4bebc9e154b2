"""
The C{cluster:} section: this node's id and the address agents dial for
streams opened through another node (see L{rproxy.cluster}).

  cluster:
    node_id: edge-1
    advertise: {proxy: "10.0.0.5:17001"}   # port 0: the port the proxy listener bound
    heartbeat_interval: 1s                  # how often this node renews its record
    heartbeat_timeout: 5s                   # a node silent this long drops out (>= 3x interval)

Without the section nothing changes; with it, C{stores.redis} is required.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import attrs

from rproxy.config import values as v
from rproxy.config.document import overlap
from rproxy.config.endpoints import Endpoint, parse_endpoint
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief, parse_hostport
from rproxy.workers.views import worker_proxy

__all__ = ["ClusterConfig", "read_cluster", "worker_port_errors"]

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@attrs.frozen
class ClusterConfig:
    node_id: str
    # host and port agents dial for streams opened through this node (port
    # 0: the port the tunnel's proxy listener bound)
    advertise_proxy: tuple[str, int]
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0


def _node_id(value: object) -> str:
    text = v.text(value)
    if not _NODE_ID.match(text):
        raise ValueError(f"{brief(text)} is not a node id (1-64 letters, digits, '.', '_', '-')")
    return text


def _address(value: object) -> tuple[str, int]:
    return parse_hostport(v.text(value), allow_zero=True)


def read_cluster(top: Section, stores: object, tunnels: tuple[object, ...]) -> ClusterConfig | None:
    """
    The C{cluster:} section, or None when it is absent; it needs
    C{stores.redis} (the shared state lives there).
    """
    raw = top.raw("cluster")
    if raw is MISSING or raw is None:
        return None
    section = top.child(raw, "cluster")
    if not section.ok:
        return None
    node_id = section.value("node_id", _node_id)
    advertise = section.section("advertise")
    proxy = advertise.value("proxy", _address)
    advertise.finish()
    interval = section.value("heartbeat_interval", v.positive_duration, 1.0)
    timeout = section.value("heartbeat_timeout", v.positive_duration, 5.0)
    section.finish()
    # the record lives timeout - interval and is renewed every interval:
    # a margin of one interval for a slow renewal
    if timeout < 3 * interval - 1e-9:
        section.error("heartbeat_timeout", f"must be at least 3 times heartbeat_interval ({interval:g}s)")
    if getattr(stores, "redis_url", None) is None:
        section.errors.append("cluster: needs stores.redis.url (or REDIS_URL): the nodes share state through Redis")
    if proxy is not None and proxy[1] != 0 and len(tunnels) > 1:
        advertise.error("proxy", f"{len(tunnels)} tunnels listen on different proxy ports: give port 0 "
                                 f"({proxy[0]}:0) to advertise each one's own port")
    if node_id is None or proxy is None:
        return None
    return ClusterConfig(node_id=node_id, advertise_proxy=proxy, heartbeat_interval=interval,
                         heartbeat_timeout=timeout)


def worker_port_errors(workers: int | str, cluster: ClusterConfig | None, tunnels: tuple[object, ...],
                       path: Callable[[str], str], cores: Callable[[], int] | None = None,
                       listeners: Sequence[tuple[str, str]] = ()) -> list[str]:
    """
    At C{workers: N} with a cluster, the workers run the tunnels and
    worker I{k} listens on (and advertises) the tunnel's proxy port plus
    I{k} (L{rproxy.workers.views.worker_proxy}): those ports must exist,
    and none may be a port another listener takes (C{listeners}: key path
    and listen string of every listener configured,
    L{rproxy.config.document.listeners}), or that worker could not listen
    and its tunnel's streams would fail while /health says ok. (Two
    tunnels' worker ranges cannot meet without one range holding the
    other's configured port, so that check covers them.) C{path(name)}
    is the key path of the tunnel named C{name}; C{auto} counts the cores
    as the start does (C{cores}, default this process's CPU affinity).
    """
    if cluster is None or not tunnels or workers == 1:
        return []
    if workers == "auto":
        count = cores() if cores is not None else len(os.sched_getaffinity(0))
    else:
        assert isinstance(workers, int)
        count = workers
    if count <= 1:
        return []
    errors = []
    last = count - 1
    advertised = cluster.advertise_proxy[1]
    if advertised and advertised + last > 65535:
        errors.append(f"cluster.advertise.proxy: port {advertised} + {last} (global.workers: {workers}, one proxy "
                      f"port per worker) is past 65535: choose a port at most {65535 - last}, or 0")
    taken = [(where, parse_endpoint(listen)) for where, listen in listeners]
    for tunnel in tunnels:
        key = f"{path(tunnel.name)}.proxy"  # type: ignore[attr-defined]
        port = parse_endpoint(tunnel.proxy).port  # type: ignore[attr-defined]
        if port and port + last > 65535:
            errors.append(f"{key}: port {port} + {last} (global.workers: {workers}, "
                          f"one proxy port per worker) is past 65535: choose a port at most {65535 - last}")
            continue
        clash = _worker_clash(tunnel, key, last, taken)
        if clash:
            errors.append(f"{clash} (global.workers: {workers}): ports {port}-{port + last} must be free for this "
                          f"tunnel's workers, one proxy port each")
    return errors


def _worker_clash(tunnel: object, key: str, last: int, taken: list[tuple[str, Endpoint]]) -> str | None:
    """
    The first of the tunnel's worker proxy listeners (workers 1 to
    C{last}) that would take the socket of one in C{taken} (other than
    the tunnel's own proxy port), told as an error; None when none does.
    """
    for slot in range(1, last + 1):
        listen = worker_proxy(tunnel.proxy, slot)  # type: ignore[attr-defined]
        endpoint = parse_endpoint(listen)
        for where, other in taken:
            if where != key and overlap(endpoint, other):
                return f"{key}: worker {slot} listens on port {endpoint.port} ({endpoint.port - slot} + {slot}), " \
                       f"already used by {where}"
    return None
