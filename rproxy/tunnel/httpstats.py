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
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from rproxy.http.filters import Filter
from rproxy.http.frontend import DURATION_BUCKETS
from rproxy.metrics import _buckets

__all__ = ["AgentStats", "Series", "tunnel_http_metrics", "MAX_SERIES"]

MAX_SERIES = 4096
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
_NOBODY = ("-", "-")
_FIRST_BUCKET = DURATION_BUCKETS[0]


class Series:
    """
    The figures of one (agent, model) pair.

    @ivar classes: requests by status class: 1xx to 5xx, then any other.
    @ivar buckets: requests by duration, over L{DURATION_BUCKETS}.
    @ivar seconds: the sum of their durations.
    @ivar errors: kind -> attempts that got no response.
    """

    __slots__ = ("classes", "buckets", "seconds", "errors")

    def __init__(self) -> None:
        self.classes = [0] * 6
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.seconds = 0.0
        self.errors: dict[str, int] = {}


class AgentStats(Filter):
    """
    The figures of one tunnel's requests.

    @ivar series: C{(agent, model)} -> its L{Series}.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.series: dict[tuple[str, str], Series] = {}

    def _series(self, key: tuple[str, str]) -> Series:
        if len(self.series) >= MAX_SERIES:
            key = ("other", "other")
            series = self.series.get(key)
            if series is not None:
                return series
        series = self.series[key] = Series()
        return series

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        if outcome.__class__ is str:
            notes = exchange.notes
            key = (server.name, (notes.get("model") if notes else None) or "-")
            series = self.series.get(key) or self._series(key)
            kind = outcome.partition(":")[0]  # type: ignore[union-attr]
            series.errors[kind] = series.errors.get(kind, 0) + 1

    def log(self, exchange: Any, backend: str) -> None:
        # (one dict lookup a request; the model of a request no agent
        # took may be anything a client wrote: not a label)
        tried = exchange.tried
        if tried:
            notes = exchange.notes
            key = (tried[-1], (notes.get("model") if notes else None) or "-")
        else:
            key = _NOBODY
        series = self.series.get(key) or self._series(key)
        status = exchange.status
        series.classes[status // 100 - 1 if 100 <= status < 600 else 5] += 1
        seconds = self.clock.seconds() - exchange.started
        series.seconds += seconds
        series.buckets[0 if seconds <= _FIRST_BUCKET else bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1


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
        for (agent, model), series in sorted(stats.series.items()):
            labels = [tunnel.name, agent, model]
            for kind, count in zip(_CLASSES, series.classes, strict=True):
                if count:
                    requests.add_metric([*labels, kind], count)
            for kind, count in sorted(series.errors.items()):
                errors.add_metric([*labels, kind], count)
            if any(series.buckets):
                duration.add_metric(labels, _buckets(DURATION_BUCKETS, series.buckets), series.seconds)
    yield from (requests, errors, duration)
