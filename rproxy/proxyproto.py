"""
The PROXY protocol (HAProxy's, versions 1 and 2), sans I/O.

A proxy in front of rproxy (HAProxy's C{send-proxy}, an AWS NLB, another
rproxy) writes one header before the client's bytes saying who the client
is; rproxy writes one to servers that want it (C{send_proxy: v1|v2}).

L{parse} reads a header from the start of a buffer: the header and its
length, C{None} while more bytes are needed, or L{InvalidProxyHeader} with
the reason.  It never looks past the most a header may take: 107 bytes for
version 1 (the specification's limit, CRLF included), 16 bytes plus the
announced length for version 2, which is refused past L{V2_MAX_LENGTH}.
Bytes that cannot start a header (C{GET /}, a TLS ClientHello) are
refused as soon as they are seen.

L{build_v1} and L{build_v2} write headers for TCP over IPv4 and IPv6
(C{UNKNOWN} / C{LOCAL} when the addresses are not TCP's);
L{header_for} from two Twisted addresses.

The wrapping factory that reads headers on a listener is
L{rproxy.handoff.ProxyProtocolFactory}.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import attrs

__all__ = [
    "InvalidProxyHeader",
    "ProxyHeader",
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "build_v1",
    "build_v2",
    "header_for",
    "parse",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# what follows the 16 bytes of a version 2 header: addresses (at most 216
# bytes, for UNIX sockets) and TLVs; HAProxy's own bound is its buffer size
V2_MAX_LENGTH = 4096

_V2_FAMILIES = {0x00: "UNSPEC", 0x11: "TCP4", 0x21: "TCP6", 0x12: "UDP4", 0x22: "UDP6", 0x31: "UNIX", 0x32: "UNIX"}


class InvalidProxyHeader(ValueError):
    """
    The bytes are not a PROXY protocol header; the message says why.
    """


@attrs.frozen
class ProxyHeader:
    """
    A parsed header.

    @ivar version: 1 or 2.
    @ivar command: C{"PROXY"} (relayed connection) or C{"LOCAL"} (the
        proxy's own, a health check: use the connection's addresses).
    @ivar family: C{"TCP4"}, C{"TCP6"}, C{"UNKNOWN"} (v1) or
        C{"UNSPEC"}/C{"UNIX"} (v2).
    @ivar source: (host, port) of the client, or None (LOCAL, UNKNOWN).
    @ivar destination: (host, port) the client connected to, or None.
    @ivar tlvs: version 2 type-length-value pairs, in order.
    """

    version: int
    command: str
    family: str
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """
    The header at the start of C{data} and its length in bytes, or None
    while C{data} is a valid but incomplete beginning.

    @raise InvalidProxyHeader: C{data} does not start with a header.
    """
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if not data:
        return None
    raise InvalidProxyHeader(f"no PROXY header: the connection starts with {_show(data[:8])}")


def _show(data: bytes) -> str:
    return repr(data)[1:]


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise InvalidProxyHeader(f"no PROXY header: the connection starts with {_show(data[:8])}")
    # the header ends at its first LF, which must follow a CR (a CRLF
    # further on is the client's, not the header's)
    lf = data.find(b"\n", 0, V1_MAX_LENGTH)
    if lf < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise InvalidProxyHeader(f"v1 header without CRLF in its first {V1_MAX_LENGTH} bytes")
        return None
    if data[lf - 1: lf] != b"\r":
        raise InvalidProxyHeader("v1 header ends with LF without CR")
    end = lf - 1
    line = data[len(V1_PREFIX): end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidProxyHeader("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] == "UNKNOWN":
        # the rest (if any) is to be ignored, says the specification
        return ProxyHeader(1, "PROXY", "UNKNOWN"), end + 2
    if fields[0] not in ("TCP4", "TCP6"):
        raise InvalidProxyHeader(f"v1 header: unknown protocol {fields[0][:16]!r}")
    if len(fields) != 5:
        raise InvalidProxyHeader(f"v1 header: {len(fields)} fields instead of 5")
    family, src, dst, sport, dport = fields
    version = 4 if family == "TCP4" else 6
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(1, "PROXY", family, source, destination), end + 2


def _v1_address(text: str, version: int) -> str:
    # inet_pton: strict (no leading zeros, no shorthand for IPv4) and fast
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):
        try:
            other = ipaddress.ip_address(text).version
        except ValueError:
            raise InvalidProxyHeader(f"v1 header: {text[:45]!r} is not an address") from None
        raise InvalidProxyHeader(f"v1 header: {text!r} is not an IPv{version} address "
                                 f"(an IPv{other} one)") from None
    return text if version == 4 else socket.inet_ntop(family, packed)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535:
        raise InvalidProxyHeader(f"v1 header: {text[:8]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[:12]
    if head != V2_SIGNATURE[: len(head)]:
        raise InvalidProxyHeader(f"no PROXY header: the connection starts with {_show(data[:8])}")
    if len(data) < 16:
        return None
    ver_cmd, family_byte, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise InvalidProxyHeader(f"v2 header: version {ver_cmd >> 4}")
    command = {0: "LOCAL", 1: "PROXY"}.get(ver_cmd & 0x0F)
    if command is None:
        raise InvalidProxyHeader(f"v2 header: unknown command {ver_cmd & 0x0F}")
    family = _V2_FAMILIES.get(family_byte)
    if family is None:
        raise InvalidProxyHeader(f"v2 header: unknown address family 0x{family_byte:02x}")
    if length > V2_MAX_LENGTH:
        raise InvalidProxyHeader(f"v2 header: {length} bytes of addresses and TLVs (at most {V2_MAX_LENGTH})")
    total = 16 + length
    if len(data) < total:
        return None
    body = data[16:total]
    if command == "LOCAL":
        return ProxyHeader(2, "LOCAL", family, tlvs=_tlvs(body, _skip(family, body))), total
    if family in ("UDP4", "UDP6"):
        raise InvalidProxyHeader(f"v2 header: {family} on a stream connection")
    source = destination = None
    if family == "TCP4":
        if length < 12:
            raise InvalidProxyHeader(f"v2 header: {length} bytes for TCP4 addresses (12 needed)")
        source = (socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack_from("!H", body, 8)[0])
        destination = (socket.inet_ntop(socket.AF_INET, body[4:8]), struct.unpack_from("!H", body, 10)[0])
    elif family == "TCP6":
        if length < 36:
            raise InvalidProxyHeader(f"v2 header: {length} bytes for TCP6 addresses (36 needed)")
        source = (socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack_from("!H", body, 32)[0])
        destination = (socket.inet_ntop(socket.AF_INET6, body[16:32]), struct.unpack_from("!H", body, 34)[0])
    elif family == "UNIX" and length < 216:
        raise InvalidProxyHeader(f"v2 header: {length} bytes for UNIX addresses (216 needed)")
    return ProxyHeader(2, command, family, source, destination, _tlvs(body, _skip(family, body))), total


def _skip(family: str, body: bytes) -> int:
    return min(len(body), {"TCP4": 12, "TCP6": 36, "UNIX": 216}.get(family, 0))


def _tlvs(body: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    at = start
    while at < len(body):
        if at + 3 > len(body):
            raise InvalidProxyHeader("v2 header: truncated TLV")
        kind, size = body[at], struct.unpack_from("!H", body, at + 1)[0]
        if at + 3 + size > len(body):
            raise InvalidProxyHeader("v2 header: TLV longer than the header")
        tlvs.append((kind, body[at + 3: at + 3 + size]))
        at += 3 + size
    return tuple(tlvs)


def _family(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> int:
    """
    4 or 6 when both addresses are IP addresses of that version, else 0.
    """
    if source is None or destination is None:
        return 0
    try:
        a = ipaddress.ip_address(source[0].split("%", 1)[0])
        b = ipaddress.ip_address(destination[0].split("%", 1)[0])
    except ValueError:
        return 0
    if a.version == 6 and a.ipv4_mapped is not None and b.version == 4:
        a = a.ipv4_mapped
    if b.version == 6 and b.ipv4_mapped is not None and a.version == 4:
        b = b.ipv4_mapped
    if a.version != b.version:
        return 0
    return a.version


def _canonical(host: str, version: int) -> str:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if version == 4 and address.version == 6:
        address = address.ipv4_mapped  # type: ignore[assignment]
    return str(address)


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """
    A version 1 header: C{PROXY TCP4|TCP6 ...}, or C{PROXY UNKNOWN} when
    the addresses are not both IPv4 or both IPv6.
    """
    version = _family(source, destination)
    if not version:
        return b"PROXY UNKNOWN\r\n"
    assert source is not None and destination is not None
    return (f"PROXY TCP{version} {_canonical(source[0], version)} {_canonical(destination[0], version)} "
            f"{source[1]} {destination[1]}\r\n").encode("ascii")


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None, local: bool = False,
             tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """
    A version 2 header: C{PROXY} over TCP4 or TCP6, C{PROXY} with family
    UNSPEC when the addresses are neither, or C{LOCAL} (no addresses:
    the connection is the proxy's own).
    """
    version = 0 if local else _family(source, destination)
    body = b""
    if version:
        assert source is not None and destination is not None
        packed = [ipaddress.ip_address(_canonical(h, version)).packed for h in (source[0], destination[0])]
        body = packed[0] + packed[1] + struct.pack("!HH", source[1], destination[1])
    family = {0: 0x00, 4: 0x11, 6: 0x21}[version]
    for kind, value in tlvs:
        body += struct.pack("!BH", kind, len(value)) + value
    command = 0x20 if local else 0x21
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def header_for(version: str, peer: Any, host: Any) -> bytes:
    """
    The header (C{version} C{"v1"} or C{"v2"}) announcing a connection
    from Twisted address C{peer} to C{host} (C{IPv4Address},
    C{IPv6Address}; others give C{UNKNOWN}/C{UNSPEC}).
    """
    source = _pair(peer)
    destination = _pair(host)
    if version == "v1":
        return build_v1(source, destination)
    return build_v2(source, destination)


def _pair(address: Any) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return None
