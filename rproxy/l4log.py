"""
The access log of TCP frontends: one line per connection, when it ends.

C{tcplog} is HAProxy's C{option tcplog} line with both byte counts::

    192.0.2.7:56324 [27/Nov/2026:19:12:01.123] db pg/pg1 0/1/5007 212 340 client-closed 0

client address and port, accept time, frontend, backend/server, the
milliseconds waited for a server (queue and choice), to connect and in
all (-1: that step was not reached), bytes sent to the client, bytes
received from it, why it ended, and the retries.  C{json} has the same
fields as keys, one JSON object per line.

Why a connection ended (C{termination}): C{client-closed}, C{server-closed},
C{connect-failed}, C{no-server}, C{timeout} (idle), C{refused-acl}
(allow/deny), C{queue} (full or timed out), C{drained} (reload or stop),
C{bad-hello} (TLS passthrough could not read the ClientHello),
C{no-route} (no backend for its SNI), C{tls-failed} (TLS termination:
the client's handshake or TLS records failed, also logged in one line).

Lines go to the frontend's file (L{rproxy.http.accesslog.AccessLogFile}:
batched, O_APPEND, reopened for log rotation) or to the process log.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.logger import Logger

from rproxy.http.accesslog import AccessLogFile, LogLines

__all__ = ["L4Log", "TERMINATIONS", "format_json", "format_tcplog"]

TERMINATIONS = ("client-closed", "server-closed", "connect-failed", "no-server", "timeout", "refused-acl",
                "queue", "drained", "bad-hello", "no-route")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _ms(start: float | None, end: float | None) -> int:
    if start is None or end is None:
        return -1
    return max(0, round((end - start) * 1000))


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _when(seconds: float) -> str:
    whole = int(seconds)
    if whole != _second[0]:
        t = time.gmtime(whole)
        _second[:] = [whole, f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:"
                             f"{t.tm_min:02d}:{t.tm_sec:02d}"]
    return f"{_second[1]}.{int(seconds * 1000) % 1000:03d}"


def _record(conn: Any, now: float) -> dict[str, Any]:
    return {
        "client": conn.client_host,
        "client_port": conn.client_port,
        "accepted": conn.accepted_at,
        "frontend": conn.frontend.name,
        "backend": conn.backend_name or "-",
        "server": conn.server_name or "-",
        "wait_ms": _ms(conn.accepted_at, conn.chosen_at),
        "connect_ms": _ms(conn.chosen_at, conn.connected_at),
        "duration_ms": _ms(conn.accepted_at, now),
        "bytes_out": conn.backend_received,
        "bytes_in": conn.received,
        "termination": conn.termination or "client-closed",
        "retries": max(0, len(conn.tried) - 1),
    }


def format_tcplog(conn: Any, now: float) -> str:
    client = conn.client_host
    if ":" in client:
        client = f"[{client}]"
    accepted = conn.accepted_at
    return (f"{client}:{conn.client_port} [{_when(accepted)}] {conn.frontend.name} {conn.backend_name or '-'}/"
            f"{conn.server_name or '-'} {_ms(accepted, conn.chosen_at)}/{_ms(conn.chosen_at, conn.connected_at)}/"
            f"{_ms(accepted, now)} {conn.backend_received} {conn.received} {conn.termination or 'client-closed'} "
            f"{max(0, len(conn.tried) - 1)}")


def format_json(conn: Any, now: float) -> str:
    r = _record(conn, now)
    t = time.gmtime(r["accepted"])
    r["accepted"] = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(r['accepted'] * 1000) % 1000:03d}Z"
    return json.dumps(r, separators=(",", ":"))


class L4Log(LogLines):
    """
    Where a TCP frontend's connection lines go.
    """

    log = Logger()

    def __init__(self, frontend_name: str, format_: str, path: str | None, clock: Any) -> None:
        self.format = format_json if format_ == "json" else format_tcplog
        self.path = path
        self.file: AccessLogFile | None = None
        if path is not None:
            try:
                self.file = AccessLogFile(path, clock)
            except OSError as e:
                self.log.error("frontend {frontend}: access log {path}: cannot open: {why}; "
                               "logging to the process log", frontend=frontend_name, path=path,
                               why=e.strerror or e)

    def set_format(self, format_: str) -> None:
        self.format = format_json if format_ == "json" else format_tcplog

    def write(self, conn: Any, now: float) -> None:
        self.write_line(self.format(conn, now))
