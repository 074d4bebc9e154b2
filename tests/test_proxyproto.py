"""
Tests for L{rproxy.proxyproto} (the PROXY protocol codec, sans I/O) and
L{rproxy.handoff.ProxyProtocolFactory} (reading it on a listener), with
string transports and a fake clock.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from twisted.internet import address, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rproxy.handoff import ProxyProtocolFactory
from rproxy.proxyproto import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyHeader,
    build_v1,
    build_v2,
    header_for,
    parse,
)


class V1Tests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        """A TCP4 line gives both addresses and its length."""
        data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET /"
        header, length = parse(data)  # type: ignore[misc]
        self.assertEqual(header, ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 443)))
        self.assertEqual(data[length:], b"GET /")

    def test_tcp6(self) -> None:
        """A TCP6 line; addresses come back in canonical form."""
        header, _ = parse(b"PROXY TCP6 2001:DB8::1 ::1 1 65535\r\n")  # type: ignore[misc]
        self.assertEqual((header.source, header.destination), (("2001:db8::1", 1), ("::1", 65535)))

    def test_unknown(self) -> None:
        """UNKNOWN (with or without addresses after it) carries no address."""
        for data in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            header, length = parse(data)  # type: ignore[misc]
            self.assertEqual((header.family, header.source, length), ("UNKNOWN", None, len(data)))

    def test_incomplete(self) -> None:
        """Every strict prefix of a valid header asks for more bytes."""
        data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"
        for i in range(len(data)):
            self.assertIsNone(parse(data[:i]))

    def test_malformed(self) -> None:
        """Malformed lines are refused, each with its reason."""
        cases = {
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n": "fields",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n": "IPv4",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n": "IPv6",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n": "port",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n": "port",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n": "port",
            b"PROXY TCP4 192.0.2.777 198.51.100.1 1 2\r\n": "address",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n": "protocol",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n": "fields",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n": "ends with LF without CR",
            # (the client's CRLF further on does not end the header)
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\nGET / HTTP/1.1\r\n": "ends with LF without CR",
            b"PROXY \xff\r\n": "ASCII",
            b"PROXX": "no PROXY header",
            b"GET / HTTP/1.1\r\n": "no PROXY header",
        }
        for data, reason in cases.items():
            with self.assertRaises(InvalidProxyHeader, msg=data) as e:
                parse(data)
            self.assertIn(reason, str(e.exception), data)

    def test_too_long(self) -> None:
        """No CRLF within 107 bytes: refused without reading further."""
        data = b"PROXY TCP4 " + b"1" * 200
        with self.assertRaises(InvalidProxyHeader) as e:
            parse(data)
        self.assertIn("107", str(e.exception))
        self.assertIsNone(parse(data[: V1_MAX_LENGTH - 1]))

    def test_longest_valid(self) -> None:
        """The specification's longest line (107 bytes, UNKNOWN with IPv6 addresses) is read."""
        v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        data = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
        self.assertEqual(len(data), V1_MAX_LENGTH)
        self.assertEqual(parse(data)[1], V1_MAX_LENGTH)  # type: ignore[index]

    def test_build(self) -> None:
        """Built lines read back; mixed or non-IP addresses give UNKNOWN."""
        self.assertEqual(build_v1(("10.0.0.1", 5), ("10.0.0.2", 80)), b"PROXY TCP4 10.0.0.1 10.0.0.2 5 80\r\n")
        self.assertEqual(build_v1(("::1", 5), ("::2", 80)), b"PROXY TCP6 ::1 ::2 5 80\r\n")
        self.assertEqual(build_v1(("::1", 5), ("10.0.0.2", 80)), b"PROXY UNKNOWN\r\n")
        self.assertEqual(build_v1(None, None), b"PROXY UNKNOWN\r\n")
        self.assertEqual(build_v1(("::ffff:10.0.0.1", 5), ("10.0.0.2", 80)),
                         b"PROXY TCP4 10.0.0.1 10.0.0.2 5 80\r\n")


