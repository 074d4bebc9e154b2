"""
Reloads and frontend TLS, end to end on 127.0.0.1 with the clients users
check with (C{openssl s_client}, C{curl}, run as child processes so the
reactor goes on): a reload reads the certificate files again (renewed in
place or new ones, SNI certificates too), turns TLS on or off on a
listener it keeps, leaves open connections with what they had, and is
refused, nothing changed, when a certificate cannot be loaded.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from rproxy.config import config_from_mapping
from rproxy.service import RProxyService
from rproxy.tls import self_signed
from tests.support import Client, ServiceMixin, async_test, listen, reactor
from tests.test_e2e_http import Backend, CountingSite

OPENSSL = "/usr/bin/openssl"
CURL = "/usr/bin/curl"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def write_pair(cert_path: str, key_path: str, hostname: str) -> bytes:
    """
    Write a new self-signed certificate for C{hostname} and its key over
    the two files (as C{certbot renew} or C{openssl req -x509} does); its
    PEM.
    """
    cert_pem, key_pem = self_signed(hostname, days=1)
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_pem


class ReloadTLSMixin(ServiceMixin):
    """
    A service run from a file, and the clients that check what it serves.
    """

    timeout = 60

    async def start(self, tls: dict[str, Any] | None) -> RProxyService:
        """
        An HTTP frontend (with C{tls}) before one web server, run from a
        file that L{rewrite} changes.
        """
        self.site = CountingSite(Backend("b0"))
        server = await listen(self.site)
        self.addCleanup(server.stopListening)
        self.data: dict[str, Any] = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{server.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web", **({"tls": tls} if tls else {})}],
        }
        self.path = os.path.abspath(self.mktemp()) + ".yaml"
        self.rewrite()
        self.service = await self.start_service(self.data, config_path=self.path)
        self.port = self.service.port_of("web")
        # (the file names the port it got, as a user's file names its port)
        self.data["frontends"][0]["listen"] = f"127.0.0.1:{self.port}"
        self.rewrite()
        return self.service

    def rewrite(self) -> None:
        with open(self.path, "w") as f:
            yaml.safe_dump(self.data, f)

    def files(self, name: str) -> tuple[str, str]:
        base = os.path.abspath(self.mktemp())
        return base + f"-{name}-cert.pem", base + f"-{name}-key.pem"

    async def served_name(self, servername: str = "localhost") -> str:
        """
        The CN of the certificate C{openssl s_client} is shown for
        C{servername} on the frontend's port.
        """
        out, err, code = await getProcessOutputAndValue(
            OPENSSL, ["s_client", "-connect", f"127.0.0.1:{self.port}", "-servername", servername],
            env={}, reactor=reactor, stdinBytes=b"")
        match = _PEM.search(out)
        self.assertIsNotNone(match, f"no certificate from s_client (exit {code}): {err.decode()[-500:]}")
        assert match is not None
        cert = x509.load_pem_x509_certificate(match.group(0))
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    async def curl(self, url: str) -> tuple[int, str]:
        out, err, code = await getProcessOutputAndValue(
            CURL, ["-sS", "-k", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}", url],
            env={}, reactor=reactor)
        return code, (out + err).decode()

    async def reload(self) -> dict[str, Any]:
        await self.service.reload_from_file()
        assert self.service.last_reload is not None
        return self.service.last_reload


class ReloadTLSTests(ReloadTLSMixin, TestCase):
    """
    Frontends with C{tls:}.
    """

    @async_test
    async def test_renewed_in_place(self) -> None:
        """
        A certificate renewed over the same files (certbot renew, then
        SIGHUP) is served to new connections after the reload.
        """
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        self.assertEqual(await self.served_name(), "localhost")
        write_pair(cert, key, "rotated")
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(await self.served_name(), "rotated")
        self.assertEqual(await self.curl(f"https://127.0.0.1:{self.port}/echo"), (0, "200"))

    @async_test
    async def test_renewed_in_place_behind_detect(self) -> None:
        """
        A detect frontend hands TLS connections to the renewed certificate
        too (the TLS layer of its target's listener, which the reload
        replaced), not to one it made at start.
        """
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        self.data["frontends"].append({"name": "one", "protocol": "detect", "listen": "tcp:0:interface=127.0.0.1",
                                       "detect": {"tls": "web", "default": "web", "timeout": "0.3s"}})
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        self.port = self.service.port_of("one")
        self.assertEqual(await self.served_name(), "localhost")
        self.data["frontends"][1]["listen"] = f"127.0.0.1:{self.port}"
        write_pair(cert, key, "rotated")
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(await self.served_name(), "rotated")
        self.assertEqual(await self.curl(f"https://127.0.0.1:{self.port}/echo"), (0, "200"))

    @async_test
    async def test_new_files(self) -> None:
        """tls: pointed at other files: the new certificate is served."""
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        cert2, key2 = self.files("b")
        write_pair(cert2, key2, "second")
        self.data["frontends"][0]["tls"] = {"cert": cert2, "key": key2}
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(await self.served_name(), "second")

    @async_test
    async def test_sni_certificate_renewed(self) -> None:
        """An SNI certificate renewed in place is served for its name after the reload."""
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        other, other_key = self.files("b")
        write_pair(other, other_key, "b.example")
        await self.start({"cert": cert, "key": key, "sni": [{"cert": other, "key": other_key}]})
        self.assertEqual(await self.served_name("b.example"), "b.example")
        # (its names stay; the renewal shows in the key: compare the PEM)
        renewed = write_pair(other, other_key, "b.example")
        self.assertEqual((await self.reload())["result"], "ok")
        out, _, _ = await getProcessOutputAndValue(
            OPENSSL, ["s_client", "-connect", f"127.0.0.1:{self.port}", "-servername", "b.example"],
            env={}, reactor=reactor, stdinBytes=b"")
        served = _PEM.search(out)
        assert served is not None
        self.assertEqual(served.group(0).strip(), renewed.strip())
        self.assertEqual(await self.served_name(), "localhost")

    @async_test
    async def test_tls_turned_on_and_off(self) -> None:
        """
        tls: added to a plain frontend serves HTTPS on the same port after
        the reload (and no plain HTTP); removed, plain HTTP again.
        """
        await self.start(None)
        self.assertEqual(await self.curl(f"http://127.0.0.1:{self.port}/echo"), (0, "200"))
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        self.data["frontends"][0]["tls"] = {"cert": cert, "key": key}
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(self.service.port_of("web"), self.port)
        self.assertEqual(await self.served_name(), "localhost")
        self.assertEqual(await self.curl(f"https://127.0.0.1:{self.port}/echo"), (0, "200"))
        code, _ = await self.curl(f"http://127.0.0.1:{self.port}/echo")
        self.assertNotEqual(code, 0)
        del self.data["frontends"][0]["tls"]
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(await self.curl(f"http://127.0.0.1:{self.port}/echo"), (0, "200"))
        code, _ = await self.curl(f"https://127.0.0.1:{self.port}/echo")
        self.assertNotEqual(code, 0)

    @async_test
    async def test_open_connection_keeps_its_tls(self) -> None:
        """A connection opened before a rotation goes on (same TLS session) after it."""
        cert, key = self.files("a")
        first = write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        client = Client()
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(first))
        await SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options).connect(
            protocol.Factory.forProtocol(lambda: client))
        self.client_cleanup(client)
        request = b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n"
        client.transport.write(request)
        await client.read_until(b"}")
        write_pair(cert, key, "rotated")
        self.assertEqual((await self.reload())["result"], "ok")
        client.data.clear()
        client.transport.write(request)
        await client.read_until(b"}")
        self.assertEqual(await self.served_name(), "rotated")

    @async_test
    async def test_unloadable_certificate_refused(self) -> None:
        """
        A reload whose key no longer matches its certificate (a renewal
        half written after the file was checked) is refused with the
        reason; the old certificate stays, and so does the rest.
        """
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        self.data["frontends"].append({"name": "extra", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"})
        new = config_from_mapping(self.data)  # (checked with the files as they are)
        with open(key, "wb") as f:
            f.write(self_signed("rotated")[1])
        await self.service.reload(new)
        assert self.service.last_reload is not None
        self.assertEqual(self.service.last_reload["result"], "failed")
        [error] = self.service.last_reload["errors"]
        self.assertTrue(error.startswith(f"frontend web: cannot load its certificates ({cert} / {key}): "), error)
        self.assertNotIn("extra", self.service.frontends)
        self.assertEqual(await self.served_name(), "localhost")


class ReloadSSLListenTests(ReloadTLSMixin, TestCase):
    """
    Listeners whose TLS comes from an C{ssl:} listen string (a frontend's,
    the admin port's): a reload that keeps them reads their files again.
    """

    async def start_ssl(self, cert: str, key: str) -> None:
        self.site = CountingSite(Backend("b0"))
        server = await listen(self.site)
        self.addCleanup(server.stopListening)
        listen_ssl = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.data = {
            "admin": {"listen": listen_ssl},
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{server.getHost().port}"],
                          "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": listen_ssl, "backend": "web"}],
        }
        self.path = os.path.abspath(self.mktemp()) + ".yaml"
        self.rewrite()
        self.service = await self.start_service(self.data, config_path=self.path)
        self.port = self.service.port_of("web")
        assert self.service.admin_port is not None
        self.admin = self.service.admin_port.getHost().port
        self.data["frontends"][0]["listen"] = listen_ssl.replace("ssl:0:", f"ssl:{self.port}:")
        # (the admin port's string as it was: the same socket)
        self.rewrite()

    @async_test
    async def test_ssl_listeners_renewed_in_place(self) -> None:
        """An ssl: frontend and admin port serve the certificate renewed over their files after a reload."""
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start_ssl(cert, key)
        write_pair(cert, key, "rotated")
        self.assertEqual((await self.reload())["result"], "ok")
        self.assertEqual(await self.served_name(), "rotated")
        self.assertEqual(await self.curl(f"https://127.0.0.1:{self.port}/echo"), (0, "200"))
        self.port = self.admin
        self.assertEqual(await self.served_name(), "rotated")

    @async_test
    async def test_ssl_listener_unloadable_refused(self) -> None:
        """An ssl: listener's key that no longer loads refuses the reload; the old certificate stays."""
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start_ssl(cert, key)
        with open(key, "wb") as f:
            f.write(b"not a key\n")
        reload = await self.reload()
        self.assertEqual(reload["result"], "failed")
        [error] = reload["errors"]
        self.assertTrue(error.startswith(f"frontend web: cannot load its certificates ({cert} / {key}): "), error)
        self.assertEqual(await self.served_name(), "localhost")


class ReloadWhileStoppingTests(ReloadTLSMixin, TestCase):
    @async_test
    async def test_stop_while_certificates_load(self) -> None:
        """
        A stop that begins while a reload reads its certificates (in a
        thread) wins: the reload changes nothing, nothing listens again.
        """
        cert, key = self.files("a")
        write_pair(cert, key, "localhost")
        await self.start({"cert": cert, "key": key})
        reload = self.service.reload(config_from_mapping(self.data))
        stopped = self.service.stopService()
        await reload
        await stopped
        assert self.service.last_reload is not None
        self.assertEqual(self.service.last_reload["errors"], ["rproxy is stopping"])
        self.assertEqual((self.service.frontends, self.service.ports), ({}, {}))
