"""
Per agent and model figures of a tunnel's C{mode: http}: requests by
status class, failed attempts by kind, and the duration of requests, for
C{/metrics} (L{tunnel_http_metrics}).

L{AgentStats} is a filter of the tunnel's HTTP frontend: its
C{attempt_end} phase counts the attempts on an agent that got no response
(C{connect}: the agent could not open a stream, C{upstream}: the response
was lost or invalid, C{timeout}, C{aborted}: the client went away); its
C{log} phase counts the request under the agent that answered it (the
last one tried, C{"-"} if none was) and its model (C{"-"} without one,
or when no agent was tried).

Labels are bounded: agents are those that logged in with a key, models
those they serve (a model no agent serves is refused, or routed as none),
and past L{MAX_SERIES} label pairs the rest count under C{"other"}.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from rproxy.http.filters import Filter
from rproxy.http.frontend import DURATION_BUCKETS

__all__ = ["AgentStats", "tunnel_http_metrics", "MAX_SERIES"]

MAX_SERIES = 4096
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class AgentStats(Filter):
    """
    The figures of one tunnel's requests, by (agent, model).

    @ivar requests: C{(agent, model, class)} -> requests answered
        (class C{"2xx"}...).
    @ivar errors: C{(agent, model, kind)} -> attempts on that agent that
        got no response.
    @ivar durations: C{(agent, model)} -> [bucket counts..., sum of seconds]
        over L{DURATION_BUCKETS}.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.durations: dict[tuple[str, str], list[float]] = {}

    def _labels(self, agent: str, exchange: Any) -> tuple[str, str]:
        # the model of a request no agent took may be anything a client
        # wrote: not a label
        notes = exchange.notes
        model = (notes.get("model") if notes and agent != "-" else None) or "-"
        if (agent, model) not in self.durations and len(self.durations) >= MAX_SERIES:
            return "other", "other"
        return agent, model

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        if outcome.__class__ is str:
            agent, model = self._labels(server.name, exchange)
            self.errors[(agent, model, outcome.partition(":")[0])] += 1  # type: ignore[union-attr]

    def log(self, exchange: Any, backend: str) -> None:
        agent, model = self._labels(exchange.tried[-1] if exchange.tried else "-", exchange)
        status = exchange.status
        self.requests[(agent, model, _CLASSES[status // 100 - 1] if 100 <= status < 600 else str(status))] += 1
        seconds = self.clock.seconds() - exchange.started
        durations = self.durations.get((agent, model))
        if durations is None:
            durations = self.durations[(agent, model)] = [0] * (len(DURATION_BUCKETS) + 1)
        durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        durations[-1] += seconds


def tunnel_http_metrics(tunnels: Iterable[Any]) -> Iterator[Metric]:
    """
    The metric families of the C{mode: http} tunnels among C{tunnels}
    (L{rproxy.tunnel.server.TunnelServer}s: the figures are their
    connector's C{stats}).
    """
    requests = CounterMetricFamily(
        "rproxy_tunnel_http_requests", "Requests through a mode http tunnel, by the agent that answered, "
        "model and status class", labels=["tunnel", "agent", "model", "class"])
    errors = CounterMetricFamily(
        "rproxy_tunnel_http_errors", "Attempts on an agent that got no response, by kind (connect, upstream, "
        "timeout, aborted)", labels=["tunnel", "agent", "model", "kind"])
    duration = HistogramMetricFamily(
        "rproxy_tunnel_http_request_duration_seconds", "From request head to the end of the response, "
        "by agent and model", labels=["tunnel", "agent", "model"])
    for tunnel in tunnels:
        stats = getattr(tunnel.connector, "stats", None)
        if stats is None:
            continue
        for (agent, model, kind), count in sorted(stats.requests.items()):
            requests.add_metric([tunnel.name, agent, model, kind], count)
        for (agent, model, kind), count in sorted(stats.errors.items()):
            errors.add_metric([tunnel.name, agent, model, kind], count)
        for (agent, model), counts in sorted(stats.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(DURATION_BUCKETS, counts, strict=False):
                cumulative += int(count)
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            duration.add_metric([tunnel.name, agent, model], buckets, counts[-1])
    yield from (requests, errors, duration)
