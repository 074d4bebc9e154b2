"""
The configuration: YAML in, frozen attrs objects out.

Every value a user writes is checked here, once, and every problem is
reported with the path of the key that holds it, e.g.
C{frontends[1].listen: port 70000 out of range}.  Unknown keys are errors
(with a did-you-mean), because a misspelt key silently ignored is a proxy
that does something other than what its operator believes.

Nothing outside this module parses durations, addresses or endpoint
strings; the rest of rproxy only ever sees the typed objects below.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import yaml

__all__ = [
    "ConfigError",
    "GlobalConfig",
    "AdminConfig",
    "ServerConfig",
    "HealthCheckConfig",
    "PassiveConfig",
    "BackendConfig",
    "FrontendConfig",
    "Config",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "ALGORITHMS",
]


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar errors: one line per problem, each starting with the key path.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


ALGORITHMS = (
    "round-robin",
    "weighted-round-robin",
    "least-connections",
    "random",
    "p2c",
    "ip-hash",
    "hash",
)
HEALTH_TYPES = ("tcp", "http", "none")
PROTOCOLS = ("tcp", "http")
FUTURE_PROTOCOLS: tuple[str, ...] = ()
ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """
    Parse a duration: a number of seconds, or a string such as C{250ms},
    C{5s}, C{2m}, C{1h}, C{1d}.

    @raise ValueError: with a message fit to follow a key path.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 5s or 250ms, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"invalid duration {value!r} (use e.g. 250ms, 5s, 2m, 1h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 5s or 250ms, got {value!r}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """
    Parse a size in bytes: an integer, or a string such as C{64k}, C{10M},
    C{1GiB} (binary multiples).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 64k or 10M, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"invalid size {value!r} (use e.g. 512, 64k, 10M, 1G)")
        unit = (match.group(2) or "").lower()[:1]
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size such as 64k or 10M, got {value!r}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


def parse_hostport(value: str, allow_zero: bool = False) -> tuple[str, int]:
    """
    Split C{host:port} or C{[v6addr]:port}.

    @raise ValueError: if there is no port or it is out of range.
    """
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"invalid address {value!r} (expected [ipv6]:port)")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid address {value!r} (expected host:port)")
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in {value!r}")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def split_endpoint(description: str) -> list[str]:
    """
    Split a Twisted endpoint description on unescaped colons.
    """
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def normalize_listen(value: str) -> str:
    """
    Check a listen address and return it as a Twisted endpoint string.

    C{host:port} becomes C{tcp:port:interface=host}; endpoint strings are
    checked for a known type and a port in range.
    """
    value = value.strip()
    first = value.split(":", 1)[0]
    if first not in ENDPOINT_TYPES and ":" in value:
        host, port = parse_hostport(value, allow_zero=True)
        if host in ("", "*", "0.0.0.0"):
            return f"tcp:{port}"
        escaped = host.replace(":", "\\:")
        return f"tcp:{port}:interface={escaped}"
    if first not in ENDPOINT_TYPES:
        if value.isdigit():
            raise ValueError(f"{value!r} is not an address; write tcp:{value} or 127.0.0.1:{value}")
        raise ValueError(
            f"unknown endpoint type {first!r} (expected host:port or one of "
            + ", ".join(ENDPOINT_TYPES)
            + ")"
        )
    parts = split_endpoint(value)
    if first in ("tcp", "tcp6", "ssl"):
        positional = [p for p in parts[1:] if "=" not in p]
        keyword = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        port_text = keyword.get("port", positional[0] if positional else None)
        if port_text is None:
            raise ValueError(f"no port in {value!r}")
        if not port_text.isdigit():
            raise ValueError(f"invalid port {port_text!r}")
        if int(port_text) > 65535:
            raise ValueError(f"port {int(port_text)} out of range")
    elif first == "unix" and len(parts) < 2:
        raise ValueError(f"no path in {value!r}")
    return value


# --- typed configuration -------------------------------------------------


@attrs.frozen
class GlobalConfig:
    workers: int = 1
    max_connections: int = 10000
    backlog: int = 511
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    grace_period: float = 30.0


@attrs.frozen
class AdminConfig:
    listen: str | None = "tcp:18081:interface=127.0.0.1"
    api_key: str | None = None


