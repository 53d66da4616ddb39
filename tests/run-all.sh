#!/usr/bin/env bash
# The whole test suite: installs what it needs (tests/install-deps.sh), then runs every gate.
# Usage: tests/run-all.sh            (what CI runs)
#        SKIP_SLOW=1 tests/run-all.sh  (skip fuzz, cross builds and the .deb)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# Property tests (proptest) draw their cases from a fixed seed here, so every run of the suite,
# on any machine and under qemu, checks the same cases. Set PROPTEST_RNG_SEED to another value
# (or PROPTEST_CASES higher) to explore further; a failure prints the minimal input.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261130}"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "install dependencies"
tests/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "no_std build of iotcred-core (thumbv7em-none-eabihf)"
cargo build -p iotcred-core --target thumbv7em-none-eabihf --locked
cargo build -p iotcred-core --target thumbv7em-none-eabihf --features async --locked

step "rustdoc -D warnings"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --all-features --locked

if [ -x systemd/check.sh ]; then
  step "systemd units: verify and exposure score"
  systemd/check.sh
fi

step "tests"
cargo build --workspace --all-targets --all-features --locked
# The AWS SDK for Rust consumer (its own workspace: aws-config is heavy).
cargo build --locked --quiet --manifest-path tests/sdk-rust/Cargo.toml
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --locked --no-fail-fast
  cargo test --workspace --all-features --doc --locked
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi

if [ -z "${SKIP_SLOW:-}" ]; then
  if [ -x fuzz/run.sh ]; then
    step "fuzz smoke (each target briefly)"
    fuzz/run.sh "${FUZZ_SECONDS:-20}"
  fi
  if [ -x cross/ci.sh ]; then
    step "cross builds and qemu smoke tests"
    cross/ci.sh
  fi
  if [ -x packaging/build-deb.sh ]; then
    step "arm64 .deb: build (cargo-deb) and inspect"
    deb=$(packaging/build-deb.sh --min-size aarch64-unknown-linux-gnu | tail -1)
    packaging/check-deb.sh "$deb"
  fi
fi
step "all gates passed"
