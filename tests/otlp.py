"""
A small OTLP/HTTP receiver for tests (and bench/otel.sh): POST /v1/traces
with an C{ExportTraceServiceRequest} (protobuf, as the OTLP/HTTP exporter
sends it), decoded with C{opentelemetry-proto}; the spans are kept as
plain L{ReceivedSpan} records.
"""

from __future__ import annotations

import gzip
from typing import Any

import attrs
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.web.resource import Resource

__all__ = ["OTLPReceiver", "ReceivedSpan", "KINDS"]

# opentelemetry.proto.trace.v1.Span.SpanKind
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


@attrs.frozen
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    service: str
    start: int
    end: int


class OTLPReceiver(Resource):
    """
    @ivar spans: every span received, in order.
    @ivar requests: export requests received.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.keep = True  # False: count the requests only (a benchmark's receiver)

    def render_POST(self, request: Any) -> bytes:
        if request.path != b"/v1/traces":
            request.setResponseCode(404)
            return b""
        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"") == b"gzip":
            body = gzip.decompress(body)
        self.requests += 1
        if self.keep:
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            for resource_spans in message.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(ReceivedSpan(
                            name=span.name, kind=KINDS[span.kind], trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status=span.status.code, service=resource.get("service.name", ""),
                            start=span.start_time_unix_nano, end=span.end_time_unix_nano,
                        ))
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]
