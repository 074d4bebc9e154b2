"""
Prometheus metrics.

The data path keeps plain integer counters on its own objects (frontends,
servers, connections); nothing on a per-byte or per-connection path calls
into prometheus-client.  At scrape time L{StateCollector} reads those
counters and yields the metric families, so a scrape always shows live
values, open connections' bytes included, and forwarding pays nothing for
being measured.

Events that are rare (health checks, reloads) use prometheus-client
objects directly.  Everything lives in one L{CollectorRegistry} per
service, passed in, never the global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from rproxy.pool import ADMIN_STATES

if TYPE_CHECKING:
    from rproxy.service import RProxyService

__all__ = ["Metrics", "StateCollector"]


class StateCollector:
    """
    Yields the live state of a service as metric families.
    """

    def __init__(self, service: RProxyService) -> None:
        self._service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        service = self._service
        now = service.clock.seconds()
        total = CounterMetricFamily(
            "rproxy_frontend_connections", "Client connections accepted", labels=["frontend"]
        )
        active = GaugeMetricFamily(
            "rproxy_frontend_connections_active", "Client connections open", labels=["frontend"]
        )
        waiting = GaugeMetricFamily(
            "rproxy_frontend_connections_waiting",
            "Client connections waiting for a frontend slot",
            labels=["frontend"],
        )
        refused = CounterMetricFamily(
            "rproxy_frontend_connections_refused",
            "Client connections closed without reaching a server",
            labels=["frontend"],
        )
        errors = CounterMetricFamily(
            "rproxy_frontend_connect_errors", "Failed connections to servers", labels=["frontend"]
        )
        fbytes = CounterMetricFamily(
            "rproxy_frontend_bytes",
            "Bytes relayed; in = from clients, out = to clients",
            labels=["frontend", "direction"],
        )
        for frontend in service.all_frontends():
            name = frontend.name
            total.add_metric([name], frontend.total)
            active.add_metric([name], len(frontend.connections) - len(frontend.waiting))
            waiting.add_metric([name], len(frontend.waiting))
            refused.add_metric([name], frontend.refused_total)
            errors.add_metric([name], frontend.connect_errors)
            from_clients, from_servers = frontend.bytes_totals()
            fbytes.add_metric([name, "in"], from_clients)
            fbytes.add_metric([name, "out"], from_servers)
        yield from (total, active, waiting, refused, errors, fbytes)

        up = GaugeMetricFamily(
            "rproxy_server_up", "1 when the server can take connections", labels=["backend", "server"]
        )
        sactive = GaugeMetricFamily(
            "rproxy_server_connections_active", "Connections open to the server", labels=["backend", "server"]
        )
        stotal = CounterMetricFamily(
            "rproxy_server_connections", "Connections made to the server", labels=["backend", "server"]
        )
        serrors = CounterMetricFamily(
            "rproxy_server_connect_errors", "Failed connections to the server", labels=["backend", "server"]
        )
        sbytes = CounterMetricFamily(
            "rproxy_server_bytes",
            "Bytes relayed by closed connections; in = from the server",
            labels=["backend", "server", "direction"],
        )
        ejections = CounterMetricFamily(
            "rproxy_server_ejections", "Passive ejections of the server", labels=["backend", "server"]
        )
        queue = GaugeMetricFamily(
            "rproxy_backend_queue_waiting", "Connections waiting for a server slot", labels=["backend"]
        )
        weight = GaugeMetricFamily(
            "rproxy_server_weight", "The server's balancing weight (as set at runtime, else configured)",
            labels=["backend", "server"],
        )
        admin = GaugeMetricFamily(
            "rproxy_server_admin_state",
            "1 for the state an operator set (ready, drain, maint), 0 for the others",
            labels=["backend", "server", "state"],
        )
        for pool in service.pools.values():
            queue.add_metric([pool.name], pool.waiting)
            for server in pool.servers:
                labels = [pool.name, server.name]
                up.add_metric(labels, 1 if server.usable(now) else 0)
                sactive.add_metric(labels, server.active)
                stotal.add_metric(labels, server.total)
                serrors.add_metric(labels, server.connect_failures)
                sbytes.add_metric(labels + ["in"], server.bytes_in)
                sbytes.add_metric(labels + ["out"], server.bytes_out)
                ejections.add_metric(labels, server.ejections)
                weight.add_metric(labels, server.weight)
                for state in ADMIN_STATES:
                    admin.add_metric(labels + [state], 1 if server.admin_state == state else 0)
        yield from (up, sactive, stotal, serrors, sbytes, ejections, queue, weight, admin)

        agents = GaugeMetricFamily("rproxy_tunnel_agents", "Agents logged in", labels=["tunnel"])
        streams = GaugeMetricFamily("rproxy_tunnel_streams_active", "Spliced streams open", labels=["tunnel"])
        opened = CounterMetricFamily("rproxy_tunnel_streams_opened", "Streams opened", labels=["tunnel"])
        failed = CounterMetricFamily(
            "rproxy_tunnel_streams_failed", "Public connections closed without a stream", labels=["tunnel"]
        )
        refused = CounterMetricFamily(
            "rproxy_tunnel_proxy_refused", "Proxy connections refused (forged, replayed, late)", labels=["tunnel"]
        )
        tbytes = CounterMetricFamily(
            "rproxy_tunnel_bytes", "Bytes of closed streams; in = from public clients", labels=["tunnel", "direction"]
        )
        for tunnel in service.tunnels.values():
            name = tunnel.name
            agents.add_metric([name], len(tunnel.registry.agents))
            streams.add_metric([name], sum(len(a.streams) for a in tunnel.registry.candidates()))
            opened.add_metric([name], tunnel.streams_opened)
            failed.add_metric([name], tunnel.streams_failed)
            refused.add_metric([name], tunnel.proxy_refused)
            tbytes.add_metric([name, "in"], tunnel.bytes_in)
            tbytes.add_metric([name, "out"], tunnel.bytes_out)
        yield from (agents, streams, opened, failed, refused, tbytes)
        cluster = getattr(service, "cluster", None)
        if cluster is not None:
            remote = GaugeMetricFamily("rproxy_tunnel_remote_agents", "Agents logged in to other nodes of the cluster",
                                       labels=["tunnel"])
            for tunnel in service.tunnels.values():
                remote.add_metric([tunnel.name], len(tunnel.registry.remote))
            yield remote
            yield GaugeMetricFamily("rproxy_cluster_up", "1 while Redis answers and cross-node routing is on",
                                    value=1 if cluster.state == "up" else 0)

        from rproxy.http.frontend import DURATION_BUCKETS, HTTPFrontend

        requests = CounterMetricFamily(
            "rproxy_http_requests", "HTTP requests answered", labels=["frontend", "backend", "code"]
        )
        active_requests = GaugeMetricFamily("rproxy_http_requests_active", "HTTP requests in flight",
                                            labels=["frontend"])
        retries = CounterMetricFamily("rproxy_http_retries", "Requests retried on another connection",
                                      labels=["frontend"])
        duration = HistogramMetricFamily("rproxy_http_request_duration_seconds",
                                         "From request head to the end of the response", labels=["frontend"])
        for frontend in service.all_frontends():
            if not isinstance(frontend, HTTPFrontend):
                continue
            for (backend, code), count in sorted(frontend.requests.items()):
                requests.add_metric([frontend.name, backend, str(code)], count)
            active_requests.add_metric([frontend.name], frontend.active_requests)
            retries.add_metric([frontend.name], frontend.retries_total)
            duration.add_metric([frontend.name], _buckets(DURATION_BUCKETS, frontend.duration_buckets),
                                frontend.duration_sum)
        upstream = CounterMetricFamily("rproxy_http_upstream_connections",
                                       "Upstream connections: opened, or reused from the keep-alive pool",
                                       labels=["kind"])
        upstream.add_metric(["opened"], service.upstreams.opened)
        upstream.add_metric(["reused"], service.upstreams.reused)
        idle = GaugeMetricFamily("rproxy_http_upstream_idle", "Idle keep-alive upstream connections")
        idle.add_metric([], service.upstreams.idle_count())
        yield from (requests, active_requests, retries, duration, upstream, idle)
        refused_requests = CounterMetricFamily(
            "rproxy_http_refused", "Requests refused by access policy (access: allow/deny, auth: no valid "
            "credentials, auth_unavailable: could not check)", labels=["frontend", "reason"])
        for frontend in service.all_frontends():
            if isinstance(frontend, HTTPFrontend):
                for why, count in sorted(frontend.refusals.items()):
                    refused_requests.add_metric([frontend.name, why], count)
        yield refused_requests

        from rproxy.tokenpool import WAIT_BUCKETS

        tokens_total = GaugeMetricFamily("rproxy_tokens_total", "Tokens held (logged in, not expired)",
                                         labels=["pool"])
        tokens_in_use = GaugeMetricFamily("rproxy_tokens_in_use", "Tokens leased to client connections",
                                          labels=["pool"])
        tokens_available = GaugeMetricFamily("rproxy_tokens_available", "Tokens free to lease", labels=["pool"])
        token_waiters = GaugeMetricFamily("rproxy_token_waiters", "Client connections waiting for a token",
                                          labels=["pool"])
        logins = CounterMetricFamily("rproxy_token_logins", "First logins of token sessions by outcome",
                                     labels=["pool", "outcome"])
        refreshes = CounterMetricFamily("rproxy_token_refreshes",
                                        "Logins renewing a token (before expiry or after a 401) by outcome",
                                        labels=["pool", "outcome"])
        unauthorized = CounterMetricFamily("rproxy_token_unauthorized", "Upstream 401 answers to pooled tokens",
                                           labels=["pool"])
        timeouts = CounterMetricFamily("rproxy_token_wait_timeouts", "Waits for a token that timed out",
                                       labels=["pool"])
        out = GaugeMetricFamily("rproxy_token_credentials_out",
                                "Credentials taken out of the pool (login keeps being refused)", labels=["pool"])
        wait = HistogramMetricFamily("rproxy_token_wait_seconds", "Time client connections waited for a token",
                                     labels=["pool"])
        for name, tokens in service.token_pools.items():
            counts = tokens.counts()
            tokens_total.add_metric([name], counts["total"])
            tokens_in_use.add_metric([name], counts["in_use"])
            tokens_available.add_metric([name], counts["available"])
            token_waiters.add_metric([name], counts["waiting"])
            for outcome in ("ok", "refused", "error"):
                logins.add_metric([name, outcome], tokens.logins[outcome])
                refreshes.add_metric([name, outcome], tokens.refreshes[outcome])
            unauthorized.add_metric([name], tokens.unauthorized_total)
            timeouts.add_metric([name], tokens.timeouts)
            out.add_metric([name], len(tokens.credentials_out()))
            wait.add_metric([name], _buckets(WAIT_BUCKETS, tokens.wait_buckets), tokens.wait_sum)
        yield from (tokens_total, tokens_in_use, tokens_available, token_waiters, logins, refreshes,
                    unauthorized, timeouts, out, wait)

        store_up = GaugeMetricFamily("rproxy_store_up", "1 when the store answers (stores: configured)",
                                     labels=["store"])
        auth = CounterMetricFamily("rproxy_auth_fallbacks", "Key checks that found a store down", labels=["store"])
        events_sent = CounterMetricFamily("rproxy_events_sent", "Events written to Redis Streams",
                                          labels=[])
        events_dropped = CounterMetricFamily("rproxy_events_dropped",
                                             "Events lost: the buffer was full (Redis down or slow), "
                                             "or not yet sent at shutdown",
                                             labels=[])
        events_resent = CounterMetricFamily("rproxy_events_resent",
                                            "Events sent again because a restarted Redis had lost them unread",
                                            labels=[])
        events_buffered = GaugeMetricFamily("rproxy_events_buffered", "Events waiting to be written to Redis")
        live_syncs = CounterMetricFamily("rproxy_live_backend_reads", "Reads of source: postgres pools",
                                         labels=[])
        sink = service.stores.events if service.stores is not None else None
        if sink is not None:
            events_sent.add_metric([], sink.sent)
            events_dropped.add_metric([], sink.dropped)
            events_resent.add_metric([], sink.resent)
            events_buffered.add_metric([], len(sink.buffer))
        if service.stores is not None and service.stores.live is not None:
            live_syncs.add_metric([], service.stores.live.syncs)
        yield from (events_sent, events_dropped, events_resent, events_buffered, live_syncs)
        if service.stores is not None:
            for store, state in service.stores.status().items():
                if state != "off":
                    store_up.add_metric([store], 1 if state == "up" else 0)
            chain = service.stores.keys
            auth.add_metric(["redis"], chain.redis_errors)
            auth.add_metric(["postgres"], chain.postgres_errors)
        yield from (store_up, auth)

        from rproxy.events import sinks_of

        lost = CounterMetricFamily("rproxy_events_lost",
                                   "Events the broker acknowledged, then lost, that could not be sent again",
                                   labels=["sink"])
        emitted = CounterMetricFamily("rproxy_events_emitted", "Events handed to the sink", labels=["sink"])
        in_flight = GaugeMetricFamily("rproxy_events_in_flight", "Events sent, not yet acknowledged by the broker",
                                      labels=["sink"])
        sink_dropped = CounterMetricFamily("rproxy_events_sink_dropped",
                                           "Events never acknowledged (buffer full, delivery timed out, or stopping)",
                                           labels=["sink"])
        rejected = CounterMetricFamily("rproxy_events_rejected",
                                       "Events the PostgreSQL writers dropped because they can never be written "
                                       "(malformed, or refused by PostgreSQL for their data)", labels=["sink"])
        if service.stores is not None:
            for kind, count in service.stores.events_rejected().items():
                rejected.add_metric([kind], count)
        for kind, each in sinks_of(sink):
            sink_dropped.add_metric([kind], each.dropped)
            if hasattr(each, "lost"):
                lost.add_metric([kind], each.lost)
                emitted.add_metric([kind], each.emitted)
                in_flight.add_metric([kind], each.in_flight)
        yield from (lost, emitted, in_flight, sink_dropped, rejected)

        spans = CounterMetricFamily("rproxy_telemetry_spans",
                                    "Ended spans: exported, failed (the exporter gave up on their batch), "
                                    "dropped (the export queue was full)", labels=["outcome"])
        spans_waiting = GaugeMetricFamily("rproxy_telemetry_spans_waiting", "Ended spans waiting for export")
        telemetry = getattr(service, "telemetry", None)
        if telemetry is not None:
            exported, failed, dropped = telemetry.totals()  # (with the telemetry's before reloads)
            spans.add_metric(["exported"], exported)
            spans.add_metric(["failed"], failed)
            spans.add_metric(["dropped"], dropped)
            spans_waiting.add_metric([], telemetry.waiting)
        yield from (spans, spans_waiting)
        from rproxy.http.filters.ratelimit import limits_of

        limited = CounterMetricFamily("rproxy_rate_limit_requests", "Requests checked by a rate limit, by result",
                                      labels=["frontend", "scope", "limit", "result"])
        fallbacks = CounterMetricFamily("rproxy_rate_limit_fallbacks",
                                        "Shared-limit decisions made by the process's own buckets "
                                        "(Redis down or slower than redis_timeout)",
                                        labels=["frontend", "scope", "limit"])
        limit_keys = GaugeMetricFamily("rproxy_rate_limit_keys", "Keys a rate limit remembers in this process",
                                       labels=["frontend", "scope", "limit"])
        for frontend in service.all_frontends():
            for limit in limits_of(frontend):
                labels = [frontend.name, limit.scope, limit.name]
                limited.add_metric(labels + ["allowed"], limit.allowed)
                limited.add_metric(labels + ["limited"], limit.limited)
                fallbacks.add_metric(labels, limit.fallbacks)
                limit_keys.add_metric(labels, len(limit.buckets) if limit.buckets is not None else 0)
        breaker = CounterMetricFamily("rproxy_circuit_breaker_open",
                                      "Requests refused at once by a backend's circuit breaker, by threshold",
                                      labels=["backend", "threshold"])
        for pool in service.pools.values():
            if pool.breaker is not None:
                for threshold, count in pool.breaker.opened.items():
                    breaker.add_metric([pool.name, threshold], count)
        from rproxy import ratelimit_redis

        shared = ratelimit_redis.current
        if shared is not None:
            rtt = HistogramMetricFamily("rproxy_rate_limit_redis_seconds",
                                        "Round trips of shared rate limit decisions answered by Redis")
            rtt.add_metric([], _buckets(ratelimit_redis.LATENCY_BUCKETS, shared.latency_buckets), shared.latency_sum)
            yield rtt
            connected = GaugeMetricFamily("rproxy_rate_limit_redis_connected",
                                          "1 when shared rate limits have their Redis connection")
            connected.add_metric([], 1 if shared.connection is not None else 0)
            yield connected
        yield from (limited, fallbacks, limit_keys, breaker)
        from rproxy.tunnel.httpstats import tunnel_http_metrics

        yield from tunnel_http_metrics(service.tunnels.values())
        yield from _l4_metrics(service)


def _l4_metrics(service: RProxyService) -> Iterator[Metric]:
    """
    Connection-level figures (rproxy.tcp, rproxy.handoff, rproxy.detect):
    allow/deny refusals at accept, PROXY protocol headers read and
    refused, connections per detected protocol, TLS passthrough choices.
    """
    denied = CounterMetricFamily("rproxy_frontend_denied", "TCP connections refused at accept by allow/deny",
                                 labels=["frontend"])
    proxy = CounterMetricFamily("rproxy_frontend_proxy_protocol", "PROXY protocol headers: read (accepted) "
                                "or connections closed for a missing or malformed one (rejected)",
                                labels=["frontend", "result"])
    detected = CounterMetricFamily("rproxy_frontend_detected", "Connections of protocol: detect frontends by "
                                   "protocol found (tls, http, default; closed: no frontend for it)",
                                   labels=["frontend", "protocol"])
    routed = CounterMetricFamily("rproxy_frontend_tls_passthrough", "TLS passthrough connections by backend "
                                 "chosen from the SNI (-: closed, no backend)", labels=["frontend", "backend"])
    for frontend in service.all_frontends():
        name = frontend.name
        if hasattr(frontend, "denied_total"):
            denied.add_metric([name], frontend.denied_total)
        layer = getattr(frontend, "proxy_protocol", None)
        if layer is not None and (layer.accepted or layer.rejected or frontend.config.proxy_protocol is not None):
            proxy.add_metric([name, "accepted"], layer.accepted)
            proxy.add_metric([name, "rejected"], layer.rejected)
        for kind, count in sorted(getattr(frontend, "detected", {}).items()):
            detected.add_metric([name, kind], count)
        for backend, count in sorted(getattr(frontend, "routed", {}).items()):
            routed.add_metric([name, backend], count)
    yield from (denied, proxy, detected, routed)



def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """
    Per-bucket counts as Prometheus' cumulative (le, count) pairs.
    """
    cumulative, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets


class Metrics:
    """
    The metric families of one service.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.health_check_duration = Histogram(
            "rproxy_health_check_duration_seconds",
            "Duration of active health checks",
            ["backend", "server", "result"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.tunnel_open_latency = Histogram(
            "rproxy_tunnel_open_seconds",
            "Time from a public connection to its spliced agent stream",
            ["tunnel"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.reloads = Counter(
            "rproxy_config_reloads", "Configuration reloads by result", ["result"], registry=registry
        )

    def watch(self, service: RProxyService) -> None:
        self.registry.register(StateCollector(service))
