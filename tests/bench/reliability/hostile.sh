#!/usr/bin/env bash
# Hostile local clients at full scale against the real `iotcred run` (loopback and the Unix
# socket only): 5,000 idle connections, 200 slowloris connections (a header byte a second),
# 100,000 wrong-token requests, 1,000 oversized heads, a 20,000-request pipelined flood and
# `iotcred get` as `nobody` (when run as root), while a legitimate client asks 2,000 times.
# Prints the legitimate client's p50/p99/max latency, the agent's peak RSS (VmHWM) and peak
# descriptor count. The same test runs with small counts in the suite (asserting correctness
# only); here it runs with IOTCRED_HOSTILE_FULL=1 and release binaries.
#
# Usage: tests/bench/reliability/hostile.sh [--debug]
set -euo pipefail
cd "$(dirname "$0")/../../.."
profile=(--release)
[ "${1:-}" = "--debug" ] && profile=()
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "ulimit -n: $(ulimit -n)"
IOTCRED_HOSTILE_FULL=1 cargo test "${profile[@]}" -p iotcred-tests --test reliability_hostile -- \
    --nocapture 2>&1 | grep -E '^hostile:|test result|panicked|FAILED'
