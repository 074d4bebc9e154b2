#!/bin/sh
# Workers benchmark: CPU per request and connection spread at workers 2 vs 1,
# requests/s by workers up to the cores found (see bench/workers.py).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
exec "$here/.venv/bin/python" "$here/bench/workers.py" "$@"
