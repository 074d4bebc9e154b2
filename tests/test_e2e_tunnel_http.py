"""
End-to-end tests of a tunnel in C{mode: http}: model-aware routing, access
levels by bearer key, streaming, and agents reading their model list from
their local service; the real server, real agents and twisted.web local
services on loopback.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
import httptools
from prometheus_client import generate_latest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rproxy.config import config_from_mapping
from rproxy.tunnel.agent import AgentService, models_in
from rproxy.tunnel.config import parse_agent_config
from tests.support import Client, ServiceMixin, async_test, connect, listen, reactor, turn, wait_for


class LocalService(Resource):
    """
    What an agent exposes: /v1/models lists C{models}; /sse streams one
    event now and the next when the test says; anything else answers JSON
    naming the agent and echoing the Connection header and body size.
    """

    isLeaf = True

    def __init__(self, name: str, models: list[str]) -> None:
        super().__init__()
        self.name = name
        self.models = models
        self.streams: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/v1/models":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}).encode()
        if request.path == b"/sse":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: first\n\n")
            self.streams.append(request)
            return NOT_DONE_YET
        body = request.content.read()
        return json.dumps({
            "agent": self.name,
            "connection": (request.getHeader(b"connection") or b"").decode(),
            "body": len(body),
        }).encode()


class Recorder(Protocol):
    """
    A local service that keeps every byte it gets and answers each head
    with a small response, keeping the connection open (a keep-alive
    server that ignores Connection: close).
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.factory.received += data
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class RecorderFactory(Factory):
    protocol = Recorder
    noisy = False

    def __init__(self) -> None:
        self.connections: list[Recorder] = []
        self.received = b""


async def one_response(client: Client) -> bytes:
    """
    The bytes of the next complete response C{client} reads (head and
    body, de-chunked), or what it read before the connection closed.
    """
    parts: list[bytes] = []
    state = {"head": b"", "done": False, "offset": 0}

    class Callbacks:
        def on_body(self, body: bytes) -> None:
            parts.append(body)

        def on_message_complete(self) -> None:
            state["done"] = True

    parser = httptools.HttpResponseParser(Callbacks())

    def complete() -> bool:
        data = bytes(client.data)
        fresh = data[state["offset"]:]
        state["offset"] = len(data)
        if fresh and not state["done"]:
            try:
                parser.feed_data(fresh)
            except httptools.HttpParserError:
                state["done"] = True
        return state["done"] or client.lost

    await wait_for(complete)
    data = bytes(client.data)
    if not state["done"]:
        return data
    head = data.partition(b"\r\n\r\n")[0]
    return head + b"\r\n\r\n" + b"".join(parts)


