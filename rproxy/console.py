"""
The dashboard's data: one snapshot of the whole proxy per interval.

The data path keeps plain counters on its own objects (frontends,
servers, agents, token pools).  L{Console.sample} reads them once per
C{interval} (a L{LoopingCall} on the injected clock) and keeps, per
frontend, the last minutes as rates: requests per second, the share of
4xx and 5xx answers, p50 and p99 latency (from the duration histogram's
deltas), open connections.  The JSON the page polls is built at most once
per sample, on the first request after it, and served as the same bytes
to every viewer: a dozen open pages cost what one does, and a closed page
costs one sample a second (a few dictionary reads per frontend).
"""

from __future__ import annotations

import collections
import json
import os
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import rproxy

if TYPE_CHECKING:
    from rproxy.service import RProxyService

__all__ = ["Console", "quantile"]

# samples kept per frontend: 5 minutes at one a second
HISTORY = 300
# the figures shown as "now" are over this many samples
RECENT = 5


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """
    The C{q} quantile (0..1) of a histogram given as per-bucket counts
    with upper C{bounds}, interpolated linearly inside its bucket; None
    when it holds nothing.  A value in the last (+Inf) bucket is reported
    as the last finite bound.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(counts):
        if count and cumulative + count >= rank:
            upper = bounds[i]
            lower = bounds[i - 1] if i else 0.0
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-2] if bounds[-1] == float("inf") else bounds[-1]


class _FrontendHistory:
    """
    The previous counters of one frontend and its recent samples.
    """

    def __init__(self) -> None:
        self.last: tuple[float, int, list[int], list[int]] | None = None
        self.points: collections.deque[list[Any]] = collections.deque(maxlen=HISTORY)
        # per-bucket deltas of the last RECENT samples, for "now" percentiles
        self.recent: collections.deque[tuple[float, list[int], list[int]]] = collections.deque(maxlen=RECENT)


def _classes(requests: Any) -> list[int]:
    """
    Requests answered so far by class: 1xx..5xx, then other (0: no answer).
    """
    counts = [0] * 6
    for key, count in requests.items():
        code = key[1] if isinstance(key, tuple) else key
        cls = code // 100 if isinstance(code, int) else 0
        counts[cls - 1 if 1 <= cls <= 5 else 5] += count
    return counts


def frontend_counters(service: RProxyService) -> list[dict[str, Any]]:
    """
    What the dashboard samples of each frontend of C{service}: plain
    numbers, ready for JSON (a worker sends them to its master, which
    sums them: L{rproxy.workers.merge.merge_counters}).
    """
    from rproxy.http.frontend import DURATION_BUCKETS

    rows = []
    for frontend in service.frontends.values():
        requests = getattr(frontend, "requests", None)
        rows.append({
            "name": frontend.name,
            "protocol": frontend.config.protocol,
            "listen": frontend.config.listen,
            "address": _bound_address(service, frontend.name),
            "backend": frontend.config.backend,
            "total": frontend.total,
            "active": frontend.active,
            "connect_errors": frontend.connect_errors,
            "classes": _classes(requests) if requests is not None else [0] * 6,
            "durations": list(getattr(frontend, "duration_buckets", None) or [0] * len(DURATION_BUCKETS)),
        })
    return rows


def tunnel_rows(service: RProxyService) -> list[dict[str, Any]]:
    """
    The dashboard's tunnels: their agents (the cluster's, with one) and
    stream counts.
    """
    return [
        {"name": t.name, "mode": t.config.mode, "agents": t.agents(),
         "streams_opened": t.streams_opened, "streams_failed": t.streams_failed}
        for t in service.tunnels.values()
    ]


def token_pool_rows(service: RProxyService) -> list[dict[str, Any]]:
    """
    Each token pool of C{service}: counts and the credentials taken out.
    """
    return [dict(name=name, credentials_out=tokens.credentials_out(), **tokens.counts())
            for name, tokens in service.token_pools.items()]


def _bound_address(service: RProxyService, name: str) -> str | None:
    """
    Where a frontend listens as bound (the port a port 0 got).
    """
    port = service.ports.get(name)
    host = getattr(port.getHost(), "host", None) if port is not None else None
    if host is None:
        return None
    number = port.getHost().port  # type: ignore[union-attr]
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


class Console:
    """
    Samples a service's counters every C{interval} and serves the
    dashboard's snapshot; see the module docstring.
    """

    log = Logger()

    def __init__(self, service: RProxyService, clock: Any, interval: float = 1.0) -> None:
        self.service = service
        self.clock = clock
        self.interval = interval
        self.started = clock.seconds()
        self.samples = 0
        self.sampled_at = -float("inf")
        self._history: dict[str, _FrontendHistory] = {}
        self._cached: tuple[int, bytes] | None = None
        self._rows: list[dict[str, Any]] = []
        self._loop: LoopingCall | None = None
        self.host = socket.gethostname()

    # -- lifetime --------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._safe_sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(self._died)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    @property
    def running(self) -> bool:
        return self._loop is not None

    def _died(self, failure: Failure) -> None:
        # _safe_sample never raises; should it all the same, say so
        self.log.failure("dashboard: sampling stopped", failure)

    def _safe_sample(self) -> None:
        try:
            self.sample()
        except Exception:
            self.log.failure("dashboard: a sample failed; the next one will try again")

    # -- sampling --------------------------------------------------------

    def sample(self) -> None:
        """
        Read every frontend's counters and append one point of rates.
        """
        self.take(frontend_counters(self.service))

    def take(self, rows: list[dict[str, Any]]) -> None:
        """
        One sample of C{rows} (L{frontend_counters}, or the sum of every
        worker's): a point of rates per frontend against the previous.
        """
        from rproxy.http.frontend import DURATION_BUCKETS

        now = self.clock.seconds()
        seen = set()
        for row in rows:
            name = row["name"]
            seen.add(name)
            history = self._history.get(name)
            if history is None:
                history = self._history[name] = _FrontendHistory()
            classes, durations, total = row["classes"], row["durations"], row["total"]
            last, history.last = history.last, (now, total, classes, durations)
            if last is None or now <= last[0]:
                continue
            elapsed = now - last[0]
            by_class = [max(0, a - b) for a, b in zip(classes, last[2], strict=True)]
            buckets = [max(0, a - b) for a, b in zip(durations, last[3], strict=False)]
            history.recent.append((elapsed, by_class, buckets))
            answered = sum(by_class)
            p50 = quantile(DURATION_BUCKETS, buckets, 0.5)
            p99 = quantile(DURATION_BUCKETS, buckets, 0.99)
            history.points.append([
                round(now, 3), round(answered / elapsed, 2), by_class[3], by_class[4],
                None if p50 is None else round(p50 * 1000, 2), None if p99 is None else round(p99 * 1000, 2),
                row["active"], round(max(0, total - last[1]) / elapsed, 2),
            ])
        for gone in set(self._history) - seen:
            del self._history[gone]
        self._rows = rows
        self.samples += 1
        self.sampled_at = now

    # -- the snapshot ----------------------------------------------------

    def snapshot_bytes(self) -> bytes:
        """
        The snapshot as JSON, built once per sample whoever asks.  Without
        a running loop (a test's resource tree) a request older than one
        interval takes a sample first.
        """
        if not self.running and self.clock.seconds() - self.sampled_at >= self.interval:
            self.sample()
        cached = self._cached
        if cached is not None and cached[0] == self.samples:
            return cached[1]
        body = json.dumps(self.snapshot(), separators=(",", ":"), sort_keys=True).encode("utf-8")
        self._cached = (self.samples, body)
        return body

    def snapshot(self) -> dict[str, Any]:
        service = self.service
        now = self.clock.seconds()
        return {
            "at": now,
            "interval": self.interval,
            "process": {
                "version": rproxy.__version__, "pid": os.getpid(), "host": self.host,
                "config_path": service.config_path, "up_for": round(now - self.started, 1),
                "stopping": service.stopping, "problems": self.problems(),
                "api_key": service.config.admin.api_key is not None,
            },
            "columns": ["at", "requests_per_s", "4xx", "5xx", "p50_ms", "p99_ms", "open", "connections_per_s"],
            "frontends": [self._frontend(row) for row in self._rows],
            "backends": self.backends(),
            "tunnels": self.tunnels(),
            "token_pools": self.token_pools(),
            "reload": service.last_reload,
        }

    def problems(self) -> list[str]:
        return self.service.readiness_problems()

    def tunnels(self) -> list[dict[str, Any]]:
        return tunnel_rows(self.service)

    def backends(self) -> list[dict[str, Any]]:
        return [pool.describe() for pool in self.service.pools.values()]

    def token_pools(self) -> list[dict[str, Any]]:
        return token_pool_rows(self.service)

    def _frontend(self, row: dict[str, Any]) -> dict[str, Any]:
        from rproxy.http.frontend import DURATION_BUCKETS

        history = self._history.get(row["name"])
        points = list(history.points) if history is not None else []
        now: dict[str, Any] = {"requests_per_s": 0.0, "error_rate": {"4xx": 0.0, "5xx": 0.0},
                               "p50_ms": None, "p99_ms": None}
        if history is not None and history.recent:
            elapsed = sum(r[0] for r in history.recent)
            classes = [sum(r[1][i] for r in history.recent) for i in range(6)]
            buckets = [sum(r[2][i] for r in history.recent) for i in range(len(DURATION_BUCKETS))]
            answered = sum(classes)
            p50, p99 = quantile(DURATION_BUCKETS, buckets, 0.5), quantile(DURATION_BUCKETS, buckets, 0.99)
            now = {
                "requests_per_s": round(answered / elapsed, 2) if elapsed else 0.0,
                "error_rate": {"4xx": round(classes[3] / answered, 4) if answered else 0.0,
                               "5xx": round(classes[4] / answered, 4) if answered else 0.0},
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            }
        return {
            "name": row["name"],
            "protocol": row["protocol"],
            "listen": row["listen"],
            "address": row["address"],
            "backend": row["backend"],
            "open_connections": row["active"],
            "total_connections": row["total"],
            "connect_errors": row["connect_errors"],
            "now": now,
            "history": points,
        }
