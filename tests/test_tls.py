"""
Tests for L{rproxy.tls}: ALPN and SNI on server connections, with real
OpenSSL on both sides over memory transports (L{iosim}).
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
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides

from rproxy.config import FrontendConfig
from rproxy.config.endpoints import parse_endpoint
from rproxy.tls import (
    HTTP_ALPN,
    TLSServerEndpoint,
    self_signed,
    server_tls_factory,
    ssl_server_endpoint,
)
from tests.support import self_signed_pem


class HTTPFrontendDeclarationTests(SynchronousTestCase):
    """
    The HTTP frontend tells TLS listeners what ALPN may select.
    """

    def test_http_frontend_offers_http11(self) -> None:
        """
        L{HTTPFrontend} provides L{IProtocolNegotiationFactory} with
        http/1.1 alone, which is what L{_protocols_of} reads.
        """
        from rproxy.http.frontend import HTTPFrontend
        from rproxy.tls import _protocols_of

        self.assertTrue(IProtocolNegotiationFactory.implementedBy(HTTPFrontend))
        frontend = HTTPFrontend.__new__(HTTPFrontend)
        self.assertEqual(_protocols_of(frontend), (b"http/1.1",))



class Recorder(protocol.Protocol):
    """
    Records what it reads and why its connection ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.reasons: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reasons.append(reason)


class Frontend(protocol.Factory):
    """
    A factory with a frontend's configuration, as the service wraps.
    """

    def __init__(self, kind: str) -> None:
        self.config = FrontendConfig(name="f", listen="tcp:0", backend="b", protocol=kind)
        self.built: list[Recorder] = []
        if kind == "http":
            # as HTTPFrontend declares itself
            alsoProvides(self, IProtocolNegotiationFactory)

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Recorder:
        recorder = Recorder()
        recorder.factory = self
        self.built.append(recorder)
        return recorder


def handshake(server_factory: TLSMemoryBIOFactory, hostname: str, trust: bytes,
              alpn: list[bytes] | None) -> tuple[Any, Any, Recorder, iosim.IOPump]:
    """
    A TLS client (verifying C{hostname} against C{trust}, offering C{alpn})
    connected to a server built by C{server_factory}; the handshake run.
    """
    clock = Clock()
    client = Recorder()
    options = ssl.optionsForClientTLS(
        hostname, trustRoot=ssl.Certificate.loadPEM(trust), acceptableProtocols=alpn
    )
    client_factory = TLSMemoryBIOFactory(options, True, protocol.Factory.forProtocol(lambda: client), clock)
    client_tls, server_tls, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return client_tls, server_tls, client, pump


class ALPNTests(SynchronousTestCase):
    """
    ALPN on frontends: what a client that offers protocols is answered.
    """

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.cert = self_signed_pem(self.path, "localhost")

    def connect(self, kind: str, alpn: list[bytes] | None) -> tuple[Any, Any, Recorder, Frontend]:
        frontend = Frontend(kind)
        client_tls, server_tls, client, pump = handshake(
            server_tls_factory(frontend, [(self.path, self.path)]), "localhost", self.cert, alpn
        )
        client_tls.write(b"hello")
        pump.flush()
        return client_tls, server_tls, client, frontend

    def test_http_frontend_selects_http11(self) -> None:
        """
        A client offering h2 and http/1.1 (curl, browsers) gets http/1.1
        from an HTTP frontend, and the connection carries bytes.
        """
        client_tls, server_tls, client, frontend = self.connect("http", [b"h2", b"http/1.1"])
        self.assertEqual(client.reasons, [])
        self.assertEqual((client_tls.negotiatedProtocol, server_tls.negotiatedProtocol),
                         (b"http/1.1", b"http/1.1"))
        self.assertEqual(frontend.built[0].received, b"hello")

    def test_tcp_frontend_selects_nothing(self) -> None:
        """
        A tcp frontend speaks no protocol it could name: a client offering
        ALPN is served without a selection rather than refused.
        """
        client_tls, server_tls, client, frontend = self.connect("tcp", [b"h2", b"http/1.1"])
        self.assertEqual(client.reasons, [])
        self.assertIsNone(client_tls.negotiatedProtocol)
        self.assertEqual(frontend.built[0].received, b"hello")

    def test_only_unknown_protocols_offered(self) -> None:
        """
        A client offering only h2 to an HTTP frontend goes on without ALPN.
        """
        client_tls, _, client, frontend = self.connect("http", [b"h2"])
        self.assertEqual(client.reasons, [])
        self.assertIsNone(client_tls.negotiatedProtocol)
        self.assertEqual(frontend.built[0].received, b"hello")

    def test_no_alpn_offered(self) -> None:
        """A client that offers no ALPN is served as before."""
        client_tls, _, client, frontend = self.connect("http", None)
        self.assertIsNone(client_tls.negotiatedProtocol)
        self.assertEqual(frontend.built[0].received, b"hello")

    def test_declared_protocols_win(self) -> None:
        """
        An explicit protocol list is what is negotiated, whatever the
        factory's configuration.
        """
        frontend = Frontend("tcp")
        client_tls, _, client, pump = handshake(
            server_tls_factory(frontend, [(self.path, self.path)], protocols=HTTP_ALPN),
            "localhost", self.cert, [b"http/1.1"],
        )
        self.assertEqual(client_tls.negotiatedProtocol, b"http/1.1")


