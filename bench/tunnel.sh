#!/bin/sh
# Tunnel benchmark: tunnel vs rproxy L4 vs nginx direct.
# Sets up .venv like bin/test, then runs bench/tunnel.py (see its docstring).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
exec "$here/.venv/bin/python" "$here/bench/tunnel.py" "$@"
