"""
Admission: which accepted connections a frontend serves, and when.

One L{Admission} per frontend (TCP or HTTP), owned by it, not inherited:
it takes each accepted connection, starts it at once while the frontend
(C{max_connections}) and the process (L{ConnectionLimit}) have room, or
queues it (C{queue_size}, for C{queue_timeout}), refuses it otherwise; it
closes connections idle both ways for C{idle_timeout}; and on a drain it
stops admitting and fires when the last connection has gone (cutting
what is left after the grace period).

What it asks of a connection (L{IAdmitted}): C{start()} once admitted,
C{activity()} (bytes moved so far, None while busy), C{idle_abort()},
C{refuse()}, and the fields C{counted}, C{quiet_ticks}, C{last_total},
C{queue_timer} it keeps on it.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface

__all__ = ["Admission", "AdmittedFigures", "ConnectionLimit", "IAdmitted"]


class ConnectionLimit:
    """
    A count shared by every frontend of the process (C{global.max_connections}).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def full(self) -> bool:
        return self.active >= self.limit


class IAdmitted(Interface):
    """
    A connection as admission sees it.
    """

    counted = Attribute("whether it holds a slot (set by Admission)")
    quiet_ticks = Attribute("idle sweeps in a row that saw no activity")
    last_total = Attribute("activity() at the last sweep")
    queue_timer = Attribute("its queue timeout while it waits, else None")

    def start() -> None:
        """
        It has a slot: serve.
        """

    def activity() -> int | None:
        """
        Bytes moved so far both ways; None while busy however quiet.
        """

    def idle_abort() -> None:
        """
        Cut it (idle, or left at the end of a drain).
        """

    def refuse() -> None:
        """
        Close it unserved (queue full or timed out, or draining).
        """

    def peer_name() -> str:
        """
        host:port of the client, for the log.
        """


