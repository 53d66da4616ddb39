#!/usr/bin/env bash
# Static checks of the systemd integration, no running systemd needed:
#  - `systemd-analyze verify` of iotcred.service, iotcred.socket, iotcred-tcp.socket, the
#    service with each drop-in in dropins/, and a sample app with examples/app-credentials.conf
#    (ExecStart= pointed at a real file: $IOTCRED_BIN, a built iotcred, or /bin/true);
#  - sysusers.d and tmpfiles.d snippets applied to a scratch root (user, group, /run/iotcred
#    owner and mode);
#  - the systemd-networkd pair iotcred0.netdev/.network (no offline parser exists in systemd
#    252: structure, interface name, and that every Address= is one the agent may bind, SPEC
#    §4.5) and that dropins/containers.conf orders the agent after that interface;
#  - `systemd-analyze security --offline=true` of the service: prints the exposure score and
#    fails when it is above MAX_EXPOSURE (default 2.0).
# Usage: systemd/check.sh        Exit status: 0 when every check passed.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if ! command -v systemd-analyze >/dev/null; then
  echo "check: installing the systemd package (for systemd-analyze)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
command -v systemd-analyze >/dev/null || { echo "FAIL: systemd-analyze is not available"; exit 1; }
echo "check: $(systemd-analyze --version | head -1)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

BIN=${IOTCRED_BIN:-}
if [ -z "$BIN" ]; then
  for c in "$ROOT/target/release/iotcred" "$ROOT/target/debug/iotcred" /bin/true; do
    [ -x "$c" ] && { BIN=$c; break; }
  done
fi
echo "check: ExecStart binary for verify: $BIN"

