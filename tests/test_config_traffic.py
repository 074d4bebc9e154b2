"""
Tests for L{rproxy.config.limits}: rate_limit, circuit_breaker and
slow_start, and their errors by key path.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, parse_config
from rproxy.config.limits import CircuitBreakerConfig, parse_rate


def document(limit: Any = None, route_limit: Any = None, backend: dict[str, Any] | None = None,
             protocol: str = "http") -> dict[str, Any]:
    front: dict[str, Any] = {"name": "web", "listen": "tcp:8080", "backend": "web", "protocol": protocol}
    if limit is not None:
        front["rate_limit"] = limit
    if route_limit is not None:
        front["routes"] = [{"path_prefix": "/api", "backend": "web", "rate_limit": route_limit}]
    return {"backends": [{"name": "web", "servers": ["127.0.0.1:9001"], **(backend or {})}], "frontends": [front]}


class RateLimitConfigTests(SynchronousTestCase):
    def errors(self, data: Any) -> list[str]:
        return self.assertRaises(ConfigError, parse_config, data).errors

    def test_parse_rate(self) -> None:
        self.assertEqual(parse_rate("100/s"), (100, 1.0))
        self.assertEqual(parse_rate("10/m"), (10, 60.0))
        self.assertEqual(parse_rate("5/2s"), (5, 2.0))
        self.assertEqual(parse_rate(" 7 / 250ms "), (7, 0.25))
        for bad in ("100/x", "100", "/s", "0/s", "1/0s", 100, None, "-1/s"):
            self.assertRaises(ValueError, parse_rate, bad)

    def test_frontend_and_route(self) -> None:
        config = parse_config(document({"key": "ip", "rate": "100/s", "burst": 200},
                                       [{"key": "api_key", "rate": "10/m"}, {"key": "header:X-User",
                                                                            "concurrent": 3}]))
        [limit] = config.frontends[0].rate_limits
        self.assertEqual((limit.name, limit.key, limit.count, limit.period, limit.burst), ("ip", "ip", 100, 1.0, 200))
        self.assertAlmostEqual(limit.interval, 0.01)
        by_key, by_header = config.frontends[0].routes[0].rate_limits
        self.assertEqual((by_key.key, by_key.burst), ("api_key", 10))  # burst defaults to the count
        self.assertEqual((by_header.key, by_header.count, by_header.concurrent), ("header:x-user", 0, 3))

    def test_invalid_rate(self) -> None:
        errors = self.errors(document({"key": "ip", "rate": "100/x"}))
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("frontends[0].rate_limit.rate: '100/x' is not a rate"), errors)

    def test_negative_burst(self) -> None:
        errors = self.errors(document({"key": "ip", "rate": "100/s", "burst": -1}))
        self.assertEqual([e.split(":")[0] for e in errors], ["frontends[0].rate_limit.burst"])

    def test_unknown_key(self) -> None:
        errors = self.errors(document(None, [{"key": "ip", "rate": "1/s", "brust": 3}]))
        self.assertEqual(errors, ["frontends[0].routes[0].rate_limit[0].brust: unknown key (did you mean 'burst'?)"])

    def test_bad_limit_key_and_missing_rate(self) -> None:
        errors = self.errors(document([{"key": "cookie", "rate": "1/s"}, {"key": "ip"}]))
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("frontends[0].rate_limit[0].key: 'cookie' is not a limit key", errors[0])
        self.assertIn("frontends[0].rate_limit[1]: give a rate", errors[1])

    def test_duplicate_names(self) -> None:
        errors = self.errors(document([{"key": "ip", "rate": "1/s"}, {"key": "ip", "rate": "10/m"}]))
        self.assertEqual(len(errors), 1)
        self.assertIn("frontends[0].rate_limit[1].name", errors[0])

    def test_tcp_frontend(self) -> None:
        errors = self.errors(document({"key": "ip", "rate": "1/s"}, protocol="tcp"))
        self.assertEqual(errors, ["frontends[0].rate_limit: rate limits need protocol: http"])


class BackendLimitConfigTests(SynchronousTestCase):
    def test_circuit_breaker_and_slow_start(self) -> None:
        config = parse_config(document(backend={"circuit_breaker": {"max_pending": 10, "max_retries": 3},
                                                "slow_start": "30s"}))
        backend = config.backends[0]
        self.assertEqual(backend.circuit_breaker, CircuitBreakerConfig(max_pending=10, max_retries=3))
        self.assertEqual(backend.slow_start, 30.0)
        self.assertIsNone(parse_config(document()).backends[0].circuit_breaker)

    def test_errors(self) -> None:
        errors = self.assertRaises(ConfigError, parse_config, document(
            backend={"circuit_breaker": {"max_pending": -1, "max_conections": 3}, "slow_start": "soon"})).errors
        self.assertEqual(sorted(e.split(":")[0] for e in errors), [
            "backends[0].circuit_breaker.max_conections", "backends[0].circuit_breaker.max_pending",
            "backends[0].slow_start"])
