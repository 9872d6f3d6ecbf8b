#!/usr/bin/env bash
# Runs every test: unit, kernel (as root), scenario, the rule pack's own tests, and a short
# run of every fuzz target (PALISADE_FUZZ_SECS each, default 10; 0 skips it).
# Installs what the build needs first (scripts/setup.sh). Kernel tests skip with a printed
# reason when they cannot run; with PALISADE_REQUIRE_KERNEL=1 (CI) a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"

cargo build --all-targets
# Tests share the machine's kernel; the kernel tests create uniquely named lab resources, so
# they can run in parallel, but two threads per binary keeps a 2-core CI box responsive.
cargo test -- --test-threads=2
# The rule author's tool on the shipped pack: every default rule's positive and negative tests.
./target/debug/palisade rules test rules/
# Every fuzz target for a short run (fuzz/README.md, "In the test command"): builds them first
# (cargo-fuzz, nightly, only our crates instrumented), then a crash, leak or timeout fails.
fuzz_secs="${PALISADE_FUZZ_SECS:-10}"
if [ "$fuzz_secs" != 0 ]; then
    scripts/fuzz.sh "$fuzz_secs"
fi
