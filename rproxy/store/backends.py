"""
Backends in PostgreSQL (the VK gateway's C{config.local}): the C{backends}
table behind the admin API, and live pools (C{source: postgres}).

L{LiveBackends} keeps the servers of every C{source: postgres} pool equal
to the enabled rows of its pool: a trigger NOTIFYs C{rproxy_backends} with
the pool's name on every insert, update and delete; rproxy LISTENs and
re-reads that pool at once, and re-reads every pool each
C{resync_interval} in case a notification was lost (or the connection was
down).  While PostgreSQL is down, pools keep the servers they have.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config import ServerConfig, parse_hostport

__all__ = ["PostgresBackends", "LiveBackends", "BackendError", "CHANNEL"]

log = Logger()
CHANNEL = "rproxy_backends"
_COLUMNS = "server_id, pool, provider, name, address, weight, enabled, updated_at"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class BackendError(ValueError):
    """
    A backend row that cannot be stored; the message names the field.
    """


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    server_id, pool, provider, name, address, weight, enabled, updated_at = row
    return {"server_id": server_id, "pool": pool, "provider": provider, "name": name, "address": address,
            "weight": weight, "enabled": enabled, "updated_at": updated_at.isoformat() if updated_at else None}


def validate(fields: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """
    The columns of a backend row from an API body.

    @raise BackendError: a field is missing, unknown or invalid.
    """
    if not isinstance(fields, dict):
        raise BackendError("expected a JSON object")
    known = {"server_id", "pool", "provider", "name", "address", "weight", "enabled"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BackendError(f"{unknown[0]}: unknown field")
    if partial and "server_id" in fields:
        raise BackendError("server_id: cannot be changed")
    out: dict[str, Any] = {}
    required = () if partial else ("server_id", "pool", "address")
    for key in required:
        if key not in fields:
            raise BackendError(f"{key}: required")
    for key in ("server_id", "pool"):
        if key in fields:
            value = fields[key]
            if not isinstance(value, str) or not _ID.fullmatch(value):
                raise BackendError(f"{key}: expected 1-128 letters, digits or ._:@-")
            out[key] = value
    for key in ("provider", "name"):
        if key in fields:
            value = fields[key]
            if not isinstance(value, str) or len(value) > 256 or any(c in value for c in "\r\n\0"):
                raise BackendError(f"{key}: expected a single-line string of at most 256 characters")
            out[key] = value
    if "address" in fields:
        value = fields["address"]
        if not isinstance(value, str):
            raise BackendError("address: expected host:port")
        try:
            parse_hostport(value)
        except ValueError as e:
            raise BackendError(f"address: {e}") from None
        out["address"] = value
    if "weight" in fields:
        value = fields["weight"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise BackendError("weight: expected an integer from 0 to 1000")
        out["weight"] = value
    if "enabled" in fields:
        if not isinstance(fields["enabled"], bool):
            raise BackendError("enabled: expected true or false")
        out["enabled"] = fields["enabled"]
    if partial and not out:
        raise BackendError("nothing to change")
    if not partial:
        out.setdefault("name", out["server_id"])
    return out


class PostgresBackends:
    """
    The C{backends} table (parameterized SQL only).
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def servers_of(self, pool: str) -> tuple[ServerConfig, ...]:
        """
        The enabled servers of C{pool}; a row whose address no longer
        parses is skipped with a warning.
        """
        rows = await self.conn.runQuery(
            "SELECT server_id, address, weight FROM backends WHERE pool = %s AND enabled ORDER BY server_id",
            (pool,),
        )
        servers = []
        for server_id, address, weight in rows:
            try:
                host, port = parse_hostport(address)
            except ValueError as e:
                log.warn("backends: skipping {server} of pool {pool}: {why}", server=server_id, pool=pool, why=e)
                continue
            servers.append(ServerConfig(name=server_id, address=address, host=host, port=port, weight=weight))
        return tuple(servers)

    async def list(self, limit: int = 100, after: str = "", pool: str | None = None) -> list[dict[str, Any]]:
        if pool is None:
            rows = await self.conn.runQuery(
                f"SELECT {_COLUMNS} FROM backends WHERE server_id > %s ORDER BY server_id LIMIT %s", (after, limit))
        else:
            rows = await self.conn.runQuery(
                f"SELECT {_COLUMNS} FROM backends WHERE pool = %s AND server_id > %s ORDER BY server_id LIMIT %s",
                (pool, after, limit))
        return [_row(row) for row in rows]

    async def get(self, server_id: str) -> dict[str, Any] | None:
        rows = await self.conn.runQuery(f"SELECT {_COLUMNS} FROM backends WHERE server_id = %s", (server_id,))
        return _row(rows[0]) if rows else None

    async def create(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """
        Insert a validated row; None if its server_id exists.
        """
        names = sorted(fields)
        rows = await self.conn.runQuery(
            f"INSERT INTO backends ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
            f" ON CONFLICT (server_id) DO NOTHING RETURNING {_COLUMNS}",
            tuple(fields[n] for n in names),
        )
        return _row(rows[0]) if rows else None

    async def update(self, server_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        names = sorted(fields)  # validated column names only
        rows = await self.conn.runQuery(
            f"UPDATE backends SET {', '.join(f'{n} = %s' for n in names)}, updated_at = now()"
            f" WHERE server_id = %s RETURNING {_COLUMNS}",
            (*(fields[n] for n in names), server_id),
        )
        return _row(rows[0]) if rows else None

    async def delete(self, server_id: str) -> bool:
        rows = await self.conn.runQuery("DELETE FROM backends WHERE server_id = %s RETURNING server_id", (server_id,))
        return bool(rows)


class LiveBackends:
    """
    See the module docstring.

    @param pools: the names of the pools with C{source: postgres} now.
    @param apply: called with a pool's name and its servers as read.
    """

    def __init__(self, clock: Any, pools: Callable[[], list[str]],
                 apply: Callable[[str, tuple[ServerConfig, ...]], None], interval: float = 30.0) -> None:
        self.clock = clock
        self.pools = pools
        self.apply = apply
        self.interval = interval
        self.store: PostgresBackends | None = None
        self.syncs = 0
        self.notifications = 0
        self._conn: Any = None
        self._resync: task.LoopingCall | None = None
        self._running: dict[str, defer.Deferred[None]] = {}
        self._again: set[str] = set()

    async def attach(self, conn: Any) -> None:
        """
        PostgreSQL is up on C{conn}: listen, then read every pool.
        """
        self._conn = conn
        self.store = PostgresBackends(conn)
        conn.addNotifyObserver(self._notified)
        await conn.runOperation(f"LISTEN {CHANNEL}")
        self._stop_resync()
        self._resync = task.LoopingCall(self.sync_all)
        self._resync.clock = self.clock
        self._resync.start(self.interval, now=True).addErrback(
            lambda f: log.failure("backends: the resync loop stopped", f))

    def detach(self) -> None:
        """
        PostgreSQL is gone: keep the servers pools have; stop resyncing.
        """
        if self._conn is not None:
            try:
                self._conn.removeNotifyObserver(self._notified)
            except ValueError:
                pass
        self._conn = None
        self.store = None
        self._stop_resync()

    def _stop_resync(self) -> None:
        if self._resync is not None and self._resync.running:
            self._resync.stop()
        self._resync = None

    def _notified(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        self.notifications += 1
        if notify.payload in self.pools():
            self.sync(notify.payload)

    def sync_all(self) -> None:
        """
        Re-read every live pool (each C{interval}, while attached); an
        error is logged and the loop goes on.
        """
        if self.store is None:
            return
        try:
            for pool in self.pools():
                self.sync(pool)
        except Exception:  # noqa: BLE001 - a periodic job logs and keeps going
            log.failure("backends: resync failed; will retry")

    def sync(self, pool: str) -> None:
        """
        Re-read C{pool}; a change that arrives while it is being read
        causes one more read after.
        """
        if pool in self._running:
            self._again.add(pool)
            return
        store = self.store
        if store is None:
            return
        d = defer.Deferred.fromCoroutine(store.servers_of(pool))
        self._running[pool] = d
        d.addCallback(self._read, pool)
        d.addErrback(self._failed, pool)
        d.addBoth(self._done, pool)

    def _read(self, servers: tuple[ServerConfig, ...], pool: str) -> None:
        self.syncs += 1
        if pool in self.pools():
            self.apply(pool, servers)

    def _failed(self, failure: Failure, pool: str) -> None:
        log.warn("backends: cannot read pool {pool} ({why}); keeping its servers", pool=pool,
                 why=(failure.getErrorMessage() or "?").strip().splitlines()[0])

    def _done(self, _: Any, pool: str) -> None:
        self._running.pop(pool, None)
        if pool in self._again:
            self._again.discard(pool)
            self.sync(pool)

    def stop(self) -> None:
        self.detach()
