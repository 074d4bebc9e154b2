"""
A tunnel's C{mode: http}: its public port is an HTTP frontend (the engine
of L{rproxy.http}) whose upstream peers are the tunnel's agents.

  - L{TunnelRouting}, a filter: the model of each request (an C{X-Model}
    header, or the C{model} field of its body read up to
    C{model_body_limit}, 413 past it, whatever the Content-Type but files
    and forms), the access level of its bearer key (a dedicated key, level
    >= 0, reaches only the agents logged in with it; any other request
    goes to agents with shared keys), and the event recorded for requests
    with a shared key.
  - L{rproxy.tunnel.agentpeers}: the agents as the engine's peers
    (L{AgentChoice}, the engine's pool interface: least busy first, ties
    rotated) and its connector over their data connections
    (L{AgentConnector}, a keep-alive pool per agent).
  - L{rproxy.tunnel.httpstats.AgentStats}: the figures per agent and model
    (C{/metrics}).
  - L{Departed}: the agents that left a moment ago, so that a request for
    a model only they served is told to retry (503), not that it does not
    exist (404), while they reconnect.
  - L{ModelList}, a filter: C{GET /v1/models} answered by the tunnel, the
    models of every agent the client may reach, as an OpenAI-compatible
    gateway answers it (not one agent's list).

The frontend's filters are every HTTP frontend's policy
(L{rproxy.http.frontend.policy_filters}: access log, and what other
policies are added there) around the routing above; the access log lines
carry the agent and the model.

Every request on a public connection passes the strict reader and is sent
on rebuilt from what it parsed, so bytes it did not take as a request never
reach a service; the client keeps its connection across requests, which
may go to different agents.  Errors rproxy answers itself have the OpenAI
shape, C{{"error": {"message", "type", "code"}}}.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from rproxy.config import FrontendConfig, HTTPOptions
from rproxy.events import REQUESTS
from rproxy.http.filters import Filter
from rproxy.http.frontend import HTTPFrontend, policy_filters
from rproxy.http.headers import reason, response_head
from rproxy.http.reader import RequestHead
from rproxy.tunnel.agentpeers import AgentChoice, AgentConnector, AgentRefused, shared
from rproxy.tunnel.registry import AgentSession

if TYPE_CHECKING:
    from rproxy.tunnel.server import TunnelServer

__all__ = ["openai_error", "model_of", "looks_like_json", "AgentRefused", "AgentChoice", "AgentConnector",
           "Departed", "TunnelConnector", "TunnelRouting", "ModelList", "tunnel_frontend"]

# the path of the models list (ModelList)
_MODELS = b"/v1/models"
# (TunnelRouting._route: the Authorization field not looked up yet)
_LOOK: Any = object()
# bodies that cannot hold a JSON "model" field: never read for one
_NOT_JSON = (b"multipart/", b"audio/", b"image/", b"video/", b"application/octet-stream")
_ERROR_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    429: ("requests", "rate_limit_exceeded"),  # (OpenAI's own, for too many requests)
    431: ("invalid_request_error", "headers_too_large"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
    505: ("invalid_request_error", "http_version_not_supported"),
}


def openai_error(status: int, message: str, extra: Iterable[tuple[bytes, bytes]] = (),
                 code: str | None = None, version: tuple[int, int] = (1, 1), close: bool = True) -> bytes:
    """
    A complete response whose body is an OpenAI-style error,
    C{{"error": {"message", "type", "code"}}}: the shape the OpenAI SDKs
    read the message from (they show only the status code otherwise).
    The frontend's C{error_response} (L{rproxy.http.headers.error_response}'s
    signature): then close, unless C{close} is false (a 429 on a kept
    connection).
    """
    kind, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                   str(status)))
    body = json.dumps({"error": {"message": message, "type": kind, "code": code or default_code}}).encode() + b"\n"
    headers = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"), *extra]
    return response_head(status, reason(status), headers, version=version, framing="length",
                         content_length=len(body), close=close) + body


def looks_like_json(head: RequestHead) -> bool:
    """
    Whether a request's body may hold a JSON C{model} field: any body but
    those whose Content-Type says it is a file or a form (clients send
    JSON as text/plain or without a type too).
    """
    if not head.has_body:
        return False
    content_type = (head.header(b"content-type") or b"").strip().lower()
    return not content_type.startswith(_NOT_JSON)


def model_of(body: bytes) -> str | None:
    """
    The C{model} field of a JSON request body, if it has one.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) and model else None


