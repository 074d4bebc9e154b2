"""
Tunnel benchmark: nginx reached through an rproxy tunnel (server and agent
on loopback), through rproxy's own L4 frontend, and directly, in one run.

Prints keep-alive req/s (wrk -c50, 100-byte responses), bulk MB/s (a 200 MB
download) and the time to open a new public stream (connect, send a
request, read the first byte; p50 and p99 over sequential connections),
with the ratios tunnel/L4 the issue asks for.  Then the C{mode: http}
row: keep-alive requests through a C{mode: http} tunnel, their CPU per
request (server + agent, user+sys from /proc/PID/stat over the run) against
the L4 frontend's for the same wrk load, and their req/s against mode
http's behaviour before it kept connections alive: C{Connection: close}
to the client, and a new data connection and service connection per
request (a second tunnel whose agent exposes an nginx with
C{keepalive_timeout 0}).  The rproxy server runs
pinned to core 0; the agent runs with nginx (the service it exposes) and
the load generators on core 1, as it would run on the service's machine.

    bench/tunnel.sh [--duration 10] [--opens 300] [--rounds 1] [--mode-http-only]

C{--rounds N} runs the C{mode: http} row N times and prints the medians;
C{--mode-http-only} skips the first table (the row needs only a short run
on a loaded machine).

C{--haproxy} adds the same shape built from HAProxy, in the same rounds:
one HAProxy in C{mode http} on the server's core whose server is a second
HAProxy in C{mode tcp} on the agent's core (an HTTP-aware server relaying
through a byte relay, as the tunnel does), against one HAProxy in C{mode
tcp} on the server's core (the L4 frontend's place).  Its ratio says what
the architecture costs when the program is not Python.
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
    start_haproxy,
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


def answers_200(port: int) -> None:
    """
    Raise unless a request on C{port} gets 200 (an agent is logged in and
    a stream works).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        if not sock.recv(64).startswith(b"HTTP/1.1 200 "):
            raise OSError("not yet")


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


def cpu_seconds(*pids: int) -> float:
    """
    User + system CPU seconds used so far by the processes C{pids}.
    """
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def measured(port: int, duration: int, connections: int, close: bool, *pids: int) -> tuple[float, float]:
    """
    req/s of a wrk run, and the CPU microseconds per request of C{pids}.
    """
    before = cpu_seconds(*pids)
    rate, _ = wrk(port, duration, connections, close)
    used = cpu_seconds(*pids) - before
    return rate, used / (rate * duration) * 1e6


