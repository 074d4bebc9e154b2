"""
Token-pool benchmark: what leasing a bearer token per client connection
costs the HTTP frontend.  One rproxy process (core 0) runs two HTTP
frontends to the same nginx (core 1, with wrk): one plain, one with
C{token_pool:} over 64 credentials (more tokens than wrk's connections, so
tokens are free; nginx answers the logins).  wrk measures keep-alive and
Connection: close req/s through each, alternating, several rounds, and
HAProxy (mode http) and nginx direct for reference, all in one run.

Target (issue 4): with free tokens, keep-alive req/s with the pool >= 0.90
of without.

    bench/tokenpool.sh [--duration 8] [--rounds 3] [--connections 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from http_bench import start_haproxy_http  # noqa: E402
from l4 import PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port, wrk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    need("nginx", "haproxy", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-tokenpool-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, haproxy, plain, pooled, admin = (free_port() for _ in range(5))
        procs.append(start_nginx(work, nginx))
        procs.append(start_haproxy_http(work, haproxy, nginx))
        credentials = ", ".join(f"{{username: u{i}, password: p{i}}}" for i in range(64))
        with open(os.path.join(work, "rproxy.yaml"), "w") as f:
            f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: "127.0.0.1:{admin}"}}
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends:
  - {{name: plain, protocol: http, listen: "127.0.0.1:{plain}", backend: be}}
  - {{name: pooled, protocol: http, listen: "127.0.0.1:{pooled}", backend: be, token_pool: bench}}
token_pools:
  - name: bench
    upstream: {{address: "127.0.0.1:{nginx}"}}
    credentials: [{credentials}]
""")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        procs.append(subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c",
             os.path.join(work, "rproxy.yaml")],
            stdout=open(os.path.join(work, "rproxy.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT))
        for port in (nginx, haproxy, plain, pooled, admin):
            wait_port(port)
        ready = subprocess.run(["curl", "-s", "--retry", "20", "--retry-all-errors", "--retry-delay", "1",
                                "--fail", f"http://127.0.0.1:{admin}/readyz"], capture_output=True, text=True)
        if ready.returncode != 0:
            sys.exit(f"rproxy did not become ready (token logins?); see {work}/rproxy.log")
        for port in (haproxy, plain, pooled):
            wrk(port, 2, args.connections, False)
        runs: dict[str, list[tuple[float, float]]] = {"direct": [], "haproxy": [], "plain": [], "pooled": []}
        ports = {"direct": nginx, "haproxy": haproxy, "plain": plain, "pooled": pooled}
        print(f"{'round':5} {'path':8} {'keep-alive req/s':>17} {'close req/s':>12}")
        for round_ in range(args.rounds):
            for name in ("direct", "haproxy", "plain", "pooled") if round_ == 0 else ("plain", "pooled"):
                ka, _ = wrk(ports[name], args.duration, args.connections, False)
                cl, _ = wrk(ports[name], args.duration, args.connections, True)
                runs[name].append((ka, cl))
                print(f"{round_:5} {name:8} {ka:17.0f} {cl:12.0f}")
        plain_ka = statistics.median(r[0] for r in runs["plain"])
        pooled_ka = statistics.median(r[0] for r in runs["pooled"])
        plain_cl = statistics.median(r[1] for r in runs["plain"])
        pooled_cl = statistics.median(r[1] for r in runs["pooled"])
        print()
        print("target: keep-alive with the token pool >= 0.90 of without (free tokens)")
        print(f"  keep-alive pooled/plain  {pooled_ka / plain_ka:5.2f}  (medians {pooled_ka:.0f} / {plain_ka:.0f})")
        print(f"  close      pooled/plain  {pooled_cl / plain_cl:5.2f}  (medians {pooled_cl:.0f} / {plain_cl:.0f})")
        print(f"  for reference: plain/haproxy keep-alive {plain_ka / runs['haproxy'][0][0]:5.2f}")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
