"""
One node of a cluster: its record in Redis and its pub/sub channels.

Every C{heartbeat_interval} the node writes its snapshot
(L{rproxy.cluster.registry.snapshot}) under C{rproxy:cluster:node:<id>}
with a TTL of C{heartbeat_timeout - heartbeat_interval}, so a node that
dies drops out within C{heartbeat_timeout}; then it reads every node's
snapshot and merges them into its tunnels' registries.  A login, a
logout or a models update writes at once.

Messages (JSON on pub/sub; the one-time secrets travel through Redis, as
the API keys' cache does):

  - C{rproxy:cluster:to:<id>}: C{open} (another node asks this node's
    agent for a stream to that node's proxy address) and C{refused} (the
    agent could not open one asked from here);
  - C{rproxy:cluster:kick}: an agent logged in to a node: any other node
    where it is still logged in drops that session at once.

While Redis does not answer, the remote agents are forgotten (cross-node
routing stops, every node serves its own agents) and Redis is tried every
quarter second, so routing resumes within about a second of its return.
"""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import urlparse

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.cluster.registry import forget_remote, merge, parse_snapshot, snapshot
from rproxy.config.cluster import ClusterConfig
from rproxy.store.auth import REVOKED_CHANNEL
from rproxy.store.links import why
from rproxy.tunnel.wire import REPLACED, RequestNewProxyConn

__all__ = ["ClusterNode", "PREFIX"]

