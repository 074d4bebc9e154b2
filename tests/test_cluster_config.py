"""
The C{cluster:} section: read with key paths, required stores.redis.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError
from rproxy.config.cluster import ClusterConfig, worker_port_errors
from rproxy.config.load import config_from_mapping

TUNNEL = {"name": "gpu", "control": "tcp:0", "proxy": "tcp:0", "public": "tcp:0"}


def document(**cluster: Any) -> dict[str, Any]:
    return {
        "stores": {"redis": {"url": "redis://127.0.0.1:6379/0"}},
        "api_keys": [{"key": "k"}],
        "tunnels": [TUNNEL],
        "cluster": cluster,
    }


class ClusterConfigTests(SynchronousTestCase):
    def errors(self, data: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            config_from_mapping(data)
        return list(caught.exception.errors)

    def test_absent(self) -> None:
        """Without the section there is no cluster."""
        data = document()
        del data["cluster"]
        self.assertIsNone(config_from_mapping(data).cluster)

    def test_read(self) -> None:
        config = config_from_mapping(document(node_id="edge-1", advertise={"proxy": "10.0.0.5:17001"},
                                              heartbeat_interval="200ms", heartbeat_timeout="600ms"))
        self.assertEqual(config.cluster, ClusterConfig("edge-1", ("10.0.0.5", 17001), 0.2, 0.6))

    def test_port_zero(self) -> None:
        """Port 0 advertises the port the proxy listener bound."""
        config = config_from_mapping(document(node_id="a", advertise={"proxy": "127.0.0.1:0"}))
        self.assertEqual(config.cluster.advertise_proxy, ("127.0.0.1", 0))
        self.assertEqual((config.cluster.heartbeat_interval, config.cluster.heartbeat_timeout), (1.0, 5.0))

    def test_needs_redis(self) -> None:
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:0"})
        del data["stores"]
        self.assertEqual(self.errors(data), [
            "cluster: needs stores.redis.url (or REDIS_URL): the nodes share state through Redis"])

    def test_key_paths(self) -> None:
        self.assertEqual(sorted(self.errors(document(node_id="bad id", advertise={"proxy": "nohost"},
                                                     heartbeat_timeout="2s", colour=1))), sorted([
            "cluster.node_id: 'bad id' is not a node id (1-64 letters, digits, '.', '_', '-')",
            "cluster.advertise.proxy: invalid address 'nohost' (expected host:port)",
            "cluster.heartbeat_timeout: must be at least 3 times heartbeat_interval (1s)",
            "cluster.colour: unknown key",
        ]))

    def test_required(self) -> None:
        self.assertEqual(sorted(self.errors(document())), [
            "cluster.advertise.proxy: required", "cluster.node_id: required"])

    def test_port_with_several_tunnels(self) -> None:
        data = document(node_id="a", advertise={"proxy": "10.0.0.5:17001"})
        data["tunnels"] = [TUNNEL, dict(TUNNEL, name="other")]
        self.assertEqual(self.errors(data), [
            "cluster.advertise.proxy: 2 tunnels listen on different proxy ports: give port 0 (10.0.0.5:0) "
            "to advertise each one's own port"])


class WorkerPortTests(SynchronousTestCase):
    """
    At C{workers: N} with a cluster each worker listens on and advertises
    the tunnel's proxy port plus its slot: ports past 65535 are refused
    with the key path, not met as a bind failure at start.
    """

    def errors(self, data: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            config_from_mapping(data)
        return list(caught.exception.errors)

    def test_past_65535(self) -> None:
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:65535"})
        data["tunnels"] = [dict(TUNNEL, proxy="127.0.0.1:65534")]
        data["global"] = {"workers": 4}
        self.assertEqual(self.errors(data), [
            "cluster.advertise.proxy: port 65535 + 3 (global.workers: 4, one proxy port per worker) is past "
            "65535: choose a port at most 65532, or 0",
            "tunnels[0].proxy: port 65534 + 3 (global.workers: 4, one proxy port per worker) is past 65535: "
            "choose a port at most 65532",
        ])

    def test_fits(self) -> None:
        """The last port that fits, port 0, and one worker are all fine."""
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:65532"})
        data["tunnels"] = [dict(TUNNEL, proxy="127.0.0.1:65532")]
        data["global"] = {"workers": 4}
        self.assertEqual(config_from_mapping(data).cluster.advertise_proxy, ("127.0.0.1", 65532))
        data["global"] = {"workers": 1}
        data["tunnels"] = [dict(TUNNEL, proxy="127.0.0.1:65535")]
        config_from_mapping(data)

    def test_worker_port_taken(self) -> None:
        """
        A worker's proxy port (the tunnel's plus the worker's number) may
        not be a port another listener takes: the tunnel's own public port,
        the admin port on a wildcard interface, another tunnel's worker's.
        """
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:0"})
        data["global"] = {"workers": 3}
        data["admin"] = {"listen": "tcp:27300"}
        data["tunnels"] = [
            {"name": "gpu", "control": "tcp:27210:interface=127.0.0.1", "proxy": "tcp:27211:interface=127.0.0.1",
             "public": "tcp:27212:interface=127.0.0.1"},
            {"name": "llm", "control": "tcp:27220:interface=127.0.0.1", "proxy": "tcp:27298:interface=127.0.0.1",
             "public": "tcp:27230:interface=127.0.0.1"},
            {"name": "tts", "control": "tcp:27240:interface=127.0.0.1", "proxy": "tcp:27297:interface=127.0.0.1",
             "public": "tcp:27250:interface=127.0.0.1"},
        ]
        self.assertEqual(self.errors(data), [
            "tunnels[0].proxy: worker 1 listens on port 27212 (27211 + 1), already used by tunnels[0].public "
            "(global.workers: 3): ports 27211-27213 must be free for this tunnel's workers, one proxy port each",
            "tunnels[1].proxy: worker 2 listens on port 27300 (27298 + 2), already used by admin.listen "
            "(global.workers: 3): ports 27298-27300 must be free for this tunnel's workers, one proxy port each",
            "tunnels[2].proxy: worker 1 listens on port 27298 (27297 + 1), already used by tunnels[1].proxy "
            "(global.workers: 3): ports 27297-27299 must be free for this tunnel's workers, one proxy port each",
        ])

    def test_worker_port_other_interface(self) -> None:
        """
        The same port on another interface is free, and so is every worker
        port with one worker (the case the start-up trial hit, at workers: 1).
        """
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:0"})
        data["global"] = {"workers": 2}
        data["tunnels"] = [{"name": "gpu", "control": "tcp:27210:interface=127.0.0.1",
                            "proxy": "tcp:27211:interface=127.0.0.1", "public": "tcp:27212:interface=127.0.0.2"}]
        self.assertEqual(config_from_mapping(data).tunnels[0].proxy, "tcp:27211:interface=127.0.0.1")
        data["global"] = {"workers": 1}
        data["tunnels"][0]["public"] = "tcp:27212:interface=127.0.0.1"
        config_from_mapping(data)

    def test_auto(self) -> None:
        """C{auto} counts the cores as the start does."""
        cluster = ClusterConfig("a", ("127.0.0.1", 0))
        data = document(node_id="a", advertise={"proxy": "127.0.0.1:0"})
        tunnel = attrs.evolve(config_from_mapping(data).tunnels[0], proxy="tcp:65535")
        self.assertEqual(worker_port_errors("auto", cluster, (tunnel,), lambda name: f"tunnels[{name}]",
                                            cores=lambda: 1), [])
        self.assertEqual(worker_port_errors("auto", cluster, (tunnel,), lambda name: f"tunnels[{name}]",
                                            cores=lambda: 2), [
            "tunnels[gpu].proxy: port 65535 + 1 (global.workers: auto, one proxy port per worker) is past "
            "65535: choose a port at most 65534"])
