"""
Unit tests of the connection-level features with string transports and
a memory reactor: config (rproxy.config.l4, key-path errors), the TCP
frontend's allow/deny, send_proxy, TLS passthrough and termination
reasons (rproxy.tcp), the L4 log lines (rproxy.l4log), protocol
detection (rproxy.detect).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, config_from_mapping
from rproxy.detect import DetectFrontend, classify
from rproxy.l4log import format_json, format_tcplog
from rproxy.pool import Pool
from rproxy.proxyproto import parse
from rproxy.tcp import TCPFrontend
from tests.test_clienthello import client_hello


def _backend(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return dict({"name": name, "servers": [{"address": f"127.0.0.1:{port}", "name": f"{name}1"}],
                 "health_check": {"type": "none"}}, **extra)


def _frontend(**extra: Any) -> dict[str, Any]:
    return dict({"name": "f", "listen": "tcp:0", "backend": "b"}, **extra)


def _errors(data: dict[str, Any]) -> list[str]:
    try:
        config_from_mapping(data)
    except ConfigError as e:
        return list(e.errors) if hasattr(e, "errors") else [str(e)]
    raise AssertionError("no ConfigError")


class ConfigTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """Every key read into its options."""
        config = config_from_mapping({
            "backends": [_backend("b", 1, send_proxy="v2"), _backend("c", 2)],
            "frontends": [
                _frontend(proxy_protocol={"timeout": "2s"}, access_log={"format": "json", "path": "/tmp/x.log"}),
                {"name": "p", "listen": "tcp:0", "tls_passthrough": {"sni": {"A.example": "b", "*.c.example": "c"},
                                                                   "default": "c", "timeout": "1s"}},
                {"name": "d", "protocol": "detect", "listen": "tcp:0",
                 "detect": {"http": "f", "default": "p", "timeout": "250ms"}},
            ],
        })
        f, p, d = config.frontends
        self.assertEqual(config.backends[0].send_proxy, "v2")
        self.assertIsNone(config.backends[1].send_proxy)
        self.assertEqual((f.proxy_protocol.timeout, f.proxy_protocol.sources), (2.0, None))
        sources = config_from_mapping({"backends": [_backend("b", 1)], "frontends": [
            _frontend(proxy_protocol={"from": ["10.0.0.0/8", "::1"]})]}).frontends[0].proxy_protocol.sources
        self.assertEqual([str(n) for n in sources], ["10.0.0.0/8", "::1/128"])
        self.assertEqual((f.l4_log.format, f.l4_log.path), ("json", "/tmp/x.log"))
        self.assertEqual(p.backend, "")
        self.assertEqual(p.tls_passthrough.backend_for("a.example"), "b")
        self.assertEqual(p.tls_passthrough.backend_for("x.c.example"), "c")
        self.assertEqual(p.tls_passthrough.backend_for("nope"), "c")
        self.assertEqual(d.detect.targets(), {"http": "f", "default": "p"})
        self.assertEqual(d.detect.timeout, 0.25)
        self.assertEqual(config_from_mapping({"backends": [_backend("b", 1)], "frontends": [
            _frontend(proxy_protocol=True, access_log="tcplog")]}).frontends[0].l4_log.format, "tcplog")

    def test_errors_name_the_key(self) -> None:
        """Wrong values: one error each, naming its key path."""
        cases = [
            ({"proxy_protocol": "yes"}, "frontends[0].proxy_protocol: expected true, false or {from: [10.0.0.0/8], "
                                        "timeout: 5s}"),
            ({"proxy_protocol": {"from": ["10.0.0.1/8"]}}, "frontends[0].proxy_protocol.from[0]: "),
            ({"proxy_protocol": {"from": "10.0.0.0/8"}}, "frontends[0].proxy_protocol.from: expected a list"),
            ({"proxy_protocol": {"timeout": 0}}, "frontends[0].proxy_protocol.timeout: expected a duration above zero"),
            ({"proxy_protocol": {"timout": "1s"}}, "frontends[0].proxy_protocol.timout: unknown key"),
            ({"access_log": {"format": "combined"}}, "frontends[0].access_log.format: 'combined' is not one of"),
            ({"detect": {"http": "f"}}, "frontends[0].detect: needs protocol: detect"),
            ({"tls_passthrough": {"sni": {"a.example": "nope"}}},
             "frontends[0].tls_passthrough.sni.a.example: no backend named 'nope'"),
            ({"tls_passthrough": {"sni": {"bad name": "b"}}}, "frontends[0].tls_passthrough.sni.bad name: "),
            ({"tls_passthrough": {"sni": ["a"]}}, "frontends[0].tls_passthrough.sni: expected a mapping"),
            ({"tls_passthrough": {}}, "frontends[0].tls_passthrough.sni: name at least one server name"),
            ({"protocol": "http", "tls_passthrough": {"default": "b"}}, "frontends[0].tls_passthrough: needs protocol: tcp"),
            ({"listen": "ssl:8443:privateKey=k.pem", "proxy_protocol": True},
             "frontends[0].proxy_protocol: the header comes before TLS"),
        ]
        for frontend, expected in cases:
            errors = _errors({"backends": [_backend("b", 1)], "frontends": [_frontend(**frontend)]})
            self.assertTrue(any(e.startswith(expected) for e in errors), (frontend, errors))
        errors = _errors({"backends": [_backend("b", 1, send_proxy="v3")], "frontends": [_frontend()]})
        self.assertTrue(any(e.startswith("backends[0].send_proxy: 'v3' is not one of v1, v2") for e in errors), errors)

    def test_detect_references(self) -> None:
        """detect names frontends that exist, are not detect, and can take TLS."""
        base = {"backends": [_backend("b", 1)]}
        errors = _errors(dict(base, frontends=[{"name": "d", "protocol": "detect", "listen": "tcp:0"}]))
        self.assertTrue(any(e.startswith("frontends[0].detect: required with protocol: detect") for e in errors))
        errors = _errors(dict(base, frontends=[
            _frontend(protocol="http"),
            {"name": "d", "protocol": "detect", "listen": "tcp:1", "detect": {"tls": "f", "http": "g", "default": "e"}},
            {"name": "e", "protocol": "detect", "listen": "tcp:2", "detect": {"default": "f"}},
        ]))
        self.assertIn("frontends[1].detect.tls: 'f' is an http frontend without tls: TLS connections need one that "
                      "terminates TLS (tls:) or a tcp frontend", errors)
        self.assertTrue(any(e.startswith("frontends[1].detect.http: no frontend named 'g'") for e in errors), errors)
        self.assertIn("frontends[1].detect.default: 'e' is itself a protocol: detect frontend", errors)


class HalfCloseTransport(StringTransport):
    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakeConn:
    client_host = "192.0.2.7"
    client_port = 5000
    accepted_at = 1764270721.5
    chosen_at = 1764270721.502
    connected_at = 1764270721.505
    backend_name = "db"
    server_name = "pg1"
    backend_received = 212
    received = 340
    termination = "server-closed"
    tried = ["pg0", "pg1"]

    class frontend:
        name = "front"


class L4LogFormatTests(SynchronousTestCase):
    def test_tcplog(self) -> None:
        """HAProxy's tcplog order, with both byte counts."""
        self.assertEqual(format_tcplog(FakeConn(), 1764270726.5),
                         "192.0.2.7:5000 [27/Nov/2025:19:12:01.500] front db/pg1 2/3/5000 212 340 server-closed 1")

    def test_ipv6_and_unreached(self) -> None:
        """IPv6 clients in brackets; steps not reached are -1."""
        conn = FakeConn()
        conn.client_host = "2001:db8::1"
        conn.connected_at = None  # type: ignore[assignment]
        conn.server_name = None  # type: ignore[assignment]
        line = format_tcplog(conn, 1764270721.6)
        self.assertTrue(line.startswith("[2001:db8::1]:5000 "), line)
        self.assertIn(" db/- 2/-1/100 ", line)

    def test_json(self) -> None:
        """The same fields as a JSON object, the accept time in ISO 8601 UTC."""
        record = json.loads(format_json(FakeConn(), 1764270726.5))
        self.assertEqual(record["accepted"], "2025-11-27T19:12:01.500Z")
        self.assertEqual((record["bytes_out"], record["bytes_in"], record["retries"]), (212, 340, 1))


