"""
The Python cost of the access-policy filters on one keep-alive request
through the HTTP frontend, with no sockets (bench/http_path.py's set-up:
50 client connections each send a small GET, 50 upstream connections each
answer it, on fake transports and a task.Clock), for several frontends run
in turns in one process: none of the policy keys, an allow list, an allow
list behind trusted proxies (with an X-Forwarded-For), API keys (static
chain) and Basic auth (a cached success).  Prints the CPU time per request
(median of the rounds) and its ratio to the plain frontend's.

    .venv/bin/python bench/access_path.py [--rounds 7]
    bench/access_path.sh            # instructions per request (callgrind)

A development aid, not a speed claim; the machine's load moves the
figures, the same-run ratios less.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.http_path import RESPONSE, FakeTransport  # noqa: E402
from rproxy.config import config_from_mapping  # noqa: E402
from rproxy.http.frontend import HTTPFrontend  # noqa: E402
from rproxy.http.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from rproxy.passwords import PasswordChecker, check_hash  # noqa: E402
from rproxy.pool import Pool  # noqa: E402
from rproxy.store.auth import key_chain  # noqa: E402
from rproxy.tunnel.config import ApiKeyConfig  # noqa: E402
from rproxy.tunnel.registry import StaticKeys  # noqa: E402

GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"


def users_file() -> str:
    import bcrypt

    f = tempfile.NamedTemporaryFile("w", suffix=".users", delete=False)
    f.write("alice:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode() + "\n")
    f.close()
    return f.name


def variants() -> dict[str, tuple[dict[str, Any], bytes]]:
    basic = base64.b64encode(b"alice:secret")
    return {
        "plain": ({}, b""),
        "allow": ({"allow": ["127.0.0.0/8"], "deny": ["10.0.0.0/8"]}, b""),
        "allow+trusted": ({"allow": ["192.0.2.0/24"], "trusted_proxies": ["127.0.0.0/8"]},
                          b"X-Forwarded-For: 192.0.2.10\r\n"),
        "api_keys": ({"auth": {"api_keys": True}}, b"Authorization: Bearer sk-bench-0123456789\r\n"),
        "basic(cached)": ({"auth": {"basic": {"users_file": users_file()}}}, b"Authorization: Basic " + basic + b"\r\n"),
    }


def build(frontend_keys: dict[str, Any], extra: bytes, connections: int) -> Any:
    config = config_from_mapping({
        "admin": {"listen": None},
        "backends": [{"name": "be", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
        "frontends": [{"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be",
                       **frontend_keys}],
    })
    from twisted.internet import defer
    from twisted.internet.task import Clock

    clock = Clock()
    pools = {b.name: Pool(b, clock) for b in config.backends}
    upstreams = UpstreamPool(None, clock)
    frontend = HTTPFrontend(config.frontends[0], pools, clock, clock, upstreams)
    frontend.keys = key_chain(StaticKeys([ApiKeyConfig(key="sk-bench-0123456789")]))
    for f in frontend.chain.request:
        if hasattr(f, "passwords") and f.passwords is not None:
            f.passwords = PasswordChecker(clock, lambda fn, *a: defer.succeed(fn(*a)), check=check_hash)
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
    request = GET + extra + b"\r\n"

    def one_round() -> None:
        answering = []
        for client in clients:
            client.dataReceived(request)
            answering.append(client.exchange.upstream)
        for upstream in answering:
            upstream.dataReceived(RESPONSE)

    for _ in range(20):
        one_round()
    last = clients[-1].transport.last
    assert last.startswith(b"HTTP/1.1 200 OK\r\n"), last
    return one_round


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=10000, help="per variant per round")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", help="build this variant alone, run --requests after the warm-up and exit "
                                       "(for callgrind: bench/access_path.sh)")
    args = parser.parse_args()
    if args.only:
        keys, extra = variants()[args.only]
        one_round = build(keys, extra, args.connections)
        for _ in range(args.requests // args.connections):
            one_round()
        return
    runs = {name: build(keys, extra, args.connections) for name, (keys, extra) in variants().items()}
    batches = max(1, args.requests // args.connections)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, one_round in runs.items():
            start = time.thread_time()
            for _ in range(batches):
                one_round()
            times[name].append((time.thread_time() - start) / (batches * args.connections))
    plain = statistics.median(times["plain"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:15} {median * 1e6:6.1f} us/request  x{median / plain:.3f} of plain")


if __name__ == "__main__":
    main()
