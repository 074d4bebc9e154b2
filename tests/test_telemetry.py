"""
Telemetry units: the traceparent parser, the C{telemetry} section, the
tracing filter's unsampled path, spans of token logins, and the event
sinks' metrics.  (Against an OTLP receiver: L{tests.test_e2e_tracing}.)
"""

from __future__ import annotations

import random
import threading
from typing import Any

import attrs
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, config_from_mapping, parse_config
from rproxy.config.model import Credential, TokenPoolConfig
from rproxy.config.telemetry import TelemetryConfig
from rproxy.events import HEARTBEATS, EventFanout, EventSink
from rproxy.http.filters import Chain, Filter
from rproxy.http.filters.tracing import TracingFilter
from rproxy.http.reader import RequestHead, RequestReader
from rproxy.kafka import KafkaSink
from rproxy.service import RProxyService
from rproxy.telemetry.provider import Telemetry, apply_telemetry
from rproxy.telemetry.spans import NO_SPAN, start_span
from rproxy.telemetry.traceparent import format_traceparent, parse
from rproxy.tokenpool import LoginRefused, LoginResult, TokenPool
from tests.test_kafka import TOPICS, FakeProducer, beat

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01".encode()


class TraceparentTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse(VALID), (int(TRACE, 16), int(PARENT, 16), 1))
        self.assertEqual(parse(VALID[:-2] + b"00"), (int(TRACE, 16), int(PARENT, 16), 0))
        self.assertEqual(parse(b" " + VALID + b" "), (int(TRACE, 16), int(PARENT, 16), 1))

    def test_later_version_read_by_its_first_fields(self) -> None:
        self.assertEqual(parse(b"cc" + VALID[2:] + b"-what-comes-next"), (int(TRACE, 16), int(PARENT, 16), 1))
        self.assertIsNone(parse(b"cc" + VALID[2:] + b"x"))

    def test_malformed_is_ignored(self) -> None:
        for value in [
            None, b"", b"00", VALID[:-1], VALID + b"-", VALID + b"0",
            VALID.upper(),  # upper-case hex
            b"ff" + VALID[2:],  # version ff
            b"0g" + VALID[2:],
            f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
            f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
            f"00-{TRACE}-{PARENT}-0x".encode(),
            f"00_{TRACE}-{PARENT}-01".encode(),
            f"00-{TRACE[:-1]}-{PARENT}0-01".encode(),  # dashes moved
            f"00-{TRACE}-{PARENT}-01,00-{TRACE}-{PARENT}-01".encode(),  # two, joined
        ]:
            self.assertIsNone(parse(value), value)

    def test_format(self) -> None:
        self.assertEqual(format_traceparent(int(TRACE, 16), int(PARENT, 16), True), VALID)
        self.assertEqual(format_traceparent(1, 2, False), b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-00")
        self.assertEqual(parse(format_traceparent(5, 7, False)), (5, 7, 0))


def _config(telemetry: Any) -> Any:
    return parse_config({"telemetry": telemetry}).telemetry


class ConfigTests(SynchronousTestCase):
    def errors(self, telemetry: Any) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            _config(telemetry)
        return caught.exception.errors

    def test_defaults(self) -> None:
        config = _config({"otlp_endpoint": "http://127.0.0.1:4318"})
        self.assertEqual(config, TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318",
                                                 endpoint="http://127.0.0.1:4318/v1/traces"))
        self.assertIsNone(parse_config({}).telemetry)

    def test_all_keys(self) -> None:
        config = _config({"otlp_endpoint": "https://collector:4318/v1/traces", "protocol": "http/protobuf",
                          "service_name": "edge", "sample_ratio": 0.25, "headers": {"authorization": "Bearer x"},
                          "timeout": "3s", "queue_size": 100, "batch_size": 10, "schedule_delay": "200ms"})
        self.assertEqual((config.endpoint, config.service_name, config.sample_ratio, config.headers, config.timeout,
                          config.queue_size, config.batch_size, config.schedule_delay),
                         ("https://collector:4318/v1/traces", "edge", 0.25, (("authorization", "Bearer x"),), 3.0,
                          100, 10, 0.2))

    def test_errors_name_the_key_path(self) -> None:
        self.assertEqual(self.errors({"otlp_endpoint": "http://c:4318", "protocol": "grpc"}), [
            "telemetry.protocol: grpc is not supported: use http/protobuf (OTLP over HTTP, a collector's port 4318)"])
        self.assertEqual(self.errors({"otlp_endpoint": "collector:4318"}), [
            "telemetry.otlp_endpoint: expected an http:// or https:// URL, got 'collector:4318'"])
        self.assertEqual(self.errors({}), ["telemetry.otlp_endpoint: required"])
        self.assertEqual(self.errors({"otlp_endpoint": "http://c", "sample_ratio": 2, "sample": 1}), [
            "telemetry.sample_ratio: expected a number from 0 to 1, got 2",
            "telemetry.sample: unknown key (did you mean 'sample_ratio'?)"])
        self.assertEqual(self.errors({"otlp_endpoint": "http://c", "headers": ["a"]}), [
            "telemetry.headers: expected a mapping of header names to values, got a list"])
        self.assertEqual(self.errors({"otlp_endpoint": "http://c", "headers": {"a b": "x", "k": "x\ny"}}), [
            "telemetry.headers: 'a b' is not a header name",
            "telemetry.headers.k: expected a string without line breaks"])
        self.assertEqual(self.errors({"otlp_endpoint": "http://c", "queue_size": 10, "batch_size": 20}), [
            "telemetry.batch_size: 20 is more than queue_size (10)"])
        self.assertEqual(self.errors("yes"), ["telemetry: expected a mapping, got a string"])


