"""
Tests for L{rproxy.http.filters.ratelimit} on fake exchanges and a
task.Clock: the inline and general paths agree, Redis's decision wins when
it answers, the process's buckets decide when it fails or is known down.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config.limits import RateLimitConfig
from rproxy.http.exchange import Exchange
from rproxy.http.filters.ratelimit import RateLimitFilter, limits_of
from rproxy.http.headers import error_response
from rproxy.http.routes import RouteTable
from rproxy.ratelimit import Decision
from rproxy.tunnel.httpmode import openai_error


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


class FakeClient:
    def __init__(self, ip: bytes = b"192.0.2.7") -> None:
        self.peer_ip = ip
        self.peer_host = ip.decode()
        self.transport = FakeTransport()
        self.closing_after_response = False


class FakeHead:
    def __init__(self, headers: dict[bytes, bytes] | None = None) -> None:
        self.headers = headers or {}
        self.host = b"example.com"
        self.target = b"/"
        self.method = b"GET"
        self.has_body = False
        self.keep_alive = True
        self.upgrade = False
        self.version = (1, 1)

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


class FakeExchange:
    def __init__(self, client: FakeClient | None = None, headers: dict[bytes, bytes] | None = None) -> None:
        self.client = client or FakeClient()
        self.client_host = self.client.peer_host
        self.head = FakeHead(headers)
        self.notes: dict[str, Any] | None = None
        self.status = 0
        self.completed = False

    def complete(self) -> None:
        self.completed = True

    def answer_closes(self) -> bool:
        return Exchange.answer_closes(self)  # type: ignore[arg-type]


class ClientHostTests(SynchronousTestCase):
    def test_ip_key_is_the_address_policies_see(self) -> None:
        """Behind a trusted proxy the IP key is the client it names, not the proxy."""
        from rproxy.http.filters.ratelimit import _ip

        direct = FakeExchange()
        self.assertIs(_ip(direct), direct.client.peer_ip)
        proxied = FakeExchange()
        proxied.client_host = "198.51.100.9"
        self.assertEqual(_ip(proxied), b"198.51.100.9")


class FakeFrontendConfig:
    def __init__(self, limits: tuple[RateLimitConfig, ...]) -> None:
        self.rate_limits = limits
        self.routes = ()


class FakeFrontend:
    name = "fe"

    def __init__(self, clock: Clock, *limits: RateLimitConfig, errors: Any = error_response) -> None:
        self.clock = clock
        self.error_response = errors
        self.config = FakeFrontendConfig(limits)
        self.routes = RouteTable((), "be")


class FakeShared:
    """
    A SharedBuckets whose answers the test gives.
    """

    def __init__(self) -> None:
        self.up = True
        self.calls: list[tuple[bytes, defer.Deferred[Decision]]] = []

    def usable(self) -> bool:
        return self.up

    def check(self, key: bytes, interval: float, tolerance: float, timeout: float) -> defer.Deferred[Decision]:
        d: defer.Deferred[Decision] = defer.Deferred()
        self.calls.append((key, d))
        return d


def limit(**kw: Any) -> RateLimitConfig:
    kw.setdefault("name", "ip")
    kw.setdefault("key", "ip")
    kw.setdefault("burst", kw.get("count", 0))
    return RateLimitConfig(**kw)


class LocalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def run_requests(self, f: RateLimitFilter, n: int, **kw: Any) -> list[int]:
        statuses = []
        for _ in range(n):
            exchange = FakeExchange(**kw)
            self.assertIsNone(f.request(exchange))
            statuses.append(exchange.status)
        return statuses

    def test_inline_path(self) -> None:
        """
        One local limit is decided inline: burst, then 429 with the
        headers, and again after an interval.
        """
        frontend = FakeFrontend(self.clock, limit(count=2, period=10.0, burst=2, shared=False))
        f = RateLimitFilter.make(frontend)
        self.assertIsNotNone(f.single)
        self.assertEqual(self.run_requests(f, 3), [0, 0, 429])
        exchange = FakeExchange()
        f.request(exchange)
        written = exchange.client.transport.written
        self.assertTrue(written.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), written)
        self.assertIn(b"\r\nRetry-After: 5\r\n", written)
        self.assertIn(b'\r\nRateLimit-Policy: "ip";q=2;w=10\r\n', written)
        self.assertIn(b'\r\nRateLimit: "ip";r=0;t=10\r\n', written)
        head, _, body = written.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: %d\r\n" % len(body), head + b"\r\n")
        self.assertEqual(json.loads(body), {"error": "rate limit 'ip' exceeded: retry after 5 s"})
        self.assertNotIn(b"Connection: close", head)
        self.clock.advance(5)
        self.assertEqual(self.run_requests(f, 2), [0, 429])
        [counted] = limits_of(frontend)
        self.assertEqual((counted.allowed, counted.limited), (3, 3))

    def test_refusal_has_the_frontends_error_body(self) -> None:
        """
        A 429 has the body of the frontend's other errors, its fields and
        headers kept: OpenAI's shape on a tunnel's mode http port (the
        OpenAI SDKs show its message and code), rproxy's JSON elsewhere;
        the connection stays open, and a HEAD's 429 has no body.
        """
        frontend = FakeFrontend(self.clock, limit(count=1, period=10.0, shared=False), errors=openai_error)
        f = RateLimitFilter.make(frontend)
        statuses = self.run_requests(f, 2)
        exchange = FakeExchange()
        f.request(exchange)
        head, _, body = exchange.client.transport.written.partition(b"\r\n\r\n")
        self.assertEqual((statuses, exchange.status, exchange.completed), ([0, 429], 429, True))
        self.assertEqual(json.loads(body), {"error": {"message": "rate limit 'ip' exceeded: retry after 10 s",
                                                      "type": "requests", "code": "rate_limit_exceeded"}})
        fields = head.split(b"\r\n")
        for field in (b"Retry-After: 10", b'RateLimit: "ip";r=0;t=10', b"Content-Type: application/json",
                      b"Content-Length: %d" % len(body)):
            self.assertIn(field, fields)
        self.assertNotIn(b"Connection: close", fields)
        exchange = FakeExchange()
        exchange.head.method = b"HEAD"
        f.request(exchange)
        written = exchange.client.transport.written
        self.assertEqual((exchange.status, written[-4:]), (429, b"\r\n\r\n"))
        self.assertIn(b"\r\nContent-Length: %d\r\n" % len(body), written)

    def test_concurrency_refusal_names_the_limit(self) -> None:
        """Over a concurrent limit the 429's message says so."""
        f = RateLimitFilter.make(FakeFrontend(self.clock, limit(name="inflight", concurrent=1, shared=False)))
        held, refused = FakeExchange(), FakeExchange()
        f.request(held)
        f.request(refused)
        body = refused.client.transport.written.partition(b"\r\n\r\n")[2]
        self.assertEqual((held.status, refused.status), (0, 429))
        self.assertEqual(json.loads(body), {"error": "too many requests in flight (limit 'inflight')"})

    def test_general_path_agrees(self) -> None:
        """
        Two limits (the general path) give the same answers as one, the
        tighter one refusing.
        """
        f = RateLimitFilter.make(FakeFrontend(self.clock, limit(count=2, period=10.0, burst=2, shared=False),
                                              limit(name="wide", count=100, period=1.0, shared=False)))
        self.assertIsNone(f.single)
        self.assertEqual(self.run_requests(f, 3), [0, 0, 429])
        self.clock.advance(5)
        self.assertEqual(self.run_requests(f, 2), [0, 429])

    def test_headers_on_allowed(self) -> None:
        f = RateLimitFilter.make(FakeFrontend(self.clock, limit(count=2, period=10.0, burst=2, headers=True,
                                                                shared=False)))
        exchange = FakeExchange()
        f.request(exchange)
        extra: list[tuple[bytes, bytes]] = []
        f.response(exchange, extra)
        self.assertEqual(extra, [(b"RateLimit-Policy", b'"ip";q=2;w=10'), (b"RateLimit", b'"ip";r=1;t=5')])

    def test_no_response_phase_without_headers(self) -> None:
        f = RateLimitFilter.make(FakeFrontend(self.clock, limit(count=2, shared=False)))
        self.assertIs(type(f), RateLimitFilter)  # the engine calls no response, log or closed phase

    def test_keys(self) -> None:
        """
        api_key: the Bearer token's hash, never the token; none: the address.
        """
        f = RateLimitFilter.make(FakeFrontend(self.clock, limit(key="api_key", count=1, period=60.0, shared=False)))
        one = {b"authorization": b"Bearer secret-one"}
        self.assertEqual(self.run_requests(f, 2, headers=one), [0, 429])
        self.assertEqual(self.run_requests(f, 1, headers={b"authorization": b"Bearer secret-two"}), [0])
        self.assertEqual(self.run_requests(f, 2), [0, 429])
        keys = list(f.limits[0].buckets.tats)  # type: ignore[union-attr]
        self.assertEqual(len(keys), 3)
        self.assertFalse(any(b"secret" in key for key in keys))


class SharedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.shared = FakeShared()
        self.filter = RateLimitFilter.make(FakeFrontend(self.clock, limit(count=1, period=10.0)), self.shared)

    def test_redis_decides(self) -> None:
        """
        Redis's answer wins over the local bucket (which has room).
        """
        exchange = FakeExchange()
        waiting = self.filter.request(exchange)
        self.assertIsInstance(waiting, defer.Deferred)
        [(key, d)] = self.shared.calls
        self.assertEqual(key, b"rproxy:ratelimit:fe:frontend:ip:192.0.2.7")
        d.callback(Decision(False, 0, 3.2, 9.0))
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(exchange.status, 429)
        self.assertIn(b"\r\nRetry-After: 4\r\n", exchange.client.transport.written)

    def test_failure_falls_back(self) -> None:
        """
        Redis fails or times out: the process's bucket decides, counted.
        """
        statuses = []
        for _ in range(2):
            exchange = FakeExchange()
            waiting = self.filter.request(exchange)
            self.shared.calls[-1][1].errback(defer.TimeoutError())
            self.successResultOf(waiting)
            statuses.append(exchange.status)
        self.assertEqual(statuses, [0, 429])
        self.assertEqual(self.filter.limits[0].fallbacks, 2)

    def test_known_down_decides_at_once(self) -> None:
        self.shared.up = False
        exchange = FakeExchange()
        self.assertIsNone(self.filter.request(exchange))
        self.assertEqual((exchange.status, self.shared.calls), (0, []))
        self.assertEqual(self.filter.limits[0].fallbacks, 1)

    def test_cancelled_wait(self) -> None:
        """
        The exchange ends while Redis is asked (the engine cancels the
        wait): nothing is answered.
        """
        exchange = FakeExchange()
        waiting = self.filter.request(exchange)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual((exchange.status, exchange.client.transport.written), (0, b""))
        self.assertEqual(self.filter.limits[0].fallbacks, 0)
