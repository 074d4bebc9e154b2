"""
The agent's log as an operator reads it (frpc's): where it connects, to
which server it logged in as whom serving what, why a login failed, and
C{exit_on_login_failure}; and, for real, an C{rproxy-agent} process that
a server refuses exits 1 with the reason and no Twisted noise.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.tunnel.config import parse_agent_config
from rproxy.tunnel.wire import FrameDecoder, Login, LoginResult, encode
from tests.support import async_test, listen, reactor, wait_for
from tests.test_tunnel_agent import AgentTestMixin
from tests.test_twistd import ROOT, Child


class RefusingEndpoint:
    """A control endpoint whose every connect is refused."""

    def __init__(self) -> None:
        self.attempts = 0

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts += 1
        return defer.fail(ConnectionRefusedError())


class AgentLogTests(AgentTestMixin, SynchronousTestCase):
    def lines(self, events: Any) -> list[str]:
        return [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("rproxy")]

    def test_logged_in_line(self) -> None:
        """A login says where it connected, to which server, as which agent, serving what."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent, clock, _, endpoint = self.make_agent(models=["llama3", "qwen2"])
        agent.startService()
        endpoint.protocols[-1].dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        self.assertEqual(self.lines(events), [
            "agent a: connecting to 127.0.0.1:17000",
            "agent a: logged in to 127.0.0.1:17000 as a, serving web (127.0.0.1:8000); models: llama3, qwen2",
        ])
        endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
        agent.stopService()

    def test_refused_login_says_why_and_retries(self) -> None:
        """A refused login is logged with the server's reason; without exit_on_login_failure the agent retries."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent, clock, _, endpoint = self.make_agent()
        called: list[None] = []
        agent.on_login_failure = lambda: called.append(None)
        agent.startService()
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=False, agent_id="a", error="invalid api key")))
        control.connectionLost(Failure(ConnectionDone()))
        self.assertIn("agent a: login to 127.0.0.1:17000 refused: invalid api key", self.lines(events))
        self.assertEqual((called, len(clock.getDelayedCalls())), ([], 1))
        agent.stopService()

    def test_exit_on_refused_first_login(self) -> None:
        """With exit_on_login_failure a refused first login gives up, once, saying why."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent, clock, _, endpoint = self.make_agent(exit_on_login_failure=True)
        called: list[None] = []
        agent.on_login_failure = lambda: called.append(None)
        agent.startService()
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=False, agent_id="a", error="invalid api key")))
        control.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(called, [None])
        self.assertEqual(self.lines(events)[-1],
                         "agent a: giving up: the first login to 127.0.0.1:17000 failed "
                         "(login refused: invalid api key) and exit_on_login_failure is set")
        agent.login_failed("again")
        self.assertEqual(called, [None])
        agent.stopService()

    def test_no_exit_after_a_login(self) -> None:
        """Once an agent has logged in, later failures reconnect even with exit_on_login_failure."""
        agent, clock, _, endpoint = self.make_agent(exit_on_login_failure=True)
        called: list[None] = []
        agent.on_login_failure = lambda: called.append(None)
        agent.startService()
        endpoint.protocols[-1].dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
        clock.advance(2)
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=False, agent_id="a", error="key revoked")))
        control.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((called, len(endpoint.protocols)), ([], 2))
        agent.stopService()

    def test_unreachable_says_why(self) -> None:
        """A refused TCP connect is logged in words; with exit_on_login_failure the agent gives up."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        from rproxy.tunnel.agent import AgentService
        from tests.test_tunnel_agent import Ceiling, FixedStats

        config = parse_agent_config({
            "server": {"control": "127.0.0.1:17000", "proxy": "127.0.0.1:17001"}, "api_key": "k",
            "agent_id": "a", "services": [{"name": "web", "local": "127.0.0.1:8000"}],
            "exit_on_login_failure": True})
        from twisted.internet.task import Clock

        clock = Clock()
        agent = AgentService(config, reactor, clock, rng=Ceiling(), stats=FixedStats(),  # type: ignore[arg-type]
                             control_endpoint=RefusingEndpoint())
        called: list[None] = []
        agent.on_login_failure = lambda: called.append(None)
        agent.startService()
        self.assertEqual(self.lines(events)[:2], [
            "agent a: connecting to 127.0.0.1:17000",
            "agent a: cannot reach the server 127.0.0.1:17000: "
            "connection refused (is the server running, is this its control port?)",
        ])
        self.assertEqual(called, [None])
        agent.stopService()

    def test_models_failure_logged_once(self) -> None:
        """A models_from URL that keeps failing the same way is logged once, and its recovery once."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent, clock, _, _ = self.make_agent(models_from="http://127.0.0.1:8000/v1/models")
        for _ in range(3):
            agent._models_failed(Failure(ValueError("answered 500")))
        agent._got_models(("llama3",))
        self.assertEqual(self.lines(events), [
            "agent a: cannot read the model list from http://127.0.0.1:8000/v1/models: answered 500 "
            "(trying again every 10s)",
            "agent a: the model list from http://127.0.0.1:8000/v1/models answers again",
            "agent a: models now llama3",
        ])

    def test_config_key(self) -> None:
        """exit_on_login_failure is a boolean; anything else is refused with its key path."""
        from rproxy.config import ConfigError

        base = {"server": {"control": "127.0.0.1:17000"}, "api_key": "k",
                "services": [{"name": "web", "local": "127.0.0.1:8000"}]}
        self.assertFalse(parse_agent_config(base).exit_on_login_failure)
        with self.assertRaises(ConfigError) as caught:
            parse_agent_config(dict(base, exit_on_login_failure="sometimes"))
        self.assertTrue(caught.exception.errors[0].startswith("exit_on_login_failure:"), caught.exception.errors)


