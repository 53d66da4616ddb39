#!/usr/bin/env bash
# Docker-free cross build of the `iotcred` binary, size-tuned (the workspace release profile:
# opt-level "z", lto, codegen-units 1, panic abort, strip) and stripped.
#
# Usage: cross/build.sh [--min-size] TARGET
#   TARGET: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf | x86_64-unknown-linux-gnu
#   --min-size  also rebuild the standard library for the binary (nightly toolchain,
#               -Zbuild-std with its optimize_for_size feature, no unwind tables: panics abort
#               anyway). About 20% smaller; installs the nightly rust-src component when missing.
#               Output under $CARGO_TARGET_DIR/min-size/.
# Installs missing Debian cross toolchains and the rustup target itself (idempotent), then
# prints the path of the stripped binary as its last line of stdout (everything else goes to
# stderr). Honours CARGO_TARGET_DIR; extra cargo flags can be passed in CROSS_CARGO_FLAGS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=cross/env.sh
. "$ROOT/cross/env.sh"

MIN_SIZE=""
if [ "${1:-}" = --min-size ]; then MIN_SIZE=1; shift; fi
if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
TARGET=$1
cross_install "$TARGET"
cross_setup "$TARGET"

cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
toolchain=(); extra=()
if [ -n "$MIN_SIZE" ]; then
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal >&2
  rustup component list --toolchain nightly --installed | grep -q '^rust-src' ||
    rustup component add rust-src --toolchain nightly >&2
  TARGET_DIR=$TARGET_DIR/min-size
  export "${CROSS_CARGO_ENV}_RUSTFLAGS=-Cforce-unwind-tables=no"
  toolchain=(+nightly)
  extra=(-Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size)
fi
cross_log "cargo ${toolchain[*]} build --release ${extra[*]} --target $TARGET (linker $CROSS_CC)"
# shellcheck disable=SC2086
CARGO_TARGET_DIR=$TARGET_DIR cargo "${toolchain[@]}" build --release --locked -p iotcred-agent \
  --bin iotcred --target "$TARGET" "${extra[@]}" ${CROSS_CARGO_FLAGS:-} >&2

BIN=$TARGET_DIR/$TARGET/release/iotcred
[ -x "$BIN" ] || { echo "cross: $BIN was not produced" >&2; exit 1; }
# The profile already strips; strip again with the target's binutils (a no-op when already
# stripped) so the result does not depend on the profile.
"$CROSS_STRIP" --strip-all "$BIN"
if command -v file >/dev/null; then
  desc=$(file -b "$BIN")
  case "$desc" in
    *"$CROSS_FILE_ARCH"*) ;;
    *) echo "cross: $BIN is not a $TARGET binary: $desc" >&2; exit 1 ;;
  esac
fi
cross_log "$(stat -c %s "$BIN") bytes: $BIN"
echo "$BIN"
