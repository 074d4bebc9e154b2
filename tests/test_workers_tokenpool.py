"""
Token pools with C{global.workers: 2} (a twistd child process): the
credentials are partitioned over the workers, so no token is ever used by
two connections at once anywhere on the machine.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.support import async_test, connect, listen, turn
from tests.test_e2e_tokenpool import Upstream, http
from tests.test_workers_e2e import WorkersMixin


class TokenPoolWorkersTests(WorkersMixin, TestCase):
    timeout = 90

    async def upstream(self, users: int, **kwargs: Any) -> tuple[Upstream, int]:
        upstream = Upstream({f"u{i}": f"p{i}" for i in range(users)}, **kwargs)
        site = Site(upstream)
        site.noisy = False
        port = await listen(site)
        self.addCleanup(port.stopListening)
        return upstream, port.getHost().port

    def config(self, port: int, users: int) -> dict[str, Any]:
        return {
            "global": {"workers": 2, "grace_period": "5s"},
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "backends": [{"name": "db", "servers": [f"127.0.0.1:{port}"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "db", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "db", "token_pool": "dolphin"}],
            "token_pools": [{
                "name": "dolphin",
                "upstream": {"address": f"127.0.0.1:{port}"},
                "credentials": [{"username": f"u{i}", "password": f"p{i}"} for i in range(users)],
                "retry": {"initial": "100ms", "max": "500ms"},
            }],
        }

    async def ready(self, tokens: int) -> None:
        async def count() -> int:
            _, health = await self.admin("/health")
            return int(health["token_pools"].get("dolphin", {}).get("pool", {}).get("available", 0))

        for _ in range(200):
            if await count() == tokens:
                return
            await turn(delay=0.05)
        self.fail(f"not {tokens} tokens available")

    @async_test
    async def test_no_token_serves_two_connections(self) -> None:
        """
        200 concurrent clients, 20 tokens over two workers: each
        credential logs in once on the machine, each connection's requests
        carry one token, the upstream never sees one token in use by two
        connections at once, and both workers serve.
        """
        upstream, port = await self.upstream(20, delay=0.005)
        child = await self.start(self.config(port, 20))
        front = self.port(child, "db")
        await self.ready(20)

        tokens_of: dict[str, set[str]] = {}
        statuses: list[int] = []

        async def one(i: int) -> None:
            name = f"c{i}"
            client = await connect(front)
            self.client_cleanup(client)
            for _ in range(3):
                status, _, body = await http(client, "/q", name, extra="Authorization: Bearer mine\r\n")
                statuses.append(status)
                tokens_of.setdefault(name, set()).add(json.loads(body)["token"])
            client.transport.loseConnection()  # type: ignore[attr-defined]
            await client.closed

        await defer.gatherResults([defer.Deferred.fromCoroutine(one(i)) for i in range(200)])
        self.assertEqual(statuses, [200] * 600)
        self.assertEqual({len(t) for t in tokens_of.values()}, {1})
        self.assertEqual(upstream.violations, [])
        self.assertNotIn("Bearer mine", upstream.authorizations)
        spans: dict[str, dict[str, list[float]]] = {}
        for token, client, start, end in upstream.seen:
            span = spans.setdefault(token, {}).setdefault(client, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        for token, clients in spans.items():
            ordered = sorted(clients.values())
            for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
                self.assertLessEqual(end, start, f"token {token} served two connections at once")
        self.assertEqual(len(spans), 20)
        self.assertEqual(upstream.logins, 20)
        _, health = await self.admin("/health")
        self.assertTrue(all(w["connections"] > 0 for w in health["workers"]), health["workers"])
        self.assertEqual(health["token_pools"]["dolphin"]["pool"]["total"], 20)

    @async_test
    async def test_fewer_credentials_than_workers(self) -> None:
        """
        With one credential, only the worker holding it serves the
        token-pool frontend; its clients take turns with the token.
        """
        upstream, port = await self.upstream(1, delay=0.005)
        child = await self.start(self.config(port, 1))
        self.assertTrue(re.search(r"frontend db listening on 127\.0\.0\.1:\d+, backend db, in 1 worker\(s\)",
                                  child.output))
        front = self.port(child, "db")
        await self.ready(1)

        async def one(i: int) -> int:
            client = await connect(front)
            self.client_cleanup(client)
            status, _, _ = await http(client, "/q", f"c{i}")
            client.transport.loseConnection()  # type: ignore[attr-defined]
            await client.closed
            return status

        statuses = await defer.gatherResults([defer.Deferred.fromCoroutine(one(i)) for i in range(20)])
        self.assertEqual(statuses, [200] * 20)
        self.assertEqual(upstream.violations, [])
        self.assertEqual(upstream.logins, 1)
        _, health = await self.admin("/health")
        self.assertEqual([w["connections"] for w in health["workers"]], [20, 0])
