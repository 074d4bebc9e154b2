"""
An agent that knows several servers (a cluster's nodes) and dials the
proxy address a stream request names.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError
from rproxy.tunnel.agent import AgentControl
from rproxy.tunnel.config import parse_agent_config
from rproxy.tunnel.wire import LoginResult, NewProxyConn, RequestNewProxyConn, encode
from tests.test_tunnel_agent import AgentTestMixin, sent

BASE = {"api_key": "k", "services": [{"name": "web", "local": "127.0.0.1:8000"}]}


class ServersConfigTests(SynchronousTestCase):
    def test_one_mapping(self) -> None:
        config = parse_agent_config(dict(BASE, server={"control": "10.0.0.1:17000", "proxy": "10.0.0.1:17001"}))
        self.assertEqual(config.servers, ((("10.0.0.1", 17000), ("10.0.0.1", 17001)),))
        self.assertEqual((config.control, config.proxy), (("10.0.0.1", 17000), ("10.0.0.1", 17001)))

    def test_list(self) -> None:
        """Mappings, or control addresses whose proxy port is the next one."""
        config = parse_agent_config(dict(BASE, server=[
            {"control": "10.0.0.1:17000", "proxy": "10.0.0.1:18000"}, "edge-2.example:17000"]))
        self.assertEqual(config.servers, (
            (("10.0.0.1", 17000), ("10.0.0.1", 18000)),
            (("edge-2.example", 17000), ("edge-2.example", 17001)),
        ))
        self.assertEqual(config.control, ("10.0.0.1", 17000))

    def test_errors_name_the_item(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_agent_config(dict(BASE, server=["10.0.0.1:17000", "nohost", {"control": "x:1", "colour": 1}]))
        self.assertEqual(sorted(caught.exception.errors), [
            "server[1]: invalid address 'nohost' (expected host:port)",
            "server[2].colour: unknown key",
        ])
        with self.assertRaises(ConfigError) as caught:
            parse_agent_config(dict(BASE, server=[]))
        self.assertEqual(caught.exception.errors, ["server: an empty list: give at least one {control, proxy}"])


class MovingTests(AgentTestMixin, SynchronousTestCase):
    def test_moves_to_the_next_server(self) -> None:
        """When its server goes away the agent tries the next one, and comes round."""
        agent, clock, _, _ = self.make_agent(server=["127.0.0.1:17000", "127.0.0.1:27000"])
        self.assertEqual(agent.current_name, "127.0.0.1:17000")
        for expected in ("127.0.0.1:27000", "127.0.0.1:17000"):
            control = AgentControl(agent)
            control.makeConnection(StringTransport())
            control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
            control.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(agent.current_name, expected)
        self.assertEqual(agent.current[1], ("127.0.0.1", 17001))

    def test_dials_the_named_proxy(self) -> None:
        """
        A request naming another node's proxy address is dialed there
        (the stream was asked through that node), with the conn id first.
        """
        agent, clock, reactor, _ = self.make_agent()
        control = AgentControl(agent)
        control.makeConnection(StringTransport())
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        control.dataReceived(encode(RequestNewProxyConn("c1", "s", proxy="127.0.0.1:27001")))
        _, _, local_factory, _, _ = reactor.tcpClients[-1]
        local_factory.buildProtocol(None).makeConnection(StringTransport())
        host, port, proxy_factory, _, _ = reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 27001))
        proxy_transport = StringTransport()
        proxy_factory.buildProtocol(None).makeConnection(proxy_transport)
        self.assertEqual(sent(proxy_transport), [NewProxyConn("c1", "s")])
        control.connectionLost(Failure(ConnectionDone()))
