#!/bin/sh
# Instructions per request of bench/policy.py's variants (callgrind, the
# difference of a 1,000- and a 4,000-request run), and each one's ratio to
# the frontend without policy.  Needs valgrind (apt-get install valgrind).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
command -v valgrind >/dev/null || { echo "bench/policy.sh needs valgrind: apt-get install valgrind" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count() {
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$1.$2" "$here/.venv/bin/python" \
        "$here/bench/policy.py" --variant "$1" --requests "$2" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
base=0
for variant in plain limit limit-headers; do
    a=$(count "$variant" 1000)
    b=$(count "$variant" 4000)
    per=$(( (b - a) / 3000 ))
    [ "$base" -eq 0 ] && base=$per
    echo "$variant: $per instructions per request, ratio $(echo "scale=3; $per / $base" | bc)"
done