@attrs.frozen
class ServerConfig:
    """
    One server of a backend.  C{name} defaults to the address and is the
    server's identity: a reload that keeps the name keeps the server's
    state (health, counters, open connections).
    """

    name: str
    address: str
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    max_connections: int = 0


@attrs.frozen
class HealthCheckConfig:
    type: str = "tcp"
    path: str = "/"
    expect_status: int = 200
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    headers: tuple[tuple[str, str], ...] = ()
    host: str | None = None
    jitter: float = 0.1
    # the backend's TLS settings: http checks of a TLS backend speak TLS
    tls: UpstreamTLSConfig | None = None


@attrs.frozen
class PassiveConfig:
    consecutive_failures: int = 5
    ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 50


@attrs.frozen
class UpstreamTLSConfig:
    """
    TLS to a backend's servers: verified against C{ca} (default: the
    system's roots) for C{server_name} (default: each server's host).
    """

    ca: str | None = None
    server_name: str | None = None
    verify: bool = True


@attrs.frozen
class BackendConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    algorithm: str = "round-robin"
    hash_key: str = "source_ip"
    source: str = "static"
    health_check: HealthCheckConfig = HealthCheckConfig()
    passive: PassiveConfig = PassiveConfig()
    queue_size: int = 1024
    queue_timeout: float = 5.0
    tls: UpstreamTLSConfig | None = None


@attrs.frozen
class HTTPOptions:
    """
    Settings of a C{protocol: http} frontend (key C{http:}).
    """

    max_target: int = 8192
    max_head: int = 64 * 1024
    max_headers: int = 100
    max_body: int | None = 1024**3
    header_timeout: float = 10.0
    response_timeout: float = 60.0
    retries: int = 2
    host_header: str = "client"
    direct_routes: bool = False
    sticky_cookie: str | None = None
    cors: bool = False
    access_log: str = "off"


@attrs.frozen
class FrontendConfig:
    name: str
    listen: str
    backend: str
    protocol: str = "tcp"
    max_connections: int = 0
    queue_size: int = 128
    queue_timeout: float = 5.0
    retries: int = 2
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    http: HTTPOptions = HTTPOptions()
    routes: tuple[Any, ...] = ()  # rproxy.http.routes.Route
    # TLS termination: (cert, key) files, the first the default, the
    # others chosen by SNI
    tls: tuple[tuple[str, str], ...] = ()
    token_pool: str | None = None


@attrs.frozen
class Credential:
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class TokenPoolConfig:
    """
    A pool of bearer tokens obtained by logging in upstream (key
    C{token_pools:}); the defaults speak DolphinDB's REST login.
    """

    name: str
    host: str
    port: int
    credentials: tuple[Credential, ...]
    tls: UpstreamTLSConfig | None = None
    login_path: str = "/api/login"
    # the JSON login body: field -> template with {username} and {password}
    login_body: tuple[tuple[str, str], ...] = (("username", "{username}"), ("password", "{password}"))
    login_headers: tuple[tuple[str, str], ...] = ()
    # where the token is in the JSON answer (dotted; numbers index lists)
    token_field: str = "result.0"
    # a field that must hold ok_value when present (DolphinDB: code "0")
    ok_field: str | None = "code"
    ok_value: str = "0"
    # a field with the token's lifetime in seconds, if the upstream says
    expires_field: str | None = None
    sessions_per_credential: int = 1
    ttl: float = 3600.0
    refresh_before: float = 300.0
    queue_timeout: float = 30.0
    max_waiters: int = 1024
    login_timeout: float = 10.0
    login_concurrency: int = 8
    max_login_failures: int = 5
    retry_initial: float = 1.0
    retry_max: float = 60.0


@attrs.frozen
class StoresConfig:
    """
    PostgreSQL and/or Redis; C{DATABASE_URL} and C{REDIS_URL} override the
    file.  Absent: embedded mode, everything from the YAML file.
    """

    postgres_dsn: str | None = None
    pool_size: int = 4
    resync_interval: float = 30.0  # full re-read of live backends (source: postgres)
    heartbeat_retention: float = 7 * 86400.0  # heartbeats older than this are deleted, hourly
    redis_url: str | None = None
    auth_cache_ttl: float = 300.0


