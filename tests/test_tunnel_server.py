"""
Unit tests of the tunnel server's parts on a fake clock: the heartbeat
sweep, stream failures reported by agents, and configuration changes
applied in place.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.tunnel.config import TunnelConfig
from rproxy.tunnel.registry import AgentSession, StaticKeys
from rproxy.tunnel.server import TunnelServer


class RecordingControl:
    """
    An agent's control connection as the server sees it: records what it
    is sent and whether it was dropped.
    """

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.dropped: list[str] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def drop(self, why: str) -> None:
        self.dropped.append(why)


def session(agent_id: str, clock: Clock, **kwargs: Any) -> AgentSession:
    now = clock.seconds()
    return AgentSession(agent_id=agent_id, peer="?", key_name="k", level=-1, connected_at=now, last_seen=now,
                        control=RecordingControl(), **kwargs)


def server(clock: Clock, **config: Any) -> TunnelServer:
    return TunnelServer(TunnelConfig(name="t", **config), StaticKeys([]), None, clock)


class SweepTests(SynchronousTestCase):
    def test_sweep_survives_a_failure(self) -> None:
        """
        A sweep that raises is logged and the next one still drops the
        silent agent.
        """
        clock = Clock()
        tunnel = server(clock, heartbeat_timeout=4.0)
        tunnel.registry.add(session("quiet", clock))
        real_drop = tunnel.drop_session
        calls: list[str] = []

        def drop_session(s: AgentSession, why: str) -> None:
            calls.append(s.agent_id)
            if len(calls) == 1:
                raise RuntimeError("first sweep breaks")
            real_drop(s, why)

        tunnel.drop_session = drop_session  # type: ignore[method-assign]
        tunnel.start_sweep()
        clock.advance(4.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("quiet", tunnel.registry.agents)
        clock.advance(1.0)
        self.assertEqual((calls, tunnel.registry.agents), (["quiet", "quiet"], {}))

    def test_sweep_keeps_live_agents(self) -> None:
        """An agent heard from within heartbeat_timeout stays."""
        clock = Clock()
        tunnel = server(clock, heartbeat_timeout=4.0)
        live = session("live", clock)
        tunnel.registry.add(live)
        tunnel.start_sweep()
        for _ in range(8):
            clock.advance(1.0)
            live.last_seen = clock.seconds()
        self.assertIn("live", tunnel.registry.agents)
