"""
One machine's figures from those of every process (pure).

Workers count their own connections; the master knows server state (its
health checks, and the ejections workers report).  The merges below sum
what is counted and take state from the master.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["sum_metrics", "carry_counters", "totals", "carry_totals", "add_totals", "merge_pools", "merge_health", "merge_token_pools", "merge_counters", "merge_token_rows"]

# per-machine state, the same in every process: the lowest wins (a server
# is up only where every process can use it), never a sum
_STATE_GAUGES = frozenset({"rproxy_server_up", "rproxy_store_up", "rproxy_cluster_up"})

# the kinds of family whose samples only ever grow in a process: counters,
# and histograms' and summaries' buckets, sums and counts
_COUNTED = frozenset({"counter", "histogram", "summary"})


def sum_metrics(texts: list[str], kinds: frozenset[str] | None = None) -> str:
    """
    Prometheus text from several processes' texts: samples with the same
    name and labels are summed (counters, gauges, histogram buckets, sums
    and counts alike), except L{_STATE_GAUGES}, which take the lowest.
    Families keep their first-seen order; with C{kinds}, only families of
    those types are kept.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if kinds is not None and family.type not in kinds:
                continue
            entry = families.setdefault(family.name, (family.type, family.documentation, {}))
            samples = entry[2]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a process's start time: no machine-wide sum
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif family.name in _STATE_GAUGES:
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    lines = []
    for name, (kind, documentation, samples) in families.items():
        if not samples:
            continue  # (a family of creation times only)
        exposed = name + "_total" if kind == "counter" else name
        lines.append(f"# HELP {exposed} {_escape_help(documentation)}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample_name, labels), value in samples.items():
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {_number(value)}" if labels else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def carry_counters(carried: str, last: str) -> str:
    """
    What a worker slot's dead processes counted: C{carried} (this text,
    from earlier deaths) plus the counters of C{last}, the last figures
    the master saw from the process that just died; gauges are dropped
    (they describe a process that is gone).  Added to the machine's
    figures, it keeps every counter from going back when a worker is
    started again, as nginx and HAProxy keep their totals: Prometheus
    would read a lower value as a reset, and rate() would jump.
    """
    return sum_metrics([carried, last], kinds=_COUNTED)


# a place where a JSON view keeps a counter: its key, and the list or
# mapping that holds the number with the index or field to read it by
_Counter = tuple[tuple[Any, ...], Any, Any]

# the figures of the JSON views that only ever grow in a process; the
# others (active connections, waiting, a token pool's sessions) are gauges
_SERVER_COUNTERS = ("total_connections", "connect_failures", "bytes_in", "bytes_out")
_CONSOLE_COUNTERS = ("total", "connect_errors", "classes", "durations")
_TUNNEL_COUNTERS = ("streams_opened", "streams_failed")


def _counters(view: dict[str, Any]) -> Iterator[_Counter]:
    """
    Every counter of C{view}: a worker's report (its C{health} and
    C{stats}, L{rproxy.workers.child.Worker.report}), its dashboard sample
    under C{console}, or the machine's merge of either in the same shape.
    Keys name the view, the frontend (or pool and server) and the field,
    so that a worker's counters find the machine's they add to.
    """
    health, console = view.get("health", {}), view.get("console", {})
    yield from _rows(health.get("frontends", ()), ("total_connections",), ("health", "frontends"))
    yield from _servers(health.get("backends", ()), "servers", "name", ("health",))
    yield from _servers(view.get("stats", {}).get("pools", ()), "backends", "server_id", ("stats",))
    yield from _rows(console.get("frontends", ()), _CONSOLE_COUNTERS, ("console", "frontends"))
    yield from _servers(console.get("backends", ()), "servers", "name", ("console",))
    yield from _rows(console.get("tunnels", ()), _TUNNEL_COUNTERS, ("console", "tunnels"))


def _rows(rows: Iterable[dict[str, Any]], fields: tuple[str, ...], prefix: tuple[str, ...]) -> Iterator[_Counter]:
    for row in rows:
        for field in fields:
            value = row.get(field)
            if isinstance(value, list):  # (answers by class, the duration histogram)
                yield from (((*prefix, row["name"], field, i), value, i) for i in range(len(value)))
            elif value is not None:
                yield (*prefix, row["name"], field), row, field


def _servers(pools: Iterable[dict[str, Any]], servers: str, key: str, prefix: tuple[str, ...]) -> Iterator[_Counter]:
    for pool in pools:
        for server in pool.get(servers, ()):
            for field in _SERVER_COUNTERS:
                if field in server:
                    yield (*prefix, pool["name"], server[key], field), server, field


def totals(view: dict[str, Any]) -> dict[tuple[Any, ...], float]:
    """
    The counters of C{view} (see L{_counters}) by key.
    """
    return {key: holder[index] for key, holder, index in _counters(view)}


def carry_totals(carried: dict[tuple[Any, ...], float], last: dict[tuple[Any, ...], float]) -> dict[tuple[Any, ...], float]:
    """
    L{carry_counters} for the JSON views: C{carried} plus C{last}, key by
    key.
    """
    return {key: carried.get(key, 0) + last.get(key, 0) for key in carried.keys() | last.keys()}


def add_totals(view: dict[str, Any], carried: dict[tuple[Any, ...], float]) -> None:
    """
    Add to C{view}'s counters, in place, those C{carried} has under the
    same key: a machine's merged view then keeps what the workers that
    died counted, as its C{/metrics} does.  A counter of a frontend or
    server the view no longer shows is left out.
    """
    for key, holder, index in _counters(view):
        holder[index] += carried.get(key, 0)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# per-server figures each worker counts for itself
_SERVER_SUMS = ("active_connections", "total_connections", "connect_failures", "bytes_in", "bytes_out")


def merge_pools(master: list[dict[str, Any]], workers: list[list[dict[str, Any]]],
                servers: str = "backends", key: str = "server_id") -> list[dict[str, Any]]:
    """
    Pools for the machine: state, health and ejections from the master's
    pools, connection and byte counts summed over the workers' pools,
    waiting summed.  Two shapes: L{rproxy.pool.Pool.stats} (C{/stats}: its
    servers under C{backends}, named by C{server_id}) and
    L{rproxy.pool.Pool.describe} (C{/health}: under C{servers}, by C{name}).
    """
    counted: dict[tuple[str, str], dict[str, int]] = {}
    waiting: dict[str, int] = {}
    for pools in workers:
        for pool in pools:
            waiting[pool["name"]] = waiting.get(pool["name"], 0) + int(pool.get("waiting", 0))
            for server in pool[servers]:
                sums = counted.setdefault((pool["name"], server[key]), dict.fromkeys(_SERVER_SUMS, 0))
                for field in _SERVER_SUMS:
                    sums[field] += int(server.get(field, 0))
    merged = []
    for pool in master:
        pool = dict(pool, waiting=waiting.get(pool["name"], 0))
        entries = []
        for server in pool[servers]:
            sums = counted.get((pool["name"], server[key]), {})
            entries.append(dict(server, **{field: sums.get(field, 0) for field in _SERVER_SUMS if field in server}))
        pool[servers] = entries
        merged.append(pool)
    return merged


def merge_frontends(workers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    Frontends as every worker reports them: counts summed, listening if
    any worker listens.
    """
    merged: dict[str, dict[str, Any]] = {}
    for frontends in workers:
        for frontend in frontends:
            entry = merged.get(frontend["name"])
            if entry is None:
                merged[frontend["name"]] = dict(frontend, workers=1)
                continue
            entry["workers"] += 1
            entry["listening"] = entry["listening"] or frontend["listening"]
            for field in ("active_connections", "waiting", "total_connections"):
                entry[field] += frontend[field]
    return list(merged.values())


def merge_token_pools(workers: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """
    Token pool status by pool: numbers summed over the workers that hold
    a share of its credentials, other fields from the first.
    """
    merged: dict[str, dict[str, Any]] = {}
    for pools in workers:
        for name, status in pools.items():
            merged[name] = _add(merged[name], status) if name in merged else status
    return merged


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """
    C{a} and C{b} field by field: numbers summed, mappings merged alike,
    a C{status} healthy if either is, anything else from C{a}.
    """
    out = dict(a)
    for field, value in b.items():
        mine = out.get(field)
        if field not in out:
            out[field] = value
        elif isinstance(value, dict) and isinstance(mine, dict):
            out[field] = _add(mine, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(mine, (int, float)):
            out[field] = mine + value
        elif field == "status" and value == "healthy":
            out[field] = value
    return out


def merge_health(master: dict[str, Any], workers: list[dict[str, Any]], extra_problems: list[str]) -> dict[str, Any]:
    """
    C{/health} for the machine from the master's detail (backends,
    stores) and the workers' (frontends, pools' counts, token pools).
    """
    problems = list(extra_problems) + list(master.get("problems", []))
    for detail in workers:
        for problem in detail.get("problems", []):
            if problem not in problems:
                problems.append(problem)
    return dict(
        master,
        status="ok" if not problems else "degraded",
        problems=problems,
        frontends=merge_frontends([d.get("frontends", []) for d in workers]),
        backends=merge_pools(master.get("backends", []), [d.get("backends", []) for d in workers],
                             servers="servers", key="name"),
        token_pools=merge_token_pools([d.get("token_pools", {}) for d in workers]),
    )


def merge_counters(workers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    The dashboard's frontend counters (L{rproxy.console.frontend_counters})
    for the machine: connections, answers by class and the duration
    histogram summed per frontend over the workers that serve it; its
    name, address and backend from the first.
    """
    merged: dict[str, dict[str, Any]] = {}
    for rows in workers:
        for row in rows:
            entry = merged.get(row["name"])
            if entry is None:
                merged[row["name"]] = dict(row, classes=list(row["classes"]), durations=list(row["durations"]))
                continue
            for field in ("total", "active", "connect_errors"):
                entry[field] += row[field]
            entry["classes"] = [a + b for a, b in zip(entry["classes"], row["classes"], strict=True)]
            entry["durations"] = [a + b for a, b in zip(entry["durations"], row["durations"], strict=True)]
            entry["address"] = entry["address"] or row["address"]
    return list(merged.values())


