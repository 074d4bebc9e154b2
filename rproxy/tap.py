"""
twistd glue: C{twistd -n rproxy --config etc/rproxy.yaml}.

Only parses options and builds the service.  An invalid configuration
stops twistd before it starts, with one line per problem and no traceback.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from rproxy.config import ConfigError, load_config
from rproxy.service import ListenError, build_service

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
    return service


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
