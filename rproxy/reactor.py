"""
An epoll reactor with a leaner dispatch loop.

Twisted's C{EPollReactor.doPoll} wraps every readiness event in
C{log.callWithLogger}, which asks the selectable for its C{logPrefix()} and
pushes a legacy log context (six Python calls per event) so that old-style
C{log.msg} calls made inside the handler get the connection's name as
their "system".  A proxy handles one event per chunk forwarded, so that
wrapper is a large share of its CPU time.

L{RProxyEPollReactor} is C{EPollReactor} with only C{doPoll} replaced: a
plain read event goes straight to C{doRead}, everything else to the
reactor's own C{_doReadOrWrite}, with exactly the same error handling
(an exception is logged and disconnects that selectable only).  The one
visible difference: legacy log lines emitted from inside a protocol callback
carry the system C{-} instead of the connection's prefix; rproxy logs with
C{twisted.logger} and explicit fields, so it loses nothing.

rproxy's twistd plugin installs it unless C{--reactor} names another one;
C{twistd --reactor=epoll rproxy ...} runs on the stock reactor.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPOLLIN, EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log

__all__ = ["RProxyEPollReactor", "install"]


class RProxyEPollReactor(EPollReactor):
    """
    C{EPollReactor} without the per-event legacy log context.
    """

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        drdw = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == EPOLLIN:
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    self._disconnectSelectable(selectable, why, True)
            else:
                drdw(selectable, fd, event)

    doIteration = doPoll


def install() -> RProxyEPollReactor:
    """
    Install L{RProxyEPollReactor} as the global reactor.
    """
    reactor = RProxyEPollReactor()
    installReactor(reactor)
    return reactor
