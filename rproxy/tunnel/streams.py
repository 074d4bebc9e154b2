"""
The two ends of a tunnel stream on the server: a user's connection on the
public port (L{PublicProtocol}) and an agent's data connection on the proxy
port (L{ProxyProtocol}), spliced once the agent delivers.

  - L{PublicProtocol}: its early bytes are kept (bounded; reading pauses
    past the bound) while the server asks an agent for a data connection;
    if the agent does not deliver one within C{open_timeout}, or refuses
    (its local service is down), the next agent is asked; with none left
    the user is closed (C{mode: tcp}).  A pooled data connection is
    spliced at once: its agent's refusal cuts the user.
  - L{ProxyProtocol}: its first frame must claim a pending open with the
    right one-time secret; then it is spliced with the public connection
    (L{rproxy.splice}), or, in C{mode: http}, it is an upstream
    connection of the HTTP engine (L{rproxy.tunnel.httpmode}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from rproxy.splice import EarlyDataEnd, SpliceEnd
from rproxy.telemetry.spans import NO_SPAN, start_span
from rproxy.tunnel.registry import AgentSession, Pending, TooManyPending
from rproxy.tunnel.wire import (
    FrameDecoder,
    NewProxyConn,
    ProtocolError,
    RequestNewProxyConn,
    StartResult,
    StartStream,
    encode,
)

if TYPE_CHECKING:
    from rproxy.http.upstream import UpstreamConnection
    from rproxy.tunnel.server import TunnelServer

__all__ = ["PublicProtocol", "ProxyProtocol", "peer_address"]


def peer_address(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:  # noqa: BLE001 - unix sockets and test transports
        return "?"


class PublicProtocol(EarlyDataEnd):
    """
    A user's connection on the public port of a C{mode: tcp} tunnel (in
    C{mode: http} the public port is an HTTP frontend: see
    L{rproxy.tunnel.httpmode}).
    """

    pending: Pending | None = None
    agent: AgentSession | None = None
    proxy: ProxyProtocol | None = None
    # why the stream ended, for its access log line (the first reason wins)
    end: str | None = None
    # the last agent's refusal, until the next agent is asked
    refused: str | None = None
    span: Any = NO_SPAN  # the stream's span, with telemetry (rproxy.telemetry.spans)
    # admission's (L{rproxy.admission.IAdmitted})
    counted = False
    quiet_ticks = 0
    last_total = -1
    queue_timer = None

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.tried: set[str] = set()

    def connectionMade(self) -> None:
        self.started = self.server.clock.seconds()
        self.server.admission.admit(self)

    def start(self) -> None:
        """
        Admitted: ask an agent for a stream.
        """
        self.counted = True
        self.request_stream()

    def activity(self) -> int | None:
        return self.received + (self.proxy.received if self.proxy is not None else 0)

    def idle_abort(self) -> None:
        self.abort()

    def refuse(self) -> None:
        self.ended("refused")
        self.transport.abortConnection()  # type: ignore[union-attr]

    def ended(self, why: str) -> None:
        if self.end is None:
            self.end = why

    def peer_name(self) -> str:
        return peer_address(self.transport)

    # -- choosing and opening ----------------------------------------------

    def request_stream(self) -> None:
        server = self.server
        agent = server.registry.pick(self.tried)
        refused, self.refused = self.refused, None
        if agent is None:
            server.streams_failed += 1
            if refused is not None:
                why = refused
                self.ended("agent_refused")
            else:
                why = "no agent is connected" if not self.tried else "no agent answered"
                self.ended("no_agent")
            server.log.info(
                "tunnel {tunnel}: closing public {peer}: {why}",
                tunnel=server.name, peer=peer_address(self.transport), why=why,
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if refused is not None:
            server.log.info("tunnel {tunnel}: public {peer}: {why}; asking agent {agent}",
                            tunnel=server.name, peer=peer_address(self.transport), why=refused,
                            agent=agent.agent_id)
        self.tried.add(agent.agent_id)
        while agent.idle:
            proxy = agent.idle.pop()
            if proxy.lost:
                continue
            # a pooled connection: no round trip to the agent
            proxy.pooled_by = None
            proxy.transport.write(encode(StartStream(server.config.service)))
            server.streams_from_pool += 1
            self.attach(proxy, agent, b"")
            server.refill_pool(agent)
            return
        try:
            pending = server.registry.open(agent, self)
        except TooManyPending as e:
            server.streams_failed += 1
            self.ended("too_many_pending")
            server.log.warn("tunnel {tunnel}: closing public {peer}: {why}",
                            tunnel=server.name, peer=peer_address(self.transport), why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.pending = pending
        pending.timer = server.clock.callLater(server.config.open_timeout, self.open_timed_out, pending)
        agent.control.send(RequestNewProxyConn(pending.conn_id, pending.secret, server.config.service))

    def stream_refused(self, agent: AgentSession, why: str) -> None:
        """
        The agent could not open this stream (its local service refused):
        nothing was spliced yet, so the next agent is asked, as after
        C{open_timeout}; with none left the connection is closed with the
        agent's reason.
        """
        self.pending = None
        self.refused = f"agent {agent.agent_id}: {why}"
        self.request_stream()

    def retry_elsewhere(self, pending: Pending, why: str) -> None:
        """
        The stream asked through another node will not come (already
        forgotten): the next agent is asked.
        """
        self.pending = None
        self.server.log.info("tunnel {tunnel}: agent {agent} (node {node}) cannot open a stream: {why}",
                             tunnel=self.server.name, agent=pending.agent.agent_id, node=pending.agent.node, why=why)
        self.request_stream()

    def open_timed_out(self, pending: Pending) -> None:
        pending.timer = None
        self.server.registry.forget(pending)
        pending.agent.failed_total += 1
        self.pending = None
        self.server.log.info(
            "tunnel {tunnel}: agent {agent} did not open a stream within {timeout}s",
            tunnel=self.server.name, agent=pending.agent.agent_id, timeout=self.server.config.open_timeout,
        )
        self.request_stream()

    def attach(self, proxy: ProxyProtocol, agent: AgentSession, rest: bytes) -> None:
        """
        The agent delivered: splice, after the bytes each side sent early.
        """
        pending = self.pending
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        self.pending = None
        self.agent = agent
        self.proxy = proxy
        proxy.public = self
        agent.streams.add(self)
        agent.opened_total += 1
        server = self.server
        server.streams_opened += 1
        server.observe_open(server.clock.seconds() - self.started)
        self.span = start_span(getattr(server, "telemetry", None), "tunnel stream", {
            "rproxy.tunnel": server.name, "rproxy.tunnel.agent": agent.agent_id,
            "network.peer.address": peer_address(self.transport)}, kind="server", start=self.started)
        self.join(proxy)
        if rest:
            proxy.dataReceived(rest)

    def readConnectionLost(self) -> None:
        self.ended("client_closed")
        EarlyDataEnd.readConnectionLost(self)

    def end_lost(self, reason: Failure) -> None:
        server = self.server
        if self.end is None:
            self.ended("client_closed" if reason is None or reason.check(ConnectionDone) else "client_reset")
        if server.stream_log is not None:
            agent, proxy = self.agent, self.proxy
            server.stream_log.write(
                server.name, peer_address(self.transport), agent.agent_id if agent is not None else None,
                agent.node if agent is not None else None, None, self.received,
                proxy.received if proxy is not None else 0, server.clock.seconds() - self.started, self.end)
        self.server.public_ended(self)
        if self.pending is not None:
            if self.pending.timer is not None and self.pending.timer.active():
                self.pending.timer.cancel()
            self.server.registry.forget(self.pending)
            self.pending = None
        if self.agent is not None:
            self.agent.streams.discard(self)
            if self.proxy is not None:
                self.server.bytes_in += self.received
                self.server.bytes_out += self.proxy.received
                self.span.end(attributes={"rproxy.tunnel.bytes_in": self.received,
                                          "rproxy.tunnel.bytes_out": self.proxy.received})

    def unlink(self) -> None:
        super().unlink()
        self.proxy = None

    def abort(self) -> None:
        self.ended("aborted")
        for end in (self, self.proxy):
            if end is not None and not end.lost:
                end.transport.abortConnection()  # type: ignore[union-attr]


class ProxyProtocol(SpliceEnd):
    """
    An agent's data connection on the proxy port: spliced with a public
    connection (C{mode: tcp}), or the upstream connection of the HTTP
    engine (C{mode: http}), to which it hands its events.
    """

    public: PublicProtocol | None = None
    pooled_by: AgentSession | None = None
    _timer: IDelayedCall | None = None
    # mode http: the engine's connection over this one
    upstream: UpstreamConnection | None = None
    # a pooled connection sent start_stream {ack}, until its start_result:
    # what waits for it (attach / stream_refused), and its agent
    starting: Any = None
    starting_agent: AgentSession | None = None

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.decoder: FrameDecoder | None = FrameDecoder(1024)

    def connectionMade(self) -> None:
        self._timer = self.server.clock.callLater(
            max(self.server.config.open_timeout, 1.0), self.refuse, "no new_proxy_conn frame in time"
        )

    def dataReceived(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            self.received += len(data)
            upstream.dataReceived(data)
            return
        if self.peer is not None:
            SpliceEnd.dataReceived(self, data)
            return
        if self.starting is not None:
            self._start_result(data)
            return
        if self.decoder is None:
            if self.pooled_by is not None:
                self.refuse("data on an idle pooled connection")
            return
        try:
            messages = self.decoder.feed(data, limit=1)
        except ProtocolError as e:
            self.refuse(f"malformed first frame: {e}")
            return
        if not messages:
            return
        message = messages[0]
        rest = self.decoder.rest()
        self.decoder = None
        if not isinstance(message, NewProxyConn):
            self.refuse(f"expected new_proxy_conn, got {message.type}")
            return
        pending = self.server.registry.claim(message.conn_id, message.secret)
        if pending is None:
            self.server.proxy_refused += 1
            self.refuse("unknown, replayed or expired conn id, or wrong secret")
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if pending.public is None:
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            if rest:
                self.refuse("data on an idle pooled connection")
                return
            self.pooled_by = pending.agent
            pending.agent.idle.append(self)
            return
        pending.public.attach(self, pending.agent, rest)

    def await_start(self, waiter: Any, agent: AgentSession) -> None:
        """
        Send this idle pooled connection's agent C{start_stream {ack}}; its
        C{start_result} goes to C{waiter}: C{attach(proxy, agent, rest)}
        once the local service accepted, C{stream_refused(agent, why)} if
        it did not or the connection ends first.
        """
        self.pooled_by = None
        self.starting, self.starting_agent = waiter, agent
        self.decoder = FrameDecoder(1024)
        self.transport.write(encode(StartStream(self.server.config.service, ack=True)))  # type: ignore[union-attr]

    def _start_result(self, data: bytes) -> None:
        assert self.decoder is not None and self.starting_agent is not None
        agent = self.starting_agent
        try:
            messages = self.decoder.feed(data, limit=1)
        except ProtocolError as e:
            self._start_failed(f"malformed start_result: {e}")
            self.refuse(f"malformed start_result: {e}")
            return
        if not messages:
            return
        result, rest = messages[0], self.decoder.rest()
        if not isinstance(result, StartResult):
            self._start_failed(f"expected start_result, got {result.type}")
            self.refuse(f"expected start_result, got {result.type}")
            return
        waiter = self.starting
        self.starting = self.starting_agent = None
        self.decoder = None
        if result.ok:
            waiter.attach(self, agent, rest)
            return
        why = result.error or "no reason given"
        self.server.log.info("tunnel {tunnel}: agent {agent} reports: {message}",
                             tunnel=self.server.name, agent=agent.agent_id, message=why)
        agent.failed_total += 1
        self.transport.loseConnection()  # type: ignore[union-attr]
        waiter.stream_refused(agent, why)

    def _start_failed(self, why: str) -> None:
        """
        The pooled connection will not start (bad answer, or it closed):
        its waiter is told (nothing reached the agent's service).
        """
        waiter, agent = self.starting, self.starting_agent
        self.starting = self.starting_agent = None
        if waiter is not None and agent is not None:
            agent.failed_total += 1
            waiter.stream_refused(agent, why)

    def readConnectionLost(self) -> None:
        upstream = self.upstream
        if upstream is None:
            if self.public is not None:
                self.public.ended("agent_closed")
            SpliceEnd.readConnectionLost(self)
        elif upstream.relay is not None:
            upstream.readConnectionLost()  # spliced after a 101
        else:
            # the service closed its side: the response (if close-delimited)
            # ends with the connection
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        upstream = self.upstream
        if upstream is None:
            SpliceEnd.writeConnectionLost(self)
        elif upstream.relay is not None:
            upstream.writeConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        upstream = self.upstream
        if upstream is None:
            SpliceEnd.connectionLost(self, reason)
            return
        self.lost = True
        self.end_lost(reason)
        self.upstream = None
        upstream.connectionLost(reason)

    def abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def refuse(self, why: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.decoder = None
        self.server.log.warn(
            "tunnel {tunnel}: refusing proxy connection from {peer}: {why}",
            tunnel=self.server.name, peer=peer_address(self.transport), why=why,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def end_lost(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.public is not None:
            self.public.ended("agent_closed" if reason is None or reason.check(ConnectionDone) else "agent_reset")
        if self.starting is not None:
            self._start_failed("closed its pooled connection before the stream started")
        if self.pooled_by is not None:
            try:
                self.pooled_by.idle.remove(self)
            except ValueError:
                pass
            self.pooled_by = None
        upstream = self.upstream
        if upstream is not None:
            upstream.server.session.streams.discard(self)  # type: ignore[attr-defined]

    def unlink(self) -> None:
        super().unlink()
        self.public = None
