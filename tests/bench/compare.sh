#!/usr/bin/env bash
# iotcred side by side with its peers: one command, sets everything up itself, prints ONE table
# with medians and ratios (and writes it as markdown with --out).
#
# Usage: tests/bench/compare.sh [--quick] [--out FILE] [--keep] [--no-cross]
#   --quick     fewer runs, shorter loads (about 5 minutes once built); figures are rougher
#   --out FILE  also write the table (markdown, with machine and method notes) to FILE
#   --keep      keep the temporary directory (logs, configs, raw results) and print its path
#   --no-cross  skip the aarch64 build (its size row then says "skipped")
#
# What it does (every server on loopback only, everything in one temp dir):
#   cargo build --release (iotcred, fake-provider, loadgen); PKI (certs-example/make-certs.sh);
#   a SoftHSM token with the device key imported (temp SOFTHSM2_CONF); boto3-refresh-session[iot]
#   and awscrt from PyPI into a temp venv; the fake provider on 127.0.0.1:443 (awscrt's X.509
#   provider cannot use another port), a second one issuing 64 s credentials (timer-driven
#   refreshes); nginx serving the same JSON; then
#   1 cold exchange   hyperfine: iotcred fetch (file key, SoftHSM key), curl, BRS, awscrt
#   2 warm refresh    one exchange inside a running process, each tool's own way
#   3 local serving   loadgen (ours, TCP + Unix socket) and wrk (TCP) against iotcred and nginx;
#                     the IMDS credential GET (SPEC 4.4) against nginx serving the same body;
#                     the cost of the 4.6 peer uid lookup per connection (examples/peer_uid_cost)
#   4 footprint       /proc/PID/status RSS idle and after 1,000,000 requests, idle wakeups over
#                     60 s, stripped binary sizes (x86_64, aarch64 via cross/build.sh, also --min-size)
#   5 fleet           cargo run -p iotcred-core --release --example fleet -- 42
# Needs root for apt-get (missing tools) and for port 443. No timing threshold fails the script:
# it reports, it does not judge (the table says which goals are met).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
QUICK=0 OUT="" KEEP=0 CROSS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$(realpath -m "$2"); shift ;;
    --out=*) OUT=$(realpath -m "${1#--out=}") ;;
    --keep) KEEP=1 ;;
    --no-cross) CROSS=0 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  COLD_WARMUP=2 COLD_RUNS=10 WARM_N=10 IDLE_S=15 SERVE_S=3 SERVE_REPS=1 MILLION=100000 MODE=quick
else
  COLD_WARMUP=3 COLD_RUNS=30 WARM_N=40 IDLE_S=60 SERVE_S=8 SERVE_REPS=3 MILLION=1000000 MODE=full
fi
CONNS=64

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { echo "compare.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
need_pkgs=()
for t in hyperfine:hyperfine wrk:wrk nginx:nginx-light curl:curl softhsm2-util:softhsm2 \
         openssl:openssl python3:python3 /usr/bin/time:time; do
  command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]} (apt-get install them, or run as root)"
  log "installing ${need_pkgs[*]} (Debian)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi
SOFTHSM_MODULE=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do
  [ -e "$m" ] && SOFTHSM_MODULE=$m && break
done
[ -n "$SOFTHSM_MODULE" ] || die "libsofthsm2.so not found"

WORK=$(mktemp -d /tmp/iotcred-bench.XXXXXX)
RES=$WORK/results.txt
: > "$RES"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "compare.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
put() { echo "$*" >> "$RES"; }   # put KEY VALUE...

# ---------------------------------------------------------------- build
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
log "cargo build --release (iotcred, fake-provider, loadgen)"
(cd "$ROOT" && cargo build --release --locked -p iotcred-agent -p iotcred-tests --bins \
  --example peer_uid_cost) >&2
