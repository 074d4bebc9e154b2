"""
A reload that moves a named server to another address, end to end on
127.0.0.1: nothing more goes to the old address, not over a kept-alive
connection of the HTTP frontend's pool (idle or busy at the reload), nor
through an L4 frontend; the server keeps its name (and state).
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from tests.support import Client, ServiceMixin, async_test, connect, listen
from tests.test_e2e_http import Backend, CountingSite


class MovedServerTests(ServiceMixin, TestCase):
    timeout = 60

    async def web_server(self, name: str) -> int:
        site = CountingSite(Backend(name))
        port = await listen(site)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def start_file(self, data: dict[str, Any]) -> None:
        self.data = data
        self.path = os.path.abspath(self.mktemp()) + ".yaml"
        self.rewrite()
        self.service = await self.start_service(data, config_path=self.path)

    def rewrite(self) -> None:
        with open(self.path, "w") as f:
            yaml.safe_dump(self.data, f)

    async def get(self, client: Client) -> bytes:
        """Send a request on C{client}'s connection; the answering server (x-backend)."""
        client.data.clear()
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        [name] = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                  if line.lower().startswith(b"x-backend:")]
        return name

    async def moved(self, new_port: int) -> None:
        self.data["backends"][0]["servers"][0]["address"] = f"127.0.0.1:{new_port}"
        self.rewrite()
        await self.service.reload_from_file()
        assert self.service.last_reload is not None
        self.assertEqual(self.service.last_reload["result"], "ok")

    @async_test
    async def test_http_requests_go_to_new_address(self) -> None:
        """
        After the reload, requests on a client connection whose server
        connection was kept alive are answered by the new address; the
        server keeps its name.
        """
        old, new = await self.web_server("old"), await self.web_server("new")
        await self.start_file({
            "backends": [{"name": "app", "servers": [{"address": f"127.0.0.1:{old}", "name": "app1"}],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "app"}],
        })
        client = await connect(self.service.port_of("web"))
        self.client_cleanup(client)
        self.assertEqual(await self.get(client), b"old")
        self.assertEqual(self.service.upstreams.idle_count(), 1)
        await self.moved(new)
        for _ in range(3):
            self.assertEqual(await self.get(client), b"new")
        self.assertEqual([(s.name, s.config.address) for s in self.service.pools["app"].servers],
                         [("app1", f"127.0.0.1:{new}")])

    @async_test
    async def test_l4_connections_go_to_new_address(self) -> None:
        """A tcp frontend's new connections go to the server's new address."""
        _, old = await self.backend("old")
        _, new = await self.backend("new")
        await self.start_file({
            "backends": [{"name": "app", "servers": [{"address": f"127.0.0.1:{old.getHost().port}",
                                                      "name": "app1"}],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "l4", "protocol": "tcp", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "app"}],
        })
        before = await connect(self.service.port_of("l4"))
        self.client_cleanup(before)
        await before.read_until(b"old\n")
        await self.moved(new.getHost().port)
        after = await connect(self.service.port_of("l4"))
        self.client_cleanup(after)
        await after.read_until(b"new\n")
        before.transport.write(b"still here\n")
        await before.read_until(b"still here\n")
