"""
The C{telemetry} section: OpenTelemetry traces exported over OTLP.

    telemetry:
      otlp_endpoint: http://127.0.0.1:4318   # the collector's OTLP/HTTP base URL
      protocol: http/protobuf                 # the one supported
      service_name: rproxy
      sample_ratio: 0.1                       # of traces rproxy starts; a traced client's choice is kept
      headers: {authorization: "Bearer ..."}  # sent with every export
      timeout: 10s                            # one export request
      queue_size: 8192                        # ended spans waiting for export; past it they are dropped
      batch_size: 2048                        # spans a POST (fewer POSTs and thread hand-offs than 512)
      encoder: compact                        # or official: the SDK's protobuf encoder (tens of times the CPU a span)
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

from rproxy.config import values as v
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief

__all__ = ["TelemetryConfig", "read_telemetry", "PROTOCOLS"]

# what rproxy can export with (the OTLP/gRPC exporter would need grpcio,
# a large native dependency, for what OTLP/HTTP does as well)
PROTOCOLS = ("http/protobuf",)
# how spans are encoded: rproxy.telemetry.encoder, or the official
# exporter's encode_spans
ENCODERS = ("compact", "official")


@attrs.frozen
class TelemetryConfig:
    """
    @ivar endpoint: the URL spans are POSTed to (the base URL's
        C{/v1/traces}).
    """

    otlp_endpoint: str
    endpoint: str
    protocol: str = "http/protobuf"
    service_name: str = "rproxy"
    sample_ratio: float = 1.0
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    queue_size: int = 8192
    batch_size: int = 2048
    schedule_delay: float = 1.0
    encoder: str = "compact"


def _protocol(value: object) -> str:
    if value == "grpc":
        raise ValueError("grpc is not supported: use http/protobuf (OTLP over HTTP, a collector's port 4318)")
    return v.choice(PROTOCOLS)(value)


def _endpoint(value: object) -> str:
    url = v.text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {brief(url)}")
    try:
        parts.port  # noqa: B018 - checks it
    except ValueError:
        raise ValueError(f"{brief(url)} has a bad port") from None
    return url


def signal_url(base: str) -> str:
    """
    The traces URL of an OTLP/HTTP base URL (as the SDK's
    C{OTEL_EXPORTER_OTLP_ENDPOINT} is read): C{/v1/traces} appended unless
    the URL names it already.
    """
    if base.rstrip("/").endswith("/v1/traces"):
        return base
    return base.rstrip("/") + "/v1/traces"


def _headers(section: Section) -> tuple[tuple[str, str], ...]:
    raw = section.raw("headers")
    if raw is MISSING or raw is None:
        return ()
    if not isinstance(raw, dict):
        section.error("headers", f"expected a mapping of header names to values, got {v.kind(raw)}")
        return ()
    headers = []
    for name, value in raw.items():
        if not isinstance(name, str) or not v.is_token(name):
            section.error("headers", f"{brief(name)} is not a header name")
            continue
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            section.errors.append(f"{section.key_path('headers')}.{name}: expected a string without line breaks")
            continue
        headers.append((name, value))
    return tuple(headers)


def read_telemetry(top: Section) -> TelemetryConfig | None:
    """
    The C{telemetry} section, or None when there is none (no tracing).
    """
    raw = top.raw("telemetry")
    if raw is MISSING or raw is None:
        return None
    section = top.child(raw, "telemetry")
    if not section.ok:
        return None
    base = section.value("otlp_endpoint", _endpoint)
    protocol = section.value("protocol", _protocol, "http/protobuf")
    service_name = section.value("service_name", v.text, "rproxy")
    ratio = section.value("sample_ratio", v.fraction, 1.0)
    headers = _headers(section)
    timeout = section.value("timeout", v.positive_duration, 10.0)
    queue_size = section.value("queue_size", v.int_in(1, 1_000_000), 8192)
    batch_size = section.value("batch_size", v.int_in(1, 100_000), 2048)
    delay = section.value("schedule_delay", v.positive_duration, 1.0)
    encoder = section.value("encoder", v.choice(ENCODERS), "compact")
    section.finish()
    if base is None:
        return None
    if batch_size > queue_size:
        section.error("batch_size", f"{batch_size} is more than queue_size ({queue_size})")
        return None
    return TelemetryConfig(otlp_endpoint=base, endpoint=signal_url(base), protocol=protocol,
                           service_name=service_name or "rproxy", sample_ratio=ratio, headers=headers,
                           timeout=timeout, queue_size=queue_size, batch_size=batch_size,
                           schedule_delay=delay, encoder=encoder or "compact")
