"""
Who is logged in, and which public connections wait for which agent.

Pure state, no I/O: L{Registry} keeps the live agent sessions of one
tunnel, chooses an agent for a new public connection, and hands out
one-time (conn_id, secret) pairs that an agent must present on the proxy
port.  Invariants:

  - at most one session per agent id: a new login with the id of a live
    session replaces it (frp's "proxy already exists" pain avoided);
  - a conn_id is claimed at most once, only with its secret, and only
    while pending (not expired, not claimed);
  - the number of pending opens is bounded by C{max_pending}.
"""

from __future__ import annotations

import hmac
import random
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from rproxy.tunnel.wire import Heartbeat

__all__ = ["AgentSession", "Pending", "Registry", "TooManyPending", "StaticKeys"]


class Sender(Protocol):
    def send(self, message: Any) -> None: ...

    def drop(self, why: str) -> None: ...


@attrs.define(eq=False)
class AgentSession:
    """
    One logged-in agent.
    """

    agent_id: str
    peer: str
    key_name: str
    level: int
    connected_at: float
    last_seen: float
    control: Sender
    system_info: dict[str, Any] = attrs.field(factory=dict)
    devices: tuple[Any, ...] = ()
    models: tuple[str, ...] = ()
    heartbeat: Heartbeat | None = None
    last_heartbeat: float | None = None
    streams: set[Any] = attrs.field(factory=set)
    pool_count: int = 0
    # the agent answers start_stream {ack: true} with start_result
    # (L{rproxy.tunnel.wire}): a pooled connection is handed to a request
    # only once its local service accepted
    start_result: bool = False
    idle: list[Any] = attrs.field(factory=list)
    pool_pending: int = 0
    opening: int = 0
    opened_total: int = 0
    failed_total: int = 0
    # SHA-256 of the key the agent logged in with: public requests that
    # present a dedicated key (level >= 0) reach only its agents
    key_digest: bytes = b""
    # the key's id in the key store (None: a static key of the
    # configuration): revoking it there ends this session
    key_id: int | None = None
    # its key was revoked (the session is being dropped for it)
    revoked: bool = False
    # in a cluster (L{rproxy.cluster}): the node the agent is logged in to
    # when it is another one (None: this node), the streams other nodes
    # have open through it, and what its node says of it
    node: str | None = None
    remote_load: int = 0
    described: dict[str, Any] | None = None

    @property
    def dedicated(self) -> bool:
        return self.level >= 0

    @property
    def load(self) -> int:
        return len(self.streams) + self.opening + self.remote_load

    def describe(self, now: float) -> dict[str, Any]:
        hb = self.heartbeat
        return {
            "id": self.agent_id,
            "peer": self.peer,
            "key": self.key_name,
            "level": self.level,
            "connected_for": round(now - self.connected_at, 3),
            "last_heartbeat_ago": None if self.last_heartbeat is None else round(now - self.last_heartbeat, 3),
            "system_info": self.system_info,
            "devices": list(self.devices),
            "models": list(self.models),
            "cpu": hb.cpu if hb else None,
            "memory": hb.memory if hb else None,
            "disk": hb.disk if hb else None,
            "load": hb.load if hb else None,
            "active_streams": len(self.streams),
            "pooled_idle": len(self.idle),
            "streams_opened": self.opened_total,
            "streams_failed": self.failed_total,
        }


@attrs.define(eq=False)
class Pending:
    conn_id: str
    secret: str = attrs.field(repr=False)
    agent: AgentSession
    public: Any
    timer: Any = None


class TooManyPending(Exception):
    """
    The bound on public connections waiting for an agent is reached.
    """


class StaticKeys:
    """
    API keys from the configuration (C{api_keys:}), compared in constant
    time.  The stores issue adds a PostgreSQL/Redis-backed implementation
    of the same C{check}.
    """

    def __init__(self, keys: Any) -> None:
        self._keys = [(k.key.encode("utf-8"), k) for k in keys]

    def check(self, presented: str) -> Any:
        """
        The key's configuration if C{presented} is a valid key, else None.
        Every configured key is compared, so timing says nothing of which.
        """
        candidate = presented.encode("utf-8")
        found = None
        for key, config in self._keys:
            if hmac.compare_digest(key, candidate):
                found = config
        return found


