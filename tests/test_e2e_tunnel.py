"""
End-to-end tests of the reverse tunnel on loopback: the real server, real
agents (L{AgentService}) and real local services; a hand-driven fake agent
where a test needs to misbehave on purpose.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from rproxy.tunnel.wire import (
    REPLACED,
    Error,
    FrameDecoder,
    Heartbeat,
    Login,
    NewProxyConn,
    RequestNewProxyConn,
    encode,
)
from tests.support import (
    Client,
    ServiceMixin,
    async_test,
    collector_off,
    connect,
    left_for_collector,
    reactor,
    self_signed_pem,
    turn,
    wait_for,
)


class FakeAgent(Protocol):
    """
    Speaks the control protocol by hand and records what it receives.
    """

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.messages: list[Any] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.messages += self.decoder.feed(data)

    def send(self, message: Any) -> None:
        self.transport.write(encode(message))

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class TunnelTests(ServiceMixin, TestCase):
    timeout = 60

    async def start_tunnel(self, tls: bool = False, **tunnel: Any) -> Any:
        config: dict[str, Any] = {
            "name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
            "public": "tcp:0:interface=127.0.0.1", "open_timeout": "2s",
        }
        config.update(tunnel)
        if tls:
            pem = os.path.abspath(self.mktemp())
            self.ca = self.mktemp()
            with open(self.ca, "wb") as f:
                f.write(self_signed_pem(pem))
            config["tls"] = {"cert": pem, "key": pem}
        service = await self.start_service({
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [config],
        })
        self.tunnel = service.tunnels["gpu"]
        return service

    async def start_agent(self, name: str, agent_id: str | None = None, tls: bool = False,
                          **extra: Any) -> tuple[AgentService, Any]:
        factory, port = await self.backend(name)
        data: dict[str, Any] = {
            "server": {"control": f"127.0.0.1:{self.tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{self.tunnel.port_of('proxy')}"},
            "api_key": "good-key",
            "agent_id": agent_id or name,
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
            "reconnect": {"initial": "50ms", "max": "200ms"},
        }
        if tls:
            data["tls"] = {"ca": self.ca, "server_name": "localhost"}
        data.update(extra)
        agent = AgentService(parse_agent_config(data), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: agent.control is not None)
        return agent, factory

    async def fake_agent(self, agent_id: str = "fake", key: str = "good-key") -> FakeAgent:
        fake = FakeAgent()
        await connect(self.tunnel.port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id=agent_id, api_key=key))
        await wait_for(lambda: fake.messages or fake.lost)
        return fake

    async def public(self) -> Client:
        client = await connect(self.tunnel.port_of("public"))
        self.client_cleanup(client)
        return client

    @async_test
    async def test_bytes_both_ways(self) -> None:
        """A public client reaches the agent's local service and back."""
        await self.start_tunnel()
        await self.start_agent("a")
        client = await self.public()
        self.assertEqual(await client.read_until(b"\n"), b"a\n")
        client.transport.write(b"hello through the tunnel\n")
        self.assertEqual(await client.read_until(b"\n"), b"hello through the tunnel\n")
        self.assertEqual(self.tunnel.streams_opened, 1)

    @async_test
    async def test_closed_streams_need_no_cycle_collector(self) -> None:
        """
        A finished public/proxy pair (on the server) is freed when both ends
        are gone, not left as a cycle for Python's collector.
        """
        from rproxy.tunnel.server import ProxyProtocol, PublicProtocol

        await self.start_tunnel()
        await self.start_agent("a")
        collector_off(self)
        for _ in range(3):
            client = await self.public()
            self.assertEqual(await client.read_until(b"\n"), b"a\n")
            client.transport.loseConnection()
            await client.closed
        await wait_for(lambda: not self.tunnel.public_connections)
        await turn(delay=0.1)
        self.assertEqual(left_for_collector((PublicProtocol, ProxyProtocol)), [])

    @async_test
    async def test_bytes_both_ways_with_tls(self) -> None:
        """With tls on the tunnel, the agent verifies the server and streams flow."""
        await self.start_tunnel(tls=True)
        await self.start_agent("a", tls=True)
        client = await self.public()
        self.assertEqual(await client.read_until(b"\n"), b"a\n")
        client.transport.write(b"secret\n")
        self.assertEqual(await client.read_until(b"\n"), b"secret\n")

    @async_test
    async def test_tls_failure_is_logged(self) -> None:
        """
        An agent that does not trust the server's certificate logs why
        (as frpc does) instead of retrying in silence, and backs off.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        await self.start_tunnel(tls=True)
        other_ca = self.mktemp()
        with open(other_ca, "wb") as f:
            f.write(self_signed_pem(os.path.abspath(self.mktemp())))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{self.tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{self.tunnel.port_of('proxy')}"},
            "api_key": "good-key", "agent_id": "distrust", "tls": {"ca": other_ca, "server_name": "localhost"},
            "services": [{"name": "web", "local": "127.0.0.1:9"}],
            "reconnect": {"initial": "50ms", "max": "200ms"},
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)

        def tls_lines() -> list[str]:
            return [e["log_format"].format(**e) for e in events if "TLS with" in e.get("log_format", "")]

        await wait_for(lambda: agent.failed_logins >= 2)
        self.assertIn("certificate verify failed", tls_lines()[0])
        self.assertIn(f"127.0.0.1:{self.tunnel.port_of('control')}", tls_lines()[0])
        self.assertEqual(self.tunnel.registry.agents, {})

    @async_test
    async def test_many_clients_three_agents(self) -> None:
        """200 concurrent public connections through 3 agents all echo correctly."""
        await self.start_tunnel(algorithm="least-connections")
        for name in ("a", "b", "c"):
            await self.start_agent(name)
        clients = []
        for _ in range(200):
            clients.append(await self.public())

        async def exchange(i: int, client: Client) -> str:
            name = (await client.read_until(b"\n")).decode().strip()
            message = b"client %d\n" % i
            client.transport.write(message)
            self.assertEqual(await client.read_until(b"\n", timeout=30), message)
            return name

        names = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(exchange(i, c)) for i, c in enumerate(clients)]
        )
        counts = collections.Counter(names)
        self.assertEqual(set(counts), {"a", "b", "c"})
        self.assertTrue(min(counts.values()) >= 50, counts)
        self.assertEqual(self.tunnel.streams_opened, 200)

    @async_test
    async def test_kill_agent_mid_stream(self) -> None:
        """
        When an agent dies, its public clients see a close, its session and
        streams are gone, and the other agent keeps serving.
        """
        await self.start_tunnel(algorithm="round-robin")
        agent_a, _ = await self.start_agent("a")
        await self.start_agent("b")
        clients = {}
        for _ in range(4):
            client = await self.public()
            clients.setdefault((await client.read_until(b"\n")).strip().decode(), []).append(client)
        self.assertEqual(sorted(clients), ["a", "b"])
        # kill agent a: its control connection and data connections die
        await agent_a.stopService()
        for stream in list(agent_a.control.streams if agent_a.control else []):
            stream.proxy.transport.abortConnection()
        for client in clients["a"]:
            await client.closed
        await wait_for(lambda: "a" not in self.tunnel.registry.agents)
        for client in clients["b"]:
            client.transport.write(b"still\n")
            self.assertEqual(await client.read_until(b"\n"), b"still\n")
        fresh = await self.public()
        self.assertEqual(await fresh.read_until(b"\n"), b"b\n")
        self.assertEqual(self.tunnel.registry.pending, {})

    @async_test
    async def test_agent_reconnects(self) -> None:
        """An agent whose control connection drops logs in again by itself."""
        await self.start_tunnel()
        agent, _ = await self.start_agent("a")
        first = self.tunnel.registry.agents["a"]
        agent.control.transport.abortConnection()
        await wait_for(lambda: "a" in self.tunnel.registry.agents and self.tunnel.registry.agents["a"] is not first)
        client = await self.public()
        self.assertEqual(await client.read_until(b"\n"), b"a\n")

    @async_test
    async def test_same_id_replaces_stale_session(self) -> None:
        """A login with the id of a live session replaces it at once."""
        await self.start_tunnel()
        old = await self.fake_agent("gpu-01")
        self.assertEqual(old.messages[0].ok, True)
        new = await self.fake_agent("gpu-01")
        self.assertEqual(new.messages[0].ok, True)
        await wait_for(lambda: old.lost)
        server_side = self.tunnel.registry.agents["gpu-01"].control.transport
        self.assertEqual(server_side.getPeer().port, new.transport.getHost().port)

    @async_test
    async def test_replaced_agent_is_told_and_backs_off(self) -> None:
        """
        An agent replaced by another login with its agent_id (a cloned
        image's) is told so, counts it for its reconnect delay, and,
        logging in again, tells the other one the same way.
        """
        await self.start_tunnel()
        agent, _ = await self.start_agent("gpu-01")
        clone = await self.fake_agent("gpu-01")
        await wait_for(lambda: agent.replaced == 1)
        await wait_for(lambda: clone.lost)
        [told] = [m for m in clone.messages if isinstance(m, Error)]
        self.assertEqual(told.code, REPLACED)
        self.assertTrue(told.message.startswith("replaced by a new login of agent_id 'gpu-01' from 127.0.0.1:"),
                        told.message)

    @async_test
    async def test_invalid_key(self) -> None:
        """A wrong key gets ok=false and the connection is closed."""
        await self.start_tunnel()
        fake = await self.fake_agent("x", key="bad-key")
        await wait_for(lambda: fake.lost)
        self.assertEqual((fake.messages[0].ok, fake.messages[0].error), (False, "invalid api key"))
        self.assertEqual(self.tunnel.registry.agents, {})

    @async_test
    async def test_forged_replayed_and_late_proxy_conns(self) -> None:
        """
        A proxy connection is accepted only with a pending conn id and its
        secret, once: forged, wrong-secret and replayed frames are refused.
        """
        await self.start_tunnel(open_timeout="5s")
        fake = await self.fake_agent("f")
        client = await self.public()
        await wait_for(lambda: any(isinstance(m, RequestNewProxyConn) for m in fake.messages))
        request = [m for m in fake.messages if isinstance(m, RequestNewProxyConn)][0]

        async def proxy_conn(conn_id: str, secret: str, then: bytes = b"") -> Client:
            conn = await connect(self.tunnel.port_of("proxy"))
            self.client_cleanup(conn)
            conn.transport.write(encode(NewProxyConn(conn_id, secret)) + then)
            return conn

        forged = await proxy_conn("0" * 32, "guess")
        await forged.closed
        wrong = await proxy_conn(request.conn_id, "not-the-secret")
        await wrong.closed
        good = await proxy_conn(request.conn_id, request.secret, b"from agent\n")
        self.assertEqual(await client.read_until(b"\n"), b"from agent\n")
        client.transport.write(b"to agent\n")
        self.assertEqual(await good.read_until(b"\n"), b"to agent\n")
        replay = await proxy_conn(request.conn_id, request.secret)
        await replay.closed
        self.assertEqual(self.tunnel.proxy_refused, 3)
        self.assertFalse(good.lost)

    @async_test
    async def test_open_timeout_tries_next_agent(self) -> None:
        """An agent that never opens a stream is skipped after open_timeout."""
        await self.start_tunnel(open_timeout="200ms", algorithm="round-robin")
        await self.fake_agent("a-silent")
        await self.start_agent("b")
        for _ in range(2):
            client = await self.public()
            self.assertEqual(await client.read_until(b"\n"), b"b\n")
        self.assertEqual(self.tunnel.registry.agents["a-silent"].failed_total, 1)

    @async_test
    async def test_no_agent_closes_public(self) -> None:
        """With no agent logged in, a public client is closed at once."""
        await self.start_tunnel()
        client = await self.public()
        await client.closed
        self.assertEqual(self.tunnel.streams_failed, 1)

    @async_test
    async def test_missed_heartbeats(self) -> None:
        """An agent silent for heartbeat_timeout is dropped and disconnected."""
        await self.start_tunnel(heartbeat_timeout="300ms")
        fake = await self.fake_agent("quiet")
        self.assertIn("quiet", self.tunnel.registry.agents)
        await wait_for(lambda: fake.lost, timeout=5)
        self.assertNotIn("quiet", self.tunnel.registry.agents)

    @async_test
    async def test_heartbeats_keep_agent_and_report_stats(self) -> None:
        """A real agent's heartbeats keep it registered and carry its stats."""
        await self.start_tunnel(heartbeat_timeout="500ms")
        await self.start_agent("a")
        await turn(delay=1.0)
        session = self.tunnel.registry.agents["a"]
        self.assertIsNotNone(session.heartbeat)
        self.assertTrue(0 <= session.heartbeat.memory <= 100)
        self.assertTrue(session.system_info["cpus"] >= 1)

    @async_test
    async def test_malformed_frame_disturbs_no_one_else(self) -> None:
        """Garbage on one control connection closes it alone."""
        await self.start_tunnel()
        await self.start_agent("a")
        fake = await self.fake_agent("bad")
        fake.transport.write(b"\x00\x00\x00\x05hello")
        await wait_for(lambda: fake.lost)
        huge = await self.fake_agent("huge")
        huge.transport.write(b"\x7f\xff\xff\xff")
        await wait_for(lambda: huge.lost)
        self.assertEqual(sorted(self.tunnel.registry.agents), ["a"])
        client = await self.public()
        self.assertEqual(await client.read_until(b"\n"), b"a\n")

    @async_test
    async def test_pooled_connections(self) -> None:
        """
        With pool_count, the agent keeps connections open in advance; a
        public client is served from the pool (no request round trip) and
        the pool is refilled.
        """
        await self.start_tunnel()
        await self.start_agent("a", pool_count=3)
        session = self.tunnel.registry.agents["a"]
        await wait_for(lambda: len(session.idle) == 3)
        for i in range(5):
            client = await self.public()
            client.transport.write(b"early %d\n" % i)
            self.assertEqual(await client.read_until(b"\n"), b"a\n")
            self.assertEqual(await client.read_until(b"\n"), b"early %d\n" % i)
            client.transport.loseConnection()
            await client.closed
        self.assertEqual(self.tunnel.streams_from_pool, 5)
        await wait_for(lambda: len(session.idle) == 3)
        self.assertEqual(session.pool_pending, 0)

    @async_test
    async def test_pool_dies_with_agent(self) -> None:
        """An agent's idle pooled connections are closed when it is dropped."""
        await self.start_tunnel()
        agent, _ = await self.start_agent("a", pool_count=2)
        session = self.tunnel.registry.agents["a"]
        await wait_for(lambda: len(session.idle) == 2)
        idle = list(session.idle)
        await agent.stopService()
        await wait_for(lambda: all(p.lost for p in idle))
        self.assertEqual(session.idle, [])
        self.assertEqual(self.tunnel.registry.pending, {})

    @async_test
    async def test_heartbeat_message_updates_session(self) -> None:
        """Heartbeat fields land in the session the admin API shows."""
        await self.start_tunnel()
        fake = await self.fake_agent("hb")
        fake.send(Heartbeat(cpu=42.0, memory=50.0, disk=7.5, load=1.5, active_streams=0))
        await wait_for(lambda: self.tunnel.registry.agents["hb"].heartbeat is not None)
        [described] = self.tunnel.agents()
        self.assertEqual((described["id"], described["cpu"], described["disk"]), ("hb", 42.0, 7.5))




class TunnelAdminTests(ServiceMixin, TestCase):
    """
    The admin side of tunnels: /api/v1/agents, /api/v1/models, rproxyctl.
    """

    async def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        import json

        port = self.service.admin_port.getHost().port
        client = await connect(port)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        client.transport.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n".encode())
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    async def start_tunnel(self, tls: bool = False, **tunnel: Any) -> Any:
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "admin-secret"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        self.tunnel = self.service.tunnels["gpu"]
        return self.service

    @async_test
    async def test_agents_and_models_api(self) -> None:
        """The agents and models endpoints list live agents, behind the admin key."""
        await self.start_tunnel()
        fake = FakeAgent()
        await connect(self.tunnel.port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="gpu-01", api_key="good-key", models=("llama3", "qwen2")))
        fake.send(Heartbeat(cpu=45.0, memory=60.0, disk=30.0))
        await wait_for(lambda: "gpu-01" in self.tunnel.registry.agents
                       and self.tunnel.registry.agents["gpu-01"].heartbeat is not None)
        status, body = await self.get("/api/v1/agents")
        self.assertEqual((status, body), (401, {"error": "missing or invalid bearer token"}))
        status, body = await self.get("/api/v1/agents", "wrong")
        self.assertEqual(status, 401)
        status, body = await self.get("/api/v1/agents", "admin-secret")
        self.assertEqual(status, 200)
        [agent] = body["tunnels"][0]["agents"]
        self.assertEqual((agent["id"], agent["cpu"], agent["models"]), ("gpu-01", 45.0, ["llama3", "qwen2"]))
        status, body = await self.get("/api/v1/models", "admin-secret")
        self.assertEqual([m["id"] for m in body["data"]], ["llama3", "qwen2"])
        self.assertEqual(body["data"][0]["agents"], ["gpu/gpu-01"])

    @async_test
    async def test_monitor_prints_agent_table(self) -> None:
        """rproxyctl monitor prints the seed's agent table and exits 0."""
        import sys

        import yaml
        from twisted.internet.utils import getProcessOutputAndValue

        await self.start_tunnel()
        fake = FakeAgent()
        await connect(self.tunnel.port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="6e1131b4", api_key="good-key"))
        fake.send(Heartbeat(cpu=45.0, memory=60.0, disk=30.0))
        await wait_for(lambda: "6e1131b4" in self.tunnel.registry.agents
                       and self.tunnel.registry.agents["6e1131b4"].heartbeat is not None)
        path = os.path.abspath(self.mktemp())
        admin_port = self.service.admin_port.getHost().port
        with open(path, "w") as f:
            yaml.safe_dump({"admin": {"listen": f"tcp:{admin_port}:interface=127.0.0.1",
                                      "api_key": "admin-secret"}}, f)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "rproxy.cli", "monitor", "-c", path], env=dict(os.environ, PYTHONPATH=root),
            path=root, reactor=reactor,
        )
        self.assertEqual((code, err), (0, b""))
        lines = out.decode().splitlines()
        self.assertTrue(lines[0].startswith("Tunnel     Agent ID"), lines[0])
        self.assertRegex(lines[2], r"^gpu\s+6e1131b4\s+45\.00\s+60\.00\s+30\.00\s+0\s+\ds ago$")


class CertTests(TestCase):
    def test_cert_pair_loads(self) -> None:
        """rproxyctl cert writes a pair that Twisted loads and that names the host."""
        from twisted.internet import ssl

        from rproxy.cli import cert

        out = self.mktemp()
        self.assertEqual(cert("tunnel.example", out), 0)
        with open(os.path.join(out, "cert.pem"), "rb") as f:
            cert_pem = f.read()
        with open(os.path.join(out, "key.pem"), "rb") as f:
            key_pem = f.read()
        loaded = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
        self.assertEqual(loaded.getSubject().commonName, b"tunnel.example")
        self.assertEqual(os.stat(os.path.join(out, "key.pem")).st_mode & 0o777, 0o600)
