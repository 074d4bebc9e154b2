#!/bin/sh
# Instructions per request of each variant of bench/access_path.py
# (callgrind, the difference of a 1,000- and a 4,000-request run), and the
# ratio to the plain frontend's.  Needs valgrind (apt-get install valgrind).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bin/setup" >/dev/null 2>&1
command -v valgrind >/dev/null || { echo "bench/access_path.sh needs valgrind: apt-get install valgrind" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count() {
    valgrind --tool=callgrind --callgrind-out-file="$work/cg" "$here/.venv/bin/python" \
        "$here/bench/access_path.py" --only "$1" --requests "$2" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
plain=0
for variant in plain allow allow+trusted api_keys "basic(cached)"; do
    a=$(count "$variant" 1000)
    b=$(count "$variant" 4000)
    n=$(( (b - a) / 3000 ))
    [ "$plain" -eq 0 ] && plain=$n
    echo "$variant: $n instructions per request ($(awk "BEGIN { printf \"%.3f\", $n / $plain }") of plain)"
done