class _Recorder:
    """
    A telemetry that fails the test if the filter hands it a span.
    """

    sample_ratio = 0.0

    def finished(self, span: Any, n: int = 1) -> None:
        raise AssertionError("an unsampled request made a span")


class _Client:
    def __init__(self) -> None:
        self.trace: Any = None
        self.peer_host = "127.0.0.1"


class _Exchange:
    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.head = RequestHead(b"GET", b"/v1/x?q=1", (1, 1), headers + [(b"host", b"example.com:8080")],
                                keep_alive=True)
        self.client = _Client()
        self.notes: Any = None
        self.started = 0.0
        self.status = 0
        self.route = None
        self.attempts = 0
        self.tried: list[str] = []
        self.pool = None
        self.chain: Any = None


class _Logs(Filter):
    def log(self, exchange: Any, backend: str) -> None:
        pass


class _Spans:
    """
    A telemetry keeping the spans the filter hands it.
    """

    sample_ratio = 1.0

    def __init__(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.spans: list[Any] = []
        self.assertEqual = SynchronousTestCase().assertEqual
        self.resource = Resource.create({"service.name": "test"})
        self.http_scope = InstrumentationScope("rproxy.http")

    def finished(self, request: Any, n: int = 1) -> None:
        spans = request.spans()
        self.assertEqual(len(spans), n)
        self.spans += spans


class _Server:
    def __init__(self, name: str) -> None:
        self.config = attrs.make_class("S", {"name": attrs.field(), "host": attrs.field(), "port": attrs.field()})(
            name, "10.0.0.9", 80)


class SampledTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        frontend = attrs.make_class("F", {"clock": attrs.field(), "name": attrs.field(), "scheme": attrs.field()})(
            self.clock, "web", b"http")
        self.telemetry = _Spans()
        self.tracing = TracingFilter(self.telemetry, frontend)

    def test_a_client_gone_ends_the_spans(self) -> None:
        """
        The client closing mid-request (no log phase): the closed phase
        ends the attempt's span and the request's, both failed, timed by
        the clock; the parent of the request's span is the client's.
        """
        exchange = _Exchange([(b"traceparent", VALID)])
        self.tracing.request(exchange)
        self.clock.advance(1)
        exchange.attempts = 1
        self.tracing.attempt(exchange, _Server("s1"))
        (_, value), = self.tracing.upstream_request(exchange, (), frozenset())[0]
        self.clock.advance(2)
        self.tracing.closed(exchange.client)
        attempt, request = self.telemetry.spans
        self.assertEqual(value, b"00-%s-%016x-01" % (TRACE.encode(), attempt.context.span_id))
        self.assertEqual(attempt.parent.span_id, request.context.span_id)
        self.assertEqual((request.parent.span_id, request.parent.is_remote), (int(PARENT, 16), True))
        self.assertEqual({request.context.trace_id, attempt.context.trace_id}, {int(TRACE, 16)})
        self.assertEqual((attempt.start_time, attempt.end_time, request.start_time, request.end_time),
                         (10**9, 3 * 10**9, 0, 3 * 10**9))
        self.assertEqual((attempt.attributes["error.type"], request.attributes["error.type"]), ("aborted", "aborted"))
        self.assertEqual((attempt.status.status_code.name, request.status.status_code.name), ("ERROR", "ERROR"))
        self.assertEqual({k: request.attributes[k] for k in ("url.path", "server.address", "server.port")},
                         {"url.path": "/v1/x", "server.address": "example.com", "server.port": 8080})
        self.assertIsNone(exchange.client.trace)

    def test_a_root_at_ratio_1(self) -> None:
        """
        No traceparent at ratio 1: a new trace, the request's span a root;
        a 502 marks it failed; the log phase puts the trace id on notes.
        """
        exchange = _Exchange([])
        exchange.notes = {"token": "t"}
        self.tracing.request(exchange)
        exchange.client.trace.routed = 0.25  # (TokenWaitMark's)
        exchange.status = 502
        self.tracing.log(exchange, "web")
        request, = self.telemetry.spans
        self.assertIsNone(request.parent)
        self.assertEqual(exchange.notes["trace_id"], f"{request.context.trace_id:032x}")
        self.assertEqual((request.attributes["error.type"], request.attributes["rproxy.token.wait"]), ("502", 0.25))
        self.assertEqual(request.kind.name, "SERVER")


class IdsTests(SynchronousTestCase):
    def test_ids_are_never_zero(self) -> None:
        """
        A draw of the request's ids (trace, span, first attempt) with 8
        zero bytes or more, which any id of zeros has, is drawn again.
        """
        valid = bytes(range(1, 33))
        draws = [0, int.from_bytes(bytes(8) + valid[8:], "big"), int.from_bytes(valid, "big")]

        class Rng:
            def random(self) -> float:
                return 0.5

            def getrandbits(self, n: int) -> int:
                self.asked = n
                return draws.pop(0)

        frontend = attrs.make_class("F", {"clock": attrs.field(), "name": attrs.field(), "scheme": attrs.field()})(
            Clock(), "web", b"http")
        tracing = TracingFilter(_Spans(), frontend, Rng())  # type: ignore[arg-type]
        exchange = _Exchange([])
        tracing.request(exchange)
        self.assertEqual((exchange.client.trace.ids, draws), (valid, []))


class UnsampledTests(SynchronousTestCase):
    """
    A request not sampled makes no span: a client's traceparent goes on
    as it came (nothing set), else one of the filter's own, flag off.
    """

    def run_phases(self, headers: list[tuple[bytes, bytes]]) -> tuple[Any, Any, Any]:
        frontend = attrs.make_class("F", {"clock": attrs.field(), "name": attrs.field()})(Clock(), "web")
        tracing = TracingFilter(_Recorder(), frontend)
        exchange = _Exchange(headers)
        exchange.chain = Chain([tracing, _Logs()])
        tracing.request(exchange)
        tracing.attempt(exchange, None)
        sent = tracing.upstream_request(exchange, (), frozenset())
        tracing.attempt_end(exchange, None, 200)
        tracing.log(exchange, "web")
        return sent, exchange.notes, exchange.client.trace

    def test_without_traceparent(self) -> None:
        """
        Nothing to pass on: the exchange's later phases run the chain
        without the tracing filter (the same narrowed chain each time).
        """
        frontend = attrs.make_class("F", {"clock": attrs.field(), "name": attrs.field()})(Clock(), "web")
        tracing = TracingFilter(_Recorder(), frontend)
        log = _Logs()
        chain = Chain([tracing, log])
        narrowed = []
        for _ in range(2):
            exchange = _Exchange([])
            exchange.chain = chain
            tracing.request(exchange)
            narrowed.append(exchange.chain)
            self.assertIsNone(exchange.client.trace)
        self.assertIs(narrowed[0], narrowed[1])
        self.assertEqual((narrowed[0].filters, narrowed[0].log, narrowed[0].attempt), ((log,), (log,), ()))
        self.assertEqual(chain.log, (tracing, log))

    def test_unsampled_traceparent_goes_on(self) -> None:
        sent, notes, _ = self.run_phases([(b"traceparent", VALID[:-2] + b"00")])
        self.assertEqual(sent, ((), frozenset()))
        self.assertEqual(notes, {"trace_id": TRACE})

    def test_malformed_traceparent_is_replaced(self) -> None:
        (set_headers, remove), notes, _ = self.run_phases([(b"traceparent", b"00-nonsense"), (b"tracestate", b"a=1")])
        self.assertEqual(remove, frozenset({b"traceparent", b"tracestate"}))
        [(name, value)] = set_headers
        trace_id, _, flags = parse(value)
        self.assertEqual((name, flags), (b"traceparent", 0))
        self.assertEqual(notes, {"trace_id": f"{trace_id:032x}"})


class _Draws:
    """
    A random generator whose C{getrandbits} gives C{draws} in turn.
    """

    def __init__(self, draws: list[int]) -> None:
        self.draws = draws

    def getrandbits(self, n: int) -> int:
        return self.draws.pop(0)

    def random(self) -> float:
        return 0.5


class SamplingTests(SynchronousTestCase):
    """
    New traces are sampled with probability C{sample_ratio}, as the SDK's
    C{TraceIdRatioBased} samples them: by their id; the head's
    C{traceparent} is the reader's.
    """

    def tracing(self, ratio: float, rng: Any) -> TracingFilter:
        frontend = attrs.make_class("F", {"clock": attrs.field(), "name": attrs.field(), "scheme": attrs.field()})(
            Clock(), "web", b"http")
        spans = _Spans()
        spans.sample_ratio = ratio
        return TracingFilter(spans, frontend, rng)

    def sampled(self, ratio: float, requests: int) -> int:
        tracing = self.tracing(ratio, random.Random(18))
        chain = Chain([tracing])
        count = 0
        for _ in range(requests):
            exchange = _Exchange([])
            exchange.chain = chain
            tracing.request(exchange)
            count += exchange.client.trace is not None
        return count

    def test_ratios(self) -> None:
        self.assertEqual((self.sampled(0, 1000), self.sampled(1, 1000)), (0, 1000))
        self.assertTrue(2300 < self.sampled(0.25, 10_000) < 2700)
        self.assertTrue(70 < self.sampled(0.01, 10_000) < 130)

    def test_decided_by_the_trace_id(self) -> None:
        """
        A new trace (no traceparent, or a malformed one) is sampled when
        the SDK's C{TraceIdRatioBased} at the same ratio samples its id
        (the low 64 bits below the ratio's share of 2**64), so that every
        service of the trace decides alike: a sampled request's id is one
        it samples, and a malformed traceparent's replacement is sampled
        as its id is.
        """
        from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

        sdk = TraceIdRatioBased(0.25)

        def sdk_samples(trace_id: int) -> bool:
            return sdk.should_sample(None, trace_id, "GET").decision is Decision.RECORD_AND_SAMPLE

        tracing = self.tracing(0.25, random.Random(18))
        tracing.quiet = Chain([])
        sampled = []
        for _ in range(2000):
            exchange = _Exchange([])
            exchange.chain = Chain([tracing])
            tracing.request(exchange)
            if exchange.client.trace is not None:
                sampled.append(exchange.client.trace.trace_id)
        self.assertTrue(440 < len(sampled) < 560)
        self.assertEqual([t for t in sampled if not sdk_samples(t)], [])
        self.assertGreater(len({t >> 64 for t in sampled}), 400)  # (the upper half drawn freely)
        high, rest = 0x0AF7651916CD43DD, (0x1122334455667788 << 64) | 0x99AABBCCDDEEFF01
        for low in (1, sdk.bound - 1, sdk.bound, (1 << 64) - 1):
            trace_id = (high << 64) | low
            malformed = _Exchange([(b"traceparent", b"00-nonsense")])
            self.tracing(0.25, _Draws([(trace_id << 128) | rest])).request(malformed)
            trace = malformed.client.trace
            self.assertEqual((trace.trace_id, trace.ids is not None), (trace_id, sdk_samples(trace_id)), low)

    def test_reader_finds_traceparent(self) -> None:
        """
        The reader keeps the first C{traceparent} field, in any case; a
        head made without the reader looks it up.
        """
        head, = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: a\r\nTraceParent: " + VALID +
                                     b"\r\ntraceparent: 00-x\r\n\r\n")[:1]
        self.assertEqual(head.traceparent, VALID)
        plain, = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")[:1]
        self.assertIsNone(plain.traceparent)
        self.assertEqual(RequestHead(b"GET", b"/", (1, 1), [(b"traceparent", VALID)]).traceparent, VALID)


