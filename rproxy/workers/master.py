"""
The master process of a machine with workers (see the package docstring).

It binds every frontend's sockets (L{rproxy.workers.sockets}), runs an
L{RProxyService} on its own part of the configuration (pools with their
health checks, tunnels, stores, the admin port: L{views.master_view}),
and supervises the workers: each is started with its end of a control
channel, sent its sockets, the servers' state and its configuration, and
started again with backoff if it dies.  Health verdicts and ejections go
to every worker as they happen; a reload is validated here once, then
applied in every worker; SIGTERM drains every worker, then the master.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import attrs
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import MultiService
from twisted.internet import defer, error, protocol, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import rproxy
from rproxy.config import Config, parse_endpoint
from rproxy.pool import Pool, Server
from rproxy.reloading import Outcome, ReloadRunner
from rproxy.service import ListenError, RProxyService, check_certificates, named_certificates
from rproxy.workers import worker_count
from rproxy.workers.channel import Channel
from rproxy.workers.child import CONTROL_FD
from rproxy.workers.merge import carry_counters, carry_totals, totals
from rproxy.workers.sockets import bind
from rproxy.workers.state import apply_ejection, snapshot
from rproxy.workers.supervise import RestartBackoff
from rproxy.workers.views import master_view, shared_listeners, tunnels_in_workers, worker_view
from rproxy.workers.wire import pack_config

__all__ = ["MasterService", "WorkerSlot"]


class WorkerSlot:
    """
    One worker's place: its sockets are the slot's, whichever process
    (the first, or one started after it died) serves them.
    """

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: Any = None
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.backoff = RestartBackoff()
        self.restarts = 0
        self.sent: set[tuple[str, str]] = set()
        self.configured = False
        self.restart: IDelayedCall | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        # the metrics text of the running process as the master last saw
        # it, and the counters of the slot's processes that died
        # (L{carry_counters}): the machine's counters never go back; the
        # same for the counters of the JSON views (L{carry_totals}), the
        # last seen by op (C{report}: /health and /stats; C{console})
        self.last_metrics = ""
        self.carried = ""
        self.last_totals: dict[str, dict[tuple[Any, ...], float]] = {}
        self.carried_totals: dict[tuple[Any, ...], float] = {}

    def current(self, answer: dict[str, Any]) -> bool:
        """
        Whether the running process sent C{answer} (not one that has
        since died or been replaced).
        """
        return self.process is not None and answer.get("pid") == self.pid

    def saw(self, answer: dict[str, Any]) -> bool:
        """
        Keep the counters of C{answer} if the running process sent it;
        whether it did.
        """
        if not self.current(answer):
            return False
        if "metrics" in answer:
            self.last_metrics = answer["metrics"]
        op = answer.get("op")
        if op == "report":
            self.last_totals[op] = totals(answer)
        elif op == "console":
            self.last_totals[op] = totals({"console": answer})
        return True

    def died(self) -> None:
        """
        The running process is gone: what it counted, as last seen, is
        carried.
        """
        if self.last_metrics:
            self.carried = carry_counters(self.carried, self.last_metrics)
        self.last_metrics = ""
        for last in self.last_totals.values():
            self.carried_totals = carry_totals(self.carried_totals, last)
        self.last_totals = {}

    def totals(self, op: str, answered: bool) -> dict[tuple[Any, ...], float]:
        """
        The counters of this slot that the workers' answers to C{op} lack:
        what its dead processes counted, and, if the running one did not
        answer, what it last showed (a slow answer is no reset either).
        """
        if answered:
            return self.carried_totals
        return carry_totals(self.carried_totals, self.last_totals.get(op, {}))

    def metrics(self, report: dict[str, Any] | None) -> list[str]:
        """
        This slot's part of the machine's metrics: the running process's
        text as C{report} has it (if it answered; else the counters it
        last showed, so that a slow answer is no reset either), and what
        its dead processes counted.
        """
        texts = [self.carried] if self.carried else []
        if report is not None and "metrics" in report:
            texts.append(report["metrics"])
        elif self.last_metrics:
            texts.append(carry_counters("", self.last_metrics))
        return texts


class _WorkerProcess(protocol.ProcessProtocol):
    """
    A worker's output (its log, one line per event, already prefixed)
    goes to the master's log; its end to the supervisor.
    """

    log = Logger()

    def __init__(self, master: MasterService, slot: WorkerSlot) -> None:
        self.master = master
        self.slot = slot
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > 65536:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self.log.info("{line}", line=line.decode("utf-8", "replace"))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.master.worker_ended(self.slot, reason)


class MasterService(MultiService):
    log = Logger()

    def __init__(self, config: Config, reactor: Any, config_path: str | None = None,
                 count: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.config_path = config_path
        self.count = count if count is not None else worker_count(config)
        self.inner = RProxyService(master_view(config), reactor, config_path=config_path)
        # one reload runner (rproxy.reloading): the inner service's admin
        # API and SIGHUP reach it; its apply is the whole machine's
        self.inner.reloads = ReloadRunner(
            reactor, self.inner._config_loader, self.apply_reload, lambda: self.stopping,
            lambda result: self.inner.metrics.reloads.labels(result).inc(), config_path, self.log)
        self.inner.pool_made = self._watch_pool
        from rproxy.workers.admin import build_master_site

        self.inner.make_admin_site = lambda service: build_master_site(self)
        self.inner.registry.register(_WorkerCollector(self))
        # frontend name -> (its listen string, its sockets by worker slot)
        self.listeners: dict[str, tuple[str, dict[int, socket.socket]]] = {}
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.stopping = False
        self.on_start_failure: Any = None

    @property
    def tunnels_in_workers(self) -> bool:
        """
        Whether the workers run the tunnels (a cluster is configured),
        each a node of the cluster, rather than this master.
        """
        return tunnels_in_workers(self.config)

    # -- start -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self.listeners = self._bind_all(self.config)
        except _BindError as e:
            line = f"{e}; not starting"
            self.log.error("{line}", line=line)
            failure = ListenError([line])
            if self.on_start_failure is not None:
                self.on_start_failure(failure)
            raise failure from None
        self.inner.on_start_failure = self.on_start_failure
        self.inner.privilegedStartService()

    def _bind_all(self, config: Config) -> dict[str, tuple[str, dict[int, socket.socket]]]:
        """
        The sockets of every frontend of C{config} (and, with tunnels in
        the workers, of every tunnel's control and public ports): one whose
        address names the socket it has keeps it (with sockets added or
        dropped if the slots serving it changed); others get new ones.

        @raise _BindError: one could not bind; none made here is left open.
        """
        made: dict[str, tuple[str, dict[int, socket.socket]]] = {}
        try:
            for name, listen, slots in shared_listeners(config, self.count):
                made[name] = self._bind(config, name, listen, slots)
        except (OSError, ValueError) as e:
            _close_unused(made, self.listeners)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            what = name if name.startswith("tunnel ") else f"frontend {name}"
            raise _BindError(f"{what}: cannot listen on {listen}: {reason}") from None
        return made

    def _bind(self, config: Config, name: str, listen: str, slots: range) -> tuple[str, dict[int, socket.socket]]:
        old = self.listeners.get(name)
        if old is not None and _same_socket(old[0], listen, old[1]):
            sockets = {slot: sock for slot, sock in old[1].items() if slot in slots}
            missing_slots = [slot for slot in slots if slot not in sockets]
            if missing_slots:
                bound = next(iter(old[1].values())).getsockname()
                port = None if isinstance(bound, str) else bound[1]
                sockets.update(bind(listen, config.global_.backlog, missing_slots, port))
            return listen, sockets
        sockets = bind(listen, config.global_.backlog, slots)
        first = sockets[slots[0]].getsockname()
        address = first if isinstance(first, str) else f"{first[0]}:{first[1]}"
        if name.startswith("tunnel "):
            self.log.info("{name} listening on {address}, in {count} worker(s)", name=name, address=address,
                          count=len(slots))
        else:
            backend = next(f.backend for f in config.frontends if f.name == name)
            self.log.info("frontend {frontend} listening on {address}, backend {backend}, in {count} worker(s)",
                          frontend=name, address=address, backend=backend, count=len(slots))
        return listen, sockets

    def startService(self) -> None:
        super().startService()
        self.inner.startService()
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.restart = None
        if self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Channel(lambda message: self._handle(slot, message), lambda reason: None)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _OneChannel(channel))
        ours.close()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(rproxy.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            slot.process = self.reactor.spawnProcess(
                _WorkerProcess(self, slot), sys.executable,
                [sys.executable, "-m", "rproxy.workers.child", str(slot.slot), str(self.count)],
                env=env, childFDs={0: "w", 1: "r", 2: "r", CONTROL_FD: theirs.fileno()})
        finally:
            theirs.close()
        slot.channel = channel
        slot.pid = slot.process.pid
        slot.started_at = self.reactor.seconds()
        slot.sent = set()  # (frontend, listen) whose socket this worker holds
        slot.configured = False
        slot.ended = defer.Deferred()
        self.log.info("worker {slot} started (pid {pid})", slot=slot.slot, pid=slot.pid)
        d = self._configure(slot, self.config)
        d.addErrback(lambda f: self.log.error("worker {slot}: not configured: {why}", slot=slot.slot,
                                              why=f.getErrorMessage()))

    def _configure(self, slot: WorkerSlot, config: Config) -> defer.Deferred[Any]:
        """
        Send C{slot}'s worker the sockets it lacks, the servers' state and
        its part of C{config}; fires when it has applied them.
        """
        channel = slot.channel
        if channel is None:
            return defer.succeed(None)
        view = worker_view(config, slot.slot, self.count)
        wanted = {(name, listen) for name, listen, slots in shared_listeners(config, self.count)
                  if slot.slot in slots}
        for name, listen in sorted(wanted - slot.sent):
            sock = self.listeners[name][1][slot.slot]
            channel.send({"op": "socket", "frontend": name, "listen": listen}, (sock.fileno(),))
        # (the worker closes what its configuration no longer uses)
        slot.sent = wanted
        for message in snapshot(self.inner.pools, self.reactor.seconds()):
            channel.send(message)
        d = channel.request({"op": "configure", "config": pack_config(view)},
                            config.global_.grace_period + 30, self.reactor)

        def applied(answer: dict[str, Any]) -> list[str]:
            if not slot.configured:
                self.log.info("worker {slot} serving (pid {pid})", slot=slot.slot, pid=slot.pid)
            slot.configured = True
            problems = list(answer.get("problems", []))
            for problem in problems:
                self.log.error("worker {slot}: {problem}", slot=slot.slot, problem=problem)
            return problems

        return d.addCallback(applied)

    # -- workers ---------------------------------------------------------

    def worker_ended(self, slot: WorkerSlot, reason: Failure) -> None:
        slot.died()
        slot.process = None
        slot.channel = None
        slot.configured = False
        ended, slot.ended = slot.ended, defer.Deferred()
        if self.stopping:
            ended.callback(None)
            return
        lived = self.reactor.seconds() - slot.started_at
        delay = slot.backoff.died(lived)
        slot.restarts += 1
        how = reason.value
        what = (f"killed by signal {how.signal}" if getattr(how, "signal", None)
                else f"exited with code {getattr(how, 'exitCode', '?')}")
        self.log.error("worker {slot} (pid {pid}) {what} after {lived:.1f}s; starting it again in {delay}s",
                       slot=slot.slot, pid=slot.pid, what=what, lived=lived, delay=delay)
        slot.restart = self.reactor.callLater(delay, self._spawn, slot)
        ended.callback(None)

    def _handle(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        if message["op"] != "ejected":
            return
        pool = self.inner.pools.get(message["pool"])
        now = self.reactor.seconds()
        until = now + float(message["until_in"])
        if pool is None or not apply_ejection(pool, message["server"], until, int(message["ejections"])):
            return
        self.log.warn("server {server} of backend {backend} ejected for {cooldown:.0f}s (seen by worker {slot}): "
                      "{reason}", server=message["server"], backend=pool.name, cooldown=until - now,
                      slot=slot.slot, reason=message.get("reason", ""))
        self.broadcast({"op": "eject", "pool": pool.name, "server": message["server"],
                        "until_in": until - now, "ejections": int(message["ejections"])}, but=slot)

    def broadcast(self, message: dict[str, Any], but: WorkerSlot | None = None) -> None:
        for slot in self.slots:
            if slot is not but and slot.channel is not None:
                slot.channel.send(message)

    def _watch_pool(self, pool: Pool) -> None:
        def changed(server: Server, up: bool, reason: str) -> None:
            self.broadcast({"op": "health", "pool": pool.name, "server": server.name, "up": up, "reason": reason})

        pool.on_state_change(changed)

    async def reports(self, timeout: float = 2.0, op: str = "report") -> list[dict[str, Any] | None]:
        """
        Every worker's figures (L{rproxy.workers.child.Worker.report}, or
        with C{op="console"} its dashboard sample); None for a worker that
        is not running, did not answer in time, or died since it answered
        (what it counted is then in the slot's carried counters).  Each
        answer is seen by its slot (L{WorkerSlot.saw}) as it comes.
        """
        asked = [self._ask(slot, op, timeout) for slot in self.slots]
        results = await defer.DeferredList(asked, consumeErrors=True)
        return [value if ok and value is not None and slot.current(value) else None
                for slot, (ok, value) in zip(self.slots, results, strict=True)]

    def _ask(self, slot: WorkerSlot, op: str, timeout: float) -> defer.Deferred[Any]:
        """
        Ask C{slot}'s worker for C{op}; its answer, seen by the slot as it
        comes (while the process that sent it still runs), or None.
        """
        if slot.channel is None or not slot.configured:
            return defer.succeed(None)

        def seen(answer: dict[str, Any]) -> dict[str, Any] | None:
            return answer if slot.saw(answer) else None

        return slot.channel.request({"op": op}, timeout, self.reactor).addCallback(seen)

    def carried_totals(self, op: str, answers: list[dict[str, Any] | None]) -> dict[tuple[Any, ...], float]:
        """
        The counters the merge of C{answers} (L{reports} for C{op}) lacks:
        every slot's (L{WorkerSlot.totals}), summed.
        """
        carried: dict[tuple[Any, ...], float] = {}
        for slot, answer in zip(self.slots, answers, strict=True):
            carried = carry_totals(carried, slot.totals(op, answer is not None))
        return carried

    # -- reload ----------------------------------------------------------

    def reload_from_file(self) -> defer.Deferred[None]:
        """
        Re-read the file (SIGHUP): validated once, here, off the reactor.
        """
        return self.inner.reload_from_file()

    def reload(self, new: Config) -> defer.Deferred[None]:
        """
        Apply C{new} (validated) everywhere and record the outcome.
        """
        return self.inner.reload(new)

    @property
    def last_reload(self) -> dict[str, Any] | None:
        return self.inner.last_reload

    async def apply_reload(self, new: Config) -> Outcome:
        """
        Apply C{new} everywhere: sockets for new addresses first (a
        reload with an address that cannot bind changes nothing: C{failed}),
        then the master's part, then every worker's (one that does not
        apply it makes the reload C{partial}); sockets no frontend uses any
        more close once every worker has let go of them.
        """
        if worker_count(new) != self.count:
            self.log.warn("global.workers: a new count takes effect after a restart; keeping {count}",
                          count=self.count)
        if new.cluster != self.config.cluster:
            # (it decides which processes hold the tunnels: the master, or
            # every worker as a node of the cluster)
            self.log.warn("cluster: changes to cluster: take effect after a restart")
            new = attrs.evolve(new, cluster=self.config.cluster)
        named = named_certificates(new)
        if named:
            # (the workers load them too, each on its own: one that cannot
            # refuses the whole reload here, before any process changes)
            try:
                await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), check_certificates, named)
            except ValueError as e:
                self.log.error("reload refused: {error}; keeping the running configuration", error=str(e))
                return "failed", [str(e)]
        try:
            listeners = self._bind_all(new)
        except _BindError as e:
            self.log.error("reload rejected: {why}; keeping the running configuration", why=str(e))
            return "failed", [str(e)]
        old, self.listeners = self.listeners, listeners
        self.config = new
        problems: list[str] = []
        inner: Outcome = await self.inner.apply_reload(master_view(new))
        problems += inner[1]
        running = [slot for slot in self.slots if slot.channel is not None]
        results = await defer.DeferredList([self._configure(slot, new) for slot in running], consumeErrors=True)
        for slot, (ok, value) in zip(running, results, strict=True):
            if not ok:
                problems.append(f"worker {slot.slot}: did not apply the configuration: {value.getErrorMessage()}")
                self.log.error("{line}", line=problems[-1])
            else:
                problems += [f"worker {slot.slot}: {problem}" for problem in (value or [])]
        _close_unused(old, self.listeners)
        self.log.info("configuration reloaded in the master and {count} worker(s)",
                      count=sum(1 for ok, _ in results if ok))
        return ("partial", problems) if problems else ("ok", [])

    def reopen_logs(self) -> None:
        self.inner.reopen_logs()
        self.broadcast({"op": "reopen"})

    # -- stop ------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """
        Close the master's copies of the sockets (so that, once each worker
        has closed its own, new connections are refused as in a single
        process), tell every worker to drain, wait for them all (killing
        any left after the grace period and a margin), then stop the
        master's own part.
        """
        self.stopping = True
        grace = self.config.global_.grace_period
        self.log.info("rproxy stopping: draining {count} worker(s) for up to {grace}s", count=self.count, grace=grace)
        _close_unused(self.listeners, {})
        self.listeners = {}
        waits = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            if slot.process is not None:
                waits.append(slot.ended)
                if slot.channel is not None:
                    slot.channel.send({"op": "stop"})
                else:
                    _signal(slot.process, "TERM")
        if waits:
            everyone = defer.DeferredList(waits)
            try:
                await everyone.addTimeout(grace + 10, self.reactor)
            except defer.TimeoutError:
                for slot in self.slots:
                    if slot.process is not None:
                        self.log.error("worker {slot} still running after the grace period: killing it",
                                       slot=slot.slot)
                        _signal(slot.process, "KILL")
        await self.inner.stopService()
        await defer.maybeDeferred(super().stopService)


class _BindError(Exception):
    """
    A frontend's sockets could not bind (the message names it).
    """


def _close_unused(old: dict[str, tuple[str, dict[int, socket.socket]]],
                  kept: dict[str, tuple[str, dict[int, socket.socket]]]) -> None:
    """
    Close the sockets of C{old} that C{kept} does not hold.
    """
    holding = {id(sock) for _, sockets in kept.values() for sock in sockets.values()}
    for _, sockets in old.values():
        for sock in sockets.values():
            if id(sock) not in holding:
                holding.add(id(sock))  # (a unix socket is every slot's: once)
                sock.close()


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _same_socket(listen: str, other: str, sockets: dict[int, socket.socket]) -> bool:
    """
    Whether C{other} names the socket already bound for C{listen} (the
    same address written another way, or the port a port 0 got).
    """
    if listen == other:
        return True
    try:
        a, b = parse_endpoint(listen), parse_endpoint(other)
    except ValueError:
        return False
    if a.same_socket(b):
        return True
    if a.kind != b.kind or a.kind == "unix" or a.port != 0 or a.interface != b.interface:
        return False
    bound = next(iter(sockets.values())).getsockname()
    return bool(b.port) and b.port == bound[1]


class _OneChannel(protocol.Factory):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Channel:
        return self.channel


class _WorkerCollector:
    """
    The master's own figures about its workers (labelled by worker slot:
    the one place where a per-worker series helps).
    """

    def __init__(self, master: MasterService) -> None:
        self.master = master

    def collect(self) -> Any:
        restarts = CounterMetricFamily("rproxy_worker_restarts", "Worker processes started again after dying",
                                       labels=["worker"])
        running = GaugeMetricFamily("rproxy_workers_running", "Worker processes running and configured")
        for slot in self.master.slots:
            restarts.add_metric([str(slot.slot)], slot.restarts)
        running.add_metric([], sum(1 for slot in self.master.slots if slot.configured))
        yield restarts
        yield running