@attrs.frozen
class Config:
    global_: GlobalConfig = GlobalConfig()
    admin: AdminConfig = AdminConfig()
    backends: tuple[BackendConfig, ...] = ()
    frontends: tuple[FrontendConfig, ...] = ()
    stores: StoresConfig | None = None
    api_keys: tuple[Any, ...] = ()  # rproxy.tunnel.config.ApiKeyConfig
    tunnels: tuple[Any, ...] = ()  # rproxy.tunnel.config.TunnelConfig
    token_pools: tuple[TokenPoolConfig, ...] = ()

    def backend(self, name: str) -> BackendConfig:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


# --- the reader ----------------------------------------------------------

_MISSING = object()


class _Section:
    """
    A mapping being read at a key path.  Reading records which keys were
    used, so that L{finish} can report the rest as unknown.
    """

    def __init__(self, data: object, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        self.ok = isinstance(data, dict)
        if data is None:
            data, self.ok = {}, True
        if not self.ok:
            errors.append(f"{path or 'config'}: expected a mapping, got {_kind(data)}")
            data = {}
        self.data: dict[Any, Any] = data  # type: ignore[assignment]
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key, _MISSING)

    def value(
        self,
        key: str,
        convert: Callable[[object], Any],
        default: object = _MISSING,
    ) -> Any:
        raw = self.raw(key)
        if raw is _MISSING:
            if default is _MISSING:
                self.error(key, "required")
            return None if default is _MISSING else default
        try:
            return convert(raw)
        except ValueError as e:
            self.error(key, str(e))
            return None if default is _MISSING else default

    def section(self, key: str) -> _Section:
        raw = self.raw(key)
        return _Section(None if raw is _MISSING else raw, self.key_path(key), self.errors)

    def items(self, key: str) -> list[tuple[str, object]]:
        """
        The elements of a list under C{key}, each with its path.
        """
        raw = self.raw(key)
        if raw is _MISSING or raw is None:
            return []
        if not isinstance(raw, list):
            self.error(key, f"expected a list, got {_kind(raw)}")
            return []
        return [(f"{self.key_path(key)}[{i}]", item) for i, item in enumerate(raw)]

    def finish(self) -> None:
        for key in self.data:
            if key in self.used:
                continue
            if not isinstance(key, str):
                self.errors.append(f"{self.path or 'config'}: key {key!r} is not a string")
                continue
            known = sorted(self.used)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(key, f"unknown key{hint}")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _int(low: int | None = None, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_kind(value)} {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{value} is below the minimum {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above the maximum {high}")
        return value

    return convert


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)} {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)} {value!r}")
    return value


def _choice(options: Iterable[str]) -> Callable[[object], str]:
    options = tuple(options)

    def convert(value: object) -> str:
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{value!r} is not one of {', '.join(options)}{hint}")
        return value  # type: ignore[return-value]

    return convert


def _duration(value: object) -> float:
    return parse_duration(value)


def _listen(value: object) -> str:
    return normalize_listen(_str(value))


def _name(value: object) -> str:
    text = _str(value)
    if not re.match(r"^[A-Za-z0-9_.-]+$", text):
        raise ValueError(f"{text!r} may only hold letters, digits, '_', '.' and '-'")
    return text


def _hash_key(value: object) -> str:
    text = _str(value)
    if text == "source_ip":
        return text
    kind, sep, name = text.partition(":")
    if kind in ("header", "cookie") and sep and name:
        return text
    raise ValueError(f"{text!r} is not source_ip, header:NAME or cookie:NAME")


def _read_global(section: _Section) -> GlobalConfig:
    d = GlobalConfig()
    result = GlobalConfig(
        workers=section.value("workers", _int(1, 1), d.workers),
        max_connections=section.value("max_connections", _int(1), d.max_connections),
        backlog=section.value("backlog", _int(1, 65535), d.backlog),
        connect_timeout=section.value("connect_timeout", _duration, d.connect_timeout),
        idle_timeout=section.value("idle_timeout", _duration, d.idle_timeout),
        grace_period=section.value("grace_period", _duration, d.grace_period),
    )
    section.finish()
    return result


