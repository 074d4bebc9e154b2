"""
End-to-end tests on loopback of the connection-level features: the PROXY
protocol accepted and sent, allow/deny on tcp frontends, the L4 access
log, one port for several protocols (protocol: detect) and TLS
passthrough by SNI.  HAProxy itself is in tests/test_haproxy.py.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from typing import Any

from twisted.internet import protocol, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from rproxy.proxyproto import build_v1, build_v2, parse
from tests.support import (
    Client,
    EchoFactory,
    ServiceMixin,
    async_test,
    connect,
    listen,
    turn,
    wait_for,
)


class HeaderRecorder(protocol.Protocol):
    """
    A server that records what it reads; with C{answer_http}, answers each
    connection's first request (after any PROXY header) with 200 and the
    header it got as the body.
    """

    def connectionMade(self) -> None:
        self.data = b""
        self.factory.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.factory.answer_http and b"\r\n\r\n" in self.data:
            parsed = parse(self.data) if self.data[:1] in (b"P", b"\r") else None
            body = json.dumps(parsed[0].source if parsed else None).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.data = b""


class RecorderFactory(protocol.Factory):
    protocol = HeaderRecorder
    noisy = False

    def __init__(self, answer_http: bool = False) -> None:
        self.conns: list[HeaderRecorder] = []
        self.answer_http = answer_http


class LogCapture:
    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str = "") -> list[str]:
        out = []
        for e in self.events:
            if e.get("log_level") in (LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
                text = formatEvent(e)
                if containing in text:
                    out.append(text)
        return out

    def failures(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_failure") is not None]


def tcp_config(server_ports: list[int], frontend: dict[str, Any] | None = None, **backend: Any) -> dict[str, Any]:
    b = {"name": "web", "servers": [{"address": f"127.0.0.1:{p}", "name": f"s{i}"}
                                    for i, p in enumerate(server_ports)],
         "health_check": {"type": "none"}}
    b.update(backend)
    f = {"name": "web", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"}
    f.update(frontend or {})
    return {"backends": [b], "frontends": [f]}


class ProxyProtocolTests(ServiceMixin, TestCase):
    timeout = 60

    async def client(self, port: int) -> Client:
        client = await connect(port)
        self.client_cleanup(client)
        return client

    @async_test
    async def test_tcp_accepts_and_sends(self) -> None:
        """
        A tcp frontend with proxy_protocol reads the client's v1 header;
        its backend (send_proxy: v2) gets a v2 header naming that client,
        then the client's bytes; answers flow back.
        """
        recorder = RecorderFactory()
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        service = await self.start_service(tcp_config([port.getHost().port], {"proxy_protocol": True},
                                                      send_proxy="v2"))
        client = await self.client(service.port_of("web"))
        client.transport.write(build_v1(("203.0.113.9", 41000), ("198.51.100.1", 443)) + b"hello")
        await wait_for(lambda: recorder.conns and recorder.conns[0].data.endswith(b"hello"))
        data = recorder.conns[0].data
        header, length = parse(data)  # type: ignore[misc]
        self.assertEqual((header.version, header.source, header.destination),
                         (2, ("203.0.113.9", 41000), ("198.51.100.1", 443)))
        self.assertEqual(data[length:], b"hello")
        recorder.conns[0].transport.write(b"back")
        await client.read_until(b"back")
        self.assertEqual(service.frontends["web"].proxy_protocol.accepted, 1)

    @async_test
    async def test_reload_turns_it_on_and_off(self) -> None:
        """A reload that turns proxy_protocol on or off keeps the listener and applies to the next connection."""
        from rproxy.config import config_from_mapping

        echo = EchoFactory("a")
        port = await listen(echo)
        self.addCleanup(port.stopListening)
        config = tcp_config([port.getHost().port])
        service = await self.start_service(config)
        front = service.port_of("web")
        before = await self.client(front)
        await before.read_until(b"a\n")
        config["frontends"][0].update(listen=f"tcp:{front}:interface=127.0.0.1", proxy_protocol=True)
        extra = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}, "global": {"grace_period": "2s"}}
        await service.reload(config_from_mapping(dict(config, **extra)))
        self.assertEqual(service.port_of("web"), front)
        plain = await self.client(front)
        plain.transport.write(b"hello")
        await plain.closed  # no header now: refused
        proxied = await self.client(front)
        proxied.transport.write(build_v1(("203.0.113.9", 1), ("127.0.0.1", front)))
        await proxied.read_until(b"a\n")
        del config["frontends"][0]["proxy_protocol"]
        await service.reload(config_from_mapping(dict(config, **extra)))
        again = await self.client(front)
        await again.read_until(b"a\n")
        self.assertFalse(before.lost)  # the connection from before the reloads is still served

    @async_test
    async def test_send_v1_without_incoming_header(self) -> None:
        """send_proxy: v1 names the socket's client (127.0.0.1 and its port)."""
        recorder = RecorderFactory()
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        service = await self.start_service(tcp_config([port.getHost().port], send_proxy="v1"))
        client = await self.client(service.port_of("web"))
        client.transport.write(b"x")
        await wait_for(lambda: recorder.conns and recorder.conns[0].data.endswith(b"x"))
        local = client.transport.getHost()
        expected = f"PROXY TCP4 127.0.0.1 127.0.0.1 {local.port} {service.port_of('web')}\r\nx".encode()
        self.assertEqual(recorder.conns[0].data, expected)

    @async_test
    async def test_malformed_and_missing(self) -> None:
        """
        No header (plain bytes) or none in time: the connection is closed,
        nothing reaches a server, one line each with the reason, no
        traceback.
        """
        recorder = RecorderFactory()
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        logs = LogCapture(self)
        service = await self.start_service(tcp_config([port.getHost().port],
                                                      {"proxy_protocol": {"timeout": "0.3s"}}))
        client = await self.client(service.port_of("web"))
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        await client.closed
        late = await self.client(service.port_of("web"))
        late.transport.write(b"PROXY TCP4 1.2.3.4")
        await late.closed
        self.assertEqual(recorder.conns, [])
        self.assertEqual(len(logs.lines("no PROXY header: the connection starts with")), 1)
        self.assertEqual(len(logs.lines("no complete PROXY header within 0.3s")), 1)
        self.assertEqual(logs.failures(), [])
        self.assertEqual(service.frontends["web"].proxy_protocol.rejected, 2)
        self.assertIn('rproxy_frontend_proxy_protocol_total{frontend="web",result="rejected"} 2.0', _metrics(service))

    @async_test
    async def test_http_frontend_uses_real_address(self) -> None:
        """
        On an http frontend the header's address is the client's:
        X-Forwarded-For carries it; send_proxy on the HTTP backend sends it.
        """
        recorder = RecorderFactory(answer_http=True)
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        config = tcp_config([port.getHost().port], {"protocol": "http", "proxy_protocol": True}, send_proxy="v1")
        service = await self.start_service(config)
        client = await self.client(service.port_of("web"))
        client.transport.write(build_v2(("2001:db8::5", 7000), ("2001:db8::1", 80))
                               + b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        self.assertIn(b"200", head)
        await wait_for(lambda: b"]" in client.data)
        self.assertEqual(json.loads(bytes(client.data)), ["2001:db8::5", 7000])
        # a second request on the same client connection
        client.data.clear()
        client.transport.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.read_until(b"]")
        self.assertEqual(len(recorder.conns), 2)  # a connection of its own per request (send_proxy)

    @async_test
    async def test_http_x_forwarded_for(self) -> None:
        """X-Forwarded-For is the address from the PROXY header."""
        recorder = RecorderFactory()
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        service = await self.start_service(tcp_config([port.getHost().port],
                                                      {"protocol": "http", "proxy_protocol": True}))
        client = await self.client(service.port_of("web"))
        client.transport.write(b"PROXY TCP4 192.0.2.44 192.0.2.1 5555 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: recorder.conns and b"\r\n\r\n" in recorder.conns[0].data)
        self.assertIn(b"x-forwarded-for: 192.0.2.44", recorder.conns[0].data.lower())


class AccessTests(ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_denied_at_accept(self) -> None:
        """
        A client the deny list holds is closed at accept: no server
        connection, one line, counted; the L4 log says refused-acl.
        """
        echo = EchoFactory("a")
        port = await listen(echo)
        self.addCleanup(port.stopListening)
        logs = LogCapture(self)
        service = await self.start_service(tcp_config([port.getHost().port], {"deny": ["127.0.0.0/8"],
                                                                              "access_log": "tcplog"}))
        client = await connect(service.port_of("web"))
        await client.closed
        self.assertEqual(client.data, b"")
        self.assertEqual(service.frontends["web"].denied_total, 1)
        self.assertEqual(len(logs.lines("not allowed by allow/deny")), 1)
        self.assertEqual(len(logs.lines(" refused-acl ")), 1)
        self.assertEqual(service.stats()["pools"][0]["backends"][0]["total_connections"], 0)
        text = _metrics(service)
        self.assertIn('rproxy_frontend_denied_total{frontend="web"} 1.0', text)

    @async_test
    async def test_allow_checks_proxied_address(self) -> None:
        """With proxy_protocol, allow/deny look at the header's address."""
        echo = EchoFactory("a")
        port = await listen(echo)
        self.addCleanup(port.stopListening)
        service = await self.start_service(tcp_config([port.getHost().port], {
            "proxy_protocol": True, "allow": ["203.0.113.0/24"]}))
        good = await connect(service.port_of("web"))
        self.addCleanup(lambda: good.transport.abortConnection())
        good.transport.write(build_v1(("203.0.113.9", 1), ("127.0.0.1", 2)))
        self.assertEqual(await good.read_until(b"a\n"), b"a\n")
        bad = await connect(service.port_of("web"))
        bad.transport.write(build_v1(("198.51.100.9", 1), ("127.0.0.1", 2)))
        await bad.closed
        self.assertEqual(bad.data, b"")
        self.assertEqual(service.frontends["web"].denied_total, 1)


async def _admin_get(service: Any, path: str) -> tuple[int, bytes]:
    client = await connect(service.admin_port.getHost().port)
    client.transport.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await client.closed
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _metrics(service: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(service.registry).decode()


class L4LogTests(ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_tcplog_and_json(self) -> None:
        """
        One line per connection: client, frontend, backend/server, times,
        bytes both ways, termination (client-closed, server-closed,
        connect-failed); JSON lines are JSON.
        """
        echo = EchoFactory("a")
        port = await listen(echo)
        self.addCleanup(port.stopListening)
        dead = await listen(EchoFactory("dead"))
        dead_port = dead.getHost().port
        await dead.stopListening()
        directory = tempfile.mkdtemp()
        tcplog, jsonlog = os.path.join(directory, "tcp.log"), os.path.join(directory, "json.log")
        config = tcp_config([port.getHost().port], {"access_log": {"format": "tcplog", "path": tcplog}})
        config["backends"].append({"name": "dead", "servers": [f"127.0.0.1:{dead_port}"],
                                   "health_check": {"type": "none"}})
        config["frontends"].append({"name": "j", "listen": "tcp:0:interface=127.0.0.1", "backend": "web",
                                    "access_log": {"format": "json", "path": jsonlog}})
        config["frontends"].append({"name": "d", "listen": "tcp:0:interface=127.0.0.1", "backend": "dead",
                                    "retries": 0, "access_log": {"format": "json", "path": jsonlog}})
        service = await self.start_service(config)
        # client closes
        client = await connect(service.port_of("web"))
        client_port = client.transport.getHost().port
        await client.read_until(b"a\n")
        client.transport.write(b"12345")
        await client.read_until(b"12345")
        client.transport.loseConnection()
        await client.closed
        await wait_for(lambda: os.path.exists(tcplog) and os.path.getsize(tcplog) > 0)
        with open(tcplog) as f:
            [line] = f.read().splitlines()
        fields = line.split()
        self.assertEqual(fields[0], f"127.0.0.1:{client_port}")
        self.assertEqual(fields[2:4], ["web", "web/s0"])
        # out: "a\n", "12345", "bye" (the echo server answers a FIN so); in: "12345"
        self.assertEqual(fields[5:8], ["10", "5", "client-closed"])
        # server closes (json)
        client = await connect(service.port_of("j"))
        await client.read_until(b"a\n")
        for conn in list(echo.connections):
            conn.transport.loseConnection()
        await client.closed
        # connect fails
        client = await connect(service.port_of("d"))
        await client.closed
        await wait_for(lambda: os.path.exists(jsonlog) and len(open(jsonlog).read().splitlines()) == 2)
        with open(jsonlog) as f:
            records = [json.loads(line) for line in f.read().splitlines()]
        by_frontend = {r["frontend"]: r for r in records}
        self.assertEqual(by_frontend["j"]["termination"], "server-closed")
        self.assertEqual((by_frontend["j"]["bytes_out"], by_frontend["j"]["server"]), (2, "s0"))
        self.assertEqual(by_frontend["d"]["termination"], "connect-failed")
        self.assertEqual(by_frontend["d"]["connect_ms"], -1)
        self.assertEqual(set(by_frontend["d"]), {"client", "client_port", "accepted", "frontend", "backend", "server",
                                                 "wait_ms", "connect_ms", "duration_ms", "bytes_out", "bytes_in",
                                                 "termination", "retries"})


def _write_pair(directory: str, name: str) -> tuple[str, bytes]:
    from rproxy.tls import self_signed

    cert, key = self_signed(name, days=1)
    path = os.path.join(directory, f"{name.replace('*', 'star')}.pem")
    with open(path, "wb") as f:
        f.write(key + cert)
    return path, cert


class TLSNamed(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.name.encode() + b"\n")


class NamedFactory(protocol.Factory):
    protocol = TLSNamed
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name


async def _tls_server(test: TestCase, path: str, name: str) -> int:
    # (rproxy's TLS server: Twisted's own answers clients offering ALPN
    # with an internal_error alert)
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from rproxy.tls import TLSServerEndpoint

    endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), [(path, path)])
    port = await endpoint.listen(NamedFactory(name))
    test.addCleanup(port.stopListening)
    return port.getHost().port  # type: ignore[no-any-return]


def _tls_fetch(port: int, server_name: str | None, alpn: list[str] | None = None) -> tuple[str, str]:
    """
    (the first line the server wrote, the CN of its certificate), over a
    real TLS connection made by Python's ssl in a thread.
    """
    import socket

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            from cryptography import x509

            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            cn = cert.subject.rfc4514_string()
            line = b""
            while not line.endswith(b"\n"):
                chunk = tls.recv(100)
                if not chunk:
                    break
                line += chunk
    return line.decode().strip(), cn


class PassthroughTests(ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_routes_by_sni(self) -> None:
        """
        Two TLS servers with different certificates behind one tcp
        frontend: a real TLS client reaches the one its SNI names (exact
        and wildcard), the default for other names and none; TLS is not
        terminated (the client sees the server's own certificate).
        """
        from twisted.internet import threads

        directory = tempfile.mkdtemp()
        a_path, _ = _write_pair(directory, "a.example")
        b_path, _ = _write_pair(directory, "x.b.example")
        c_path, _ = _write_pair(directory, "c.example")
        ports = {n: await _tls_server(self, p, n) for n, p in (("A", a_path), ("B", b_path), ("C", c_path))}
        config = {
            "backends": [{"name": f"backend-{n.lower()}", "servers": [f"127.0.0.1:{p}"],
                          "health_check": {"type": "none"}} for n, p in ports.items()],
            "frontends": [{"name": "tls", "listen": "tcp:0:interface=127.0.0.1", "access_log": "tcplog",
                           "tls_passthrough": {"sni": {"a.example": "backend-a", "*.b.example": "backend-b"},
                                               "default": "backend-c"}}],
        }
        logs = LogCapture(self)
        service = await self.start_service(config)
        front = service.port_of("tls")
        answers = {}
        for name in ("a.example", "x.b.example", "A.EXAMPLE", "other.example", None, "y.x.b.example"):
            answers[name] = await threads.deferToThread(_tls_fetch, front, name, ["h2", "http/1.1"])
        self.assertEqual(answers["a.example"], ("A", "CN=a.example"))
        self.assertEqual(answers["A.EXAMPLE"], ("A", "CN=a.example"))
        self.assertEqual(answers["x.b.example"], ("B", "CN=x.b.example"))
        self.assertEqual(answers["other.example"], ("C", "CN=c.example"))
        self.assertEqual(answers[None], ("C", "CN=c.example"))
        self.assertEqual(answers["y.x.b.example"], ("C", "CN=c.example"))  # a wildcard is one label
        routed = service.frontends["tls"].routed
        self.assertEqual((routed["backend-a"], routed["backend-b"], routed["backend-c"]), (2, 1, 3))
        await wait_for(lambda: len(logs.lines(" backend-a/")) == 2)
        self.assertIn('rproxy_frontend_tls_passthrough_total{backend="backend-a",frontend="tls"} 2.0',
                      _metrics(service))

    @async_test
    async def test_malformed_hello(self) -> None:
        """
        Without a default, a connection whose first bytes are no
        ClientHello is closed with one line; with curl --resolve a real
        client still reaches its server.
        """
        directory = tempfile.mkdtemp()
        a_path, a_cert = _write_pair(directory, "a.example")
        a_port = await _tls_server(self, a_path, "A")
        logs = LogCapture(self)
        service = await self.start_service({
            "backends": [{"name": "backend-a", "servers": [f"127.0.0.1:{a_port}"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "tls", "listen": "tcp:0:interface=127.0.0.1",
                           "tls_passthrough": {"sni": {"a.example": "backend-a"}, "timeout": "0.5s"}}],
        })
        front = service.port_of("tls")
        client = await connect(front)
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        await client.closed
        self.assertEqual(len(logs.lines("not a TLS ClientHello")), 1)
        slow = await connect(front)
        slow.transport.write(b"\x16\x03\x01")
        await slow.closed
        self.assertEqual(len(logs.lines("no complete ClientHello within 0.5s")), 1)
        self.assertEqual(logs.failures(), [])
        # curl, a real client, by name
        from twisted.internet.utils import getProcessOutputAndValue

        ca = os.path.join(directory, "a.crt")
        with open(ca, "wb") as f:
            f.write(a_cert)
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/curl", ["-sS", "--max-time", "10", "--cacert", ca, "--resolve", f"a.example:{front}:127.0.0.1",
                              "-o", "/dev/null", "-w", "%{ssl_verify_result}", f"https://a.example:{front}/"])
        # the server is no HTTP server: curl fails after the handshake
        # (code 8 or 52/56), but the certificate it verified is a.example's
        self.assertEqual(out, b"0", err)


class DetectTests(ServiceMixin, TestCase):
    timeout = 60

    @async_test
    async def test_one_port(self) -> None:
        """
        protocol: detect hands TLS to a TLS-terminating tcp frontend, HTTP
        to an http frontend, anything else (and silence past the timeout)
        to a plain tcp frontend.
        """
        from twisted.internet import threads

        from tests.test_e2e_http import Backend, CountingSite

        echo = EchoFactory("plain")
        echo_port = await listen(echo)
        self.addCleanup(echo_port.stopListening)
        web = CountingSite(Backend("web"))
        web_port = await listen(web)
        self.addCleanup(web_port.stopListening)
        directory = tempfile.mkdtemp()
        pem, _ = _write_pair(directory, "one.example")
        config = {
            "backends": [
                {"name": "echo", "servers": [f"127.0.0.1:{echo_port.getHost().port}"], "health_check": {"type": "none"}},
                {"name": "web", "servers": [f"127.0.0.1:{web_port.getHost().port}"], "health_check": {"type": "none"}},
            ],
            "frontends": [
                {"name": "one", "protocol": "detect", "listen": "tcp:0:interface=127.0.0.1",
                 "detect": {"tls": "secure", "http": "site", "default": "raw", "timeout": "0.3s"}},
                {"name": "secure", "listen": "tcp:0:interface=127.0.0.1", "backend": "echo",
                 "tls": {"cert": pem, "key": pem}},
                {"name": "site", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"},
                {"name": "raw", "listen": "tcp:0:interface=127.0.0.1", "backend": "echo"},
            ],
        }
        service = await self.start_service(config)
        front = service.port_of("one")
        # TLS: terminated by "secure", whose server writes its name
        line, cn = await threads.deferToThread(_tls_fetch, front, "one.example")
        self.assertEqual((line, cn), ("plain", "CN=one.example"))
        # HTTP
        client = await connect(front)
        self.addCleanup(lambda: client.transport.abortConnection())
        client.transport.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        self.assertIn(b"x-backend: web", head.lower())
        # anything else
        other = await connect(front)
        self.addCleanup(lambda: other.transport.abortConnection())
        other.transport.write(b"\x00hello")
        await other.read_until(b"plain\n\x00hello")
        # nothing: the server speaks first after the timeout
        quiet = await connect(front)
        self.addCleanup(lambda: quiet.transport.abortConnection())
        await quiet.read_until(b"plain\n")
        detected = service.frontends["one"].detected
        self.assertEqual((detected["tls"], detected["http"], detected["default"]), (1, 1, 2))
        self.assertEqual(service.frontends["site"].total, 1)
        await wait_for(lambda: service.frontends["one"].active == 0)
        self.assertIn('rproxy_frontend_detected_total{frontend="one",protocol="http"} 1.0', _metrics(service))
        # the admin pages know a detect frontend
        for path in ("/health", "/stats", "/api/v1/dashboard"):
            status, body = await _admin_get(service, path)
            self.assertEqual(status, 200, (path, body[:300]))
        status, body = await _admin_get(service, "/api/v1/dashboard")
        self.assertIn(b'"protocol": "detect"', body.replace(b'":"', b'": "'))
        # a reload keeps it (in place: same listener) with its new options
        from rproxy.config import config_from_mapping

        config["frontends"][0]["detect"] = {"default": "raw", "timeout": "0.2s"}
        config["frontends"][0]["listen"] = f"tcp:{front}:interface=127.0.0.1"
        await service.reload(config_from_mapping(dict(config, admin={"listen": "tcp:0:interface=127.0.0.1"},
                                                      **{"global": {"grace_period": "2s"}})))
        self.assertIs(service.frontends["one"].config.detect.http, None)
        plain = await connect(front)
        self.addCleanup(lambda: plain.transport.abortConnection())
        plain.transport.write(b"GET / HTTP/1.1\r\n\r\n")  # no http frontend now: default
        await plain.read_until(b"plain\nGET /")
        await turn()

    @async_test
    async def test_behind_proxy_protocol(self) -> None:
        """
        proxy_protocol on a detect frontend: the header is read first, and
        the frontend it hands to sees the client's address (its allow
        list passes one client and refuses another).
        """
        echo = EchoFactory("plain")
        echo_port = await listen(echo)
        self.addCleanup(echo_port.stopListening)
        service = await self.start_service({
            "backends": [{"name": "echo", "servers": [f"127.0.0.1:{echo_port.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [
                {"name": "one", "protocol": "detect", "listen": "tcp:0:interface=127.0.0.1", "proxy_protocol": True,
                 "detect": {"default": "raw"}},
                {"name": "raw", "listen": "tcp:0:interface=127.0.0.1", "backend": "echo",
                 "allow": ["203.0.113.0/24"]},
            ],
        })
        front = service.port_of("one")
        good = await connect(front)
        self.addCleanup(lambda: good.transport.abortConnection())
        good.transport.write(build_v1(("203.0.113.9", 1000), ("127.0.0.1", front)) + b"\x01hello")
        await good.read_until(b"plain\n\x01hello")
        bad = await connect(front)
        bad.transport.write(build_v1(("198.51.100.9", 1000), ("127.0.0.1", front)) + b"\x01hello")
        await bad.closed
        self.assertEqual(bad.data, b"")
        self.assertEqual(service.frontends["raw"].denied_total, 1)
        self.assertEqual(service.frontends["one"].detected["default"], 2)


class TLSFailureLogTests(ServiceMixin, TestCase):
    """
    A client whose TLS fails on a terminating frontend (L4 or HTTP): one
    log line naming the frontend, the peer and OpenSSL's reason; no
    traceback; the L4 termination says tls-failed.
    """

    timeout = 60

    @async_test
    async def test_one_line_per_failed_client(self) -> None:
        echo = EchoFactory("a")
        port = await listen(echo)
        self.addCleanup(port.stopListening)
        pem, _ = _write_pair(tempfile.mkdtemp(), "localhost")
        log = LogCapture(self)
        service = await self.start_service({
            "backends": [{"name": "echo", "servers": [f"127.0.0.1:{port.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [
                {"name": "l4s", "listen": "tcp:0:interface=127.0.0.1", "backend": "echo",
                 "tls": {"cert": pem, "key": pem}, "access_log": {"format": "json"}},
                {"name": "webs", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1", "backend": "echo",
                 "tls": {"cert": pem, "key": pem}},
            ],
        })
        for name in ("l4s", "webs"):
            for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
                client = await connect(service.port_of(name))
                client.transport.write(garbage)
                await client.closed
        await wait_for(lambda: len(log.lines("TLS with")) >= 4)
        lines = log.lines("TLS with")
        self.assertEqual(len(lines), 4, lines)
        for line in lines[:2]:
            self.assertTrue(line.startswith("frontend l4s: TLS with 127.0.0.1:"), line)
        for line in lines[2:]:
            self.assertTrue(line.startswith("frontend webs: TLS with 127.0.0.1:"), line)
        self.assertIn("failed: http request", lines[0])
        self.assertEqual([e for e in log.events if e.get("log_failure") is not None], [])
        records = [json.loads(t) for t in log.lines("tls-failed")]
        self.assertEqual([(r["frontend"], r["termination"]) for r in records], [("l4s", "tls-failed")] * 2)
