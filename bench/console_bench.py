"""
What the dashboard costs the proxy: bench/http.sh's keep-alive load (wrk,
50 connections, nginx behind, proxy on core 0, wrk and nginx on core 1)
through one rproxy with its admin port open, in rounds of three paths:

  closed    nobody looks at the dashboard (it samples once a second anyway)
  polling   N viewers poll /api/v1/dashboard every second, as the page does
  no-admin  a second rproxy with admin.listen null (no sampling at all)

Prints req/s and the proxy's CPU time per request (from /proc, steadier
than req/s on a shared machine) per round, and the medians' ratios; the
target is polling within 2% of closed.  Then, with no load, the proxy's
CPU per second with the page closed and with the viewers polling: what
the dashboard itself costs, as a share of one core.

    bench/console.sh [--duration 4] [--rounds 7] [--viewers 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port, wrk  # noqa: E402


class Viewers:
    """
    C{count} dashboards polling every second while running.
    """

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self.polls = 0
        self.failures = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, offset: float) -> None:
        time.sleep(offset)
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.polls += 1
            except OSError:
                self.failures += 1
            self._stop.wait(1.0)

    def __enter__(self) -> Viewers:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, args=(i / self.count,), daemon=True)
                         for i in range(self.count)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time of a process so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(work: str, name: str, port: int, nginx: int, admin: int | None) -> subprocess.Popen[bytes]:
    path = os.path.join(work, f"{name}.yaml")
    listen = f'"tcp:{admin}:interface=127.0.0.1"' if admin else "null"
    with open(path, "w") as f:
        f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: {listen}}}
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends: [{{name: fe, protocol: http, listen: "127.0.0.1:{port}", backend: be}}]
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", path],
                            stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--viewers", type=int, default=3)
    args = parser.parse_args()
    need("nginx", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-console-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, with_admin, admin, without = (free_port() for _ in range(4))
        procs.append(start_nginx(work, nginx))
        procs.append(start(work, "admin", with_admin, nginx, admin))
        procs.append(start(work, "noadmin", without, nginx, None))
        for port in (nginx, with_admin, admin, without):
            wait_port(port)
        viewers = Viewers(f"http://127.0.0.1:{admin}/api/v1/dashboard", args.viewers)
        for port in (with_admin, without):
            wrk(port, 2, args.connections, False)
        paths = ["closed", "polling", "no-admin"]
        runs: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
        pids = {"closed": procs[1].pid, "polling": procs[1].pid, "no-admin": procs[2].pid}
        print(f"{'round':5} {'path':9} {'keep-alive req/s':>17} {'p99':>10} {'CPU us/req':>11}")
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(paths)
            for path in paths[shift:] + paths[:shift]:
                port = without if path == "no-admin" else with_admin
                if path == "polling":
                    viewers.__enter__()
                    time.sleep(1.0)
                before = cpu_seconds(pids[path])
                rate, p99 = wrk(port, args.duration, args.connections, False)
                used = cpu_seconds(pids[path]) - before
                if path == "polling":
                    viewers.__exit__()
                per = used / (rate * args.duration) * 1e6
                runs[path].append((rate, per))
                print(f"{round_:5} {path:9} {rate:17.0f} {p99:>10} {per:11.1f}", flush=True)
        median = {p: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                  for p, v in runs.items()}
        print()
        print(f"medians over {args.rounds} rounds ({args.viewers} viewers, {viewers.polls} polls, "
              f"{viewers.failures} failed):")
        for path, (rate, per) in median.items():
            print(f"  {path:9} {rate:9.0f} req/s  {per:6.1f} us CPU/req")
        print(f"  polling / closed   req/s {median['polling'][0] / median['closed'][0]:.3f} (target >= 0.98), "
              f"CPU/req {median['polling'][1] / median['closed'][1]:.3f}")
        print(f"  closed / no-admin  req/s {median['closed'][0] / median['no-admin'][0]:.3f}, "
              f"CPU/req {median['closed'][1] / median['no-admin'][1]:.3f}")
        print()
        idle = {}
        for path in ("closed", "polling", "closed", "polling"):
            if path == "polling":
                viewers.__enter__()
            before = cpu_seconds(procs[1].pid)
            time.sleep(10)
            idle.setdefault(path, []).append(cpu_seconds(procs[1].pid) - before)
            if path == "polling":
                viewers.__exit__()
        closed, polling = (statistics.mean(idle[p]) / 10 for p in ("closed", "polling"))
        print(f"no load: proxy CPU {closed * 1e3:.2f} ms/s with the page closed (the sampler), "
              f"{polling * 1e3:.2f} ms/s with {args.viewers} viewers polling: the viewers cost "
              f"{(polling - closed) * 100:.3f}% of a core")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
