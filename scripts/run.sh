#!/usr/bin/env bash
# The main job: the daemon on its embedded defaults (standalone mode, a local lab of the
# webapp example pods, the default rules and policies). Needs root. Ctrl-C stops it; the
# lab stays up for inspection (`palisade lab down` removes it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"
cargo build --release -p palisade
exec ./target/release/palisade run --lab "$@"
