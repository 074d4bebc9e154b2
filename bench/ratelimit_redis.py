"""
What a Redis-shared rate limit adds to a request's latency, on loopback:
two rproxy processes (twistd) in front of one nginx, the same HTTP frontend
with an IP limit high enough never to refuse, one keeping it in the
process (C{shared: false}), the other in Redis (the harness's
redis-server, tests/servers.py); wrk keep-alive with C{--latency} against
each in turn, in alternating rounds; medians of the rounds' p50/p99 and
what Redis adds, and each proxy's CPU per request (/proc/PID/stat).
Target: at most 0.5 ms added at p99.

The proxies run on core 0; wrk, nginx and Redis on core 1.

    bench/ratelimit_redis.sh [--rounds 5] [--duration 4] [--connections 10]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from l4 import LOAD_CORE, PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port  # noqa: E402

from tests.servers import RedisServer  # noqa: E402


def start_proxy(work: str, name: str, port: int, backend: int, redis: str, shared: bool,
                admin: int) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, f"{name}.yaml")
    with open(conf, "w") as f:
        f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
stores: {{redis: {{url: "{redis}"}}}}
backends:
  - name: be
    servers: ["127.0.0.1:{backend}"]
    health_check: none
frontends:
  - name: fe
    protocol: http
    listen: "127.0.0.1:{port}"
    backend: be
    rate_limit: {{key: ip, rate: 1000000/s, burst: 100000000, shared: {str(shared).lower()}}}
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
        stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


def run_wrk(port: int, duration: int, connections: int) -> tuple[int, float, float]:
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                          "--latency", f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise SystemExit(f"refused requests: the limit was meant never to refuse\n{out}")
    return requests, p50, p99


def print_round_trips(admin: int) -> None:
    """
    The shared proxy's own histogram of decision round trips (what a
    request waits on Redis), from its /metrics: the share within 0.5 ms.
    """
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    buckets = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'^rproxy_rate_limit_redis_seconds_bucket\{le="([^"]+)"\} (\S+)', text, re.M)}
    fallbacks = sum(float(m.group(1)) for m in re.finditer(r"^rproxy_rate_limit_fallbacks_total\{.*\} (\S+)", text,
                                                         re.M))
    total = buckets.get("+Inf", 0.0)
    if not total:
        raise SystemExit("no decisions answered by Redis")
    within = {le: count / total for le, count in buckets.items()}
    print(f"Redis decisions: {total:.0f}; within 0.25 ms {within['0.00025']:.4f}, 0.5 ms {within['0.0005']:.4f}, "
          f"1 ms {within['0.001']:.4f}, 5 ms {within['0.005']:.4f}; local fallbacks {fallbacks:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--sequential", action="store_true",
                        help="wrk -c1: one request at a time (the latency Redis adds, not the proxy's queue)")
    args = parser.parse_args()
    if args.sequential:
        args.connections = 1
    need("nginx", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    redis = RedisServer()
    try:
        subprocess.run(["taskset", "-pc", LOAD_CORE, str(redis.process.pid)], check=False,  # type: ignore[union-attr]
                       capture_output=True)
        nginx_port = free_port()
        procs.append(start_nginx(work, nginx_port))
        wait_port(nginx_port)
        ports = {"local": free_port(), "redis": free_port()}
        admin = free_port()
        proxies = {}
        for name, port in ports.items():
            proxies[name] = start_proxy(work, name, port, nginx_port, redis.url, shared=name == "redis",
                                        admin=admin if name == "redis" else free_port())
            procs.append(proxies[name])
            wait_port(port)
        for port in ports.values():
            run_wrk(port, 1, args.connections)  # warm-up (and the script loaded)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ports}
        for r in range(args.rounds):
            for name in (list(ports) if r % 2 == 0 else list(reversed(ports))):
                before = cpu_seconds(proxies[name].pid)
                requests, p50, p99 = run_wrk(ports[name], args.duration, args.connections)
                cpu = (cpu_seconds(proxies[name].pid) - before) / requests * 1e6
                results[name].append((p50, p99, cpu))
                print(f"round {r + 1} {name:5}: p50 {p50:.3f} ms  p99 {p99:.3f} ms  {cpu:.1f} us CPU/request",
                      flush=True)
        medians = {name: [statistics.median(x[i] for x in rows) for i in range(3)] for name, rows in results.items()}
        for name, (p50, p99, cpu) in medians.items():
            print(f"median {name:5}: p50 {p50:.3f} ms  p99 {p99:.3f} ms  {cpu:.1f} us CPU/request")
        added = [b[1] - a[1] for a, b in zip(results["local"], results["redis"], strict=True)]
        print(f"Redis adds at p99: {medians['redis'][1] - medians['local'][1]:.3f} ms (medians), per round "
              f"{', '.join(f'{x:.3f}' for x in added)}; at p50 {medians['redis'][0] - medians['local'][0]:.3f} ms; "
              f"CPU ratio {medians['redis'][2] / medians['local'][2]:.3f}")
        print_round_trips(admin)
        with open(os.path.join(work, "redis.log"), "rb") as f:
            if b"Redis is up" not in f.read():
                raise SystemExit("the shared proxy never saw Redis up: its figures are the local ones")
    finally:
        stop_all(procs, work)
        redis.close()


if __name__ == "__main__":
    main()
