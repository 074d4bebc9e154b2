"""
rproxyctl's operator commands against a running service on the real
reactor: server drain/weight, reload (validated first, the result as the
process reports it), monitor (once and --watch), check-config on an agent
file, --version.  The commands block (urllib), so they run in a thread
while the reactor serves.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import yaml
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy import cli
from tests.support import ServiceMixin, async_test

KEY = "ctl-key"


def run(argv: list[str], **kw: Any) -> tuple[int, str, str]:
    """
    rproxyctl's main (or C{kw["call"]}) with its output captured: (code, out, err).
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = kw.get("call", cli.main)(argv)
        except SystemExit as e:
            code = e.code  # type: ignore[assignment]
    return code, out.getvalue(), err.getvalue()


class CommandTests(ServiceMixin, TestCase):
    async def start(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.data = {
            "admin": {"listen": "tcp:0:interface=127.0.0.1", "api_key": KEY},
            "backends": [{"name": "web", "health_check": {"type": "none"},
                          "servers": [{"address": "127.0.0.1:9", "name": "a"},
                                      {"address": "127.0.0.1:10", "name": "b"}]}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        }
        self.write(self.data)
        self.service = await self.start_service(self.data, config_path=self.path)
        port = self.service.admin_port.getHost().port  # type: ignore[union-attr]
        self.admin = f"http://127.0.0.1:{port}"

    def write(self, data: dict[str, Any]) -> None:
        with open(self.path, "w") as f:
            yaml.safe_dump(data, f)

    async def ctl(self, *argv: str) -> tuple[int, str, str]:
        return await deferToThread(run, list(argv))

    @async_test
    async def test_server_drain_weight_ready(self) -> None:
        """server drain|weight|ready change the running pool and print the server's new state."""
        await self.start()
        common = ["--admin", self.admin, "--key", KEY]
        self.assertEqual(await self.ctl("server", "drain", "web/a", *common),
                         (0, "web/a: draining, weight 1, 0 open\n", ""))
        a = self.service.pools["web"].server("a")
        assert a is not None
        self.assertEqual(a.admin_state, "drain")
        self.assertEqual((await self.ctl("server", "weight", "web/a", "7", *common))[0], 0)
        self.assertEqual((await self.ctl("server", "ready", "web/a", *common))[1], "web/a: up, weight 7, 0 open\n")
        self.assertEqual(await self.ctl("server", "maint", "web/zz", *common),
                         (1, "", "rproxyctl: web/zz: backend 'web' has no server 'zz'\n"))
        self.assertEqual(await self.ctl("server", "drain", "web/a", "--admin", self.admin, "--key", "bad"),
                         (1, "", "rproxyctl: web/a: missing or invalid bearer token\n"))
        self.assertEqual((await self.ctl("server", "drain", "web-a", *common))[0], 2)
        # the key from the configuration file when none is given
        self.assertEqual((await self.ctl("server", "drain", "web/b", "--admin", self.admin, "-c", self.path))[0], 0)

    @async_test
    async def test_reload_validates_then_reports(self) -> None:
        """An invalid file is refused before rproxy is asked; a valid one is applied and reported as such."""
        await self.start()
        bad = dict(self.data, backends=[{"name": "web", "servers": ["nowhere"]}])
        self.write(bad)
        code, out, err = await self.ctl("reload", "-c", self.path, "--admin", self.admin)
        self.assertEqual(code, 1)
        self.assertIn("backends[0].servers[0]", err)
        self.assertTrue(err.endswith("invalid; the running rproxy was not asked to reload\n"), err)
        self.assertIsNone(self.service.last_reload)
        good = dict(self.data, backends=[dict(self.data["backends"][0], algorithm="least-connections")])
        self.write(good)
        code, out, err = await self.ctl("reload", "-c", self.path, "--admin", self.admin)
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out.splitlines()[1], r"^reload #1 at \S+ \S+: applied \(.*\)$")
        self.assertEqual(self.service.pools["web"].config.algorithm, "least-connections")

    @async_test
    async def test_monitor_once_and_watch(self) -> None:
        """monitor prints agents, servers and frontends; --watch redraws until told to stop."""
        await self.start()
        # the admin port as a file names it (the service's own says port 0)
        self.path = os.path.abspath(self.mktemp())
        self.write({"admin": {"listen": self.admin.replace("http://127.0.0.1:", "tcp:") + ":interface=127.0.0.1",
                              "api_key": KEY}})
        code, out, err = await self.ctl("monitor", "-c", self.path)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("Tunnel     Agent ID"))
        self.assertIn("web          a                    up                1       0         0       0  -", lines)
        self.assertTrue(any(line.startswith("web          http") for line in lines), lines)
        sleeps: list[float] = []
        screen = io.StringIO()

        def watch() -> int:
            args = cli.main.__globals__["argparse"].Namespace(
                config=self.path, admin=None, key=None, watch=0.5)
            return cli.monitor(args, sleep=sleeps.append, out=screen, rounds=3)

        self.assertEqual(await deferToThread(watch), 0)
        self.assertEqual((screen.getvalue().count("\x1b[H\x1b[2J"), sleeps), (3, [0.5, 0.5]))

    @async_test
    async def test_monitor_unreachable(self) -> None:
        """monitor says which address it could not read and exits 1."""
        code, out, err = await self.ctl("monitor", "--admin", "http://127.0.0.1:9")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("rproxyctl: cannot read http://127.0.0.1:9/api/v1/dashboard:"), err)


