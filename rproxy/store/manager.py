"""
The running connections to PostgreSQL and Redis, kept up in the
background, and the key chain built on them.

Nothing here blocks startup or traffic: PostgreSQL is connected (and
migrated) with retries and backoff, Redis reconnects by itself; while either
is down the key chain skips it (L{rproxy.store.auth}).  States are reported
for /health and /readyz.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any
from urllib.parse import urlparse

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rproxy.config import StoresConfig
from rproxy.events import (
    HEARTBEATS,
    REQUESTS,
    EventConsumer,
    EventSink,
    write_heartbeat,
    write_request,
)
from rproxy.store.auth import KeyChain
from rproxy.store.backends import LiveBackends, PostgresBackends
from rproxy.store.postgres import ConnectionSet, PostgresKeys, connection, migrate

__all__ = ["Stores"]

log = Logger()


class Stores:
    def __init__(self, config: StoresConfig, static_keys: Any, reactor: Any, clock: Any,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self._rng = rng or random.Random()
        self.keys = KeyChain(static_keys, clock=clock, ttl=config.auth_cache_ttl)
        self.postgres_state = "off" if config.postgres_dsn is None else "connecting"
        self.redis_state = "off" if config.redis_url is None else "connecting"
        self._conn: Any = None
        self._retry: IDelayedCall | None = None
        self._ping: IDelayedCall | None = None
        self._attempts = 0
        self._stopped = False
        self._redis: Any = None
        self.events: EventSink | None = None
        self._consumer: EventConsumer | None = None
        self._consume_call: IDelayedCall | None = None
        # set by the service before start(): live pools (source: postgres)
        self.live: LiveBackends | None = None
        self.backends: PostgresBackends | None = None
        self._retention: IDelayedCall | None = None
        self.heartbeats_deleted = 0
        self.requests_deleted = 0

    def start(self) -> None:
        if self.config.postgres_dsn is not None:
            self._connect_postgres()
        if self.config.redis_url is not None:
            import txredisapi

            url = urlparse(self.config.redis_url)
            dbid = int((url.path or "/0").lstrip("/") or 0)
            self._redis = txredisapi.lazyConnection(url.hostname or "127.0.0.1", url.port or 6379, dbid=dbid,
                                                    password=url.password, reconnect=True)
            self.keys.redis = self._redis
            self.events = EventSink(self._redis, self.clock)
            self._schedule_ping(0)
            if self.config.postgres_dsn is not None:
                self._consume_call = self.clock.callLater(1.0, self._consume)

    # -- PostgreSQL ----------------------------------------------------------

    def _connect_postgres(self) -> None:
        self._retry = None
        if self._stopped:
            return
        d = defer.Deferred.fromCoroutine(self._open())
        d.addErrback(self._postgres_failed)

    async def _open(self) -> None:
        connections = [connection(self.reactor, on_lost=self._postgres_lost) for _ in range(self.config.pool_size)]
        self._conn = conn = ConnectionSet(connections)
        results = await defer.DeferredList([c.connect(self.config.postgres_dsn) for c in connections],
                                           consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        await migrate(conn.first)  # the advisory lock belongs to one session
        self.keys.postgres = PostgresKeys(conn)
        self.backends = PostgresBackends(conn)
        if self.live is not None:
            await self.live.attach(conn)
        if self._retention is None:
            self._retention = self.clock.callLater(0, self._prune)
        self._attempts = 0
        if self.postgres_state != "up":
            log.info("stores: PostgreSQL is up")
        self.postgres_state = "up"

    def _postgres_failed(self, failure: Any) -> None:
        if self._conn is not None:
            broken, self._conn = self._conn, None
            broken.close()
        self.keys.postgres = None
        self.backends = None
        if self.live is not None:
            self.live.detach()
        self._attempts += 1
        delay = self._rng.uniform(0, min(30.0, 0.5 * 2 ** min(self._attempts, 8)))
        if self.postgres_state != "down":
            log.warn("stores: PostgreSQL unavailable ({why}); static keys and cached data serve; retrying",
                     why=failure.getErrorMessage().strip().splitlines()[0] if failure.getErrorMessage() else "?")
        self.postgres_state = "down"
        if not self._stopped:
            self._retry = self.clock.callLater(delay, self._connect_postgres)

    def _postgres_lost(self, conn: Any) -> None:
        if self._conn is None or conn not in self._conn or self._stopped:
            return
        lost, self._conn = self._conn, None
        lost.close()  # the others too: the set reconnects as a whole
        self.keys.postgres = None
        self.backends = None
        if self.live is not None:
            self.live.detach()
        self.postgres_state = "down"
        log.warn("stores: PostgreSQL connection lost; retrying")
        self._attempts = 1
        self._retry = self.clock.callLater(0.5, self._connect_postgres)

    # -- heartbeat retention ---------------------------------------------------

    def _prune(self) -> None:
        """
        Delete heartbeats older than C{heartbeat_retention}; hourly.
        """
        self._retention = None
        if self._stopped:
            return
        conn = self._conn
        if conn is not None and self.postgres_state == "up":
            d = conn.runQuery(
                "WITH gone AS (DELETE FROM heartbeats WHERE at < now() - make_interval(secs => %s) RETURNING 1),"
                " old AS (DELETE FROM request_events WHERE at < now() - make_interval(secs => %s) RETURNING 1)"
                " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM old)",
                (self.config.heartbeat_retention, self.config.heartbeat_retention),
            )

            def pruned(rows: Any) -> None:
                heartbeats, requests = rows[0]
                self.heartbeats_deleted += heartbeats
                self.requests_deleted += requests
                if heartbeats or requests:
                    log.info("stores: deleted {heartbeats} heartbeat(s) and {requests} request record(s) older "
                             "than {days:g} day(s)", heartbeats=heartbeats, requests=requests,
                             days=self.config.heartbeat_retention / 86400)

            d.addCallbacks(pruned, lambda f: log.warn("stores: heartbeat retention failed: {why}",
                                                      why=f.getErrorMessage().strip()))
        self._retention = self.clock.callLater(3600.0, self._prune)

    # -- events ----------------------------------------------------------------

    def _consume(self) -> None:
        """
        Write what the event streams hold to PostgreSQL, once a second,
        while both are up; failures are logged and retried next time.
        """
        self._consume_call = None
        if self._stopped:
            return
        if self._conn is None or self.postgres_state != "up" or self.redis_state != "up":
            self._consume_call = self.clock.callLater(1.0, self._consume)
            return
        if self._consumer is None or self._consumer_conn is not self._conn:
            self._consumer_conn = self._conn
            me = f"{socket.gethostname()}-{os.getpid()}"
            self._consumer = EventConsumer(self._redis, HEARTBEATS, "rproxy-writers", me,
                                           write_heartbeat(self._conn), self.clock)
            self._request_consumer = EventConsumer(self._redis, REQUESTS, "rproxy-writers", me,
                                                   write_request(self._conn), self.clock)
        d = defer.Deferred.fromCoroutine(self._poll_both())

        def failed(failure: Any) -> None:
            log.warn("events: writing to PostgreSQL failed ({why}); will retry",
                     why=failure.getErrorMessage().strip().splitlines()[0] if failure.getErrorMessage() else "?")

        d.addErrback(failed)
        d.addBoth(lambda _: None if self._stopped else setattr(
            self, "_consume_call", self.clock.callLater(1.0, self._consume)))

    _consumer_conn: Any = None
    _request_consumer: EventConsumer | None = None

    async def _poll_both(self) -> None:
        assert self._consumer is not None and self._request_consumer is not None
        await self._consumer.poll()
        await self._request_consumer.poll()

    # -- Redis -----------------------------------------------------------------

    def _schedule_ping(self, delay: float) -> None:
        if not self._stopped:
            self._ping = self.clock.callLater(delay, self._do_ping)

    def _do_ping(self) -> None:
        self._ping = None
        d = self._redis.ping()
        d.addTimeout(1.0, self.clock)

        def up(_: Any) -> None:
            if self.redis_state != "up":
                log.info("stores: Redis is up")
            self.redis_state = "up"

        def down(failure: Any) -> None:
            if self.redis_state != "down":
                log.warn("stores: Redis unavailable; auth goes to PostgreSQL")
            self.redis_state = "down"

        d.addCallbacks(up, down)
        d.addBoth(lambda _: self._schedule_ping(2.0))

    # -- the service -----------------------------------------------------------

    def connection(self) -> Any:
        """
        The PostgreSQL connection while it is up (else None).
        """
        return self._conn if self.postgres_state == "up" else None

    def status(self) -> dict[str, str]:
        return {"postgres": self.postgres_state, "redis": self.redis_state}

    async def stop(self) -> None:
        self._stopped = True
        if self.events is not None:
            self.events.stop()
        for call in (self._retry, self._ping, self._consume_call, self._retention):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._ping = self._consume_call = self._retention = None
        if self.live is not None:
            self.live.stop()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        if self._redis is not None:
            await self._redis.disconnect()
            self._redis = None
