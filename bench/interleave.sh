#!/usr/bin/env bash
# Interleaved before/after runs of `scripts/bench --quick --no-litellm` (docs/benchmarks.md,
# "Hardening I and II: before and after"): on a shared machine wall-clock throughput is
# noise, so each round runs every worktree once, back to back, and the figure compared is
# the proxy's own CPU per request / per token (from /proc), with the load average noted.
#
#   bench/interleave.sh ROUNDS OUT_DIR WORKTREE...     e.g.
#   bench/interleave.sh 3 /tmp/cmp /work/wt/before /work/wt/perf
#
# Each run's JSON goes to OUT_DIR/<worktree name>/; bench/summarize.py OUT_DIR prints the table.
# scripts/bench arguments: BENCH_FLAGS (default "--quick --no-litellm", plus --no-paced where
# the worktree's bench knows it: the paced points have no "before" to compare with). Paced,
# one event per read: BENCH_FLAGS="paced --streams 100 --search-top 0 --duration 8".
set -euo pipefail
rounds=$1 out=$2
shift 2
base_flags=${BENCH_FLAGS:---quick --no-litellm}
for ((r = 1; r <= rounds; r++)); do
    for wt in "$@"; do
        name=$(basename "$wt")
        mkdir -p "$out/$name"
        flags=$base_flags
        if [ -z "${BENCH_FLAGS:-}" ] && grep -q -- '--no-paced' "$wt/bench/bench.py"; then
            flags="$flags --no-paced"
        fi
        echo "[interleave] round $r $name load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        # shellcheck disable=SC2086
        (cd "$wt" && scripts/bench $flags --out-dir "$out/$name") >"$out/$name/round$r.log" 2>&1 ||
            echo "[interleave] $name round $r failed: see $out/$name/round$r.log" >&2
    done
done
