"""
A mode http tunnel across a cluster: per-request routing to agents logged
in to other nodes (by model), with keep-alive on the client's side.  Real
curl, the harness's Redis, three in-process nodes.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests import test_e2e_cluster
from tests.support import ServiceMixin, async_test, listen, reactor, wait_for
from tests.test_e2e_tunnel_http import LocalService


async def curl_models(test: Any, curl: str, url: str, models: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """
    One curl run (one client connection kept alive) posting a chat request
    for each of C{models} to C{url}: the agent of each answer, and curl's
    count of connections opened for each request.
    """
    args: list[str] = []
    for i, model in enumerate(models):
        if i:
            args.append("--next")
        args += ["-s", "-H", "content-type: application/json", "-d", json.dumps({"model": model}),
                 "-w", "\n%{num_connects}\n", url]
    out, err, code = await getProcessOutputAndValue(curl, args)
    test.assertEqual(code, 0, err)
    lines = out.decode().split("\n")
    return [json.loads(line)["agent"] for line in lines[0::2] if line], [int(n) for n in lines[1::2] if n]


class ClusterHTTPTests(ServiceMixin, TestCase):
    timeout = 90
    setUp = test_e2e_cluster.ClusterTests.setUp
    tunnel = test_e2e_cluster.ClusterTests.tunnel

    async def start_node(self, node_id: str) -> Any:
        service = await self.start_service({
            "global": {"grace_period": "300ms"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [{
                "name": "gpu", "mode": "http", "control": "tcp:0:interface=127.0.0.1",
                "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1", "open_timeout": "2s",
            }],
            "stores": {"redis": {"url": self.redis.url}},
            "cluster": {"node_id": node_id, "advertise": {"proxy": "127.0.0.1:0"},
                        "heartbeat_interval": "100ms", "heartbeat_timeout": "500ms"},
        })
        self.nodes[node_id] = service
        return service

    async def start_agent(self, name: str, node: str, models: list[str]) -> None:
        port = await listen(Site(LocalService(name, models)))
        self.addCleanup(port.stopListening)
        tunnel = self.tunnel(node)
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{tunnel.port_of('proxy')}"},
            "api_key": "good-key", "agent_id": name, "models": models,
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            "heartbeat_interval": "100ms",
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: agent.control is not None)

    @async_test
    async def test_models_on_other_nodes_one_client_connection(self) -> None:
        """
        A client of node b asks for llama (agent on a) then qwen (agent on
        c) on one keep-alive connection; both answer, through b.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is missing")
        for node_id in ("a", "b", "c"):
            await self.start_node(node_id)
        await self.start_agent("a1", "a", ["llama"])
        await self.start_agent("c1", "c", ["qwen"])
        await wait_for(lambda: set(self.tunnel("b").registry.remote) == {"a1", "c1"})
        url = f"http://127.0.0.1:{self.tunnel('b').port_of('public')}/v1/chat/completions"
        answers, connects = await curl_models(self, curl, url, ("llama", "qwen", "llama"))
        self.assertEqual(answers, ["a1", "c1", "a1"])
        self.assertEqual(sum(connects), 1)  # one client connection for the three
        # an unknown model is still a 404 cluster-wide
        out, _, _ = await getProcessOutputAndValue(curl, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                                          "content-type: application/json", "-d",
                                                          '{"model": "nope"}', url])
        self.assertEqual(out, b"404")