class Registry:
    def __init__(self, algorithm: str, max_pending: int, rng: random.Random | None = None) -> None:
        self.algorithm = algorithm
        self.max_pending = max_pending
        self.agents: dict[str, AgentSession] = {}
        # agents logged in to other nodes of the cluster (L{rproxy.cluster.registry.merge})
        self.remote: dict[str, AgentSession] = {}
        self.pending: dict[str, Pending] = {}
        self._rng = rng or random.Random()
        self._turn = 0

    # -- sessions --------------------------------------------------------

    def add(self, session: AgentSession) -> AgentSession | None:
        """
        Register C{session}; return the stale session it replaces, if any.
        """
        old = self.agents.get(session.agent_id)
        self.agents[session.agent_id] = session
        return old

    def remove(self, session: AgentSession) -> bool:
        """
        Forget C{session} if it is the current one for its id; return
        whether it was.  Its pending opens are dropped.
        """
        if self.agents.get(session.agent_id) is not session:
            return False
        del self.agents[session.agent_id]
        for conn_id in [c for c, p in self.pending.items() if p.agent is session]:
            pending = self.pending.pop(conn_id)
            if pending.public is None and pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
        return True

    def pick(
        self,
        exclude: set[str],
        eligible: Callable[[AgentSession], bool] | None = None,
        model: str | None = None,
    ) -> AgentSession | None:
        """
        Choose an agent for a new public connection, not one of C{exclude}
        and, if given, one that C{eligible} accepts.  With C{model}, only
        agents serving it, the least busy first.
        """
        candidates = [
            a for a in self.candidates()
            if a.agent_id not in exclude and (eligible is None or eligible(a))
        ]
        if model is not None:
            candidates = [a for a in candidates if model in a.models]
        if not candidates:
            return None
        if model is not None or self.algorithm in ("least-connections", "model"):
            low = min(a.load for a in candidates)
            least = [a for a in candidates if a.load == low]
            # a tie goes to an agent of this node (no round trip through Redis)
            local = [a for a in least if a.node is None]
            return self._rng.choice(local or least)
        if self.algorithm == "round-robin":
            candidates.sort(key=lambda a: a.agent_id)
            self._turn += 1
            return candidates[self._turn % len(candidates)]
        return self._rng.choice(candidates)

    def candidates(self) -> list[AgentSession]:
        """
        Every agent a stream may go to: those logged in here, then those
        logged in to other nodes of the cluster (an id logged in here is
        taken from here).
        """
        if not self.remote:
            return list(self.agents.values())
        return list(self.agents.values()) + [a for i, a in self.remote.items() if i not in self.agents]

    def serves(self, model: str, eligible: Callable[[AgentSession], bool] | None = None) -> bool:
        """
        Whether any logged-in agent (that C{eligible} accepts) serves C{model}.
        """
        return any(model in a.models and (eligible is None or eligible(a)) for a in self.candidates())

    # -- pending opens ---------------------------------------------------

    def open(self, agent: AgentSession, public: Any) -> Pending:
        """
        A new one-time (conn_id, secret) for C{public} through C{agent}, or
        for a pooled connection when C{public} is None.

        @raise TooManyPending: C{max_pending} opens are already waiting.
        """
        if len(self.pending) >= self.max_pending:
            raise TooManyPending(f"{self.max_pending} public connections already wait for agents")
        conn_id = secrets.token_hex(16)
        pending = Pending(conn_id, secrets.token_urlsafe(24), agent, public)
        self.pending[conn_id] = pending
        if public is None:
            agent.pool_pending += 1
        else:
            agent.opening += 1
        return pending

    def claim(self, conn_id: str, secret: str) -> Pending | None:
        """
        Take the pending open C{conn_id} if C{secret} is its secret; it can
        be taken only once.
        """
        pending = self.pending.get(conn_id)
        if pending is None or not hmac.compare_digest(pending.secret.encode(), secret.encode()):
            return None
        del self.pending[conn_id]
        self._uncount(pending)
        return pending

    @staticmethod
    def _uncount(pending: Pending) -> None:
        if pending.public is None:
            pending.agent.pool_pending -= 1
        else:
            pending.agent.opening -= 1

    def forget(self, pending: Pending) -> None:
        """
        Drop a pending open (timed out, or its public client left).
        """
        if self.pending.get(pending.conn_id) is pending:
            del self.pending[pending.conn_id]
            self._uncount(pending)
