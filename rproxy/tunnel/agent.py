"""
The agent: dials the server's control port from behind NAT and opens data
connections on request.

  - L{AgentService} keeps the control connection up with a
    C{ClientService}: reconnects back off from C{reconnect.initial}
    doubling to C{reconnect.max}, with full jitter.
  - Each attempt says where it connects; a login says to which server,
    as which agent and serving what; each failure says why (refused key,
    TLS verification, unreachable).  With C{exit_on_login_failure} an
    agent whose first login fails gives up (frpc's C{loginFailExit}).
  - A session the server ends because a new login with the same agent id
    took its place is logged as a warning (another agent with this id?);
    replaced again soon after each login, the agent waits longer each time.
  - L{AgentControl} logs in, sends a heartbeat every
    C{heartbeat_interval} (CPU, memory and disk usage, load, streams), and
    answers C{request_new_proxy_conn} by connecting to the local service,
    then to the proxy port, sending C{new_proxy_conn} first and splicing.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import socket
import uuid
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import defer, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.config.values import parse_hostport
from rproxy.splice import SpliceEnd, splice
from rproxy.tls import tls_failure
from rproxy.transport import connect_tcp
from rproxy.tunnel.config import AgentConfig, ServiceConfig
from rproxy.tunnel.wire import (
    MAX_FRAME,
    REPLACED,
    Error,
    FrameDecoder,
    Heartbeat,
    Login,
    LoginResult,
    ModelsUpdate,
    NewProxyConn,
    ProtocolError,
    RequestNewProxyConn,
    StartResult,
    StartStream,
    encode,
)

__all__ = ["AgentService", "SystemStats", "full_jitter"]


def full_jitter(initial: float, maximum: float, rng: random.Random | None = None) -> Any:
    """
    A C{ClientService} retry policy: a random delay between 0 and
    C{min(maximum, initial * 2 ** attempts)} ("full jitter").
    """
    rng = rng or random.Random()

    def policy(attempts: int) -> float:
        return rng.uniform(0, min(maximum, initial * 2 ** min(attempts, 32)))

    return policy


class SystemStats:
    """
    CPU, memory and disk usage in percent, from /proc and statvfs.
    """

    def __init__(self, proc: str = "/proc", disk_path: str = "/") -> None:
        self.proc = proc
        self.disk_path = disk_path
        self._last: tuple[int, int] | None = None

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            with open(os.path.join(self.proc, "stat")) as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def cpu(self) -> float:
        now = self._cpu_times()
        last, self._last = self._last, now
        if now is None or last is None or now[0] == last[0]:
            return 0.0
        total, idle = now[0] - last[0], now[1] - last[1]
        # (within 0-100 even when a counter went back between the readings)
        return min(100.0, max(0.0, round(100.0 * (total - idle) / total, 2)))

    def memory(self) -> float:
        values: dict[str, int] = {}
        try:
            with open(os.path.join(self.proc, "meminfo")) as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    values[name] = int(rest.split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = values.get("MemTotal", 0)
        available = values.get("MemAvailable", values.get("MemFree", 0))
        return round(100.0 * (total - available) / total, 2) if total else 0.0

    def disk(self) -> float:
        try:
            st = os.statvfs(self.disk_path)
        except OSError:
            return 0.0
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return round(100.0 * (total - free) / total, 2) if total else 0.0

    def load(self) -> float:
        try:
            return round(os.getloadavg()[0], 2)
        except OSError:
            return 0.0

    def system_info(self) -> dict[str, Any]:
        return {
            "hostname": socket.gethostname(),
            "os": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count() or 0,
            "python": platform.python_version(),
        }


class LocalEnd(SpliceEnd):
    """
    The agent's connection to its local service.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def connectionMade(self) -> None:
        self.stream.local_connected(self)

    def end_lost(self, reason: Failure) -> None:
        self.stream.ended()


