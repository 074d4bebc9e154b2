"""
Server state that crosses processes: health verdicts (the master's
checks), passive ejections (seen by one worker, applied everywhere) and
an operator's state and weight (set in the master's admin API).
"""

from __future__ import annotations

from typing import Any

from rproxy.pool import Pool, Server

__all__ = ["find_server", "apply_ejection", "apply_admin", "admin_message", "snapshot"]


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


def admin_message(pool: Pool, server: Server) -> dict[str, Any]:
    """
    The message that gives other processes C{server}'s operator state
    and weight as this one has them.
    """
    return {"op": "admin", "pool": pool.name, "server": server.name, "state": server.admin_state,
            "weight": server.weight}


def apply_admin(pool: Pool, name: str, state: str, weight: int) -> bool:
    """
    Set server C{name}'s operator state and weight as the master has
    them, quietly (the master logged the change once).

    @return: whether anything changed.
    """
    server = find_server(pool, name)
    if server is None or (server.admin_state, server.weight) == (state, weight):
        return False
    server.admin_state = state
    server.weight = weight
    server.weight_set = weight != server.config.weight
    pool.set_admin(name)  # nothing to log; the pool takes the change in
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
            if server.admin_state != "ready" or server.weight_set:
                messages.append(admin_message(pool, server))
            if server.ejected_until > now:
                messages.append({"op": "eject", "pool": pool.name, "server": server.name,
                                 "until_in": server.ejected_until - now, "ejections": server.ejections})
    return messages


def apply_message(pools: dict[str, Pool], message: dict[str, Any], now: float) -> bool:
    """
    Apply a C{health}, C{eject} or C{admin} message to C{pools}; whether it changed
    anything (unknown pools and servers are left alone: a reload may not
    have reached this process yet).
    """
    pool = pools.get(message["pool"])
    if pool is None:
        return False
    if message["op"] == "admin":
        return apply_admin(pool, message["server"], str(message["state"]), int(message["weight"]))
    if message["op"] == "health":
        server = find_server(pool, message["server"])
        if server is None or server.up == bool(message["up"]):
            return False
        pool.set_up(server, bool(message["up"]), str(message.get("reason", "")))
        return True
    return apply_ejection(pool, message["server"], now + float(message["until_in"]), int(message["ejections"]))
