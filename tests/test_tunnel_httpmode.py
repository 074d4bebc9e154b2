"""
The agents as the HTTP engine's peers (L{rproxy.tunnel.httpmode}), on a
fake clock: the choice of agent, and the connector's opens and pool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rproxy.http.upstream import PeerRefused
from rproxy.pool import NoServerAvailable
from rproxy.tunnel.config import TunnelConfig
from rproxy.tunnel.httpmode import AgentChoice, AgentRefused
from rproxy.tunnel.registry import AgentSession, StaticKeys
from rproxy.tunnel.server import ControlProtocol, TunnelServer
from rproxy.tunnel.streams import ProxyProtocol
from rproxy.tunnel.wire import Error, FrameDecoder, NewProxyConn, RequestNewProxyConn, encode


def anyone(agent: AgentSession) -> bool:
    return True


class Tunnel:
    def __init__(self, *agents: tuple[str, tuple[str, ...]], **config: Any) -> None:
        self.clock = Clock()
        self.server = TunnelServer(TunnelConfig(name="t", mode="http", **config), StaticKeys([]), None, self.clock)
        self.controls: dict[str, ControlProtocol] = {}
        for name, models in agents:
            control = ControlProtocol(self.server)
            control.makeConnection(StringTransport())
            control._login_timer.cancel()  # type: ignore[union-attr]
            session = AgentSession(agent_id=name, peer="?", key_name="k", level=-1, connected_at=0.0,
                                   last_seen=0.0, control=control, models=models)
            control.session = session
            self.controls[name] = control
            self.server.registry.add(session)
        assert self.server.connector is not None
        self.connector = self.server.connector

    def choice(self, model: str | None = None) -> AgentChoice:
        return AgentChoice(self.server, self.connector, model, anyone)

    def requested(self, name: str) -> list[RequestNewProxyConn]:
        sent = FrameDecoder().feed(self.controls[name].transport.value())  # type: ignore[union-attr]
        return [m for m in sent if isinstance(m, RequestNewProxyConn)]

    def deliver(self, request: RequestNewProxyConn) -> ProxyProtocol:
        proxy = ProxyProtocol(self.server)
        proxy.makeConnection(StringTransport())
        proxy.dataReceived(encode(NewProxyConn(request.conn_id, request.secret)))
        return proxy


class AgentChoiceTests(SynchronousTestCase):
    def test_ties_rotate(self) -> None:
        """Agents equally busy are taken in turn."""
        t = Tunnel(("a", ()), ("b", ()), ("c", ()))
        picks = [t.choice().try_acquire(None, []).name for _ in range(6)]  # type: ignore[union-attr]
        self.assertEqual(sorted(picks[:3]), ["a", "b", "c"])
        self.assertEqual(picks[3:], picks[:3])

    def test_least_busy_first(self) -> None:
        """The agent with fewer requests in flight is chosen while the other is busier."""
        t = Tunnel(("a", ()), ("b", ()))
        t.server.registry.agents["a"].streams.add(object())
        self.assertEqual({t.choice().try_acquire(None, []).name for _ in range(4)}, {"b"})  # type: ignore[union-attr]

    def test_model_and_tried(self) -> None:
        """Only agents serving the model and not tried yet; none left is a 503 reason."""
        t = Tunnel(("a", ("llama3",)), ("b", ("qwen2",)))
        choice = t.choice("qwen2")
        self.assertEqual(choice.try_acquire(None, []).name, "b")  # type: ignore[union-attr]
        self.assertIsNone(choice.try_acquire(None, ["b"]))
        self.assertFalse(choice.any_up(["b"]))
        failure = self.failureResultOf(choice.acquire(None, []), NoServerAvailable)
        self.assertEqual(failure.getErrorMessage(), "no agent serving 'qwen2' is connected")


class AgentConnectorTests(SynchronousTestCase):
    def test_open_then_kept_alive(self) -> None:
        """
        A first request asks the agent for a data connection; once it has
        served, the next request takes it again without asking.
        """
        t = Tunnel(("a", ()))
        peer = t.choice().try_acquire(None, [])
        d = t.connector.get(peer, None, 5.0)
        self.assertNoResult(d)
        [request] = t.requested("a")
        proxy = t.deliver(request)
        conn = self.successResultOf(d)
        self.assertIs(proxy.upstream, conn)
        self.assertEqual(t.server.registry.agents["a"].load, 1)
        t.connector.put(conn)
        self.assertEqual(t.server.registry.agents["a"].load, 0)
        self.assertIs(t.connector.take_idle(peer), conn)
        self.assertEqual((len(t.requested("a")), t.server.streams_opened), (1, 1))

    def test_refused_fails_at_once(self) -> None:
        """An agent's refusal fails the open with its reason, a PeerRefused: nothing was sent."""
        t = Tunnel(("a", ()))
        peer = t.choice().try_acquire(None, [])
        d = t.connector.get(peer, None, 5.0)
        [request] = t.requested("a")
        t.controls["a"].dataReceived(encode(Error("local service web unreachable", conn_id=request.conn_id)))
        failure = self.failureResultOf(d, AgentRefused)
        self.assertIsInstance(failure.value, PeerRefused)
        self.assertEqual(str(failure.value), "agent a: local service web unreachable")
        self.assertEqual((t.server.registry.pending, t.clock.getDelayedCalls()), ({}, []))

    def test_open_timeout(self) -> None:
        """An agent that does not deliver within the timeout fails the open."""
        t = Tunnel(("a", ()))
        d = t.connector.get(t.choice().try_acquire(None, []), None, 5.0)
        t.clock.advance(5.0)
        self.assertEqual(str(self.failureResultOf(d, AgentRefused).value),
                         "agent a did not open a stream in time")
        self.assertEqual(t.server.registry.agents["a"].failed_total, 1)

    def test_agent_gone(self) -> None:
        """
        A dropped agent fails its waiting opens now (the engine tries
        another agent) and closes its data connections, idle or busy.
        """
        t = Tunnel(("a", ()))
        peer = t.choice().try_acquire(None, [])
        first, second, opening = (t.connector.get(peer, None, 5.0) for _ in range(3))
        idle_proxy, busy_proxy = (t.deliver(request) for request in t.requested("a")[:2])
        t.connector.put(self.successResultOf(first))
        self.successResultOf(second)
        t.server.drop_session(t.server.registry.agents["a"], "test")
        self.assertEqual(str(self.failureResultOf(opening, AgentRefused).value), "agent a went away")
        self.assertTrue(idle_proxy.transport.disconnecting)  # type: ignore[union-attr]
        self.assertTrue(busy_proxy.transport.disconnecting)  # type: ignore[union-attr]
        self.assertEqual([c for c in t.clock.getDelayedCalls() if c.func.__name__ == "timed_out"], [])
