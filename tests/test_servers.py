"""
The test servers of L{tests.servers} are real and independent: connect with
txpostgres and txredisapi, survive a stop and start, and go away.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.servers import PostgresServer, RedisServer, ServerMissing
from tests.support import async_test, reactor


def started(cls: type) -> object:
    try:
        return cls()
    except ServerMissing as e:
        if os.environ.get("RPROXY_ALLOW_MISSING_SERVERS"):
            raise SkipTest(str(e)) from None
        raise


class BothServers:
    """
    A test case mixin: a fresh PostgreSQL (C{self.pg}) and Redis
    (C{self.redis}) for each test, closed afterwards.
    """

    def setUp(self) -> None:
        self.pg: Any = started(PostgresServer)
        self.addCleanup(self.pg.close)  # type: ignore[attr-defined]
        self.redis: Any = started(RedisServer)
        self.addCleanup(self.redis.close)  # type: ignore[attr-defined]


class ServersTests(TestCase):
    timeout = 120

    @async_test
    async def test_postgres(self) -> None:
        """A private PostgreSQL answers txpostgres queries, also after a restart."""
        from txpostgres import txpostgres

        server = started(PostgresServer)
        self.addCleanup(server.close)  # type: ignore[attr-defined]
        self.assertNotEqual(server.port, 5432)  # type: ignore[attr-defined]
        conn = txpostgres.Connection(reactor=reactor)
        await conn.connect(server.dsn)  # type: ignore[attr-defined]
        rows = await conn.runQuery("select current_user, %s::int + 1", (41,))
        self.assertEqual(rows, [("rproxy", 42)])
        conn.close()
        server.stop()  # type: ignore[attr-defined]
        server.start()  # type: ignore[attr-defined]
        conn = txpostgres.Connection(reactor=reactor)
        await conn.connect(server.dsn)  # type: ignore[attr-defined]
        self.assertEqual(await conn.runQuery("select 1"), [(1,)])
        conn.close()

    @async_test
    async def test_redis(self) -> None:
        """A private Redis answers txredisapi, and loses nothing it was not asked to keep."""
        import txredisapi

        server = started(RedisServer)
        self.addCleanup(server.close)  # type: ignore[attr-defined]
        self.assertNotEqual(server.port, 6379)  # type: ignore[attr-defined]
        client = await txredisapi.Connection("127.0.0.1", server.port, reconnect=False)  # type: ignore[attr-defined]
        await client.set("rproxy:test", "value")
        self.assertEqual(await client.get("rproxy:test"), "value")
        await client.disconnect()
