"""
rproxy with stores: tunnel logins checked through Redis and PostgreSQL
started by the harness, and what happens when PostgreSQL is down.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from rproxy.store.postgres import PostgresKeys, connection, migrate
from rproxy.tunnel.wire import Login
from tests.servers import PostgresServer, RedisServer
from tests.support import ServiceMixin, async_test, connect, reactor, wait_for
from tests.test_e2e_tunnel import FakeAgent
from tests.test_servers import started


class StoresTests(ServiceMixin, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.pg = started(PostgresServer)
        self.addCleanup(self.pg.close)  # type: ignore[attr-defined]
        self.redis = started(RedisServer)
        self.addCleanup(self.redis.close)  # type: ignore[attr-defined]

    async def create_key(self, name: str) -> str:
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        try:
            await migrate(conn)
            _, plain = await PostgresKeys(conn).create(name)
        finally:
            conn.close()
        return plain

    async def start(self) -> Any:
        service = await self.start_service({
            "stores": {"postgres": {"dsn": self.pg.dsn}, "redis": {"url": self.redis.url}},  # type: ignore[attr-defined]
            "api_keys": [{"key": "static-key", "name": "fallback"}],
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        self.service = service
        return service

    async def login(self, key: str, agent_id: str) -> Any:
        fake = FakeAgent()
        await connect(self.service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id=agent_id, api_key=key))
        await wait_for(lambda: fake.messages or fake.lost, timeout=10)
        return fake.messages[0]

    @async_test
    async def test_keys_from_postgres_through_redis(self) -> None:
        """
        A key created in PostgreSQL logs an agent in; static keys are only
        the fallback for when the database cannot be reached (the seed's
        order), so with PostgreSQL up they are refused.
        """
        plain = await self.create_key("team")
        service = await self.start()
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        self.assertTrue((await self.login(plain, "a")).ok)
        self.assertFalse((await self.login("static-key", "b")).ok)
        self.assertFalse((await self.login("wrong", "c")).ok)
        self.assertEqual(service.health_detail()["stores"], {"postgres": "up", "redis": "up"})
        from prometheus_client.exposition import generate_latest

        text = generate_latest(service.registry).decode()
        self.assertIn('rproxy_store_up{store="postgres"} 1.0', text)
        self.assertIn('rproxy_store_up{store="redis"} 1.0', text)
        self.assertEqual(service.tunnels["t"].registry.agents["a"].key_name, "team")

    @async_test
    async def test_postgres_down_at_startup(self) -> None:
        """
        With PostgreSQL down at startup rproxy runs on static keys, and takes
        PostgreSQL's keys as soon as it comes back, without a restart.
        """
        plain = await self.create_key("team")
        self.pg.stop()  # type: ignore[attr-defined]
        service = await self.start()
        await wait_for(lambda: service.stores.postgres_state == "down", timeout=20)
        self.assertTrue((await self.login("static-key", "a")).ok)
        self.assertFalse((await self.login(plain, "b")).ok)
        self.pg.start()  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.postgres_state == "up", timeout=60)
        # the refusal above was cached briefly (negative TTL 5s); a new key is not
        fresh = await self.create_key("fresh")
        self.assertTrue((await self.login(fresh, "c")).ok)


class MigrateCommandTests(TestCase):
    timeout = 120

    @async_test
    async def test_rproxyctl_migrate(self) -> None:
        """rproxyctl migrate applies the schema once, then reports it up to date."""
        import os
        import sys

        from twisted.internet.utils import getProcessOutputAndValue

        pg = started(PostgresServer)
        self.addCleanup(pg.close)  # type: ignore[attr-defined]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root, DATABASE_URL=pg.dsn)  # type: ignore[attr-defined]
        outputs = []
        for _ in range(2):
            out, err, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "rproxy.cli", "migrate"], env=env, path=root, reactor=reactor)
            outputs.append((code, out.decode().strip()))
        self.assertEqual(outputs, [(0, "applied migrations 1"), (0, "schema is up to date")])
        pg.stop()  # type: ignore[attr-defined]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "rproxy.cli", "migrate"], env=env, path=root, reactor=reactor)
        self.assertEqual(code, 1)
        self.assertTrue(err.decode().startswith("rproxyctl: cannot connect to PostgreSQL"), err)
        self.assertNotIn(b"Traceback", err)
