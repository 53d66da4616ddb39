#!/usr/bin/env bash
# Makes a throwaway PKI for trying iotcred against the fake provider (tests/, `fake-provider`):
#   ca.pem / ca.key                    test CA (trusted by both sides)
#   server.pem / server.key            server cert for localhost, 127.0.0.1, ::1
#   device.pem.crt / device.key        device cert, CN gateway-0042, EC P-256 (PKCS#8)
#   device-rsa.pem.crt / device-rsa.key  the same with an RSA-2048 key
# Usage: make-certs.sh [DIR]   (default: certs-example/out, which git ignores)
# Idempotent: an existing, complete set that is valid for at least another day is kept.
# Set FORCE=1 to make a new one. Nothing here is secret; never use it in production.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
thing="${THING_NAME:-gateway-0042}"
days=365

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
cd "$out"

files=(ca.pem ca.key server.pem server.key device.pem.crt device.key device-rsa.pem.crt device-rsa.key)
complete=1
for f in "${files[@]}"; do [ -s "$f" ] || complete=0; done
if [ "${FORCE:-0}" != 1 ] && [ "$complete" = 1 ]; then
  fresh=1
  for c in ca.pem server.pem device.pem.crt device-rsa.pem.crt; do
    openssl x509 -in "$c" -noout -checkend 86400 >/dev/null 2>&1 || fresh=0
  done
  if [ "$fresh" = 1 ]; then
    echo "certificates in $out are present and valid; FORCE=1 to remake them"
    exit 0
  fi
fi

umask 077                      # keys are created 0600 from the start
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

serial() { echo "0x$(openssl rand -hex 16 | sed 's/^./1/')"; }
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# CA
ec_key "$tmp/ca.key"
cat > "$tmp/ca.ext" <<EXT
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
EXT
openssl req -new -key "$tmp/ca.key" -subj "/O=iotcred example/CN=iotcred example CA" -out "$tmp/ca.csr"
openssl x509 -req -in "$tmp/ca.csr" -key "$tmp/ca.key" -days $((days * 10)) -set_serial "$(serial)" \
  -extfile "$tmp/ca.ext" -out "$tmp/ca.pem" 2>/dev/null

sign() { # sign CSR EXTFILE OUT
  openssl x509 -req -in "$1" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -days "$days" \
    -set_serial "$(serial)" -extfile "$2" -out "$3" 2>/dev/null
}

# Server
ec_key "$tmp/server.key"
cat > "$tmp/server.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
authorityKeyIdentifier = keyid
EXT
openssl req -new -key "$tmp/server.key" -subj "/O=iotcred example/CN=localhost" -out "$tmp/server.csr"
sign "$tmp/server.csr" "$tmp/server.ext" "$tmp/server.pem"

# Devices (CN = thing name)
cat > "$tmp/device.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EXT
ec_key "$tmp/device.key"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/device-rsa.key" 2>/dev/null
for d in device device-rsa; do
  openssl req -new -key "$tmp/$d.key" -subj "/O=iotcred example/CN=$thing" -out "$tmp/$d.csr"
  sign "$tmp/$d.csr" "$tmp/device.ext" "$tmp/$d.pem.crt"
done

openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" "$tmp/device.pem.crt" "$tmp/device-rsa.pem.crt" >/dev/null

# Move into place: certificates 0644, keys stay 0600.
chmod 0644 "$tmp"/*.pem "$tmp"/*.pem.crt
for f in "${files[@]}"; do mv -f "$tmp/$f" "$out/$f"; done
echo "made a throwaway CA, server and device certificates (CN $thing) in $out"
