#!/usr/bin/env bash
# a3s-gateway benchmark: throughput and latency of a small keep-alive GET on loopback, measured in
# one run with wrk for the gateway and its peers side by side, so that ratios taken in the same run
# can be quoted (absolute figures drift from run to run on shared machines; see bench/README.md).
#
# usage: bench/run.sh [seconds=8] [connections=50]
#   PY=python        interpreter with Twisted and a3s-gateway's dependencies (default: python3);
#                    the gateway, the stock proxy and the hello-world all run on it
#   WARMUP=seconds   unmeasured wrk run before each row (default 1; 0 to skip)
#   ROUNDS=n         runs per row, the rows taking turns; each row's figures are the medians of
#                    its runs, together lasting about the given seconds (default 3), and a ratio
#                    of two rows the median of the rounds' ratios
#   BENCH_RESULTS=file  also append machine-readable "RESULT measure|row|value|unit" lines there
#                    (bench/suite.sh reads them), measure named by BENCH_MEASURE (default
#                    throughput) and rows suffixed with " (BENCH_LABEL)" when that is set
# needs: wrk. Optional: nginx (backend and nginx-proxy rows), haproxy (HAProxy row).
# Ports used: 127.0.0.1:9300-9309 (BENCH_PORT_BASE=n: n to n+9).
set -u
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root" || exit 1
secs=${1:-8}
conns=${2:-50}
PY=${PY:-python3}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}

# BENCH_PORT_BASE moves every port (default 9300; the .hcl files are rewritten to match).
base=${BENCH_PORT_BASE:-9300}
GATEWAY_PORT=$base                 # bench/bench.hcl says 9300
BACKEND_PORT=$((base + 1))         # every .hcl's server says 9301
STOCK_PORT=$((base + 2))
HELLO_PORT=$((base + 3))
NGINX_PROXY_PORT=$((base + 4))
HAPROXY_PORT=$((base + 5))
CHAIN_PORT=$((base + 6))           # bench/bench-middleware.hcl says 9306
OBSERVED_PORT=$((base + 7))        # bench/bench-observability.hcl says 9307
ADMIN_PORT=$((base + 8))           # and 9308 for its admin entrypoint
TWISTD_PORT=$((base + 9))          # the gateway under twistd (bench.hcl's entrypoint moved)

die() { echo "bench/run.sh: $*" >&2; exit 1; }

command -v wrk >/dev/null 2>&1 || die "needs wrk (Debian/Ubuntu: apt-get install wrk)"
"$PY" -c 'import twisted' 2>/dev/null || die "'$PY' cannot import twisted; set PY=/path/to/python"
# shellcheck source=bench/pypy-nursery.sh
. "$here/pypy-nursery.sh"
have_nginx=0; command -v nginx >/dev/null 2>&1 && have_nginx=1
have_haproxy=0; command -v haproxy >/dev/null 2>&1 && have_haproxy=1

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/a3s-bench.XXXXXX") || die "cannot create a temporary directory"
pids=()

