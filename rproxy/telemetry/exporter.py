"""
The official OTLP/HTTP span exporter (its HTTP session, retries, timeout
and size limit) sending the bytes of rproxy's own encoder
(L{rproxy.telemetry.encoder}) instead of the official encoder's, which
costs many times as much CPU a span (README, "Tracing": the figures).
It is handed the tracing filter's requests as they are
(L{rproxy.telemetry.request.RequestTrace}, C{takes_requests}), not their
spans as SDK-like records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from rproxy.telemetry.encoder import encode_spans

__all__ = ["CompactSpanExporter"]

_logger = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")


class CompactSpanExporter(OTLPSpanExporter):
    """
    C{OTLPSpanExporter} with its C{export} encoding by
    L{rproxy.telemetry.encoder.encode_spans}, and the rest of it (the
    client that POSTs the bytes and retries, the exporter's metrics) as
    it is.  That rest is the SDK's internals as of 1.45 (C{_client},
    C{_metrics}): with an SDK that has them not, this exporter is the
    official one, encoding included.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compact = all(hasattr(self, name) for name in ("_client", "_metrics", "_shutdown", "_max_request_size"))
        # the tracing filter's requests (RequestTrace) are encoded as they
        # are, not first made into spans (rproxy.telemetry.request)
        self.takes_requests = self.compact

    def export(self, spans: Sequence[Any], spans_count: int | None = None) -> SpanExportResult:
        """
        Send C{spans} (SDK spans, and requests' traces if C{compact}: of
        C{spans_count} spans in all, for the exporter's metrics).
        """
        if not self.compact:
            return super().export(spans)
        if self._shutdown:
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans) if spans_count is None else spans_count) as result:
            try:
                data = encode_spans(spans)
            except Exception as error:  # noqa: BLE001 - a span the encoder cannot write: that batch fails
                _logger.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(data):
                result.error = ValueError(f"a batch of {len(data)} bytes is over max_request_size")
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
