#!/usr/bin/env bash
# Fleet provisioning, side by side in one run (issue #12's measures), against the local fake AWS
# IoT (tests/src/bin/fake-iot.rs: mosquitto with the claim/device ACL, the fleet-provisioning
# responder, and the fake credentials provider that checks the responder's registry):
#
# 1. Time to identity: `iotcred provision` (release build, PEM key, fresh state_dir each round)
#    against tests/bench/provision_peer.py (python3 + paho-mqtt + cryptography: the same two
#    MQTT calls against the same broker), each a cold process timed from spawn to exit 0.
#    Rounds are interleaved (the order alternates each round); each round uses a fresh
#    SerialNumber for each client, so every run makes a new thing. Reports median and p90 and
#    the ratio iotcred/peer (goal <= 1.0, lower is better). Two fakes run side by side and every
#    round times both clients against both: "default" is the fake as the tests run it (mosquitto's
#    and rumqttc's default: Nagle's algorithm on), "nodelay" has TCP_NODELAY on the broker's and
#    the responder's sockets, so that the fake itself adds no delayed-ACK stall (~40 ms on Linux
#    loopback) and what remains is the clients' own.
# 2. Idle footprint: `iotcred run` with [rotation] (certificate valid 365 days, before_days 30:
#    not due) against the same config without [rotation], both provisioned first; VmRSS/VmHWM
#    from /proc/PID/status after the agent is healthy and IDLE seconds idle, the voluntary
#    context switches over that idle window, and the agent's TCP connections to the broker's
#    port sampled every 0.5 s during it (`ss -tnp`; expected: none).
#
# Usage: tests/bench/provision.sh [ROUNDS] [IDLE_SECONDS] [REPEATS]   (default 20, 5, 3)
# Installs paho-mqtt and cryptography from PyPI into target/bench-provision-venv (once). Needs
# mosquitto (/usr/sbin/mosquitto), curl, ss. Everything on 127.0.0.1. Never fails on a timing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-20}
IDLE_S=${2:-5}
REPEATS=${3:-3}
VENV="$ROOT/target/bench-provision-venv"

WORK=$(mktemp -d /tmp/iotcred-provision-bench.XXXXXX)
IOT_PIDS=""
AGENT_PID=""
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null || true
  exec 3>&- 4>&- 2>/dev/null || true      # closes the fakes' stdin: they stop mosquitto and exit
  stop_fakes
  for p in $IOT_PIDS; do kill "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "provision.sh: $*"; exit 1; }
stop_fakes() {
  exec 3>&- 4>&- 2>/dev/null || true
  for p in $IOT_PIDS; do for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done; done
}

for tool in /usr/sbin/mosquitto curl ss python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (tests/install-deps.sh installs mosquitto)"
done

log "build (release): iotcred, fake-iot"
cargo build --quiet --release -p iotcred-agent --bin iotcred --manifest-path "$ROOT/Cargo.toml"
cargo build --quiet --release -p iotcred-tests --bin fake-iot --manifest-path "$ROOT/Cargo.toml"
IOTCRED="$ROOT/target/release/iotcred"
FAKE_IOT="$ROOT/target/release/fake-iot"

if ! "$VENV/bin/python" -c 'import paho.mqtt, cryptography' 2>/dev/null; then
  log "venv: paho-mqtt, cryptography from PyPI into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check paho-mqtt cryptography
fi
PY="$VENV/bin/python"
PEER_VERSIONS=$("$PY" -c 'import paho.mqtt, cryptography, sys; print(f"paho-mqtt {paho.mqtt.__version__}, cryptography {cryptography.__version__}, Python {sys.version.split()[0]}")')

# start_fake NAME FD [FLAGS...]: fake-iot with its stdin held open on FD; KEY=VALUE in $WORK/NAME.out
start_fake() {
  local name=$1 fd=$2; shift 2
  mkfifo "$WORK/$name.in"
  "$FAKE_IOT" --dir "$WORK/$name" --validity-days 365 "$@" < "$WORK/$name.in" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  IOT_PIDS="$IOT_PIDS $!"
  eval "exec $fd> \"\$WORK/\$name.in\""
  for _ in $(seq 300); do grep -q '^READY=1' "$WORK/$name.out" 2>/dev/null && return 0
    kill -0 "$!" 2>/dev/null || die "fake-iot $name exited: $(cat "$WORK/$name.err")"; sleep 0.1; done
  die "fake-iot $name did not start in 30 s"
}
log "fake AWS IoT x2 (mosquitto + responder + registry-checking provider): default, nodelay"
start_fake fake-default 3
start_fake fake-nodelay 4 --tcp-nodelay
# fake NAME: sets IOT_ENDPOINT, IOT_PORT, PROVIDER_ENDPOINT, CA, CLAIM_* and the templates
fake() {
  # shellcheck disable=SC1090
  . <(grep -E '^[A-Z_]+=' "$WORK/$1.out")
}

