#!/bin/sh
# Stores benchmark: tunnel login with a warm Redis cache vs static keys, and
# 10,000 events/s into Redis Streams and into Kafka vs none, under proxied traffic.
# Sets up .venv like bin/test, then runs bench/stores_bench.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/stores_bench.py" "$@"
