"""
Stores benchmark (issue 3), in one run, with PostgreSQL and Redis started
by the test harness (tests/servers.py) on free ports:

1. Tunnel login: N sequential logins (connect, login frame, answer) to an
   rproxy with static keys and to one with stores (PostgreSQL key, warm
   Redis cache); p50/p99 of each and what the cache path adds.
   Target: <= 1 ms added at p99.
2. Events: an rproxy process (bench/stores_proxy.py) proxying wrk's
   keep-alive load (L4 frontend to nginx) while it emits 0, then 10,000
   events a second into Redis Streams, and the same into Kafka (the tansu
   broker of tests/servers.py; librdkafka's threads share the proxy's
   core).  Target: 10,000 events/s sustained (none dropped) and
   keep-alive req/s >= 0.90 of the run without events.

The proxies run on core 0; wrk, nginx, Redis, Kafka and PostgreSQL on core 1.

    bench/stores.sh [--logins 2000] [--duration 10] [--only kafka]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from l4 import LOAD_CORE, PROXY_CORE, ROOT, free_port, need, start_nginx, stop_all, wait_port, wrk  # noqa: E402

from rproxy.tunnel.wire import Login, encode  # noqa: E402
from tests.servers import KafkaServer, PostgresServer, RedisServer  # noqa: E402


def login_times(port: int, key: str, count: int) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode(Login(agent_id=f"bench-{i}", api_key=key)))
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit(f"the server closed the login: {data!r}")
            data += chunk
        times.append(time.perf_counter() - started)
        if b'"ok":true' not in data.replace(b" ", b""):
            raise SystemExit(f"login refused: {data!r}")
        sock.close()
    return times


def cpu_of(pid: int) -> float:
    """
    CPU seconds process C{pid} has used so far, all its threads.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def twistd(work: str, name: str, config: str) -> subprocess.Popen[bytes]:
    exe = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(["taskset", "-c", PROXY_CORE, exe, "-n", "--pidfile=", "rproxy", "-c", config],
                            stdout=open(os.path.join(work, f"{name}.log"), "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def get_json(url: str, body: dict[str, object] | None = None, key: str | None = None) -> dict[str, object]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_stores(admin: int, wanted: dict[str, str]) -> None:
    for _ in range(200):
        try:
            if get_json(f"http://127.0.0.1:{admin}/health").get("stores") == wanted:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"stores never became {wanted}")


def logins(work: str, pg: PostgresServer, redis: RedisServer, count: int, procs: list) -> None:
    static_control, stores_control, admin = free_port(), free_port(), free_port()
    tunnel = "tunnels: [{{name: t, control: \"127.0.0.1:{}\", proxy: \"tcp:0:interface=127.0.0.1\", " \
             "public: \"tcp:0:interface=127.0.0.1\"}}]\n"
    with open(os.path.join(work, "static.yaml"), "w") as f:
        f.write("admin: {listen: null}\napi_keys: [{key: static-key}]\n" + tunnel.format(static_control))
    with open(os.path.join(work, "stores.yaml"), "w") as f:
        f.write(f'admin: {{listen: "127.0.0.1:{admin}", api_key: adm}}\n'
                f'stores: {{postgres: {{dsn: "{pg.dsn}"}}, redis: {{url: "{redis.url}"}}}}\n'
                + tunnel.format(stores_control))
    procs.append(twistd(work, "static", os.path.join(work, "static.yaml")))
    procs.append(twistd(work, "stores", os.path.join(work, "stores.yaml")))
    for port in (static_control, stores_control, admin):
        wait_port(port)
    wait_stores(admin, {"postgres": "up", "redis": "up"})
    key = str(get_json(f"http://127.0.0.1:{admin}/api/v1/keys", {"name": "bench"}, "adm")["key"])
    login_times(stores_control, key, 50)  # warms the Redis cache (and both processes)
    login_times(static_control, "static-key", 50)
    static = login_times(static_control, "static-key", count)
    cached = login_times(stores_control, key, count)
    print(f"tunnel login, {count} sequential each:")
    print(f"  static keys         p50 {percentile(static, 0.5) * 1e3:6.3f} ms  p99 {percentile(static, 0.99) * 1e3:6.3f} ms")
    print(f"  warm Redis cache    p50 {percentile(cached, 0.5) * 1e3:6.3f} ms  p99 {percentile(cached, 0.99) * 1e3:6.3f} ms")
    added = percentile(cached, 0.99) - percentile(static, 0.99)
    print(f"  added at p99        {added * 1e3:6.3f} ms  (target <= 1 ms)  {'ok' if added <= 0.001 else 'ABOVE TARGET'}")
    for proc in procs[-2:]:
        proc.terminate()
        proc.wait()


def events(work: str, stores: str, ready: dict[str, str], duration: int, procs: list) -> None:
    nginx, port, admin = free_port(), free_port(), free_port()
    procs.append(start_nginx(work, nginx))
    name = "-".join(ready)
    config = os.path.join(work, f"events-{name}.yaml")
    with open(config, "w") as f:
        f.write(f'global: {{max_connections: 20000}}\nadmin: {{listen: "127.0.0.1:{admin}"}}\n'
                f'stores: {stores}\n'
                f'backends: [{{name: be, servers: ["127.0.0.1:{nginx}"]}}]\n'
                f'frontends: [{{name: fe, listen: "127.0.0.1:{port}", backend: be}}]\n')
    results = {}
    for rate in (0, 10000, 0, 10000):
        report = os.path.join(work, f"events-{name}-{rate}.json")
        proc = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, sys.executable, os.path.join(HERE, "stores_proxy.py"),
             config, "--events", str(rate), "--report", report],
            stdout=open(os.path.join(work, f"events-{name}-{rate}.log"), "ab"), stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(proc)
        wait_port(nginx)
        wait_port(port)
        wait_stores(admin, ready)
        wrk(port, 2, 50, False)
        started = cpu_of(proc.pid)
        rate_ka, _ = wrk(port, duration, 50, False)
        cpu = cpu_of(proc.pid) - started
        proc.terminate()
        proc.wait()
        procs.remove(proc)
        with open(report) as f:
            counters = json.load(f)
        counters["cpu_per_request"] = cpu / (rate_ka * duration)
        results.setdefault(rate, []).append((rate_ka, counters))
        sent_rate = counters["sent"] / counters["seconds"] if counters["seconds"] else 0
        print(f"  events {rate:5}/s asked: keep-alive {rate_ka:8.0f} req/s, proxy CPU "
              f"{counters['cpu_per_request'] * 1e6:5.1f} us/request; sent {sent_rate:8.0f}/s, "
              f"dropped {counters['dropped']}, still buffered {counters['buffered']}")
    base = statistics.median(r for r, _ in results[0])
    loaded = statistics.median(r for r, _ in results[10000])
    dropped = sum(c["dropped"] for _, c in results[10000])
    cpu_base = statistics.median(c["cpu_per_request"] for _, c in results[0])
    cpu_loaded = statistics.median(c["cpu_per_request"] for _, c in results[10000])
    print(f"  proxy CPU per request with events / without  {cpu_loaded / cpu_base:5.2f}  (the events' own cost, "
          "less noisy than req/s on a shared machine)")
    print(f"  keep-alive with events / without  {loaded / base:5.2f}  (target >= 0.90)  "
          f"{'ok' if loaded / base >= 0.9 and not dropped else 'BELOW TARGET'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--only", choices=("logins", "redis", "kafka"), default=None)
    args = parser.parse_args()
    need("nginx", "wrk", "taskset")
    work = tempfile.mkdtemp(prefix="rproxy-stores-bench-")
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen[bytes]] = []
    pg = PostgresServer()
    redis = RedisServer()
    kafka = KafkaServer()
    try:
        for server in (pg, redis, kafka):
            for pid in server.pids():
                subprocess.run(["taskset", "-acp", LOAD_CORE, str(pid)], stdout=subprocess.DEVNULL, check=False)
        if args.only in (None, "logins"):
            logins(work, pg, redis, args.logins, procs)
        if args.only in (None, "redis"):
            print("events into Redis Streams under proxied keep-alive load (wrk -c50):")
            events(work, f'{{redis: {{url: "{redis.url}"}}}}', {"postgres": "off", "redis": "up"}, args.duration,
                   procs)
        if args.only in (None, "kafka"):
            print("events into Kafka under proxied keep-alive load (wrk -c50):")
            events(work, f'{{kafka: {{bootstrap_servers: "{kafka.bootstrap}"}}}}',
                   {"postgres": "off", "redis": "off", "kafka": "up"}, args.duration, procs)
    finally:
        stop_all(procs, work)
        pg.close()
        redis.close()
        kafka.close()


if __name__ == "__main__":
    main()
