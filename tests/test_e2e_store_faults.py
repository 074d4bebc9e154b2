"""
Store outages under traffic, against the harness's real PostgreSQL and
Redis: what a restart costs in connections, logins and latency, and how
soon rproxy is whole again.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from rproxy.store.postgres import PostgresKeys, connection, migrate
from rproxy.tunnel.wire import Login
from tests.support import ServiceMixin, async_test, connect, reactor, turn, wait_for
from tests.test_e2e_tunnel import FakeAgent
from tests.test_servers import BothServers

POOL = 4


class Traffic:
    """
    Tunnel logins one after another, each recorded as (started, seconds, accepted).
    """

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.done: list[tuple[float, float, bool]] = []
        self.running = True
        self.finished = defer.Deferred.fromCoroutine(self._run())

    async def login(self, agent_id: str) -> bool:
        fake: Any = FakeAgent()
        await connect(self.port, fake)
        try:
            fake.send(Login(agent_id=agent_id, api_key=self.key))
            await wait_for(lambda: fake.messages or fake.lost, timeout=10)
            return bool(fake.messages and fake.messages[0].ok)
        finally:
            if not fake.lost:
                fake.transport.abortConnection()

    async def _run(self) -> None:
        n = 0
        while self.running:
            n += 1
            started = time.monotonic()
            ok = await self.login(f"load-{n}")
            self.done.append((started, time.monotonic() - started, ok))
            await turn(delay=0.05)

    async def stop(self) -> None:
        self.running = False
        await self.finished

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [d for d in self.done if start <= d[0] < end]


class StoreFaultTests(BothServers, ServiceMixin, TestCase):
    timeout = 180

    async def create_key(self) -> str:
        conn = connection(reactor)
        await conn.connect(self.pg.dsn)
        try:
            await migrate(conn)
            _, plain = await PostgresKeys(conn).create("team")
        finally:
            conn.close()
        return plain

    async def start(self, stores: dict[str, Any]) -> Any:
        return await self.start_service({
            "stores": stores,
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })

    async def traffic(self, service: Any, key: str) -> Traffic:
        load = Traffic(service.tunnels["t"].port_of("control"), key)
        self.addCleanup(load.stop)
        await wait_for(lambda: len(load.done) >= 5, timeout=20)
        return load

    @async_test
    async def test_postgres_restart_under_traffic(self) -> None:
        """
        PostgreSQL stopped for 3 s and started again while agents log in:
        rproxy holds at most pool_size + 1 connections afterwards, is up
        again within 10 s, and only the logins made while it was down are
        refused (the database key has no other source); every login after
        that is accepted.
        """
        plain = await self.create_key()
        service = await self.start({"postgres": {"dsn": self.pg.dsn, "pool_size": POOL}})
        await wait_for(lambda: service.stores.postgres_state == "up", timeout=20)
        load = await self.traffic(service, plain)
        self.assertTrue(all(ok for _, _, ok in load.done))

        stopped = time.monotonic()
        self.pg.stop()
        await wait_for(lambda: service.stores.postgres_state == "down", timeout=20)
        await turn(delay=3.0)
        self.pg.start()
        back = time.monotonic()
        monitor = connection(reactor)
        await monitor.connect(self.pg.dsn)
        self.addCleanup(monitor.close)
        held: list[int] = []
        up_at = None
        while time.monotonic() - back < 12.0:
            rows = await monitor.runQuery(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()")
            held.append(rows[0][0])
            if up_at is None and service.stores.postgres_state == "up":
                up_at = time.monotonic()
            if up_at is not None and time.monotonic() - up_at > 4.0:
                break
            await turn(delay=0.2)
        await turn(delay=0.5)
        await load.stop()

        self.assertIsNotNone(up_at, f"not up 12 s after PostgreSQL was back; connections held: {held}")
        assert up_at is not None
        self.assertLess(up_at - back, 10.0)
        self.assertLessEqual(max(held), POOL + 1, f"connections held after the restart: {held}")
        self.assertEqual(held[-1], POOL)
        before = load.between(0, stopped)
        during = load.between(stopped, up_at)
        after = load.between(up_at + 0.2, float("inf"))
        refused = [d for d in during if not d[2]]
        self.assertTrue(all(ok for _, _, ok in before))
        self.assertGreater(len(refused), 0, "the outage was not seen")
        self.assertGreater(len(after), 10)
        self.assertEqual([d for d in after if not d[2]], [], "logins refused after PostgreSQL was up again")
        # the refusals are the outage's only cost: each answered at once
        self.assertLess(max(seconds for _, seconds, _ in refused), 1.0)
        self.assertLess(service.stores.link.attempts, 12)

    @async_test
    async def test_redis_stopped_under_traffic(self) -> None:
        """
        Redis stopped while agents log in with a database key: once it is
        known to be down every login takes well under 0.3 s (no Redis
        timeout), none is refused, and Redis's return is noticed within
        2.5 s, after which the cache answers again.
        """
        plain = await self.create_key()
        service = await self.start({"postgres": {"dsn": self.pg.dsn}, "redis": {"url": self.redis.url}})
        await wait_for(lambda: service.stores.status() == {"postgres": "up", "redis": "up"}, timeout=20)
        load = await self.traffic(service, plain)
        self.assertGreater(service.stores.keys.cache_hits, 0)

        self.redis.stop()
        await wait_for(lambda: service.stores.redis_state == "down", timeout=10)
        known_down = time.monotonic()
        await turn(delay=2.0)
        while_down = load.between(known_down, time.monotonic())
        self.redis.start()
        back = time.monotonic()
        await wait_for(lambda: service.stores.redis_state == "up", timeout=10)
        noticed = time.monotonic() - back
        hits = service.stores.keys.cache_hits
        await wait_for(lambda: service.stores.keys.cache_hits > hits, timeout=10)
        await load.stop()

        self.assertGreater(len(while_down), 5)
        self.assertEqual([d for d in load.done if not d[2]], [])
        slowest = max(seconds for _, seconds, _ in while_down)
        self.assertLess(slowest, 0.3, f"a login with Redis known down took {slowest:.2f} s")
        self.assertLess(noticed, 2.5)


class AbortedRequestTests(BothServers, ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_aborted_key_checks_leave_the_stores_up(self) -> None:
        """
        200 clients of a tunnel's HTTP port each send a request with a
        random bearer key and reset while its check waits on Redis (held
        still for the moment): Redis stays up, no fallback is counted,
        nothing about the stores is logged.  (Each cancelled check marked
        Redis down and counted as a Redis and a PostgreSQL failure.)
        """
        import secrets
        import signal
        import socket
        import struct

        from twisted.logger import globalLogPublisher

        service = await self.start_service({
            "stores": {"postgres": {"dsn": self.pg.dsn}, "redis": {"url": self.redis.url}},
            "tunnels": [{"name": "t", "mode": "http", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        stores = service.stores
        await wait_for(lambda: stores.status() == {"postgres": "up", "redis": "up"}, timeout=30)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        port = service.tunnels["t"].port_of("public")
        redis = self.redis.process
        redis.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: redis.poll() is None and redis.send_signal(signal.SIGCONT))
        clients = []
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer rnd-{secrets.token_hex(8)}"
                         "\r\n\r\n".encode())
            clients.append(sock)
        await turn(delay=0.2)  # the checks wait on Redis
        for sock in clients:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
        await turn(delay=0.2)
        redis.send_signal(signal.SIGCONT)
        await turn(delay=0.5)
        self.assertEqual(stores.status(), {"postgres": "up", "redis": "up"})
        self.assertEqual((stores.keys.redis_errors, stores.keys.postgres_errors), (0, 0))
        self.assertEqual([e["log_format"] for e in logged if "unavailable" in e.get("log_format", "")], [])
