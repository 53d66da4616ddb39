#!/usr/bin/env bash
# Inspects an iotcred .deb (dpkg-deb -I / -c / -x) and fails unless it is complete and coherent:
# control fields, the binary (ELF machine and interpreter matching Architecture, stripped, glibc
# symbol versions covered by the libc6 dependency), units, sysusers.d, tmpfiles.d, example
# config, maintainer scripts, and nothing under /etc (no conffiles).
# Usage: packaging/check-deb.sh [--install] DEB
#   --install  also installs it with apt-get (root, host architecture only), checks the result
#              (user, /run/iotcred, binary, units verify) and purges it again.
set -uo pipefail
INSTALL=""
if [ "${1:-}" = --install ]; then INSTALL=1; shift; fi
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
DEB=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT

echo "== dpkg-deb -I $(basename "$DEB")"
dpkg-deb -I "$DEB" | sed 's/^/  /'
echo "== dpkg-deb -c $(basename "$DEB")"
dpkg-deb -c "$DEB" | awk '{print "  " $1, $2, $3, $6}'

field() { dpkg-deb -f "$DEB" "$1"; }
[ "$(field Package)" = iotcred ] && pass "Package: iotcred" || fail "Package is '$(field Package)'"
ARCH=$(field Architecture)
case "$ARCH" in
  arm64) MACHINE="ARM aarch64"; INTERP=/lib/ld-linux-aarch64.so.1 ;;
  armhf) MACHINE="ARM, EABI5"; INTERP=/lib/ld-linux-armhf.so.3 ;;
  amd64) MACHINE="x86-64"; INTERP=/lib64/ld-linux-x86-64.so.2 ;;
  *) MACHINE="?"; INTERP="?"; fail "unexpected Architecture '$ARCH'" ;;
esac
[ -n "$(field Version)" ] && pass "Version: $(field Version), Architecture: $ARCH" || fail "no Version"
DEPENDS=$(field Depends)
case "$DEPENDS" in *libc6*) pass "Depends: $DEPENDS" ;; *) fail "Depends lacks libc6: '$DEPENDS'" ;; esac

listing=$(dpkg-deb -c "$DEB" | awk '{print $1, $6}')
need() { # need MODE PATH
  if grep -qx -- "$1 ./$2" <<<"$listing"; then pass "contains /$2 ($1)"; else fail "missing /$2 with mode $1"; fi
}
need -rwxr-xr-x usr/bin/iotcred
need -rw-r--r-- usr/lib/systemd/system/iotcred.service
need -rw-r--r-- usr/lib/systemd/system/iotcred.socket
need -rw-r--r-- usr/lib/systemd/system/iotcred-tcp.socket
need -rw-r--r-- usr/lib/sysusers.d/iotcred.conf
need -rw-r--r-- usr/lib/tmpfiles.d/iotcred.conf
need -rw-r--r-- usr/share/doc/iotcred/examples/config.toml
need -rw-r--r-- usr/share/doc/iotcred/examples/systemd/iotcred0.netdev
need -rw-r--r-- usr/share/doc/iotcred/examples/systemd/iotcred0.network
need -rw-r--r-- usr/share/doc/iotcred/examples/systemd/containers.conf
if grep -q ' \./usr/lib/systemd/network/' <<<"$listing"; then fail "ships an active systemd-networkd unit (iotcred0 must be opt-in)"; else pass "no active systemd-networkd unit"; fi
if grep -q ' \./etc/' <<<"$listing"; then fail "ships files under /etc (config must come from the admin)"; else pass "nothing under /etc"; fi

dpkg-deb -e "$DEB" "$W/control"
if [ -s "$W/control/conffiles" ]; then fail "conffiles: $(tr '\n' ' ' <"$W/control/conffiles")"; else pass "no conffiles"; fi
for s in postinst prerm postrm; do
  if [ -x "$W/control/$s" ] && sh -n "$W/control/$s"; then pass "maintainer script $s"; else fail "maintainer script $s missing or broken"; fi
done
grep -q systemd-sysusers "$W/control/postinst" 2>/dev/null && grep -q 'systemd-tmpfiles --create' "$W/control/postinst" \
  && pass "postinst runs systemd-sysusers and systemd-tmpfiles --create" || fail "postinst lacks sysusers/tmpfiles"

