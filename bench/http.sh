#!/bin/sh
# HTTP benchmark: rproxy vs HAProxy (mode http) vs ReverseProxyResource.
# Sets up .venv like bin/test, then runs bench/http_bench.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/http_bench.py" "$@"
