#!/usr/bin/env bash
# One chained refresh, side by side in one run: iotcred's STS client (AssumeRole over its
# kept-alive connection; agent/examples/sts_bench.rs, release build) against botocore's
# assume_role (tests/bench/sts_peer.py, its own kept-alive connection), both against the same
# local fake STS (tests/sts/fake_sts.py over TLS, which verifies every signature with botocore).
#
# Usage: tests/bench/sts.sh [N] [ROUNDS]     (default 200 calls per round, 5 rounds)
# Rounds alternate ours/botocore so that drift of a shared, loaded machine hits both. Prints
# medians and p90 per call, the ratio ours/botocore (goal <= 0.2), and the same with the fake's
# own time per request (server_us, measured inside it) taken out: the clients' own cost.
# Needs tests/install-deps.sh (botocore in tests/.deps/py) and openssl. Everything on 127.0.0.1.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
N=${1:-200}
ROUNDS=${2:-5}
PY="$ROOT/tests/.deps/py"
[ -d "$PY/botocore" ] || { echo "sts.sh: run tests/install-deps.sh first" >&2; exit 1; }

WORK=$(mktemp -d /tmp/iotcred-sts-bench.XXXXXX)
STS_PID=""
cleanup() {
  [ -n "$STS_PID" ] && kill "$STS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "build (release): agent/examples/sts_bench.rs"
cargo build --quiet --release -p iotcred-agent --example sts_bench --manifest-path "$ROOT/Cargo.toml"
OURS="$ROOT/target/release/examples/sts_bench"

log "PKI (openssl): a CA and a server certificate for localhost"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
  -CAcreateserial -days 2 -extfile "$WORK/ext" -out "$WORK/server.pem" 2>/dev/null

python3 - "$WORK/source.json" <<'PY'
import json, secrets, sys, time
json.dump({"access_key_id": "ASIA" + secrets.token_hex(8).upper(),
           "secret_access_key": secrets.token_urlsafe(30),
           "session_token": "IQoJb3JpZ2luX2Vj" + secrets.token_urlsafe(300),
           "expiration_unix": int(time.time()) + 86400}, open(sys.argv[1], "w"))
PY

log "fake STS (signature-verifying)"
mkfifo "$WORK/sts.in"
PYTHONPATH="$PY" PYTHONDONTWRITEBYTECODE=1 python3 "$ROOT/tests/sts/fake_sts.py" \
  --cert "$WORK/server.pem" --key "$WORK/server.key" --region eu-west-1 \
  --source-credentials "$WORK/source.json" < "$WORK/sts.in" > "$WORK/sts.out" &
STS_PID=$!
exec 3> "$WORK/sts.in"   # holds the fake's stdin open
for _ in $(seq 100); do [ -s "$WORK/sts.out" ] && break; sleep 0.1; done
read -r PORT ADMIN < <(python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d["port"], d["admin_port"])' "$WORK/sts.out")
URL="https://localhost:$PORT"

for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: iotcred x$N, botocore x$N"
  "$OURS" "$URL" eu-west-1 "$WORK/ca.pem" "$WORK/source.json" "$N" >> "$WORK/ours.jsonl"
  PYTHONPATH="$PY" python3 "$HERE/sts_peer.py" "$URL" eu-west-1 "$WORK/ca.pem" "$WORK/source.json" "$N" >> "$WORK/boto.jsonl"
done
curl -s "http://127.0.0.1:$ADMIN/requests" > "$WORK/requests.json"

python3 - "$WORK" "$N" "$ROUNDS" <<'PY'
import json, statistics, sys
work, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def samples(name):
    out = []
    for line in open(f"{work}/{name}.jsonl"):
        out += json.loads(line)["samples_us"]
    return out
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]
reqs = json.load(open(f"{work}/requests.json"))
bad = [r for r in reqs if not r.get("signature_ok") or r.get("status") != 200]
server = {"iotcred": [], "botocore": []}
for r in reqs:
    key = "iotcred" if r["user_agent"].startswith("iotcred/") else "botocore"
    if r.get("server_us") is not None:
        server[key].append(r["server_us"])
ours, boto = samples("ours"), samples("boto")
mo, mb = statistics.median(ours), statistics.median(boto)
so, sb = statistics.median(server["iotcred"]), statistics.median(server["botocore"])
print(f"chained refresh (AssumeRole, kept-alive TLS connection, fake STS on 127.0.0.1), "
      f"{rounds} rounds x {n} calls each, alternating")
print(f"{'':28}{'median':>10}{'p90':>10}   (microseconds per call)")
print(f"{'iotcred (sts_bench)':28}{mo:>10.0f}{q(ours, .9):>10.0f}")
print(f"{'botocore assume_role':28}{mb:>10.0f}{q(boto, .9):>10.0f}")
print(f"ratio iotcred/botocore, end to end: {mo / mb:.3f}   (goal <= 0.2)")
print(f"fake STS's own time per request (median): iotcred's {so:.0f} us, botocore's {sb:.0f} us")
print(f"ratio of the clients' own cost (end to end minus the fake's time): "
      f"{(mo - so) / (mb - sb):.3f}   ({mo - so:.0f} us vs {mb - sb:.0f} us)")
print(f"requests refused by the fake (bad signature or status): {len(bad)}")
PY
