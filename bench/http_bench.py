"""
HTTP benchmark: rproxy's HTTP frontend against HAProxy (mode http,
nbthread 1, http-reuse always) and twisted.web.proxy.ReverseProxyResource,
with nginx (100-byte responses) as the backend, in one run.  Proxies on
core 0, wrk and nginx on core 1.  Prints keep-alive and Connection: close
req/s, p99 latency, and the ratios the issue names.

Each round measures every path once, one after the other (each round
starting with the next path, so that none always follows another), so
that paths measured in the same round saw the same machine; ratios are
given per round and from the medians over the rounds.  A shared machine's
speed drifts by more than the differences measured (the same process, same
work per request, took 53 to 77 us of CPU per request from one 8-second
run to the next): many short rounds give steadier medians than a few long
ones.

    bench/http.sh [--duration 4] [--connections 50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import (  # noqa: E402
    PROXY_CORE,
    ROOT,
    free_port,
    need,
    start_haproxy,
    start_nginx,
    stop_all,
    wait_port,
    wrk,
)

REVERSE_PROXY = """
import sys
from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site
site = Site(ReverseProxyResource("127.0.0.1", int(sys.argv[2]), b""))
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_clients(port: int, count: int) -> list[socket.socket]:
    """
    C{count} client connections that each made one request and now idle.
    """
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        sockets.append(sock)
    for sock in sockets:
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 100:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    time.sleep(1.0)  # let the proxy settle before measuring
    return sockets


def start_haproxy_http(work: str, port: int, backend: int) -> subprocess.Popen[bytes]:
    return start_haproxy(work, port, backend, mode="http")


def seconds(latency: str) -> float:
    """
    wrk's latency text (C{912.00us}, C{5.20ms}, C{1.02s}) in seconds.
    """
    match = re.match(r"([\d.]+)(us|ms|s|m)", latency)
    if match is None:
        return float("nan")
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    need("nginx", "haproxy", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-http-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, haproxy, rproxy, twisted_web = (free_port() for _ in range(4))
        procs.append(start_nginx(work, nginx))
        procs.append(start_haproxy_http(work, haproxy, nginx))
        with open(os.path.join(work, "rproxy.yaml"), "w") as f:
            f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: null}}
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends: [{{name: fe, protocol: http, listen: "127.0.0.1:{rproxy}", backend: be}}]
""")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        procs.append(subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c",
             os.path.join(work, "rproxy.yaml")],
            stdout=open(os.path.join(work, "rproxy.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT))
        procs.append(subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, sys.executable, "-c", REVERSE_PROXY, str(twisted_web), str(nginx)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (nginx, haproxy, rproxy, twisted_web):
            wait_port(port)
        targets = [("direct", nginx), ("haproxy", haproxy), ("twistweb", twisted_web), ("rproxy", rproxy)]
        for _, port in targets:
            wrk(port, 2, args.connections, False)
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in targets}
        print(f"{'round':5} {'path':9} {'keep-alive req/s':>17} {'p99':>10} {'close req/s':>12} {'p99':>10}")
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(targets)
            for name, port in targets[shift:] + targets[:shift]:
                ka, ka_p99 = wrk(port, args.duration, args.connections, False)
                cl, cl_p99 = wrk(port, args.duration, args.connections, True)
                runs[name].append((ka, cl, seconds(ka_p99)))
                print(f"{round_:5} {name:9} {ka:17.0f} {ka_p99:>10} {cl:12.0f} {cl_p99:>10}", flush=True)
            r, h, t = runs["rproxy"][-1], runs["haproxy"][-1], runs["twistweb"][-1]
            print(f"      this round: keep-alive {r[0] / h[0]:.2f} of HAProxy, {r[0] / t[0]:.1f}x twisted.web; "
                  f"close {r[1] / h[1]:.2f}; p99 {r[2] / h[2]:.1f}x HAProxy's")
        median = {name: tuple(statistics.median(run[i] for run in runs[name]) for i in range(3))
                  for name in runs}
        r, h, t = median["rproxy"], median["haproxy"], median["twistweb"]
        print()
        print(f"medians over {args.rounds} rounds:")
        for name, (ka, cl, p99) in median.items():
            print(f"  {name:9} keep-alive {ka:9.0f} req/s  p99 {p99 * 1e3:7.2f}ms  close {cl:9.0f} req/s")
        print("targets: keep-alive >= 0.35 of HAProxy and >= 8x ReverseProxyResource; "
              "new connections >= 0.45 of HAProxy; p99 (keep-alive) <= 3x HAProxy's")
        print(f"  keep-alive rproxy/haproxy  {r[0] / h[0]:5.2f}")
        print(f"  keep-alive rproxy/twisted  {r[0] / t[0]:5.1f}x")
        print(f"  close      rproxy/haproxy  {r[1] / h[1]:5.2f}")
        print(f"  p99 keep-alive rproxy/haproxy {r[2] / h[2]:5.1f}x")
        print()
        rproxy_proc = procs[2]
        before = rss_kib(rproxy_proc.pid)
        sockets = idle_clients(rproxy, args.idle)
        after = rss_kib(rproxy_proc.pid)
        print(f"rproxy RSS: {before / 1024:.1f} MiB, with {len(sockets)} idle keep-alive clients "
              f"{after / 1024:.1f} MiB ({(after - before) * 1024 / max(len(sockets), 1):.0f} bytes each)")
        for sock in sockets:
            sock.close()
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
