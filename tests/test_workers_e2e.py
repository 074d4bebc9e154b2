"""
rproxy with C{global.workers: 2} as a user runs it (a C{twistd -n rproxy}
child process: a master and two workers): tcp and http frontends, health
state across processes, a worker killed under traffic, reload and SIGTERM
under traffic.
"""

from __future__ import annotations

import json
import os
import signal
import sys  # noqa: E402,I001
import time
from typing import Any

import yaml
from twisted.internet import defer, error
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tests.support import Client, ServiceMixin, async_test, connect, reactor, turn, wait_for
from tests.test_twistd import ROOT, Child


class Hello(resource.Resource):
    """
    Answers C{hello} after C{delay} seconds; counts requests.
    """

    isLeaf = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.requests = 0

    def render_GET(self, request: Any) -> Any:
        self.requests += 1
        request.setHeader(b"content-type", b"text/plain")
        if not self.delay:
            return b"hello"

        def answer() -> None:
            if not request._disconnected:
                request.setHeader(b"content-length", b"5")
                request.write(b"hello")
                request.finish()

        reactor.callLater(self.delay, answer)
        return server.NOT_DONE_YET


class WorkersMixin(ServiceMixin):
    """
    Start rproxy with workers in a twistd child process, and talk to it.
    """

    def write_config(self, data: dict[str, Any]) -> str:
        path = getattr(self, "_config_path", None)
        if path is None:
            path = self._config_path = os.path.abspath(self.mktemp()) + ".yaml"  # type: ignore[attr-defined]
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    async def start(self, data: dict[str, Any], workers: int = 2) -> Child:
        child = Child()
        launcher = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
        args = [sys.executable, "-c", launcher, "-n", "--pidfile=", "rproxy", "--config", self.write_config(data)]
        self.process = reactor.spawnProcess(child, sys.executable, args, env=dict(os.environ, PYTHONPATH=ROOT),
                                            path=ROOT)

        async def stop() -> None:
            if not child.ended:
                self.process.signalProcess("KILL")
                await wait_for(lambda: child.ended)
            # the workers end when their master is gone
            for pid in self.pids:
                await wait_for(lambda pid=pid: not _alive(pid), 20)

        self.pids: list[int] = []
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))  # type: ignore[attr-defined]
        match = await child.line(r"admin listening on 127\.0\.0\.1:(\d+)")
        self.admin_port = int(match.group(1))
        # the start-up line names the frontends the workers serve
        await child.line(r"\(pid \d+\) running .*: frontend \S+ 127\.0\.0\.1:\d+ in \d+ worker\(s\)")
        await wait_for(lambda: child.output.count(" serving (pid ") >= workers or child.ended, 30)
        self.assertEqual(child.output.count(" serving (pid "), workers, child.output)  # type: ignore[attr-defined]
        health = await self.admin("/health")
        self.pids = [w["pid"] for w in health[1]["workers"]]
        return child

    async def refused(self, port: int) -> None:
        """
        Wait until C{port} refuses connections: every worker and the master
        closed their sockets (a worker may still accept for a moment).
        """
        for _ in range(100):
            try:
                client = await connect(port)
            except error.ConnectionRefusedError:
                return
            client.transport.abortConnection()  # type: ignore[attr-defined]
            await turn(delay=0.1)
        with self.assertRaises(error.ConnectionRefusedError):  # type: ignore[attr-defined]
            await connect(port)

    def port(self, child: Child, frontend: str) -> int:
        import re

        match = re.search(rf"frontend {frontend} listening on 127\.0\.0\.1:(\d+)", child.output)
        assert match is not None, child.output
        return int(match.group(1))

    async def admin(self, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, Any]:
        client = await connect(self.admin_port)
        client.transport.write(  # type: ignore[attr-defined]
            f"{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)
        await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        status = int(head.split()[1])
        return status, json.loads(body) if body.startswith(b"{") else body.decode()

    async def http_backend(self, delay: float = 0.0) -> tuple[Hello, int]:
        hello = Hello(delay)
        site = server.Site(hello)
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return hello, port.getHost().port

    async def get(self, port: int, close: bool = True) -> int:
        """
        One request on a new connection: its status, or 0 if the
        connection failed or closed before a whole response.
        """
        try:
            client = await connect(port, Client())
        except error.ConnectError:
            return 0
        client.transport.write(  # type: ignore[attr-defined]
            b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
        await client.closed
        if not client.data.startswith(b"HTTP/1.1 ") or not client.data.endswith(b"hello"):
            return 0
        return int(client.data[9:12])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def config(backend_port: int, protocol: str = "tcp", **global_: Any) -> dict[str, Any]:
    return {
        "global": dict({"workers": 2, "grace_period": "10s"}, **global_),
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "backends": [{"name": "web", "servers": [f"127.0.0.1:{backend_port}"],
                      "health_check": {"type": "tcp", "interval": "200ms"}}],
        "frontends": [{"name": "web", "listen": "127.0.0.1:0", "backend": "web", "protocol": protocol}],
    }


class TCPWorkersTests(WorkersMixin, TestCase):
    timeout = 90

    @async_test
    async def test_connections_spread_over_workers(self) -> None:
        """
        200 connections to an L4 frontend are each spliced to the server,
        and both workers take between 30% and 70% of them.
        """
        factory, port = await self.backend("a")
        child = await self.start(config(port.getHost().port))
        front = self.port(child, "web")

        async def one(i: int) -> bytes:
            client = await connect(front)
            self.client_cleanup(client)
            await client.read_until(b"a\n")
            client.transport.write(f"ping {i}\n".encode())  # type: ignore[attr-defined]
            line = await client.read_until(b"\n")
            client.transport.loseConnection()  # type: ignore[attr-defined]
            await client.closed
            return line

        lines = []
        for batch in range(4):  # (50 at a time: the test's echo server listens with a backlog of 50)
            lines += await defer.gatherResults([defer.Deferred.fromCoroutine(one(i))
                                                for i in range(batch * 50, batch * 50 + 50)])
        self.assertEqual(lines, [f"ping {i}\n".encode() for i in range(200)])
        status, health = await self.admin("/health")
        self.assertEqual(status, 200)
        taken = [w["connections"] for w in health["workers"]]
        self.assertEqual(sum(taken), 200)
        for count in taken:
            self.assertTrue(60 <= count <= 140, taken)
        self.assertEqual(health["frontends"][0]["total_connections"], 200)
        self.assertEqual(health["tunnels"]["process"], "master")
        _, metrics = await self.admin("/metrics")
        self.assertIn('rproxy_frontend_connections_total{frontend="web"} 200', metrics)
        self.assertIn("rproxy_workers_running 2", metrics)

    @async_test
    async def test_killed_worker_replaced_only_its_connections_fail(self) -> None:
        """
        With 40 connections open over two workers, SIGKILL to one worker
        closes exactly the connections it held; the others go on; the
        worker is started again and new connections all succeed.  The
        machine's totals (/health, /stats) keep the dead worker's.
        """
        factory, port = await self.backend("a")
        child = await self.start(config(port.getHost().port))
        front = self.port(child, "web")
        clients = []
        for _ in range(40):
            client = await connect(front)
            self.client_cleanup(client)
            await client.read_until(b"a\n")
            clients.append(client)
        _, health = await self.admin("/health")
        self.assertEqual(health["frontends"][0]["total_connections"], 40)
        victim = health["workers"][0]
        held = victim["active_connections"]
        self.assertEqual(held + health["workers"][1]["active_connections"], 40)
        self.assertTrue(0 < held < 40, held)
        os.kill(victim["pid"], signal.SIGKILL)
        await wait_for(lambda: sum(c.lost for c in clients) >= held, 10)
        await turn(delay=0.3)
        self.assertEqual(sum(c.lost for c in clients), held)
        for i, client in enumerate(c for c in clients if not c.lost):
            client.transport.write(f"still here {i}\n".encode())  # type: ignore[attr-defined]
            self.assertEqual(await client.read_until(b"\n"), f"still here {i}\n".encode())
        await child.line(r"worker 0 \(pid \d+\) killed by signal 9 after [\d.]+s; starting it again in 0.5s")
        await wait_for(lambda: child.output.count(" serving (pid ") == 3, 30)
        _, health = await self.admin("/health")
        self.assertEqual([(w["running"], w["restarts"]) for w in health["workers"]], [(True, 1), (True, 0)])
        self.assertEqual(health["frontends"][0]["total_connections"], 40)
        self.pids.append(health["workers"][0]["pid"])
        # every new connection is served, by both workers again
        for _ in range(40):
            client = await connect(front)
            self.client_cleanup(client)
            await client.read_until(b"a\n")
        _, health = await self.admin("/health")
        self.assertGreater(health["workers"][0]["active_connections"], 0)
        self.assertEqual(sum(w["active_connections"] for w in health["workers"]), 40 - held + 40)
        self.assertEqual(health["frontends"][0]["total_connections"], 80)
        _, stats = await self.admin("/stats")
        self.assertEqual(stats["pools"][0]["backends"][0]["total_connections"], 80)

    @async_test
    async def test_health_checked_once_state_reaches_every_worker(self) -> None:
        """
        Health probes are made once per machine (the master's), and a
        server found down is unusable in every worker within 100 ms.
        """
        factory, port = await self.backend("a")
        probes: list[float] = []
        count = factory.buildProtocol

        def counting(addr: Any) -> Any:
            probes.append(time.monotonic())
            return count(addr)

        factory.buildProtocol = counting  # type: ignore[method-assign]
        data = config(port.getHost().port)
        data["backends"][0]["health_check"] = {"type": "tcp", "interval": "100ms", "fall": 1, "rise": 1}
        child = await self.start(data)
        probes.clear()
        await turn(delay=1.0)
        # one probe per 100 ms with jitter: never one per worker
        self.assertTrue(6 <= len(probes) <= 14, len(probes))
        await port.stopListening()
        await child.line("server 127.0.0.1:\\d+ of backend web is down")
        # the first /health asked once the master has logged it shows it
        # in both workers (the verdict goes to them in the same turn)
        _, health = await self.admin("/health")
        self.assertEqual([w["unusable_servers"] for w in health["workers"]], [["web/" + data["backends"][0]["servers"][0]]] * 2)
        self.assertEqual(health["backends"][0]["servers"][0]["state"], "down")

    @async_test
    async def test_max_connections_is_the_machines(self) -> None:
        """
        A frontend's max_connections holds for the machine: with 3 at
        workers 2 (shares 2 and 1) and no queue, twelve clients get at
        most three connections served between the two workers.
        """
        _, port = await self.backend("a")
        data = config(port.getHost().port)
        data["frontends"][0].update(max_connections=3, queue_size=0)
        child = await self.start(data)
        front = self.port(child, "web")
        clients = []
        for _ in range(12):
            try:
                client = await connect(front)
            except error.ConnectError:
                # (refused by a full worker: its reset can beat the end of
                # the handshake on the client's side)
                continue
            self.client_cleanup(client)
            clients.append(client)
        await wait_for(lambda: all(b"a\n" in c.data or c.lost for c in clients), 10)
        served = sum(1 for c in clients if b"a\n" in c.data and not c.lost)
        self.assertTrue(2 <= served <= 3, served)
        _, health = await self.admin("/health")
        frontend = health["frontends"][0]
        self.assertEqual((frontend["active_connections"], frontend["total_connections"]), (served, 12))

    @async_test
    async def test_drain_reaches_every_worker(self) -> None:
        """
        PATCH /api/v1/servers (the dashboard's drain button) acts in the
        master and reaches every worker: new connections avoid the server
        in both; ready brings it back everywhere.
        """
        _, a = await self.backend("a")
        _, b = await self.backend("b")
        data = config(a.getHost().port)
        servers = [f"127.0.0.1:{a.getHost().port}", f"127.0.0.1:{b.getHost().port}"]
        data["backends"][0]["servers"] = servers
        child = await self.start(data)
        front = self.port(child, "web")
        status, body = await self.admin(f"/api/v1/servers/web/{servers[0]}", "PATCH", b'{"state": "drain"}')
        self.assertEqual((status, body["admin_state"]), (200, "drain"), body)
        await turn(delay=0.1)
        _, health = await self.admin("/health")
        self.assertEqual([w["unusable_servers"] for w in health["workers"]], [[f"web/{servers[0]}"]] * 2)
        for _ in range(20):
            client = await connect(front)
            self.client_cleanup(client)
            await client.read_until(b"b\n")
        self.assertEqual(child.output.count(f"server {servers[0]} of backend web: drain (was ready)"), 1)
        await self.admin(f"/api/v1/servers/web/{servers[0]}", "PATCH", b'{"state": "ready"}')
        await turn(delay=0.1)
        _, health = await self.admin("/health")
        self.assertEqual([w["unusable_servers"] for w in health["workers"]], [[]] * 2)

    @async_test
    async def test_passive_ejection_reaches_other_worker(self) -> None:
        """
        A server that refuses connections is ejected by the worker that
        saw it fail, and then is out of every worker's choice.
        """
        factory, port = await self.backend("a")
        refused = await self.backend("gone")
        gone = refused[1].getHost().port
        await refused[1].stopListening()
        data = config(port.getHost().port)
        data["backends"][0].update(
            servers=[f"127.0.0.1:{port.getHost().port}", f"127.0.0.1:{gone}"], health_check={"type": "none"},
            passive={"consecutive_failures": 2, "ejection": "30s", "max_ejection_percent": 50})
        child = await self.start(data)
        front = self.port(child, "web")
        for _ in range(20):
            client = await connect(front)
            self.client_cleanup(client)
            await client.read_until(b"a\n")
            if "ejected" in child.output:
                break
        match = await child.line(r"server 127\.0\.0\.1:\d+ of backend web ejected for \d+s \(seen by worker \d\)")
        self.assertIn(str(gone), match.group(0))
        await turn(delay=0.1)
        _, health = await self.admin("/health")
        self.assertEqual([w["unusable_servers"] for w in health["workers"]], [[f"web/127.0.0.1:{gone}"]] * 2)
        states = {s["name"]: s["state"] for s in health["backends"][0]["servers"]}
        self.assertEqual(states[f"127.0.0.1:{gone}"], "ejected")


class StartWorkersTests(WorkersMixin, TestCase):
    timeout = 60

    @async_test
    async def test_bind_failure_exits_1(self) -> None:
        """A frontend port in use stops the master before any worker starts: exit 1, one line, no traceback."""
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.addCleanup(sock.close)
        busy = sock.getsockname()[1]
        data = config(1)
        data["frontends"][0]["listen"] = f"127.0.0.1:{busy}"
        child = Child()
        launcher = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
        args = [sys.executable, "-c", launcher, "-n", "--pidfile=", "rproxy", "--config", self.write_config(data)]
        reactor.spawnProcess(child, sys.executable, args, env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 1)
        line = f"frontend web: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use; not starting"
        self.assertEqual(child.output.count(line), 1)
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn("worker 0 started", child.output)


    @async_test
    async def test_reload_moves_frontend_or_changes_nothing(self) -> None:
        """
        A reload that moves a frontend serves the new address in every
        worker and closes the old one everywhere; one whose new address
        cannot bind is rejected and changes nothing.
        """
        import socket

        factory, port = await self.backend("a")
        data = config(port.getHost().port)
        child = await self.start(data)
        old = self.port(child, "web")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            moved = probe.getsockname()[1]
        data["frontends"][0]["listen"] = f"127.0.0.1:{moved}"
        self.write_config(data)
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line(f"frontend web listening on 127\\.0\\.0\\.1:{moved}")
        await child.line("configuration reloaded in the master and 2 worker")
        await self.refused(old)
        self.assertNotIn(" starting on ", child.output)
        for _ in range(10):
            client = await connect(moved)
            self.client_cleanup(client)
            await client.read_until(b"a\n")
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        data["frontends"][0]["listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
        self.write_config(data)
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line(f"reload rejected: frontend web: cannot listen on tcp:{busy.getsockname()[1]}:"
                         "interface=127.0.0.1: Address already in use; keeping the running configuration")
        client = await connect(moved)
        self.client_cleanup(client)
        await client.read_until(b"a\n")
        _, health = await self.admin("/health")
        self.assertEqual(health["frontends"][0]["listen"], f"tcp:{moved}:interface=127.0.0.1")
        _, last = await self.admin("/api/v1/reload")
        self.assertEqual((last["reload"]["result"], last["reload"]["count"]), ("failed", 2))
        self.assertIn("Address already in use", last["reload"]["errors"][0])


    @async_test
    async def test_reload_recorded_once_for_the_machine(self) -> None:
        """
        At workers 2 a reload goes through the one reload runner: applied
        in every worker and recorded in the master (/api/v1/reload, the
        dashboard, the metric counted once), an invalid file refused
        with the key path and recorded as such, and SIGHUP the same.
        """
        factory, port = await self.backend("a")
        data = config(port.getHost().port)
        child = await self.start(data)
        status, body = await self.admin("/api/v1/reload", "POST")
        self.assertEqual((status, body["reload"]["result"], body["reload"]["count"]), (200, "ok", 1), body)
        self.assertEqual(body["reload"]["path"], self._config_path)
        await child.line("configuration reloaded in the master and 2 worker")
        data["backends"][0]["health_check"]["interval"] = "soon"
        self.write_config(data)
        status, body = await self.admin("/api/v1/reload", "POST")
        self.assertEqual((status, body["reload"]["result"], body["reload"]["count"]), (422, "invalid", 2), body)
        self.assertTrue(any("backends[0].health_check.interval" in e for e in body["reload"]["errors"]), body)
        os.kill(self.process.pid, signal.SIGHUP)
        await wait_for(lambda: child.output.count("reload rejected; keeping the running configuration") == 2, 10)
        _, last = await self.admin("/api/v1/reload")
        self.assertEqual((last["reload"]["result"], last["reload"]["count"]), ("invalid", 3))
        _, dashboard = await self.admin("/api/v1/dashboard")
        self.assertEqual(dashboard["reload"], last["reload"])
        _, metrics = await self.admin("/metrics")
        self.assertIn('rproxy_config_reloads_total{result="ok"} 1\n', metrics)
        self.assertIn('rproxy_config_reloads_total{result="invalid"} 2\n', metrics)
        client = await connect(self.port(child, "web"))
        self.client_cleanup(client)
        await client.read_until(b"a\n")

    @async_test
    async def test_tunnel_runs_in_the_master(self) -> None:
        """
        A tunnel runs in the master (one process holds every agent
        session): an agent logs in there, a public client reaches its
        service, /health names the master's pid, and /api/v1 (the
        master's) lists the agent.
        """
        import re

        from rproxy.tunnel.agent import AgentService
        from rproxy.tunnel.config import parse_agent_config

        factory, port = await self.backend("a")
        data = config(port.getHost().port)
        data["admin"]["api_key"] = "admin-secret"
        data["api_keys"] = [{"key": "good-key", "level": -1, "name": "shared"}]
        data["tunnels"] = [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1",
                            "proxy": "tcp:0:interface=127.0.0.1", "public": "tcp:0:interface=127.0.0.1"}]
        child = await self.start(data)
        ports = {role: int(re.search(rf"tunnel gpu {role} listening on 127\.0\.0\.1:(\d+)", child.output)
                           .group(1))  # type: ignore[union-attr]
                 for role in ("control", "proxy", "public")}
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{ports['control']}", "proxy": f"127.0.0.1:{ports['proxy']}"},
            "api_key": "good-key", "agent_id": "gpu-01",
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await child.line("gpu-01")
        client = await connect(ports["public"])
        self.client_cleanup(client)
        await client.read_until(b"a\n")
        _, health = await self.admin("/health")
        self.assertEqual(health["tunnels"], {"process": "master", "pid": self.process.pid, "names": ["gpu"]})
        agents = await connect(self.admin_port)
        agents.transport.write(b"GET /api/v1/agents HTTP/1.0\r\nAuthorization: Bearer admin-secret\r\n\r\n")
        await agents.closed
        body = json.loads(bytes(agents.data).partition(b"\r\n\r\n")[2])
        self.assertEqual([a["id"] for a in body["tunnels"][0]["agents"]], ["gpu-01"])


class HTTPWorkersTests(WorkersMixin, TestCase):
    timeout = 90

    @async_test
    async def test_requests_served_by_both_workers(self) -> None:
        """
        HTTP requests (new connections and kept-alive ones) all get 200 and
        both workers serve some; /stats sums the server's connections.
        """
        hello, port = await self.http_backend()
        child = await self.start(config(port, "http"))
        front = self.port(child, "web")
        statuses = await defer.gatherResults([defer.Deferred.fromCoroutine(self.get(front)) for _ in range(100)])
        self.assertEqual(statuses, [200] * 100)
        client = await connect(front, Client())
        self.client_cleanup(client)
        for _ in range(20):
            client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
            await client.read_until(b"hello")
        self.assertEqual(hello.requests, 120)
        _, health = await self.admin("/health")
        self.assertTrue(all(w["connections"] >= 20 for w in health["workers"]), health["workers"])
        _, metrics = await self.admin("/metrics")
        self.assertIn('rproxy_http_requests_total{backend="web",code="200",frontend="web"} 120', metrics)
        status, stats = await self.admin("/stats")
        self.assertEqual(status, 200)
        self.assertEqual(stats["pools"][0]["backends"][0]["state"], "up")
        status, ready = await self.admin("/readyz")
        self.assertEqual((status, ready["status"]), (200, "ready"))
        # the dashboard shows the machine: both workers' connections, the
        # master's server state (as of a sample taken after the traffic)
        _, health = await self.admin("/health")
        upstream = health["backends"][0]["servers"][0]["total_connections"]
        dashboard: dict[str, Any] = {}

        async def sampled() -> bool:
            dashboard.update((await self.admin("/api/v1/dashboard"))[1])
            return (bool(dashboard["frontends"]) and dashboard["frontends"][0]["total_connections"] == 101
                    and dashboard["backends"][0]["servers"][0]["total_connections"] == upstream)

        for _ in range(50):
            if await sampled():
                break
            await turn(delay=0.1)
        frontend = dashboard["frontends"][0]
        self.assertEqual((frontend["name"], frontend["total_connections"]), ("web", 101), dashboard)
        self.assertRegex(frontend["address"], r"^127\.0\.0\.1:\d+$")
        server = dashboard["backends"][0]["servers"][0]
        self.assertEqual((server["state"], server["total_connections"]), ("up", upstream), server)
        self.assertGreater(upstream, 1)
        self.assertEqual(dashboard["process"]["problems"], [])

    async def traffic(self, front: int, until: list[bool], results: list[int], clients: int = 10) -> None:
        async def loop() -> None:
            while not until:
                results.append(await self.get(front))

        await defer.gatherResults([defer.Deferred.fromCoroutine(loop()) for _ in range(clients)])

    @async_test
    async def test_worker_killed_under_traffic(self) -> None:
        """
        Under traffic from 10 clients, SIGKILL to a worker fails at most
        the requests it had in flight; every other request is answered,
        also those that arrive while it is being replaced.
        """
        hello, port = await self.http_backend(delay=0.02)
        child = await self.start(config(port, "http"))
        front = self.port(child, "web")
        done: list[bool] = []
        results: list[int] = []
        running = defer.Deferred.fromCoroutine(self.traffic(front, done, results))
        await wait_for(lambda: len(results) >= 100, 20)
        _, health = await self.admin("/health")
        os.kill(health["workers"][0]["pid"], signal.SIGKILL)
        killed_at = len(results)
        await wait_for(lambda: child.output.count(" serving (pid ") == 3, 30)
        _, health = await self.admin("/health")
        self.pids.append(health["workers"][0]["pid"])
        await wait_for(lambda: len(results) >= killed_at + 200, 30)
        done.append(True)
        await running
        failed = results.count(0)
        self.assertEqual(set(results) - {0}, {200})
        self.assertLessEqual(failed, 10, f"{failed} of {len(results)} failed")
        self.assertEqual(results[:killed_at - 10].count(0), 0)
        _, health = await self.admin("/health")
        self.assertEqual([w["restarts"] for w in health["workers"]], [1, 0])
        self.assertGreater(health["workers"][0]["connections"], 0)  # the new worker 0 serves

    @async_test
    async def test_reload_under_traffic_loses_nothing(self) -> None:
        """
        SIGHUP under traffic: an invalid file changes nothing anywhere; a
        valid one adds a frontend in every worker and no request fails.
        """
        hello, port = await self.http_backend()
        data = config(port, "http")
        child = await self.start(data)
        front = self.port(child, "web")
        done: list[bool] = []
        results: list[int] = []
        running = defer.Deferred.fromCoroutine(self.traffic(front, done, results))
        await wait_for(lambda: len(results) >= 50, 20)
        self.write_config({"frontends": [{"name": "web", "listen": "nowhere", "backend": "web"}]})
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line("reload rejected; keeping the running configuration")
        data["frontends"].append({"name": "extra", "listen": "127.0.0.1:0", "backend": "web", "protocol": "http"})
        data["backends"][0]["health_check"]["interval"] = "300ms"
        self.write_config(data)
        for _ in range(3):
            os.kill(self.process.pid, signal.SIGHUP)
            before = child.output.count("configuration reloaded in the master and 2 worker(s)")
            await wait_for(lambda before=before: child.output.count(
                "configuration reloaded in the master and 2 worker(s)") > before, 20)
        count = len(results)
        await wait_for(lambda: len(results) >= count + 50, 20)
        done.append(True)
        await running
        self.assertEqual(set(results), {200}, f"{results.count(0)} of {len(results)} failed")
        extra = self.port(child, "extra")
        self.assertEqual(await defer.gatherResults([defer.Deferred.fromCoroutine(self.get(extra))
                                                    for _ in range(20)]), [200] * 20)
        _, health = await self.admin("/health")
        self.assertEqual(sorted(f["name"] for f in health["frontends"]), ["extra", "web"])
        self.assertTrue(all(f["workers"] == 2 for f in health["frontends"]))
        # removed again: every process lets go of its socket
        data["frontends"].pop()
        self.write_config(data)
        before = child.output.count("configuration reloaded in the master and 2 worker(s)")
        os.kill(self.process.pid, signal.SIGHUP)
        await wait_for(lambda: child.output.count("configuration reloaded in the master and 2 worker(s)") > before, 20)
        await self.refused(extra)
        self.assertEqual(await self.get(front), 200)

    @async_test
    async def test_sigterm_under_traffic_drains_every_worker(self) -> None:
        """
        SIGTERM with 20 slow requests in flight over both workers: every
        one is answered, new connections are refused, the master exits 0.
        """
        hello, port = await self.http_backend(delay=1.0)
        child = await self.start(config(port, "http"))
        front = self.port(child, "web")
        pending = [defer.Deferred.fromCoroutine(self.get(front)) for _ in range(20)]
        await wait_for(lambda: hello.requests == 20, 10)
        _, health = await self.admin("/health")
        self.assertTrue(all(w["active_connections"] > 0 for w in health["workers"]), health["workers"])
        self.process.signalProcess("TERM")
        await child.line("rproxy stopping: draining 2 worker")
        await wait_for(lambda: child.output.count("rproxy stopping: no new connections") >= 2, 10)
        with self.assertRaises(error.ConnectionRefusedError):
            await connect(front)
        self.assertEqual(await defer.gatherResults(pending), [200] * 20)
        await wait_for(lambda: child.ended, 20)
        self.assertEqual(child.exit_code, 0)
        self.assertNotIn("Traceback", child.output)
        self.assertEqual(child.output.count("rproxy stopped"), 3)
