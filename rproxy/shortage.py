"""
Local resource shortages: this process ran short, the server did nothing
wrong.

At the descriptor limit (EMFILE, ENFILE), short of kernel buffers or memory
(ENOBUFS, ENOMEM) or of local ports (EADDRNOTAVAIL), a connect cannot even
start.  Blaming the server for it would take healthy servers down (active
checks) or eject them (passive checks) because of our own exhaustion, and
trying another server would fail the same way.  So such failures carry
their own type, L{LocalConnectError} (Twisted's own connectors report them
as C{ConnectBindError}: L{is_local} knows both), and callers neither count
them against the server nor retry them elsewhere.

L{ShortageLog} logs them once per episode: a shortage lasts, and one line
per failed connect would flood the log just when it matters most.
"""

from __future__ import annotations

import errno
import os

from twisted.internet import error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["LOCAL_ERRNOS", "LocalConnectError", "ShortageLog", "is_local", "local_connect_error"]

LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


class LocalConnectError(error.ConnectError):
    """
    A connect that could not start for want of a local resource
    (descriptors, kernel buffers, memory, local ports).
    """

    MESSAGE = "Could not start connecting for want of a local resource"


def local_connect_error(number: int) -> LocalConnectError:
    return LocalConnectError(number, os.strerror(number))


def is_local(reason: Failure | BaseException) -> bool:
    """
    Whether a connect failed for want of a local resource, not because of
    the server: our L{LocalConnectError}, Twisted's C{ConnectBindError}
    (the socket could not be made or bound), or any connect or OS error
    whose errno is one of L{LOCAL_ERRNOS}.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, error.ConnectBindError | LocalConnectError):
        return True
    if isinstance(value, error.ConnectError):
        return value.osError in LOCAL_ERRNOS
    return isinstance(value, OSError) and value.errno in LOCAL_ERRNOS


class ShortageLog:
    """
    Log local shortages once per episode.

    The first failure after C{quiet} seconds without any starts an episode
    and is logged as a warning; while failures go on, one line every
    C{quiet} seconds tells how many more there were.
    """

    def __init__(self, log: Logger, clock: IReactorTime, what: str, quiet: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self._what = what
        self._quiet = quiet
        self._last_failure = -float("inf")
        self._last_line = -float("inf")
        self._unlogged = 0
        self.total = 0

    def failed(self, reason: Failure | BaseException) -> None:
        now = self._clock.seconds()
        self.total += 1
        value = reason.value if isinstance(reason, Failure) else reason
        if now - self._last_failure >= self._quiet:
            self._unlogged = 0
            self._last_line = now
            self._log.warn(
                "{what}: out of local resources, not the server's fault: {why} "
                "(logged again at most every {quiet:g}s while it lasts)",
                what=self._what, why=value, quiet=self._quiet,
            )
        elif now - self._last_line >= self._quiet:
            self._log.warn(
                "{what}: still out of local resources: {n} more failures: {why}",
                what=self._what, n=self._unlogged + 1, why=value,
            )
            self._unlogged = 0
            self._last_line = now
        else:
            self._unlogged += 1
        self._last_failure = now
