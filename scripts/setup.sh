#!/usr/bin/env bash
# Idempotent set-up: installs what building palisade needs when it is missing.
# - nightly rust-src (the eBPF crate builds core with -Z build-std)
# - Debian's LLVM 22 dev packages (bpf-linker links against them)
# - bpf-linker built against that LLVM
# - iproute2 (the lab), procps
# - kubectl (kustomize rendering of deploy/ in the tests)
# - cargo-fuzz (scripts/test.sh runs every fuzz target for a short time; fuzz/README.md)
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_pkgs=()
for pkg in llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 procps; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    need_pkgs+=("$pkg")
  fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# kubectl: its built-in kustomize renders deploy/ in daemon/tests/k8s_deploy.rs.
if ! command -v kubectl >/dev/null 2>&1; then
  log "installing kubectl (kustomize rendering in the deploy tests)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kubectl >/dev/null \
    || log "WARNING: kubectl is not installable from this machine's apt sources; the k8s_deploy rendering test will fail"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

export PATH="/usr/lib/llvm-22/bin:$HOME/.cargo/bin:$PATH"
if ! command -v bpf-linker >/dev/null 2>&1; then
  log "building bpf-linker against LLVM 22 (about a minute)"
  cargo install bpf-linker --locked --no-default-features --features llvm-22
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (about a minute)"
  cargo install cargo-fuzz --version 0.13.2 --locked  # fuzz/rustc-wrapper.sh knows its flags
fi
log "ready: $(bpf-linker --version 2>/dev/null || echo bpf-linker), $(cargo fuzz --version 2>/dev/null || echo cargo-fuzz)"
