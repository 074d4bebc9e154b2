"""
CPU per request of a real rproxy process with an IP rate limit and an
allow list, against the same frontend without them (issue 17's "at most
5% more"): two twistd processes in front of one nginx, wrk keep-alive
against each in alternating rounds, CPU per request from /proc/PID/stat
(user+sys over the round / requests), medians of the rounds, the ratio.
Unlike bench/policy.sh (instructions of the Python path alone), this
counts what a request costs the process, kernel included.

The proxies run on core 0; wrk and nginx on core 1.

    bench/policy_cpu.sh [--rounds 7] [--duration 4] [--connections 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from l4 import PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port  # noqa: E402
from ratelimit_redis import cpu_seconds, run_wrk  # noqa: E402

POLICY = """    allow: ["127.0.0.0/8", "10.0.0.0/8"]
    rate_limit: {key: ip, rate: 1000000/s, burst: 100000000}
"""


def start_proxy(work: str, name: str, port: int, backend: int, policy: bool) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, f"{name}.yaml")
    with open(conf, "w") as f:
        f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: "tcp:{free_port()}:interface=127.0.0.1"}}
backends:
  - name: be
    servers: ["127.0.0.1:{backend}"]
    health_check: none
frontends:
  - name: fe
    protocol: http
    listen: "127.0.0.1:{port}"
    backend: be
{POLICY if policy else ""}""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
        stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    need("nginx", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx_port = free_port()
        procs.append(start_nginx(work, nginx_port))
        wait_port(nginx_port)
        ports = {"plain": free_port(), "policy": free_port()}
        proxies = {}
        for name, port in ports.items():
            proxies[name] = start_proxy(work, name, port, nginx_port, policy=name == "policy")
            procs.append(proxies[name])
            wait_port(port)
        for port in ports.values():
            run_wrk(port, 1, args.connections)  # warm-up
        cpu: dict[str, list[float]] = {name: [] for name in ports}
        for r in range(args.rounds):
            for name in (list(ports) if r % 2 == 0 else list(reversed(ports))):
                before = cpu_seconds(proxies[name].pid)
                requests, _, _ = run_wrk(ports[name], args.duration, args.connections)
                cpu[name].append((cpu_seconds(proxies[name].pid) - before) / requests * 1e6)
                print(f"round {r + 1} {name:6}: {cpu[name][-1]:.2f} us CPU/request ({requests} requests)", flush=True)
        plain, policy = statistics.median(cpu["plain"]), statistics.median(cpu["policy"])
        ratios = [b / a for a, b in zip(cpu["plain"], cpu["policy"], strict=True)]
        print(f"median plain {plain:.2f} us, with an IP rate limit and an allow list {policy:.2f} us: "
              f"ratio {policy / plain:.3f} (per round {', '.join(f'{x:.3f}' for x in ratios)})")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
