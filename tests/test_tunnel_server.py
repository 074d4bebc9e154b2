"""
Unit tests of the tunnel server's parts on a fake clock: the heartbeat
sweep, stream failures reported by agents, and configuration changes
applied in place.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rproxy.tunnel.config import ApiKeyConfig, TunnelConfig
from rproxy.tunnel.registry import AgentSession, StaticKeys
from rproxy.tunnel.server import ControlProtocol, PublicProtocol, TunnelServer
from rproxy.tunnel.wire import REPLACED, Error, FrameDecoder, Login, RequestNewProxyConn, encode


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
    kwargs.setdefault("control", RecordingControl())
    return AgentSession(agent_id=agent_id, peer="?", key_name="k", level=-1, connected_at=now, last_seen=now,
                        **kwargs)


def server(clock: Clock, **config: Any) -> TunnelServer:
    return TunnelServer(TunnelConfig(name="t", **config), StaticKeys([]), None, clock)


def public_of(tunnel: TunnelServer) -> Any:
    """
    A new connection on the public port: the HTTP frontend's in mode http.
    """
    if tunnel.http is not None:
        return tunnel.http.buildProtocol(None)
    return PublicProtocol(tunnel)


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

        tunnel.drop_session = drop_session  # type: ignore[method-assign,assignment]
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


class StreamRefusedTests(SynchronousTestCase):
    """
    An agent whose local service refuses reports the stream's conn id; the
    server fails that stream at once instead of after open_timeout.
    """

    def open(self, mode: str) -> tuple[TunnelServer, Clock, Any, StringTransport, Any]:
        clock = Clock()
        extra = {"header_timeout": 10.0} if mode == "http" else {}
        tunnel = server(clock, mode=mode, open_timeout=5.0, **extra)
        control = ControlProtocol(tunnel)
        control.makeConnection(StringTransport())
        agent = session("a", clock)
        agent.control = control
        control.session = agent
        tunnel.registry.add(agent)
        public = public_of(tunnel)
        transport = StringTransport()
        public.makeConnection(transport)
        return tunnel, clock, control, transport, public

    def requested(self, control: Any) -> RequestNewProxyConn:
        [request] = [m for m in FrameDecoder().feed(control.transport.value()) if isinstance(m, RequestNewProxyConn)]
        return request

    def test_http_gets_502_at_once(self) -> None:
        """mode http: the client gets 502 with the agent's reason, no waiting."""
        tunnel, clock, control, transport, public = self.open("http")
        public.dataReceived(b"GET /v1/files HTTP/1.1\r\nHost: gpu\r\n\r\n")
        request = self.requested(control)
        control.dataReceived(encode(Error("local service web unreachable", conn_id=request.conn_id)))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertEqual(json.loads(body)["error"]["message"], "agent a: local service web unreachable")
        self.assertTrue(transport.disconnecting)
        self.assertEqual((tunnel.registry.pending, tunnel.registry.agents["a"].failed_total), ({}, 1))
        self.assertEqual([c for c in clock.getDelayedCalls() if "timed_out" in c.func.__name__], [])

    def test_tcp_closes_at_once(self) -> None:
        """mode tcp, no other agent: the public connection is closed at once."""
        tunnel, clock, control, transport, public = self.open("tcp")
        request = self.requested(control)
        control.dataReceived(encode(Error("local service web unreachable", conn_id=request.conn_id)))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(tunnel.registry.pending, {})

    def test_tcp_asks_the_next_agent(self) -> None:
        """
        mode tcp: a refusal (nothing was spliced yet) sends the client to
        the next agent at once, as an open timeout does; when that one
        refuses too the client is closed with its reason.
        """
        tunnel, clock, control, transport, public = self.open("tcp")
        other = ControlProtocol(tunnel)
        other.makeConnection(StringTransport())
        other.session = session("b", clock, control=other)
        tunnel.registry.add(other.session)
        first = self.requested(control)
        control.dataReceived(encode(Error("local service web unreachable", conn_id=first.conn_id)))
        self.assertFalse(transport.disconnecting)
        second = self.requested(other)
        self.assertEqual(list(tunnel.registry.pending), [second.conn_id])
        other.dataReceived(encode(Error("local service web unreachable", conn_id=second.conn_id)))
        self.assertTrue(transport.disconnecting)
        self.assertEqual((public.end, tunnel.streams_failed, tunnel.registry.pending), ("agent_refused", 1, {}))
        self.assertEqual([c for c in clock.getDelayedCalls() if "timed_out" in c.func.__name__], [])

    def test_other_agents_conn_id_is_ignored(self) -> None:
        """An error naming a stream of another agent changes nothing."""
        tunnel, clock, control, transport, public = self.open("tcp")
        request = self.requested(control)
        other = ControlProtocol(tunnel)
        other.makeConnection(StringTransport())
        other.session = session("b", clock, control=other)
        tunnel.registry.add(other.session)
        other.dataReceived(encode(Error("no", conn_id=request.conn_id)))
        self.assertFalse(transport.disconnecting)
        self.assertIn(request.conn_id, tunnel.registry.pending)
        clock.advance(5.0)  # then the open times out as before: the next agent is asked
        self.assertEqual(len([m for m in FrameDecoder().feed(other.transport.value())
                              if isinstance(m, RequestNewProxyConn)]), 1)