class Logs:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.info]


class TCPFrontendTests(SynchronousTestCase):
    def make(self, frontend: dict[str, Any], *backends: dict[str, Any]) -> TCPFrontend:
        config = config_from_mapping({"backends": list(backends), "frontends": [frontend]})
        self.reactor = MemoryReactorClock()
        pools = {b.name: Pool(b, self.reactor) for b in config.backends}
        fc = config.frontends[0]
        self.frontend = TCPFrontend(fc, pools.get(fc.backend), self.reactor, self.reactor, pools=pools)
        return self.frontend

    def accept(self, host: str = "192.0.2.7", port: int = 5000) -> tuple[Any, StringTransport]:
        peer = address.IPv4Address("TCP", host, port)
        conn = self.frontend.buildProtocol(peer)
        transport = HalfCloseTransport(peerAddress=peer, hostAddress=address.IPv4Address("TCP", "10.0.0.1", 443))
        conn.makeConnection(transport)
        return conn, transport

    def server_side(self, index: int = 0) -> tuple[Any, StringTransport, int]:
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        backend = factory.buildProtocol(address.IPv4Address("TCP", host, port))
        transport = HalfCloseTransport()
        backend.makeConnection(transport)
        return backend, transport, port

    def test_send_proxy_first(self) -> None:
        """send_proxy: v1 writes the client's header before its early bytes."""
        self.make(_frontend(), _backend("b", 7001, send_proxy="v1"))
        conn, _ = self.accept()
        conn.dataReceived(b"early")
        _, server, _ = self.server_side()
        self.assertEqual(server.value(), b"PROXY TCP4 192.0.2.7 10.0.0.1 5000 443\r\nearly")

    def test_send_proxy_v2(self) -> None:
        """send_proxy: v2 writes a binary header naming the client, and nothing else yet."""
        self.make(_frontend(), _backend("b", 7001, send_proxy="v2"))
        self.accept()
        _, server, _ = self.server_side()
        header, length = parse(server.value())  # type: ignore[misc]
        self.assertEqual((header.source, length), (("192.0.2.7", 5000), len(server.value())))

    def test_denied_before_any_connect(self) -> None:
        """A denied client is aborted in connectionMade: no connect, counted, one line."""
        logs = Logs(self)
        frontend = self.make(_frontend(allow=["10.0.0.0/8"]), _backend("b", 7001))
        conn, transport = self.accept()
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual((frontend.denied_total, conn.termination, frontend.total), (1, "refused-acl", 0))
        self.assertEqual(logs.lines(), ["frontend f: refusing 192.0.2.7:5000: not allowed by allow/deny"])
        self.accept("10.1.2.3")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def passthrough(self, **extra: Any) -> TCPFrontend:
        passthrough = dict({"sni": {"a.example": "a", "*.b.example": "b"}}, **extra)
        return self.make({"name": "f", "listen": "tcp:0", "tls_passthrough": passthrough},
                         _backend("a", 7001), _backend("b", 7002), _backend("c", 7003))

    def test_passthrough_by_sni(self) -> None:
        """The ClientHello's SNI picks the backend, even split over reads; the bytes go on untouched."""
        self.passthrough()
        hello = client_hello("x.b.example")
        conn, _ = self.accept()
        conn.dataReceived(hello[:10])
        self.assertEqual(self.reactor.tcpClients, [])
        conn.dataReceived(hello[10:])
        _, server, port = self.server_side()
        self.assertEqual(port, 7002)
        self.assertEqual(server.value(), hello)
        self.assertIsNone(conn.hello_timer)

    def test_passthrough_hello_in_tiny_records(self) -> None:
        """
        A ClientHello sent as one-byte records, one read each, is parsed
        once: each read only moves the record count on (the work grows with
        the ClientHello's size, not its square).
        """
        from rproxy import passthrough

        self.passthrough()
        hello = client_hello("a.example")
        message = hello[5:]  # (OpenSSL's ClientHello: one record)
        records = [b"\x16\x03\x01\x00\x01" + message[i: i + 1] for i in range(len(message))]
        parsed: list[int] = []

        def counting(data: bytes, limit: int) -> Any:
            parsed.append(len(data))
            return read_client_hello(data, limit)

        read_client_hello = passthrough.read_client_hello
        self.patch(passthrough, "read_client_hello", counting)
        conn, _ = self.accept()
        for record in records:
            conn.dataReceived(record)
        _, server, port = self.server_side()
        self.assertEqual(port, 7001)
        self.assertEqual(server.value(), b"".join(records))
        self.assertEqual(parsed, [len(b"".join(records))])

    def test_passthrough_bad_record_at_once(self) -> None:
        """
        A record that is not a handshake record, after good ones, is
        refused when it arrives (bad-hello), not at the timeout.
        """
        self.passthrough()
        conn, transport = self.accept()
        conn.dataReceived(b"\x16\x03\x01\x00\x01\x01")
        self.assertFalse(transport.disconnecting)
        conn.dataReceived(b"\x17")
        self.assertEqual(conn.termination, "bad-hello")

    def test_passthrough_no_match_closes(self) -> None:
        """No route and no default: closed with one line; then a default takes it."""
        logs = Logs(self)
        frontend = self.passthrough()
        conn, transport = self.accept()
        conn.dataReceived(client_hello("z.example"))
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(conn.termination, "no-route")
        self.assertEqual(logs.lines(), ["frontend f: closing 192.0.2.7:5000: no backend for server name 'z.example'"])
        self.assertEqual(frontend.routed["-"], 1)
        self.passthrough(default="c")
        conn, _ = self.accept()
        conn.dataReceived(b"\x00 not tls at all")
        self.assertEqual(self.server_side()[2], 7003)

    def test_passthrough_timeout(self) -> None:
        """An incomplete ClientHello past the timeout: closed (bad-hello), one line."""
        logs = Logs(self)
        self.passthrough(timeout="2s")
        conn, transport = self.accept()
        conn.dataReceived(client_hello("a.example")[:20])
        self.reactor.advance(2.1)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(conn.termination, "bad-hello")
        self.assertEqual(logs.lines(), ["frontend f: closing 192.0.2.7:5000: no complete ClientHello within 2s"])

    def test_log_reopened(self) -> None:
        """
        The tcplog file is reopened by reopen_access_log (and a reload):
        after a rotation lines go to the new file.
        """
        import os

        path = self.mktemp()
        frontend = self.make(_frontend(access_log={"format": "tcplog", "path": path}), _backend("b", 7001))
        conn, _ = self.accept()
        conn.connectionLost(None)
        frontend.l4_log.file.flush()
        os.rename(path, path + ".1")
        frontend.reopen_access_log()
        conn, _ = self.accept("192.0.2.8")
        conn.connectionLost(None)
        frontend.l4_log.file.flush()
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual([line.split()[0] for line in old], ["192.0.2.7:5000"])
            self.assertEqual([line.split()[0] for line in new], ["192.0.2.8:5000"])
        frontend.config = frontend.config  # a reload keeps the file (reopened)
        self.assertEqual(frontend.l4_log.path, path)

    def test_connect_timeout_fails_over_then_closes(self) -> None:
        """
        A connect the server never answers times out on the clock (a
        PendingConnect on a real socket to a listener that never accepts):
        the failure counts against the server and the frontend, the next
        server is tried, and once retries run out the client is closed with
        one line (a timeout is a UserError to Twisted, and was taken for our
        own cancel: the client hung until the idle timeout, uncounted).
        """
        from rproxy import transport
        from tests.test_transport import FakeReactor

        ports = []
        for _ in range(2):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            self.addCleanup(listener.close)
            ports.append(listener.getsockname()[1])
        self.patch(transport, "supports_immediate_send", lambda reactor: True)
        backend = _backend("b", ports[0])
        backend["servers"].append({"address": f"127.0.0.1:{ports[1]}", "name": "b2"})
        config = config_from_mapping({"backends": [backend],
                                      "frontends": [_frontend(retries=1, connect_timeout="3s")]})
        reactor = FakeReactor()
        pool = Pool(config.backends[0], reactor)
        frontend = self.frontend = TCPFrontend(config.frontends[0], pool, reactor, reactor)
        logs = Logs(self)
        conn, client = self.accept()
        self.assertEqual(len(reactor.writers), 1)
        reactor.advance(2.9)
        self.assertEqual(frontend.connect_errors, 0)
        reactor.advance(0.1)
        self.assertEqual((frontend.connect_errors, len(reactor.writers), client.disconnecting), (1, 1, False))
        reactor.advance(3)
        self.assertEqual([s.connect_failures for s in pool.servers], [1, 1])
        self.assertEqual((frontend.connect_errors, conn.termination), (2, "connect-failed"))
        self.assertTrue(client.disconnecting or client.disconnected)
        self.assertEqual(reactor.writers, set())
        self.assertEqual(logs.lines(), ["frontend f: closing 192.0.2.7:5000: connecting to b2 failed: "
                                        "User timeout caused connection failure."])

    def test_terminations(self) -> None:
        """Who ended it: the client's FIN, the server's, the idle sweep, a drain."""
        self.make(_frontend(idle_timeout="4s"), _backend("b", 7001))
        conn, _ = self.accept()
        backend, _, _ = self.server_side()
        conn.readConnectionLost()
        backend.readConnectionLost()
        self.assertEqual(conn.termination, "client-closed")
        conn, _ = self.accept()
        backend, _, _ = self.server_side(1)
        backend.readConnectionLost()
        self.assertEqual(conn.termination, "server-closed")
        conn, _ = self.accept()
        self.server_side(2)
        self.reactor.pump([1.0] * 6)
        self.assertEqual(conn.termination, "timeout")
        conn, _ = self.accept()
        self.frontend.drain(1)
        self.reactor.advance(1.1)
        self.assertEqual(conn.termination, "drained")


