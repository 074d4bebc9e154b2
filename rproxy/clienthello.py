"""
What a TLS ClientHello says before any key is exchanged: the server name
(SNI) and the ALPN protocols offered; sans I/O.

For TLS passthrough (L{rproxy.tcp}) and protocol detection: the bytes a
client sent first are read here, never answered, and then passed on
untouched to the server chosen.

L{read_client_hello} takes what has arrived so far: L{NEED_MORE} while the
ClientHello is incomplete, a L{ClientHello} once it is whole, or
L{MalformedHello} with the reason.  It reads at most C{limit} bytes (the
handshake message may span several records, each at most 2^14 bytes) and
checks every length against the one that contains it, so no input makes it
read out of bounds, loop or hold more than C{limit}.
"""

from __future__ import annotations

import struct

import attrs

__all__ = ["NEED_MORE", "ClientHello", "MalformedHello", "looks_like_tls", "read_client_hello"]

NEED_MORE = None
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_ALPN = 0x0010
_MAX_RECORD = 2**14 + 2048  # TLSPlaintext at most 2^14; some stacks pad


class MalformedHello(ValueError):
    """
    Not a TLS ClientHello, or a broken one; the message says why.
    """


@attrs.frozen
class ClientHello:
    """
    @ivar server_name: the SNI host name (lower case, ASCII), or None.
    @ivar alpn: the protocols offered, in order.
    @ivar length: bytes of the records that carried it.
    """

    server_name: str | None
    alpn: tuple[bytes, ...] = ()
    length: int = 0


def looks_like_tls(data: bytes) -> bool | None:
    """
    Whether C{data} starts like a TLS handshake record (0x16 0x03); None
    while fewer than two bytes are there.
    """
    if len(data) < 2:
        return None if data in (b"", b"\x16") else False
    return data[0] == _HANDSHAKE and data[1] == 0x03


def read_client_hello(data: bytes, limit: int = 16 * 1024) -> ClientHello | None:
    """
    The ClientHello at the start of C{data}, L{NEED_MORE} (None), or
    L{MalformedHello}.
    """
    message = bytearray()
    at = 0
    needed = -1  # the handshake message's length, once known
    while True:
        if len(data) < at + 5:
            if at >= limit:
                raise MalformedHello(f"ClientHello longer than {limit} bytes")
            return _more(data, at)
        kind, major, length = data[at], data[at + 1], struct.unpack_from("!H", data, at + 3)[0]
        if kind != _HANDSHAKE:
            raise MalformedHello(f"record type {kind} where a handshake record was expected")
        if major != 3:
            raise MalformedHello(f"record version {major}.{data[at + 2]}")
        if length == 0 or length > _MAX_RECORD:
            raise MalformedHello(f"record of {length} bytes")
        if at + 5 + length > limit:
            raise MalformedHello(f"ClientHello longer than {limit} bytes")
        if len(data) < at + 5 + length:
            return NEED_MORE
        message += data[at + 5: at + 5 + length]
        at += 5 + length
        if needed < 0 and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise MalformedHello(f"handshake message {message[0]} where a ClientHello was expected")
            needed = 4 + int.from_bytes(message[1:4], "big")
            if needed > limit:
                raise MalformedHello(f"ClientHello of {needed} bytes (at most {limit})")
        if needed >= 0 and len(message) >= needed:
            name, alpn = _parse_hello(bytes(message[4:needed]))
            return ClientHello(name, alpn, at)


def _more(data: bytes, at: int) -> None:
    # a partial record header: check what is there already
    part = data[at:]
    if part and part[0] != _HANDSHAKE:
        raise MalformedHello(f"record type {part[0]} where a handshake record was expected")
    if len(part) > 1 and part[1] != 3:
        raise MalformedHello(f"record version {part[1]}")
    return NEED_MORE


class _Reader:
    """
    Bounded reads from one length-delimited block.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.at = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise MalformedHello(f"{self.what} truncated")
        chunk = self.data[self.at: self.at + n]
        self.at += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def vector(self, size_bytes: int, what: str) -> _Reader:
        n = self.u8() if size_bytes == 1 else self.u16()
        return _Reader(self.take(n), what)

    def left(self) -> int:
        return len(self.data) - self.at

    def take_rest(self) -> bytes:
        return self.take(self.left())


def _parse_hello(body: bytes) -> tuple[str | None, tuple[bytes, ...]]:
    r = _Reader(body, "ClientHello")
    r.take(2 + 32)  # legacy_version, random
    r.vector(1, "session id")
    suites = r.vector(2, "cipher suites")
    if suites.left() % 2 or not suites.left():
        raise MalformedHello("cipher suites of odd or zero length")
    r.vector(1, "compression methods")
    if not r.left():
        return None, ()  # no extensions (TLS 1.0-era clients)
    extensions = r.vector(2, "extensions")
    if r.left():
        raise MalformedHello("bytes after the extensions")
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.u16()
        value = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise MalformedHello(f"extension {kind} twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _server_name(value)
        elif kind == _ALPN:
            alpn = _alpn(value)
    return name, alpn


def _server_name(value: _Reader) -> str | None:
    names = value.vector(2, "server name list")
    found = None
    while names.left():
        kind = names.u8()
        host = names.vector(2, "server name").take_rest()
        if kind == 0 and found is None:
            try:
                text = host.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedHello("server name is not ASCII") from None
            if not text or len(text) > 253 or any(c <= " " or c == "\x7f" for c in text):
                raise MalformedHello("server name is empty, too long or holds control characters")
            found = text.lower().rstrip(".")
    return found


def _alpn(value: _Reader) -> tuple[bytes, ...]:
    protocols = value.vector(2, "ALPN list")
    out = []
    while protocols.left():
        out.append(protocols.vector(1, "ALPN protocol").take_rest())
    return tuple(out)
