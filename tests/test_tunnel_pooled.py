"""
Pooled data connections (C{pool_count}) that answer C{start_stream} with
C{start_result}, on a fake clock and in-memory transports: the server
hands such a connection to a request only once the agent's local service
accepted, so that a refusal sends the engine to the next agent; the agent
says which; agents and servers of the older exchange still work.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.tunnel.agent import AgentControl
from rproxy.tunnel.httpmode import AgentRefused
from rproxy.tunnel.streams import ProxyProtocol
from rproxy.tunnel.wire import (
    Error,
    FrameDecoder,
    Login,
    LoginResult,
    NewProxyConn,
    ProtocolError,
    RequestNewProxyConn,
    StartResult,
    StartStream,
    decode_body,
    encode,
)
from tests.test_tunnel_agent import AgentTestMixin, sent
from tests.test_tunnel_httpmode import Tunnel


class PooledTunnel(Tunnel):
    """
    A mode http tunnel whose agent "a" keeps C{pool} idle connections and
    answers start_stream (C{start_result}) or not.
    """

    def __init__(self, start_result: bool = True, pool: int = 1) -> None:
        super().__init__(("a", ()))
        self.session = self.server.registry.agents["a"]
        self.session.pool_count = pool
        self.session.start_result = start_result
        self.server.refill_pool(self.session)

    def fill(self) -> list[ProxyProtocol]:
        """Deliver every pooled connection asked for; they wait idle."""
        proxies = [self.deliver(r) for r in self.requested("a") if r.pool]
        self.controls["a"].transport.clear()  # type: ignore[union-attr]
        for proxy in proxies:
            proxy.transport.clear()  # type: ignore[union-attr]
        return proxies

    def get(self) -> Any:
        return self.connector.get(self.choice().try_acquire(None, []), None, 5.0)


def frames(proxy: ProxyProtocol) -> list[Any]:
    return FrameDecoder().feed(proxy.transport.value())  # type: ignore[union-attr]


class ServerTests(SynchronousTestCase):
    def test_refusal_fails_the_open(self) -> None:
        """
        The open waits for the agent's answer; a refusal fails it as a
        PeerRefused with the agent's reason (the engine tries the next
        agent whatever the method), closes that connection and asks for
        another pooled one.
        """
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        self.assertNoResult(d)
        self.assertEqual(t.session.load, 1)
        self.assertEqual(frames(proxy), [StartStream(None, ack=True)])
        proxy.dataReceived(encode(StartResult(ok=False, error="local service web unreachable")))
        failure = self.failureResultOf(d, AgentRefused)
        self.assertEqual(str(failure.value), "agent a: local service web unreachable")
        self.assertEqual(frames(proxy), [StartStream(None, ack=True)])  # no request byte followed
        self.assertTrue(proxy.transport.disconnecting)  # type: ignore[union-attr]
        self.assertEqual(len([r for r in t.requested("a") if r.pool]), 1)  # refilled
        self.assertEqual((t.session.failed_total, t.connector.opening, t.session.load), (1, set(), 0))
        self.assertEqual([c for c in t.clock.getDelayedCalls() if c.func.__name__ == "timed_out"], [])

    def test_started_hands_the_connection_over(self) -> None:
        """
        Once the agent says its service accepted, the connection is the
        engine's; bytes behind the answer are the response's.
        """
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        proxy.dataReceived(encode(StartResult(ok=True)) + b"HTTP/1.1 200 OK\r\n")
        conn = self.successResultOf(d)
        self.assertIs(proxy.upstream, conn)
        self.assertEqual((t.server.streams_opened, t.server.streams_from_pool, t.session.load), (1, 1, 1))
        self.assertEqual([c for c in t.clock.getDelayedCalls() if c.func.__name__ == "timed_out"], [])

    def test_closed_before_answering(self) -> None:
        """A pooled connection lost before the agent answered fails the open (nothing was sent)."""
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        proxy.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(str(self.failureResultOf(d, AgentRefused).value),
                         "agent a: closed its pooled connection before the stream started")

    def test_bad_answer(self) -> None:
        """Another frame than start_result fails the open and closes that connection only."""
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        proxy.dataReceived(encode(NewProxyConn("x", "y")))
        self.assertEqual(str(self.failureResultOf(d, AgentRefused).value),
                         "agent a: expected start_result, got new_proxy_conn")
        self.assertIn("a", t.server.registry.agents)

    def test_no_answer_in_time(self) -> None:
        """No answer within the open timeout: the open fails and the connection is closed."""
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        t.clock.advance(5.0)
        self.assertEqual(str(self.failureResultOf(d, AgentRefused).value), "agent a did not open a stream in time")
        self.assertTrue(proxy.transport.disconnecting)  # type: ignore[union-attr]

    def test_cancelled_while_waiting(self) -> None:
        """A request given up while the agent starts closes that connection and its timer."""
        t = PooledTunnel()
        [proxy] = t.fill()
        d = t.get()
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(proxy.transport.disconnecting)  # type: ignore[union-attr]
        self.assertEqual(t.session.load, 0)
        self.assertEqual([c for c in t.clock.getDelayedCalls() if c.func.__name__ == "timed_out"], [])

    def test_agent_without_start_result(self) -> None:
        """An agent of the older exchange gets its pooled connection used at once, as before."""
        t = PooledTunnel(start_result=False)
        [proxy] = t.fill()
        conn = self.successResultOf(t.get())
        self.assertIs(proxy.upstream, conn)
        self.assertEqual(frames(proxy), [StartStream(None)])
        self.assertNotIn(b"ack", proxy.transport.value())  # type: ignore[union-attr]


class AgentTests(AgentTestMixin, SynchronousTestCase):
    def pooled(self, start: StartStream) -> tuple[AgentControl, StringTransport, StringTransport, Any]:
        """
        A logged-in agent with one pooled connection, sent C{start}: its
        control transport, that connection's transport, and the factory of
        its connect to the local service.
        """
        agent, clock, reactor, _ = self.make_agent(pool_count=1)
        control = AgentControl(agent)
        transport = StringTransport()
        control.makeConnection(transport)
        [login] = sent(transport)
        self.assertTrue(login.start_result)
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        control.dataReceived(encode(RequestNewProxyConn("c1", "s", pool=True)))
        _, _, factory, _, _ = reactor.tcpClients[-1]
        proxy_transport = StringTransport()
        end = factory.buildProtocol(None)
        end.makeConnection(proxy_transport)
        self.assertEqual(sent(proxy_transport), [NewProxyConn("c1", "s")])
        proxy_transport.clear()
        transport.clear()
        end.dataReceived(encode(start))
        _, _, local_factory, _, _ = reactor.tcpClients[-1]
        self.addCleanup(control.connectionLost, Failure(ConnectionDone()))
        return control, transport, proxy_transport, local_factory

    def test_refusal_on_the_connection(self) -> None:
        """
        Asked for an answer, the agent whose local service refuses says so
        on the pooled connection and closes it cleanly (the frame arrives).
        """
        control, transport, proxy_transport, local = self.pooled(StartStream(None, ack=True))
        local.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(sent(proxy_transport), [StartResult(ok=False, error="local service web unreachable")])
        self.assertTrue(proxy_transport.disconnecting)
        self.assertEqual(sent(transport), [])

    def test_started_answer_comes_first(self) -> None:
        """The accepted stream's first byte to the server is start_result ok."""
        control, transport, proxy_transport, local = self.pooled(StartStream(None, ack=True))
        local.buildProtocol(None).makeConnection(StringTransport())
        self.assertEqual(sent(proxy_transport), [StartResult(ok=True)])

    def test_unknown_service_on_the_connection(self) -> None:
        """A pooled start for a service the agent lacks is refused on the connection."""
        control, transport, proxy_transport, _ = self.pooled(StartStream("db", ack=True))
        self.assertEqual(sent(proxy_transport), [StartResult(ok=False, error="no local service named 'db'")])

    def test_server_without_ack(self) -> None:
        """A server that does not ask gets no answer frame: a refusal cuts the connection, as before."""
        control, transport, proxy_transport, local = self.pooled(StartStream(None))
        local.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(proxy_transport.value(), b"")
        self.assertEqual(sent(transport), [Error("local service web unreachable")])


class WireTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for message in (StartStream("web", ack=True), StartStream(None), StartResult(ok=True),
                        StartResult(ok=False, error="refused"),
                        Login(agent_id="a", api_key="k", start_result=True)):
            self.assertEqual(FrameDecoder().feed(encode(message)), [message])

    def test_old_peers(self) -> None:
        """Frames without the new fields read as the older exchange."""
        self.assertEqual(decode_body(b'{"type":"start_stream","service":null}'), StartStream(None))
        login = decode_body(b'{"type":"login","version":1,"agent_id":"a","api_key":"k"}')
        self.assertFalse(login.start_result)  # type: ignore[union-attr]

    def test_bad_fields(self) -> None:
        for body in (b'{"type":"start_result","ok":"yes"}', b'{"type":"start_stream","ack":1}',
                     b'{"type":"login","version":1,"agent_id":"a","api_key":"k","start_result":"x"}'):
            self.assertRaises(ProtocolError, decode_body, body)
