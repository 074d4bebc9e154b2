"""
rproxy with stores: tunnel logins checked through Redis and PostgreSQL
started by the harness, and what happens when PostgreSQL is down.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from rproxy.store.postgres import PostgresKeys, connection, migrate
from rproxy.tunnel.wire import Login
from tests.servers import PostgresServer
from tests.support import ServiceMixin, async_test, connect, reactor, turn, wait_for
from tests.test_e2e_tunnel import FakeAgent
from tests.test_servers import BothServers, started


class StoresTests(BothServers, ServiceMixin, TestCase):
    timeout = 120

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
    async def test_heartbeats_written_through_the_stream(self) -> None:
        """An agent's heartbeats reach the heartbeats and agents tables through Redis Streams."""
        from rproxy.tunnel.wire import Heartbeat

        plain = await self.create_key("team")
        service = await self.start()
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        fake = FakeAgent()
        await connect(service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="gpu-09", api_key=plain))
        await wait_for(lambda: bool(fake.messages))
        for cpu in (10.0, 20.0, 30.0):
            fake.send(Heartbeat(cpu=cpu, memory=50.0, disk=5.0))
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(conn.close)
        rows: list[Any] = []

        async def written() -> None:
            rows[:] = await conn.runQuery("SELECT count(*), max(cpu) FROM heartbeats WHERE agent_id = 'gpu-09'")

        for _ in range(100):
            await written()
            if rows and rows[0][0] == 3:
                break
            await turn(delay=0.1)
        self.assertEqual(rows, [(3, 30.0)])
        agents = await conn.runQuery("SELECT id FROM agents")
        self.assertEqual(agents, [("gpu-09",)])

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


    @async_test
    async def test_postgres_stopped_mid_run(self) -> None:
        """
        PostgreSQL stopped while rproxy runs: a key already cached in Redis
        still logs in, and so do static keys; PostgreSQL back, new keys
        work again, without a restart.  The agent's system info and models
        reach the agents table.
        """
        plain = await self.create_key("team")
        service = await self.start()
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        self.assertTrue((await self.login(plain, "a")).ok)  # now cached in Redis
        self.pg.stop()  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.postgres_state == "down", timeout=20)
        self.assertTrue((await self.login(plain, "b")).ok)
        self.assertTrue((await self.login("static-key", "c")).ok)
        self.assertEqual(service.health_detail()["stores"], {"postgres": "down", "redis": "up"})
        self.pg.start()  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.postgres_state == "up", timeout=60)
        fresh = await self.create_key("fresh")
        self.assertTrue((await self.login(fresh, "d")).ok)
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(conn.close)

        async def stored() -> Any:
            rows = await conn.runQuery("SELECT models, system_info FROM agents WHERE id = 'gpu-info'")
            return rows[0] if rows else None

        fake = FakeAgent()
        await connect(self.service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="gpu-info", api_key=fresh, models=("llama3",), system_info={"os": "linux"}))
        row = None
        for _ in range(100):
            row = await stored()
            if row:
                break
            await turn(delay=0.1)
        self.assertEqual(row, (["llama3"], {"os": "linux"}))


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
        self.assertEqual(outputs, [(0, "applied migrations 1, 2"), (0, "schema is up to date")])
        pg.stop()  # type: ignore[attr-defined]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "rproxy.cli", "migrate"], env=env, path=root, reactor=reactor)
        self.assertEqual(code, 1)
        self.assertTrue(err.decode().startswith("rproxyctl: cannot connect to PostgreSQL"), err)
        self.assertNotIn(b"Traceback", err)


class KeysAPITests(ServiceMixin, TestCase):
    timeout = 120

    async def call(self, method: str, path: str, body: bytes = b"", key: str | None = "adm") -> tuple[int, Any]:
        import json

        client = await connect(self.service.admin_port.getHost().port)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        client.transport.write(
            f"{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await client.closed
        head, _, payload = bytes(client.data).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    @async_test
    async def test_keys_api(self) -> None:
        """
        POST creates a key shown once, GET lists with pagination, DELETE
        revokes (and the tunnel refuses the key at once); bad input is a
        clear 4xx; no admin key, 401.
        """
        pg = started(PostgresServer)
        self.addCleanup(pg.close)  # type: ignore[attr-defined]
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"},
            "stores": {"postgres": {"dsn": pg.dsn}},  # type: ignore[attr-defined]
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        await wait_for(lambda: self.service.stores.postgres_state == "up", timeout=20)
        self.assertEqual((await self.call("GET", "/api/v1/keys", key=None))[0], 401)
        status, created = await self.call("POST", "/api/v1/keys", b'{"name": "team\'; DROP TABLE x", "level": 2}')
        self.assertEqual((status, created["name"], created["level"]), (201, "team'; DROP TABLE x", 2))
        self.assertTrue(created["key"].startswith("rpk_"))
        for bad in (b"not json", b"[1]", b'{"level": 1}', b'{"name": "x", "level": -5}', b'{"name": ""}'):
            self.assertEqual((await self.call("POST", "/api/v1/keys", bad))[0], 400, bad)
        for i in range(3):
            await self.call("POST", "/api/v1/keys", b'{"name": "k%d"}' % i)
        status, page = await self.call("GET", "/api/v1/keys?limit=2")
        self.assertEqual((status, len(page["keys"]), page["next_after"]), (200, 2, page["keys"][1]["id"]))
        self.assertNotIn("key", page["keys"][0])
        status, rest = await self.call("GET", f"/api/v1/keys?limit=2&after={page['next_after']}")
        self.assertEqual([k["name"] for k in rest["keys"]], ["k1", "k2"])
        fake = FakeAgent()
        await connect(self.service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id="a", api_key=created["key"]))
        await wait_for(lambda: bool(fake.messages))
        self.assertTrue(fake.messages[0].ok)
        self.assertEqual((await self.call("DELETE", f"/api/v1/keys/{created['id']}"))[0], 200)
        self.assertEqual((await self.call("DELETE", f"/api/v1/keys/{created['id']}"))[0], 404)
        self.assertEqual((await self.call("DELETE", "/api/v1/keys/abc"))[0], 400)
        again = FakeAgent()
        await connect(self.service.tunnels["t"].port_of("control"), again)  # type: ignore[arg-type]
        again.send(Login(agent_id="a2", api_key=created["key"]))
        await wait_for(lambda: again.lost)
        self.assertFalse(again.messages[0].ok)


class CleanStopTests(BothServers, ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_clean_stop_sends_the_last_events(self) -> None:
        """
        Events emitted just before the service stops (an SSE stream's
        last records, at a SIGTERM) reach Redis: the stop sends what is
        buffered instead of dropping it.
        """
        import txredisapi

        from rproxy.events import REQUESTS

        service = await self.start_service({"stores": {"redis": {"url": self.redis.url}}})  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.status()["redis"] == "up", timeout=30)
        sink = service.stores.events
        for i in range(2):
            sink.emit(REQUESTS, {"at": 1_700_000_000 + i, "key": "k", "agent_id": "a"})
        await service.stopService()
        self.assertEqual((sink.sent, sink.dropped), (2, 0))
        redis = txredisapi.lazyConnection("127.0.0.1", self.redis.port)  # type: ignore[attr-defined]
        self.addCleanup(redis.disconnect)
        entries = await redis.execute_command("XRANGE", REQUESTS, "-", "+")
        self.assertEqual(sorted(e["at"] for _, fields in entries for e in json.loads(fields[1])),
                         [1_700_000_000, 1_700_000_001])
