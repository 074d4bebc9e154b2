"""
twistd glue: C{twistd -n rproxy --config etc/rproxy.yaml}.

Parses options and builds the service.  An invalid configuration stops
twistd before it starts, with one line per problem and no traceback.
Once it serves, one line says which rproxy runs which file and what
listens where; Twisted's own lines that repeat it ("HTTPFrontend starting
on 8080", "(TCP Port 8080 Closed)", factory start and stop) are left out
of twistd's log.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    Logger,
    PredicateResult,
    globalLogBeginner,
)
from twisted.python import usage
from zope.interface import implementer

import rproxy
from rproxy.config import ConfigError, load_config
from rproxy.service import ListenError, build_service

log = Logger()

__all__ = ["Options", "makeService"]


class ConfigOptions(usage.Options):
    """
    C{--config/-c FILE}, read with C{load}; an invalid file stops twistd
    with one line per problem (prefixed with C{prog}), exit 1, no traceback.
    """

    synopsis = "[-c CONFIG]"
    prog = "rproxy"

    def load(self, path: str) -> Any:
        raise NotImplementedError

    def postOptions(self) -> None:
        try:
            self["parsed"] = self.load(self["config"])
        except ConfigError as e:
            for line in e.lines():
                print(f"{self.prog}: {line}", file=sys.stderr)
            print(f"{self.prog}: {self['config']}: invalid configuration, not starting", file=sys.stderr)
            raise SystemExit(1) from None


class Options(ConfigOptions):
    longdesc = "Run rproxy from a YAML configuration file (SIGHUP reloads it)."
    optParameters = [
        ["config", "c", "etc/rproxy.yaml", "The YAML configuration file."],
    ]

    def load(self, path: str) -> Any:
        return load_config(path)


def global_reactor() -> Any:
    """
    The reactor twistd runs: rproxy's epoll reactor (rproxy/reactor.py)
    unless --reactor installed another.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from rproxy import reactor as rproxy_reactor

        rproxy_reactor.install()
    from twisted.internet import reactor

    return reactor


def makeService(options: Options) -> Any:
    reactor = global_reactor()

    service: Any
    if _workers(options["parsed"]) > 1:
        from rproxy.workers.master import MasterService

        service = MasterService(options["parsed"], reactor, config_path=options["config"])
    else:
        service = build_service(options["parsed"], reactor, config_path=options["config"])
    service.on_start_failure = _start_failure_handler(options)
    _install_signals(reactor, service)
    reactor.callWhenRunning(freeze_startup_heap)
    reactor.callWhenRunning(_announce_when_ready, service)
    if getattr(options, "parent", None) is not None:
        quiet_twisted_noise()
    return service


def startup_line(service: Any) -> str:
    """
    Which rproxy runs which file, and what listens where.
    """
    inner = getattr(service, "inner", None)  # a workers master: frontends in its workers
    if inner is None:
        listening = [f"frontend {name} ({service.frontends[name].config.protocol}) {_where(port)}"
                     for name, port in service.ports.items() if name in service.frontends]
    else:
        # (tunnel ports the workers share, with a cluster: "tunnel NAME ROLE")
        listening = [f"{name if name.startswith('tunnel ') else 'frontend ' + name} {_where_socket(sockets)} "
                     f"in {len(sockets)} worker(s)" for name, (_, sockets) in service.listeners.items()]
        service = inner
    for tunnel in service.tunnels.values():
        ports = getattr(tunnel, "ports", {})
        roles = ", ".join(f"{role} {_where(ports[role])}" for role in ("control", "proxy", "public") if role in ports)
        listening.append(f"tunnel {tunnel.name} {roles}")
    if service.admin_port is not None:
        where = _where(service.admin_port)
        listening.append(f"admin {where} (dashboard http://{where}/)")
    path = os.path.abspath(service.config_path) if service.config_path else "no file"
    return (f"rproxy {rproxy.__version__} (pid {os.getpid()}) running {path}: "
            + ("; ".join(listening) or "nothing listens"))


def _where(port: Any) -> str:
    host = port.getHost()
    address = getattr(host, "host", None)
    if address is None:
        return str(getattr(host, "name", host))
    return f"[{address}]:{host.port}" if ":" in address else f"{address}:{host.port}"


