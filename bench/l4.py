"""
L4 benchmark: rproxy's TCP frontend against HAProxy (mode tcp, one thread)
and against nginx direct, in one run, printing rproxy/HAProxy ratios.

Layout (2 cores): the proxies run pinned to core 0; nginx (the backend,
100-byte responses and a 200 MB file) and the load generators (wrk, curl)
run pinned to core 1.  All traffic is on 127.0.0.1 and every load is
bounded in time.

    bench/l4.sh [--duration 10] [--connections 50]

Needs nginx, haproxy, wrk, curl and taskset (Debian: apt-get install nginx
haproxy wrk curl util-linux).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_CORE = "0"
LOAD_CORE = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on {port} after {timeout}s")


def stop_all(procs: list[subprocess.Popen[bytes]], work: str) -> None:
    """
    SIGTERM every process (SIGKILL after 10 s) and remove the work folder.
    """
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            "bench: missing " + ", ".join(missing) + "; on Debian: apt-get install nginx haproxy wrk curl"
        )


def start_nginx(work: str, port: int) -> subprocess.Popen[bytes]:
    with open(os.path.join(work, "big.bin"), "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(200):
            f.write(block)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ default_type text/plain; return 200 "{'x' * 99}\\n"; }}
        location = /big.bin {{ root {work}; sendfile on; }}
        location = /api/login {{
            default_type application/json;
            return 200 '{{"code": "0", "message": "", "result": ["bench-token"]}}';
        }}
    }}
}}
""")
    return subprocess.Popen(["taskset", "-c", LOAD_CORE, "nginx", "-c", conf, "-p", work],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_haproxy(work: str, port: int, backend: int, mode: str = "tcp", core: str = PROXY_CORE,
                  name: str = "") -> subprocess.Popen[bytes]:
    """
    HAProxy on C{core} (the proxy core), one thread, C{mode} tcp or http
    (http keeps server connections alive: http-reuse always); C{name}
    tells the configuration files of several HAProxies apart.
    """
    conf = os.path.join(work, f"haproxy-{mode}{name}.cfg")
    reuse = "    http-reuse always\n" if mode == "http" else ""
    with open(conf, "w") as f:
        f.write(f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{reuse}frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
""")
    return subprocess.Popen(["taskset", "-c", core, "haproxy", "-f", conf, "-db"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_rproxy(work: str, port: int, backend: int) -> subprocess.Popen[bytes]:
    conf = os.path.join(work, "rproxy.yaml")
    with open(conf, "w") as f:
        f.write(f"""
global: {{max_connections: 20000}}
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
backends:
  - name: be
    servers: ["127.0.0.1:{backend}"]
frontends:
  - {{name: fe, listen: "127.0.0.1:{port}", backend: be}}
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "rproxy", "-c", conf],
        stdout=open(os.path.join(work, "rproxy.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )


def start_portforward(work: str, port: int, backend: int) -> subprocess.Popen[bytes]:
    """
    Twisted's stock splice (twistd portforward), for reference.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, twistd, "-n", "--pidfile=", "portforward",
         "-p", f"tcp:{port}:interface=127.0.0.1", "-h", "127.0.0.1", "-d", str(backend)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,
    )


def wrk(port: int, duration: int, connections: int, close: bool) -> tuple[float, str]:
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = re.search(r"Socket errors: (.*)", out)
    return rate, (p99.group(1) if p99 else "?") + (f" errors: {errors.group(1)}" if errors else "")


def bulk(port: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}",
         f"http://127.0.0.1:{port}/big.bin"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return float(out) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    need("nginx", "haproxy", "wrk", "curl", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-bench-")
    os.chmod(work, 0o755)  # nginx workers run as nobody
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx_port, haproxy_port, rproxy_port, pf_port = free_port(), free_port(), free_port(), free_port()
        procs.append(start_nginx(work, nginx_port))
        procs.append(start_haproxy(work, haproxy_port, nginx_port))
        procs.append(start_rproxy(work, rproxy_port, nginx_port))
        procs.append(start_portforward(work, pf_port, nginx_port))
        for port in (nginx_port, haproxy_port, rproxy_port, pf_port):
            wait_port(port)
        targets = [("direct", nginx_port), ("haproxy", haproxy_port), ("portfwd", pf_port),
                   ("rproxy", rproxy_port)]
        results: dict[str, dict[str, float]] = {name: {} for name, _ in targets}
        for _, port in targets:  # warm up
            wrk(port, 2, args.connections, False)
        print(f"{'path':8} {'keep-alive req/s':>17} {'p99':>10} {'close req/s':>12} {'p99':>10} {'bulk MB/s':>10}")
        for name, port in targets:
            ka, ka_p99 = wrk(port, args.duration, args.connections, False)
            cl, cl_p99 = wrk(port, args.duration, args.connections, True)
            mb = max(bulk(port) for _ in range(3))
            results[name] = {"ka": ka, "close": cl, "bulk": mb}
            print(f"{name:8} {ka:17.0f} {ka_p99:>10} {cl:12.0f} {cl_p99:>10} {mb:10.0f}")
        r, h, pf = results["rproxy"], results["haproxy"], results["portfwd"]
        print()
        print("portforward/haproxy (Twisted's stock splice, for reference): "
              f"keep-alive {pf['ka'] / h['ka']:.2f}, new connections {pf['close'] / h['close']:.2f}, "
              f"bulk {pf['bulk'] / h['bulk']:.2f}")
        print("haproxy/direct (1.00 means the load generator, not HAProxy, is the limit): "
              f"keep-alive {h['ka'] / results['direct']['ka']:.2f}, "
              f"new connections {h['close'] / results['direct']['close']:.2f}")
        print("rproxy/haproxy ratios (targets: keep-alive >= 0.60, new connections >= 0.30, bulk >= 0.75)")
        for key, label, target in (("ka", "keep-alive", 0.60), ("close", "new connections", 0.30),
                                   ("bulk", "bulk", 0.75)):
            ratio = r[key] / h[key]
            print(f"  {label:16} {ratio:5.2f}  {'ok' if ratio >= target else 'BELOW TARGET'}")
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
