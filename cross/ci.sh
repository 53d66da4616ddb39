#!/usr/bin/env bash
# Cross builds and end-to-end smoke tests of the ARM binaries under qemu-user (no Docker, no
# foreign dpkg architectures):
#   1. cross/build.sh for aarch64 (stable, and --min-size: nightly build-std) and armv7;
#      report stripped sizes (aarch64 goal 2 MiB)
#   2. a throwaway PKI (openssl) and the x86_64 fake-provider (cargo build)
#   3. per ARM binary, under qemu: `iotcred fetch` (file key) -> JSON with AccessKeyId;
#      `iotcred run` with a NOTIFY_SOCKET -> READY=1 and WATCHDOG=1, `iotcred get` over the
#      socket, SIGHUP reload, SIGTERM -> STOPPING=1, exit 0, socket removed; socket activation
#      (systemd-socket-activate, Unix + TCP fds named unix:tcp) -> `get` and an HTTP GET with
#      the role token
#   4. cargo test -p iotcred-core --target aarch64-unknown-linux-gnu (qemu as cargo runner)
# Prints PASS/FAIL per check and a summary; exits 1 when anything failed.
# Environment: CROSS_CI_TARGETS (default "aarch64-unknown-linux-gnu
#   aarch64-unknown-linux-gnu+min-size armv7-unknown-linux-gnueabihf"; "+min-size" builds with
#   cross/build.sh --min-size),
#   GOAL_AARCH64_BYTES (2 MiB, reported), MAX_AARCH64_BYTES (3 MiB, fails above),
#   CROSS_CI_SKIP_CORE_TESTS=1, CROSS_BUILD_TIMEOUT (s, 2400), KEEP_WORK=1 (keep the scratch
#   directory), CROSS_CI_NO_BUILD=1 (use already-built binaries; for iterating on this script).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=cross/env.sh
. "$ROOT/cross/env.sh"
cd "$ROOT"

T0=$(date +%s)
TARGETS=${CROSS_CI_TARGETS:-"aarch64-unknown-linux-gnu aarch64-unknown-linux-gnu+min-size armv7-unknown-linux-gnueabihf"}
GOAL_AARCH64_BYTES=${GOAL_AARCH64_BYTES:-2097152}   # 2 MiB: the size goal (reported)
MAX_AARCH64_BYTES=${MAX_AARCH64_BYTES:-3145728}     # 3 MiB: regression gate (fails)
BUILD_TIMEOUT=${CROSS_BUILD_TIMEOUT:-2400}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
THING=gateway-0042

WORK=$(mktemp -d /tmp/iotcred-cross-ci.XXXXXX)
PIDS=()
RESULTS=()
FAILS=0
cleanup() {
  local p
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null
  done
  sleep 0.3
  for p in "${PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if [ "$FAILS" -eq 0 ] && [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else echo "cross-ci: logs kept in $WORK"; fi
}
trap cleanup EXIT
trap 'echo "cross-ci: interrupted"; FAILS=$((FAILS + 1)); exit 130' INT TERM

elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
step() { echo; echo "== cross-ci [$(elapsed)] $*"; }
pass() { echo "PASS: $*"; RESULTS+=("PASS: $*"); }
fail() { echo "FAIL: $*"; RESULTS+=("FAIL: $*"); FAILS=$((FAILS + 1)); }
show() { # show FILE: last lines of a log, indented
  [ -s "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    | /'
}
# wait_for SECONDS CMD...: polls CMD every 0.2 s until it succeeds or the time is up.
wait_for() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}
mib() { awk -v b="$1" 'BEGIN{printf "%.2f MiB", b/1048576}'; }

# ---------------------------------------------------------------- 0. tools
# Commands the smoke tests use, with the Debian package that provides each.
missing=()
for pair in openssl:openssl curl:curl file:file python3:python3 systemd-socket-activate:systemd readelf:binutils; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$WORK/apt.log" 2>&1 \
    || { fail "apt-get install ${missing[*]}"; show "$WORK/apt.log"; }
fi