@attrs.frozen
class _Gone:
    """
    What routing reads of an agent that left: who it was, its models, and
    which clients its key served (not its session, which holds its
    connections and buffers).
    """

    agent_id: str
    models: tuple[str, ...]
    level: int
    key_digest: bytes
    connected_at: float

    @property
    def dedicated(self) -> bool:
        return self.level >= 0


class Departed:
    """
    The agents that left less than a window ago (the tunnel's
    C{heartbeat_timeout}: as long as a silent agent still counts as
    there), by id, until they log in again: while an agent reconnects, a
    request for a model only it served gets a 503 to retry, not a 404.
    Agents choose their ids, so at most C{limit} are remembered, the
    oldest forgotten first (each with at most the wire's bound of models).
    An agent whose key was revoked is not coming back: not remembered.
    """

    def __init__(self, clock: Any, limit: int = 256) -> None:
        self.clock = clock
        self.limit = limit
        # agent id -> (when it left, what routing reads of it), the oldest first
        self.left: dict[str, tuple[float, _Gone]] = {}

    def note(self, session: AgentSession) -> None:
        """C{session}'s agent left (or its session was replaced)."""
        if not session.models or session.revoked:
            return
        left = self.left
        left.pop(session.agent_id, None)
        left[session.agent_id] = (self.clock.seconds(), _Gone(
            session.agent_id, session.models, session.level, session.key_digest, session.connected_at))
        if len(left) > self.limit:
            del left[next(iter(left))]

    def recent(self, window: float, online: Iterable[AgentSession]) -> list[_Gone]:
        """
        The agents that left less than C{window} seconds ago and are not
        C{online} again (the expired ones are forgotten).
        """
        left = self.left
        since = self.clock.seconds() - window
        while left:
            agent_id, (when, _) = next(iter(left.items()))
            if when > since:
                break
            del left[agent_id]
        if not left:
            return []
        back = {a.agent_id for a in online}
        return [gone for _, gone in left.values() if gone.agent_id not in back]


class TunnelConnector(AgentConnector):
    """
    The agents' connector (L{AgentConnector}), which also notes the agents
    that leave (L{Departed}): the server tells it of every agent it drops,
    of this node or another.
    """

    def __init__(self, tunnel: TunnelServer, clock: Any) -> None:
        super().__init__(tunnel, clock)
        self.departed = Departed(clock)

    def agent_gone(self, session: AgentSession) -> None:
        self.departed.note(session)
        super().agent_gone(session)

    def may_come_back(self, model: str, eligible: Callable[[AgentSession], bool]) -> bool:
        """
        Whether C{model}, which no agent C{eligible} accepts serves now,
        may be served again soon: none of those agents is online (a
        dedicated key's agent reconnecting, or not started yet), or one
        that served it left less than C{heartbeat_timeout} ago.
        """
        online = self.tunnel.registry.candidates()
        if not any(eligible(a) for a in online):
            return True
        departed = self.departed.recent(self.tunnel.config.heartbeat_timeout, online)
        return any(model in a.models and eligible(a) for a in departed)

    def models(self, eligible: Callable[[AgentSession], bool]) -> dict[str, float]:
        """
        The models a request that C{eligible} routes may ask for: those of
        its agents online, and of those that left less than
        C{heartbeat_timeout} ago (they get a 503 to retry, not a 404);
        each with the time the first of its agents logged in.
        """
        online = self.tunnel.registry.candidates()
        found: dict[str, float] = {}
        for agent in [*online, *self.departed.recent(self.tunnel.config.heartbeat_timeout, online)]:
            if eligible(agent):
                for model in agent.models:
                    since = found.get(model)
                    if since is None or agent.connected_at < since:
                        found[model] = agent.connected_at
        return found