class SNITests(SynchronousTestCase):
    """
    The certificate follows the client's SNI, with ALPN offered as well.
    """

    def setUp(self) -> None:
        self.pairs, self.certs = [], {}
        for name in ("a.example", "b.example", "*.wild.example"):
            path = os.path.abspath(self.mktemp())
            self.certs[name] = self_signed_pem(path, name)
            self.pairs.append((path, path))

    def test_each_name_its_certificate_with_alpn(self) -> None:
        """
        Clients verifying a.example (the default), b.example and a name
        under the wildcard each get their certificate and http/1.1.
        """
        for hostname, cert in (("a.example", "a.example"), ("b.example", "b.example"),
                               ("x.wild.example", "*.wild.example")):
            frontend = Frontend("http")
            client_tls, _, client, pump = handshake(
                server_tls_factory(frontend, self.pairs), hostname, self.certs[cert], [b"h2", b"http/1.1"]
            )
            self.assertEqual(client.reasons, [], hostname)
            self.assertEqual(client_tls.negotiatedProtocol, b"http/1.1", hostname)

    def test_unknown_name_gets_default(self) -> None:
        """An unknown SNI name gets the first certificate."""
        client_tls, _, client, _ = handshake(
            server_tls_factory(Frontend("http"), self.pairs), "a.example", self.certs["a.example"],
            [b"http/1.1"],
        )
        self.assertEqual(client.reasons, [])
        _, _, client, _ = handshake(
            server_tls_factory(Frontend("http"), self.pairs), "other.example", self.certs["a.example"],
            [b"http/1.1"],
        )
        self.assertEqual(len(client.reasons), 1)  # verified against the name: the default is a.example's


def _certificate(subject: str, issuer: tuple[str, Any] | None, ca: bool) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0] if issuer else subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


class ChainTests(SynchronousTestCase):
    """
    A certificate file holding the chain (a fullchain.pem).
    """

    def test_chain_sent(self) -> None:
        """
        The certificates after the leaf are sent with it, so a client that
        trusts only the root verifies a leaf issued by an intermediate.
        """
        root, root_key = _certificate("Test Root", None, True)
        middle, middle_key = _certificate("Test Intermediate", ("Test Root", root_key), True)
        leaf, leaf_key = _certificate("site.example", ("Test Intermediate", middle_key), False)
        pem = serialization.Encoding.PEM
        cert_path, key_path = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        with open(cert_path, "wb") as f:
            f.write(leaf.public_bytes(pem) + middle.public_bytes(pem))
        with open(key_path, "wb") as f:
            f.write(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        client_tls, _, client, _ = handshake(
            server_tls_factory(Frontend("http"), [(cert_path, key_path)]), "site.example",
            root.public_bytes(pem), [b"http/1.1"],
        )
        self.assertEqual(client.reasons, [])
        self.assertEqual(client_tls.negotiatedProtocol, b"http/1.1")


class SSLEndpointTests(SynchronousTestCase):
    """
    C{ssl:} listen strings, served by this module's TLS.
    """

    def test_parsed(self) -> None:
        """Port (positional or named), interface and the key files are read."""
        from twisted.internet.testing import MemoryReactor

        cert, key = self_signed("localhost", days=1)
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(key + cert)
        reactor = MemoryReactor()
        for description in (f"ssl:8443:interface=127.0.0.1:privateKey={path}",
                            f"ssl:port=8443:interface=127.0.0.1:privateKey={path}:certKey={path}"):
            endpoint = ssl_server_endpoint(reactor, parse_endpoint(description))
            self.assertIsInstance(endpoint, TLSServerEndpoint)
            self.successResultOf(endpoint.listen(Frontend("http")))
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(8443, "127.0.0.1")] * 2)
        self.assertIsInstance(reactor.tcpServers[0][1], TLSMemoryBIOFactory)

    def test_refused(self) -> None:
        """Options this module does not serve, or no key, are refused by name when parsed."""
        with self.assertRaises(ValueError) as caught:
            parse_endpoint("ssl:443:privateKey=k.pem:sslmethod=TLSv1_METHOD")
        self.assertEqual(str(caught.exception),
                         "unknown option 'sslmethod' for ssl endpoints "
                         "(ssl takes port, privateKey, certKey, interface, backlog)")
        with self.assertRaises(ValueError) as caught:
            parse_endpoint("ssl:443")
        self.assertEqual(str(caught.exception), "no privateKey in 'ssl:443' (ssl endpoints need privateKey=FILE)")

    def test_unreadable_key_fails_listen(self) -> None:
        """A key file that cannot be read fails the listen, not the parse."""
        from twisted.internet.testing import MemoryReactor

        endpoint = ssl_server_endpoint(MemoryReactor(), parse_endpoint("ssl:443:privateKey=/nonexistent/k.pem"))
        self.failureResultOf(endpoint.listen(Frontend("tcp")), FileNotFoundError)