def _read_admin(section: _Section) -> AdminConfig:
    d = AdminConfig()
    listen = section.raw("listen")
    if listen is None:
        admin_listen = None
    elif listen is _MISSING:
        admin_listen = d.listen
    else:
        try:
            admin_listen = _listen(listen)
        except ValueError as e:
            section.error("listen", str(e))
            admin_listen = d.listen
    result = AdminConfig(
        listen=admin_listen,
        api_key=section.value("api_key", _str, None),
    )
    section.finish()
    return result


def _read_server(path: str, raw: object, errors: list[str]) -> ServerConfig | None:
    if isinstance(raw, str):
        raw = {"address": raw}
    section = _Section(raw, path, errors)
    if not section.ok:
        return None
    address = section.value("address", _str)
    host, port = "", 0
    if address is not None:
        try:
            host, port = parse_hostport(address)
        except ValueError as e:
            section.error("address", str(e))
            address = None
    server = ServerConfig(
        name=section.value("name", _name, address or ""),
        address=address or "",
        host=host,
        port=port,
        weight=section.value("weight", _int(0, 1000), 1),
        backup=section.value("backup", _bool, False),
        max_connections=section.value("max_connections", _int(0), 0),
    )
    section.finish()
    return server if address else None


def _read_health(section: _Section) -> HealthCheckConfig:
    d = HealthCheckConfig()
    headers: list[tuple[str, str]] = []
    header_section = section.section("headers")
    for key, value in header_section.data.items():
        header_section.used.add(key)
        if not isinstance(key, str) or not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", key):
            header_section.errors.append(f"{header_section.path}: invalid header name {key!r}")
        elif not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            header_section.error(key, "header value must be a single-line string")
        else:
            headers.append((key, str(value)))
    result = HealthCheckConfig(
        type=section.value("type", _choice(HEALTH_TYPES), d.type),
        path=section.value("path", _path, d.path),
        expect_status=section.value("expect_status", _int(100, 599), d.expect_status),
        interval=section.value("interval", _duration, d.interval),
        timeout=section.value("timeout", _duration, d.timeout),
        rise=section.value("rise", _int(1, 100), d.rise),
        fall=section.value("fall", _int(1, 100), d.fall),
        headers=tuple(headers),
        host=section.value("host", _str, None),
        jitter=section.value("jitter", _fraction, d.jitter),
    )
    if result.interval <= 0:
        section.error("interval", "must be greater than zero")
    if result.timeout <= 0:
        section.error("timeout", "must be greater than zero")
    section.finish()
    return result


def _path(value: object) -> str:
    text = _str(value)
    if not text.startswith("/") or any(c in text for c in " \r\n\0"):
        raise ValueError(f"{text!r} must start with / and hold no spaces or control characters")
    return text


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return float(value)


def _read_passive(section: _Section) -> PassiveConfig:
    d = PassiveConfig()
    result = PassiveConfig(
        consecutive_failures=section.value("consecutive_failures", _int(0), d.consecutive_failures),
        ejection=section.value("ejection", _duration, d.ejection),
        max_ejection=section.value("max_ejection", _duration, d.max_ejection),
        max_ejection_percent=section.value("max_ejection_percent", _int(0, 100), d.max_ejection_percent),
    )
    section.finish()
    return result


def _read_backend(path: str, raw: object, errors: list[str]) -> BackendConfig | None:
    section = _Section(raw, path, errors)
    if not section.ok:
        return None
    name = section.value("name", _name)
    servers = []
    seen: set[str] = set()
    for server_path, server_raw in section.items("servers"):
        server = _read_server(server_path, server_raw, errors)
        if server is None:
            continue
        if server.name in seen:
            errors.append(f"{server_path}: duplicate server name {server.name!r}")
            continue
        seen.add(server.name)
        servers.append(server)
    source = section.value("source", _choice(("static", "postgres")), "static")
    if source == "static" and not section.has("servers"):
        section.error("servers", "required")
    health_raw = section.raw("health_check")
    if health_raw in ("none", False):
        health = HealthCheckConfig(type="none")
    else:
        health = _read_health(
            _Section(None if health_raw is _MISSING else health_raw, section.key_path("health_check"), errors)
        )
    algorithm = section.value("algorithm", _choice(ALGORITHMS), "round-robin")
    hash_key = section.value("hash_key", _hash_key, "source_ip")
    if algorithm == "ip-hash" and hash_key != "source_ip":
        section.error("hash_key", "ip-hash always hashes source_ip; use algorithm: hash")
    backend = BackendConfig(
        name=name or "",
        servers=tuple(servers),
        algorithm=algorithm,
        hash_key=hash_key,
        source=source,
        health_check=health,
        passive=_read_passive(section.section("passive")),
        queue_size=section.value("queue_size", _int(0), 1024),
        queue_timeout=section.value("queue_timeout", _duration, 5.0),
        tls=_read_upstream_tls(section),
    )
    if backend.tls is not None and backend.health_check.type == "http":
        backend = attrs.evolve(backend, health_check=attrs.evolve(backend.health_check, tls=backend.tls))
    section.finish()
    return backend if name else None


