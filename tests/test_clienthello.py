"""
Tests for L{rproxy.clienthello}: ClientHellos written by a real TLS stack
(Python's ssl, OpenSSL) and broken ones.
"""

from __future__ import annotations

import random
import ssl
import struct

from twisted.trial.unittest import SynchronousTestCase

from rproxy.clienthello import (
    NEED_MORE,
    ClientHello,
    MalformedHello,
    looks_like_tls,
    read_client_hello,
)


def client_hello(server_name: str | None = None, alpn: list[str] | None = None) -> bytes:
    """
    The first bytes OpenSSL sends as a client.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class ClientHelloTests(SynchronousTestCase):
    def test_sni_and_alpn(self) -> None:
        """The name and the ALPN list of a real ClientHello."""
        data = client_hello("A.Example", ["h2", "http/1.1"])
        hello = read_client_hello(data + b"more")
        self.assertEqual(hello, ClientHello("a.example", (b"h2", b"http/1.1"), len(data)))

    def test_no_sni(self) -> None:
        """Without a server name: None."""
        hello = read_client_hello(client_hello(None))
        assert hello is not None
        self.assertIsNone(hello.server_name)

    def test_every_prefix_needs_more(self) -> None:
        """Each strict prefix asks for more (and never raises)."""
        data = client_hello("b.example")
        for i in range(len(data)):
            self.assertIs(read_client_hello(data[:i]), NEED_MORE)

    def test_split_records(self) -> None:
        """A handshake message spread over several records is put together."""
        data = client_hello("split.example")
        message = data[5:]
        records = b""
        for i in range(0, len(message), 100):
            chunk = message[i:i + 100]
            records += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
        hello = read_client_hello(records)
        assert hello is not None
        self.assertEqual((hello.server_name, hello.length), ("split.example", len(records)))

    def test_limit(self) -> None:
        """A ClientHello announced past the limit is refused at once."""
        data = client_hello("c.example")
        with self.assertRaises(MalformedHello):
            read_client_hello(data, limit=100)
        huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"
        with self.assertRaises(MalformedHello):
            read_client_hello(huge)

    def test_not_tls(self) -> None:
        """HTTP, a wrong record type or version: refused with a reason."""
        for data in (b"GET / HTTP/1.1\r\n", b"\x17\x03\x03\x00\x10", b"\x16\x02", b"\x16\x03\x01\x00\x00",
                     b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"):
            with self.assertRaises(MalformedHello, msg=data):
                read_client_hello(data)

    def test_looks_like_tls(self) -> None:
        """A handshake record header says TLS; one byte is not enough to say."""
        self.assertTrue(looks_like_tls(client_hello("x")))
        self.assertIsNone(looks_like_tls(b"\x16"))
        self.assertIsNone(looks_like_tls(b""))
        self.assertFalse(looks_like_tls(b"GE"))

    def test_fuzz(self) -> None:
        """
        Mutated and truncated ClientHellos: a result, NEED_MORE or
        MalformedHello, nothing else.
        """
        rng = random.Random(16)
        seeds = [client_hello("fuzz.example", ["h2"]), client_hello(None)]
        outcomes = set()
        for _ in range(3000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = data[: rng.randint(0, len(data))]
            try:
                result = read_client_hello(bytes(data))
            except MalformedHello:
                outcomes.add("malformed")
                continue
            outcomes.add("more" if result is None else "hello")
        self.assertEqual(outcomes, {"malformed", "more", "hello"})
