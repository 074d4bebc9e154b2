"""
The Kafka event sink and consumer as state machines, with recording fakes
of librdkafka's producer and consumer and a L{Clock}; and the
C{stores.kafka} section of the configuration.  (Against a real broker:
L{tests.test_e2e_kafka}.)
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, parse_config
from rproxy.config.model import KafkaConfig
from rproxy.events import HEARTBEATS, REQUESTS, EventFanout, EventSink
from rproxy.kafka import ClientErrors, KafkaEventConsumer, KafkaSink

TOPICS = {HEARTBEATS: "hb", REQUESTS: "rq"}


class Message:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes = b"", error: Any = None) -> None:
        self._topic, self._partition, self._offset, self._value, self._error = topic, partition, offset, value, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def error(self) -> Any:
        return self._error


class FakeProducer:
    """
    librdkafka's producer as the sink sees it: C{produce} queues (up to
    C{limit} records), C{poll} serves the reports the test released.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self.queued: list[tuple[str, list[dict[str, Any]], Any]] = []
        self.reports: list[tuple[Any, Any, Any]] = []
        self.offsets: dict[str, int] = {}
        self.purged = False

    def produce(self, topic: str, value: bytes, on_delivery: Any) -> None:
        if len(self.queued) >= self.limit:
            raise BufferError("queue full")
        decoded = json.loads(value)
        self.queued.append((topic, decoded if isinstance(decoded, list) else [decoded], on_delivery))

    def ack(self, count: int | None = None, error: Any = None) -> None:
        """
        The broker answers the first C{count} queued records.
        """
        count = len(self.queued) if count is None else count
        for topic, _, report in self.queued[:count]:
            offset = self.offsets.get(topic, 0)
            self.offsets[topic] = offset + 1
            self.reports.append((report, error, Message(topic, 0, offset)))
        del self.queued[:count]

    def poll(self, timeout: float) -> int:
        reports, self.reports = self.reports, []
        for report, error, msg in reports:
            report(error, msg)
        return len(reports)

    def purge(self) -> None:
        self.purged = True
        for _, _, report in self.queued:
            self.reports.append((report, "purged", None))
        self.queued = []

    def __len__(self) -> int:
        return len(self.queued)


def beat(i: int) -> dict[str, Any]:
    return {"agent_id": "gpu-01", "at": 1_700_000_000 + i}