class TunnelHTTPTests(ServiceMixin, TestCase):
    timeout = 60

    async def start_tunnel(self, **tunnel: Any) -> Any:
        config: dict[str, Any] = {
            "name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
            "public": "tcp:0:interface=127.0.0.1", "open_timeout": "2s", "mode": "http",
        }
        config.update(tunnel)
        self.data = {
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"},
                         {"key": "team-key", "level": 0, "name": "team"}],
            "tunnels": [config],
        }
        service = await self.start_service(self.data)
        self.tunnel = service.tunnels["gpu"]
        return service

    async def start_agent(self, name: str, models: list[str], key: str = "good-key",
                          **extra: Any) -> tuple[AgentService, LocalService]:
        local = LocalService(name, models)
        site = Site(local)
        site.noisy = False
        port = await listen(site)
        self.addCleanup(port.stopListening)
        data: dict[str, Any] = {
            "server": {"control": f"127.0.0.1:{self.tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{self.tunnel.port_of('proxy')}"},
            "api_key": key,
            "agent_id": name,
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
            "reconnect": {"initial": "50ms", "max": "200ms"},
            "models": models,
        }
        data.update(extra)
        if "models_from" in data:
            data["models_from"] = data["models_from"].format(port=port.getHost().port)
            del data["models"]
        agent = AgentService(parse_agent_config(data), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: agent.control is not None and name in self.tunnel.registry.agents)
        return agent, local

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """
        Send C{raw} on a new public connection; read one response (the
        connection may stay open: keep-alive), then close.
        """
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(raw)  # type: ignore[attr-defined]
        data = await one_response(client)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    async def chat(self, model: str | None, key: str | None = None, header: bool = False) -> tuple[int, Any]:
        body = json.dumps({"model": model, "messages": []} if model and not header else {"messages": []}).encode()
        extra = f"Authorization: Bearer {key}\r\n" if key else ""
        if header and model:
            extra += f"X-Model: {model}\r\n"
        status, _, answer = await self.request(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\n"
            + extra.encode() + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        return status, json.loads(answer)

    @async_test
    async def test_model_routing(self) -> None:
        """
        A JSON body's model field or an X-Model header picks among the
        agents serving that model; no model: any agent; an unknown model:
        404 JSON.  No request reaches the agent with Connection: close
        (the data connections are kept alive).
        """
        await self.start_tunnel()
        await self.start_agent("a", ["llama3"])
        await self.start_agent("b", ["qwen2", "mistral"])
        for _ in range(3):
            status, answer = await self.chat("qwen2")
            self.assertEqual((status, answer["agent"]), (200, "b"))
            status, answer = await self.chat("llama3")
            self.assertEqual((status, answer["agent"]), (200, "a"))
            status, answer = await self.chat("mistral", header=True)
            self.assertEqual((status, answer["agent"]), (200, "b"))
        self.assertEqual(answer["connection"], "")
        seen = set()
        for _ in range(12):
            status, answer = await self.chat(None)
            seen.add(answer["agent"])
        self.assertEqual(seen, {"a", "b"})
        status, answer = await self.chat("gpt-9")
        self.assertEqual(status, 404)
        self.assertEqual(answer, {"error": {"message": "model 'gpt-9' is not served by any agent",
                                            "type": "invalid_request_error", "code": "model_not_found"}})

    @async_test
    async def test_access_log_and_metrics(self) -> None:
        """
        A mode http tunnel's access log names the agent and the model of
        each request, logs a request the reader refused, and goes on in a
        new file when the service reopens its logs (SIGUSR1); /metrics
        counts requests per agent and model.
        """
        path = self.mktemp()
        service = await self.start_tunnel(access_log={"format": "json", "path": path})
        await self.start_agent("a", ["llama3"])
        self.assertEqual((await self.chat("llama3"))[0], 200)
        status, _, _ = await self.request(b"GET / HTTP/1.1\r\nHost: gpu\r\nBad Header: 1\r\n\r\n")
        self.assertEqual(status, 400)
        await turn()
        with open(path) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual([(r["status"], r["agent"], r["model"], r["method"]) for r in records],
                         [(200, "a", "llama3", "POST"), (400, None, None, "GET")])
        os.rename(path, path + ".1")
        service.reopen_logs()
        self.assertEqual((await self.chat(None))[0], 200)
        await turn()
        with open(path) as f:
            self.assertEqual([(r["agent"], r["model"]) for r in map(json.loads, f)], [("a", None)])
        metrics = generate_latest(service.registry).decode().splitlines()
        self.assertIn('rproxy_tunnel_http_requests_total{agent="a",class="2xx",model="llama3",tunnel="gpu"} 1.0',
                      metrics)
        self.assertIn('rproxy_tunnel_http_requests_total{agent="a",class="2xx",model="-",tunnel="gpu"} 1.0',
                      metrics)

    @async_test
    async def test_keep_alive_across_agents(self) -> None:
        """
        One client connection carries requests that go to different agents
        by model; it stays open throughout, and each agent's data
        connection is reused for its requests (two opened for twelve).
        """
        await self.start_tunnel()
        await self.start_agent("a", ["llama3"])
        await self.start_agent("b", ["qwen2"])
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        for i in range(6):
            for model, agent in (("qwen2", "b"), ("llama3", "a")):
                body = json.dumps({"model": model, "messages": [], "n": i}).encode()
                client.transport.write(  # type: ignore[attr-defined]
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                data = await one_response(client)
                del client.data[:]
                head, _, answer = data.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
                self.assertNotIn(b"Connection: close", head)
                self.assertEqual(json.loads(answer)["agent"], agent)
        self.assertFalse(client.lost)
        self.assertEqual(self.tunnel.streams_opened, 2)
        self.assertEqual(len(self.tunnel.http.connections), 1)

    @async_test
    async def test_refused_local_service_tries_the_next_agent(self) -> None:
        """
        An agent whose local service refuses reports it at once and the
        request goes to the next agent serving the model, long before
        open_timeout.
        """
        await self.start_tunnel(open_timeout="20s")
        dead, _ = await self.start_agent("a", ["llama3"])
        await self.start_agent("b", ["llama3"])
        closed = await listen(Factory.forProtocol(Protocol))
        dead_port = closed.getHost().port
        await closed.stopListening()
        dead.config = attrs.evolve(dead.config, services=(attrs.evolve(dead.config.services[0], port=dead_port),))
        started = reactor.seconds()
        for _ in range(4):
            status, answer = await self.chat("llama3")
            self.assertEqual((status, answer["agent"]), (200, "b"))
        self.assertLess(reactor.seconds() - started, 5.0)

    @async_test
    async def test_pooled_refusal_tries_the_next_agent(self) -> None:
        """
        With pool_count, an agent whose local service refuses says so on
        the pooled connection before the request is sent, and the request
        (a POST too) goes to the next agent: every one is answered.
        """
        await self.start_tunnel(open_timeout="20s")
        dead, _ = await self.start_agent("a", ["llama3"], pool_count=2)
        await self.start_agent("b", ["llama3"])
        await wait_for(lambda: len(self.tunnel.registry.agents["a"].idle) == 2)
        closed = await listen(Factory.forProtocol(Protocol))
        dead_port = closed.getHost().port
        await closed.stopListening()
        dead.config = attrs.evolve(dead.config, services=(attrs.evolve(dead.config.services[0], port=dead_port),))
        answers = [await self.chat("llama3", header=True) for _ in range(6)]
        self.assertEqual([(status, answer.get("agent")) for status, answer in answers], [(200, "b")] * 6)
        self.assertGreater(self.tunnel.streams_from_pool, 0)

    @async_test
    async def test_lenient_models_and_no_agent(self) -> None:
        """
        strict_models: false sends an unknown model to any agent (the
        seed's fallback); with no agent at all the answer is 503 JSON with
        Retry-After.
        """
        await self.start_tunnel(strict_models=False)
        status, headers, body = await self.request(b"GET / HTTP/1.1\r\nHost: gpu\r\n\r\n")
        self.assertEqual((status, headers["retry-after"]), (503, "1"))
        self.assertEqual(json.loads(body), {"error": {"message": "no agent is connected", "type": "server_error",
                                                      "code": "service_unavailable"}})
        await self.start_agent("a", ["llama3"])
        status, answer = await self.chat("gpt-9")
        self.assertEqual((status, answer["agent"]), (200, "a"))

    @async_test
    async def test_least_outstanding_first(self) -> None:
        """
        Among agents serving a model the one with the fewest open streams
        is chosen.
        """
        await self.start_tunnel()
        await self.start_agent("a", ["llama3"])
        await self.start_agent("b", ["llama3"])
        stream = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(stream)
        stream.transport.write(b"GET /sse HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\n\r\n")  # type: ignore[attr-defined]
        await stream.read_until(b"data: first\n\n")
        busy = next(a for a in self.tunnel.registry.agents.values() if a.streams)
        for _ in range(4):
            status, answer = await self.chat("llama3")
            self.assertEqual(status, 200)
            self.assertNotEqual(answer["agent"], busy.agent_id)

    @async_test
    async def test_event_stream_is_not_buffered(self) -> None:
        """
        Server-sent events reach the client as the service writes them.
        """
        await self.start_tunnel()
        _, local = await self.start_agent("a", ["llama3"])
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        body = b'{"model": "llama3", "stream": true}'
        client.transport.write(  # type: ignore[attr-defined]
            b"POST /sse HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
        await client.read_until(b"data: first\n\n")
        self.assertEqual(len(local.streams), 1)
        local.streams[0].write(b"data: second\n\n")
        await client.read_until(b"data: second\n\n")
        local.streams[0].finish()
        await client.closed

    async def open_sse(self) -> Any:
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(b"GET /sse HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\n\r\n")  # type: ignore[attr-defined]
        await client.read_until(b"data: first\n\n")
        return client

    @async_test
    async def test_event_stream_survives_drain(self) -> None:
        """
        On stop (SIGTERM) the public port refuses new connections at once
        while an open event stream goes on and finishes within the grace
        period; the stop completes when it has.
        """
        service = await self.start_tunnel()
        _, local = await self.start_agent("a", ["llama3"])
        port = self.tunnel.port_of("public")
        client = await self.open_sse()
        started = reactor.seconds()
        stopping = service.stopService()
        await wait_for(lambda: "public" not in self.tunnel.ports)
        with self.assertRaises(ConnectionRefusedError):
            await connect(port)
        await turn(delay=0.5)  # past the moment the stream used to be cut
        local.streams[0].write(b"data: second\n\n")
        await client.read_until(b"data: second\n\n")
        self.assertNoResult(stopping)
        local.streams[0].write(b"data: [DONE]\n\n")
        local.streams[0].finish()
        await client.closed
        self.assertIn(b"data: [DONE]", bytes(client.data))
        await stopping
        self.assertLess(reactor.seconds() - started, 2.0)  # the grace period: not waited out

    @async_test
    async def test_reload_changes_tunnel_in_place(self) -> None:
        """
        A reload that changes a tunnel's keys and limits (ports unchanged)
        keeps the agent logged in and an open stream flowing; the new
        settings apply to the next requests.
        """
        service = await self.start_tunnel()
        _, local = await self.start_agent("a", ["llama3"])
        session = self.tunnel.registry.agents["a"]
        ports = {role: self.tunnel.port_of(role) for role in ("control", "proxy", "public")}
        client = await self.open_sse()
        data = dict(self.data, admin={"listen": "tcp:0:interface=127.0.0.1"}, **{"global": {"grace_period": "2s"}})
        data["tunnels"] = [dict(data["tunnels"][0], strict_models=False, open_timeout="3s",
                                algorithm="least-connections", heartbeat_timeout="20s", max_pending=10)]
        await service.reload(config_from_mapping(data))
        self.assertIs(service.tunnels["gpu"], self.tunnel)
        self.assertIs(self.tunnel.registry.agents["a"], session)
        self.assertEqual({role: self.tunnel.port_of(role) for role in ports}, ports)
        self.assertEqual((self.tunnel.config.open_timeout, self.tunnel.registry.max_pending), (3.0, 10))
        local.streams[0].write(b"data: second\n\n")
        await client.read_until(b"data: second\n\n")
        status, answer = await self.chat("gpt-9")  # strict_models is off now
        self.assertEqual((status, answer["agent"]), (200, "a"))
        local.streams[0].finish()
        await client.closed

    @async_test
    async def test_reload_moves_public_port_only(self) -> None:
        """
        A reload that moves the public port listens on the new address and
        closes the old one, while the agent stays logged in, the control
        and proxy ports stay, and a stream opened on the old port goes on.
        """
        service = await self.start_tunnel()
        _, local = await self.start_agent("a", ["llama3"])
        session = self.tunnel.registry.agents["a"]
        old_public = self.tunnel.port_of("public")
        kept = {role: self.tunnel.port_of(role) for role in ("control", "proxy")}
        client = await self.open_sse()
        data = dict(self.data, admin={"listen": "tcp:0:interface=127.0.0.1"}, **{"global": {"grace_period": "2s"}})
        data["tunnels"] = [dict(data["tunnels"][0], public="tcp:0:interface=127.0.0.2")]
        await service.reload(config_from_mapping(data))
        self.assertEqual({role: self.tunnel.port_of(role) for role in kept}, kept)
        self.assertEqual(self.tunnel.ports["public"].getHost().host, "127.0.0.2")
        with self.assertRaises(ConnectionRefusedError):
            await connect(old_public)
        self.assertIs(self.tunnel.registry.agents["a"], session)
        local.streams[0].write(b"data: second\n\n")
        await client.read_until(b"data: second\n\n")
        local.streams[0].finish()
        await client.closed
        fresh = Client()
        factory = Factory.forProtocol(lambda: fresh)
        await TCP4ClientEndpoint(reactor, "127.0.0.2", self.tunnel.port_of("public")).connect(factory)
        self.client_cleanup(fresh)
        # (X-Model: the agent's own list, not the tunnel's)
        fresh.transport.write(b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\n\r\n")  # type: ignore[attr-defined]
        await fresh.closed
        self.assertIn(b'"id": "llama3", "object": "model"}', bytes(fresh.data))

    @async_test
    async def test_access_levels(self) -> None:
        """
        A dedicated key (level >= 0) reaches only the agents logged in with
        it; requests without it never reach those agents; a shared key's
        requests are recorded as events; a dedicated key with no agent
        online gets 503.
        """
        await self.start_tunnel()
        events: list[tuple[str, dict[str, Any]]] = []

        class Sink:
            def emit(self, stream: str, fields: dict[str, Any]) -> None:
                events.append((stream, fields))

        self.tunnel.events = Sink()
        status, answer = await self.chat("llama3", key="team-key")
        self.assertEqual((status, answer["error"]["code"]), (503, "service_unavailable"))  # no agent of that key yet
        await self.start_agent("shared", ["llama3"])
        status, _, body = await self.request(b"GET / HTTP/1.1\r\nHost: gpu\r\nAuthorization: Bearer team-key\r\n\r\n")
        self.assertEqual(status, 503)
        await self.start_agent("team", ["llama3"], key="team-key")
        for _ in range(4):
            self.assertEqual((await self.chat("llama3", key="team-key"))[1]["agent"], "team")
            self.assertEqual((await self.chat("llama3"))[1]["agent"], "shared")
            self.assertEqual((await self.chat("llama3", key="good-key"))[1]["agent"], "shared")
            self.assertEqual((await self.chat("llama3", key="unknown"))[1]["agent"], "shared")
        requests = [fields for stream, fields in events if stream == "request-message"]
        self.assertEqual(len(requests), 4)  # the shared key's, not the anonymous or dedicated ones
        fields = requests[0]
        self.assertEqual((fields["key"], fields["agent_id"], fields["model"], fields["method"], fields["target"]),
                         ("shared", "shared", "llama3", "POST", "/v1/chat/completions"))

    @async_test
    async def test_bad_requests(self) -> None:
        """
        A malformed request head gets 400 and never reaches an agent; a
        head that does not arrive within header_timeout gets 408.
        """
        await self.start_tunnel(header_timeout="300ms")
        agent, _ = await self.start_agent("a", ["llama3"])
        status, _, body = await self.request(
            b"POST / HTTP/1.1\r\nHost: gpu\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(status, 400)
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost:")  # type: ignore[attr-defined]
        await client.closed
        self.assertIn(b"408", bytes(client.data))
        self.assertEqual(self.tunnel.streams_opened, 0)

    @async_test
    async def test_models_from_the_local_service(self) -> None:
        """
        models_from: the agent reads its models from the service's
        /v1/models and tells the server when the list changes.
        """
        await self.start_tunnel()
        agent, local = await self.start_agent("a", ["llama3"], models_from="http://127.0.0.1:{port}/v1/models")
        session = self.tunnel.registry.agents["a"]
        await wait_for(lambda: session.models == ("llama3",))
        local.models = ["llama3", "qwen2"]
        await wait_for(lambda: session.models == ("llama3", "qwen2"))
        status, answer = await self.chat("qwen2")
        self.assertEqual((status, answer["agent"]), (200, "a"))
        self.assertEqual(agent.models, ("llama3", "qwen2"))

    # -- the policy filters of HTTP frontends on the public port: rate limits
    # per user key (shared and dedicated keys alike) and allow/deny

    async def post(self, key: str) -> tuple[int, dict[str, str], bytes]:
        body = b'{"model": "llama3", "messages": []}'
        return await self.request(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    @async_test
    async def test_rate_limit_per_key(self) -> None:
        """
        Each key has its own bucket: the third request of one key is 429
        (an OpenAI-shaped error, as rproxy's others there), another key
        goes on.
        """
        await self.start_tunnel(rate_limit={"key": "api_key", "rate": "2/m", "burst": 2})
        await self.start_agent("a", ["llama3"])
        await self.start_agent("t", ["llama3"], key="team-key")
        self.assertEqual([(await self.post("good-key"))[0] for _ in range(2)], [200, 200])
        status, headers, body = await self.post("good-key")
        self.assertEqual((status, headers["retry-after"]), (429, "30"))
        self.assertEqual(json.loads(body), {"error": {"message": "rate limit 'api_key' exceeded: retry after 30 s",
                                                      "type": "requests", "code": "rate_limit_exceeded"}})
        self.assertEqual((await self.post("team-key"))[0], 200)

    @async_test
    async def test_deny(self) -> None:
        """A denied client gets 403 before any agent is asked."""
        await self.start_tunnel(deny=["127.0.0.0/8"])
        await self.start_agent("a", ["llama3"])
        status, _, _ = await self.post("good-key")
        self.assertEqual(status, 403)
        self.assertEqual(self.tunnel.streams_opened, 0)


class OneRequestTests(ServiceMixin, TestCase):
    """
    mode http forwards each request rebuilt from what the strict reader
    parsed, and reads bodies up to model_body_limit for their model.
    """

    timeout = 60
    start_tunnel = TunnelHTTPTests.start_tunnel
    start_agent = TunnelHTTPTests.start_agent
    request = TunnelHTTPTests.request

    async def recorder_agent(self, models: list[str]) -> RecorderFactory:
        factory = RecorderFactory()
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        data: dict[str, Any] = {
            "server": {"control": f"127.0.0.1:{self.tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{self.tunnel.port_of('proxy')}"},
            "api_key": "good-key", "agent_id": "rec", "models": models,
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
        }
        agent = AgentService(parse_agent_config(data), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: "rec" in self.tunnel.registry.agents)
        return factory

    @async_test
    async def test_smuggled_request_never_reaches_the_service(self) -> None:
        """
        A second request behind the first, with both Content-Length and
        Transfer-Encoding, never reaches the service: the strict reader
        refuses it (400) and the connection ends; a later request on a
        new connection is served with keep-alive.
        """
        await self.start_tunnel()
        service = await self.recorder_agent(["llama3"])
        smuggled = (b"POST /smuggled HTTP/1.1\r\nHost: gpu\r\nContent-Length: 4\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: gpu\r\n\r\n")
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(b"POST /first HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\nContent-Length: 5\r\n"
                               b"Connection: keep-alive\r\n\r\nhello" + smuggled)
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n")[0], b"HTTP/1.1 400 Bad Request")
        self.assertNotIn(b"/smuggled", service.received)
        self.assertNotIn(b"/admin", service.received)
        status, headers, body = await self.request(
            b"POST /first HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\nContent-Length: 5\r\n"
            b"Connection: keep-alive\r\n\r\nhello")
        self.assertEqual((status, body, headers.get("connection")), (200, b"ok", None))
        self.assertEqual(service.received, b"POST /first HTTP/1.1\r\nHost: gpu\r\nX-Model: llama3\r\n"
                                           b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
                                           b"X-Forwarded-Host: gpu\r\nVia: 1.1 rproxy\r\n"
                                           b"Content-Length: 5\r\n\r\nhello")

    @async_test
    async def test_chunked_body_is_rechunked_and_ends(self) -> None:
        """
        A chunked request reaches the service as the chunks the reader
        parsed and its last chunk (not its extensions or trailer); the
        next request on the connection follows on the same data connection.
        """
        await self.start_tunnel()
        service = await self.recorder_agent(["llama3"])
        body = b'{"model": "llama3"}'
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        client.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + b"%x;ext=1\r\n%s\r\n0\r\nTrailer: x\r\n\r\n" % (len(body), body))
        await one_response(client)
        self.assertEqual(service.received.partition(b"\r\n\r\n")[2], b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        client.transport.write(b"GET /next HTTP/1.1\r\nHost: gpu\r\n\r\n")
        await wait_for(lambda: b"/next" in service.received)
        self.assertEqual(len(service.connections), 1)

    @async_test
    async def test_model_after_long_messages(self) -> None:
        """
        A body of 40 KiB whose model comes after the messages (as the
        OpenAI SDK writes it) is routed by that model, whatever its
        Content-Type; past model_body_limit the answer is 413.
        """
        await self.start_tunnel(model_body_limit="48k")
        await self.start_agent("a", ["llama3"])
        await self.start_agent("b", ["qwen2"])
        for content_type in (b"application/json", b"text/plain", None):
            for model, agent in (("qwen2", "b"), ("llama3", "a")):
                body = json.dumps({"messages": [{"role": "user", "content": "x" * 40000}], "model": model}).encode()
                type_field = b"Content-Type: " + content_type + b"\r\n" if content_type else b""
                status, _, answer = await self.request(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\n" + type_field
                    + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                self.assertEqual((status, json.loads(answer)["agent"], json.loads(answer)["body"]),
                                 (200, agent, len(body)))
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 50000}], "model": "qwen2"}).encode()
        status, _, answer = await self.request(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(answer)["error"]["code"], "request_too_large")
        self.assertEqual(self.tunnel.streams_opened, 2)  # one data connection per agent, kept alive

    @async_test
    async def test_unknown_model_in_long_body_is_refused(self) -> None:
        """With strict models, an unknown model after 40 KiB of messages gets 404."""
        await self.start_tunnel(model_body_limit="48k")
        await self.start_agent("a", ["llama3"])
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 40000}], "model": "gpt-9"}).encode()
        status, _, answer = await self.request(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(answer)["error"]["message"], "model 'gpt-9' is not served by any agent")

    @async_test
    async def test_refused_local_service_gets_502_at_once(self) -> None:
        """
        When the agent's local service refuses, the client gets 502 with
        the agent's reason well before open_timeout.
        """
        await self.start_tunnel(open_timeout="20s")
        agent, _ = await self.start_agent("a", ["llama3"])
        closed = await listen(Factory.forProtocol(Protocol))
        dead_port = closed.getHost().port
        await closed.stopListening()
        agent.config = attrs.evolve(agent.config, services=(attrs.evolve(agent.config.services[0], port=dead_port),))
        started = reactor.seconds()
        status, _, answer = await self.request(b"GET /v1/files HTTP/1.1\r\nHost: gpu\r\n\r\n")
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(answer)["error"]["message"], "agent a: local service web unreachable")
        self.assertLess(reactor.seconds() - started, 5.0)


    @async_test
    async def test_pooled_stream_to_refusing_service_gets_502(self) -> None:
        """
        A pooled stream whose local service refuses ends with a 502 the
        client can read, not a bare close.
        """
        await self.start_tunnel()
        agent, _ = await self.start_agent("a", ["llama3"], pool_count=1)
        await wait_for(lambda: len(self.tunnel.registry.agents["a"].idle) == 1)
        closed = await listen(Factory.forProtocol(Protocol))
        dead_port = closed.getHost().port
        await closed.stopListening()
        agent.config = attrs.evolve(agent.config, services=(attrs.evolve(agent.config.services[0], port=dead_port),))
        status, _, answer = await self.request(b"GET /v1/files HTTP/1.1\r\nHost: gpu\r\n\r\n")
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(answer)["error"]["code"], "bad_gateway")
        self.assertEqual(self.tunnel.streams_from_pool, 1)


class ModelListTests(TestCase):
    def test_shapes(self) -> None:
        """
        OpenAI's and Ollama's list shapes; junk names are skipped; other
        documents are errors.
        """
        self.assertEqual(models_in(b'{"data": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": "x y"}, 5]}'),
                         ("a", "b"))
        self.assertEqual(models_in(b'{"models": [{"name": "llama3:8b"}]}'), ("llama3:8b",))
        for bad in (b"[]", b'{"data": 1}', b"nope"):
            self.assertRaises(ValueError, models_in, bad)



class TunnelPolicyConfigTests(TestCase):
    def test_mode_tcp_refuses_http_policy(self) -> None:
        """rate_limit and allow/deny on a mode tcp tunnel name their key path."""
        from rproxy.config import ConfigError, config_from_mapping

        with self.assertRaises(ConfigError) as caught:
            config_from_mapping({"admin": {"listen": None}, "tunnels": [
                {"name": "t", "mode": "tcp", "rate_limit": {"key": "ip", "rate": "1/s"}, "deny": ["10.0.0.0/8"]}]})
        self.assertIn("tunnels[0].rate_limit: applies to mode: http only", str(caught.exception))
        self.assertIn("tunnels[0].deny: applies to mode: http only", str(caught.exception))
