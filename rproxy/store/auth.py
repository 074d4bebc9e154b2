"""
API key checks in the seed's order: Redis cache, then PostgreSQL, then the
static keys of the configuration when the database cannot be reached.

  - A hit in Redis answers without touching PostgreSQL (TTL
    C{auth_cache_ttl}, 300 s by default); a refused key is cached too, for a
    short C{negative_ttl}, so a flood of bad keys does not reach the
    database.
  - Redis down: PostgreSQL answers.  Once Redis is known to be down (a
    command failed, or the probe of L{rproxy.store.links.RedisProbe} says
    so) it is skipped without waiting, until the probe sees it answer:
    only the checks in flight when it went away pay the timeout.
  - PostgreSQL down: the cache answers what it holds, the static keys the
    rest.
  - Revoking deletes the cache entry (Redis is shared, so every rproxy
    process sees it at once) and publishes the digest on
    C{rproxy:revoked} for processes that keep caches of their own.

Keys are cached and logged only as SHA-256 digests.

The same chain checks the tunnels' agents and public bearer keys and the
HTTP frontends' C{auth: {api_keys: true}} (L{KeyChain.lookup}); without
stores it holds only the static keys (L{key_chain}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.store.links import why
from rproxy.store.postgres import KeyRecord, PostgresKeys, digest

__all__ = ["KeyChain", "key_chain"]

log = Logger()
REVOKED_CHANNEL = "rproxy:revoked"


def _cache_key(key_digest: bytes) -> str:
    return "rproxy:key:" + key_digest.hex()


class KeyChain:
    def __init__(
        self,
        static: Any,
        postgres: PostgresKeys | None = None,
        redis: Any = None,
        clock: Any = None,
        ttl: float = 300.0,
        negative_ttl: float = 5.0,
        timeout: float = 1.0,
    ) -> None:
        self.static = static
        self.postgres = postgres
        self.redis = redis
        #: whether Redis is worth waiting for (None: always try it)
        self.redis_probe: Any = None
        self.clock = clock
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self.redis_errors = 0
        self.postgres_errors = 0
        self.cache_hits = 0

    def _redis_usable(self) -> bool:
        return self.redis is not None and (self.redis_probe is None or self.redis_probe.usable())

    def _redis_failed(self, e: Exception) -> str:
        """
        Count a failed Redis command, tell the probe; why, in words (a
        timeout's own message is the raw arguments of TimeoutError).
        """
        self.redis_errors += 1
        reason = f"no answer within {self.timeout:g}s" if isinstance(e, defer.TimeoutError) else why(Failure(e))
        if self.redis_probe is not None:
            self.redis_probe.failed(f"a key check: {reason}")
        return reason

    async def _bounded(self, d: defer.Deferred[Any]) -> Any:
        if self.clock is not None:
            d.addTimeout(self.timeout, self.clock)
        return await d

    def lookup(self, key: str) -> defer.Deferred[Any]:
        """
        L{check} as a Deferred (cancelling it cancels the store query in
        flight).
        """
        return defer.Deferred.fromCoroutine(self.check(key))

    async def check(self, key: str) -> Any:
        """
        The key's record (C{name}, C{level}), or None if it is not valid.

        Cancelled (the client went away), it fails with C{CancelledError}
        and counts, logs and tells the probe nothing: only a store's error
        or its timeout (C{TimeoutError}, which C{addTimeout} makes of its
        own cancelling) says the store is down.  Taking a cancelled Redis
        read for an outage let any client keep Redis "down" with random
        keys and resets.
        """
        key_digest = digest(key)
        if self.redis is not None and not self._redis_usable():
            self.redis_errors += 1  # a check that found Redis down, as the metric counts them
        elif self.redis is not None:
            try:
                cached = await self._bounded(self.redis.get(_cache_key(key_digest)))
            except defer.CancelledError:
                raise  # the caller went away: Redis is not down
            except Exception as e:  # noqa: BLE001 - Redis down: go on to PostgreSQL
                log.warn("auth: Redis unavailable ({why}); asking PostgreSQL", why=self._redis_failed(e))
            else:
                if cached == "-":
                    self.cache_hits += 1
                    return None
                if cached:
                    self.cache_hits += 1
                    data = json.loads(cached)
                    return KeyRecord(id=data["id"], name=data["name"], level=data["level"])
        if self.postgres is not None:
            try:
                record = await self._bounded(defer.Deferred.fromCoroutine(self.postgres.check(key)))
            except defer.CancelledError:
                raise  # the caller went away: PostgreSQL is not down
            except Exception as e:  # noqa: BLE001 - PostgreSQL down: static keys
                self.postgres_errors += 1
                log.warn("auth: PostgreSQL unavailable ({why}); using static keys", why=type(e).__name__)
            else:
                await self._remember(key_digest, record)
                return record
        return self.static.check(key)

    async def _remember(self, key_digest: bytes, record: KeyRecord | None) -> None:
        if not self._redis_usable():
            return
        value = "-" if record is None else json.dumps({"id": record.id, "name": record.name, "level": record.level})
        ttl = self.negative_ttl if record is None else self.ttl
        try:
            await self._bounded(self.redis.set(_cache_key(key_digest), value, expire=max(1, int(ttl))))
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only slower
            self._redis_failed(e)

    async def revoke(self, key_id: int) -> bool:
        """
        Revoke in PostgreSQL, then drop the cached entry everywhere.
        """
        assert self.postgres is not None
        rows = await self.postgres.conn.runQuery(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING digest",
            (key_id,),
        )
        if not rows:
            return False
        key_digest = bytes(rows[0][0])
        if self.redis is not None:
            try:
                await self._bounded(self.redis.delete(_cache_key(key_digest)))
                await self._bounded(self.redis.publish(REVOKED_CHANNEL, key_digest.hex()))
            except defer.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the TTL bounds how long a stale entry lives
                self.redis_errors += 1
                log.error("auth: revoked key {id} may stay cached for up to {ttl}s: Redis unavailable",
                          id=key_id, ttl=self.ttl)
        return True


def key_chain(keys: Any, clock: Any = None) -> KeyChain:
    """
    C{keys} as a L{KeyChain}: itself, or a chain of static keys alone
    (C{api_keys:} without stores).
    """
    return keys if isinstance(keys, KeyChain) else KeyChain(keys, clock=clock)
