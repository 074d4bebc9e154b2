"""
The PROXY protocol against HAProxy itself (Debian's /usr/sbin/haproxy,
started by the test on free loopback ports), in both directions:

  - HAProxy in front of rproxy (C{send-proxy}, C{send-proxy-v2} on its
    server line): rproxy's C{proxy_protocol: true} frontend sees the
    client's address, not HAProxy's;
  - HAProxy behind rproxy (C{accept-proxy} on its bind): rproxy's
    C{send_proxy: v1|v2} backends tell it the client's address, which
    HAProxy answers with (C{http-request return ... %[src]:%[src_port]}).

The client connects from 127.0.0.2 (any 127/8 address is the loopback
interface on Linux) so that its address differs from rproxy's and
HAProxy's own (127.0.0.1).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from rproxy.proxyproto import parse
from tests.servers import _free_port, _wait_port
from tests.support import Client, EchoFactory, ServiceMixin, async_test, listen, wait_for
from tests.test_e2e_l4 import RecorderFactory

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class HAProxy:
    """
    One haproxy process in the foreground, with the configuration given.
    """

    def __init__(self, config: str) -> None:
        if not os.path.exists(HAPROXY):
            raise AssertionError("these tests need HAProxy: apt-get install haproxy (bin/test installs it)")
        self.dir = tempfile.mkdtemp(prefix="rproxy-haproxy-")
        self.path = os.path.join(self.dir, "haproxy.cfg")
        self.log = os.path.join(self.dir, "haproxy.log")
        with open(self.path, "w") as f:
            f.write("global\n    maxconn 200\n\n"
                    "defaults\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n"
                    + config)
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", self.path], capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"haproxy refused its configuration: {check.stdout}{check.stderr}")
        self.logfile = open(self.log, "wb")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", self.path], stdout=self.logfile,
                                        stderr=subprocess.STDOUT)

    def wait(self, port: int) -> None:
        _wait_port(port, 10, "haproxy", self.log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.logfile.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def connect_from(host: str, port: int) -> Client:
    """
    A client connected to 127.0.0.1:C{port} from address C{host}.
    """
    client = Client()
    factory = Factory.forProtocol(lambda: client)
    factory.noisy = False
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(host, 0)).connect(factory)
    return client


def _loopback_alias_works() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


class HAProxyTests(ServiceMixin, TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.source = "127.0.0.2" if _loopback_alias_works() else "127.0.0.1"

    def haproxy(self, config: str, port: int) -> HAProxy:
        process = HAProxy(config)
        self.addCleanup(process.stop)
        process.wait(port)
        return process

    async def client(self, port: int) -> Client:
        client = await connect_from(self.source, port)
        self.client_cleanup(client)
        return client

    async def _in_front(self, option: str) -> None:
        # client -> haproxy (send-proxy*) -> rproxy (proxy_protocol, send_proxy v1) -> recorder
        recorder = RecorderFactory()
        server = await listen(recorder)
        self.addCleanup(server.stopListening)
        service = await self.start_service({
            "backends": [{"name": "rec", "servers": [f"127.0.0.1:{server.getHost().port}"],
                          "health_check": {"type": "none"}, "send_proxy": "v1"}],
            "frontends": [{"name": "pp", "listen": "tcp:0:interface=127.0.0.1", "backend": "rec",
                           "proxy_protocol": True, "allow": [f"{self.source}/32"],
                           "access_log": "tcplog"}],
        })
        front = _free_port()
        self.haproxy(f"frontend f\n    mode tcp\n    bind 127.0.0.1:{front}\n    default_backend b\n\n"
                     f"backend b\n    mode tcp\n    server r 127.0.0.1:{service.port_of('pp')} {option}\n", front)
        client = await self.client(front)
        client_port = client.transport.getHost().port
        client.transport.write(b"through haproxy")
        # (the readiness probe may have reached the recorder too)
        await wait_for(lambda: any(c.data.endswith(b"through haproxy") for c in recorder.conns))
        [ours] = [c for c in recorder.conns if c.data.endswith(b"through haproxy")]
        header, _ = parse(ours.data)  # type: ignore[misc]
        # rproxy saw the client (allowed by its address), and told the server
        self.assertEqual(header.source, (self.source, client_port))
        self.assertEqual(header.destination, ("127.0.0.1", front))
        ours.transport.write(b"answer")
        await client.read_until(b"answer")
        layer = service.frontends["pp"].proxy_protocol
        self.assertGreaterEqual(layer.accepted, 1)
        self.assertEqual(layer.rejected, 0)

    @async_test
    async def test_haproxy_send_proxy_in_front(self) -> None:
        """HAProxy's send-proxy (v1) in front of rproxy."""
        await self._in_front("send-proxy")

    @async_test
    async def test_haproxy_send_proxy_v2_in_front(self) -> None:
        """HAProxy's send-proxy-v2 in front of rproxy."""
        await self._in_front("send-proxy-v2")

    @async_test
    async def test_haproxy_health_check_local(self) -> None:
        """
        HAProxy's health checks with send-proxy-v2 (a LOCAL header) pass
        through an rproxy frontend with proxy_protocol to its server.
        """
        echo = EchoFactory("e")
        server = await listen(echo)
        self.addCleanup(server.stopListening)
        service = await self.start_service({
            "backends": [{"name": "e", "servers": [f"127.0.0.1:{server.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "pp", "listen": "tcp:0:interface=127.0.0.1", "backend": "e",
                           "proxy_protocol": True}],
        })
        stats = _free_port()
        self.haproxy(f"frontend f\n    mode tcp\n    bind 127.0.0.1:{stats}\n    default_backend b\n\n"
                     f"backend b\n    mode tcp\n    server r 127.0.0.1:{service.port_of('pp')} send-proxy-v2 check "
                     f"inter 200ms\n", stats)
        await wait_for(lambda: service.frontends["pp"].proxy_protocol.accepted >= 2)
        self.assertEqual(service.frontends["pp"].proxy_protocol.rejected, 0)

    async def _behind(self, protocol: str, version: str) -> None:
        # client -> rproxy (frontend protocol, send_proxy version) -> haproxy (accept-proxy)
        port = _free_port()
        self.haproxy(f"frontend f\n    mode http\n    bind 127.0.0.1:{port} accept-proxy\n"
                     f"    http-request return status 200 content-type text/plain "
                     f"lf-string \"%[src]:%[src_port]\\n\"\n", port)
        service = await self.start_service({
            "backends": [{"name": "h", "servers": [f"127.0.0.1:{port}"], "health_check": {"type": "none"},
                          "send_proxy": version}],
            "frontends": [{"name": "front", "protocol": protocol, "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "h"}],
        })
        client = await self.client(service.port_of("front"))
        client_port = client.transport.getHost().port
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(body.strip(), f"{self.source}:{client_port}".encode())

    @async_test
    async def test_haproxy_accept_proxy_behind_tcp_v1(self) -> None:
        """A tcp frontend's send_proxy: v1 to HAProxy's accept-proxy."""
        await self._behind("tcp", "v1")

    @async_test
    async def test_haproxy_accept_proxy_behind_tcp_v2(self) -> None:
        """A tcp frontend's send_proxy: v2 to HAProxy's accept-proxy."""
        await self._behind("tcp", "v2")

    @async_test
    async def test_haproxy_accept_proxy_behind_http_v2(self) -> None:
        """An http frontend's send_proxy: v2 to HAProxy's accept-proxy."""
        await self._behind("http", "v2")

    @async_test
    async def test_haproxy_accept_proxy_behind_http_v1(self) -> None:
        """An http frontend's send_proxy: v1 to HAProxy's accept-proxy."""
        await self._behind("http", "v1")
