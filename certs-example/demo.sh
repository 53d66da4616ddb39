#!/usr/bin/env bash
# Quick start: the agent's main job end to end on this machine.
#
# With IOTCRED_CONFIG pointing at a real configuration, this simply runs
# `iotcred run --config "$IOTCRED_CONFIG"` in the foreground. Without it (no real endpoint),
# it runs the bundled example: a throwaway PKI (make-certs.sh), the fake AWS IoT credentials
# provider (real mutual TLS), the agent with certs-example/config.toml, and then fetches
# credentials through the agent with `iotcred get`, over the container-credentials HTTP API and
# from the file sink. Everything is stopped on exit; DEMO_KEEP=1 keeps the agent running.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

echo "== building iotcred and the fake provider"
cargo build --quiet --locked -p iotcred-agent -p iotcred-tests --bins
bin="$root/target/debug"

if [ -n "${IOTCRED_CONFIG:-}" ]; then
  echo "== IOTCRED_CONFIG=$IOTCRED_CONFIG: running the agent against the configured endpoint"
  exec "$bin/iotcred" run --config "$IOTCRED_CONFIG"
fi

echo "== making a throwaway PKI in certs-example/out"
"$here/make-certs.sh" "$here/out"

run="$here/run"
mkdir -p "$run"
pids=()
cleanup() {
  if [ "${DEMO_KEEP:-0}" = 1 ]; then return; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== starting the fake credentials provider (mTLS, role alias GatewayRole)"
"$bin/fake-provider" --listen 127.0.0.1:0 --ca "$here/out/ca.pem" --cert "$here/out/server.pem" \
  --key "$here/out/server.key" --alias GatewayRole > "$run/provider.out" 2> "$run/provider.log" &
pids+=($!)
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^listening on //p' "$run/provider.out" 2>/dev/null | head -n1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "fake provider did not start:"; cat "$run/provider.log"; exit 1; }
echo "   provider on $addr"

# The example config with the provider's actual port.
sed "s|^endpoint = \"127.0.0.1:8443\"|endpoint = \"$addr\"|" "$here/config.toml" > "$here/demo-config.toml"

echo "== iotcred check --fetch"
"$bin/iotcred" check --config "$here/demo-config.toml" --fetch

echo "== starting the agent: iotcred run --config certs-example/demo-config.toml"
"$bin/iotcred" run --config "$here/demo-config.toml" 2> "$run/agent.log" &
pids+=($!)
ok=0
for _ in $(seq 1 150); do
  if "$bin/iotcred" get --socket "$run/agent.sock" > /dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
[ "$ok" = 1 ] || { echo "agent did not become ready:"; cat "$run/agent.log"; exit 1; }

echo "== credentials through the agent: iotcred get --socket certs-example/run/agent.sock"
"$bin/iotcred" get --socket "$run/agent.sock"
echo
echo "== the same for an unmodified AWS SDK: GET http://127.0.0.1:2773/v1/credentials/default"
echo "   (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=$run/default.token)"
if command -v curl >/dev/null; then
  curl -sS -H "Authorization: $(cat "$run/default.token")" http://127.0.0.1:2773/v1/credentials/default; echo
  echo "== health: GET /v1/health"
  curl -sS http://127.0.0.1:2773/v1/health; echo
fi
echo "== file sink certs-example/run/credentials (ini, mode $(stat -c %a "$run/credentials"))"
sed 's/\(aws_secret_access_key = \|aws_session_token = \).*/\1…/' "$run/credentials"
echo
echo "== agent log"
cat "$run/agent.log"
if [ "${DEMO_KEEP:-0}" = 1 ]; then
  echo "agent and provider keep running (pids ${pids[*]}); stop them with: kill ${pids[*]}"
fi