def _telemetry(test: SynchronousTestCase, clock: Clock, ratio: float = 1.0) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:1", endpoint="http://127.0.0.1:1/v1/traces",
                             sample_ratio=ratio)
    telemetry = Telemetry(config, reactor=None, clock=clock, exporter=exporter)
    test.addCleanup(telemetry.processor.shutdown)
    return telemetry, exporter


class SpanTests(SynchronousTestCase):
    def test_token_login_spans(self) -> None:
        """
        Each login of a token pool is a CLIENT span, its outcome and a
        refusal's reason on it; times from the clock.
        """
        clock = Clock()
        clock.advance(100)
        telemetry, exporter = _telemetry(self, clock)
        answers: list[defer.Deferred[LoginResult]] = []

        def login(credential: Credential) -> defer.Deferred[LoginResult]:
            answers.append(defer.Deferred())
            return answers[-1]

        config = TokenPoolConfig(name="db", host="10.0.0.1", port=8848,
                                 credentials=(Credential("alice", "pw"), Credential("bob", "pw")))
        pool = TokenPool(config, login, clock)
        pool.telemetry = telemetry
        pool.start()
        clock.advance(0.5)
        answers[0].callback(LoginResult(token="t1", ttl=None))
        answers[1].errback(LoginRefused("login answered 401"))
        pool.stop()
        telemetry.processor.force_flush()
        spans = {s.attributes["rproxy.token.session"]: s for s in exporter.get_finished_spans()}
        alice, bob = spans["alice"], spans["bob"]
        self.assertEqual((alice.name, alice.kind.name, alice.attributes["rproxy.token.outcome"]),
                         ("token login", "CLIENT", "ok"))
        self.assertEqual((alice.start_time, alice.end_time), (100 * 10**9, int(100.5 * 10**9)))
        self.assertEqual(alice.attributes["server.address"], "10.0.0.1")
        self.assertEqual((bob.attributes["rproxy.token.outcome"], bob.status.description),
                         ("refused", "login answered 401"))

    def test_no_telemetry_no_span(self) -> None:
        self.assertIs(start_span(None, "x"), NO_SPAN)
        NO_SPAN.end(error="nothing happens")

    def test_child_and_unsampled_root(self) -> None:
        """
        A child shares its parent's trace; a root is sampled at the ratio
        (0: never, and no span is made).
        """
        clock = Clock()
        telemetry, exporter = _telemetry(self, clock)
        parent = start_span(telemetry, "tunnel stream", {"rproxy.tunnel": "t", "none": None})
        child = start_span(telemetry, "open", parent=parent)
        child.end()
        parent.end(error="agent gone")
        telemetry.processor.force_flush()
        child_span, parent_span = exporter.get_finished_spans()
        self.assertEqual(child_span.parent.span_id, parent_span.context.span_id)
        self.assertEqual(dict(parent_span.attributes), {"rproxy.tunnel": "t"})
        self.assertEqual(parent.trace_id, f"{parent_span.context.trace_id:032x}")
        never, _ = _telemetry(self, clock, ratio=0.0)
        self.assertIs(start_span(never, "x"), NO_SPAN)


