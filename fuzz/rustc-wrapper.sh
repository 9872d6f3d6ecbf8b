#!/usr/bin/env bash
# RUSTC_WRAPPER for the cargo-fuzz build (scripts/fuzz.sh sets it): only palisade's own crates
# (palisade, palisade-common and the fuzz crate) are compiled with AddressSanitizer and
# sanitizer coverage; every dependency (regorus, kube, k8s-openapi, aya, tokio, ...) is
# compiled without them. Why: instrumenting the ~330 dependencies is what made the fuzz build
# take an hour on a 2-vCPU machine, and libFuzzer only needs coverage of the code under test to
# steer. Rust dependencies are memory-safe outside their `unsafe`, which ASan would check, so
# that is what this trades away (see fuzz/README.md).
#
# Cargo calls this as `rustc-wrapper.sh RUSTC ARGS...`; CARGO_PKG_NAME names the package being
# compiled. Flags dropped for dependencies are exactly those cargo-fuzz adds for
# instrumentation (cargo-fuzz 0.13 project.rs): -Zsanitizer/-Csanitizer, -Cpasses=sancov-module,
# -Cllvm-args=-sanitizer-coverage-*, -Cllvm-args=-simplifycfg-branch-fold-threshold=0,
# -Cinstrument-coverage, -Cdebug-assertions. `--cfg fuzzing` stays for every crate.
set -euo pipefail
rustc="$1"
shift

case "${CARGO_PKG_NAME:-}" in
palisade | palisade-common | palisade-fuzz)
    instrumented=1
    ;;
*)
    instrumented=0
    ;;
esac

# Build scripts and proc macros are compiled for the host without cargo-fuzz's flags (it passes
# --target), so the loop below finds nothing to drop in theirs. Mixing instrumented and plain
# crates links (rustc 1.97 nightly does not treat -Zsanitizer=address as an ABI mismatch; the
# standard library is plain too).
if [ "$instrumented" -eq 1 ]; then
    exec "$rustc" "$@"
fi

args=()
for arg in "$@"; do
    case "$arg" in
    -Zsanitizer=* | -Csanitizer=* | -Zsanitizer-memory-track-origins | -Cpasses=sancov-module | \
        -Cllvm-args=-sanitizer-coverage-* | -Cllvm-args=-simplifycfg-branch-fold-threshold=0 | \
        -Cinstrument-coverage | -Cdebug-assertions)
        continue
        ;;
    esac
    args+=("$arg")
done
exec "$rustc" "${args[@]}"