class KafkaSinkTests(SynchronousTestCase):
    def make(self, **kwargs: Any) -> tuple[KafkaSink, FakeProducer, Clock]:
        clock, producer = Clock(), FakeProducer(kwargs.pop("limit", 1000))
        sink = KafkaSink(producer, clock, TOPICS, **kwargs)
        sink.start()
        self.addCleanup(lambda: sink._stopped or defer.Deferred.fromCoroutine(sink.stop(grace=0)))
        return sink, producer, clock

    def balanced(self, sink: KafkaSink) -> None:
        self.assertEqual(sink.emitted, sink.sent + sink.dropped + len(sink.buffer) + sink.in_flight)

    def test_events_batched_into_records(self) -> None:
        """Events emitted within 10 ms share records of at most C{batch} events, per topic, each with its own id."""
        sink, producer, clock = self.make(batch=10)
        for i in range(25):
            sink.emit(HEARTBEATS, beat(i))
        sink.emit(REQUESTS, {"key": "k"})
        self.assertEqual(producer.queued, [])  # nothing is sent on the caller's stack
        clock.advance(0.01)
        self.assertEqual([(t, len(events)) for t, events, _ in producer.queued],
                         [("hb", 10), ("hb", 10), ("hb", 5), ("rq", 1)])
        ids = [e["_id"] for _, events, _ in producer.queued for e in events]
        self.assertEqual(len(set(ids)), 26)
        self.assertEqual((sink.in_flight, sink.sent), (26, 0))
        producer.ack()
        clock.advance(0.05)  # the poll loop serves the reports
        self.assertEqual((sink.in_flight, sink.sent, sink.state), (0, 26, "up"))
        self.balanced(sink)

    def test_batch_of_one_sends_plain_objects(self) -> None:
        """With C{batch: 1} each record is one JSON object, as a consumer of plain events expects."""
        sink, producer, clock = self.make(batch=1)
        captured: list[bytes] = []
        producer.produce = lambda topic, value, on_delivery: captured.append(value)  # type: ignore[method-assign]
        sink.emit(HEARTBEATS, beat(1))
        clock.advance(0.01)
        self.assertEqual(json.loads(captured[0])["agent_id"], "gpu-01")

    def test_full_buffer_drops_and_counts(self) -> None:
        """Past C{buffer_limit} events waiting or in flight, events are dropped and counted, never queued."""
        sink, producer, clock = self.make(buffer_limit=50)
        for i in range(80):
            sink.emit(HEARTBEATS, beat(i))
        self.assertEqual((len(sink.buffer), sink.dropped), (50, 30))
        clock.advance(0.01)
        sink.emit(HEARTBEATS, beat(99))  # still full: in flight now
        self.assertEqual((sink.in_flight, sink.dropped), (50, 31))
        self.balanced(sink)

    def test_librdkafka_queue_full_keeps_events(self) -> None:
        """When librdkafka refuses a record, its events stay at the head of the buffer, in order, and go out later."""
        sink, producer, clock = self.make(batch=10, limit=1)
        for i in range(30):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        self.assertEqual((len(producer.queued), len(sink.buffer)), (1, 20))
        self.assertEqual(sink.buffer[0][1]["at"], 1_700_000_010)
        producer.ack()
        clock.advance(0.1)
        producer.ack()
        clock.advance(0.1)
        producer.ack()
        clock.advance(0.1)
        self.assertEqual((sink.sent, sink.dropped, len(sink.buffer)), (30, 0, 0))

    def test_undelivered_records_are_dropped(self) -> None:
        """A delivery that fails (timeout, broker gone) counts its events as dropped and the state as down, once."""
        sink, producer, clock = self.make()
        for i in range(5):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack(error="timed out")
        clock.advance(0.05)
        self.assertEqual((sink.dropped, sink.sent, sink.state), (5, 0, "down"))
        sink.emit(HEARTBEATS, beat(6))
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        self.assertEqual((sink.sent, sink.state), (1, "up"))
        self.balanced(sink)

    def committed_sink(self, offsets: dict[tuple[str, int], int], **kwargs: Any) -> tuple[KafkaSink, FakeProducer, Clock]:
        # the broker's answer: every partition asked about, -1 where the group committed nothing
        return self.make(committed=lambda keys: defer.succeed({**{k: -1 for k in keys}, **offsets}), **kwargs)

    def test_committed_records_are_forgotten(self) -> None:
        """Acknowledged records are kept until the group commits past them."""
        offsets: dict[tuple[str, int], int] = {}
        sink, producer, clock = self.committed_sink(offsets, batch=1)
        for i in range(4):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        self.assertEqual([o for _, _, o, _ in sink.unconfirmed], [0, 1, 2, 3])
        offsets[("hb", 0)] = 3
        clock.advance(1.0)
        self.assertEqual([o for _, _, o, _ in sink.unconfirmed], [3])
        self.assertEqual(sink.confirmed, 3)

    def test_broker_that_lost_its_data_gets_it_again(self) -> None:
        """
        When the group's committed offset goes back (the broker came back
        empty), what it acknowledged and nobody committed is sent again,
        counted as resent, with the same ids.
        """
        offsets: dict[tuple[str, int], int] = {}
        sink, producer, clock = self.committed_sink(offsets, batch=1)
        for i in range(5):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack()
        offsets[("hb", 0)] = 2
        clock.advance(1.0)
        ids = [events[0]["_id"] for _, _, _, events in sink.unconfirmed]
        self.assertEqual(len(ids), 3)
        offsets.clear()  # a new, empty broker: the group's offsets are gone
        clock.advance(1.0)
        self.assertEqual([events[0]["_id"] for _, events, _ in producer.queued], ids)
        producer.ack()
        clock.advance(0.05)
        self.assertEqual((sink.sent, sink.resent, sink.lost), (5, 3, 0))
        self.balanced(sink)

    def test_partition_log_restarted_is_sent_again(self) -> None:
        """
        A delivery report with an offset at or below one acknowledged
        before (the broker came back empty, before the group committed
        anything) sends again what the partition held, once.
        """
        sink, producer, clock = self.committed_sink({}, batch=1)
        for i in range(3):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        producer.offsets.clear()  # a new broker: offsets from 0 again
        sink.emit(HEARTBEATS, beat(3))
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        self.assertEqual([e["at"] - 1_700_000_000 for _, events, _ in producer.queued for e in events], [0, 1, 2])
        producer.ack()
        clock.advance(1.0)
        self.assertEqual((sink.sent, sink.resent, sink.lost, len(producer.queued)), (4, 3, 0, 0))

    def test_a_lost_partition_sends_every_partition_again(self) -> None:
        """
        A broker seen to have lost one partition (its log started again)
        lost the others too: what every partition holds uncommitted is sent
        again, request records the group never committed included (no
        commit to see go back, and no record sent to their partition since:
        they were lost without a count).
        """
        sink, producer, clock = self.committed_sink({}, batch=1)
        for i in range(2):
            sink.emit(HEARTBEATS, beat(i))
        sink.emit(REQUESTS, {"at": 1_700_000_010, "key": "team", "agent_id": "a"})
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        producer.offsets.clear()  # a new, empty broker
        sink.emit(HEARTBEATS, beat(3))
        clock.advance(0.01)
        producer.ack()
        clock.advance(0.05)
        self.assertEqual(sorted((topic, e["at"] - 1_700_000_000) for topic, events, _ in producer.queued
                                for e in events), [("hb", 0), ("hb", 1), ("rq", 10)])
        producer.ack()
        clock.advance(1.0)
        self.assertEqual((sink.sent, sink.resent, sink.lost, len(producer.queued)), (4, 3, 0, 0))

    def test_topics_are_looked_for_every_10s(self) -> None:
        """
        The producer, the writers and the offsets reader look for new
        topics (a fresh broker creates them at their first record) every
        10 s at most: librdkafka's 5 min left the writers subscribed to
        topics "not available" that long (request records reached
        PostgreSQL 5 minutes late).
        """
        import confluent_kafka

        from rproxy import kafka

        made: list[dict[str, Any]] = []
        self.patch(confluent_kafka, "Producer", made.append)
        self.patch(confluent_kafka, "Consumer", made.append)
        config = KafkaConfig(bootstrap_servers=("127.0.0.1:9092",))
        kafka.make_producer(config, KafkaSink(None, Clock(), TOPICS))
        kafka.make_consumer(config, ClientErrors(Clock()))
        kafka.make_consumer(config)
        self.assertEqual(len(made), 3)
        for settings in made:
            self.assertLessEqual(settings["topic.metadata.refresh.interval.ms"], 10_000)

    def test_resend_beyond_room_is_lost(self) -> None:
        """Events to send again that do not fit in the buffer are counted as lost; the newest are kept."""
        offsets: dict[tuple[str, int], int] = {("hb", 0): 0}
        sink, producer, clock = self.committed_sink(offsets, batch=1, buffer_limit=6)
        for i in range(5):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack()
        clock.advance(1.0)
        for i in range(3):
            sink.emit(HEARTBEATS, beat(10 + i))  # waiting: room for 3 more only
        del offsets[("hb", 0)]
        clock.advance(1.0)
        self.assertEqual(sink.lost, 2)
        self.assertEqual([e["at"] - 1_700_000_000 for _, events, _ in producer.queued for e in events],
                         [10, 11, 12, 2, 3, 4])  # the 3 waiting went out first

    def test_stop_drops_what_waits(self) -> None:
        """
        Stopping hands the buffer to librdkafka, gives the records in
        flight the grace, then purges them (counted as dropped).
        """
        sink, producer, clock = self.make()
        for i in range(3):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        sink.emit(HEARTBEATS, beat(4))
        d = defer.Deferred.fromCoroutine(sink.stop(grace=1.0))
        self.assertEqual((sink.dropped, sink.in_flight, len(producer.queued)), (0, 4, 2))
        self.assertNoResult(d)
        clock.advance(1.1)
        self.successResultOf(d)
        self.assertTrue(producer.purged)
        self.assertIsNone(sink.producer)
        self.assertEqual((sink.dropped, sink.in_flight), (4, 0))
        sink.emit(HEARTBEATS, beat(5))
        self.assertEqual(sink.dropped, 5)
        self.balanced(sink)


