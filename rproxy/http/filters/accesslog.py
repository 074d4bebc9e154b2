"""
The access log (C{http.access_log}): one line per request, nginx's
combined format followed by backend/server and seconds (and the trace id
when the request is traced), or a JSON object;
to the frontend's access log file, or to the process log under the
C{rproxy.access} namespace (so that it can be routed apart).
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

    def __init__(self, frontend: Any, json_lines: bool) -> None:
        self.frontend = frontend
        self.json_lines = json_lines

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
        notes = exchange.notes
        trace_id = notes.get("trace_id") if notes else None  # (set by the tracing filter)
        if self.json_lines:
            record = {
                "client": exchange.client.peer_host, "method": head.method.decode("latin-1"),
                "target": head.target.decode("latin-1"), "version": f"{head.version[0]}.{head.version[1]}",
                "status": exchange.status, "bytes": sent, "backend": backend,
                "server": server, "duration": round(seconds, 6), "frontend": frontend.name,
                "user_agent": (head.header(b"user-agent") or b"").decode("latin-1"),
            }
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
        line = (
            f'{exchange.client.peer_host} - - [{when}] "{escape(head.method)} '
            f'{escape(head.target)} HTTP/{head.version[0]}.{head.version[1]}" {exchange.status} '
            f'{sent} "{referer}" "{agent}" {backend}/{server} {seconds:.6f}'
        )
        if trace_id is not None:
            line += " " + trace_id
        if access_file is not None:
            access_file.write(line)
        else:
            _access.info("{line}", line=line)
