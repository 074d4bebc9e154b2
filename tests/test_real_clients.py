"""
End-to-end tests whose clients are what users run: the C{curl} program,
Python's C{ssl} module, the C{websockets} library and headless Chromium
(Debian's C{/usr/bin/chromium}, driven by Playwright), against rproxy on
loopback in front of Twisted servers.

Tests written against clients of our own agreed with rproxy's mistakes: a
TLS stack that offers ALPN was refused by every frontend while those tests
passed.  Here the TLS stacks, HTTP/1.1 connection reuse, C{Expect:
100-continue}, the WebSocket handshake and close, and a browser's page load
are other people's code.

The reactor is never blocked: C{curl} runs as a child process
(C{getProcessOutputAndValue}); the blocking clients (C{ssl} sockets, the
C{websockets} sync client, Playwright's sync API) run in the reactor's
thread pool (C{deferToThread}).  C{bin/test} installs C{curl}, C{chromium}
and the Python packages; a missing one fails these tests, it does not skip
them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support import ServiceMixin, async_test, listen, reactor, self_signed_pem, wait_for

CURL = "/usr/bin/curl"
CHROMIUM = "/usr/bin/chromium"

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>through rproxy</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/style.css"></head>
<body><h1 id="title">served through rproxy</h1>
<img id="pic" src="/pic.svg" alt="pic">
<p id="api">waiting</p><p id="ws">waiting</p>
<script src="/app.js"></script></body></html>
"""

APP_JS = b"""
fetch("/api/data", {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({n: 42})})
  .then(r => r.json())
  .then(d => { document.getElementById("api").textContent = "api " + d.answer; });
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onmessage = (e) => {
  if (e.data === "hello from backend") { ws.send("ping from browser"); return; }
  document.getElementById("ws").textContent = e.data;
  ws.close(1000);
};
"""

STATIC = {
    b"/": (b"text/html; charset=utf-8", PAGE),
    b"/style.css": (b"text/css", b"h1 { color: rgb(0, 128, 0); }\n"),
    b"/app.js": (b"application/javascript", APP_JS),
    b"/pic.svg": (b"image/svg+xml",
                  b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
                  b'<rect width="8" height="8" fill="red"/></svg>'),
}


class WebBackend(Resource):
    """
    The page and its parts, C{/api/data} (POST C{{"n": N}} answers
    C{{"answer": N + 1}}), and anything else: JSON of what arrived.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.requests.append((request.method.decode(), request.path.decode()))
        if request.path in STATIC:
            kind, content = STATIC[request.path]
            request.setHeader(b"content-type", kind)
            return content
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/api/data":
            return json.dumps({"answer": json.loads(body)["n"] + 1}).encode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({
            "method": request.method.decode(), "path": request.path.decode(), "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), "headers": headers,
        }).encode()


class QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketEcho(protocol.Protocol):
    """
    A WebSocket server (RFC 6455, no extensions): greets with C{hello from
    backend}, echoes text and binary messages, answers pings, and answers a
    close frame with its own before closing the connection.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.open = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.open, self.buffer = True, rest
            self.send(0x1, b"hello from backend")
        while (frame := self.next_frame()) is not None:
            opcode, payload = frame
            self.factory.received.append((opcode, payload))
            if opcode in (0x1, 0x2):
                self.send(opcode, payload)
            elif opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0x8:
                self.send(0x8, payload[:2])
                self.transport.loseConnection()
                return

    def next_frame(self) -> tuple[int, bytes] | None:
        b = self.buffer
        if len(b) < 2:
            return None
        opcode, length, at = b[0] & 0x0F, b[1] & 0x7F, 2
        if length == 126:
            if len(b) < 4:
                return None
            (length,), at = struct.unpack(">H", b[2:4]), 4
        elif length == 127:
            if len(b) < 10:
                return None
            (length,), at = struct.unpack(">Q", b[2:10]), 10
        mask = b""
        if b[1] & 0x80:
            mask, at = b[at:at + 4], at + 4
        if len(b) < at + length:
            return None
        payload = b[at:at + length]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        self.buffer = b[at + length:]
        return opcode, payload

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            size = bytes([n])
        elif n < 65536:
            size = b"\x7e" + struct.pack(">H", n)
        else:
            size = b"\x7f" + struct.pack(">Q", n)
        self.transport.write(bytes([0x80 | opcode]) + size + payload)