class KafkaStopTests(SynchronousTestCase):
    def test_clean_stop_delivers_the_buffer(self) -> None:
        """Events still buffered at a clean stop are sent, and delivered within the grace: none dropped."""
        clock, producer = Clock(), FakeProducer()
        sink = KafkaSink(producer, clock, TOPICS)
        sink.start()
        for i in range(3):
            sink.emit(HEARTBEATS, beat(i))
        clock.advance(0.01)
        producer.ack()
        sink.emit(HEARTBEATS, beat(4))
        d = defer.Deferred.fromCoroutine(sink.stop(grace=1.0))
        producer.ack()
        clock.pump([0.02, 0.02])  # the stop's polls serve the report
        self.successResultOf(d)
        self.assertEqual((sink.sent, sink.dropped, producer.purged), (4, 0, False))

    def test_stop_with_the_broker_down_drops_the_buffer(self) -> None:
        """With the broker known to be down, the buffer is not handed over: it is dropped at once."""
        from confluent_kafka import KafkaError

        clock, producer = Clock(), FakeProducer()
        sink = KafkaSink(producer, clock, TOPICS)
        sink.start()
        sink.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        sink.emit(HEARTBEATS, beat(1))
        sink.emit(HEARTBEATS, beat(2))
        self.successResultOf(defer.Deferred.fromCoroutine(sink.stop(grace=1.0)))
        self.assertEqual((sink.dropped, producer.queued), (2, []))


