"""
A cluster node running C{global.workers: 2} (a twistd child: a master and
two workers) beside an in-process node: the master, which holds the
tunnels, is the machine's node; the workers do not join; users of the
other node reach the agent logged in to it.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests import test_e2e_cluster, test_workers_e2e
from tests.support import async_test, reactor, wait_for


class ClusterWorkersTests(test_workers_e2e.WorkersMixin, TestCase):
    timeout = 120
    setUp = test_e2e_cluster.ClusterTests.setUp
    start_node = test_e2e_cluster.ClusterTests.start_node
    tunnel = test_e2e_cluster.ClusterTests.tunnel
    greeting = test_e2e_cluster.ClusterTests.greeting
    public = test_e2e_cluster.ClusterTests.public

    @async_test
    async def test_master_is_the_node(self) -> None:
        _, backend_port = await self.http_backend()
        child = await self.start({
            "global": {"workers": 2, "grace_period": "1s"},
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "backends": [{"name": "be", "servers": [f"127.0.0.1:{backend_port}"]}],
            "frontends": [{"name": "fe", "listen": "tcp:0:interface=127.0.0.1", "backend": "be"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
            "stores": {"redis": {"url": self.redis.url}},
            "cluster": {"node_id": "m", "advertise": {"proxy": "127.0.0.1:0"},
                        "heartbeat_interval": "100ms", "heartbeat_timeout": "500ms"},
        })
        control = int((await child.line(r"tunnel gpu control listening on 127\.0\.0\.1:(\d+)")).group(1))
        proxy = int((await child.line(r"tunnel gpu proxy listening on 127\.0\.0\.1:(\d+)")).group(1))
        await self.start_node("b")
        factory, port = await self.backend("m1")
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{control}", "proxy": f"127.0.0.1:{proxy}"},
            "api_key": "good-key", "agent_id": "m1",
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: "m1" in self.tunnel("b").registry.remote)
        self.assertEqual(self.tunnel("b").registry.remote["m1"].node, "m")
        client, hello = await self.greeting("b")
        self.assertEqual(hello, b"m1\n")
        self.assertEqual(self.nodes["b"].cluster.nodes, ["b", "m"])  # no worker joined
        _, health = await self.admin("/health")
        self.assertEqual((health["cluster"]["node_id"], health["cluster"]["streams_served"]), ("m", 1))
