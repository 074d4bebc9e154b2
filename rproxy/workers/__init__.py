"""
rproxy on every core: a master process and N worker processes.

With C{global.workers} above 1, twistd runs a L{master.MasterService}: it
binds every C{tcp}/C{http} frontend's listening sockets, serves the admin
port, runs the health checks and the tunnels, and supervises N workers
(C{python -m rproxy.workers.child}) that adopt the sockets and serve the
frontends.  With 1 nothing of this package runs.

Modules:
  - L{wire}: the JSON-lines codec of the private control channel.
  - L{views}: what part of a configuration each process runs (pure).
  - L{supervise}: restart backoff (pure).
  - L{merge}: one machine's figures from every process's (pure).
  - L{sockets}: binding the shared listeners; adopting them in a worker.
  - L{master}, L{child}, L{admin}: the processes and the master's admin tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from rproxy.config import Config

__all__ = ["worker_count"]


def worker_count(config: Config, cores: Callable[[], int] | None = None) -> int:
    """
    How many worker processes C{config} asks for: C{auto} is one per core
    this process may run on (its CPU affinity, which containers and
    C{taskset} narrow, not the machine's count).
    """
    wanted = config.global_.workers
    if wanted == "auto":
        count = cores() if cores is not None else len(os.sched_getaffinity(0))
        return max(1, count)
    assert isinstance(wanted, int)
    return wanted