class ReplacedSessionTests(SynchronousTestCase):
    def test_replaced_agent_is_told_why(self) -> None:
        """
        A login with the agent id of a live session replaces it at once,
        and the old session's agent is told why (code replaced) before
        its connection closes.
        """
        clock = Clock()
        tunnel = server(clock)
        controls = []
        for address in ("10.0.0.1", "10.0.0.2"):
            control = ControlProtocol(tunnel)
            control.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", address, 5000)))
            control.checked(ApiKeyConfig(key="k", name="k"), Login(agent_id="a", api_key="k"))
            controls.append(control)
        old, new = controls
        self.assertIs(tunnel.registry.agents["a"].control, new)
        self.assertEqual(FrameDecoder().feed(old.transport.value())[1:],  # type: ignore[union-attr]
                         [Error("replaced by a new login of agent_id 'a' from 10.0.0.2:5000", code=REPLACED)])
        self.assertTrue(old.transport.disconnecting)  # type: ignore[union-attr]
        self.assertFalse(new.transport.disconnecting)  # type: ignore[union-attr]


class RevokeKeyTests(SynchronousTestCase):
    def test_sessions_of_the_key_end(self) -> None:
        """
        Revoking a key (by its store id, or by its digest) tells its
        agents why and drops them; agents of other keys stay.
        """
        clock = Clock()
        tunnel = server(clock)
        controls = {}
        for name, key_id, digest in (("a1", 7, b"d7"), ("a2", 7, b"d7"), ("b", 8, b"d8"), ("s", None, b"ds")):
            control = controls[name] = ControlProtocol(tunnel)
            control.makeConnection(StringTransport())
            control.session = session(name, clock, control=control, key_id=key_id, key_digest=digest)
            tunnel.registry.add(control.session)
        self.assertEqual(tunnel.revoke_key(key_id=7), 2)
        self.assertEqual(sorted(tunnel.registry.agents), ["b", "s"])
        for name in ("a1", "a2"):
            self.assertEqual(FrameDecoder().feed(controls[name].transport.value()),  # type: ignore[union-attr]
                             [Error("its API key 'k' was revoked")])
            self.assertTrue(controls[name].transport.disconnecting)  # type: ignore[union-attr]
        self.assertEqual(tunnel.revoke_key(key_digest=b"ds"), 1)
        self.assertEqual(tunnel.revoke_key(key_id=7), 0)
        self.assertEqual(sorted(tunnel.registry.agents), ["b"])
        self.assertFalse(controls["b"].transport.disconnecting)  # type: ignore[union-attr]


