#!/usr/bin/env bash
# Soak test (issue 8): does the sidecar's memory plateau under hours-like traffic?
#
# Usage: bench/soak.sh [SECONDS] [RATE]      (defaults: 600 s at 25 requests/s)
#
# Builds release, starts the built-in emulator and the sidecar as two processes on free loopback ports,
# and drives mixed app traffic through the sidecar with examples/soak_client.rs (open loop, fixed rate,
# unique Idempotency-Keys): facade writes with short jobs (50-800 ms), some failing, duplicates, keyless
# writes, PATCHes, passthrough list GETs and explicit async writes. The emulator sends signed
# JOB_COMPLETED webhooks to the sidecar (20 % dropped so polling finishes those jobs, 5 % with a bad
# signature; a tenth of the plain writes ask for a duplicate delivery).
#
# The sidecar runs with realistic but scaled-down bounds so that they are reached within the first
# minutes: idempotency.max_bytes = 2MiB (the cache fills after ~3 minutes at 25/s; in production the
# default 256MiB would take hours), jobs.max_tracked = 2000, jobs.keep_completed = 1m,
# jobs.track_for = 10m; everything else is the default (rate budget 500 per 10 s, max_wait 5 m).
#
# Every second the sidecar's RSS (VmRSS) and its jobs_tracked / waiters gauges are written to a CSV
# (path printed at the end, kept in target/soak/). At the end it prints min / max / first-minute and
# last-minute mean RSS and whether RSS plateaued: the last-minute mean is within 10 % of the mean of
# every sample after the warm-up (the first 2 minutes, or the first fifth of a shorter run).
# Exit status: 0 when it plateaued and every request got the answer its kind expects, 1 otherwise.
# Loopback only. Needs python3 (for free ports and the summary).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
rate=${2:-25}
command -v python3 >/dev/null || { echo "soak.sh needs python3" >&2; exit 2; }

echo "== building (release)"
cargo build --release --quiet --bin rutter-sidecar --example soak_client
bin=./target/release/rutter-sidecar
client=./target/release/examples/soak_client

out=target/soak
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
csv="$out/rss-$stamp.csv"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

secret="soak-secret-$RANDOM$RANDOM"
emu_port=$(free_port); proxy_port=$(free_port); hook_port=$(free_port); admin_port=$(free_port)

RUTTER_CLIENT_SECRET="$secret" "$bin" emulate --listen "127.0.0.1:$emu_port" --seed 1 \
  --webhook-url "http://127.0.0.1:$hook_port/webhooks/rutter" \
  --webhook-drop-rate 0.2 --webhook-bad-signature-rate 0.05 --webhook-duplicates 0 \
  >"$work/emulator.log" 2>&1 &
pids+=($!)

RUTTER_CLIENT_SECRET="$secret" \
RUTTER_SIDECAR__LISTEN__PROXY="127.0.0.1:$proxy_port" \
RUTTER_SIDECAR__LISTEN__WEBHOOKS="127.0.0.1:$hook_port" \
RUTTER_SIDECAR__LISTEN__ADMIN="127.0.0.1:$admin_port" \
RUTTER_SIDECAR__UPSTREAM__BASE_URL="http://127.0.0.1:$emu_port" \
RUTTER_SIDECAR__IDEMPOTENCY__MAX_BYTES=2MiB \
RUTTER_SIDECAR__JOBS__MAX_TRACKED=2000 \
RUTTER_SIDECAR__JOBS__KEEP_COMPLETED=1m \
RUTTER_SIDECAR__JOBS__TRACK_FOR=10m \
RUTTER_SIDECAR__LOG__LEVEL=warn \
  "$bin" run --config /dev/null >"$work/sidecar.log" 2>&1 &
side_pid=$!
pids+=($side_pid)
wait_port "$emu_port"; wait_port "$proxy_port"; wait_port "$hook_port"; wait_port "$admin_port"

echo "== soak: ${seconds}s at ${rate}/s; sidecar pid $side_pid on 127.0.0.1:$proxy_port, emulator on 127.0.0.1:$emu_port"

# The sampler: one line per second until the client is done (stopped with a marker file).
python3 - "$side_pid" "$admin_port" "$csv" "$work/stop" <<'PY' &
import os, sys, time, urllib.request
pid, port, path, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
def gauges():
    found = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except Exception:
        return "", ""
    for line in text.splitlines():
        for name in ("rutter_sidecar_jobs_tracked", "rutter_sidecar_waiters"):
            if line.startswith(name + " "):
                found[name] = line.split()[1]
    return found.get("rutter_sidecar_jobs_tracked", ""), found.get("rutter_sidecar_waiters", "")
