"""
The tunnel's wire protocol, as a sans-I/O codec.

Frames
======
Every message is one frame: a 4-byte big-endian unsigned length, then that
many bytes of UTF-8 JSON holding one object with a C{"type"} field.  A
frame longer than the decoder's C{max_frame} (64 KiB by default), a body
that is not a JSON object, an unknown type, or a field of the wrong type or
size is a L{ProtocolError}: the connection that sent it is closed with the
reason logged, and nothing else is affected.

Control connection (agent -> server, port 17000)
================================================
  agent  -> login           {version, api_key | token, agent_id, system_info,
                             devices, models, pool_count, start_result?}
  server -> login_result    {ok, agent_id, error, heartbeat_interval}
  agent  -> heartbeat       {cpu, memory, disk, load, active_streams}
  agent  -> models_update   {models}
  server -> request_new_proxy_conn {conn_id, secret, service, pool}
  either -> error           {message, conn_id?, code?}  (conn_id: the stream
                            the agent cannot open; the server fails it at
                            once)

The first frame must be C{login}, with C{version} equal to L{VERSION}; an
agent that logs in again with the id of a live session replaces it at once.
The server tells an agent whose session it ends why, in an C{error} before
closing; C{code: "replaced"} says a new login with its agent id took its
place (another agent with the same id, if it did not reconnect itself), and
such an agent waits longer before it logs in again.  Agents that do not
know C{code} ignore it.

Pooled connections (frp's pool_count): an agent that logs in with
C{pool_count} N gets N C{request_new_proxy_conn} with C{pool: true} at once,
and one more each time a pooled connection is used.  It opens each one and
sends C{new_proxy_conn} as usual, then waits; when the server attaches a
public connection it sends C{start_stream {service}} on that connection,
and the agent connects the local service and splices.

An agent that logs in with C{start_result: true} can also be sent
C{start_stream {service, ack: true}}: it then answers on that connection,
before any byte of the stream, with C{start_result {ok, error}}: C{ok} once
its local service accepted, or the reason it did not (and closes).  The
server hands the connection to a request only after C{ok}, so that a
refusal is known to have sent the service nothing and the request goes to
the next agent (mode http).  Agents without the field, and servers that
never send C{ack}, keep the older exchange.

Proxy connection (agent -> server, port 17001)
==============================================
The first frame is C{new_proxy_conn {conn_id, secret}}; every byte after
it belongs to the proxied stream.  The server only accepts a conn_id it
asked the agent for over that agent's control connection, with the same
one-time secret, once, and before C{open_timeout}: forged, replayed and
late frames close the connection.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import attrs

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "ProtocolError",
    "Login",
    "LoginResult",
    "Heartbeat",
    "RequestNewProxyConn",
    "NewProxyConn",
    "ModelsUpdate",
    "StartStream",
    "StartResult",
    "Error",
    "REPLACED",
    "FrameDecoder",
    "encode",
]

VERSION = 1
MAX_FRAME = 64 * 1024
MAX_POOL = 64
_HEADER = struct.Struct(">I")
_MAX_TEXT = 256
_MAX_ITEMS = 256
# No message nests deeper than a few levels (system_info, devices); past
# MAX_DEPTH a frame is refused before the JSON parser recurses into it.
MAX_DEPTH = 32
# Integers of more digits than this are no count or size of ours.
_MAX_INT_DIGITS = 20
# a heartbeat's bounds: a count fits a PostgreSQL integer; a load average
# (runnable tasks, averaged) of a million is no machine's
_MAX_COUNT = 2**31 - 1
_MAX_LOAD = 1e6
# a string (to its end, or to the end of the data: never scanned twice) or a bracket
_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*+"?|[\[\]{}]', re.S)


class ProtocolError(Exception):
    """
    The peer sent something this protocol does not allow.
    """


def _text(data: dict[str, Any], key: str, required: bool = True, limit: int = _MAX_TEXT) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"{key}: required")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{key}: expected a string of at most {limit} characters")
    return value


def _number(data: dict[str, Any], key: str, low: float = -math.inf, high: float = math.inf) -> float:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{key}: expected a number")
    if not low <= value <= high:
        raise ProtocolError(f"{key}: expected a number from {low:g} to {high:g}")
    return float(value)


def _count(data: dict[str, Any], key: str) -> int:
    """
    A whole number from 0 to what a PostgreSQL C{integer} column holds.
    """
    value = _number(data, key, 0, _MAX_COUNT)
    if value != int(value):
        raise ProtocolError(f"{key}: expected a whole number")
    return int(value)


def _percent(data: dict[str, Any], key: str) -> float:
    """
    A percentage, brought into 0-100: an agent's CPU figure can step a
    little past either end when the kernel's counters go back between two
    readings (iowait may), which is no reason to drop the agent; a value
    far out (past +-1000) is a malformed frame.
    """
    return min(100.0, max(0.0, _number(data, key, -1000, 1000)))


def _models(data: dict[str, Any], key: str = "models") -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise ProtocolError(f"{key}: expected a list of at most {_MAX_ITEMS} names")
    models = []
    for item in value:
        if isinstance(item, dict):  # OpenAI-style {"id": ...}
            item = item.get("id")
        if not isinstance(item, str) or not item or len(item) > _MAX_TEXT:
            raise ProtocolError(f"{key}: every model must be a non-empty string")
        models.append(item)
    return tuple(models)


def _flag(data: dict[str, Any], key: str, required: bool = False) -> bool:
    value = data.get(key) if required else data.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key}: expected true or false")
    return value


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ProtocolError(f"{key}: expected an object")
    return value


def _items(data: dict[str, Any], key: str) -> tuple[Any, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise ProtocolError(f"{key}: expected a list of at most {_MAX_ITEMS} entries")
    return tuple(value)


@attrs.frozen
class Login:
    agent_id: str
    api_key: str | None = None
    token: str | None = None
    version: int = VERSION
    system_info: dict[str, Any] = attrs.field(factory=dict)
    devices: tuple[Any, ...] = ()
    models: tuple[str, ...] = ()
    pool_count: int = 0
    # the agent answers start_stream {ack: true} with start_result
    start_result: bool = False
    type = "login"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Login:
        version = d.get("version")
        if version != VERSION:
            raise ProtocolError(f"version: this server speaks version {VERSION}, not {version!r}")
        login = cls(
            agent_id=_text(d, "agent_id") or "",
            api_key=_text(d, "api_key", required=False),
            token=_text(d, "token", required=False, limit=4096),
            system_info=_mapping(d, "system_info"),
            devices=_items(d, "devices"),
            models=_models(d),
            pool_count=int(_number(d, "pool_count")),
            start_result=_flag(d, "start_result"),
        )
        if not 0 <= login.pool_count <= MAX_POOL:
            raise ProtocolError(f"pool_count: must be from 0 to {MAX_POOL}")
        if not login.agent_id:
            raise ProtocolError("agent_id: must not be empty")
        if login.api_key is None and login.token is None:
            raise ProtocolError("login needs api_key or token")
        return login

    def body(self) -> dict[str, Any]:
        return {
            "version": self.version, "agent_id": self.agent_id, "api_key": self.api_key,
            "token": self.token, "system_info": self.system_info, "devices": list(self.devices),
            "models": list(self.models), "pool_count": self.pool_count, "start_result": self.start_result,
        }


@attrs.frozen
class LoginResult:
    ok: bool
    agent_id: str = ""
    error: str | None = None
    heartbeat_interval: float = 10.0
    type = "login_result"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LoginResult:
        return cls(ok=_flag(d, "ok", required=True), agent_id=_text(d, "agent_id", required=False) or "",
                   error=_text(d, "error", required=False, limit=1024),
                   heartbeat_interval=_number(d, "heartbeat_interval") or 10.0)

    def body(self) -> dict[str, Any]:
        return {"ok": self.ok, "agent_id": self.agent_id, "error": self.error,
                "heartbeat_interval": self.heartbeat_interval}


@attrs.frozen
class Heartbeat:
    cpu: float = 0.0
    memory: float = 0.0
    disk: float = 0.0
    load: float = 0.0
    active_streams: int = 0
    type = "heartbeat"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Heartbeat:
        # percentages (see the agent's stats), a load average and a count:
        # values out of these ranges are no machine's, and a heartbeat
        # carrying one would be refused by the heartbeats table
        return cls(cpu=_percent(d, "cpu"), memory=_percent(d, "memory"), disk=_percent(d, "disk"),
                   load=_number(d, "load", 0, _MAX_LOAD), active_streams=_count(d, "active_streams"))

    def body(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class RequestNewProxyConn:
    conn_id: str
    secret: str
    service: str | None = None
    pool: bool = False
    # "host:port" of the proxy port to dial when it is not the agent's own
    # server's (a stream opened through another node of a cluster)
    proxy: str | None = None
    type = "request_new_proxy_conn"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RequestNewProxyConn:
        return cls(conn_id=_text(d, "conn_id") or "", secret=_text(d, "secret") or "",
                   service=_text(d, "service", required=False), pool=_flag(d, "pool"),
                   proxy=_text(d, "proxy", required=False))

    def body(self) -> dict[str, Any]:
        body = {"conn_id": self.conn_id, "secret": self.secret, "service": self.service, "pool": self.pool}
        if self.proxy is not None:
            body["proxy"] = self.proxy
        return body


@attrs.frozen
class StartStream:
    """
    Server -> agent, on an idle pooled proxy connection: a public
    connection is now attached; connect the local service and splice
    (with C{ack}: answer L{StartResult} first).
    """

    service: str | None = None
    ack: bool = False
    type = "start_stream"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> StartStream:
        return cls(service=_text(d, "service", required=False), ack=_flag(d, "ack"))

    def body(self) -> dict[str, Any]:
        if not self.ack:
            return {"service": self.service}
        return {"service": self.service, "ack": True}


@attrs.frozen
class StartResult:
    """
    Agent -> server, on a pooled proxy connection sent C{start_stream}
    with C{ack}, before any byte of the stream: whether the local service
    accepted (C{ok}), else why not (the agent closes the connection; the
    service was sent nothing).
    """

    ok: bool
    error: str | None = None
    type = "start_result"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> StartResult:
        return cls(ok=_flag(d, "ok", required=True), error=_text(d, "error", required=False, limit=1024))

    def body(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error}


@attrs.frozen
class NewProxyConn:
    conn_id: str
    secret: str
    type = "new_proxy_conn"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> NewProxyConn:
        return cls(conn_id=_text(d, "conn_id") or "", secret=_text(d, "secret") or "")

    def body(self) -> dict[str, Any]:
        return {"conn_id": self.conn_id, "secret": self.secret}


@attrs.frozen
class ModelsUpdate:
    models: tuple[str, ...] = ()
    type = "models_update"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ModelsUpdate:
        return cls(models=_models(d))

    def body(self) -> dict[str, Any]:
        return {"models": list(self.models)}


@attrs.frozen
class Error:
    """
    A problem to report.  From an agent, C{conn_id} names the stream it
    cannot open (its local service refused, or is unknown), so that the
    server fails that stream at once instead of waiting for
    C{open_timeout}.  From the server, before it closes a session: why
    (C{code} L{REPLACED}: a new login with the agent's id took its place).
    """

    message: str
    conn_id: str | None = None
    # from the server, ending a session: why, for the agent to act on
    # (REPLACED: a new login with its agent id took its place)
    code: str | None = None
    type = "error"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Error:
        return cls(message=_text(d, "message", limit=1024) or "", conn_id=_text(d, "conn_id", required=False),
                   code=_text(d, "code", required=False))

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message}
        if self.conn_id is not None:
            body["conn_id"] = self.conn_id
        if self.code is not None:
            body["code"] = self.code
        return body


REPLACED = "replaced"


Message = (
    Login | LoginResult | Heartbeat | RequestNewProxyConn | NewProxyConn | StartStream | StartResult
    | ModelsUpdate | Error
)
_TYPES: dict[str, Any] = {
    cls.type: cls
    for cls in (Login, LoginResult, Heartbeat, RequestNewProxyConn, NewProxyConn, StartStream, StartResult,
                ModelsUpdate, Error)
}


def encode(message: Message) -> bytes:
    """
    One frame holding C{message}.
    """
    body = dict(message.body(), type=message.type)
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(data)) + data


def _check_depth(data: bytes) -> None:
    """
    Refuse JSON nested deeper than L{MAX_DEPTH} without parsing it: Python's
    parser recurses once per level and would raise RecursionError (with a
    traceback per frame) on a few thousand brackets.  Counting brackets is
    enough for almost every frame; only one with many of them is scanned
    (brackets inside strings do not count).
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for token in _NESTING.findall(data):
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"frame holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ProtocolError(f"integer of {len(text)} digits is out of range")
    return int(text)


def decode_body(data: bytes) -> Message:
    """
    Parse one frame's body.

    Only plain JSON is accepted: NaN and Infinity (which Python's parser
    takes by default), numbers that overflow a float, integers of more than
    20 digits and nesting past L{MAX_DEPTH} are protocol errors like any
    other malformed frame, so no field check downstream meets them.

    @raise ProtocolError: not a JSON object of a known type with valid fields.
    """
    _check_depth(data)
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("frame is not UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("frame is not a JSON object")
    kind = body.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    return cls.parse(body)


class FrameDecoder:
    """
    Feed bytes in, take messages out.

    Holds at most one partial frame, never more than C{max_frame} + 4
    bytes; after a L{ProtocolError} it must not be fed again.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes, limit: int | None = None) -> list[Message]:
        """
        Add C{data}; return the complete messages now available (at most
        C{limit} of them: the rest of the bytes stay for L{rest}).

        @raise ProtocolError: on an oversized or malformed frame.
        """
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        while len(buffer) >= 4 and (limit is None or len(messages) < limit):
            (size,) = _HEADER.unpack_from(buffer)
            if size > self.max_frame:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            if len(buffer) < 4 + size:
                break
            body = bytes(buffer[4 : 4 + size])
            del buffer[: 4 + size]
            messages.append(decode_body(body))
        return messages

    def rest(self) -> bytes:
        """
        Bytes after the frames taken so far (the stream after a proxy
        connection's first frame); the decoder is empty afterwards.
        """
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest
