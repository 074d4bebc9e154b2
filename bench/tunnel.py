"""
Tunnel benchmark: nginx reached through an rproxy tunnel (server and agent
on loopback), through rproxy's own L4 frontend, and directly, in one run.

Prints keep-alive req/s (wrk -c50, 100-byte responses), bulk MB/s (a 200 MB
download) and the time to open a new public stream (connect, send a
request, read the first byte; p50 and p99 over sequential connections),
with the ratios tunnel/L4 the issue asks for.  The rproxy server runs
pinned to core 0; the agent runs with nginx (the service it exposes) and
the load generators on core 1, as it would run on the service's machine.

    bench/tunnel.sh [--duration 10] [--opens 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    ROOT,
    bulk,
    free_port,
    need,
    start_nginx,
    stop_all,
    wait_port,
    wrk,
)


def twistd(work: str, name: str, args: list[str], core: str = PROXY_CORE) -> subprocess.Popen[bytes]:
    exe = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", core, exe, "-n", "--pidfile=", *args],
        stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )


def open_times(port: int, count: int) -> tuple[float, float]:
    """
    p50 and p99 milliseconds from connect to the first response byte.
    """
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            if not sock.recv(1):
                raise SystemExit("bench: empty response")
            samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--opens", type=int, default=300)
    args = parser.parse_args()
    need("nginx", "wrk", "curl", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-tunnel-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, l4_port, control, proxy, public, control2, proxy2, public2 = (free_port() for _ in range(8))
        procs.append(start_nginx(work, nginx))
        with open(os.path.join(work, "rproxy.yaml"), "w") as f:
            f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: null}}
api_keys: [{{key: bench-key}}]
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends: [{{name: fe, listen: "127.0.0.1:{l4_port}", backend: be}}]
tunnels:
  - {{name: t, control: "127.0.0.1:{control}", proxy: "127.0.0.1:{proxy}", public: "127.0.0.1:{public}"}}
  - {{name: pooled, control: "127.0.0.1:{control2}", proxy: "127.0.0.1:{proxy2}", public: "127.0.0.1:{public2}"}}
""")
        for name, (c, p, pool) in {"agent": (control, proxy, 0), "agent2": (control2, proxy2, 4)}.items():
            with open(os.path.join(work, f"{name}.yaml"), "w") as f:
                f.write(f"""
server: {{control: "127.0.0.1:{c}", proxy: "127.0.0.1:{p}"}}
api_key: bench-key
agent_id: bench-{name}
pool_count: {pool}
services: [{{name: web, local: "127.0.0.1:{nginx}"}}]
""")
        procs.append(twistd(work, "rproxy", ["rproxy", "-c", os.path.join(work, "rproxy.yaml")]))
        for port in (nginx, l4_port, control, public):
            wait_port(port)
        # The agent runs where the service runs (core 1, with nginx): in a
        # deployment it is on the service's machine, not the proxy's.
        for name in ("agent", "agent2"):
            procs.append(twistd(work, name, ["rproxy-agent", "-c", os.path.join(work, f"{name}.yaml")], LOAD_CORE))
        deadline = time.time() + 20
        for port in (public, public2):
            while True:  # wait until the agent has logged in and a stream works
                try:
                    open_times(port, 1)
                    break
                except (OSError, SystemExit):
                    if time.time() > deadline:
                        raise SystemExit("bench: an agent did not come up; see " + work) from None
                    time.sleep(0.2)
        targets = [("direct", nginx), ("l4", l4_port), ("tunnel", public)]
        results: dict[str, dict[str, float]] = {}
        for _, port in targets:
            wrk(port, 2, args.connections, False)
        print(f"{'path':8} {'keep-alive req/s':>17} {'p99':>10} {'bulk MB/s':>10} {'open p50 ms':>12} {'open p99 ms':>12}")
        for name, port in targets:
            ka, ka_p99 = wrk(port, args.duration, args.connections, False)
            mb = max(bulk(port) for _ in range(3))
            p50, p99 = open_times(port, args.opens)
            results[name] = {"ka": ka, "bulk": mb}
            print(f"{name:8} {ka:17.0f} {ka_p99:>10} {mb:10.0f} {p50:12.3f} {p99:12.3f}")
        p50, p99 = open_times(public2, args.opens)
        print(f"{'pooled':8} {'':>17} {'':>10} {'':>10} {p50:12.3f} {p99:12.3f}   (agent pool_count: 4)")
        t, l4r = results["tunnel"], results["l4"]
        print()
        print("tunnel/L4 ratios (targets: keep-alive >= 0.80, bulk >= 0.80)")
        for key, label in (("ka", "keep-alive"), ("bulk", "bulk")):
            ratio = t[key] / l4r[key]
            print(f"  {label:12} {ratio:5.2f}  {'ok' if ratio >= 0.8 else 'BELOW TARGET'}")
        print("open times: the tunnel adds a control round trip, an agent-side connect to the")
        print("proxy port (saved by pool_count) and one to the local service")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
