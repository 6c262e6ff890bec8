#!/usr/bin/env bash
# MQ-RPC of two builds, interleaved: another checkout's (BASE, e.g. a `git worktree` of the
# commit before a change) against this one's, each with its own broker, in the in-process
# shape of issue 16 (`qbus --threads 2 bench rpc --mq --in-process`). Per run: p50/p99 at
# 1 in flight, p50/p99/calls/s at 64, and CPU per call at 64 in flight (broker from
# /proc/PID/stat, client from the time it used; warm-up calls included), plus the steal
# ticks the VM lost meanwhile (runs with steal are not to be trusted).
# Builds both in release first. Loopback only; every process it starts it stops.
# Usage: scripts/bench-rpc-ab.sh BASE [ROUNDS] [SIZE] [SECS] [--mq|--direct]
#        (defaults 3 rounds, 16 B, 3 s, --mq)
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-rpc-ab.sh BASE [ROUNDS] [SIZE] [SECS] [--mq|--direct]}
rounds=${2:-3}; size=${3:-16}; secs=${4:-3}; mode=${5:---mq}
for dir in "$base" .; do
  (cd "$dir" && cargo build --release -q -p qbus-cli -p qbus-broker)
done

steal() { awk '/^cpu /{print $9}' /proc/stat; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
bpid=""; store=""
trap '[ -n "$bpid" ] && kill "$bpid" 2>/dev/null; [ -n "$store" ] && rm -rf "$store"; true' EXIT

# One run of the build in $1, labelled $2.
run() {
  local bin=$1/target/release label=$2 port lat out steal0 broker0 broker1 calls client
  store=$(mktemp -d); port=$((20000 + RANDOM % 20000))
  "$bin/qbus-broker" --port "$port" --store "$store" >"$store/broker.log" 2>&1 & bpid=$!
  for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  local bench=("$bin/qbus" --threads 2 --broker "127.0.0.1:$port" bench rpc "$mode" --in-process
    --size "$size" --duration "$secs")
  lat=$("${bench[@]}" --concurrency 1 | grep '^RESULT')
  steal0=$(steal); broker0=$(ticks "$bpid")
  out=$( { /usr/bin/time -f "TIME %U %S" "${bench[@]}" --concurrency 64; } 2>&1 )
  broker1=$(ticks "$bpid")
  kill "$bpid"; wait "$bpid" 2>/dev/null || true; bpid=""
  rm -rf "$store"; store=""
  calls=$(echo "$out" | grep '^RESULT' | grep -o 'count=[0-9]*' | cut -d= -f2)
  client=$(echo "$out" | awk '/^TIME/{print ($2 + $3) * 1000000}')
  printf '%s ' "$label"
  printf '%s\n%s\n' "$lat" "$(echo "$out" | grep '^RESULT')" | awk '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "c%s: p50=%s p99=%s calls/s=%s | ", v["concurrency"], v["p50_us"], v["p99_us"], v["msgs_per_s"] }'
  awk -v b=$((broker1 - broker0)) -v c="$client" -v n="$calls" -v s=$(( $(steal) - steal0 )) \
    'BEGIN { printf "CPU/call at 64: broker %.2f us, client %.2f us | steal %d\n", b * 10000 / n, c / n, s }'
}

for _ in $(seq "$rounds"); do
  run "$base" base
  run . this
done
