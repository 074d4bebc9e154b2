"""
The running connections to PostgreSQL, Redis and Kafka, kept up in the
background, and the key chain built on them.

Nothing here blocks startup or traffic: PostgreSQL is connected (and
migrated) by one reconnect loop with backoff (L{rproxy.store.links}), Redis
reconnects by itself and is probed; while either is down the key chain
skips it (L{rproxy.store.auth}).  States are reported
for /health and /readyz.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any
from urllib.parse import urlparse

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from rproxy import ratelimit_redis
from rproxy.config import StoresConfig
from rproxy.events import (
    HEARTBEATS,
    REQUESTS,
    EventConsumer,
    EventFanout,
    EventSink,
    write_heartbeat,
    write_request,
)
from rproxy.kafka import (
    KafkaEventConsumer,
    KafkaSink,
    OffsetReader,
    make_consumer,
    make_producer,
    topics_of,
)
from rproxy.store.auth import KeyChain
from rproxy.store.backends import LiveBackends, PostgresBackends
from rproxy.store.links import PostgresLink, RedisProbe, why
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
        self._conn: Any = None
        self._stopped = False
        self._redis: Any = None
        self.link: PostgresLink | None = None
        self.probe: RedisProbe | None = None
        self._limits: ratelimit_redis.SharedBuckets | None = None
        if config.postgres_dsn is not None:
            self.link = PostgresLink(clock, lambda lost: connection(reactor, on_lost=lost), config.postgres_dsn,
                                     config.pool_size, self._prepare, self._postgres_up, self._postgres_down,
                                     rng=self._rng)
        self.events: EventSink | KafkaSink | EventFanout | None = None
        self.kafka: KafkaSink | None = None
        self._kafka_consumer: KafkaEventConsumer | None = None
        self._kafka_conn: Any = None
        self._consumer: EventConsumer | None = None
        self._consuming: task.LoopingCall | None = None
        # set by the service before start(): live pools (source: postgres)
        self.live: LiveBackends | None = None
        self.backends: PostgresBackends | None = None
        self._retention: task.LoopingCall | None = None
        self.heartbeats_deleted = 0
        self.requests_deleted = 0

    @property
    def postgres_state(self) -> str:
        """
        "off", "connecting" (no attempt has failed yet), "up" or "down".
        """
        if self.link is None:
            return "off"
        if self.link.state == "up":
            return "up"
        if self.link.state in ("idle", "connecting") and self.link.failures == 0:
            return "connecting"
        return "down"

    @property
    def redis_state(self) -> str:
        return "off" if self.probe is None else self.probe.state

    @property
    def kafka_state(self) -> str:
        return "off" if self.kafka is None else self.kafka.state

    def start(self) -> None:
        if self.link is not None:
            self.link.start()
        if self.config.redis_url is not None:
            import txredisapi

            url = urlparse(self.config.redis_url)
            dbid = int((url.path or "/0").lstrip("/") or 0)
            self._redis = txredisapi.lazyConnection(url.hostname or "127.0.0.1", url.port or 6379, dbid=dbid,
                                                    password=url.password, reconnect=True)
            # the client reconnects by itself; a short cap on its backoff is
            # what lets the probe notice Redis's return within a second or two
            self._redis._factory.maxDelay = 1.0
            self.probe = RedisProbe(self._redis, self.clock, postgres=self.config.postgres_dsn is not None,
                                    events="redis" in self.config.events)
            self._limits = ratelimit_redis.start(self.reactor, self.clock, self.config.redis_url, self.probe)
            self.keys.redis = self._redis
            self.keys.redis_probe = self.probe
            if "redis" in self.config.events:
                self.events = EventSink(self._redis, self.clock)
            self.probe.start()
            if self.config.postgres_dsn is not None and "redis" in self.config.events:
                self._consuming = self._periodic(self._consume, 1.0, now=False,
                                                 what="writing events to PostgreSQL")
        if self.config.kafka is not None and "kafka" in self.config.events:
            self._start_kafka(self.config.kafka)

    def _start_kafka(self, config: Any) -> None:
        topics = topics_of(config)
        self._offsets = OffsetReader(make_consumer(config), self.reactor)
        self.kafka = sink = KafkaSink(None, self.clock, topics, batch=config.batch, buffer_limit=config.buffer_limit,
                                      committed=self._offsets)
        sink.producer = make_producer(config, sink)
        sink.start()
        self.events = sink if self.events is None else EventFanout(self.events, sink)
        if self.config.postgres_dsn is not None:
            self._kafka_consumer = KafkaEventConsumer(make_consumer(config, sink.errors), topics.values(), sink.errors)
            self._kafka_loop = self._periodic(self._consume_kafka, 0.1, now=False,
                                              what="writing Kafka events to PostgreSQL")

    # -- PostgreSQL ----------------------------------------------------------

    async def _prepare(self, conn: ConnectionSet) -> None:
        await migrate(conn.first)  # the advisory lock belongs to one session
        if self.live is not None:
            await self.live.attach(conn)

    def _postgres_up(self, conn: ConnectionSet) -> None:
        self._conn = conn
        self.keys.postgres = PostgresKeys(conn)
        self.backends = PostgresBackends(conn)
        if self._retention is None and not self._stopped:
            self._retention = self._periodic(self._prune, 3600.0, now=True,
                                             what="heartbeat retention")

    def _postgres_down(self) -> None:
        self._conn = None
        self.keys.postgres = None
        self.backends = None
        if self.live is not None:
            self.live.detach()

    # -- heartbeat retention ---------------------------------------------------

    def _periodic(self, job: Any, interval: float, now: bool, what: str) -> task.LoopingCall:
        """
        Run C{job} every C{interval} seconds; a failure is logged and the
        loop goes on (a LoopingCall stops for good on its first error).
        """

        def guarded() -> Any:
            d = defer.maybeDeferred(job)
            return d.addErrback(lambda f: log.warn("stores: {what} failed ({why}); will retry", what=what,
                                                   why=why(f)))

        loop = task.LoopingCall(guarded)
        loop.clock = self.clock
        loop.start(interval, now=now).addErrback(lambda f: log.failure("stores: {what} stopped", f, what=what))
        return loop

    def _prune(self) -> Any:
        """
        Delete heartbeats older than C{heartbeat_retention}; hourly, while PostgreSQL is up.
        """
        conn = self.connection()
        if conn is None:
            return None
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

        return d.addCallback(pruned)  # its failure is logged by _periodic

    # -- events ----------------------------------------------------------------

    def _consume(self) -> Any:
        """
        Write what the event streams hold to PostgreSQL, once a second,
        while both are up; failures are logged and retried next time.
        """
        if self._conn is None or self.postgres_state != "up" or self.redis_state != "up":
            return None
        if self._consumer is None:
            me = f"{socket.gethostname()}-{os.getpid()}"
            self._consumer = EventConsumer(self._redis, HEARTBEATS, "rproxy-writers", me,
                                           write_heartbeat(self._conn), self.clock)
            self._request_consumer = EventConsumer(self._redis, REQUESTS, "rproxy-writers", me,
                                                   write_request(self._conn), self.clock)
            self._consumer_conn = self._conn
        if self._consumer_conn is not self._conn:
            # the same consumers (and counters), writing through the new connection
            assert self._request_consumer is not None
            self._consumer_conn = self._conn
            self._consumer.handle = write_heartbeat(self._conn)
            self._request_consumer.handle = write_request(self._conn)
        return defer.Deferred.fromCoroutine(self._poll_both())

    _consumer_conn: Any = None
    _kafka_loop: task.LoopingCall | None = None
    _offsets: OffsetReader | None = None

    def _consume_kafka(self) -> Any:
        """
        Write what the event topics hold to PostgreSQL, every 100 ms while
        it is up; failures are logged and retried next time.
        """
        consumer = self._kafka_consumer
        if consumer is None or self._conn is None or self.postgres_state != "up":
            return None
        if self._kafka_conn is not self._conn:
            self._kafka_conn = self._conn
            assert self.config.kafka is not None
            config = self.config.kafka
            consumer.handlers = {config.heartbeats_topic: write_heartbeat(self._conn),
                                 config.requests_topic: write_request(self._conn)}
        return defer.Deferred.fromCoroutine(consumer.poll())
    _request_consumer: EventConsumer | None = None

    async def _poll_both(self) -> None:
        assert self._consumer is not None and self._request_consumer is not None
        await self._consumer.poll()
        await self._request_consumer.poll()

    def events_rejected(self) -> dict[str, int]:
        """
        Events the writers dropped because they can never be written
        (malformed, or refused by PostgreSQL for their data), per event
        transport that has a writer here.
        """
        counts = {}
        if self._consumer is not None and self._request_consumer is not None:
            counts["redis"] = self._consumer.rejected + self._request_consumer.rejected
        if self._kafka_consumer is not None:
            counts["kafka"] = self._kafka_consumer.rejected
        return counts

    # -- the service -----------------------------------------------------------

    def connection(self) -> Any:
        """
        The PostgreSQL connection while it is up (else None).
        """
        return self._conn if self.postgres_state == "up" else None

    def status(self) -> dict[str, str]:
        states = {"postgres": self.postgres_state, "redis": self.redis_state}
        if self.kafka is not None:
            states["kafka"] = self.kafka_state
        return states

    async def stop(self) -> None:
        self._stopped = True
        for sink in getattr(self.events, "sinks", (self.events,)):
            if isinstance(sink, EventSink):
                await sink.stop()  # (sends what is buffered, for a second at most)
        if self.probe is not None:
            self.probe.stop()
            ratelimit_redis.stop(self._limits)
        for loop in (self._consuming, self._retention, self._kafka_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._consuming = self._retention = self._kafka_loop = None
        if self.kafka is not None:
            await self.kafka.stop()
        if self._kafka_consumer is not None:
            # close() leaves the group (a round trip): on a thread, not the reactor's
            consumer, self._kafka_consumer = self._kafka_consumer.consumer, None
            await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), consumer.close)
        if self._offsets is not None:
            reader, self._offsets = self._offsets, None
            await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), reader.close)
        if self.link is not None:
            self.link.stop()
        if self.live is not None:
            self.live.stop()
        if self._redis is not None:
            await self._redis.disconnect()
            self._redis = None