class FanoutTests(SynchronousTestCase):
    def test_one_id_for_both_sinks(self) -> None:
        """An event fanned out to Redis and Kafka carries one id, so the two consumers write it once."""
        clock = Clock()
        redis_sink = EventSink(None, clock)
        kafka = KafkaSink(FakeProducer(), clock, TOPICS)
        fanout = EventFanout(redis_sink, kafka)
        fanout.emit(HEARTBEATS, beat(1))
        self.assertEqual(redis_sink.buffer[0][1]["_id"], kafka.buffer[0][1]["_id"])
        self.assertEqual(len(fanout.buffer), 2)
        redis_sink.stop()
        self.assertEqual(fanout.dropped, 1)


class FakeConsumer:
    def __init__(self, batches: list[list[Message]]) -> None:
        self.batches = batches
        self.calls: list[tuple[str, Any]] = []

    def subscribe(self, topics: list[str]) -> None:
        self.calls.append(("subscribe", topics))

    def consume(self, num: int, timeout: float) -> list[Message]:
        self.calls.append(("consume", timeout))
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        self.calls.append(("commit", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)))


class KafkaConsumerTests(SynchronousTestCase):
    def test_commit_after_the_writes(self) -> None:
        """
        Offsets are committed only once every event of the fetched records
        is written; a failed write leaves them pending for the next poll,
        which writes them again before fetching more.
        """
        records = [Message("hb", 0, 7, json.dumps([beat(1), beat(2)]).encode()),
                   Message("hb", 1, 3, b"{not json"), Message("hb", 1, 4, json.dumps(beat(3)).encode())]
        fake = FakeConsumer([records])
        consumer = KafkaEventConsumer(fake, ["hb"], ClientErrors(Clock()))
        written: list[str] = []
        fail = [True]

        async def handle(where: str, event: dict[str, Any]) -> None:
            if fail[0] and event["at"] == 1_700_000_002:
                raise ConnectionError("postgres down")
            written.append(where)

        consumer.handlers = {"hb": handle}
        self.failureResultOf(defer.Deferred.fromCoroutine(consumer.poll()), ConnectionError)
        self.assertEqual(fake.calls, [("subscribe", ["hb"]), ("consume", 0)])
        fail[0] = False
        self.assertEqual(self.successResultOf(defer.Deferred.fromCoroutine(consumer.poll())), 2)
        # from the event that failed on: the one before it is not written again
        self.assertEqual(written, ["hb/0/7#0", "hb/0/7#1", "hb/1/4#0"])
        self.assertEqual(fake.calls[2:], [("commit", [("hb", 0, 8), ("hb", 1, 5)])])
        self.assertEqual((consumer.processed, consumer.rejected), (3, 1))

    def test_an_event_that_cannot_be_written_is_passed(self) -> None:
        """
        An event PostgreSQL refuses for its data (SQLSTATE class 22) is
        logged once, counted and passed; the records behind it are
        written and the offsets committed past it.  It was retried at
        every poll (120 times in 12 s), forever: nothing behind it was
        written, across restarts too.  A failure for an outage is retried
        from the event it failed on: the malformed record before it is
        not logged again.
        """
        from twisted.logger import LogLevel, globalLogPublisher

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)

        class DataError(Exception):
            pgcode = "22003"

        records = [Message("hb", 0, 1, b"[1, 2]"), Message("hb", 0, 2, json.dumps(beat(1)).encode()),
                   Message("hb", 0, 3, json.dumps(beat(2)).encode()), Message("hb", 0, 4, json.dumps(beat(3)).encode())]
        fake = FakeConsumer([records])
        consumer = KafkaEventConsumer(fake, ["hb"], ClientErrors(Clock()))
        written: list[str] = []
        down = [True]

        async def handle(where: str, event: dict[str, Any]) -> None:
            if event["at"] == 1_700_000_001:
                raise DataError('"1e+39" is out of range for type real')
            if event["at"] == 1_700_000_003 and down[0]:
                raise ConnectionError("PostgreSQL went away")
            written.append(where)

        consumer.handlers = {"hb": handle}
        self.failureResultOf(defer.Deferred.fromCoroutine(consumer.poll()), ConnectionError)
        # what was done before the outage is committed
        self.assertEqual(fake.calls[2:], [("commit", [("hb", 0, 4)])])
        self.failureResultOf(defer.Deferred.fromCoroutine(consumer.poll()), ConnectionError)
        down[0] = False
        self.assertEqual(self.successResultOf(defer.Deferred.fromCoroutine(consumer.poll())), 1)
        self.assertEqual(written, ["hb/0/3#0", "hb/0/4#0"])
        self.assertEqual(fake.calls[3:], [("commit", [("hb", 0, 5)])])
        self.assertEqual((consumer.processed, consumer.rejected), (2, 2))
        warnings = [e for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 2)  # the malformed record, the refused event: once each


