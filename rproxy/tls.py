"""
TLS for frontends (termination, several certificates chosen by SNI) and
for connections to servers (verified with service-identity).

A frontend's certificates are PEM files; the host names each one serves are
read from its subjectAltName DNS entries (or its CN).  The first
certificate is the default for clients that send no SNI or an unknown name.
A certificate file may hold the whole chain (leaf first, as in a
C{fullchain.pem}): the certificates after the first are sent with it.

ALPN: an HTTP frontend selects C{http/1.1} when the client offers it; any
other listener selects nothing, and a client offering only protocols we do
not speak (C{h2} alone) goes on without ALPN, as it would with a server that
knows no ALPN.  Twisted's own select callback is not used: with no
protocols of its own it answers an empty selection, which OpenSSL turns
into an C{internal_error} alert for every client that offers ALPN (curl,
browsers, Python's C{ssl} with C{set_alpn_protocols}).  Listen strings of
type C{ssl:} are served by the same code (L{ssl_server_endpoint}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

if TYPE_CHECKING:
    from rproxy.config.endpoints import Endpoint

__all__ = [
    "HTTP_ALPN",
    "ReloadableCreator",
    "SNIServerCreator",
    "TLSServerEndpoint",
    "load_pair",
    "server_tls_factory",
    "tls_layer",
    "ssl_pairs",
    "ssl_server_endpoint",
    "client_tls_options",
    "names_of",
    "self_signed",
]

# What an HTTP frontend speaks, for ALPN (it has no HTTP/2).
HTTP_ALPN = (b"http/1.1",)


def load_pair(cert_path: str, key_path: str) -> tuple[ssl.PrivateCertificate, bytes]:
    """
    The certificate and key of a PEM pair (one file may hold both), and
    the certificate file's PEM (with any chain after the certificate).
    """
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    if cert_path == key_path:
        return ssl.PrivateCertificate.loadPEM(cert_pem), cert_pem
    return ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem), cert_pem


def _chain_of(pem: bytes) -> list[Any]:
    """
    The certificates after the first one in a PEM file (the chain to send
    with a leaf certificate), as pyOpenSSL objects.
    """
    from OpenSSL import crypto

    certificates = x509.load_pem_x509_certificates(pem) if b"-----BEGIN CERTIFICATE" in pem else []
    return [crypto.X509.from_cryptography(c) for c in certificates[1:]]


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
    (exact names first, then C{*.suffix} wildcards, else the default), and
    whose ALPN selection is the first of C{protocols} the client offers.

    Every certificate's context gets the same ALPN callback: OpenSSL asks
    the context the SNI callback switched to, not the one the connection
    started with.  The files are read when it is made (a reload that must
    serve renewed files makes a new one: L{tls_layer}).

    @ivar protocols: what ALPN may select, best first.
    """

    def __init__(self, pairs: list[tuple[str, str]], protocols: Sequence[bytes] = ()) -> None:
        self.protocols = tuple(protocols)
        self._contexts: dict[str, SSL.Context] = {}
        self._wildcards: list[tuple[str, SSL.Context]] = []
        self._default: SSL.Context | None = None
        for cert_path, key_path in pairs:
            private, cert_pem = load_pair(cert_path, key_path)
            context = ssl.CertificateOptions(
                privateKey=private.privateKey.original,
                certificate=private.original,
                extraCertChain=_chain_of(cert_pem),
            ).getContext()
            context.set_alpn_select_callback(self._select_protocol)
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

    def _select_protocol(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in self.protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._default, None)


def _protocols_of(factory: Any) -> tuple[bytes, ...]:
    """
    The ALPN protocols a factory's connections speak: what it declares
    through L{IProtocolNegotiationFactory} (the HTTP frontend: C{http/1.1}),
    else none (a byte stream: tcp frontends, tunnel ports).
    """
    negotiation = IProtocolNegotiationFactory(factory, None)
    if negotiation is not None:
        return tuple(negotiation.acceptableProtocols())
    return ()


