"""
An ended span of a traced HTTP request as exporters other than rproxy's
compact one are given it (L{rproxy.telemetry.request.RequestTrace.spans}:
C{encoder: official}'s, the in-memory exporter of the tests): the fields
of the SDK's C{ReadableSpan} that exporters read, as plain slots.  (A
C{ReadableSpan} serves as well, but its fields are properties and its
context, C{SpanContext}, validates its ids when made.)  L{Context} is
also the client's span, the parent of a request's span.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import TraceFlags

__all__ = ["Context", "SpanRecord"]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class Context:
    """
    A sampled span's C{SpanContext}, for ids known to be valid (not 0).
    """

    __slots__ = ("trace_id", "span_id", "is_remote", "trace_state")
    trace_flags = _SAMPLED
    is_valid = True

    def __init__(self, trace_id: int, span_id: int, is_remote: bool, trace_state: Any) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.is_remote = is_remote
        self.trace_state = trace_state

    def __repr__(self) -> str:
        return f"Context({self.trace_id:032x}, {self.span_id:016x}, remote={self.is_remote})"


class SpanRecord:
    """
    An ended span: no events, no links, nothing dropped.
    """

    __slots__ = ("name", "context", "parent", "resource", "attributes", "kind", "status", "start_time", "end_time",
                 "instrumentation_scope")
    events = links = ()
    dropped_attributes = dropped_events = dropped_links = 0

    def __init__(self, name: str, context: Context, parent: Context | None, resource: Any,
                 attributes: dict[str, Any], kind: Any, status: Any, start_time: int, end_time: int,
                 scope: Any) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.resource = resource
        self.attributes = attributes
        self.kind = kind
        self.status = status
        self.start_time = start_time
        self.end_time = end_time
        self.instrumentation_scope = scope

    def get_span_context(self) -> Context:
        return self.context

    def __repr__(self) -> str:
        return f"<SpanRecord {self.name!r} {self.context!r}>"
