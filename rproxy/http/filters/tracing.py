"""
Tracing (C{telemetry:}): a SERVER span per request and a CLIENT span per
upstream attempt (a retry is a second child of the same request), W3C
Trace Context read from the client and sent upstream.

The sampling decision is made here, once per request, the SDK's
parent-based way: a client's C{traceparent} decides (its sampled flag);
without one (or with a malformed one, which is ignored with its
C{tracestate}, as the specification says) a new trace is sampled with
probability C{sample_ratio}.  A request not sampled makes no SDK object:
a client's valid C{traceparent} goes on unchanged (its sampled flag off
tells the services behind), and a request that came without one goes on
without one (starting a trace is optional in W3C Trace Context; making
one costs as much as the rest of this filter's unsampled path); a
malformed one is replaced by one of ours, flag off.  A request without
C{traceparent} (found by the reader: C{head.traceparent}) that is not
sampled, most of them at a low ratio, costs a counter's decrement (the
requests left before the next sampled one): its later phases run the chain
without this filter (C{exchange.chain}, narrowed), so that they cost
nothing either.  A sampled request's upstream head carries C{traceparent}
naming the attempt's span as the parent (and the client's C{tracestate},
unchanged).

A sampled request's spans are records made once each has ended
(L{rproxy.telemetry.record.SpanRecord}: a C{ReadableSpan}'s fields as
plain slots, handed to the batch processor): their ids come
from this filter's random generator and their times from the frontend's
clock; the SDK's tracer is not used here, as starting and ending a span
through it costs about ten times as much.

Per-request state lives on the client connection (C{connection.trace}:
one exchange at a time), not on C{exchange.notes}, which other filters
replace; the trace id goes on C{exchange.notes["trace_id"]} in the log
phase, where the access log (a later filter) prints it.  A request whose
client went away before its end (no log phase) is ended in the closed
phase.
"""

from __future__ import annotations

import math
import random
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode, TraceState

from rproxy.http.filters import Chain, Filter
from rproxy.telemetry.record import Context, SpanRecord
from rproxy.telemetry.traceparent import format_traceparent, parse

__all__ = ["TracingFilter", "TokenWaitMark"]

_TRACEPARENT = b"traceparent"
_REPLACE = frozenset({b"traceparent"})
_RESTART = frozenset({b"traceparent", b"tracestate"})  # a malformed traceparent: its tracestate goes too
_SERVER = SpanKind.SERVER
_CLIENT = SpanKind.CLIENT
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


class _Trace:
    """
    One request's tracing state.

    @ivar span_id: its SERVER span's id; 0 when the request is not sampled.
    @ivar parent: the client's span (a remote L{Context}), or None.
    @ivar attempt: the attempt in progress: (span id, start, attributes).
    @ivar inject: the C{traceparent} an unsampled request sends on (None:
        the client's goes on unchanged).
    @ivar remove: the client's fields replaced upstream.
    """

    __slots__ = ("exchange", "trace_id", "span_id", "parent", "state", "attributes", "attempt", "inject", "remove",
                 "routed")

    def __init__(self, exchange: Any, trace_id: int, span_id: int, remove: frozenset[bytes]) -> None:
        self.exchange = exchange
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent: Context | None = None
        self.state: TraceState | None = None
        self.attributes: dict[str, Any] = {}
        self.attempt: tuple[int, float, dict[str, Any]] | None = None
        self.inject: bytes | None = None
        self.remove = remove
        self.routed = 0.0


