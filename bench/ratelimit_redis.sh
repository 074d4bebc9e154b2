#!/bin/sh
# What a Redis-shared rate limit adds at p99 (bench/ratelimit_redis.py).
# Needs nginx, wrk, redis-server (apt-get install nginx wrk redis-server).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
exec "$here/.venv/bin/python" "$here/bench/ratelimit_redis.py" "$@"
