#!/usr/bin/env bash
# Builds the Debian package of iotcred for one target from the cross-built binary.
# Usage: packaging/build-deb.sh [--min-size] TARGET
#   --min-size: package the smaller nightly build-std binary (cross/build.sh --min-size)
#   TARGET: aarch64-unknown-linux-gnu (arm64) | armv7-unknown-linux-gnueabihf (armhf) |
#           x86_64-unknown-linux-gnu (amd64)
# Installs cargo-deb 3.8.0 (`cargo install cargo-deb --version 3.8.0 --locked`) when missing, builds the stripped
# binary with cross/build.sh, then runs `cargo deb --no-build --target TARGET` (cargo-deb maps
# the Rust target to the Debian architecture and takes target/TARGET/release/iotcred).
# Prints the .deb path as its last line of stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=cross/env.sh
. "$ROOT/cross/env.sh"

MIN_SIZE=()
if [ "${1:-}" = --min-size ]; then MIN_SIZE=(--min-size); shift; fi
if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
TARGET=$1
cross_setup "$TARGET"
cd "$ROOT"

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: installing cargo-deb 3.8.0" >&2
  start=$(date +%s)
  cargo install cargo-deb --version 3.8.0 --locked >&2
  echo "build-deb: cargo-deb installed in $(( $(date +%s) - start ))s" >&2
fi

bin=$("$ROOT/cross/build.sh" "${MIN_SIZE[@]}" "$TARGET" | tail -1)
echo "build-deb: packaging $bin ($CROSS_DEB_ARCH)" >&2

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/debian
# cargo-deb takes the binary from $CARGO_TARGET_DIR/TARGET/release/.
BUILD_DIR=$TARGET_DIR
[ ${#MIN_SIZE[@]} -gt 0 ] && BUILD_DIR=$TARGET_DIR/min-size
mkdir -p "$OUT"
# --no-strip: cross/build.sh already stripped with the target's binutils (cargo-deb would
# look for a host strip). --locked: same Cargo.lock as the build.
out=$(CARGO_TARGET_DIR=$BUILD_DIR cargo deb -p iotcred-agent --no-build --no-strip --locked --target "$TARGET" --output "$OUT" | tail -1)
deb=$out
case "$deb" in
  *.deb) ;;
  *) deb=$(ls -t "$OUT"/iotcred_*_"$CROSS_DEB_ARCH".deb 2>/dev/null | head -1) ;;
esac
[ -f "$deb" ] || { echo "build-deb: no .deb produced for $TARGET" >&2; exit 1; }
arch=$(dpkg-deb -f "$deb" Architecture)
[ "$arch" = "$CROSS_DEB_ARCH" ] || { echo "build-deb: $deb has Architecture $arch, want $CROSS_DEB_ARCH" >&2; exit 1; }
echo "$deb"
