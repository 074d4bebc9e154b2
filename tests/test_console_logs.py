"""
rproxy's own log as twistd writes it: one start-up line (version, file,
what listens where) and none of Twisted's lines that repeat it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from twisted.logger import LogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

import rproxy
from rproxy.tap import is_noise, quiet_twisted_noise, startup_line
from tests.support import ServiceMixin, async_test, reactor, wait_for
from tests.test_twistd import ROOT, Child


def legacy_event(text: str) -> dict[str, Any]:
    """An event as twisted.python.log.msg(text) publishes it."""
    return {"message": (text,), "isError": 0, "system": "-", "log_format": "{log_text}", "log_text": text}


class NoiseTests(SynchronousTestCase):
    def test_noise(self) -> None:
        """Port start and close lines and factory start/stop lines are noise."""
        for text in ("HTTPFrontend starting on 28080", "_Factory starting on 27000", "(TCP Port 28080 Closed)"):
            self.assertTrue(is_noise(legacy_event(text)), text)
        self.assertTrue(is_noise({"log_format": "Starting factory {factory!r}", "factory": object()}))
        self.assertTrue(is_noise({"log_format": "Stopping factory {factory!r}", "factory": object()}))

    def test_not_noise(self) -> None:
        """rproxy's lines and other Twisted lines stay."""
        for event in (legacy_event("Main loop terminated."), legacy_event("frontend web starting on port 80 now"),
                      {"log_format": "frontend {frontend} listening on {address}", "frontend": "web",
                       "address": "127.0.0.1:1"}):
            self.assertFalse(is_noise(event), event)

    def test_filter_wraps_the_observers_twistd_begins_with(self) -> None:
        """The observers twistd begins logging to see rproxy's events, not the noise; once only."""

        class Beginner:
            def __init__(self) -> None:
                self.publisher = LogPublisher()

            def beginLoggingTo(self, observers: Any, **kwargs: Any) -> None:
                for observer in observers:
                    self.publisher.addObserver(observer)

        beginner = Beginner()
        original = beginner.beginLoggingTo
        quiet_twisted_noise(beginner)
        seen: list[str] = []
        beginner.beginLoggingTo([lambda e: seen.append(formatEvent(e))], redirectStandardIO=False)
        self.assertEqual(beginner.beginLoggingTo, original)
        beginner.publisher(legacy_event("HTTPFrontend starting on 8080"))
        beginner.publisher({"log_format": "admin listening on {address}", "address": "127.0.0.1:1"})
        beginner.publisher(legacy_event("(TCP Port 8080 Closed)"))
        self.assertEqual(seen, ["admin listening on 127.0.0.1:1"])


class StartupLineTests(ServiceMixin, TestCase):
    @async_test
    async def test_startup_line(self) -> None:
        """The start-up line names the version, the file and each listener's bound address."""
        service = await self.start_service({
            "backends": [{"name": "web", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                           "backend": "web"}],
        }, config_path="etc/x.yaml")
        admin = service.admin_port.getHost().port  # type: ignore[union-attr]
        self.assertEqual(startup_line(service),
                         f"rproxy {rproxy.__version__} (pid {os.getpid()}) running {os.path.abspath('etc/x.yaml')}: "
                         f"frontend web (http) 127.0.0.1:{service.port_of('web')}; "
                         f"admin 127.0.0.1:{admin} (dashboard http://127.0.0.1:{admin}/)")


class TwistdLogTests(TestCase):
    timeout = 60

    @async_test
    async def test_twistd_log(self) -> None:
        """Under twistd the start-up line is there and Twisted's repeats of it are not."""
        path = os.path.abspath(self.mktemp()) + ".yaml"
        with open(path, "w") as f:
            yaml.safe_dump({"admin": {"listen": "tcp:0:interface=127.0.0.1"},
                            "backends": [{"name": "web", "servers": ["127.0.0.1:9"],
                                          "health_check": {"type": "none"}}],
                            "frontends": [{"name": "web", "listen": "tcp:0:interface=127.0.0.1",
                                           "backend": "web"}]}, f)
        child = Child()
        launcher = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
        process = reactor.spawnProcess(child, sys.executable,
                                       [sys.executable, "-c", launcher, "-n", "--pidfile=", "rproxy", "--config", path],
                                       env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)

        def kill() -> None:
            if not child.ended:
                process.signalProcess("KILL")

        self.addCleanup(kill)
        await child.line(r"rproxy \S+ \(pid \d+\) running .*: frontend web \(tcp\) 127\.0\.0\.1:\d+; admin ")
        process.signalProcess("TERM")
        await wait_for(lambda: child.ended, 30)
        self.assertEqual(child.exit_code, 0)
        for noise in ("starting on", "Port", "Starting factory", "Stopping factory"):
            self.assertNotIn(noise, child.output)
        self.assertIn("rproxy stopped", child.output)
