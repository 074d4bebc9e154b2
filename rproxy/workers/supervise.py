"""
Restart backoff for worker processes (pure; the master owns the clock).

A worker that dies is started again after a delay that doubles with each
death in a row (0.5 s, 1 s, 2 s ... up to 30 s), so a worker that cannot
start (a bug, a missing module) does not spin the machine; one that had
run for C{stable} seconds before dying starts the count afresh, so a rare
crash costs half a second of that worker's share of the sockets (their
queued connections wait in the master-held backlog, not lost).
"""

from __future__ import annotations

import attrs

__all__ = ["RestartBackoff"]


@attrs.define
class RestartBackoff:
    initial: float = 0.5
    maximum: float = 30.0
    stable: float = 10.0
    deaths: int = 0

    def died(self, lived: float) -> float:
        """
        A worker died after C{lived} seconds: the delay before its next start.
        """
        if lived >= self.stable:
            self.deaths = 0
        delay = min(self.maximum, self.initial * float(2 ** min(self.deaths, 32)))
        self.deaths += 1
        return delay
