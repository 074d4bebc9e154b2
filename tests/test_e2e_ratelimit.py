"""
End-to-end tests of rate limits and circuit breakers on an HTTP frontend:
the curl program against rproxy against a twisted.web backend, on
loopback.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from rproxy.http.filters.ratelimit import limits_of
from tests.support import ServiceMixin, async_test, backends_config, connect, reactor, wait_for
from tests.test_e2e_http import HTTPHelpers

CURL = "/usr/bin/curl"


async def curl(test: TestCase, *args: str) -> tuple[int, str]:
    """
    Run curl (no proxy from the environment); its exit status and output.
    """
    home = os.path.abspath(test.mktemp())
    os.makedirs(home)
    out, err, code = await getProcessOutputAndValue(
        CURL, ("--noproxy", "*", "--max-time", "20", "-sS", *args),
        env={"HOME": home, "PATH": "/usr/bin:/bin"}, reactor=reactor,
    )
    return code, out.decode("utf-8", "replace") + err.decode("utf-8", "replace")


def heads(out: str) -> list[tuple[int, dict[str, str]]]:
    """
    The response heads curl -D - printed: (status, fields in lower case).
    """
    result: list[tuple[int, dict[str, str]]] = []
    fields: dict[str, str] | None = None
    for line in out.replace("\r\n", "\n").split("\n"):
        if line.startswith("HTTP/"):
            fields = {}
            result.append((int(line.split()[1]), fields))
        elif not line:
            fields = None
        elif fields is not None:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return result


class RateLimitTests(HTTPHelpers, TestCase):
    @async_test
    async def test_429_with_headers_curl(self) -> None:
        """
        Over an IP limit: 429 with Retry-After and the draft's RateLimit
        fields, on the same kept-alive connection; allowed responses carry
        RateLimit too, remaining counting down.  Counted in the metrics.
        """
        service = await self.start(rate_limit={"key": "ip", "rate": "2/m", "headers": True})
        url = f"http://127.0.0.1:{self.port}/echo"
        code, out = await curl(self, "-D", "-", "-w", "connects=%{num_connects}\\n",
                               *[arg for _ in range(3) for arg in ("-o", "/dev/null", url)])
        self.assertEqual(code, 0, out)
        responses = heads(out)
        self.assertEqual([status for status, _ in responses], [200, 200, 429], out)
        (_, first), (_, second), (_, refused) = responses
        self.assertEqual(first["ratelimit-policy"], '"ip";q=2;w=60')
        self.assertEqual(first["ratelimit"], '"ip";r=1;t=30')
        self.assertEqual(second["ratelimit"], '"ip";r=0;t=60')
        self.assertEqual(refused["retry-after"], "30")
        self.assertEqual(refused["ratelimit-policy"], '"ip";q=2;w=60')
        self.assertEqual(refused["ratelimit"], '"ip";r=0;t=60')
        self.assertEqual(out.count("connects=1") + out.count("connects=0"), 3)
        self.assertEqual(out.count("connects=1"), 1, out)  # one connection for the three
        self.assertEqual(len(self.backends[0][0].requests), 2)
        [limit] = limits_of(service.frontends["web"])
        self.assertEqual((limit.allowed, limit.limited), (2, 1))
        metrics = generate_latest(service.registry).decode()
        self.assertIn('rproxy_rate_limit_requests_total{frontend="web",limit="ip",result="limited",'
                      'scope="frontend"} 1.0', metrics)

    @async_test
    async def test_api_key_buckets(self) -> None:
        """
        Keyed by the Bearer token: each key its own bucket; a request
        without one is limited by its address.
        """
        await self.start(rate_limit={"key": "api_key", "rate": "1/m"})
        url = f"http://127.0.0.1:{self.port}/echo"
        statuses = []
        for auth in ("Bearer one", "Bearer two", "Bearer one", None, None):
            args = ["-o", "/dev/null", "-w", "%{http_code}\\n", url]
            if auth:
                args[:0] = ["-H", f"Authorization: {auth}"]
            code, out = await curl(self, *args)
            statuses.append(out.strip())
        self.assertEqual(statuses, ["200", "200", "429", "200", "429"])

    @async_test
    async def test_route_limit_and_concurrency(self) -> None:
        """
        A route's concurrent limit: a request in flight holds its key's
        slot; the next is refused 429; the slot comes back when the client
        goes away (closed phase) and when a response ends (log phase).
        Other routes are not limited.
        """
        await self.start(routes=[{"path_prefix": "/slow", "backend": "web",
                                  "rate_limit": {"key": "header:X-User", "concurrent": 1}},
                                 {"path_prefix": "/", "backend": "web"}])
        first = await connect(self.port)
        self.client_cleanup(first)
        first.transport.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-User: u1\r\n\r\n")
        resource = self.backends[0][0]
        await wait_for(lambda: len(resource.pending) == 1)
        second, data = await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-User: u1\r\n\r\n",
                                          until=b"\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 429 "), data)
        self.assertIn(b"\r\nRetry-After: 1\r\n", data)
        await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-User: u2\r\n\r\n", until=b"")
        await wait_for(lambda: len(resource.pending) == 2)
        free, data = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-User: u1\r\n\r\n", until=b"}")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        # the client goes away: its slot is given back
        first.transport.abortConnection()
        await first.closed
        third, data = await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-User: u1\r\n\r\n", until=b"")
        await wait_for(lambda: len(resource.pending) == 3)
        # the response ends: the slot is given back too
        resource.pending[2].write(b"done")
        resource.pending[2].finish()
        await third.read_until(b"done")
        _, data = await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-User: u1\r\n\r\n", until=b"")
        await wait_for(lambda: len(resource.pending) == 4)


class CircuitBreakerTests(HTTPHelpers, TestCase):
    async def start_breaker(self, breaker: dict[str, Any], **server: Any) -> Any:
        service = await self.start()
        config = service.config
        data: dict[str, Any] = {
            "backends": [{"name": "web", "servers": [dict({"address": f"127.0.0.1:{s.config.port}", "name": s.name},
                                                          **server)
                                                     for s in service.pools["web"].servers],
                          "health_check": {"type": "none"}, "circuit_breaker": breaker}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        }
        del config
        self.service = service = await self.start_service(data)
        self.port = service.port_of("web")
        return service

    @async_test
    async def test_max_requests(self) -> None:
        """
        max_requests in flight to the backend, then 503 at once naming the
        threshold, and the metric; an ended request makes room.
        """
        service = await self.start_breaker({"max_requests": 1})
        resource = self.backends[0][0]
        first, _ = await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", until=b"")
        await wait_for(lambda: len(resource.pending) == 1)
        _, data = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertIn(b"circuit breaker: max_requests 1 reached", data)
        self.assertIn(b"\r\nRetry-After: 1\r\n", data)
        self.assertEqual(len(resource.requests), 1)
        metrics = generate_latest(service.registry).decode()
        self.assertIn('rproxy_circuit_breaker_open_total{backend="web",threshold="max_requests"} 1.0', metrics)
        resource.pending[0].write(b"done")
        resource.pending[0].finish()
        await first.read_until(b"done")
        _, data = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", until=b"}")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual(service.pools["web"].breaker.requests, 0)

    @async_test
    async def test_max_pending(self) -> None:
        """
        With the server full, max_pending requests wait; the next gets 503
        at once.
        """
        await self.start_breaker({"max_pending": 1}, max_connections=1)
        resource = self.backends[0][0]
        await self.request(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", until=b"")
        await wait_for(lambda: len(resource.pending) == 1)
        await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", until=b"")
        await wait_for(lambda: self.service.pools["web"].waiting == 1)
        _, data = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 503 "), data)
        self.assertIn(b"circuit breaker: max_pending 1 reached", data)


class TCPCircuitBreakerTests(ServiceMixin, TestCase):
    timeout = 30

    @async_test
    async def test_max_connections_closes_at_once(self) -> None:
        """
        A TCP frontend over a backend at max_connections closes the next
        client at once, without a byte from a server; counted by threshold.
        """
        factory, port = await self.backend("s0")
        service = await self.start_service(backends_config(port.getHost().port,
                                                           circuit_breaker={"max_connections": 1}))
        first = await connect(service.port_of("web"))
        self.client_cleanup(first)
        await first.read_until(b"s0\n")
        second = await connect(service.port_of("web"))
        self.client_cleanup(second)
        await second.closed
        self.assertEqual(bytes(second.data), b"")
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual(service.pools["web"].breaker.opened["max_connections"], 1)
        first.transport.write(b"still here")
        await first.read_until(b"still here")
