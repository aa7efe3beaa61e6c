#!/usr/bin/env bash
# The benchmark suite: every figure side by side from one run on this machine, on loopback, against the
# built-in emulator. Usage: bench/run.sh [--quick]   (--quick: shorter runs, under 5 minutes)
# Installs what it needs: wrk and nginx (Debian), oha (crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
[ "${1:-}" = "--quick" ] && quick=true

duration=20; rate=2000; waiters=10000; facade_requests=200; fanin=1000
if $quick; then duration=5; waiters=3000; facade_requests=60; fanin=300; fi

need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
fi
command -v oha >/dev/null || cargo install oha --locked --quiet
command -v python3 >/dev/null

echo "== machine: $(nproc) cores, $(uname -srm); $(date -u +%Y-%m-%dT%H:%MZ)"
cargo build --release --quiet --bins --examples
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
pids+=($!)
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
echo "== passthrough: GET $path (a ~2 KB JSON list), ${duration}s per run"
echo
echo "| target | wrk peak req/s (64 conns) | vs direct | CPU s per 10k req (proxy only) | oha @${rate}/s p50 (ms) | p99 (ms) | p99.9 (ms) |"
echo "|---|---|---|---|---|---|---|"
declare -A rps p50 p99 p999
for target in direct nginx sidecar; do
  case $target in
    direct) port=$emu_port; proc="";;
    nginx) port=$nginx_port; proc=$nginx_pids;;
    sidecar) port=$side_port; proc=$side_pid;;
  esac
  url="http://127.0.0.1:$port$path"
  before=0; [ -n "$proc" ] && before=$(ticks $proc)
  out=$(wrk -t2 -c64 -d"${duration}s" "$url")
  after=0; [ -n "$proc" ] && after=$(ticks $proc)
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  rps[$target]=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  cpu="–"
  if [ -n "$proc" ] && [ "${total:-0}" -gt 0 ]; then
    cpu=$(python3 -c "print(f'{($after-$before)/100/$total*10000:.2f}')")
  fi
  json=$(oha -z "${duration}s" -q "$rate" -c 32 --latency-correction --no-tui --output-format json "$url" 2>/dev/null || oha -z "${duration}s" -q "$rate" -c 32 --latency-correction --no-tui -j "$url")
  read -r p50[$target] p99[$target] p999[$target] < <(echo "$json" | python3 -c '
import json,sys
d=json.load(sys.stdin); p=d["latencyPercentiles"]
print(" ".join(f"{p[k]*1000:.3f}" for k in ("p50","p99","p99.9")))')
  ratio=$(python3 -c "print(f'{${rps[$target]}/${rps[direct]}:.2f}')")
  echo "| $target | ${rps[$target]} | ${ratio}x | $cpu | ${p50[$target]} | ${p99[$target]} | ${p999[$target]} |"
done
echo
python3 - "${rps[sidecar]}" "${rps[nginx]}" "${rps[direct]}" "${p99[sidecar]}" "${p99[nginx]}" "${p99[direct]}" <<'PY'
import sys
s, n, d, sp, np_, dp = map(float, sys.argv[1:])
print(f"sidecar/nginx throughput: {s/n:.2f}x   sidecar/direct: {s/d:.2f}x")
print(f"added p99 latency: sidecar {sp-dp:.3f} ms, nginx {np_-dp:.3f} ms")
PY

for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
pids=(); sleep 0.5

# --- 2. facade and 4. idempotency ---------------------------------------------------------------------
echo
echo "== facade and idempotency"
./target/release/examples/bench_facade "$facade_requests"

# --- 3. waiters and 5. idle ---------------------------------------------------------------------------
echo
echo "== idle and waiting requests"
./target/release/examples/bench_waiters "$waiters" "$bin"

# --- webhook fan-in ---------------------------------------------------------------------------------
echo
echo "== webhook fan-in"
./target/release/examples/bench_webhooks "$fanin" 2000