BIN=$TARGET_DIR/release
for b in iotcred fake-provider loadgen; do [ -x "$BIN/$b" ] || die "$BIN/$b was not built"; done
# Copies, so that a concurrent build cannot swap a binary in the middle of the run.
mkdir -p "$WORK/bin"
cp "$BIN/iotcred" "$BIN/fake-provider" "$BIN/loadgen" "$BIN/examples/peer_uid_cost" "$WORK/bin/"
BIN=$WORK/bin
IOTCRED=$BIN/iotcred
# The --min-size build (nightly build-std) of the same agent, for its idle footprint.
IOTCRED_MIN=""
if [ "$CROSS" = 1 ]; then
  log "cross/build.sh --min-size x86_64-unknown-linux-gnu"
  m=$("$ROOT/cross/build.sh" --min-size x86_64-unknown-linux-gnu 2> "$WORK/min-size.log" | tail -n1) || m=""
  if [ -n "$m" ] && [ -x "$m" ]; then cp "$m" "$WORK/bin/iotcred-min"; IOTCRED_MIN=$WORK/bin/iotcred-min
  else log "--min-size build failed (see $WORK/min-size.log)"; fi
fi

# ---------------------------------------------------------------- PKI, SoftHSM
log "PKI and SoftHSM token in $WORK"
"$ROOT/certs-example/make-certs.sh" "$WORK/pki" >&2
PKI=$WORK/pki
cp "$PKI/ca.pem" "$PKI/ca-copy.pem"       # same anchor under another path (SIGHUP reloads)
mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$WORK/tokens" > "$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label iotcred --pin 1234 --so-pin 5678 >/dev/null
softhsm2-util --import "$PKI/device.key" --token iotcred --label device --id 01 --pin 1234 >/dev/null
HSM_URI="pkcs11:token=iotcred;object=device?module-path=$SOFTHSM_MODULE&pin-value=1234"

# ---------------------------------------------------------------- peers from PyPI
log "boto3-refresh-session[iot] and awscrt from PyPI into a temp venv"
PY=$WORK/venv/bin/python
PEERS=1
if python3 -m venv "$WORK/venv" >&2 &&
   "$PY" -m pip install -q --disable-pip-version-check 'boto3-refresh-session[iot]' awscrt >&2; then
  # Compiled bytecode, as any installed Python package has it (this environment sets
  # PYTHONDONTWRITEBYTECODE, which would make every BRS start recompile botocore).
  unset PYTHONDONTWRITEBYTECODE
  "$PY" -m compileall -q "$WORK/venv/lib" >/dev/null 2>&1 || true
  "$PY" -m pip list 2>/dev/null | grep -iE '^(boto3-refresh-session|awscrt|botocore) ' \
    | awk '{print "version_"$1, $2}' >> "$RES"
else
  PEERS=0; log "PyPI install failed: BRS and awscrt rows will say n/a"
fi
put "version_curl $(curl --version | head -n1 | awk '{print $2}')"
put "version_nginx $(nginx -v 2>&1 | sed 's|.*/||')"

# ---------------------------------------------------------------- providers
start_provider() { # NAME LISTEN [extra args] -> sets PORT
  local name=$1 listen=$2; shift 2
  "$BIN/fake-provider" --listen "$listen" --ca "$PKI/ca.pem" --cert "$PKI/server.pem" \
    --key "$PKI/server.key" --alias GatewayRole "$@" > "$WORK/$name.out" 2> "$WORK/$name.log" &
  PIDS+=($!)
  PORT=""
  for _ in $(seq 1 100); do
    PORT=$(sed -n 's/^listening on .*://p' "$WORK/$name.out" 2>/dev/null | head -n1)
    [ -n "$PORT" ] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || break
    sleep 0.05
  done
  return 1
}
CRT=$PEERS
if start_provider provider 127.0.0.1:443; then
  :
else
  log "cannot listen on 127.0.0.1:443 (not root, or in use): awscrt rows will say n/a"
  CRT=0
  start_provider provider 127.0.0.1:0 || die "fake provider did not start: $(cat "$WORK/provider.log")"
fi
MAIN_PORT=$PORT
start_provider provider-ttl 127.0.0.1:0 --ttl 64 || die "second fake provider did not start"
TTL_PORT=$PORT
put "provider_port $MAIN_PORT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

