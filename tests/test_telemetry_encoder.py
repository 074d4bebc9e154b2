"""
rproxy's OTLP span encoder (L{rproxy.telemetry.encoder}) against the
official one: the same spans, both outputs decoded with
opentelemetry-proto, compared field by field.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.telemetry.encoder import encode_spans
from rproxy.telemetry.exporter import CompactSpanExporter
from rproxy.telemetry.record import Context, SpanRecord

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_RESOURCE = Resource.create({"service.name": "rproxy", "deployment.environment": "test"})
_HTTP = InstrumentationScope("rproxy.http")
_UNSET = Status(StatusCode.UNSET)


def _span(name: str = "GET /api", attributes: Any = None, parent: SpanContext | None = None,
          kind: SpanKind = SpanKind.SERVER, status: Status | None = _UNSET,
          resource: Resource = _RESOURCE, scope: InstrumentationScope | None = _HTTP, state: TraceState | None = None,
          events: tuple[Event, ...] = (), links: tuple[Link, ...] = (), span_id: int = 0x1122334455667788) -> ReadableSpan:
    return ReadableSpan(
        name, SpanContext(0x0AF7651916CD43DD8448EB211C80319C, span_id, False, _SAMPLED, state), parent, resource,
        {"http.request.method": "GET", "server.port": 8080} if attributes is None else attributes, events, links,
        kind, None, status, 1_700_000_000_123_456_789, 1_700_000_000_223_456_789, scope)


class EncoderTests(SynchronousTestCase):
    def assertSame(self, spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
        """
        Both encoders' bytes decode to equal messages (and the fields of
        each span are compared one by one, for a readable failure).
        """
        ours = ExportTraceServiceRequest.FromString(encode_spans(spans))
        theirs = ExportTraceServiceRequest.FromString(official(spans).SerializePartialToString())
        self.assertEqual(len(ours.resource_spans), len(theirs.resource_spans))
        for a, b in zip(ours.resource_spans, theirs.resource_spans, strict=True):
            self.assertEqual(a.resource, b.resource)
            self.assertEqual(len(a.scope_spans), len(b.scope_spans))
            for x, y in zip(a.scope_spans, b.scope_spans, strict=True):
                self.assertEqual(x.scope, y.scope)
                self.assertEqual(len(x.spans), len(y.spans))
                for s, t in zip(x.spans, y.spans, strict=True):
                    self.assertEqual(s.ListFields(), t.ListFields())
        self.assertEqual(ours, theirs)
        return ours

    def test_requests_spans(self) -> None:
        """
        A server span and its client child, as the tracing filter makes
        them: attributes of every kind rproxy sets, an error status with
        and without a description, a remote parent and a tracestate.
        """
        remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, _SAMPLED)
        server = _span(parent=remote, state=TraceState([("vendor", "x1"), ("other", "y")]), attributes={
            "http.request.method": "POST", "url.path": "/v1/chat/completions", "server.port": 8443,
            "http.response.status_code": 502, "rproxy.token.wait": 0.012345, "error.type": "502",
            "user_agent.original": "curl/8.5 \u00e9t\u00e9", "rproxy.attempts": 2, "long": "x" * 300,
        }, status=Status(StatusCode.ERROR))
        client = _span("POST", kind=SpanKind.CLIENT, span_id=7, parent=server.context,
                       status=Status(StatusCode.ERROR, "connect: refused"),
                       attributes={"http.request.resend_count": 1, "network.peer.port": 80})
        request = self.assertSame([server, client])
        spans = request.resource_spans[0].scope_spans[0].spans
        self.assertEqual((spans[0].name, spans[0].trace_state, spans[1].status.message),
                         ("GET /api", "vendor=x1,other=y", "connect: refused"))
        self.assertEqual(spans[1].parent_span_id, (0x1122334455667788).to_bytes(8, "big"))

    def test_span_records(self) -> None:
        """
        The tracing filter's records (L{SpanRecord}, L{Context}) encode
        the same through both encoders, and as the equivalent SDK spans.
        """
        remote = Context(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceState([("v", "1")]))
        records = [
            SpanRecord("GET /api", Context(remote.trace_id, 9, False, remote.trace_state), remote, _RESOURCE,
                       {"http.request.method": "GET", "http.response.status_code": 200}, SpanKind.SERVER,
                       Status(StatusCode.UNSET), 10**18, 10**18 + 5, _HTTP),
            SpanRecord("GET", Context(remote.trace_id, 10, False, None), Context(remote.trace_id, 9, False, None),
                       _RESOURCE, {"server.port": 80}, SpanKind.CLIENT, Status(StatusCode.ERROR, "timeout"),
                       10**18 + 1, 10**18 + 4, _HTTP),
        ]
        request = self.assertSame(records)
        spans = [ReadableSpan(r.name, SpanContext(r.context.trace_id, r.context.span_id, False, _SAMPLED,
                                                  r.context.trace_state),
                              r.parent and SpanContext(r.parent.trace_id, r.parent.span_id, r.parent.is_remote,
                                                       _SAMPLED),
                              r.resource, r.attributes, (), (), r.kind, None, r.status, r.start_time, r.end_time,
                              r.instrumentation_scope) for r in records]
        self.assertEqual(ExportTraceServiceRequest.FromString(encode_spans(spans)), request)

    def test_value_types(self) -> None:
        """
        Every attribute type: bool before int, negative and large ints,
        floats, bytes, empty values, arrays and mappings; one the
        official encoder leaves out (an int past int64) is left out too.
        """
        quiet = logging.getLogger("opentelemetry.exporter.otlp.proto.common._internal")  # (it logs that one)
        self.patch(quiet, "disabled", True)
        self.assertSame([_span(attributes={
            "t": True, "f": False, "zero": 0, "negative": -5, "big": 2**63 - 1, "small": -(2**63), "too big": 2**64,
            "pi": 3.25, "nan-free": -0.0, "empty": "", "bytes": b"\x00\xff", "strings": ("a", "b"),
            "ints": [1, 2, 300], "mixed": [True, 1.5, "x"], "map": {"a": 1, "b": {"c": "d"}}, "none": None,
        })])

    def test_events_links_and_groups(self) -> None:
        """
        Events, links, no status, an INTERNAL span, and spans of two
        resources and several scopes (one None, one with version,
        attributes and schema URL) grouped as the official encoder does.
        """
        other = Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0")
        scope = InstrumentationScope("rproxy.tokens", "1.2", "https://example.com/s", {"k": "v"})
        link = Link(SpanContext(5, 6, True, _SAMPLED), {"why": "retry"})
        event = Event("retry", {"attempt": 2}, timestamp=1_700_000_000_200_000_000)
        self.assertSame([
            _span(events=(event,), links=(link, Link(SpanContext(7, 8, False, _SAMPLED)))),
            _span("token login", kind=SpanKind.CLIENT, scope=scope, status=None, span_id=2),
            _span("tunnel stream", kind=SpanKind.INTERNAL, resource=other, scope=None, span_id=3),
            _span("b", kind=SpanKind.PRODUCER, span_id=4, attributes={}),
            _span("", kind=SpanKind.CONSUMER, resource=other, scope=scope, span_id=5),
        ])

    def test_many_spans(self) -> None:
        """
        A batch past one-byte lengths (a message of over 127 bytes, many
        spans), with the attributes' cache warm.
        """
        spans = [_span(span_id=i + 1, attributes={"url.path": f"/item/{i % 7}", "n": i}) for i in range(300)]
        self.assertSame(spans)
        self.assertSame(spans)


class ExporterTests(SynchronousTestCase):
    def test_encoder_option(self) -> None:
        """
        C{encoder} is C{compact} unless set; C{official} is accepted; a
        wrong value names the key.
        """
        base = {"otlp_endpoint": "http://127.0.0.1:4318"}
        self.assertEqual(config_from_mapping({"telemetry": base}).telemetry.encoder, "compact")
        official_config = config_from_mapping({"telemetry": dict(base, encoder="official")})
        self.assertEqual(official_config.telemetry.encoder, "official")
        with self.assertRaises(Exception) as raised:
            config_from_mapping({"telemetry": dict(base, encoder="fast")})
        self.assertIn("telemetry.encoder", str(raised.exception))

    def test_compact_exporter_posts_its_bytes(self) -> None:
        """
        The compact exporter hands the official exporter's HTTP client the
        encoder's bytes, and fails a batch the client could not send.
        """
        exporter = CompactSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
        self.assertTrue(exporter.compact)
        sent: list[bytes] = []

        class Result:
            success = True
            error = None

        def export(data: bytes) -> Result:
            sent.append(data)
            return Result()

        exporter._client.export = export  # type: ignore[method-assign]
        spans = [_span()]
        self.assertEqual(exporter.export(spans).name, "SUCCESS")
        self.assertEqual(sent, [encode_spans(spans)])
        Result.success = False
        self.assertEqual(exporter.export(spans).name, "FAILURE")
        exporter.shutdown()
        self.assertEqual(exporter.export(spans).name, "FAILURE")
