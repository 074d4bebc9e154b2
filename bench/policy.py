"""
The cost of traffic policy on the HTTP hot path: bench/http_path.py's
requests (50 keep-alive connections, no sockets, a task.Clock) through a
frontend without policy, and through the same frontend with an IP rate
limit high enough never to refuse and an allow list (and with the
RateLimit headers on allowed responses, C{headers: true}).

    .venv/bin/python bench/policy.py                     # us of CPU per request, both, and the ratio
    .venv/bin/python bench/policy.py --variant limit --requests 4000   # for callgrind
    bench/policy.sh                                      # instructions per request, both, and the ratio
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import http_path  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from rproxy.config import config_from_mapping  # noqa: E402
from rproxy.http.frontend import HTTPFrontend  # noqa: E402
from rproxy.http.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from rproxy.pool import Pool  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    # (the clock stands still: a burst larger than any run never refuses)
    "limit": {"allow": ["127.0.0.0/8", "10.0.0.0/8"],
              "rate_limit": {"key": "ip", "rate": "1000000/s", "burst": 1_000_000_000}},
    "allow": {"allow": ["127.0.0.0/8", "10.0.0.0/8"]},
    "ratelimit": {"rate_limit": {"key": "ip", "rate": "1000000/s", "burst": 1_000_000_000}},
    "limit-headers": {"allow": ["127.0.0.0/8", "10.0.0.0/8"],
                      "rate_limit": {"key": "ip", "rate": "1000000/s", "burst": 1_000_000_000, "headers": True}},
}


def build(connections: int, variant: str) -> tuple[list[Any], Any]:
    config = config_from_mapping({
        "admin": {"listen": None},
        "backends": [{"name": "be", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
        "frontends": [dict({"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be"},
                           **VARIANTS[variant])],
    })
    clock = Clock()
    # what a running rproxy reads the time with (the reactor's seconds is
    # time.time, a builtin): task.Clock's is a Python method, whose call
    # would weigh on every clock-reading filter as it never does in service
    clock.seconds = time.time  # type: ignore[method-assign]
    pools = {b.name: Pool(b, clock) for b in config.backends}
    upstreams = UpstreamPool(None, clock)
    frontend = HTTPFrontend(config.frontends[0], pools, None, clock, upstreams)
    server = pools["be"].servers[0]
    for _ in range(connections):
        upstream = UpstreamConnection(upstreams, server, pools["be"])
        upstream.makeConnection(http_path.FakeTransport())
        upstreams.put(upstream)
    clients = []
    for _ in range(connections):
        client = frontend.buildProtocol(None)
        client.makeConnection(http_path.FakeTransport())
        clients.append(client)

    def one_round() -> None:
        answering = []
        for client in clients:
            client.dataReceived(http_path.REQUEST)
            answering.append(client.exchange.upstream)
        for upstream in answering:
            upstream.dataReceived(http_path.RESPONSE)

    return clients, one_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--requests", type=int, default=0,
                        help="run this many requests of --variant after the warm-up and exit (for callgrind)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.requests:
        clients, one_round = build(args.connections, args.variant or "plain")
        for _ in range(20):
            one_round()
        for _ in range(args.requests // args.connections):
            one_round()
        return
    built = {name: build(args.connections, name) for name in VARIANTS}
    for name, (clients, one_round) in built.items():
        for _ in range(20):
            one_round()
        last = clients[-1].transport.last
        assert last.startswith(b"HTTP/1.1 200 OK\r\n"), (name, last)
    runs = 10000 // args.connections
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        # interleaved: the variants share the machine's state of the moment
        for name, (_, one_round) in built.items():
            start = time.thread_time()
            for _ in range(runs):
                one_round()
            times[name].append((time.thread_time() - start) / (runs * args.connections))
    base = statistics.median(times["plain"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:16} {median * 1e6:6.2f} us of CPU per request (median of {args.rounds}), "
              f"ratio {median / base:.3f}")


if __name__ == "__main__":
    main()
