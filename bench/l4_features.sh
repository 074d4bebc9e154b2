#!/bin/sh
# What proxy_protocol, the tcplog access log and allow lists cost a TCP
# frontend (CPU per request), and this checkout against main: see
# bench/l4_features.py.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null
exec "$here/.venv/bin/python" "$here/bench/l4_features.py" "$@"
