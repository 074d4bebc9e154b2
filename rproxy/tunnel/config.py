"""
Configuration of tunnels (server side), static API keys, and the agent.

Read with the same key-path reader as the rest of the configuration
(L{rproxy.config}); see DESIGN.md for the contract.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from rproxy.config import values as v
from rproxy.config.endpoints import listen
from rproxy.config.frontends import read_access, read_access_log
from rproxy.config.limits import read_rate_limits
from rproxy.config.load import load_yaml, read_file, read_sources
from rproxy.config.reader import Section
from rproxy.config.values import ConfigError, brief, kind, parse_hostport

__all__ = ["ApiKeyConfig", "TunnelConfig", "TLSConfig", "AgentConfig", "ServiceConfig", "load_agent_config"]

TUNNEL_ALGORITHMS = ("random", "round-robin", "least-connections", "model")


@attrs.frozen
class ApiKeyConfig:
    key: str = attrs.field(repr=False)
    level: int = -1
    name: str = "default"


@attrs.frozen
class TLSConfig:
    cert: str
    key: str


@attrs.frozen
class TunnelConfig:
    name: str
    control: str = "tcp:17000"
    proxy: str = "tcp:17001"
    public: str = "tcp:18080"
    mode: str = "tcp"
    algorithm: str = "random"
    tls: TLSConfig | None = None
    heartbeat_timeout: float = 30.0
    open_timeout: float = 5.0
    max_pending: int = 1024
    service: str | None = None
    # mode: http
    strict_models: bool = True  # unknown model: 404, 503 while its agent reconnects (false: any agent)
    model_body_limit: int = 1024 * 1024  # JSON bodies read for their "model" field
    header_timeout: float = 10.0
    # mode: tcp: one line per stream (rproxy.tunnel.streamlog), off | text
    # | json; mode: http: one per request (as an HTTP frontend's
    # http.access_log), off | combined | json
    access_log: str = "off"
    access_log_path: str | None = None  # a file of its own; None: the process log
    # mode: http: rate limits of the public port's requests
    # (rproxy.config.limits.RateLimitConfig; key: api_key is the user's key,
    # shared and dedicated alike) and its allow/deny lists
    rate_limits: tuple[Any, ...] = ()
    access: Any = None


# the largest JSON body a mode: http tunnel reads for its "model" field
MODEL_BODY_LIMIT_MAX = 64 * 1024 * 1024
_NO_FILE = "no such file {path}"


def _read_tls(section: Section) -> TLSConfig | None:
    if not section.data:
        section.finish()
        return None
    cert, key = section.file("cert", True, _NO_FILE), section.file("key", True, _NO_FILE)
    section.finish()
    return TLSConfig(cert=cert, key=key) if cert and key else None


_STREAM_LOG_FORMATS = ("off", "text", "json")


def _read_stream_log(section: Section) -> tuple[str, str | None]:
    """
    C{access_log: FORMAT} (to the process log) or C{access_log: {format,
    path}} (a file of its own).
    """
    if not section.has("access_log"):
        return "off", None
    raw = section.data["access_log"]
    if not isinstance(raw, dict):
        return section.value("access_log", v.choice(_STREAM_LOG_FORMATS), "off"), None
    log = section.section("access_log")
    format_ = log.value("format", v.choice(_STREAM_LOG_FORMATS), "text")
    path = log.value("path", v.text, None)
    if path is not None and any(c in path for c in "\0\r\n"):
        log.error("path", f"{brief(path)} is not a file path")
        path = None
    if format_ == "off" and path is not None:
        log.error("path", "the access log is off (format: off); set format: text or json")
    log.finish()
    return format_, path


def read_api_keys(top: Section) -> tuple[ApiKeyConfig, ...]:
    keys: list[ApiKeyConfig] = []
    for path, raw in top.items("api_keys"):
        section = top.child(raw, path)
        if not section.ok:
            continue
        key = ApiKeyConfig(
            key=section.value("key", v.text) or "",
            level=section.value("level", v.int_in(-1), -1),
            name=section.value("name", v.text, "default"),
        )
        section.finish()
        if key.key:
            keys.append(key)
    return tuple(keys)


def read_tunnels(top: Section) -> tuple[TunnelConfig, ...]:
    tunnels: list[TunnelConfig] = []
    for path, raw in top.items("tunnels"):
        section = top.child(raw, path)
        if not section.ok:
            continue
        d = TunnelConfig(name="")
        mode = section.value("mode", v.choice(("tcp", "http")), "tcp")
        algorithm = section.value("algorithm", v.choice(TUNNEL_ALGORITHMS), d.algorithm)
        if algorithm == "model" and mode != "http":
            section.error("algorithm", "model routing needs mode: http")
        # (the same key: streams for mode tcp, requests for mode http)
        access_log, access_log_path = read_access_log(section) if mode == "http" else _read_stream_log(section)
        tunnel = TunnelConfig(
            name=section.value("name", v.name) or "",
            control=section.value("control", listen, d.control),
            proxy=section.value("proxy", listen, d.proxy),
            public=section.value("public", listen, d.public),
            mode=mode,
            algorithm=algorithm,
            tls=_read_tls(section.section("tls")),
            heartbeat_timeout=section.value("heartbeat_timeout", v.positive_duration, d.heartbeat_timeout),
            open_timeout=section.value("open_timeout", v.positive_duration, d.open_timeout),
            max_pending=section.value("max_pending", v.int_in(1), d.max_pending),
            service=section.value("service", v.name, None),
            strict_models=section.value("strict_models", v.boolean, True),
            model_body_limit=section.value("model_body_limit", v.size, d.model_body_limit),
            header_timeout=section.value("header_timeout", v.duration, d.header_timeout),
            access_log=access_log,
            access_log_path=access_log_path,
            rate_limits=read_rate_limits(section) if mode == "http" else (),
            access=read_access(section),
        )
        if tunnel.mode != "http":
            for key in ("strict_models", "model_body_limit", "header_timeout", "rate_limit", "allow", "deny"):
                if section.has(key):
                    section.error(key, "applies to mode: http only")
        if tunnel.model_body_limit > MODEL_BODY_LIMIT_MAX:
            section.error("model_body_limit", f"at most {MODEL_BODY_LIMIT_MAX // 1024 // 1024}M "
                                              "(the bytes held before an agent is chosen)")
        section.finish()
        if tunnel.name and any(t.name == tunnel.name for t in tunnels):
            top.errors.append(f"{path}.name: duplicate tunnel name {brief(tunnel.name)}")
        elif tunnel.name:
            tunnels.append(tunnel)
    return tuple(tunnels)


# -- the agent -----------------------------------------------------------


@attrs.frozen
class ServiceConfig:
    name: str
    host: str
    port: int


@attrs.frozen
class AgentConfig:
    control: tuple[str, int]
    proxy: tuple[str, int]
    api_key: str = attrs.field(repr=False)
    services: tuple[ServiceConfig, ...]
    agent_id: str | None = None
    state_dir: str = "~/.rproxy-agent"
    ca: str | None = None
    server_name: str | None = None
    models: tuple[str, ...] = ()
    models_from: str | None = None
    heartbeat_interval: float = 10.0
    pool_count: int = 0
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    connect_timeout: float = 5.0
    # stop (exit 1) when the first login fails, rather than retry (frpc's loginFailExit)
    exit_on_login_failure: bool = False
    # every server known, (control, proxy) each, the first being
    # (control, proxy): the agent moves to the next when its own goes away
    servers: tuple[tuple[tuple[str, int], tuple[str, int]], ...] = ()


def _hostport(value: object) -> tuple[str, int]:
    return parse_hostport(v.text(value))


def _model_name(value: object) -> str:
    text = v.text(value)
    if len(text) > 256 or not re.match(r"^[\x21-\x7e]+\Z", text):
        raise ValueError(f"{brief(text)} is not a model name (printable ASCII, no spaces)")
    return text


_DEFAULT_SERVER = (("127.0.0.1", 17000), ("127.0.0.1", 17001))


def _read_server(section: Section) -> tuple[tuple[str, int], tuple[str, int]]:
    control = section.value("control", _hostport, _DEFAULT_SERVER[0])
    proxy = section.value("proxy", _hostport, _DEFAULT_SERVER[1])
    section.finish()
    return control, proxy


def _read_servers(top: Section) -> tuple[tuple[tuple[str, int], tuple[str, int]], ...]:
    """
    C{server:} as one C{{control, proxy}} mapping, or a list of them (or of
    control addresses C{"host:port"}, whose proxy port is the next one):
    the servers of a cluster, tried in turn.
    """
    raw = top.raw("server")
    if not isinstance(raw, list):
        return (_read_server(top.section("server")),)
    servers = []
    for path, item in top.items("server"):
        if isinstance(item, str):
            try:
                host, port = _hostport(item)
            except ValueError as e:
                top.errors.append(f"{path}: {e}")
                continue
            servers.append(((host, port), (host, port + 1 if port < 65535 else port)))
        else:
            servers.append(_read_server(top.child(item, path)))
    if not servers:
        if not raw:
            top.error("server", "an empty list: give at least one {control, proxy}")
        return (_DEFAULT_SERVER,)
    return tuple(servers)


def parse_agent_config(data: object) -> AgentConfig:
    """
    Build an L{AgentConfig} from a parsed document (the CA file it names
    is read first; validation itself is pure).
    """
    errors: list[str] = []
    top = Section(data, "", errors, read_sources(data, AGENT_FILE_KEYS, {}))
    servers = _read_servers(top)
    control, proxy = servers[0]
    tls = top.section("tls")
    ca = tls.file("ca", missing=_NO_FILE)
    server_name = tls.value("server_name", v.text, None)
    tls.finish()
    services = []
    for path, raw in top.items("services"):
        section = top.child(raw, path)
        if not section.ok:
            continue
        name = section.value("name", v.name)
        local = section.value("local", _hostport)
        section.finish()
        if name and local:
            services.append(ServiceConfig(name, local[0], local[1]))
    if not services and not any(e.startswith("services") for e in errors):
        errors.append("services: at least one service is required")
    models = []
    for path, raw in top.items("models"):
        try:
            models.append(_model_name(raw))
        except ValueError as e:
            errors.append(f"{path}: {e}")
    reconnect = top.section("reconnect")
    initial = reconnect.value("initial", v.positive_duration, 1.0)
    maximum = reconnect.value("max", v.positive_duration, 60.0)
    reconnect.finish()
    config = AgentConfig(
        control=control,
        proxy=proxy,
        api_key=top.value("api_key", v.text) or "",
        services=tuple(services),
        agent_id=top.value("agent_id", v.name, None),
        state_dir=top.value("state_dir", v.text, "~/.rproxy-agent"),
        ca=ca,
        server_name=server_name,
        models=tuple(models),
        models_from=top.value("models_from", v.text, None),
        heartbeat_interval=top.value("heartbeat_interval", v.positive_duration, 10.0),
        pool_count=top.value("pool_count", v.int_in(0, 64), 0),
        reconnect_initial=initial,
        reconnect_max=maximum,
        connect_timeout=top.value("connect_timeout", v.positive_duration, 5.0),
        exit_on_login_failure=top.value("exit_on_login_failure", v.boolean, False),
        servers=servers,
    )
    if config.models_from is not None and not re.match(r"^https?://[^/\s]+(/\S*)?\Z", config.models_from):
        errors.append(f"models_from: {brief(config.models_from)} is not an http:// or https:// URL")
    top.finish()
    if errors:
        raise ConfigError(errors)
    return config


AGENT_FILE_KEYS = (("tls", "ca"),)


def load_agent_config(path: str) -> AgentConfig:
    try:
        text = read_file(path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e.args[0]}"]) from None
    data = load_yaml(text, path)
    if data is None or not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping (server, api_key, services, ...), got {kind(data)}"])
    return parse_agent_config(data)

