#!/bin/sh
# Before/after of the policy change-to-maps latency (issue 17) in one run, interleaved: two
# builds of the policy_latency bench (each with its own daemon for file mode) run in turn,
# ROUNDS rounds per policy count and mode, the order swapped every round, so that both see the
# same machine (the load average is printed on every row). Root only.
#
#   BEFORE_BENCH=... BEFORE_DAEMON=... AFTER_BENCH=... AFTER_DAEMON=... \
#     scripts/policy-latency-interleaved.sh
#
# BEFORE_BENCH, AFTER_BENCH / *_DAEMON: a `policy_latency-*` bench binary (target/release/deps) and the
# `palisade` binary of the same build. SIZES (default "1000 10000"), MODES (default
# "file kube"), ROUNDS (default 2), CHANGES_<size> (changes per row and round; default 200 at
# 1,000 policies, 100 at 10,000).
set -eu
: "${BEFORE_BENCH:?}" "${BEFORE_DAEMON:?}" "${AFTER_BENCH:?}" "${AFTER_DAEMON:?}"
SIZES=${SIZES:-"1000 10000"}
MODES=${MODES:-"file kube"}
ROUNDS=${ROUNDS:-2}
run() { # build bench daemon size mode changes
    BENCH_BUILD=$1 BENCH_PALISADE=$3 BENCH_POLICIES=$4 BENCH_MODES=$5 BENCH_CHANGES=$6 "$2" --bench 2>&1 | grep '^| [ab]' | awk '!seen[$0]++' || true
}
echo "| build | policies | path | changes | p50 | p99 | max | CPU per change | load |"
echo "|---|---|---|---|---|---|---|---|---|"
for size in $SIZES; do
    eval "changes=\${CHANGES_$size:-}"
    [ -n "$changes" ] || { [ "$size" -ge 10000 ] && changes=100 || changes=200; }
    for mode in $MODES; do
        round=1
        while [ "$round" -le "$ROUNDS" ]; do
            if [ $((round % 2)) -eq 1 ]; then
                run before "$BEFORE_BENCH" "$BEFORE_DAEMON" "$size" "$mode" "$changes"
                run after "$AFTER_BENCH" "$AFTER_DAEMON" "$size" "$mode" "$changes"
            else
                run after "$AFTER_BENCH" "$AFTER_DAEMON" "$size" "$mode" "$changes"
                run before "$BEFORE_BENCH" "$BEFORE_DAEMON" "$size" "$mode" "$changes"
            fi
            round=$((round + 1))
        done
    done
done
