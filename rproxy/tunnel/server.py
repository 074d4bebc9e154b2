"""
The tunnel server: control, proxy and public ports of one C{tunnels:} entry.

  - L{ControlProtocol}: an agent logs in (API key), sends heartbeats and
    model updates, and receives C{request_new_proxy_conn}.
  - L{PublicProtocol} and L{ProxyProtocol} (L{rproxy.tunnel.streams}): a
    user's connection and an agent's data connection, spliced; in
    C{mode: http} the public port is an HTTP frontend whose upstream
    connections are agents' data connections (L{rproxy.tunnel.httpmode}).
  - L{TunnelServer}: the three listeners and the tunnel's state; it drains
    on stop and takes configuration changes in place.

Every malformed frame closes only the connection that sent it, with the
reason logged.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admission import Admission
from rproxy.config.endpoints import parse_endpoint
from rproxy.events import HEARTBEATS
from rproxy.http.frontend import HTTPFrontend
from rproxy.tls import ReloadableCreator, ssl_pairs
from rproxy.transport import server_endpoint
from rproxy.tunnel.config import TunnelConfig
from rproxy.tunnel.httpmode import AgentConnector, frontend_config, tunnel_frontend
from rproxy.tunnel.registry import AgentSession, Pending, Registry, StaticKeys, TooManyPending
from rproxy.tunnel.streamlog import StreamLog
from rproxy.tunnel.streams import ProxyProtocol, PublicProtocol, peer_address
from rproxy.tunnel.wire import (
    MAX_FRAME,
    REPLACED,
    Error,
    FrameDecoder,
    Heartbeat,
    Login,
    LoginResult,
    ModelsUpdate,
    ProtocolError,
    RequestNewProxyConn,
    encode,
)

__all__ = ["TunnelServer", "ControlProtocol", "PublicProtocol", "ProxyProtocol"]


LOGIN_TIMEOUT = 10.0


class ControlProtocol(Protocol):
    """
    One agent's control connection.
    """

    session: AgentSession | None = None
    _login_timer: IDelayedCall | None = None
    _checking = False
    lost = False

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(MAX_FRAME)

    def connectionMade(self) -> None:
        self._login_timer = self.server.clock.callLater(LOGIN_TIMEOUT, self.drop, "no login in time")

    def send(self, message: Any) -> None:
        if self.server.names_proxy and isinstance(message, RequestNewProxyConn) and message.proxy is None:
            message = self.server.with_proxy(message)
        self.transport.write(encode(message))  # type: ignore[union-attr]

    def drop(self, why: str) -> None:
        self.server.log.info(
            "tunnel {tunnel}: closing control connection {peer}: {why}",
            tunnel=self.server.name, peer=peer_address(self.transport), why=why,
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
            for message in messages:
                self.handle(message)
        except ProtocolError as e:
            self.server.log.warn(
                "tunnel {tunnel}: malformed frame from {peer}: {why}",
                tunnel=self.server.name, peer=peer_address(self.transport), why=str(e),
            )
            self.transport.abortConnection()  # type: ignore[union-attr]

    def handle(self, message: Any) -> None:
        if self.transport.disconnecting:  # type: ignore[union-attr]
            return
        if self.session is None:
            if self._checking:
                raise ProtocolError(f"{message.type} before the login was answered")
            if not isinstance(message, Login):
                raise ProtocolError(f"expected login, got {message.type}")
            self.login(message)
            return
        session = self.session
        session.last_seen = self.server.clock.seconds()
        if isinstance(message, Heartbeat):
            session.heartbeat = message
            session.last_heartbeat = session.last_seen
            events = self.server.events
            if events is not None:
                events.emit(HEARTBEATS, {
                    "agent_id": session.agent_id, "at": session.last_seen, "cpu": message.cpu,
                    "memory": message.memory, "disk": message.disk, "load": message.load,
                    "active_streams": message.active_streams,
                })
        elif isinstance(message, ModelsUpdate):
            session.models = message.models
            self.server.describe_agent(session)
            if self.server.cluster is not None:
                self.server.cluster.trigger()
        elif isinstance(message, Error):
            self.server.log.info(
                "tunnel {tunnel}: agent {agent} reports: {message}",
                tunnel=self.server.name, agent=session.agent_id, message=message.message,
            )
            if message.conn_id is not None:
                self.server.stream_refused(session, message.conn_id, message.message)
        else:
            raise ProtocolError(f"unexpected {message.type} on a control connection")

    def login(self, login: Login) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._checking = True
        result = self.server.keys.check(login.api_key or login.token or "")
        if inspect.iscoroutine(result):
            d: defer.Deferred[Any] = defer.Deferred.fromCoroutine(result)
        else:
            d = defer.succeed(result)
        d.addCallback(self.checked, login)
        d.addErrback(self._check_failed, login)

    def _check_failed(self, failure: Failure, login: Login) -> None:
        self.server.log.failure("tunnel {tunnel}: checking the key of {agent} failed", failure,
                                tunnel=self.server.name, agent=login.agent_id)
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def checked(self, key: Any, login: Login) -> None:
        self._checking = False
        if self.lost:
            return
        if key is None:
            self.server.logins_failed += 1
            self.send(LoginResult(ok=False, agent_id=login.agent_id, error="invalid api key"))
            self.drop(f"agent {login.agent_id!r}: invalid api key")
            return
        now = self.server.clock.seconds()
        session = AgentSession(
            agent_id=login.agent_id, peer=peer_address(self.transport), key_name=key.name, level=key.level,
            connected_at=now, last_seen=now, control=self, system_info=login.system_info,
            devices=login.devices, models=login.models, pool_count=login.pool_count,
            start_result=login.start_result,
            key_digest=hashlib.sha256((login.api_key or login.token or "").encode("utf-8")).digest(),
            key_id=getattr(key, "id", None),
        )
        self.session = session
        old = self.server.registry.add(session)
        if old is not None:
            self.server.log.info(
                "tunnel {tunnel}: agent {agent} logged in again from {peer}; replacing its old session",
                tunnel=self.server.name, agent=login.agent_id, peer=session.peer,
            )
            self.server.drop_session(
                old, f"replaced by a new login of agent_id {login.agent_id!r} from {session.peer}", code=REPLACED)
        else:
            self.server.log.info(
                "tunnel {tunnel}: agent {agent} logged in from {peer} (key {key}, models {models})",
                tunnel=self.server.name, agent=login.agent_id, peer=session.peer, key=key.name,
                models=",".join(login.models) or "-",
            )
        self.send(LoginResult(ok=True, agent_id=login.agent_id,
                              heartbeat_interval=self.server.heartbeat_interval))
        self.server.describe_agent(session)
        if self.server.cluster is not None:
            self.server.cluster.logged_in(self.server, session)
        self.server.refill_pool(session)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self.session is not None:
            self.server.drop_session(self.session, "control connection closed")


class _PublicLimits:
    """
    What admission reads of a mode tcp public port: no connection limit,
    no queue, no idle timeout (a stream's ends decide).
    """

    max_connections = 0
    queue_size = 0
    queue_timeout = 0.0
    idle_timeout = 0.0


class _Factory(Factory):
    noisy = False

    def __init__(self, server: TunnelServer, protocol: type) -> None:
        self.server = server
        self.protocol_class = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_class(self.server)


class TunnelServer:
    """
    The three listeners and the state of one tunnel.
    """

    log = Logger()

    def __init__(
        self,
        config: TunnelConfig,
        keys: StaticKeys,
        reactor: Any,
        clock: Any,
        rng: random.Random | None = None,
        heartbeat_interval: float = 10.0,
    ) -> None:
        self.config = config
        self.keys = keys
        self.reactor = reactor
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.registry = Registry(config.algorithm, config.max_pending, rng)
        self.ports: dict[str, IListeningPort] = {}
        # the certificates of the ports that speak TLS, by role, which a
        # reload that keeps the port replaces (L{certificate_files})
        self.certificates: dict[str, ReloadableCreator] = {}
        # mode tcp: the public port's admission (no limits of its own: the
        # drain and its grace period)
        self.admission = Admission(f"tunnel {config.name}", _PublicLimits(), clock)
        self.streams_opened = 0
        self.streams_from_pool = 0
        self.streams_failed = 0
        self.proxy_refused = 0
        self.logins_failed = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_latencies: list[float] = []
        self._sweep: LoopingCall | None = None
        self.observe_open = lambda seconds: None
        self.events: Any = None  # rproxy.events.EventSink, with stores
        self.cluster: Any = None  # rproxy.cluster.node.ClusterNode, with cluster:
        # a worker of workers: N with a cluster (rproxy.workers.views): the
        # endpoint of a port it adopts from the master (role, configured
        # listen string, the one to serve; None: listen as usual), and
        # whether its local opens name its own proxy address (the agent's
        # configured one reaches the master's, not this worker's)
        self.adopt: Callable[[str, str, str], Any] | None = None
        self.names_proxy = False
        self.stream_log: StreamLog | None = None
        self._open_stream_log(config)
        # mode http: the public port's HTTP frontend and its agents connector
        self.http: HTTPFrontend | None = None
        self.connector: AgentConnector | None = None
        if config.mode == "http":
            self.http, self.connector = tunnel_frontend(self)

    @property
    def name(self) -> str:
        return self.config.name

    def _open_stream_log(self, config: TunnelConfig) -> None:
        if self.stream_log is not None:
            self.stream_log.close()
            self.stream_log = None
        if config.access_log == "off":
            return
        try:
            self.stream_log = StreamLog(config.access_log == "json", config.access_log_path, self.clock)
        except OSError as e:
            self.log.error("tunnel {tunnel}: access log {path}: cannot open: {why}; logging to the process log",
                           tunnel=config.name, path=config.access_log_path, why=e.strerror or e)
            self.stream_log = StreamLog(config.access_log == "json", None, self.clock)

    def reopen_access_log(self) -> None:
        """
        Go on in a new stream log file at the same path (after a rotation).
        """
        if self.stream_log is not None:
            self.stream_log.reopen()

    @property
    def public_connections(self) -> set[PublicProtocol]:
        """
        The open public connections of mode tcp.
        """
        return self.admission.connections

    @staticmethod
    def _serving(listen: str, tls: bool, config: TunnelConfig) -> str:
        """
        The listen string a port serves: its own, or for a control or
        proxy port on C{tcp:} of a tunnel with C{tls:}, an C{ssl:} one
        with those files.
        """
        if not (tls and config.tls is not None and listen.startswith("tcp:")):
            return listen

        def esc(path: str) -> str:
            return path.replace("\\", "\\\\").replace(":", "\\:")

        return "ssl:" + listen[4:] + f":privateKey={esc(config.tls.key)}:certKey={esc(config.tls.cert)}"

    def _endpoint(self, listen: str, tls: bool, role: str = "") -> Any:
        serving = self._serving(listen, tls, self.config)
        if self.adopt is not None:
            adopted = self.adopt(role, listen, serving)
            if adopted is not None:
                return adopted
        return server_endpoint(self.reactor, serving)

    def _roles(self, config: TunnelConfig) -> list[tuple[str, str, type, bool]]:
        return [
            ("control", config.control, ControlProtocol, True),
            ("proxy", config.proxy, ProxyProtocol, True),
            ("public", config.public, PublicProtocol, False),
        ]

    async def _listen(self, role: str, listen: str, cls: type, tls: bool) -> bool:
        factory: Any = _Factory(self, cls)
        if role == "public" and self.http is not None:
            factory = self.http
        try:
            endpoint = self._endpoint(listen, tls, role)
            port = await endpoint.listen(factory)
        except Exception as e:  # noqa: BLE001 - reported, the rest still starts
            self.log.error("tunnel {tunnel}: cannot listen on {role} {listen}: {why}",
                           tunnel=self.name, role=role, listen=listen, why=e)
            return False
        self.ports[role] = port
        certificates = getattr(endpoint, "certificates", None)  # (TLS: rproxy.tls.TLSServerEndpoint)
        if certificates is not None:
            self.certificates[role] = certificates
        else:
            self.certificates.pop(role, None)
        host = port.getHost()
        self.log.info("tunnel {tunnel} {role} listening on {address}", tunnel=self.name, role=role,
                      address=f"{getattr(host, 'host', '')}:{getattr(host, 'port', host)}")
        return True

    async def start(self) -> None:
        for role, listen, cls, tls in self._roles(self.config):
            await self._listen(role, listen, cls, tls)
        self.start_sweep()

    def _keeps(self, role: str, old: TunnelConfig, new: TunnelConfig) -> bool:
        """
        Whether going from C{old} to C{new} keeps C{role}'s listener: it
        listens, on the same socket, with TLS both times or neither (other
        certificate files are no reason to listen anew: the reload gives
        them to the kept port, L{certificate_files}), and a public port
        keeps its mode.
        """
        if role not in self.ports or (role == "public" and old.mode != new.mode):
            return False
        tls = role != "public"
        before = parse_endpoint(self._serving(getattr(old, role), tls, old))
        after = parse_endpoint(self._serving(getattr(new, role), tls, new))
        if before.kind != after.kind:
            return False
        return getattr(old, role) == getattr(new, role) or before.same_socket(after)

    def certificate_files(self, config: TunnelConfig) -> list[tuple[str, list[tuple[str, str]], ReloadableCreator]]:
        """
        What a reload to C{config} reads again for this tunnel, before it
        changes anything (L{rproxy.service.RProxyService._certificates_of}):
        for each port with TLS that L{reconfigure} keeps, what it is (for
        errors), the files C{config} names for it (renewed in place, or
        others), and its certificates, which the reload replaces with
        those (new connections get them, open ones keep theirs).  A port
        listened anew reads its files when it listens.
        """
        files = []
        for role, listen, _, tls in self._roles(config):
            certificates = self.certificates.get(role)
            if certificates is not None and self._keeps(role, self.config, config):
                pairs = ssl_pairs(parse_endpoint(self._serving(listen, tls, config)))
                files.append((f"tunnel {self.name} ({role} port)", pairs, certificates))
        return files

    async def reconfigure(self, config: TunnelConfig) -> None:
        """
        Apply a changed configuration of this tunnel in place: agents stay
        logged in and streams stay open; only a port whose address changed
        (or TLS, turned on or off, for the control and proxy ports) is
        listened anew, new address first, the old one closed after
        (connections already accepted on it go on).  The certificates of
        a port kept are not this method's: the reload has given them
        (L{certificate_files}).  Timeouts, limits, keys and modes apply to
        what comes next.
        """
        old, self.config = self.config, config
        if (old.access_log, old.access_log_path) != (config.access_log, config.access_log_path):
            self._open_stream_log(config)
        self.registry.algorithm = config.algorithm
        self.registry.max_pending = config.max_pending
        mode_changed = old.mode != config.mode
        if mode_changed:
            self.http, self.connector = tunnel_frontend(self) if config.mode == "http" else (None, None)
        elif self.http is not None:
            self.http.configure(frontend_config(config))
        for role, listen, cls, tls in self._roles(config):
            if self._keeps(role, old, config):
                continue
            same_address = listen == getattr(old, role) and not (role == "public" and mode_changed)
            previous = self.ports.pop(role, None)
            if previous is not None and same_address:
                # TLS turned on or off: the address must be free to listen again
                self.certificates.pop(role, None)
                await defer.maybeDeferred(previous.stopListening)
                previous = None
            if not await self._listen(role, listen, cls, tls) and previous is not None:
                self.ports[role] = previous  # the new address failed: keep the old one
                continue
            if previous is not None:
                await defer.maybeDeferred(previous.stopListening)
        if old.heartbeat_timeout != config.heartbeat_timeout and self._sweep is not None:
            if self._sweep.running:
                self._sweep.stop()
            self.start_sweep()
        self.log.info("tunnel {tunnel}: configuration changed in place; {agents} agent(s) and {streams} "
                      "stream(s) kept", tunnel=self.name, agents=len(self.registry.agents),
                      streams=len(self.public_connections))

    def stop_accepting(self) -> defer.Deferred[Any]:
        """
        Close the public port (first step of a drain); fires once closed.
        """
        port = self.ports.pop("public", None)
        self.certificates.pop("public", None)
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    async def drain(self, grace: float) -> None:
        """
        Stop accepting public connections at once, let those open finish
        (agents stay logged in, so their streams still open and flow) for
        up to C{grace} seconds, then L{stop}.
        """
        await self.stop_accepting()
        if self.public_connections:
            self.log.info("tunnel {tunnel}: draining {count} public connection(s) for up to {grace}s",
                          tunnel=self.name, count=len(self.public_connections), grace=grace)
        await defer.gatherResults([self.http.drain(grace) if self.http is not None else defer.succeed(None),
                                   self.admission.drain(grace)])
        await self.stop()

    def public_ended(self, public: PublicProtocol) -> None:
        self.admission.forget(public)

    def start_sweep(self) -> None:
        """
        Run L{sweep} every quarter of C{heartbeat_timeout}.
        """
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = self.clock
        interval = max(self.config.heartbeat_timeout / 4, 0.05)
        self._sweep.start(interval, now=False).addErrback(
            lambda f: self.log.failure("tunnel {tunnel}: the heartbeat sweep stopped", f, tunnel=self.name))

    def sweep(self) -> None:
        """
        Drop agents silent for C{heartbeat_timeout}.  A failure is logged
        and the next sweep runs as usual (a LoopingCall whose function
        raises stops for good).
        """
        try:
            now = self.clock.seconds()
            for session in list(self.registry.agents.values()):
                if now - session.last_seen >= self.config.heartbeat_timeout:
                    self.drop_session(session, f"no heartbeat for {self.config.heartbeat_timeout}s")
        except Exception:  # noqa: BLE001 - logged; the sweep goes on
            self.log.failure("tunnel {tunnel}: heartbeat sweep failed", tunnel=self.name)

    def describe_agent(self, session: AgentSession) -> None:
        """
        An agent's system info and models, for the agents table (through
        the event stream, like its heartbeats).
        """
        if self.events is not None:
            self.events.emit(HEARTBEATS, {
                "kind": "agent", "agent_id": session.agent_id, "at": self.clock.seconds(),
                "system_info": session.system_info, "models": list(session.models),
            })

    def drop_session(self, session: AgentSession, why: str, code: str | None = None) -> None:
        """
        Forget C{session}, close its control connection (telling the agent
        C{why}, with C{code} for it to act on) and its streams.
        """
        current = self.registry.remove(session)
        if current:
            self.log.info("tunnel {tunnel}: agent {agent} dropped: {why}",
                          tunnel=self.name, agent=session.agent_id, why=why)
            if self.cluster is not None:
                self.cluster.trigger()
        if self.connector is not None:
            self.connector.agent_gone(session)
        for stream in list(session.streams):
            stream.abort()
        session.streams.clear()
        for proxy in list(session.idle):
            proxy.pooled_by = None
            proxy.transport.abortConnection()
        session.idle.clear()
        control = session.control
        if isinstance(control, ControlProtocol) and control.session is session:
            control.session = None
            if not control.lost:
                control.send(Error(why, code=code))
            control.transport.loseConnection()  # type: ignore[union-attr]
        for public in list(self.public_connections):
            pending = public.pending
            if pending is not None and pending.agent is session:
                if pending.timer is not None and pending.timer.active():
                    pending.timer.cancel()
                public.pending = None
                public.request_stream()

    def revoke_key(self, key_digest: bytes | None = None, key_id: int | None = None) -> int:
        """
        An API key was revoked, named by its SHA-256 digest (what
        C{rproxy:revoked} publishes) or its id in the key store: the
        agents logged in here with it are told why and dropped at once
        (one line each); returns how many.
        """
        revoked = [s for s in self.registry.agents.values()
                   if (key_digest is not None and s.key_digest == key_digest)
                   or (key_id is not None and s.key_id == key_id)]
        for session in revoked:
            session.revoked = True
            self.drop_session(session, f"its API key {session.key_name!r} was revoked")
        return len(revoked)

    def stream_refused(self, session: AgentSession, conn_id: str, why: str) -> None:
        """
        C{session}'s agent cannot open stream C{conn_id} (its local service
        refused): the public connection moves on to the next agent (mode
        tcp; mode http: the engine decides) now rather than after
        C{open_timeout}.  A conn id of another agent, or one no longer
        pending, is ignored.
        """
        pending = self.registry.pending.get(conn_id)
        if pending is None and self.cluster is not None:
            # a stream another node asked of this agent: that node is told
            self.cluster.relay_refusal(self.name, conn_id, why)
            return
        if pending is None or pending.agent is not session:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        self.registry.forget(pending)
        public = pending.public
        if public is None:
            return  # a pooled connection that will not come
        session.failed_total += 1
        public.stream_refused(session, why)

    def remote_gone(self, session: AgentSession) -> None:
        """
        An agent of another node is no longer seen (it left, or Redis did):
        mode http forgets it (its idle data connections close, opens
        waiting for it fail over); streams open through it go on.
        """
        if self.connector is not None:
            self.connector.agent_gone(session)

    def remote_refused(self, pending: Pending, why: str) -> None:
        """
        A stream asked through another node will not come (that node does
        not answer, or its agent refused): a mode tcp client is offered to
        the next agent, a mode http request fails over as the engine
        decides.
        """
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        self.registry.forget(pending)
        public = pending.public
        if public is None:
            return
        pending.agent.failed_total += 1
        retry = getattr(public, "retry_elsewhere", None)
        if retry is not None:
            retry(pending, why)
        else:
            public.stream_refused(pending.agent, why)

    def refill_pool(self, session: AgentSession) -> None:
        """
        Ask C{session}'s agent for pooled connections up to its pool_count.
        """
        while (
            session.pool_count
            and self.registry.agents.get(session.agent_id) is session
            and len(session.idle) + session.pool_pending < session.pool_count
        ):
            try:
                pending = self.registry.open(session, None)
            except TooManyPending:
                return

            def expire(pending: Pending = pending) -> None:
                pending.timer = None
                self.registry.forget(pending)

            pending.timer = self.clock.callLater(self.config.open_timeout, expire)
            session.control.send(RequestNewProxyConn(pending.conn_id, pending.secret, self.config.service, pool=True))

    def with_proxy(self, message: RequestNewProxyConn) -> RequestNewProxyConn:
        """
        C{message} naming this process's advertised proxy address (as a
        stream asked through another node does), when it has one.
        """
        if self.cluster is None:
            return message
        try:
            return attrs.evolve(message, proxy=self.cluster.advertised(self))
        except KeyError:  # the proxy port does not listen
            return message

    def port_of(self, role: str) -> int:
        host: Any = self.ports[role].getHost()
        return int(host.port)

    async def stop(self) -> None:
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports.values()],
                                  consumeErrors=True)
        self.ports.clear()
        self.certificates.clear()
        for session in list(self.registry.agents.values()):
            self.drop_session(session, "tunnel stopping")
        for public in list(self.public_connections):
            public.abort()
        if self.http is not None:
            for conn in list(self.http.connections):
                conn.idle_abort()
        if self.connector is not None:
            self.connector.close()
        if self.stream_log is not None:
            self.stream_log.close()

    def agents(self) -> list[dict[str, Any]]:
        """
        The agents logged in here and, in a cluster, those logged in to
        the other nodes (C{node} says which).
        """
        now = self.clock.seconds()
        listed = []
        here = self.cluster.node_id if self.cluster is not None else None
        for session in sorted(self.registry.candidates(), key=lambda a: a.agent_id):
            if session.node is None:
                entry = session.describe(now)
                if here is not None:
                    entry["node"] = here
            else:
                seen = session.described or {}
                entry = {
                    "id": session.agent_id, "node": session.node, "peer": session.peer, "key": session.key_name,
                    "level": session.level, "connected_for": round(max(now - seen.get("since", now), 0.0), 3),
                    "system_info": seen.get("system_info") or {}, "models": list(session.models),
                    "cpu": seen.get("cpu"), "memory": seen.get("memory"), "disk": seen.get("disk"),
                    "load": seen.get("load"), "active_streams": seen.get("streams", 0),
                    # its node keeps these: unknown here
                    "last_heartbeat_ago": _ago(now, seen.get("heartbeat_at")), "devices": [], "pooled_idle": 0,
                    "streams_opened": None, "streams_failed": None,
                }
            listed.append(entry)
        return listed


def _ago(now: float, then: Any) -> float | None:
    """
    Seconds since C{then} (another node's clock: never negative), or None.
    """
    if isinstance(then, bool) or not isinstance(then, (int, float)):
        return None
    return round(max(now - then, 0.0), 3)
