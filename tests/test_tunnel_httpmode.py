"""
The agents as the HTTP engine's peers (L{rproxy.tunnel.httpmode}), on a
fake clock: the choice of agent, the connector's opens and pool, and the
tunnel's HTTP frontend (its access log and figures).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import config_from_mapping
from rproxy.config.values import ConfigError
from rproxy.http.filters import Chain, Filter
from rproxy.http.upstream import PeerRefused
from rproxy.pool import NoServerAvailable
from rproxy.tunnel.config import ApiKeyConfig, TunnelConfig
from rproxy.tunnel.httpmode import AgentChoice, AgentRefused, Departed
from rproxy.tunnel.httpstats import MAX_SERIES, tunnel_http_metrics
from rproxy.tunnel.registry import AgentSession, StaticKeys
from rproxy.tunnel.server import ControlProtocol, TunnelServer
from rproxy.tunnel.streams import ProxyProtocol
from rproxy.tunnel.wire import Error, FrameDecoder, NewProxyConn, RequestNewProxyConn, encode


def anyone(agent: AgentSession) -> bool:
    return True


class Tunnel:
    def __init__(self, *agents: tuple[str, tuple[str, ...]], keys: tuple[ApiKeyConfig, ...] = (),
                 **config: Any) -> None:
        self.clock = Clock()
        self.server = TunnelServer(TunnelConfig(name="t", mode="http", **config), StaticKeys(keys), None, self.clock)
        self.controls: dict[str, ControlProtocol] = {}
        for name, models in agents:
            self.login(name, models)
        assert self.server.connector is not None
        self.connector = self.server.connector

    def login(self, name: str, models: tuple[str, ...], key: str | None = None) -> AgentSession:
        """An agent logs in, with a shared key, or with the dedicated C{key}."""
        control = ControlProtocol(self.server)
        control.makeConnection(StringTransport())
        control._login_timer.cancel()  # type: ignore[union-attr]
        session = AgentSession(agent_id=name, peer="?", key_name="k", level=-1 if key is None else 0,
                               connected_at=self.clock.seconds(), last_seen=self.clock.seconds(), control=control,
                               models=models, key_digest=hashlib.sha256(key.encode()).digest() if key else b"")
        control.session = session
        self.controls[name] = control
        self.server.registry.add(session)
        return session

    def leave(self, name: str) -> None:
        """The agent's control connection drops."""
        self.server.drop_session(self.server.registry.agents[name], "test")

    def ask(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """
        C{request} on a public connection of its own: the status, fields
        (lowercase names) and body rproxy answered (none: 0).
        """
        assert self.server.http is not None
        conn = self.server.http.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4444))
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(request)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        if not head:
            return 0, {}, b""
        status_line, *lines = head.split(b"\r\n")
        fields = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
        return int(status_line.split()[1]), fields, body

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


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class TunnelFrontendTests(SynchronousTestCase):
    """
    Requests through the tunnel's HTTP frontend, on fake transports: the
    access log names the agent and the model, and the per agent and model
    figures of /metrics.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()

    def serve(self, t: Tunnel, requests: list[tuple[bytes, bytes | None]]) -> list[bytes]:
        """
        Each request on a connection of its own, answered by agent "a"
        with the response given (None: it refuses the stream).
        """
        assert t.server.http is not None
        answers = []
        for request, response in requests:
            conn = t.server.http.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4444))
            transport = StringTransport()
            conn.makeConnection(transport)
            conn.dataReceived(request)
            t.clock.advance(0.5)
            opens = t.requested("a")
            t.controls["a"].transport.clear()  # type: ignore[union-attr]
            exchange = conn.exchange
            if exchange is not None and exchange.upstream is not None:
                # a data connection kept alive from a previous request
                assert response is not None
                exchange.upstream.transport_owner.dataReceived(response)
            elif opens:
                [open_] = opens
                if response is None:
                    t.controls["a"].dataReceived(encode(Error("local service web unreachable",
                                                              conn_id=open_.conn_id)))
                else:
                    t.deliver(open_).dataReceived(response)
            answers.append(transport.value())
        t.clock.advance(0)
        return answers

    def test_access_log_names_agent_and_model(self) -> None:
        """
        With C{access_log}, each request's line carries the agent that
        answered and the model (C{-} without one); a refused request is
        logged too.
        """
        t = Tunnel(("a", ("llama3",)), access_log="combined", access_log_path=self.path, strict_models=False)
        self.addCleanup(t.server.http._close_access_log, None)  # type: ignore[union-attr]
        answers = self.serve(t, [
            (b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\n\r\n{\"model\": \"llama3\"}", RESPONSE),
            (b"GET /v1/files HTTP/1.1\r\nHost: x\r\n\r\n", RESPONSE),
            (b"GET / HTTP/1.1\r\n\r\n", None),
        ])
        self.assertEqual([a[:15] for a in answers], [b"HTTP/1.1 200 OK"] * 2 + [b"HTTP/1.1 400 Ba"])
        with open(self.path) as f:
            self.assertEqual(f.read().splitlines(), [
                '10.0.0.9 - - [01/Jan/1970:00:00:00 +0000] "POST /v1/chat HTTP/1.1" 200 2 "-" "-" agents/a '
                "0.500000 agent=a model=llama3",
                '10.0.0.9 - - [01/Jan/1970:00:00:01 +0000] "GET /v1/files HTTP/1.1" 200 2 "-" "-" agents/a '
                "0.500000 agent=a model=-",
                '10.0.0.9 - - [01/Jan/1970:00:00:01 +0000] "GET / HTTP/1.1" 400 0 "-" "-" -/- 0.000000 '
                "agent=- model=-",
            ])

    def test_request_event_duration_never_negative(self) -> None:
        """
        A request record's duration is never negative, though the wall
        clock stepped back during the request (NTP): the event writers
        refuse a negative one, which lost the record and its usage row.
        """
        emitted: list[tuple[str, dict[str, Any]]] = []
        t = Tunnel(("a", ("llama3",)), keys=(ApiKeyConfig(key="shared-key"),))
        t.server.events = type("Events", (), {"emit": lambda self, stream, event: emitted.append((stream, event))})()
        t.clock.advance(100)
        assert t.server.http is not None
        conn = t.server.http.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4444))
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(b"GET /v1/files HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n"
                          b"Authorization: Bearer shared-key\r\n\r\n")
        [open_] = t.requested("a")
        t.clock.rightNow -= 5  # (the clock stepped back)
        t.deliver(open_).dataReceived(RESPONSE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:40])
        [(_, record)] = [(stream, event) for stream, event in emitted if "duration" in event]
        self.assertEqual(record["duration"], 0.0)

    def test_json_access_log(self) -> None:
        """JSON records have agent and model keys."""
        t = Tunnel(("a", ("llama3",)), access_log="json", access_log_path=self.path)
        self.addCleanup(t.server.http._close_access_log, None)  # type: ignore[union-attr]
        self.serve(t, [(b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n", RESPONSE)])
        with open(self.path) as f:
            [record] = [json.loads(line) for line in f]
        self.assertEqual((record["agent"], record["model"], record["status"], record["server"]),
                         ("a", "llama3", 200, "a"))

    def test_metrics_per_agent_and_model(self) -> None:
        """
        /metrics has requests by agent, model and status class, failed
        attempts by kind, and the duration histogram per agent and model.
        """
        t = Tunnel(("a", ("llama3",)))
        self.serve(t, [
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n", RESPONSE),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n", b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: gpt-9\r\n\r\n", RESPONSE),
        ])
        registry = CollectorRegistry()
        registry.register(_Families(t.server))
        text = generate_latest(registry).decode()
        for line in [
            'rproxy_tunnel_http_requests_total{agent="a",class="2xx",model="llama3",tunnel="t"} 1.0',
            'rproxy_tunnel_http_requests_total{agent="a",class="5xx",model="llama3",tunnel="t"} 2.0',
            # (a model no agent serves is no label)
            'rproxy_tunnel_http_requests_total{agent="-",class="4xx",model="-",tunnel="t"} 1.0',
            'rproxy_tunnel_http_errors_total{agent="a",kind="connect",model="llama3",tunnel="t"} 1.0',
            'rproxy_tunnel_http_request_duration_seconds_bucket{agent="a",le="0.5",model="llama3",tunnel="t"} 3.0',
            'rproxy_tunnel_http_request_duration_seconds_count{agent="a",model="llama3",tunnel="t"} 3.0',
            'rproxy_tunnel_http_request_duration_seconds_sum{agent="a",model="llama3",tunnel="t"} 1.5',
        ]:
            self.assertIn(line, text.splitlines())

    def test_policy_notes_kept(self) -> None:
        """
        The tunnel's filters are the frontend's policy around its routing:
        what a policy filter before the routing notes on the exchange stays
        (the routing adds its own), and the policy sees the agent's answer.
        """
        t = Tunnel(("a", ("llama3",)))
        assert t.server.http is not None
        policy = NotingPolicy()
        t.server.http.chain = Chain([policy, *t.server.http.chain.filters])
        self.serve(t, [(b"GET / HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n", RESPONSE)])
        self.assertEqual(policy.seen, [(200, "traced", "llama3", "a")])

    def test_stats_bounded(self) -> None:
        """Past MAX_SERIES agent and model pairs, the rest count under "other"."""
        t = Tunnel(("a", ()))
        stats = t.connector.stats
        exchange = _Exchange()
        for i in range(MAX_SERIES + 5):
            exchange.notes = {"model": f"m{i}"}
            stats.log(exchange, "agents")
        self.assertEqual(len(stats.series), MAX_SERIES + 1)
        self.assertEqual(stats.series[("other", "other")].classes, [0, 5, 0, 0, 0, 0])


def chat(model: str, key: str | None = None) -> bytes:
    """A request for C{model} (its X-Model header), with the bearer C{key}."""
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Model: %s\r\n%sContent-Length: 0\r\n\r\n" % (
        model.encode(), auth)


def error_of(answer: tuple[int, dict[bytes, bytes], bytes]) -> tuple[int, bytes | None, str, str]:
    """The status, Retry-After, code and message of an error rproxy answered."""
    status, fields, body = answer
    error = json.loads(body)["error"]
    return status, fields.get(b"retry-after"), error["code"], error["message"]


UNAVAILABLE = (503, b"1", "service_unavailable", "no agent serving 'llama3' is connected")
NOT_SERVED = (404, None, "model_not_found", "model 'llama3' is not served by any agent")


class ModelAvailabilityTests(SynchronousTestCase):
    """
    With strict models, a model none of the client's agents serves is a
    404 only when those agents are online and none that served it left a
    moment ago (heartbeat_timeout): else a 503 with Retry-After, which the
    OpenAI SDKs retry, while the agent reconnects.
    """

    def test_reconnecting_agents_model_is_retryable(self) -> None:
        """
        The only agent serving a model drops: 503 with Retry-After for
        heartbeat_timeout (another model still 404), then 404; back, it
        serves again.
        """
        t = Tunnel(("a", ("llama3",)), ("b", ("qwen2",)), heartbeat_timeout=10.0)
        t.leave("a")
        t.clock.advance(9.5)
        self.assertEqual(error_of(t.ask(chat("llama3"))), UNAVAILABLE)
        self.assertEqual(error_of(t.ask(chat("gpt-9")))[:3], (404, None, "model_not_found"))
        t.clock.advance(0.5)
        self.assertEqual(error_of(t.ask(chat("llama3"))), NOT_SERVED)
        t.leave("b")
        t.login("a", ("llama3",))
        t.ask(chat("llama3"))
        self.assertEqual(len(t.requested("a")), 1)  # (routed to it: it is asked for a stream)

    def test_agent_back_without_the_model(self) -> None:
        """An agent that logs in again without the model it served: 404 at once."""
        t = Tunnel(("a", ("llama3",)))
        t.leave("a")
        t.login("a", ("qwen2",))
        self.assertEqual(error_of(t.ask(chat("llama3"))), NOT_SERVED)

    def test_no_agent_of_the_client_online(self) -> None:
        """
        A dedicated key whose agents are all offline gets 503 (none has
        logged in yet, or its agent dropped) though shared agents serve the
        model; the shared scope with no agent online too.  Once one of its
        agents is online, a model none serves is 404.
        """
        t = Tunnel(("shared", ("llama3",)), keys=(ApiKeyConfig(key="team-key", level=0, name="team"),))
        self.assertEqual(error_of(t.ask(chat("llama3", key="team-key"))), UNAVAILABLE)
        t.login("team", ("qwen2",), key="team-key")
        self.assertEqual(error_of(t.ask(chat("llama3", key="team-key"))), NOT_SERVED)
        t.leave("team")
        t.clock.advance(60)
        self.assertEqual(error_of(t.ask(chat("llama3", key="team-key"))), UNAVAILABLE)
        t.leave("shared")
        t.clock.advance(60)
        self.assertEqual(error_of(t.ask(chat("llama3"))), UNAVAILABLE)

    def test_scope_of_departed_agents(self) -> None:
        """A dedicated agent that left makes its model retryable for its key only, not for shared clients."""
        t = Tunnel(("shared", ("qwen2",)), keys=(ApiKeyConfig(key="team-key", level=0, name="team"),))
        t.login("team", ("llama3",), key="team-key")
        t.login("team2", ("qwen2",), key="team-key")
        t.leave("team")
        self.assertEqual(error_of(t.ask(chat("llama3", key="team-key"))), UNAVAILABLE)
        self.assertEqual(error_of(t.ask(chat("llama3"))), NOT_SERVED)

    def test_lenient_unchanged(self) -> None:
        """strict_models: false sends a model no agent serves to any agent, departed or not."""
        t = Tunnel(("a", ("llama3",)), ("b", ("qwen2",)), strict_models=False)
        t.leave("a")
        self.assertEqual(t.ask(chat("llama3"))[0], 0)  # (no answer yet: waiting for b's stream)
        self.assertEqual(len(t.requested("b")), 1)

    def test_departed_bounded(self) -> None:
        """
        At most C{limit} departed agents are remembered (ids come from
        agents), a returning id counted once; those past the window are
        forgotten.
        """
        clock = Clock()
        departed = Departed(clock, limit=3)
        sessions = [AgentSession(agent_id=f"a{i}", peer="?", key_name="k", level=-1, connected_at=0.0,
                                 last_seen=0.0, control=None, models=("m",)) for i in range(5)]  # type: ignore[arg-type]
        for session in sessions:
            clock.advance(1)
            departed.note(session)
        departed.note(sessions[2])
        self.assertEqual(list(departed.left), ["a3", "a4", "a2"])
        self.assertEqual([s.agent_id for s in departed.recent(1.0, [sessions[4]])], ["a2"])  # (a4 is back)
        self.assertEqual(list(departed.left), ["a4", "a2"])
        departed.note(AgentSession(agent_id="none", peer="?", key_name="k", level=-1, connected_at=0.0,
                                   last_seen=0.0, control=None))  # type: ignore[arg-type]
        self.assertEqual(list(departed.left), ["a4", "a2"])  # (no model: nothing to remember)
        revoked = AgentSession(agent_id="r", peer="?", key_name="k", level=-1, connected_at=0.0, last_seen=0.0,
                               control=None, models=("m",), revoked=True)  # type: ignore[arg-type]
        departed.note(revoked)
        self.assertEqual(list(departed.left), ["a4", "a2"])  # (its key revoked: not coming back)
        [(_, gone)] = [departed.left["a2"]]
        self.assertNotIsInstance(gone, AgentSession)  # (not the session and its connections)
        self.assertEqual((gone.agent_id, gone.models, gone.dedicated), ("a2", ("m",), False))


def listed(answer: tuple[int, dict[bytes, bytes], bytes]) -> list[str]:
    """The model ids of a /v1/models answer (200, OpenAI's list shape)."""
    status, _, body = answer
    document = json.loads(body)
    assert status == 200 and document["object"] == "list", answer
    return [model["id"] for model in document["data"]]


LIST = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


class ModelListTests(SynchronousTestCase):
    """
    GET /v1/models answered by the tunnel: every model the client may
    route to, as an OpenAI-compatible gateway lists them, not one agent's.
    """

    def test_every_agents_models(self) -> None:
        """
        The models of every agent the client reaches, each once, sorted,
        in OpenAI's shape ("created": when its first agent logged in);
        no agent is asked.
        """
        t = Tunnel()
        t.clock.advance(1700000000)
        t.login("a1", ("llama3", "shared-m"))
        t.clock.advance(5)
        t.login("a2", ("qwen2", "shared-m"))
        for _ in range(4):
            status, fields, body = t.ask(LIST)
            self.assertEqual((status, fields[b"content-type"]), (200, b"application/json"))
            self.assertEqual(json.loads(body), {"object": "list", "data": [
                {"id": "llama3", "object": "model", "created": 1700000000, "owned_by": "rproxy"},
                {"id": "qwen2", "object": "model", "created": 1700000005, "owned_by": "rproxy"},
                {"id": "shared-m", "object": "model", "created": 1700000000, "owned_by": "rproxy"},
            ]})
        self.assertEqual(t.requested("a1") + t.requested("a2"), [])

    def test_access_levels(self) -> None:
        """
        A dedicated key lists its agents' models only; other clients the
        shared agents' (an unknown key too); a departed agent's model is
        listed for heartbeat_timeout (a request for it gets a 503 to retry).
        """
        t = Tunnel(("shared", ("llama3",)), keys=(ApiKeyConfig(key="team-key", level=0, name="team"),),
                   heartbeat_timeout=10.0)
        self.assertEqual(listed(t.ask(LIST.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer team-key\r\n\r\n"))),
                         [])
        t.login("team", ("qwen2",), key="team-key")
        team = LIST.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer team-key\r\n\r\n")
        self.assertEqual(listed(t.ask(team)), ["qwen2"])
        self.assertEqual(listed(t.ask(LIST)), ["llama3"])
        self.assertEqual(listed(t.ask(LIST.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer nope\r\n\r\n"))),
                         ["llama3"])
        t.login("other", ("gemma",))
        t.leave("shared")
        self.assertEqual(listed(t.ask(LIST)), ["gemma", "llama3"])
        t.clock.advance(10)
        self.assertEqual(listed(t.ask(LIST)), ["gemma"])

    def test_one_model(self) -> None:
        """
        GET /v1/models/ID: the model if the client may route to it (its
        agent reconnecting too), else 404 (503 while none of the client's
        agents is online); ids may hold slashes.
        """
        t = Tunnel(("a", ("meta-llama/Llama-3", "llama3")), ("b", ("qwen2",)))
        status, _, body = t.ask(b"GET /v1/models/meta-llama%2FLlama-3 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((status, json.loads(body)["id"]), (200, "meta-llama/Llama-3"))
        status, _, body = t.ask(b"GET /v1/models/meta-llama/Llama-3?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((status, json.loads(body)["object"]), (200, "model"))
        t.leave("a")
        self.assertEqual(t.ask(b"GET /v1/models/llama3 HTTP/1.1\r\nHost: x\r\n\r\n")[0], 200)  # (reconnecting)
        unknown = b"GET /v1/models/gpt-9 HTTP/1.1\r\nHost: x\r\n\r\n"
        self.assertEqual(error_of(t.ask(unknown)), (404, None, "model_not_found",
                                                    "model 'gpt-9' is not served by any agent"))
        t.leave("b")
        t.clock.advance(60)
        self.assertEqual(error_of(t.ask(unknown)), (503, b"1", "service_unavailable",
                                                    "no agent serving 'gpt-9' is connected"))

    def test_kept_connection_and_head(self) -> None:
        """The list is answered on the kept connection; HEAD has its length and no body."""
        t = Tunnel(("a", ("llama3",)))
        assert t.server.http is not None
        conn = t.server.http.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4444))
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(LIST + b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" + LIST)
        answers = transport.value().split(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(len(answers), 4, answers)
        body = answers[1].partition(b"\r\n\r\n")[2]
        self.assertEqual(answers[2][-4:], b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d\r\n" % len(body), answers[2])
        self.assertEqual(answers[3].partition(b"\r\n\r\n")[2], body)
        self.assertFalse(transport.disconnecting)

    def test_passed_on(self) -> None:
        """
        A list request naming a model (X-Model) goes to an agent serving
        it (its own answer); other paths and methods go to the agents.
        """
        t = Tunnel(("a", ("llama3",)))
        for request in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Model: llama3\r\n\r\n",
                        b"GET /v1/modelsx HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"):
            self.assertEqual(t.ask(request)[0], 0)  # (no answer yet: waiting for the agent's stream)
        self.assertEqual(len(t.requested("a")), 3)


class NotingPolicy(Filter):
    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str, str]] = []

    def request(self, exchange: Any) -> None:
        exchange.notes = {"trace": "traced"}

    def log(self, exchange: Any, backend: str) -> None:
        notes = exchange.notes
        self.seen.append((exchange.status, notes["trace"], notes["model"], notes["agent"]))


class _Exchange:
    tried = ["a"]
    status = 200
    started = 0.0
    notes: dict[str, Any] = {}


class _Families:
    def __init__(self, tunnel: Any) -> None:
        self.tunnel = tunnel

    def collect(self) -> Any:
        return tunnel_http_metrics([self.tunnel])


class AccessLogConfigTests(SynchronousTestCase):
    def tunnel(self, **keys: Any) -> Any:
        return config_from_mapping({"admin": {"listen": None}, "api_keys": [{"key": "k"}],
                                    "tunnels": [dict({"name": "t"}, **keys)]}).tunnels[0]

    def test_read(self) -> None:
        """A mode http tunnel's access_log is read as an HTTP frontend's."""
        self.assertEqual((self.tunnel(mode="http").access_log, self.tunnel(mode="http").access_log_path),
                         ("off", None))
        t = self.tunnel(mode="http", access_log={"format": "json", "path": "/tmp/t.log"})
        self.assertEqual((t.access_log, t.access_log_path), ("json", "/tmp/t.log"))
        self.assertEqual(self.tunnel(mode="http", access_log="combined").access_log, "combined")

    def test_errors_name_the_key(self) -> None:
        """A wrong format (mode http's request formats, mode tcp's stream formats): the key path."""
        with self.assertRaises(ConfigError) as e:
            self.tunnel(mode="http", access_log="fancy")
        self.assertIn("tunnels[0].access_log", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            self.tunnel(access_log="combined")
        self.assertIn("tunnels[0].access_log: 'combined' is not one of off, text, json", str(e.exception))
