"""
Workers benchmark: rproxy at C{global.workers: 1} against C{workers: 2} (and
up to the cores found), nginx (100-byte responses) as the backend, wrk
C{-c50}.  For each of http and tcp frontends, keep-alive and
C{Connection: close}, it prints requests/s and CPU per request: the user
and system time of every rproxy process (the master and its workers, from
/proc/PID/stat) over the run, divided by the requests wrk made.  At
C{workers: 2} it also prints how the connections spread over the two
workers (from the master's /health).  Then requests/s for 1, 2, 4, ...
workers up to the cores found, so a bigger machine shows the scaling.
Every count runs at once and the rounds alternate between them, so that
load others put on a shared machine falls on both sides of a comparison.

On a 2-core machine nothing is pinned: rproxy's workers, wrk and nginx
share both cores, so req/s there says little about scaling; CPU per
request (what the workers cost on top of the work) is the figure that
holds.  Medians over C{--rounds} rounds.

    bench/workers.sh [--duration 4] [--rounds 3] [--connections 50] [--haproxy]

With C{--haproxy} it runs the same comparison through HAProxy (one process
against two bound to one port with SO_REUSEPORT): the cost of a second
process on this machine when the program is not rproxy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import ROOT, free_port, need, start_nginx, stop_all, wait_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_rproxy(work: str, workers: int, backend: int, http_port: int, tcp_port: int, admin: int) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, f"rproxy-{workers}.yaml")
    with open(conf, "w") as f:
        f.write(f"""
global: {{workers: {workers}, max_connections: 20000, grace_period: 1s}}
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
backends:
  - name: be
    servers: ["127.0.0.1:{backend}"]
frontends:
  - {{name: http, protocol: http, listen: "127.0.0.1:{http_port}", backend: be}}
  - {{name: tcp, protocol: tcp, listen: "127.0.0.1:{tcp_port}", backend: be}}
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
                            stdout=open(os.path.join(work, f"rproxy-{workers}.log"), "wb"),
                            stderr=subprocess.STDOUT, cwd=ROOT)


def health(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=10) as response:
        return json.load(response)


def pids(master: int, admin: int, workers: int) -> list[int]:
    if workers == 1:
        return [master]
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            detail = health(admin)
            if all(w.get("configured") for w in detail["workers"]):
                return [master] + [w["pid"] for w in detail["workers"]]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise SystemExit("bench: workers not ready")


def wrk(port: int, duration: int, connections: int, close: bool, pace: str | None = None) -> int:
    """
    Requests wrk completed (non-2xx and socket errors are printed).
    C{pace}: a wrk script that spaces each connection's requests.
    """
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s"] + (["-s", pace] if pace else [])
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "Non-2xx" in line or "Socket errors" in line and "connect 0, read 0, write 0, timeout 0" not in line:
            print(f"  wrk: {line.strip()}")
    return int(out.split(" requests in ")[0].split()[-1])


def measure(port: int, processes: list[int], duration: int, connections: int, close: bool,
            pace: str | None = None) -> tuple[float, float]:
    """
    (requests/s, microseconds of rproxy CPU per request) of one wrk run.
    """
    before = sum(cpu_seconds(p) for p in processes)
    started = time.monotonic()
    requests = wrk(port, duration, connections, close, pace)
    elapsed = time.monotonic() - started
    used = sum(cpu_seconds(p) for p in processes) - before
    return requests / elapsed, used / requests * 1e6