write_config() { # FILE ENDPOINT_PORT KEY RUNTIME_DIR [LISTEN_PORT] [CA] [JITTER]
  local f=$1 port=$2 key=$3 rt=$4 listen=${5:-} ca=${6:-$PKI/ca.pem} jitter=${7:-120}
  {
    echo "endpoint = \"127.0.0.1:$port\""
    echo 'thing_name = "gateway-0042"'
    echo "certificate = \"$PKI/device.pem.crt\""
    echo "key = \"$key\""
    echo "ca = \"$ca\""
    echo "runtime_dir = \"$rt\""
    echo '[refresh]'
    echo "jitter_seconds = $jitter"
    echo '[serve]'
    echo "socket = \"$rt/agent.sock\""
    [ -n "$listen" ] && echo "listen = \"127.0.0.1:$listen\""
    echo '[[role]]'
    echo 'name = "default"'
    echo 'role_alias = "GatewayRole"'
  } > "$f"
}
C=$WORK/conf
mkdir -p "$C"
write_config "$C/fetch-file.toml" "$MAIN_PORT" "$PKI/device.key" "$WORK/run-fetch"
write_config "$C/fetch-hsm.toml" "$MAIN_PORT" "$HSM_URI" "$WORK/run-fetch"
A_PORT=$(free_port); B_PORT=$(free_port); T_PORT=$(free_port)
write_config "$C/agent-file.toml" "$MAIN_PORT" "$PKI/device.key" "$WORK/run-a" "$A_PORT"
IMDS_PORT=$(free_port)
printf '[serve.imds]\nlisten = "127.0.0.1:%s"\nrole = "default"\n' "$IMDS_PORT" >> "$C/agent-file.toml"
write_config "$C/agent-hsm.toml" "$MAIN_PORT" "$HSM_URI" "$WORK/run-b" "$B_PORT"
write_config "$C/agent-ttl.toml" "$TTL_PORT" "$PKI/device.key" "$WORK/run-t" "$T_PORT" "$PKI/ca.pem" 0

# Sanity: every client gets credentials before anything is timed.
"$IOTCRED" fetch --config "$C/fetch-file.toml" > /dev/null || die "iotcred fetch (file key) failed"
"$IOTCRED" fetch --config "$C/fetch-hsm.toml" > /dev/null || die "iotcred fetch (SoftHSM key) failed"
CURL_CMD="curl -sS --cert $PKI/device.pem.crt --key $PKI/device.key --cacert $PKI/ca.pem -H 'x-amzn-iot-thingname: gateway-0042' https://127.0.0.1:$MAIN_PORT/role-aliases/GatewayRole/credentials"
eval "$CURL_CMD" | grep -q accessKeyId || die "curl exchange failed"
PEER_ARGS="$PKI/device.pem.crt $PKI/device.key $PKI/ca.pem gateway-0042 GatewayRole"
if [ "$PEERS" = 1 ]; then
  # shellcheck disable=SC2086
  "$PY" "$HERE/peers.py" brs-cold 127.0.0.1 "$MAIN_PORT" $PEER_ARGS | grep -q AccessKeyId ||
    { log "boto3-refresh-session exchange failed: BRS rows n/a"; PEERS=0; CRT=0; }
fi
if [ "$CRT" = 1 ]; then
  # shellcheck disable=SC2086
  "$PY" "$HERE/peers.py" crt-cold localhost $PEER_ARGS | grep -q AccessKeyId ||
    { log "awscrt exchange failed: awscrt rows n/a"; CRT=0; }
fi
put "peers_brs $PEERS"
put "peers_crt $CRT"

# Peak RSS (KiB) of one cold run of a command (GNU time's %M = ru_maxrss). The spawner must be
# small: a child forked from a bigger process (python) would report that process's RSS.
peak_rss() {
  /usr/bin/time -f '%M' -o "$WORK/time.out" "$@" > /dev/null 2>&1 && tail -n1 "$WORK/time.out" || echo nan
}

