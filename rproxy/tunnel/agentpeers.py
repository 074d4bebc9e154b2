"""
The agents of a tunnel's C{mode: http} as the HTTP engine's upstream peers.

  - L{AgentChoice}: the agents one request may go to, as the engine's pool
    interface: the least busy first, ties rotated (C{round-robin}: all in
    turn).
  - L{AgentConnector}: the engine's connector over agents' data
    connections: a kept-alive one of the chosen agent, else a pooled one
    (C{pool_count}), else one requested from the agent; a pool of idle
    ones per agent.  An agent whose local service refused fails the open
    at once (L{AgentRefused}), so that the engine tries the next agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from rproxy.http.upstream import PeerRefused, UpstreamConnection, UpstreamPool
from rproxy.pool import NoServerAvailable
from rproxy.tunnel.httpstats import AgentStats
from rproxy.tunnel.registry import AgentSession, TooManyPending
from rproxy.tunnel.wire import RequestNewProxyConn, StartStream, encode

if TYPE_CHECKING:
    from rproxy.tunnel.server import TunnelServer
    from rproxy.tunnel.streams import ProxyProtocol

__all__ = ["AgentRefused", "AgentPeer", "AgentChoice", "AgentConnector", "shared"]


def shared(agent: AgentSession) -> bool:
    """
    Whether C{agent} logged in with a shared key (level -1): it takes the
    requests that present no dedicated key.
    """
    return not agent.dedicated


def _agent_id(agent: AgentSession) -> str:
    return agent.agent_id


class AgentRefused(PeerRefused):
    """
    An agent could not open a stream (its local service refused, or it did
    not deliver within C{open_timeout}): nothing was sent, the engine may
    try the next agent whatever the method.
    """


class AgentPeer:
    """
    An agent as the engine's peer: its name is the agent id.
    """

    def __init__(self, session: AgentSession) -> None:
        # (instance fields, read per request: the fast path of attribute access)
        self.draining = False
        self.session = session
        self.name = session.agent_id
        self.config = self  # (the engine reads a server's config.name)

    def __repr__(self) -> str:
        return f"<AgentPeer {self.name}>"


class _AgentsConfig:
    def __init__(self) -> None:
        # (instance fields, read per request: the fast path of attribute access)
        self.name = "agents"
        self.tls = None
        self.algorithm = "least-connections"
        self.send_proxy = None


_AGENTS_CONFIG = _AgentsConfig()


class AgentChoice:
    """
    The agents one request may go to (those that C{eligible} accepts and,
    with a model, that serve it), with the engine's pool interface.  The
    least busy (data connections in use, and opening) first; ties taken in
    turn.  An agent has no slots: release is a no-op.
    """

    config = _AGENTS_CONFIG
    servers = ()

    def __init__(self, tunnel: TunnelServer, connector: AgentConnector, model: str | None,
                 eligible: Callable[[AgentSession], bool]) -> None:
        self.config = _AGENTS_CONFIG  # (also on the instance: read per request)
        self.tunnel = tunnel
        self.connector = connector
        self.model = model
        self.eligible = eligible

    def _candidates(self, tried: list[str]) -> list[AgentSession]:
        model, eligible = self.model, self.eligible
        registry = self.tunnel.registry
        # (in a cluster, the agents of other nodes too: rproxy.cluster)
        agents = registry.candidates() if registry.remote else registry.agents.values()
        if eligible is shared:
            # shared (level < 0): the common case, without a call per agent
            if model is None:
                # (a loop, not a comprehension: no function call for the few agents a tunnel has)
                found = []
                for a in agents:
                    if a.level < 0 and a.agent_id not in tried:
                        found.append(a)
                return found
            return [a for a in agents if a.level < 0 and model in a.models and a.agent_id not in tried]
        return [a for a in agents
                if a.agent_id not in tried and eligible(a) and (model is None or model in a.models)]

    def try_acquire(self, key: Any, tried: list[str]) -> AgentPeer | None:
        candidates = self._candidates(tried)
        if not candidates:
            return None
        if len(candidates) == 1:
            peer = self.connector.peers.get(candidates[0])  # (peer(), without a call once known)
            return peer if peer is not None else self.connector.peer(candidates[0])
        if self.model is not None or self.tunnel.config.algorithm != "round-robin":
            low = min(a.load for a in candidates)
            candidates = [a for a in candidates if a.load == low]
        candidates.sort(key=_agent_id)
        self.connector.turn += 1
        return self.connector.peer(candidates[self.connector.turn % len(candidates)])

    def acquire(self, key: Any, tried: list[str]) -> defer.Deferred[AgentPeer]:
        self.tunnel.streams_failed += 1
        if tried:
            why = "no agent answered"
        elif self.model is not None:
            why = f"no agent serving {self.model!r} is connected"
        else:
            why = "no agent is connected"
        return defer.fail(NoServerAvailable(why))

    def try_acquire_named(self, name: str) -> None:
        return None

    def any_up(self, tried: list[str]) -> bool:
        return bool(self._candidates(tried))

    def release(self, peer: AgentPeer, succeeded: bool = False) -> None:
        pass

    def record_success(self, peer: AgentPeer) -> None:
        pass

    def record_failure(self, peer: AgentPeer, why: str) -> None:
        pass


class _Open:
    """
    A data connection requested from an agent, until it arrives (the
    registry's pending open points here).
    """

    def __init__(self, connector: AgentConnector, peer: AgentPeer, pool: Any) -> None:
        self.connector = connector
        self.peer = peer
        self.pool = pool
        self.pending: Any = None
        # a pooled connection told to start, until its agent answers
        self.proxy: ProxyProtocol | None = None
        self.timer: Any = None
        self.started = connector.tunnel.clock.seconds()
        self.d: defer.Deferred[UpstreamConnection] = defer.Deferred(self._cancel)

    def _cancel(self, d: Any) -> None:
        self._forget()

    def _forget(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            pending.timer = None
            self.connector.tunnel.registry.forget(pending)
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            self.peer.session.opening -= 1
            if proxy.starting is self:
                # given up before its agent answered: it cannot serve another
                proxy.starting = proxy.starting_agent = None
                proxy.abort()
        self.connector.opening.discard(self)

    def attach(self, proxy: ProxyProtocol, agent: AgentSession, rest: bytes) -> None:
        """
        The agent delivered the data connection.
        """
        self._forget()
        tunnel = self.connector.tunnel
        tunnel.streams_opened += 1
        tunnel.observe_open(tunnel.clock.seconds() - self.started)
        conn = self.connector.attach(proxy, self.peer, self.pool)
        if not self.d.called:
            self.d.callback(conn)
        else:
            proxy.transport.loseConnection()  # type: ignore[union-attr]
        if rest:
            proxy.dataReceived(rest)

    def stream_refused(self, agent: AgentSession, why: str) -> None:
        self.connector.tunnel.streams_failed += 1
        self.fail(f"agent {agent.agent_id}: {why}")

    def timed_out(self) -> None:
        tunnel = self.connector.tunnel
        self.peer.session.failed_total += 1
        tunnel.log.info("tunnel {tunnel}: agent {agent} did not open a stream within {timeout}s",
                        tunnel=tunnel.name, agent=self.peer.name, timeout=tunnel.config.open_timeout)
        self.fail(f"agent {self.peer.name} did not open a stream in time")

    def fail(self, why: str) -> None:
        self._forget()
        if not self.d.called:
            self.d.errback(AgentRefused(string=why))


class AgentConnector(UpstreamPool):
    """
    The engine's connector to agents: the keep-alive pool per agent is
    L{UpstreamPool}'s; a new connection is a data connection from the
    agent (pooled in advance, or requested).

    @ivar stats: the figures of the requests it serves, per agent and model.
    """

    def __init__(self, tunnel: TunnelServer, clock: Any, idle_timeout: float = 60.0) -> None:
        super().__init__(None, clock, idle_timeout=idle_timeout)
        self.tunnel = tunnel
        self.stats = AgentStats(clock)
        self.peers: dict[AgentSession, AgentPeer] = {}
        self.opening: set[_Open] = set()
        self.turn = 0

    def peer(self, session: AgentSession) -> AgentPeer:
        peer = self.peers.get(session)
        if peer is None:
            peer = self.peers[session] = AgentPeer(session)
        return peer

    def take_idle(self, peer: Any) -> UpstreamConnection | None:
        conn = UpstreamPool.take_idle(self, peer)  # (without a super() object a request)
        if conn is not None:
            peer.session.streams.add(conn.transport_owner)  # type: ignore[attr-defined]
        return conn

    def put(self, conn: UpstreamConnection, now: float | None = None) -> None:
        conn.server.session.streams.discard(conn.transport_owner)  # type: ignore[attr-defined]
        UpstreamPool.put(self, conn, now)

    def get(self, peer: Any, pool: Any, timeout: float) -> defer.Deferred[UpstreamConnection]:
        conn = self.take_idle(peer)
        if conn is not None:
            return defer.succeed(conn)
        self.opened += 1
        tunnel, session = self.tunnel, peer.session
        while session.idle:
            proxy = session.idle.pop()
            if proxy.lost:
                continue
            tunnel.streams_from_pool += 1
            if session.start_result:
                # handed over once the agent says its local service
                # accepted: a refusal then goes to the next agent
                return self._start_pooled(proxy, peer, pool, timeout)
            # an agent that does not answer start_stream: no round trip
            proxy.pooled_by = None
            proxy.transport.write(encode(StartStream(tunnel.config.service)))
            tunnel.streams_opened += 1
            conn = self.attach(proxy, peer, pool)
            tunnel.refill_pool(session)
            return defer.succeed(conn)
        opening = _Open(self, peer, pool)
        try:
            pending = tunnel.registry.open(session, opening)
        except TooManyPending as e:
            tunnel.streams_failed += 1
            return defer.fail(e)
        opening.pending = pending
        self.opening.add(opening)
        pending.timer = self.clock.callLater(timeout, opening.timed_out)
        session.control.send(RequestNewProxyConn(pending.conn_id, pending.secret, tunnel.config.service))
        return opening.d

    def _start_pooled(self, proxy: ProxyProtocol, peer: AgentPeer, pool: Any,
                      timeout: float) -> defer.Deferred[UpstreamConnection]:
        """
        Tell an idle pooled connection of C{peer} to start; the open
        succeeds on the agent's C{start_result ok}, fails (L{AgentRefused})
        on its refusal, or after C{timeout}.
        """
        opening = _Open(self, peer, pool)
        opening.proxy = proxy
        peer.session.opening += 1  # (its load, until the agent answers)
        self.opening.add(opening)
        opening.timer = self.clock.callLater(timeout, opening.timed_out)
        proxy.await_start(opening, peer.session)
        self.tunnel.refill_pool(peer.session)
        return opening.d

    def attach(self, proxy: ProxyProtocol, peer: AgentPeer, pool: Any) -> UpstreamConnection:
        """
        A data connection of C{peer} becomes an upstream connection: the
        proxy protocol hands it its events from now on.
        """
        conn = UpstreamConnection(self, peer, pool)  # type: ignore[arg-type]
        conn.transport_owner = proxy  # type: ignore[attr-defined]
        proxy.upstream = conn
        peer.session.streams.add(proxy)
        peer.session.opened_total += 1
        conn.makeConnection(proxy.transport)
        return conn

    def agent_gone(self, session: AgentSession) -> None:
        """
        C{session} was dropped: its idle connections close, opens waiting
        for it fail now (the engine tries another agent).
        """
        peer = self.peers.pop(session, None)
        if peer is None:
            return
        for conn in self.idle.pop(peer, []):
            conn.transport.abortConnection()  # type: ignore[union-attr]
        for opening in [o for o in self.opening if o.peer is peer]:
            opening.fail(f"agent {peer.name} went away")
