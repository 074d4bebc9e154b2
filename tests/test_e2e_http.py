"""
End-to-end tests of the HTTP frontend against real twisted.web backends on
loopback.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
import httptools
from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from tests.support import (
    Client,
    ServiceMixin,
    async_test,
    collector_off,
    connect,
    left_for_collector,
    listen,
    turn,
    wait_for,
)
from tests.test_http_reader import MALFORMED


class Backend(Resource):
    """
    /echo: JSON of what arrived; /big?n=: n bytes; /chunked: three chunks;
    /status/N; /slow: never answers; /nobody: 204; /close: closes after
    answering.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        body = request.content.read()
        self.requests.append({"path": path, "method": request.method.decode("latin-1"), "body": len(body)})
        request.setHeader(b"x-backend", self.name.encode())
        if path == "/big":
            try:
                n = int(request.args[b"n"][0])
            except (KeyError, ValueError):
                request.setResponseCode(400)
                return b"bad n"
            request.setHeader(b"content-length", str(n).encode())
            block = b"x" * 65536
            sent = 0
            while sent < n:
                request.write(block[: n - sent])
                sent += min(len(block), n - sent)
            return b""
        if path == "/chunked":
            for part in (b"one,", b"two,", b"three"):
                request.write(part)
            request.finish()
            return NOT_DONE_YET
        if path.startswith("/status/"):
            code = path.rsplit("/", 1)[1]
            request.setResponseCode(int(code) if code.isdigit() and 100 <= int(code) < 600 else 400)
            return b""
        if path == "/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        if path == "/nobody":
            request.setResponseCode(204)
            return b""
        if path == "/close":
            request.setHeader(b"connection", b"close")
            return b"closing"
        headers = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({
            "backend": self.name, "path": path, "method": request.method.decode("latin-1"), "headers": headers,
            "body_sha256": hashlib.sha256(body).hexdigest(), "body_length": len(body),
            "uri": request.uri.decode("latin-1"),
        }).encode()


class CountingSite(Site):
    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass


class RawRecorder(protocol.Protocol):
    """
    A backend that only records bytes (the malformed-request table).
    """

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data


class RawFactory(protocol.Factory):
    protocol = RawRecorder
    noisy = False

    def __init__(self) -> None:
        self.received = b""


class WebSocketish(protocol.Protocol):
    """
    Answers an Upgrade with 101, then echoes.
    """

    buffer = b""
    upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.factory.heads.append(head)
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
            if rest:
                self.transport.write(rest)


