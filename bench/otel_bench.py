"""
What tracing costs: CPU per request of rproxy's HTTP frontend without
telemetry, with C{sample_ratio: 0.01} and with C{sample_ratio: 1.0}, in
one run, against nginx (100-byte responses), the spans exported to an
OTLP/HTTP receiver (L{tests.otlp}, in a process of its own) that
answers every export.

Three rproxy processes (one per configuration) on core 0, wrk, nginx and
the receiver on core 1.  Each round runs wrk (keep-alive) against each
path in turn (each round starting with the next path); CPU per request is
the process's user+sys time (/proc/PID/stat, every thread: the exporter's
included) over the run, divided by the requests wrk counted; also shown
alone, the time of its threads but the reactor's (the span processor's).
Medians over the rounds, and the ratios to the untraced path.

    bench/otel.sh [--duration 3] [--connections 50] [--rounds 5] [--ratios 0.01,1.0]

Issue 18's targets: at most +15% CPU per request at 1.0, +3% at 0.01.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import LOAD_CORE, PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port  # noqa: E402

RECEIVER = """
import sys
sys.path.insert(0, sys.argv[2])
from twisted.internet import reactor
from twisted.web.server import Site
from tests.otlp import OTLPReceiver
receiver = OTLPReceiver()
receiver.keep = "--decode" in sys.argv
site = Site(receiver)
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


def cpu_seconds(pid: int) -> tuple[float, float]:
    """
    The user+sys CPU seconds of process C{pid}: of its main thread (the
    reactor's) and of its other threads (the span processor's, the
    reactor's thread pool).
    """
    main = others = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue  # (a thread that ended meanwhile: its time is the process's, below)
        ticks = int(fields[11]) + int(fields[12])
        if int(tid) == pid:
            main = ticks
        else:
            others += ticks
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    total = int(fields[11]) + int(fields[12])
    hz = os.sysconf("SC_CLK_TCK")
    return main / hz, max(total - main, others) / hz


def wrk(port: int, duration: int, connections: int) -> int:
    """
    The requests one keep-alive wrk run completed.
    """
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"bench: {errors.group(1)} failed responses:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def start_rproxy(work: str, name: str, port: int, nginx: int, telemetry: str) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, f"{name}.yaml")
    with open(conf, "w") as f:
        f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: null}}
backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]
frontends: [{{name: fe, protocol: http, listen: "127.0.0.1:{port}", backend: be}}]
{telemetry}
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
        stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode", action="store_true", help="the receiver decodes each export (more CPU on core 1)")
    parser.add_argument("--ratios", default="0.01,1.0", help="the sample ratios compared with no telemetry")
    args = parser.parse_args()
    need("nginx", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-otel-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx, receiver = free_port(), free_port()
        procs.append(start_nginx(work, nginx))
        procs.append(subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, sys.executable, "-c", RECEIVER, str(receiver), ROOT]
            + (["--decode"] if args.decode else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoint = f"http://127.0.0.1:{receiver}"
        ratios = args.ratios.split(",")
        paths = {"off": ""}
        for ratio in ratios:
            paths[ratio] = f"telemetry: {{otlp_endpoint: \"{endpoint}\", sample_ratio: {float(ratio)}}}"
        ports = {name: free_port() for name in paths}
        rproxies = {name: start_rproxy(work, name.replace(".", "_"), ports[name], nginx, telemetry)
                    for name, telemetry in paths.items()}
        procs += rproxies.values()
        for port in (nginx, receiver, *ports.values()):
            wait_port(port)
        names = list(paths)
        for name in names:
            wrk(ports[name], 1, args.connections)  # warm up
        runs: dict[str, list[float]] = {name: [] for name in names}
        threads: dict[str, list[float]] = {name: [] for name in names}
        print(f"{'round':5} {'path':6} {'requests':>9} {'us CPU/request':>15} {'other threads':>14}")
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(names)
            for name in names[shift:] + names[:shift]:
                pid = rproxies[name].pid
                main, others = cpu_seconds(pid)
                requests = wrk(ports[name], args.duration, args.connections)
                main_after, others_after = cpu_seconds(pid)
                runs[name].append((main_after - main + others_after - others) / requests * 1e6)
                threads[name].append((others_after - others) / requests * 1e6)
                print(f"{round_:5} {name:6} {requests:9} {runs[name][-1]:15.1f} {threads[name][-1]:14.1f}", flush=True)
            off = runs["off"][-1]
            print("      this round: " + ", ".join(f"{r} {runs[r][-1] / off:.3f}x" for r in ratios) + " of off")
        median = {name: statistics.median(values) for name, values in runs.items()}
        print()
        print(f"medians over {args.rounds} rounds (us of CPU per request, exporter thread included; "
              "of which the threads but the reactor's):")
        for name in names:
            print(f"  {name:5} {median[name]:7.1f}   {statistics.median(threads[name]):5.1f}")
        print("targets: sample_ratio 1.0 <= 1.15x, 0.01 <= 1.03x of telemetry off")
        for ratio in ratios:
            print(f"  sample_ratio {ratio:4} / off  {median[ratio] / median['off']:.3f}")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
