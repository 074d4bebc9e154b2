#!/bin/sh
# L4 benchmark: rproxy vs HAProxy (mode tcp, nbthread 1) vs nginx direct.
# Sets up .venv like bin/test, then runs bench/l4.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/l4.py" "$@"