class HTTPHelpers(ServiceMixin):
    timeout = 60

    async def start(self, n: int = 1, http: dict[str, Any] | None = None, **frontend: Any) -> Any:
        self.backends = []
        ports = []
        for i in range(n):
            resource = Backend(f"b{i}")
            site = CountingSite(resource)
            port = await listen(site)
            self.addCleanup(port.stopListening)
            self.backends.append((resource, site))
            ports.append(port.getHost().port)
        config = {
            "backends": [{"name": "web", "servers": [{"address": f"127.0.0.1:{p}", "name": f"s{i}"}
                                                     for i, p in enumerate(ports)],
                          "health_check": {"type": "none"}}],
            "frontends": [dict({"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                                "backend": "web", "http": http or {}}, **frontend)],
        }
        self.service = await self.start_service(config)
        self.port = self.service.port_of("web")
        return self.service

    async def proxy_to(self, server_port: int) -> Any:
        """
        An HTTP frontend in front of the one server listening on C{server_port}.
        """
        self.service = await self.start_service({
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{server_port}"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        })
        self.port = self.service.port_of("web")
        return self.service

    async def request(self, raw: bytes, until: bytes | None = None) -> tuple[Client, bytes]:
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(raw)
        if until is None:
            await client.closed
            return client, bytes(client.data)
        return client, await client.read_until(until)

    async def response(self, client: Client) -> tuple[int, dict[bytes, bytes], bytes]:
        """
        Read one response (Content-Length or chunked) off a client.
        """
        head = await client.read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            await wait_for(lambda: len(client.data) >= n or client.lost)
            body = bytes(client.data[:n])
            del client.data[:n]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line = await client.read_until(b"\r\n")
                size = int(size_line.strip(), 16)
                await wait_for(lambda size=size: len(client.data) >= size + 2 or client.lost)
                body += bytes(client.data[:size])
                del client.data[: size + 2]
                if size == 0:
                    break
        else:
            body = b""
        return status, headers, body


class HTTPTests(HTTPHelpers, TestCase):
    @async_test
    async def test_keep_alive_reuses_upstream(self) -> None:
        """
        Ten requests on one client connection, then ten more on another,
        use one upstream connection: the backend counts its connections.
        """
        await self.start()
        for _ in range(2):
            client = await connect(self.port)
            self.client_cleanup(client)
            for i in range(10):
                client.transport.write(b"GET /echo?i=%d HTTP/1.1\r\nHost: example.com\r\n\r\n" % i)
                status, headers, body = await self.response(client)
                self.assertEqual((status, json.loads(body)["uri"]), (200, f"/echo?i={i}"))
            client.transport.loseConnection()
            await client.closed
        self.assertEqual(self.backends[0][1].connections, 1)
        self.assertEqual((self.service.upstreams.opened, self.service.upstreams.reused), (1, 19))

    @async_test
    async def test_closed_connections_need_no_cycle_collector(self) -> None:
        """
        A closed client connection's reader and parser, and a closed
        upstream connection's parser, are freed as soon as the connection
        ends, not left for Python's cycle collector (whose full passes
        over a large heap stall every connection for tens of ms).
        """
        from rproxy.http.reader import RequestReader

        await self.start()
        collector_off(self)
        # the server closes the first upstream connection after answering
        _, data = await self.request(b"GET /close HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.endswith(b"closing"), data)
        for _ in range(5):
            _, data = await self.request(b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertIn(b" 200 ", data)
        self.assertEqual(self.backends[0][1].connections, 2)
        await turn(delay=0.05)
        self.assertEqual(left_for_collector((RequestReader, httptools.HttpRequestParser, httptools.HttpResponseParser)), [])

    @async_test
    async def test_headers(self) -> None:
        """
        X-Forwarded-For is appended, X-Forwarded-Proto/Host set, Via added,
        Host kept, and Connection-named and hop-by-hop fields stripped.
        """
        await self.start()
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(
            b"GET /echo HTTP/1.1\r\nHost: api.example.com\r\nX-Forwarded-For: 10.1.2.3\r\n"
            b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n")
        status, headers, body = await self.response(client)
        self.assertEqual((status, headers[b"via"]), (200, b"1.1 rproxy"))
        seen = json.loads(body)["headers"]
        self.assertEqual(seen["x-forwarded-for"], "10.1.2.3, 127.0.0.1")
        self.assertEqual((seen["x-forwarded-proto"], seen["x-forwarded-host"]), ("http", "api.example.com"))
        self.assertEqual((seen["host"], seen["via"], seen["x-kept"]), ("api.example.com", "1.1 rproxy", "yes"))
        for gone in ("x-secret-hop", "keep-alive", "proxy-connection", "te"):
            self.assertNotIn(gone, seen)

    @async_test
    async def test_host_header_server(self) -> None:
        """
        host_header: server names the server with its port, as a WebSocket
        server checking Host expects.
        """
        await self.start(http={"host_header": "server"})
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        _, _, body = await self.response(client)
        address = self.service.config.backends[0].servers[0].address
        self.assertEqual(json.loads(body)["headers"]["host"], address)

    @async_test
    async def test_routes(self) -> None:
        """
        Routes by exact host, C{*.suffix} host and path prefix, first match
        wins, the frontend's backend otherwise; a route's header rules
        apply to its requests only.
        """
        backends = {}
        for name in ("web", "api", "wild"):
            resource = Backend(name)
            port = await listen(CountingSite(resource))
            self.addCleanup(port.stopListening)
            backends[name] = port.getHost().port
        self.service = await self.start_service({
            "backends": [{"name": name, "servers": [f"127.0.0.1:{port}"], "health_check": {"type": "none"}}
                         for name, port in backends.items()],
            "frontends": [{
                "name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1", "backend": "web",
                "routes": [
                    {"host": "api.example.com", "path_prefix": "/v1/", "backend": "api",
                     "set_headers": {"X-Route": "api"}, "remove_headers": ["X-Secret"]},
                    {"host": "*.example.com", "backend": "wild"},
                ],
            }],
        })
        self.port = self.service.port_of("web")
        client = await connect(self.port)
        self.client_cleanup(client)
        cases = [
            (b"API.example.com:80", b"/v1/echo", "api"),
            (b"api.example.com", b"/v2/echo", "wild"),
            (b"www.example.com", b"/v1/echo", "wild"),
            (b"example.com", b"/v1/echo", "web"),
        ]
        for host, target, backend in cases:
            client.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nX-Secret: s\r\nX-Route: client\r\n\r\n"
                                   % (target, host))
            status, headers, body = await self.response(client)
            self.assertEqual((status, headers[b"x-backend"]), (200, backend.encode()), (host, target))
            seen = json.loads(body)["headers"]
            if backend == "api":
                self.assertNotIn("x-secret", seen)
                self.assertEqual(seen["x-route"], "api")
            else:
                self.assertEqual((seen["x-secret"], seen["x-route"]), ("s", "client"))

    @async_test
    async def test_pipelining_in_order(self) -> None:
        """Pipelined requests are answered in order."""
        await self.start()
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"".join(
            b"GET /echo?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
        for i in range(5):
            _, _, body = await self.response(client)
            self.assertEqual(json.loads(body)["uri"], f"/echo?n={i}")

    @async_test
    async def test_bodies_both_ways(self) -> None:
        """Content-Length and chunked request bodies and responses stream through."""
        await self.start()
        client = await connect(self.port)
        self.client_cleanup(client)
        payload = b"p" * 300000
        client.transport.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
                               + payload)
        _, _, body = await self.response(client)
        self.assertEqual(json.loads(body)["body_sha256"], hashlib.sha256(payload).hexdigest())
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"a" * 1000, b"b" * 70000)) + b"0\r\n\r\n"
        client.transport.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        _, _, body = await self.response(client)
        self.assertEqual(json.loads(body)["body_length"], 71000)
        client.transport.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await self.response(client)
        self.assertEqual((status, headers[b"transfer-encoding"], body), (200, b"chunked", b"one,two,three"))
        client.transport.write(b"GET /big?n=5000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await self.response(client)
        self.assertEqual((status, len(body)), (200, 5000000))

    @async_test
    async def test_head_204_and_http10(self) -> None:
        """HEAD and 204 have no body; an HTTP/1.0 client gets its response and a close."""
        await self.start()
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"HEAD /big?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 1000", head)
        client.transport.write(b"GET /nobody HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await self.response(client)
        self.assertEqual((status, body), (204, b""))
        _, raw = await self.request(b"GET /echo HTTP/1.0\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.0 200"), raw[:40])
        self.assertIn(b'"path": "/echo"', raw)

    @async_test
    async def test_error_codes(self) -> None:
        """400, 404, 413, 414, 431, 502, 503 and 504 are answered as JSON."""
        await self.start(http={"max_body": "1k", "max_target": 100, "max_head": "2k",
                               "response_timeout": "300ms", "direct_routes": True})
        cases = [
            (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET /backend/nope/x HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
            (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n", 431),
            (b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", 504),
        ]
        for raw, status in cases:
            _, response = await self.request(raw)
            self.assertTrue(response.startswith(b"HTTP/1.1 %d " % status), (status, response[:60]))
            self.assertIn(b'{"error": ', response)
        self.service.pools["web"].set_up(self.service.pools["web"].servers[0], False, "test")
        _, response = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response[:60])
        self.assertIn(b"Retry-After: 1", response)

    @async_test
    async def test_consecutive_5xx_eject_server(self) -> None:
        """
        A server answering 5xx five times in a row is ejected (Envoy's
        defaults); the others take the traffic; a success resets the count.
        """
        await self.start(n=2)
        pool = self.service.pools["web"]
        s0, s1 = pool.servers
        client = await connect(self.port)
        self.client_cleanup(client)
        for _ in range(4):
            client.transport.write(b"GET /status/500 HTTP/1.1\r\nHost: x\r\n\r\n")
            await self.response(client)
        self.assertEqual((s0.ejections, s1.ejections), (0, 0))
        for _ in range(10):
            client.transport.write(b"GET /status/503 HTTP/1.1\r\nHost: x\r\n\r\n")
            await self.response(client)
        now = self.service.clock.seconds()
        # both would qualify; max_ejection_percent (50%) keeps one serving
        self.assertEqual(sorted(s.ejected(now) for s in pool.servers), [False, True])
        for _ in range(4):
            client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await self.response(client)
            self.assertEqual(status, 200)

    @async_test
    async def test_sticky_cookie(self) -> None:
        """
        With sticky_cookie, the first response names its server in a cookie
        (by an opaque id) and requests carrying it stay there while it is
        up.
        """
        await self.start(n=3, http={"sticky_cookie": "RPSRV"})
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        _, headers, _ = await self.response(client)
        cookie, _, attributes = headers[b"set-cookie"].partition(b";")
        name, _, server_id = cookie.partition(b"=")
        self.assertEqual(name, b"RPSRV")
        self.assertEqual(attributes, b" Path=/; HttpOnly; SameSite=Lax")
        first = headers[b"x-backend"]
        self.assertNotIn(b"127.0.0.1", server_id)
        server_of = {b"b0": "s0", b"b1": "s1", b"b2": "s2"}
        for _ in range(6):
            client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nCookie: a=1; " + cookie + b"\r\n\r\n")
            _, headers, _ = await self.response(client)
            self.assertEqual(headers[b"x-backend"], first)
            self.assertNotIn(b"set-cookie", headers)
        pool = self.service.pools["web"]
        pool.set_up(next(s for s in pool.servers if s.name == server_of[first]), False, "test")
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nCookie: " + cookie + b"\r\n\r\n")
        _, headers, _ = await self.response(client)
        self.assertNotEqual(headers[b"x-backend"], first)
        self.assertIn(b"set-cookie", headers)

    @async_test
    async def test_hash_by_header(self) -> None:
        """hash_key header:NAME sends each key to one server."""
        await self.start(n=3)
        from rproxy.config import config_from_mapping

        config = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1"}, "global": {"grace_period": "2s"},
            "backends": [{"name": "web", "algorithm": "hash", "hash_key": "header:X-User",
                          "health_check": {"type": "none"},
                          "servers": [{"address": s.address, "name": s.name}
                                      for s in self.service.config.backends[0].servers]}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        }
        await self.service.reload(config_from_mapping(config))
        client = await connect(self.port)
        self.client_cleanup(client)
        seen: dict[bytes, set[bytes]] = {}
        for i in range(40):
            user = b"user-%d" % (i % 8)
            client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-User: " + user + b"\r\n\r\n")
            _, headers, _ = await self.response(client)
            seen.setdefault(user, set()).add(headers[b"x-backend"])
        self.assertTrue(all(len(backends) == 1 for backends in seen.values()), seen)
        self.assertGreater(len(set().union(*seen.values())), 1)

    @async_test
    async def test_cors(self) -> None:
        """With cors, preflights are answered here and responses carry the headers."""
        await self.start(http={"cors": True})
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
                               b"Access-Control-Request-Method: POST\r\n"
                               b"Access-Control-Request-Headers: content-type\r\n\r\n")
        status, headers, _ = await self.response(client)
        self.assertEqual((status, headers[b"access-control-allow-origin"],
                          headers[b"access-control-allow-headers"]), (204, b"*", b"content-type"))
        self.assertEqual(self.backends[0][0].requests, [])
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n")
        status, headers, _ = await self.response(client)
        self.assertEqual((status, headers[b"access-control-allow-origin"]), (200, b"*"))

    @async_test
    async def test_access_log(self) -> None:
        """access_log json writes one structured line per request."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start(http={"access_log": "json"})
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo?q=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n\r\n")
        await self.response(client)
        await wait_for(lambda: any(e.get("log_namespace") == "rproxy.access" for e in events))
        [record] = [json.loads(e["record"]) for e in events if e.get("log_namespace") == "rproxy.access"]
        self.assertEqual(
            {k: record[k] for k in ("method", "target", "status", "backend", "server", "user_agent")},
            {"method": "GET", "target": "/echo?q=1", "status": 200, "backend": "web", "server": "s0",
             "user_agent": "probe/1"},
        )

    @async_test
    async def test_slow_head_gets_408(self) -> None:
        """
        A head still incomplete after header_timeout (slowloris) gets 408
        and is closed; an idle keep-alive connection is simply closed.
        """
        await self.start(http={"header_timeout": "200ms"})
        started = self.service.clock.seconds()
        _, response = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: aaa")
        self.assertTrue(response.startswith(b"HTTP/1.1 408 "), response[:60])
        self.assertLess(self.service.clock.seconds() - started, 2.0)
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await self.response(client)
        self.assertEqual(status, 200)
        await client.closed
        self.assertEqual(bytes(client.data), b"")

    @async_test
    async def test_502_when_server_refuses_and_retry(self) -> None:
        """
        A GET whose first server refuses is retried on the next (a refused
        connect needs no retry budget); with none left the client gets 502;
        the client's connection survives retried successes.
        """
        await self.start(n=1)
        dead = await listen(RawFactory())
        dead_port = dead.getHost().port
        await dead.stopListening()
        live = self.service.config.backends[0].servers[0].address
        from rproxy.config import config_from_mapping

        new = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1"}, "global": {"grace_period": "2s"},
            "backends": [{"name": "web", "algorithm": "round-robin", "health_check": {"type": "none"},
                          "passive": {"consecutive_failures": 0},
                          "servers": [{"address": f"127.0.0.1:{dead_port}", "name": "dead"},
                                      {"address": live, "name": "s0"}]}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        }
        await self.service.reload(config_from_mapping(new))
        client = await connect(self.port)
        self.client_cleanup(client)
        for _ in range(3):
            client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = await self.response(client)
            self.assertEqual((status, headers.get(b"x-backend")), (200, b"b0"), body)
        self.assertGreaterEqual(self.service.frontends["web"].retries_total, 1)
        new["backends"][0]["servers"] = [{"address": f"127.0.0.1:{dead_port}", "name": "dead"}]
        await self.service.reload(config_from_mapping(new))
        _, response = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 502 "), response[:60])

    @async_test
    async def test_oversized_response_head_is_502(self) -> None:
        """
        A server's head is bounded like a client's: one that never ends
        (bytes streamed without a blank line) or has too many fields gets
        the client a 502, and the proxy stops reading that server.
        """
        class EndlessHead(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                # 1 MiB of fields and no blank line
                self.transport.write(b"HTTP/1.1 200 OK\r\n" + (b"X-Filler: " + b"f" * 1000 + b"\r\n") * 1024)

        class ManyFields(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\n" + b"X-F: 1\r\n" * 201 + b"Content-Length: 0\r\n\r\n")

        for backend in (EndlessHead, ManyFields):
            factory = protocol.Factory.forProtocol(backend)
            factory.noisy = False
            port = await listen(factory)
            self.addCleanup(port.stopListening)
            await self.proxy_to(port.getHost().port)
            _, response = await self.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(response.startswith(b"HTTP/1.1 502 "), (backend, response[:60]))
            self.assertEqual(self.service.upstreams.idle_count(), 0)
            await self.service.stopService()

    @async_test
    async def test_bytes_after_a_response_retire_the_connection(self) -> None:
        """
        A server that sends more than the response (a second response
        nobody asked for, in the same packet or later) is not given
        another request on that connection: the next request gets its own
        answer from a new connection.
        """
        class Extra(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.factory.connections.add(self)
                n = len(self.factory.connections)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nc%d" % n
                                     + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")

        factory = protocol.Factory.forProtocol(Extra)
        factory.noisy = False
        factory.connections = set()
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        client = await connect(self.port)
        self.client_cleanup(client)
        for i in (1, 2):
            client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await self.response(client)
            self.assertEqual((status, body), (200, b"c%d" % i))
        self.assertEqual(self.service.upstreams.reused, 0)

    @async_test
    async def test_malformed_table_reaches_no_backend(self) -> None:
        """
        Every request of the malformed table is answered 400 and closed,
        and the backend sees no byte of any of them.
        """
        raw_backend = RawFactory()
        port = await listen(raw_backend)
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        for description, raw in MALFORMED:
            _, response = await self.request(raw)
            self.assertTrue(response.startswith(b"HTTP/1.1 400 "), (description, response[:60]))
        self.assertEqual(raw_backend.received, b"")

    @async_test
    async def test_websocket_upgrade(self) -> None:
        """An upgrade answered 101 becomes a two-way splice."""
        factory = protocol.Factory.forProtocol(WebSocketish)
        factory.heads = []  # type: ignore[attr-defined]
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        client, head = await self.request(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            until=b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"Upgrade: websocket", factory.heads[0])  # type: ignore[attr-defined]
        client.transport.write(b"\x81\x05hello")
        self.assertEqual(await client.read_until(b"hello"), b"\x81\x05hello")

    @async_test
    async def test_no_switch_smuggles_nothing(self) -> None:
        """
        A request hidden behind an upgrade request that the server does not
        switch (it answers 200) never reaches the server: the answer says
        Connection: close and the connection closes.
        """
        await self.start()
        _, response = await self.request(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"POST /admin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:60])
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertEqual([r["path"] for r in self.backends[0][0].requests], ["/echo"])

    @async_test
    async def test_websocket_half_close(self) -> None:
        """
        After a 101, a client that shuts its writing down still reads what
        the server sends after seeing that FIN; the server's close then
        closes the client (the one splice's half-close).
        """

        @implementer(IHalfCloseableProtocol)
        class FinalWords(WebSocketish):
            def readConnectionLost(self) -> None:
                self.transport.write(b"last words after your FIN")
                self.transport.loseConnection()

        factory = protocol.Factory.forProtocol(FinalWords)
        factory.heads = []  # type: ignore[attr-defined]
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        client, head = await self.request(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            until=b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        client.transport.write(b"ping")
        self.assertEqual(await client.read_until(b"ping"), b"ping")
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(bytes(client.data), b"last words after your FIN")

    @async_test
    async def test_client_reading_nothing_holds_back_its_requests(self) -> None:
        """
        A client that pipelines 1,000 requests for 32 KiB answers and reads
        nothing gets only as many served as the socket buffers hold; once
        it reads, the rest are served.
        """
        served = []

        class Answers(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                for _ in range(data.count(b"\r\n\r\n")):
                    served.append(1)
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 32768\r\n\r\n" + b"x" * 32768)

        port = await listen(protocol.Factory.forProtocol(Answers))
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        client = await connect(self.port, Client(keep=False))
        self.client_cleanup(client)
        client.transport.pauseProducing()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        frontend = self.service.frontends["web"]
        await wait_for(lambda: any(c.write_paused for c in frontend.connections))
        self.assertLess(len(served), 1000)
        client.transport.resumeProducing()
        await wait_for(lambda: len(served) == 1000 and client.count >= 1000 * 32768, timeout=30)

    @async_test
    async def test_stop_tells_keep_alive_clients_to_go(self) -> None:
        """
        Stopping (SIGTERM) closes an idle keep-alive connection at once and
        answers the request in flight on a busy one with Connection: close,
        then closes it; the stop ends then, not at grace_period (60 s).
        """
        await self.start()
        self.service.config = attrs.evolve(
            self.service.config, global_=attrs.evolve(self.service.config.global_, grace_period=60.0))
        idle = await connect(self.port)
        self.client_cleanup(idle)
        idle.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.response(idle)
        busy = await connect(self.port)
        self.client_cleanup(busy)
        busy.transport.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        resource = self.backends[0][0]
        await wait_for(lambda: bool(resource.pending))
        started = self.service.clock.seconds()
        stopped = self.service.stopService()
        await idle.closed
        self.assertFalse(busy.lost)
        request = resource.pending.pop()
        request.setHeader(b"content-length", b"4")
        request.write(b"done")
        request.finish()
        status, headers, body = await self.response(busy)
        self.assertEqual((status, headers.get(b"connection"), body), (200, b"close", b"done"))
        await busy.closed
        await stopped
        self.assertLess(self.service.clock.seconds() - started, 5.0)


class HTTPTLSTests(HTTPHelpers, TestCase):
    """
    TLS termination with SNI, and verified TLS to servers.
    """

    def pem(self, hostname: str) -> tuple[str, bytes]:
        import os

        from tests.support import self_signed_pem

        path = os.path.abspath(self.mktemp())
        return path, self_signed_pem(path, hostname)

    async def tls_get(self, port: int, hostname: str, trust: bytes) -> bytes:
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint

        from tests.support import reactor

        client = Client()
        options = ssl.optionsForClientTLS(hostname, trustRoot=ssl.Certificate.loadPEM(trust))
        factory = protocol.Factory.forProtocol(lambda: client)
        await SSL4ClientEndpoint(reactor, "127.0.0.1", port, options).connect(factory)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: " + hostname.encode() + b"\r\n\r\n")
        status, headers, body = await self.response(client)
        self.assertEqual(status, 200)
        return body

    @async_test
    async def test_termination_with_sni(self) -> None:
        """
        The certificate follows the client's SNI (each client verifies its
        host name), and the server learns the scheme was https.
        """
        a_path, a_cert = self.pem("a.example")
        b_path, b_cert = self.pem("b.example")
        await self.start(tls={"cert": a_path, "key": a_path, "sni": [{"cert": b_path, "key": b_path}]})
        for hostname, cert in (("a.example", a_cert), ("b.example", b_cert)):
            body = await self.tls_get(self.port, hostname, cert)
            self.assertEqual(json.loads(body)["headers"]["x-forwarded-proto"], "https")

    @async_test
    async def test_upstream_tls_verified(self) -> None:
        """
        TLS to a server verifies its certificate: the right CA works, a
        wrong one is a 502 and nothing is sent.
        """
        from twisted.internet import ssl

        from tests.support import reactor

        server_path, server_cert = self.pem("localhost")
        other_path, _ = self.pem("localhost")
        with open(server_path, "rb") as f:
            private = ssl.PrivateCertificate.loadPEM(f.read())
        resource = Backend("secure")
        site = CountingSite(resource)
        port = reactor.listenSSL(0, site, private.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for ca, expected in ((server_path, b"200"), (other_path, b"502")):
            service = await self.start_service({
                "backends": [{"name": "web", "servers": [f"127.0.0.1:{port.getHost().port}"],
                              "health_check": {"type": "none"},
                              "tls": {"ca": ca, "server_name": "localhost"}}],
                "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                               "backend": "web"}],
            })
            self.port = service.port_of("web")
            _, response = await self.request(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertEqual(response.split(b" ")[1], expected, response[:80])
            await service.stopService()
        self.assertEqual(len(resource.requests), 1)


    @async_test
    async def test_http_health_check_over_tls(self) -> None:
        """
        An http health check of a TLS backend speaks TLS and verifies the
        server: the right CA brings the server up, a wrong one keeps it
        down.
        """
        from twisted.internet import ssl

        from tests.support import reactor, wait_for

        server_path, _ = self.pem("localhost")
        other_path, _ = self.pem("localhost")
        with open(server_path, "rb") as f:
            private = ssl.PrivateCertificate.loadPEM(f.read())
        resource = Backend("secure")
        port = reactor.listenSSL(0, CountingSite(resource), private.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        check = {"type": "http", "path": "/status/200", "interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1}
        service = await self.start_service({
            "backends": [
                {"name": "good", "servers": [f"127.0.0.1:{port.getHost().port}"], "health_check": check,
                 "tls": {"ca": server_path, "server_name": "localhost"}},
                {"name": "bad", "servers": [f"127.0.0.1:{port.getHost().port}"], "health_check": check,
                 "tls": {"ca": other_path, "server_name": "localhost"}},
            ],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "good"}],
        })
        good, bad = service.pools["good"].servers[0], service.pools["bad"].servers[0]
        await wait_for(lambda: not bad.up)  # servers start up; one failed check (fall 1) takes it down
        await wait_for(lambda: len(resource.requests) >= 3)  # only the good check gets through TLS
        self.assertTrue(good.up)
        self.assertFalse(bad.up)
        self.assertEqual({r["path"] for r in resource.requests}, {"/status/200"})


class StreamingResponder(protocol.Protocol):
    """
    A raw HTTP server: answers GET /download with SIZE bytes streamed as a
    push producer, and POST /upload by hashing the body as it arrives; it
    can stop reading (paused) to test backpressure towards the client.
    """

    def connectionMade(self) -> None:
        self.factory.instances.append(self)
        self.buffer = b""
        self.head_done = False
        self.body_left = 0
        self.hash = hashlib.sha256()
        self.sent = 0
        self.paused = False

    def dataReceived(self, data: bytes) -> None:
        if not self.head_done:
            self.buffer += data
            if b"\r\n\r\n" not in self.buffer:
                return
            head, _, data = self.buffer.partition(b"\r\n\r\n")
            self.head_done = True
            if head.startswith(b"GET /download"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.factory.size)
                self.transport.registerProducer(self, True)
                self.resumeProducing()
                return
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.body_left = int(line.split(b":")[1])
        if self.body_left:
            self.factory.received += len(data)
            self.hash.update(data)
            self.body_left -= len(data)
            if self.body_left == 0:
                digest = self.hash.hexdigest().encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = self.factory.chunk
        while not self.paused and self.sent < self.factory.size:
            self.transport.write(chunk)
            self.sent += len(chunk)
        if self.sent >= self.factory.size:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.paused = True


class StreamingTests(HTTPHelpers, TestCase):
    size = 100 * 1024 * 1024

    async def start_streaming(self) -> Any:
        factory = protocol.Factory.forProtocol(StreamingResponder)
        factory.instances, factory.received, factory.size = [], 0, self.size  # type: ignore[attr-defined]
        factory.chunk = bytes(range(256)) * 256  # type: ignore[attr-defined]
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        await self.proxy_to(port.getHost().port)
        return factory

    def proxy_buffered(self) -> int:
        from tests.test_e2e_tcp import buffered

        total = 0
        for conn in self.service.frontends["web"].connections:
            total += buffered(conn.transport)
        for idle in self.service.upstreams.idle.values():
            total += sum(buffered(c.transport) for c in idle)
        return total

    @async_test
    async def test_download_100mib_slow_reader(self) -> None:
        """
        100 MiB to a client that stops reading: the server is paused, the
        proxy holds little, and every byte arrives once the client reads.
        """
        from tests.support import turn

        factory = await self.start_streaming()
        client = Client()
        await connect(self.port, client)
        self.client_cleanup(client)
        client.transport.pauseProducing()
        client.transport.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: bool(factory.instances) and factory.instances[0].paused)
        server = factory.instances[0]
        previous = -1
        while server.sent != previous:
            previous = server.sent
            await turn(delay=0.2)
        self.assertLess(server.sent, 32 * 1024 * 1024)
        self.assertLess(self.proxy_buffered(), 512 * 1024)
        client.transport.resumeProducing()
        expected = hashlib.sha256()
        for _ in range(self.size // len(factory.chunk)):
            expected.update(factory.chunk)
        head_end = -1

        def complete() -> bool:
            nonlocal head_end
            if head_end < 0:
                head_end = client.data.find(b"\r\n\r\n")
            return head_end >= 0 and len(client.data) >= head_end + 4 + self.size

        await wait_for(complete, timeout=60)
        self.assertTrue(bytes(client.data[:16]).startswith(b"HTTP/1.1 200"))
        body = memoryview(client.data)[head_end + 4 :]
        self.assertEqual(len(body), self.size)
        self.assertEqual(hashlib.sha256(body).hexdigest(), expected.hexdigest())
        body.release()

    @async_test
    async def test_upload_100mib_slow_server(self) -> None:
        """
        A 100 MiB upload to a server that stops reading pauses the client;
        once the server reads again the whole body arrives intact.
        """
        from tests.support import turn

        factory = await self.start_streaming()
        client = await connect(self.port)
        self.client_cleanup(client)
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % self.size)
        await wait_for(lambda: bool(factory.instances))
        server = factory.instances[0]
        server.transport.pauseProducing()  # the server stops reading
        chunk = b"u" * 65536
        sent = 0
        expected = hashlib.sha256()

        class Pump:
            """Writes the body as the client transport asks for more."""

            paused = False

            def resumeProducing(self) -> None:
                nonlocal sent
                self.paused = False
                while not self.paused and sent < StreamingTests.size:
                    client.transport.write(chunk)
                    expected.update(chunk)
                    sent += len(chunk)
                if sent >= StreamingTests.size:
                    client.transport.unregisterProducer()

            def pauseProducing(self) -> None:
                self.paused = True

            def stopProducing(self) -> None:
                self.paused = True

        pump = Pump()
        client.transport.registerProducer(pump, True)
        pump.resumeProducing()
        previous = -1
        while sent != previous:
            previous = sent
            await turn(delay=0.2)
        self.assertLess(sent, 32 * 1024 * 1024)
        self.assertLess(self.proxy_buffered(), 512 * 1024)
        server.transport.resumeProducing()
        answer = await client.read_until(b"\r\n\r\n", timeout=60)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        await wait_for(lambda: len(client.data) >= 64)
        self.assertEqual(bytes(client.data[:64]).decode(), expected.hexdigest())
        self.assertEqual(factory.received, self.size)
