#!/bin/sh
# Profiles policy changes at N policies (issue 17) with perf, sampling only while changes run:
# the policy_latency bench is started in one mode with CHANGES changes (default 100), and perf
# attaches (to the bench process in kube mode, to the daemon in file mode) once the set is
# loaded, until that process exits. Root only.
#   BENCH=target/release/deps/policy_latency-HASH [DAEMON=target/release/palisade] \
#     scripts/profile-policy-change.sh kube|file [POLICIES]
set -eu
mode=$1
policies=${2:-10000}
out=${OUT:-target/profile}
mkdir -p "$out"
log="$out/bench-$mode-$policies.log"
BENCH_POLICIES=$policies BENCH_MODES=$mode BENCH_CHANGES=${CHANGES:-100} BENCH_PALISADE=${DAEMON:-} "$BENCH" --bench >"$log" 2>&1 &
bench=$!
ready="first compile and sync"
[ "$mode" = file ] && ready="daemon running after"
until grep -q "$ready" "$log"; do
    kill -0 "$bench" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
done
target=$bench
if [ "$mode" = file ]; then
    target=$(pgrep -f "palisade-bench-policy-$bench-$policies" | head -1)
fi
echo "profiling pid $target until it exits (load $(cut -d' ' -f1-3 /proc/loadavg))"
perf record -F 999 -p "$target" -o "$out/perf-$mode-$policies.data" 2>/dev/null || true
wait "$bench" || true
grep '^| ' "$log" | awk '!seen[$0]++'
perf report -i "$out/perf-$mode-$policies.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -50
