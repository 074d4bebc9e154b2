"""
The master's dashboard: the machine's figures, not the master's own.

The master serves no frontend; its workers do.  Once per interval (not
per viewer) L{MachineConsole} asks every worker for its dashboard sample
over the control channel (C{op: console}: frontend counters, its pools'
connection counts, its token pools' shares, its readiness problems), sums
the frontends' counters into one row per frontend and takes the sample
from them as a single process does (L{rproxy.console.Console.take}).  The
snapshot then shows server state from the master's pools (its health
checks, the ejections workers reported) with the workers' counts summed,
token pools summed over the workers' shares, tunnels from the master (or,
when the workers run them with a cluster, their agents merged and their
streams summed over the workers) and the last reload from the master.  As in a single process, the JSON is built at most once
per sample and served as the same bytes to every viewer.  Its counters
(connections, answers, durations, connect errors, streams) never go back
when a worker is restarted or is slow to answer: each slot's carried
counters are added (L{rproxy.workers.master.MasterService.carried_totals}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from rproxy.console import Console
from rproxy.workers.merge import (
    add_totals,
    merge_counters,
    merge_pools,
    merge_token_rows,
    merge_tunnel_rows,
)

if TYPE_CHECKING:
    from rproxy.workers.master import MasterService

__all__ = ["MachineConsole"]


class MachineConsole(Console):
    """
    L{Console} over every worker of a master; see the module docstring.

    @ivar reports: the last sample of every worker that answered.
    @ivar missing: a problem line per worker that did not.
    """

    def __init__(self, master: MasterService, clock: Any, interval: float = 1.0) -> None:
        super().__init__(master.inner, clock, interval)
        self.master = master
        self.reports: list[dict[str, Any]] = []
        self.missing: list[str] = []
        self.carried: dict[tuple[Any, ...], float] = {}

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.collect)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(self._died)

    def collect(self) -> defer.Deferred[None]:
        """
        Ask every worker for its sample, then take the machine's; a
        LoopingCall waits for it before the next (a slow worker delays the
        sampling, never piles requests up).  Never fails.
        """
        d = defer.Deferred.fromCoroutine(self._collect())
        d.addErrback(lambda f: self.log.failure("dashboard: a sample failed; the next one will try again", f))
        return d

    async def _collect(self) -> None:
        answers = await self.master.reports(timeout=max(self.interval, 1.0), op="console")
        reports, missing = [], []
        for slot, answer in zip(self.master.slots, answers, strict=True):
            if answer is None:
                missing.append(f"worker {slot.slot}: not running" if slot.process is None
                               else f"worker {slot.slot}: not ready")
            else:
                reports.append(answer)
        self.reports, self.missing = reports, missing
        self.carried = self.master.carried_totals("console", answers)
        self.sample()

    def sample(self) -> None:
        """
        One sample from the workers' last answers (without a running loop,
        as in a test's resource tree, from what L{collect} got last).
        """
        rows = merge_counters([r["frontends"] for r in self.reports])
        add_totals({"console": {"frontends": rows}}, self.carried)
        self.take(rows)

    def problems(self) -> list[str]:
        problems = self.missing + self.service.readiness_problems()
        for report in self.reports:
            for problem in report.get("ready", []):
                if problem not in problems:
                    problems.append(problem)
        return problems

    def backends(self) -> list[dict[str, Any]]:
        pools = merge_pools(super().backends(), [r["backends"] for r in self.reports], servers="servers", key="name")
        add_totals({"console": {"backends": pools}}, self.carried)
        return pools

    def token_pools(self) -> list[dict[str, Any]]:
        return merge_token_rows([r["token_pools"] for r in self.reports])

    def tunnels(self) -> list[dict[str, Any]]:
        if not self.master.tunnels_in_workers:
            return super().tunnels()
        rows = merge_tunnel_rows(self.reports)
        add_totals({"console": {"tunnels": rows}}, self.carried)
        return rows