class BrokerDownLogTests(SynchronousTestCase):
    """
    librdkafka repeats a refused connection at every reconnect backoff,
    per client (some 4,000 lines a minute with the broker down, which
    twistd writes whatever their level): the log gets about a line a
    minute of it, and the broker's state changes.
    """

    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if "kafka" in e.get("log_format", "")]

    def test_four_minutes_down(self) -> None:
        """
        Four minutes of refused connections (producer and consumer errors,
        15 ms apart): the first is logged with its reason, then at most
        one line a minute with the count; the broker's return once.
        """
        from confluent_kafka import KafkaError

        clock, producer = Clock(), FakeProducer()
        sink = KafkaSink(producer, clock, TOPICS)
        refused = KafkaError(KafkaError._TRANSPORT, "k1:9092/bootstrap: Connect to ipv4#k1:9092 failed: "
                                                    "Connection refused")
        down = KafkaError(KafkaError._ALL_BROKERS_DOWN)
        consumer = KafkaEventConsumer(FakeConsumer([[Message("hb", 0, -1, error=refused)]] * 16000), ["hb"],
                                      sink.errors)
        sink.emit(HEARTBEATS, beat(1))
        for i in range(16000):
            sink.on_error(down if i % 100 == 0 else refused)
            if i % 2:
                self.successResultOf(defer.Deferred.fromCoroutine(consumer.poll()))
            clock.advance(0.015)
        lines = self.lines()
        self.assertEqual(lines[:2], [
            "kafka: no broker reachable; 1 event(s) waiting",
            f"kafka: producer: {refused} (the next errors are counted, logged at most once a minute)",
        ])
        self.assertEqual(len(lines), 2 + 3)  # at 60, 120 and 180 s (the last error comes at 239.985 s)
        self.assertIn("more errors not logged in the last 60s", lines[-1])
        self.assertEqual(sink.errors.count, 16000 - 1 + 8000)
        producer.ack()
        producer.poll(0)
        self.assertEqual(len(self.lines()), 6)
        self.assertRegex(self.lines()[-1], r"^kafka: the broker answers again \(\d+ errors meanwhile not logged\)$")

    def test_librdkafka_lines(self) -> None:
        """librdkafka's errors go the same way; its other lines are not logged unless asked for."""
        import logging

        from rproxy.kafka import ClientErrors

        clock = Clock()
        quiet, detailed = ClientErrors(clock, detail=False), ClientErrors(clock, detail=True)
        for errors in (quiet, detailed):
            errors.log(logging.INFO, "CONFWARN [%s] %s", "rproxy#producer-1", "a notice")
            errors.log(logging.ERROR, "FAIL [%s] %s", "rproxy#producer-1", "Connection refused")
            errors.log(logging.ERROR, "FAIL [%s] %s", "rproxy#producer-1", "Connection refused")
        self.assertEqual((quiet.count, detailed.count), (2, 2))
        self.assertEqual([e["log_level"].name for e in self.logged], ["warn", "debug", "debug", "warn", "debug"])
        self.assertEqual(self.lines()[0], "kafka: librdkafka: FAIL [rproxy#producer-1] Connection refused "
                                          "(the next errors are counted, logged at most once a minute)")


