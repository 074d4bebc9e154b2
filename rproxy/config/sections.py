"""
Section readers for the global, admin, backends and stores sections.

Each reader takes a L{Section} (a mapping at a key path), converts every
key it knows, records a key-path error for each bad one and for each key
it does not know, and returns part of the frozen model.
"""

from __future__ import annotations

import re

import attrs

from rproxy.config import values as v
from rproxy.config.endpoints import listen
from rproxy.config.l4 import read_send_proxy
from rproxy.config.limits import read_circuit_breaker, read_slow_start
from rproxy.config.model import (
    ALGORITHMS,
    HEALTH_TYPES,
    AdminConfig,
    BackendConfig,
    GlobalConfig,
    HealthCheckConfig,
    KafkaConfig,
    PassiveConfig,
    ServerConfig,
    StoresConfig,
    UpstreamTLSConfig,
)
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief, parse_hostport

__all__ = ["read_global", "read_admin", "read_backend", "read_upstream_tls", "read_stores", "read_kafka", "header_pairs"]


def header_pairs(section: Section) -> tuple[tuple[str, str], ...]:
    """
    A mapping of HTTP header names to single-line values.
    """
    pairs = []
    for key, value in section.data.items():
        section.used.add(key)
        if not v.is_token(key):
            section.errors.append(f"{section.path}: invalid header name {brief(key)}")
        elif not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            section.error(key, "header value must be a single-line string")
        else:
            pairs.append((key, str(value)))
    return tuple(pairs)


def read_global(section: Section) -> GlobalConfig:
    d = GlobalConfig()
    result = GlobalConfig(
        workers=section.value("workers", v.workers, d.workers),
        max_connections=section.value("max_connections", v.int_in(1), d.max_connections),
        backlog=section.value("backlog", v.int_in(1, 65535), d.backlog),
        connect_timeout=section.value("connect_timeout", v.positive_duration, d.connect_timeout),
        idle_timeout=section.value("idle_timeout", v.duration, d.idle_timeout),
        grace_period=section.value("grace_period", v.duration, d.grace_period),
    )
    section.finish()
    return result


def read_admin(section: Section) -> AdminConfig:
    d = AdminConfig()
    admin_listen = section.nullable("listen", listen, d.listen)
    # api_key: null (or absent) opens /api/v1, as etc/rproxy.yaml says
    api_key = section.raw("api_key")
    result = AdminConfig(
        listen=admin_listen,
        api_key=None if api_key is None or api_key is MISSING else section.value("api_key", v.text, None),
    )
    section.finish()
    return result


def _read_server(parent: Section, path: str, raw: object) -> ServerConfig | None:
    if isinstance(raw, str):
        raw = {"address": raw}
    section = parent.child(raw, path)
    if not section.ok:
        return None
    address = section.value("address", v.text)
    host, port = "", 0
    if address is not None:
        try:
            host, port = parse_hostport(address)
        except ValueError as e:
            section.error("address", str(e))
            address = None
    server = ServerConfig(
        name=section.value("name", v.name, address or ""),
        address=address or "",
        host=host,
        port=port,
        weight=section.value("weight", v.int_in(0, 1000), 1),
        backup=section.value("backup", v.boolean, False),
        max_connections=section.value("max_connections", v.int_in(0), 0),
    )
    section.finish()
    return server if address else None


def _read_health(section: Section) -> HealthCheckConfig:
    d = HealthCheckConfig()
    headers = header_pairs(section.section("headers"))
    result = HealthCheckConfig(
        type=section.value("type", v.choice(HEALTH_TYPES), d.type),
        path=section.value("path", v.url_path, d.path),
        expect_status=section.value("expect_status", v.int_in(100, 599), d.expect_status),
        interval=section.value("interval", v.positive_duration, d.interval),
        timeout=section.value("timeout", v.positive_duration, d.timeout),
        rise=section.value("rise", v.int_in(1, 100), d.rise),
        fall=section.value("fall", v.int_in(1, 100), d.fall),
        headers=headers,
        host=section.value("host", v.text, None),
        jitter=section.value("jitter", v.fraction, d.jitter),
    )
    section.finish()
    return result


def _ejection(value: object) -> float:
    """
    C{passive.ejection}: a cooldown of zero ejected nobody (while logging
    that it did); C{consecutive_failures: 0} is the way to turn it off.
    """
    try:
        return v.positive_duration(value)
    except ValueError as e:
        raise ValueError(f"{e} (consecutive_failures: 0 turns passive ejection off)") from None


def _read_passive(section: Section) -> PassiveConfig:
    d = PassiveConfig()
    result = PassiveConfig(
        consecutive_failures=section.value("consecutive_failures", v.int_in(0), d.consecutive_failures),
        ejection=section.value("ejection", _ejection, d.ejection),
        max_ejection=section.value("max_ejection", v.duration, d.max_ejection),
        max_ejection_percent=section.value("max_ejection_percent", v.int_in(0, 100), d.max_ejection_percent),
    )
    section.finish()
    return result