def server_tls_factory(
    factory: Any, pairs: list[tuple[str, str]], protocols: Sequence[bytes] | None = None
) -> TLSMemoryBIOFactory:
    """
    Wrap a protocol factory so its connections speak TLS as a server;
    C{protocols} (for ALPN) defaults to what the factory speaks.
    """
    if protocols is None:
        protocols = _protocols_of(factory)
    return TLSMemoryBIOFactory(SNIServerCreator(pairs, protocols), False, factory)


def tls_layer(factory: Any, creator: SNIServerCreator) -> TLSMemoryBIOFactory:
    """
    Wrap a protocol factory so its connections speak TLS as a server with
    the certificates C{creator} has loaded (a reload loads them all before
    it changes anything); ALPN selects from what the factory speaks.
    """
    creator.protocols = _protocols_of(factory)
    return TLSMemoryBIOFactory(creator, False, factory)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableCreator:
    """
    The certificates of a listener that a reload keeps while it may give
    it other ones (an C{ssl:} listen string, whose files a reload reads
    again): each new connection uses those L{current} holds then; open
    ones keep theirs.

    @ivar current: an L{SNIServerCreator}.
    """

    def __init__(self, current: SNIServerCreator) -> None:
        self.current = current

    def replace(self, new: SNIServerCreator) -> None:
        """
        Serve new connections with C{new}'s certificates (ALPN unchanged).
        """
        new.protocols = self.current.protocols
        self.current = new

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.current.serverConnectionForTLS(tlsProtocol)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    A server endpoint whose connections speak TLS over those of another
    (the certificate pairs as for L{SNIServerCreator}).

    @ivar certificates: once it listens, what its connections' TLS comes
        from (L{ReloadableCreator}: a reload that keeps the listener
        gives it the files read again).
    """

    def __init__(self, inner: IStreamServerEndpoint, pairs: list[tuple[str, str]]) -> None:
        self._inner = inner
        self._pairs = pairs
        self.certificates: ReloadableCreator | None = None

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        try:
            self.certificates = ReloadableCreator(SNIServerCreator(self._pairs, _protocols_of(factory)))
        except Exception:  # noqa: BLE001 - an unreadable certificate fails the listen
            return defer.fail()
        return self._inner.listen(TLSMemoryBIOFactory(self.certificates, False, factory))


def ssl_pairs(endpoint: Endpoint) -> list[tuple[str, str]]:
    """
    The certificate and key files of a parsed C{ssl:} listen string
    (C{certKey} defaults to C{privateKey}).
    """
    key = endpoint.get("privateKey")
    assert key is not None
    return [(endpoint.get("certKey", key) or key, key)]


def ssl_server_endpoint(reactor: Any, endpoint: Endpoint, backlog: int = 511) -> IStreamServerEndpoint:
    """
    The endpoint for a parsed C{ssl:} listen string (Twisted's syntax:
    port, C{interface}, C{backlog}, C{privateKey} and C{certKey}, which
    defaults to C{privateKey}; a certificate file may carry its chain): a
    TCP listener with TLS from this module, so it negotiates ALPN as the
    frontends' C{tls:} does.  L{rproxy.config.endpoints.parse_endpoint}
    has refused the options this does not honour.
    """
    from rproxy.transport import TCPServerEndpoint

    given = endpoint.backlog
    tcp = TCPServerEndpoint(reactor, endpoint.port or 0, given if given is not None else backlog, endpoint.interface)
    return TLSServerEndpoint(tcp, ssl_pairs(endpoint))


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


def tls_failure(reason: Any) -> str | None:
    """
    OpenSSL's reason for a failed TLS connection ("certificate verify
    failed", "http request" for plain HTTP sent to a TLS port, "wrong
    version number"), rather than the list of tuples its exception prints
    as; None when C{reason} (a Failure) is no TLS error.
    """
    error = reason.value
    if not isinstance(error, SSL.Error):
        return None
    reasons = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return ", ".join(r for r in reasons if r) or reason.getErrorMessage()
