"""
Migrations and the API key store against a real PostgreSQL started by the
test harness (tests/servers.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from rproxy.store.postgres import PostgresKeys, migrate, migrations
from tests.servers import PostgresServer
from tests.support import async_test, reactor
from tests.test_servers import started


class PostgresTests(TestCase):
    timeout = 120

    async def connect(self) -> Any:
        from txpostgres import txpostgres

        conn = txpostgres.Connection(reactor=reactor)
        await conn.connect(self.server.dsn)
        self.addCleanup(conn.close)
        return conn

    def setUp(self) -> None:
        self.server = started(PostgresServer)
        self.addCleanup(self.server.close)  # type: ignore[attr-defined]

    @async_test
    async def test_migrations_apply_once(self) -> None:
        """
        Two processes migrating at once apply each migration exactly once,
        and a later run applies nothing.
        """
        first, second = await self.connect(), await self.connect()
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(migrate(first)), defer.Deferred.fromCoroutine(migrate(second)),
        ])
        versions = [v for v, _, _ in migrations()]
        self.assertEqual(sorted(results[0] + results[1]), versions)
        self.assertEqual(await migrate(first), [])
        tables = await first.runQuery(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
        self.assertEqual([t[0] for t in tables],
                         ["agents", "api_keys", "backends", "heartbeats", "request_events", "schema_migrations",
                          "stats"])

    @async_test
    async def test_keys(self) -> None:
        """
        A created key is accepted until revoked; only its digest is stored;
        SQL in keys and names is just text.
        """
        conn = await self.connect()
        await migrate(conn)
        keys = PostgresKeys(conn)
        record, plain = await keys.create("team'); DROP TABLE api_keys; --", level=3)
        self.assertEqual((await keys.check(plain)).name, "team'); DROP TABLE api_keys; --")  # type: ignore[union-attr]
        stored = await conn.runQuery("SELECT digest FROM api_keys")
        self.assertNotIn(plain.encode(), bytes(stored[0][0]))
        for attempt in ("' OR '1'='1", "x' OR 1=1 --", plain + "'", ""):
            self.assertIsNone(await keys.check(attempt))
        self.assertTrue(await keys.revoke(record.id))
        self.assertFalse(await keys.revoke(record.id))
        self.assertIsNone(await keys.check(plain))
        [listed] = await keys.list()
        self.assertEqual((listed.id, listed.level), (record.id, 3))
        self.assertIsNotNone(listed.revoked_at)

    @async_test
    async def test_backends_notify(self) -> None:
        """Changes to the backends table are announced with NOTIFY (for live pools)."""
        conn, listener = await self.connect(), await self.connect()
        await migrate(conn)
        heard: list[str] = []
        listener.addNotifyObserver(lambda notify: heard.append(notify.payload))
        await listener.runOperation("LISTEN rproxy_backends")
        await conn.runOperation(
            "INSERT INTO backends (server_id, pool, name, address) VALUES (%s, %s, %s, %s)",
            ("s1", "web", "one", "127.0.0.1:9001"),
        )
        from tests.support import wait_for

        await wait_for(lambda: heard == ["web"])