class TunnelRouting(Filter):
    """
    The request phase reads the model and checks the bearer key; the
    choose phase gives the engine the agents the request may go to; the
    attempt phase notes the agent; the log phase records requests made with
    a shared key.
    """

    doing = "routing to an agent"

    def __init__(self, tunnel: TunnelServer, connector: TunnelConnector) -> None:
        self.tunnel = tunnel
        self.connector = connector
        # the choices of requests with a shared key (or none), by model:
        # one per model an agent serves, and None (any agent)
        self.shared: dict[str | None, AgentChoice] = {}

    def request(self, exchange: Any) -> defer.Deferred[Any] | None:
        head = exchange.head
        notes = {"model": None, "key": None, "eligible": shared, "agent": None}
        if exchange.notes is None:
            exchange.notes = notes
        else:
            exchange.notes.update(notes)  # (what a policy filter before noted stays)
        # (X-Model and Authorization in one pass: each the first of its name, as head.header() gives)
        model = auth = None
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"x-model":
                if model is None:
                    model = value
            elif lower == b"authorization" and auth is None:
                auth = value
        if model is None:
            if head.has_body and looks_like_json(head):
                d = exchange.client.read_ahead(self.tunnel.config.model_body_limit)
                d.addCallback(self._body_read, exchange)
                return d
            if auth is None:
                return None  # (neither a model nor a key: nothing for _route to note or check)
        return self._route(exchange, model, auth)

    def _body_read(self, body: bytes | None, exchange: Any) -> Any:
        if body is None:
            limit = self.tunnel.config.model_body_limit
            exchange.fail(413, f"request body over {limit} bytes: too large to read its model")
            return None
        return self._route(exchange, model_of(body))

    def _route(self, exchange: Any, model: bytes | str | None, auth: Any = _LOOK) -> defer.Deferred[Any] | None:
        """
        @param auth: the Authorization field's value if the caller has
            looked it up (None: there is none).
        """
        if isinstance(model, bytes):
            model = model.decode("utf-8", "replace")
        notes = exchange.notes
        if model:
            notes["model"] = model.strip() or None
        if auth is _LOOK:
            auth = exchange.head.header(b"authorization")
        if auth is None or auth[:7].lower() != b"bearer " or not auth[7:].strip():
            if model:
                self._check_model(exchange)
            return None
        presented = auth[7:].strip().decode("latin-1")
        result = self.tunnel.keys.check(presented)
        d = defer.Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else defer.succeed(result)
        d.addCallbacks(self._key_checked, self._key_failed, callbackArgs=(exchange, presented),
                       errbackArgs=(exchange,))
        return d

    def _key_failed(self, failure: Failure, exchange: Any) -> None:
        self.tunnel.log.failure("tunnel {tunnel}: checking a public bearer key failed", failure,
                                tunnel=self.tunnel.name)
        exchange.fail(503, "cannot check the key now", retry_after=True)

    def _key_checked(self, key: Any, exchange: Any, presented: str) -> None:
        if key is not None:
            notes = exchange.notes
            notes["key"] = key.name
            if key.level >= 0:
                digest = hashlib.sha256(presented.encode("utf-8")).digest()
                notes["eligible"] = lambda agent: agent.dedicated and hmac.compare_digest(agent.key_digest, digest)
        self._check_model(exchange)

    def _check_model(self, exchange: Any) -> None:
        """
        A model none of the client's agents serves: with C{strict_models},
        404 if those agents are online and none that served it left a
        moment ago; else the engine's 503 (with Retry-After: the SDKs
        retry it) says that no agent serving it is connected.  Lenient:
        any agent.
        """
        notes = exchange.notes
        model, eligible = notes["model"], notes["eligible"]
        if model is None or self.tunnel.registry.serves(model, eligible):
            return
        if not self.tunnel.config.strict_models:
            notes["model"] = None  # lenient: any agent
        elif not self.connector.may_come_back(model, eligible):
            self.tunnel.streams_failed += 1
            exchange.fail(404, f"model {model!r} is not served by any agent")

    def choose(self, exchange: Any) -> None:
        notes = exchange.notes
        model, eligible = notes["model"], notes["eligible"]
        if eligible is not shared:
            exchange.pool = AgentChoice(self.tunnel, self.connector, model, eligible)
            return
        choice = self.shared.get(model)
        if choice is None:
            if len(self.shared) >= 1024:
                self.shared.clear()  # (models that agents no longer serve)
            choice = self.shared[model] = AgentChoice(self.tunnel, self.connector, model, shared)
        exchange.pool = choice

    def attempt(self, exchange: Any, server: Any) -> None:
        # the agent of the attempt, the one that answered in the end (for
        # the access log and the policy filters' log phase, in any order)
        exchange.notes["agent"] = server.name

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        if self.tunnel.events is None:
            return  # (for the event of log)
        upstream = exchange.upstream
        if upstream is not None and exchange.notes:
            exchange.notes["head_size"] = len(upstream.head) + 4  # the head as the service sent it

    def log(self, exchange: Any, backend: str) -> None:
        tunnel, notes = self.tunnel, exchange.notes
        if tunnel.events is None or not notes or notes.get("key") is None or not exchange.tried:
            return
        agent = tunnel.registry.agents.get(exchange.tried[-1])
        if agent is None or agent.dedicated:
            return
        head = exchange.head
        tunnel.events.emit(REQUESTS, {
            "tunnel": tunnel.name, "agent_id": agent.agent_id, "key": notes["key"], "model": notes["model"],
            "at": exchange.started, "duration": round(max(0.0, tunnel.clock.seconds() - exchange.started), 6),  # (a clock stepped back)
            "method": head.method.decode("latin-1"), "target": head.target.decode("latin-1")[:512],
            "bytes_in": head.content_length or 0,
            "bytes_out": notes.get("head_size", 0) + exchange.client.delivered - exchange.delivered_before,
        })


