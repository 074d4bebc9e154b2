"""
The admin API over real sockets: malformed input against a real
PostgreSQL (tests.servers) is a 400 that names the field, the store stays
up; a body without the key is refused from its head, for a raw socket and
for curl streaming an endless upload.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.servers import PostgresServer
from tests.support import ServiceMixin, async_test, connect, wait_for
from tests.test_servers import started

LEVEL = "level: an integer from -1 to 2147483647 is required"


class AdminE2EMixin(ServiceMixin):
    async def call(self, method: str, path: str, body: bytes = b"", key: str | None = "adm") -> tuple[int, Any]:
        client = await connect(self.service.admin_port.getHost().port)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        client.transport.write(
            f"{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await client.closed
        head, _, payload = bytes(client.data).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)


class MalformedInputTests(AdminE2EMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event:
                self.failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def start(self) -> None:
        pg = started(PostgresServer)
        self.addCleanup(pg.close)  # type: ignore[attr-defined]
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"},
            "stores": {"postgres": {"dsn": pg.dsn}},  # type: ignore[attr-defined]
        })
        await wait_for(lambda: self.service.stores.postgres_state == "up", timeout=20)

    @async_test
    async def test_malformed_bodies(self) -> None:
        """
        Deep JSON, huge numbers, NaN, NUL characters and lone surrogates in
        a body are 400 naming the field, not a 503 from the store; nothing is
        logged as a failure and the store keeps working.
        """
        await self.start()
        deep = b"[" * 30000 + b"]" * 30000
        cases = [
            ("/api/v1/keys", deep, "the body must be a JSON object (this one is nested too deeply)"),
            ("/api/v1/keys", b'{"name": ' + deep + b"}", "the body must be a JSON object (this one is nested too deeply)"),
            ("/api/v1/keys", b'{"name": "x", "level": 1e23}', LEVEL),
            ("/api/v1/keys", b'{"name": "x", "level": 100000000000000000000000}', LEVEL),
            ("/api/v1/keys", b'{"name": "x", "level": 2147483648}', LEVEL),
            ("/api/v1/keys", b'{"name": "x", "level": NaN}', "the body must be a JSON object (NaN is not a JSON number)"),
            ("/api/v1/keys", b'{"name": "x", "level": 1' + b"0" * 5000 + b"}", "the body must be a JSON object"),
            ("/api/v1/keys", b'{"name": "a\\u0000b"}', "name: NUL characters are not allowed"),
            ("/api/v1/keys", b'{"name": "\\ud800"}', "name: not valid Unicode (a lone surrogate)"),
            ("/api/v1/keys", b'{"name": "x", "\\ud800": 1}', "the body: a field name: not valid Unicode (a lone surrogate)"),
            ("/api/v1/keys", b'\xff{"name": "x"}', "the body must be a JSON object"),
            ("/api/v1/backends", b'{"server_id": "a", "pool": "p", "address": "127.0.0.1:1", "name": "\\ud800x"}',
             "name: not valid Unicode (a lone surrogate)"),
            ("/api/v1/backends", b'{"server_id": "a", "pool": "p", "address": "127.0.0.1:1", "provider": "\\udc00"}',
             "provider: not valid Unicode (a lone surrogate)"),
            ("/api/v1/backends", b'{"server_id": "a", "pool": "p", "address": "127.0.0.1:1", "weight": 1e23}',
             "weight: expected an integer from 0 to 1000"),
        ]
        for path, body, error in cases:
            self.assertEqual(await self.call("POST", path, body), (400, {"error": error}), body[:60])
        status, _ = await self.call("PATCH", "/api/v1/backends/a", b'{"name": "\\ud800"}')
        self.assertEqual(status, 400)
        self.assertEqual(self.service.stores.postgres_state, "up")
        status, created = await self.call("POST", "/api/v1/keys", b'{"name": "after", "level": 2147483647}')
        self.assertEqual((status, created["level"]), (201, 2147483647))
        self.assertEqual(self.failures, [])

    @async_test
    async def test_malformed_paths_and_queries(self) -> None:
        """
        Ids past PostgreSQL's bigint and NUL characters in a path or query
        are 400, not a 503 from the store.
        """
        await self.start()
        cases = [
            ("GET", "/api/v1/keys?after=99999999999999999999", "after must be an integer from 0 to 9223372036854775807"),
            ("GET", "/api/v1/keys?limit=%2B5", "limit must be an integer from 1 to 1000"),
            ("DELETE", "/api/v1/keys/99999999999999999999", "the key id must be an integer from 1 to 9223372036854775807"),
            ("GET", "/api/v1/backends/a%00b", "the path: NUL characters are not allowed"),
            ("DELETE", "/api/v1/backends/%00", "the path: NUL characters are not allowed"),
            ("GET", "/api/v1/backends?pool=%00", "pool: NUL characters are not allowed"),
            ("GET", "/api/v1/backends?after=x%00", "after: NUL characters are not allowed"),
            ("GET", "/api/v1/stats?key=%00", "key: NUL characters are not allowed"),
            ("GET", "/api/v1/stats?hours=nan", "hours must be a number from 0 to 8784"),
            ("GET", "/api/v1/agents/known?after=%00", "after: NUL characters are not allowed"),
        ]
        for method, path, error in cases:
            self.assertEqual(await self.call(method, path), (400, {"error": error}), path)
        self.assertEqual((await self.call("GET", "/api/v1/backends/a%FFb"))[0], 404)
        self.assertEqual(self.failures, [])


class NotConfiguredE2ETests(AdminE2EMixin, TestCase):
    timeout = 60

    @async_test
    async def test_absent_is_501(self) -> None:
        """
        With no PostgreSQL configured at all the key API is 501 naming the
        setting, over a real socket and through the admin site's requests.
        """
        self.service = await self.start_service({"admin": {"listen": "tcp:0:interface=127.0.0.1"}})
        self.assertEqual(await self.call("POST", "/api/v1/keys", b'{"name": "x"}', key=None),
                         (501, {"error": "the key store (stores.postgres) is not configured"}))


class EarlyRefusalE2ETests(AdminE2EMixin, TestCase):
    timeout = 60

    async def start(self) -> int:
        self.service = await self.start_service({"admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"}})
        return int(self.service.admin_port.getHost().port)

    @async_test
    async def test_huge_body_raw_socket(self) -> None:
        """
        A client announcing 10 GB without the key gets 401 while it is still
        sending, and the connection closes (before the fix the server read
        on, waiting for the 10 GB).
        """
        client = await connect(await self.start())
        client.transport.write(b"POST /api/v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        client.transport.write(b"{" * 1024 * 1024)
        await wait_for(lambda: client.lost, timeout=10)
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), head)
        self.assertEqual(json.loads(body), {"error": "missing or invalid bearer token"})

    @async_test
    async def test_curl_endless_upload(self) -> None:
        """
        curl streaming /dev/zero (chunked, no end) without the key is told
        401 and stops; with the key, 413 once the body passes 64 KiB.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise AssertionError("curl is needed: apt-get install curl")
        url = f"http://127.0.0.1:{await self.start()}/api/v1/keys"
        for extra, expected in (([], b"401"), (["-H", "Authorization: Bearer adm"], b"413")):
            out, err, code = await getProcessOutputAndValue(
                curl, ["-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}", "-T", "/dev/zero",
                       "-X", "POST", *extra, url])
            self.assertEqual(out, expected, (err, code))
