"""
twistd glue for the agent: C{twistd -n rproxy-agent --config etc/agent.yaml}.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning

from rproxy.tap import ConfigOptions, global_reactor, quiet_twisted_noise
from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import load_agent_config

__all__ = ["Options", "makeService"]


class Options(ConfigOptions):
    longdesc = "Run an rproxy tunnel agent from a YAML configuration file."
    prog = "rproxy-agent"
    optParameters = [
        ["config", "c", "etc/agent.yaml", "The agent's YAML configuration file."],
    ]

    def load(self, path: str) -> Any:
        return load_agent_config(path)


def makeService(options: Options) -> AgentService:
    reactor = global_reactor()
    service = AgentService(options["parsed"], reactor)
    service.on_login_failure = lambda: exit_with(reactor, 1)
    if getattr(options, "parent", None) is not None:
        quiet_twisted_noise()
    return service


def exit_with(reactor: Any, status: int) -> None:
    """
    Stop the reactor, then leave with C{status} once shutdown is done
    (twistd itself would exit 0).
    """

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    try:
        reactor.stop()
    except ReactorNotRunning:
        leave()
