# shellcheck shell=bash
# Sourced by cross/build.sh and cross/ci.sh: per-target settings of the docker-free cross build
# (Debian cross toolchains + qemu-user). Not executable on its own.
#
#   cross_setup TARGET   validates TARGET, sets CROSS_* variables and exports the cargo/cc
#                        environment (linker, C compiler for ring, qemu runner).
#   cross_install TARGET installs missing Debian packages and the rustup target (idempotent).

CROSS_TARGETS="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-gnu"

cross_log() { echo "cross: $*" >&2; }

cross_setup() {
  local t=$1
  case "$t" in
    aarch64-unknown-linux-gnu)
      CROSS_GNU=aarch64-linux-gnu; CROSS_QEMU=qemu-aarch64; CROSS_DEB_ARCH=arm64
      CROSS_APT="gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu"
      CROSS_FILE_ARCH="ARM aarch64" ;;
    armv7-unknown-linux-gnueabihf)
      CROSS_GNU=arm-linux-gnueabihf; CROSS_QEMU=qemu-arm; CROSS_DEB_ARCH=armhf
      CROSS_APT="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross binutils-arm-linux-gnueabihf"
      CROSS_FILE_ARCH="ARM, EABI5" ;;
    x86_64-unknown-linux-gnu)
      CROSS_GNU=x86_64-linux-gnu; CROSS_QEMU=""; CROSS_DEB_ARCH=amd64
      CROSS_APT="gcc libc6-dev binutils"
      CROSS_FILE_ARCH="x86-64" ;;
    *)
      echo "cross: unsupported target '$t' (supported: $CROSS_TARGETS)" >&2
      return 2 ;;
  esac
  CROSS_TARGET=$t
  local up under
  up=$(echo "$t" | tr 'a-z-' 'A-Z_')       # CARGO_TARGET_<T>_* spelling
  CROSS_CARGO_ENV=CARGO_TARGET_$up         # prefix of the target's cargo variables
  under=$(echo "$t" | tr '-' '_')          # cc crate spelling (CC_<target>)
  if [ "$t" = x86_64-unknown-linux-gnu ] && [ "$(uname -m)" = x86_64 ]; then
    CROSS_CC=cc; CROSS_AR=ar; CROSS_STRIP=strip; CROSS_SYSROOT=/
  else
    CROSS_CC=$CROSS_GNU-gcc; CROSS_AR=$CROSS_GNU-ar; CROSS_STRIP=$CROSS_GNU-strip
    CROSS_SYSROOT=/usr/$CROSS_GNU
  fi
  export "${CROSS_CARGO_ENV}_LINKER=$CROSS_CC"
  export "CC_${under}=$CROSS_CC" "AR_${under}=$CROSS_AR"
  if [ -n "$CROSS_QEMU" ]; then
    # -L: the cross glibc from libc6-*-cross. Never add a foreign dpkg architecture next to it
    # (two glibcs mix and thread spawns hang under qemu).
    CROSS_RUN="$CROSS_QEMU -L $CROSS_SYSROOT"
    export "${CROSS_CARGO_ENV}_RUNNER=$CROSS_RUN"
  else
    CROSS_RUN=""
  fi
}

cross_install() {
  local t=$1 sudo="" missing=() p
  cross_setup "$t" || return
  [ "$(id -u)" = 0 ] || sudo="sudo"
  local pkgs="$CROSS_APT"
  [ -n "$CROSS_QEMU" ] && pkgs="$pkgs qemu-user"
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    cross_log "apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if ! rustup target list --installed | grep -qx "$t"; then
    cross_log "rustup target add $t"
    rustup target add "$t" >&2
  fi
}