class HandOffTests(SynchronousTestCase):
    def test_through_the_processors_queue_or_on_end(self) -> None:
        """
        An ended span goes to the SDK processor's queue (or, without the
        internals that takes, through its on_end) and is exported;
        after a stop it is dropped and counted.
        """
        class Pool:
            def callInThreadWithCallback(self, done: Any, f: Any) -> None:
                done(True, f())

        class Reactor(Clock):
            def getThreadPool(self) -> Pool:
                return Pool()

            def callFromThread(self, f: Any, *args: Any) -> None:
                f(*args)

        clock = Reactor()
        for direct in (True, False):
            telemetry, exporter = _telemetry(self, clock)
            telemetry.reactor = clock
            self.assertIsNotNone(telemetry.queue)
            if not direct:
                telemetry.queue = None
            start_span(telemetry, "a").end()
            telemetry.processor.force_flush()
            self.assertEqual(([s.name for s in exporter.get_finished_spans()], telemetry.exported), (["a"], 1))
        stopped: list[Any] = []
        telemetry.in_thread = _at_once
        telemetry.stop().addCallback(stopped.append)
        self.assertEqual(len(stopped), 1)
        start_span(telemetry, "late").end()
        self.assertEqual((telemetry.dropped, telemetry.waiting), (1, 0))

    def test_the_queue_bound(self) -> None:
        """
        A request's spans are dropped together when they would put more
        than C{queue_size} in the queue.
        """
        exporter = InMemorySpanExporter()
        config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:1", endpoint="http://127.0.0.1:1/v1/traces",
                                 queue_size=3, batch_size=3, schedule_delay=1000.0)
        telemetry = Telemetry(config, reactor=None, clock=Clock(), exporter=exporter)
        self.addCleanup(telemetry.processor.shutdown)
        telemetry.finished(object(), 2)
        telemetry.finished(object(), 2)
        telemetry.finished(object(), 1)
        self.assertEqual((telemetry.queued, telemetry.dropped, telemetry.waiting), (3, 2, 3))


