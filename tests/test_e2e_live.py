"""
PostgreSQL-backed operation against servers the harness starts: live
backends (source: postgres) under traffic, the backends, stats and agents
admin API, request records into stats, and heartbeat retention.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rproxy.events import write_request
from rproxy.store.postgres import PostgresKeys, connection, migrate
from tests.servers import PostgresServer
from tests.support import ServiceMixin, async_test, connect, listen, reactor, turn, wait_for
from tests.test_servers import BothServers, started


class AdminCalls:
    async def call(self, method: str, path: str, body: Any = None, key: str | None = "adm") -> tuple[int, Any]:
        raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        client = await connect(self.service.admin_port.getHost().port)  # type: ignore[attr-defined]
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        client.transport.write(  # type: ignore[attr-defined]
            f"{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        await client.closed
        head, _, payload = bytes(client.data).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    async def sql(self, query: str, args: tuple[Any, ...] = ()) -> Any:
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        try:
            await migrate(conn)
            return await conn.runQuery(query, args) if query.lstrip().upper().startswith(("SELECT", "WITH")) \
                else await conn.runOperation(query, args)
        finally:
            conn.close()


class LiveBackendTests(ServiceMixin, AdminCalls, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.pg = started(PostgresServer)
        self.addCleanup(self.pg.close)  # type: ignore[attr-defined]

    async def start(self, resync: str = "30s") -> Any:
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"},
            "stores": {"postgres": {"dsn": self.pg.dsn, "resync_interval": resync}},  # type: ignore[attr-defined]
            "backends": [{"name": "live", "source": "postgres", "health_check": {"type": "none"}}],
            "frontends": [{"name": "fe", "listen": "tcp:0:interface=127.0.0.1", "backend": "live"}],
        })
        await wait_for(lambda: self.service.stores.postgres_state == "up", timeout=20)
        return self.service

    async def greeting(self) -> bytes:
        client = await connect(self.service.port_of("fe"))
        self.client_cleanup(client)
        line = await client.read_until(b"\n")
        client.transport.loseConnection()  # type: ignore[attr-defined]
        await client.closed
        return line.strip()

    @async_test
    async def test_changes_apply_under_traffic(self) -> None:
        """
        Rows added, disabled and deleted through the API reach the pool
        within a second while clients keep connecting (none fails), and a
        connection open to a server that is disabled is not cut.
        """
        names = {}
        for name in ("one", "two", "three"):
            factory, port = await self.backend(name)
            names[name] = f"127.0.0.1:{port.getHost().port}"
        service = await self.start()
        pool = service.pools["live"]
        self.assertEqual(pool.servers, [])
        status, row = await self.call("POST", "/api/v1/backends", {"server_id": "s1", "pool": "live",
                                                                   "address": names["one"], "provider": "local"})
        self.assertEqual((status, row["name"], row["enabled"], row["weight"]), (201, "s1", True, 1))
        await wait_for(lambda: [s.name for s in pool.servers] == ["s1"], timeout=1.0)

        seen: list[bytes] = []
        failures: list[str] = []
        stop = False

        async def traffic() -> None:
            while not stop:
                try:
                    seen.append(await self.greeting())
                except Exception as e:  # noqa: BLE001 - recorded, then asserted empty
                    failures.append(repr(e))
                await turn(delay=0.005)

        running = defer.Deferred.fromCoroutine(traffic())
        try:
            await self.changes(pool, names, seen)
        finally:
            stop = True
            await running
        self.assertEqual(failures, [])

    async def changes(self, pool: Any, names: dict[str, str], seen: list[bytes]) -> None:
        service = self.service

        async def settled() -> int:
            # a greeting begun before the change may still come from the old set
            mark = len(seen)
            await wait_for(lambda: len(seen) > mark + 2)
            return len(seen)

        held = await connect(service.port_of("fe"))
        self.client_cleanup(held)
        await held.read_until(b"one\n")

        await self.call("POST", "/api/v1/backends", {"server_id": "s2", "pool": "live", "address": names["two"]})
        await wait_for(lambda: b"two" in seen[-20:], timeout=1.0)
        status, row = await self.call("PATCH", "/api/v1/backends/s1", {"enabled": False})
        self.assertEqual((status, row["enabled"]), (200, False))
        await wait_for(lambda: [s.name for s in pool.servers] == ["s2"], timeout=1.0)
        mark = await settled()
        await wait_for(lambda: len(seen) > mark + 10)
        self.assertEqual(set(seen[mark:]), {b"two"})
        held.transport.write(b"still there?")  # type: ignore[attr-defined]
        await held.read_until(b"still there?")

        await self.call("POST", "/api/v1/backends", {"server_id": "s3", "pool": "live", "address": names["three"]})
        self.assertEqual((await self.call("DELETE", "/api/v1/backends/s2"))[0], 200)
        await wait_for(lambda: [s.name for s in pool.servers] == ["s3"], timeout=1.0)
        mark = await settled()
        await wait_for(lambda: len(seen) > mark + 10)
        self.assertEqual(set(seen[mark:]), {b"three"})

    @async_test
    async def test_resync_catches_a_lost_notification(self) -> None:
        """
        A change made without a notification is picked up by the periodic
        full re-read.
        """
        _, port = await self.backend("quiet")
        service = await self.start(resync="500ms")
        await self.sql("ALTER TABLE backends DISABLE TRIGGER backends_notify")
        await self.sql("INSERT INTO backends (server_id, pool, name, address) VALUES (%s, %s, %s, %s)",
                       ("q1", "live", "q1", f"127.0.0.1:{port.getHost().port}"))
        await wait_for(lambda: [s.name for s in service.pools["live"].servers] == ["q1"], timeout=3.0)
        self.assertEqual(await self.greeting(), b"quiet")
        self.assertEqual(service.stores.live.notifications, 0)

    @async_test
    async def test_postgres_down_keeps_the_servers(self) -> None:
        """
        With PostgreSQL stopped the live pool keeps its servers and traffic
        flows; once it is back, changes apply again without a restart.  The
        pool_size connections serve queries side by side: a slow one does
        not hold up another.
        """
        import time

        _, port = await self.backend("steady")
        _, other = await self.backend("later")
        service = await self.start()
        await self.call("POST", "/api/v1/backends", {"server_id": "s1", "pool": "live",
                                                     "address": f"127.0.0.1:{port.getHost().port}"})
        await wait_for(lambda: len(service.pools["live"].servers) == 1, timeout=2)
        conn = service.stores.connection()
        slow = conn.runQuery("SELECT pg_sleep(1)")
        started = time.monotonic()
        await conn.runQuery("SELECT 1")
        self.assertLess(time.monotonic() - started, 0.5)
        await slow
        self.pg.stop()  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.postgres_state == "down", timeout=20)
        self.assertEqual(await self.greeting(), b"steady")
        self.assertEqual((await self.call("GET", "/api/v1/backends"))[0], 503)
        self.pg.start()  # type: ignore[attr-defined]
        await wait_for(lambda: service.stores.postgres_state == "up", timeout=40)
        await self.call("PATCH", "/api/v1/backends/s1", {"address": f"127.0.0.1:{other.getHost().port}"})
        await wait_for(lambda: service.pools["live"].servers[0].config.port == other.getHost().port, timeout=2)
        self.assertEqual(await self.greeting(), b"later")

    @async_test
    async def test_backends_api_input(self) -> None:
        """
        Bad input gets a clear 4xx and changes nothing; text that looks
        like SQL is stored as text; pagination by server_id.
        """
        await self.start()
        self.assertEqual((await self.call("GET", "/api/v1/backends", key=None))[0], 401)
        bad = [
            (b"nope", "the body must be a JSON object"),
            ({"pool": "live", "address": "127.0.0.1:1"}, "server_id: required"),
            ({"server_id": "x'; DROP TABLE backends; --", "pool": "live", "address": "127.0.0.1:1"},
             "server_id: expected 1-128 letters, digits or ._:@-"),
            ({"server_id": "a", "pool": "live", "address": "127.0.0.1:99999"}, "address: port 99999 out of range"),
            ({"server_id": "a", "pool": "live", "address": "127.0.0.1:1", "weight": 5000},
             "weight: expected an integer from 0 to 1000"),
            ({"server_id": "a", "pool": "live", "address": "127.0.0.1:1", "colour": "red"}, "colour: unknown field"),
        ]
        for body, error in bad:
            self.assertEqual(await self.call("POST", "/api/v1/backends", body), (400, {"error": error}))
        name = "Robert'); DROP TABLE backends;--"
        for i in range(3):
            status, _ = await self.call("POST", "/api/v1/backends",
                                        {"server_id": f"b{i}", "pool": "other", "address": "127.0.0.1:1", "name": name})
            self.assertEqual(status, 201)
        self.assertEqual((await self.call("POST", "/api/v1/backends",
                                          {"server_id": "b0", "pool": "x", "address": "127.0.0.1:1"}))[0], 409)
        status, page = await self.call("GET", "/api/v1/backends?limit=2")
        self.assertEqual(([b["server_id"] for b in page["backends"]], page["next_after"]), (["b0", "b1"], "b1"))
        status, page = await self.call("GET", "/api/v1/backends?limit=2&after=b1&pool=other")
        self.assertEqual([b["name"] for b in page["backends"]], [name])
        self.assertEqual(await self.call("PATCH", "/api/v1/backends/b0", {"server_id": "z"}),
                         (400, {"error": "server_id: cannot be changed"}))
        self.assertEqual((await self.call("PATCH", "/api/v1/backends/nope", {"weight": 2}))[0], 404)
        self.assertEqual((await self.call("GET", "/api/v1/backends/b2"))[1]["name"], name)
        self.assertEqual((await self.call("DELETE", "/api/v1/backends/nope"))[0], 404)
        self.assertEqual((await self.call("GET", "/api/v1/backends?limit=0"))[0], 400)


class Local(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b'{"ok": true}'


class StatsTests(BothServers, ServiceMixin, AdminCalls, TestCase):
    timeout = 120

    @async_test
    async def test_request_records_and_agents(self) -> None:
        """
        Public requests with a shared key become request records, summed
        into stats per key and agent; the agent shows with its last
        heartbeat in /api/v1/agents/known.
        """
        from rproxy.tunnel.agent import AgentService
        from rproxy.tunnel.config import parse_agent_config

        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        await migrate(conn)
        _, shared = await PostgresKeys(conn).create("shared-team")
        conn.close()
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"},
            "stores": {"postgres": {"dsn": self.pg.dsn}, "redis": {"url": self.redis.url}},  # type: ignore[attr-defined]
            "tunnels": [{"name": "t", "mode": "http", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        service = self.service
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        port = await listen(Site(Local()))
        self.addCleanup(port.stopListening)
        tunnel = service.tunnels["t"]
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{tunnel.port_of('proxy')}"},
            "api_key": shared, "agent_id": "gpu-7", "heartbeat_interval": "200ms",
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}], "models": ["m"],
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: "gpu-7" in tunnel.registry.agents, timeout=10)
        for _ in range(5):
            client = await connect(tunnel.port_of("public"))
            self.client_cleanup(client)
            client.transport.write(  # type: ignore[attr-defined]
                f"GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {shared}\r\n\r\n".encode())
            await client.closed
            self.assertIn(b'{"ok": true}', bytes(client.data))

        async def counted() -> bool:
            status, body = await self.call("GET", "/api/v1/stats?hours=1")
            return bool(body["stats"]) and body["stats"][0]["requests"] == 5

        for _ in range(100):
            if await counted():
                break
            await turn(delay=0.1)
        status, body = await self.call("GET", "/api/v1/stats?hours=1&key=shared-team&agent=gpu-7")
        [row] = body["stats"]
        self.assertEqual((row["key"], row["agent"], row["requests"]), ("shared-team", "gpu-7", 5))
        self.assertGreater(row["bytes_out"], 5 * len(b'{"ok": true}'))
        self.assertEqual((await self.call("GET", "/api/v1/stats?key=else"))[1]["stats"], [])
        self.assertEqual((await self.call("GET", "/api/v1/stats?hours=x"))[0], 400)

        for _ in range(100):
            status, body = await self.call("GET", "/api/v1/agents/known")
            if body["agents"] and body["agents"][0]["last_heartbeat"]:
                break
            await turn(delay=0.1)
        [known] = body["agents"]
        self.assertEqual(known["id"], "gpu-7")
        self.assertIn("cpu", known["last_heartbeat"])
        self.assertEqual(await self.call("GET", "/readyz", key=None),
                         (200, {"status": "ready", "stores": {"postgres": "up", "redis": "up"}}))
        from prometheus_client.exposition import generate_latest

        text = generate_latest(service.registry).decode()
        sent = float(text.split("\nrproxy_events_sent_total ")[1].split()[0])
        self.assertGreaterEqual(sent, 5)  # the request records, and heartbeats
        self.assertIn("rproxy_events_dropped_total 0.0", text)
        self.assertIn("rproxy_events_resent_total 0.0", text)

    @async_test
    async def test_request_record_counts_once(self) -> None:
        """
        A record delivered twice (a consumer crashed before its ack, or the
        sink repeated an XADD) counts once in stats.
        """
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)  # type: ignore[attr-defined]
        self.addCleanup(conn.close)
        await migrate(conn)
        handle = write_request(conn)
        event = {"tunnel": "t", "agent_id": "a", "key": "k", "model": "m", "at": 1_700_000_000.0,
                 "bytes_in": 10, "bytes_out": 20, "method": "POST", "target": "/v1/x"}
        for entry_id in ("1-0", "1-0", "2-0"):
            await handle(entry_id, event)
        # an XADD repeated after a Redis failure: a new entry, the same _id
        for entry_id in ("3-0", "4-0"):
            await handle(entry_id, dict(event, _id="p-1"))
        rows = await conn.runQuery("SELECT requests, bytes_in, bytes_out FROM stats")
        self.assertEqual(rows, [(3, 30, 60)])

    @async_test
    async def test_heartbeat_retention(self) -> None:
        """
        Heartbeats and request records older than heartbeat_retention are
        deleted at start (and hourly); newer ones stay.
        """
        await self.sql(
            "INSERT INTO heartbeats (agent_id, at, cpu, memory, disk, load, active_streams)"
            " VALUES ('a', now() - interval '10 days', 1, 1, 1, 1, 0), ('a', now(), 1, 1, 1, 1, 0)")
        self.service = await self.start_service({
            "stores": {"postgres": {"dsn": self.pg.dsn, "heartbeat_retention": "1d"}},  # type: ignore[attr-defined]
        })
        await wait_for(lambda: self.service.stores.heartbeats_deleted == 1, timeout=20)
        rows = await self.sql("SELECT count(*) FROM heartbeats")
        self.assertEqual(rows[0][0], 1)

