"""
Tracing end to end: rproxy exporting to an OTLP/HTTP receiver
(L{tests.otlp}) on loopback, curl as the client, a twisted.web backend
that records the C{traceparent} it was sent.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rproxy.config import config_from_mapping
from rproxy.telemetry.traceparent import parse
from tests import test_e2e_tokenpool as tokenpool
from tests import test_e2e_tunnel_http as tunnel_http
from tests.otlp import OTLPReceiver
from tests.support import ServiceMixin, async_test, connect, listen, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Recorder(Resource):
    """
    A backend answering 200 and recording the trace headers it got.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str | None, str | None]] = []

    def render(self, request: Any) -> bytes:
        parent, state = request.getHeader(b"traceparent"), request.getHeader(b"tracestate")
        self.seen.append((parent.decode() if parent else None, state.decode() if state else None))
        return b"ok"


class TracingSetup(ServiceMixin):
    """
    A service tracing to an OTLP receiver, curl to call it.
    """

    timeout = 60

    async def setup(self, ratio: float = 1.0, endpoint: str | None = None, dead_first: bool = False,
                    queue_size: int = 2048, timeout: str = "1s") -> Any:
        self.receiver = OTLPReceiver()
        site = Site(self.receiver)
        site.noisy = False
        collector = await listen(site)
        self.addCleanup(collector.stopListening)
        self.backend = Recorder()
        backend_site = Site(self.backend)
        backend_site.noisy = False
        port = await listen(backend_site)
        self.addCleanup(port.stopListening)
        servers = [{"address": f"127.0.0.1:{port.getHost().port}", "name": "live"}]
        if dead_first:
            # a port nothing listens on: refused, so the request is tried again on "live"
            dead = await listen(Site(Resource()))
            dead_port = dead.getHost().port
            await dead.stopListening()
            servers.insert(0, {"address": f"127.0.0.1:{dead_port}", "name": "dead"})
        self.log_path = os.path.abspath(self.mktemp())
        telemetry = {"otlp_endpoint": endpoint or f"http://127.0.0.1:{collector.getHost().port}",
                     "service_name": "edge", "sample_ratio": ratio, "schedule_delay": "20ms", "timeout": timeout,
                     "queue_size": queue_size, "batch_size": min(queue_size, 512)}
        self.data = {
            "backends": [{"name": "web", "servers": servers, "health_check": {"type": "none"},
                          "passive": {"consecutive_failures": 0}}],
            "frontends": [{"name": "web", "listen": "tcp:0:interface=127.0.0.1", "backend": "web", "protocol": "http",
                           "routes": [{"path_prefix": "/api", "backend": "web"}],
                           "http": {"access_log": {"format": "json", "path": self.log_path}}}],
            "telemetry": telemetry,
        }
        self.service = await self.start_service(self.data)
        return self.service

    async def curl(self, path: str = "/api/x", *headers: str) -> bytes:
        port = self.service.port_of("web")
        args = ["-sS", "-A", "curl-test/1", f"http://127.0.0.1:{port}{path}"]
        for header in headers:
            args += ["-H", header]
        out, err, code = await getProcessOutputAndValue("curl", args, env=os.environ, reactor=reactor)
        self.assertEqual(code, 0, err)
        return out

    def access_log(self) -> list[dict[str, Any]]:
        self.service.frontends["web"].access_file.flush()
        with open(self.log_path) as f:
            return [json.loads(line) for line in f]



