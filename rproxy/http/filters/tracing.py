"""
Tracing (C{telemetry:}): a SERVER span per request and a CLIENT span per
upstream attempt (a retry is a second child of the same request), W3C
Trace Context read from the client and sent upstream.

The sampling decision is made here, once per request, the SDK's
parent-based way: a client's C{traceparent} decides (its sampled flag);
without one (or with a malformed one, which is ignored with its
C{tracestate}, as the specification says) a new trace is sampled with
probability C{sample_ratio}.  A request not sampled costs a few attribute
reads: no SDK object is made; a client's valid C{traceparent} goes on
unchanged, and a request that came without one gets one of its own with
the sampled flag off, so that the services behind make the same choice.
A sampled request's upstream head carries C{traceparent} naming the
attempt's span as the parent (and the client's C{tracestate}, unchanged).

Per-request state lives on the client connection (C{connection.trace}:
one exchange at a time), not on C{exchange.notes}, which other filters
replace; the trace id goes on C{exchange.notes["trace_id"]} in the log
phase, where the access log (a later filter) prints it.  A request whose
client went away before its end (no log phase) is ended in the closed
phase.
"""

from __future__ import annotations

import random
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from rproxy.http.filters import Filter
from rproxy.telemetry.traceparent import format_traceparent, parse

__all__ = ["TracingFilter"]