start = time.monotonic()
with open(path, "w") as out:
    out.write("elapsed_s,rss_kib,jobs_tracked,waiters\n")
    tick = 0
    while not os.path.exists(stop):
        try:
            rss = rss_kib()
        except FileNotFoundError:
            break
        jobs, waiters = gauges()
        out.write(f"{time.monotonic() - start:.1f},{rss},{jobs},{waiters}\n")
        out.flush()
        tick += 1
        time.sleep(max(0.0, start + tick - time.monotonic()))
PY
sampler=$!
pids+=($sampler)

set +e
"$client" "127.0.0.1:$proxy_port" "$seconds" "$rate"
client_status=$?
set -e
touch "$work/stop"
wait "$sampler" 2>/dev/null || true

if ! kill -0 "$side_pid" 2>/dev/null; then
  echo "the sidecar died during the soak; its log:" >&2
  tail -50 "$work/sidecar.log" >&2
  exit 1
fi
echo
echo "== sidecar warnings/errors logged: $(grep -c -E 'WARN|ERROR' "$work/sidecar.log" || true)"
grep -E 'WARN|ERROR' "$work/sidecar.log" | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -5 || true
echo
echo "== RSS of the sidecar (CSV: $csv)"
set +e
python3 - "$csv" "$seconds" <<'PY'
import csv, sys
path, seconds = sys.argv[1], float(sys.argv[2])
rows = [(float(r["elapsed_s"]), int(r["rss_kib"]), r["jobs_tracked"]) for r in csv.DictReader(open(path))]
if len(rows) < 120:
    print(f"only {len(rows)} samples: too short to judge (run at least 300 s)")
    sys.exit(1)
mib = lambda k: k / 1024
t_end = rows[-1][0]
warm = min(120.0, seconds / 5)
first = [r for t, r, _ in rows if t < 60]
last = [r for t, r, _ in rows if t >= t_end - 60]
after = [r for t, r, _ in rows if t >= warm]
mean = lambda xs: sum(xs) / len(xs)
rss = [r for _, r, _ in rows]
# Least-squares slope after the warm-up, in MiB per 10 minutes.
pts = [(t, r) for t, r, _ in rows if t >= warm]
mt, mr = mean([t for t, _ in pts]), mean([r for _, r in pts])
den = sum((t - mt) ** 2 for t, _ in pts) or 1.0
slope = sum((t - mt) * (r - mr) for t, r in pts) / den * 600 / 1024
half = [(t, r) for t, r, _ in rows if t >= t_end / 2]
mh, mrh = mean([t for t, _ in half]), mean([r for _, r in half])
den_h = sum((t - mh) ** 2 for t, _ in half) or 1.0
slope_half = sum((t - mh) * (r - mrh) for t, r in half) / den_h * 600 / 1024
jobs = [int(j) for _, _, j in rows if j]
print(f"samples {len(rows)} over {t_end:.0f} s; warm-up {warm:.0f} s")
print(f"min {mib(min(rss)):.1f} MiB, max {mib(max(rss)):.1f} MiB")
print(f"first-minute mean {mib(mean(first)):.1f} MiB, last-minute mean {mib(mean(last)):.1f} MiB")
print(f"mean after warm-up {mib(mean(after)):.1f} MiB; slope after warm-up {slope:+.2f} MiB per 10 min, over the second half {slope_half:+.2f} MiB per 10 min")
if jobs:
    print(f"jobs_tracked: max {max(jobs)}, last {jobs[-1]}")
ratio = mean(last) / mean(after)
plateau = abs(ratio - 1) <= 0.10
print(f"last-minute mean / post-warm-up mean = {ratio:.3f} -> {'PLATEAUED' if plateau else 'NOT PLATEAUED'} (threshold 10 %)")
sys.exit(0 if plateau else 1)
PY
plateau_status=$?
set -e
if [ "$client_status" -ne 0 ] || [ "$plateau_status" -ne 0 ]; then
  echo "SOAK: FAIL (client exit $client_status, plateau check exit $plateau_status)"
  exit 1
fi
echo "SOAK: OK"
