"""
Spans for code outside the HTTP engine (token logins, tunnel streams):
C{start_span(telemetry, name, attributes)} gives a span to C{end()}, or a
span that does nothing when tracing is off (C{telemetry} None) or the
trace is not sampled, so that callers need no branch of their own.

    span = start_span(self.telemetry, "tunnel stream", {"rproxy.tunnel": name})
    ...
    span.end()                     # or span.end(error="agent refused")

Times come from the telemetry's clock (the reactor's in production).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

__all__ = ["start_span", "Span", "NO_SPAN", "KINDS"]

KINDS = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER,
         "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}
_ROOT = otel_context.Context()  # no parent: never the thread's current span


class Span:
    """
    A started span of the SDK, ended once.
    """

    __slots__ = ("span", "clock", "ended")

    def __init__(self, span: Any, clock: Any) -> None:
        self.span = span
        self.clock = clock
        self.ended = False

    @property
    def recording(self) -> bool:
        return True

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self.span.set_attribute(key, value)

    def end(self, error: str | None = None, attributes: dict[str, Any] | None = None) -> None:
        """
        End the span (once; later calls do nothing); C{error} marks it
        failed with that description; C{attributes} are set first.
        """
        if self.ended:
            return
        self.ended = True
        span = self.span
        for key, value in (attributes or {}).items():
            if value is not None:
                span.set_attribute(key, value)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=int(self.clock.seconds() * 1e9))


class _NoSpan:
    """
    What L{start_span} gives when nothing is recorded.
    """

    __slots__ = ()
    recording = False
    trace_id = None

    def set(self, key: str, value: Any) -> None:
        pass

    def end(self, error: str | None = None, attributes: dict[str, Any] | None = None) -> None:
        pass


NO_SPAN = _NoSpan()


def start_span(telemetry: Any, name: str, attributes: dict[str, Any] | None = None, kind: str = "internal",
               parent: Span | None = None, start: float | None = None) -> Span | _NoSpan:
    """
    A span named C{name} starting now (or at C{start}, in the clock's
    seconds): a child of C{parent} if given, else the root of a new trace
    (sampled at the telemetry's C{sample_ratio}).
    """
    if telemetry is None:
        return NO_SPAN
    from opentelemetry.trace import set_span_in_context

    context = set_span_in_context(parent.span) if isinstance(parent, Span) else _ROOT
    clock = telemetry.clock
    span = telemetry.tracer.start_span(
        name, context=context, kind=KINDS[kind],
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        start_time=int((clock.seconds() if start is None else start) * 1e9))
    if not span.is_recording():
        return NO_SPAN
    return Span(span, clock)