class V2Tests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """TCP4 and TCP6 headers built are parsed back, TLVs included."""
        for source, destination in ((("192.0.2.7", 1234), ("198.51.100.1", 443)), (("2001:db8::7", 1), ("::1", 2))):
            data = build_v2(source, destination, tlvs=((0x04, b""), (0xE0, b"abc"))) + b"rest"
            header, length = parse(data)  # type: ignore[misc]
            self.assertEqual((header.version, header.command), (2, "PROXY"))
            self.assertEqual((header.source, header.destination), (source, destination))
            self.assertEqual(header.tlvs, ((0x04, b""), (0xE0, b"abc")))
            self.assertEqual(data[length:], b"rest")

    def test_local(self) -> None:
        """LOCAL carries no address (the proxy's own connection)."""
        header, length = parse(build_v2(None, None, local=True))  # type: ignore[misc]
        self.assertEqual((header.command, header.source, length), ("LOCAL", None, 16))

    def test_unspec(self) -> None:
        """PROXY over UNSPEC (addresses that are not IP) has no address."""
        data = build_v2(None, None)
        self.assertEqual(data[13], 0x00)
        self.assertEqual(parse(data)[0].source, None)  # type: ignore[index]

    def test_incomplete(self) -> None:
        """Every strict prefix asks for more."""
        data = build_v2(("192.0.2.7", 1234), ("198.51.100.1", 443))
        for i in range(len(data)):
            self.assertIsNone(parse(data[:i]))

    def test_malformed(self) -> None:
        """Wrong version, command, family, lengths and TLVs are refused."""
        def header(ver_cmd: int, family: int, body: bytes, length: int | None = None) -> bytes:
            return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, family, len(body) if length is None else length) + body

        cases = {
            header(0x11, 0x11, b"\0" * 12): "version",
            header(0x22, 0x11, b"\0" * 12): "command",
            header(0x21, 0x41, b"\0" * 12): "family",
            header(0x21, 0x11, b"\0" * 8): "12 needed",
            header(0x21, 0x21, b"\0" * 12): "36 needed",
            header(0x21, 0x12, b"\0" * 12): "UDP4",
            header(0x21, 0x11, b"\0" * 12 + b"\x01\x00"): "truncated TLV",
            header(0x21, 0x11, b"\0" * 12 + b"\x01\x00\x09ab"): "TLV longer",
            header(0x21, 0x11, b"", V2_MAX_LENGTH + 1): "at most",
            b"\r\n\r\n\x00\r\nQUIX": "no PROXY header",
        }
        for data, reason in cases.items():
            with self.assertRaises(InvalidProxyHeader, msg=data) as e:
                parse(data)
            self.assertIn(reason, str(e.exception), data)

    def test_header_for(self) -> None:
        """Twisted addresses: IPv4, IPv6; anything else is UNKNOWN/UNSPEC."""
        peer, host = address.IPv4Address("TCP", "10.1.1.1", 5000), address.IPv4Address("TCP", "10.2.2.2", 80)
        self.assertEqual(header_for("v1", peer, host), b"PROXY TCP4 10.1.1.1 10.2.2.2 5000 80\r\n")
        header, _ = parse(header_for("v2", peer, host))  # type: ignore[misc]
        self.assertEqual(header.source, ("10.1.1.1", 5000))
        self.assertEqual(header_for("v1", address.UNIXAddress(b"/x"), host), b"PROXY UNKNOWN\r\n")


