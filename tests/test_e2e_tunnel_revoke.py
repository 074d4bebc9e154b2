"""
Revoking an API key through the admin API logs out, at once, the agents
that logged in with it (PostgreSQL started by the harness).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from rproxy.tunnel.wire import Error, Login
from tests import test_e2e_stores
from tests.servers import PostgresServer
from tests.support import ServiceMixin, async_test, connect, wait_for
from tests.test_e2e_tunnel import FakeAgent
from tests.test_servers import started


class RevokeTests(ServiceMixin, TestCase):
    timeout = 120
    call = test_e2e_stores.KeysAPITests.call  # (the module, not the class: trial would run its tests here)

    async def agent(self, agent_id: str, key: str) -> FakeAgent:
        fake = FakeAgent()
        await connect(self.service.tunnels["t"].port_of("control"), fake)  # type: ignore[arg-type]
        self.addCleanup(lambda: None if fake.lost else fake.transport.abortConnection())
        fake.send(Login(agent_id=agent_id, api_key=key))
        await wait_for(lambda: bool(fake.messages))
        self.assertTrue(fake.messages[0].ok)
        return fake

    @async_test
    async def test_revoking_logs_its_agents_out(self) -> None:
        """
        DELETE /api/v1/keys/N ends the sessions of the agents logged in
        with key N, telling them why; an agent of another key stays.
        """
        pg: Any = started(PostgresServer)
        self.addCleanup(pg.close)
        self.service = await self.start_service({
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": "adm"},
            "stores": {"postgres": {"dsn": pg.dsn}},
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        await wait_for(lambda: self.service.stores.postgres_state == "up", timeout=20)
        _, doomed = await self.call("POST", "/api/v1/keys", b'{"name": "doomed"}')
        _, kept = await self.call("POST", "/api/v1/keys", b'{"name": "kept"}')
        first, second = await self.agent("a1", doomed["key"]), await self.agent("a2", doomed["key"])
        other = await self.agent("b", kept["key"])
        self.assertEqual(await self.call("DELETE", f"/api/v1/keys/{doomed['id']}"), (200, {"id": doomed["id"],
                                                                                          "revoked": True}))
        await wait_for(lambda: first.lost and second.lost)
        self.assertEqual(first.messages[1:], [Error("its API key 'doomed' was revoked")])
        self.assertEqual(sorted(self.service.tunnels["t"].registry.agents), ["b"])
        self.assertFalse(other.lost)
