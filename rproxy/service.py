"""
The service: every runtime object, built from one L{Config}.

L{RProxyService} builds pools, health checkers, frontends and the admin
site from a configuration, and applies a new configuration as a diff
(L{RProxyService.reload}): new frontends start listening, removed ones stop
accepting and drain, frontends whose listen address changed are replaced
the same way, pools are updated in place (servers matched by name keep
their state), and no connection in flight is cut.  A reload reads every
frontend's certificates again (renewed in place or new files, TLS turned
on or off: new connections get them, open ones keep theirs), those of an
C{ssl:} listener it keeps (the admin port's too), and is refused, nothing
changed, if one cannot be loaded.

Stopping (SIGTERM under twistd) stops accepting everywhere, reports
not-ready, lets open connections finish for up to C{grace_period}, then
closes what is left.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import defer, error, threads
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admin import build_admin_site
from rproxy.config import Config, load_config, parse_endpoint
from rproxy.detect import DetectFrontend
from rproxy.handoff import listening_factory
from rproxy.health import HealthChecker, Prober, make_prober
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.upstream import UpstreamPool
from rproxy.metrics import Metrics
from rproxy.pool import Pool, Server
from rproxy.reloading import Outcome, ReloadRunner
from rproxy.store.auth import key_chain
from rproxy.store.backends import LiveBackends
from rproxy.store.manager import Stores
from rproxy.tcp import ConnectionLimit, TCPFrontend
from rproxy.telemetry.provider import apply_telemetry
from rproxy.tls import ReloadableCreator, SNIServerCreator, ssl_pairs, tls_layer
from rproxy.tokenpool import HTTPLogin, TokenPool
from rproxy.transport import server_endpoint
from rproxy.tunnel.registry import StaticKeys
from rproxy.tunnel.server import TunnelServer

__all__ = ["RProxyService", "build_service", "ListenError"]


class ListenError(Exception):
    """
    A listener could not bind at start-up: rproxy does not start (a
    process that serves nothing must not look like a running one).

    @ivar problems: one line per listener, naming it and its address.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class RProxyService(MultiService):
    """
    Runs one configuration; see the module docstring.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        clock: Any = None,
        config_path: str | None = None,
        registry: CollectorRegistry | None = None,
        prober: Prober | None = None,
        rng: random.Random | None = None,
        config_loader: Callable[[str], defer.Deferred[Config]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.config_path = config_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.metrics.watch(self)
        self._prober = prober if prober is not None else make_prober(reactor)
        self._rng = rng
        self.limit = ConnectionLimit(config.global_.max_connections)
        self.pools: dict[str, Pool] = {}
        self.checkers: dict[str, HealthChecker] = {}
        self.frontends: dict[str, TCPFrontend] = {}
        self.ports: dict[str, IListeningPort] = {}
        self.retired: set[TCPFrontend] = set()
        self.tunnels: dict[str, TunnelServer] = {}
        self.token_pools: dict[str, TokenPool] = {}
        self.live_servers: dict[str, tuple[Any, ...]] = {}  # source: postgres pools, as last read
        self.stores: Stores | None = None
        self.cluster: Any = None  # rproxy.cluster.node.ClusterNode, with cluster:
        self.telemetry: Any = None  # rproxy.telemetry.provider.Telemetry, with telemetry: configured
        self.upstreams = UpstreamPool(reactor, self.clock)
        self.admin_port: IListeningPort | None = None
        self._admin_listen: str | None = None
        # the certificates of listeners with an ssl: listen string (the
        # admin port's apart), which a reload that keeps them renews
        self._ssl_listeners: dict[IListeningPort, ReloadableCreator] = {}
        self._admin_ssl: ReloadableCreator | None = None
        self.stopping = False
        self._config_loader = config_loader if config_loader is not None else self._load_in_thread
        # reloads (SIGHUP, the admin API) run here: validated off the
        # reactor, applied by apply_reload, recorded (last_reload); a master
        # puts its own runner here, whose apply reaches its workers too
        self.reloads = ReloadRunner(self.clock, self._config_loader, self.apply_reload, lambda: self.stopping,
                                    lambda result: self.metrics.reloads.labels(result).inc(), config_path, self.log)
        # frontend (or "admin") -> why its listener could not bind, as of the last apply
        self.listen_failures: dict[str, str] = {}
        self._starting = False
        self.ready: defer.Deferred[None] | None = None
        # what start-up does on a listener that cannot bind, after logging
        # it (twistd -n: exit 1 quietly; see rproxy.tap); then ListenError
        self.on_start_failure: Callable[[ListenError], None] | None = None
        # Hooks for the processes of rproxy.workers: a worker adopts the
        # sockets its master bound (listen_endpoint), applies health state
        # the master sends (checker_factory: checks that never probe) and
        # tells the master what its pools see (pool_made); the master serves
        # an admin tree merged from every worker (make_admin_site).
        self.listen_endpoint: Callable[[Any, int], Any] = lambda frontend, backlog: server_endpoint(
            self.reactor, frontend.listen, backlog)
        self.checker_factory: Callable[..., Any] = HealthChecker
        self.pool_made: Callable[[Pool], None] | None = None
        # (a worker running tunnels, with a cluster: their control and
        # public ports adopt the master's sockets; see rproxy.workers.views)
        self.tunnel_made: Callable[[TunnelServer], None] | None = None
        self.make_admin_site: Callable[[RProxyService], Any] = build_admin_site

    # -- start -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind every listener before twistd reports the start (to the parent
        process in daemon mode) and before privileges are dropped; a
        listener that cannot bind stops the start with L{ListenError}.
        """
        super().privilegedStartService()
        outcome = self._start()
        problems = self.start_problems(outcome)
        if problems:
            failure = ListenError(problems)
            if self.on_start_failure is not None:
                self.on_start_failure(failure)
            raise failure

    def startService(self) -> None:
        super().startService()
        if self.ready is None:
            self._start()

    def _start(self) -> list[Any]:
        """
        Apply the configuration; the outcome list holds the result once
        the apply has finished (at once with a real reactor's listeners).
        """
        outcome: list[Any] = []
        self.ready = defer.Deferred.fromCoroutine(self._apply(self.config, starting=True))
        self.ready.addBoth(lambda result: outcome.append(result) or result)
        self.ready.addErrback(self._log_failure, "starting")
        return outcome

    def start_problems(self, outcome: list[Any]) -> list[str]:
        """
        What keeps the start from being a success: listeners that could not
        bind (frontends, admin, tunnel ports), or an apply that failed.
        """
        problems = list(self.listen_failures.values())
        for tunnel in self.tunnels.values():
            ports = getattr(tunnel, "ports", None)
            if ports is None:
                continue
            for role in ("control", "proxy", "public"):
                if role not in ports:
                    problems.append(f"tunnel {tunnel.name}: cannot listen on its {role} port "
                                    f"{getattr(tunnel.config, role)}")
        if outcome and isinstance(outcome[0], Failure):
            problems.append(f"cannot start: {outcome[0].getErrorMessage()}")
        return problems

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("rproxy: {what} failed", failure, what=what)

    async def _apply(self, new: Config, starting: bool = False,
                     certificates: dict[str, SNIServerCreator] | None = None) -> None:
        """
        Bring the running objects from whatever they are to C{new}.  A
        listener that cannot bind is recorded in L{listen_failures}; a
        frontend (or the admin port) whose new address cannot bind keeps
        its old listener.

        @param certificates: the certificates of C{new}'s frontends with
            C{tls:}, by frontend, loaded beforehand (a reload); without
            them, each listener loads its own (the start).
        """
        self.listen_failures = {}
        self._starting = starting
        old_pools = dict(self.pools)
        self.limit.limit = new.global_.max_connections

        for backend in new.backends:
            if backend.source == "postgres" and backend.name in self.live_servers:
                backend = attrs.evolve(backend, servers=self.live_servers[backend.name])
            pool = self.pools.get(backend.name)
            if pool is None:
                pool = Pool(backend, self.clock, self._rng)
                pool.on_moved(self.upstreams.moved)  # (pooled connections to where a reload no longer sends)
                self.pools[backend.name] = pool
                if self.pool_made is not None:
                    self.pool_made(pool)
                checker = self.checker_factory(pool, self.clock, self._prober, self._observe_check, self._rng)
                self.checkers[backend.name] = checker
                checker.start()
            else:
                pool.update(backend)
                self.checkers[backend.name].sync()

        self.telemetry = apply_telemetry(self.telemetry, new.telemetry, self.reactor, self.clock)
        self._apply_token_pools(new)
        for tokens in self.token_pools.values():
            tokens.telemetry = self.telemetry

        await self._apply_frontends(new, certificates if certificates is not None else {})

        keys: Any = StaticKeys(new.api_keys)
        if new.stores is not None:
            if self.stores is None:
                self.stores = Stores(new.stores, keys, self.reactor, self.clock, self._rng)
                self.stores.live = LiveBackends(self.clock, self._postgres_pools, self.apply_servers,
                                                new.stores.resync_interval)
                self.stores.start()
            elif new.stores != self.stores.config:
                self.log.warn("stores: changes to stores: take effect after a restart")
            self.stores.keys.static = keys
            keys = self.stores.keys
        chain = key_chain(keys, self.clock)  # (auth: {api_keys: true} of HTTP frontends)
        for frontend in self.frontends.values():
            if isinstance(frontend, HTTPFrontend):
                frontend.keys = chain
        wanted_tunnels = {t.name: t for t in new.tunnels}
        for name, tunnel in list(self.tunnels.items()):
            wanted_tunnel = wanted_tunnels.get(name)
            if wanted_tunnel is None:
                del self.tunnels[name]
                await tunnel.stop()
                continue
            if wanted_tunnel != tunnel.config:  # (the certificates of the ports it keeps: apply_reload's)
                await tunnel.reconfigure(wanted_tunnel)
            tunnel.keys = keys
            tunnel.events = self.stores.events if self.stores is not None else None
            tunnel.telemetry = self.telemetry
            if tunnel.http is not None and tunnel.http.telemetry is not self.telemetry:
                tunnel.http.telemetry = self.telemetry
        for tunnel_config in new.tunnels:
            if tunnel_config.name not in self.tunnels:
                tunnel = TunnelServer(tunnel_config, keys, self.reactor, self.clock, self._rng)
                tunnel.events = self.stores.events if self.stores is not None else None
                tunnel.telemetry = self.telemetry
                if tunnel.http is not None:
                    tunnel.http.telemetry = self.telemetry
                tunnel.observe_open = self.metrics.tunnel_open_latency.labels(tunnel_config.name).observe
                if self.tunnel_made is not None:
                    self.tunnel_made(tunnel)
                self.tunnels[tunnel_config.name] = tunnel
                await tunnel.start()
        self._apply_cluster(new)

        for name in set(old_pools) - {b.name for b in new.backends}:
            self.checkers.pop(name).stop()
            self.pools.pop(name).close()
            self.live_servers.pop(name, None)
        if self.stores is not None and self.stores.live is not None:
            for name in self._postgres_pools():
                if name not in self.live_servers:
                    self.stores.live.sync(name)

        await self._apply_admin(new.admin.listen)
        self.config = new

    def _apply_cluster(self, new: Config) -> None:
        """
        Join the cluster (L{rproxy.cluster}) once, with tunnels to share (a
        process without any, such as the master of C{workers: N} whose
        workers hold the tunnels as nodes of their own, is no node); a
        change takes effect after a restart.
        """
        if self.cluster is None and new.cluster is not None and new.stores is not None and new.tunnels:
            from rproxy.cluster.node import ClusterNode

            self.cluster = ClusterNode(new.cluster, new.stores.redis_url, self.tunnels, self.reactor, self.clock)
            self.cluster.start()
        elif self.cluster is not None and new.cluster != self.cluster.config:
            self.log.warn("cluster: changes to cluster: take effect after a restart")
        for tunnel in self.tunnels.values():
            tunnel.cluster = self.cluster

    async def _apply_frontends(self, new: Config, certificates: dict[str, SNIServerCreator]) -> None:
        """
        Frontends: new ones listen, removed ones retire (stop accepting and
        drain), the others are updated in place (their TLS too:
        L{_switch_tls}).  One whose listen address changed listens on the
        new address before its old listener retires, and keeps the old one
        if the new address cannot bind.
        """
        wanted = {f.name: f for f in new.frontends}
        stopping: list[defer.Deferred[Any]] = []
        for name, frontend in list(self.frontends.items()):
            target = wanted.get(name)
            if target is None:
                stopping.append(self._retire(frontend))
            elif target.protocol != frontend.config.protocol and _same_socket(target.listen, frontend.config.listen):
                # another kind of frontend on the same socket: free it first
                stopping.append(self._retire(frontend))
        await defer.gatherResults(stopping, consumeErrors=True)

        retiring: list[defer.Deferred[Any]] = []
        for config in new.frontends:
            frontend = self.frontends.get(config.name)
            pool = self.pools.get(config.backend)  # (none for protocol: detect)
            if (frontend is not None and frontend.config.protocol == config.protocol
                    and self._keeps_socket(frontend, config.listen)):
                frontend.config = config
                frontend.pool = pool
                self._switch_tls(frontend, certificates.get(config.name))
                if isinstance(frontend, HTTPFrontend):
                    frontend.telemetry = self.telemetry
                    frontend.configure(config)
                    frontend.tokens = self.token_pools.get(config.token_pool) if config.token_pool else None
                continue
            fresh: TCPFrontend
            if config.protocol == "http":
                fresh = HTTPFrontend(config, self.pools, self.reactor, self.clock, self.upstreams, self.limit)
                fresh.telemetry = self.telemetry  # (the tokens below build its filters again)
                fresh.tokens = self.token_pools.get(config.token_pool) if config.token_pool else None
            elif config.protocol == "detect":
                fresh = DetectFrontend(config, self.frontends, self.clock, self.limit)
            else:
                fresh = TCPFrontend(config, pool, self.reactor, self.clock, self.limit, self.pools)
            port = await self._listen(fresh, frontend, certificates.get(config.name))
            if port is None:
                continue
            if frontend is not None:
                retiring.append(self._retire(frontend))
            self.frontends[config.name] = fresh
            self.ports[config.name] = port
        await defer.gatherResults(retiring, consumeErrors=True)

    def _keeps_socket(self, frontend: TCPFrontend, listen: str) -> bool:
        """
        Whether C{frontend}'s listener already is the socket C{listen}
        names (also when it asked for port 0 and C{listen} now names the
        port it got).
        """
        if _same_socket(frontend.config.listen, listen):
            return True
        port = self.ports.get(frontend.name)
        if port is None:
            return False
        try:
            old, new = parse_endpoint(frontend.config.listen), parse_endpoint(listen)
        except ValueError:
            return False
        bound = getattr(port.getHost(), "port", None)
        return (old.kind == new.kind and old.port == 0 and new.port == bound
                and old.interface == new.interface)

    async def _apply_admin(self, listen: str | None) -> None:
        """
        The admin port: moved by binding the new address first (the old
        one stays if it cannot bind), closed when C{listen} is null.
        """
        if listen == self._admin_listen or (self._starting and self.listen_failures):
            return
        old = self.admin_port
        if listen is not None and old is not None and self._admin_listen is not None \
                and _same_socket(listen, self._admin_listen):
            self._admin_listen = listen
            return
        port = None
        endpoint = None
        if listen is not None:
            try:
                endpoint = server_endpoint(self.reactor, listen)
                port = await endpoint.listen(self.make_admin_site(self))
            except Exception as e:  # noqa: BLE001 - reported as one line, the old port stays
                self._listen_failed("admin", "admin", listen, e, old is not None and self._admin_listen)
                return
            self.log.info("admin listening on {address}", address=_address(port))
        if old is not None:
            await old.stopListening()
        self.admin_port = port
        self._admin_listen = listen
        self._admin_ssl = getattr(endpoint, "certificates", None)

    def _listen_failed(self, key: str, what: str, listen: str, why: Exception, kept: str | None | bool) -> None:
        """
        Log one line for a listener that cannot bind and record it.
        """
        reason = _bind_error(why)
        if self._starting:
            tail = "; not starting"
        elif kept:
            tail = f"; keeping its listener on {kept}"
        else:
            tail = ""
        line = f"{what}: cannot listen on {listen}: {reason}{tail}"
        self.listen_failures[key] = line
        self.log.error("{line}", line=line)

    def _apply_token_pools(self, new: Config) -> None:
        """
        Start new token pools; a changed one is replaced by a new pool for
        new connections while the old one serves its leases and waiters
        until none is left.
        """
        wanted = {p.name: p for p in new.token_pools}
        for name, pool in list(self.token_pools.items()):
            if wanted.get(name) != pool.config:
                del self.token_pools[name]
                pool.retire()
        for config in new.token_pools:
            if config.name not in self.token_pools:
                pool = TokenPool(config, HTTPLogin(config, self.reactor), self.clock, self._rng)
                pool.telemetry = self.telemetry  # (before its first logins)
                self.token_pools[config.name] = pool
                pool.start()

    def _postgres_pools(self) -> list[str]:
        return [name for name, pool in self.pools.items() if pool.config.source == "postgres"]

    def apply_servers(self, name: str, servers: tuple[Any, ...]) -> None:
        """
        The servers of a C{source: postgres} pool as the backends table now
        has them; applied like a reload (servers that stay keep their state
        and connections).
        """
        pool = self.pools.get(name)
        if pool is None or pool.config.source != "postgres":
            return
        first = name not in self.live_servers
        self.live_servers[name] = servers
        if pool.config.servers == servers and not first:
            return
        pool.update(attrs.evolve(pool.config, servers=servers))
        self.checkers[name].sync()
        self.log.info("backend {backend}: {count} server(s) from PostgreSQL: {servers}", backend=name,
                      count=len(servers), servers=", ".join(f"{s.name}={s.address}" for s in servers) or "-")

    async def _listen(self, frontend: TCPFrontend, old: TCPFrontend | None = None,
                      certificates: SNIServerCreator | None = None) -> IListeningPort | None:
        """
        Listen for C{frontend} (with C{tls:}, with C{certificates}, else
        its files loaded here); C{None} (logged, recorded) if it cannot.
        """
        try:
            endpoint = self.listen_endpoint(frontend.config, self.config.global_.backlog)
            factory: Any = frontend
            if frontend.config.tls:
                if certificates is None:
                    certificates = SNIServerCreator(list(frontend.config.tls))
                factory = tls_layer(frontend, certificates)
            factory = listening_factory(frontend, factory)  # PROXY protocol header first, if configured
            port: IListeningPort = await endpoint.listen(factory)
            ssl = getattr(endpoint, "certificates", None)  # (an ssl: listen string)
            if ssl is not None:
                self._ssl_listeners[port] = ssl
        except Exception as e:  # noqa: BLE001 - reported as one line
            self._listen_failed(frontend.name, f"frontend {frontend.name}", frontend.config.listen, e,
                                old.config.listen if old is not None else None)
            return None
        self.log.info(
            "frontend {frontend} listening on {address}, backend {backend}",
            frontend=frontend.name, address=_address(port), backend=frontend.config.backend,
        )
        return port

    def _switch_tls(self, frontend: TCPFrontend, certificates: SNIServerCreator | None) -> None:
        """
        Give a frontend that keeps its listener the TLS its new
        configuration asks for: its connections from now on are built by a
        new TLS layer with C{certificates} (or by the frontend itself, TLS
        turned off); open ones keep the layer they were made by.  The
        listener calls the PROXY protocol layer, whose C{wrapped} is the
        one to change; the new layer is started before the old is stopped
        (the frontend's own start/stop count is unchanged).
        """
        layer = frontend.proxy_protocol
        old = layer.wrapped
        if certificates is None and old is frontend:
            return
        if certificates is None and frontend.config.tls:
            certificates = SNIServerCreator(list(frontend.config.tls))  # (an apply without a reload's loading)
        new = tls_layer(frontend, certificates) if certificates is not None else frontend
        new.doStart()
        layer.wrapped = new
        old.doStop()

    def _certificates_of(self, new: Config) -> _Certificates:
        """
        The certificates a reload to C{new} must read again (renewed in
        place, the files hold new ones): those of every frontend with
        C{tls:}, those of every C{ssl:} listener the reload keeps
        (frontends' and the admin port's), and those of every tunnel port
        with TLS the reload keeps (L{TunnelServer.certificate_files}); the
        others read theirs when they listen.  Decided here, on the
        reactor; read by L{_Certificates.load}, off it.
        """
        wanted = _Certificates()
        for config in new.frontends:
            if config.tls:
                wanted.files.append((f"frontend {config.name}", list(config.tls), config.name))
            running, port = self.frontends.get(config.name), self.ports.get(config.name)
            ssl = self._ssl_listeners.get(port) if port is not None else None
            if ssl is not None and running is not None and running.config.protocol == config.protocol \
                    and self._keeps_socket(running, config.listen):
                wanted.files.append((f"frontend {config.name}", ssl_pairs(parse_endpoint(config.listen)), ssl))
        listen = new.admin.listen
        if self._admin_ssl is not None and listen is not None and self._admin_listen is not None \
                and _same_socket(listen, self._admin_listen):
            wanted.files.append(("admin", ssl_pairs(parse_endpoint(listen)), self._admin_ssl))
        for config in new.tunnels:
            tunnel = self.tunnels.get(config.name)
            if tunnel is not None:
                wanted.files.extend(tunnel.certificate_files(config))
        return wanted

    def _retire(self, frontend: TCPFrontend) -> defer.Deferred[Any]:
        """
        Stop accepting on C{frontend} and let its connections drain in the
        background; fires once its port is closed.
        """
        del self.frontends[frontend.name]
        port = self.ports.pop(frontend.name, None)
        if port is not None:
            self._ssl_listeners.pop(port, None)
        self.retired.add(frontend)
        draining = frontend.drain(self.config.global_.grace_period)
        draining.addBoth(lambda _: self.retired.discard(frontend))
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def _observe_check(self, server: Server, seconds: float, ok: bool) -> None:
        self.metrics.health_check_duration.labels(
            server.pool_name, server.name, "ok" if ok else "failed"
        ).observe(seconds)

    # -- reload ----------------------------------------------------------

    @property
    def last_reload(self) -> dict[str, Any] | None:
        """
        The last reload (file or API): when, result, errors; None before one.
        """
        return self.reloads.last

    def reload(self, new: Config) -> defer.Deferred[None]:
        """
        Apply C{new} as a diff against the running configuration and record
        the outcome (L{ReloadRunner.run}).
        """
        return self.reloads.run(new)

    async def apply_reload(self, new: Config) -> Outcome:
        """
        Apply C{new} here.  A listener that cannot bind is reported (the
        reload counts as C{partial}); a reload that leaves nothing
        listening for traffic is applied, as asked, and logged as an error.
        Certificates are loaded first: one that cannot be refuses the
        reload (C{failed}, nothing changed; frontends and tunnels keep the
        ones they serve).  Then the listeners the reload keeps (C{ssl:}
        listen strings, tunnel ports with TLS) get theirs, before anything
        else changes.
        """
        certificates = self._certificates_of(new)
        try:
            if certificates.files:  # (PEM files and key parsing: a few ms each, in the reactor's thread pool)
                await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), certificates.load)
        except ValueError as e:
            self.log.error("reload refused: {error}; keeping the running configuration", error=str(e))
            return "failed", [str(e)]
        if self.stopping:  # (a stop that began while the files were read: nothing may listen again)
            self.log.warn("reload ignored: rproxy is stopping")
            return "failed", ["rproxy is stopping"]
        self._warn_if_nothing_listens(new)
        for listener, renewed in certificates.listeners:
            listener.replace(renewed)
        await self._apply(new, certificates=certificates.frontends)
        if self.listen_failures:
            problems = list(self.listen_failures.values())
            self.log.error("configuration reloaded, except {count} listener(s): {problems}",
                           count=len(problems), problems="; ".join(problems))
            return "partial", problems
        self.log.info("configuration reloaded")
        return "ok", []

    def _warn_if_nothing_listens(self, new: Config) -> None:
        before = _traffic_listeners(self.config)
        if before and not _traffic_listeners(new):
            after = "only the admin port will listen" if new.admin.listen else "nothing will listen"
            self.log.error("reload removes every frontend and tunnel ({names}): {after}; applying it as asked",
                           names=", ".join(before), after=after)

    def _load_in_thread(self, path: str) -> defer.Deferred[Config]:
        """
        Read, parse and validate C{path} in the reactor's thread pool: a
        file is bounded (rproxy.config.load's limits) yet parsing even 1 MiB
        of YAML takes a good fraction of a second, during which the reactor
        must keep serving.  A thread shares the process (no new interpreter
        to start, nothing to serialise back); the limits bound its memory.
        """
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load_config, path)

    def reopen_logs(self) -> None:
        """
        Go on in new access log files at the same paths (SIGUSR1, after
        logrotate renamed them), for frontends still draining too.
        """
        for frontend in self.all_frontends():
            reopen = getattr(frontend, "reopen_access_log", None)
            if reopen is not None:
                reopen()
        for tunnel in self.tunnels.values():
            tunnel.reopen_access_log()  # (mode tcp's stream log)
            if tunnel.http is not None:  # (mode http's access log)
                tunnel.http.reopen_access_log()
        self.log.info("access logs reopened")

    def reload_from_file(self) -> defer.Deferred[None]:
        """
        Re-read the configuration file (SIGHUP) off the reactor; an invalid
        file is logged and the running configuration stays.  Reloads run
        one at a time, in the order asked.
        """
        return self.reloads.from_file()

    # -- stop ------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        self.log.info(
            "rproxy stopping: no new connections; draining for up to {grace}s",
            grace=self.config.global_.grace_period,
        )
        for checker in self.checkers.values():
            checker.stop()
        tunnels_drained = defer.gatherResults(
            [defer.Deferred.fromCoroutine(t.drain(self.config.global_.grace_period)) for t in self.tunnels.values()],
            consumeErrors=True)
        frontends = list(self.frontends.values())
        await defer.gatherResults([self._retire(f) for f in frontends], consumeErrors=True)
        waits = [f.drain(self.config.global_.grace_period) for f in list(self.retired)]
        await defer.gatherResults(waits, consumeErrors=True)
        for pool in self.pools.values():
            pool.close()
        for tokens in self.token_pools.values():
            tokens.stop()
        await tunnels_drained
        if self.cluster is not None:
            await self.cluster.stop()
        self.upstreams.close()
        if self.stores is not None:
            await self.stores.stop()
        if self.telemetry is not None:
            await self.telemetry.stop()
        if self.admin_port is not None:
            await self.admin_port.stopListening()
            self.admin_port = None
        await defer.maybeDeferred(super().stopService)
        self.log.info("rproxy stopped")

    # -- reporting -------------------------------------------------------

    def all_frontends(self) -> list[TCPFrontend]:
        return list(self.frontends.values()) + list(self.retired)

    def port_of(self, frontend: str) -> int:
        """
        The TCP port a frontend listens on (useful with port 0).
        """
        return self.ports[frontend].getHost().port  # type: ignore[no-any-return]

    def readiness_problems(self) -> list[str]:
        if self.stopping:
            return ["shutting down"]
        problems = [line for name, line in self.listen_failures.items() if name not in self.frontends
                    and name != "admin"]
        for frontend in self.frontends.values():
            if frontend.name not in self.ports:
                problems.append(f"frontend {frontend.name}: not listening")
            elif frontend.pool is not None and frontend.pool.healthy_count() == 0:  # (None: detect, passthrough)
                problems.append(f"frontend {frontend.name}: no server of backend {frontend.pool.name} is up")
            tokens = getattr(frontend, "tokens", None)
            if tokens is not None and not tokens.has_token():
                problems.append(f"frontend {frontend.name}: token pool {tokens.name} holds no token yet")
        return problems

    def health_detail(self) -> dict[str, Any]:
        problems = self.readiness_problems()
        return {
            "status": "ok" if not problems else "degraded",
            "problems": problems,
            "stores": self.stores.status() if self.stores is not None else "embedded",
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
            "frontends": [
                {
                    "name": f.name,
                    "protocol": f.config.protocol,
                    "listen": f.config.listen,
                    "backend": f.pool.name if f.pool is not None else None,
                    "listening": f.name in self.ports,
                    "active_connections": f.active,
                    "waiting": len(f.waiting),
                    "total_connections": f.total,
                }
                for f in self.frontends.values()
            ],
            "backends": [pool.describe() for pool in self.pools.values()],
            "token_pools": {name: pool.status() for name, pool in self.token_pools.items()},
        }

    def stats(self) -> dict[str, Any]:
        return {"pools": [pool.stats() for pool in self.pools.values()]}