def merge_token_rows(workers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    The dashboard's token pools (L{rproxy.console.token_pool_rows}) for
    the machine: each worker holds a share of a pool's credentials, so
    the counts add up and the credentials taken out join.
    """
    merged: dict[str, dict[str, Any]] = {}
    for rows in workers:
        for row in rows:
            entry = merged.get(row["name"])
            if entry is None:
                merged[row["name"]] = dict(row, credentials_out=list(row["credentials_out"]))
                continue
            for field, value in row.items():
                if field == "credentials_out":
                    entry[field] = sorted(set(entry[field]) | set(value))
                elif isinstance(value, int) and not isinstance(value, bool):
                    entry[field] = entry.get(field, 0) + value
    return list(merged.values())


def merge_agents(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    C{/api/v1/agents} for a machine whose workers run the tunnels, each a
    node of the cluster (L{rproxy.workers.views}), from every worker's
    list (L{rproxy.workers.child.Worker.agents}): an agent as the worker
    it is logged in to describes it (its own figures), the agents of other
    machines as the first worker lists them; each agent once, per tunnel
    in the workers' order.
    """
    ours = {report["node"] for report in reports if report.get("node")}
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for report in reports:
        for tunnel in report.get("tunnels", []):
            listed = merged.setdefault(tunnel["name"], {})
            for agent in tunnel["agents"]:
                node = agent.get("node")
                if node == report.get("node") or (node not in ours and agent["id"] not in listed):
                    listed.setdefault(agent["id"], agent)
    return [{"name": name, "agents": sorted(agents.values(), key=lambda a: a["id"])}
            for name, agents in merged.items()]


def merge_tunnel_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The dashboard's tunnels (L{rproxy.console.tunnel_rows}) for a machine
    whose workers run them: the agents as L{merge_agents} lists them,
    the stream counts summed over the workers.
    """
    agents = {t["name"]: t["agents"] for t in merge_agents(reports)}
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report.get("tunnels", []):
            entry = merged.get(row["name"])
            if entry is None:
                merged[row["name"]] = dict(row, agents=agents.get(row["name"], []))
                continue
            for field in ("streams_opened", "streams_failed"):
                entry[field] += row[field]
    return list(merged.values())
