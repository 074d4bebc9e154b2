"""
The service: every runtime object, built from one L{Config}.

L{RProxyService} builds pools, health checkers, frontends and the admin
site from a configuration, and applies a new configuration as a diff
(L{RProxyService.reload}): new frontends start listening, removed ones stop
accepting and drain, frontends whose listen address changed are replaced
the same way, pools are updated in place (servers matched by name keep
their state), and no connection in flight is cut.

Stopping (SIGTERM under twistd) stops accepting everywhere, reports
not-ready, lets open connections finish for up to C{grace_period}, then
closes what is left.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admin import build_admin_site
from rproxy.config import Config, ConfigError, load_config
from rproxy.health import HealthChecker, Prober, make_prober
from rproxy.http.frontend import HTTPFrontend, UpstreamPool
from rproxy.metrics import Metrics
from rproxy.pool import Pool, Server
from rproxy.store.backends import LiveBackends
from rproxy.store.manager import Stores
from rproxy.tcp import ConnectionLimit, TCPFrontend
from rproxy.tls import server_tls_factory
from rproxy.tokenpool import HTTPLogin, TokenPool
from rproxy.transport import server_endpoint
from rproxy.tunnel.registry import StaticKeys
from rproxy.tunnel.server import TunnelServer

__all__ = ["RProxyService", "build_service"]


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
        self.upstreams = UpstreamPool(reactor, self.clock)
        self.admin_port: IListeningPort | None = None
        self._admin_listen: str | None = None
        self.stopping = False
        self._reloading: defer.Deferred[None] | None = None

    # -- start -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.ready: defer.Deferred[None] = defer.Deferred.fromCoroutine(self._apply(self.config))
        self.ready.addErrback(self._log_failure, "starting")

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("rproxy: {what} failed", failure, what=what)

    async def _apply(self, new: Config) -> None:
        """
        Bring the running objects from whatever they are to C{new}.
        """
        old_pools = dict(self.pools)
        self.limit.limit = new.global_.max_connections

        for backend in new.backends:
            if backend.source == "postgres" and backend.name in self.live_servers:
                backend = attrs.evolve(backend, servers=self.live_servers[backend.name])
            pool = self.pools.get(backend.name)
            if pool is None:
                pool = Pool(backend, self.clock, self._rng)
                self.pools[backend.name] = pool
                checker = HealthChecker(pool, self.clock, self._prober, self._observe_check, self._rng)
                self.checkers[backend.name] = checker
                checker.start()
            else:
                pool.update(backend)
                self.checkers[backend.name].sync()

        self._apply_token_pools(new)

        wanted = {f.name: f for f in new.frontends}
        stopping: list[defer.Deferred[Any]] = []
        for name, frontend in list(self.frontends.items()):
            target = wanted.get(name)
            if target is None or target.listen != frontend.config.listen or target.protocol != frontend.config.protocol:
                stopping.append(self._retire(frontend))
        await defer.gatherResults(stopping, consumeErrors=True)

        for config in new.frontends:
            frontend = self.frontends.get(config.name)
            pool = self.pools[config.backend]
            if frontend is not None:
                frontend.config = config
                frontend.pool = pool
                if isinstance(frontend, HTTPFrontend):
                    frontend.configure(config)
                    frontend.tokens = self.token_pools.get(config.token_pool) if config.token_pool else None
                continue
            if config.protocol == "http":
                frontend = HTTPFrontend(config, self.pools, self.reactor, self.clock, self.upstreams, self.limit)
                frontend.tokens = self.token_pools.get(config.token_pool) if config.token_pool else None
            else:
                frontend = TCPFrontend(config, pool, self.reactor, self.clock, self.limit)
            self.frontends[config.name] = frontend
            await self._listen(frontend)

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
        wanted_tunnels = {t.name: t for t in new.tunnels}
        for name, tunnel in list(self.tunnels.items()):
            wanted_tunnel = wanted_tunnels.get(name)
            if wanted_tunnel is None:
                del self.tunnels[name]
                await tunnel.stop()
                continue
            if wanted_tunnel != tunnel.config:
                await tunnel.reconfigure(wanted_tunnel)
            tunnel.keys = keys
            tunnel.events = self.stores.events if self.stores is not None else None
        for tunnel_config in new.tunnels:
            if tunnel_config.name not in self.tunnels:
                tunnel = TunnelServer(tunnel_config, keys, self.reactor, self.clock, self._rng)
                tunnel.events = self.stores.events if self.stores is not None else None
                tunnel.observe_open = self.metrics.tunnel_open_latency.labels(tunnel_config.name).observe
                self.tunnels[tunnel_config.name] = tunnel
                await tunnel.start()

        for name in set(old_pools) - {b.name for b in new.backends}:
            self.checkers.pop(name).stop()
            self.pools.pop(name).close()
            self.live_servers.pop(name, None)
        if self.stores is not None and self.stores.live is not None:
            for name in self._postgres_pools():
                if name not in self.live_servers:
                    self.stores.live.sync(name)

        if new.admin.listen != self._admin_listen:
            if self.admin_port is not None:
                await self.admin_port.stopListening()
                self.admin_port = None
            self._admin_listen = new.admin.listen
            if new.admin.listen is not None:
                endpoint = server_endpoint(self.reactor, new.admin.listen)
                try:
                    self.admin_port = await endpoint.listen(build_admin_site(self))
                except Exception as e:
                    self.log.error(
                        "admin: cannot listen on {listen}: {why}", listen=new.admin.listen, why=e
                    )
                else:
                    self.log.info("admin listening on {address}", address=_address(self.admin_port))
        self.config = new

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

    async def _listen(self, frontend: TCPFrontend) -> None:
        endpoint = server_endpoint(self.reactor, frontend.config.listen, self.config.global_.backlog)
        factory: Any = frontend
        if frontend.config.tls:
            factory = server_tls_factory(frontend, list(frontend.config.tls))
        try:
            port = await endpoint.listen(factory)
        except Exception as e:
            self.log.error(
                "frontend {frontend}: cannot listen on {listen}: {why}",
                frontend=frontend.name, listen=frontend.config.listen, why=e,
            )
            return
        self.ports[frontend.name] = port
        self.log.info(
            "frontend {frontend} listening on {address}, backend {backend}",
            frontend=frontend.name, address=_address(port), backend=frontend.config.backend,
        )

    def _retire(self, frontend: TCPFrontend) -> defer.Deferred[Any]:
        """
        Stop accepting on C{frontend} and let its connections drain in the
        background; fires once its port is closed.
        """
        del self.frontends[frontend.name]
        port = self.ports.pop(frontend.name, None)
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

    def reload(self, new: Config) -> defer.Deferred[None]:
        """
        Apply C{new} as a diff against the running configuration.
        """
        d = defer.Deferred.fromCoroutine(self._apply(new))

        def done(result: Any) -> Any:
            ok = not isinstance(result, Failure)
            self.metrics.reloads.labels("ok" if ok else "failed").inc()
            if ok:
                self.log.info("configuration reloaded")
            return result

        return d.addBoth(done)

    def reload_from_file(self) -> defer.Deferred[None]:
        """
        Re-read the configuration file (SIGHUP); an invalid file is logged
        and the running configuration stays.
        """
        if self.config_path is None:
            return defer.succeed(None)
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            self.metrics.reloads.labels("invalid").inc()
            for line in e.errors:
                self.log.error("reload rejected: {error}", error=line)
            self.log.error("reload rejected; keeping the running configuration")
            return defer.succeed(None)
        d = self.reload(new)
        d.addErrback(self._log_failure, "reload")
        return d

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
        self.upstreams.close()
        if self.stores is not None:
            await self.stores.stop()
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
        problems = []
        for frontend in self.frontends.values():
            if frontend.name not in self.ports:
                problems.append(f"frontend {frontend.name}: not listening")
            elif frontend.pool.healthy_count() == 0:
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
            "frontends": [
                {
                    "name": f.name,
                    "protocol": f.config.protocol,
                    "listen": f.config.listen,
                    "backend": f.pool.name,
                    "listening": f.name in self.ports,
                    "active_connections": f.active,
                    "waiting": len(f.waiting),
                    "total_connections": f.total,
                }
                for f in self.frontends.values()
            ],
            "backends": [pool.stats() for pool in self.pools.values()],
            "token_pools": {name: pool.status() for name, pool in self.token_pools.items()},
        }

    def stats(self) -> dict[str, Any]:
        return {"pools": [pool.stats() for pool in self.pools.values()]}


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

