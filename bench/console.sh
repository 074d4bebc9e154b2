#!/bin/sh
# What the dashboard costs the proxy: keep-alive req/s with the page closed
# and with viewers polling it (see bench/console_bench.py).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/console_bench.py" "$@"
