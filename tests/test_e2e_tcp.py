"""
End-to-end tests of the TCP frontend on loopback: real sockets, port 0.
"""

from __future__ import annotations

import collections
import json
import os
import socket
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from rproxy.config import config_from_mapping
from tests.support import (
    Client,
    ServiceMixin,
    StreamFactory,
    async_test,
    backends_config,
    collector_off,
    connect,
    left_for_collector,
    listen,
    turn,
    wait_for,
)


def buffered(transport: Any) -> int:
    """
    Bytes a Twisted transport holds in its write buffer (test introspection).
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class TCPFrontendTests(ServiceMixin, TestCase):
    timeout = 60

    async def greet(self, port: int) -> tuple[Client, str]:
        client = await connect(port)
        self.client_cleanup(client)
        line = await client.read_until(b"\n")
        return client, line.decode().strip()

    @async_test
    async def test_round_robin_and_echo(self) -> None:
        """Connections go to three backends in turn and bytes flow both ways."""
        ports = []
        for name in ("a", "b", "c"):
            _, port = await self.backend(name)
            ports.append(port.getHost().port)
        service = await self.start_service(backends_config(*ports))
        front = service.port_of("web")
        names = []
        for _ in range(6):
            client, name = await self.greet(front)
            names.append(name)
            client.transport.write(b"ping\n")
            self.assertEqual(await client.read_until(b"ping\n"), b"ping\n")
            client.transport.loseConnection()
            await client.closed
        self.assertEqual(names, ["a", "b", "c", "a", "b", "c"])
        await wait_for(lambda: service.frontends["web"].active == 0)
        stats = service.stats()["pools"][0]
        self.assertEqual([s["total_connections"] for s in stats["backends"]], [2, 2, 2])
        self.assertEqual([s["bytes_out"] for s in stats["backends"]], [10, 10, 10])

    @async_test
    async def test_closed_pairs_need_no_cycle_collector(self) -> None:
        """
        A finished client/server pair is freed when both ends are gone, not
        left as a cycle for Python's collector (which, under many short
        connections, would run often and stall everything while it does).
        """
        from rproxy.tcp import BackendConnection, ClientConnection

        _, port = await self.backend("a")
        service = await self.start_service(backends_config(port.getHost().port))
        front = service.port_of("web")
        collector_off(self)
        for _ in range(5):
            client, _ = await self.greet(front)
            client.transport.loseConnection()
            await client.closed
        await wait_for(lambda: service.frontends["web"].active == 0)
        await turn(delay=0.05)
        self.assertEqual(left_for_collector((ClientConnection, BackendConnection)), [])

    @async_test
    async def test_half_close(self) -> None:
        """
        The client's FIN reaches the backend as a FIN, and the backend's
        reply after it still reaches the client.
        """
        _, port = await self.backend("a")
        service = await self.start_service(backends_config(port.getHost().port))
        client, _ = await self.greet(service.port_of("web"))
        client.transport.write(b"last words")
        client.transport.loseWriteConnection()
        await client.closed
        self.assertEqual(bytes(client.data), b"last wordsbye")

    @async_test
    async def test_early_data_and_fin(self) -> None:
        """
        Bytes and a FIN sent before the server connection is up reach the
        server in order, and the server's answer still comes back.
        """
        _, port = await self.backend("a")
        service = await self.start_service(backends_config(port.getHost().port))

        class Eager(Client):
            def connectionMade(self) -> None:
                self.transport.write(b"early bytes")
                self.transport.loseWriteConnection()

        client = await connect(service.port_of("web"), Eager())
        await client.closed
        self.assertEqual(bytes(client.data), b"a\nearly bytesbye")

    @async_test
    async def test_kill_backend_mid_run(self) -> None:
        """
        With one of three backends killed mid-run (listener closed, its
        connections reset), every new connection still succeeds and the
        open connections to the others keep working.
        """
        factories, ports = [], []
        for name in ("a", "b", "c"):
            f, port = await self.backend(name)
            factories.append(f)
            ports.append(port)
        service = await self.start_service(
            backends_config(*(p.getHost().port for p in ports), passive={"consecutive_failures": 2})
        )
        front = service.port_of("web")
        survivors = []
        for _ in range(3):
            client, name = await self.greet(front)
            survivors.append((client, name))
        await ports[1].stopListening()
        for conn in list(factories[1].connections):
            conn.transport.abortConnection()
        seen = collections.Counter()
        for _ in range(30):
            client, name = await self.greet(front)
            seen[name] += 1
            client.transport.write(b"x\n")
            await client.read_until(b"x\n")
            client.transport.loseConnection()
            await client.closed
        self.assertEqual(set(seen), {"a", "c"})
        self.assertEqual(sum(seen.values()), 30)
        for client, name in survivors:
            if name == "b":
                await client.closed
                continue
            client.transport.write(b"still here\n")
            self.assertEqual(await client.read_until(b"\n"), b"still here\n")
        dead = service.pools["web"].servers[1]
        self.assertGreaterEqual(dead.connect_failures, 2)
        self.assertGreaterEqual(dead.ejections, 1)

    @async_test
    async def test_no_server_up_closes_client(self) -> None:
        """With no server reachable, the client is closed and it is counted."""
        port = await listen(StreamFactory(0))
        dead = port.getHost().port
        await port.stopListening()
        service = await self.start_service(backends_config(dead, passive={"consecutive_failures": 0}))
        client = await connect(service.port_of("web"))
        await client.closed
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(service.frontends["web"].connect_errors, 1)
        self.assertEqual(service.pools["web"].servers[0].connect_failures, 1)

    def silent_server(self) -> int:
        """
        A loopback port whose listener never accepts: connects to it either
        hang or complete in the kernel, and nothing is ever answered.
        """
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        self.addCleanup(sock.close)
        return sock.getsockname()[1]

    @async_test
    async def test_client_leaves_before_server_answers(self) -> None:
        """
        A client that goes away while its server is silent frees the server
        slot (at once if the connect was still pending, else when the
        half-closed pair goes idle) and is not counted as a server failure.
        """
        data = backends_config(self.silent_server())
        data["frontends"][0].update(connect_timeout="30s", idle_timeout="300ms")
        service = await self.start_service(data)
        server = service.pools["web"].servers[0]
        client = await connect(service.port_of("web"))
        await wait_for(lambda: server.active == 1)
        client.transport.loseConnection()
        await client.closed
        await wait_for(lambda: server.active == 0)
        self.assertEqual(server.connect_failures, 0)
        self.assertEqual(service.frontends["web"].active, 0)

    @async_test
    async def test_slow_reader_backpressure(self) -> None:
        """
        50 MiB from a backend to a client that stops reading: the backend is
        paused (it cannot write more than the socket buffers and the proxy's
        bounded buffers hold), the proxy buffers at most about 128 KiB, and
        once the client reads again every byte arrives intact.
        """
        size = 50 * 1024 * 1024
        stream = StreamFactory(size)
        port = await listen(stream)
        self.addCleanup(port.stopListening)
        service = await self.start_service(backends_config(port.getHost().port))
        client = Client(keep=False)
        await connect(service.port_of("web"), client)
        self.client_cleanup(client)
        client.transport.pauseProducing()
        await wait_for(lambda: bool(stream.instances) and stream.instances[0].paused)
        backend = stream.instances[0]
        # let everything settle, then check nothing moves while paused
        previous = -1
        while backend.sent != previous:
            previous = backend.sent
            await turn(delay=0.2)
        conn = next(iter(service.frontends["web"].connections))
        self.assertLess(backend.sent, 32 * 1024 * 1024)
        self.assertLessEqual(buffered(conn.transport), 128 * 1024)
        self.assertLessEqual(buffered(conn.backend.transport), 128 * 1024)
        client.transport.resumeProducing()
        await client.closed
        self.assertEqual(client.count, size)
        self.assertEqual(client.hash.hexdigest(), stream.digest())

    @async_test
    async def test_frontend_limit_queue(self) -> None:
        """
        Past max_connections, connections wait in the queue and start when
        a slot frees; past the queue they are closed at once.
        """
        _, port = await self.backend("a")
        data = backends_config(port.getHost().port)
        data["frontends"][0].update(max_connections=1, queue_size=1, queue_timeout="10s")
        service = await self.start_service(data)
        front = service.port_of("web")
        first, _ = await self.greet(front)
        second = await connect(front)
        self.client_cleanup(second)
        await wait_for(lambda: len(service.frontends["web"].waiting) == 1)
        third = await connect(front)
        await third.closed
        self.assertEqual(bytes(third.data), b"")
        self.assertEqual(bytes(second.data), b"")
        first.transport.loseConnection()
        self.assertEqual(await second.read_until(b"\n"), b"a\n")
        self.assertEqual(service.frontends["web"].refused_total, 1)

    @async_test
    async def test_server_limit_queue_timeout(self) -> None:
        """
        A server at its max_connections makes new connections wait for
        queue_timeout, then closes them.
        """
        _, port = await self.backend("a")
        data = backends_config(port.getHost().port, queue_timeout="300ms")
        data["backends"][0]["servers"][0]["max_connections"] = 1
        service = await self.start_service(data)
        front = service.port_of("web")
        await self.greet(front)
        waiting = await connect(front)
        await wait_for(lambda: service.pools["web"].waiting == 1)
        await waiting.closed
        self.assertEqual(bytes(waiting.data), b"")
        self.assertEqual(service.pools["web"].queue_timeout_total, 1)

    @async_test
    async def test_idle_timeout(self) -> None:
        """A connection silent both ways for idle_timeout is closed."""
        _, port = await self.backend("a")
        data = backends_config(port.getHost().port)
        data["frontends"][0]["idle_timeout"] = "200ms"
        service = await self.start_service(data)
        client, _ = await self.greet(service.port_of("web"))
        started = service.clock.seconds()
        await client.closed
        elapsed = service.clock.seconds() - started
        self.assertTrue(0.15 <= elapsed <= 0.6, elapsed)
        self.assertEqual(service.frontends["web"].idle_closed, 1)

    @async_test
    async def test_reload_under_traffic(self) -> None:
        """
        A reload that removes a server, adds one, changes the algorithm and
        adds a frontend cuts no connection in flight: 20 clients doing
        round trips all finish, and the new frontend serves.
        """
        ports = []
        for name in ("a", "b", "c"):
            _, port = await self.backend(name)
            ports.append(port.getHost().port)
        data = backends_config(ports[0], ports[1])
        service = await self.start_service(data)
        front = service.port_of("web")
        clients = []
        for _ in range(20):
            client, name = await self.greet(front)
            clients.append(client)

        async def traffic(client: Client, rounds: int) -> int:
            done = 0
            for i in range(rounds):
                message = b"%d\n" % i
                client.transport.write(message)
                self.assertEqual(await client.read_until(message), message)
                done += 1
            return done

        from twisted.internet import defer

        work = defer.gatherResults(
            [defer.Deferred.fromCoroutine(traffic(c, 50)) for c in clients], consumeErrors=True
        )
        await turn(delay=0.05)
        new = backends_config(ports[1], ports[2], algorithm="least-connections")
        new["backends"][0]["servers"] = [
            {"address": f"127.0.0.1:{ports[1]}", "name": "s1"},
            {"address": f"127.0.0.1:{ports[2]}", "name": "s2"},
        ]
        new["frontends"].append({"name": "extra", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"})
        new["admin"] = {"listen": "tcp:0:interface=127.0.0.1"}
        new["global"] = {"grace_period": "2s"}
        await service.reload(config_from_mapping(new))
        self.assertEqual(await work, [50] * 20)
        self.assertEqual(service.port_of("web"), front)
        _, name = await self.greet(service.port_of("extra"))
        self.assertIn(name, ("b", "c"))
        self.assertEqual(service.pools["web"].config.algorithm, "least-connections")
        self.assertEqual([s.name for s in service.pools["web"].servers], ["s1", "s2"])


class AdminTests(ServiceMixin, TestCase):
    timeout = 30

    async def get(self, port: int, path: str) -> tuple[int, dict[str, str], bytes]:
        client = await connect(port)
        client.transport.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    @async_test
    async def test_probes_stats_metrics(self) -> None:
        """
        /livez, /readyz, /health, /stats and /metrics answer; /readyz turns
        503 naming the frontend once its only server is down.
        """
        _, port = await self.backend("a")
        service = await self.start_service(backends_config(port.getHost().port))
        admin = service.admin_port.getHost().port
        self.assertEqual((await self.get(admin, "/livez"))[0], 200)
        status, _, body = await self.get(admin, "/readyz")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ready"))
        client = await connect(service.port_of("web"))
        self.client_cleanup(client)
        await client.read_until(b"\n")
        client.transport.write(b"12345")
        await client.read_until(b"12345")
        status, headers, body = await self.get(admin, "/metrics")
        text = body.decode()
        self.assertEqual(status, 200)
        self.assertIn("text/plain", headers["content-type"])
        for line in (
            'rproxy_frontend_connections_total{frontend="web"} 1.0',
            'rproxy_frontend_connections_active{frontend="web"} 1.0',
            'rproxy_frontend_bytes_total{direction="in",frontend="web"} 5.0',
            'rproxy_frontend_bytes_total{direction="out",frontend="web"} 7.0',
            'rproxy_server_up{backend="web",server="s0"} 1.0',
            'rproxy_server_connections_active{backend="web",server="s0"} 1.0',
        ):
            self.assertIn(line, text)
        status, _, body = await self.get(admin, "/stats")
        pool = json.loads(body)["pools"][0]
        self.assertEqual(
            (pool["load_balancer"], pool["total_backends"], pool["healthy_backends"]), ("round-robin", 1, 1)
        )
        self.assertEqual(pool["backends"][0]["server_id"], "s0")
        service.pools["web"].set_up(service.pools["web"].servers[0], False, "test")
        status, headers, body = await self.get(admin, "/readyz")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["problems"], ["frontend web: no server of backend web is up"])
        status, _, body = await self.get(admin, "/health")
        self.assertEqual((status, json.loads(body)["status"]), (503, "degraded"))
        self.assertEqual((await self.get(admin, "/nope"))[0], 404)
        self.assertIn('rproxy_server_up{backend="web",server="s0"} 0.0', (await self.get(admin, "/metrics"))[2].decode())


class ImmediateSendTests(ServiceMixin, TestCase):
    @async_test
    async def test_write_sends_without_reactor_turn(self) -> None:
        """
        On an idle immediate-send connection, write() puts the bytes on the
        wire before returning: the peer socket can read them at once.
        """
        from twisted.internet.protocol import Factory, Protocol

        from rproxy.transport import ImmediateSendServer, listen_tcp
        from tests.support import reactor

        accepted: list[Protocol] = []

        class Hold(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = listen_tcp(reactor, 0, Factory.forProtocol(Hold), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        await wait_for(lambda: bool(accepted))
        server = accepted[0]
        self.assertIsInstance(server.transport, ImmediateSendServer)
        server.transport.write(b"now")
        sock.settimeout(1.0)
        self.assertEqual(sock.recv(10), b"now")
        server.transport.loseConnection()
        await turn()


    @async_test
    async def test_accepts_ipv4_and_ipv6(self) -> None:
        """
        The listening socket's own accept gives each connection a
        non-blocking socket of the listener's family, and the factory the
        client's address.
        """
        from twisted.internet.protocol import Factory, Protocol

        from rproxy.transport import listen_tcp
        from tests.support import reactor

        accepted: list[Protocol] = []
        addresses: list[Any] = []

        class Hold(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        class Recording(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                addresses.append(addr)
                return Hold()

        for interface, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            accepted.clear()
            addresses.clear()
            try:
                port = listen_tcp(reactor, 0, Recording(), interface=interface)
            except Exception as e:  # noqa: BLE001 - a machine without IPv6
                raise SkipTest(f"cannot listen on {interface}: {e}") from None
            self.addCleanup(port.stopListening)
            sock = socket.create_connection((interface, port.getHost().port))
            self.addCleanup(sock.close)
            await wait_for(lambda: bool(accepted))
            transport = accepted[0].transport
            self.assertEqual(transport.socket.family, family)
            self.assertFalse(transport.socket.getblocking())
            self.assertEqual(addresses[0].host, interface)
            self.assertEqual(addresses[0].port, sock.getsockname()[1])
            transport.write(b"hi")
            sock.settimeout(1.0)
            self.assertEqual(sock.recv(10), b"hi")
            transport.loseConnection()
            await turn()

    @async_test
    async def test_registration_follows_pause_and_close(self) -> None:
        """
        The transport's own record of its reactor registration (which lets
        connectionLost skip undoing what is already undone) follows
        pauseProducing, resumeProducing, a buffered write and a close.
        """
        from twisted.internet.protocol import Factory, Protocol

        from rproxy.transport import listen_tcp
        from tests.support import reactor

        accepted: list[Protocol] = []
        lost: list[object] = []

        class Hold(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

            def connectionLost(self, reason: object = None) -> None:
                lost.append(reason)

        port = listen_tcp(reactor, 0, Factory.forProtocol(Hold), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        await wait_for(lambda: bool(accepted))
        transport = accepted[0].transport
        self.assertIn(transport, reactor.getReaders())
        transport.pauseProducing()
        self.assertNotIn(transport, reactor.getReaders())
        transport.resumeProducing()
        self.assertIn(transport, reactor.getReaders())
        # more than the socket takes at once: the rest waits for writability
        transport.write(b"x" * (8 << 20))
        self.assertIn(transport, reactor.getWriters())
        transport.loseConnection()
        # (read without blocking: the reactor runs in this thread)
        sock.setblocking(False)
        received, closed = 0, False

        def read() -> bool:
            nonlocal received, closed
            try:
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
                closed = True
            except BlockingIOError:
                pass
            return closed

        await wait_for(read, timeout=10)
        self.assertEqual(received, 8 << 20)
        await wait_for(lambda: bool(lost))
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())


class ProbeTests(ServiceMixin, TestCase):
    """
    The real probes against real servers on loopback.
    """

    @async_test
    async def test_http_probe_status_and_headers(self) -> None:
        """
        The http check sends the configured headers and passes only on the
        expected status.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from rproxy.config import HealthCheckConfig, ServerConfig
        from rproxy.health import ProbeFailed, http_probe
        from rproxy.pool import Server
        from tests.support import reactor

        seen: list[bytes | None] = []

        class Health(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                secret = request.getHeader(b"x-kv-secret")
                seen.append(secret)
                request.setResponseCode(200 if secret == b"s3cret" else 403)
                return b"ok"

        site = Site(Health())
        site.log = lambda request: None  # type: ignore[method-assign]
        port = await listen(site)
        self.addCleanup(port.stopListening)
        config = ServerConfig(name="w", address="x", host="127.0.0.1", port=port.getHost().port)
        server = Server(config, "web")
        good = HealthCheckConfig(type="http", path="/health", headers=(("X-KV-SECRET", "s3cret"),))
        await http_probe(reactor, server, good)
        bad = HealthCheckConfig(type="http", path="/health", headers=(("X-KV-SECRET", "wrong"),))
        with self.assertRaises(ProbeFailed) as caught:
            await http_probe(reactor, server, bad)
        self.assertEqual(str(caught.exception), "status 403, expected 200")
        self.assertEqual(seen, [b"s3cret", b"wrong"])

    @async_test
    async def test_tcp_checks_take_dead_server_down(self) -> None:
        """
        Active tcp checks mark a server whose port closed as down after
        fall checks, and back up after rise checks once it listens again.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from tests.support import EchoFactory, reactor

        factory, port = await self.backend("a")
        number = port.getHost().port
        data = backends_config(number)
        data["backends"][0]["health_check"] = {"type": "tcp", "interval": "50ms", "timeout": "1s",
                                               "rise": 2, "fall": 2, "jitter": 0}
        service = await self.start_service(data)
        server = service.pools["web"].servers[0]
        await port.stopListening()
        await wait_for(lambda: not server.up)
        self.assertEqual(server.down_reason.split(":")[0], "tcp check failed")
        again = await TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(EchoFactory("a"))
        self.addCleanup(again.stopListening)
        await wait_for(lambda: server.up)


    async def probe_and_watch_close(self, probe: Any, answer: bytes | None) -> Any:
        """
        Run C{probe} against a server that sends C{answer} (if any) once it
        has read a request head, and never closes first; return how the
        server saw the connection end.
        """
        from twisted.internet import defer, protocol

        from rproxy.config import HealthCheckConfig, ServerConfig
        from rproxy.pool import Server
        from tests.support import reactor

        ended: defer.Deferred[Any] = defer.Deferred()

        class Patient(protocol.Protocol):
            buffer = b""

            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                if answer is not None and b"\r\n\r\n" in self.buffer:
                    self.transport.write(answer)
                    self.buffer = b""

            def connectionLost(self, reason: Any = None) -> None:
                ended.callback([reason])

        factory = protocol.Factory.forProtocol(Patient)
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        config = ServerConfig(name="w", address="x", host="127.0.0.1", port=port.getHost().port)
        check = HealthCheckConfig(type="tcp" if answer is None else "http", timeout=5.0)
        await probe(reactor, Server(config, "web"), check)
        [reason] = await ended
        return reason

    @async_test
    async def test_tcp_probe_closes_with_fin(self) -> None:
        """
        A tcp check closes its connection with a FIN: the server reads a
        clean end of stream, not a reset (which servers log as an error).
        """
        from twisted.internet import error

        from rproxy.health import tcp_probe

        reason = await self.probe_and_watch_close(tcp_probe, None)
        self.assertTrue(reason.check(error.ConnectionDone), reason)

    @async_test
    async def test_http_probe_closes_cleanly(self) -> None:
        """
        An http check whose server answers and then waits for the client to
        close (with a body the check does not read) ends with a FIN both
        ways: the server reads a clean end of stream, not a reset.
        """
        from twisted.internet import error

        from rproxy.health import http_probe

        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000
        reason = await self.probe_and_watch_close(http_probe, answer)
        self.assertTrue(reason.check(error.ConnectionDone), reason)


    @async_test
    async def test_http_probe_cut_short_after_its_verdict(self) -> None:
        """
        A server that answers, then keeps the connection open past the
        client's FIN: when the check's time is up, the probe reports the
        verdict it reached and closes its connection (not left open).
        """
        from twisted.internet import error, protocol
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import implementer

        from rproxy.config import HealthCheckConfig, ServerConfig
        from rproxy.health import http_probe
        from rproxy.pool import Server
        from tests.support import reactor

        state: dict[str, Any] = {}

        @implementer(IHalfCloseableProtocol)
        class Stubborn(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                state["server"] = self
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

            def readConnectionLost(self) -> None:
                state["fin"] = True  # and stays open

            def connectionLost(self, reason: Any = None) -> None:
                state["lost"] = reason

        port = await listen(protocol.Factory.forProtocol(Stubborn))
        self.addCleanup(port.stopListening)
        config = ServerConfig(name="w", address="x", host="127.0.0.1", port=port.getHost().port)
        d = http_probe(reactor, Server(config, "web"), HealthCheckConfig(type="http", timeout=5.0))
        await wait_for(lambda: "fin" in state)
        self.assertNoResult(d)
        d.cancel()
        self.assertIsNone(self.successResultOf(d))

        def reset_seen() -> bool:
            # (the server no longer reads: it hears of the reset on writing)
            state["server"].transport.write(b"more")
            return "lost" in state

        await wait_for(reset_seen)
        self.assertTrue(state["lost"].check(error.ConnectionLost), state["lost"])


class ListenerTypesTests(ServiceMixin, TestCase):
    """
    Listen addresses are Twisted endpoint strings: unix: and ssl: work.
    """

    @async_test
    async def test_unix_listener(self) -> None:
        """A unix: frontend proxies to a TCP backend."""
        import os

        from twisted.internet.endpoints import UNIXClientEndpoint
        from twisted.internet.protocol import Factory

        from tests.support import reactor

        _, port = await self.backend("a")
        path = os.path.abspath(self.mktemp())
        data = backends_config(port.getHost().port)
        data["frontends"][0]["listen"] = f"unix:{path}"
        await self.start_service(data)
        client = Client()
        await UNIXClientEndpoint(reactor, path).connect(Factory.forProtocol(lambda: client))
        self.client_cleanup(client)
        self.assertEqual(await client.read_until(b"\n"), b"a\n")

    @async_test
    async def test_ssl_listener(self) -> None:
        """An ssl: frontend terminates TLS and splices the plain bytes."""
        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.internet.protocol import Factory

        from tests.support import reactor, self_signed_pem

        pem = os.path.abspath(self.mktemp())
        cert = self_signed_pem(pem)
        _, port = await self.backend("a")
        data = backends_config(port.getHost().port)
        data["frontends"][0]["listen"] = f"ssl:0:interface=127.0.0.1:privateKey={pem}"
        service = await self.start_service(data)
        client = Client()
        options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(cert)
        )
        await SSL4ClientEndpoint(reactor, "127.0.0.1", service.port_of("web"), options).connect(
            Factory.forProtocol(lambda: client)
        )
        self.client_cleanup(client)
        self.assertEqual(await client.read_until(b"\n"), b"a\n")
        client.transport.write(b"secret\n")
        self.assertEqual(await client.read_until(b"\n"), b"secret\n")
