"""
A new user's first run: C{bin/rproxy --config etc/...} from any directory,
the C{rproxy} and C{rproxy-agent} commands of an install, and an install
(plain or editable) that twistd understands, without setuptools warnings.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

import yaml
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.scripts import checkout_config
from tests.support import async_test, reactor, wait_for
from tests.test_twistd import Child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckoutConfigTests(SynchronousTestCase):
    """
    A relative configuration path missing from the current directory is
    read from the checkout; anything else is passed on as given.
    """

    def resolve(self, args: list[str]) -> list[str]:
        present = {"/co/etc/rproxy.yaml", "/co/etc/other.yaml", "here.yaml", "etc/local.yaml"}
        return checkout_config(args, "/co", "etc/rproxy.yaml", present.__contains__)

    def test_spellings(self) -> None:
        """
        C{--config F}, C{--config=F}, C{-c F} and C{-cF} are all resolved.
        """
        self.assertEqual(self.resolve(["--config", "etc/other.yaml"]), ["--config", "/co/etc/other.yaml"])
        self.assertEqual(self.resolve(["--config=etc/other.yaml"]), ["--config=/co/etc/other.yaml"])
        self.assertEqual(self.resolve(["-c", "etc/other.yaml"]), ["-c", "/co/etc/other.yaml"])
        self.assertEqual(self.resolve(["-cetc/other.yaml"]), ["-c/co/etc/other.yaml"])

    def test_current_directory_first(self) -> None:
        """
        A file found in the current directory, an absolute path, or a file
        found nowhere is left as it is (the error then names what was given).
        """
        for args in (["--config", "here.yaml"], ["--config", "/abs/x.yaml"], ["--config", "missing.yaml"],
                     ["--config", "etc/local.yaml"]):
            self.assertEqual(self.resolve(args), args)

    def test_default(self) -> None:
        """
        Without C{--config} the default file is read from the checkout.
        """
        self.assertEqual(self.resolve([]), ["--config", "/co/etc/rproxy.yaml"])
        self.assertEqual(self.resolve(["--help"]), ["--config", "/co/etc/rproxy.yaml", "--help"])


class CommandTests(TestCase):
    timeout = 120

    def outside(self) -> str:
        """
        A working directory outside the checkout.
        """
        path = tempfile.mkdtemp(prefix="rproxy-cwd-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def config_in_checkout(self) -> str:
        """
        A configuration file inside the checkout (trial's temporary
        directory), listening on port 0 only; its path relative to the checkout.
        """
        path = os.path.abspath(self.mktemp()) + ".yaml"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump({"admin": {"listen": "tcp:0:interface=127.0.0.1"}}, f)
        relative = os.path.relpath(path, ROOT)
        if relative.startswith(".."):
            raise AssertionError(f"trial's temporary directory {path} is outside the checkout {ROOT}")
        return relative

    def spawn(self, args: list[str], cwd: str) -> tuple[Child, Any]:
        child = Child()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        process = reactor.spawnProcess(child, args[0], args, env=env, path=cwd)

        async def stop() -> None:
            if not child.ended:
                process.signalProcess("KILL")
                await wait_for(lambda: child.ended)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return child, process

    async def runs_and_stops(self, args: list[str]) -> Child:
        child, process = self.spawn(args, self.outside())
        # the start-up line comes once the signal handlers are in place (a
        # SIGTERM before them ends twistd with its own status, not 0)
        await child.line(r"\(pid \d+\) running .*admin 127\.0\.0\.1:\d+", timeout=90)
        process.signalProcess(signal.SIGTERM)
        await wait_for(lambda: child.ended, timeout=30)
        self.assertEqual(child.exit_code, 0, child.output)
        return child

    @async_test
    async def test_bin_rproxy_from_another_directory(self) -> None:
        """
        C{bin/rproxy --config PATH} with PATH relative to the checkout works
        from a directory outside it.
        """
        await self.runs_and_stops([os.path.join(ROOT, "bin", "rproxy"), "--config", self.config_in_checkout()])

    @async_test
    async def test_rproxy_command(self) -> None:
        """
        The install's C{rproxy} command runs the proxy in the foreground
        (twistd -n, no pid file left behind).
        """
        config = os.path.join(ROOT, self.config_in_checkout())
        child = await self.runs_and_stops([os.path.join(os.path.dirname(sys.executable), "rproxy"), "-c", config])
        self.assertIn("twistd", child.output)

    @async_test
    async def test_rproxy_agent_command(self) -> None:
        """
        The install has an C{rproxy-agent} command; it passes its arguments
        to the agent's options.
        """
        command = os.path.join(os.path.dirname(sys.executable), "rproxy-agent")
        out, err, code = await getProcessOutputAndValue(command, ["--help"], env=dict(os.environ), path=self.outside())
        self.assertEqual(code, 0, err)
        self.assertIn(b"rproxy-agent [-c CONFIG]", out)
        self.assertIn(b"The agent's YAML configuration file.", out)


class InstallTests(TestCase):
    """
    Installs of the checkout into a scratch virtualenv (no dependencies:
    what is checked is rproxy's own packaging).
    """

    timeout = 300

    async def install(self, *args: str) -> tuple[str, str]:
        scratch = tempfile.mkdtemp(prefix="rproxy-venv-")
        self.addCleanup(shutil.rmtree, scratch, True)
        out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "venv", "--without-pip", scratch])
        self.assertEqual(code, 0, err)
        build = os.path.join(ROOT, "build")  # setuptools builds in the tree
        if not os.path.exists(build):
            self.addCleanup(shutil.rmtree, build, True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "--python", os.path.join(scratch, "bin", "python"), "install", "-v", "--no-deps", *args],
            env=env, path=ROOT)
        self.assertEqual(code, 0, err)
        return scratch, (out + err).decode("utf-8", "replace")

    @staticmethod
    def site_packages(scratch: str) -> str:
        return glob.glob(os.path.join(scratch, "lib", "python3*", "site-packages"))[0]

    def assertNoSetuptoolsWarnings(self, output: str) -> None:
        warned = [line for line in output.splitlines() if "BuildBackendWarning" in line or "SetuptoolsWarning" in line
                  or "SetuptoolsDeprecationWarning" in line]
        self.assertEqual(warned, [])

    @async_test
    async def test_plain_install(self) -> None:
        """
        C{pip install .} gives the three commands, the twistd plugin and the
        SQL migrations, and no setuptools warning.
        """
        scratch, output = await self.install(".")
        self.assertNoSetuptoolsWarnings(output)
        for command in ("rproxy", "rproxy-agent", "rproxyctl"):
            self.assertTrue(os.path.exists(os.path.join(scratch, "bin", command)), command)
        site = self.site_packages(scratch)
        self.assertTrue(os.path.exists(os.path.join(site, "twisted", "plugins", "rproxy_plugins.py")))
        self.assertTrue(glob.glob(os.path.join(site, "rproxy", "store", "migrations", "001_*.sql")))

    @async_test
    async def test_editable_install_puts_the_checkout_on_sys_path(self) -> None:
        """
        C{pip install -e .} adds the checkout itself to sys.path (a .pth
        naming it), where twistd's plugin discovery finds
        twisted/plugins/rproxy_plugins.py, not an import hook it cannot see.
        """
        scratch, output = await self.install("-e", ".")
        self.assertNoSetuptoolsWarnings(output)
        [pth] = glob.glob(os.path.join(self.site_packages(scratch), "__editable__*rproxy*.pth"))
        with open(pth) as f:
            self.assertEqual(f.read().strip(), ROOT)
        self.assertTrue(os.path.exists(os.path.join(scratch, "bin", "rproxy-agent")))
