"""
The OpenTelemetry SDK as rproxy runs it: one L{Telemetry} per service,
made from the C{telemetry} section.

Spans are exported by the SDK's C{BatchSpanProcessor}, whose worker
thread encodes them and POSTs them with the OTLP/HTTP exporter: nothing
the reactor thread does waits for the collector.  Handing the processor
a request's spans costs the reactor thread a count and the processor's
deque append (L{finished}).  While the collector is down or slow the
queue fills; past C{queue_size} ended spans are dropped (and counted)
before they reach the SDK's queue, so a request never waits and memory
stays bounded; a batch the exporter gave up on (after its own retries,
within C{timeout}) is counted as failed.  The collector going down and
coming back is logged once each.

Sampling: the tracing filter decides for the requests it serves, without
the SDK (L{rproxy.http.filters.tracing}), and hands the processor each
sampled request once it has ended, as one
L{rproxy.telemetry.request.RequestTrace} (its span and its attempts'):
the spans' attributes are worked out on the processor's thread, where
rproxy's encoder writes them straight from the request's values, and any
other exporter (C{encoder: official}'s, the SDK's in-memory one) is given
the spans as C{ReadableSpan}-like records.  A span the SDK's tracer makes
costs about ten times as much to start, fill and end, and a request has
two.  Other spans (token logins, tunnel streams:
L{rproxy.telemetry.spans}) go through L{tracer}, the SDK's, sampled like
the requests: a parent's decision is kept, and a new trace is kept with
probability C{sample_ratio}.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from twisted.internet import defer, threads
from twisted.logger import Logger

from rproxy.telemetry.request import RequestTrace

__all__ = ["Telemetry", "apply_telemetry"]

# the OTLP exporter logs every failed batch and every retry (from its
# thread, through the standard library): rproxy logs the collector going
# down and coming back, once each, instead
logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)


def _in_daemon_thread(work: Callable[[], object], then: Callable[[], object]) -> None:
    """
    Run C{work} on a daemon thread of its own, then C{then} (there): not
    on the reactor's thread pool, which the reactor joins as it stops,
    while a stop must not wait for a collector that never answers.
    """
    def run() -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - logged; the stop is done all the same
            Telemetry.log.failure("telemetry: stopping the exporter failed")
        then()

    threading.Thread(target=run, name="rproxy-telemetry-stop", daemon=True).start()


class _CountingExporter(SpanExporter):
    """
    The OTLP exporter, counting what it was handed and what it sent (on
    the processor's thread).  The processor's queue holds SDK spans and
    the tracing filter's requests (L{RequestTrace}, a span and one per
    attempt): an exporter that encodes those itself (C{takes_requests},
    rproxy's compact one) is handed them as they are, with the number of
    spans they are; any other gets their spans (L{RequestTrace.spans}).
    """

    def __init__(self, exporter: SpanExporter, telemetry: Telemetry) -> None:
        self.exporter = exporter
        self.telemetry = telemetry
        self.takes_requests = getattr(exporter, "takes_requests", False)

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        telemetry = self.telemetry
        n = 0
        expanded: list[Any] = []
        for item in spans:
            if type(item) is RequestTrace:
                n += item.spans_count
                if not self.takes_requests:
                    expanded += item.spans()
            else:
                n += 1
                if not self.takes_requests:
                    expanded.append(item)
        telemetry.taken += n
        try:
            result = self.exporter.export(spans, spans_count=n) if self.takes_requests else \
                self.exporter.export(expanded)
        except Exception:  # noqa: BLE001 - an exporter bug: counted as a failed batch
            result = SpanExportResult.FAILURE
        if telemetry.abandoned:  # (its spans were counted as dropped: L{Telemetry.stop})
            return result
        if result is SpanExportResult.SUCCESS:
            telemetry.exported += n
            telemetry.changed(up=True)
        else:
            telemetry.failed += n
            telemetry.changed(up=False)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _BoundedProcessor(BatchSpanProcessor):
    """
    The SDK's batch processor, that drops (and counts) an ended span when
    C{queue_size} are already waiting (L{Telemetry.finished}), instead of
    letting the SDK's deque push out its oldest with a log line each.
    """

    def __init__(self, exporter: _CountingExporter, telemetry: Telemetry, queue_size: int, batch_size: int,
                 delay: float, timeout: float) -> None:
        super().__init__(exporter, max_queue_size=queue_size, max_export_batch_size=batch_size,
                         schedule_delay_millis=delay * 1000, export_timeout_millis=timeout * 1000)
        self.telemetry = telemetry
        # where an ended span goes (L{Telemetry.finished}): the SDK's
        # queue, as its emit appends to it (its internals as of 1.45: a
        # deque, and the event that wakes its thread at a batch's size,
        # which a fork makes anew), without emit's checks for a fork (the
        # SDK's own hook sees to it) and a shutdown (after a stop,
        # L{Telemetry} drops); or else its on_end, which checks the span
        # is sampled first
        self.batch = batch = getattr(self, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        known = hasattr(batch, "_worker_awaken") and hasattr(batch, "_max_export_batch_size")
        self.queue = queue if isinstance(queue, deque) and known else None
        self.emit = super().on_end

    def on_end(self, span: ReadableSpan) -> None:
        self.telemetry.finished(span)


class Telemetry:
    """
    The tracer providers, the processor and the exporter of one
    configuration, with the counts the metrics show.

    @ivar queued: spans handed to the processor (reactor thread).
    @ivar taken: spans the processor handed to the exporter (its thread).
    @ivar exported: spans the collector accepted.
    @ivar failed: spans of batches the exporter gave up on.
    @ivar dropped: spans dropped because C{queue_size} were waiting, or
        still unsent when a stop gave up on them.
    @ivar previous: the telemetry this one replaced, while it stops; its
        counts and those of the ones replaced before (C{carried}) are
        part of this one's L{totals}.
    @ivar in_thread: how L{stop} runs the processor's shutdown and then
        its callback off the reactor thread (a daemon thread; tests: at
        once).
    """

    log = Logger()

    def __init__(self, config: Any, reactor: Any, clock: Any = None, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.queued = self.taken = self.exported = self.failed = self.dropped = 0
        self.previous: Telemetry | None = None
        self.carried = (0, 0, 0)
        self.abandoned = False
        self.in_thread = _in_daemon_thread
        self.up: bool | None = None
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            from rproxy.telemetry.exporter import CompactSpanExporter

            kind = OTLPSpanExporter if config.encoder == "official" else CompactSpanExporter
            exporter = kind(endpoint=config.endpoint, headers=dict(config.headers), timeout=config.timeout)
        self.exporter = exporter
        self.stopping = False
        self.queue_size = config.queue_size
        self.processor = _BoundedProcessor(_CountingExporter(exporter, self), self, config.queue_size,
                                           config.batch_size, config.schedule_delay, config.timeout)
        self.queue, self.batch, self.batch_size = self.processor.queue, self.processor.batch, config.batch_size
        self.emit = self.processor.emit
        resource = Resource.create({"service.name": config.service_name})
        ratio = TraceIdRatioBased(config.sample_ratio)
        self.sample_ratio = config.sample_ratio
        self.provider = TracerProvider(sampler=ParentBased(ratio), resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("rproxy")
        # what the tracing filter's spans are made with
        self.resource = resource
        self.http_scope = InstrumentationScope("rproxy.http")

    def finished(self, span: Any, n: int = 1) -> None:
        """
        A span that has ended, or a request's C{n} (a L{RequestTrace}),
        for export; dropped (and counted) when that would put more than
        C{queue_size} spans in the queue.
        """
        if self.queued - self.taken + n > self.queue_size:
            self.dropped += n
            return
        self.queued += n
        queue = self.queue
        if queue is None:
            self.emit(span)
            return
        queue.appendleft(span)  # (the SDK's queue: its oldest at the right)
        if len(queue) >= self.batch_size:
            awaken = self.batch._worker_awaken
            if not awaken.is_set():
                awaken.set()

    def changed(self, up: bool) -> None:
        """
        An export worked or failed (on the processor's thread): a change
        is logged once, from the reactor thread.
        """
        if self.up is up:
            return
        was, self.up = self.up, up
        if up and was is None:
            return
        self.reactor.callFromThread(self._log_change, up)

    def _log_change(self, up: bool) -> None:
        if up:
            self.log.info("telemetry: the collector at {url} accepts spans again ({dropped} dropped, "
                          "{failed} failed so far)", url=self.config.endpoint, dropped=self.dropped, failed=self.failed)
        else:
            self.log.warn("telemetry: cannot export spans to {url}; spans are dropped until it answers",
                          url=self.config.endpoint)

    @property
    def waiting(self) -> int:
        return self.queued - self.taken

    def totals(self) -> tuple[int, int, int]:
        """
        The spans exported, failed and dropped by this telemetry and by
        those it replaced on reloads: what the metrics show, so that their
        counters never go back.
        """
        exported, failed, dropped = self.carried
        exported, failed, dropped = exported + self.exported, failed + self.failed, dropped + self.dropped
        if self.previous is not None:
            before = self.previous.totals()
            exported, failed, dropped = exported + before[0], failed + before[1], dropped + before[2]
        return exported, failed, dropped

    def follow(self, previous: Telemetry) -> None:
        """
        Replace C{previous}: it stops, and its counts go on in this one's
        L{totals} (read from it while it stops, then kept).
        """
        self.previous = previous

        def stopped(_: object) -> None:
            self.carried = previous.totals()
            self.previous = None

        previous.stop().addCallback(stopped).addErrback(
            lambda f: self.log.failure("telemetry: stopping the old exporter failed", f))

    def stop(self, deadline: float = 1.0) -> defer.Deferred[None]:
        """
        Export what is queued and stop the processor's thread, on a
        daemon thread of its own (the reactor goes on, and the process
        may exit without it).  After C{deadline} seconds the exporter is
        told to give up and the stop is done: the spans not sent yet are
        counted as dropped, so that a collector that is down or never
        answers holds up a stop by that long at most.
        """
        self.stopping = True
        self.queue_size = -1  # (what ends after this is dropped: the processor's thread is stopping)
        d: defer.Deferred[None] = defer.Deferred()

        def done() -> None:
            if not d.called:
                give_up.cancel()
                d.callback(None)

        def abandon() -> None:
            self.abandoned = True
            self.dropped += self.queued - self.exported - self.failed
            self.exporter.shutdown()
            d.callback(None)

        give_up = self.clock.callLater(deadline, abandon)
        self.in_thread(self.processor.shutdown, lambda: self.reactor.callFromThread(done))
        return d

    def flush(self) -> defer.Deferred[bool]:
        """
        Export what is queued now (tests, and before a stop).
        """
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.processor.force_flush)


def apply_telemetry(current: Telemetry | None, config: Any, reactor: Any, clock: Any = None,
                    exporter: SpanExporter | None = None) -> Telemetry | None:
    """
    The telemetry of configuration C{config} (None: none), keeping
    C{current} when its configuration is the same; one replaced stops on
    a thread, exporting what it holds first, and its counts go on in the
    new one's (L{Telemetry.follow}).  C{exporter}: the new one's (tests).
    """
    if current is not None and current.config == config:
        return current
    if config is None:
        if current is not None:
            current.stop().addErrback(lambda f: Telemetry.log.failure("telemetry: stopping the exporter failed", f))
        return None
    Telemetry.log.info("telemetry: traces to {url} (sampling {ratio:g} of new traces)", url=config.endpoint,
                       ratio=config.sample_ratio)
    telemetry = Telemetry(config, reactor, clock, exporter)
    if current is not None:
        telemetry.follow(current)
    return telemetry