# ---------------------------------------------------------------- 1. cross builds
declare -A BIN
for entry in $TARGETS; do
  t=${entry%+min-size}
  flags=(); sub=""
  [ "$entry" != "$t" ] && { flags=(--min-size); sub=min-size/; }
  step "build $entry"
  log=$WORK/build-$entry.log
  if [ -n "${CROSS_CI_NO_BUILD:-}" ]; then
    out=$TARGET_DIR/$sub$t/release/iotcred; [ -x "$out" ] || out=""
  else
    out=$(timeout "$BUILD_TIMEOUT" "$ROOT/cross/build.sh" "${flags[@]}" "$t" 2>"$log") || out=""
  fi
  if [ -n "$out" ]; then
    bin=$(printf '%s\n' "$out" | tail -1)
    BIN[$entry]=$bin
    size=$(stat -c %s "$bin")
    glibc=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
    pass "build $entry: $bin ($size bytes, $(mib "$size"); $(file -b "$bin" | cut -d, -f1-2); needs $glibc)"
    if [ "$t" = aarch64-unknown-linux-gnu ]; then
      if [ "$size" -le "$GOAL_AARCH64_BYTES" ]; then
        pass "size $entry: $(mib "$size") <= goal $(mib "$GOAL_AARCH64_BYTES")"
      elif [ "$size" -le "$MAX_AARCH64_BYTES" ]; then
        pass "size $entry: $(mib "$size") <= limit $(mib "$MAX_AARCH64_BYTES") (WARNING: over the $(mib "$GOAL_AARCH64_BYTES") goal)"
      else
        fail "size $entry: $(mib "$size") > limit $(mib "$MAX_AARCH64_BYTES")"
      fi
    fi
  else
    fail "build $entry (see $log)"; show "$log" 25
  fi
done