dpkg-deb -x "$DEB" "$W/root"
BIN=$W/root/usr/bin/iotcred
desc=$(file -b "$BIN")
case "$desc" in
  *"$MACHINE"*"interpreter $INTERP"*) pass "binary is $ARCH: $(cut -d, -f1-2 <<<"$desc"), interpreter $INTERP" ;;
  *) fail "binary does not match $ARCH: $desc" ;;
esac
case "$desc" in *", stripped"*) pass "binary stripped ($(stat -c %s "$BIN") bytes)" ;; *) fail "binary not stripped" ;; esac
if [ "$ARCH" = armhf ]; then
  readelf -h "$BIN" | grep -q 'hard-float ABI' && pass "armhf binary uses the hard-float ABI" || fail "armhf binary is not hard-float"
fi
glibc=$(readelf -V --wide "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
declared=$(sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p' <<<"$DEPENDS")
if [ -n "$glibc" ] && [ -n "$declared" ] && [ "$(printf '%s\n%s\n' "$glibc" "$declared" | sort -V | tail -1)" = "$declared" ]; then
  pass "binary needs GLIBC_$glibc, Depends libc6 (>= $declared) covers it"
else
  fail "binary needs GLIBC_${glibc:-?}, but Depends declares libc6 (>= ${declared:-none})"
fi
libs=$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
extra=$(tr ' ' '\n' <<<"$libs" | grep -v -E '^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|ld-linux.*|)$' || true)
[ -z "$extra" ] && pass "needs only glibc/libgcc: $libs" || fail "needs libraries beyond libc6: $extra"
grep -qx 'ExecStart=/usr/bin/iotcred run' "$W/root/usr/lib/systemd/system/iotcred.service" \
  && pass "iotcred.service runs /usr/bin/iotcred" || fail "iotcred.service ExecStart does not point at /usr/bin/iotcred"

if [ -n "$INSTALL" ]; then
  echo "== install test"
  if [ "$(id -u)" != 0 ]; then
    fail "--install needs root"
  elif [ "$ARCH" != "$(dpkg --print-architecture)" ]; then
    echo "skip: --install of a $ARCH package on a $(dpkg --print-architecture) host"
  elif dpkg -s iotcred >/dev/null 2>&1; then
    fail "iotcred is already installed here; not touching it"
  else
    had_user=""; getent passwd iotcred >/dev/null && had_user=1
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$DEB" >"$W/apt.log" 2>&1; then
      pass "apt-get install $(basename "$DEB")"
      getent passwd iotcred >/dev/null && pass "user iotcred exists ($(getent passwd iotcred))" || fail "user iotcred missing after install"
      [ "$(stat -c '%a %U %G' /run/iotcred 2>/dev/null)" = "750 iotcred iotcred" ] \
        && pass "/run/iotcred 0750 iotcred:iotcred" || fail "/run/iotcred: $(stat -c '%a %U %G' /run/iotcred 2>&1)"
      v=$(/usr/bin/iotcred --version 2>&1) && pass "/usr/bin/iotcred --version: $v" || fail "/usr/bin/iotcred does not run: $v"
      out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no /usr/lib/systemd/system/iotcred.service /usr/lib/systemd/system/iotcred.socket /usr/lib/systemd/system/iotcred-tcp.socket 2>&1)
      [ -z "$out" ] && pass "installed units verify" || { fail "installed units verify"; echo "$out" | sed 's/^/    /'; }
      [ ! -e /etc/iotcred/config.toml ] && pass "no /etc/iotcred/config.toml installed" || fail "/etc/iotcred/config.toml exists"
    else
      fail "apt-get install"; sed 's/^/    /' "$W/apt.log" | tail -20
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq iotcred >"$W/purge.log" 2>&1 && [ ! -e /usr/bin/iotcred ]; then
      pass "apt-get purge iotcred"
    else
      fail "apt-get purge"; tail -20 "$W/purge.log" | sed 's/^/    /'
    fi
    # The package keeps its system user on purge (Debian policy); this test created it, so drop it.
    if [ -z "$had_user" ] && getent passwd iotcred >/dev/null; then userdel iotcred 2>/dev/null; groupdel iotcred 2>/dev/null || true; fi
  fi
fi

if [ "$fails" -eq 0 ]; then echo "check-deb: PASS ($(basename "$DEB"))"; else echo "check-deb: FAIL ($fails check(s))"; exit 1; fi
