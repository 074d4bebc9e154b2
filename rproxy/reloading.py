"""
Reloading a configuration: one runner for every way rproxy runs.

A reload reads and validates the file off the reactor, applies the new
configuration, and records the outcome (when, result, errors) for the
admin port (C{/api/v1/reload}, the dashboard, C{rproxyctl reload}) and the
C{rproxy_reloads} metric.  What "apply" means is the runner's caller's: a
single process applies the diff to its own objects
(L{rproxy.service.RProxyService}); a master binds new sockets, applies its
own part and then every worker's (L{rproxy.workers.master.MasterService}).
Everything else (the lock that runs reloads one at a time, in the order
asked; refusing an invalid file; ignoring a reload while stopping; the
record) is here, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config import Config, ConfigError

__all__ = ["ReloadRunner", "Outcome", "RESULTS"]

# what a reload came to: applied; applied but for some listeners or
# workers; not applied (nothing changed); the file was refused
RESULTS = ("ok", "partial", "failed", "invalid")

# (result, errors): "ok" with no errors, "partial" or "failed" with lines
Outcome = tuple[str, list[str]]

# errors kept per reload record (a file can hold thousands of mistakes)
MAX_ERRORS = 50


class ReloadRunner:
    """
    Runs reloads one at a time; see the module docstring.

    @ivar last: the last reload's record (C{at}, C{result}, C{errors},
        C{count}, C{path}), None before the first.
    @ivar apply: applies a validated configuration; its L{Outcome}.
    @ivar stopping: whether the process is stopping (reloads are ignored).
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        load: Callable[[str], defer.Deferred[Config]],
        apply: Callable[[Config], Awaitable[Outcome]],
        stopping: Callable[[], bool],
        count: Callable[[str], None],
        config_path: str | None = None,
        log: Logger | None = None,
    ) -> None:
        """
        @param load: reads and validates a file off the reactor.
        @param count: counts a reload by result (the C{rproxy_reloads} metric).
        @param log: where its lines go (the owner's logger, so that they
            carry its namespace as before).
        """
        self.clock = clock
        self.load = load
        self.apply = apply
        self.stopping = stopping
        self.count = count
        self.config_path = config_path
        if log is not None:
            self.log = log
        self.last: dict[str, Any] | None = None
        self._lock = defer.DeferredLock()

    def from_file(self) -> defer.Deferred[None]:
        """
        Re-read the configuration file (SIGHUP, C{POST /api/v1/reload});
        an invalid file is logged and recorded and the running
        configuration stays.
        """
        if self.config_path is None:
            return defer.succeed(None)
        return self._lock.run(lambda: defer.Deferred.fromCoroutine(self._from_file()))

    async def _from_file(self) -> None:
        assert self.config_path is not None
        if self.stopping():
            self.log.warn("reload ignored: rproxy is stopping")
            return
        try:
            new = await self.load(self.config_path)
        except ConfigError as e:
            self._refused(list(e.lines()))
            for line in e.lines():
                self.log.error("reload rejected: {error}", error=line)
            self.log.error("reload rejected; keeping the running configuration")
            return
        except Exception:  # noqa: BLE001 - a bug in validation must not stop later reloads
            self._refused(["the file could not be validated"])
            self.log.failure("reload rejected: the file could not be validated; keeping the running configuration")
            return
        if self.stopping():
            self.log.warn("reload ignored: rproxy is stopping")
            return
        try:
            await self.run(new)
        except Exception:  # noqa: BLE001 - logged and recorded; the next reload may mend it
            self.log.failure("rproxy: reload failed")

    def _refused(self, errors: list[str]) -> None:
        self.count("invalid")
        self.record("invalid", errors)

    def run(self, new: Config) -> defer.Deferred[None]:
        """
        Apply C{new} (already validated) and record how it went; fails as
        the apply did.
        """
        d = defer.Deferred.fromCoroutine(_awaited(self.apply(new)))

        def done(result: Outcome | Failure) -> Any:
            if isinstance(result, Failure):
                self.count("failed")
                self.record("failed", [result.getErrorMessage()])
                return result
            outcome, errors = result
            self.count(outcome)
            self.record(outcome, errors)
            return None

        return d.addBoth(done)

    def record(self, result: str, errors: list[str]) -> None:
        """
        Keep the outcome for the admin port.
        """
        count = 1 if self.last is None else self.last["count"] + 1
        self.last = {"at": self.clock.seconds(), "result": result, "errors": errors[:MAX_ERRORS], "count": count,
                     "path": self.config_path}


async def _awaited(result: Awaitable[Outcome]) -> Outcome:
    return await result