def _at_once(work: Any, then: Any) -> None:
    """L{Telemetry.in_thread} in the test's thread."""
    work()
    then()


class _Reactor(Clock):
    """A clock that runs what a thread hands it (L{_at_once}: the test's own)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class _Blocking(InMemorySpanExporter):
    """An exporter whose exports wait for C{release}: a collector that never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.gave_up = False

    def export(self, spans: Any) -> Any:
        self.release.wait(30)
        return super().export(spans)

    def shutdown(self) -> None:
        self.gave_up = True


class StopTests(SynchronousTestCase):
    config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:1", endpoint="http://127.0.0.1:1/v1/traces",
                             queue_size=3, batch_size=3, schedule_delay=1000.0)

    def spans_total(self, telemetry: Telemetry) -> dict[str, float]:
        service = RProxyService(config_from_mapping({}), Clock(), registry=CollectorRegistry())
        service.telemetry = telemetry
        return {outcome: service.registry.get_sample_value("rproxy_telemetry_spans_total", {"outcome": outcome})
                for outcome in ("exported", "failed", "dropped")}

    def test_counts_go_on_across_a_reload(self) -> None:
        """
        A reload that changes the section makes a new telemetry: the
        counters the metrics show go on from the old one's counts (what
        it drops and exports while it stops included), never back to 0.
        """
        clock = _Reactor()
        old = apply_telemetry(None, self.config, clock, clock, exporter=InMemorySpanExporter())
        assert old is not None
        old.in_thread = _at_once
        for _ in range(5):
            old.finished(object())  # (3 queued, then 2 dropped)
        before = self.spans_total(old)
        new = apply_telemetry(old, attrs.evolve(self.config, sample_ratio=0.5), clock, clock,
                              exporter=InMemorySpanExporter())
        assert new is not None
        self.addCleanup(new.processor.shutdown)
        new.finished(object(), 4)  # (over queue_size: dropped)
        self.assertEqual((before, self.spans_total(new)),
                         ({"exported": 0, "failed": 0, "dropped": 2}, {"exported": 3, "failed": 0, "dropped": 6}))

    def test_a_stop_gives_up_after_its_deadline(self) -> None:
        """
        A collector that never answers holds a stop up for the deadline
        only: then the exporter is told to give up, the stop is done and
        the spans not sent are counted as dropped.
        """
        exporter = _Blocking()
        self.addCleanup(exporter.release.set)
        clock = _Reactor()
        telemetry = Telemetry(self.config, reactor=clock, clock=clock, exporter=exporter)
        telemetry.finished(object())
        telemetry.finished(object())
        stopped: list[Any] = []
        telemetry.stop(deadline=1.0).addCallback(stopped.append)
        clock.advance(0.99)
        self.assertEqual((stopped, exporter.gave_up, telemetry.dropped), ([], False, 0))
        clock.advance(0.01)
        self.assertEqual((stopped, exporter.gave_up, self.spans_total(telemetry)),
                         ([None], True, {"exported": 0, "failed": 0, "dropped": 2}))