class TracingTests(TracingSetup, TestCase):
    @async_test
    async def test_a_traced_request_continues_its_trace(self) -> None:
        """
        A client's sampled traceparent: a SERVER span child of the
        client's span, a CLIENT span child of it, the backend sent the
        CLIENT span as its parent (and the client's tracestate); the access
        log line names the trace.
        """
        await self.setup(ratio=0.0)  # the client's decision wins
        body = await self.curl("/api/x?secret=1", f"traceparent: 00-{TRACE}-{PARENT}-01", "tracestate: vendor=abc")
        self.assertEqual(body, b"ok")
        await wait_for(lambda: len(self.receiver.spans) >= 2)
        server, = [s for s in self.receiver.spans if s.kind == "server"]
        client, = [s for s in self.receiver.spans if s.kind == "client"]
        self.assertEqual((server.trace_id, server.parent_span_id), (TRACE, PARENT))
        self.assertEqual((client.trace_id, client.parent_span_id), (TRACE, server.span_id))
        self.assertEqual(server.name, "GET /api")
        self.assertEqual(server.service, "edge")
        attributes = server.attributes
        self.assertEqual(attributes["http.request.method"], "GET")
        self.assertEqual(attributes["url.path"], "/api/x")
        self.assertEqual(attributes["http.route"], "/api")
        self.assertEqual(attributes["http.response.status_code"], 200)
        self.assertEqual(attributes["network.peer.address"], "127.0.0.1")
        self.assertEqual(attributes["server.address"], "127.0.0.1")
        self.assertEqual(attributes["user_agent.original"], "curl-test/1")
        self.assertEqual(attributes["rproxy.backend"], "web")
        self.assertEqual(client.attributes["rproxy.server"], "live")
        self.assertEqual(client.attributes["http.response.status_code"], 200)
        self.assertEqual(self.backend.seen, [(f"00-{TRACE}-{client.span_id}-01", "vendor=abc")])
        self.assertEqual([line["trace_id"] for line in self.access_log()], [TRACE])

    @async_test
    async def test_a_retry_is_a_second_client_span(self) -> None:
        """
        A refused connect is tried again on the next server: two CLIENT
        spans under the one SERVER span, the first failed, the second
        (resend count 1) answered; the backend saw the second's id.
        """
        await self.setup(dead_first=True)
        for _ in range(4):
            await self.curl()
        await wait_for(lambda: len([s for s in self.receiver.spans if s.kind == "server"]) == 4)
        retried = [s for s in self.receiver.spans if s.kind == "server" and s.attributes["rproxy.attempts"] == 2]
        self.assertTrue(retried, self.receiver.spans)
        server = retried[0]
        attempts = sorted((s for s in self.receiver.of_trace(server.trace_id) if s.kind == "client"),
                          key=lambda s: s.start)
        self.assertEqual([s.parent_span_id for s in attempts], [server.span_id] * 2)
        self.assertEqual([s.attributes["rproxy.server"] for s in attempts], ["dead", "live"])
        self.assertEqual(attempts[0].attributes["error.type"], "connect")
        self.assertEqual(attempts[0].status, 2)
        self.assertEqual(attempts[1].attributes["http.request.resend_count"], 1)
        self.assertEqual(attempts[1].attributes["http.response.status_code"], 200)
        self.assertIn(f"00-{server.trace_id}-{attempts[1].span_id}-01", [seen for seen, _ in self.backend.seen])

    @async_test
    async def test_not_sampled(self) -> None:
        """
        At sample_ratio 0 nothing is exported: a request without
        traceparent goes on without one (and its log line names no trace),
        a client's unsampled one goes on unchanged (its trace id logged);
        a malformed one is replaced by one of ours, sampled flag off, and
        its tracestate dropped.
        """
        await self.setup(ratio=0.0)
        await self.curl()
        unsampled = f"00-{TRACE}-{PARENT}-00"
        await self.curl("/api/x", f"traceparent: {unsampled}", "tracestate: a=1")
        await self.curl("/api/x", f"traceparent: 00-{TRACE.upper()}-{PARENT}-01", "tracestate: a=1")
        first, second, (third, third_state) = self.backend.seen
        self.assertEqual(first, (None, None))
        self.assertEqual(second, (unsampled, "a=1"))
        trace_id, _, flags = parse(third.encode())
        self.assertEqual(flags, 0)
        self.assertNotEqual(f"{trace_id:032x}", TRACE.lower())
        self.assertIsNone(third_state)
        logged = [line.get("trace_id") for line in self.access_log()]
        self.assertEqual(logged, [None, TRACE, f"{trace_id:032x}"])
        await self.service.telemetry.flush()
        self.assertEqual((self.receiver.requests, self.receiver.spans), (0, []))

    @async_test
    async def test_collector_down(self) -> None:
        """
        With a collector that takes the connection and never answers,
        requests are answered as before; spans past the queue are dropped
        and the failed exports counted, both in the metrics.  (A collector
        that refuses at once frees the queue as fast as spans come: whether
        any is dropped would depend on the machine's speed.)
        """
        service = await self.setup(endpoint=await self.black_hole(), queue_size=4)
        for _ in range(10):
            self.assertEqual(await self.curl(), b"ok")
        telemetry = service.telemetry
        self.assertGreater(telemetry.dropped, 0)
        await wait_for(lambda: telemetry.failed > 0)
        self.assertEqual(telemetry.exported, 0)
        text = generate_latest(service.registry).decode()
        self.assertIn(f'rproxy_telemetry_spans_total{{outcome="dropped"}} {float(telemetry.dropped)}', text)
        self.assertIn('rproxy_telemetry_spans_total{outcome="failed"}', text)
        self.assertEqual(len(self.access_log()), 10)


    async def black_hole(self) -> str:
        """
        The address of a collector that takes connections and never
        answers (closed at the test's end, where an export may be waiting).
        """
        taken: list[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                taken.append(self)

        silent = Factory.forProtocol(Silent)
        silent.noisy = False
        hole = await listen(silent)
        self.addCleanup(hole.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in taken if p.transport is not None])
        return f"http://127.0.0.1:{hole.getHost().port}"

    @async_test
    async def test_stop_with_collector_silent(self) -> None:
        """
        A stop with an export under way to a collector that never answers
        (its timeout 10s) waits about a second for it, not the timeout nor
        the grace period (2s): the spans left are counted as dropped.
        """
        service = await self.setup(endpoint=await self.black_hole(), timeout="10s")
        self.assertEqual(await self.curl(), b"ok")
        telemetry = service.telemetry
        await wait_for(lambda: telemetry.taken > 0)  # (the exporter's POST is under way)
        began = time.monotonic()
        await service.stopService()
        took = time.monotonic() - began
        self.assertTrue(0.9 < took < 1.8, took)
        self.assertEqual((telemetry.exported, telemetry.failed, telemetry.dropped), (0, 0, telemetry.queued))
        self.assertGreater(telemetry.queued, 0)


