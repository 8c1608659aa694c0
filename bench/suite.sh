#!/usr/bin/env bash
# a3s-gateway benchmark suite: every figure the issue sets a target for, in one command, then one
# table (bench/summary.py) with each row's value, its baseline from the same run, the ratio or
# difference, the target and PASS/MISS for the gateway's rows.
#
#   throughput   bench/run.sh (wrk -c50, five rounds): gateway / hello-world, chain / gateway
#   latency      bench/run.sh with one connection (wrk -t1 -c1): gateway p50 - direct p50
#   streaming    bench/sse.py: 1,000 concurrent SSE streams (lost, per-event delay vs direct),
#                64 streams (time to first event vs nginx with proxy_buffering off)
#   slow client  bench/slow_client.py: RSS growth while a client reads 200 MB at 1 MB/s
#   idle         bench/idle.py: 10,000 idle keep-alive connections, KiB per connection
#
# usage: bench/suite.sh [--quick]
#   --quick      brief run for CI: 3 s throughput, 2 s latency, 200 SSE streams, 10 s slow
#                client, 2,000 idle connections (about 3 minutes on 2 cores)
#   PY=python    CPython (or any interpreter) with a3s-gateway's dependencies (default python3)
#   PYPY=pypy    when set, every measure is repeated with the Python rows on it ("(PyPy)" rows)
#   BENCH_RESULTS=file   keep the raw RESULT lines there (default: a temporary file)
# needs: wrk. Optional: nginx, haproxy (their rows are left out when missing).
# Ports used: 127.0.0.1:9310-9349 (run.sh on 9340-9349, clear of a hand-run run.sh on 9300).
set -u
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
quick=0
[ "${1:-}" = "--quick" ] && quick=1

# shellcheck source=bench/pypy-nursery.sh
. "$here/pypy-nursery.sh"
# Thousands of connections: raise the fd limit as far as allowed; every row inherits it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null

# Throughput rows are measured in rounds, the rows taking turns (run.sh); a ratio is the median
# of its rounds' ratios, so the full run takes five (3 s each): with three, one slow patch of
# the shared machine in one round moved a target's verdict.
if [ "$quick" = 1 ]; then
  tput_secs=3 tput_rounds=3 lat_secs=2 sse_streams=200 sse_pinned=0 slow_secs=10 idle_conns=2000
else
  tput_secs=15 tput_rounds=5 lat_secs=5 sse_streams=1000 sse_pinned=5 slow_secs=30 idle_conns=10000
fi

own_results=0
if [ -z "${BENCH_RESULTS:-}" ]; then
  BENCH_RESULTS=$(mktemp "${TMPDIR:-/tmp}/a3s-bench-results.XXXXXX") || exit 1
  own_results=1
fi
export BENCH_RESULTS
: >"$BENCH_RESULTS"
child=""
cleanup() {
  trap - EXIT
  # Each script stops its own processes on SIGTERM; only the one running now needs telling.
  [ -n "$child" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null
  [ "$own_results" = 1 ] && rm -f "$BENCH_RESULTS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { # title command...: run one script in the background (so a signal can reach it)
  local title=$1
  shift
  echo
  echo "=== $title"
  "$@" &
  child=$!
  wait "$child"
  child=""
}

started=$(date +%s)
run_all() { # interpreter label(or empty)
  local py=$1 label=$2 rows_py warmup=1 sse_warmup=0
  # A second pass re-measures only the Python rows (and nginx for the first-event comparison).
  if [ -n "$label" ]; then rows_py="gateway,stock,hello"; else rows_py="gateway,stock,hello,nginx,haproxy"; fi
  # PyPy's JIT is still compiling after 1 s of load (its rows kept rising for several seconds).
  # The same for the SSE probes: the first thousands of streams still run partly interpreted.
  [ "$label" = PyPy ] && warmup=5 sse_warmup=2
  step "throughput ($label${label:+, }$tput_secs s, 50 connections)" \
    env PY="$py" BENCH_LABEL="$label" BENCH_MEASURE=throughput BENCH_PORT_BASE=9340 \
    WARMUP="$warmup" ROUNDS="$tput_rounds" "$here/run.sh" "$tput_secs" 50
  step "latency, one connection at a time ($label${label:+, }$lat_secs s)" \
    env PY="$py" BENCH_LABEL="$label" BENCH_MEASURE=latency BENCH_PORT_BASE=9340 \
    WARMUP="$warmup" "$here/run.sh" "$lat_secs" 1
  step "streaming (SSE)" env BENCH_LABEL="$label" "$PY" "$here/sse.py" --python "$py" \
    --streams "$sse_streams" --warmup-runs "$sse_warmup" --pinned-runs "$sse_pinned" \
    --rows "$rows_py,nginx"
  step "slow client" env BENCH_LABEL="$label" "$PY" "$here/slow_client.py" --python "$py" \
    --seconds "$slow_secs"
  step "idle connections" env BENCH_LABEL="$label" "$PY" "$here/idle.py" --python "$py" \
    --connections "$idle_conns" --rows "$rows_py"
}
run_all "$PY" ""
if [ -n "${PYPY:-}" ]; then
  if "$PYPY" -c 'import twisted, treq, hcl2, attr' 2>/dev/null; then
    run_all "$PYPY" "PyPy"
  else
    echo "warning: PYPY=$PYPY cannot import the gateway's dependencies; no PyPy rows" >&2
  fi
fi

echo
echo "=== summary ($(if [ "$quick" = 1 ]; then echo quick; else echo full; fi) run, $(( $(date +%s) - started )) s)"
"$PY" "$here/summary.py" "$BENCH_RESULTS" ${SUMMARY_ARGS:-}
