"""
Reloads and a tunnel's TLS, end to end on 127.0.0.1: a reload reads the
certificate files of the tunnel's TLS ports again (its C{tls:} section's,
renewed in place or other files, and an C{ssl:} listen string's) and new
connections get them on the ports as they are, while a real agent stays
logged in and open connections keep theirs; a pair that cannot be loaded
refuses the reload, nothing changed.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.trial.unittest import TestCase

from rproxy.config import config_from_mapping
from rproxy.tls import self_signed
from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests.support import Client, async_test, reactor, wait_for
from tests.test_reload_tls import ReloadTLSMixin


def issue(authority: tuple[bytes, bytes], common_name: str, cert_path: str, key_path: str) -> None:
    """
    Write a certificate for C{localhost} (subject C{common_name}) issued
    by C{authority} (its certificate and key, PEM), and a new key, over
    the two files, as C{certbot renew} does: a client that trusts the
    authority verifies the old certificate and the new one alike.
    """
    ca_key: Any = serialization.load_pem_private_key(authority[1], None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(x509.load_pem_x509_certificate(authority[0]).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


class ReloadTunnelTLSTests(ReloadTLSMixin, TestCase):
    """
    A tunnel with C{tls:} (its control and proxy ports) and a public port
    on an C{ssl:} listen string, run from a file, with a real agent.
    """

    async def start_tunnel(self) -> None:
        """
        The tunnel (certificate C{first} on every port, issued by a test
        authority), and agent C{a} logged in over TLS before a local
        echo service.
        """
        self.authority = self_signed("rproxy test authority", days=1)
        self.ca = os.path.abspath(self.mktemp())
        with open(self.ca, "wb") as f:
            f.write(self.authority[0])
        self.cert, self.key = self.files("a")
        issue(self.authority, "first", self.cert, self.key)
        self.data: dict[str, Any] = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "api_keys": [{"key": "good-key", "level": -1, "name": "shared"}],
            "tunnels": [{
                "name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
                "public": f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
                "open_timeout": "2s", "tls": {"cert": self.cert, "key": self.key},
            }],
        }
        self.path = os.path.abspath(self.mktemp()) + ".yaml"
        self.rewrite()
        self.service = await self.start_service(self.data, config_path=self.path)
        self.tunnel = self.service.tunnels["gpu"]
        self.ports = {role: self.tunnel.port_of(role) for role in ("control", "proxy", "public")}
        self.listeners = dict(self.tunnel.ports)
        _, local = await self.backend("a")
        self.agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{self.ports['control']}",
                       "proxy": f"127.0.0.1:{self.ports['proxy']}"},
            "api_key": "good-key", "agent_id": "a",
            "services": [{"name": "web", "local": f"127.0.0.1:{local.getHost().port}"}],
            "heartbeat_interval": "100ms", "reconnect": {"initial": "50ms", "max": "200ms"},
            "tls": {"ca": self.ca, "server_name": "localhost"},
        }), reactor)
        self.agent.startService()
        self.addCleanup(self.agent.stopService)
        await wait_for(lambda: "a" in self.tunnel.registry.agents and self.agent.control is not None)
        self.session = self.tunnel.registry.agents["a"]
        self.control = self.agent.control

    async def name_on(self, role: str) -> str:
        """
        The CN C{openssl s_client} is shown on the tunnel's C{role} port.
        """
        self.port = self.tunnel.port_of(role)
        return await self.served_name()

    async def public_stream(self) -> Client:
        """
        A TLS connection to the public port (verified against the test
        authority) through agent C{a} to its echo service.
        """
        client = Client()
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(self.authority[0]))
        await SSL4ClientEndpoint(reactor, "127.0.0.1", self.tunnel.port_of("public"), options).connect(
            protocol.Factory.forProtocol(lambda: client))
        self.client_cleanup(client)
        self.assertEqual(await client.read_until(b"\n"), b"a\n")
        return client

    async def assert_agent_stayed(self) -> None:
        """
        Agent C{a} is still logged in on the session it had (its control
        connection never closed) and its heartbeats still arrive; the
        tunnel's listeners are those it had (none was closed to listen
        again).
        """
        heard = self.session.last_heartbeat
        await wait_for(lambda: self.session.last_heartbeat != heard)
        self.assertIs(self.tunnel.registry.agents.get("a"), self.session)
        self.assertIs(self.agent.control, self.control)
        self.assertEqual({role: self.tunnel.port_of(role) for role in self.ports}, self.ports)
        self.assertEqual(self.tunnel.ports, self.listeners)

    @async_test
    async def test_renewed_in_place(self) -> None:
        """
        A certificate renewed over the same files (certbot renew, then
        SIGHUP) is served by the control, proxy and public ports after the
        reload, the agent stays logged in, a stream opened before goes on
        and a new one flows (over a data connection with the new one).
        """
        await self.start_tunnel()
        for role in self.ports:
            self.assertEqual(await self.name_on(role), "first")
        before = await self.public_stream()
        issue(self.authority, "renewed", self.cert, self.key)
        self.assertEqual((await self.reload())["result"], "ok")
        for role in self.ports:
            self.assertEqual(await self.name_on(role), "renewed", role)
        await self.assert_agent_stayed()
        before.transport.write(b"still here\n")
        self.assertEqual(await before.read_until(b"here\n"), b"still here\n")
        after = await self.public_stream()
        after.transport.write(b"after\n")
        self.assertEqual(await after.read_until(b"after\n"), b"after\n")

    @async_test
    async def test_new_files(self) -> None:
        """
        tls: pointed at other files: the control and proxy ports serve
        them on the ports they had, and the agent stays logged in.
        """
        await self.start_tunnel()
        cert, key = self.files("b")
        issue(self.authority, "second", cert, key)
        self.data["tunnels"][0]["tls"] = {"cert": cert, "key": key}
        self.rewrite()
        self.assertEqual((await self.reload())["result"], "ok")
        await self.assert_agent_stayed()
        self.assertEqual(await self.name_on("control"), "second")
        self.assertEqual(await self.name_on("proxy"), "second")
        self.assertEqual(await self.name_on("public"), "first")  # (its own files, unchanged)

    @async_test
    async def test_unloadable_certificate_refused(self) -> None:
        """
        A reload whose key no longer matches its certificate (a renewal
        half written after the file was checked) is refused with the
        reason; the old certificate stays, and so does the rest.
        """
        await self.start_tunnel()
        self.data["tunnels"][0]["open_timeout"] = "3s"
        new = config_from_mapping(self.data)  # (checked with the files as they are)
        with open(self.key, "wb") as f:
            f.write(self_signed("rotated")[1])
        await self.service.reload(new)
        assert self.service.last_reload is not None
        self.assertEqual(self.service.last_reload["result"], "failed")
        [error] = self.service.last_reload["errors"]
        self.assertTrue(error.startswith(
            f"tunnel gpu (control port): cannot load its certificates ({self.cert} / {self.key}): "), error)
        self.assertEqual(self.tunnel.config.open_timeout, 2.0)
        self.assertEqual(await self.name_on("control"), "first")
        await self.assert_agent_stayed()
