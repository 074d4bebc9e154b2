"""
The auth chain against real Redis and PostgreSQL started by the harness,
including each of them going down and coming back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from rproxy.store.auth import KeyChain
from rproxy.store.postgres import PostgresKeys, migrate
from rproxy.tunnel.config import ApiKeyConfig
from rproxy.tunnel.registry import StaticKeys
from tests.support import async_test, reactor, turn
from tests.test_servers import BothServers


class KeyChainTests(BothServers, TestCase):
    timeout = 120

    async def chain(self) -> KeyChain:
        import txredisapi

        from rproxy.store.postgres import connection

        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(lambda: conn.close() if not conn.closed else None)
        await migrate(conn)
        redis = txredisapi.lazyConnection("127.0.0.1", self.redis.port, reconnect=True)  # type: ignore[attr-defined]
        self.addCleanup(redis.disconnect)
        static = StaticKeys([ApiKeyConfig(key="static-key", level=-1, name="fallback")])
        return KeyChain(static, PostgresKeys(conn), redis, clock=reactor, ttl=300, negative_ttl=5, timeout=1.0)

    @async_test
    async def test_miss_then_hit(self) -> None:
        """A key is read from PostgreSQL once, then from Redis, even with PostgreSQL down."""
        chain = await self.chain()
        record, plain = await chain.postgres.create("team-a", level=0)  # type: ignore[union-attr]
        self.assertEqual((await chain.check(plain)).name, "team-a")
        self.assertEqual(chain.cache_hits, 0)
        self.pg.stop()  # type: ignore[attr-defined]
        again = await chain.check(plain)
        self.assertEqual((again.name, again.level, chain.cache_hits), ("team-a", 0, 1))

    @async_test
    async def test_negative_cache(self) -> None:
        """A refused key is cached briefly, so it does not reach PostgreSQL again."""
        chain = await self.chain()
        self.assertIsNone(await chain.check("no-such-key"))
        self.pg.stop()  # type: ignore[attr-defined]
        self.assertIsNone(await chain.check("no-such-key"))
        self.assertEqual((chain.cache_hits, chain.postgres_errors), (1, 0))

    @async_test
    async def test_redis_down_uses_postgres(self) -> None:
        """With Redis stopped, PostgreSQL answers; Redis back, the cache works again."""
        chain = await self.chain()
        _, plain = await chain.postgres.create("team-b")  # type: ignore[union-attr]
        self.redis.stop()  # type: ignore[attr-defined]
        self.assertEqual((await chain.check(plain)).name, "team-b")
        self.assertGreaterEqual(chain.redis_errors, 1)
        self.redis.start()  # type: ignore[attr-defined]

        async def cached() -> bool:
            before = chain.cache_hits
            await chain.check(plain)
            return chain.cache_hits > before

        for _ in range(50):
            if await cached():
                break
            await turn(delay=0.1)
        self.assertGreaterEqual(chain.cache_hits, 1)

    @async_test
    async def test_both_down_static_fallback(self) -> None:
        """With PostgreSQL down and nothing cached, the static keys still log in."""
        chain = await self.chain()
        self.pg.stop()  # type: ignore[attr-defined]
        self.assertEqual((await chain.check("static-key")).name, "fallback")
        self.assertIsNone(await chain.check("other"))

    @async_test
    async def test_revocation_seen_by_another_process(self) -> None:
        """A key revoked through one chain is refused by another at once."""
        first, second = await self.chain(), await self.chain()
        record, plain = await first.postgres.create("team-c")  # type: ignore[union-attr]
        self.assertIsNotNone(await second.check(plain))  # now cached in Redis
        self.assertTrue(await first.revoke(record.id))
        self.assertIsNone(await second.check(plain))

    @async_test
    async def test_injection_attempts(self) -> None:
        """SQL in presented keys is just a wrong key."""
        chain = await self.chain()
        for attempt in ("' OR 1=1 --", "'; DROP TABLE api_keys; --", "\x00", "k" * 10000):
            self.assertIsNone(await chain.check(attempt))
        rows = await chain.postgres.conn.runQuery("SELECT count(*) FROM api_keys")  # type: ignore[union-attr]
        self.assertEqual(rows, [(0,)])




class CancelledLookupTests(BothServers, TestCase):
    """
    Lookups cancelled while PostgreSQL runs their query, through the
    connection set the stores use: the client went away, the database
    did not.
    """

    timeout = 60

    async def connections(self) -> Any:
        from rproxy.store.postgres import ConnectionSet, connection

        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(lambda: conn.close() if not conn.closed else None)
        await migrate(conn)
        return ConnectionSet([conn])

    @async_test
    async def test_cancelled_query_frees_its_connection(self) -> None:
        """A query cancelled mid-run fails at once; its connection serves the next query when PostgreSQL confirms."""
        conns = await self.connections()
        slow = conns.runQuery("SELECT pg_sleep(30)")
        await turn(delay=0.05)  # sent, running
        slow.cancel()
        self.failureResultOf(slow, defer.CancelledError)
        self.assertEqual(await conns.runQuery("SELECT 1").addTimeout(5.0, reactor), [(1,)])

    @async_test
    async def test_cancelled_check_is_not_an_outage(self) -> None:
        """A key check cancelled while PostgreSQL answers counts and logs nothing; the next check is answered."""
        from twisted.logger import globalLogPublisher

        conns = await self.connections()
        keys = PostgresKeys(conns)
        _, plain = await keys.create("team-d")
        chain = KeyChain(StaticKeys([]), keys, clock=reactor, timeout=5.0)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(20):
            check = chain.lookup(plain)  # the query is sent at once
            check.cancel()
            self.failureResultOf(check, defer.CancelledError)
        self.assertEqual(chain.postgres_errors, 0)
        self.assertEqual([e["log_format"] for e in logged if "auth:" in e.get("log_format", "")], [])
        self.assertEqual((await chain.lookup(plain)).name, "team-d")
