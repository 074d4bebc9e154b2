"""
The Python cost of one keep-alive request through the HTTP frontend, with
no sockets: 50 client connections each send a small GET, then 50 upstream
connections each answer it with nginx's 100-byte response, through the
real HTTPConnection, Exchange and UpstreamConnection, on fake transports
and a task.Clock.  A development aid for the hot path, not a speed claim
(those come from bench/http.sh, against HAProxy).

    .venv/bin/python bench/http_path.py            # us per request (CPU time)
    bench/http_path.sh                             # instructions per request
    bench/http_path.sh --tunnel                    # the same through a tunnel's mode http

C{--tunnel}: the same requests through a C{mode: http} tunnel's public
port, whose upstream connections are agents' data connections
(L{rproxy.tunnel.streams.ProxyProtocol}), one agent serving.

The second runs this under valgrind's callgrind twice (1,000 and 4,000
requests) and divides the difference: a count that does not drift with the
machine's speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from rproxy.config import config_from_mapping  # noqa: E402
from rproxy.http.frontend import HTTPFrontend  # noqa: E402
from rproxy.http.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from rproxy.pool import Pool  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 10:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 99 + b"\n")


class FakeTransport:
    """
    Takes writes and keeps the last; what the frontend asks of a TCP transport.
    """

    TLS = False
    connected = 1
    disconnecting = False
    producer = None

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 5555)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 80)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseConnection(self) -> None:
        raise AssertionError("the frontend closed a connection")

    abortConnection = loseConnection


def build(connections: int) -> tuple[list[Any], Any]:
    config = config_from_mapping({
        "admin": {"listen": None},
        "backends": [{"name": "be", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
        "frontends": [{"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be"}],
    })
    clock = Clock()
    pools = {b.name: Pool(b, clock) for b in config.backends}
    upstreams = UpstreamPool(None, clock)
    frontend = HTTPFrontend(config.frontends[0], pools, None, clock, upstreams)
    server = pools["be"].servers[0]
    for _ in range(connections):
        upstream = UpstreamConnection(upstreams, server, pools["be"])
        upstream.makeConnection(FakeTransport())
        upstreams.put(upstream)
    clients = []
    for _ in range(connections):
        client = frontend.buildProtocol(None)
        client.makeConnection(FakeTransport())
        clients.append(client)

    def one_round() -> None:
        # every client sends, then every upstream answers (as under load)
        answering = []
        for client in clients:
            client.dataReceived(REQUEST)
            answering.append(client.exchange.upstream)
        for upstream in answering:
            upstream.dataReceived(RESPONSE)

    return clients, one_round


def build_tunnel(connections: int) -> tuple[list[Any], Any]:
    from rproxy.tunnel.config import TunnelConfig
    from rproxy.tunnel.registry import AgentSession, StaticKeys
    from rproxy.tunnel.server import TunnelServer
    from rproxy.tunnel.streams import ProxyProtocol

    clock = Clock()
    tunnel = TunnelServer(TunnelConfig(name="t", mode="http", strict_models=False), StaticKeys([]), None, clock)
    session = AgentSession(agent_id="a", peer="?", key_name="k", level=-1, connected_at=0.0, last_seen=0.0,
                           control=None, models=())
    tunnel.registry.add(session)
    frontend, connector = tunnel.http, tunnel.connector
    assert frontend is not None and connector is not None
    peer = connector.peer(session)
    for _ in range(connections):
        proxy = ProxyProtocol(tunnel)
        proxy.transport = FakeTransport()
        connector.put(connector.attach(proxy, peer, None))
    clients = []
    for _ in range(connections):
        client = frontend.buildProtocol(None)
        client.makeConnection(FakeTransport())
        clients.append(client)

    def one_round() -> None:
        answering = []
        for client in clients:
            client.dataReceived(REQUEST)
            answering.append(client.exchange.upstream.transport_owner)
        for proxy in answering:
            proxy.dataReceived(RESPONSE)

    return clients, one_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--requests", type=int, default=0,
                        help="run this many requests after the warm-up and exit (for callgrind)")
    parser.add_argument("--tunnel", action="store_true", help="through a tunnel's mode http")
    args = parser.parse_args()
    clients, one_round = (build_tunnel if args.tunnel else build)(args.connections)
    for _ in range(20):
        one_round()
    last = clients[-1].transport.last
    assert last.startswith(b"HTTP/1.1 200 OK\r\n") and last.endswith(b"x\n"), last
    if args.requests:
        for _ in range(args.requests // args.connections):
            one_round()
        return
    rounds = 20000 // args.connections
    best = float("inf")
    for _ in range(7):
        start = time.thread_time()
        for _ in range(rounds):
            one_round()
        best = min(best, (time.thread_time() - start) / (rounds * args.connections))
    print(f"{best * 1e6:.1f} us of CPU per request (best of 7)")


if __name__ == "__main__":
    main()