class ReloadTests(TracingSetup, TestCase):
    def tracing(self) -> list[Any]:
        return [f for f in self.service.frontends["web"].chain.filters if type(f).__name__ == "TracingFilter"]

    @async_test
    async def test_reload(self) -> None:
        """
        The same section on reload keeps the exporter; a changed one
        starts another (the old one stops) and the frontends' filters use
        it; none: no tracing filter left.
        """
        service = await self.setup()
        first = service.telemetry
        [tracing] = self.tracing()
        self.assertIs(tracing.telemetry, first)
        await service.reload(config_from_mapping(dict(self.data, admin={"listen": "tcp:0:interface=127.0.0.1"},
                                                      **{"global": {"grace_period": "2s"}})))
        self.assertIs(service.telemetry, first)
        changed = dict(self.data, telemetry=dict(self.data["telemetry"], service_name="edge-2"),
                       admin={"listen": "tcp:0:interface=127.0.0.1"}, **{"global": {"grace_period": "2s"}})
        await service.reload(config_from_mapping(changed))
        second = service.telemetry
        self.assertIsNot(second, first)
        self.assertTrue(first.stopping)
        [tracing] = self.tracing()
        self.assertIs(tracing.telemetry, second)
        self.assertEqual(await self.curl(), b"ok")
        await wait_for(lambda: len(self.receiver.spans) == 2)
        self.assertEqual({s.service for s in self.receiver.spans}, {"edge-2"})
        gone = dict(changed)
        del gone["telemetry"]
        await service.reload(config_from_mapping(gone))
        self.assertIsNone(service.telemetry)
        self.assertEqual(self.tracing(), [])
        self.assertTrue(second.stopping)
        self.assertEqual(await self.curl(), b"ok")


