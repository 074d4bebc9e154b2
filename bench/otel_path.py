"""
Tracing's cost on the HTTP engine's hot path, with no sockets: the
requests of bench/http_path.py (50 keep-alive clients, nginx's 100-byte
answer, fake transports) through a frontend without telemetry, or traced
at C{--ratio}; the spans encoded as the OTLP/HTTP exporter encodes them
(rproxy's encoder, L{rproxy.telemetry.encoder}, or with C{--encoder
official} the official exporter's C{encode_spans}), not sent.  All of
it is counted: the processor's thread too, flushed at the end.

    .venv/bin/python bench/otel_path.py --ratio 0.01    # us per request (CPU time)
    bench/otel.sh --instructions                        # instructions per request, off / 0.01 / 1.0

The second runs this under callgrind (1,000 and 4,000 requests; the
difference over 3,000): a count that does not drift with the machine's
load, unlike CPU time on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import http_path  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from rproxy.config.telemetry import TelemetryConfig  # noqa: E402
from rproxy.http.frontend import HTTPFrontend  # noqa: E402
from rproxy.telemetry.encoder import encode_spans  # noqa: E402
from rproxy.telemetry.provider import Telemetry  # noqa: E402


class EncodingExporter(SpanExporter):
    """
    Encodes each batch as the OTLP/HTTP exporter does; sends nothing.
    """

    def __init__(self, encoder: str) -> None:
        self.official = encoder == "official"
        # (the tracing filter's requests: the official encoder is handed their spans)
        self.takes_requests = not self.official

    def export(self, spans: Any, spans_count: int | None = None) -> SpanExportResult:
        if self.official:
            official(spans).SerializePartialToString()
        else:
            encode_spans(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=None, help="sample_ratio (none: no telemetry)")
    parser.add_argument("--requests", type=int, default=0, help="run this many after the warm-up and exit")
    parser.add_argument("--encoder", choices=("compact", "official"), default="compact")
    args = parser.parse_args()
    exporter = EncodingExporter(args.encoder)
    made: list[Telemetry] = []
    if args.ratio is not None:
        build = HTTPFrontend.__init__

        def traced(self: HTTPFrontend, *a: Any, **kw: Any) -> None:
            build(self, *a, **kw)
            config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:9", endpoint="http://127.0.0.1:9/v1/traces",
                                     sample_ratio=args.ratio, queue_size=100_000)
            made.append(Telemetry(config, None, Clock(), exporter=exporter))
            self.telemetry = made[-1]

        HTTPFrontend.__init__ = traced  # type: ignore[method-assign]
    clients, one_round = http_path.build(50)
    for _ in range(20):
        one_round()
    if args.requests:
        for _ in range(args.requests // 50):
            one_round()
    else:
        best = float("inf")
        for _ in range(7):
            start = time.process_time()
            for _ in range(100):
                one_round()
            for telemetry in made:
                telemetry.processor.force_flush()
            best = min(best, (time.process_time() - start) / 5000)
        print(f"{best * 1e6:.1f} us of CPU per request (best of 7, the exporter's thread included)")
    for telemetry in made:
        telemetry.processor.force_flush()
        telemetry.processor.shutdown()


if __name__ == "__main__":
    main()
