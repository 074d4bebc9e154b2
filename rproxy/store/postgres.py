"""
PostgreSQL through txpostgres: schema migrations and the API key store.

Migrations are the numbered SQL files in C{rproxy/store/migrations}
(C{NNN_name.sql}); each is applied once, in its own transaction, in order,
while holding a session advisory lock, so several rproxy processes starting
together apply each exactly once.  Only parameterized SQL is used, and keys
are stored as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["migrations", "migrate", "PostgresKeys", "KeyRecord", "digest", "connection", "ConnectionSet"]

log = Logger()
MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
_LOCK = 0x72_70_72_6F_78_79  # "rproxy"


def migrations() -> list[tuple[int, str, str]]:
    """
    (version, name, SQL) of every shipped migration, in order.
    """
    found = []
    for entry in sorted(os.listdir(MIGRATIONS)):
        match = re.match(r"^(\d+)_([a-z0-9_]+)\.sql$", entry)
        if match:
            with open(os.path.join(MIGRATIONS, entry), encoding="utf-8") as f:
                found.append((int(match.group(1)), match.group(2), f.read()))
    return found


async def migrate(conn: Any) -> list[int]:
    """
    Bring the database to the newest schema; return the versions applied.

    @param conn: a connected C{txpostgres.Connection}.
    """
    applied: list[int] = []
    await conn.runOperation("SELECT pg_advisory_lock(%s)", (_LOCK,))
    try:
        await conn.runOperation(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.runQuery("SELECT version FROM schema_migrations")
        done = {row[0] for row in rows}
        for version, name, sql in migrations():
            if version in done:
                continue

            def apply(cursor: Any, version: int = version, name: str = name, sql: str = sql) -> Any:
                # txpostgres cursors answer with Deferreds: one statement at a time
                d = cursor.execute(sql)
                d.addCallback(lambda _: cursor.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                ))
                return d

            await conn.runInteraction(apply)
            applied.append(version)
            log.info("applied migration {version} {name}", version=version, name=name)
    finally:
        await conn.runOperation("SELECT pg_advisory_unlock(%s)", (_LOCK,))
    return applied


def connection(reactor: Any, detector: Any = None, on_lost: Any = None) -> Any:
    """
    A txpostgres connection that reports a server going away as a lost
    connection (one warning, then C{on_lost(connection)}) instead of an
    unhandled error from the reactor.
    """
    import psycopg2
    from twisted.internet import main
    from txpostgres import txpostgres

    class Connection(txpostgres.Connection):  # type: ignore[misc]
        def doRead(self) -> Any:
            try:
                return super().doRead()
            except psycopg2.OperationalError as e:
                text = str(e).strip().splitlines()
                log.warn("PostgreSQL connection lost: {why}", why=text[0] if text else "closed")
                return main.CONNECTION_LOST

        def connectionLost(self, reason: Any) -> None:
            super().connectionLost(reason)
            if on_lost is not None:
                on_lost(self)

    return Connection(reactor=reactor, detector=detector)


class ConnectionSet:
    """
    C{pool_size} connections behind one connection's interface: each query
    or interaction runs on a free connection (waiting for one when all are
    busy), so a slow write does not hold up a key lookup.  NOTIFY observers
    and session-level work (migrations, LISTEN) use the first connection.
    """

    def __init__(self, connections: list[Any]) -> None:
        import collections

        self.connections = list(connections)
        self.first = self.connections[0]
        self._free = collections.deque(self.connections)
        self._slots = defer.DeferredSemaphore(len(self.connections))

    def __contains__(self, conn: object) -> bool:
        return any(conn is c for c in self.connections)

    def _on_free(self, method: str, *args: Any, **kwargs: Any) -> Any:
        conn = self._free.popleft()
        d = getattr(conn, method)(*args, **kwargs)

        def back(result: Any) -> Any:
            self._free.append(conn)
            return result

        return d.addBoth(back)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """
        C{method} on a free connection, as a Deferred that cancelling fails
        with C{CancelledError} at once.  txpostgres cannot fail a query it
        is cancelling before PostgreSQL confirms: its canceller raises
        C{_CancelInProgress}, out of C{cancel()} and into the coroutine
        that awaited the query, which took it for a database error (a
        client going away counted and logged as PostgreSQL down).  Its
        C{Connection.cancel} swallows that; the connection and its slot
        come back when the query has really ended, and what it answers
        then is nobody's any more.
        """
        running = self._slots.run(self._on_free, method, *args, **kwargs)
        result: Any = defer.Deferred(lambda _: self.first.cancel(running))

        def settle(outcome: Any) -> None:
            if result.called:
                return  # cancelled: the caller is gone
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        running.addBoth(settle)
        return result

    def runQuery(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("runQuery", *args, **kwargs)

    def runOperation(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("runOperation", *args, **kwargs)

    def runInteraction(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("runInteraction", *args, **kwargs)

    def addNotifyObserver(self, observer: Any) -> None:
        self.first.addNotifyObserver(observer)

    def removeNotifyObserver(self, observer: Any) -> None:
        self.first.removeNotifyObserver(observer)

    def close(self) -> None:
        for conn in self.connections:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@attrs.frozen
class KeyRecord:
    id: int
    name: str
    level: int
    created_at: Any = None
    revoked_at: Any = None


class PostgresKeys:
    """
    API keys in the C{api_keys} table.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def check(self, key: str) -> KeyRecord | None:
        """
        The live key C{key}, or None; looked up by its digest (an index
        lookup on a hash, so the time does not depend on the key's text).
        """
        rows = await self.conn.runQuery(
            "SELECT id, name, level FROM api_keys WHERE digest = %s AND revoked_at IS NULL",
            (digest(key),),
        )
        if not rows:
            return None
        row = rows[0]
        return KeyRecord(id=row[0], name=row[1], level=row[2])

    async def create(self, name: str, level: int = -1) -> tuple[KeyRecord, str]:
        """
        A new key; the plain key is returned here, once, and never stored.
        """
        key = "rpk_" + secrets.token_urlsafe(32)
        rows = await self.conn.runQuery(
            "INSERT INTO api_keys (digest, name, level) VALUES (%s, %s, %s) RETURNING id, created_at",
            (digest(key), name, level),
        )
        return KeyRecord(id=rows[0][0], name=name, level=level, created_at=rows[0][1]), key

    async def revoke(self, key_id: int) -> bool:
        rows = await self.conn.runQuery(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING id",
            (key_id,),
        )
        return bool(rows)

    async def list(self, limit: int = 100, after: int = 0) -> list[KeyRecord]:
        rows = await self.conn.runQuery(
            "SELECT id, name, level, created_at, revoked_at FROM api_keys WHERE id > %s ORDER BY id LIMIT %s",
            (after, limit),
        )
        return [KeyRecord(*row) for row in rows]