def read_backend(parent: Section, path: str, raw: object) -> BackendConfig | None:
    section = parent.child(raw, path)
    if not section.ok:
        return None
    name = section.value("name", v.name)
    servers = []
    seen: set[str] = set()
    for server_path, server_raw in section.items("servers"):
        server = _read_server(section, server_path, server_raw)
        if server is None:
            continue
        if server.name in seen:
            section.errors.append(f"{server_path}: duplicate server name {brief(server.name)}")
            continue
        seen.add(server.name)
        servers.append(server)
    source = section.value("source", v.choice(("static", "postgres")), "static")
    if source == "static" and not section.has("servers"):
        section.error("servers", "required")
    health_raw = section.raw("health_check")
    if health_raw in ("none", False):
        health = HealthCheckConfig(type="none")
    else:
        health = _read_health(
            section.child(None if health_raw is MISSING else health_raw, section.key_path("health_check"))
        )
    algorithm = section.value("algorithm", v.choice(ALGORITHMS), "round-robin")
    hash_key = section.value("hash_key", v.hash_key, "source_ip")
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
        queue_size=section.value("queue_size", v.int_in(0), 1024),
        queue_timeout=section.value("queue_timeout", v.duration, 5.0),
        tls=read_upstream_tls(section),
        send_proxy=read_send_proxy(section),
        circuit_breaker=read_circuit_breaker(section),
        slow_start=read_slow_start(section),
    )
    if backend.tls is not None and backend.health_check.type == "http":
        backend = attrs.evolve(backend, health_check=attrs.evolve(backend.health_check, tls=backend.tls))
    section.finish()
    return backend if name else None


def read_upstream_tls(section: Section) -> UpstreamTLSConfig | None:
    raw = section.raw("tls")
    if raw is MISSING or raw is None or raw is False:
        return None
    if raw is True:
        return UpstreamTLSConfig()
    tls = section.child(raw, section.key_path("tls"))
    config = UpstreamTLSConfig(
        ca=tls.file("ca"),
        server_name=tls.value("server_name", v.text, None),
        verify=tls.value("verify", v.boolean, True),
    )
    tls.finish()
    return config


def read_stores(top: Section) -> StoresConfig | None:
    raw = top.raw("stores")
    env_dsn, env_redis = top.sources.environ.get("DATABASE_URL"), top.sources.environ.get("REDIS_URL")
    if (raw is MISSING or raw is None) and not (env_dsn or env_redis):
        return None
    section = top.child(None if raw is MISSING else raw, "stores")
    postgres = section.section("postgres")
    dsn = postgres.value("dsn", v.text, None)
    pool_size = postgres.value("pool_size", v.int_in(1, 100), 4)
    resync = postgres.value("resync_interval", v.positive_duration, 30.0)
    retention = postgres.value("heartbeat_retention", v.positive_duration, 7 * 86400.0)
    postgres.finish()
    redis = section.section("redis")
    url = redis.value("url", v.text, None)
    ttl = redis.value("auth_cache_ttl", v.duration, 300.0)
    redis.finish()
    kafka = read_kafka(section)
    events = section.value("events", v.choice(("redis", "kafka", "both")), None)
    section.finish()
    url = env_redis or url
    if url is not None and not url.startswith("redis://"):
        top.errors.append(f"stores.redis.url: {brief(url)} is not a redis://host:port/db URL")
    if events is None:
        events = "kafka" if kafka is not None else "redis"
    sinks = ("redis", "kafka") if events == "both" else (events,)
    if "kafka" in sinks and kafka is None and section.ok:
        section.error("events", f"{events} needs stores.kafka.bootstrap_servers")
    if "redis" in sinks and url is None and section.has("events"):
        section.error("events", f"{events} needs stores.redis.url (or REDIS_URL)")
    return StoresConfig(postgres_dsn=env_dsn or dsn, pool_size=pool_size, redis_url=url, auth_cache_ttl=ttl,
                        resync_interval=resync, heartbeat_retention=retention,
                        kafka=kafka, events=sinks)


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _topic(value: object) -> str:
    result = v.text(value)
    if not _TOPIC.match(result) or result in (".", ".."):
        raise ValueError(f"{brief(result)} is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
    return result


def _bootstrap(value: object) -> tuple[str, ...]:
    """
    C{host:port}, a comma-separated list of them, or a YAML list.
    """
    items = value if isinstance(value, list) else str(v.text(value)).split(",")
    servers = []
    for item in items:
        host, port = parse_hostport(v.text(item.strip() if isinstance(item, str) else item))
        servers.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not servers:
        raise ValueError("expected host:port or a list of them")
    return tuple(servers)


def read_kafka(stores: Section) -> KafkaConfig | None:
    raw = stores.raw("kafka")
    if raw is MISSING or raw is None:
        return None
    section = stores.child(raw, stores.key_path("kafka"))
    d = KafkaConfig()
    servers = section.value("bootstrap_servers", _bootstrap)
    topics = section.section("topics")
    config = KafkaConfig(
        bootstrap_servers=servers or (),
        client_id=section.value("client_id", v.name, d.client_id),
        heartbeats_topic=topics.value("heartbeats", _topic, d.heartbeats_topic),
        requests_topic=topics.value("requests", _topic, d.requests_topic),
        acks=str(section.value("acks", lambda x: v.choice(("all", "-1", "0", "1"))(str(x)), d.acks)),
        group=section.value("group", v.name, d.group),
        batch=section.value("batch", v.int_in(1, 1000), d.batch),
        buffer_limit=section.value("buffer_limit", v.int_in(1, 1_000_000), d.buffer_limit),
        delivery_timeout=section.value("delivery_timeout", v.duration, d.delivery_timeout),
        session_timeout=section.value("session_timeout", v.duration, d.session_timeout),
        compression=section.value("compression", v.choice(("none", "gzip", "snappy", "lz4", "zstd")),
                                  d.compression),
    )
    topics.finish()
    section.finish()
    if config.heartbeats_topic == config.requests_topic:
        section.error("topics", f"heartbeats and requests must be different topics (both {config.heartbeats_topic!r})")
    if not 1.0 <= config.session_timeout <= 300.0:
        section.error("session_timeout", "must be between 1s and 5m (a broker refuses others)")
    if config.delivery_timeout < 1.0:
        section.error("delivery_timeout", "must be at least 1s")
    return config if servers else None
