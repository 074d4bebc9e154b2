"""
rproxy as a user runs it: a C{twistd -n rproxy} child process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from typing import Any

import yaml
from twisted.internet import error, protocol
from twisted.trial.unittest import TestCase

from tests.support import Client, ServiceMixin, async_test, connect, reactor, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = ""
        self.exit_code: int | None = None
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self.exit_code = reason.value.exitCode

    async def line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = re.search(pattern, self.output)
            if match:
                found.append(match)
            return bool(match) or self.ended

        await wait_for(check, timeout, step=0.02)
        if not found:
            raise AssertionError(f"no {pattern!r} in output:\n{self.output}")
        return found[0]


class TwistdTests(ServiceMixin, TestCase):
    timeout = 60

    def write_config(self, data: dict[str, Any]) -> str:
        path = getattr(self, "_config_path", None)
        if path is None:
            path = self._config_path = os.path.abspath(self.mktemp()) + ".yaml"
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    def spawn(self, path: str, twistd_args: tuple[str, ...] = ("-n", "--pidfile=")) -> Child:
        child = Child()
        # the same entry point as the twistd script, from this interpreter
        launcher = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
        args = [sys.executable, "-c", launcher, *twistd_args, "rproxy", "--config", path]
        env = dict(os.environ, PYTHONPATH=ROOT)
        process = reactor.spawnProcess(child, sys.executable, args, env=env, path=ROOT)

        async def stop() -> None:
            if not child.ended:
                process.signalProcess("KILL")
                await wait_for(lambda: child.ended)

        from twisted.internet import defer

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        self.process = process
        return child

    def config(self, backend_port: int, **global_: Any) -> dict[str, Any]:
        return {
            "global": global_ or {"grace_period": "10s"},
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "backends": [{"name": "web", "servers": [f"127.0.0.1:{backend_port}"],
                          "health_check": {"type": "tcp", "interval": "200ms"}}],
            "frontends": [{"name": "web", "listen": "127.0.0.1:0", "backend": "web"}],
        }

    async def start(self, data: dict[str, Any]) -> tuple[Child, int]:
        child = self.spawn(self.write_config(data))
        match = await child.line(r"frontend web listening on 127\.0\.0\.1:(\d+)")
        await child.line(r"\(pid \d+\) running ")  # signal handlers in place
        return child, int(match.group(1))

    @async_test
    async def test_bad_config_exits_without_traceback(self) -> None:
        """An invalid file stops twistd with the key path, exit 1, no traceback."""
        path = self.write_config({
            "backends": [{"name": "web", "servers": ["127.0.0.1:1"]}],
            "frontends": [{"name": "a", "listen": "tcp:8080", "backend": "web"},
                          {"name": "b", "listen": "tcp:70000", "backend": "web"}],
        })
        child = self.spawn(path)
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 1)
        self.assertIn("rproxy: frontends[1].listen: port 70000 out of range", child.output)
        self.assertNotIn("Traceback", child.output)

    def busy_config(self) -> tuple[str, int]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.addCleanup(sock.close)
        busy = sock.getsockname()[1]
        return self.write_config({
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "backends": [{"name": "web", "servers": ["127.0.0.1:1"]}],
            "frontends": [{"name": "web", "listen": f"127.0.0.1:{busy}", "backend": "web"}],
        }), busy

    @async_test
    async def test_bind_failure_exits_1(self) -> None:
        """twistd -n with a frontend port in use exits 1 with one line naming it, no traceback."""
        path, busy = self.busy_config()
        child = self.spawn(path)
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 1)
        line = f"frontend web: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use; not starting"
        self.assertEqual(child.output.count(line), 1)
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn("admin listening", child.output)

    @async_test
    async def test_bind_failure_daemon_exits_1(self) -> None:
        """In daemon mode the parent exits 1 with the reason; the log holds one line, no traceback, no pid file."""
        path, busy = self.busy_config()
        directory = os.path.dirname(path)
        pidfile, logfile = os.path.join(directory, "twistd.pid"), os.path.join(directory, "twistd.log")
        child = self.spawn(path, ("--pidfile", pidfile, "--logfile", logfile))
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 1)
        line = f"frontend web: cannot listen on tcp:{busy}:interface=127.0.0.1: Address already in use; not starting"
        self.assertIn(line, child.output)
        await wait_for(lambda: os.path.exists(logfile) and line in open(logfile).read(), 10)
        await wait_for(lambda: not os.path.exists(pidfile), 10)
        with open(logfile) as f:
            log = f.read()
        self.assertEqual(log.count(line), 1)
        self.assertNotIn("Traceback", log)

    @async_test
    async def test_sigterm_drains(self) -> None:
        """
        SIGTERM stops accepting at once, lets an open connection finish,
        and exits 0 as soon as it has.
        """
        _, port = await self.backend("a")
        child, front = await self.start(self.config(port.getHost().port))
        client = await connect(front)
        self.client_cleanup(client)
        await client.read_until(b"a\n")
        self.process.signalProcess("TERM")
        await child.line("rproxy stopping")
        with self.assertRaises(error.ConnectionRefusedError):
            await connect(front)
        client.transport.write(b"still served\n")
        self.assertEqual(await client.read_until(b"\n"), b"still served\n")
        self.assertFalse(child.ended)
        client.transport.loseConnection()
        await wait_for(lambda: child.ended, 10)
        self.assertEqual(child.exit_code, 0)
        self.assertNotIn("Traceback", child.output)

    @async_test
    async def test_sigterm_grace_period_ends(self) -> None:
        """Connections still open after grace_period are closed; exit 0."""
        _, port = await self.backend("a")
        child, front = await self.start(self.config(port.getHost().port, grace_period="300ms"))
        client = await connect(front)
        await client.read_until(b"a\n")
        self.process.signalProcess("TERM")
        await client.closed
        await wait_for(lambda: child.ended, 10)
        self.assertEqual(child.exit_code, 0)
        self.assertIn("grace period over, closing 1 connections", child.output)

    @async_test
    async def test_sighup_reload(self) -> None:
        """
        SIGHUP with an invalid file logs the problem and keeps running the
        old configuration; with a valid one, a new frontend starts.
        """
        _, port = await self.backend("a")
        data = self.config(port.getHost().port)
        child, front = await self.start(data)
        self.write_config({"frontends": [{"name": "web", "listen": "nowhere", "backend": "web"}]})
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line("reload rejected; keeping the running configuration")
        self.assertIn("frontends[0].listen: unknown endpoint type 'nowhere'", child.output)
        client = await connect(front)
        self.client_cleanup(client)
        await client.read_until(b"a\n")
        data["frontends"].append({"name": "extra", "listen": "127.0.0.1:0", "backend": "web"})
        self.write_config(data)
        os.kill(self.process.pid, signal.SIGHUP)
        match = await child.line(r"frontend extra listening on 127\.0\.0\.1:(\d+)")
        other = await connect(int(match.group(1)))
        self.client_cleanup(other)
        await other.read_until(b"a\n")
        client.transport.write(b"old connection untouched\n")
        await client.read_until(b"untouched\n")

    @async_test
    async def test_sighup_serves_renewed_certificate(self) -> None:
        """
        A certificate renewed over its files, then SIGHUP (certbot renew's
        deploy hook): openssl s_client is shown the new one.
        """
        from tests.test_reload_tls import OPENSSL, write_pair

        _, port = await self.backend("a")
        base = os.path.abspath(self.mktemp())
        cert, key = base + "-cert.pem", base + "-key.pem"
        write_pair(cert, key, "localhost")
        data = self.config(port.getHost().port)
        data["frontends"][0]["tls"] = {"cert": cert, "key": key}
        child, front = await self.start(data)

        async def subject() -> str:
            from twisted.internet.utils import getProcessOutputAndValue

            out, _, _ = await getProcessOutputAndValue(
                OPENSSL, ["s_client", "-connect", f"127.0.0.1:{front}", "-servername", "localhost"],
                env={}, reactor=reactor, stdinBytes=b"")
            match = re.search(r"subject=.*?CN ?= ?(\S+)", out.decode())
            return match.group(1) if match else out.decode()[-300:]

        self.assertEqual(await subject(), "localhost")
        write_pair(cert, key, "rotated")
        os.kill(self.process.pid, signal.SIGHUP)
        await child.line("configuration reloaded")
        self.assertEqual(await subject(), "rotated")

    @async_test
    async def test_sigusr1_reopens_access_log(self) -> None:
        """
        After logrotate renames the access log, SIGUSR1 makes rproxy write
        the next lines to a new file at the same path; the renamed file
        keeps the lines before.
        """
        from twisted.web import resource, server, static

        root = resource.Resource()
        root.putChild(b"", static.Data(b"hello", "text/plain"))
        site = server.Site(root)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        data = self.config(port.getHost().port)
        data["backends"][0]["health_check"] = {"type": "none"}
        data["frontends"][0]["protocol"] = "http"
        path = os.path.abspath(self.mktemp()) + ".log"
        data["frontends"][0]["http"] = {"access_log": {"format": "json", "path": path}}
        child, front = await self.start(data)

        async def get(target: str) -> None:
            client = await connect(front, Client())
            client.transport.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await client.closed
            self.assertTrue(client.data.startswith(b"HTTP/1.1 200 "), client.data[:40])

        def lines(name: str) -> list[str]:
            with open(name) as f:
                return [json.loads(line)["target"] for line in f]

        await get("/?one")
        await wait_for(lambda: os.path.exists(path) and lines(path) == ["/?one"], 10)
        os.rename(path, path + ".1")
        os.kill(self.process.pid, signal.SIGUSR1)
        await child.line("access logs reopened")
        await get("/?two")
        await wait_for(lambda: os.path.exists(path) and lines(path) == ["/?two"], 10)
        self.assertEqual(lines(path + ".1"), ["/?one"])


class FreezeTests(TestCase):
    def test_startup_heap_frozen(self) -> None:
        """
        freeze_startup_heap (run by the plugin when the reactor starts)
        moves what exists into the collector's permanent generation: a
        later full collection no longer walks it.
        """
        import gc

        from rproxy.tap import freeze_startup_heap

        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        self.assertEqual(gc.get_freeze_count(), 0)
        freeze_startup_heap()
        self.assertGreater(gc.get_freeze_count(), 1000)
