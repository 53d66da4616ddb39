#!/usr/bin/env bash
# The IMDS credential GET (SPEC 4.4) against nginx serving the same body with the same token
# check, interleaved round by round (the machine is shared: interleaving keeps the ratio fair),
# plus the §4.1 TCP credential GET for reference. The same rows are part of compare.sh; this
# runs only them, with more rounds.
#
# Usage: tests/bench/imds_serving.sh [ROUNDS (default 6)] [SECONDS per run (default 3)]
# Needs nginx (nginx-light) and curl; builds iotcred, fake-provider and loadgen (release).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-6} SECS=${2:-3} CONNS=64
(cd "$ROOT" && cargo build --release --locked -p iotcred-agent -p iotcred-tests --bins) >&2
W=$(mktemp -d /tmp/iotcred-imds-bench.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$W"' EXIT
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
mkdir -p "$W/bin" && cp "$BIN/iotcred" "$BIN/fake-provider" "$BIN/loadgen" "$W/bin/" && BIN=$W/bin
"$ROOT/certs-example/make-certs.sh" "$W/pki" >&2
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$BIN/fake-provider" --listen 127.0.0.1:0 --ca "$W/pki/ca.pem" --cert "$W/pki/server.pem" \
  --key "$W/pki/server.key" --alias GatewayRole > "$W/provider.out" 2> "$W/provider.log" &
PIDS+=($!)
PP=""
for _ in $(seq 1 100); do PP=$(sed -n 's/^listening on .*://p' "$W/provider.out" | head -n1); [ -n "$PP" ] && break; sleep 0.05; done
[ -n "$PP" ] || { echo "fake provider did not start" >&2; exit 1; }
TP=$(port) IP=$(port) NP=$(port)
cat > "$W/agent.toml" <<TOML
endpoint = "127.0.0.1:$PP"
thing_name = "gateway-0042"
certificate = "$W/pki/device.pem.crt"
key = "$W/pki/device.key"
ca = "$W/pki/ca.pem"
runtime_dir = "$W/run"
[serve]
socket = "$W/run/agent.sock"
listen = "127.0.0.1:$TP"
[serve.imds]
listen = "127.0.0.1:$IP"
role = "default"
[[role]]
name = "default"
role_alias = "GatewayRole"
TOML
env -u NOTIFY_SOCKET -u LISTEN_PID -u LISTEN_FDS IOTCRED_LOG=info "$BIN/iotcred" run --config "$W/agent.toml" > /dev/null 2> "$W/agent.log" &
PIDS+=($!)
for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$TP/v1/health")" = 200 ] && break; sleep 0.05; done
TOKEN=$(cat "$W/run/default.token")
IPATH=/latest/meta-data/iam/security-credentials/default
ITOKEN=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "http://127.0.0.1:$IP/latest/api/token")
mkdir -p "$W/nginx/logs" "$W/nginx/html/v1" "$W/nginx/html${IPATH%/*}"
curl -s -H "Authorization: $TOKEN" "http://127.0.0.1:$TP/v1/credentials" > "$W/nginx/html/v1/credentials"
curl -s -H "X-aws-ec2-metadata-token: $ITOKEN" "http://127.0.0.1:$IP$IPATH" > "$W/nginx/html$IPATH"
grep -q '"Code":"Success"' "$W/nginx/html$IPATH" || { echo "no IMDS credentials" >&2; exit 1; }
cat > "$W/nginx/nginx.conf" <<NGINX
user root;
worker_processes 2;
pid $W/nginx/nginx.pid;
error_log $W/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:$NP;
    root $W/nginx/html;
    location = /v1/credentials {
      if (\$http_authorization != "$TOKEN") { return 401; }
      default_type application/json;
      add_header Cache-Control no-store;
    }
    location = $IPATH {
      if (\$http_x_aws_ec2_metadata_token != "$ITOKEN") { return 401; }
      default_type application/json;
      add_header Cache-Control no-store;
    }
  }
}
NGINX
nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -g 'daemon off;' 2> "$W/nginx/stderr.log" &
PIDS+=($!)
for _ in $(seq 1 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $TOKEN" "http://127.0.0.1:$NP/v1/credentials")" = 200 ] && break; sleep 0.05; done
run() { # NAME PORT PATH HEADER
  local line
  line=$("$BIN/loadgen" --tcp "127.0.0.1:$2" --host "127.0.0.1:$2" --path "$3" --header "$4" \
    --threads 2 --connections "$CONNS" --duration "$SECS" --warmup 1)
  echo "$1 $line" | tee -a "$W/results.txt" >&2
}
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  run iotcred_imds "$IP" "$IPATH" "X-aws-ec2-metadata-token: $ITOKEN"
  run nginx_imds "$NP" "$IPATH" "X-aws-ec2-metadata-token: $ITOKEN"
  run iotcred_tcp "$TP" /v1/credentials "Authorization: $TOKEN"
  run nginx_tcp "$NP" /v1/credentials "Authorization: $TOKEN"
done
python3 - "$W/results.txt" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, *kv = line.split()
    d = dict(x.split("=", 1) for x in kv)
    rows.setdefault(name, []).append((float(d["rps"]), float(d["p99_us"]), int(d["errors"])))
med = {k: (statistics.median(r for r, _, _ in v), statistics.median(p for _, p, _ in v), sum(e for *_, e in v), len(v)) for k, v in rows.items()}
for what in ("imds", "tcp"):
    i, n = med[f"iotcred_{what}"], med[f"nginx_{what}"]
    print(f"{what}: iotcred {i[0]:,.0f} req/s p99 {i[1]:.0f} us ({i[2]} errors) | nginx {n[0]:,.0f} req/s p99 {n[1]:.0f} us"
          f" | ratio req/s {i[0]/n[0]:.3g}x, p99 {i[1]/n[1]:.3g}x (medians of {i[3]} rounds)")
PY
