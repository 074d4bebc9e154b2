"""
End-to-end tests of the access policy of HTTP frontends on loopback, with
real twisted.web backends and curl as the client: allow/deny, trusted
proxies, redirects, API keys (static, and through Redis and PostgreSQL),
Basic authentication off the reactor, path rewriting.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import bcrypt
from twisted.internet import defer, utils
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from rproxy.store.postgres import PostgresKeys, connection, migrate
from tests.support import async_test, listen, reactor, wait_for
from tests.test_config_access import ARGON2_HUNTER2, BCRYPT_SECRET
from tests.test_e2e_http import Backend, CountingSite, HTTPHelpers
from tests.test_servers import BothServers


async def curl(*args: str) -> tuple[int, dict[str, list[str]], bytes]:
    """
    Run curl (one request, its head written to stdout before the body):
    the status, the fields (lower-case names) and the body.
    """
    out, err, code = await utils.getProcessOutputAndValue(
        shutil.which("curl") or "curl", ("-s", "-S", "-i", "--max-time", "10", *args), reactor=reactor)
    if code != 0:
        raise AssertionError(f"curl {args} exited {code}: {err!r}")
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), fields, body


class AccessHelpers(HTTPHelpers):
    async def start_with(self, frontend: dict[str, Any], n: int = 1, **top: Any) -> Any:
        """
        A service with one HTTP frontend (C{frontend}: its policy keys)
        before C{n} backends; C{top}: more top-level sections.
        """
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
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
                                "backend": "web"}, **frontend)],
            **top,
        }
        self.service = await self.start_service(config)
        self.port = self.service.port_of("web")
        self.url = f"http://127.0.0.1:{self.port}"
        return self.service

    def users_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path


class AccessE2ETests(AccessHelpers, TestCase):
    @async_test
    async def test_deny_and_route_allow(self) -> None:
        """
        A denied client gets 403 with a JSON error; a route's allow list
        guards that route alone; refusals are counted in the metrics.
        """
        await self.start_with({"routes": [
            {"path_prefix": "/admin", "backend": "web", "allow": ["192.0.2.0/24"]},
            {"path_prefix": "/", "backend": "web"},
        ]})
        status, _, body = await curl(f"{self.url}/admin/x")
        self.assertEqual((status, json.loads(body)), (403, {"error": "127.0.0.1 is not allowed"}))
        status, _, _ = await curl(f"{self.url}/echo")
        self.assertEqual(status, 200)
        from prometheus_client.exposition import generate_latest

        text = generate_latest(self.service.registry).decode()
        self.assertIn('rproxy_http_refused_total{frontend="web",reason="access"} 1.0', text)

    @async_test
    async def test_path_spellings(self) -> None:
        """
        curl --path-as-is sending /admin spelt other ways (percent-encoded,
        double slash, dot segments, absolute form) meets the /admin route's
        deny list; an allowed request reaches the server in normal form.
        """
        await self.start_with({"routes": [{"path_prefix": "/admin", "backend": "web", "deny": ["127.0.0.0/8"]}]})
        for target in ("/%61dmin", "//admin", "/./admin", "/x/../admin", "/../admin/x"):
            status, _, _ = await curl("--path-as-is", f"{self.url}{target}")
            self.assertEqual(status, 403, target)
        status, _, _ = await curl("--request-target", f"http://127.0.0.1:{self.port}/admin", f"{self.url}/")
        self.assertEqual(status, 403)
        status, _, _ = await curl("--path-as-is", f"{self.url}/admin/../%65cho")
        self.assertEqual(status, 200)
        self.assertEqual([r["path"] for r in self.backends[0][0].requests], ["/echo"])

    @async_test
    async def test_trusted_proxy(self) -> None:
        """
        From a trusted proxy, X-Forwarded-For goes on with the proxy
        appended, and the address it names is what deny lists and the
        access log see.
        """
        log = self.mktemp()
        await self.start_with({"trusted_proxies": ["127.0.0.0/8"], "deny": ["203.0.113.0/24"],
                               "http": {"access_log": {"format": "json", "path": log}}})
        status, _, body = await curl("-H", "X-Forwarded-For: 198.51.100.7, 127.0.0.5", f"{self.url}/echo")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["headers"]["x-forwarded-for"], "198.51.100.7, 127.0.0.5, 127.0.0.1")
        status, _, _ = await curl("-H", "X-Forwarded-For: 203.0.113.50", f"{self.url}/echo")
        self.assertEqual(status, 403)
        await wait_for(lambda: open(log).read().count("\n") >= 2)
        with open(log) as f:
            clients = [json.loads(line)["client"] for line in f]
        self.assertEqual(clients, ["198.51.100.7", "203.0.113.50"])

    @async_test
    async def test_untrusted_peer(self) -> None:
        """
        With trusted_proxies: [] nobody is trusted: a client's
        X-Forwarded-For is replaced by its address.
        """
        await self.start_with({"trusted_proxies": []})
        status, _, body = await curl("-H", "X-Forwarded-For: 6.6.6.6", f"{self.url}/echo")
        self.assertEqual(json.loads(body)["headers"]["x-forwarded-for"], "127.0.0.1")

    @async_test
    async def test_redirect(self) -> None:
        """
        redirect: {scheme: https} answers curl with the status and a
        Location over https; a route with redirect: false is proxied.
        """
        await self.start_with({"redirect": {"scheme": "https", "status": 308}, "routes": [
            {"path_prefix": "/.well-known/", "backend": "web", "redirect": False},
            {"path_prefix": "/", "backend": "web"},
        ]})
        status, fields, body = await curl(f"{self.url}/a/b?c=1")
        self.assertEqual((status, fields["location"], fields["content-length"], body),
                         (308, ["https://127.0.0.1/a/b?c=1"], ["0"], b""))
        status, _, _ = await curl(f"{self.url}/.well-known/acme-challenge/x")
        self.assertEqual(status, 200)

    @async_test
    async def test_rewrite(self) -> None:
        """
        The server sees the route's rewritten target, query kept.
        """
        await self.start_with({"routes": [
            {"path_prefix": "/api", "backend": "web", "strip_prefix": "/api", "add_prefix": "/v1"},
        ]})
        status, _, body = await curl(f"{self.url}/api/echo?x=1")
        self.assertEqual((status, json.loads(body)["uri"]), (200, "/v1/echo?x=1"))

    @async_test
    async def test_static_api_keys(self) -> None:
        """
        auth: {api_keys: true} with the static api_keys (no stores): a
        valid Bearer key passes, any other gets 401 with the challenge.
        """
        await self.start_with({"auth": {"api_keys": True}}, api_keys=[{"key": "sk-static-1", "name": "ci"}])
        status, _, _ = await curl("-H", "Authorization: Bearer sk-static-1", f"{self.url}/echo")
        self.assertEqual(status, 200)
        status, fields, body = await curl("-H", "Authorization: Bearer sk-other", f"{self.url}/echo")
        self.assertEqual((status, fields["www-authenticate"], json.loads(body)),
                         (401, ["Bearer"], {"error": "invalid API key"}))
        status, _, _ = await curl(f"{self.url}/echo")
        self.assertEqual(status, 401)

    @async_test
    async def test_basic(self) -> None:
        """
        curl -u with a bcrypt ($2y$) or argon2id user passes; a wrong
        password gets 401 with the Basic challenge.
        """
        path = self.users_file(f"alice:{BCRYPT_SECRET}\nbob:{ARGON2_HUNTER2}\n")
        await self.start_with({"auth": {"basic": {"users_file": path, "realm": "staff"}}})
        for user in ("alice:secret", "bob:hunter2"):
            status, _, _ = await curl("-u", user, f"{self.url}/echo")
            self.assertEqual(status, 200, user)
        status, fields, _ = await curl("-u", "alice:wrong", f"{self.url}/echo")
        self.assertEqual((status, fields["www-authenticate"]), (401, ['Basic realm="staff", charset="UTF-8"']))

    @async_test
    async def test_basic_off_the_reactor(self) -> None:
        """
        A costly bcrypt check (cost 13) does not hold the reactor: a
        request to a route without auth, sent after, is answered first.
        """
        hashed = await deferToThread(lambda: bcrypt.hashpw(b"slow-pass", bcrypt.gensalt(13)).decode())
        path = self.users_file(f"carol:{hashed}\n")
        await self.start_with({"auth": {"basic": {"users_file": path}}, "routes": [
            {"path_prefix": "/open", "backend": "web", "auth": False},
            {"path_prefix": "/", "backend": "web"},
        ]})
        order: list[str] = []

        async def fetch(name: str, *args: str) -> None:
            status, _, _ = await curl(*args)
            order.append(f"{name} {status}")

        slow = defer.Deferred.fromCoroutine(fetch("auth", "-u", "carol:slow-pass", f"{self.url}/echo"))
        await wait_for(lambda: self.service.frontends["web"].active_requests == 1)
        fast = defer.Deferred.fromCoroutine(fetch("open", f"{self.url}/open"))
        await defer.gatherResults([slow, fast])
        self.assertEqual(order, ["open 200", "auth 200"])


class StoredKeysE2ETests(BothServers, AccessHelpers, TestCase):
    timeout = 120

    @async_test
    async def test_keys_from_postgres(self) -> None:
        """
        With stores, a key created in PostgreSQL passes through the same
        chain the tunnels use (and is cached in Redis); static keys are the
        fallback only, so with PostgreSQL up they are refused.
        """
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)
        try:
            await migrate(conn)
            _, plain = await PostgresKeys(conn).create("team")
        finally:
            conn.close()
        service = await self.start_with(
            {"auth": {"api_keys": True}},
            stores={"postgres": {"dsn": self.pg.dsn}, "redis": {"url": self.redis.url}},
            api_keys=[{"key": "static-key", "name": "fallback"}],
        )
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        status, _, _ = await curl("-H", f"Authorization: Bearer {plain}", f"{self.url}/echo")
        self.assertEqual(status, 200)
        status, _, _ = await curl("-H", f"Authorization: Bearer {plain}", f"{self.url}/echo")
        self.assertEqual((status, service.stores.keys.cache_hits), (200, 1))
        status, _, _ = await curl("-H", "Authorization: Bearer static-key", f"{self.url}/echo")
        self.assertEqual(status, 401)