@attrs.define
class _Certificates:
    """
    The certificates a reload loads before it changes anything
    (L{RProxyService._certificates_of}).

    @ivar files: what to load: the listener (for errors), its pairs, and
        what they are for: a frontend's name (C{tls:}) or the certificates
        of a kept listener (an C{ssl:} listen string, a tunnel port with
        TLS).
    @ivar frontends: once loaded, the C{tls:} certificates by frontend.
    @ivar listeners: once loaded, the kept listeners' certificates, each
        with those that replace them.
    """

    files: list[tuple[str, list[tuple[str, str]], str | ReloadableCreator]] = attrs.Factory(list)
    frontends: dict[str, SNIServerCreator] = attrs.Factory(dict)
    listeners: list[tuple[ReloadableCreator, SNIServerCreator]] = attrs.Factory(list)

    def load(self) -> None:
        """
        Read every file (in a thread: this touches nothing the reactor
        uses meanwhile).

        @raise ValueError: one line naming the first listener whose files
            cannot be loaded, the files, and why.
        """
        for what, pairs, target in self.files:
            loaded = _load(what, pairs)
            if isinstance(target, str):
                self.frontends[target] = loaded
            else:
                self.listeners.append((target, loaded))


def named_certificates(config: Config) -> list[tuple[str, list[tuple[str, str]]]]:
    """
    Every certificate pair C{config} names, with what names it: frontends'
    C{tls:} and C{ssl:} listen strings, the admin port's, tunnels' ports
    (their C{tls:} on the control and proxy ports, C{ssl:} strings).  For
    a process that applies a configuration through others (the workers'
    master): it checks them all before anything changes.
    """
    named = []
    for frontend in config.frontends:
        if frontend.tls:
            named.append((f"frontend {frontend.name}", list(frontend.tls)))
        if frontend.listen.startswith("ssl:"):
            named.append((f"frontend {frontend.name}", ssl_pairs(parse_endpoint(frontend.listen))))
    if config.admin.listen is not None and config.admin.listen.startswith("ssl:"):
        named.append(("admin", ssl_pairs(parse_endpoint(config.admin.listen))))
    for tunnel in config.tunnels:
        for role, listen, tls in (("control", tunnel.control, True), ("proxy", tunnel.proxy, True),
                                  ("public", tunnel.public, False)):
            if listen.startswith("ssl:"):
                named.append((f"tunnel {tunnel.name} ({role} port)", ssl_pairs(parse_endpoint(listen))))
            elif tls and tunnel.tls is not None:
                named.append((f"tunnel {tunnel.name} ({role} port)", [(tunnel.tls.cert, tunnel.tls.key)]))
    return named


