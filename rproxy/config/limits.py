"""
Section readers for traffic limits: C{rate_limit:} on HTTP frontends and
routes, C{circuit_breaker:} and C{slow_start:} on backends.

  - C{rate_limit: {key: ip|api_key|header:NAME, rate: 100/s, burst: 200,
    concurrent: 10}}, or a list of such mappings (every one applies).
    C{rate} and C{concurrent} may each be left out, not both.
  - C{circuit_breaker: {max_connections, max_pending, max_requests,
    max_retries}} (Envoy's thresholds; a threshold left out has no limit).
  - C{slow_start: 30s}.
"""

from __future__ import annotations

import re

import attrs

from rproxy.config import values as v
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief

__all__ = ["RateLimitConfig", "CircuitBreakerConfig", "parse_rate", "read_rate_limits", "read_circuit_breaker",
           "read_slow_start"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$")
_KEYS = ("ip", "api_key")


@attrs.frozen
class RateLimitConfig:
    """
    One limit of a frontend or route.

    @ivar name: what the limit is called in metrics, in the C{RateLimit}
        headers and in its Redis keys (default: its key, e.g. C{ip}).
    @ivar key: C{ip}, C{api_key} (the Bearer token, hashed) or
        C{header:NAME}.
    @ivar count: requests allowed per C{period} seconds (0: no rate).
    @ivar burst: requests allowed at once (the bucket's size).
    @ivar concurrent: requests in flight per key (0: no limit).
    @ivar headers: send the C{RateLimit} headers on allowed responses too
        (off by default: 15% more instructions per request in
        bench/policy.sh; refusals always carry them).
    @ivar max_keys: keys remembered in this process (least recently used
        evicted first).
    @ivar shared: with C{stores.redis}, the counts live in Redis (shared
        by processes and nodes); otherwise in this process.
    @ivar redis_timeout: how long a request waits on Redis before the
        process's own count decides.
    """

    name: str
    key: str
    count: int = 0
    period: float = 1.0
    burst: int = 0
    concurrent: int = 0
    headers: bool = False
    max_keys: int = 100_000
    shared: bool = True
    redis_timeout: float = 0.05

    @property
    def interval(self) -> float:
        """
        Seconds per request.
        """
        return self.period / self.count


@attrs.frozen
class CircuitBreakerConfig:
    """
    Envoy's thresholds for one backend; 0: no limit.

    @ivar max_connections: connections (HTTP: requests being served) to
        the backend's servers at once.
    @ivar max_pending: requests or connections waiting for a server slot.
    @ivar max_requests: HTTP requests routed to the backend and not yet
        over (waiting, connecting or being answered).
    @ivar max_retries: retries in flight to the backend.
    """

    max_connections: int = 0
    max_pending: int = 0
    max_requests: int = 0
    max_retries: int = 0


def parse_rate(value: object) -> tuple[int, float]:
    """
    C{100/s}, C{10/m}, C{5/2s}, C{1000/h} -> (count, period in seconds).
    """
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{brief(value)} is not a rate (COUNT/UNIT: 100/s, 10/m, 5/2s; units ms, s, m, h, d)")
    count = int(match.group(1))
    period = float(match.group(2) or 1) * _UNITS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"{brief(value)}: the count and the period must be greater than zero")
    return count, period


def _limit_key(value: object) -> str:
    text = v.text(value)
    if text in _KEYS:
        return text
    if text.startswith("header:") and v.is_token(text[len("header:"):]):
        return "header:" + text[len("header:"):].lower()
    raise ValueError(f"{brief(value)} is not a limit key (ip, api_key or header:NAME)")


def _limit_name(value: object) -> str:
    text = v.text(value)
    if not text or not text.isascii() or any(c in text for c in '"\\') or not text.isprintable():
        raise ValueError(f"{brief(value)} is not a limit name (printable ASCII, no quotes)")
    return text


def read_rate_limits(section: Section, protocol: str = "http") -> tuple[RateLimitConfig, ...]:
    """
    The C{rate_limit:} key of a frontend or route section: a mapping or a
    list of them.  Errors name the key path; a limit in error is left out.
    """
    raw = section.raw("rate_limit")
    if raw is MISSING or raw is None:
        return ()
    if protocol != "http":
        section.error("rate_limit", "rate limits need protocol: http")
        return ()
    if isinstance(raw, list):
        items = section.items("rate_limit")
    else:
        items = [(section.key_path("rate_limit"), raw)]
    limits = []
    names: set[str] = set()
    for path, item in items:
        limit = _read_limit(section.child(item, path))
        if limit is None:
            continue
        if limit.name in names:
            section.errors.append(f"{path}.name: another limit here is called {limit.name!r}: name one of them")
            continue
        names.add(limit.name)
        limits.append(limit)
    return tuple(limits)


def _read_limit(section: Section) -> RateLimitConfig | None:
    if not section.ok:
        return None
    errors = len(section.errors)
    key = section.value("key", _limit_key)
    rate = section.value("rate", parse_rate, None)
    count, period = rate if rate is not None else (0, 1.0)
    burst = section.value("burst", v.int_in(1), count)
    concurrent = section.value("concurrent", v.int_in(1), 0)
    if rate is None and not concurrent and not section.has("rate") and not section.has("concurrent"):
        section.errors.append(f"{section.path}: give a rate (rate: 100/s), a concurrent limit (concurrent: 10), "
                              "or both")
    if section.has("burst") and rate is None and not section.has("rate"):
        section.error("burst", "a burst needs a rate")
    limit = RateLimitConfig(
        name=section.value("name", _limit_name, key or ""),
        key=key or "",
        count=count,
        period=period,
        burst=burst or 0,
        concurrent=concurrent or 0,
        headers=section.value("headers", v.boolean, False),
        max_keys=section.value("max_keys", v.int_in(1, 10_000_000), 100_000),
        shared=section.value("shared", v.boolean, True),
        redis_timeout=section.value("redis_timeout", v.positive_duration, 0.05),
    )
    section.finish()
    return limit if len(section.errors) == errors else None


def read_circuit_breaker(section: Section) -> CircuitBreakerConfig | None:
    """
    The C{circuit_breaker:} key of a backend section, or None.
    """
    raw = section.raw("circuit_breaker")
    if raw is MISSING or raw is None or raw is False:
        return None
    breaker = section.section("circuit_breaker")
    if not breaker.ok:
        return None
    config = CircuitBreakerConfig(**{
        name: breaker.value(name, v.int_in(0), 0)
        for name in ("max_connections", "max_pending", "max_requests", "max_retries")
    })
    breaker.finish()
    return config


def read_slow_start(section: Section) -> float:
    """
    The C{slow_start:} key of a backend section: seconds (0: none).
    """
    return section.value("slow_start", v.duration, 0.0)  # type: ignore[no-any-return]
