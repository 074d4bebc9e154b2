#!/bin/sh
# Tunnel benchmark: tunnel vs rproxy L4 vs nginx direct (bench/tunnel.py),
# then streams across the nodes of a cluster beside local ones
# (bench/tunnel_cluster.py).  --cluster-only runs the second alone.
# Sets up .venv like bin/test.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup"
if [ "${1:-}" = "--cluster-only" ]; then
    shift
else
    "$here/.venv/bin/python" "$here/bench/tunnel.py" "$@"
fi
exec "$here/.venv/bin/python" "$here/bench/tunnel_cluster.py" "$@"