class KafkaConfigTests(SynchronousTestCase):
    def error(self, stores: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"stores": stores})
        return str(caught.exception)

    def test_defaults(self) -> None:
        """stores.kafka alone sends events to Kafka, on the usual topic names, with acks=all."""
        config = parse_config({"stores": {"kafka": {"bootstrap_servers": "127.0.0.1:9092, [::1]:9093"}}}).stores
        assert config is not None
        self.assertEqual(config.kafka, KafkaConfig(bootstrap_servers=("127.0.0.1:9092", "[::1]:9093")))
        self.assertEqual(config.events, ("kafka",))

    def test_both(self) -> None:
        """events: both writes to Redis Streams and Kafka; topics and acks are read."""
        config = parse_config({"stores": {"redis": {"url": "redis://127.0.0.1:6379/0"}, "events": "both", "kafka": {
            "bootstrap_servers": ["k1:9092", "k2:9092"], "acks": 1, "topics": {"heartbeats": "hb"}}}}).stores
        assert config is not None and config.kafka is not None
        self.assertEqual((config.events, config.kafka.acks, config.kafka.heartbeats_topic,
                          config.kafka.requests_topic), (("redis", "kafka"), "1", "hb", "request-message"))

    def test_errors_name_the_key_path(self) -> None:
        """Bad values name their key path."""
        self.assertIn("stores.kafka.bootstrap_servers: required", self.error({"kafka": {"acks": "all"}}))
        self.assertIn("stores.kafka.bootstrap_servers: invalid address 'k1' (expected host:port)",
                      self.error({"kafka": {"bootstrap_servers": "k1"}}))
        self.assertIn("stores.kafka.acks: '2' is not one of all, -1, 0, 1",
                      self.error({"kafka": {"bootstrap_servers": "k:1", "acks": 2}}))
        self.assertIn("stores.kafka.topics.heartbeats: 'a b' is not a Kafka topic name",
                      self.error({"kafka": {"bootstrap_servers": "k:1", "topics": {"heartbeats": "a b"}}}))
        self.assertIn("stores.kafka.topics.hb: unknown key",
                      self.error({"kafka": {"bootstrap_servers": "k:1", "topics": {"hb": "x"}}}))
        self.assertIn("stores.kafka.topics: heartbeats and requests must be different topics",
                      self.error({"kafka": {"bootstrap_servers": "k:1", "topics": {"heartbeats": "x", "requests": "x"}}}))
        self.assertIn("stores.events: kafka needs stores.kafka.bootstrap_servers", self.error({"events": "kafka"}))
        self.assertIn("stores.kafka.session_timeout: must be between 1s and 5m",
                      self.error({"kafka": {"bootstrap_servers": "k:1", "session_timeout": "10m"}}))