class ProxyEnd(SpliceEnd):
    """
    The agent's data connection to the server's proxy port.  A pooled one
    reads frames until C{start_stream}, then keeps what follows for the
    local service.
    """

    decoder: FrameDecoder | None = None
    address: tuple[str, int] | None = None

    def __init__(self, stream: Stream, address: tuple[str, int] | None = None) -> None:
        self.stream = stream
        self.address = address

    def connectionMade(self) -> None:
        self.stream.proxy_connected(self)

    def unspliced_data(self, data: bytes) -> None:
        if self.decoder is None:
            self.stream.early.append(data)
            return
        try:
            messages = self.decoder.feed(data, limit=1)
        except ProtocolError as e:
            self.stream.control.agent.log.warn("agent: bad frame on a pooled connection: {why}", why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if not messages:
            return
        rest = self.decoder.rest()
        self.decoder = None
        if not isinstance(messages[0], StartStream):
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if rest:
            self.stream.early.append(rest)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.stream.start_pooled(messages[0])

    def end_lost(self, reason: Failure) -> None:
        if reason.check(SSL.Error):
            agent = self.stream.control.agent
            agent.log.error("agent {agent}: TLS with the server's proxy port {server} failed: {why}",
                            agent=agent.agent_id, server=_hostport(self.address or agent.current[1]), why=_tls_reason(reason))
        self.stream.ended()


class _OneShot(ClientFactory):
    noisy = False

    def __init__(self, build: Any, failed: Any) -> None:
        self.build = build
        self.failed = failed

    def buildProtocol(self, addr: object) -> Protocol:
        return self.build()

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.failed(reason)


class Stream:
    """
    One requested stream: local service first, then the proxy port.
    """

    def __init__(self, control: AgentControl, request: RequestNewProxyConn, service: ServiceConfig) -> None:
        self.control = control
        self.request = request
        self.service = service
        self.local: LocalEnd | None = None
        self.proxy: ProxyEnd | None = None
        self.early: list[bytes] = []
        self.done = False
        # pooled: the server asked for a start_result before the stream
        self.ack = False

    def start(self) -> None:
        if self.request.pool:
            # pooled: the proxy connection first, the local one on start_stream
            self._connect_proxy()
            return
        self._connect_local()

    def start_pooled(self, start: StartStream) -> None:
        self.control.pooled.discard(self)
        self.ack = start.ack
        service = self.control.agent.service_for(start.service)
        if service is None:
            self._refuse_pooled(f"no local service named {start.service!r}")
            return
        self.service = service
        self._connect_local()

    def _refuse_pooled(self, why: str) -> None:
        """
        A pooled stream cannot start: with C{ack} the server is told why on
        its connection (it tries another agent); without, the connection is
        cut.
        """
        assert self.proxy is not None
        transport: Any = self.proxy.transport
        if self.ack:
            transport.write(encode(StartResult(ok=False, error=why)))
            transport.loseConnection()
        else:
            transport.abortConnection()

    def _connect_local(self) -> None:
        agent = self.control.agent
        connect_tcp(
            agent.reactor, self.service.host, self.service.port,
            _OneShot(lambda: LocalEnd(self), self.local_failed), agent.config.connect_timeout,
        )

    def local_failed(self, reason: Failure) -> None:
        self.done = True
        self.control.agent.log.warn(
            "agent: local service {service} unreachable: {why}",
            service=self.service.name, why=reason.getErrorMessage(),
        )
        why = f"local service {self.service.name} unreachable"
        if self.proxy is not None:  # pooled
            self._refuse_pooled(why)
            if self.ack:
                return  # the server was told on the connection
        # the conn id lets the server fail this stream now (a pooled one
        # without ack is failed by closing its proxy connection above)
        self.control.send(Error(why, conn_id=None if self.request.pool else self.request.conn_id))

    def local_connected(self, local: LocalEnd) -> None:
        self.local = local
        if self.proxy is not None:  # pooled: the proxy side is ready
            if self.proxy.lost:
                local.transport.loseConnection()  # type: ignore[union-attr]
                return
            if self.ack:
                self.proxy.transport.write(encode(StartResult(ok=True)))  # type: ignore[union-attr]
            if self.early:
                local.transport.write(b"".join(self.early))  # type: ignore[union-attr]
                self.early = []
            self.control.streams.add(self)
            splice(local, self.proxy)
            return
        local.transport.pauseProducing()  # type: ignore[union-attr]
        self._connect_proxy()

    def _connect_proxy(self) -> None:
        agent = self.control.agent
        address = agent.current[1]
        if self.request.proxy is not None:
            # a stream opened through another node of the server's cluster
            try:
                address = parse_hostport(self.request.proxy)
            except ValueError as e:
                self.proxy_failed(Failure(e))
                return
        if agent.plain(address):
            # plain TCP to an IP: the immediate-send transport, no wrapper
            host, port = address
            connect_tcp(agent.reactor, host, port, _OneShot(lambda: ProxyEnd(self, address), self.proxy_failed),
                        agent.config.connect_timeout)
            return
        factory = Factory.forProtocol(lambda: ProxyEnd(self, address))
        factory.noisy = False  # a factory per stream: no start/stop lines
        d = agent.endpoint(address).connect(factory)
        d.addErrback(self.proxy_failed)

    def proxy_failed(self, reason: Failure) -> None:
        self.control.agent.log.warn("agent: cannot reach the proxy port: {why}", why=reason.getErrorMessage())
        if self.local is not None:
            self.local.transport.loseConnection()  # type: ignore[union-attr]

    def proxy_connected(self, proxy: ProxyEnd) -> None:
        self.proxy = proxy
        if self.request.pool:
            proxy.decoder = FrameDecoder(1024)
            proxy.transport.write(encode(NewProxyConn(self.request.conn_id, self.request.secret)))  # type: ignore[union-attr]
            self.control.pooled.add(self)
            return
        if self.local is None or self.local.lost:
            proxy.transport.loseConnection()  # type: ignore[union-attr]
            return
        proxy.transport.write(encode(NewProxyConn(self.request.conn_id, self.request.secret)))  # type: ignore[union-attr]
        self.control.streams.add(self)
        splice(self.local, proxy)

    def ended(self) -> None:
        self.control.streams.discard(self)
        self.control.pooled.discard(self)


class AgentControl(Protocol):
    """
    The control connection, seen from the agent.
    """

    logged_in = False
    _heartbeat: IDelayedCall | None = None
    # the models the login carried: a models_from answer that arrives
    # before the login is answered is sent right after it
    advertised: tuple[str, ...] = ()
    refused = False
    # why the session ended before a login (None: it logged in, or not yet)
    failure: str | None = None
    # when the login was accepted, and whether the server then said a new
    # login with this agent id replaced the session
    logged_in_at = 0.0
    replaced = False

    def __init__(self, agent: AgentService) -> None:
        self.agent = agent
        self.decoder = FrameDecoder(MAX_FRAME)
        self.streams: set[Stream] = set()
        self.pooled: set[Stream] = set()

    def connectionMade(self) -> None:
        agent = self.agent
        self.advertised = agent.models
        self.send(Login(
            agent_id=agent.agent_id, api_key=agent.config.api_key,
            system_info=agent.stats.system_info(), models=agent.models,
            pool_count=agent.config.pool_count, start_result=True,
        ))

    def send(self, message: Any) -> None:
        self.transport.write(encode(message))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data):
                self.handle(message)
        except ProtocolError as e:
            self.agent.log.warn("agent: malformed frame from the server: {why}", why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]

    def handle(self, message: Any) -> None:
        if isinstance(message, LoginResult):
            agent = self.agent
            if not message.ok:
                agent.log.error("agent {agent}: login to {server} refused: {why}", agent=agent.agent_id,
                                server=agent.current_name, why=message.error or "no reason given")
                self.refused = True
                self.failure = f"login refused: {message.error or 'no reason given'}"
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.logged_in = True
            self.logged_in_at = agent.clock.seconds()
            agent.log.info("agent {agent}: logged in to {server} as {name}, serving {services}; models: {models}",
                           agent=agent.agent_id, server=agent.current_name,
                           name=message.agent_id or agent.agent_id,
                           services=", ".join(f"{s.name} ({_hostport((s.host, s.port))})"
                                              for s in agent.config.services),
                           models=", ".join(agent.models) or (
                               f"from {agent.config.models_from}" if agent.config.models_from else "none"))
            agent.connected(self)
            if self.agent.models != self.advertised:
                self.send(ModelsUpdate(self.agent.models))
            self._schedule_heartbeat(0)
        elif isinstance(message, RequestNewProxyConn) and self.logged_in:
            service = self.agent.service_for(message.service)
            if service is None:
                self.send(Error(f"no local service named {message.service!r}", conn_id=message.conn_id))
                return
            Stream(self, message, service).start()
        elif isinstance(message, Error) and message.code == REPLACED and self.logged_in:
            self.replaced = True
            self.agent.log.warn(
                "agent {agent}: the server {server} ended this session: {why}; is another agent running "
                "with the same agent_id (a copied state_dir)?  Each needs its own; logging in again after "
                "a growing delay", agent=self.agent.agent_id, server=self.agent.current_name,
                why=message.message)
        elif isinstance(message, Error):
            self.agent.log.warn("agent: server says: {message}", message=message.message)
        else:
            raise ProtocolError(f"unexpected {message.type} from the server")

    def _schedule_heartbeat(self, delay: float) -> None:
        self._heartbeat = self.agent.clock.callLater(delay, self._beat)

    def _beat(self) -> None:
        stats = self.agent.stats
        try:
            self.send(Heartbeat(cpu=stats.cpu(), memory=stats.memory(), disk=stats.disk(),
                                load=stats.load(), active_streams=len(self.streams)))
        except Exception:  # noqa: BLE001 - a heartbeat must never stop the loop
            self.agent.log.failure("agent: heartbeat failed")
        self._schedule_heartbeat(self.agent.config.heartbeat_interval)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        for stream in list(self.pooled):  # idle pooled connections die with the session
            if stream.proxy is not None:
                stream.proxy.transport.abortConnection()  # type: ignore[union-attr]
        self.pooled.clear()
        if self.replaced:
            pass  # logged when the server said so
        elif self.logged_in:
            self.agent.log.info("agent {agent}: control connection to {server} lost; reconnecting",
                                agent=self.agent.agent_id, server=self.agent.current_name)
        elif self.refused:
            pass  # logged when the refusal came
        elif reason is not None and reason.check(SSL.Error):
            self.failure = f"TLS verification failed: {_tls_reason(reason)}"
            self.agent.log.error("agent {agent}: TLS with the server {server} failed: {why}",
                                 agent=self.agent.agent_id, server=self.agent.current_name,
                                 why=_tls_reason(reason))
        else:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.failure = f"the server closed the connection before a login: {why}"
            self.agent.log.warn("agent {agent}: the server {server} closed the connection before a login: {why}",
                                agent=self.agent.agent_id, server=self.agent.current_name,
                                why=why)
        self.agent.disconnected(self)


