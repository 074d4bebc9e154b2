"""
A tunnel's C{mode: http}: its public port is an HTTP frontend (the engine
of L{rproxy.http}) whose upstream peers are the tunnel's agents.

  - L{TunnelRouting}, a filter: the model of each request (an C{X-Model}
    header, or the C{model} field of its body read up to
    C{model_body_limit}, 413 past it, whatever the Content-Type but files
    and forms), the access level of its bearer key (a dedicated key, level
    >= 0, reaches only the agents logged in with it; any other request
    goes to agents with shared keys), and the event recorded for requests
    with a shared key.
  - L{AgentChoice}: the agents one request may go to, as the engine's pool
    interface: the least busy first, ties rotated (C{round-robin}: all in
    turn).
  - L{AgentConnector}: the engine's connector over agents' data
    connections: a kept-alive one of the chosen agent, else a pooled one
    (C{pool_count}), else one requested from the agent; a pool of idle
    ones per agent.  An agent whose local service refused fails the open
    at once, so that the engine tries the next agent.

Every request on a public connection passes the strict reader and is sent
on rebuilt from what it parsed, so bytes it did not take as a request never
reach a service; the client keeps its connection across requests, which
may go to different agents.  Errors rproxy answers itself have the OpenAI
shape, C{{"error": {"message", "type", "code"}}}.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python.failure import Failure

from rproxy.config import FrontendConfig, HTTPOptions
from rproxy.events import REQUESTS
from rproxy.http.filters import Filter
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.headers import reason
from rproxy.http.reader import RequestHead
from rproxy.http.upstream import PeerRefused, UpstreamConnection, UpstreamPool
from rproxy.pool import NoServerAvailable
from rproxy.tunnel.registry import AgentSession, TooManyPending
from rproxy.tunnel.wire import RequestNewProxyConn, StartStream, encode

if TYPE_CHECKING:
    from rproxy.tunnel.server import TunnelServer
    from rproxy.tunnel.streams import ProxyProtocol

__all__ = ["openai_error", "model_of", "looks_like_json", "AgentRefused", "AgentChoice", "AgentConnector",
           "TunnelRouting", "tunnel_frontend"]

# bodies that cannot hold a JSON "model" field: never read for one
_NOT_JSON = (b"multipart/", b"audio/", b"image/", b"video/", b"application/octet-stream")
_ERROR_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    431: ("invalid_request_error", "headers_too_large"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
    505: ("invalid_request_error", "http_version_not_supported"),
}


def openai_error(status: int, message: str, extra: Iterable[tuple[bytes, bytes]] = (),
                 code: str | None = None) -> bytes:
    """
    A complete response (then close) whose body is an OpenAI-style error,
    C{{"error": {"message", "type", "code"}}}: the shape the OpenAI SDKs
    read the message from (they show only the status code otherwise).
    """
    kind, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                   str(status)))
    body = json.dumps({"error": {"message": message, "type": kind, "code": code or default_code}}).encode() + b"\n"
    lines = [b"HTTP/1.1 %d %s" % (status, reason(status)), b"Content-Type: application/json",
             b"Cache-Control: no-store", b"Content-Length: %d" % len(body), b"Connection: close"]
    lines += [name + b": " + value for name, value in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def looks_like_json(head: RequestHead) -> bool:
    """
    Whether a request's body may hold a JSON C{model} field: any body but
    those whose Content-Type says it is a file or a form (clients send
    JSON as text/plain or without a type too).
    """
    content_type = (head.header(b"content-type") or b"").strip().lower()
    return head.has_body and not content_type.startswith(_NOT_JSON)


def model_of(body: bytes) -> str | None:
    """
    The C{model} field of a JSON request body, if it has one.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) and model else None


def _shared(agent: AgentSession) -> bool:
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

    draining = False

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.name = session.agent_id
        self.config = self  # (the engine reads a server's config.name)

    def __repr__(self) -> str:
        return f"<AgentPeer {self.name}>"


