#!/usr/bin/env bash
# Docker-free cross build of the `iotcred` binary, size-tuned (the workspace release profile:
# opt-level "z", lto, codegen-units 1, panic abort, strip) and stripped.
#
# Usage: cross/build.sh TARGET
#   TARGET: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf | x86_64-unknown-linux-gnu
# Installs missing Debian cross toolchains and the rustup target itself (idempotent), then
# prints the path of the stripped binary as its last line of stdout (everything else goes to
# stderr). Honours CARGO_TARGET_DIR; extra cargo flags can be passed in CROSS_CARGO_FLAGS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=cross/env.sh
. "$ROOT/cross/env.sh"

if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
TARGET=$1
cross_install "$TARGET"
cross_setup "$TARGET"

cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cross_log "cargo build --release --target $TARGET (linker $CROSS_CC)"
# shellcheck disable=SC2086
cargo build --release --locked -p iotcred-agent --bin iotcred --target "$TARGET" \
  ${CROSS_CARGO_FLAGS:-} >&2

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
