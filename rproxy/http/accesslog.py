"""
The HTTP access log's formats and its file of its own.

Lines of a file of their own, not events of the process log: twistd puts
its time-and-system prefix before each event, so JSON lines there are no
longer JSON lines, and tools that read the combined format (GoAccess...)
expect nothing before the client's address.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

__all__ = ["AccessLogFile", "LogLines", "escape"]

# what nginx escapes in its log lines: the quote that ends a field, the
# backslash that starts an escape, control characters and non-ASCII bytes
_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')


def _hex(match: re.Match[bytes]) -> bytes:
    return b"\\x%02X" % match.group()[0]


def escape(value: bytes) -> str:
    """
    C{value} as nginx writes a request's fields in a log line: C{"} as
    C{\\x22}, C{\\} as C{\\x5C}, control and non-ASCII bytes as C{\\xHH}, so
    that a client cannot end a field early or forge a line.
    """
    return _UNSAFE.sub(_hex, value).decode("ascii")


class AccessLogFile:
    """
    Lines appended to a file, opened once.

    Lines are gathered during a reactor turn and written in one C{write(2)}
    at its end (or sooner past L{BATCH} lines), so a request costs a list
    append; the file is opened with C{O_APPEND}, so whole-line writes of
    several frontends sharing it do not interleave.  L{reopen} starts a new
    file after a rotation (on reload).  A failing write is logged once (until
    one succeeds again) and its lines are dropped: a full disk must not
    grow the process.
    """

    BATCH = 1000
    log = Logger()

    def __init__(self, path: str, clock: Any) -> None:
        self.path = path
        self.clock = clock
        self.dropped = 0
        self._lines: list[str] = []
        self._flush: IDelayedCall | None = None
        self._failing = False
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.BATCH:
            self.flush()
        elif self._flush is None:
            self._flush = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        lines, self._lines = self._lines, []
        if not lines or self._fd < 0:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            self.dropped += len(lines)
            if not self._failing:
                self._failing = True
                self.log.error("access log {path}: cannot write: {why}; dropping lines", path=self.path,
                               why=e.strerror or e)
            return
        if self._failing:
            self._failing = False
            self.log.info("access log {path}: writing again ({n} lines dropped)", path=self.path, n=self.dropped)

    def reopen(self) -> None:
        """
        Write what is pending, then go on in a new file at the same path
        (the old one was renamed by a log rotation).  If it cannot be
        opened, the old file stays in use.
        """
        self.flush()
        try:
            fd = self._open()
        except OSError as e:
            self.log.error("access log {path}: cannot reopen: {why}", path=self.path, why=e.strerror or e)
            return
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LogLines:
    """
    Where a log of lines goes: its own file (an L{AccessLogFile}, C{file})
    or, when there is none, the process log through C{log} (a
    L{twisted.logger.Logger}); the L4 and tunnel stream logs are made of it.
    """

    file: AccessLogFile | None = None
    log: Any

    def write_line(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line)
        else:
            self.log.info("{line}", line=line)

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
