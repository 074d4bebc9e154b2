"""
Unit tests of the agent on a fake clock and in-memory transports: models
learnt during the login, the backoff after failed logins, TLS failures in
the log, and a refused local service reported with its stream id.
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.tunnel.agent import AgentControl, AgentService
from rproxy.tunnel.config import parse_agent_config
from rproxy.tunnel.wire import (
    REPLACED,
    Error,
    FrameDecoder,
    Login,
    LoginResult,
    ModelsUpdate,
    RequestNewProxyConn,
    encode,
)


class FixedStats:
    """System figures without reading /proc."""

    def system_info(self) -> dict[str, Any]:
        return {}

    def cpu(self) -> float:
        return 0.0

    memory = disk = load = cpu


class Ceiling:
    """An rng whose jitter is always the upper bound, so delays are exact."""

    def uniform(self, low: float, high: float) -> float:
        return high


class MemoryEndpoint:
    """
    A control endpoint whose connections are StringTransports; records
    when each was made.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.protocols: list[Any] = []
        self.times: list[float] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        self.times.append(self.clock.seconds())
        return defer.succeed(protocol)


def sent(transport: StringTransport) -> list[Any]:
    return FrameDecoder().feed(transport.value())


class AgentTestMixin:
    def make_agent(self, **extra: Any) -> tuple[AgentService, Clock, MemoryReactorClock, MemoryEndpoint]:
        data: dict[str, Any] = {
            "server": {"control": "127.0.0.1:17000", "proxy": "127.0.0.1:17001"},
            "api_key": "k", "agent_id": "a",
            "services": [{"name": "web", "local": "127.0.0.1:8000"}],
            "reconnect": {"initial": "1s", "max": "60s"},
        }
        data.update(extra)
        clock = Clock()
        reactor = MemoryReactorClock()
        endpoint = MemoryEndpoint(clock)
        agent = AgentService(parse_agent_config(data), reactor, clock, rng=Ceiling(),  # type: ignore[arg-type]
                             stats=FixedStats(), control_endpoint=endpoint)  # type: ignore[arg-type]
        return agent, clock, reactor, endpoint


class ModelsDuringLoginTests(AgentTestMixin, SynchronousTestCase):
    def test_models_learnt_while_logging_in_are_sent(self) -> None:
        """
        A models_from answer that arrives after the login was sent but
        before it was answered reaches the server right after the login.
        """
        agent, clock, _, _ = self.make_agent()
        control = AgentControl(agent)
        transport = StringTransport()
        control.makeConnection(transport)
        [login] = sent(transport)
        self.assertEqual((type(login), login.models), (Login, ()))
        agent._got_models(("llama3", "qwen2"))
        self.assertEqual(sent(transport), [login])  # not logged in yet: nothing to send it on
        transport.clear()
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        self.assertEqual(sent(transport)[0], ModelsUpdate(("llama3", "qwen2")))
        control.connectionLost(Failure(ConnectionDone()))

    def test_no_update_when_login_had_them(self) -> None:
        """Models unchanged since the login are not sent again."""
        agent, clock, _, _ = self.make_agent(models=["llama3"])
        control = AgentControl(agent)
        transport = StringTransport()
        control.makeConnection(transport)
        transport.clear()
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        self.assertEqual([m for m in sent(transport) if isinstance(m, ModelsUpdate)], [])
        control.connectionLost(Failure(ConnectionDone()))