class TunnelTracingTests(ServiceMixin, TestCase):
    """
    A tunnel's requests (mode http) and streams (mode tcp) traced: the
    agent, the model and the key on the spans.
    """

    timeout = 60
    # (its helpers; importing the class itself would run its tests here too)
    start_agent = tunnel_http.TunnelHTTPTests.start_agent
    request = tunnel_http.TunnelHTTPTests.request
    chat = tunnel_http.TunnelHTTPTests.chat

    async def start_tunnel(self, mode: str) -> Any:
        self.receiver = OTLPReceiver()
        site = Site(self.receiver)
        site.noisy = False
        collector = await listen(site)
        self.addCleanup(collector.stopListening)
        service = await self.start_service({
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
                         "public": "tcp:0:interface=127.0.0.1", "open_timeout": "2s", "mode": mode}],
            "telemetry": {"otlp_endpoint": f"http://127.0.0.1:{collector.getHost().port}", "schedule_delay": "20ms"},
        })
        self.tunnel = service.tunnels["gpu"]
        return service

    @async_test
    async def test_http_mode_request(self) -> None:
        await self.start_tunnel("http")
        await self.start_agent("a", ["llama3"])
        status, answer = await self.chat("llama3", key="good-key")
        self.assertEqual((status, answer["agent"]), (200, "a"))
        await wait_for(lambda: len(self.receiver.spans) >= 2)
        server, = [s for s in self.receiver.spans if s.kind == "server"]
        client, = [s for s in self.receiver.spans if s.kind == "client"]
        self.assertEqual(client.parent_span_id, server.span_id)
        self.assertEqual({k: server.attributes.get(k) for k in ("gen_ai.request.model", "rproxy.tunnel.agent",
                                                                 "rproxy.tunnel.key", "http.response.status_code")},
                         {"gen_ai.request.model": "llama3", "rproxy.tunnel.agent": "a", "rproxy.tunnel.key": "shared",
                          "http.response.status_code": 200})
        self.assertEqual(client.attributes["rproxy.tunnel.agent"], "a")

    @async_test
    async def test_tcp_mode_stream(self) -> None:
        await self.start_tunnel("tcp")
        await self.start_agent("a", [])
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await client.closed
        await wait_for(lambda: len(self.receiver.spans) >= 1)
        stream, = self.receiver.spans
        self.assertEqual((stream.name, stream.kind, stream.attributes["rproxy.tunnel.agent"]),
                         ("tunnel stream", "server", "a"))
        self.assertGreater(stream.attributes["rproxy.tunnel.bytes_out"], 0)


class TokenPoolTracingTests(ServiceMixin, TestCase):
    """
    A token pool's logins traced, and its requests' token wait.
    """

    timeout = 60
    upstream = tokenpool.TokenPoolE2ETests.upstream
    config = tokenpool.TokenPoolE2ETests.config

    @async_test
    async def test_logins_and_token_wait(self) -> None:
        """
        One span per login (the first logins included); a request's span
        says how long it waited for its token.
        """
        receiver = OTLPReceiver()
        site = Site(receiver)
        site.noisy = False
        collector = await listen(site)
        self.addCleanup(collector.stopListening)
        upstream, port = await self.upstream(2)
        data = self.config(port, 2)
        data["telemetry"] = {"otlp_endpoint": f"http://127.0.0.1:{collector.getHost().port}",
                             "schedule_delay": "20ms"}
        service = await self.start_service(data)
        pool = service.token_pools["dolphin"]
        await wait_for(lambda: pool.counts()["available"] == 2)
        client = await connect(service.port_of("db"))
        self.client_cleanup(client)
        status, _, _ = await tokenpool.http(client, "/q", "c1")
        self.assertEqual(status, 200)
        await wait_for(lambda: len([s for s in receiver.spans if s.name == "token login"]) == 2
                       and any(s.kind == "server" for s in receiver.spans))
        logins = sorted(s.attributes["rproxy.token.session"] for s in receiver.spans if s.name == "token login")
        self.assertEqual(logins, ["u0", "u1"])
        server, = [s for s in receiver.spans if s.kind == "server"]
        self.assertGreaterEqual(server.attributes["rproxy.token.wait"], 0)
        self.assertEqual(server.attributes["http.response.status_code"], 200)