def _where_socket(sockets: dict[int, Any]) -> str:
    address = next(iter(sockets.values())).getsockname()
    if isinstance(address, str):
        return address
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def _announce_when_ready(service: Any) -> None:
    ready = getattr(getattr(service, "inner", service), "ready", None)
    if ready is None:
        return

    def announce(result: Any) -> Any:
        if not getattr(service, "listen_failures", None):
            log.info("{line}", line=startup_line(service))
        return result

    ready.addCallback(announce).addErrback(lambda f: log.failure("start-up line failed", f))


# Twisted's own lines that repeat rproxy's: a port's start and close (the
# service says what listens where) and factory starts and stops
_NOISE_TEXT = (re.compile(r"\S+ starting on \d+"), re.compile(r"\((TCP|UDP|UNIX|SSL) Port \S+ Closed\)"))
_NOISE_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def is_noise(event: dict[str, Any]) -> bool:
    if event.get("log_format") in _NOISE_FORMATS:
        return True
    message = event.get("message")
    if message and len(message) == 1 and isinstance(message[0], str):
        return any(p.fullmatch(message[0]) for p in _NOISE_TEXT)
    return False


@implementer(ILogFilterPredicate)
class _NotNoise:
    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        return PredicateResult.no if is_noise(event) else PredicateResult.maybe


def quiet_twisted_noise(beginner: Any = globalLogBeginner) -> None:
    """
    Have twistd's log observers (whatever --logfile/--syslog made) skip
    L{is_noise} events: the observers twistd is about to begin logging to
    are wrapped in a filter, once.
    """
    begin = beginner.beginLoggingTo

    def filtered(observers: Any, *args: Any, **kwargs: Any) -> Any:
        beginner.beginLoggingTo = begin
        return begin([FilteringLogObserver(o, [_NotNoise()]) for o in observers], *args, **kwargs)

    beginner.beginLoggingTo = filtered


def _workers(config: Any) -> int:
    """
    The worker count: 1 (the default) runs everything in this process,
    without importing the workers package.
    """
    if config.global_.workers == 1:
        return 1
    from rproxy.workers import worker_count

    return worker_count(config)


def _start_failure_handler(options: usage.Options) -> Any:
    """
    What to do when a listener cannot bind at start-up, once the service
    has logged why (one line per listener): exit 1 without the traceback
    the L{ListenError} would print.  In daemon mode the waiting parent
    process learns of it through twistd's status pipe, in twistd's own
    format ("1 " and the reason), and exits 1 with the reason; the pid
    file twistd wrote is removed.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None

    def exit_quietly(failure: ListenError) -> None:
        pidfile = parent.get("pidfile")
        if pidfile:
            try:
                with open(pidfile) as f:
                    ours = f.read().strip() == str(os.getpid())
                if ours:
                    os.remove(pidfile)
            except OSError:
                pass
        pipe = parent.get("statusPipe")
        if pipe is not None:
            parent["statusPipe"] = None
            try:
                os.write(pipe, b"1 " + failure.problems[0].encode("ascii", "backslashreplace")[:98])
                os.close(pipe)
            except OSError:
                pass
        raise SystemExit(1)

    return exit_quietly


def freeze_startup_heap() -> None:
    """
    Put what start-up made (modules, classes, the configuration) out of
    the cycle collector's reach.  A full collection otherwise walks that
    whole heap, 45-60 ms here, during which no connection is served; with
    it frozen, a full collection walks only what was made since.  Run
    once, when the reactor starts (what a reload replaces later stays
    frozen: one configuration's worth, once).
    """
    gc.collect()
    gc.freeze()


def _install_signals(reactor: Any, service: Any) -> None:
    """
    SIGHUP re-reads the configuration file; SIGUSR1 reopens the access
    log files (for logrotate).  SIGTERM stops the reactor,
    which stops the service (draining connections for up to grace_period)
    and exits 0: a requested, completed shutdown is a success, unlike
    twistd's default of re-raising the signal once stopped.
    """

    def reload(signum: int, frame: object) -> None:
        reactor.callFromThread(service.reload_from_file)

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # a second SIGTERM while draining

    def terminate(signum: int, frame: object) -> None:
        reactor.callFromThread(stop)

    def reopen(signum: int, frame: object) -> None:
        reactor.callFromThread(service.reopen_logs)

    def install() -> None:
        signal.signal(signal.SIGHUP, reload)
        signal.signal(signal.SIGUSR1, reopen)
        signal.signal(signal.SIGTERM, terminate)

    reactor.callWhenRunning(install)
