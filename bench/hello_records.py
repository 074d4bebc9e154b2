"""
The CPU cost of routing one TLS passthrough connection whose ClientHello
(padded to about 16 KiB of records, the most C{max_hello} lets in) comes
as one-byte TLS records, one read each: through a tcp frontend with
C{tls_passthrough} on fake transports (rproxy's L{rproxy.passthrough}),
against the former way (the whole ClientHello joined and parsed again on
every read) run in the same process.  Prints the median CPU time per
connection of each and their ratio.

    .venv/bin/python bench/hello_records.py [--rounds 5]

A development aid, not a speed claim; the machine's load moves the
figures, the same-run ratio less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from rproxy.clienthello import read_client_hello  # noqa: E402
from rproxy.config import config_from_mapping  # noqa: E402
from rproxy.pool import Pool  # noqa: E402
from rproxy.tcp import TCPFrontend  # noqa: E402
from tests.test_clienthello import client_hello  # noqa: E402


def tiny_records(size: int = 2700) -> list[bytes]:
    """
    A real ClientHello (OpenSSL's) with an unknown extension padding its
    message to C{size} bytes, as one-byte handshake records.
    """
    body = bytearray(client_hello("a.example")[9:])
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + struct.unpack_from("!H", body, at)[0]
    at += 1 + body[at]
    pad = size - 4 - len(body) - 4
    extension = struct.pack("!HH", 0x7A7A, pad) + b"\0" * pad
    length = struct.unpack_from("!H", body, at)[0] + len(extension)
    body = body[:at] + struct.pack("!H", length) + body[at + 2:] + extension
    message = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return [b"\x16\x03\x01\x00\x01" + message[i: i + 1] for i in range(len(message))]


def rproxy_path(records: list[bytes]) -> float:
    config = config_from_mapping({
        "admin": {"listen": None},
        "backends": [{"name": "a", "servers": [{"address": "127.0.0.1:7001", "name": "a1"}],
                      "health_check": {"type": "none"}}],
        "frontends": [{"name": "f", "listen": "tcp:0",
                       "tls_passthrough": {"sni": {"a.example": "a"}, "timeout": "5s"}}],
    })
    reactor = MemoryReactorClock()
    pools = {b.name: Pool(b, reactor) for b in config.backends}
    frontend = TCPFrontend(config.frontends[0], None, reactor, reactor, pools=pools)
    peer = address.IPv4Address("TCP", "192.0.2.7", 5000)
    conn = frontend.buildProtocol(peer)
    conn.makeConnection(StringTransport(peerAddress=peer))
    start = time.process_time()
    for record in records:
        conn.dataReceived(record)
    spent = time.process_time() - start
    assert len(reactor.tcpClients) == 1, "not routed"
    return spent


def former_path(records: list[bytes]) -> float:
    early: list[bytes] = []
    start = time.process_time()
    hello = None
    for record in records:
        early.append(record)
        hello = read_client_hello(b"".join(early), 16 * 1024)
    spent = time.process_time() - start
    assert hello is not None and hello.server_name == "a.example"
    return spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    records = tiny_records()
    print(f"{len(records)} records, {sum(map(len, records))} bytes")
    ours, former = [], []
    for _ in range(args.rounds):
        ours.append(rproxy_path(records))
        former.append(former_path(records))
    a, b = statistics.median(ours), statistics.median(former)
    print(f"rproxy: {a * 1000:.2f} ms CPU per connection; former (parse per read): {b * 1000:.1f} ms; "
          f"former/rproxy {b / a:.0f}")


if __name__ == "__main__":
    main()