# config NAME SERIAL EXTRA -> path of a config with its own state_dir, runtime dir and socket,
# against the fake selected last with `fake`
config() {
  local d="$WORK/$1"
  mkdir -p "$d"
  cat > "$d/config.toml" <<EOF
endpoint = "$PROVIDER_ENDPOINT"
ca = "$CA"
timeout_seconds = 10
runtime_dir = "$d/run"
state_dir = "$d/state"

[serve]
socket = "$d/run/agent.sock"

[provision]
endpoint = "$IOT_ENDPOINT"
claim_certificate = "$CLAIM_CERT"
claim_key = "$CLAIM_KEY"
ca = "$CA"
template = "$FLEET_TEMPLATE"
parameters = { SerialNumber = "$2" }
timeout_seconds = 10

$3

[[role]]
name = "default"
role_alias = "GatewayRole"
  [[role.file]]
  path = "$d/run/credentials"
  format = "ini"
  mode = "0640"
EOF
  echo "$d/config.toml"
}

# ================================================================ 1 time to identity
log "1/2 time to identity: $ROUNDS interleaved rounds (+1 untimed warm-up each)"
for f in default nodelay; do
  fake "fake-$f"
  for r in $(seq 0 "$ROUNDS"); do config "ours-$f-$r" "o$f$r" "" > /dev/null; done
done
IOTCRED="$IOTCRED" PY="$PY" PEER="$HERE/provision_peer.py" "$PY" - "$WORK" "$ROUNDS" <<'PY'
import json, os, subprocess, sys, time
work, rounds = sys.argv[1], int(sys.argv[2])
env = {k: v for k, v in os.environ.items()}
fakes = {f: dict(l.strip().split("=", 1) for l in open(f"{work}/fake-{f}.out") if "=" in l)
         for f in ("default", "nodelay")}
for k in ("IOTCRED_CONFIG", "IOTCRED_SOCKET", "IOTCRED_LOG", "HTTPS_PROXY", "https_proxy", "NOTIFY_SOCKET"):
    env.pop(k, None)

def timed(argv, out, err):
    with open(out, "wb") as o, open(err, "wb") as e:
        t = time.perf_counter_ns()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=env)
        code = p.wait(timeout=60)
        ms = (time.perf_counter_ns() - t) / 1e6
    if code != 0:
        sys.exit(f"{argv[0]} exited {code}: {open(err).read()}")
    return ms

def ours(f, r):
    d = f"{work}/ours-{f}-{r}"
    ms = timed([os.environ["IOTCRED"], "provision", "--config", f"{d}/config.toml"],
               f"{d}/stdout", f"{d}/stderr")
    ident = open(f"{d}/state/identity.toml").read()
    assert f'thing_name = "gw-o{f}{r}"' in ident, ident
    return ms, None

def peer(f, r):
    d = f"{work}/peer-{f}-{r}"
    os.makedirs(d)
    iot = fakes[f]
    host, port = iot["IOT_ENDPOINT"].rsplit(":", 1)
    ms = timed([os.environ["PY"], os.environ["PEER"], host, port, iot["CA"], iot["CLAIM_CERT"],
                iot["CLAIM_KEY"], iot["FLEET_TEMPLATE"], f"p{f}{r}", d], f"{d}/stdout.json", f"{d}/stderr")
    assert open(f"{d}/thing_name").read() == f"gw-p{f}{r}"
    return ms, json.load(open(f"{d}/stdout.json"))

res = {f: {"ours": [], "peer": [], "peer_import": [], "peer_flow": []} for f in fakes}
for f in fakes:  # warm-up: page cache, untimed
    ours(f, 0); peer(f, 0)
for r in range(1, rounds + 1):
    runs = [(c, f) for f in fakes for c in (ours, peer)]
    for c, f in (runs if r % 2 else runs[::-1]):
        ms, inner = c(f, r)
        if c is ours:
            res[f]["ours"].append(ms)
        else:
            res[f]["peer"].append(ms); res[f]["peer_import"].append(inner["import_ms"])
            res[f]["peer_flow"].append(inner["flow_ms"])
json.dump(res, open(f"{work}/times.json", "w"))
PY

# ================================================================ 2 idle footprint
log "2/2 idle footprint: with and without [rotation], $REPEATS runs each, ${IDLE_S} s idle"
status_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
ctxsw() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '$1=="voluntary_ctxt_switches:" {s+=$2} END {print s+0}'; }
fake fake-default
ROTATION_TABLE=$(printf '[rotation]\nbefore_days = 30\ntemplate = "%s"\n' "$ROTATION_TEMPLATE")
NOROT=$(config rss-norot rss-norot "")
ROT=$(config rss-rot rss-rot "$ROTATION_TABLE")
for c in "$NOROT" "$ROT"; do
  "$IOTCRED" provision --config "$c" > "$(dirname "$c")/provision.out" 2>&1 \
    || die "provision for $c failed: $(cat "$(dirname "$c")/provision.out")"
