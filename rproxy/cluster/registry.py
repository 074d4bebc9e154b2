"""
The shared agent registry, as pure state (no I/O).

Each node writes one snapshot (L{snapshot}) under its own key with a TTL:
for each tunnel, the agents logged in to it (id, key name and level,
models, streams, load, when it logged in) and how many streams it has
open through other nodes' agents (C{using}).  A node reads every node's
snapshot and L{merge}s them into its tunnels' registries:

  - an agent logged in to another node becomes a remote L{AgentSession}
    (in C{Registry.remote}) whose C{control} is a L{RemoteControl}: asking
    it for a stream publishes the request to its node;
  - the load of every agent, local or remote, counts the streams every
    other node has open through it (C{remote_load}), so "least load" is
    cluster-wide;
  - an agent listed by two nodes (it moved, and the old node has not yet
    written again) is taken from the one it logged in to last.

A remote session keeps its identity while its agent stays listed, so the
streams and opens this node counts against it stay counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from rproxy.tunnel.registry import AgentSession

__all__ = ["RemoteControl", "snapshot", "merge", "forget_remote", "parse_snapshot"]

# bounds on what is read from another node (Redis is shared, not trusted
# to be well-formed): a malformed snapshot is skipped whole
MAX_AGENTS = 10_000
_TEXT = 256


@attrs.define(eq=False)
class RemoteControl:
    """
    The control of an agent logged in to another node: C{send} hands a
    C{request_new_proxy_conn} to that node (through L{ClusterNode.ask}).
    """

    node: str
    tunnel: str
    ask: Callable[[str, str, str, Any], None]
    agent_id: str = ""

    def send(self, message: Any) -> None:
        self.ask(self.node, self.tunnel, self.agent_id, message)

    def drop(self, why: str) -> None:
        pass  # its node drops it


def _local_streams(session: AgentSession) -> int:
    return len(session.streams) + session.opening


def snapshot(node_id: str, tunnels: Iterable[Any], now: float, serving: bool = True) -> dict[str, Any]:
    """
    What this node writes about itself: per tunnel, its agents (none when
    not C{serving}: it could not hear requests for them) and its streams
    through other nodes' agents.
    """
    document: dict[str, Any] = {"node": node_id, "at": now, "tunnels": {}}
    for tunnel in tunnels:
        registry = tunnel.registry
        agents = []
        if serving:
            for session in registry.agents.values():
                hb = session.heartbeat
                agents.append({
                    "id": session.agent_id, "key": session.key_name, "level": session.level,
                    "models": list(session.models), "streams": _local_streams(session),
                    "since": session.connected_at, "peer": session.peer, "heartbeat_at": session.last_heartbeat,
                    "load": hb.load if hb else None, "cpu": hb.cpu if hb else None,
                    "memory": hb.memory if hb else None, "disk": hb.disk if hb else None,
                    "system_info": session.system_info,
                    # a dedicated agent serves requests bearing its key only
                    # (mode http): the other nodes check the same digest
                    "key_digest": session.key_digest.hex() if session.dedicated else None,
                })
        using = {agent_id: _local_streams(s) for agent_id, s in registry.remote.items() if _local_streams(s)}
        document["tunnels"][tunnel.name] = {"agents": agents, "using": using}
    return document


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > _TEXT:
        raise ValueError("expected a short string")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a count")
    return value


def parse_snapshot(document: Any) -> dict[str, Any]:
    """
    Check another node's snapshot (the fields routing reads).

    @raise ValueError: it is not one.
    """
    if not isinstance(document, dict):
        raise ValueError("not an object")
    _text(document.get("node"))
    tunnels = document.get("tunnels")
    if not isinstance(tunnels, dict):
        raise ValueError("tunnels: not an object")
    for entry in tunnels.values():
        if not isinstance(entry, dict):
            raise ValueError("tunnel: not an object")
        agents, using = entry.get("agents"), entry.get("using")
        if not isinstance(agents, list) or len(agents) > MAX_AGENTS or not isinstance(using, dict):
            raise ValueError("tunnel: agents or using malformed")
        for agent in agents:
            if not isinstance(agent, dict):
                raise ValueError("agent: not an object")
            _text(agent.get("id"))
            _count(agent.get("streams"))
            if isinstance(agent.get("level"), bool) or not isinstance(agent.get("level"), int):
                raise ValueError("agent: level not an integer")
            models = agent.get("models")
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise ValueError("agent: models not a list of names")
            if not isinstance(agent.get("since"), (int, float)):
                raise ValueError("agent: since not a number")
            digest = agent.get("key_digest")
            if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
                raise ValueError("agent: key_digest malformed")
            bytes.fromhex(digest or "")
        for agent_id, count in using.items():
            _text(agent_id)
            _count(count)
    return document


def merge(node_id: str, tunnel: Any, snapshots: Iterable[dict[str, Any]], ask: Callable[..., None],
          now: float) -> list[AgentSession]:
    """
    Make C{tunnel}'s registry see the agents of the other nodes: remote
    sessions in C{registry.remote}, created, updated in place or dropped,
    and every agent's C{remote_load}.

    @return: the remote sessions dropped.
    """
    registry = tunnel.registry
    owners: dict[str, tuple[str, dict[str, Any]]] = {}
    using: dict[str, dict[str, int]] = {}  # agent id -> node -> streams through it
    for document in snapshots:
        node = document["node"]
        entry = document["tunnels"].get(tunnel.name)
        if entry is None:
            continue
        for agent_id, count in entry["using"].items():
            using.setdefault(agent_id, {})[node] = count
        if node == node_id:
            continue
        for agent in entry["agents"]:
            agent_id = agent["id"]
            held = owners.get(agent_id)
            if held is None or agent["since"] > held[1]["since"]:
                owners[agent_id] = (node, agent)
    remote: dict[str, AgentSession] = {}
    for agent_id, (node, agent) in owners.items():
        if agent_id in registry.agents:
            continue  # logged in here (again): the local session wins
        session = registry.remote.get(agent_id)
        if session is None:
            session = AgentSession(
                agent_id=agent_id, peer=str(agent.get("peer") or "?"), key_name=str(agent.get("key") or ""),
                level=agent["level"], connected_at=now, last_seen=now,
                control=RemoteControl(node, tunnel.name, ask, agent_id),
            )
        session.control.node = node  # type: ignore[attr-defined]
        session.node = node
        session.models = tuple(agent["models"])
        session.level = agent["level"]
        session.key_name = str(agent.get("key") or "")
        session.key_digest = bytes.fromhex(agent.get("key_digest") or "")
        session.last_seen = now
        session.described = agent
        # its streams at its node, and through every node but this one
        session.remote_load = agent["streams"] + sum(
            n for other, n in using.get(agent_id, {}).items() if other not in (node_id, node))
        remote[agent_id] = session
    gone = [s for i, s in registry.remote.items() if remote.get(i) is not s]
    registry.remote = remote
    for agent_id, session in registry.agents.items():
        session.remote_load = sum(n for other, n in using.get(agent_id, {}).items() if other != node_id)
    return gone


def forget_remote(tunnel: Any) -> list[AgentSession]:
    """
    Redis is gone: no cross-node routing, loads are this node's own.

    @return: the remote sessions dropped.
    """
    gone = list(tunnel.registry.remote.values())
    tunnel.registry.remote = {}
    for session in tunnel.registry.agents.values():
        session.remote_load = 0
    return gone
