"""
Rate limits shared through the harness's real Redis: the Lua GCRA from
two connections, and two C{twistd rproxy} processes sharing one limit,
falling back to their own buckets while Redis is stopped and sharing
again once it is back.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import txredisapi
import yaml
from twisted.internet import defer, error
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rproxy.ratelimit_redis import SCRIPT_SHA, RedisError, SharedBuckets
from tests.servers import RedisServer
from tests.support import async_test, listen, reactor, turn, wait_for
from tests.test_e2e_ratelimit import curl
from tests.test_servers import started
from tests.test_twistd import ROOT, Child


class Probe:
    """
    A probe that always says Redis is usable, and records failures.
    """

    def __init__(self) -> None:
        self.failures: list[str] = []

    def usable(self) -> bool:
        return True

    def failed(self, why: str) -> None:
        self.failures.append(why)


class SharedScriptTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.redis: Any = started(RedisServer)
        self.addCleanup(self.redis.close)

    async def client(self) -> Any:
        conn = await txredisapi.Connection("127.0.0.1", self.redis.port, reconnect=False)
        self.addCleanup(conn.disconnect)
        return conn

    async def store(self, probe: Any = None) -> SharedBuckets:
        store = SharedBuckets.connect(reactor, self.redis.url, reactor, probe if probe is not None else Probe())
        self.addCleanup(store.close)
        await wait_for(lambda: store.connection is not None)
        return store

    @async_test
    async def test_two_connections_share_one_bucket(self) -> None:
        """
        Two stores (two connections, as two processes would have) draw on
        one bucket: burst 5 allows 5 of 8 across both; the key expires when
        its bucket is whole again; a Redis that forgot the script (SCRIPT
        FLUSH, a restart) gets it again by EVAL.
        """
        one, two = await self.store(), await self.store()
        interval, tolerance = 10.0, 50.0  # 6/m, burst 5
        decisions = []
        for i in range(8):
            store = (one, two)[i % 2]
            decisions.append(await store.check(b"rl:test:k", interval, tolerance, 1.0))
        self.assertEqual([d.allowed for d in decisions], [True] * 5 + [False] * 3)
        self.assertEqual([d.remaining for d in decisions[:5]], [4, 3, 2, 1, 0])
        self.assertTrue(9.0 < decisions[5].retry_after <= 10.0, decisions[5])
        self.assertTrue(49.0 < decisions[4].reset <= 50.0, decisions[4])
        admin = await self.client()
        ttl = await admin.execute_command("PTTL", "rl:test:k")
        self.assertTrue(49_000 < ttl <= 50_000, ttl)
        await admin.execute_command("SCRIPT", "FLUSH")
        self.assertEqual(await admin.execute_command("SCRIPT", "EXISTS", SCRIPT_SHA), [0])
        # the first command after the flush fails (the limit decides
        # locally); the next ones carry the script again
        with self.assertRaises(RedisError):
            await one.check(b"rl:test:other", interval, tolerance, 1.0)
        again = await one.check(b"rl:test:other", interval, tolerance, 1.0)
        self.assertTrue(again.allowed)
        self.assertEqual(await admin.execute_command("SCRIPT", "EXISTS", SCRIPT_SHA), [1])
        self.assertEqual((one.errors, two.errors), (1, 0))

    @async_test
    async def test_pipelined(self) -> None:
        """
        Many checks written in one turn are answered in order.
        """
        store = await self.store()
        results = await defer.gatherResults([store.check(b"rl:test:p", 1.0, 100.0, 5.0) for _ in range(150)])
        self.assertEqual([d.allowed for d in results], [True] * 100 + [False] * 50)
        self.assertEqual([d.remaining for d in results[:100]], list(range(99, -1, -1)))

    @async_test
    async def test_timeout_tells_the_probe(self) -> None:
        """
        A Redis that does not answer (busy with a one-second script) fails
        the check within its timeout, and the probe is told; the late
        reply is skipped, and the next check is answered.
        """
        probe = Probe()
        store = await self.store(probe)
        await store.check(b"rl:test:k", 1.0, 1.0, 1.0)
        busy = (await self.client()).eval(
            "local t = redis.call('TIME') local e = t[1] * 1000000 + t[2] + 1000000 "
            "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= e return 1")
        await turn(delay=0.1)  # (the script is running)
        started_at = time.monotonic()
        with self.assertRaises(defer.TimeoutError):
            await store.check(b"rl:test:k", 1.0, 1.0, 0.1)
        self.assertLess(time.monotonic() - started_at, 0.8)
        self.assertEqual((store.errors, probe.failures), (1, ["TimeoutError"]))
        await busy
        decision = await store.check(b"rl:test:k2", 1.0, 1.0, 1.0)
        self.assertTrue(decision.allowed)

    @async_test
    async def test_stopped_redis(self) -> None:
        """
        Redis stopped: commands in flight fail, the store is not usable
        (no connection) until Redis is back.
        """
        store = await self.store()
        self.redis.stop()
        await wait_for(lambda: not store.usable())
        with self.assertRaises(error.ConnectionLost):
            await store.check(b"rl:test:k", 1.0, 1.0, 1.0)
        self.redis.start()
        await wait_for(lambda: store.usable(), 10)
        self.assertTrue((await store.check(b"rl:test:k", 1.0, 1.0, 1.0)).allowed)


class Backend(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


class TwoProcessesTests(TestCase):
    """
    Two C{twistd rproxy} children with the same configuration and one
    Redis.
    """

    timeout = 120

    def setUp(self) -> None:
        self.redis: Any = started(RedisServer)
        self.addCleanup(self.redis.close)

    def spawn(self, config: dict[str, Any], name: str) -> Child:
        path = os.path.abspath(self.mktemp()) + ".yaml"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        child = Child()
        launcher = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
        args = [sys.executable, "-c", launcher, "-n", "--pidfile=", "rproxy", "--config", path]
        process = reactor.spawnProcess(child, sys.executable, args, env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)

        async def stop() -> None:
            if not child.ended:
                process.signalProcess("KILL")
                await wait_for(lambda: child.ended)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return child

    async def statuses(self, port: int, client: str, n: int) -> list[int]:
        url = f"http://127.0.0.1:{port}/"
        code, out = await curl(self, "-H", f"X-Client: {client}", "-w", "%{http_code}\\n",
                               *[arg for _ in range(n) for arg in ("-o", "/dev/null", url)])
        self.assertEqual(code, 0, out)
        return [int(line) for line in out.split()]

    async def metric(self, admin: int, name: str) -> float:
        code, out = await curl(self, f"http://127.0.0.1:{admin}/metrics")
        self.assertEqual(code, 0, out)
        values = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        return sum(values)

    async def wait_metric(self, admin: int, name: str, value: float) -> None:
        deadline = time.monotonic() + 20
        while await self.metric(admin, name) != value:
            self.assertLess(time.monotonic(), deadline, f"{name} is not {value}")
            await turn(delay=0.1)

    @async_test
    async def test_shared_then_local_then_shared(self) -> None:
        """
        10/m per X-Client: two processes share it through Redis (10 of 12
        allowed across both); with Redis stopped each decides alone at
        once (10 of 12 each, every decision counted as a fallback); once
        Redis is back (without the script) they share again.
        """
        site = Site(Backend())
        port = await listen(site)
        self.addCleanup(port.stopListening)
        config = {
            "global": {"grace_period": "1s"},
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "stores": {"redis": {"url": self.redis.url}},
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{port.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web",
                           "rate_limit": {"key": "header:X-Client", "rate": "10/m", "redis_timeout": "2s"}}],
        }
        children = [self.spawn(config, "a"), self.spawn(config, "b")]
        ports = []
        admins = []
        for child in children:
            match = await child.line(r"frontend web listening on 127\.0\.0\.1:(\d+)")
            ports.append(int(match.group(1)))
            admins.append(int((await child.line(r"admin listening on 127\.0\.0\.1:(\d+)")).group(1)))
            await child.line(r"Redis is up")
        for admin in admins:
            await self.wait_metric(admin, "rproxy_rate_limit_redis_connected", 1.0)
        # shared: 6 + 6 requests through two processes, 10 allowed in all
        a = await self.statuses(ports[0], "c1", 6)
        b = await self.statuses(ports[1], "c1", 6)
        self.assertEqual(a, [200] * 6)
        self.assertEqual(b, [200] * 4 + [429] * 2)

        # Redis stopped: each process decides alone, at once
        self.redis.stop()
        started_at = time.monotonic()
        a = await self.statuses(ports[0], "c2", 12)
        b = await self.statuses(ports[1], "c2", 12)
        self.assertLess(time.monotonic() - started_at, 10)
        self.assertEqual(a, [200] * 10 + [429] * 2)
        self.assertEqual(b, [200] * 10 + [429] * 2)
        for child in children:
            await child.line(r"Redis unavailable")
        for admin in admins:
            self.assertEqual(await self.metric(admin, "rproxy_rate_limit_fallbacks_total"), 12.0)

        # back: shared again (the restarted Redis has forgotten the script)
        self.redis.start()
        for child in children:
            await wait_for(lambda child=child: child.output.count("Redis is up") >= 2, 20)
        for admin in admins:
            await self.wait_metric(admin, "rproxy_rate_limit_redis_connected", 1.0)
        a = await self.statuses(ports[0], "c3", 6)
        b = await self.statuses(ports[1], "c3", 6)
        self.assertEqual(a + b, [200] * 10 + [429] * 2)
