"""
Drain end to end: a drained server takes no new requests, also on a
client's keep-alive connection, while a connection open to it finishes.
"""

from __future__ import annotations

import http.client

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import ServiceMixin, async_test, backends_config, connect, listen
from tests.test_console_browser import NamedServer, QuietSite


class DrainTests(ServiceMixin, TestCase):
    @async_test
    async def test_keepalive_requests_avoid_a_drained_server(self) -> None:
        """Requests on one keep-alive client connection stop going to a server once it is drained."""
        ports = {}
        for name in ("a", "b"):
            port = await listen(QuietSite(NamedServer(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        service = await self.start_service({
            "backends": [{"name": "web", "health_check": {"type": "none"},
                          "servers": [{"address": f"127.0.0.1:{ports[n]}", "name": n} for n in ("a", "b")]}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        })
        client = http.client.HTTPConnection("127.0.0.1", service.port_of("web"), timeout=5)
        self.addCleanup(client.close)

        def ask(n: int) -> list[str]:
            answers = []
            for _ in range(n):
                client.request("GET", "/")
                answers.append(client.getresponse().read().decode())
            return answers

        self.assertEqual(sorted(await deferToThread(ask, 4)), ["a", "a", "b", "b"])
        service.pools["web"].set_admin("b", state="drain")
        self.assertEqual(await deferToThread(ask, 4), ["a"] * 4)

    @async_test
    async def test_open_tcp_connection_finishes(self) -> None:
        """A TCP connection open to a server when it is drained goes on; new ones go elsewhere."""
        ports = []
        for name in ("s0", "s1"):
            _, port = await self.backend(name)
            ports.append(port.getHost().port)
        service = await self.start_service(backends_config(*ports))
        first = await connect(service.port_of("web"))
        self.client_cleanup(first)
        self.assertEqual(await first.read_until(b"\n"), b"s0\n")
        service.pools["web"].set_admin("s0", state="drain")
        first.transport.write(b"still here")  # type: ignore[union-attr]
        self.assertEqual(await first.read_until(b"here"), b"still here")
        for _ in range(3):
            other = await connect(service.port_of("web"))
            self.client_cleanup(other)
            self.assertEqual(await other.read_until(b"\n"), b"s1\n")
        s0 = service.pools["web"].server("s0")
        assert s0 is not None
        self.assertEqual((s0.active, s0.state(0)), (1, "draining"))