class RecordingProtocol(Protocol):
    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Target(Factory):
    def __init__(self, name: str) -> None:
        self.name = name
        self.built: list[RecordingProtocol] = []

        class config:
            tls = ()

        self.config = config

    def buildProtocol(self, addr: Any) -> RecordingProtocol:
        p = RecordingProtocol(addr)
        self.built.append(p)
        return p


class DetectTests(SynchronousTestCase):
    def test_classify(self) -> None:
        """TLS by its record header, HTTP by a method and a space, else default; undecided prefixes wait."""
        cases = {
            b"": None, b"\x16": None, b"\x16\x03": "tls", b"G": None, b"GE": None, b"GET": None, b"GET ": "http",
            b"OPTIONS * HTTP/1.1": "http", b"PRI * HTTP/2.0": "http", b"GETX": "default", b"SSH-2.0-x": "default",
            b"\x16\x01": "default", b"*1\r\n$4\r\nPING": "default", b"get /": "default",
        }
        for data, expected in cases.items():
            self.assertEqual(classify(data), expected, data)
        self.assertEqual(classify(b"P", max_bytes=1), "default")

    def make(self, **detect: Any) -> DetectFrontend:
        config = config_from_mapping({"backends": [_backend("b", 1)], "frontends": [
            {"name": "one", "protocol": "detect", "listen": "tcp:0", "detect": detect},
            _frontend(name="t"), _frontend(name="h"), _frontend(name="d")]})
        self.reactor = MemoryReactorClock()
        self.targets = {n: Target(n) for n in ("t", "h", "d")}
        return DetectFrontend(config.frontends[0], self.targets, self.reactor)

    def accept(self, frontend: DetectFrontend) -> tuple[Any, StringTransport]:
        peer = address.IPv4Address("TCP", "192.0.2.7", 5000)
        p = frontend.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        p.makeConnection(transport)
        return p, transport

    def test_handed_over_with_its_bytes(self) -> None:
        """HTTP goes to the http frontend with every byte peeked; the slot is given back."""
        frontend = self.make(http="h", default="d")
        p, _ = self.accept(frontend)
        p.dataReceived(b"GE")
        self.assertEqual(self.targets["h"].built, [])
        p.dataReceived(b"T / HTTP/1.1\r\n")
        [inner] = self.targets["h"].built
        self.assertEqual(inner.data, b"GET / HTTP/1.1\r\n")
        self.assertEqual(inner.addr, address.IPv4Address("TCP", "192.0.2.7", 5000))
        p.dataReceived(b"more")
        self.assertEqual(inner.data, b"GET / HTTP/1.1\r\nmore")
        self.assertEqual((frontend.active, frontend.detected["http"]), (0, 1))
        self.assertEqual(frontend.deadlines.pending, {})

    def test_silence_goes_to_default(self) -> None:
        """Nothing within the timeout: the default frontend (a server that speaks first)."""
        frontend = self.make(tls="t", default="d", timeout="1s")
        self.accept(frontend)
        self.reactor.pump([0.1] * 10)
        self.assertEqual(self.targets["d"].built, [])
        self.reactor.pump([0.1] * 3)
        self.assertEqual(len(self.targets["d"].built), 1)
        self.assertEqual(frontend.detected["default"], 1)

    def test_no_frontend_closes(self) -> None:
        """A kind with no frontend (and no default): closed, one line."""
        logs = Logs(self)
        frontend = self.make(http="h")
        p, transport = self.accept(frontend)
        p.dataReceived(b"\x16\x03\x01")
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(logs.lines(), ["frontend one: closing 192.0.2.7:5000: tls and no frontend for it"])
        self.assertEqual(frontend.detected["closed"], 1)
        p.connectionLost(None)
        self.assertEqual(frontend.connections, set())

    def test_queued_while_full(self) -> None:
        """Past max_connections it waits unread (paused), then peeks once admitted."""
        config = config_from_mapping({"backends": [_backend("b", 1)], "frontends": [
            {"name": "one", "protocol": "detect", "listen": "tcp:0", "max_connections": 1,
             "detect": {"default": "d", "timeout": "1s"}}, _frontend(name="d")]})
        self.reactor = MemoryReactorClock()
        self.targets = {"d": Target("d")}
        frontend = DetectFrontend(config.frontends[0], self.targets, self.reactor)
        first, _ = self.accept(frontend)
        second, transport = self.accept(frontend)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(frontend.waiting), 1)
        first.dataReceived(b"x")  # hand the first over: its slot frees
        first.dataReceived(b"y" * 20)
        self.assertEqual(transport.producerState, "producing")
        second.dataReceived(b"SSH-2.0-OpenSSH\r\n")
        self.assertEqual([t.data for t in self.targets["d"].built], [b"x" + b"y" * 20, b"SSH-2.0-OpenSSH\r\n"])


    def test_allow_deny_at_accept(self) -> None:
        """
        allow/deny on a detect frontend close a refused client at accept
        (nothing admitted, read or handed over), one line, counted; with
        the PROXY protocol the header's address is the one checked.
        """
        from rproxy.handoff import ProxyProtocolFactory

        logs = Logs(self)
        config = config_from_mapping({"backends": [_backend("b", 1)], "frontends": [
            {"name": "one", "protocol": "detect", "listen": "tcp:0", "deny": ["192.0.2.0/24"],
             "detect": {"default": "d", "timeout": "1s"}}, _frontend(name="d")]})
        self.reactor = MemoryReactorClock()
        self.targets = {"d": Target("d")}
        frontend = DetectFrontend(config.frontends[0], self.targets, self.reactor)
        p, transport = self.accept(frontend)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        p.dataReceived(b"SSH-2.0-x\r\n")
        p.connectionLost(None)
        self.reactor.advance(2)
        self.assertEqual((frontend.denied_total, self.targets["d"].built, frontend.total), (1, [], 0))
        self.assertEqual(logs.lines(), ["frontend one: refusing 192.0.2.7:5000: not allowed by allow/deny"])
        # behind a PROXY header: the client it names is judged, not the proxy
        layer = ProxyProtocolFactory(frontend, self.reactor, 1.0, "one")
        for client, refused in (("192.0.2.9", True), ("198.51.100.1", False)):
            peer = address.IPv4Address("TCP", "10.0.0.1", 4000)
            receiver = layer.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            receiver.makeConnection(transport)
            receiver.dataReceived(f"PROXY TCP4 {client} 10.0.0.2 5000 443\r\nSSH-2.0-x\r\n".encode())
            self.assertEqual(transport.disconnecting, refused, client)
        self.assertEqual(frontend.denied_total, 2)
        self.assertEqual([t.data for t in self.targets["d"].built], [b"SSH-2.0-x\r\n"])


class ShippedExampleTests(SynchronousTestCase):
    def test_commented_keys_parse(self) -> None:
        """etc/rproxy.yaml's commented L4 keys, uncommented, are valid."""
        import os

        from rproxy.config import load_config

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "etc", "rproxy.yaml")) as f:
            text = f.read()
        keys = ("send_proxy:", "proxy_protocol:", "allow:", "access_log: {format: tcplog", "tls_passthrough:")
        lines = [line.replace("# ", "", 1) if line.startswith("    # ") and line[6:].startswith(keys) else line
                 for line in text.splitlines()]
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        config = load_config(path)
        web = config.frontends[0]
        self.assertEqual((web.proxy_protocol is not None, web.l4_log.format, web.tls_passthrough.default),
                         (True, "tcplog", "web"))
        self.assertEqual(config.backend("web").send_proxy, "v2")
