"""
The access log (C{http.access_log}): one line per request, nginx's
combined format followed by backend/server and seconds (and the trace id
when the request is traced), or a JSON object;
to the frontend's access log file, or to the process log under the
C{rproxy.access} namespace (so that it can be routed apart).

Requests the reader refused (400, 413, 414, 431, 505) are logged too, with
what it knew of them: a head it could not read has C{"-"} as its request
line in the combined format, and null method and target in JSON.  Values
other filters put in C{exchange.notes} can be logged as well (a tunnel's
agent and model): as C{name=value} fields after the seconds in the
combined format, as keys in JSON.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.logger import Logger

from rproxy.http.accesslog import escape
from rproxy.http.filters import Filter

__all__ = ["AccessLogFilter"]

_access = Logger(namespace="rproxy.access")


class AccessLogFilter(Filter):
    """
    @ivar frontend: the frontend whose lines these are: its name, clock and
        C{access_file} (which it opens, reopens and closes).
    """

    def __init__(self, frontend: Any, json_lines: bool, notes: tuple[str, ...] = ()) -> None:
        """
        @param notes: the names of C{exchange.notes} logged (None: C{"-"}).
        """
        self.frontend = frontend
        self.json_lines = json_lines
        self.notes = notes

    def log(self, exchange: Any, backend: str) -> None:
        """
        C{bytes} is the response body passed on from the server.
        """
        frontend = self.frontend
        head = exchange.head
        now = frontend.clock.seconds()
        seconds = now - exchange.started
        server = exchange.tried[-1] if exchange.tried else "-"
        sent = exchange.client.delivered - exchange.delivered_before
        access_file = frontend.access_file
        known = head.method != b"-"
        notes = exchange.notes or {}
        trace_id = notes.get("trace_id")  # (set by the tracing filter)
        if self.json_lines:
            record = {
                "client": exchange.client_host, "method": head.method.decode("latin-1") if known else None,
                "target": head.target.decode("latin-1") if known else None,
                "version": f"{head.version[0]}.{head.version[1]}",
                "status": exchange.status, "bytes": sent, "backend": backend,
                "server": server, "duration": round(seconds, 6), "frontend": frontend.name,
                "user_agent": (head.header(b"user-agent") or b"").decode("latin-1"),
            }
            for name in self.notes:
                record[name] = notes.get(name)
            if trace_id is not None:
                record["trace_id"] = trace_id
            line = json.dumps(record, sort_keys=True)
            if access_file is not None:
                access_file.write(line)
            else:
                _access.info("{record}", record=line)
            return
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
        referer = escape(head.header(b"referer") or b"-")
        agent = escape(head.header(b"user-agent") or b"-")
        request = (f"{escape(head.method)} {escape(head.target)} HTTP/{head.version[0]}.{head.version[1]}"
                   if known else "-")
        line = (
            f'{exchange.client_host} - - [{when}] "{request}" {exchange.status} '
            f'{sent} "{referer}" "{agent}" {backend}/{server} {seconds:.6f}'
        )
        for name in self.notes:
            value = notes.get(name)
            line += f" {name}={escape(str(value).encode('utf-8')) if value is not None else '-'}"
        if trace_id is not None:
            line += " " + trace_id
        if access_file is not None:
            access_file.write(line)
        else:
            _access.info("{line}", line=line)
