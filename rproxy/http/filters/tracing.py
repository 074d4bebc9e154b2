"""
Tracing (C{telemetry:}): a SERVER span per request and a CLIENT span per
upstream attempt (a retry is a second child of the same request), W3C
Trace Context read from the client and sent upstream.

The sampling decision is made here, once per request, as the SDK's
C{ParentBased(TraceIdRatioBased(sample_ratio))} makes it: a client's
C{traceparent} decides (its sampled flag); without one (or with a
malformed one, which is ignored with its C{tracestate}, as the
specification says) a new trace is sampled when the low 64 bits of its
id are below C{sample_ratio} * 2**64, so that every service of a trace
with the same ratio decides alike.  A request not sampled makes no SDK
object: a client's valid C{traceparent} goes on unchanged (its sampled
flag off tells the services behind), and a request that came without one
goes on without one (starting a trace is optional in W3C Trace Context;
making one costs as much as the rest of this filter's unsampled path); a
malformed one is replaced by one of ours, flag off, its id deciding.

Such a request's id, which nobody sees, is not drawn: a countdown to the
next sampled request (a geometric gap, the same as a draw per request
with probability C{sample_ratio}) decides, and a sampled one's id is
drawn with its low 64 bits below the bound, any of them alike: the
sampled requests and their ids are what TraceIdRatioBased on a random id
would give, for the cost of a counter's decrement a request (a 64-bit
draw and a compare cost ~1k instructions more, ~1% of a request at 0.01).
A request without C{traceparent} (found by the reader: C{head.traceparent})
that is not sampled runs its later phases with the chain without this
filter (C{exchange.chain}, narrowed), so that they cost nothing either.
A sampled request's upstream head carries C{traceparent} naming the
attempt's span as the parent (and the client's C{tracestate}, unchanged).

A sampled request is one L{rproxy.telemetry.request.RequestTrace}: the
values its spans are made of (ids from this filter's random generator,
times from the frontend's clock, the head's fields, the attempts and the
outcome), filled in by the phases and handed to the batch processor
once, when the request has ended; its spans' attributes are worked out
on the processor's thread.  Neither the SDK's tracer nor its C{Span}s
are used here: starting and ending a span through it, and setting its
attributes one call each, costs about ten times as much.

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
from binascii import hexlify as _hex
from typing import Any

from opentelemetry.trace import TraceState

from rproxy.http.filters import Chain, Filter
from rproxy.telemetry.record import Context
from rproxy.telemetry.request import RequestTrace, Site
from rproxy.telemetry.traceparent import format_traceparent, parse

__all__ = ["TracingFilter", "TokenWaitMark"]

_IDS = 1 << 64  # (TraceIdRatioBased's: a trace id's low 64 bits decide)
_ZEROS = bytes(16)
_REPLACE = frozenset({b"traceparent"})
_RESTART = frozenset({b"traceparent", b"tracestate"})  # a malformed traceparent: its tracestate goes too


class _Pass:
    """
    The trace of a request not sampled that has a trace to pass on (its
    client's C{traceparent}, or one of ours in place of a malformed one).

    @ivar inject: the C{traceparent} sent on (None: the client's goes on
        unchanged).
    """

    __slots__ = ("exchange", "trace_id", "inject", "remove")
    ids = None  # (a RequestTrace's: not sampled)
    attempt = None

    def __init__(self, exchange: Any, trace_id: int, inject: bytes | None, remove: frozenset[bytes]) -> None:
        self.exchange = exchange
        self.trace_id = trace_id
        self.inject = inject
        self.remove = remove


class TracingFilter(Filter):
    """
    @ivar telemetry: the L{rproxy.telemetry.provider.Telemetry} the
        requests' traces go to (its C{finished}), with the resource and
        scope of their spans.
    """

    def __init__(self, telemetry: Any, frontend: Any, rng: random.Random | None = None) -> None:
        self.telemetry = telemetry
        self.frontend = frontend
        self.clock = frontend.clock
        # a new trace's id is sampled when its low 64 bits are below this
        # (TraceIdRatioBased's bound: 0, none, for a ratio under 2**-65)
        self.bound = round(telemetry.sample_ratio * _IDS)
        self.ratio = ratio = telemetry.sample_ratio if self.bound else 0.0
        self.rng = rng = rng or random.Random()
        self.random = rng.random
        self.bits = rng.getrandbits
        # what this frontend's spans share (made at the first sampled request)
        self.site: Site | None = None
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

    def _site(self) -> Site:
        telemetry, frontend = self.telemetry, self.frontend
        self.site = Site(telemetry.resource, telemetry.http_scope, frontend.name, frontend.scheme.decode())
        return self.site

    # -- request -----------------------------------------------------------

    def request(self, exchange: Any) -> None:
        head = exchange.head
        raw = head.traceparent
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
        if self.ratio < 1:
            self.skip = self._gap()
            ids = self._rooted(self.rng.randrange(self.bound))
        else:
            # the trace id, the request span's id, its first attempt's id: one
            # draw (an id of zeros is not valid: drawn again, about once in 10**12)
            ids = self.bits(256).to_bytes(32, "big")
            if ids.count(0) >= 8:
                ids = self._fresh(32)
        client = exchange.client
        client.trace = RequestTrace(self.site or self._site(), ids, head, client.peer_host, exchange, _REPLACE)
        return None

    def _fresh(self, size: int) -> bytes:
        """
        C{size} random bytes of which no 8 are 0 (ids in them are not 0).
        """
        while True:
            ids = self.bits(size * 8).to_bytes(size, "big")
            if ids.count(0) < 8:
                return ids

    def _rooted(self, low: int) -> bytes:
        """
        The ids of a new trace whose id's low 64 bits are C{low} (what
        sampled it), as L{request} draws them.
        """
        while True:
            ids = b"".join((self.bits(64).to_bytes(8, "big"), low.to_bytes(8, "big"), self.bits(128).to_bytes(16, "big")))
            if ids[:16] != _ZEROS[:16] and ids[16:24] != _ZEROS[:8] and ids[24:] != _ZEROS[:8]:
                return ids

    def _quiet(self, chain: Any) -> Any:
        """
        C{chain} without this filter (made once: a filter is in one chain,
        the one whose request phase calls it).
        """
        self.quiet = Chain([f for f in chain.filters if f is not self])
        return self.quiet

    def _continued(self, exchange: Any, raw: bytes) -> Any:
        """
        The trace of a request that came with a C{traceparent}: its own
        if sampled, else one that only passes the trace on.
        """
        parent = parse(raw)
        head = exchange.head
        if parent is None:
            # malformed: ignored with its tracestate; a trace of our own
            ids = self._fresh(32)
            if int.from_bytes(ids[8:16], "big") >= self.bound:
                trace_id = int.from_bytes(ids[:16], "big")
                return _Pass(exchange, trace_id, format_traceparent(trace_id, int.from_bytes(ids[16:24], "big"), False),
                             _RESTART)
            return RequestTrace(self.site or self._site(), ids, head, exchange.client.peer_host, exchange, _RESTART)
        trace_id, parent_id, flags = parent
        if not flags & 1:
            # not sampled on the client's side: its traceparent goes on as it is
            return _Pass(exchange, trace_id, None, _REPLACE)
        trace = RequestTrace(self.site or self._site(), trace_id.to_bytes(16, "big") + self._fresh(16), head,
                             exchange.client.peer_host, exchange, _REPLACE)
        state = head.header(b"tracestate")
        if state:
            trace.state = _trace_state(state)
        trace.parent = Context(trace_id, parent_id, True, trace.state)
        return trace

    # -- attempts ------------------------------------------------------------

    def attempt(self, exchange: Any, server: Any) -> None:
        trace = exchange.client.trace
        if trace is None or trace.ids is None:
            return
        pool = exchange.pool
        # (the first attempt's id was drawn with the trace's)
        span_id = trace.ids[24:] if not trace.attempts else self._fresh(8)
        trace.attempt = (span_id, self.clock.seconds(), server.config, pool.config.name if pool is not None else None,
                         exchange.attempts - 1)

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        trace = exchange.client.trace
        if trace is None:
            return set_headers, remove
        attempt = trace.attempt
        if attempt is not None:
            value = b"".join((b"00-", trace.hexed[:32], b"-", _hex(attempt[0]), b"-01"))  # (format_traceparent's)
        elif trace.inject is not None:
            value = trace.inject
        else:
            return set_headers, remove
        return ((*set_headers, (b"traceparent", value)) if set_headers else ((b"traceparent", value),),
                remove | trace.remove if remove else trace.remove)

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        trace = exchange.client.trace
        if trace is None:
            return
        attempt = trace.attempt
        if attempt is None or trace.exchange is not exchange:
            return
        trace.attempts.append(attempt + (self.clock.seconds(), outcome))
        trace.attempt = None

    # -- the end -------------------------------------------------------------

    def log(self, exchange: Any, backend: str) -> None:
        client = exchange.client
        trace = client.trace
        if trace is None or trace.exchange is not exchange:
            return  # not traced (not sampled, or refused before its request phase)
        client.trace = None
        notes = exchange.notes
        trace_id = format(trace.trace_id, "032x") if trace.ids is None else trace.hexed[:32].decode()
        if notes is None:
            exchange.notes = {"trace_id": trace_id}
        else:
            notes["trace_id"] = trace_id
        if trace.ids is None:
            return
        trace.end = now = self.clock.seconds()
        trace.start = exchange.started
        status = exchange.status
        attempt = trace.attempt
        if attempt is not None:  # (a protocol switch: the stream goes on, its span ends here)
            trace.attempts.append(attempt + (now, status))
            trace.attempt = None
        trace.ended = (status, getattr(exchange.route, "prefix", None), backend, exchange.attempts,
                       trace.parent is not None, False)
        if notes:
            extra = []
            if "token" in notes and trace.routed:
                extra.append(("rproxy.token.wait", round(trace.routed - exchange.started, 6)))
            if "model" in notes:  # a tunnel's request
                if notes["model"]:
                    extra.append(("gen_ai.request.model", notes["model"]))
                if notes.get("key"):
                    extra.append(("rproxy.tunnel.key", notes["key"]))
                if exchange.tried:
                    extra.append(("rproxy.tunnel.agent", exchange.tried[-1]))
            if extra:
                trace.extra = extra
        trace.exchange = None
        n = trace.spans_count = len(trace.attempts) + 1
        self.telemetry.finished(trace, n)

    def closed(self, connection: Any) -> None:
        trace = connection.trace
        if trace is None:
            return
        connection.trace = None
        if trace.ids is None:
            return
        trace.end = now = self.clock.seconds()
        trace.start = trace.exchange.started
        attempt = trace.attempt
        if attempt is not None:
            trace.attempts.append(attempt + (now, "aborted"))
            trace.attempt = None
        trace.ended = (0, None, "", trace.exchange.attempts, trace.parent is not None, True)
        trace.exchange = None
        n = trace.spans_count = len(trace.attempts) + 1
        self.telemetry.finished(trace, n)


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
        if trace is not None and trace.ids is not None:
            trace.routed = self.clock.seconds()
        return None


def _trace_state(value: bytes) -> TraceState | None:
    """
    The client's C{tracestate} for the spans' context (an invalid one is
    left out; the header itself goes on unchanged either way).
    """
    try:
        return TraceState.from_header([value.decode("latin-1")])
    except ValueError:
        return None
