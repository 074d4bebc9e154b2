"""
Events on Kafka topics, and the consumer group that writes them to PostgreSQL.

The client is librdkafka through C{confluent-kafka}, driven from the
reactor thread without ever waiting: C{produce()} only appends to
librdkafka's queue (its own threads do the network I/O, batching,
retries and reconnects), and delivery reports and errors are served by
C{poll(0)}, which a L{LoopingCall} runs every 50 ms, so every callback
runs on the reactor thread.  The one call that waits for the broker
(reading the group's committed offsets, L{OffsetReader}) runs on the
reactor's thread pool.  (C{aiokafka} would need the asyncio reactor, which
rproxy does not run; C{afkak} has had no release since 2021.)

L{KafkaSink} gives the same guarantees as the Redis Streams sink
(L{rproxy.events.EventSink}): C{emit} returns at once; events wait, while
the broker is down, in a bounded buffer (C{buffer_limit} events, counting
what librdkafka holds), and past it they are dropped and counted; an
event not delivered within C{delivery_timeout} is dropped and counted
too.  Each event carries its own id (C{_id}), so a record delivered or
sent twice is written once.  What the broker acknowledged is kept
(C{keep_limit} events) until the consumer group has committed past it:
a broker that comes back without its data (a partition's offsets start
again from zero, or the group's committed offsets went backwards or
vanished) gets those events again, and what no longer fits
is counted as C{lost}.

L{KafkaEventConsumer} is one member of a consumer group: it writes each
event through the same handlers as the Redis consumer and commits the
offsets only after those writes committed, so delivery is at least once
and the writes, keyed by the event id, are idempotent.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rproxy.events import HEARTBEATS, REQUESTS, rejected

__all__ = ["ClientErrors", "KafkaSink", "KafkaEventConsumer", "OffsetReader", "make_producer", "make_consumer",
           "topics_of"]

FLUSH_DELAY = 0.01
METADATA_REFRESH_MS = 10_000
log = Logger()

Handle = Callable[[str, dict[str, Any]], Awaitable[None]]
Offsets = dict[tuple[str, int], int]


def topics_of(config: Any) -> dict[str, str]:
    """
    The event stream names rproxy emits on -> the configured topics.
    """
    return {HEARTBEATS: config.heartbeats_topic, REQUESTS: config.requests_topic}


class ClientErrors:
    """
    What librdkafka's clients report about the broker (their log lines,
    error callbacks, a consumer's error messages, the offsets check),
    kept to about one log line a minute.  With the broker down librdkafka
    repeats a refused connection at every reconnect backoff, for each
    client: some 4,000 lines a minute, which twistd writes whatever their
    level.  So an error is logged (warning) only when none was in the
    last C{interval} seconds, saying how many came meanwhile; the others
    are only counted.  The sink logs the broker's state changes itself
    (down, up again with the count of errors not logged).

    librdkafka's other lines (notices, info) and every error line are
    logged at debug level only with C{detail}: the environment variable
    C{RPROXY_KAFKA_DEBUG=1}.

    Called on the reactor thread only (C{poll()} and C{consume()} serve
    the callbacks there).

    @ivar count: every error reported.
    """

    def __init__(self, clock: Any, interval: float = 60.0, detail: bool | None = None) -> None:
        self.clock = clock
        self.interval = interval
        self.detail = os.environ.get("RPROXY_KAFKA_DEBUG") == "1" if detail is None else detail
        self.count = 0
        self._unlogged = 0
        self._logged_at: float | None = None

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """
        librdkafka's C{logger} (it passes C{logging} levels).
        """
        line = fmt % args if args else fmt
        if level >= logging.ERROR:
            self.error("librdkafka", line)
        elif self.detail:
            log.debug("librdkafka: {line}", line=line)

    def callback(self, source: str) -> Callable[[Any], None]:
        """
        An C{error_cb} for the client C{source}.
        """
        return lambda err: self.error(source, str(err))

    def error(self, source: str, why: str) -> None:
        self.count += 1
        if self.detail:
            log.debug("kafka: {source}: {why}", source=source, why=why)
        now = self.clock.seconds()
        if self._logged_at is not None and now - self._logged_at < self.interval:
            self._unlogged += 1
            return
        if self._unlogged:
            log.warn("kafka: {source}: {why} ({n} more errors not logged in the last {secs:.0f}s)",
                     source=source, why=why, n=self._unlogged, secs=now - self._logged_at)
        else:
            log.warn("kafka: {source}: {why} (the next errors are counted, logged at most once a minute)",
                     source=source, why=why)
        self._logged_at = now
        self._unlogged = 0

    def unlogged(self) -> int:
        """
        The errors not logged since the last one that was; they count as
        logged from now on (the sink said the broker answers again).
        """
        n, self._unlogged = self._unlogged, 0
        return n


def _common(config: Any, errors: ClientErrors | None) -> dict[str, Any]:
    common = {"bootstrap.servers": ",".join(config.bootstrap_servers), "client.id": config.client_id,
              # reconnect quickly once the broker is back, without hammering it meanwhile
              "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 2000, "log.connection.close": False,
              # a topic that did not exist yet (a fresh broker creates it at the
              # first record) is seen within 10 s: librdkafka's default, 5 min,
              # left the writers subscribed to nothing that long
              "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS}
    if errors is None:
        common["log_level"] = 0  # (served by a poll on another thread, or by none)
    else:
        common["logger"] = errors
    return common


def make_producer(config: Any, sink: KafkaSink) -> Any:
    """
    A librdkafka producer for C{config} (a L{KafkaConfig}) reporting its
    errors to C{sink}, from C{poll()}, on the reactor thread.
    """
    from confluent_kafka import Producer

    return Producer({
        **_common(config, sink.errors),
        "acks": config.acks,
        "linger.ms": 5,
        "compression.type": config.compression,
        # the sink bounds what it hands over; librdkafka's own bound is above it
        "queue.buffering.max.messages": max(1000, config.buffer_limit * 2),
        "message.timeout.ms": int(config.delivery_timeout * 1000),
        # the event id makes a repeated record harmless; librdkafka's
        # idempotent mode would want a broker feature a test broker may lack
        "enable.idempotence": False,
        "error_cb": sink.on_error,
    })


def make_consumer(config: Any, errors: ClientErrors | None = None) -> Any:
    """
    A member of the writers' group reporting its errors to C{errors}, or
    (without) a client of the group that only reads its committed
    offsets, from a thread: its log and errors are silenced (they would
    be served on that thread; the failed reads are reported instead).
    """
    from confluent_kafka import Consumer

    session = int(config.session_timeout * 1000)
    return Consumer({
        **_common(config, errors),
        "group.id": config.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session,
        "heartbeat.interval.ms": max(100, min(3000, session // 3)),
        "fetch.wait.max.ms": 100,
        "error_cb": _ignore if errors is None else errors.callback("consumer"),
        "on_commit": _committed,
    })


def _ignore(err: Any) -> None:
    pass


def _committed(err: Any, partitions: Any) -> None:
    if err is not None:
        # the records are read again by whoever owns them next: written once all the same
        log.info("kafka: committing offsets failed ({why}); they will be read again", why=str(err))


class OffsetReader:
    """
    Reads the offsets the consumer group committed, for the sink's
    check, through a consumer of the group that never joins it (no
    subscription).  C{committed()} waits for the broker, so it runs on
    the reactor's thread pool; the result comes back as a Deferred on the
    reactor thread.  (librdkafka's admin client would answer through
    futures, but aborts the process when a group-offsets request times
    out while the broker is down.)
    """

    def __init__(self, consumer: Any, reactor: Any, timeout: float = 2.0) -> None:
        self.consumer = consumer
        self.reactor = reactor
        self.timeout = timeout

    def __call__(self, partitions: Iterable[tuple[str, int]]) -> defer.Deferred[Offsets]:
        from twisted.internet import threads

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._read, list(partitions))

    def _read(self, partitions: list[tuple[str, int]]) -> Offsets:
        from confluent_kafka import TopicPartition

        try:
            if not partitions:
                self.consumer.list_topics(timeout=self.timeout)  # the broker answers: that is all
                return {}
            answer = self.consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=self.timeout)
            # no commit (a broker that lost the group): OFFSET_INVALID, below any offset
            return {(tp.topic, tp.partition): max(-1, tp.offset) for tp in answer if tp.error is None}
        finally:
            self.consumer.poll(0)  # serve its queued errors, so they do not pile up

    def close(self) -> None:
        self.consumer.close()


class KafkaSink:
    """
    See the module docstring.

    @ivar emitted: events handed to L{emit}.
    @ivar sent: events the broker acknowledged (each counted once).
    @ivar dropped: events never acknowledged: the buffer was full, the
        delivery timed out, or the sink stopped with them.  Always
        C{emitted == sent + dropped + len(buffer) + in_flight}.
    @ivar resent: acknowledged events sent again because the broker lost them.
    @ivar lost: acknowledged events the broker lost that could not be sent
        again (beyond C{keep_limit}, or no room in the buffer).
    @ivar confirmed: acknowledged events the group has committed past
        (forgotten: they are in PostgreSQL).
    @ivar state: C{"connecting"} until the broker first answers, then
        C{"up"} or C{"down"}.
    """

    kind = "kafka"

    def __init__(self, producer: Any, clock: Any, topics: Mapping[str, str], batch: int = 100,
                 buffer_limit: int = 10_000, keep_limit: int = 10_000,
                 committed: Callable[[Iterable[tuple[str, int]]], defer.Deferred[Offsets]] | None = None,
                 confirm_interval: float = 1.0, poll_interval: float = 0.05) -> None:
        self.producer = producer
        self.clock = clock
        self.topics = dict(topics)
        self.batch = batch
        self.buffer_limit = buffer_limit
        self.keep_limit = keep_limit
        self.committed = committed
        self.confirm_interval = confirm_interval
        self.poll_interval = poll_interval
        self.buffer: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        # acknowledged and not yet committed by the group: (topic, partition, offset, events)
        self.unconfirmed: collections.deque[tuple[str, int, int, list[dict[str, Any]]]] = collections.deque()
        self._again: collections.deque[tuple[str, list[dict[str, Any]]]] = collections.deque()
        self._kept = 0
        self._seen: Offsets = {}  # the group's committed offsets, as last read
        self._acked: Offsets = {}  # the last offset acknowledged, per partition
        self.in_flight = 0
        self.emitted = self.sent = self.dropped = self.resent = self.lost = self.confirmed = 0
        self.state = "connecting"
        #: librdkafka's errors, logged at most once a minute
        self.errors = ClientErrors(clock)
        self._timer: IDelayedCall | None = None
        self._loops: list[task.LoopingCall] = []
        self._confirming: defer.Deferred[None] | None = None
        self._stopped = False
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._serial = 0

    # -- the hot side ----------------------------------------------------------

    def emit(self, stream: str, event: dict[str, Any]) -> None:
        """
        Queue C{event} for the topic of C{stream}; returns at once.
        """
        self.emitted += 1
        if self._stopped or len(self.buffer) + self.in_flight >= self.buffer_limit:
            self.dropped += 1
            return
        self._serial += 1
        event.setdefault("_id", f"{self._prefix}{self._serial}")
        self.buffer.append((self.topics.get(stream, stream), event))
        if self._timer is None:
            # what comes in the next few milliseconds shares the records
            self._timer = self.clock.callLater(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        self._timer = None
        again, buffer = self._again, self.buffer
        while again:
            topic, events = again[0]
            if not self._produce(topic, events, resend=True):
                return self._retry_later()
            again.popleft()
        chunks: list[tuple[str, list[dict[str, Any]]]] = []
        batches: dict[str, list[dict[str, Any]]] = {}
        while buffer:
            topic, event = buffer.popleft()
            events = batches.setdefault(topic, [])
            events.append(event)
            if len(events) >= self.batch:
                chunks.append((topic, batches.pop(topic)))
        chunks.extend(batches.items())
        for i, (topic, events) in enumerate(chunks):
            if not self._produce(topic, events, resend=False):
                for topic, events in reversed(chunks[i:]):  # back to the head, in order
                    buffer.extendleft((topic, e) for e in reversed(events))
                return self._retry_later()
        self.producer.poll(0)

    def _produce(self, topic: str, events: list[dict[str, Any]], resend: bool) -> bool:
        """
        Hand one record to librdkafka; False when its queue is full (the
        caller keeps the events).
        """
        value = json.dumps(events if self.batch > 1 else events[0], separators=(",", ":"), default=str)
        try:
            self.producer.produce(topic, value.encode(), on_delivery=functools.partial(self._delivered, events, resend))
        except BufferError:
            return False
        self.in_flight += len(events)
        return True

    def _retry_later(self) -> None:
        self.producer.poll(0)
        if self._timer is None and not self._stopped:
            self._timer = self.clock.callLater(0.1, self._flush)

    def _delivered(self, events: list[dict[str, Any]], resend: bool, err: Any, msg: Any) -> None:
        """
        A delivery report, served by C{poll()} on the reactor thread.
        """
        n = len(events)
        self.in_flight -= n
        if err is not None:
            if resend:
                self.lost += n
            else:
                self.dropped += n
            if self.state != "down":
                log.warn("kafka: {n} event(s) not delivered ({why}); events are dropped until the broker answers",
                         n=n, why=str(err))
                self.state = "down"
            return
        if resend:
            self.resent += n
        else:
            self.sent += n
        self._set_up()
        key, offset = (msg.topic(), msg.partition()), msg.offset()
        if offset >= 0 and self.committed is not None:
            last = self._acked.get(key)
            if last is not None and offset <= last:
                # offsets only grow: the partition's log started again, empty
                self._seen.pop(key, None)  # the group's offsets went with it: this loss is handled
                self._send_again(key, f"its log started again at offset {offset}")
            self._acked[key] = offset
        self._keep(key[0], key[1], offset, events)

    def on_error(self, err: Any) -> None:
        """
        librdkafka's error callback (from C{poll()}): only a broker that
        cannot be reached at all changes the state; the rest (and that
        one repeated) goes to L{errors}.
        """
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._ALL_BROKERS_DOWN and self.state != "down":
            self.state = "down"
            log.warn("kafka: no broker reachable; {n} event(s) waiting", n=len(self.buffer) + self.in_flight)
        else:
            self.errors.error("producer", str(err))

    def _set_up(self) -> None:
        if self.state != "up":
            if self.state == "down":
                log.info("kafka: the broker answers again ({n} errors meanwhile not logged)",
                         n=self.errors.unlogged())
            self.state = "up"

    # -- what the broker may lose ----------------------------------------------

    def _keep(self, topic: str, partition: int, offset: int, events: list[dict[str, Any]]) -> None:
        if self.committed is None or offset < 0:
            return
        self.unconfirmed.append((topic, partition, offset, events))
        self._kept += len(events)
        while self._kept > self.keep_limit:
            old = self.unconfirmed.popleft()
            self._kept -= len(old[3])

    def _confirm(self) -> defer.Deferred[None] | None:
        """
        The periodic check against the group's committed offsets; it is
        also the broker's health probe.  Its failures go to L{errors} and
        the next tick tries again.
        """
        if self.committed is None or self._confirming is not None or self._stopped:
            return None
        d = self._confirming = self.committed({(t, p) for t, p, _, _ in self.unconfirmed} | set(self._seen))
        # (the reader has its own, shorter timeout: this one is the backstop)
        d.addTimeout(max(5.0, self.confirm_interval * 2), self.clock)
        d.addCallback(self._check)

        def failed(f: Any) -> None:
            self.errors.error("offsets", f.getErrorMessage())

        def done(_: Any) -> None:
            self._confirming = None

        return d.addErrback(failed).addBoth(done)

    def _check(self, committed: Offsets) -> None:
        self._set_up()
        for key, now in committed.items():
            before = self._seen.get(key)
            if before is not None and now < before:
                self._send_again(key, "the group's committed offset went back")
            else:
                self._forget(key, now)
            if now >= 0:
                self._seen[key] = now
            else:
                self._seen.pop(key, None)

    def _forget(self, key: tuple[str, int], upto: int) -> None:
        """
        The group committed past these: they are in PostgreSQL.
        """
        kept: collections.deque[tuple[str, int, int, list[dict[str, Any]]]] = collections.deque()
        for entry in self.unconfirmed:
            if (entry[0], entry[1]) == key and entry[2] < upto:
                self._kept -= len(entry[3])
                self.confirmed += len(entry[3])
            else:
                kept.append(entry)
        self.unconfirmed = kept

    def _send_again(self, key: tuple[str, int], why: str) -> None:
        """
        The broker lost what it held of partition C{key}: what it
        acknowledged and the group did not commit, of every partition, is
        queued again, ahead of the buffer, as far as there is room.  Every
        partition: a broker that came back without one partition's data
        lost the others it held too, and one that no record went to since
        (or whose group never committed: nothing to see go back) would
        never show it; what was not lost is written once all the same.
        What the partitions' offsets and commits were is forgotten: they
        were the old logs'.
        """
        again = list(self.unconfirmed)
        if not again:
            return
        self.unconfirmed = collections.deque()
        self._acked.clear()
        self._seen.clear()
        count = sum(len(e[3]) for e in again)
        self._kept -= count
        room = max(0, self.buffer_limit - len(self.buffer) - self.in_flight - sum(len(e) for _, e in self._again))
        queued = 0
        for topic, _, _, events in reversed(again):  # the newest are kept
            if len(events) <= room - queued:
                self._again.appendleft((topic, events))
                queued += len(events)
            else:
                self.lost += len(events)
        log.warn("kafka: the broker lost {topic}[{partition}] ({why}); sending {n} event(s) not yet committed "
                 "again, of every partition, {lost} lost", topic=key[0], partition=key[1], why=why, n=queued,
                 lost=count - queued)
        if self._timer is None and not self._stopped:
            self._timer = self.clock.callLater(0, self._flush)

    # -- the service -----------------------------------------------------------

    def start(self) -> None:
        for job, interval in ((self._poll, self.poll_interval), (self._confirm, self.confirm_interval)):
            loop = task.LoopingCall(job)
            loop.clock = self.clock
            loop.start(interval, now=True).addErrback(lambda f: log.failure("kafka: a periodic job stopped", f))
            self._loops.append(loop)

    def _poll(self) -> None:
        try:
            self.producer.poll(0)
        except Exception:  # noqa: BLE001 - a callback raised: logged, and the loop goes on
            log.failure("kafka: serving delivery reports failed")

    async def stop(self, grace: float = 2.0) -> None:
        """
        Stop taking events; hand what is buffered to librdkafka (unless
        the broker is known to be down) and give what it holds C{grace}
        seconds to be delivered; count the rest (and what could not be
        handed over) as dropped.  (The buffer was dropped at once, broker
        up or not: the last events of a clean stop were lost.)
        """
        self._stopped = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.state != "down" and (self.buffer or self._again):
            self._flush()  # (what librdkafka's queue cannot take stays buffered)
        waiting = len(self.buffer) + sum(len(e) for _, e in self._again)
        if waiting:
            self.dropped += len(self.buffer)
            self.lost += waiting - len(self.buffer)
            self.buffer.clear()
            self._again.clear()
        deadline = self.clock.seconds() + grace
        while self.in_flight and self.clock.seconds() < deadline:
            self.producer.poll(0)
            await task.deferLater(self.clock, 0.02, lambda: None)
        if self.in_flight:
            log.warn("kafka: stopping with {n} event(s) not delivered; they are lost", n=self.in_flight)
            self.producer.purge()
            self.producer.poll(0)  # the purged records' reports count them as dropped
        if self._confirming is not None:
            # librdkafka must not be torn down under an admin request in flight
            await self._confirming
        # the clients hold the sink (their callbacks): let them go now
        self.producer = self.committed = None


class KafkaEventConsumer:
    """
    One member of the consumer group on the event topics; L{poll} it
    periodically (it never waits on the broker).

    @ivar handlers: topic -> the handler writing its events (set by the
        owner, again whenever the PostgreSQL connection changes).
    """

    def __init__(self, consumer: Any, topics: Iterable[str], errors: ClientErrors, batch: int = 500) -> None:
        self.consumer = consumer
        self.topics = list(topics)
        self.errors = errors
        self.batch = batch
        self.handlers: dict[str, Handle] = {}
        self.processed = 0
        #: events dropped because they can never be written (see L{rejected})
        self.rejected = 0
        self._pending: collections.deque[Any] = collections.deque()
        self._next = 0  # the next event of the first pending record
        self._subscribed = False

    async def poll(self) -> int:
        """
        Write what was fetched (or what a failed write left pending) to
        PostgreSQL, then commit its offsets; return how many events were
        written.  A failure (PostgreSQL down) leaves the records from the
        failed event on pending for the next call, and commits the ones
        done before it.

        An event that can never be written (L{rejected}: malformed, or
        refused by PostgreSQL for its data) is logged once, counted in
        C{rejected} and passed; one such event was retried at every call,
        and nothing behind it was ever written, across restarts too (its
        offset was never committed).
        """
        if not self._subscribed:
            self.consumer.subscribe(self.topics)
            self._subscribed = True
        pending = self._pending
        if not pending:
            pending.extend(self.consumer.consume(self.batch, 0))
        handled = 0
        offsets: dict[tuple[str, int], int] = {}
        try:
            while pending:
                msg = pending[0]
                if msg.error() is not None:
                    self.errors.error("consumer", str(msg.error()))
                else:
                    handled += await self._handle(msg)
                    offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
                pending.popleft()
                self._next = 0
        finally:
            if offsets:
                from confluent_kafka import TopicPartition

                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                     asynchronous=True)
        return handled

    async def _handle(self, msg: Any) -> int:
        """
        Write the events of C{msg} from event C{_next} on; a failure that is
        not the event's fault leaves C{_next} at it.
        """
        topic = msg.topic()
        where = f"{topic}/{msg.partition()}/{msg.offset()}"
        handle = self.handlers.get(topic)
        try:
            decoded = json.loads(msg.value())
            events = decoded if isinstance(decoded, list) else [decoded]
            if handle is None or not all(isinstance(e, dict) for e in events):
                raise ValueError("not an event")
        except (TypeError, ValueError):
            log.warn("kafka: skipping a malformed record at {where}", where=where)
            self.rejected += 1
            return 0
        count = 0
        while self._next < len(events):
            i = self._next
            try:
                await handle(f"{where}#{i}", events[i])
            except Exception as e:
                if not rejected(e):
                    raise
                log.warn("kafka: skipping an event in {where} that cannot be written: {why}", where=where,
                         why=repr(e))
                self.rejected += 1
            else:
                count += 1
                self.processed += 1
            self._next = i + 1
        return count
