"""
TLS for frontends (termination, several certificates chosen by SNI) and
for connections to servers (verified with service-identity).

A frontend's certificates are PEM files; the host names each one serves are
read from its subjectAltName DNS entries (or its CN).  The first
certificate is the default for clients that send no SNI or an unknown name.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

__all__ = [
    "SNIServerCreator",
    "load_pair",
    "server_tls_factory",
    "client_tls_options",
    "names_of",
    "self_signed",
]


def load_pair(cert_path: str, key_path: str) -> tuple[ssl.PrivateCertificate, bytes]:
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    if cert_path == key_path:
        return ssl.PrivateCertificate.loadPEM(cert_pem), cert_pem
    return ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem), cert_pem


def names_of(cert_pem: bytes) -> list[str]:
    """
    The DNS names a certificate serves (SANs, else the CN), lower case.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [str(n).lower() for n in names]


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerCreator:
    """
    Server TLS connections whose certificate follows the client's SNI
    (exact names first, then C{*.suffix} wildcards, else the default).
    """

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._contexts: dict[str, SSL.Context] = {}
        self._wildcards: list[tuple[str, SSL.Context]] = []
        self._default: SSL.Context | None = None
        for cert_path, key_path in pairs:
            private, cert_pem = load_pair(cert_path, key_path)
            context = private.options().getContext()
            if self._default is None:
                self._default = context
            for name in names_of(cert_pem):
                if name.startswith("*."):
                    self._wildcards.append((name[1:], context))
                else:
                    self._contexts.setdefault(name, context)
        assert self._default is not None
        self._default.set_tlsext_servername_callback(self._choose)

    def _choose(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return
        name = raw.decode("ascii", "replace").lower()
        context = self._contexts.get(name)
        if context is None:
            for suffix, candidate in self._wildcards:
                if name.endswith(suffix) and "." not in name[: -len(suffix)]:
                    context = candidate
                    break
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._default, None)


def server_tls_factory(factory: Any, pairs: list[tuple[str, str]]) -> TLSMemoryBIOFactory:
    """
    Wrap a protocol factory so its connections speak TLS as a server.
    """
    return TLSMemoryBIOFactory(SNIServerCreator(pairs), False, factory)


def client_tls_options(server_name: str, ca: str | None, verify: bool) -> Any:
    """
    Client TLS options for a server: verified against C{ca} (or the system
    roots) with service-identity, unless C{verify} is false.
    """
    if not verify:
        return ssl.CertificateOptions(verify=False)
    if ca is not None:
        with open(ca, "rb") as f:
            root = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(server_name, trustRoot=root)
    return ssl.optionsForClientTLS(server_name)


def self_signed(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """
    A self-signed certificate for C{hostname} (also a CA, so that clients
    can trust it directly) and its key, both PEM; for development and tests
    (what the seed's create_cert.sh does).
    """
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
