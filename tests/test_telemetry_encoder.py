"""
rproxy's OTLP span encoder (L{rproxy.telemetry.encoder}) against the
official one: the same spans, both outputs decoded with
opentelemetry-proto, compared field by field.
"""

from __future__ import annotations

import logging
import os
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
from rproxy.http.reader import RequestHead
from rproxy.telemetry.encoder import encode_spans
from rproxy.telemetry.exporter import CompactSpanExporter
from rproxy.telemetry.record import Context, SpanRecord
from rproxy.telemetry.request import RequestTrace, Site

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
        The records of a request's spans (L{SpanRecord}, L{Context}) encode
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


class _Server:
    def __init__(self, name: str, host: str | None = None, port: int = 0) -> None:
        self.name, self.port = name, port
        if host is not None:
            self.host = host


_SERVER = _Server("s1", "10.0.0.9", 80)


def _request(site: Site, trace_id: int = 0x0AF7651916CD43DD8448EB211C80319C, headers: Any = (),
             target: bytes = b"/api/x?q=1", attempts: Any = ((200,),), status: int = 200, route: bytes | None = None,
             aborted: bool = False, **fields: Any) -> RequestTrace:
    """
    A request's trace as the tracing filter leaves it when it has ended:
    C{attempts}, (outcome, server, backend, resend count) each.
    """
    head = RequestHead(b"GET", target, (1, 1), [(b"host", b"example.com:8443"), *headers])
    trace = RequestTrace(site, trace_id.to_bytes(16, "big") + (0x1122334455667788).to_bytes(8, "big") + bytes(8), head,
                         "10.1.2.3", None, frozenset())
    trace.start, trace.end = 1_700_000_000.25, 1_700_000_000.75
    for i, (outcome, *more) in enumerate(attempts):
        server, backend, resend = (*more, *(_SERVER, "web", i)[len(more):])
        trace.attempts.append(((0x100 + i).to_bytes(8, "big"), 1_700_000_000.3 + i / 10, server, backend, resend,
                               1_700_000_000.35 + i / 10, outcome))
    for name, value in fields.items():
        setattr(trace, name, value)
    trace.ended = (status, route, "web", len(attempts), trace.parent is not None, aborted)
    trace.spans_count = len(trace.attempts) + 1
    return trace


