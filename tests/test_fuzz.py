"""
Seeded, bounded fuzzing of every listener on loopback: mutated and random
bytes must close only the connection that sent them, never log an
unhandled error (trial fails a test that does), and leave the service
serving.
"""

from __future__ import annotations

import os
import random

from twisted.trial.unittest import TestCase

from rproxy.tunnel.wire import Heartbeat, Login, NewProxyConn, encode
from tests.support import Client, ServiceMixin, async_test, connect, listen, turn, wait_for
from tests.test_e2e_http import Backend, CountingSite

VALID_HTTP = [
    b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HEAD /big?n=10 HTTP/1.0\r\n\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[pos % len(data)]
        elif op == 1:
            data[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2 and data:
            data[pos % len(data)] = rng.choice(b"\r\n\x00 :\t,;=\x7f\xff0123456789abcdef")
        else:
            data[pos:pos] = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


class FuzzTests(ServiceMixin, TestCase):
    timeout = 120
    cases = int(os.environ.get("RPROXY_FUZZ_CASES", "200"))

    async def send_and_close(self, port: int, payload: bytes) -> None:
        client = Client()
        await connect(port, client)
        client.transport.write(payload)
        # give the proxy a moment to react, then go away ourselves
        await turn(delay=0.005)
        if not client.lost:
            client.transport.abortConnection()
        await client.closed

    @async_test
    async def test_http_frontend(self) -> None:
        """Mutated and random requests never break the HTTP frontend."""
        resource = Backend("b0")
        port = await listen(CountingSite(resource))
        self.addCleanup(port.stopListening)
        service = await self.start_service({
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{port.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web", "http": {"response_timeout": "1s", "header_timeout": "1s"}}],
        })
        front = service.port_of("web")
        rng = random.Random(20261123)
        for i in range(self.cases):
            if i % 10 == 0:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            else:
                payload = mutate(rng, b"".join(rng.sample(VALID_HTTP, rng.randint(1, 3))))
            await self.send_and_close(front, payload)
        await self.still_serving_http(front)
        await wait_for(lambda: service.frontends["web"].active == 0)

    async def still_serving_http(self, front: int) -> None:
        client = await connect(front)
        self.client_cleanup(client)
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)

    @async_test
    async def test_tunnel_ports(self) -> None:
        """Mutated and random frames on the control and proxy ports break nothing."""
        service = await self.start_service({
            "api_keys": [{"key": "k"}],
            "tunnels": [{"name": "t", "control": "tcp:0:interface=127.0.0.1",
                         "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}],
        })
        tunnel = service.tunnels["t"]
        valid = [
            encode(Login(agent_id="a", api_key="k")) + encode(Heartbeat(cpu=1.0)),
            encode(Login(agent_id="b", api_key="wrong")),
            encode(NewProxyConn("c" * 32, "s")) + b"payload",
        ]
        rng = random.Random(42)
        for i in range(self.cases):
            role = "control" if i % 2 else "proxy"
            if i % 10 == 0:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            else:
                payload = mutate(rng, rng.choice(valid))
            await self.send_and_close(tunnel.port_of(role), payload)
        await wait_for(lambda: not tunnel.registry.agents)
        self.assertEqual(tunnel.registry.pending, {})
        # and a well-behaved agent still logs in
        agent = Client()
        await connect(tunnel.port_of("control"), agent)
        self.client_cleanup(agent)
        agent.transport.write(encode(Login(agent_id="good", api_key="k")))
        await wait_for(lambda: "good" in tunnel.registry.agents)


