#!/bin/sh
# Instructions per request of bench/http_path.py (callgrind, the difference
# of a 1,000- and a 4,000-request run); --tunnel: through a tunnel's mode http.  Needs valgrind (apt-get install valgrind).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
command -v valgrind >/dev/null || { echo "bench/http_path.sh needs valgrind: apt-get install valgrind" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count() {
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$1" "$here/.venv/bin/python" \
        "$here/bench/http_path.py" --requests "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(count 1000 "$@")
b=$(count 4000 "$@")
echo "$(( (b - a) / 3000 )) instructions per request"
