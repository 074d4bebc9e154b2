"""
What the connection-level features cost a TCP frontend: CPU per request
of the rproxy process (user+sys from /proc/PID/stat over a run, divided
by the requests wrk made), for

  - main: a plain tcp frontend of the code at C{--base} (default
    C{main}, checked out by C{git archive} into the work folder), to see
    what this branch costs a frontend that uses none of the features;
  - plain: the same frontend on this checkout;
  - proxy: C{proxy_protocol: true}, HAProxy in front with C{send-proxy};
  - tcplog: C{access_log: {format: tcplog, path: ...}};
  - allow: C{allow: [127.0.0.0/8]}.

Every path has HAProxy (mode tcp, on the load core) in front, so that the
PROXY header is the only difference between plain and proxy.  Each round
runs every path once (each round starting with another one) with C{Connection: close} (a new
connection per request: where per-connection costs show) and keep-alive;
the medians over the rounds and the ratios to plain (and plain to main)
are printed.

    bench/l4_features.sh [--duration 3] [--rounds 3] [--base main]

Layout (2 cores): rproxy processes on core 0, nginx, HAProxy and wrk on
core 1.  Needs nginx, haproxy, wrk, taskset and git.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from l4 import LOAD_CORE, PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port, wrk  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_rproxy(work: str, name: str, tree: str, frontends: str) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, f"rproxy-{name}.yaml")
    with open(conf, "w") as f:
        f.write(frontends)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
        stdout=open(os.path.join(work, f"rproxy-{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=tree, env=env,
    )


def start_haproxy(work: str, routes: list[tuple[int, int, str]]) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write("global\n    nbthread 1\n    maxconn 8000\ndefaults\n    mode tcp\n    timeout connect 5s\n"
                "    timeout client 60s\n    timeout server 60s\n")
        for i, (port, target, option) in enumerate(routes):
            f.write(f"listen l{i}\n    bind 127.0.0.1:{port}\n    server s 127.0.0.1:{target} {option}\n")
    return subprocess.Popen(["taskset", "-c", LOAD_CORE, "haproxy", "-f", conf, "-db"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--base", default="main")
    args = parser.parse_args()
    need("nginx", "haproxy", "wrk", "taskset", "git")
    work = tempfile.mkdtemp(prefix="rproxy-bench-l4f-")
    os.chmod(work, 0o755)
    base_tree = os.path.join(work, "base")
    os.mkdir(base_tree)
    archive = subprocess.run(["git", "-C", ROOT, "archive", args.base], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx = free_port()
        procs.append(start_nginx(work, nginx))
        backend = f"backends:\n  - {{name: be, servers: ['127.0.0.1:{nginx}'], health_check: {{type: none}}}}\n"
        head = "global: {max_connections: 20000}\nadmin: {listen: null}\n" + backend + "frontends:\n"
        ports = {name: free_port() for name in ("main", "plain", "proxy", "tcplog", "allow")}
        log = os.path.join(work, "tcp.log")
        main_rproxy = start_rproxy(work, "main", base_tree,
                                   head + f"  - {{name: fe, listen: '127.0.0.1:{ports['main']}', backend: be}}\n")
        branch = start_rproxy(work, "branch", ROOT, head + "".join([
            f"  - {{name: plain, listen: '127.0.0.1:{ports['plain']}', backend: be}}\n",
            f"  - {{name: proxy, listen: '127.0.0.1:{ports['proxy']}', backend: be, proxy_protocol: true}}\n",
            f"  - {{name: tcplog, listen: '127.0.0.1:{ports['tcplog']}', backend: be, "
            f"access_log: {{format: tcplog, path: '{log}'}}}}\n",
            f"  - {{name: allow, listen: '127.0.0.1:{ports['allow']}', backend: be, allow: [127.0.0.0/8]}}\n",
        ]))
        procs += [main_rproxy, branch]
        front = {name: free_port() for name in ports}
        procs.append(start_haproxy(work, [(front[n], ports[n], "send-proxy" if n == "proxy" else "")
                                          for n in ports]))
        for port in [nginx, *ports.values(), *front.values()]:
            wait_port(port)
        pid_of = {"main": main_rproxy.pid}
        for name in ("plain", "proxy", "tcplog", "allow"):
            pid_of[name] = branch.pid
        for name in ports:  # warm up
            wrk(front[name], 1, args.connections, True)
        per_request: dict[tuple[str, str], list[float]] = {}
        names = list(ports)
        for round_ in range(args.rounds):
            # each round starts with another path (no path always runs first)
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for mode, close in (("close", True), ("keep-alive", False)):
                for name in order:
                    pid = pid_of[name]
                    before = cpu_seconds(pid)
                    rate, _ = wrk(front[name], args.duration, args.connections, close)
                    used = cpu_seconds(pid) - before
                    requests = rate * args.duration
                    per_request.setdefault((name, mode), []).append(used / requests * 1e6)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        print(f"rproxy CPU per request (microseconds, median of {args.rounds} rounds of {args.duration}s, "
              f"{args.connections} connections; HAProxy in front of every path)")
        print(f"{'path':8} {'close':>8} {'keep-alive':>11}")
        medians = {key: statistics.median(values) for key, values in per_request.items()}
        for name in ports:
            print(f"{name:8} {medians[(name, 'close')]:8.1f} {medians[(name, 'keep-alive')]:11.1f}")
        print("ratios (close, keep-alive):")
        for name, ref in (("plain", "main"), ("proxy", "plain"), ("tcplog", "plain"), ("allow", "plain")):
            ratios = [medians[(name, m)] / medians[(ref, m)] for m in ("close", "keep-alive")]
            print(f"  {name}/{ref}: {ratios[0]:.2f}, {ratios[1]:.2f}")
        with open(log) as f:
            print(f"tcplog lines written: {sum(1 for _ in f)}")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
