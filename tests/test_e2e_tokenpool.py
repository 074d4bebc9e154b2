"""
End-to-end tests of token pools: rproxy logs in to an upstream written
here (DolphinDB's login answer, expiring tokens, 401 for a bad token) and
leases one token per client connection; everything on loopback.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import Client, ServiceMixin, async_test, connect, listen, turn, wait_for


class Upstream(Resource):
    """
    POST /api/login gives a token valid for C{token_ttl} seconds (code "1"
    for a wrong password); any other path needs a live bearer token,
    answers after C{delay} seconds, and records which client (header
    X-Client) used which token and when.  Two clients' requests in flight
    at once with one token are recorded as violations.
    """

    isLeaf = True

    def __init__(self, credentials: dict[str, str], token_ttl: float = 3600.0, delay: float = 0.0) -> None:
        super().__init__()
        self.credentials = credentials
        self.token_ttl = token_ttl
        self.delay = delay
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (user, expires)
        self.logins = 0
        self.issued = 0
        self.in_flight: dict[str, str] = {}  # token -> client
        self.violations: list[str] = []
        self.seen: list[tuple[str, str, float, float]] = []  # token, client, start, end
        self.authorizations: list[str] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/api/login":
            return self.login(request)
        auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
        self.authorizations.append(auth)
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        entry = self.tokens.get(token)
        if entry is None or entry[1] < time.monotonic():
            request.setResponseCode(401)
            return b'{"error": "bad token"}'
        client = (request.getHeader(b"x-client") or b"-").decode("latin-1")
        other = self.in_flight.get(token)
        if other is not None and other != client:
            self.violations.append(f"token {token} used by {other} and {client} at once")
        self.in_flight[token] = client
        start = time.monotonic()

        def answer() -> None:
            if self.in_flight.get(token) == client:
                del self.in_flight[token]
            self.seen.append((token, client, start, time.monotonic()))
            body = json.dumps({"token": token, "client": client}).encode()
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()

        if self.delay:
            reactor.callLater(self.delay, answer)
        else:
            answer()
        return NOT_DONE_YET

    def login(self, request: Any) -> bytes:
        self.logins += 1
        try:
            body = json.loads(request.content.read())
            user, password = body["username"], body["password"]
        except (ValueError, KeyError, TypeError):
            request.setResponseCode(400)
            return b"{}"
        if self.credentials.get(user) != password:
            return json.dumps({"session": "0", "user": user, "code": "1", "message": "The user name or password is incorrect.",
                               "result": []}).encode()
        self.issued += 1
        token = f"{user}-{self.issued}"
        self.tokens[token] = (user, time.monotonic() + self.token_ttl)
        # DolphinDB wraps its tokens over lines
        wrapped = token[:3] + "\n" + token[3:]
        return json.dumps({"session": str(self.issued), "user": user, "code": "0", "message": "",
                           "result": [wrapped]}).encode()

    def revoke(self, token: str) -> None:
        del self.tokens[token]


async def http(client: Client, path: str, name: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    """
    One request on a kept-alive connection, and its response.
    """
    client.transport.write(  # type: ignore[attr-defined]
        f"GET {path} HTTP/1.1\r\nHost: db\r\nX-Client: {name}\r\n{extra}\r\n".encode())
    head = await client.read_until(b"\r\n\r\n", timeout=30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    await wait_for(lambda: len(client.data) >= length or client.lost, 30)
    body = bytes(client.data[:length])
    del client.data[:length]
    return status, headers, body


class TokenPoolE2ETests(ServiceMixin, TestCase):
    timeout = 60

    async def upstream(self, users: int, **kwargs: Any) -> tuple[Upstream, int]:
        upstream = Upstream({f"u{i}": f"p{i}" for i in range(users)}, **kwargs)
        site = Site(upstream)
        site.noisy = False
        port = await listen(site)
        self.addCleanup(port.stopListening)
        return upstream, port.getHost().port

    def config(self, port: int, users: int, **pool: Any) -> dict[str, Any]:
        token_pool = {
            "name": "dolphin",
            "upstream": {"address": f"127.0.0.1:{port}"},
            "credentials": [{"username": f"u{i}", "password": f"p{i}"} for i in range(users)],
            "retry": {"initial": "100ms", "max": "500ms"},
        }
        token_pool.update(pool)
        return {
            "backends": [{"name": "db", "servers": [f"127.0.0.1:{port}"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "db", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "db", "token_pool": "dolphin"}],
            "token_pools": [token_pool],
        }

    async def client(self, service: Any) -> Client:
        client = await connect(service.port_of("db"))
        self.client_cleanup(client)
        return client

    async def admin(self, service: Any, path: str) -> tuple[int, bytes]:
        client = await connect(service.admin_port.getHost().port)
        client.transport.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())  # type: ignore[attr-defined]
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    @async_test
    async def test_no_token_serves_two_connections(self) -> None:
        """
        200 concurrent clients, 20 tokens: each connection's requests all
        carry one token, never the client's own, and the upstream never
        sees one token in use by two connections at once.
        """
        upstream, port = await self.upstream(20, delay=0.005)
        service = await self.start_service(self.config(port, 20))
        pool = service.token_pools["dolphin"]
        await wait_for(lambda: pool.counts()["available"] == 20)

        tokens_of: dict[str, set[str]] = {}
        statuses: list[int] = []

        async def one(i: int) -> None:
            name = f"c{i}"
            client = await self.client(service)
            for _ in range(3):
                status, _, body = await http(client, "/q", name, extra="Authorization: Bearer mine\r\n")
                statuses.append(status)
                tokens_of.setdefault(name, set()).add(json.loads(body)["token"])
            client.transport.loseConnection()  # type: ignore[attr-defined]
            await client.closed

        from twisted.internet import defer

        await defer.gatherResults([defer.Deferred.fromCoroutine(one(i)) for i in range(200)])
        self.assertEqual(statuses, [200] * 600)
        self.assertEqual(len(tokens_of), 200)
        self.assertEqual({len(t) for t in tokens_of.values()}, {1})
        self.assertEqual(upstream.violations, [])
        self.assertNotIn("Bearer mine", upstream.authorizations)
        # per token, the spans of different clients never overlap
        spans: dict[str, dict[str, list[float]]] = {}
        for token, client, start, end in upstream.seen:
            span = spans.setdefault(token, {}).setdefault(client, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        for token, clients in spans.items():
            ordered = sorted(clients.values())
            for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
                self.assertLessEqual(end, start, f"token {token} served two connections at once")
        self.assertEqual(len(spans), 20)
        self.assertEqual(upstream.logins, 20)
        await wait_for(lambda: pool.counts() == {"total": 20, "in_use": 0, "available": 20, "waiting": 0})
        self.assertGreater(pool.wait_count - pool.wait_buckets[0], 0)  # some connections did wait

    @async_test
    async def test_queue_order_timeout_and_disconnect(self) -> None:
        """
        With the only token leased, waiters are served in arrival order; a
        waiter whose client leaves is dropped from the queue; one that
        waits past queue_timeout gets 503 with Retry-After.
        """
        upstream, port = await self.upstream(1)
        service = await self.start_service(self.config(port, 1, queue_timeout="1s"))
        pool = service.token_pools["dolphin"]
        await wait_for(pool.has_token)
        holder = await self.client(service)
        self.assertEqual((await http(holder, "/q", "holder"))[0], 200)

        waiters = []
        for name in ("w1", "gone", "w2"):
            client = await self.client(service)
            client.transport.write(f"GET /q HTTP/1.1\r\nHost: db\r\nX-Client: {name}\r\n\r\n".encode())  # type: ignore[attr-defined]
            waiters.append(client)
            expected = len(waiters)
            await wait_for(lambda: pool.counts()["waiting"] == expected)  # noqa: B023
        waiters[1].transport.abortConnection()  # type: ignore[attr-defined]
        await wait_for(lambda: pool.counts()["waiting"] == 2)

        holder.transport.loseConnection()  # type: ignore[attr-defined]
        await waiters[0].read_until(b'"client": "w1"}')
        self.assertEqual(pool.counts()["waiting"], 1)
        waiters[0].transport.loseConnection()  # type: ignore[attr-defined]
        await waiters[2].read_until(b'"client": "w2"}')
        self.assertEqual([c for _, c, _, _ in upstream.seen], ["holder", "w1", "w2"])

        late = await self.client(service)
        started = time.monotonic()
        status, headers, body = await http(late, "/q", "late")
        waited = time.monotonic() - started
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "1")
        self.assertIn(b"no token free within 1s", body)
        self.assertTrue(0.9 <= waited < 5, waited)
        await late.closed
        self.assertEqual(pool.timeouts, 1)

    @async_test
    async def test_refresh_under_load(self) -> None:
        """
        Tokens that expire upstream after 1.5s are refreshed before that
        while 10 connections keep sending requests over 2 tokens: no
        request fails, and connections outlive the tokens they started
        with.
        """
        upstream, port = await self.upstream(2, token_ttl=1.5)
        service = await self.start_service(self.config(port, 2, ttl="1s", refresh_before="400ms"))
        pool = service.token_pools["dolphin"]
        await wait_for(lambda: pool.counts()["total"] == 2)
        statuses: list[int] = []
        tokens_of: dict[str, list[str]] = {}
        stop_at = time.monotonic() + 2.5

        async def worker(i: int) -> None:
            client = await self.client(service)
            name = f"c{i}"
            while time.monotonic() < stop_at:
                status, _, body = await http(client, "/q", name)
                statuses.append(status)
                if status == 200:
                    token = json.loads(body)["token"]
                    if token not in tokens_of.setdefault(name, []):
                        tokens_of[name].append(token)
                await turn(delay=0.01)
            client.transport.loseConnection()  # type: ignore[attr-defined]
            await client.closed

        from twisted.internet import defer

        await defer.gatherResults([defer.Deferred.fromCoroutine(worker(i)) for i in range(10)])
        self.assertGreater(len(statuses), 50)
        self.assertEqual(set(statuses), {200})
        self.assertGreaterEqual(pool.refreshes["ok"], 4)
        self.assertTrue(any(len(tokens) > 1 for tokens in tokens_of.values()), tokens_of)
        self.assertEqual(upstream.violations, [])

    @async_test
    async def test_unauthorized_relogs_in(self) -> None:
        """
        The upstream refuses a token (401, passed to the client): rproxy
        logs that session in again, and the same connection's next request
        carries the new token.
        """
        upstream, port = await self.upstream(1)
        service = await self.start_service(self.config(port, 1))
        pool = service.token_pools["dolphin"]
        await wait_for(pool.has_token)
        client = await self.client(service)
        status, _, body = await http(client, "/q", "c")
        old = json.loads(body)["token"]
        upstream.revoke(old)
        self.assertEqual((await http(client, "/q", "c"))[0], 401)
        status, _, body = await http(client, "/q", "c")
        self.assertEqual(status, 200)
        self.assertNotEqual(json.loads(body)["token"], old)
        self.assertEqual(upstream.logins, 2)
        self.assertEqual(pool.unauthorized_total, 1)
        _, metrics = await self.admin(service, "/metrics")
        self.assertIn(b'rproxy_token_unauthorized_total{pool="dolphin"} 1.0', metrics)
        self.assertIn(b'rproxy_token_refreshes_total{outcome="ok",pool="dolphin"} 1.0', metrics)

    @async_test
    async def test_upstream_down_at_startup(self) -> None:
        """
        With the upstream down, rproxy is not ready and a client waits;
        once the upstream is up the login is retried, the client is served
        and /readyz and /health turn healthy.
        """
        placeholder = await listen(Site(Resource()))
        port = placeholder.getHost().port
        await placeholder.stopListening()
        service = await self.start_service(self.config(port, 2, queue_timeout="20s"))
        pool = service.token_pools["dolphin"]
        status, body = await self.admin(service, "/readyz")
        self.assertEqual(status, 503)
        self.assertIn(b"token pool dolphin holds no token yet", body)
        client = await self.client(service)
        client.transport.write(b"GET /q HTTP/1.1\r\nHost: db\r\nX-Client: early\r\n\r\n")  # type: ignore[attr-defined]
        await wait_for(lambda: pool.logins["error"] >= 2)
        self.assertEqual(pool.counts()["waiting"], 1)

        upstream = Upstream({"u0": "p0", "u1": "p1"})
        up = await listen_on(Site(upstream), port)
        self.addCleanup(up.stopListening)
        await client.read_until(b'"client": "early"}')
        await wait_for(lambda: pool.counts()["total"] == 2)
        status, body = await self.admin(service, "/readyz")
        self.assertEqual(status, 200)
        status, body = await self.admin(service, "/health")
        detail = json.loads(body)["token_pools"]["dolphin"]
        self.assertEqual(detail["status"], "healthy")
        self.assertEqual(detail["pool"], {"total": 2, "in_use": 1, "available": 1, "waiting": 0})
        _, metrics = await self.admin(service, "/metrics")
        for line in (b'rproxy_tokens_total{pool="dolphin"} 2.0', b'rproxy_tokens_in_use{pool="dolphin"} 1.0',
                     b'rproxy_tokens_available{pool="dolphin"} 1.0', b'rproxy_token_waiters{pool="dolphin"} 0.0',
                     b'rproxy_token_logins_total{outcome="ok",pool="dolphin"} 2.0',
                     b'rproxy_token_wait_seconds_count{pool="dolphin"} 1.0'):
            self.assertIn(line, metrics)

    @async_test
    async def test_refused_credential_taken_out(self) -> None:
        """
        A credential whose login keeps being refused is taken out and
        reported; the pool serves with the others.
        """
        upstream, port = await self.upstream(1)
        config = self.config(port, 1, max_login_failures=2)
        config["token_pools"][0]["credentials"].append({"username": "mallory", "password": "guess"})
        service = await self.start_service(config)
        pool = service.token_pools["dolphin"]
        await wait_for(lambda: any(s.out for s in pool.sessions))
        _, body = await self.admin(service, "/health")
        detail = json.loads(body)["token_pools"]["dolphin"]
        self.assertEqual(detail["credentials_out"], ["mallory"])
        self.assertEqual(detail["pool"]["total"], 1)
        client = await self.client(service)
        self.assertEqual((await http(client, "/q", "c"))[0], 200)
        self.assertGreaterEqual(pool.logins["refused"], 2)

    @async_test
    async def test_lease_returned_however_the_connection_ends(self) -> None:
        """
        A connection that ends with a malformed request, or is cut, gives
        its token back.
        """
        upstream, port = await self.upstream(1)
        service = await self.start_service(self.config(port, 1))
        pool = service.token_pools["dolphin"]
        await wait_for(pool.has_token)
        bad = await self.client(service)
        self.assertEqual((await http(bad, "/q", "bad"))[0], 200)
        self.assertEqual(pool.counts()["in_use"], 1)
        bad.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")  # type: ignore[attr-defined]
        await bad.closed
        self.assertIn(b"400", bytes(bad.data))
        await wait_for(lambda: pool.counts()["available"] == 1)
        cut = await self.client(service)
        self.assertEqual((await http(cut, "/q", "cut"))[0], 200)
        cut.transport.abortConnection()  # type: ignore[attr-defined]
        await wait_for(lambda: pool.counts()["available"] == 1)

    @async_test
    async def test_reload_replaces_a_changed_pool(self) -> None:
        """
        A reload that changes a token pool starts a new one for new
        connections; a connection holding a token of the old pool keeps it,
        and the old pool stops once that connection ends.
        """
        from rproxy.config import config_from_mapping

        upstream, port = await self.upstream(2)
        config = self.config(port, 1)
        service = await self.start_service(config)
        old = service.token_pools["dolphin"]
        await wait_for(old.has_token)
        holder = await self.client(service)
        _, _, body = await http(holder, "/q", "holder")
        first = json.loads(body)["token"]
        await service.reload(config_from_mapping(self.config(port, 2)))
        new = service.token_pools["dolphin"]
        self.assertIsNot(new, old)
        await wait_for(lambda: new.counts()["total"] == 2)
        _, _, body = await http(holder, "/q", "holder")
        self.assertEqual(json.loads(body)["token"], first)
        other = await self.client(service)
        _, _, body = await http(other, "/q", "other")
        self.assertNotEqual(json.loads(body)["token"], first)
        self.assertTrue(old.running)
        holder.transport.loseConnection()  # type: ignore[attr-defined]
        await wait_for(lambda: not old.running)

    @async_test
    async def test_login_over_tls(self) -> None:
        """
        upstream.tls: the login goes over TLS, verified against the given
        CA for the given name; a wrong name fails verification and the
        pool holds nothing.
        """
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ServerEndpoint

        from tests.support import self_signed_pem

        pem = self.mktemp()
        cert = self_signed_pem(pem, "db.test")
        ca = self.mktemp()
        with open(ca, "wb") as f:
            f.write(cert)
        with open(pem, "rb") as f:
            options = ssl.PrivateCertificate.loadPEM(f.read()).options()
        upstream = Upstream({"u0": "p0"})
        site = Site(upstream)
        tls_port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(site)
        self.addCleanup(tls_port.stopListening)
        plain = await listen(site)
        self.addCleanup(plain.stopListening)
        config = self.config(plain.getHost().port, 1)
        config["token_pools"][0]["upstream"] = {"address": f"127.0.0.1:{tls_port.getHost().port}",
                                                "tls": {"ca": ca, "server_name": "db.test"}}
        service = await self.start_service(config)
        pool = service.token_pools["dolphin"]
        await wait_for(pool.has_token)
        client = await self.client(service)
        self.assertEqual((await http(client, "/q", "c"))[0], 200)

        config["token_pools"][0]["upstream"]["tls"]["server_name"] = "other.test"
        from rproxy.config import config_from_mapping

        await service.reload(config_from_mapping(config))
        wrong = service.token_pools["dolphin"]
        await wait_for(lambda: wrong.logins["error"] >= 1)
        self.assertFalse(wrong.has_token())
        self.assertEqual(upstream.logins, 1)


async def listen_on(factory: Any, port: int) -> Any:
    from twisted.internet.endpoints import TCP4ServerEndpoint

    return await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
