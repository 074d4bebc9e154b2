"""
The cluster's shared registry and node logic, with fakes: a fake Redis
(TTL on a task.Clock, pub/sub delivered in place) and tunnel stand-ins
holding real L{Registry} objects.  No sockets, no sleeping.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.cluster.node import KICK, PREFIX, ClusterNode
from rproxy.cluster.registry import merge, parse_snapshot, snapshot
from rproxy.config.cluster import ClusterConfig
from rproxy.store.auth import REVOKED_CHANNEL
from rproxy.tunnel.registry import AgentSession, Registry
from rproxy.tunnel.wire import REPLACED, RequestNewProxyConn


class FakeRedis:
    """
    The commands the cluster uses, on a clock; C{down} makes every command
    hang (as a client waiting for a lost server does).
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.values: dict[str, tuple[str, float | None]] = {}
        self.sets: dict[str, set[str]] = {}
        self.subscribers: dict[str, list[ClusterNode]] = {}
        self.down = False
        self.published: list[tuple[str, dict[str, Any]]] = []

    def _answer(self, value: Any) -> defer.Deferred[Any]:
        return defer.Deferred() if self.down else defer.succeed(value)

    def _live(self, key: str) -> str | None:
        entry = self.values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and self.clock.seconds() >= expires:
            del self.values[key]
            return None
        return value

    def set(self, key: str, value: str, pexpire: int | None = None) -> defer.Deferred[Any]:
        if not self.down:
            self.values[key] = (value, None if pexpire is None else self.clock.seconds() + pexpire / 1000)
        return self._answer("OK")

    def delete(self, key: str) -> defer.Deferred[Any]:
        self.values.pop(key, None)
        return self._answer(1)

    def sadd(self, key: str, member: str) -> defer.Deferred[Any]:
        self.sets.setdefault(key, set()).add(member)
        return self._answer(1)

    def srem(self, key: str, *members: str) -> defer.Deferred[Any]:
        self.sets.get(key, set()).difference_update(members)
        return self._answer(len(members))

    def smembers(self, key: str) -> defer.Deferred[Any]:
        return self._answer(set(self.sets.get(key, ())))

    def mget(self, keys: list[str]) -> defer.Deferred[Any]:
        return self._answer([self._live(k) for k in keys])

    def publish(self, channel: str, message: str) -> defer.Deferred[Any]:
        if self.down:
            return defer.Deferred()
        self.published.append((channel, json.loads(message)))
        listeners = [n for n in self.subscribers.get(channel, []) if n.subscribed]
        for node in listeners:
            node.received(channel, message)
        return defer.succeed(len(listeners))


class FakeControl:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def drop(self, why: str) -> None:
        pass


class FakeTunnel:
    """
    What the cluster reads and calls of a L{TunnelServer}.
    """

    def __init__(self, name: str = "gpu", proxy_port: int = 17001) -> None:
        self.name = name
        self.registry = Registry("least-connections", 100, random.Random(1))
        self.proxy_port = proxy_port
        self.dropped: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []
        self.gone: list[str] = []
        self.codes: list[str | None] = []
        self.revoked: list[bytes | None] = []
        self.config = type("C", (), {"open_timeout": 2.0})()

    def port_of(self, role: str) -> int:
        return self.proxy_port

    def login(self, agent_id: str, models: tuple[str, ...] = (), at: float = 0.0) -> AgentSession:
        session = AgentSession(agent_id=agent_id, peer="10.0.0.9:5555", key_name="k", level=-1, connected_at=at,
                               last_seen=at, control=FakeControl(), models=models)
        self.registry.add(session)
        return session

    def drop_session(self, session: AgentSession, why: str, code: str | None = None) -> None:
        self.registry.remove(session)
        self.dropped.append((session.agent_id, why))
        self.codes.append(code)

    def revoke_key(self, key_digest: bytes | None = None, key_id: int | None = None) -> int:
        self.revoked.append(key_digest)
        return 0

    def remote_gone(self, session: AgentSession) -> None:
        self.gone.append(session.agent_id)

    def remote_refused(self, pending: Any, why: str) -> None:
        self.registry.forget(pending)
        self.refused.append((pending.conn_id, why))


def node_on(redis: FakeRedis, clock: task.Clock, node_id: str, tunnel: FakeTunnel) -> ClusterNode:
    config = ClusterConfig(node_id, ("127.0.0.1", 0), heartbeat_interval=1.0, heartbeat_timeout=5.0)
    node = ClusterNode(config, "redis://127.0.0.1:1/0", {tunnel.name: tunnel}, None, clock, redis=redis)
    node.subscribed = True
    for channel in (node.channel, KICK):
        redis.subscribers.setdefault(channel, []).append(node)
    node._schedule(0)
    return node


class MergeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a, self.b = FakeTunnel(), FakeTunnel()

    def documents(self) -> list[dict[str, Any]]:
        return [parse_snapshot(json.loads(json.dumps(snapshot(n, [t], 100.0))))
                for n, t in (("a", self.a), ("b", self.b))]

    def test_remote_sessions(self) -> None:
        """Agents of another node become remote sessions naming it; a node's own stay local."""
        self.a.login("x", ("llama",))
        self.b.login("y")
        merge("b", self.b, self.documents(), lambda *a: None, 100.0)
        self.assertEqual(list(self.b.registry.remote), ["x"])
        remote = self.b.registry.remote["x"]
        self.assertEqual((remote.node, remote.models), ("a", ("llama",)))
        self.assertEqual(sorted(a.agent_id for a in self.b.registry.candidates()), ["x", "y"])

    def test_identity_kept(self) -> None:
        """A remote session stays the same object while its agent stays listed (its counts stay)."""
        self.a.login("x")
        merge("b", self.b, self.documents(), lambda *a: None, 100.0)
        first = self.b.registry.remote["x"]
        self.assertEqual(merge("b", self.b, self.documents(), lambda *a: None, 101.0), [])
        self.assertIs(self.b.registry.remote["x"], first)
        self.a.registry.agents.clear()
        self.assertEqual(merge("b", self.b, self.documents(), lambda *a: None, 102.0), [first])

    def test_local_login_wins(self) -> None:
        self.a.login("x")
        self.b.login("x")
        merge("b", self.b, self.documents(), lambda *a: None, 100.0)
        self.assertEqual(self.b.registry.remote, {})

    def test_latest_login_wins(self) -> None:
        """An agent listed by two other nodes is taken from the one it logged in to last."""
        c = FakeTunnel()
        self.a.login("x", at=10.0)
        c.login("x", at=20.0)
        documents = [snapshot("a", [self.a], 0), snapshot("c", [c], 0)]
        merge("b", self.b, documents, lambda *a: None, 100.0)
        self.assertEqual(self.b.registry.remote["x"].node, "c")

    def test_load_is_cluster_wide(self) -> None:
        """
        An agent's load counts its streams at its node and those every
        other node has open through it; the least loaded is picked, a tie
        goes to a local agent.
        """
        x = self.a.login("x")
        x.streams.update({1, 2})
        y = self.b.login("y")
        merge("b", self.b, self.documents(), lambda *a: None, 100.0)
        remote = self.b.registry.remote["x"]
        self.assertEqual(remote.load, 2)
        self.assertIs(self.b.registry.pick(set()), y)
        y.streams.update({1, 2, 3})
        self.assertIs(self.b.registry.pick(set()), remote)
        # b now uses x for one stream: a counts it in x's load
        remote.streams.add(object())
        merge("a", self.a, self.documents(), lambda *a: None, 100.0)
        self.assertEqual(x.load, 3)
        y.streams.clear()
        y.streams.update({1, 2})
        self.assertIs(self.b.registry.pick(set()), y)

    def test_malformed_snapshots(self) -> None:
        for document in ([], {"node": 1, "tunnels": {}}, {"node": "a", "tunnels": {"gpu": {"agents": [{}],
                                                                                           "using": {}}}},
                         {"node": "a", "tunnels": {"gpu": {"agents": [], "using": {"x": -1}}}}):
            self.assertRaises(ValueError, parse_snapshot, document)


class NodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.redis = FakeRedis(self.clock)
        self.ta, self.tb = FakeTunnel(proxy_port=17001), FakeTunnel(proxy_port=27001)
        self.a = node_on(self.redis, self.clock, "a", self.ta)
        self.b = node_on(self.redis, self.clock, "b", self.tb)
        self.clock.advance(0)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def test_heartbeats_and_ttl(self) -> None:
        """Records are renewed every interval; one not renewed is gone within heartbeat_timeout."""
        self.ta.login("x")
        self.a.trigger()
        self.clock.advance(1)
        self.assertEqual(list(self.tb.registry.remote), ["x"])
        self.clock.advance(30)
        self.assertEqual(list(self.tb.registry.remote), ["x"])  # renewed all along
        self.a._stopped = True  # a crash: no more writes
        self.a._timer.cancel()
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.tb.registry.remote, {})
        self.assertEqual(self.tb.gone, ["x"])  # told once, to let mode http forget it
        self.assertEqual(self.b.nodes, ["b"])
        self.assertNotIn("a", self.redis.sets[PREFIX + "nodes"])

    def test_open_through_another_node(self) -> None:
        """
        b's open for a's agent reaches a, which asks the agent to dial b's
        advertised proxy address with b's conn id and secret.
        """
        x = self.ta.login("x")
        self.a.trigger()
        self.clock.advance(1)
        remote = self.tb.registry.remote["x"]
        pending = self.tb.registry.open(remote, object())
        remote.control.send(RequestNewProxyConn(pending.conn_id, pending.secret, "web"))
        self.assertEqual(x.control.sent, [RequestNewProxyConn(pending.conn_id, pending.secret, "web",
                                                              proxy="127.0.0.1:27001")])
        self.assertEqual((self.b.asked, self.a.served), (1, 1))
        # the agent's refusal is relayed to b, which tries elsewhere
        self.a.relay_refusal("gpu", pending.conn_id, "local service web unreachable")
        self.assertEqual(self.tb.refused, [(pending.conn_id, "local service web unreachable")])

    def test_open_for_an_agent_gone(self) -> None:
        """An agent no longer logged in to the asked node: the asking node hears so at once."""
        x = self.ta.login("x")
        self.a.trigger()
        self.clock.advance(1)
        remote = self.tb.registry.remote["x"]
        self.ta.registry.remove(x)
        pending = self.tb.registry.open(remote, object())
        remote.control.send(RequestNewProxyConn(pending.conn_id, pending.secret))
        self.assertEqual(self.tb.refused, [(pending.conn_id, "agent x is not logged in to node a")])

    def test_node_not_listening(self) -> None:
        """A node whose subscriber is gone: publish reaches nobody, the open is refused at once."""
        self.ta.login("x")
        self.a.trigger()
        self.clock.advance(1)
        self.a.subscribed = False
        remote = self.tb.registry.remote["x"]
        pending = self.tb.registry.open(remote, object())
        remote.control.send(RequestNewProxyConn(pending.conn_id, pending.secret))
        self.assertEqual(self.tb.refused, [(pending.conn_id, "node a does not listen")])

    def test_kick(self) -> None:
        """An agent logging in to b is dropped by a at once."""
        old = self.ta.login("x")
        new = self.tb.login("x")
        self.b.logged_in(self.tb, new)
        self.assertEqual(self.ta.dropped, [("x", "logged in again on node b")])
        self.assertEqual(self.ta.codes, [REPLACED])  # (so that the agent backs off)
        self.assertNotIn("x", self.ta.registry.agents)
        self.assertIs(self.tb.registry.agents["x"], new)
        self.assertIsNot(old, new)

    def test_redis_down_and_back(self) -> None:
        """
        Redis hangs: within the command timeout the node is down and forgets
        the remote agents; it tries every quarter second and is up again
        within a second of Redis's return.
        """
        self.ta.login("x")
        self.a.trigger()
        self.clock.advance(1)
        self.assertEqual(self.b.status()["cross_node"], "on")
        self.redis.down = True
        self.clock.pump([0.25] * 12)
        self.assertEqual((self.b.state, self.b.status()["cross_node"]), ("down", "off"))
        self.assertEqual(self.tb.registry.remote, {})
        warnings = [e for e in self.logged if e.get("log_level") == LogLevel.warn and e.get("node") == "b"]
        self.assertEqual(len(warnings), 1)  # said once, not per attempt
        self.assertIn("cross-node routing off", warnings[0]["log_format"])
        # the pending commands of the outage are given up; then Redis answers
        self.redis.down = False
        self.clock.pump([0.25] * 8)
        self.assertEqual(self.b.state, "up")
        self.assertEqual(list(self.tb.registry.remote), ["x"])

    def test_revoked_key_reaches_every_tunnel(self) -> None:
        """
        A key revoked anywhere (the key store publishes its digest on
        rproxy:revoked) logs its agents out of this node's tunnels; a
        malformed digest is one logged line.
        """
        digest = hashlib.sha256(b"tenant-key").digest()
        self.b.received(REVOKED_CHANNEL, digest.hex())
        self.b.received(REVOKED_CHANNEL.encode(), digest.hex().encode())
        self.assertEqual(self.tb.revoked, [digest, digest])
        self.b.received(REVOKED_CHANNEL, "not hex")
        self.assertEqual(self.tb.revoked, [digest, digest])
        lines = [e for e in self.logged if "malformed message" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)

    def test_malformed_message(self) -> None:
        """A malformed message is one logged line; nothing else happens."""
        for data in ("not json", "[]", json.dumps({"op": "open", "tunnel": "gpu"}), "x" * 20000):
            self.b.received(PREFIX + "to:b", data)
        lines = [e for e in self.logged if "malformed message" in e.get("log_format", "")]
        self.assertEqual(len(lines), 4)


class MonitorTests(SynchronousTestCase):
    def test_node_column(self) -> None:
        """In a cluster the monitor shows each agent's node; without one its table is unchanged."""
        from rproxy import cli

        agent = {"id": "a1", "cpu": 1.0, "memory": 2.0, "disk": 3.0, "active_streams": 4, "last_heartbeat_ago": 1}
        lines = cli.monitor_lines({"tunnels": [{"name": "gpu", "agents": [dict(agent, node="edge-2")]}]})
        self.assertIn("Node", lines[0])
        self.assertEqual(lines[2], "gpu        a1                     edge-2           1.00        2.00      3.00"
                                   "        4  1s ago")
        self.assertNotIn("Node", cli.monitor_lines({"tunnels": [{"name": "gpu", "agents": [agent]}]})[0])
