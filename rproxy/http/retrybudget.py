"""
The retry budget of an HTTP frontend: retries may add at most
L{RETRY_RATIO} percent to the requests of the last L{RETRY_WINDOW} seconds
(and at least L{RETRY_MIN} are always allowed), so that an outage does not
multiply load.  A sliding window (Envoy's retry budget), not one that
restarts: just after a server dies, the requests of the seconds before
still count.
"""

from __future__ import annotations

import collections
from typing import Any

__all__ = ["RetryBudget", "RETRY_WINDOW", "RETRY_RATIO", "RETRY_MIN"]

RETRY_WINDOW = 10.0
RETRY_RATIO = 20
RETRY_MIN = 3


class RetryBudget:
    """
    @ivar spent: retries allowed so far.
    @ivar next_tick: when the window next notes the counts (about once a
        second: the frontend calls L{tick} when a request ends after it).
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.spent = 0
        # (time, requests, spent) about once a second, the last
        # RETRY_WINDOW seconds of them: the window's start counts
        self._ticks: collections.deque[tuple[float, int, int]] = collections.deque()
        self.next_tick = 0.0

    def allows(self, requests: int) -> bool:
        """
        Whether one more retry fits, C{requests} having been counted so far
        (and if so, it is spent).
        """
        now = self.clock.seconds()
        if now >= self.next_tick:
            self.tick(now, requests)
        _, start_requests, start_spent = self._ticks[0]
        allowed = max(RETRY_MIN, (requests - start_requests) * RETRY_RATIO // 100)
        if self.spent - start_spent >= allowed:
            return False
        self.spent += 1
        return True

    def tick(self, now: float, requests: int) -> None:
        """
        Note the counts now, and forget what is older than the window
        (whose oldest tick is where the window's counts start).
        """
        ticks = self._ticks
        ticks.append((now, requests, self.spent))
        start = now - RETRY_WINDOW
        while ticks[0][0] < start:
            ticks.popleft()
        self.next_tick = now + 1.0