class RequestTraceTests(SynchronousTestCase):
    """
    A traced request (L{RequestTrace}) encoded from its values decodes
    to what the official encoder makes of its spans
    (L{RequestTrace.spans}), the formats' caches cold and warm.
    """

    def assertSameSpans(self, traces: list[Any]) -> ExportTraceServiceRequest:
        spans = [span for trace in traces for span in
                 (trace.spans() if isinstance(trace, RequestTrace) else [trace])]
        for _ in range(2):
            ours = ExportTraceServiceRequest.FromString(encode_spans(traces))
            theirs = ExportTraceServiceRequest.FromString(official(spans).SerializePartialToString())
            mine = [s for r in ours.resource_spans for x in r.scope_spans for s in x.spans]
            official_spans = [s for r in theirs.resource_spans for x in r.scope_spans for s in x.spans]
            self.assertEqual(len(mine), len(official_spans))
            for a, b in zip(mine, official_spans, strict=True):
                self.assertEqual(a.ListFields(), b.ListFields())
            self.assertEqual(ours, theirs)
        return ours

    def test_kinds_of_requests(self) -> None:
        site = Site(_RESOURCE, _HTTP, "web", "https")
        remote = Context(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, None)
        stated = TraceState([("vendor", "x1"), ("other", "y")])
        request = self.assertSameSpans([
            _request(site),
            _request(site, trace_id=5, target=b"/v1/%20odd", headers=[(b"user-agent", b"curl/8 \xe9%s")],
                     parent=remote, route=b"/v1"),
            _request(site, parent=Context(remote.trace_id, remote.span_id, True, stated), state=stated,
                     attempts=((502,), ("connect: refused", _Server("agent-1"), None), (200,)), status=502,
                     extra=[("rproxy.token.wait", 0.0125), ("gen_ai.request.model", "m")]),
            _request(site, attempts=(("aborted",),), aborted=True, status=0),
            _request(site, attempts=(), status=404, target=b"/" + b"x" * 200),
            _request(site, target=b"/" + b"y" * 3000, extra=[("rproxy.tunnel.key", "k" * 100)]),  # (lengths past 2047)
            _span("token login", kind=SpanKind.CLIENT, span_id=2),
            _request(Site(_RESOURCE, _HTTP, "other", "http"), trace_id=9),
        ])
        spans = request.resource_spans[0].scope_spans[0].spans
        self.assertEqual([(s.name, s.kind) for s in spans[:4]], [("GET", 3), ("GET", 2), ("GET", 3), ("GET /v1", 2)])
        self.assertEqual((spans[0].parent_span_id, spans[1].parent_span_id),
                         ((0x1122334455667788).to_bytes(8, "big"), b""))
        self.assertEqual(spans[3].parent_span_id, (0xB7AD6B7169203331).to_bytes(8, "big"))
        self.assertEqual([s.trace_state for s in spans[4:8]], ["vendor=x1,other=y"] * 4)
        self.assertEqual([s.status.message for s in spans[4:8]], ["", "connect: refused", "", ""])

    def test_percent_in_a_length(self) -> None:
        """
        An attempt span of 4736 bytes (an outcome of 4446 characters, such
        as an agent's refusal message): the second byte of its length's
        varint is C{%}, which the cached format escapes, so the batch it is
        in encodes (it failed whole, every request of it dropped).
        """
        site = Site(_RESOURCE, _HTTP, "web", "http")
        outcome = "connect: " + "x" * 4437
        request = self.assertSameSpans([_request(site, trace_id=1),
                                        _request(site, trace_id=2, attempts=((outcome, _Server("agent-1"), None),),
                                                 status=502)])
        spans = request.resource_spans[0].scope_spans[0].spans
        self.assertEqual([s.status.message for s in spans], ["", "", outcome, ""])

    def test_large_values_not_cached(self) -> None:
        """
        The site's caches keep small formats and paths only: what a client
        sends (a User-Agent, a path of any size) cannot pin memory on the
        export thread; small ones are kept.
        """
        site = Site(_RESOURCE, _HTTP, "web", "http")
        self.assertSameSpans([_request(site, trace_id=i + 1, headers=[(b"user-agent", b"%06d" % i + b"a" * 5000)],
                                       target=b"/%06d" % i + b"p" * 5000) for i in range(20)])
        self.assertEqual((len(site.pairs), len(site.paths)), (0, 0))
        self.assertSameSpans([_request(site, trace_id=i + 1, target=b"/%d" % i) for i in range(20)])
        self.assertEqual((len(site.pairs), len(site.paths)), (1, 20))

    def test_spans_fields(self) -> None:
        """
        What L{RequestTrace.spans} makes of a request: the attempt's span
        a child of the request's, the attributes the filter's docstring
        names, the times in nanoseconds.
        """
        attempt, request = _request(Site(_RESOURCE, _HTTP, "web", "http"), route=b"/api").spans()
        self.assertEqual((attempt.parent.span_id, request.parent, request.name, attempt.name),
                         (request.context.span_id, None, "GET /api", "GET"))
        self.assertEqual(dict(request.attributes), {
            "http.request.method": "GET", "url.scheme": "http", "network.protocol.version": "1.1",
            "network.peer.address": "10.1.2.3", "client.address": "10.1.2.3", "rproxy.frontend": "web",
            "server.address": "example.com", "server.port": 8443, "http.response.status_code": 200,
            "http.route": "/api", "rproxy.backend": "web", "rproxy.attempts": 1, "url.path": "/api/x"})
        self.assertEqual(dict(attempt.attributes), {
            "http.request.method": "GET", "rproxy.server": "s1", "server.address": "10.0.0.9",
            "network.peer.address": "10.0.0.9", "server.port": 80, "network.peer.port": 80, "rproxy.backend": "web",
            "http.response.status_code": 200})
        self.assertEqual((request.start_time, attempt.end_time),
                         (int(1_700_000_000.25 * 1e9), int(1_700_000_000.35 * 1e9)))  # (the clock's seconds, a float)


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

    def test_transport(self) -> None:
        """
        The compact exporter POSTs through the official exporter's urllib3
        transport, but with a proxy or an OTLP certificate in the
        environment, which only its default (a requests session) honours.
        """
        from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

        def transport() -> Any:
            exporter = CompactSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
            self.addCleanup(exporter.shutdown)
            return exporter._client._transport

        self.patch(os, "environ", {})
        self.assertIsInstance(transport(), Urllib3HTTPTransport)
        for name in ("HTTPS_PROXY", "http_proxy", "OTEL_EXPORTER_OTLP_CERTIFICATE"):
            self.patch(os, "environ", {name: "x"})
            self.assertIsInstance(transport(), RequestsHTTPTransport)
