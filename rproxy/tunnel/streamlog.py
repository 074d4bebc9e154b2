"""
The access log of a C{mode: tcp} tunnel's streams: one line per public
connection when it ends (HAProxy's tcplog, for tunnels): the client, the
agent (and its node in a cluster), the model if known, bytes both ways,
the duration and why it ended.

  tunnels:
    - name: gpu
      access_log: {format: text, path: /var/log/rproxy/gpu-streams.log}

C{format: text} (or C{json}) without C{path} writes to the process log;
with C{path}, to a file of its own (L{rproxy.http.accesslog.AccessLogFile}:
batched, reopened on SIGUSR1).

Termination reasons: C{client_closed}, C{agent_closed} (who sent FIN
first), C{client_reset}, C{agent_reset}, C{no_agent} (none connected, or
none answered), C{too_many_pending}, C{agent_refused} (the local service
of the last agent asked refused: each agent's refusal sends the stream to
the next), C{aborted} (the agent was dropped, or the tunnel stopped),
C{refused} (not admitted: the tunnel was draining).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger

from rproxy.http.accesslog import AccessLogFile, LogLines

__all__ = ["StreamLog"]


class StreamLog(LogLines):
    """
    Where a tunnel's stream lines go, in which format.
    """

    log = Logger(namespace="rproxy.tunnel.access")

    def __init__(self, json_lines: bool, path: str | None, clock: Any) -> None:
        self.json = json_lines
        self.path = path
        self.file: AccessLogFile | None = AccessLogFile(path, clock) if path is not None else None

    def line(self, tunnel: str, client: str, agent: str | None, node: str | None, model: str | None,
             bytes_in: int, bytes_out: int, duration: float, end: str) -> str:
        if self.json:
            return json.dumps({
                "tunnel": tunnel, "client": client, "agent": agent, "node": node, "model": model,
                "bytes_in": bytes_in, "bytes_out": bytes_out, "duration": round(duration, 6), "end": end,
            }, separators=(",", ":"))
        return (f"{client} tunnel={tunnel} agent={agent or '-'} node={node or '-'} model={model or '-'} "
                f"bytes_in={bytes_in} bytes_out={bytes_out} duration={duration:.6f} end={end}")

    def write(self, *args: Any) -> None:
        self.write_line(self.line(*args))
