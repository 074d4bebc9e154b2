#!/bin/sh
# Token-pool benchmark: rproxy's HTTP frontend with and without a token pool.
# Sets up .venv like bin/test, then runs bench/tokenpool_bench.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/tokenpool_bench.py" "$@"
