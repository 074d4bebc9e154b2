"""
Events (heartbeats and request records) through Redis Streams; on Kafka
topics see L{rproxy.kafka}.

L{EventSink} appends events to a stream (C{XADD ... MAXLEN ~ N}) without
ever blocking traffic: events wait in a bounded in-memory buffer while Redis
is down, and past the bound they are dropped and counted.

An entry Redis acknowledged is not safe yet: a Redis that persists nothing
(or fsyncs once a second) loses, when it crashes, what no consumer had read.
So the sink keeps what it sent (bounded, C{keep_limit} events) until a
consumer group has read and acknowledged it (C{XINFO GROUPS}, C{XPENDING}),
and once a second checks
Redis's C{run_id}: when Redis came back as a new process, what it held
unread is sent again (the writes are idempotent), and what does not fit in
the buffer any more is counted as dropped.

L{EventConsumer} reads a stream as one member of a consumer group, writes
each event to PostgreSQL and acknowledges it only after the write
committed; entries another consumer read but never acknowledged (it
crashed) are claimed again after C{claim_idle} seconds.  Delivery is at
least once, so writes are idempotent (keyed by the stream entry id).

Each event is one stream field C{data} holding JSON.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

__all__ = ["EventSink", "EventConsumer", "EventFanout", "HEARTBEATS", "REQUESTS", "sinks_of", "write_heartbeat",
           "write_request"]

HEARTBEATS = "client-heartbeats"
BATCH = 100
FLUSH_DELAY = 0.01
REQUESTS = "request-message"
log = Logger()


def _entry_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _run_id(info: Any) -> str | None:
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line[7:].strip()
    return None


class EventSink:
    """
    See the module docstring.

    @ivar sent: events Redis acknowledged (a re-sent event counts again).
    @ivar dropped: events lost: the buffer was full (Redis down too long,
        or a restarted Redis lost more than the buffer could take back),
        or the sink stopped with events still waiting.
    @ivar resent: events sent again because a restarted Redis lost them.
    """

    kind = "redis"

    def __init__(self, redis: Any, clock: Any, maxlen: int = 10_000, buffer_limit: int = 10_000,
                 keep_limit: int = 10_000, confirm_interval: float = 1.0) -> None:
        self.redis = redis
        self.clock = clock
        self.maxlen = maxlen
        self.buffer_limit = buffer_limit
        self.keep_limit = keep_limit
        self.confirm_interval = confirm_interval
        self.buffer: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        # (stream, entry id, events) acknowledged by Redis, not yet read by a consumer group
        self.unconfirmed: collections.deque[tuple[str, tuple[int, int], list[dict[str, Any]]]] = collections.deque()
        self._kept = 0
        self.sent = 0
        self.dropped = 0
        self.resent = 0
        self._run: str | None = None
        self._confirming: task.LoopingCall | None = None
        self._flushing = False
        self._sending: defer.Deferred[None] | None = None  # the drain under way
        self._retrying = False  # the last send failed: Redis is down until one succeeds
        self._in_flight = 0  # events taken out of the buffer by the send under way
        self._stopped = False
        self._timer: IDelayedCall | None = None
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._serial = 0

    def emit(self, stream: str, event: dict[str, Any]) -> None:
        """
        Queue C{event} for C{stream}; returns at once.
        """
        if len(self.buffer) + self._in_flight >= self.buffer_limit:
            self.dropped += 1
            return
        self._serial += 1
        # an id of its own, so that an XADD repeated after a failure is
        # still written once (the consumer's inserts are keyed by it);
        # serialised with its batch, in one call, when it is sent
        # (one given already, by a fan-out to Kafka as well, is kept: one id, one row)
        event.setdefault("_id", f"{self._prefix}{self._serial}")
        self.buffer.append((stream, event))
        if not self._flushing and self._timer is None and not self._stopped:
            # gather what else comes in the next few milliseconds into the
            # same XADDs
            self._timer = self.clock.callLater(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._flushing = True
        self._sending = defer.Deferred.fromCoroutine(self._drain()).addErrback(self._failed)

    async def _drain(self) -> None:
        # what is buffered goes out as few stream entries as possible: the
        # events of one stream, up to BATCH of them, as one entry holding a
        # JSON list (one XADD, one round trip), the entries pipelined
        buffer, maxlen = self.buffer, str(self.maxlen)
        while buffer:
            # taken out of the buffer while they are sent (and put back in
            # front if the send fails): the buffer may change meanwhile (a
            # restarted Redis's entries go in front of it), so that the
            # sent ones cannot be found again by their place in it
            taken = [buffer.popleft() for _ in range(min(len(buffer), BATCH * 8))]
            self._in_flight = len(taken)
            try:
                ids, entries = await self._send(taken, maxlen)
            except BaseException:
                buffer.extendleft(reversed(taken))
                raise
            finally:
                self._in_flight = 0
            self._retrying = False
            self.sent += len(taken)
            for (stream, batch), entry_id in zip(entries, ids, strict=True):
                self._keep(stream, entry_id, batch)
        self._flushing = False
        if self._confirming is None and not self._stopped:
            self._confirming = task.LoopingCall(self._confirm)
            self._confirming.clock = self.clock
            self._confirming.start(self.confirm_interval, now=True).addErrback(
                lambda f: log.failure("events: the delivery check stopped", f))

    async def _send(self, taken: list[tuple[str, dict[str, Any]]],
                    maxlen: str) -> tuple[list[Any], list[tuple[str, list[dict[str, Any]]]]]:
        """
        C{taken} as pipelined XADDs: their entry ids, and (stream, events)
        of each entry.  (A client that raises instead of answering fails
        the send like one that answers with an error: the events go back
        to the buffer.)
        """
        batches: dict[str, list[dict[str, Any]]] = {}
        for stream, event in taken:
            batches.setdefault(stream, []).append(event)
        commands, entries = [], []
        for stream, items in batches.items():
            for start in range(0, len(items), BATCH):
                batch = items[start:start + BATCH]
                data = json.dumps(batch, separators=(",", ":"), default=str)
                commands.append(self.redis.execute_command("XADD", stream, "MAXLEN", "~", maxlen, "*", "data", data))
                entries.append((stream, batch))
        d = defer.gatherResults(commands, consumeErrors=True)
        d.addTimeout(1.0, self.clock)
        return await d, entries

    def _keep(self, stream: str, entry_id: Any, batch: list[dict[str, Any]]) -> None:
        try:
            key = _entry_id(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
        except ValueError:
            return  # not an entry id: nothing to match against later
        self.unconfirmed.append((stream, key, batch))
        self._kept += len(batch)
        while self._kept > self.keep_limit:
            _, _, old = self.unconfirmed.popleft()
            self._kept -= len(old)

    def _confirm(self) -> defer.Deferred[None]:
        """
        The periodic delivery check; its failures (Redis down) are logged
        at debug level and the next tick tries again.
        """
        d = defer.Deferred.fromCoroutine(self._check_delivery())
        d.addTimeout(max(0.5, self.confirm_interval), self.clock)
        return d.addErrback(lambda f: log.debug("events: delivery check failed: {why}", why=f.getErrorMessage()))

    async def _check_delivery(self) -> None:
        if self._stopped:
            return
        run = _run_id(await self.redis.execute_command("INFO", "server"))
        if run is not None and self._run is not None and run != self._run:
            self._run = run
            self._send_again()
            return
        self._run = run
        forget = []
        for stream in {stream for stream, _, _ in self.unconfirmed}:
            try:
                groups = await self.redis.execute_command("XINFO", "GROUPS", stream)
            except defer.CancelledError:
                raise  # the check timed out: it goes no further
            except Exception as e:  # noqa: BLE001 - no such stream (yet): nothing read
                log.debug("events: XINFO GROUPS {stream}: {why}", stream=stream, why=e)
                continue
            done = [await self._written_upto(stream, dict(zip(g[::2], g[1::2], strict=False))) for g in groups or []]
            if done:
                forget.append((stream, min(done)))
        if forget:
            # the groups' positions may come from a Redis that restarted
            # after the run_id above was read (a command waits for the
            # reconnection): a new Redis's group, reading what was sent to
            # it since, is past entries the old one lost unread.  Forget
            # only on the word of the Redis whose run_id was checked.
            after = _run_id(await self.redis.execute_command("INFO", "server"))
            if after != run:
                if after is not None and run is not None:
                    self._run = after
                    self._send_again()
                return
            for stream, upto in forget:
                self._forget(stream, upto)

    async def _written_upto(self, stream: str, group: dict[Any, Any]) -> tuple[int, int]:
        """
        The last entry of C{stream} that C{group} is done with: read and
        acknowledged.  An entry read but not acknowledged is not safe: its
        consumer may fail before writing it (Redis gone under it), and
        then only this sink's copy is left.
        """
        read = _entry_id(str(group.get("last-delivered-id", "0-0")))
        if not int(group.get("pending", 0) or 0):
            return read
        summary = await self.redis.execute_command("XPENDING", stream, group.get("name"))
        if not summary or not summary[1]:
            return read
        first = _entry_id(str(summary[1]))
        return min(read, (first[0], first[1] - 1))  # everything before the first pending entry

    def _forget(self, stream: str, upto: tuple[int, int]) -> None:
        """
        Drop the kept entries of C{stream} up to C{upto} (every group read them).
        """
        kept: collections.deque[tuple[str, tuple[int, int], list[dict[str, Any]]]] = collections.deque()
        for entry in self.unconfirmed:
            if entry[0] == stream and entry[1] <= upto:
                self._kept -= len(entry[2])
            else:
                kept.append(entry)
        self.unconfirmed = kept

    def _send_again(self) -> None:
        """
        Redis restarted: what it held unread is queued again, ahead of the
        buffer; what does not fit is counted as dropped.
        """
        again = [(stream, event) for stream, _, batch in self.unconfirmed for event in batch]
        self.unconfirmed.clear()
        self._kept = 0
        room = max(0, self.buffer_limit - len(self.buffer) - self._in_flight)
        lost = max(0, len(again) - room)
        if lost:
            again = again[lost:]  # the newest are kept
            self.dropped += lost
        self.buffer.extendleft(reversed(again))
        self.resent += len(again)
        log.warn("events: Redis restarted and lost what no consumer had read; sending {n} events again, "
                 "{lost} dropped", n=len(again), lost=lost)
        if again and not self._flushing and self._timer is None and not self._stopped:
            self._timer = self.clock.callLater(0, self._flush)

    def _failed(self, failure: Any) -> None:
        self._flushing = False
        self._retrying = True
        # (a send that fails after stop() tries no more: the service is
        # gone, and what it held is lost)
        if self._stopped:
            if self.buffer:
                self.dropped += len(self.buffer)
                self.buffer.clear()
            return
        if self._timer is None:
            log.warn("events: Redis unavailable ({why}); {n} events buffered",
                     why=failure.type.__name__, n=len(self.buffer))
            self._timer = self.clock.callLater(1.0, self._flush)

    def stop(self, grace: float = 1.0) -> defer.Deferred[None]:
        """
        Take no more events; send what is buffered, for up to C{grace}
        seconds, then count what is left as dropped.  A Redis whose last
        send failed gets no grace: the buffer is dropped at once.  Fires
        when done.  (A clean stop dropped the buffer at once, Redis up or
        not: an SSE stream's last events were lost at every SIGTERM.)
        """
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._confirming is not None and self._confirming.running:
            self._confirming.stop()
        self._confirming = None
        if self.buffer and not self._flushing and not self._retrying:
            self._flush()  # what waited for the next flush goes now
        done: defer.Deferred[None] = defer.Deferred()
        if self._flushing and self._sending is not None:
            def sent(result: Any) -> Any:
                if not done.called:
                    done.callback(None)
                return result

            self._sending.addBoth(sent)
            done.addTimeout(grace, self.clock, onTimeoutCancel=lambda _result, _timeout: None)
        else:
            done.callback(None)
        return done.addCallback(self._drop_unsent)

    def _drop_unsent(self, _: Any = None) -> None:
        """
        What is still buffered at the end of L{stop} is lost (a send still
        under way is counted when it fails).
        """
        if self.buffer:
            self.dropped += len(self.buffer)
            log.warn("events: stopping with {n} events not sent to Redis; they are lost", n=len(self.buffer))
            self.buffer.clear()


def sinks_of(events: Any) -> list[tuple[str, Any]]:
    """
    (kind, sink) of each sink behind a service's events (a sink, a
    fan-out of sinks, or None): C{"redis"} or C{"kafka"}.
    """
    if events is None:
        return []
    return [(sink.kind, sink) for sink in getattr(events, "sinks", (events,))]


class _Waiting:
    """
    The sized C{buffer} of a fan-out: how many events its sinks hold.
    """

    def __init__(self, sinks: tuple[Any, ...]) -> None:
        self._sinks = sinks

    def __len__(self) -> int:
        return sum(len(sink.buffer) for sink in self._sinks)


class EventFanout:
    """
    Events to Redis Streams and Kafka both (C{stores.events: both}): each
    event gets its id once, so the two consumers write it once.  The
    counters add up those of the sinks.
    """

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks
        self.buffer = _Waiting(sinks)
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-f"
        self._serial = 0

    def emit(self, stream: str, event: dict[str, Any]) -> None:
        self._serial += 1
        event["_id"] = f"{self._prefix}{self._serial}"
        for sink in self.sinks:
            sink.emit(stream, event)

    @property
    def sent(self) -> int:
        return sum(sink.sent for sink in self.sinks)

    @property
    def dropped(self) -> int:
        return sum(sink.dropped for sink in self.sinks)

    @property
    def resent(self) -> int:
        return sum(sink.resent for sink in self.sinks)


class EventConsumer:
    """
    One member of consumer group C{group} on C{stream}.
    """

    def __init__(
        self,
        redis: Any,
        stream: str,
        group: str,
        name: str,
        handle: Callable[[str, dict[str, Any]], Awaitable[None]],
        clock: Any,
        batch: int = 100,
        claim_idle: float = 30.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.name = name
        self.handle = handle
        self.clock = clock
        self.batch = batch
        self.claim_idle = claim_idle
        self.processed = 0
        #: events dropped because they can never be written (see L{rejected})
        self.rejected = 0

    async def ensure_group(self) -> None:
        try:
            await self.redis.execute_command("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
        except Exception as e:  # noqa: BLE001 - BUSYGROUP: it exists already
            if "BUSYGROUP" not in str(e):
                raise

    async def poll(self) -> int:
        """
        Claim stale entries, read new ones, handle and acknowledge them;
        return how many were handled.  Run it periodically.
        """
        await self.ensure_group()
        handled = 0
        claimed = await self.redis.execute_command(
            "XAUTOCLAIM", self.stream, self.group, self.name, str(int(self.claim_idle * 1000)), "0-0",
            "COUNT", str(self.batch),
        )
        handled += await self._handle_entries(claimed[1] if claimed else [])
        reply = await self.redis.execute_command(
            "XREADGROUP", "GROUP", self.group, self.name, "COUNT", str(self.batch), "STREAMS", self.stream, ">",
        )
        for _, entries in reply or []:
            handled += await self._handle_entries(entries)
        return handled

    async def _handle_entries(self, entries: list[Any]) -> int:
        """
        Write every event of C{entries}, then acknowledge them all in one
        XACK.  Acknowledging entry by entry meant that an XACK failing
        (Redis going away) left the rest of a read unwritten though the
        group had them delivered, and a restarted Redis forgot them; now
        only the acknowledgement can be missing, and an entry handled twice
        is written once (the inserts are keyed by the entry id).

        An event that can never be written (L{rejected}: malformed, or
        refused by PostgreSQL for its data) is logged, counted in
        C{rejected} and acknowledged with the rest; it was left pending,
        claimed again every C{claim_idle} seconds, forever.  Any other
        failure (PostgreSQL down) stops the read: the entries done so far
        are acknowledged, the others stay pending for a later claim.
        """
        count = 0
        done: list[Any] = []
        try:
            for entry_id, fields in entries:
                count += await self._handle_entry(entry_id, fields)
                done.append(entry_id)
        finally:
            if done:
                await self.redis.execute_command("XACK", self.stream, self.group, *done)  # after the commits
        return count

    async def _handle_entry(self, entry_id: Any, fields: list[Any]) -> int:
        values = dict(zip(fields[::2], fields[1::2], strict=False))
        raw = values.get("data")
        try:
            decoded = json.loads(raw if isinstance(raw, str) else json.dumps(raw))
            events = decoded if isinstance(decoded, list) else [decoded]
            if not all(isinstance(e, dict) for e in events):
                raise ValueError("not an event")
        except (TypeError, ValueError):
            log.warn("events: dropping malformed entry {id} of {stream}", id=entry_id, stream=self.stream)
            self.rejected += 1
            return 0
        count = 0
        for i, event in enumerate(events):
            try:
                await self.handle(f"{entry_id}#{i}" if len(events) > 1 else entry_id, event)
            except Exception as e:
                if not rejected(e):
                    raise
                # this event is dropped; the others of the entry are written
                log.warn("events: dropping an event in {id} of {stream} that cannot be written: {why}",
                         id=entry_id, stream=self.stream, why=repr(e))
                self.rejected += 1
                continue
            count += 1
            self.processed += 1
        return count


# what PostgreSQL's columns hold: real (float4), integer, bigint; and
# timestamps up to the end of year 9999 (to_timestamp() takes infinity,
# and years no clock of ours will show)
_REAL = 3.4e38
_INT = 2**31 - 1
_BIGINT = 2**63 - 1
_LAST_AT = 253402300799.0


class Rejected(ValueError):
    """
    An event that can never be written: it does not validate, or
    PostgreSQL refused it for its data.
    """


def rejected(error: BaseException) -> bool:
    """
    Whether C{error}, raised writing one event, is that event's fault (so
    that writing it again would fail again) rather than an outage: a
    record that does not validate, or PostgreSQL's SQLSTATE class 22
    (data exception: a value out of range, bad input syntax) or 23
    (integrity constraint violation).  A writer that retried those kept
    failing on the one event, and every event behind it waited forever.
    """
    if isinstance(error, (KeyError, TypeError, ValueError)):
        return True
    code = getattr(error, "pgcode", None)
    return isinstance(code, str) and code[:2] in ("22", "23")


def _real(event: dict[str, Any], key: str, default: float | None = None, low: float = -_REAL,
          high: float = _REAL) -> float:
    """
    C{event[key]}, a finite number from C{low} to C{high} (a missing one
    is C{default}, if there is one).
    """
    value = event.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"{key}: expected a number, not {type(value).__name__}")
    if not low <= value <= high:  # (NaN is in no range)
        raise Rejected(f"{key}: {value!r} is out of range")
    return float(value)


def _whole(event: dict[str, Any], key: str, high: int) -> int:
    value = _real(event, key, 0, 0, high)
    if value != int(value):
        raise Rejected(f"{key}: expected a whole number")
    return int(value)


def _at(event: dict[str, Any]) -> float:
    return _real(event, "at", None, 0, _LAST_AT)


def _name(event: dict[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str):
        raise Rejected(f"{key}: expected a string")
    return value


def _text(event: dict[str, Any], key: str, limit: int) -> str:
    value = event.get(key, "")
    if not isinstance(value, str):
        raise Rejected(f"{key}: expected a string")
    return value[:limit]


def heartbeat_row(entry_id: str, event: dict[str, Any]) -> tuple[Any, ...]:
    """
    The heartbeats row of C{event}, checked to fit the table (else
    L{Rejected}).
    """
    return (_name(event, "agent_id"), _at(event), _real(event, "cpu", 0), _real(event, "memory", 0),
            _real(event, "disk", 0), _real(event, "load", 0), _whole(event, "active_streams", _INT),
            str(event.get("_id", entry_id)))


def request_row(entry_id: str, event: dict[str, Any]) -> tuple[Any, ...]:
    """
    The request_events row of C{event}, checked to fit the table (else
    L{Rejected}).
    """
    model = event.get("model")
    if model is not None and not isinstance(model, str):
        raise Rejected("model: expected a string")
    return (str(event.get("_id", entry_id)), _at(event), _text(event, "tunnel", 256), _name(event, "key"),
            _name(event, "agent_id"), model, _text(event, "method", 16), _text(event, "target", 512),
            _whole(event, "bytes_in", _BIGINT), _whole(event, "bytes_out", _BIGINT),
            _real(event, "duration", 0, 0))


def write_heartbeat(conn: Any) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """
    A handler writing heartbeat events to PostgreSQL idempotently (the
    stream entry id is unique in the heartbeats table), and the agent's
    last_seen.
    """

    async def handle(entry_id: str, event: dict[str, Any]) -> None:
        if event.get("kind") == "agent":
            # a login or a models update: the agent's description
            agent, at = _name(event, "agent_id"), _at(event)
            await conn.runOperation(
                "INSERT INTO agents (id, first_seen, last_seen, system_info, models)"
                " VALUES (%s, to_timestamp(%s), to_timestamp(%s), %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(agents.last_seen, EXCLUDED.last_seen),"
                " system_info = EXCLUDED.system_info, models = EXCLUDED.models",
                (agent, at, at, json.dumps(event.get("system_info") or {}),
                 json.dumps(list(event.get("models") or []))),
            )
            return

        row = heartbeat_row(entry_id, event)

        def work(cursor: Any) -> Any:
            d = cursor.execute(
                "INSERT INTO heartbeats (agent_id, at, cpu, memory, disk, load, active_streams, event_id)"
                " VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
                row,
            )
            d.addCallback(lambda _: cursor.execute(
                "INSERT INTO agents (id, first_seen, last_seen) VALUES (%s, to_timestamp(%s), to_timestamp(%s))"
                " ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(agents.last_seen, EXCLUDED.last_seen)",
                (row[0], row[1], row[1]),
            ))
            return d

        await conn.runInteraction(work)

    return handle


def write_request(conn: Any) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """
    A handler writing request records to PostgreSQL and adding them to the
    per-minute stats of their key and agent, once per stream entry (a
    record delivered again changes nothing).
    """

    async def handle(entry_id: str, event: dict[str, Any]) -> None:
        await conn.runOperation(
            "WITH fresh AS ("
            " INSERT INTO request_events (event_id, at, tunnel, key_name, agent_id, model, method, target,"
            "  bytes_in, bytes_out, duration)"
            " VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (event_id) DO NOTHING"
            " RETURNING at, key_name, agent_id, bytes_in, bytes_out)"
            " INSERT INTO stats (period_start, key_name, agent_id, requests, bytes_in, bytes_out)"
            " SELECT date_trunc('minute', at), key_name, agent_id, 1, bytes_in, bytes_out FROM fresh"
            " ON CONFLICT (period_start, key_name, agent_id) DO UPDATE SET"
            "  requests = stats.requests + 1, bytes_in = stats.bytes_in + EXCLUDED.bytes_in,"
            "  bytes_out = stats.bytes_out + EXCLUDED.bytes_out",
            request_row(entry_id, event),
        )

    return handle
