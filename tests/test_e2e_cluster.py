"""
End-to-end tests of a cluster: three rproxy services (in-process, ports
0) sharing agents through the harness's real Redis, real agents and real
local services.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutput
from twisted.trial.unittest import TestCase

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests.servers import RedisServer
from tests.support import Client, ServiceMixin, async_test, connect, reactor, wait_for
from tests.test_servers import started

INTERVAL, TIMEOUT = 0.1, 0.5


class ClusterTests(ServiceMixin, TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.redis: Any = started(RedisServer)
        self.addCleanup(self.redis.close)
        self.nodes: dict[str, Any] = {}

    async def start_node(self, node_id: str) -> Any:
        service = await self.start_service({
            "global": {"grace_period": "300ms"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [{
                "name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
                "public": "tcp:0:interface=127.0.0.1", "open_timeout": "2s", "algorithm": "least-connections",
            }],
            "stores": {"redis": {"url": self.redis.url}},
            "cluster": {"node_id": node_id, "advertise": {"proxy": "127.0.0.1:0"},
                        "heartbeat_interval": f"{int(INTERVAL * 1000)}ms",
                        "heartbeat_timeout": f"{int(TIMEOUT * 1000)}ms"},
        })
        self.nodes[node_id] = service
        return service

    def tunnel(self, node_id: str) -> Any:
        return self.nodes[node_id].tunnels["gpu"]

    async def start_agent(self, name: str, nodes: list[str], models: list[str]) -> AgentService:
        factory, port = await self.backend(name)
        data: dict[str, Any] = {
            "server": [{"control": f"127.0.0.1:{self.tunnel(n).port_of('control')}",
                        "proxy": f"127.0.0.1:{self.tunnel(n).port_of('proxy')}"} for n in nodes],
            "api_key": "good-key",
            "agent_id": name,
            "models": models,
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
            "reconnect": {"initial": "50ms", "max": "200ms"},
        }
        agent = AgentService(parse_agent_config(data), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: agent.control is not None)
        return agent

    async def public(self, node_id: str) -> Client:
        client = await connect(self.tunnel(node_id).port_of("public"))
        self.client_cleanup(client)
        return client

    async def three_nodes(self) -> None:
        for node_id in ("a", "b", "c"):
            await self.start_node(node_id)
        await self.start_agent("a1", ["a", "c"], ["llama"])
        await self.start_agent("c1", ["c", "a"], ["qwen"])
        await wait_for(lambda: set(self.tunnel("b").registry.remote) == {"a1", "c1"})

    async def greeting(self, node_id: str) -> tuple[Client, bytes]:
        client = await self.public(node_id)
        return client, await client.read_until(b"\n")

    async def crash(self, node_id: str) -> None:
        """
        Node C{node_id} dies at once: no goodbye in Redis, its listeners
        and every connection it holds cut.
        """
        service = self.nodes[node_id]
        cluster = service.cluster
        cluster._stopped = True
        if cluster._timer is not None and cluster._timer.active():
            cluster._timer.cancel()
        await cluster.subscriber.stopService()
        tunnel = service.tunnels["gpu"]
        for port in list(tunnel.ports.values()):
            await port.stopListening()
        tunnel.ports.clear()
        for session in list(tunnel.registry.agents.values()):
            session.control.transport.abortConnection()
        for public in list(tunnel.public_connections):
            public.abort()

    def traffic(self, node_id: str, figures: dict[str, Any]) -> Any:
        """
        New streams on C{node_id}, one after the other until
        C{figures["stop"]}: each greets and echoes; counted in C{figures}.
        """
        async def loop() -> None:
            while not figures.get("stop"):
                try:
                    client = await connect(self.tunnel(node_id).port_of("public"))
                    greeting = await client.read_until(b"\n", timeout=5)
                    client.transport.write(b"ping\n")
                    await client.read_until(b"ping\n", timeout=5)
                    client.transport.abortConnection()
                    figures.setdefault("agents", set()).add(greeting.strip().decode())
                    figures["ok"] = figures.get("ok", 0) + 1
                except Exception as e:  # noqa: BLE001 - counted
                    figures["failed"] = figures.get("failed", 0) + 1
                    figures.setdefault("why", []).append(repr(e))
                await deferLater(reactor, 0.02, lambda: None)

        return defer.Deferred.fromCoroutine(loop())

    @async_test
    async def test_crash_a_node_under_traffic(self) -> None:
        """
        Node a crashes (no goodbye) while users on b open streams one after
        another: the stream spliced on a is lost, b's stream through a's
        agent goes on, no new stream on b fails (an open asked of the dead
        node is refused at once and goes to the next agent), and a's agent
        is served again from c.
        """
        await self.three_nodes()
        on_a, _ = await self.greeting("a")
        held = [await self.greeting("b") for _ in range(2)]
        through_a1 = [c for c, h in held if h == b"a1\n"][0]
        figures: dict[str, Any] = {}
        running = self.traffic("b", figures)
        await wait_for(lambda: figures.get("ok", 0) >= 5)
        crashed = time.monotonic()
        await self.crash("a")
        await wait_for(lambda: on_a.lost, timeout=5)
        await wait_for(lambda: getattr(self.tunnel("b").registry.remote.get("a1"), "node", None) == "c", timeout=5)
        moved = time.monotonic() - crashed
        served = figures.get("ok", 0)
        await wait_for(lambda: figures.get("ok", 0) >= served + 10)
        figures["stop"] = True
        await running
        self.assertEqual(figures.get("failed", 0), 0, figures.get("why"))
        self.assertEqual(figures["agents"], {"a1", "c1"})
        self.assertLess(moved, TIMEOUT + 1.0)
        through_a1.transport.write(b"still here\n")
        self.assertEqual(await through_a1.read_until(b"\n"), b"still here\n")

    @async_test
    async def test_users_on_a_third_node_reach_both_agents(self) -> None:
        """
        Two agents logged in to nodes a and c; users on b (which has no
        agent) reach both, least loaded first, and bytes go both ways.
        """
        await self.three_nodes()
        first, hello1 = await self.greeting("b")
        second, hello2 = await self.greeting("b")
        self.assertEqual({hello1, hello2}, {b"a1\n", b"c1\n"})
        for client in (first, second):
            client.transport.write(b"across nodes\n")
            self.assertEqual(await client.read_until(b"\n"), b"across nodes\n")
        b = self.tunnel("b")
        self.assertEqual(b.streams_opened, 2)
        self.assertEqual(self.nodes["b"].cluster.asked, 2)
        self.assertEqual(self.nodes["a"].cluster.served + self.nodes["c"].cluster.served, 2)
        # the agents table of any node shows the whole cluster
        agents = {a["id"]: a for a in b.agents()}
        self.assertEqual({i: (a["node"], a["models"]) for i, a in agents.items()},
                         {"a1": ("a", ["llama"]), "c1": ("c", ["qwen"])})
        health = self.nodes["b"].health_detail()["cluster"]
        self.assertEqual((health["node_id"], health["state"], health["nodes"]), ("b", "up", ["a", "b", "c"]))
        # the admin API of node b, with curl
        admin = self.nodes["b"].admin_port.getHost().port
        out = await getProcessOutput("curl", ["-s", f"http://127.0.0.1:{admin}/api/v1/agents"])
        listed = json.loads(out)["tunnels"][0]["agents"]
        self.assertEqual([(a["id"], a["node"]) for a in listed], [("a1", "a"), ("c1", "c")])
        out = await getProcessOutput("curl", ["-s", f"http://127.0.0.1:{admin}/api/v1/models"])
        self.assertEqual([(m["id"], m["agents"]) for m in json.loads(out)["data"]],
                         [("llama", ["gpu/a1"]), ("qwen", ["gpu/c1"])])
        out = await getProcessOutput("curl", ["-s", f"http://127.0.0.1:{admin}/health"])
        self.assertEqual(json.loads(out)["cluster"]["cross_node"], "on")
        out = (await getProcessOutput("curl", ["-s", f"http://127.0.0.1:{admin}/metrics"])).decode()
        for line in ('rproxy_tunnel_remote_agents{tunnel="gpu"} 2.0', "rproxy_cluster_up 1.0",
                     'rproxy_tunnel_streams_active{tunnel="gpu"} 2.0'):
            self.assertIn(line, out.splitlines())

    @async_test
    async def test_session_replaced_across_nodes(self) -> None:
        """
        An agent that logs in to another node is dropped by the old one at
        once (hand-driven agents: a real one would log in again elsewhere,
        and the last login wins).
        """
        from rproxy.tunnel.wire import Login
        from tests.test_e2e_tunnel import FakeAgent

        for node_id in ("a", "b"):
            await self.start_node(node_id)
        fakes = []
        for node_id in ("a", "b"):
            fake = FakeAgent()
            await connect(self.tunnel(node_id).port_of("control"), fake)  # type: ignore[arg-type]
            self.addCleanup(lambda fake=fake: None if fake.lost else fake.transport.abortConnection())
            fake.send(Login(agent_id="x", api_key="good-key"))
            await wait_for(lambda node_id=node_id: "x" in self.tunnel(node_id).registry.agents)
            fakes.append(fake)
        await wait_for(lambda: fakes[0].lost, timeout=2)
        self.assertNotIn("x", self.tunnel("a").registry.agents)
        self.assertFalse(fakes[1].lost)
        self.assertEqual((self.nodes["a"].cluster.kicked, self.nodes["b"].cluster.kicked), (1, 0))
        await wait_for(lambda: getattr(self.tunnel("a").registry.remote.get("x"), "node", None) == "b")

    @async_test
    async def test_open_asked_of_a_silent_node_goes_elsewhere(self) -> None:
        """
        An open asked of a node nobody listens for (gone since b last read
        the records) is refused at once by Redis's publish count, and the
        user is offered to the next agent: no wait for open_timeout.
        """
        await self.three_nodes()
        b = self.nodes["b"].cluster
        b._stopped = True  # freeze b's view of the cluster
        if b._timer is not None and b._timer.active():
            b._timer.cancel()
        ghost = self.tunnel("b").registry.remote["a1"]
        ghost.node = ghost.control.node = "ghost"
        started = time.monotonic()
        held = [await self.greeting("b") for _ in range(3)]
        self.assertEqual([hello for _, hello in held], [b"c1\n"] * 3)
        self.assertLess(time.monotonic() - started, 1.5)  # open_timeout is 2s
        self.assertGreaterEqual(ghost.failed_total, 2)

    @async_test
    async def test_dead_node_drops_out_within_heartbeat_timeout(self) -> None:
        """A node that stops renewing its record is gone from the others within heartbeat_timeout."""
        await self.three_nodes()
        cluster = self.nodes["a"].cluster
        cluster._stopped = True  # a crash: no more heartbeats, no goodbye
        if cluster._timer is not None and cluster._timer.active():
            cluster._timer.cancel()
        started_at = time.monotonic()
        await wait_for(lambda: "a1" not in self.tunnel("b").registry.remote, timeout=5)
        gone = time.monotonic() - started_at
        self.assertLess(gone, TIMEOUT + 0.5)  # within heartbeat_timeout, with slack for a loaded machine

    @async_test
    async def test_kill_a_node_under_traffic(self) -> None:
        """
        Node a stops with streams open: the stream spliced on a is lost;
        the one a user on b has through a's agent goes on; the agent moves
        to c and users on b reach it there.
        """
        await self.three_nodes()
        on_a, hello = await self.greeting("a")
        self.assertEqual(hello, b"a1\n")
        on_b = []
        for _ in range(2):
            on_b.append(await self.greeting("b"))
        through_a1 = [c for c, h in on_b if h == b"a1\n"][0]
        await self.nodes["a"].stopService()
        await wait_for(lambda: on_a.lost, timeout=5)
        through_a1.transport.write(b"still here\n")
        self.assertEqual(await through_a1.read_until(b"\n"), b"still here\n")
        await wait_for(lambda: "a1" in self.tunnel("c").registry.agents, timeout=5)
        await wait_for(lambda: getattr(self.tunnel("b").registry.remote.get("a1"), "node", None) == "c", timeout=5)
        # both agents now on c: b's new users still reach both
        greetings = set()
        for _ in range(4):
            greetings.add((await self.greeting("b"))[1])
        self.assertEqual(greetings, {b"a1\n", b"c1\n"})

    @async_test
    async def test_redis_stopped_and_started_under_traffic(self) -> None:
        """
        With Redis down every node serves its own agents and streams
        already open go on; cross-node routing stops, and resumes within
        2 s of Redis coming back.
        """
        await self.three_nodes()
        across, hello = await self.greeting("b")
        on_a: dict[str, Any] = {}
        running = self.traffic("a", on_a)  # a's users, a's agent: Redis plays no part
        await wait_for(lambda: on_a.get("ok", 0) >= 3)
        self.redis.stop()
        await wait_for(lambda: self.nodes["b"].cluster.state == "down", timeout=5)
        self.assertEqual(self.tunnel("b").registry.remote, {})
        self.assertEqual(self.nodes["b"].health_detail()["cluster"]["cross_node"], "off")
        across.transport.write(b"no redis needed\n")
        self.assertEqual(await across.read_until(b"\n"), b"no redis needed\n")
        local, hello = await self.greeting("a")
        self.assertEqual(hello, b"a1\n")
        refused = await self.public("b")  # b has no agent of its own
        await wait_for(lambda: refused.lost, timeout=5)
        self.redis.start()
        back = time.monotonic()
        await wait_for(lambda: set(self.tunnel("b").registry.remote) == {"a1", "c1"}, timeout=5)
        resumed = time.monotonic() - back
        self.assertLess(resumed, 2.0)
        client, hello = await self.greeting("b")
        self.assertIn(hello, (b"a1\n", b"c1\n"))
        self.assertEqual(self.nodes["b"].health_detail()["cluster"]["cross_node"], "on")
        on_a["stop"] = True
        await running
        self.assertEqual(on_a.get("failed", 0), 0, on_a.get("why"))
        self.assertGreater(on_a["ok"], 10)

    @async_test
    async def test_no_tunnels_no_node(self) -> None:
        """
        A process without tunnels (the master of workers: N, whose workers
        hold them, each a node of its own) does not join.
        """
        from rproxy.config.load import config_from_mapping
        from rproxy.workers.views import master_view, worker_view

        service = await self.start_node("m")
        config = config_from_mapping({
            "stores": {"redis": {"url": self.redis.url}}, "api_keys": [{"key": "k"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0", "proxy": "tcp:0", "public": "tcp:0"}],
            "cluster": {"node_id": "m", "advertise": {"proxy": "127.0.0.1:0"}},
        })
        self.assertEqual(master_view(config).tunnels, ())
        self.assertIsNotNone(service.cluster)
        worker = await self.start_service({
            "stores": {"redis": {"url": self.redis.url}}, "api_keys": [{"key": "k"}],
            "cluster": {"node_id": "m", "advertise": {"proxy": "127.0.0.1:0"}},
        })
        self.assertIsNone(worker.cluster)
        self.assertEqual([t.name for t in worker_view(config, 0, 2).tunnels], ["gpu"])
        self.assertEqual(worker_view(config, 1, 2).cluster.node_id, "m-w1")
