"""
The configuration model: frozen attrs objects, built only by the section
readers (L{rproxy.config.document}) and read by everything else.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "GlobalConfig",
    "AdminConfig",
    "ServerConfig",
    "HealthCheckConfig",
    "PassiveConfig",
    "UpstreamTLSConfig",
    "BackendConfig",
    "HTTPOptions",
    "FrontendConfig",
    "Credential",
    "TokenPoolConfig",
    "StoresConfig",
    "Config",
    "ALGORITHMS",
    "HEALTH_TYPES",
    "PROTOCOLS",
]

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
PROTOCOLS = ("tcp", "http", "detect")


@attrs.frozen
class GlobalConfig:
    workers: int | str = 1  # or "auto"
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
    # PROXY protocol header sent to the servers: "v1", "v2" or None
    send_proxy: str | None = None
    # rproxy.config.limits.CircuitBreakerConfig, None: no thresholds
    circuit_breaker: Any = None
    # seconds over which a server that comes back ramps up to its weight
    slow_start: float = 0.0


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
    access_log: str = "off"  # off | combined | json
    access_log_path: str | None = None  # a file of its own; None: the twistd log
    # the key of the sticky cookie's server ids (all workers must share it); None: one per process
    sticky_secret: str | None = attrs.field(default=None, repr=False)


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
    # allow/deny lists (rproxy.cidr.AccessList), None: everyone
    access: Any = None
    # trusted_proxies, auth, redirect (rproxy.config.access.Policy), None: none
    policy: Any = None
    # rproxy.config.l4: PROXY protocol accepted, L4 access log, protocol
    # detection, TLS passthrough by SNI (None: off)
    proxy_protocol: Any = None
    l4_log: Any = None
    detect: Any = None
    tls_passthrough: Any = None
    # rproxy.config.limits.RateLimitConfig, each applying
    rate_limits: tuple[Any, ...] = ()

    @property
    def access_log(self) -> str:
        """
        The access log format of an http frontend (C{http.access_log}).
        """
        return self.http.access_log

    @property
    def access_log_path(self) -> str | None:
        """
        The file the access log goes to; C{None}: the twistd log.
        """
        return self.http.access_log_path


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
class KafkaConfig:
    """
    The Kafka cluster events go to (C{stores.kafka}), and the consumer
    group that writes them to PostgreSQL.  C{batch} events share one
    record (a JSON list; 1: each event its own JSON object), which is what
    keeps 10,000 events a second cheap for the proxy's one thread.
    """

    bootstrap_servers: tuple[str, ...] = ()
    client_id: str = "rproxy"
    heartbeats_topic: str = "client-heartbeats"
    requests_topic: str = "request-message"
    acks: str = "all"
    group: str = "rproxy-writers"
    batch: int = 100
    buffer_limit: int = 10_000
    delivery_timeout: float = 300.0
    session_timeout: float = 10.0
    compression: str = "none"


@attrs.frozen
class StoresConfig:
    """
    PostgreSQL and/or Redis and/or Kafka; C{DATABASE_URL} and C{REDIS_URL}
    override the file.  Absent: embedded mode, everything from the YAML
    file.  C{events} names where the event sink writes: C{("redis",)},
    C{("kafka",)} or both.
    """

    postgres_dsn: str | None = None
    pool_size: int = 4
    resync_interval: float = 30.0  # full re-read of live backends (source: postgres)
    heartbeat_retention: float = 7 * 86400.0  # heartbeats older than this are deleted, hourly
    redis_url: str | None = None
    auth_cache_ttl: float = 300.0
    kafka: KafkaConfig | None = None
    events: tuple[str, ...] = ("redis",)


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
    cluster: Any = None  # rproxy.config.cluster.ClusterConfig
    telemetry: Any = None  # rproxy.config.telemetry.TelemetryConfig

    def backend(self, name: str) -> BackendConfig:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)
