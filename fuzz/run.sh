#!/usr/bin/env bash
# Runs every fuzz target (`cargo fuzz list`) for SECONDS (default 10) from its seed corpus, then prints executions and
# crashes per target. Exits non-zero when any target crashed (reproducers land in
# fuzz/artifacts/<target>/).
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -uo pipefail

seconds="${1:-10}"
case "$seconds" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! cargo +nightly fuzz build >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    echo "fuzz build failed" >&2
    exit 1
fi

# Every target declared in Cargo.toml (`cargo fuzz list`), so a new target is never skipped.
mapfile -t targets < <(cargo +nightly fuzz list 2>/dev/null)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "no fuzz targets found (cargo fuzz list)" >&2
    exit 1
fi

failed=0
printf '%-18s %12s %8s\n' target executions crashes
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "artifacts/$t"
    log="$work/$t.log"
    # The scratch corpus comes first so new inputs go there, not into the committed seeds.
    cargo +nightly fuzz run "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n1)"
    if [ -z "$execs" ]; then
        execs="$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -n1)"
    fi
    crashes=0
    if [ "$rc" -ne 0 ] || grep -qE '^==[0-9]+==|deadly signal|panicked at' "$log"; then
        crashes=1
        failed=1
        grep -E 'panicked at|SUMMARY|Test unit written to' "$log" | head -n 5 >&2
    fi
    printf '%-18s %12s %8s\n' "$t" "${execs:-?}" "$crashes"
done
exit "$failed"