cleanup() {
  trap - EXIT
  local p alive _
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null; done
  # Give each process up to 5 s to exit on SIGTERM, then kill what is left.
  for _ in $(seq 50); do
    alive=0
    for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in ${pids[@]+"${pids[@]}"}; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for hcl in bench.hcl bench-middleware.hcl bench-observability.hcl; do # ports moved by BENCH_PORT_BASE
  sed -e "s/127\.0\.0\.1:9300\b/127.0.0.1:$GATEWAY_PORT/; s/127\.0\.0\.1:9301\b/127.0.0.1:$BACKEND_PORT/" \
    -e "s/127\.0\.0\.1:9306\b/127.0.0.1:$CHAIN_PORT/; s/127\.0\.0\.1:9307\b/127.0.0.1:$OBSERVED_PORT/" \
    -e "s/127\.0\.0\.1:9308\b/127.0.0.1:$ADMIN_PORT/" "bench/$hcl" >"$run_dir/$hcl"
done

accepts() { # port: true when something accepts a TCP connection on 127.0.0.1:port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

for port in $GATEWAY_PORT $BACKEND_PORT $STOCK_PORT $HELLO_PORT $NGINX_PROXY_PORT $HAPROXY_PORT \
  $CHAIN_PORT $OBSERVED_PORT $ADMIN_PORT $TWISTD_PORT; do
  accepts "$port" && die "127.0.0.1:$port is already in use; stop whatever listens there first"
done

# start NAME PORT COMMAND...: run COMMAND in the background (output in the run directory) and wait
# until PORT accepts connections; on failure, say so with the end of its output and return 1.
start() {
  local name=$1 port=$2 pid _
  shift 2
  "$@" >"$run_dir/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do
    accepts "$port" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "warning: $name did not start listening on 127.0.0.1:$port; its output ends with:" >&2
  tail -n 8 "$run_dir/$name.log" | sed 's/^/    /' >&2
  return 1
}

nginx_conf() { # NAME SERVER-BLOCK-BODY [HTTP-EXTRA]: an nginx.conf confined to the run directory
  cat >"$run_dir/$1.conf" <<EOF
worker_processes 1;
pid $run_dir/$1.pid;
error_log $run_dir/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $run_dir/$1-body;
  proxy_temp_path $run_dir/$1-proxy;
  fastcgi_temp_path $run_dir/$1-fastcgi;
  uwsgi_temp_path $run_dir/$1-uwsgi;
  scgi_temp_path $run_dir/$1-scgi;
  ${3:-}
  server {
    $2
  }
}
EOF
  echo "$run_dir/$1.conf"
}

version_of() { # python expression -> its value on $PY, or "not importable"
  "$PY" -c "import sys; $1" 2>/dev/null || echo "not importable"
}

round_secs=$(( (secs + ROUNDS - 1) / ROUNDS )) # each row's runs last about $secs together
echo "a3s-gateway benchmark: wrk -t1 -c$conns --latency, keep-alive GET /, 127.0.0.1;" \
  "$ROUNDS runs of $round_secs s per row, rows taking turns, medians"
echo "PY:          $(command -v "$PY") ($(version_of 'import platform; print(platform.python_implementation(), platform.python_version())'))"
echo "twisted:     $(version_of 'import twisted; print(twisted.__version__)')"
echo "a3s-gateway: $(version_of 'import a3s_gateway; print(a3s_gateway.__version__)')"
echo "wrk:         $(wrk -v 2>&1 | head -n 1 | awk '{print $2}')"
if [ "$have_nginx" = 1 ]; then
  echo "nginx:       $(nginx -v 2>&1 | sed 's/.*nginx\///')"
else
  echo "nginx:       not installed (backend is bench/hello.py; no nginx-proxy row)"
fi
if [ "$have_haproxy" = 1 ]; then
  echo "haproxy:     $(haproxy -v 2>&1 | head -n 1 | awk '{print $3}')"
else
  echo "haproxy:     not installed (no HAProxy row)"
fi
echo "PyPy nursery: ${PYPY_GC_NURSERY:-PyPy default} (PYPY_GC_NURSERY; CPython ignores it)"
echo "machine:     $(uname -sr), $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?') CPUs"
echo

# --- start everything -----------------------------------------------------------------------
backend_ok=0 nginx_proxy_ok=0 haproxy_ok=0 stock_ok=0 gateway_ok=0 hello_ok=0 chain_ok=0
twistd_ok=0 observed_ok=0
if [ "$have_nginx" = 1 ]; then
  backend_label="backend direct (nginx)"
  conf=$(nginx_conf backend "listen 127.0.0.1:$BACKEND_PORT;
    location / { default_type text/plain; return 200 \"hello from backend\\n\"; }")
  start backend $BACKEND_PORT nginx -c "$conf" -g 'daemon off;' && backend_ok=1
  conf=$(nginx_conf nginx-proxy "listen 127.0.0.1:$NGINX_PROXY_PORT;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }" \
    "upstream be { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }")
  start nginx-proxy $NGINX_PROXY_PORT nginx -c "$conf" -g 'daemon off;' && nginx_proxy_ok=1
else
  backend_label="backend direct (twisted hello)"
  start backend $BACKEND_PORT "$PY" bench/hello.py $BACKEND_PORT && backend_ok=1
fi
if [ "$have_haproxy" = 1 ]; then
  cat >"$run_dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:$BACKEND_PORT
EOF
  start haproxy $HAPROXY_PORT haproxy -f "$run_dir/haproxy.cfg" -db && haproxy_ok=1
fi
start stock-proxy $STOCK_PORT "$PY" bench/stock_proxy.py $STOCK_PORT $BACKEND_PORT && stock_ok=1
start gateway $GATEWAY_PORT "$PY" -m a3s_gateway.cli --config "$run_dir/bench.hcl" && gateway_ok=1
# The same gateway as `twistd -n a3s-gateway` runs it: on Twisted's default reactor, not the
# gateway's own (the a3s-gateway command's; `twistd --reactor=a3s` picks it).
sed "s/127\.0\.0\.1:$GATEWAY_PORT\b/127.0.0.1:$TWISTD_PORT/" "$run_dir/bench.hcl" >"$run_dir/bench-twistd.hcl"
start twistd $TWISTD_PORT "$PY" -c 'from twisted.scripts.twistd import run; run()' \
  -n --pidfile= a3s-gateway --config "$run_dir/bench-twistd.hcl" && twistd_ok=1
start hello $HELLO_PORT "$PY" bench/hello.py $HELLO_PORT && hello_ok=1
start chain $CHAIN_PORT "$PY" -m a3s_gateway.cli --config "$run_dir/bench-middleware.hcl" && chain_ok=1
BENCH_ACCESS_LOG="$run_dir/access.log" start observed $OBSERVED_PORT \
  "$PY" -m a3s_gateway.cli --config "$run_dir/bench-observability.hcl" && observed_ok=1
[ "$backend_ok" = 1 ] || die "the backend did not start; nothing to measure"

# --- measure --------------------------------------------------------------------------------
# parse_wrk: wrk's output on stdin -> "req/s|p50 ms|p99 ms|notes". Latencies come in us, ms, s,
# m or h depending on their size; all are converted to milliseconds.
parse_wrk() {
  awk '
    function to_ms(v,    n, unit) {
      if (!match(v, /^[0-9.]+/)) return ""
      n = substr(v, 1, RLENGTH) + 0
      unit = substr(v, RLENGTH + 1)
      if (unit == "us") return n / 1000
      if (unit == "ms") return n
      if (unit == "s") return n * 1000
      if (unit == "m") return n * 60000
      if (unit == "h") return n * 3600000
      return ""
    }
    /^Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = to_ms($2) }
    $1 == "99%" { p99 = to_ms($2) }
    /Non-2xx or 3xx responses:/ { notes = notes "non-2xx: " $NF "; " }
    /Socket errors:/ { sub(/^.*Socket errors: */, ""); notes = notes "socket errors: " $0 "; " }
    END { printf "%s|%s|%s|%s\n", rps, p50, p99, notes }
  '
}

status_of() { # port [header] -> HTTP status of GET / (or the error), checked once before measuring
  "$PY" - "$1" "${2:-}" <<'EOF' 2>&1 | tail -n 1
import sys, urllib.error, urllib.request
headers = dict([sys.argv[2].split(": ", 1)]) if sys.argv[2] else {}
try:
    request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/", headers=headers)
    print(urllib.request.urlopen(request, timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print(type(e).__name__)
EOF
}

# Every row is measured in ROUNDS short runs, the rows taking turns (round 1 of every row, then
# round 2, ...), and reported as the median of its runs: on a shared machine throughput drifts by
# 10-30% within seconds, and rows compared with each other are then measured close together in time,
# several times over, rather than once each minutes apart.
declare -A rps_of=() runs_of=() p50s_of=() p99s_of=() notes_of=()
keys=() labels=() ports=() oks=() headers=()
row() { # key label port ok [header]
  keys+=("$1"); labels+=("$2"); ports+=("$3"); oks+=("$4"); headers+=("${5:-}")
}
row backend "$backend_label" $BACKEND_PORT $backend_ok
[ "$have_nginx" = 1 ] && row nginx-proxy "nginx proxy (upstream keepalive)" $NGINX_PROXY_PORT $nginx_proxy_ok
[ "$have_haproxy" = 1 ] && row haproxy "HAProxy (1 thread)" $HAPROXY_PORT $haproxy_ok
row stock "twisted stock ReverseProxyResource" $STOCK_PORT $stock_ok
# The rows of the two target ratios are measured one right after the other in every round (the
# hello-world, the gateway, the chain), so that the machine's drift between them is the least.
row hello "twisted.web hello-world" $HELLO_PORT $hello_ok
row gateway "a3s-gateway" $GATEWAY_PORT $gateway_ok
row chain "a3s-gateway + api-key,rate,headers" $CHAIN_PORT $chain_ok "X-API-Key: bench-key"
row observed "a3s-gateway + metrics,access log" $OBSERVED_PORT $observed_ok
row gateway-twistd "a3s-gateway, twistd default reactor" $TWISTD_PORT $twistd_ok

wrk_args() { # index -> wrk's header arguments for that row, one per line
  [ -n "${headers[$1]}" ] && printf '%s\n' -H "${headers[$1]}"
}

median() { # numbers... -> their median (the mean of the middle two for an even count)
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

for i in "${!keys[@]}"; do # each row answers 200 and is warmed up before any is measured
  [ "${oks[$i]}" = 1 ] || continue
  mapfile -t extra < <(wrk_args "$i")
  status=$(status_of "${ports[$i]}" "${headers[$i]}")
  [ "$status" = 200 ] || notes_of[${keys[$i]}]+="GET / answered $status; "
  if [ "$WARMUP" != 0 ]; then
    wrk -t1 -c"$conns" -d"${WARMUP}s" "${extra[@]}" "http://127.0.0.1:${ports[$i]}/" >/dev/null 2>&1
  fi
done
for _ in $(seq "$ROUNDS"); do
  for i in "${!keys[@]}"; do
    [ "${oks[$i]}" = 1 ] || continue
    key=${keys[$i]}
    mapfile -t extra < <(wrk_args "$i")
    out=$(wrk -t1 -c"$conns" -d"${round_secs}s" --latency "${extra[@]}" \
      "http://127.0.0.1:${ports[$i]}/" 2>&1)
    IFS='|' read -r rps p50 p99 notes <<<"$(printf '%s\n' "$out" | parse_wrk)"
    if [ -z "$rps" ]; then
      notes_of[$key]+="wrk failed: $(printf '%s\n' "$out" | tail -n 1); "
      continue
    fi
    runs_of[$key]+="$rps "
    [ -n "$p50" ] && p50s_of[$key]+="$p50 "
    [ -n "$p99" ] && p99s_of[$key]+="$p99 "
    notes_of[$key]+=$notes
  done
done

printf '%-34s %11s %10s %10s  %s\n' "row" "req/s" "p50 ms" "p99 ms" "notes"
printf '%-34s %11s %10s %10s  %s\n' "---" "-----" "------" "------" "-----"
for i in "${!keys[@]}"; do
  key=${keys[$i]} label=${labels[$i]}
  if [ "${oks[$i]}" != 1 ]; then
    printf '%-34s %11s %10s %10s  %s\n' "$label" "-" "-" "-" "did not start"
    continue
  fi
  # shellcheck disable=SC2086 # the runs are space-separated numbers
  rps=$(median ${runs_of[$key]:-}) p50=$(median ${p50s_of[$key]:-}) p99=$(median ${p99s_of[$key]:-})
  notes=${notes_of[$key]:-}
  [ -n "${runs_of[$key]:-}" ] && notes="runs: $(printf '%.0f ' ${runs_of[$key]} | sed 's/ $//'); $notes"
  if [ -n "$rps" ]; then
    rps_of[$key]=$rps
    if [ -n "${BENCH_RESULTS:-}" ]; then
      result_row=$key
      [ -n "${BENCH_LABEL:-}" ] && result_row="$key ($BENCH_LABEL)"
      printf 'RESULT %s_rps|%s|%s|req/s\nRESULT %s_p50|%s|%s|ms\nRESULT %s_p99|%s|%s|ms\n' \
        "${BENCH_MEASURE:-throughput}" "$result_row" "$rps" "${BENCH_MEASURE:-throughput}" \
        "$result_row" "$p50" "${BENCH_MEASURE:-throughput}" "$result_row" "$p99" >>"$BENCH_RESULTS"
      # Each round's req/s too, in round order, for ratios taken round by round (summary.py).
      [ "$(wc -w <<<"${runs_of[$key]}")" = "$ROUNDS" ] &&
        printf 'RESULT %s_runs|%s|%s|req/s\n' "${BENCH_MEASURE:-throughput}" "$result_row" \
          "${runs_of[$key]% }" >>"$BENCH_RESULTS"
    fi
  fi
  printf '%-34s %11s %10s %10s  %s\n' "$label" "$([ -n "$rps" ] && printf '%.2f' "$rps" || echo -)" \
    "$([ -n "$p50" ] && printf '%.2f' "$p50" || echo -)" \
    "$([ -n "$p99" ] && printf '%.2f' "$p99" || echo -)" "${notes%; }"
done

ratio() { # numerator-key denominator-key
  # The median of the rounds' ratios when both rows ran every round (each round measures the
  # two a few seconds apart), else the ratio of their medians.
  local a=${rps_of[$1]:-} b=${rps_of[$2]:-} ra=${runs_of[$1]:-} rb=${runs_of[$2]:-}
  if [ "$(wc -w <<<"$ra")" = "$ROUNDS" ] && [ "$(wc -w <<<"$rb")" = "$ROUNDS" ]; then
    local r
    # shellcheck disable=SC2046 # the ratios are space-separated numbers
    r=$(median $(awk -v a="$ra" -v b="$rb" 'BEGIN { n = split(a, x, " "); split(b, y, " ")
      for (i = 1; i <= n; i++) if (y[i] > 0) print x[i] / y[i] }'))
    if [ -n "$r" ]; then printf '%.3fx\n' "$r"; else echo "-"; fi
  elif [ -n "$a" ] && [ -n "$b" ]; then
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.3fx\n", a / b; else print "-" }'
  else
    echo "-"
  fi
}
echo
echo "gateway / stock proxy: $(ratio gateway stock)"
echo "gateway / hello-world: $(ratio gateway hello)"
echo "gateway under twistd (default reactor) / hello-world: $(ratio gateway-twistd hello)"
echo "middleware chain / gateway: $(ratio chain gateway)"
echo "observability on / gateway: $(ratio observed gateway)"