class LargeBodyTests(SynchronousTestCase):
    """
    With model_body_limit of 1 MiB (beyond what an end-to-end
    configuration allows today), a body far past the early-data bound is
    read whole for its model.
    """

    def test_model_after_200_kib(self) -> None:
        """A model field after 200 KiB of messages picks the agent serving it."""
        clock = Clock()
        tunnel = server(clock, mode="http", model_body_limit=1024 * 1024)
        controls = {}
        for name, model in (("a", "llama3"), ("b", "qwen2")):
            control = controls[name] = RecordingControl()
            tunnel.registry.add(session(name, clock, control=control, models=(model,)))
        public = public_of(tunnel)
        transport = StringTransport()
        public.makeConnection(transport)
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}], "model": "qwen2"}).encode()
        public.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Length: %d\r\n\r\n"
                            % len(body))
        for i in range(0, len(body), 16384):
            public.dataReceived(body[i : i + 16384])
        self.assertEqual((len(controls["a"].sent), len(controls["b"].sent)), (0, 1))
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(public.exchange.notes["model"], "qwen2")

    def test_past_the_limit_is_413(self) -> None:
        """A body past model_body_limit is refused with 413, not routed by guess."""
        clock = Clock()
        tunnel = server(clock, mode="http", model_body_limit=1024)
        control = RecordingControl()
        tunnel.registry.add(session("a", clock, control=control, models=("llama3",)))
        public = public_of(tunnel)
        transport = StringTransport()
        public.makeConnection(transport)
        public.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gpu\r\nContent-Length: 2000\r\n\r\n"
                            + b"{" + b" " * 1999)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(json.loads(transport.value().partition(b"\r\n\r\n")[2])["error"]["code"],
                         "request_too_large")
        self.assertEqual(control.sent, [])


class AdvertisingCluster:
    """A cluster node as a worker's tunnel sees it: its advertised proxy address."""

    def advertised(self, tunnel: Any) -> str:
        return "127.0.0.1:17003"


class WorkerProxyTests(SynchronousTestCase):
    """
    A tunnel in a worker of workers: N with a cluster names its own proxy
    address in every open it asks of its own agents (the agent's
    configured proxy port would reach another worker).
    """

    def open(self, names_proxy: bool, pool: bool = False) -> list[RequestNewProxyConn]:
        clock = Clock()
        tunnel = server(clock, open_timeout=5.0)
        tunnel.cluster = AdvertisingCluster()
        tunnel.names_proxy = names_proxy
        control = ControlProtocol(tunnel)
        control.makeConnection(StringTransport())
        agent = session("a", clock, pool_count=1 if pool else 0)
        agent.control = control
        control.session = agent
        tunnel.registry.add(agent)
        if pool:
            tunnel.refill_pool(agent)
        else:
            PublicProtocol(tunnel).makeConnection(StringTransport())
        return [m for m in FrameDecoder().feed(control.transport.value()) if isinstance(m, RequestNewProxyConn)]

    def test_stream_names_the_proxy(self) -> None:
        """A public connection's open names the advertised proxy address."""
        [request] = self.open(names_proxy=True)
        self.assertEqual(request.proxy, "127.0.0.1:17003")

    def test_pooled_connection_names_the_proxy(self) -> None:
        """So does a pooled connection's."""
        [request] = self.open(names_proxy=True, pool=True)
        self.assertEqual((request.pool, request.proxy), (True, "127.0.0.1:17003"))

    def test_otherwise_the_agents_own(self) -> None:
        """Outside such a worker, the agent dials its configured proxy port."""
        [request] = self.open(names_proxy=False)
        self.assertIsNone(request.proxy)

    def test_named_already_kept(self) -> None:
        """An open another node asked for keeps that node's address."""
        clock = Clock()
        tunnel = server(clock)
        tunnel.cluster = AdvertisingCluster()
        tunnel.names_proxy = True
        control = ControlProtocol(tunnel)
        control.makeConnection(StringTransport())
        control.send(RequestNewProxyConn("c", "s", proxy="10.0.0.9:17001"))
        [request] = FrameDecoder().feed(control.transport.value())
        self.assertEqual(request.proxy, "10.0.0.9:17001")