class BackoffTests(AgentTestMixin, SynchronousTestCase):
    def refuse(self, endpoint: MemoryEndpoint) -> None:
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=False, agent_id="a", error="invalid api key")))
        control.connectionLost(Failure(ConnectionDone()))

    def test_backoff_grows_after_refused_logins(self) -> None:
        """
        Logins refused after a successful TCP connect back off doubling to
        reconnect.max (here with the jitter at its ceiling), not one try
        per initial delay for ever; a login that succeeds resets it.
        """
        agent, clock, _, endpoint = self.make_agent()
        agent.startService()
        delays = []
        for _ in range(7):
            self.refuse(endpoint)
            [call] = clock.getDelayedCalls()
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(len(endpoint.protocols), 8)
        self.assertEqual(delays, [4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])
        endpoint.protocols[-1].dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime() - clock.seconds(), 2.0)
        agent.stopService()

    def test_replaced_sessions_back_off(self) -> None:
        """
        A session the server says a new login with the same agent id
        replaced is logged as a warning naming the likely cause, and each
        such replacement soon after the login before waits longer (here
        with the jitter at its ceiling); a session that ends otherwise
        resets the delay.
        """
        agent, clock, _, endpoint = self.make_agent()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        agent.startService()
        delays = []
        why = "replaced by a new login of agent_id 'a' from 10.0.0.2:5000"
        for _ in range(6):
            control = endpoint.protocols[-1]
            control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
            clock.advance(1.0)
            control.dataReceived(encode(Error(why, code=REPLACED)))
            control.connectionLost(Failure(ConnectionDone()))
            [call] = [c for c in clock.getDelayedCalls() if c.func.__name__ != "_beat"]
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(delays, [4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        warnings = [e["log_format"].format(**e) for e in events if "ended this session" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 6)
        self.assertIn(why, warnings[0])
        self.assertIn("same agent_id", warnings[0])
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        control.dataReceived(encode(Error("no heartbeat for 30s")))  # not a replacement
        control.connectionLost(Failure(ConnectionDone()))
        [call] = [c for c in clock.getDelayedCalls() if c.func.__name__ != "_beat"]
        self.assertEqual(call.getTime() - clock.seconds(), 2.0)
        agent.stopService()

    def test_late_replacement_starts_again(self) -> None:
        """A replacement long after the login counts as the first again."""
        agent, clock, _, endpoint = self.make_agent()
        agent.startService()
        agent.replaced = 4
        control = endpoint.protocols[-1]
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        clock.advance(121.0)
        control.dataReceived(encode(Error("replaced", code=REPLACED)))
        control.connectionLost(Failure(ConnectionDone()))
        [call] = [c for c in clock.getDelayedCalls() if c.func.__name__ != "_beat"]
        self.assertEqual((agent.replaced, call.getTime() - clock.seconds()), (1, 4.0))
        agent.stopService()

    def test_tls_failure_is_logged(self) -> None:
        """
        A TLS handshake that fails (an unknown server certificate) is
        logged with OpenSSL's reason, and counts as a failed login.
        """
        agent, clock, _, endpoint = self.make_agent()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        control = AgentControl(agent)
        control.makeConnection(StringTransport())
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        control.connectionLost(Failure(error))
        lines = [e["log_format"].format(**e) for e in events if "TLS" in e.get("log_format", "")]
        self.assertEqual(lines, ["agent a: TLS with the server 127.0.0.1:17000 failed: certificate verify failed"])
        self.assertEqual(agent.failed_logins, 1)


class LocalRefusedTests(AgentTestMixin, SynchronousTestCase):
    def test_refused_local_service_names_the_stream(self) -> None:
        """
        When the local service refuses, the agent's error carries the
        stream's conn id so that the server fails that stream at once.
        """
        agent, clock, reactor, _ = self.make_agent()
        control = AgentControl(agent)
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        transport.clear()
        control.dataReceived(encode(RequestNewProxyConn("c1", "s")))
        host, port, factory, _, _ = reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 8000))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        errors = [m for m in sent(transport) if isinstance(m, Error)]
        self.assertEqual(errors, [Error("local service web unreachable", conn_id="c1")])
        control.connectionLost(Failure(ConnectionDone()))

    def test_unknown_service_names_the_stream(self) -> None:
        """A request for a service the agent lacks is refused with its conn id."""
        agent, clock, reactor, _ = self.make_agent()
        control = AgentControl(agent)
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(encode(LoginResult(ok=True, agent_id="a")))
        transport.clear()
        control.dataReceived(encode(RequestNewProxyConn("c2", "s", service="db")))
        self.assertEqual(sent(transport), [Error("no local service named 'db'", conn_id="c2")])
        control.connectionLost(Failure(ConnectionDone()))


class SystemStatsTests(SynchronousTestCase):
    def test_cpu_within_bounds_when_a_counter_goes_back(self) -> None:
        """
        iowait may go back between two readings of /proc/stat: the CPU
        figure stays within 0-100 (the server refuses a heartbeat far out
        of it), here 100 where the raw sum says 200.
        """
        from rproxy.tunnel.agent import SystemStats

        proc = self.mktemp()
        os.makedirs(proc)
        stats = SystemStats(proc=proc)
        for line in ("cpu 100 0 0 100 50\n", "cpu 110 0 0 105 40\n"):
            with open(os.path.join(proc, "stat"), "w") as f:
                f.write(line)
            value = stats.cpu()
        self.assertEqual(value, 100.0)
