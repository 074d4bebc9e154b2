"""
twistd glue: C{twistd -n rproxy --config etc/rproxy.yaml}.

Only parses options and builds the service.  An invalid configuration
stops twistd before it starts, with one line per problem and no traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.python import usage

from rproxy.config import ConfigError, load_config
from rproxy.service import RProxyService, build_service

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = "Run rproxy from a YAML configuration file (SIGHUP reloads it)."
    optParameters = [
        ["config", "c", "etc/rproxy.yaml", "The YAML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load_config(self["config"])
        except ConfigError as e:
            for line in e.errors:
                print(f"rproxy: {line}", file=sys.stderr)
            print(f"rproxy: {self['config']}: invalid configuration, not starting", file=sys.stderr)
            raise SystemExit(1) from None


def makeService(options: Options) -> RProxyService:
    from twisted.internet import reactor

    service = build_service(options["parsed"], reactor, config_path=options["config"])
    _install_sighup(reactor, service)
    return service


def _install_sighup(reactor: Any, service: RProxyService) -> None:
    """
    SIGHUP re-reads the configuration file, from the reactor thread.
    """

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(service.reload_from_file)

    def install() -> None:
        signal.signal(signal.SIGHUP, handler)

    reactor.callWhenRunning(install)
