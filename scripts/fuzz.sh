#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ (nightly, libFuzzer, AddressSanitizer) and runs each
# one after another, each one process (no -jobs: with it libFuzzer forks a worker that writes its
# own fuzz-N.log) for SECONDS each (default 3) on its seeds
# (fuzz/seeds/TARGET, read-only) plus what earlier runs found (fuzz/corpus/TARGET, not in git).
# A crash, leak, timeout or out-of-memory stops the script with the input saved under
# fuzz/artifacts/TARGET/. Installs cargo-fuzz when missing. See fuzz/README.md.
#
#   scripts/fuzz.sh            # every target, 3 s each (scripts/test.sh runs it for 10 s each)
#   scripts/fuzz.sh 300 policy_oracle inventory   # 5 minutes each of two targets
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"
seconds="${1:-3}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked  # rustc-wrapper.sh knows its flags
fi
cd fuzz
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
# 16 codegen units: the targets link the whole daemon library (kube, regorus, aya), and
# cargo-fuzz's default of one unit per crate makes that build much slower, for a small gain in
# executions per second.
build=(--codegen-units 16)
# Only our crates get AddressSanitizer and coverage; dependencies are built plain (see the
# wrapper and fuzz/README.md "Build time").
export RUSTC_WRAPPER="$PWD/rustc-wrapper.sh"
build_start=$SECONDS
cargo +nightly fuzz build "${build[@]}"
echo "== fuzz build: $((SECONDS - build_start)) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "== fuzz $target (${seconds} s)"
    log="corpus/$target.log"
    set +e
    cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E "^(INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE)|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|SUMMARY|==[0-9]+==ERROR|thread .* panicked)" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/" >&2
        exit "$status"
    fi
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