class TracingFilter(Filter):
    """
    @ivar telemetry: the L{rproxy.telemetry.provider.Telemetry} the spans
        go to (its C{finished}), with their resource and scope.
    """

    def __init__(self, telemetry: Any, frontend: Any, rng: random.Random | None = None) -> None:
        self.telemetry = telemetry
        self.frontend = frontend
        self.ratio = ratio = telemetry.sample_ratio
        rng = rng or random.Random()
        self.random = rng.random
        self.bits = rng.getrandbits
        # the chain this filter is in, without it: what an untraced
        # request's later phases run (L{_quiet})
        self.quiet: Any = None
        # new traces: how many requests to pass over before the next
        # sampled one, drawn from the geometric distribution: the same
        # as a draw per request with probability C{ratio}, without one
        self.log_miss = math.log1p(-ratio) if 0 < ratio < 1 else 0.0
        self.skip = self._gap()

    def _gap(self) -> int:
        """
        The number of requests not sampled before the next sampled one.
        """
        ratio = self.ratio
        if ratio >= 1:
            return 0
        if ratio <= 0:
            return 1 << 62  # (an int: never 0 in a process's life, and cheaper to count down than inf)
        return math.floor(math.log(1.0 - self.random()) / self.log_miss)

    # -- request -----------------------------------------------------------

    def request(self, exchange: Any) -> None:
        raw = exchange.head.traceparent
        if raw is not None:
            exchange.client.trace = self._continued(exchange, raw)
            return None
        skip = self.skip
        if skip:
            # not sampled, and nothing to pass on: this filter's later
            # phases are skipped for this request (its connection's
            # trace is None: a trace is dropped by the log or closed
            # phase of its own exchange)
            self.skip = skip - 1
            exchange.chain = self.quiet or self._quiet(exchange.chain)
            return None
        self.skip = self._gap()
        trace = _Trace(exchange, self.bits(128) or 1, self.bits(64) or 1, _REPLACE)
        trace.attributes = self._request_attributes(exchange)
        exchange.client.trace = trace
        return None

    def _quiet(self, chain: Any) -> Any:
        """
        C{chain} without this filter (made once: a filter is in one chain,
        the one whose request phase calls it).
        """
        self.quiet = Chain([f for f in chain.filters if f is not self])
        return self.quiet

    def _continued(self, exchange: Any, raw: bytes) -> _Trace:
        """
        The trace of a request that came with a C{traceparent}: its own
        if sampled, else one that only passes the trace on.
        """
        parent = parse(raw)
        if parent is None:
            # malformed: ignored with its tracestate; a trace of our own
            trace_id = self.bits(128) or 1
            if self.random() >= self.ratio:
                trace = _Trace(exchange, trace_id, 0, _RESTART)
                trace.inject = format_traceparent(trace_id, self.bits(64) or 1, False)
                return trace
            trace = _Trace(exchange, trace_id, self.bits(64) or 1, _RESTART)
        else:
            trace_id, parent_id, flags = parent
            if not flags & 1:
                # not sampled on the client's side: its traceparent goes on as it is
                return _Trace(exchange, trace_id, 0, _REPLACE)
            trace = _Trace(exchange, trace_id, self.bits(64) or 1, _REPLACE)
            state = exchange.head.header(b"tracestate")
            if state:
                trace.state = _trace_state(state)
            trace.parent = Context(trace_id, parent_id, True, trace.state)
        trace.attributes = self._request_attributes(exchange)
        return trace

    def _request_attributes(self, exchange: Any) -> dict[str, Any]:
        head, client = exchange.head, exchange.client
        attributes: dict[str, Any] = {
            "http.request.method": head.method.decode("latin-1"),
            "url.path": head.target.split(b"?", 1)[0].decode("latin-1"),
            "url.scheme": self.frontend.scheme.decode(),
            "network.protocol.version": _VERSIONS.get(head.version) or f"{head.version[0]}.{head.version[1]}",
            "network.peer.address": client.peer_host,
            "client.address": client.peer_host,
            "rproxy.frontend": self.frontend.name,
        }
        host = head.host
        if host:
            server = _hosts.get(host)
            if server is None:
                server = _server(host)
            attributes.update(server)
        agent = head.header(b"user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        return attributes

    # -- attempts ------------------------------------------------------------

    def attempt(self, exchange: Any, server: Any) -> None:
        trace = exchange.client.trace
        if trace is None or not trace.span_id:
            return
        config = server.config
        attributes: dict[str, Any] = {"http.request.method": trace.attributes["http.request.method"],
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
        trace.attempt = (self.bits(64) or 1, self.frontend.clock.seconds(), attributes)

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        trace = exchange.client.trace
        if trace is None:
            return set_headers, remove
        attempt = trace.attempt
        if attempt is not None:
            value = format_traceparent(trace.trace_id, attempt[0], True)
        elif trace.inject is not None:
            value = trace.inject
        else:
            return set_headers, remove
        return (*set_headers, (b"traceparent", value)), remove | trace.remove

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        trace = exchange.client.trace
        if trace is None or trace.attempt is None or trace.exchange is not exchange:
            return
        self._end_attempt(trace, outcome, self.frontend.clock.seconds())

    def _end_attempt(self, trace: _Trace, outcome: int | str, now: float) -> None:
        span_id, start, attributes = trace.attempt  # type: ignore[misc]
        trace.attempt = None
        status = _UNSET
        if type(outcome) is int:
            attributes["http.response.status_code"] = outcome
            if outcome >= 500:
                attributes["error.type"] = str(outcome)
                status = _ERROR
        else:
            attributes["error.type"] = str(outcome).split(":", 1)[0]
            status = Status(StatusCode.ERROR, str(outcome))
        self._finished(trace, attributes["http.request.method"], span_id, _CLIENT, attributes, status, start, now,
                       Context(trace.trace_id, trace.span_id, False, trace.state))

    def _finished(self, trace: _Trace, name: str, span_id: int, kind: SpanKind, attributes: dict[str, Any],
                  status: Status, start: float, end: float, parent: Context | None) -> None:
        telemetry = self.telemetry
        telemetry.finished(SpanRecord(
            name, Context(trace.trace_id, span_id, False, trace.state), parent, telemetry.resource, attributes, kind,
            status, int(start * 1e9), int(end * 1e9), telemetry.http_scope))

    # -- the end -------------------------------------------------------------

    def log(self, exchange: Any, backend: str) -> None:
        client = exchange.client
        trace = client.trace
        if trace is None or trace.exchange is not exchange:
            return  # not traced (not sampled, or refused before its request phase)
        client.trace = None
        notes = exchange.notes
        if notes is None:
            exchange.notes = {"trace_id": format(trace.trace_id, "032x")}
        else:
            notes["trace_id"] = format(trace.trace_id, "032x")
        if not trace.span_id:
            return
        now = self.frontend.clock.seconds()
        if trace.attempt is not None:  # (a protocol switch: the stream goes on, its span ends here)
            self._end_attempt(trace, exchange.status, now)
        status = exchange.status
        attributes = trace.attributes
        attributes["http.response.status_code"] = status
        name = attributes["http.request.method"]
        prefix = getattr(exchange.route, "prefix", None)
        if prefix:
            route = attributes["http.route"] = prefix.decode("latin-1")
            name = f"{name} {route}"
        attributes["rproxy.backend"] = backend
        attributes["rproxy.attempts"] = exchange.attempts
        if notes:
            if "token" in notes and trace.routed:
                attributes["rproxy.token.wait"] = round(trace.routed - exchange.started, 6)
            if "model" in notes:  # a tunnel's request
                if notes["model"]:
                    attributes["gen_ai.request.model"] = notes["model"]
                if notes.get("key"):
                    attributes["rproxy.tunnel.key"] = notes["key"]
                if exchange.tried:
                    attributes["rproxy.tunnel.agent"] = exchange.tried[-1]
        span_status = _UNSET
        if status >= 500:
            attributes["error.type"] = str(status)
            span_status = _ERROR
        self._finished(trace, name, trace.span_id, _SERVER, attributes, span_status, exchange.started, now,
                       trace.parent)

    def closed(self, connection: Any) -> None:
        trace = connection.trace
        if trace is None:
            return
        connection.trace = None
        if not trace.span_id:
            return
        now = self.frontend.clock.seconds()
        if trace.attempt is not None:
            self._end_attempt(trace, "aborted", now)
        attributes = trace.attributes
        attributes["error.type"] = "aborted"
        self._finished(trace, attributes["http.request.method"], trace.span_id, _SERVER, attributes,
                       Status(StatusCode.ERROR, "the client closed the connection before the response ended"),
                       trace.exchange.started, now, trace.parent)


class TokenWaitMark(Filter):
    """
    Put right after the token filter (when both are in the chain): a
    sampled request's token wait is over when the chain reaches it.  (A
    filter of its own, so that frontends without tokens pay no phase
    call for it.)
    """

    def __init__(self, tracing: TracingFilter) -> None:
        self.clock = tracing.frontend.clock

    def request(self, exchange: Any) -> None:
        trace = exchange.client.trace
        if trace is not None and trace.span_id:
            trace.routed = self.clock.seconds()
        return None


_VERSIONS = {(1, 1): "1.1", (1, 0): "1.0"}
# the server.address and .port attributes of recent Host values (a few
# per site; cleared when large)
_hosts: dict[bytes, dict[str, Any]] = {}


def _server(host: bytes) -> dict[str, Any]:
    """
    The attributes a Host value names: C{server.address}, and
    C{server.port} if it has one.
    """
    name, _, port = host.decode("latin-1").rpartition(":") if not host.endswith(b"]") else ("", "", "")
    if name and port.isdigit():
        server: dict[str, Any] = {"server.address": name, "server.port": int(port)}
    else:
        server = {"server.address": host.decode("latin-1")}
    if len(_hosts) >= 1024:
        _hosts.clear()
    _hosts[host] = server
    return server


def _trace_state(value: bytes) -> TraceState | None:
    """
    The client's C{tracestate} for the spans' context (an invalid one is
    left out; the header itself goes on unchanged either way).
    """
    try:
        return TraceState.from_header([value.decode("latin-1")])
    except ValueError:
        return None
