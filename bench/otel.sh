#!/bin/sh
# Tracing's cost: CPU per request of rproxy without telemetry, at
# sample_ratio 0.01 and at 1.0, spans exported to an OTLP/HTTP receiver.
# Sets up .venv like bin/test, then runs bench/otel_bench.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/otel_bench.py" "$@"