class Admission:
    """
    @ivar config: the frontend's configuration (C{max_connections},
        C{queue_size}, C{queue_timeout}, C{idle_timeout}); replaced on reload.
    @ivar connections: every connection accepted and not yet closed.
    @ivar waiting: the queued ones, oldest first.
    @ivar active: connections holding a slot.
    """

    log = Logger()

    def __init__(self, name: str, config: Any, clock: IReactorTime, limit: ConnectionLimit | None = None) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.limit = limit or ConnectionLimit(2**31)
        self.connections: set[Any] = set()
        self.waiting: collections.deque[Any] = collections.deque()
        self.active = 0
        self.total = 0
        self.refused_total = 0
        self.idle_closed = 0
        self.accepting = True
        self._drained: list[defer.Deferred[None]] = []
        self._drain_timer: IDelayedCall | None = None
        self._sweep: IDelayedCall | None = None

    def _has_slot(self) -> bool:
        limit = self.config.max_connections
        return (limit == 0 or self.active < limit) and not self.limit.full()

    def admit(self, conn: Any) -> None:
        """
        A connection was accepted: start it, queue it or refuse it.
        """
        self.connections.add(conn)
        self.total += 1
        if not self.accepting:
            self.refused_total += 1
            conn.refuse()
            return
        if self._has_slot() and not self.waiting:
            self._start(conn)
            return
        if len(self.waiting) >= self.config.queue_size:
            self.refused_total += 1
            self.log.info(
                "frontend {frontend}: refusing {peer}: {limit} connections open and the queue is full",
                frontend=self.name, peer=conn.peer_name(), limit=self.active,
            )
            conn.refuse()
            return
        self.waiting.append(conn)

        def expire() -> None:
            conn.queue_timer = None
            try:
                self.waiting.remove(conn)
            except ValueError:
                return
            self.refused_total += 1
            conn.refuse()

        conn.queue_timer = self.clock.callLater(self.config.queue_timeout, expire)

    def _start(self, conn: Any) -> None:
        self.active += 1
        self.limit.active += 1
        if self._sweep is None and self.config.idle_timeout > 0:
            self._sweep = self.clock.callLater(self.config.idle_timeout / 4, self._idle_sweep)
        conn.start()

    def _idle_sweep(self) -> None:
        """
        Close connections silent both ways for C{idle_timeout}.

        One timer per frontend, four ticks per C{idle_timeout}: a connection
        whose byte counts did not move for four ticks in a row is closed,
        so after between 1 and 1.25 times C{idle_timeout} of silence, at no
        cost per connection or per byte.
        """
        self._sweep = None
        timeout = self.config.idle_timeout
        for conn in list(self.connections):
            if not conn.counted:
                continue
            total = conn.activity()
            if total is None:
                conn.quiet_ticks = 0
                continue
            if total != conn.last_total:
                conn.last_total = total
                conn.quiet_ticks = 0
                continue
            conn.quiet_ticks += 1
            if conn.quiet_ticks >= 4:
                self.idle_closed += 1
                self.log.info(
                    "frontend {frontend}: closing {peer}: idle for {timeout}s",
                    frontend=self.name, peer=conn.peer_name(), timeout=timeout,
                )
                conn.idle_abort()
        if self.active and timeout > 0:
            self._sweep = self.clock.callLater(timeout / 4, self._idle_sweep)

    def forget(self, conn: Any) -> None:
        """
        A connection has closed: free its slot for the oldest waiter, and
        end a drain if it was the last.
        """
        self.connections.discard(conn)
        if self.waiting:
            # (O(n), and raises for a connection that is not waiting: only
            # looked at while connections wait)
            try:
                self.waiting.remove(conn)
            except ValueError:
                pass
        if conn.counted:
            conn.counted = False
            self.active -= 1
            self.limit.active -= 1
            while self.waiting and self._has_slot():
                waiter = self.waiting.popleft()
                if waiter.queue_timer is not None and waiter.queue_timer.active():
                    waiter.queue_timer.cancel()
                waiter.queue_timer = None
                self._start(waiter)
        if not self.active and self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if not self.connections and self._drained:
            if self._drain_timer is not None and self._drain_timer.active():
                self._drain_timer.cancel()
            self._drain_timer = None
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        Stop admitting, let open connections finish for up to C{grace}
        seconds, then abort what is left.  The caller stops listening.
        May be called again; every call's Deferred fires when drained.
        """
        self.accepting = False
        for conn in list(self.waiting):
            conn.refuse()
        done: defer.Deferred[None] = defer.Deferred()
        if not self.connections:
            done.callback(None)
            return done
        self._drained.append(done)
        if self._drain_timer is None:
            self._drain_timer = self.clock.callLater(grace, self._drain_expired)
        return done

    def _drain_expired(self) -> None:
        self._drain_timer = None
        if self.connections:
            self.log.info(
                "frontend {frontend}: grace period over, closing {n} connections",
                frontend=self.name, n=len(self.connections),
            )
        for conn in list(self.connections):
            conn.idle_abort()


class AdmittedFigures:
    """
    A frontend's admission figures, read as the frontend's own by the
    service, the admin pages and the metrics; the frontend holds its
    L{Admission} in C{admission} (composition: these only read through).
    """

    admission: Admission

    @property
    def config(self) -> Any:
        """
        The frontend's configuration (its admission's: one place).
        """
        return self.admission.config

    @config.setter
    def config(self, config: Any) -> None:
        self.admission.config = config

    @property
    def name(self) -> str:
        return self.config.name  # type: ignore[no-any-return]

    @property
    def limit(self) -> ConnectionLimit:
        return self.admission.limit

    @property
    def connections(self) -> set[Any]:
        return self.admission.connections

    @property
    def waiting(self) -> collections.deque[Any]:
        return self.admission.waiting

    @property
    def active(self) -> int:
        return self.admission.active

    @property
    def total(self) -> int:
        return self.admission.total

    @property
    def refused_total(self) -> int:
        return self.admission.refused_total

    @property
    def idle_closed(self) -> int:
        return self.admission.idle_closed

    @property
    def accepting(self) -> bool:
        return self.admission.accepting
