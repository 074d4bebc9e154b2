"""
The two ends of a tunnel stream on the server: a user's connection on the
public port (L{PublicProtocol}) and an agent's data connection on the proxy
port (L{ProxyProtocol}), spliced once the agent delivers.

  - L{PublicProtocol}: its early bytes are kept (bounded; reading pauses
    past the bound) while the server asks an agent for a data connection;
    if the agent does not deliver one within C{open_timeout}, the next
    agent is asked; with none left the user is closed.  In C{mode: http}
    it reads the one request of the connection first (see the class).
  - L{ProxyProtocol}: its first frame must claim a pending open with the
    right one-time secret; then it is spliced with the public connection
    (L{rproxy.splice}).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from rproxy.events import REQUESTS
from rproxy.http.reader import Body, EndOfMessage, HTTPError, RequestHead, RequestReader, Upgrade
from rproxy.splice import EARLY_DATA_LIMIT, EarlyDataEnd, SpliceEnd
from rproxy.tunnel.httpmode import (
    LAST_CHUNK,
    OneRequestReader,
    ResponseHeads,
    chunk,
    looks_like_json,
    model_of,
    openai_error,
    request_head,
)
from rproxy.tunnel.registry import AgentSession, Pending, TooManyPending
from rproxy.tunnel.wire import (
    FrameDecoder,
    NewProxyConn,
    ProtocolError,
    RequestNewProxyConn,
    StartStream,
    encode,
)

if TYPE_CHECKING:
    from rproxy.tunnel.server import TunnelServer

__all__ = ["PublicProtocol", "ProxyProtocol", "peer_address"]


def peer_address(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:  # noqa: BLE001 - unix sockets and test transports
        return "?"


def _shared(agent: AgentSession) -> bool:
    return not agent.dedicated


class PublicProtocol(EarlyDataEnd):
    """
    A user's connection on the public port.

    In C{mode: http} the request is read first (strictly, as the HTTP
    frontend does): the model comes from an C{X-Model} header or the
    C{model} field of a JSON body (read up to C{model_body_limit}, 413
    past it); a bearer key of level >= 0 (dedicated) limits the choice to
    the agents logged in with that key, any other request goes to agents
    with shared keys.  One request per connection: the agent's service
    gets that request rebuilt from what the reader parsed (never the bytes
    after it) with C{Connection: close}, the client gets the response with
    C{Connection: close} (see L{rproxy.tunnel.httpmode}); an upgrade keeps
    its Connection field and its bytes pass once the service answered 101.
    """

    pending: Pending | None = None
    agent: AgentSession | None = None
    proxy: ProxyProtocol | None = None
    # mode: http
    http = False
    reader: RequestReader | None = None
    head: RequestHead | None = None
    model: str | None = None
    eligible: Callable[[AgentSession], bool] | None = None
    key_name: str | None = None
    _head_timer: IDelayedCall | None = None
    _body: list[bytes] | None = None
    _body_size = 0
    _routing = False
    # the request is complete: later bytes are dropped
    _done = False
    # an upgrade's bytes, held until the service answers 101
    _held: list[bytes] | None = None
    _raw = False
    recorded = False

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.tried: set[str] = set()

    def connectionMade(self) -> None:
        self.server.public_connections.add(self)
        self.started = self.server.clock.seconds()
        config = self.server.config
        if config.mode == "http":
            self.http = True
            self.reader = OneRequestReader(8192, 64 * 1024, 100, None)
            self.eligible = _shared
            self._head_timer = self.server.clock.callLater(config.header_timeout, self._head_timed_out)
            return
        self.request_stream()

    # -- mode: http --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.http or self._raw:
            SpliceEnd.dataReceived(self, data)
            return
        self.received += len(data)
        self.http_data(data)

    def unspliced_data(self, data: bytes) -> None:
        if self.http:
            self.http_data(data)
        else:
            EarlyDataEnd.unspliced_data(self, data)

    def forward(self, data: bytes) -> None:
        """
        Bytes of the request for the agent's service: written if the
        stream is open, else kept for it (reading pauses past
        L{EARLY_DATA_LIMIT} once the agent is chosen; before that, the
        body read for its model is bounded by C{model_body_limit}).
        """
        if not data:
            return
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
            return
        if self._early is None:
            self._early = []
        self._early.append(data)
        self._early_size += len(data)
        if self._routing and self._early_size >= EARLY_DATA_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def http_data(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            if sum(map(len, self._held)) >= EARLY_DATA_LIMIT:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        reader = self.reader
        if self._done or reader is None:
            return  # past the one request of this connection
        try:
            events = reader.feed(data)
        except HTTPError as e:
            if self.peer is None and not self._routing:
                self.http_error(e.status, e.reason)
            else:
                self.server.log.info("tunnel {tunnel}: malformed request body from public {peer}: {why}",
                                     tunnel=self.server.name, peer=peer_address(self.transport), why=str(e))
                self.abort()
            return
        head = self.head
        for event in events:
            if isinstance(event, Upgrade):
                self._held = [event.rest] if event.rest else []
                self._done = True
            elif self._done:
                continue
            elif isinstance(event, RequestHead):
                head = self.head = event
                if self._head_timer is not None and self._head_timer.active():
                    self._head_timer.cancel()
                self._head_timer = None
                model = event.header(b"x-model")
                if model is None and looks_like_json(event):
                    self._body = []
                    expect = (event.header(b"expect") or b"").lower() == b"100-continue"
                    if expect:
                        # the client waits for this before sending the body
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
                    self.forward(request_head(event, drop_expect=expect))
                else:
                    self.forward(request_head(event))
                    self.route(model)
                    if self.lost or self.transport.disconnecting:  # type: ignore[union-attr]
                        return
            elif isinstance(event, Body):
                assert head is not None
                self.forward(chunk(event.data) if head.chunked else event.data)
                if self._body is not None:
                    self._body.append(event.data)
                    self._body_size += len(event.data)
                    limit = self.server.config.model_body_limit
                    if self._body_size > limit:
                        self.http_error(413, f"request body over {limit} bytes: too large to read its model")
                        return
            elif isinstance(event, EndOfMessage):
                assert head is not None
                if head.chunked:
                    self.forward(LAST_CHUNK)
                self._done = True
                if self._body is not None:
                    self.route(model_of(b"".join(self._body)))
        if self._done and self._held is None and self.reader is not None:
            self.reader.close()  # (see RequestReader.close)
            self.reader = None

    def upgraded(self) -> None:
        """
        The service answered 101: the bytes after the upgrade request are
        its protocol's; pass them and all that follows.
        """
        held, self._held = self._held, None
        self._raw = True
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if held and self.peer is not None:
            self.peer.transport.write(b"".join(held))  # type: ignore[union-attr]
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def unspliced_eof(self) -> None:
        if self.http and not self._routing:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        EarlyDataEnd.unspliced_eof(self)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._routing:
            self.http_error(408, "request head not received in time")

    def http_error(self, status: int, message: str, retry_after: bool = False) -> None:
        self._routing = True
        self._done = True
        self._early = None
        extra = [(b"Retry-After", b"1")] if retry_after else []
        self.server.log.info("tunnel {tunnel}: {status} for public {peer}: {message}",
                             tunnel=self.server.name, status=status, peer=peer_address(self.transport), message=message)
        self.transport.write(openai_error(status, message, extra=extra))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def route(self, model: bytes | str | None) -> None:
        """
        The head (and what body was needed) is in: check the bearer key,
        then choose an agent.
        """
        self._routing = True
        self._body = None
        if isinstance(model, bytes):
            model = model.decode("utf-8", "replace")
        self.model = model.strip() if model else None
        head = self.head
        assert head is not None
        auth = head.header(b"authorization") or b""
        if auth[:7].lower() != b"bearer " or not auth[7:].strip():
            self.routed()
            return
        presented = auth[7:].strip().decode("latin-1")
        result = self.server.keys.check(presented)
        d = defer.Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else defer.succeed(result)
        d.addCallback(self._key_checked, presented)
        d.addErrback(self._key_failed)

    def _key_failed(self, failure: Failure) -> None:
        self.server.log.failure("tunnel {tunnel}: checking a public bearer key failed", failure,
                                tunnel=self.server.name)
        if not self.lost:
            self.http_error(503, "cannot check the key now", retry_after=True)

    def _key_checked(self, key: Any, presented: str) -> None:
        if self.lost:
            return
        if key is not None:
            self.key_name = key.name
            if key.level >= 0:
                digest = hashlib.sha256(presented.encode("utf-8")).digest()
                self.eligible = lambda agent: agent.dedicated and hmac.compare_digest(agent.key_digest, digest)
        self.routed()

    def routed(self) -> None:
        server = self.server
        if self.model is not None and not server.registry.serves(self.model, self.eligible):
            if server.config.strict_models:
                server.streams_failed += 1
                self.http_error(404, f"model {self.model!r} is not served by any agent")
                return
            self.model = None  # the seed's fallback: any agent
        self.request_stream()

    # -- choosing and opening ----------------------------------------------

    def request_stream(self) -> None:
        server = self.server
        agent = server.registry.pick(self.tried, self.eligible, self.model)
        if agent is None:
            server.streams_failed += 1
            why = "no agent is connected" if not self.tried else "no agent answered"
            if self.http:
                if self.model is not None and not self.tried:
                    why = f"no agent serving {self.model!r} is connected"
                self.http_error(503, why, retry_after=True)
                return
            server.log.info(
                "tunnel {tunnel}: closing public {peer}: {why}",
                tunnel=server.name, peer=peer_address(self.transport), why=why,
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
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
            server.log.warn("tunnel {tunnel}: closing public {peer}: {why}",
                            tunnel=server.name, peer=peer_address(self.transport), why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.pending = pending
        pending.timer = server.clock.callLater(server.config.open_timeout, self.open_timed_out, pending)
        agent.control.send(RequestNewProxyConn(pending.conn_id, pending.secret, server.config.service))

    def stream_refused(self, agent: AgentSession, why: str) -> None:
        """
        The agent could not open this stream: 502 in C{mode: http}, else
        the connection is closed.
        """
        self.pending = None
        if self.http:
            self.http_error(502, f"agent {agent.agent_id}: {why}")
            return
        self.server.log.info("tunnel {tunnel}: closing public {peer}: agent {agent}: {why}",
                             tunnel=self.server.name, peer=peer_address(self.transport), agent=agent.agent_id, why=why)
        self.transport.loseConnection()  # type: ignore[union-attr]

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
        if self.http:
            # requests with a shared key are recorded when their stream ends
            self.recorded = self.key_name is not None and not agent.dedicated
            proxy.response = ResponseHeads(head_request=self.head is not None and self.head.method == b"HEAD")
        self.join(proxy)
        if rest:
            proxy.dataReceived(rest)

    def end_lost(self, reason: Failure) -> None:
        self.server.public_ended(self)
        if self.reader is not None:
            self.reader.close()  # (see RequestReader.close)
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None
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
            if self.recorded:
                self.record()

    def unlink(self) -> None:
        super().unlink()
        self.proxy = None

    def record(self) -> None:
        """
        A request made with a shared key, for the event stream (stats).
        """
        server, head, agent = self.server, self.head, self.agent
        if server.events is None or head is None or agent is None:
            return
        server.events.emit(REQUESTS, {
            "tunnel": server.name, "agent_id": agent.agent_id, "key": self.key_name, "model": self.model,
            "at": self.started, "duration": round(server.clock.seconds() - self.started, 6),
            "method": head.method.decode("latin-1"), "target": head.target.decode("latin-1")[:512],
            "bytes_in": self.received, "bytes_out": self.proxy.received if self.proxy is not None else 0,
        })

    def abort(self) -> None:
        for end in (self, self.proxy):
            if end is not None and not end.lost:
                end.transport.abortConnection()  # type: ignore[union-attr]


class ProxyProtocol(SpliceEnd):
    """
    An agent's data connection on the proxy port.
    """

    public: PublicProtocol | None = None
    pooled_by: AgentSession | None = None
    _timer: IDelayedCall | None = None
    # mode http: the response heads, until the final one has passed
    response: ResponseHeads | None = None

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.decoder: FrameDecoder | None = FrameDecoder(1024)

    def connectionMade(self) -> None:
        self._timer = self.server.clock.callLater(
            max(self.server.config.open_timeout, 1.0), self.refuse, "no new_proxy_conn frame in time"
        )

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            response = self.response
            if response is None:
                SpliceEnd.dataReceived(self, data)
            else:
                self.response_data(response, data)
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

    def response_data(self, response: ResponseHeads, data: bytes) -> None:
        self.received += len(data)
        public = self.public
        try:
            out = response.feed(data)
        except ValueError as e:
            self.server.log.warn("tunnel {tunnel}: bad response from the agent's service: {why}",
                                 tunnel=self.server.name, why=str(e))
            self.response = None
            if public is not None and not public.lost:
                public.transport.write(openai_error(502, "the agent's service sent a malformed response"))  # type: ignore[union-attr]
                public.transport.loseConnection()  # type: ignore[union-attr]
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if out and self.peer is not None:
            self.peer.transport.write(out)  # type: ignore[union-attr]
        if response.state == "body":
            return
        if response.state == "upgraded":
            self.response = None
            if public is not None:
                public.upgraded()
        elif response.state == "done":
            # one request per connection: the exchange ends with its response
            self.response = None
            self.transport.loseConnection()  # type: ignore[union-attr]
            if public is not None and not public.lost:
                public.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        response, public = self.response, self.public
        if response is not None and not response.started and public is not None and not public.lost:
            # mode http: the service (or the agent) closed before answering
            # (a pooled stream whose local service refused ends so): a 502
            # the client can read, rather than a bare close
            self.response = None
            self.server.log.info("tunnel {tunnel}: the agent's stream closed before a response",
                                 tunnel=self.server.name)
            public.transport.write(  # type: ignore[union-attr]
                openai_error(502, "the agent's service closed the connection without answering"))
        SpliceEnd.connectionLost(self, reason)

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
        if self.pooled_by is not None:
            try:
                self.pooled_by.idle.remove(self)
            except ValueError:
                pass
            self.pooled_by = None

    def unlink(self) -> None:
        super().unlink()
        self.public = None
