"""
twistd glue for the agent: C{twistd -n rproxy-agent --config etc/agent.yaml}.
"""

from __future__ import annotations

from typing import Any

from rproxy.tap import ConfigOptions, global_reactor
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
    return AgentService(options["parsed"], global_reactor())