class ModelList(Filter):
    """
    C{GET /v1/models} answered by the tunnel, as an OpenAI-compatible
    gateway answers it: every model the client may route to (the agents
    its key reaches, as L{TunnelRouting} decided), in OpenAI's shape; and
    C{GET /v1/models/ID}, one of them (404 if the client cannot route to
    it).  A request that names a model (C{X-Model}) goes to an agent
    serving it instead, which answers with its own list.  After
    L{TunnelRouting} in the request phase: its notes say whom the client
    reaches.
    """

    doing = "listing the models"

    def __init__(self, connector: TunnelConnector) -> None:
        self.connector = connector

    def request(self, exchange: Any) -> None:
        head = exchange.head
        method = head.method
        if (method != b"GET" and method != b"HEAD") or not head.target.startswith(_MODELS):
            return
        rest = head.target.partition(b"?")[0][len(_MODELS):]
        notes = exchange.notes
        if notes["model"] is not None or rest[:1] not in (b"", b"/"):
            return  # a model named (its agent's own answer), or another path (/v1/modelsx)
        found = self.connector.models(notes["eligible"])
        model = urllib.parse.unquote(rest[1:].decode("latin-1"), errors="replace")
        if not model:
            document: dict[str, Any] = {"object": "list", "data": [_model(m, found[m]) for m in sorted(found)]}
        elif model in found:
            document = _model(model, found[model])
        elif self.connector.may_come_back(model, notes["eligible"]):
            exchange.fail(503, f"no agent serving {model!r} is connected", retry_after=True)
            return
        else:
            exchange.fail(404, f"model {model!r} is not served by any agent")
            return
        _answer_json(exchange, document)


def _model(model: str, since: float) -> dict[str, Any]:
    """A model in OpenAI's shape."""
    return {"id": model, "object": "model", "created": int(since), "owned_by": "rproxy"}


def _answer_json(exchange: Any, document: dict[str, Any]) -> None:
    """
    A filter answers 200 with C{document} as JSON, on the kept connection.
    """
    exchange.answer(200, b"OK", [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")],
                    json.dumps(document).encode() + b"\n")


def frontend_config(config: Any) -> FrontendConfig:
    """
    The HTTP frontend configuration of a tunnel's public port: its
    reader's limits (no body limit: bodies stream to the agent), its
    header timeout, no response timeout (a model may think for long),
    the agents' open timeout as the connect timeout; its rate limits and
    allow/deny lists (the policy filters every HTTP frontend has).
    """
    return FrontendConfig(
        name=config.name, listen=config.public, backend="agents", protocol="http",
        connect_timeout=config.open_timeout, rate_limits=config.rate_limits, access=config.access,
        http=HTTPOptions(max_body=None, header_timeout=config.header_timeout, response_timeout=0.0,
                         access_log=config.access_log, access_log_path=config.access_log_path),
    )


def tunnel_frontend(tunnel: TunnelServer) -> tuple[HTTPFrontend, TunnelConnector]:
    """
    The HTTP frontend of C{tunnel}'s public port, and its connector.
    """
    connector = TunnelConnector(tunnel, tunnel.clock)
    routing: list[Filter] = [TunnelRouting(tunnel, connector), ModelList(connector), connector.stats]

    def filters(frontend: HTTPFrontend) -> list[Filter]:
        return policy_filters(frontend, routing, log_notes=("agent", "model"))

    frontend = HTTPFrontend(frontend_config(tunnel.config), {"agents": AgentChoice}, tunnel.reactor,  # type: ignore[dict-item]
                            tunnel.clock, connector, filters=filters, error_response=openai_error)
    return frontend, connector