class WebSocketFactory(protocol.Factory):
    protocol = WebSocketEcho
    noisy = False

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []


def spki_sha256(cert_pem: bytes) -> str:
    """
    The base64 SHA-256 of a certificate's public key, as Chromium's
    C{--ignore-certificate-errors-spki-list} takes it.
    """
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class RealClientsMixin(ServiceMixin):
    """
    rproxy with an HTTPS frontend (certificate for C{localhost}, and one for
    C{b.example} chosen by SNI), a plain HTTP frontend, both routing
    C{/ws} to a WebSocket server and the rest to a twisted.web server, and
    a tcp frontend on an C{ssl:} listen string in front of the web server.
    """

    timeout = 180

    async def start(self) -> None:
        self.web = WebBackend()
        web_port = await listen(QuietSite(self.web))
        self.addCleanup(web_port.stopListening)
        self.websockets = WebSocketFactory()
        ws_port = await listen(self.websockets)
        self.addCleanup(ws_port.stopListening)
        self.pem = os.path.abspath(self.mktemp())
        self.cert = self_signed_pem(self.pem, "localhost")
        self.b_pem = os.path.abspath(self.mktemp())
        self.b_cert = self_signed_pem(self.b_pem, "b.example")
        self.ca = self.pem + ".crt"
        self.b_ca = self.b_pem + ".crt"
        for path, cert in ((self.ca, self.cert), (self.b_ca, self.b_cert)):
            with open(path, "wb") as f:
                f.write(cert)
        routes = [{"path_prefix": "/ws", "backend": "ws"}]
        service = await self.start_service({
            "backends": [
                {"name": "web", "servers": [f"127.0.0.1:{web_port.getHost().port}"],
                 "health_check": {"type": "none"}},
                {"name": "ws", "servers": [f"127.0.0.1:{ws_port.getHost().port}"],
                 "health_check": {"type": "none"}},
            ],
            "frontends": [
                {"name": "https", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                 "backend": "web", "routes": routes,
                 "tls": {"cert": self.pem, "key": self.pem, "sni": [{"cert": self.b_pem, "key": self.b_pem}]}},
                {"name": "http", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                 "backend": "web", "routes": routes},
                {"name": "l4", "listen": f"ssl:0:interface=127.0.0.1:privateKey={self.pem}", "backend": "web"},
            ],
        })
        self.https = service.port_of("https")
        self.http = service.port_of("http")
        self.l4 = service.port_of("l4")

    async def curl(self, *args: str) -> tuple[int, str, str]:
        """
        Run curl (no proxy from the environment, a 30 s cap); its exit
        status, standard output and error.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        out, err, code = await getProcessOutputAndValue(
            CURL, ("--noproxy", "*", "--max-time", "30", "-sS", *args),
            env={"HOME": home, "PATH": "/usr/bin:/bin"}, reactor=reactor,
        )
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def data_file(self, size: int) -> tuple[str, str]:
        """
        A file of C{size} deterministic bytes; its path and SHA-256.
        """
        path = os.path.abspath(self.mktemp())
        block = hashlib.sha256(b"rproxy").digest() * 2048  # 64 KiB
        data = (block * (size // len(block) + 1))[:size]
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest()


# What curl prints after each transfer (-w), to tell transfers apart.
_W = "\\n@@ %{response_code} %{num_connects} %{http_version}\\n"


def _transfers(out: str) -> list[tuple[str, list[str]]]:
    """
    The bodies of curl's transfers and the C{_W} fields after each.
    """
    parts = out.split("\n@@ ")
    result = []
    for i in range(1, len(parts)):
        fields = parts[i].split("\n", 1)[0].split()
        body = parts[i - 1].split("\n", 1)[1] if i > 1 else parts[0]
        result.append((body, fields))
    return result


class CurlTests(RealClientsMixin, TestCase):
    """
    The curl program: HTTPS with its default ALPN, keep-alive, uploads.
    """

    @async_test
    async def test_https_with_default_alpn(self) -> None:
        """
        curl offers h2 and http/1.1 by ALPN; the HTTP frontend selects
        http/1.1 and answers, with the certificate curl verifies.
        """
        await self.start()
        code, out, err = await self.curl("-v", "--cacert", self.ca, "-w", _W,
                                         f"https://localhost:{self.https}/echo")
        self.assertEqual(code, 0, err)
        self.assertIn("ALPN: offers h2,http/1.1", err)
        self.assertIn("ALPN: server accepted http/1.1", err)
        [(body, fields)] = _transfers(out)
        self.assertEqual(fields, ["200", "1", "1.1"])
        self.assertEqual(json.loads(body)["headers"]["x-forwarded-proto"], "https")

    @async_test
    async def test_h2c_upgrade_declined(self) -> None:
        """
        curl --http2 on http:// asks for an h2c upgrade (with and without a
        body): rproxy declines it (no h2c channel past its per-request
        policies), so the server sees neither Upgrade nor HTTP2-Settings,
        and curl gets its answers over HTTP/1.1.
        """
        await self.start()
        code, out, err = await self.curl(
            "-v", "--http2", "-w", _W, f"http://127.0.0.1:{self.http}/echo",
            "--next", "--http2", "-d", "posted", "-w", _W, f"http://127.0.0.1:{self.http}/echo")
        self.assertEqual(code, 0, err)
        self.assertIn("Upgrade: h2c", err)  # (what curl asked for)
        transfers = _transfers(out)
        self.assertEqual([fields[0::2] for _, fields in transfers], [["200", "1.1"], ["200", "1.1"]])
        for body, _ in transfers:
            seen = json.loads(body)["headers"]
            self.assertNotIn("upgrade", seen)
            self.assertNotIn("http2-settings", seen)
        self.assertEqual(json.loads(transfers[1][0])["length"], len("posted"))

    @async_test
    async def test_sni_certificate_with_alpn(self) -> None:
        """
        curl asking for b.example (SNI) gets b.example's certificate, which
        it verifies, with ALPN offered.
        """
        await self.start()
        code, out, err = await self.curl(
            "-v", "--cacert", self.b_ca, "--resolve", f"b.example:{self.https}:127.0.0.1", "-w", _W,
            f"https://b.example:{self.https}/echo",
        )
        self.assertEqual(code, 0, err)
        self.assertIn("ALPN: server accepted http/1.1", err)
        self.assertEqual(_transfers(out)[0][1], ["200", "1", "1.1"])

    @async_test
    async def test_tcp_frontend_tls_with_alpn(self) -> None:
        """
        A tcp frontend on an ssl: listen string serves a client offering
        ALPN, selecting no protocol (curl goes on with HTTP/1.1).
        """
        await self.start()
        code, out, err = await self.curl("-v", "--cacert", self.ca, "-w", _W,
                                         f"https://localhost:{self.l4}/echo")
        self.assertEqual(code, 0, err)
        self.assertIn("ALPN: server did not agree on a protocol", err)
        self.assertEqual(_transfers(out)[0][1], ["200", "1", "1.1"])

    @async_test
    async def test_keep_alive_reuses_one_connection(self) -> None:
        """
        Three URLs in one curl run share one connection, over HTTP and over
        HTTPS (curl reports one connect, then reuse).
        """
        await self.start()
        for base, extra in ((f"http://127.0.0.1:{self.http}", ()),
                            (f"https://localhost:{self.https}", ("--cacert", self.ca))):
            code, out, err = await self.curl("-v", *extra, "-w", _W,
                                             *(f"{base}/echo?i={i}" for i in range(3)))
            self.assertEqual(code, 0, err)
            transfers = _transfers(out)
            self.assertEqual([fields for _, fields in transfers], [["200", "1", "1.1"], ["200", "0", "1.1"],
                                                                    ["200", "0", "1.1"]], base)
            self.assertEqual(err.count("Re-using existing connection"), 2, base)
            self.assertEqual([json.loads(body)["path"] for body, _ in transfers], ["/echo"] * 3)

    @async_test
    async def test_put_upload(self) -> None:
        """An upload with -T (PUT) reaches the server whole."""
        await self.start()
        path, digest = self.data_file(300_000)
        code, out, err = await self.curl("--cacert", self.ca, "-w", _W, "-T", path,
                                         f"https://localhost:{self.https}/upload")
        self.assertEqual(code, 0, err)
        [(body, fields)] = _transfers(out)
        self.assertEqual(fields[0], "200")
        answer = json.loads(body)
        self.assertEqual((answer["method"], answer["length"], answer["sha256"]), ("PUT", 300_000, digest))

    @async_test
    async def test_large_post_expect_continue(self) -> None:
        """
        A 3 MB --data-binary POST: curl sends Expect: 100-continue, gets
        100 Continue and then the answer, and the server gets every byte.
        """
        await self.start()
        path, digest = self.data_file(3_000_000)
        for base, extra in ((f"http://127.0.0.1:{self.http}", ()),
                            (f"https://localhost:{self.https}", ("--cacert", self.ca))):
            code, out, err = await self.curl("-v", *extra, "-w", _W, "--data-binary", f"@{path}",
                                             "-H", "Content-Type: application/octet-stream", f"{base}/upload")
            self.assertEqual(code, 0, err)
            self.assertIn("> Expect: 100-continue", err)
            self.assertIn("< HTTP/1.1 100 Continue", err)
            [(body, fields)] = _transfers(out)
            self.assertEqual(fields[0], "200")
            answer = json.loads(body)
            self.assertEqual((answer["method"], answer["length"], answer["sha256"]), ("POST", 3_000_000, digest))


def _ssl_get(port: int, hostname: str, cafile: str, alpn: list[str]) -> tuple[str | None, bytes, bytes]:
    """
    One GET over Python's ssl, offering C{alpn}: the selected protocol,
    the peer's certificate (DER) and the whole response.  (Blocking: run
    in a thread.)
    """
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            selected = tls.selected_alpn_protocol()
            der = tls.getpeercert(binary_form=True) or b""
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: " + hostname.encode() + b"\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    return selected, der, response


class PythonSSLTests(RealClientsMixin, TestCase):
    """
    Python's ssl module offering ALPN ["h2", "http/1.1"].
    """

    @async_test
    async def test_alpn_selects_http11(self) -> None:
        """
        The HTTP frontend selects http/1.1, for the default certificate and
        for the one chosen by SNI, and answers.
        """
        await self.start()
        for hostname, cafile, cert in (("localhost", self.ca, self.cert), ("b.example", self.b_ca, self.b_cert)):
            selected, der, response = await deferToThread(
                _ssl_get, self.https, hostname, cafile, ["h2", "http/1.1"])
            self.assertEqual(selected, "http/1.1", hostname)
            self.assertEqual(der, x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER))
            self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])

    @async_test
    async def test_tcp_frontend_selects_nothing(self) -> None:
        """A tcp frontend completes the handshake with no protocol selected."""
        await self.start()
        selected, _, response = await deferToThread(_ssl_get, self.l4, "localhost", self.ca, ["h2", "http/1.1"])
        self.assertIsNone(selected)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:80])


def _websocket_session(uri: str, cafile: str | None) -> dict[str, Any]:
    """
    A session with the websockets library: read the greeting, echo text
    and binary both ways, close.  (Blocking: run in a thread.)
    """
    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=cafile) if cafile else None
    started = time.monotonic()
    with connect(uri, ssl=context, proxy=None, open_timeout=10, close_timeout=10) as ws:
        greeting = ws.recv(timeout=10)
        ws.send("text through rproxy")
        text = ws.recv(timeout=10)
        ws.send(bytes(range(256)) * 8)
        binary = ws.recv(timeout=10)
        ws.ping(b"are you there").wait(timeout=10)
    return {
        "greeting": greeting, "text": text, "binary": binary, "close_code": ws.close_code,
        "close_received": ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None,
        "seconds": time.monotonic() - started,
    }


class WebSocketsTests(RealClientsMixin, TestCase):
    """
    The websockets library through the HTTP frontend to a WebSocket server.
    """

    @async_test
    async def test_echo_both_ways_and_clean_close(self) -> None:
        """
        Over ws:// and wss://: the server's greeting arrives, text and
        binary messages echo, a ping is answered, and the close handshake
        completes with 1000 from the server well before the client's close
        timeout.
        """
        await self.start()
        for uri, cafile in ((f"ws://127.0.0.1:{self.http}/ws", None),
                            (f"wss://localhost:{self.https}/ws", self.ca)):
            session = await deferToThread(_websocket_session, uri, cafile)
            self.assertEqual(session["greeting"], "hello from backend", uri)
            self.assertEqual(session["text"], "text through rproxy")
            self.assertEqual(session["binary"], bytes(range(256)) * 8)
            self.assertEqual((session["close_code"], session["close_received"]), (1000, 1000))
            self.assertLess(session["seconds"], 5)
        opcodes = [opcode for opcode, _ in self.websockets.received]
        self.assertEqual(opcodes, [0x1, 0x2, 0x9, 0x8] * 2)


def _browse(url: str, spki: str, host_rule: str) -> dict[str, Any]:
    """
    Load C{url} in headless Chromium (trusting only the certificate whose
    key is C{spki}) and wait for the page's script to finish its fetch
    and its WebSocket exchange.  (Blocking: run in a thread.)
    """
    from playwright.sync_api import sync_playwright

    failed: list[tuple[str, str]] = []
    responses: list[tuple[str, int]] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, timeout=60_000,
            args=[f"--ignore-certificate-errors-spki-list={spki}", "--no-proxy-server",
                  f"--host-resolver-rules={host_rule}"],
        )
        try:
            page = browser.new_page()
            page.on("requestfailed", lambda r: failed.append((r.url, str(r.failure))))
            page.on("response", lambda r: responses.append((r.url, r.status)))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url, wait_until="load", timeout=30_000)
            page.wait_for_function(
                "document.getElementById('api').textContent !== 'waiting'"
                " && document.getElementById('ws').textContent !== 'waiting'", timeout=30_000)
            return {
                "title": page.title(),
                "h1": page.inner_text("#title"),
                "color": page.evaluate("getComputedStyle(document.getElementById('title')).color"),
                "image_width": page.evaluate("document.getElementById('pic').naturalWidth"),
                "api": page.inner_text("#api"),
                "ws": page.inner_text("#ws"),
                "protocol": page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol"),
                "failed": failed, "responses": responses, "errors": errors,
            }
        finally:
            browser.close()


class ChromiumTests(RealClientsMixin, TestCase):
    """
    Headless Chromium loading a page over HTTPS through rproxy.
    """

    @async_test
    async def test_page_loads_over_https(self) -> None:
        """
        Chromium (SNI b.example, trusting only b.example's key) loads the
        page, its stylesheet, image and script; the script's POST and its
        WebSocket exchange work; nothing failed, every answer was 200 over
        http/1.1.
        """
        await self.start()
        result = await deferToThread(
            _browse, f"https://b.example:{self.https}/", spki_sha256(self.b_cert), "MAP b.example 127.0.0.1")
        self.assertEqual(result["failed"], [])
        self.assertEqual(result["errors"], [])
        self.assertEqual(sorted(url.split(f":{self.https}", 1)[1] for url, _ in result["responses"]),
                         ["/", "/api/data", "/app.js", "/pic.svg", "/style.css"])
        self.assertEqual({status for _, status in result["responses"]}, {200})
        self.assertEqual(
            (result["title"], result["h1"], result["color"], result["image_width"], result["api"], result["ws"],
             result["protocol"]),
            ("through rproxy", "served through rproxy", "rgb(0, 128, 0)", 8, "api 43", "ping from browser",
             "http/1.1"),
        )
        await wait_for(lambda: (0x8, b"\x03\xe8") in self.websockets.received)