_TRACEPARENT = b"traceparent"
_REPLACE = frozenset({b"traceparent"})
_RESTART = frozenset({b"traceparent", b"tracestate"})  # a malformed traceparent: its tracestate goes too
_ROOT = otel_context.Context()
_SERVER = SpanKind.SERVER
_CLIENT = SpanKind.CLIENT
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class _Trace:
    """
    One request's tracing state.

    @ivar span: its SERVER span; None when not sampled.
    @ivar attempt: the CLIENT span of the attempt in progress.
    @ivar inject: the C{traceparent} an unsampled request sends on (None:
        the client's goes on unchanged).
    @ivar remove: the client's fields replaced upstream.
    """

    __slots__ = ("exchange", "trace_id", "span", "attempt", "inject", "remove", "routed")

    def __init__(self, exchange: Any, trace_id: int, span: Any, inject: bytes | None, remove: frozenset[bytes]):
        self.exchange = exchange
        self.trace_id = trace_id
        self.span = span
        self.attempt: Any = None
        self.inject = inject
        self.remove = remove
        self.routed = 0.0


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class TracingFilter(Filter):
    """
    @ivar telemetry: the L{rproxy.telemetry.provider.Telemetry} whose
        C{http_tracer} makes the spans.
    """

    def __init__(self, telemetry: Any, frontend: Any, rng: random.Random | None = None) -> None:
        self.telemetry = telemetry
        self.frontend = frontend
        self.tracer = telemetry.http_tracer
        self.ratio = telemetry.sample_ratio
        rng = rng or random.Random()
        self.random = rng.random
        self.bits = rng.getrandbits

    # -- request -----------------------------------------------------------

    def request(self, exchange: Any) -> None:
        head = exchange.head
        raw = head.header(_TRACEPARENT)
        parent = parse(raw) if raw is not None else None
        if parent is None:
            # a new trace (a malformed traceparent is ignored, and its tracestate)
            remove = _RESTART if raw is not None else _REPLACE
            trace_id = self.bits(128) or 1
            if self.random() >= self.ratio:
                inject = format_traceparent(trace_id, self.bits(64) or 1, False)
                exchange.client.trace = _Trace(exchange, trace_id, None, inject, remove)
                return None
            context = _ROOT
        else:
            trace_id, parent_id, flags = parent
            if not flags & 1:
                # not sampled by the client's side: its traceparent goes on as it is
                exchange.client.trace = _Trace(exchange, trace_id, None, None, _REPLACE)
                return None
            remove = _REPLACE
            state = head.header(b"tracestate")
            context = set_span_in_context(NonRecordingSpan(SpanContext(
                trace_id, parent_id, is_remote=True, trace_flags=_SAMPLED,
                trace_state=_trace_state(state) if state else None)))
        span = self.tracer.start_span(head.method.decode("latin-1"), context=context, kind=_SERVER,
                                      attributes=self._request_attributes(exchange), start_time=_ns(exchange.started))
        exchange.client.trace = _Trace(exchange, span.get_span_context().trace_id, span, None, remove)
        return None

    def _request_attributes(self, exchange: Any) -> dict[str, Any]:
        head, client = exchange.head, exchange.client
        path = head.target.split(b"?", 1)[0]
        attributes: dict[str, Any] = {
            "http.request.method": head.method.decode("latin-1"),
            "url.path": path.decode("latin-1"),
            "url.scheme": self.frontend.scheme.decode(),
            "network.protocol.version": f"{head.version[0]}.{head.version[1]}",
            "network.peer.address": client.peer_host,
            "client.address": client.peer_host,
            "rproxy.frontend": self.frontend.name,
        }
        host = head.host
        if host:
            name, _, port = host.decode("latin-1").rpartition(":") if not host.endswith(b"]") else ("", "", "")
            if name and port.isdigit():
                attributes["server.address"], attributes["server.port"] = name, int(port)
            else:
                attributes["server.address"] = host.decode("latin-1")
        agent = head.header(b"user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        return attributes

    def choose(self, exchange: Any) -> None:
        trace = exchange.client.trace
        if trace.span is not None:
            trace.routed = self.frontend.clock.seconds()  # the request phase's waits (a token) are over

    # -- attempts ------------------------------------------------------------

    def attempt(self, exchange: Any, server: Any) -> None:
        trace = exchange.client.trace
        if trace is None or trace.span is None:
            return
        config = server.config
        attributes: dict[str, Any] = {"http.request.method": exchange.head.method.decode("latin-1"),
                                      "rproxy.server": config.name}
        host = getattr(config, "host", None)
        if host is not None:
            attributes["server.address"] = attributes["network.peer.address"] = host
            attributes["server.port"] = attributes["network.peer.port"] = config.port
        else:
            attributes["rproxy.tunnel.agent"] = config.name  # a tunnel's agent
        pool = exchange.pool
        if pool is not None:
            attributes["rproxy.backend"] = pool.config.name
        if exchange.attempts > 1:
            attributes["http.request.resend_count"] = exchange.attempts - 1
        trace.attempt = self.tracer.start_span(
            attributes["http.request.method"], context=set_span_in_context(trace.span), kind=_CLIENT,
            attributes=attributes, start_time=_ns(self.frontend.clock.seconds()))

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        trace = exchange.client.trace
        attempt = trace.attempt
        if attempt is not None:
            value = format_traceparent(trace.trace_id, attempt.get_span_context().span_id, True)
        elif trace.inject is not None:
            value = trace.inject
        else:
            return set_headers, remove
        return (*set_headers, (b"traceparent", value)), remove | trace.remove

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        trace = exchange.client.trace
        if trace is None or trace.attempt is None or trace.exchange is not exchange:
            return
        _end_attempt(trace, outcome, self.frontend.clock.seconds())

    # -- the end -------------------------------------------------------------

    def log(self, exchange: Any, backend: str) -> None:
        client = exchange.client
        trace = client.trace
        if trace is None or trace.exchange is not exchange:
            return  # (a request refused before its request phase: not traced)
        client.trace = None
        notes = exchange.notes
        if notes is None:
            exchange.notes = {"trace_id": format(trace.trace_id, "032x")}
        else:
            notes["trace_id"] = format(trace.trace_id, "032x")
        span = trace.span
        if span is None:
            return
        now = self.frontend.clock.seconds()
        if trace.attempt is not None:  # (a protocol switch: the stream goes on, its span ends here)
            _end_attempt(trace, exchange.status, now)
        status = exchange.status
        span.set_attribute("http.response.status_code", status)
        route = exchange.route
        prefix = getattr(route, "prefix", None)
        if prefix:
            route_name = prefix.decode("latin-1")
            span.set_attribute("http.route", route_name)
            span.update_name(f"{exchange.head.method.decode('latin-1')} {route_name}")
        span.set_attribute("rproxy.backend", backend)
        span.set_attribute("rproxy.attempts", exchange.attempts)
        if notes:
            if "token" in notes and trace.routed:
                span.set_attribute("rproxy.token.wait", round(trace.routed - exchange.started, 6))
            if "model" in notes:  # a tunnel's request
                if notes["model"]:
                    span.set_attribute("gen_ai.request.model", notes["model"])
                if notes.get("key"):
                    span.set_attribute("rproxy.tunnel.key", notes["key"])
                if exchange.tried:
                    span.set_attribute("rproxy.tunnel.agent", exchange.tried[-1])
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(now))

    def closed(self, connection: Any) -> None:
        trace = connection.trace
        if trace is None:
            return
        connection.trace = None
        span = trace.span
        if span is None:
            return
        now = self.frontend.clock.seconds()
        if trace.attempt is not None:
            _end_attempt(trace, "aborted", now)
        span.set_attribute("error.type", "aborted")
        span.set_status(Status(StatusCode.ERROR, "the client closed the connection before the response ended"))
        span.end(end_time=_ns(now))


def _end_attempt(trace: _Trace, outcome: int | str, now: float) -> None:
    span, trace.attempt = trace.attempt, None
    if type(outcome) is int:
        span.set_attribute("http.response.status_code", outcome)
        if outcome >= 500:
            span.set_attribute("error.type", str(outcome))
            span.set_status(Status(StatusCode.ERROR))
    else:
        span.set_attribute("error.type", str(outcome).split(":", 1)[0])
        span.set_status(Status(StatusCode.ERROR, str(outcome)))
    span.end(end_time=_ns(now))


def _trace_state(value: bytes) -> TraceState | None:
    """
    The client's C{tracestate} for the parent context (an invalid one is
    left out; the header itself goes on unchanged either way).
    """
    try:
        return TraceState.from_header([value.decode("latin-1")])
    except ValueError:
        return None