PREFIX = "rproxy:cluster:"
NODES = PREFIX + "nodes"
KICK = PREFIX + "kick"
DOWN_RETRY = 0.25
# conn ids of streams asked through this node by others, kept to relay the
# agent's refusal; bounded
MAX_RELAYED = 10_000
MAX_MESSAGE = 16 * 1024


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClusterNode:
    """
    This node's part in the cluster.

    @ivar state: "connecting", "up" (cross-node routing on) or "down".
    @ivar nodes: the node ids seen alive at the last read.
    """

    log = Logger()

    def __init__(self, config: ClusterConfig, redis_url: str, tunnels: dict[str, Any], reactor: Any,
                 clock: Any, redis: Any = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.redis_url = redis_url
        self.tunnels = tunnels
        self.reactor = reactor
        self.clock = clock
        self.redis = redis
        self._rng = rng or random.Random()
        self.state = "connecting"
        self.nodes: list[str] = []
        self.subscribed = False
        self.subscriber: ClientService | None = None
        self._timer: IDelayedCall | None = None
        self._beating = False
        self._again = False
        self._stopped = False
        self._relayed: dict[str, tuple[str, str, IDelayedCall]] = {}
        self.asked = 0  # streams asked of other nodes
        self.served = 0  # streams asked of this node's agents by others
        self.kicked = 0
        self.down_since: float | None = None

    @property
    def key(self) -> str:
        return f"{PREFIX}node:{self.node_id}"

    @property
    def channel(self) -> str:
        return f"{PREFIX}to:{self.node_id}"

    # -- the service -------------------------------------------------------

    def start(self) -> None:
        url = urlparse(self.redis_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        if self.redis is None:
            import txredisapi

            dbid = int((url.path or "/0").lstrip("/") or 0)
            self.redis = txredisapi.lazyConnection(host, port, dbid=dbid, password=url.password, reconnect=True)
            # reconnect quickly: cross-node routing resumes within 2 s of Redis's return
            self.redis._factory.initialDelay = 0.1
            self.redis._factory.maxDelay = 0.5
        factory = _SubscriberFactory(self, url.password)
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=1)
        self.subscriber = ClientService(endpoint, factory, clock=self.clock,
                                        retryPolicy=lambda attempt: DOWN_RETRY * (1 + self._rng.random()))
        self.subscriber.startService()
        host, port = self.config.advertise_proxy
        self.log.info("cluster: node {node} (advertising proxy {host}, heartbeat {every:g}s, timeout {timeout:g}s)",
                      node=self.node_id, host=_hostport(host, port) if port else f"{host} (each tunnel's proxy port)",
                      every=self.config.heartbeat_interval, timeout=self.config.heartbeat_timeout)
        self._schedule(0)

    async def stop(self) -> None:
        """
        Leave the cluster: this node's record is deleted (if Redis
        answers), so the others stop choosing its agents at once.
        """
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for _, _, timer in self._relayed.values():
            if timer.active():
                timer.cancel()
        self._relayed.clear()
        for tunnel in self.tunnels.values():
            self._gone(tunnel, forget_remote(tunnel))
        if self.subscriber is not None:
            await self.subscriber.stopService()
        if self.redis is not None and self.state == "up":
            d = defer.gatherResults([self.redis.delete(self.key), self.redis.srem(NODES, self.node_id)],
                                    consumeErrors=True)
            d.addTimeout(1.0, self.clock)
            try:
                await d
            except Exception:  # noqa: BLE001 - its TTL ends it anyway
                pass
        if self.redis is not None and hasattr(self.redis, "disconnect"):
            await self.redis.disconnect()

    def status(self) -> dict[str, Any]:
        """
        For /health: this node, whether cross-node routing is on, and the
        nodes and remote agents seen.
        """
        return {
            "node_id": self.node_id,
            "state": self.state,
            "cross_node": "on" if self.state == "up" else "off",
            "subscribed": self.subscribed,
            "nodes": list(self.nodes),
            "remote_agents": sum(len(t.registry.remote) for t in self.tunnels.values()),
            "streams_asked": self.asked,
            "streams_served": self.served,
        }

    # -- the heartbeat -------------------------------------------------------

    def trigger(self) -> None:
        """
        Write (and read) now: something this node's record shows changed.
        """
        if self._stopped:
            return
        if self._beating:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._timer = self.clock.callLater(delay, self._beat)

    def _beat(self) -> None:
        self._timer = None
        self._beating = True
        self._again = False
        d = defer.Deferred.fromCoroutine(self._exchange())
        d.addTimeout(max(self.config.heartbeat_interval, 1.0), self.clock)
        d.addCallbacks(self._up, self._down)
        d.addErrback(lambda f: self.log.failure("cluster: merging the nodes' records failed", f))
        d.addBoth(self._next)

    def _next(self, _: Any) -> None:
        self._beating = False
        if self._again:
            self._schedule(0)
        else:
            self._schedule(self.config.heartbeat_interval if self.state == "up" else DOWN_RETRY)

    async def _exchange(self) -> list[dict[str, Any]]:
        redis = self.redis
        now = self.clock.seconds()
        document = snapshot(self.node_id, self.tunnels.values(), now, serving=self.subscribed)
        ttl = int(1000 * (self.config.heartbeat_timeout - self.config.heartbeat_interval))
        await defer.gatherResults([
            redis.set(self.key, json.dumps(document, separators=(",", ":")), pexpire=max(ttl, 100)),
            redis.sadd(NODES, self.node_id),
        ], consumeErrors=True)
        members = sorted(str(m) for m in (await redis.smembers(NODES) or ()))
        if not members:
            return []
        values = await redis.mget([f"{PREFIX}node:{m}" for m in members])
        snapshots, gone = [], []
        for member, raw in zip(members, values, strict=False):
            if raw is None:
                gone.append(member)
                continue
            try:
                snapshots.append(parse_snapshot(json.loads(raw)))
            except ValueError as e:
                self.log.warn("cluster: skipping the malformed record of node {node}: {why}", node=member, why=e)
        if gone:
            redis.srem(NODES, *gone).addErrback(lambda f: None)
        return snapshots

    def _up(self, snapshots: list[dict[str, Any]]) -> None:
        if self._stopped:
            return
        if self.state != "up":
            self.log.info("cluster: node {node}: Redis answers; cross-node routing on ({count} node(s))",
                          node=self.node_id, count=len(snapshots))
            self.state = "up"
            self.down_since = None
        self.nodes = sorted(d["node"] for d in snapshots)
        now = self.clock.seconds()
        for tunnel in self.tunnels.values():
            self._gone(tunnel, merge(self.node_id, tunnel, snapshots, self.ask, now))

    def _down(self, failure: Failure) -> None:
        if self._stopped:
            return
        if self.state != "down":
            self.log.warn("cluster: node {node}: Redis does not answer ({why}); cross-node routing off, "
                          "this node serves its own agents", node=self.node_id, why=_reason(failure))
            self.state = "down"
            self.down_since = self.clock.seconds()
        self.nodes = []
        for tunnel in self.tunnels.values():
            self._gone(tunnel, forget_remote(tunnel))

    @staticmethod
    def _gone(tunnel: Any, sessions: list[Any]) -> None:
        for session in sessions:
            tunnel.remote_gone(session)

    # -- messages ------------------------------------------------------------

    def advertised(self, tunnel: Any) -> str:
        host, port = self.config.advertise_proxy
        return _hostport(host, port or tunnel.port_of("proxy"))

    def _publish(self, channel: str, message: dict[str, Any]) -> defer.Deferred[Any]:
        if self.state != "up":
            return defer.fail(ConnectionError("Redis is down"))
        d = defer.maybeDeferred(self.redis.publish, channel, json.dumps(message, separators=(",", ":")))
        d.addTimeout(1.0, self.clock)
        return d

    def ask(self, node: str, tunnel_name: str, agent_id: str, message: Any) -> None:
        """
        Ask C{node} to have its agent C{agent_id} open the stream
        C{message} (a C{request_new_proxy_conn}) to this node's proxy port.
        """
        tunnel = self.tunnels.get(tunnel_name)
        if tunnel is None or not isinstance(message, RequestNewProxyConn):
            return
        self.asked += 1
        try:
            proxy = self.advertised(tunnel)
        except KeyError:  # the proxy port does not listen (it could not bind)
            self.refused(tunnel_name, message.conn_id, "this node's proxy port does not listen")
            return
        d = self._publish(f"{PREFIX}to:{node}", {
            "op": "open", "from": self.node_id, "tunnel": tunnel_name, "agent": agent_id,
            "conn_id": message.conn_id, "secret": message.secret, "service": message.service,
            "proxy": proxy,
        })

        def sent(listeners: Any) -> None:
            if not listeners:
                self.refused(tunnel_name, message.conn_id, f"node {node} does not listen")

        d.addCallbacks(sent, lambda f: self.refused(tunnel_name, message.conn_id,
                                                    f"cannot reach node {node}: {why(f)}"))

    def refused(self, tunnel_name: str, conn_id: str, reason: str) -> None:
        """
        A stream asked of another node will not come: try another agent.
        """
        tunnel = self.tunnels.get(tunnel_name)
        if tunnel is None:
            return
        pending = tunnel.registry.pending.get(conn_id)
        if pending is None or pending.agent.node is None:
            return
        tunnel.remote_refused(pending, reason)

    def relay_refusal(self, tunnel_name: str, conn_id: str, reason: str) -> None:
        """
        This node's agent could not open a stream another node asked for:
        tell that node.
        """
        entry = self._relayed.pop(conn_id, None)
        if entry is None:
            return
        node, tunnel, timer = entry
        if timer.active():
            timer.cancel()
        self._publish(f"{PREFIX}to:{node}", {"op": "refused", "tunnel": tunnel, "conn_id": conn_id,
                                             "why": reason[:512]}).addErrback(lambda f: None)

    def logged_in(self, tunnel: Any, session: Any) -> None:
        """
        An agent logged in here: any other node drops its old session now.
        """
        self._publish(KICK, {"op": "kick", "from": self.node_id, "tunnel": tunnel.name,
                             "agent": session.agent_id}).addErrback(lambda f: None)
        self.trigger()

    def received(self, channel: str, data: Any) -> None:
        """
        A pub/sub message; a malformed one is logged (one line) and ignored.
        """
        try:
            if not isinstance(data, (str, bytes)) or len(data) > MAX_MESSAGE:
                raise ValueError("not a short string")
            if channel in (REVOKED_CHANNEL, REVOKED_CHANNEL.encode()):
                self._revoked(data)
                return
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            op, tunnel = message.get("op"), self.tunnels.get(message.get("tunnel"))
            if tunnel is None:
                return
            if op == "open":
                self._open(tunnel, message)
            elif op == "refused":
                self.refused(tunnel.name, _field(message, "conn_id"), str(message.get("why", ""))[:512])
            elif op == "kick":
                self._kick(tunnel, message)
        except (ValueError, TypeError) as e:
            self.log.warn("cluster: ignoring a malformed message on {channel}: {why}", channel=channel, why=e)

    def _open(self, tunnel: Any, message: dict[str, Any]) -> None:
        conn_id, node = _field(message, "conn_id"), _field(message, "from")
        agent_id, proxy = _field(message, "agent"), _field(message, "proxy")
        secret = _field(message, "secret")
        service = message.get("service")
        if service is not None and not isinstance(service, str):
            raise ValueError("service: not a string")
        session = tunnel.registry.agents.get(agent_id)
        if session is None:
            self._publish(f"{PREFIX}to:{node}", {"op": "refused", "tunnel": tunnel.name, "conn_id": conn_id,
                                                 "why": f"agent {agent_id} is not logged in to node {self.node_id}"}
                          ).addErrback(lambda f: None)
            return
        self.served += 1
        if len(self._relayed) < MAX_RELAYED and conn_id not in self._relayed:
            timer = self.clock.callLater(2 * tunnel.config.open_timeout, self._relayed.pop, conn_id, None)
            self._relayed[conn_id] = (node, tunnel.name, timer)
        session.control.send(RequestNewProxyConn(conn_id, secret, service, proxy=proxy))

    def _kick(self, tunnel: Any, message: dict[str, Any]) -> None:
        node, agent_id = _field(message, "from"), _field(message, "agent")
        if node == self.node_id:
            return
        session = tunnel.registry.agents.get(agent_id)
        if session is not None:
            self.kicked += 1
            # (with the code a replaced agent backs off: two agents sharing
            # an agent_id on two nodes would kick each other for ever)
            tunnel.drop_session(session, f"logged in again on node {node}", code=REPLACED)

    def _revoked(self, data: str | bytes) -> None:
        """
        An API key was revoked (C{rproxy:revoked}, published by the key
        store with the key's SHA-256 digest): the agents logged in here
        with it are logged out, as the revoking process does with its own.
        """
        try:
            digest = bytes.fromhex(data.decode("ascii") if isinstance(data, bytes) else data)
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != 32:
            raise ValueError("a revoked key's digest: expected 64 hex digits")
        for tunnel in self.tunnels.values():
            tunnel.revoke_key(key_digest=digest)


def _reason(failure: Failure) -> str:
    if failure.check(defer.FirstError):
        failure = failure.value.subFailure
    if failure.check(defer.CancelledError, defer.TimeoutError):
        return "no answer in time"
    return why(failure)


def _field(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"{key}: expected a short string")
    return value


class _SubscriberFactory(Factory):
    noisy = False

    def __init__(self, node: ClusterNode, password: str | None) -> None:
        self.node = node
        self.password = password

    def buildProtocol(self, addr: object) -> Any:
        protocol = _subscriber_class()(password=self.password)
        protocol.factory = self
        protocol.node = self.node
        return protocol


_SUBSCRIBER: Any = None


def _subscriber_class() -> Any:
    """
    txredisapi's subscriber protocol, told to subscribe on each connection
    and to hand messages to the node (made on first use: txredisapi is
    imported only with a cluster).
    """
    global _SUBSCRIBER
    if _SUBSCRIBER is not None:
        return _SUBSCRIBER
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc, name-defined]
        node: ClusterNode

        def connectionMade(self) -> Any:
            d = super().connectionMade()
            d = d if isinstance(d, defer.Deferred) else defer.succeed(None)
            d.addCallback(lambda _: self.subscribe([self.node.channel, KICK, REVOKED_CHANNEL]))
            d.addCallbacks(self._subscribed, lambda f: self.transport.loseConnection())
            return d

        def _subscribed(self, _: Any) -> None:
            if not self.node.subscribed:
                self.node.subscribed = True
                self.node.trigger()

        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            self.node.received(channel, message)

        def connectionLost(self, reason: Any) -> None:
            if self.node.subscribed:
                self.node.subscribed = False
                self.node.trigger()
            super().connectionLost(reason)

    _SUBSCRIBER = Subscriber
    return Subscriber