def check_certificates(named: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """
    Load every pair of L{named_certificates} (in a thread: it touches
    nothing the reactor uses).

    @raise ValueError: one line naming the first that cannot be loaded.
    """
    for what, pairs in named:
        _load(what, pairs)


def _load(what: str, pairs: list[tuple[str, str]]) -> SNIServerCreator:
    """
    The certificates of C{pairs}, for the listener C{what} names.

    @raise ValueError: one line naming it, the files, and why.
    """
    try:
        return SNIServerCreator(pairs)
    except Exception as e:  # noqa: BLE001 - any file or PEM error refuses the reload
        files = ", ".join(f"{cert} / {key}" for cert, key in pairs)
        raise ValueError(f"{what}: cannot load its certificates ({files}): {str(e)[:200] or type(e).__name__}") from e


def _same_socket(a: str, b: str) -> bool:
    """
    Whether two listen strings name the same socket (so the listener
    stays: a new one could not bind beside it).
    """
    if a == b:
        return True
    try:
        return parse_endpoint(a).same_socket(parse_endpoint(b))
    except ValueError:
        return False


def _traffic_listeners(config: Config) -> list[str]:
    return [f"frontend {f.name}" for f in config.frontends] + [f"tunnel {t.name}" for t in config.tunnels]


def _bind_error(why: Exception) -> str:
    """
    The reason a listener could not bind, in a few words (Twisted's
    C{CannotListenError} repeats the address and wraps the socket error).
    """
    if isinstance(why, error.CannotListenError) and isinstance(why.socketError, OSError):
        return why.socketError.strerror or str(why.socketError)
    return str(why) or type(why).__name__


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


def build_service(
    config: Config, reactor: Any, config_path: str | None = None, **kwargs: Any
) -> RProxyService:
    """
    The service for C{config}; twistd's C{makeService} calls this.
    """
    return RProxyService(config, reactor, config_path=config_path, **kwargs)