class _Stores:
    def __init__(self, events: Any) -> None:
        self.events = events
        self.live = None
        self.keys = attrs.make_class("K", {"redis_errors": attrs.field(), "postgres_errors": attrs.field()})(0, 0)

    def status(self) -> dict[str, str]:
        return {}

    def events_rejected(self) -> dict[str, int]:
        return {"kafka": 4}


class EventMetricsTests(SynchronousTestCase):
    def test_sinks_counts(self) -> None:
        """
        rproxy_events_lost, _emitted, _in_flight and _sink_dropped per sink
        kind, read from the sinks at scrape time; _rejected from the
        writers.
        """
        clock = Clock()
        kafka = KafkaSink(FakeProducer(), clock, TOPICS, buffer_limit=3)
        redis_sink = EventSink(None, clock)
        service = RProxyService(config_from_mapping({}), clock, registry=CollectorRegistry())
        service.stores = _Stores(EventFanout(redis_sink, kafka))  # type: ignore[assignment]
        for i in range(5):
            service.stores.events.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)  # (the Redis sink's flush finds no Redis: it waits)
        kafka.lost = 7
        text = generate_latest(service.registry).decode()
        for line in ['rproxy_events_lost_total{sink="kafka"} 7.0', 'rproxy_events_emitted_total{sink="kafka"} 5.0',
                     'rproxy_events_in_flight{sink="kafka"} 3.0', 'rproxy_events_sink_dropped_total{sink="kafka"} 2.0',
                     'rproxy_events_sink_dropped_total{sink="redis"} 0.0',
                     'rproxy_events_rejected_total{sink="kafka"} 4.0']:
            self.assertIn(line, text)
        self.assertNotIn('rproxy_events_lost_total{sink="redis"}', text)
        redis_sink.stop()


class ChainTests(SynchronousTestCase):
    def test_tracing_first_and_the_token_mark(self) -> None:
        """
        With telemetry the tracing filter comes first, and the token wait
        mark right after the token filter; without, neither is there.
        """
        from rproxy.http.frontend import HTTPFrontend
        from rproxy.http.upstream import UpstreamPool
        from rproxy.pool import Pool

        config = config_from_mapping({
            "backends": [{"name": "be", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "fe", "protocol": "http", "listen": "tcp:0", "backend": "be"}],
        })
        clock = Clock()
        pools = {"be": Pool(config.backends[0], clock)}
        frontend = HTTPFrontend(config.frontends[0], pools, None, clock, UpstreamPool(None, clock))

        def names() -> list[str]:
            return [type(f).__name__ for f in frontend.chain.filters]

        self.assertEqual(names(), ["RouteFilter"])
        frontend.telemetry = _Spans()
        frontend.tokens = object()
        self.assertEqual(names(), ["TracingFilter", "TokenLeaseFilter", "TokenWaitMark", "RouteFilter"])
        frontend.telemetry = None
        self.assertEqual(names(), ["TokenLeaseFilter", "RouteFilter"])
