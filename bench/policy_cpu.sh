#!/bin/sh
# CPU per request of rproxy with an IP rate limit and an allow list vs
# without (real processes, wrk, nginx): see bench/policy_cpu.py.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
exec "$here/.venv/bin/python" "$here/bench/policy_cpu.py" "$@"
