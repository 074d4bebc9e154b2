"""
The official OTLP/HTTP span exporter (its HTTP client, retries, timeout
and size limit) sending the bytes of rproxy's own encoder
(L{rproxy.telemetry.encoder}) instead of the official encoder's, which
costs many times as much CPU a span (README, "Tracing": the figures).
It is handed the tracing filter's requests as they are
(L{rproxy.telemetry.request.RequestTrace}, C{takes_requests}), not their
spans as SDK-like records.

Its POSTs go through the official exporter's urllib3 transport rather
than its default, a C{requests} session, which costs twice the CPU a
POST (~430 against ~210 us for a batch of 512 requests on the bench
machine: the session's proxy, netrc and cookie handling around the same
urllib3 request).  What that session gives and urllib3 has not, proxies
from the environment (C{HTTPS_PROXY} and the like) and the OTLP
certificate variables, keep the default: with any of those set the
session is used, as with an SDK too old for the transport.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from rproxy.telemetry.encoder import encode_spans

__all__ = ["CompactSpanExporter"]

_logger = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")

# what only the default transport (a requests session) honours
_SESSION_ONLY = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                 "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                 "OTEL_EXPORTER_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY")


def _urllib3_transport(kwargs: dict[str, Any]) -> Any:
    """
    The official exporter's urllib3 transport for an exporter made with
    C{kwargs}, or None for its default (L{CompactSpanExporter}: when).
    """
    if "session" in kwargs or "_transport" in kwargs or any(os.environ.get(name) for name in _SESSION_ONLY):
        return None
    if "_transport" not in inspect.signature(OTLPSpanExporter.__init__).parameters:
        return None
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return None
    return Urllib3HTTPTransport()


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
        transport = _urllib3_transport(kwargs)
        if transport is not None:
            kwargs["_transport"] = transport
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