def _file(value: object) -> str:
    path = _str(value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    return path


def _read_upstream_tls(section: _Section) -> UpstreamTLSConfig | None:
    raw = section.raw("tls")
    if raw is _MISSING or raw is None or raw is False:
        return None
    if raw is True:
        return UpstreamTLSConfig()
    tls = _Section(raw, section.key_path("tls"), section.errors)
    config = UpstreamTLSConfig(
        ca=tls.value("ca", _file, None),
        server_name=tls.value("server_name", _str, None),
        verify=tls.value("verify", _bool, True),
    )
    tls.finish()
    return config


def _read_frontend_tls(section: _Section) -> tuple[tuple[str, str], ...]:
    raw = section.raw("tls")
    if raw is _MISSING or raw is None:
        return ()
    tls = _Section(raw, section.key_path("tls"), section.errors)
    pairs = []
    cert, key = tls.value("cert", _file), tls.value("key", _file)
    if cert and key:
        pairs.append((cert, key))
    for path, item in tls.items("sni"):
        extra = _Section(item, path, section.errors)
        cert, key = extra.value("cert", _file), extra.value("key", _file)
        extra.finish()
        if cert and key:
            pairs.append((cert, key))
    tls.finish()
    for cert, key in pairs:
        try:
            from rproxy.tls import load_pair

            load_pair(cert, key)
        except Exception as e:  # noqa: BLE001 - any load failure is a config error
            section.errors.append(f"{section.key_path('tls')}: cannot load {cert} / {key}: {e}")
    return tuple(pairs)


def _read_frontend(
    path: str, raw: object, errors: list[str], global_: GlobalConfig
) -> FrontendConfig | None:
    section = _Section(raw, path, errors)
    if not section.ok:
        return None
    name = section.value("name", _name)
    protocol = section.value("protocol", _choice(PROTOCOLS + FUTURE_PROTOCOLS), "tcp")
    if protocol in FUTURE_PROTOCOLS:
        section.error("protocol", f"{protocol!r} frontends are not available in this version")
    http = _read_http(section.section("http"))
    routes = _read_routes(section, protocol)
    tls = _read_frontend_tls(section)
    frontend = FrontendConfig(
        name=name or "",
        listen=section.value("listen", _listen),
        backend=section.value("backend", _name),
        protocol=protocol,
        http=http,
        routes=routes,
        tls=tls,
        max_connections=section.value("max_connections", _int(0), 0),
        queue_size=section.value("queue_size", _int(0), 128),
        queue_timeout=section.value("queue_timeout", _duration, 5.0),
        retries=section.value("retries", _int(0, 10), 2),
        connect_timeout=section.value("connect_timeout", _duration, global_.connect_timeout),
        idle_timeout=section.value("idle_timeout", _duration, global_.idle_timeout),
        token_pool=section.value("token_pool", _name, None),
    )
    if frontend.token_pool is not None and protocol != "http":
        section.error("token_pool", "token pools need protocol: http")
    section.finish()
    if not (name and frontend.backend):
        return None
    return frontend


def _size(value: object) -> int:
    return parse_size(value)


def _read_http(section: _Section) -> HTTPOptions:
    d = HTTPOptions()
    max_body = section.raw("max_body")
    if max_body is None or max_body is _MISSING:
        body_limit = None if max_body is None else d.max_body
    else:
        try:
            body_limit = parse_size(max_body)
        except ValueError as e:
            section.error("max_body", str(e))
            body_limit = d.max_body
    options = HTTPOptions(
        max_target=section.value("max_target", _size, d.max_target),
        max_head=section.value("max_head", _size, d.max_head),
        max_headers=section.value("max_headers", _int(1, 10000), d.max_headers),
        max_body=body_limit,
        header_timeout=section.value("header_timeout", _duration, d.header_timeout),
        response_timeout=section.value("response_timeout", _duration, d.response_timeout),
        retries=section.value("retries", _int(0, 10), d.retries),
        host_header=section.value("host_header", _choice(("client", "server")), d.host_header),
        direct_routes=section.value("direct_routes", _bool, d.direct_routes),
        sticky_cookie=section.value("sticky_cookie", _cookie_name, None),
        cors=section.value("cors", _bool, d.cors),
        access_log=section.value("access_log", _choice(("off", "combined", "json")), d.access_log),
    )
    section.finish()
    return options


def _cookie_name(value: object) -> str:
    text = _str(value)
    if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", text):
        raise ValueError(f"{text!r} is not a cookie name")
    return text


def _read_routes(section: _Section, protocol: str) -> tuple[Any, ...]:
    from rproxy.http.routes import Route

    routes = []
    for path, raw in section.items("routes"):
        if protocol != "http":
            section.errors.append(f"{path}: routes need protocol: http")
            continue
        route = _Section(raw, path, section.errors)
        if not route.ok:
            continue
        set_headers = route.section("set_headers")
        pairs = []
        for key, value in set_headers.data.items():
            set_headers.used.add(key)
            if not isinstance(key, str) or not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", key):
                set_headers.errors.append(f"{set_headers.path}: invalid header name {key!r}")
            elif not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
                set_headers.error(key, "header value must be a single-line string")
            else:
                pairs.append((key, str(value)))
        remove = []
        for item_path, item in route.items("remove_headers"):
            if isinstance(item, str) and item:
                remove.append(item)
            else:
                section.errors.append(f"{item_path}: expected a header name")
        host = route.value("host", _str, None)
        prefix = route.value("path_prefix", _path, None)
        backend = route.value("backend", _name)
        route.finish()
        if backend:
            routes.append(Route(backend=backend, host=host, path_prefix=prefix,
                                set_headers=tuple(pairs), remove_headers=tuple(remove)))
    return tuple(routes)


def _read_stores(top: _Section) -> StoresConfig | None:
    import os

    raw = top.raw("stores")
    env_dsn, env_redis = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if (raw is _MISSING or raw is None) and not (env_dsn or env_redis):
        return None
    section = _Section(None if raw is _MISSING else raw, "stores", top.errors)
    postgres = section.section("postgres")
    dsn = postgres.value("dsn", _str, None)
    pool_size = postgres.value("pool_size", _int(1, 100), 4)
    resync = postgres.value("resync_interval", _duration, 30.0)
    retention = postgres.value("heartbeat_retention", _duration, 7 * 86400.0)
    postgres.finish()
    redis = section.section("redis")
    url = redis.value("url", _str, None)
    ttl = redis.value("auth_cache_ttl", _duration, 300.0)
    redis.finish()
    section.finish()
    url = env_redis or url
    if url is not None and not url.startswith("redis://"):
        top.errors.append(f"stores.redis.url: {url!r} is not a redis://host:port/db URL")
    return StoresConfig(postgres_dsn=env_dsn or dsn, pool_size=pool_size, redis_url=url, auth_cache_ttl=ttl,
                        resync_interval=resync or 30.0, heartbeat_retention=retention or 7 * 86400.0)


def _ephemeral(listen: str) -> bool:
    """
    Whether a listen string asks for port 0 (any free port), which two
    frontends may both do.
    """
    parts = split_endpoint(listen)
    return len(parts) > 1 and parts[1] in ("0", "port=0")


def parse_config(data: object) -> Config:
    """
    Build a L{Config} from parsed YAML.

    @raise ConfigError: listing every problem found, each with its key path.
    """
    errors: list[str] = []
    top = _Section(data, "", errors)
    global_ = _read_global(top.section("global"))
    admin = _read_admin(top.section("admin"))

    backends: list[BackendConfig] = []
    for path, raw in top.items("backends"):
        backend = _read_backend(path, raw, errors)
        if backend is None:
            continue
        if any(b.name == backend.name for b in backends):
            errors.append(f"{path}.name: duplicate backend name {backend.name!r}")
            continue
        backends.append(backend)

    frontends: list[FrontendConfig] = []
    names = {b.name for b in backends}
    for path, raw in top.items("frontends"):
        frontend = _read_frontend(path, raw, errors, global_)
        if frontend is None:
            continue
        if any(f.name == frontend.name for f in frontends):
            errors.append(f"{path}.name: duplicate frontend name {frontend.name!r}")
            continue
        for i, route in enumerate(frontend.routes):
            if route.backend not in names:
                errors.append(f"{path}.routes[{i}].backend: no backend named {route.backend!r}")
        if frontend.backend not in names:
            close = difflib.get_close_matches(frontend.backend, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}.backend: no backend named {frontend.backend!r}{hint}")
            continue
        if frontend.listen and not _ephemeral(frontend.listen) and any(
            f.listen == frontend.listen for f in frontends
        ):
            errors.append(f"{path}.listen: {frontend.listen!r} is already used by another frontend")
            continue
        frontends.append(frontend)
    from rproxy.tunnel.config import read_api_keys, read_tunnels

    api_keys = read_api_keys(top)
    tunnels = read_tunnels(top)
    stores = _read_stores(top)
    if stores is None or stores.postgres_dsn is None:
        for backend in backends:
            if backend.source == "postgres":
                errors.append(f"{_item_path(top, 'backends', backend.name)}.source: postgres needs stores.postgres.dsn "
                              "(or DATABASE_URL)")
    token_pools: list[TokenPoolConfig] = []
    for path, raw in top.items("token_pools"):
        pool = _read_token_pool(path, raw, errors)
        if pool is None:
            continue
        if any(p.name == pool.name for p in token_pools):
            errors.append(f"{path}.name: duplicate token pool name {pool.name!r}")
            continue
        token_pools.append(pool)
    pool_names = sorted(p.name for p in token_pools)
    for frontend in frontends:
        if frontend.token_pool is not None and frontend.token_pool not in pool_names:
            close = difflib.get_close_matches(frontend.token_pool, pool_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{_item_path(top, 'frontends', frontend.name)}.token_pool: no token pool named "
                          f"{frontend.token_pool!r}{hint}")
    top.finish()
    if errors:
        raise ConfigError(errors)
    return Config(
        global_=global_,
        admin=admin,
        backends=tuple(backends),
        frontends=tuple(frontends),
        api_keys=api_keys,
        tunnels=tunnels,
        stores=stores,
        token_pools=tuple(token_pools),
    )


def _item_path(top: _Section, key: str, name: str) -> str:
    """
    The key path of the element of list C{key} named C{name}.
    """
    for i, raw in enumerate(top.data.get(key) or []):
        if isinstance(raw, dict) and raw.get("name") == name:
            return f"{key}[{i}]"
    return key


def _header_pairs(section: _Section) -> tuple[tuple[str, str], ...]:
    pairs = []
    for key, value in section.data.items():
        section.used.add(key)
        if not isinstance(key, str) or not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", key):
            section.errors.append(f"{section.path}: invalid header name {key!r}")
        elif not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            section.error(key, "header value must be a single-line string")
        else:
            pairs.append((key, str(value)))
    return tuple(pairs)


def _field_path(value: object) -> str:
    text = _str(value)
    if not text or any(not part for part in text.split(".")):
        raise ValueError(f"{text!r} is not a dotted field path such as result.0")
    return text


def _read_credentials_file(path: str) -> tuple[list[Credential], list[str]]:
    """
    C{username:password} per line; blank lines and C{#} comments skipped.
    """
    credentials, problems = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}"]
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, password = line.partition(":")
        if not sep or not username:
            problems.append(f"{path} line {number}: expected username:password")
            continue
        credentials.append(Credential(username=username, password=password))
    return credentials, problems


