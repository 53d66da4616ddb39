#!/usr/bin/env bash
# Installs what the test suite needs on a Debian 12 machine (idempotent): Debian packages for
# the real parts (SoftHSM2, swtpm + tpm2-pkcs11, mosquitto, cross linkers, qemu-user, openssl,
# faketime), rustup targets and components, and the AWS SDK consumers (PyPI, npm) into tests/.deps/.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PKGS=(softhsm2 opensc swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus openssl curl faketime
  gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross qemu-user
  systemd golang-go golang-github-aws-aws-sdk-go-v2-dev iproute2 mosquitto mosquitto-clients)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

installed_targets=$(rustup target list --installed)
for t in thumbv7em-none-eabihf aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  grep -qx "$t" <<<"$installed_targets" || rustup target add "$t"
done
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

# Fuzzing (a short run of every target is part of the suite): nightly + cargo-fuzz.
if [ -z "${SKIP_SLOW:-}" ]; then
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

# Consumers: real AWS SDKs, installed from their registries into a project-local directory.
DEPS=tests/.deps
mkdir -p "$DEPS"
if [ ! -d "$DEPS/py/botocore" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$DEPS/py" botocore
fi
# moto's STS in server mode, a real independent implementation of the STS XML API (chained-role
# tests). Its own directory: moto pins its own boto3/botocore, which must not replace the
# botocore the consumer tests use. Only the server's extras (flask, flask-cors) are needed for
# STS, not the 300 MB of moto[server]'s other services.
if [ ! -d "$DEPS/moto/moto" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$DEPS/moto" \
    'moto==5.2.1' flask flask-cors
fi
if [ ! -d "$DEPS/node/node_modules/@aws-sdk/credential-providers" ]; then
  mkdir -p "$DEPS/node"
  (cd "$DEPS/node" && [ -f package.json ] || echo '{"private":true}' > package.json
   npm install --silent --no-audit --no-fund @aws-sdk/credential-providers >/dev/null)
fi
echo "install-deps: ok"
