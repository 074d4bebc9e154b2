"""
Server state that crosses processes: health verdicts (the master's
checks) and passive ejections (seen by one worker, applied everywhere).
"""

from __future__ import annotations

from typing import Any

from rproxy.pool import Pool, Server

__all__ = ["find_server", "apply_ejection", "snapshot"]


def find_server(pool: Pool, name: str) -> Server | None:
    for server in pool.servers:
        if server.name == name:
            return server
    return None


def apply_ejection(pool: Pool, name: str, until: float, ejections: int) -> bool:
    """
    Take server C{name} out until C{until} (a time on this process's
    clock), as another process's passive ejection did; an ejection that
    ends no later than one already applied changes nothing.

    @return: whether anything changed.
    """
    server = find_server(pool, name)
    if server is None or server.ejected_until >= until:
        return False
    server.ejected_until = until
    server.last_ejection_end = until
    server.ejections = max(server.ejections, ejections)
    server.consecutive_failures = 0
    # the same servers again: the pool drops its cached choice of candidates
    pool.update(pool.config)
    return True


def snapshot(pools: dict[str, Pool], now: float) -> list[dict[str, Any]]:
    """
    The messages that bring a new worker to the master's view: servers
    that are down, and ejections still running.
    """
    messages: list[dict[str, Any]] = []
    for pool in pools.values():
        for server in pool.servers:
            if not server.up:
                messages.append({"op": "health", "pool": pool.name, "server": server.name, "up": False,
                                 "reason": server.down_reason})
            if server.ejected_until > now:
                messages.append({"op": "eject", "pool": pool.name, "server": server.name,
                                 "until_in": server.ejected_until - now, "ejections": server.ejections})
    return messages


def apply_message(pools: dict[str, Pool], message: dict[str, Any], now: float) -> bool:
    """
    Apply a C{health} or C{eject} message to C{pools}; whether it changed
    anything (unknown pools and servers are left alone: a reload may not
    have reached this process yet).
    """
    pool = pools.get(message["pool"])
    if pool is None:
        return False
    if message["op"] == "health":
        server = find_server(pool, message["server"])
        if server is None or server.up == bool(message["up"]):
            return False
        pool.set_up(server, bool(message["up"]), str(message.get("reason", "")))
        return True
    return apply_ejection(pool, message["server"], now + float(message["until_in"]), int(message["ejections"]))