def _read_token_pool(path: str, raw: object, errors: list[str]) -> TokenPoolConfig | None:
    section = _Section(raw, path, errors)
    if not section.ok:
        return None
    d = TokenPoolConfig(name="", host="", port=0, credentials=())
    name = section.value("name", _name)
    upstream = section.section("upstream")
    address = upstream.value("address", _str)
    host, port = "", 0
    if address:
        try:
            host, port = parse_hostport(address)
        except ValueError as e:
            upstream.error("address", str(e))
    tls = _read_upstream_tls(upstream)
    upstream.finish()

    login = section.section("login")
    login_path = login.value("path", _path, d.login_path)
    body = d.login_body
    raw_body = login.raw("body")
    if raw_body is not _MISSING and raw_body is not None:
        if not isinstance(raw_body, dict) or not raw_body:
            login.error("body", f"expected a mapping of JSON fields, got {_kind(raw_body)}")
        else:
            pairs = []
            for key, value in raw_body.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    login.errors.append(f"{login.key_path('body')}: field {key!r} needs a string value")
                    continue
                pairs.append((key, value))
            body = tuple(pairs)
    headers = _header_pairs(login.section("headers"))
    token_field = login.value("token", _field_path, d.token_field)
    ok_field = login.value("ok_field", _field_path, d.ok_field) if login.raw("ok_field") is not None else None
    ok_value = login.value("ok_value", lambda v: _str(v) if not isinstance(v, int) else str(v), d.ok_value)
    expires_field = login.value("expires_in", _field_path, None)
    login.finish()

    credentials = []
    for item_path, item in section.items("credentials"):
        cred = _Section(item, item_path, errors)
        username = cred.value("username", _str)
        password = cred.value("password", lambda v: str(v) if isinstance(v, (str, int)) else _str(v))
        cred.finish()
        if username and password is not None:
            credentials.append(Credential(username=username, password=password))
    cred_file = section.value("credentials_file", _str, None)
    if cred_file is not None:
        more, problems = _read_credentials_file(cred_file)
        credentials += more
        for problem in problems:
            section.error("credentials_file", problem)
    seen = set()
    for credential in credentials:
        if credential.username in seen:
            section.error("credentials", f"username {credential.username!r} is listed twice")
        seen.add(credential.username)

    retry = section.section("retry")
    retry_initial = retry.value("initial", _duration, d.retry_initial)
    retry_max = retry.value("max", _duration, d.retry_max)
    retry.finish()
    ttl = section.value("ttl", _duration, d.ttl)
    refresh_before = section.value("refresh_before", _duration, d.refresh_before)
    config = TokenPoolConfig(
        name=name or "",
        host=host,
        port=port,
        credentials=tuple(credentials),
        tls=tls,
        login_path=login_path,
        login_body=body,
        login_headers=headers,
        token_field=token_field,
        ok_field=ok_field,
        ok_value=ok_value,
        expires_field=expires_field,
        sessions_per_credential=section.value("sessions_per_credential", _int(1, 1000), 1),
        ttl=ttl,
        refresh_before=refresh_before,
        queue_timeout=section.value("queue_timeout", _duration, d.queue_timeout),
        max_waiters=section.value("max_waiters", _int(0, 1_000_000), d.max_waiters),
        login_timeout=section.value("login_timeout", _duration, d.login_timeout),
        login_concurrency=section.value("login_concurrency", _int(1, 1000), d.login_concurrency),
        max_login_failures=section.value("max_login_failures", _int(1, 1000), d.max_login_failures),
        retry_initial=retry_initial,
        retry_max=retry_max,
    )
    if ttl is not None and ttl <= 0:
        section.error("ttl", "must be more than 0s")
    elif ttl is not None and refresh_before is not None and refresh_before >= ttl:
        section.error("refresh_before", f"must be less than ttl ({ttl:g}s)")
    if retry_initial is not None and retry_max is not None and retry_initial > retry_max:
        retry.error("initial", f"is more than retry.max ({retry_max:g}s)")
    if not credentials and not section.has("credentials_file") and name:
        section.error("credentials", "required (or credentials_file): at least one username and password")
    elif not credentials and cred_file is not None and not any(e.startswith(f"{path}.credentials_file") for e in errors):
        section.error("credentials_file", f"{cred_file} holds no username:password line")
    section.finish()
    # an invalid pool still has its name, so that frontends naming it get
    # no second error
    return config if name else None



def load_config(path: str) -> Config:
    """
    Read and validate the YAML file at C{path}.

    @raise ConfigError: the file cannot be read, is not YAML, or is invalid.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"]) from None
    return parse_config(data)


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    """
    Build a L{Config} from a Python mapping (for tests and embedding).
    """
    return parse_config(dict(data))