class RefusingServer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.decoder = FrameDecoder()

    def dataReceived(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            if isinstance(message, Login):
                self.transport.write(encode(LoginResult(ok=False, agent_id=message.agent_id,  # type: ignore[union-attr]
                                                        error="invalid api key")))


class AgentProcessTests(TestCase):
    timeout = 60

    @async_test
    async def test_refused_agent_exits_1(self) -> None:
        """
        rproxy-agent with exit_on_login_failure, refused by its server,
        logs where it connected and why it gave up, and exits 1; no
        factory start/stop lines.
        """
        port = await listen(protocol.Factory.forProtocol(RefusingServer))
        self.addCleanup(port.stopListening)
        path = os.path.abspath(self.mktemp()) + ".yaml"
        with open(path, "w") as f:
            yaml.safe_dump({"server": {"control": f"127.0.0.1:{port.getHost().port}", "proxy": "127.0.0.1:9"},
                            "api_key": "wrong", "agent_id": "gpu-01", "exit_on_login_failure": True,
                            "services": [{"name": "web", "local": "127.0.0.1:9"}]}, f)
        child = Child()
        args = [sys.executable, "-m", "rproxy.scripts", "rproxy-agent", "--config", path]
        process = reactor.spawnProcess(child, sys.executable, args, env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)

        def kill() -> None:
            if not child.ended:
                process.signalProcess("KILL")

        self.addCleanup(kill)
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 1, child.output)
        self.assertIn(f"agent gpu-01: connecting to 127.0.0.1:{port.getHost().port}", child.output)
        self.assertIn("login to 127.0.0.1:", child.output)
        self.assertIn("refused: invalid api key", child.output)
        self.assertIn("giving up", child.output)
        self.assertNotIn("Starting factory", child.output)
        self.assertNotIn("Traceback", child.output)


class QuietStreamTests(AgentTestMixin, SynchronousTestCase):
    def test_proxy_factory_is_quiet(self) -> None:
        """A stream's connection to a proxy port by name (or TLS) uses a factory that logs no start/stop lines."""
        agent, clock, reactor_, endpoint = self.make_agent(
            server={"control": "127.0.0.1:17000", "proxy": "localhost:17001"})
        factories: list[Any] = []

        class Recording:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                factories.append(factory)
                return defer.Deferred()

        agent.endpoint = lambda address: Recording()  # type: ignore[method-assign]
        from twisted.internet.testing import StringTransport

        from rproxy.tunnel.agent import AgentControl
        from rproxy.tunnel.wire import RequestNewProxyConn

        control = AgentControl(agent)
        control.makeConnection(StringTransport())
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        control.dataReceived(encode(RequestNewProxyConn("c1", "s")))
        local_factory = reactor_.tcpClients[-1][2]
        local = local_factory.buildProtocol(None)
        local.makeConnection(StringTransport())
        self.assertEqual([f.noisy for f in factories], [False])
        control.connectionLost(Failure(ConnectionDone()))