class _AgentsConfig:
    name = "agents"
    tls = None
    algorithm = "least-connections"


class AgentChoice:
    """
    The agents one request may go to (those that C{eligible} accepts and,
    with a model, that serve it), with the engine's pool interface.  The
    least busy (data connections in use, and opening) first; ties taken in
    turn.  An agent has no slots: release is a no-op.
    """

    config = _AgentsConfig()
    servers = ()

    def __init__(self, tunnel: TunnelServer, connector: AgentConnector, model: str | None,
                 eligible: Callable[[AgentSession], bool]) -> None:
        self.tunnel = tunnel
        self.connector = connector
        self.model = model
        self.eligible = eligible

    def _candidates(self, tried: list[str]) -> list[AgentSession]:
        model, eligible = self.model, self.eligible
        return [a for a in self.tunnel.registry.agents.values()
                if a.agent_id not in tried and eligible(a) and (model is None or model in a.models)]

    def try_acquire(self, key: Any, tried: list[str]) -> AgentPeer | None:
        candidates = self._candidates(tried)
        if not candidates:
            return None
        if len(candidates) == 1:
            return self.connector.peer(candidates[0])
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

    def release(self, peer: AgentPeer) -> None:
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
    """

    def __init__(self, tunnel: TunnelServer, clock: Any, idle_timeout: float = 60.0) -> None:
        super().__init__(None, clock, idle_timeout=idle_timeout)
        self.tunnel = tunnel
        self.peers: dict[AgentSession, AgentPeer] = {}
        self.opening: set[_Open] = set()
        self.turn = 0

    def peer(self, session: AgentSession) -> AgentPeer:
        peer = self.peers.get(session)
        if peer is None:
            peer = self.peers[session] = AgentPeer(session)
        return peer

    def take_idle(self, peer: Any) -> UpstreamConnection | None:
        conn = super().take_idle(peer)
        if conn is not None:
            peer.session.streams.add(conn.transport_owner)  # type: ignore[attr-defined]
        return conn

    def put(self, conn: UpstreamConnection, now: float | None = None) -> None:
        conn.server.session.streams.discard(conn.transport_owner)  # type: ignore[attr-defined]
        super().put(conn, now)

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
            # a pooled connection: no round trip to the agent
            proxy.pooled_by = None
            proxy.transport.write(encode(StartStream(tunnel.config.service)))
            tunnel.streams_from_pool += 1
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


class TunnelRouting(Filter):
    """
    The request phase reads the model and checks the bearer key; the
    choose phase gives the engine the agents the request may go to; the
    log phase records requests made with a shared key.
    """

    doing = "routing to an agent"

    def __init__(self, tunnel: TunnelServer, connector: AgentConnector) -> None:
        self.tunnel = tunnel
        self.connector = connector

    def request(self, exchange: Any) -> defer.Deferred[Any] | None:
        head = exchange.head
        exchange.notes = {"model": None, "key": None, "eligible": _shared}
        model = head.header(b"x-model")
        if model is None and looks_like_json(head):
            d = exchange.client.read_ahead(self.tunnel.config.model_body_limit)
            d.addCallback(self._body_read, exchange)
            return d
        return self._route(exchange, model)

    def _body_read(self, body: bytes | None, exchange: Any) -> Any:
        if body is None:
            limit = self.tunnel.config.model_body_limit
            exchange.fail(413, f"request body over {limit} bytes: too large to read its model")
            return None
        return self._route(exchange, model_of(body))

    def _route(self, exchange: Any, model: bytes | str | None) -> defer.Deferred[Any] | None:
        if isinstance(model, bytes):
            model = model.decode("utf-8", "replace")
        notes = exchange.notes
        notes["model"] = model.strip() or None if model else None
        auth = exchange.head.header(b"authorization") or b""
        if auth[:7].lower() != b"bearer " or not auth[7:].strip():
            self._check_model(exchange)
            return None
        presented = auth[7:].strip().decode("latin-1")
        result = self.tunnel.keys.check(presented)
        d = defer.Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else defer.succeed(result)
        d.addCallbacks(self._key_checked, self._key_failed, callbackArgs=(exchange, presented),
                       errbackArgs=(exchange,))
        return d

    def _key_failed(self, failure: Failure, exchange: Any) -> None:
        self.tunnel.log.failure("tunnel {tunnel}: checking a public bearer key failed", failure,
                                tunnel=self.tunnel.name)
        exchange.fail(503, "cannot check the key now", retry_after=True)

    def _key_checked(self, key: Any, exchange: Any, presented: str) -> None:
        if key is not None:
            notes = exchange.notes
            notes["key"] = key.name
            if key.level >= 0:
                digest = hashlib.sha256(presented.encode("utf-8")).digest()
                notes["eligible"] = lambda agent: agent.dedicated and hmac.compare_digest(agent.key_digest, digest)
        self._check_model(exchange)

    def _check_model(self, exchange: Any) -> None:
        notes = exchange.notes
        model = notes["model"]
        if model is not None and not self.tunnel.registry.serves(model, notes["eligible"]):
            if self.tunnel.config.strict_models:
                self.tunnel.streams_failed += 1
                exchange.fail(404, f"model {model!r} is not served by any agent")
                return
            notes["model"] = None  # lenient: any agent

    def choose(self, exchange: Any) -> None:
        notes = exchange.notes
        exchange.pool = AgentChoice(self.tunnel, self.connector, notes["model"], notes["eligible"])

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        upstream = exchange.upstream
        if upstream is not None and exchange.notes:
            exchange.notes["head_size"] = len(upstream.head) + 4  # the head as the service sent it

    def log(self, exchange: Any, backend: str) -> None:
        tunnel, notes = self.tunnel, exchange.notes
        if tunnel.events is None or not notes or notes.get("key") is None or not exchange.tried:
            return
        agent = tunnel.registry.agents.get(exchange.tried[-1])
        if agent is None or agent.dedicated:
            return
        head = exchange.head
        tunnel.events.emit(REQUESTS, {
            "tunnel": tunnel.name, "agent_id": agent.agent_id, "key": notes["key"], "model": notes["model"],
            "at": exchange.started, "duration": round(tunnel.clock.seconds() - exchange.started, 6),
            "method": head.method.decode("latin-1"), "target": head.target.decode("latin-1")[:512],
            "bytes_in": head.content_length or 0,
            "bytes_out": notes.get("head_size", 0) + exchange.client.delivered - exchange.delivered_before,
        })


def frontend_config(config: Any) -> FrontendConfig:
    """
    The HTTP frontend configuration of a tunnel's public port: its
    reader's limits (no body limit: bodies stream to the agent), its
    header timeout, no response timeout (a model may think for long),
    the agents' open timeout as the connect timeout.
    """
    return FrontendConfig(
        name=config.name, listen=config.public, backend="agents", protocol="http",
        connect_timeout=config.open_timeout,
        http=HTTPOptions(max_body=None, header_timeout=config.header_timeout, response_timeout=0.0),
    )


def _tracing(frontend: HTTPFrontend) -> list[Filter]:
    from rproxy.http.filters.tracing import TracingFilter

    return [TracingFilter(frontend.telemetry, frontend)] if frontend.telemetry is not None else []


def tunnel_frontend(tunnel: TunnelServer) -> tuple[HTTPFrontend, AgentConnector]:
    """
    The HTTP frontend of C{tunnel}'s public port, and its connector.
    """
    connector = AgentConnector(tunnel, tunnel.clock)
    routing = TunnelRouting(tunnel, connector)
    frontend = HTTPFrontend(frontend_config(tunnel.config), {"agents": AgentChoice}, tunnel.reactor,  # type: ignore[dict-item]
                            tunnel.clock, connector, filters=lambda f: _tracing(f) + [routing],
                            error_response=openai_error)
    return frontend, connector