# One directory per check, so drop-ins and units do not leak into each other.
stage() { # stage NAME FILE... -> prints the directory
  local d="$WORK/$1"; shift
  mkdir -p "$d"
  cp "$@" "$d/"
  sed -i "s|/usr/bin/iotcred|$BIN|g" "$d"/*.service 2>/dev/null || true
  echo "$d"
}
verify() { # verify LABEL DIR UNIT...
  local label=$1 dir=$2 out; shift 2
  # Log level "notice" keeps verify's own warnings (they are what we look for) and drops debug.
  if out=$(cd "$dir" && SYSTEMD_LOG_LEVEL=notice SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$@" 2>&1) \
     && [ -z "$out" ]; then
    pass "systemd-analyze verify $label"
  else
    fail "systemd-analyze verify $label"
    printf '%s\n' "$out" | sed 's/^/    /'
  fi
}

d=$(stage units "$HERE/iotcred.service" "$HERE/iotcred.socket" "$HERE/iotcred-tcp.socket")
verify "iotcred.service iotcred.socket iotcred-tcp.socket" "$d" ./iotcred.service ./iotcred.socket ./iotcred-tcp.socket

for dropin in "$HERE"/dropins/*.conf; do
  name=$(basename "$dropin")
  d=$(stage "dropin-$name" "$HERE/iotcred.service" "$HERE/iotcred.socket")
  mkdir -p "$d/iotcred.service.d" && cp "$dropin" "$d/iotcred.service.d/"
  verify "iotcred.service + $name" "$d" ./iotcred.service
done

d="$WORK/app"; mkdir -p "$d/example-app.service.d"
cp "$HERE/iotcred.service" "$HERE/iotcred.socket" "$d/"
sed -i "s|/usr/bin/iotcred|$BIN|g" "$d/iotcred.service"
printf '[Unit]\nDescription=example app\n[Service]\nExecStart=/bin/true\n' > "$d/example-app.service"
cp "$HERE/examples/app-credentials.conf" "$d/example-app.service.d/"
verify "example-app.service + examples/app-credentials.conf" "$d" ./example-app.service

# sysusers.d + tmpfiles.d on a scratch root.
R="$WORK/root"; mkdir -p "$R/etc" "$R/run"
if out=$(systemd-sysusers --root="$R" "$HERE/iotcred.sysusers" 2>&1) \
   && grep -q '^iotcred:' "$R/etc/passwd" && grep -q '^iotcred:' "$R/etc/group"; then
  shell=$(awk -F: '$1=="iotcred"{print $7}' "$R/etc/passwd")
  pass "sysusers: user and group iotcred (shell $shell)"
else
  fail "sysusers: iotcred user/group not created"; printf '%s\n' "$out" | sed 's/^/    /'
fi
if out=$(systemd-tmpfiles --root="$R" --create "$HERE/iotcred.tmpfiles" 2>&1) && [ -d "$R/run/iotcred" ]; then
  uid=$(awk -F: '$1=="iotcred"{print $3}' "$R/etc/passwd")
  got=$(stat -c '%a %u %g' "$R/run/iotcred")
  if [ "$got" = "750 $uid $uid" ]; then
    pass "tmpfiles: /run/iotcred 0750 iotcred:iotcred"
  else
    fail "tmpfiles: /run/iotcred is '$got', want '750 $uid $uid'"
  fi
else
  fail "tmpfiles: /run/iotcred not created"; printf '%s\n' "$out" | sed 's/^/    /'
fi

# systemd-networkd dummy interface for containers (SPEC §4.5).
nd="$HERE/iotcred0.netdev"; nw="$HERE/iotcred0.network"
if grep -qx '\[NetDev\]' "$nd" && grep -qx 'Name=iotcred0' "$nd" && grep -qx 'Kind=dummy' "$nd"; then
  pass "iotcred0.netdev: dummy interface iotcred0"
else
  fail "iotcred0.netdev: want [NetDev] Name=iotcred0 Kind=dummy"
fi
addrs=$(sed -n 's/^Address=//p' "$nw")
bad=$(printf '%s\n' "$addrs" | grep -vxE '169\.254\.(170\.(2|23)|169\.254)/32|fd00:ec2::(23|254)/128' || true)
if grep -qx '\[Match\]' "$nw" && grep -qx 'Name=iotcred0' "$nw" && grep -qx 'Address=169.254.170.2/32' "$nw" \
   && [ -z "$bad" ] && ! grep -vE '^(#.*|\[(Match|Link|Network|Address)\]|[A-Za-z0-9]+=.*|)$' "$nw" >/dev/null; then
  pass "iotcred0.network: $(printf '%s ' $addrs)on iotcred0"
else
  fail "iotcred0.network: want [Match] Name=iotcred0 and only §4.5 addresses (169.254.170.2/32 at least); unexpected: ${bad:-structure}"
fi
if grep -qx 'After=systemd-networkd-wait-online@iotcred0.service' "$HERE/dropins/containers.conf"; then
  pass "dropins/containers.conf orders iotcred after iotcred0 is configured"
else
  fail "dropins/containers.conf: After=systemd-networkd-wait-online@iotcred0.service missing"
fi

# Fd names the socket units hand over (the agent tells them apart by socket type anyway).
for u in iotcred.socket:unix iotcred-tcp.socket:tcp; do
  f=${u%%:*}; want=${u#*:}
  if grep -qx "FileDescriptorName=$want" "$HERE/$f"; then pass "$f names its fd '$want'"; else fail "$f: FileDescriptorName=$want missing"; fi
done

# Exposure score.
score_of() { # score_of DIR UNIT -> prints the score, or nothing
  (cd "$1" && SYSTEMD_LOG_LEVEL=err systemd-analyze security --offline=true --no-pager "$2" 2>&1) \
    | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' | tail -1
}
d=$(stage security "$HERE/iotcred.service")
score=$(score_of "$d" ./iotcred.service)
if [ -z "$score" ]; then
  fail "systemd-analyze security printed no exposure score"
  (cd "$d" && systemd-analyze security --offline=true --no-pager ./iotcred.service 2>&1 | tail -5 | sed 's/^/    /')
elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN{exit !(s <= m)}'; then
  pass "exposure score of iotcred.service: $score (limit $MAX_EXPOSURE)"
else
  fail "exposure score of iotcred.service: $score > $MAX_EXPOSURE"
  (cd "$d" && systemd-analyze security --offline=true --no-pager ./iotcred.service 2>&1 | grep '✗' | sed 's/^/    /')
fi
# Informational: the score with each drop-in merged in (drop-ins loosen the sandbox on purpose).
for dropin in "$HERE"/dropins/*.conf; do
  name=$(basename "$dropin")
  d="$WORK/security-$name"; mkdir -p "$d"
  cat "$HERE/iotcred.service" "$dropin" | sed "s|/usr/bin/iotcred|$BIN|g" > "$d/iotcred.service"
  echo "info: exposure score with $name: $(score_of "$d" ./iotcred.service)"
done

if [ "$fails" -eq 0 ]; then echo "systemd/check.sh: PASS"; else echo "systemd/check.sh: FAIL ($fails check(s))"; exit 1; fi