def start_closing_nginx(work: str, port: int) -> subprocess.Popen[bytes]:
    """
    An nginx that closes every connection after its response (the
    service of the tunnel that replays mode http's former behaviour).
    """
    conf = os.path.join(work, "closing.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {work}/closing.pid;
error_log {work}/closing.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {work}/body2;
    proxy_temp_path {work}/proxy2;
    fastcgi_temp_path {work}/fastcgi2;
    uwsgi_temp_path {work}/uwsgi2;
    scgi_temp_path {work}/scgi2;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ default_type text/plain; return 200 "{'x' * 99}\\n"; }}
    }}
}}
""")
    return subprocess.Popen(["taskset", "-c", LOAD_CORE, "nginx", "-c", conf, "-p", work],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def mode_http_rows(args: argparse.Namespace, l4_port: int, http_port: int, public: int, before: int, server: int,
                   agent: int, haproxy: tuple[int, int, int, int, int] | None = None) -> None:
    """
    Keep-alive through a mode http tunnel: CPU per request (server +
    agent, and each) against the L4 frontend's, with the plain HTTP
    frontend's for scale (the tunnel's server is one, plus the agents);
    req/s against the former behaviour (a new connection on both legs per
    request).  Each figure
    is the median of C{args.rounds} rounds; in a round the L4 frontend
    and the tunnel run one after the other.  C{haproxy}: (the HAProxy
    L4 port and pid, the HTTP server HAProxy's port and pid, the relay
    HAProxy's pid), measured in the same rounds.
    """
    wrk(public, 2, args.connections, False)
    rounds: list[tuple[float, ...]] = []
    reference: list[tuple[float, float, float, float]] = []
    for _ in range(args.rounds):
        if haproxy is not None:
            h_l4, h_l4_pid, h_http, h_http_pid, h_relay_pid = haproxy
            _, h_l4_cpu = measured(h_l4, args.duration, args.connections, False, h_l4_pid)
            h_before = (cpu_seconds(h_http_pid), cpu_seconds(h_relay_pid))
            h_rate, _ = measured(h_http, args.duration, args.connections, False, h_http_pid, h_relay_pid)
            h_server = (cpu_seconds(h_http_pid) - h_before[0]) / (h_rate * args.duration) * 1e6
            h_agent = (cpu_seconds(h_relay_pid) - h_before[1]) / (h_rate * args.duration) * 1e6
            reference.append((h_l4_cpu, h_server, h_agent, (h_server + h_agent) / h_l4_cpu))
        l4_rate, l4_cpu = measured(l4_port, args.duration, args.connections, False, server)
        http_rate, http_cpu = measured(http_port, args.duration, args.connections, False, server)
        ka_before = (cpu_seconds(server), cpu_seconds(agent))
        ka_rate, ka_cpu = measured(public, args.duration, args.connections, False, server, agent)
        server_cpu = (cpu_seconds(server) - ka_before[0]) / (ka_rate * args.duration) * 1e6
        agent_cpu = (cpu_seconds(agent) - ka_before[1]) / (ka_rate * args.duration) * 1e6
        close_rate, _ = wrk(before, args.duration, args.connections, True)
        rounds.append((l4_rate, l4_cpu, ka_rate, ka_cpu, server_cpu, agent_cpu, close_rate, ka_cpu / l4_cpu,
                       http_rate, http_cpu, http_cpu / l4_cpu))
        if args.rounds > 1:
            print(f"  round {len(rounds)}: CPU keep-alive / L4 {ka_cpu / l4_cpu:5.2f} "
                  f"(L4 {l4_cpu:.1f}, server {server_cpu:.1f} + agent {agent_cpu:.1f} us/request; "
                  f"HTTP frontend {http_cpu:.1f}, {http_cpu / l4_cpu:.2f}x L4)", flush=True)
    (l4_rate, l4_cpu, ka_rate, ka_cpu, server_cpu, agent_cpu, close_rate, cpu_ratio, http_rate, http_cpu,
     http_ratio) = (sorted(r[i] for r in rounds)[len(rounds) // 2] for i in range(11))
    print()
    print(f"mode http tunnel, wrk -c{args.connections}, 100-byte responses"
          f"{f' (medians of {args.rounds} rounds)' if args.rounds > 1 else ''}")
    print(f"  {'path':34} {'req/s':>9} {'CPU us/request':>15}")
    print(f"  {'L4 frontend (server)':34} {l4_rate:9.0f} {l4_cpu:15.1f}")
    print(f"  {'HTTP frontend (server)':34} {http_rate:9.0f} {http_cpu:15.1f}   ({http_ratio:.2f}x L4)")
    print(f"  {'mode http keep-alive (server+agent)':34} {ka_rate:9.0f} {ka_cpu:15.1f}")
    print(f"  {'  of which the server':34} {'':9} {server_cpu:15.1f}")
    print(f"  {'  of which the agent':34} {'':9} {agent_cpu:15.1f}")
    print(f"  {'mode http before (close, new streams)':34} {close_rate:9.0f}")
    rate_ratio = ka_rate / close_rate
    print(f"  CPU per request, keep-alive / L4:  {cpu_ratio:5.2f}  (target <= 2.5) "
          f"{'ok' if cpu_ratio <= 2.5 else 'ABOVE TARGET'}")
    print(f"  req/s, keep-alive / before:         {rate_ratio:5.2f}  (target >= 5) "
          f"{'ok' if rate_ratio >= 5 else 'BELOW TARGET'}")
    if reference:
        h_l4_cpu, h_server, h_agent, h_ratio = (sorted(r[i] for r in reference)[len(reference) // 2]
                                                for i in range(4))
        print("  the same shape from HAProxy (mode http -> mode tcp relay, against mode tcp), CPU us/request:")
        print(f"    L4 {h_l4_cpu:.1f}; http server {h_server:.1f} + relay {h_agent:.1f}; "
              f"ratio {h_ratio:.2f}  (rproxy's: {cpu_ratio:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--opens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mode-http-only", action="store_true")
    parser.add_argument("--haproxy", action="store_true",
                        help="also the mode http row's shape built from HAProxy, for reference")
    args = parser.parse_args()
    need("nginx", "wrk", "curl", "taskset", *(["haproxy"] if args.haproxy else []))
    work = tempfile.mkdtemp(prefix="rproxy-tunnel-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, l4_port, control, proxy, public, control2, proxy2, public2 = (free_port() for _ in range(8))
        control3, proxy3, public3, control4, proxy4, public4, closing = (free_port() for _ in range(7))
        http_port = free_port()
        haproxy = None
        if args.haproxy:
            h_l4, h_http, h_relay = free_port(), free_port(), free_port()
            procs.append(start_haproxy(work, h_l4, nginx, "tcp", PROXY_CORE, "-l4"))
            procs.append(start_haproxy(work, h_http, h_relay, "http", PROXY_CORE, "-server"))
            procs.append(start_haproxy(work, h_relay, nginx, "tcp", LOAD_CORE, "-relay"))
            haproxy = (h_l4, procs[-3].pid, h_http, procs[-2].pid, procs[-1].pid)
        procs.append(start_closing_nginx(work, closing))
        procs.append(start_nginx(work, nginx))
        with open(os.path.join(work, "rproxy.yaml"), "w") as f:
            f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: null}}
api_keys: [{{key: bench-key}}]
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends:
  - {{name: fe, listen: "127.0.0.1:{l4_port}", backend: be}}
  - {{name: fh, listen: "127.0.0.1:{http_port}", backend: be, protocol: http}}
tunnels:
  - {{name: t, control: "127.0.0.1:{control}", proxy: "127.0.0.1:{proxy}", public: "127.0.0.1:{public}"}}
  - {{name: pooled, control: "127.0.0.1:{control2}", proxy: "127.0.0.1:{proxy2}", public: "127.0.0.1:{public2}"}}
  - {{name: h, control: "127.0.0.1:{control3}", proxy: "127.0.0.1:{proxy3}", public: "127.0.0.1:{public3}",
      mode: http, strict_models: false}}
  - {{name: h2, control: "127.0.0.1:{control4}", proxy: "127.0.0.1:{proxy4}", public: "127.0.0.1:{public4}",
      mode: http, strict_models: false}}
""")
        agents = {"agent": (control, proxy, 0, nginx), "agent2": (control2, proxy2, 4, nginx),
                  "agent3": (control3, proxy3, 0, nginx), "agent4": (control4, proxy4, 0, closing)}
        for name, (c, p, pool, service) in agents.items():
            with open(os.path.join(work, f"{name}.yaml"), "w") as f:
                f.write(f"""
server: {{control: "127.0.0.1:{c}", proxy: "127.0.0.1:{p}"}}
api_key: bench-key
agent_id: bench-{name}
pool_count: {pool}
services: [{{name: web, local: "127.0.0.1:{service}"}}]
""")
        procs.append(twistd(work, "rproxy", ["rproxy", "-c", os.path.join(work, "rproxy.yaml")]))
        for port in (nginx, l4_port, control, public, *(haproxy[0:3:2] if haproxy else ())):
            wait_port(port)
        # The agent runs where the service runs (core 1, with nginx): in a
        # deployment it is on the service's machine, not the proxy's.
        server_pid = procs[-1].pid
        agent_pids = {}
        for name in agents:
            procs.append(twistd(work, name, ["rproxy-agent", "-c", os.path.join(work, f"{name}.yaml")], LOAD_CORE))
            agent_pids[name] = procs[-1].pid
        deadline = time.time() + 20
        for port in (public, public2, public3, public4):
            while True:  # wait until the agent has logged in and a stream works
                try:
                    answers_200(port)
                    break
                except (OSError, SystemExit):
                    if time.time() > deadline:
                        raise SystemExit("bench: an agent did not come up; see " + work) from None
                    time.sleep(0.2)
        if args.mode_http_only:
            mode_http_rows(args, l4_port, http_port, public3, public4, server_pid, agent_pids["agent3"], haproxy)
            return
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
        mode_http_rows(args, l4_port, http_port, public3, public4, server_pid, agent_pids["agent3"], haproxy)
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