class FuzzTests(SynchronousTestCase):
    def test_random_bytes(self) -> None:
        """
        Random and mutated input either parses, asks for more (only while
        shorter than a header's bound), or raises InvalidProxyHeader;
        nothing else escapes.
        """
        rng = random.Random(17)
        seeds = [build_v1(("10.0.0.1", 5), ("10.0.0.2", 80)), build_v2(("::1", 5), ("::2", 80), tlvs=((1, b"h2"),)),
                 build_v2(None, None, local=True)]
        for i in range(5000):
            if i % 2:
                data = bytearray(rng.choice(seeds))
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data[: rng.randint(0, len(data))])
            else:
                data = rng.choice((b"P", b"\r", b"")) + rng.randbytes(rng.randint(0, 200))
            try:
                result = parse(data)
            except InvalidProxyHeader:
                continue
            if result is None:
                self.assertLess(len(data), 16 + V2_MAX_LENGTH)
            else:
                self.assertLessEqual(result[1], len(data))


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.data = b""
        self.made = False
        self.read_closed = False
        self.lost: Any = None

    def connectionMade(self) -> None:
        self.made = True
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.host = self.transport.getHost()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class RecorderFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        p = Recorder(addr)
        self.built.append(p)
        return p


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.inner = RecorderFactory()
        self.factory = ProxyProtocolFactory(self.inner, self.clock, timeout=3.0, name="fe")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self) -> tuple[Any, StringTransport]:
        proxy = address.IPv4Address("TCP", "127.0.0.9", 40000)
        protocol = self.factory.buildProtocol(proxy)
        transport = StringTransport(peerAddress=proxy, hostAddress=address.IPv4Address("TCP", "127.0.0.1", 8080))
        transport.protocol = protocol  # as a TCP transport has it
        protocol.makeConnection(transport)
        return protocol, transport

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.info]

    def test_real_address(self) -> None:
        """
        The inner protocol is built only once the header is read, with the
        client's address for buildProtocol and getPeer/getHost; bytes after
        the header (in the same read) reach it.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 ")
        self.assertEqual(self.inner.built, [])
        protocol.dataReceived(b"56324 443\r\nhello")
        [inner] = self.inner.built
        # the transport now delivers straight to the frontend's protocol
        self.assertIs(transport.protocol, inner)
        self.assertEqual(inner.addr, address.IPv4Address("TCP", "192.0.2.7", 56324))
        self.assertEqual(inner.peer, inner.addr)
        self.assertEqual(inner.host, address.IPv4Address("TCP", "198.51.100.1", 443))
        self.assertEqual(inner.data, b"hello")
        protocol.dataReceived(b" world")
        self.assertEqual(inner.data, b"hello world")
        inner.transport.write(b"answer")
        self.assertEqual(transport.value(), b"answer")
        self.assertEqual(self.factory.accepted, 1)

    def test_v2_ipv6(self) -> None:
        """A v2 header with IPv6 addresses gives IPv6Address objects."""
        protocol, _ = self.connect()
        protocol.dataReceived(build_v2(("2001:db8::7", 9), ("2001:db8::1", 443)))
        [inner] = self.inner.built
        self.assertEqual(inner.addr, address.IPv6Address("TCP", "2001:db8::7", 9))

    def test_local_keeps_socket_address(self) -> None:
        """LOCAL (a health check by the proxy): the socket's own addresses."""
        protocol, transport = self.connect()
        protocol.dataReceived(build_v2(None, None, local=True))
        [inner] = self.inner.built
        self.assertEqual(inner.addr, address.IPv4Address("TCP", "127.0.0.9", 40000))
        self.assertEqual(inner.host, address.IPv4Address("TCP", "127.0.0.1", 8080))
        self.assertIs(inner.transport, transport)  # nothing in between

    def test_malformed_closes_with_one_line(self) -> None:
        """A connection starting with something else is aborted, one line with the reason."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(self.inner.built, [])
        self.assertEqual(self.factory.rejected, 1)
        [line] = self.lines()
        self.assertIn("frontend fe: closing 127.0.0.9:40000: no PROXY header", line)
        protocol.dataReceived(b"more")  # ignored
        self.assertEqual(self.inner.built, [])

    def test_timeout(self) -> None:
        """
        No header within the timeout: closed (at most a quarter of the
        timeout late: one sweep for all), one line.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"PROXY TCP4")
        self.clock.pump([0.1] * 29)
        self.assertFalse(transport.disconnecting or transport.disconnected)
        self.clock.pump([0.1] * 9)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        [line] = self.lines()
        self.assertIn("no complete PROXY header within 3s (10 bytes)", line)

    def test_timer_cancelled(self) -> None:
        """The timer is gone once the header is read or the connection closes."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"PROXY UNKNOWN\r\n")
        self.assertEqual(self.factory.deadlines.pending, {})
        protocol2, _ = self.connect()
        protocol2.connectionLost(None)
        self.assertEqual(self.factory.deadlines.pending, {})
        self.clock.advance(1)  # the sweep finds nothing left and stops
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.lines(), [])

    def test_half_close_reaches_inner(self) -> None:
        """
        Before the handoff the layer is not half-closeable (a FIN ends the
        connection); after it, the inner protocol answers for it.
        """
        protocol, _ = self.connect()
        self.assertIsNone(IHalfCloseableProtocol(protocol, None))
        protocol.dataReceived(b"PROXY UNKNOWN\r\n")
        [inner] = self.inner.built
        self.assertIs(IHalfCloseableProtocol(protocol, None), inner)
        protocol.connectionLost(None)
        self.assertIsNone(inner.lost)  # (the reason passed on as given)
        self.assertTrue(inner.made)

    def test_pending_bounded(self) -> None:
        """Past max_pending connections waiting for a header, the next is refused at accept, one line."""
        self.factory.max_pending = 1
        self.connect()
        self.assertIsNone(self.factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.9", 40001)))
        self.assertEqual(self.factory.rejected, 1)
        [line] = self.lines()
        self.assertIn("refusing 127.0.0.9:40001: 1 connections wait for their PROXY header", line)

    def test_only_from_trusted_sources(self) -> None:
        """
        With sources (proxy_protocol.from), a peer outside them is closed
        at accept (nothing built), counted, one line; a peer inside sends
        its header as before.
        """
        import ipaddress

        factory = ProxyProtocolFactory(self.inner, self.clock, name="fe",
                                       sources=(ipaddress.ip_network("10.0.0.0/8"),))
        self.assertIsNone(factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.9", 40001)))
        self.assertEqual(factory.rejected, 1)
        [line] = self.lines()
        self.assertIn("refusing 127.0.0.9:40001: not in proxy_protocol.from", line)
        receiver = factory.buildProtocol(address.IPv4Address("TCP", "10.1.2.3", 40002))
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 5000 80\r\n")
        self.assertEqual(self.inner.built[-1].addr, address.IPv4Address("TCP", "192.0.2.7", 5000))
        self.assertEqual((factory.accepted, factory.rejected), (1, 1))

    def test_follows_frontend_config(self) -> None:
        """
        With a frontend, its current config decides per accept: off, the
        frontend's own protocol at once; on, a header first with its timeout.
        """
        class Options:
            timeout = 7.0
            sources = None

        class Frontend:
            class config:
                proxy_protocol: Any = None

        frontend = Frontend()
        factory = ProxyProtocolFactory(self.inner, self.clock, frontend=frontend)
        direct = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.9", 1))
        self.assertIsInstance(direct, Recorder)
        frontend.config.proxy_protocol = Options()
        receiver = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.9", 2))
        self.assertNotIsInstance(receiver, Recorder)
        self.assertEqual(receiver.timeout, 7.0)