class _ControlFactory(Factory):
    noisy = False

    def __init__(self, agent: AgentService) -> None:
        self.agent = agent

    def buildProtocol(self, addr: object) -> AgentControl:
        return AgentControl(self.agent)


@implementer(IStreamClientEndpoint)
class _Announced:
    """
    The control endpoint, saying where each attempt connects and why one
    failed (the reason in words, not an exception's repr); its repr is the
    address, for Twisted's own "Scheduling retry" line.
    """

    def __init__(self, endpoint: Any, agent: AgentService) -> None:
        self.endpoint = endpoint
        self.agent = agent

    def __repr__(self) -> str:
        return self.agent.current_name

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        agent = self.agent
        agent.log.info("agent {agent}: connecting to {server}", agent=agent.agent_id, server=repr(self))
        endpoint = self.endpoint if self.endpoint is not None else agent.endpoint(agent.current[0])
        d: defer.Deferred[Any] = defer.maybeDeferred(endpoint.connect, factory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> Failure:
        agent = self.agent
        why = _unreachable(failure, agent.config.connect_timeout)
        agent.log.warn("agent {agent}: cannot reach the server {server}: {why}", agent=agent.agent_id,
                       server=repr(self), why=why)
        agent.login_failed(f"unreachable: {why}")
        agent.next_server()
        return failure


def _unreachable(failure: Failure, timeout: float) -> str:
    from twisted.internet import error

    if failure.check(error.ConnectionRefusedError):
        return "connection refused (is the server running, is this its control port?)"
    if failure.check(error.TimeoutError, error.UserError, defer.CancelledError):
        return f"no answer within {timeout:g}s"
    if failure.check(error.DNSLookupError):
        return "its name does not resolve"
    if failure.check(error.NoRouteError):
        return "no route to the host"
    return failure.getErrorMessage() or failure.type.__name__


class AgentService(MultiService):
    """
    Keeps an agent logged in to its server.
    """

    log = Logger()
    # with exit_on_login_failure, called (once) when the first login fails;
    # the agent's command stops the process with status 1 (see agenttap);
    # unset, the service stops
    on_login_failure: Any = None

    def __init__(self, config: AgentConfig, reactor: Any, clock: Any = None,
                 rng: random.Random | None = None, stats: SystemStats | None = None,
                 control_endpoint: Any = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.stats = stats or SystemStats()
        self.agent_id = config.agent_id or _stored_agent_id(config.state_dir)
        self.control: AgentControl | None = None
        # the advertised models: config.models, or what models_from answers
        self.models: tuple[str, ...] = config.models
        self._models_timer: IDelayedCall | None = None
        self._models_problem: str | None = None
        self._web: Any = None
        self._authority: Any = None
        self._tls: dict[str, Any] = {}
        if config.ca is not None:
            with open(config.ca, "rb") as f:
                self._authority = ssl.Certificate.loadPEM(f.read())
        # the servers known (config.servers) and the one in use: the agent
        # moves to the next when its own goes away
        self.servers = config.servers or ((config.control, config.proxy),)
        self.server_index = 0
        # Control connections that ended without a login (refused, TLS
        # failed, closed by the server) in a row.  ClientService counts
        # only failed TCP connects: without this an agent whose TCP connect
        # succeeds but whose login fails would retry at the first step of
        # the backoff for ever.
        self.failed_logins = 0
        # Sessions replaced by a new login with this agent id (another
        # agent with the same id, such as a cloned VM's), each soon after
        # the one before: the reconnect delay grows with them, so that two
        # such agents do not take each other's place every second.
        self.replaced = 0
        self.ever_logged_in = False
        self.gave_up = False
        jitter = full_jitter(config.reconnect_initial, config.reconnect_max, rng)
        self.client = ClientService(
            _Announced(control_endpoint, self),
            _ControlFactory(self),
            retryPolicy=lambda attempts: jitter(attempts + self.failed_logins + self.replaced),
            clock=self.clock,
        )
        self.client.setServiceParent(self)

    @property
    def current(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """
        The (control, proxy) addresses of the server in use.
        """
        return self.servers[self.server_index]

    @property
    def current_name(self) -> str:
        return _hostport(self.current[0])

    def next_server(self) -> None:
        """
        Try the next known server on the next attempt.
        """
        if len(self.servers) > 1:
            self.server_index = (self.server_index + 1) % len(self.servers)

    def plain(self, address: tuple[str, int]) -> bool:
        """
        Whether C{address} is dialed as plain TCP to an IP (no TLS, no name).
        """
        return self._authority is None and (isIPAddress(address[0]) or isIPv6Address(address[0]))

    @property
    def plain_proxy(self) -> bool:
        return self.plain(self.current[1])

    def endpoint(self, address: tuple[str, int]) -> Any:
        endpoint: Any = HostnameEndpoint(self.reactor, address[0], address[1], timeout=self.config.connect_timeout)
        if self._authority is not None:
            hostname = self.config.server_name or self.current[0][0]
            tls = self._tls.get(hostname)
            if tls is None:
                tls = self._tls[hostname] = ssl.optionsForClientTLS(hostname, trustRoot=self._authority)
            endpoint = wrapClientTLS(tls, endpoint)
        return endpoint

    def service_for(self, name: str | None) -> ServiceConfig | None:
        if name is None:
            return self.config.services[0]
        for service in self.config.services:
            if service.name == name:
                return service
        return None

    def connected(self, control: AgentControl) -> None:
        self.control = control
        self.failed_logins = 0
        self.ever_logged_in = True

    def login_failed(self, why: str) -> None:
        """
        A connection attempt ended without a login.  With
        C{exit_on_login_failure} and no login so far, give up (once).
        """
        if self.gave_up or self.ever_logged_in or not self.config.exit_on_login_failure:
            return
        self.gave_up = True
        self.log.error("agent {agent}: giving up: the first login to {server} failed ({why}) and "
                       "exit_on_login_failure is set", agent=self.agent_id, server=self.current_name,
                       why=why)
        if self.on_login_failure is not None:
            self.on_login_failure()
        else:
            self.stopService()

    # -- models_from ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.config.models_from is not None:
            self._poll_models()

    def stopService(self) -> Any:
        if self._models_timer is not None and self._models_timer.active():
            self._models_timer.cancel()
        self._models_timer = None
        return super().stopService()

    def _poll_models(self) -> None:
        self._models_timer = None
        d = defer.Deferred.fromCoroutine(self._fetch_models())
        d.addTimeout(self.config.connect_timeout, self.clock)
        d.addCallback(self._got_models)
        d.addErrback(self._models_failed)
        d.addBoth(self._next_poll)

    async def _fetch_models(self) -> tuple[str, ...]:
        from twisted.web.client import Agent, HTTPConnectionPool

        from rproxy.httpclient import fetch

        if self._web is None:
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            pool._factory = _quiet_http_factory()
            self._web = Agent(self.reactor, pool=pool, connectTimeout=self.config.connect_timeout)
        url = self.config.models_from.encode("ascii")  # type: ignore[union-attr]
        status, body = await fetch(self._web, b"GET", url, {b"accept": b"application/json"}, None, 1024 * 1024)
        if status != 200:
            raise ValueError(f"answered {status}")
        return models_in(body)

    def _got_models(self, models: tuple[str, ...]) -> None:
        if self._models_problem is not None:
            self._models_problem = None
            self.log.info("agent {agent}: the model list from {url} answers again", agent=self.agent_id,
                          url=self.config.models_from)
        if models == self.models:
            return
        self.log.info("agent {agent}: models now {models}", agent=self.agent_id, models=",".join(models) or "-")
        self.models = models
        if self.control is not None:
            self.control.send(ModelsUpdate(models))

    def _models_failed(self, failure: Failure) -> None:
        why = failure.getErrorMessage() or failure.type.__name__
        if why == self._models_problem:
            return  # said once; the poll goes on
        self._models_problem = why
        self.log.warn("agent {agent}: cannot read the model list from {url}: {why} (trying again every {every:g}s)",
                      agent=self.agent_id, url=self.config.models_from, why=why,
                      every=self.config.heartbeat_interval)

    def _next_poll(self, _: Any) -> None:
        if self.running:
            self._models_timer = self.clock.callLater(self.config.heartbeat_interval, self._poll_models)

    def disconnected(self, control: AgentControl) -> None:
        if self.control is control:
            self.control = None
        if control.replaced:
            # within twice the longest delay: the same clash again
            soon = self.clock.seconds() - control.logged_in_at < 2 * self.config.reconnect_max
            self.replaced = self.replaced + 1 if soon else 1
        elif control.logged_in:
            self.replaced = 0
        if not control.logged_in:
            self.failed_logins += 1
            self.login_failed(control.failure or "closed before a login")
        # its server went away (or refused): the next known one is tried
        self.next_server()


@functools.cache
def _quiet_http_factory() -> Any:
    """
    twisted.web's connection factory without its start and stop lines
    (two per models_from poll otherwise); made on first use, so that an
    agent without models_from never imports twisted.web.
    """
    from twisted.web.client import _HTTP11ClientFactory

    class QuietHTTP11ClientFactory(_HTTP11ClientFactory):
        noisy = False

    return QuietHTTP11ClientFactory


def models_in(body: bytes) -> tuple[str, ...]:
    """
    The model names in an OpenAI-style C{/v1/models} answer
    (C{{"data": [{"id": ...}]}}) or Ollama's C{/api/tags}
    (C{{"models": [{"name": ...}]}}); at most 256, each a plain name.

    @raise ValueError: the answer is neither.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    entries = document.get("data")
    key = "id"
    if not isinstance(entries, list):
        entries, key = document.get("models"), "name"
    if not isinstance(entries, list):
        raise ValueError('no "data" (OpenAI) or "models" (Ollama) list')
    models: list[str] = []
    for entry in entries[:256]:
        name = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable() and " " not in name:
            if name not in models:
                models.append(name)
    return tuple(models)


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_reason(failure: Failure) -> str:
    return tls_failure(failure) or failure.getErrorMessage()


def _stored_agent_id(state_dir: str) -> str:
    """
    The agent id kept in C{state_dir}, made once.
    """
    directory = os.path.expanduser(state_dir)
    path = os.path.join(directory, "agent_id")
    try:
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    except OSError:
        pass
    agent_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write(agent_id + "\n")
    except OSError:
        pass
    return agent_id