# ---------------------------------------------------------------- 2. PKI + fake provider
step "throwaway PKI and fake-provider (x86_64)"
PKI=$WORK/pki
make_pki() {
  mkdir -p "$PKI" && cd "$PKI" || return 1
  local ec=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256)
  openssl genpkey "${ec[@]}" -out ca.key &&
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=iotcred cross-ci CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem &&
  openssl genpkey "${ec[@]}" -out server.key &&
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr &&
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" > server.ext &&
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 2 \
    -extfile server.ext -out server.pem &&
  openssl genpkey "${ec[@]}" -out device.key &&
  openssl req -new -key device.key -subj "/CN=$THING" -out device.csr &&
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=clientAuth" > device.ext &&
  openssl x509 -req -in device.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 2 \
    -extfile device.ext -out device.pem &&
  chmod 600 ./*.key
}
if (make_pki) >"$WORK/pki.log" 2>&1; then pass "PKI (openssl: CA, server cert for localhost, device cert CN=$THING)"; else fail "PKI"; show "$WORK/pki.log"; fi

PROVIDER_PORT=""
if { [ -n "${CROSS_CI_NO_BUILD:-}" ] && [ -x "$TARGET_DIR/debug/fake-provider" ]; } ||
   timeout "$BUILD_TIMEOUT" cargo build --locked -p iotcred-tests --bin fake-provider >"$WORK/build-provider.log" 2>&1; then
  "$TARGET_DIR/debug/fake-provider" --ca "$PKI/ca.pem" --cert "$PKI/server.pem" --key "$PKI/server.key" \
    --listen 127.0.0.1:0 --ttl 3600 >"$WORK/provider.log" 2>&1 &
  PIDS+=($!)
  if wait_for 20 grep -q '^listening on ' "$WORK/provider.log"; then
    PROVIDER_PORT=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$WORK/provider.log" | head -1)
    pass "fake-provider listening on 127.0.0.1:$PROVIDER_PORT"
  else
    fail "fake-provider did not start"; show "$WORK/provider.log"
  fi
else
  fail "cargo build fake-provider"; show "$WORK/build-provider.log" 25
fi

# A Unix datagram socket standing in for systemd's NOTIFY_SOCKET: logs every message.
notify_listener() { # notify_listener SOCKET LOGFILE
  python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as log:
    while True:
        msg = s.recv(4096).decode(errors="replace")
        for line in msg.split("\n"):
            if line:
                log.write(line + "\n")
        log.flush()
' "$1" "$2" &
  PIDS+=($!)
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
has_key() { grep -q '"AccessKeyId":"[^"]\+"' "$1"; }
exited() { ! kill -0 "$1" 2>/dev/null; }
more_lines() { [ "$(grep -cx "$2" "$1")" -gt "$3" ]; }   # FILE LINE N: LINE occurs more than N times

# ---------------------------------------------------------------- 3. qemu smoke tests
smoke() {
  local t=${1%+min-size} arch=${1%%-*} bin=${BIN[$1]:-}
  [ "$1" != "$t" ] && arch=$arch-min-size
  step "qemu smoke test $arch"
  if [ -z "$bin" ]; then fail "$arch smoke: no binary (build failed)"; return; fi
  if [ -z "$PROVIDER_PORT" ]; then fail "$arch smoke: no fake provider"; return; fi
  cross_setup "$t" || return
  # shellcheck disable=SC2206
  local run=($CROSS_RUN "$bin")
  local d=$WORK/$arch
  mkdir -p "$d/run" && chmod 750 "$d/run"
  local cfg=$d/config.toml sock=$d/run/agent.sock
  cat >"$cfg" <<TOML
endpoint = "localhost:$PROVIDER_PORT"
thing_name = "$THING"
certificate = "$PKI/device.pem"
key = "$PKI/device.key"
ca = "$PKI/ca.pem"
timeout_seconds = 20
runtime_dir = "$d/run"

[serve]
socket = "$sock"
socket_mode = "0660"

[[role]]
name = "default"
role_alias = "GatewayRole"
TOML

  # 3a. iotcred --version and fetch (one exchange, no agent)
  if out=$(timeout 30 "${run[@]}" --version 2>&1); then pass "$arch: qemu runs '$out'"; else fail "$arch: --version under qemu: $out"; fi
  if timeout 60 "${run[@]}" fetch --config "$cfg" >"$d/fetch.json" 2>"$d/fetch.err" && has_key "$d/fetch.json"; then
    pass "$arch: iotcred fetch (file key, mTLS to fake provider) -> JSON with AccessKeyId"
  else
    fail "$arch: iotcred fetch"; show "$d/fetch.json"; show "$d/fetch.err"
  fi

  # 3b. iotcred run: READY/WATCHDOG, get over the socket, reload, clean stop
  local nsock=$d/notify.sock nlog=$d/notify.log pid
  : >"$nlog"
  notify_listener "$nsock" "$nlog"
  wait_for 10 test -S "$nsock" || { fail "$arch: notify listener"; return; }
  NOTIFY_SOCKET=$nsock WATCHDOG_USEC=4000000 IOTCRED_LOG=info \
    "${run[@]}" run --config "$cfg" >"$d/run.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  if wait_for 90 grep -qx 'READY=1' "$nlog" && wait_for 10 test -S "$sock"; then
    pass "$arch: iotcred run sent READY=1 and serves $sock"
  else
    fail "$arch: iotcred run did not become ready within 90 s"; show "$d/run.log"; show "$nlog"
  fi
  if wait_for 15 grep -qx 'WATCHDOG=1' "$nlog"; then pass "$arch: WATCHDOG=1 sent (WATCHDOG_USEC=4s)"; else fail "$arch: no WATCHDOG=1"; fi
  if timeout 30 "${run[@]}" get --socket "$sock" >"$d/get.json" 2>"$d/get.err" && has_key "$d/get.json"; then
    pass "$arch: iotcred get over the Unix socket -> AccessKeyId"
  else
    fail "$arch: iotcred get"; show "$d/get.json"; show "$d/get.err"
  fi
  if timeout 30 "${run[@]}" credential-process --socket "$sock" >"$d/cp.json" 2>"$d/cp.err" \
     && grep -q '"Version":1' "$d/cp.json" && grep -q '"SessionToken"' "$d/cp.json"; then
    pass "$arch: iotcred credential-process -> Version 1 document"
  else
    fail "$arch: iotcred credential-process"; show "$d/cp.json"; show "$d/cp.err"
  fi
  if [ -s "$d/run/default.token" ] && [ "$(stat -c %a "$d/run/default.token")" = 640 ]; then
    pass "$arch: token file default.token (mode 0640)"
  else
    fail "$arch: token file missing or wrong mode"; ls -la "$d/run" | sed 's/^/    | /'
  fi
  local readies
  readies=$(grep -cx 'READY=1' "$nlog")
  kill -HUP "$pid" 2>/dev/null
  if wait_for 30 more_lines "$nlog" 'READY=1' "$readies" \
     && grep -q '^RELOADING=1' "$nlog" && kill -0 "$pid" 2>/dev/null \
     && timeout 30 "${run[@]}" get --socket "$sock" 2>/dev/null | grep -q AccessKeyId; then
    pass "$arch: SIGHUP reload (RELOADING=1, READY=1, still serving)"
  else
    fail "$arch: SIGHUP reload"; show "$d/run.log"; show "$nlog"
  fi
  kill -TERM "$pid" 2>/dev/null
  if wait_for 20 exited "$pid"; then
    wait "$pid"; local rc=$?
    if [ "$rc" -eq 0 ] && grep -qx 'STOPPING=1' "$nlog" && [ ! -e "$sock" ]; then
      pass "$arch: SIGTERM -> STOPPING=1, exit 0, socket removed"
    else
      fail "$arch: SIGTERM: exit $rc, socket $( [ -e "$sock" ] && echo left || echo removed)"; show "$d/run.log"; show "$nlog"
    fi
  else
    fail "$arch: agent did not stop within 20 s of SIGTERM"; kill -KILL "$pid" 2>/dev/null
  fi

  # 3c. socket activation as systemd does it (LISTEN_FDS/LISTEN_FDNAMES=unix:tcp)
  local asock=$d/run/activated.sock port apid
  port=$(free_port)
  systemd-socket-activate -l "$asock" -l "127.0.0.1:$port" --fdname=unix:tcp \
    -E IOTCRED_LOG=info "${run[@]}" run --config "$cfg" >"$d/activate.log" 2>&1 &
  apid=$!; PIDS+=("$apid")
  if ! wait_for 10 test -S "$asock"; then
    fail "$arch: systemd-socket-activate did not listen"; show "$d/activate.log"; return
  fi
  # The first connection starts the agent; it answers 503 until the first credentials.
  if wait_for 90 sh -c '"$@" get --socket "'"$asock"'" >"'"$d"'/aget.json" 2>/dev/null' sh "${run[@]}" \
     && has_key "$d/aget.json"; then
    pass "$arch: socket-activated agent answers on the passed Unix socket"
  else
    fail "$arch: socket activation (Unix)"; show "$d/activate.log"
  fi
  if [ -s "$d/run/default.token" ] && curl -sS --max-time 20 -H "Authorization: $(cat "$d/run/default.token")" \
       "http://127.0.0.1:$port/v1/credentials/default" >"$d/tcp.json" 2>"$d/tcp.err" && has_key "$d/tcp.json"; then
    pass "$arch: socket-activated agent answers on the passed TCP socket (with the role token)"
  else
    fail "$arch: socket activation (TCP)"; show "$d/tcp.json"; show "$d/tcp.err"; show "$d/activate.log"
  fi
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 "http://127.0.0.1:$port/v1/credentials/default")
  if [ "$code" = 401 ]; then pass "$arch: TCP without token -> 401"; else fail "$arch: TCP without token -> $code (want 401)"; fi
  # systemd-socket-activate execs the agent: its pid is the agent's.
  kill -TERM "$apid" 2>/dev/null
  wait_for 20 exited "$apid" || { fail "$arch: activated agent did not stop"; kill -KILL "$apid" 2>/dev/null; }
}
for t in $TARGETS; do
  case "$t" in x86_64-*) continue ;; esac
  smoke "$t"
done

# ---------------------------------------------------------------- 4. core tests under qemu
if [ -z "${CROSS_CI_SKIP_CORE_TESTS:-}" ]; then
  step "cargo test -p iotcred-core --target aarch64-unknown-linux-gnu (qemu runner)"
  ( cross_install aarch64-unknown-linux-gnu && cross_setup aarch64-unknown-linux-gnu &&
    timeout "$BUILD_TIMEOUT" cargo test --locked -p iotcred-core --target aarch64-unknown-linux-gnu ) \
    >"$WORK/core-tests.log" 2>&1
  rc=$?
  summary=$(grep -E '^test result:' "$WORK/core-tests.log" | awk '{p+=$4; f+=$6} END{printf "%d passed, %d failed in %d suites", p, f, NR}')
  if [ "$rc" -eq 0 ]; then
    pass "iotcred-core tests on aarch64 under qemu: $summary"
  else
    fail "iotcred-core tests on aarch64 (exit $rc): $summary"
    # The first failure's message and minimal input, then the tail with the test names.
    grep -m1 -A25 -E '^Test failed|panicked at' "$WORK/core-tests.log" | sed 's/^/    | /'
    grep -E '^    [a-z_:]+$|^failures:' "$WORK/core-tests.log" | sed 's/^/    | /'
  fi
fi

# ---------------------------------------------------------------- summary
echo
echo "== cross-ci summary (total $(elapsed))"
printf '%s\n' "${RESULTS[@]}"
if [ "$FAILS" -eq 0 ]; then
  echo "cross-ci: PASS"
else
  echo "cross-ci: FAIL ($FAILS check(s) failed)"
  exit 1
fi