# The agent under test: no systemd (so no watchdog), logs to a file.
start_agent() { # NAME CONFIG [BINARY] -> sets APID
  env -u NOTIFY_SOCKET -u WATCHDOG_USEC -u WATCHDOG_PID -u LISTEN_PID -u LISTEN_FDS \
    IOTCRED_LOG=info "${3:-$IOTCRED}" run --config "$2" > /dev/null 2> "$WORK/agent-$1.log" &
  APID=$!
  PIDS+=($APID)
}
wait_healthy() { # PORT PID
  for _ in $(seq 1 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v1/health")" = 200 ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
status_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }  # PID VmRSS|VmHWM
ctxsw() { # PID: voluntary context switches summed over all threads
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '$1=="voluntary_ctxt_switches:" {s+=$2} END {print s+0}'
}
nthreads() { ls "/proc/$1/task" | wc -l; }
metric() { # PORT NAME_WITH_LABELS -> value
  curl -s "http://127.0.0.1:$1/v1/metrics" | awk -v n="$2" '$1==n {print $2}'
}

# The agent with 64 s credentials refreshes every 16 s on its own timer (a quarter of the
# lifetime, jitter 0) on its kept-alive connection; started now so it has refreshed a few times
# before the quiet window in which its refreshes are sampled.
start_agent ttl "$C/agent-ttl.toml"; T_PID=$APID
wait_healthy "$T_PORT" "$T_PID" || die "agent (64 s credentials) did not start: $(tail -n3 "$WORK/agent-ttl.log")"

# ================================================================ 1 cold exchange
log "1/5 cold exchange: hyperfine, $COLD_WARMUP warm-up runs, at least $COLD_RUNS runs each"
HF=(-N --warmup "$COLD_WARMUP" --min-runs "$COLD_RUNS" --export-json "$WORK/cold.json" --style basic)
HF+=(-n "iotcred fetch (file key)" "$IOTCRED fetch --config $C/fetch-file.toml")
HF+=(-n "iotcred fetch (SoftHSM key)" "$IOTCRED fetch --config $C/fetch-hsm.toml")
HF+=(-n "curl" "$CURL_CMD")
[ "$PEERS" = 1 ] && HF+=(-n "boto3-refresh-session" "$PY $HERE/peers.py brs-cold 127.0.0.1 $MAIN_PORT $PEER_ARGS")
[ "$CRT" = 1 ] && HF+=(-n "awscrt" "$PY $HERE/peers.py crt-cold localhost $PEER_ARGS")
hyperfine "${HF[@]}" >&2
put "cold_rss_iotcred_file $(peak_rss "$IOTCRED" fetch --config "$C/fetch-file.toml")"
put "cold_rss_iotcred_hsm $(peak_rss "$IOTCRED" fetch --config "$C/fetch-hsm.toml")"
# shellcheck disable=SC2086
put "cold_rss_curl $(peak_rss curl -sS --cert "$PKI/device.pem.crt" --key "$PKI/device.key" --cacert "$PKI/ca.pem" -H 'x-amzn-iot-thingname: gateway-0042' "https://127.0.0.1:$MAIN_PORT/role-aliases/GatewayRole/credentials")"
# shellcheck disable=SC2086
[ "$PEERS" = 1 ] && put "cold_rss_brs $(peak_rss "$PY" "$HERE/peers.py" brs-cold 127.0.0.1 "$MAIN_PORT" $PEER_ARGS)"
# shellcheck disable=SC2086
[ "$CRT" = 1 ] && put "cold_rss_crt $(peak_rss "$PY" "$HERE/peers.py" crt-cold localhost $PEER_ARGS)"

# ================================================================ agents for 3 and 4
log "starting the agents (file key, SoftHSM key)"
start_agent file "$C/agent-file.toml"; A_PID=$APID
start_agent hsm "$C/agent-hsm.toml"; B_PID=$APID
wait_healthy "$A_PORT" "$A_PID" || die "agent (file key) did not start: $(tail -n3 "$WORK/agent-file.log")"
wait_healthy "$B_PORT" "$B_PID" || die "agent (SoftHSM key) did not start: $(tail -n3 "$WORK/agent-hsm.log")"
put "agent_threads $(nthreads "$A_PID")"

# ================================================================ 4a idle footprint + 2a timer refreshes
log "4/5 idle: RSS and wakeups over ${IDLE_S} s (agents idle, credentials valid 3600 s, no watchdog)"
sleep 2
for x in A:file B:hsm; do
  pid_var=${x%%:*}_PID; n=${x#*:}
  put "idle_rss_$n $(status_kib "${!pid_var}" VmRSS)"
  put "idle_hwm_$n $(status_kib "${!pid_var}" VmHWM)"
done
if [ -n "$IOTCRED_MIN" ]; then
  # Same configuration and measurement with the --min-size binary, then stopped again so it
  # takes no part in what follows.
  M_PORT=$(free_port)
  write_config "$C/agent-min.toml" "$MAIN_PORT" "$PKI/device.key" "$WORK/run-m" "$M_PORT"
  start_agent min "$C/agent-min.toml" "$IOTCRED_MIN"; M_PID=$APID
  if wait_healthy "$M_PORT" "$M_PID"; then
    sleep 2
    put "idle_rss_min $(status_kib "$M_PID" VmRSS)"
    put "idle_hwm_min $(status_kib "$M_PID" VmHWM)"
    put "size_x86_64_min $(stat -c %s "$IOTCRED_MIN")"
  else
    log "agent (--min-size) did not start: $(tail -n3 "$WORK/agent-min.log")"
  fi
  kill "$M_PID" 2>/dev/null; wait "$M_PID" 2>/dev/null || true
fi
A0=$(ctxsw "$A_PID"); B0=$(ctxsw "$B_PID")
LSUM='iotcred_upstream_latency_seconds_sum{role="default"}'
LCNT='iotcred_upstream_latency_seconds_count{role="default"}'
prev_c=$(metric "$T_PORT" "$LCNT"); prev_s=$(metric "$T_PORT" "$LSUM")
# curl on one kept-alive connection with the same kind of idle gap as the agent's refreshes
# (one transfer every 15 s, --rate 4/m): both sides (and the provider) have gone idle between
# exchanges, unlike curl's back-to-back transfers in section 2.
urls_idle=()
for _ in $(seq 0 $((IDLE_S / 16))); do urls_idle+=(-o /dev/null "https://127.0.0.1:$MAIN_PORT/role-aliases/GatewayRole/credentials"); done
curl -sS --cert "$PKI/device.pem.crt" --key "$PKI/device.key" --cacert "$PKI/ca.pem" --rate 4/m \
  -H 'x-amzn-iot-thingname: gateway-0042' -w '%{num_connects} %{time_total}\n' "${urls_idle[@]}" \
  > "$WORK/curl-idle.txt" &
CURL_IDLE=$!
end=$((SECONDS + IDLE_S))
while [ $SECONDS -lt $end ]; do
  sleep 2
  c=$(metric "$T_PORT" "$LCNT"); s=$(metric "$T_PORT" "$LSUM")
  if [ "$c" != "$prev_c" ]; then
    # one refresh per 16 s, polled every 2 s: a delta is one exchange (averaged if ever more)
    put "warm_iotcred_keepalive $(python3 -c "print(($s-$prev_s)/($c-$prev_c))")"
    prev_c=$c prev_s=$s
  fi
done
wait "$CURL_IDLE" || true
awk 'NR>1 && $1==0 {print "warm_curl_idle", $2}' "$WORK/curl-idle.txt" >> "$RES"
put "idle_wakeups_file $(( $(ctxsw "$A_PID") - A0 ))"
put "idle_wakeups_hsm $(( $(ctxsw "$B_PID") - B0 ))"
put "idle_seconds $IDLE_S"
grep -c 'credentials refreshed' "$WORK/agent-ttl.log" | sed 's/^/ttl_agent_refreshes /' >> "$RES"

# ================================================================ 2 warm refresh
log "2/5 warm refresh: $WARM_N exchanges in one process each"
# iotcred on a new connection: SIGHUP after pointing `ca` at an identical copy (the identity
# changed, so the role is fetched again through a new Upstream: TCP + TLS handshake + exchange).
for i in $(seq 1 "$WARM_N"); do
  ca=$PKI/ca.pem; [ $((i % 2)) = 1 ] && ca=$PKI/ca-copy.pem
  write_config "$C/agent-ttl.toml" "$TTL_PORT" "$PKI/device.key" "$WORK/run-t" "$T_PORT" "$ca" 0
  c0=$(metric "$T_PORT" "$LCNT"); s0=$(metric "$T_PORT" "$LSUM")
  kill -HUP "$T_PID"
  for _ in $(seq 1 200); do
    c=$(metric "$T_PORT" "$LCNT"); [ "$c" != "$c0" ] && break; sleep 0.02
  done
  s=$(metric "$T_PORT" "$LSUM")
  put "warm_iotcred_newconn $(python3 -c "print(($s-$s0)/($c-$c0))")"
done
# curl: WARM_N+1 URLs in one invocation; the first transfer opens the connection, the others
# reuse it (time_total per transfer).
urls=()
for _ in $(seq 0 "$WARM_N"); do urls+=(-o /dev/null "https://127.0.0.1:$MAIN_PORT/role-aliases/GatewayRole/credentials"); done
curl -sS --cert "$PKI/device.pem.crt" --key "$PKI/device.key" --cacert "$PKI/ca.pem" \
  -H 'x-amzn-iot-thingname: gateway-0042' -w '%{num_connects} %{time_total}\n' "${urls[@]}" \
  > "$WORK/curl-warm.txt"
awk 'NR==1 {print "warm_curl_first", $2} NR>1 && $1==0 {print "warm_curl_reused", $2}' "$WORK/curl-warm.txt" >> "$RES"
if [ "$PEERS" = 1 ]; then
  # shellcheck disable=SC2086
  "$PY" "$HERE/peers.py" brs-warm 127.0.0.1 "$MAIN_PORT" $PEER_ARGS "$WARM_N" > "$WORK/brs-warm.json"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
for s in d["samples"]: print("warm_brs", s)
print("proc_rss_brs", d["VmRSS"]); print("proc_hwm_brs", d["VmHWM"])' "$WORK/brs-warm.json" >> "$RES"
fi
if [ "$CRT" = 1 ]; then
  # shellcheck disable=SC2086
  "$PY" "$HERE/peers.py" crt-warm localhost $PEER_ARGS "$WARM_N" > "$WORK/crt-warm.json"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
for s in d["samples"]: print("warm_crt", s)
print("proc_rss_crt", d["VmRSS"]); print("proc_hwm_crt", d["VmHWM"])' "$WORK/crt-warm.json" >> "$RES"
fi
kill "$T_PID" 2>/dev/null || true

# ================================================================ 3 local serving
log "3/5 local serving: $CONNS keep-alive connections, ${SERVE_S} s, $SERVE_REPS round(s)"
TOKEN=$(cat "$WORK/run-a/default.token")
curl -s -H "Authorization: $TOKEN" "http://127.0.0.1:$A_PORT/v1/credentials" > "$WORK/credentials.json"
grep -q AccessKeyId "$WORK/credentials.json" || die "agent did not serve credentials"
# IMDS (SPEC 4.4): a session token, then the credentials body nginx will serve too.
IMDS_PATH=/latest/meta-data/iam/security-credentials/default
IMDS_TOKEN=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' \
  "http://127.0.0.1:$IMDS_PORT/latest/api/token")
curl -s -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" "http://127.0.0.1:$IMDS_PORT$IMDS_PATH" > "$WORK/imds.json"
grep -q '"Code":"Success"' "$WORK/imds.json" || die "agent did not serve IMDS credentials"
NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx/html/v1" "$WORK/nginx/logs" "$WORK/nginx/html${IMDS_PATH%/*}"
cp "$WORK/credentials.json" "$WORK/nginx/html/v1/credentials"
cp "$WORK/imds.json" "$WORK/nginx/html$IMDS_PATH"
# Same answer as the agent (body, Content-Type, Cache-Control: no-store), the same token check,
# as many workers as the agent has runtime worker threads (2), no access log (the agent has none).
cat > "$WORK/nginx/nginx.conf" <<NGINX
user root;
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    listen unix:$WORK/nginx/nginx.sock;
    root $WORK/nginx/html;
    location = /v1/credentials {
      if (\$http_authorization != "$TOKEN") { return 401; }
      default_type application/json;
      add_header Cache-Control no-store;
    }
    location = $IMDS_PATH {
      if (\$http_x_aws_ec2_metadata_token != "$IMDS_TOKEN") { return 401; }
      default_type application/json;
      add_header Cache-Control no-store;
    }
  }
}
NGINX
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 2> "$WORK/nginx/stderr.log" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $TOKEN" "http://127.0.0.1:$NGINX_PORT/v1/credentials")" = 200 ] && break
  sleep 0.05
done
cmp -s <(curl -s -H "Authorization: $TOKEN" "http://127.0.0.1:$NGINX_PORT/v1/credentials") "$WORK/credentials.json" ||
  die "nginx does not serve the same JSON (see $WORK/nginx)"

loadgen() { # SUBJECT TRANSPORT ARGS...
  local subject=$1 transport=$2; shift 2
  local line
  line=$("$BIN/loadgen" "$@" --threads 2 --connections "$CONNS" --duration "$SERVE_S" --warmup 1 \
    --path "${LG_PATH:-/v1/credentials}" --header "${LG_HEADER:-Authorization: $TOKEN}")
  echo "  loadgen $subject $transport: $line" >&2
  for kv in $line; do put "serve_${subject}_${transport}_${kv%%=*} ${kv#*=}"; done
}
wrk_run() { # SUBJECT PORT
  local out rps p50 p99
  out=$(wrk -t 2 -c "$CONNS" -d "${SERVE_S}s" --latency -H "Authorization: $TOKEN" \
    "http://127.0.0.1:$2/v1/credentials")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  conv() { awk '{v=$1; u=v; gsub(/[0-9.]/,"",u); gsub(/[a-z]/,"",v); f=(u=="us")?1:(u=="ms")?1000:(u=="s")?1e6:1; print v*f}'; }
  p50=$(awk '$1=="50%" {print $2}' <<<"$out" | conv)
  p99=$(awk '$1=="99%" {print $2}' <<<"$out" | conv)
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  echo "  wrk $1 tcp: rps=$rps p50_us=$p50 p99_us=$p99 non2xx=${non2xx:-0}" >&2
  put "wrk_$1_rps $rps"; put "wrk_$1_p50_us $p50"; put "wrk_$1_p99_us $p99"
  put "wrk_$1_non2xx ${non2xx:-0}"
}
for _ in $(seq 1 "$SERVE_REPS"); do
  loadgen iotcred tcp --tcp "127.0.0.1:$A_PORT" --host "127.0.0.1:$A_PORT"
  loadgen nginx tcp --tcp "127.0.0.1:$NGINX_PORT" --host "127.0.0.1:$NGINX_PORT"
  loadgen iotcred unix --unix "$WORK/run-a/agent.sock" --host localhost
  loadgen nginx unix --unix "$WORK/nginx/nginx.sock" --host localhost
  wrk_run iotcred "$A_PORT"
  wrk_run nginx "$NGINX_PORT"
  LG_PATH=$IMDS_PATH LG_HEADER="X-aws-ec2-metadata-token: $IMDS_TOKEN" \
    loadgen iotcred imds --tcp "127.0.0.1:$IMDS_PORT" --host "127.0.0.1:$IMDS_PORT"
  LG_PATH=$IMDS_PATH LG_HEADER="X-aws-ec2-metadata-token: $IMDS_TOKEN" \
    loadgen nginx imds --tcp "127.0.0.1:$NGINX_PORT" --host "127.0.0.1:$NGINX_PORT"
done
# The 4.6 peer uid lookup (NETLINK_SOCK_DIAG), once per connection: its cost beside connect+accept.
for fam in 127.0.0.1 ::1; do
  key=$([ "$fam" = ::1 ] && echo v6 || echo v4)
  "$BIN/peer_uid_cost" "$([ "$QUICK" = 1 ] && echo 5000 || echo 20000)" "$fam" > "$WORK/uid-$key.txt" 2>&1 || continue
  sed -n 's/^connect+accept .*p50_us=\([0-9.]*\) p99_us=\([0-9.]*\).*/\1 \2/p' "$WORK/uid-$key.txt" |
    { read -r a b && put "uid_connect_${key}_p50_us $a" && put "uid_connect_${key}_p99_us $b"; } || true
  sed -n 's/^uid lookup .*p50_us=\([0-9.]*\) p99_us=\([0-9.]*\).*/\1 \2/p' "$WORK/uid-$key.txt" |
    { read -r a b && put "uid_lookup_${key}_p50_us $a" && put "uid_lookup_${key}_p99_us $b"; } || true
  echo "  uid lookup $key: $(tr '\n' ' ' < "$WORK/uid-$key.txt")" >&2
done
for w in $(pgrep -P "$NGINX_PID"); do
  put "nginx_worker_rss $(status_kib "$w" VmRSS)"
  put "nginx_worker_hwm $(status_kib "$w" VmHWM)"
done
put "nginx_master_rss $(status_kib "$NGINX_PID" VmRSS)"
kill "$NGINX_PID" 2>/dev/null || true

# ================================================================ 4b RSS after a million requests
log "4/5 footprint: RSS after $MILLION requests (Unix socket, $CONNS connections)"
"$BIN/loadgen" --unix "$WORK/run-a/agent.sock" --host localhost --threads 2 --connections "$CONNS" \
  --requests "$MILLION" --duration 600 --warmup 0 > "$WORK/million-file.txt"
"$BIN/loadgen" --unix "$WORK/run-b/agent.sock" --host localhost --threads 2 --connections "$CONNS" \
  --requests "$MILLION" --duration 600 --warmup 0 > "$WORK/million-hsm.txt"
sleep 1
put "million $MILLION"
for x in A:file B:hsm; do
  pid_var=${x%%:*}_PID; n=${x#*:}
  put "after_rss_$n $(status_kib "${!pid_var}" VmRSS)"
  put "after_hwm_$n $(status_kib "${!pid_var}" VmHWM)"
  put "after_errors_$n $(sed -n 's/.*errors=\([0-9]*\).*/\1/p' "$WORK/million-$n.txt")"
done

# ================================================================ 2b SoftHSM refresh in a running agent
# The same SIGHUP trick on the SoftHSM agent (after its RSS was read): what signing in the
# token adds to one exchange once the module is loaded.
log "2/5 warm refresh, SoftHSM agent: $WARM_N SIGHUP reloads"
for i in $(seq 1 "$WARM_N"); do
  ca=$PKI/ca.pem; [ $((i % 2)) = 1 ] && ca=$PKI/ca-copy.pem
  write_config "$C/agent-hsm.toml" "$MAIN_PORT" "$HSM_URI" "$WORK/run-b" "$B_PORT" "$ca"
  c0=$(metric "$B_PORT" "$LCNT"); s0=$(metric "$B_PORT" "$LSUM")
  kill -HUP "$B_PID"
  for _ in $(seq 1 200); do
    c=$(metric "$B_PORT" "$LCNT"); [ "$c" != "$c0" ] && break; sleep 0.02
  done
  s=$(metric "$B_PORT" "$LSUM")
  put "warm_iotcred_hsm_newconn $(python3 -c "print(($s-$s0)/($c-$c0))")"
done

# ================================================================ binary sizes
log "binary sizes"
put "size_x86_64 $(stat -c %s "$IOTCRED")"
if [ "$CROSS" = 1 ]; then
  aarch=""
  if [ -x "$ROOT/cross/build.sh" ]; then
    aarch=$("$ROOT/cross/build.sh" aarch64-unknown-linux-gnu 2> "$WORK/cross.log" | tail -n1) || aarch=""
  fi
  if [ -z "$aarch" ] || [ ! -f "$aarch" ]; then
    (cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
      cargo build --release --locked -p iotcred-agent --bin iotcred --target aarch64-unknown-linux-gnu) >> "$WORK/cross.log" 2>&1 &&
      aarch=$TARGET_DIR/aarch64-unknown-linux-gnu/release/iotcred
  fi
  if [ -n "$aarch" ] && [ -f "$aarch" ]; then
    put "size_aarch64 $(stat -c %s "$aarch")"
  else
    log "aarch64 build failed (see $WORK/cross.log)"
  fi
  # The nightly build-std variant (what the arm64 .deb carries).
  amin=$("$ROOT/cross/build.sh" --min-size aarch64-unknown-linux-gnu 2>> "$WORK/cross.log" | tail -n1) || amin=""
  if [ -n "$amin" ] && [ -f "$amin" ]; then
    put "size_aarch64_min $(stat -c %s "$amin")"
  else
    log "aarch64 --min-size build failed (see $WORK/cross.log)"
  fi
fi

# ================================================================ 5 fleet
log "5/5 fleet simulation (core)"
(cd "$ROOT" && cargo run -q --locked -p iotcred-core --release --example fleet -- 42) > "$WORK/fleet.txt" 2>&1 ||
  log "fleet example failed (see $WORK/fleet.txt)"

# ================================================================ report
{
  echo "machine_nproc $(nproc)"
  echo "machine_cpu $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "machine_kernel $(uname -r)"
  echo "machine_rustc $(rustc --version)"
  echo "mode $MODE"
} >> "$RES"
python3 "$HERE/report.py" "$WORK" ${OUT:+"$OUT"}
