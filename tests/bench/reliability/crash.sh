#!/usr/bin/env bash
# Crash consistency at scale: SIGKILLs the real `iotcred run` at random moments of its
# fetch-and-write start-up KILLS times (default 1000), checking after every kill that each
# file sink is complete, parseable and of its configured mode, and that a restart serves again
# (tests/tests/reliability_crash.rs; the suite runs 50). Prints the kill count, the seed (replay
# with IOTCRED_CRASH_SEED=…) and how many kills landed between two sinks' renames.
#
# Usage: tests/bench/reliability/crash.sh [KILLS] [--debug]
set -euo pipefail
cd "$(dirname "$0")/../../.."
kills="${1:-1000}"
profile=(--release)
[ "${2:-}" = "--debug" ] && profile=()
IOTCRED_CRASH_KILLS="$kills" cargo test "${profile[@]}" -p iotcred-tests --test reliability_crash -- \
    --nocapture 2>&1 | grep -E '^crash:|test result|panicked|FAILED'
