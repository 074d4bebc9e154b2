"""
A cluster node running C{global.workers: 2} (a twistd child: a master and
two workers) with the harness's real Redis: the tunnels run in every
worker, each a node of the cluster (C{m-w0}, C{m-w1}); agents and users
land on either worker through the sockets the master binds; a user's
stream reaches an agent logged in to the other worker through Redis, the
agent dialling the asking worker's own proxy port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests import test_e2e_cluster, test_workers_e2e
from tests.support import Client, async_test, connect, listen, reactor
from tests.test_e2e_cluster_http import curl_models
from tests.test_e2e_tunnel_http import LocalService
from tests.test_twistd import Child


class ClusterWorkersTests(test_workers_e2e.WorkersMixin, TestCase):
    timeout = 120
    setUp = test_e2e_cluster.ClusterTests.setUp

    async def start_machine(self, mode: str = "tcp") -> Child:
        _, backend_port = await self.http_backend()
        self.data = {
            "global": {"workers": 2, "grace_period": "1s"},
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "admin-secret"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "backends": [{"name": "be", "servers": [f"127.0.0.1:{backend_port}"]}],
            "frontends": [{"name": "fe", "listen": "tcp:0:interface=127.0.0.1", "backend": "be"}],
            "tunnels": [{"name": "gpu", "mode": mode, "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1",
                         "open_timeout": "3s", "algorithm": "least-connections"}],
            "stores": {"redis": {"url": self.redis.url}},
            "cluster": {"node_id": "m", "advertise": {"proxy": "127.0.0.1:0"},
                        "heartbeat_interval": "100ms", "heartbeat_timeout": "500ms"},
        }
        child = await self.start(self.data)
        ports = [int((await child.line(rf"tunnel gpu {role} listening on 127\.0\.0\.1:(\d+), in 2 worker")).group(1))
                 for role in ("control", "public")]
        self.control, self.public_port = ports
        for slot in (0, 1):
            await child.line(rf"worker {slot}: tunnel gpu proxy listening on 127\.0\.0\.1:\d+")
            await child.line(rf"worker {slot}: cluster: node m-w{slot}: Redis answers")
        self.child = child
        return child

    async def agent(self, name: str, models: list[str], local: int | None = None,
                    control: int | None = None) -> AgentService:
        if local is None:
            _, port = await self.backend(name)
            local = port.getHost().port
        agent = AgentService(parse_agent_config({
            # (its configured proxy port refuses: every open names the
            # proxy port of the worker that asked)
            "server": {"control": f"127.0.0.1:{control or self.control}",
                       "proxy": f"127.0.0.1:{self.closed_port()}"},
            "api_key": "good-key", "agent_id": name, "models": models,
            "services": [{"name": "web", "local": f"127.0.0.1:{local}"}],
            "heartbeat_interval": "100ms", "reconnect": {"initial": "50ms", "max": "200ms"},
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        return agent

    def closed_port(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return int(port)

    async def api(self, path: str) -> Any:
        client = await connect(self.admin_port)
        client.transport.write(f"GET {path} HTTP/1.0\r\nAuthorization: Bearer admin-secret\r\n\r\n".encode())
        await client.closed
        return json.loads(bytes(client.data).partition(b"\r\n\r\n")[2])

    async def agents(self) -> dict[str, str]:
        """Agent id -> the node (worker) it is logged in to, as the master's API lists them."""
        body = await self.api("/api/v1/agents")
        return {a["id"]: a["node"] for t in body["tunnels"] for a in t["agents"]}

    async def until_listed(self, wanted: set[str]) -> dict[str, str]:
        """
        Wait until the master lists C{wanted} and every worker sees them
        all (each agent is another worker's remote agent), so that a user
        landing on either worker reaches any.
        """
        listed: dict[str, str] = {}
        remote = 0
        for _ in range(200):
            listed = await self.agents()
            health = await self.health()
            remote = sum(n["remote_agents"] for n in health.get("cluster", {}).get("workers", []))
            if set(listed) == wanted and remote == len(wanted) and len(health["cluster"]["workers"]) == 2:
                return listed
            await deferLater(0.1)
        raise AssertionError(f"agents listed: {listed}, wanted {wanted}; {remote} remote")

    async def greet(self, public: int | None = None) -> tuple[Client, bytes]:
        client = await connect(public or self.public_port)
        self.client_cleanup(client)
        return client, await client.read_until(b"\n", timeout=10)

    async def health(self) -> dict[str, Any]:
        return (await self.admin("/health"))[1]  # type: ignore[no-any-return]

    @async_test
    async def test_tunnels_in_every_worker(self) -> None:
        """
        Two agents (models llama and qwen) log in to the machine; 40 user
        connections, which the kernel spreads over both workers, all reach
        an agent, both agents serve some (held open, so least-connections
        spreads them), and streams cross workers (the
        agent dialling the asking worker's proxy port: its own configured
        one refuses).  /health names both workers' nodes; /api/v1/agents
        and /api/v1/models at the master list both agents, and so does the
        dashboard, with the streams of both workers.
        """
        await self.start_machine()
        await self.agent("a1", ["llama"])
        await self.agent("b1", ["qwen"])
        listed = await self.until_listed({"a1", "b1"})
        self.assertTrue(set(listed.values()) <= {"m-w0", "m-w1"}, listed)
        greetings = []
        for _ in range(40):  # (held open: least-connections then spreads them over both agents)
            client, hello = await self.greet()
            client.transport.write(b"ping\n")
            self.assertEqual(await client.read_until(b"ping\n"), b"ping\n")
            greetings.append(hello)
        self.assertEqual(set(greetings), {b"a1\n", b"b1\n"})
        health = await self.health()
        self.assertEqual(health["tunnels"]["process"], "workers")
        self.assertEqual(sorted(health["tunnels"]["nodes"]), ["m-w0", "m-w1"])
        nodes = health["cluster"]["workers"]
        self.assertEqual(sorted(n["nodes"] == ["m-w0", "m-w1"] for n in nodes), [True, True])
        self.assertGreater(sum(n["streams_asked"] for n in nodes), 0)  # some crossed workers
        self.assertEqual(sum(n["streams_asked"] for n in nodes), sum(n["streams_served"] for n in nodes))
        _, metrics = await self.admin("/metrics")
        self.assertIn('rproxy_tunnel_agents{tunnel="gpu"} 2\n', metrics)
        self.assertIn('rproxy_tunnel_streams_opened_total{tunnel="gpu"} 40\n', metrics)
        self.assertIn("rproxy_cluster_up 1\n", metrics)  # (every worker's node up: not summed)
        models = await self.api("/api/v1/models")
        self.assertEqual({m["id"]: m["agents"] for m in models["data"]},
                         {"llama": ["gpu/a1"], "qwen": ["gpu/b1"]})
        # the dashboard (rproxyctl monitor's source) samples the workers once a second
        for _ in range(50):
            dashboard = await self.api("/api/v1/dashboard")
            tunnel = dashboard["tunnels"][0] if dashboard["tunnels"] else {"agents": [], "streams_opened": 0}
            if tunnel["streams_opened"] >= 40:
                break
            await deferLater(0.1)
        self.assertEqual(sorted(a["id"] for a in tunnel["agents"]), ["a1", "b1"])
        self.assertEqual(tunnel["streams_opened"], 40)

    @async_test
    async def test_worker_killed_its_agent_served_again(self) -> None:
        """
        A worker killed with SIGKILL: streams through it are lost, the
        others go on; its agent logs in again (to the other worker, or
        to the worker started in its place) and is reached again.
        """
        await self.start_machine()
        await self.agent("a1", ["llama"])
        await self.agent("b1", ["qwen"])
        listed = await self.until_listed({"a1", "b1"})
        open_clients = []
        for _ in range(20):
            client, hello = await self.greet()
            open_clients.append(client)
        victim = int(listed["a1"][-1])
        pid = next(w["pid"] for w in (await self.health())["workers"] if w["worker"] == victim)
        os.kill(pid, signal.SIGKILL)
        # the agent comes back, and every new connection reaches one of both agents again
        await self.child.line(rf"worker {victim} \(pid \d+\) killed by signal 9")
        await self.until_listed({"a1", "b1"})
        # streams through the other worker still echo; those through the killed one are gone
        alive = 0
        for client in open_clients:
            if client.lost:
                continue
            client.transport.write(b"still\n")
            try:
                await client.read_until(b"still\n", timeout=5)
            except AssertionError:
                continue
            alive += 1
        self.assertGreater(alive, 0)
        self.assertLess(alive, len(open_clients))
        for client in open_clients:
            client.transport.abortConnection()
        greetings = set()
        for _ in range(30):  # (held open: least-connections spreads them)
            client, hello = await self.greet()
            greetings.add(hello)
        self.assertEqual(greetings, {b"a1\n", b"b1\n"})
        self.assertEqual([w["restarts"] for w in (await self.health())["workers"]],
                         [1 if slot == victim else 0 for slot in (0, 1)])

    @async_test
    async def test_reload_adds_a_tunnel_in_every_worker(self) -> None:
        """
        A reload (SIGHUP) that adds a tunnel: the master binds its control
        and public sockets and every worker serves them; the running
        tunnel's agent stays logged in and its stream open.  The reload
        also changes cluster.node_id, which takes effect after a restart:
        the workers stay nodes m-w0 and m-w1.
        """
        child = await self.start_machine()
        await self.agent("a1", ["llama"])
        await self.until_listed({"a1"})
        held, hello = await self.greet()
        self.assertEqual(hello, b"a1\n")
        self.data["tunnels"].append({"name": "gpu2", "control": "tcp:0:interface=127.0.0.1",
                                     "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"})
        self.data["cluster"]["node_id"] = "renamed"
        self.write_config(self.data)
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line("configuration reloaded in the master and 2 worker")
        self.assertIn("cluster: changes to cluster: take effect after a restart", child.output)
        control, public = [
            int((await child.line(rf"tunnel gpu2 {role} listening on 127\.0\.0\.1:(\d+), in 2 worker")).group(1))
            for role in ("control", "public")]
        await self.agent("b1", ["qwen"], control=control)
        listed = await self.until_listed({"a1", "b1"})
        self.assertTrue(set(listed.values()) <= {"m-w0", "m-w1"}, listed)
        for _ in range(10):
            client, hello = await self.greet(public)
            self.assertEqual(hello, b"b1\n")
            client.transport.abortConnection()
        held.transport.write(b"kept\n")
        self.assertEqual(await held.read_until(b"kept\n"), b"kept\n")
        self.assertEqual(child.output.count("agent a1 logged in"), 1)

    @async_test
    async def test_http_keepalive_both_models_with_curl(self) -> None:
        """
        Mode http: curl asks for llama, qwen, llama, qwen on one kept-alive
        connection (four times, so the connections land on both workers);
        each request is answered by the agent serving its model, wherever
        the connection and the agent landed.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is missing")
        await self.start_machine("http")
        for name, model in (("a1", "llama"), ("b1", "qwen")):
            port = await listen(Site(LocalService(name, [model])))
            self.addCleanup(port.stopListening)
            await self.agent(name, [model], port.getHost().port)
        await self.until_listed({"a1", "b1"})
        url = f"http://127.0.0.1:{self.public_port}/v1/chat/completions"
        for _ in range(4):
            answers, connects = await curl_models(self, curl, url, ("llama", "qwen", "llama", "qwen"))
            self.assertEqual(answers, ["a1", "b1", "a1", "b1"])
            self.assertEqual(sum(connects), 1)  # one client connection for the four


async def deferLater(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)
