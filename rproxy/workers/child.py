"""
A worker process: C{python -m rproxy.workers.child SLOT COUNT}, started by
the master with its end of the control channel as descriptor 3.

It runs an L{RProxyService} on its part of the configuration
(L{rproxy.workers.views.worker_view}) whose listeners adopt the sockets
the master sent, whose pools take health state from the master and report
their passive ejections to it, and answers the master's requests for its
figures.  It stops (draining, as rproxy does on SIGTERM) when the master
says so, on SIGTERM, or when the master is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, cast

from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogBeginner
from twisted.python.failure import Failure

from rproxy.console import frontend_counters, token_pool_rows, tunnel_rows
from rproxy.pool import Pool
from rproxy.service import RProxyService
from rproxy.workers.channel import Channel
from rproxy.workers.sockets import endpoint_for
from rproxy.workers.state import apply_message
from rproxy.workers.views import tunnel_socket
from rproxy.workers.wire import unpack_config

__all__ = ["Worker", "main"]

CONTROL_FD = 3
_silent = Logger(observer=cast(ILogObserver, lambda event: None))


class NoChecks:
    """
    The health checker of a worker: the master probes, once per machine.
    """

    def __init__(self, *args: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Worker:
    log = Logger()

    def __init__(self, reactor: Any, slot: int, count: int) -> None:
        self.reactor = reactor
        self.slot = slot
        self.count = count
        self.service: RProxyService | None = None
        # frontend name -> (its listen string, the descriptor the master sent)
        self.sockets: dict[str, tuple[str, int]] = {}
        self.health: dict[tuple[str, str], dict[str, Any]] = {}
        self.ejections: dict[tuple[str, str], tuple[float, int]] = {}
        # an operator's state and weight in the master's snapshot, which
        # arrives before the configuration: kept until the pools are made
        self.admin: dict[tuple[str, str], dict[str, Any]] = {}
        self.channel = Channel(self.handle, self.master_gone)
        self.stopping: defer.Deferred[None] | None = None
        self._applying: defer.Deferred[Any] = defer.succeed(None)

    # -- messages --------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "socket":
            fd = self.channel.descriptors.popleft()
            old = self.sockets.pop(message["frontend"], None)
            if old is not None:
                os.close(old[1])
            self.sockets[message["frontend"]] = (message["listen"], fd)
        elif op == "configure":
            self._applying = self._applying.addBoth(lambda _: defer.Deferred.fromCoroutine(self.configure(message)))
        elif op == "admin":
            # kept only while there are no pools to apply it to (the
            # snapshot a new worker gets first); afterwards a reload
            # treats the state alike in every process
            if self.service is None:
                self.admin[(message["pool"], message["server"])] = message
            else:
                apply_message(self.service.pools, message, self.reactor.seconds())
        elif op in ("health", "eject"):
            self.remember(message)
            if self.service is not None:
                apply_message(self.service.pools, message, self.reactor.seconds())
        elif op == "report":
            self.channel.reply(message, self.report())
        elif op == "console":
            self.channel.reply(message, self.console())
        elif op == "agents":
            self.channel.reply(message, self.agents())
        elif op == "reopen":
            if self.service is not None:
                self.service.reopen_logs()
        elif op == "stop":
            self.stop()

    def remember(self, message: dict[str, Any]) -> None:
        key = (message["pool"], message["server"])
        if message["op"] == "health":
            self.health[key] = message
        else:
            self.ejections[key] = (self.reactor.seconds() + float(message["until_in"]), int(message["ejections"]))

    def replay(self, pools: dict[str, Pool]) -> None:
        """
        Bring C{pools} to the state the master has sent so far.
        """
        now = self.reactor.seconds()
        for message in [*self.health.values(), *self.admin.values()]:
            apply_message(pools, message, now)
        for (pool, server), (until, ejections) in self.ejections.items():
            if until > now:
                apply_message(pools, {"op": "eject", "pool": pool, "server": server, "until_in": until - now,
                                      "ejections": ejections}, now)

    async def configure(self, message: dict[str, Any]) -> None:
        problems: list[str] = []
        try:
            config = unpack_config(message["config"])
        except Exception as e:  # noqa: BLE001 - reported to the master, which logs it
            self.channel.reply(message, {"op": "configured", "problems": [f"not a configuration: {e}"]})
            return
        try:
            if self.service is None:
                self.service = service = RProxyService(config, self.reactor)
                service.listen_endpoint = self.endpoint
                service.checker_factory = NoChecks
                service.pool_made = self.watch_pool
                service.tunnel_made = self.watch_tunnel
                service.startService()
                # (its pools are made, with the snapshot's operator state
                # applied: L{watch_pool}; a backend a reload adds later
                # starts as the master's does, ready)
                self.admin.clear()
                assert service.ready is not None
                await service.ready
                problems = service.start_problems([])
                # what start-up made is this configuration's service, its
                # pools and frontends and the modules they imported: out of
                # the cycle collector's reach, as twistd's process does
                _freeze()
            else:
                # applied, not recorded: the master records the reload, once
                outcome, refused = await self.service.apply_reload(config)
                if outcome == "failed":
                    # (nothing changed here: the running configuration stays this worker's)
                    self.channel.reply(message, {"op": "configured", "problems": refused, "pid": os.getpid()})
                    return
                problems = list(self.service.listen_failures.values())
                self.replay(self.service.pools)
            self.service.config = config
        except Exception as e:  # noqa: BLE001 - reported to the master, which logs it
            problems.append(f"cannot apply the configuration: {e}")
        used = {(f.name, f.listen) for f in config.frontends}
        used |= {(tunnel_socket(t.name, role), getattr(t, role))
                 for t in config.tunnels for role in ("control", "public")}
        for name, (listen, fd) in list(self.sockets.items()):
            if (name, listen) not in used:
                del self.sockets[name]
                os.close(fd)
        self.channel.reply(message, {"op": "configured", "problems": problems, "pid": os.getpid()})

    def endpoint(self, frontend: Any, backlog: int) -> Any:
        listen, fd = self.sockets.get(frontend.name, (None, -1))
        if listen != frontend.listen:
            raise ValueError("the master sent no socket for it")
        return endpoint_for(self.reactor, frontend.listen, fd)

    def watch_tunnel(self, tunnel: Any) -> None:
        """
        A tunnel of this worker (with a cluster: L{rproxy.workers.views}):
        its control and public ports adopt the master's sockets, its
        proxy port is its own, and its local opens name that port.
        """
        def adopt(role: str, listen: str, serving: str) -> Any:
            if role not in ("control", "public"):
                return None
            name = tunnel_socket(tunnel.name, role)
            held, fd = self.sockets.get(name, (None, -1))
            if held != listen:
                raise ValueError("the master sent no socket for it")
            return endpoint_for(self.reactor, serving, fd)

        tunnel.adopt = adopt
        tunnel.names_proxy = True

    def agents(self) -> dict[str, Any]:
        """
        The agents this worker's tunnels see (L{TunnelServer.agents}: its
        own and, through the cluster, every other node's), with its node.
        """
        service = self.service
        cluster = service.cluster if service is not None else None
        return {
            "op": "agents",
            "slot": self.slot,
            "pid": os.getpid(),
            "node": cluster.node_id if cluster is not None else None,
            "tunnels": [{"name": t.name, "agents": t.agents()} for t in service.tunnels.values()]
            if service is not None else [],
        }

    def watch_pool(self, pool: Pool) -> None:
        """
        A pool of this worker: its state changes come from the master
        (which logs them once for the machine, so the pool here is
        silent), and its passive ejections go to the master.
        """
        pool.log = _silent
        self.replay({pool.name: pool})
        record_failure = pool.record_failure

        def report_ejection(server: Any, reason: str) -> None:
            before = server.ejected_until
            record_failure(server, reason)
            if server.ejected_until != before:
                self.channel.send({"op": "ejected", "pool": pool.name, "server": server.name,
                                   "until_in": server.ejected_until - self.reactor.seconds(),
                                   "ejections": server.ejections, "reason": reason})

        pool.record_failure = report_ejection  # type: ignore[method-assign]

    def report(self) -> dict[str, Any]:
        service = self.service
        if service is None:
            return {"op": "report", "slot": self.slot, "pid": os.getpid(), "ready": ["starting"]}
        return {
            "op": "report",
            "slot": self.slot,
            "pid": os.getpid(),
            "ready": service.readiness_problems(),
            "unusable": sorted(f"{pool.name}/{server.name}" for pool in service.pools.values()
                               for server in pool.servers if not server.usable(self.reactor.seconds())),
            "health": service.health_detail(),
            "stats": service.stats(),
            "metrics": generate_latest(service.registry).decode("utf-8"),
        }

    def console(self) -> dict[str, Any]:
        """
        What the master's dashboard samples of this worker, once per
        interval whoever watches (L{rproxy.workers.console}): small, so
        that sampling costs the proxy nothing it would notice.
        """
        service = self.service
        if service is None:
            return {"op": "console", "slot": self.slot, "pid": os.getpid(), "frontends": [], "backends": [],
                    "token_pools": [], "ready": ["starting"]}
        return {
            "op": "console",
            "slot": self.slot,
            "pid": os.getpid(),
            "frontends": frontend_counters(service),
            "backends": [pool.describe() for pool in service.pools.values()],
            "token_pools": token_pool_rows(service),
            "ready": service.readiness_problems(),
            # (tunnels run here with a cluster: rproxy.workers.views)
            "node": service.cluster.node_id if service.cluster is not None else None,
            "tunnels": tunnel_rows(service),
        }

    # -- stop ------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        if self.stopping is None:
            self.stopping = defer.Deferred.fromCoroutine(self._stop())
        return self.stopping

    async def _stop(self) -> None:
        # this process's copies of the listening sockets go first, so that
        # once the service has closed the ones it adopted (and the master
        # its own), new connections are refused at once
        for _, fd in self.sockets.values():
            os.close(fd)
        self.sockets.clear()
        if self.service is not None and self.service.running:
            await self.service.stopService()
        self.reactor.stop()

    def master_gone(self, reason: Failure) -> None:
        if self.stopping is None:
            self.log.warn("worker {slot}: the master is gone; stopping", slot=self.slot)
            self.stop()


def main(argv: list[str]) -> int:
    slot, count = int(argv[1]), int(argv[2])
    from rproxy import reactor as rproxy_reactor

    rproxy_reactor.install()
    from twisted.internet import reactor as installed

    from rproxy.tap import is_noise

    reactor: Any = installed
    prefix = f"worker {slot}: "

    def observer(event: dict[str, Any]) -> None:
        if is_noise(event):
            return  # (Twisted's port and factory lines: the service says what listens where)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        sys.stdout.write("".join(prefix + line + "\n" for line in text.splitlines()))
        sys.stdout.flush()

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False)
    worker = Worker(reactor, slot, count)
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, _factory(worker.channel))
    os.close(CONTROL_FD)
    # the master decides: Ctrl-C in a terminal reaches it (and it stops us);
    # SIGTERM sent to a worker alone drains it like the master's stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(worker.stop))
    reactor.run(installSignalHandlers=False)
    return 0


def _freeze() -> None:
    from rproxy.tap import freeze_startup_heap

    freeze_startup_heap()


def _factory(channel: Channel) -> Any:
    from twisted.internet import protocol

    class OneChannel(protocol.Factory):
        def buildProtocol(self, addr: Any) -> Channel:
            return channel

    return OneChannel()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
