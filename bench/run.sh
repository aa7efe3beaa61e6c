#!/usr/bin/env bash
# The benchmark suite: every figure side by side from one run on this machine, on loopback, against the
# built-in emulator. Usage: bench/run.sh [--quick]   (--quick: shorter runs, under 5 minutes)
# Installs what it needs: wrk and nginx (Debian), oha (crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
[ "${1:-}" = "--quick" ] && quick=true

duration=20; rounds=3; rate=2000; waiters=10000; facade_requests=200; fanin=1000
if $quick; then duration=4; rounds=3; waiters=3000; facade_requests=60; fanin=300; fi

need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
fi
command -v oha >/dev/null || cargo install oha --locked --quiet
command -v python3 >/dev/null

echo "== machine: $(nproc) cores, $(uname -srm); $(date -u +%Y-%m-%dT%H:%MZ)"
built_at=$SECONDS
cargo build --release --quiet --bins --examples
build_s=$((SECONDS - built_at))
echo "(build: ${build_s}s)"
bin=./target/release/rutter-sidecar

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
ticks() { local t=0; for pid in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$pid/stat"))); done; echo "$t"; }

# --- 1. passthrough: the same GET direct, through nginx, through the sidecar -------------------------
emu_port=$(free_port); nginx_port=$(free_port); side_port=$(free_port)
"$bin" emulate --listen "127.0.0.1:$emu_port" --seed-entities 20 --seed 1 >"$work/emulator.log" 2>&1 &
emu_pid=$!; pids+=($emu_pid)
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<NGINX
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  upstream rutter { server 127.0.0.1:$emu_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://rutter;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$emu_port;
      proxy_buffering on;
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -g "user root;" &
RUTTER_SIDECAR__LISTEN__PROXY="127.0.0.1:$side_port" \
RUTTER_SIDECAR__LISTEN__WEBHOOKS="127.0.0.1:$(free_port)" \
RUTTER_SIDECAR__LISTEN__ADMIN="127.0.0.1:$(free_port)" \
RUTTER_SIDECAR__UPSTREAM__BASE_URL="http://127.0.0.1:$emu_port" \
RUTTER_SIDECAR__UPSTREAM__RATE_LIMIT='{ requests = 1000000, per = "1s" }' \
RUTTER_SIDECAR__LOG__LEVEL=warn \
  "$bin" run --config /dev/null >"$work/sidecar.log" 2>&1 &
side_pid=$!; pids+=($side_pid)
wait_port "$emu_port"; wait_port "$nginx_port"; wait_port "$side_port"
sleep 0.5
nginx_pids=$(pgrep -f "nginx: worker process" | tr '\n' ' ')
path="/versioned/accounting/accounts?access_token=00000000-0000-4000-8000-000000000001"

echo
echo "== passthrough: GET $path (a ~4 KB JSON list), ${duration}s per run, $rounds rounds (direct, nginx, sidecar interleaved); medians"
echo
results="$work/passthrough.tsv"
: >"$results"
for round in $(seq 1 "$rounds"); do
  for target in direct nginx sidecar; do
    case $target in
      direct) port=$emu_port; proc="";;
      nginx) port=$nginx_port; proc=$nginx_pids;;
      sidecar) port=$side_port; proc=$side_pid;;
    esac
    url="http://127.0.0.1:$port$path"
    before=0; [ -n "$proc" ] && before=$(ticks $proc)
    emu_before=$(ticks $emu_pid)
    out=$(wrk -t2 -c64 -d"${duration}s" "$url")
    after=0; [ -n "$proc" ] && after=$(ticks $proc)
    emu_after=$(ticks $emu_pid)
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    cpu=nan; emu_cpu=nan
    if [ "${total:-0}" -gt 0 ]; then
      [ -n "$proc" ] && cpu=$(python3 -c "print(($after-$before)/100/$total*10000)")
      emu_cpu=$(python3 -c "print(($emu_after-$emu_before)/100/$total*10000)")
    fi
    if echo "$out" | grep -q "Non-2xx"; then echo "$target answered errors: $out" >&2; exit 1; fi
    json=$(oha -z "${duration}s" -q "$rate" -c 32 --latency-correction --no-tui --output-format json "$url" 2>/dev/null || oha -z "${duration}s" -q "$rate" -c 32 --latency-correction --no-tui -j "$url")
    lat=$(echo "$json" | python3 -c '
import json,sys
d=json.load(sys.stdin); p=d["latencyPercentiles"]
print(" ".join(f"{p[k]*1000:.3f}" for k in ("p50","p99","p99.9")))')
    echo "$target $round $rps $cpu $emu_cpu $lat" >>"$results"
    echo "   round $round $target: $rps req/s, latency p50/p99/p99.9 $lat ms" >&2
  done
done
python3 - "$results" "$rate" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
rate = sys.argv[2]
by = {}
for t, r, rps, cpu, emu, p50, p99, p999 in rows:
    by.setdefault(t, []).append((int(r), float(rps), float(cpu), float(p50), float(p99), float(p999), float(emu)))
med = {t: [st.median(x[i] for x in v) for i in range(1, 7)] for t, v in by.items()}
print(f"| target | wrk peak req/s (64 conns) | vs direct | CPU s per 10k req: proxy | emulator | oha @{rate}/s p50 (ms) | p99 (ms) | p99.9 (ms) |")
print("|---|---|---|---|---|---|---|---|")
for t in ("direct", "nginx", "sidecar"):
    rps, cpu, p50, p99, p999, emu = med[t]
    cpu_s = "–" if cpu != cpu else f"{cpu:.2f}"
    print(f"| {t} | {rps:.0f} | {rps/med['direct'][0]:.2f}x | {cpu_s} | {emu:.2f} | {p50:.3f} | {p99:.3f} | {p999:.3f} |")
print()
per_round = {}
for t, v in by.items():
    for r, rps, *_ in v:
        per_round.setdefault(r, {})[t] = rps
vs_nginx = [x["sidecar"] / x["nginx"] for x in per_round.values()]
vs_direct = [x["sidecar"] / x["direct"] for x in per_round.values()]
s, n, d = med["sidecar"], med["nginx"], med["direct"]
print(f"sidecar/nginx throughput: {s[0]/n[0]:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in vs_nginx)})")
print(f"sidecar/direct throughput: {s[0]/d[0]:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in vs_direct)})")
print(f"CPU per request: sidecar/nginx {s[1]/n[1]:.2f}x")
added = lambda x: "/".join(f"{x[i]-d[i]:.3f}" for i in (2, 3, 4))
print(f"added latency p50/p99/p99.9 (median percentile minus direct's, ms): sidecar {added(s)}, nginx {added(n)}")
PY

for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
pids=(); sleep 0.5

# --- 2. facade and 4. idempotency ---------------------------------------------------------------------
echo "(passthrough: ${SECONDS}s so far)"
echo
echo "== facade and idempotency"
./target/release/examples/bench_facade "$facade_requests"

# --- 3. waiters and 5. idle ---------------------------------------------------------------------------
echo "(${SECONDS}s so far)"
echo
echo "== idle and waiting requests"
./target/release/examples/bench_waiters "$waiters" "$bin" $($quick && echo quick)

# --- webhook fan-in ---------------------------------------------------------------------------------
echo "(${SECONDS}s so far)"
echo
echo "== webhook fan-in"
./target/release/examples/bench_webhooks "$fanin" 2000
echo
echo "(the whole run: ${SECONDS}s, of which building ${build_s}s)"
