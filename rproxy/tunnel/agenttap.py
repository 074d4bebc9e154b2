"""
twistd glue for the agent: C{twistd -n rproxy-agent --config etc/agent.yaml}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from rproxy.config import ConfigError
from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import load_agent_config

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = "Run an rproxy tunnel agent from a YAML configuration file."
    optParameters = [
        ["config", "c", "etc/agent.yaml", "The agent's YAML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load_agent_config(self["config"])
        except ConfigError as e:
            for line in e.errors:
                print(f"rproxy-agent: {line}", file=sys.stderr)
            print(f"rproxy-agent: {self['config']}: invalid configuration, not starting", file=sys.stderr)
            raise SystemExit(1) from None


def makeService(options: Options) -> AgentService:
    if "twisted.internet.reactor" not in sys.modules:
        from rproxy import reactor as rproxy_reactor

        rproxy_reactor.install()
    from twisted.internet import reactor

    return AgentService(options["parsed"], reactor)