class OfflineTests(SynchronousTestCase):
    def test_version(self) -> None:
        """--version prints rproxy's version."""
        import rproxy

        self.assertEqual(run(["--version"]), (0, f"rproxyctl (rproxy) {rproxy.__version__}\n", ""))

    def test_check_config_recognises_an_agent_file(self) -> None:
        """check-config validates an agent's file as one, and names the key path of a problem."""
        path = self.mktemp()
        with open(path, "w") as f:
            yaml.safe_dump({"server": {"control": "127.0.0.1:17000", "proxy": "127.0.0.1:17001"},
                            "api_key": "k", "agent_id": "gpu-01", "models": ["llama3"],
                            "services": [{"name": "web", "local": "127.0.0.1:8000"}]}, f)
        self.assertEqual(run(["check-config", path]),
                         (0, f"{path}: ok (agent gpu-01 for 127.0.0.1:17000, 1 service: web; models: llama3)\n", ""))
        with open(path, "w") as f:
            yaml.safe_dump({"server": {"control": "127.0.0.1:99999"}, "api_key": "k",
                            "services": [{"name": "web", "local": "127.0.0.1:8000"}]}, f)
        code, out, err = run(["check-config", path])
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("server.control:"), err)
        self.assertTrue(err.endswith("invalid agent configuration (1 problem)\n"), err)

    def test_check_config_deep_nesting(self) -> None:
        """
        check-config refuses a 30,000-deep document in one line, as a
        reload does, for rproxy's file and an agent's look alike: telling
        them apart read it without the limits (a RecursionError traceback).
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[" * 30000 + "]" * 30000)
        code, out, err = run(["check-config", path])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.splitlines(), [f"{path}: invalid YAML at line 1, column 65: nested more than 64 deep",
                                            f"{path}: invalid (1 problem)"])

    def test_monitor_lines(self) -> None:
        """The monitor's text keeps the agent table's columns and adds servers with their last check."""
        snapshot = {
            "tunnels": [{"name": "gpu", "agents": [{"id": "a1", "cpu": 12.5, "memory": 40.0, "disk": None,
                                                    "active_streams": 2, "last_heartbeat_ago": 3.2}]}],
            "backends": [{"name": "web", "servers": [
                {"name": "s1", "state": "down", "weight": 2, "active_connections": 0, "total_connections": 9,
                 "connect_failures": 1, "last_check": {"ok": False, "reason": "tcp check timed out", "ago": 1}}]}],
            "frontends": [], "reload": None,
        }
        lines = monitor_text = cli.monitor_lines(snapshot)
        self.assertEqual(lines[2], "gpu        a1                        12.50       40.00         -        2  3s ago")
        self.assertEqual(monitor_text[-1],
                         "web          s1                   down              2       0         9       1  "
                         "failed: tcp check timed out")
