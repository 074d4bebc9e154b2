"""
The one reload runner (L{rproxy.reloading.ReloadRunner}): validate off the
reactor, apply, record; the same for a single process and a master.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import Config, ConfigError
from rproxy.reloading import Outcome, ReloadRunner


class Harness:
    """
    A runner whose file loads and applies are Deferreds the test fires.
    """

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.loads: list[defer.Deferred[Config]] = []
        self.applied: list[Config] = []
        self.outcome: Outcome = ("ok", [])
        self.counted: list[str] = []
        self.stopping = False
        self.runner = ReloadRunner(self.clock, self.load, self.apply, lambda: self.stopping,
                                   self.counted.append, "/etc/rproxy.yaml")

    def load(self, path: str) -> defer.Deferred[Config]:
        d: defer.Deferred[Config] = defer.Deferred()
        self.loads.append(d)
        return d

    async def apply(self, new: Config) -> Outcome:
        self.applied.append(new)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class ReloadRunnerTests(SynchronousTestCase):
    def test_applied_and_recorded(self) -> None:
        """A valid file is applied once the load fires; its outcome is recorded and counted."""
        h = Harness()
        h.clock.advance(100)
        done = h.runner.from_file()
        self.assertNoResult(done)
        self.assertEqual(h.applied, [])
        new = Config()
        h.loads[0].callback(new)
        self.successResultOf(done)
        self.assertEqual(h.applied, [new])
        self.assertEqual(h.runner.last, {"at": 100.0, "result": "ok", "errors": [], "count": 1,
                                         "path": "/etc/rproxy.yaml"})
        self.assertEqual(h.counted, ["ok"])

    def test_refused_file_changes_nothing(self) -> None:
        """An invalid file is not applied; the errors (key paths) are recorded."""
        h = Harness()
        done = h.runner.from_file()
        h.loads[0].errback(ConfigError(["backends[0].servers: required"]))
        self.successResultOf(done)
        self.assertEqual(h.applied, [])
        assert h.runner.last is not None
        self.assertEqual((h.runner.last["result"], h.runner.last["errors"]),
                         ("invalid", ["backends[0].servers: required"]))
        self.assertEqual(h.counted, ["invalid"])

    def test_partial_and_failed(self) -> None:
        """What the apply reports is recorded; an apply that raises is recorded as failed."""
        h = Harness()
        h.outcome = ("partial", ["worker 1: did not apply the configuration: timeout"])
        self.successResultOf(h.runner.run(Config()))
        assert h.runner.last is not None
        self.assertEqual((h.runner.last["result"], h.runner.last["count"]), ("partial", 1))
        h.outcome = RuntimeError("boom")  # type: ignore[assignment]
        self.failureResultOf(h.runner.run(Config()), RuntimeError)
        self.assertEqual((h.runner.last["result"], h.runner.last["errors"], h.runner.last["count"]),
                         ("failed", ["boom"], 2))
        self.assertEqual(h.counted, ["partial", "failed"])

    def test_one_at_a_time(self) -> None:
        """A second reload asked during the first loads only after the first is done."""
        h = Harness()
        first, second = h.runner.from_file(), h.runner.from_file()
        self.assertEqual(len(h.loads), 1)
        h.loads[0].callback(Config())
        self.successResultOf(first)
        self.assertEqual(len(h.loads), 2)
        h.loads[1].callback(Config())
        self.successResultOf(second)
        self.assertEqual(h.counted, ["ok", "ok"])

    def test_ignored_while_stopping(self) -> None:
        """A reload asked while stopping, or whose file was read meanwhile, is not applied nor recorded."""
        h = Harness()
        h.stopping = True
        self.successResultOf(h.runner.from_file())
        self.assertEqual(h.loads, [])
        h.stopping = False
        done = h.runner.from_file()
        h.stopping = True
        h.loads[0].callback(Config())
        self.successResultOf(done)
        self.assertEqual((h.applied, h.runner.last), ([], None))

    def test_no_file(self) -> None:
        """Without a file there is nothing to re-read."""
        h = Harness()
        h.runner.config_path = None
        self.successResultOf(h.runner.from_file())
        self.assertEqual((h.loads, h.runner.last), ([], None))