done
: > "$WORK/rss.txt"
for i in $(seq "$REPEATS"); do
  for kind in norot rot; do
    d="$WORK/rss-$kind"
    "$IOTCRED" run --config "$d/config.toml" > "$d/agent-$i.log" 2>&1 &
    AGENT_PID=$!
    ok=""
    for _ in $(seq 300); do
      code=$(curl -s -o "$d/health.json" -w '%{http_code}' --unix-socket "$d/run/agent.sock" http://localhost/v1/health || true)
      [ "$code" = 200 ] && { ok=1; break; }
      kill -0 "$AGENT_PID" 2>/dev/null || break
      sleep 0.1
    done
    [ -n "$ok" ] || die "agent ($kind) not healthy: $(tail -n5 "$d/agent-$i.log")"
    c0=$(ctxsw "$AGENT_PID")
    broker_conns=0
    for _ in $(seq $((IDLE_S * 2))); do
      n=$(ss -tnpH state all "( dport = :$IOT_PORT )" | grep -c "pid=$AGENT_PID," || true)
      broker_conns=$((broker_conns + n))
      sleep 0.5
    done
    c1=$(ctxsw "$AGENT_PID")
    tcp_all=$(ss -tnpH | grep -c "pid=$AGENT_PID," || true)
    rot_state=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("identity", {}).get("rotation", {}).get("state", "?"))' "$d/health.json")
    echo "$kind $i $(status_kib "$AGENT_PID" VmRSS) $(status_kib "$AGENT_PID" VmHWM) $((c1 - c0)) $broker_conns $tcp_all $rot_state" >> "$WORK/rss.txt"
    kill "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=""
  done
done

stop_fakes
IOT_PIDS=""

# ================================================================ report
"$PY" - "$WORK" "$ROUNDS" "$IDLE_S" "$PEER_VERSIONS" <<'PY'
import json, statistics, sys
work, rounds, idle, peer_versions = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
times = json.load(open(f"{work}/times.json"))
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]
print(f"time to identity against the fake AWS IoT on 127.0.0.1, {rounds} interleaved rounds, "
      f"cold process each, spawn to exit 0 (ms)")
print(f"peer: {peer_versions}")
for f, t in times.items():
    mo, mp = statistics.median(t["ours"]), statistics.median(t["peer"])
    print(f"-- fake: {f}" + (" (as in the tests: Nagle on)" if f == "default" else
                             " (TCP_NODELAY on the broker and the responder)"))
    print(f"{'':44}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}")
    row = lambda name, xs: print(f"{name:44}{statistics.median(xs):>9.1f}{q(xs, .9):>9.1f}{min(xs):>9.1f}{max(xs):>9.1f}")
    row("iotcred provision (PEM key)", t["ours"])
    row("provision_peer.py (paho-mqtt)", t["peer"])
    row("  of which: imports", t["peer_import"])
    row("  of which: after imports (key..files)", t["peer_flow"])
    print(f"ratio iotcred/peer, median: {mo / mp:.3f}   p90: {q(t['ours'], .9) / q(t['peer'], .9):.3f}   (goal <= 1.0)")
    print(f"ratio iotcred (whole process) / peer after its imports, median: "
          f"{mo / statistics.median(t['peer_flow']):.3f}")
print()
print(f"idle footprint of iotcred run, {idle} s idle after healthy (KiB; ctxsw = voluntary "
      f"context switches over the idle window; broker = samples with a TCP connection to the "
      f"broker port, every 0.5 s; tcp = the agent's TCP connections at the end)")
print(f"{'config':10}{'run':>4}{'VmRSS':>8}{'VmHWM':>8}{'ctxsw':>7}{'broker':>8}{'tcp':>5}  rotation")
rows = [l.split() for l in open(f"{work}/rss.txt")]
for r in rows:
    print(f"{r[0]:10}{r[1]:>4}{r[2]:>8}{r[3]:>8}{r[4]:>7}{r[5]:>8}{r[6]:>5}  {r[7]}")
med = {k: (statistics.median(int(r[2]) for r in rows if r[0] == k),
           statistics.median(int(r[3]) for r in rows if r[0] == k)) for k in ("norot", "rot")}
d = med["rot"][0] - med["norot"][0]
print(f"median VmRSS: without [rotation] {med['norot'][0]:.0f} KiB, with {med['rot'][0]:.0f} KiB "
      f"(difference {d:+.0f} KiB); VmHWM {med['norot'][1]:.0f} / {med['rot'][1]:.0f} KiB")
print(f"broker connections seen while idle: {sum(int(r[5]) for r in rows)}")
for f in ("default", "nodelay"):
    c = [l for l in open(f"{work}/fake-{f}.out") if l.startswith("COUNTERS=")]
    print(f"fake {f}: registry counters at exit: {c[0][9:].strip() if c else '(none)'}")
PY
