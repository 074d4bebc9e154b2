#!/bin/sh
# Tracing's cost (issue 18: at most +15% CPU per request at sample_ratio 1.0,
# +3% at 0.01).
#   bench/otel.sh [--duration 3] [--rounds 5]   CPU per request of rproxy (twistd, sockets, wrk against
#                                               nginx) without telemetry, at 0.01 and at 1.0, spans
#                                               exported to an OTLP/HTTP receiver: bench/otel_bench.py
#   bench/otel.sh --instructions                instructions per request on the engine's hot path (no
#                                               sockets; spans encoded as the exporter does, and at 1.0 also
#                                               by the official encoder; not sent) under callgrind:
#                                               bench/otel_path.py.  Needs valgrind.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null
if [ "${1:-}" != "--instructions" ]; then
    exec "$here/.venv/bin/python" "$here/bench/otel_bench.py" "$@"
fi
command -v valgrind >/dev/null || { echo "bench/otel.sh --instructions needs valgrind: apt-get install valgrind" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count() {  # requests, then otel_path.py's options
    n=$1
    shift
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$here/.venv/bin/python" \
        "$here/bench/otel_path.py" --requests "$n" "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per_request() {
    a=$(count 1000 "$@")
    b=$(count 4000 "$@")
    echo $(( (b - a) / 3000 ))
}
off=$(per_request)
echo "telemetry off:      $off instructions per request"
for ratio in 0 0.01 1.0; do
    n=$(per_request --ratio "$ratio")
    echo "sample_ratio $ratio: $n instructions per request ($(echo "scale=3; $n / $off" | bc)x of off)"
done
n=$(per_request --ratio 1.0 --encoder official)
echo "sample_ratio 1.0, encoder official: $n instructions per request ($(echo "scale=3; $n / $off" | bc)x of off)"