def spread(admin: int, before: list[int]) -> list[int]:
    return [w.get("connections", 0) - b for w, b in zip(health(admin)["workers"], before, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=int, default=6000,
                        help="offered req/s of the CPU-per-request runs (each connection paced)")
    parser.add_argument("--haproxy", action="store_true",
                        help="also HTTP through one HAProxy process against two on one SO_REUSEPORT port: "
                             "what a second process costs on this machine, whoever runs it")
    args = parser.parse_args()
    need("nginx", "wrk", *(["haproxy"] if args.haproxy else []))
    cores = len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="rproxy-bench-")
    os.chmod(work, 0o755)  # nginx workers run as nobody
    procs: list[subprocess.Popen[bytes]] = []
    pace = os.path.join(work, "pace.lua")
    with open(pace, "w") as f:
        # wrk waits delay() ms before each request of a connection
        f.write(f"function delay() return {1000 * args.connections / args.rate:.3f} end\n")
    try:
        backend = free_port()
        nginx = start_nginx(work, backend)
        procs.append(nginx)
        wait_port(backend)
        counts = sorted({1, 2, cores} | {2 ** i for i in range(8) if 2 ** i <= cores})
        cases = [(kind, close) for kind in ("http", "tcp") for close in (False, True)]
        results: dict[tuple[int, str, bool], list[tuple[float, float]]] = {}
        paced: dict[tuple[int, str, bool], list[tuple[float, float]]] = {}
        spreads: dict[tuple[str, bool], list[list[int]]] = {}
        # every count runs at once and the rounds alternate between them
        # (the order rotating from round to round): on a machine others
        # share, load drifts over minutes, and a comparison made of runs
        # minutes apart measured the drift as much as the workers
        running: dict[int, tuple[subprocess.Popen[bytes], int, int, int, list[int]]] = {}
        for workers in counts:
            http_port, tcp_port, admin = free_port(), free_port(), free_port()
            proxy = start_rproxy(work, workers, backend, http_port, tcp_port, admin)
            procs.append(proxy)
            wait_port(http_port)
            wait_port(admin)
            running[workers] = (proxy, http_port, tcp_port, admin, pids(proxy.pid, admin, workers))
            wrk(http_port, 1, args.connections, False)  # warm up
        for round_ in range(args.rounds):
            order = counts[round_ % len(counts):] + counts[:round_ % len(counts)]
            for kind, close in cases:
                for workers in order:
                    if workers > 2 and round_ > 0:
                        continue  # (the scaling rows: one round)
                    _, http_port, tcp_port, admin, processes = running[workers]
                    port = http_port if kind == "http" else tcp_port
                    before = [w.get("connections", 0) for w in health(admin)["workers"]] if workers > 1 else []
                    results.setdefault((workers, kind, close), []).append(
                        measure(port, processes, args.duration, args.connections, close))
                    if workers <= 2:
                        paced.setdefault((workers, kind, close), []).append(
                            measure(port, processes, args.duration, args.connections, close, pace))
                    if workers == 2:
                        spreads.setdefault((kind, close), []).append(spread(admin, before))
        print(f"cores found: {cores}; wrk -c{args.connections}, {args.duration}s runs, medians of {args.rounds} rounds")
        for title, table in ((f"paced to ~{args.rate} req/s (same offered load)", paced), ("flat out", results)):
            print(f"CPU per request of every rproxy process, {title}:")
            _table(cases, table, spreads)
        if args.haproxy:
            _haproxy(work, backend, args, pace, procs)
        print("requests/s by workers, flat out (scaling needs cores to spare for wrk and nginx):")
        for kind, close in cases:
            name = f"{kind} {'Connection: close' if close else 'keep-alive'}"
            rates = [statistics.median(r for r, _ in results[(n, kind, close)]) for n in counts]
            base = rates[0]
            print(f"  {name:26} " + "  ".join(f"{n}: {rate:.0f} ({rate / base:.2f}x)"
                                              for n, rate in zip(counts, rates, strict=True)))
    finally:
        stop_all(procs, work)


def _haproxy(work: str, backend: int, args: argparse.Namespace, pace: str,
             procs: list[subprocess.Popen[bytes]]) -> None:
    """
    The control: HAProxy (nbthread 1) as one process, and as two processes
    bound to one port (HAProxy sets SO_REUSEPORT, as rproxy's master does),
    rounds alternating as above; CPU per request of every HAProxy process.
    """
    pids: dict[int, list[int]] = {}
    ports: dict[int, int] = {}
    for count in (1, 2):
        ports[count] = port = free_port()
        conf = os.path.join(work, f"haproxy-{count}.cfg")
        with open(conf, "w") as f:
            f.write(f"global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
                    f"  timeout server 30s\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
                    f"backend b\n  server s1 127.0.0.1:{backend}\n")
        pids[count] = []
        for _ in range(count):
            process = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT)
            procs.append(process)
            pids[count].append(process.pid)
            wait_port(port)
            time.sleep(0.5)  # (the second binds beside the first: no port to wait for)
    results: dict[tuple[bool, bool, int], list[float]] = {}
    for round_ in range(args.rounds):
        for close in (False, True):
            for paced in (True, False):
                for count in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                    _, cpu = measure(ports[count], pids[count], args.duration, args.connections, close,
                                     pace if paced else None)
                    results.setdefault((close, paced, count), []).append(cpu)
    print("control: HAProxy HTTP, CPU per request of 1 process against 2 on one port:")
    for close in (False, True):
        for paced in (True, False):
            one = statistics.median(results[(close, paced, 1)])
            two = statistics.median(results[(close, paced, 2)])
            name = f"{'Connection: close' if close else 'keep-alive'}, {'paced' if paced else 'flat out'}"
            print(f"  {name:30} 1: {one:6.1f} us/req  2: {two:6.1f} us/req  {two / one:5.2f}x")


def _table(cases: list[tuple[str, bool]], results: dict[tuple[int, str, bool], list[tuple[float, float]]],
           spreads: dict[tuple[str, bool], list[list[int]]]) -> None:
    print(f"  {'case':26} {'w1 req/s':>9} {'w1 us/req':>9} {'w2 req/s':>9} {'w2 us/req':>9} {'cpu w2/w1':>9}  "
          "spread over 2 workers (% of connections)")
    for kind, close in cases:
        name = f"{kind} {'Connection: close' if close else 'keep-alive'}"
        one = results[(1, kind, close)]
        two = results[(2, kind, close)]
        rate1, cpu1 = statistics.median(r for r, _ in one), statistics.median(c for _, c in one)
        rate2, cpu2 = statistics.median(r for r, _ in two), statistics.median(c for _, c in two)
        shares = []
        for split in spreads[(kind, close)]:
            total = sum(split) or 1
            shares.append("/".join(f"{100 * n / total:.0f}" for n in split) + f" of {sum(split)}")
        print(f"  {name:26} {rate1:9.0f} {cpu1:9.1f} {rate2:9.0f} {cpu2:9.1f} {cpu2 / cpu1:9.2f}  {', '.join(shares)}")


if __name__ == "__main__":
    main()
