#!/usr/bin/env bash
# qbus MQ-RPC, qbus DirectRPC and NATS core request/reply, measured back to back in one run,
# in one shape:
# caller and responder in one process on a 2-thread Tokio runtime, each on its own
# connection, the server in its own process (DirectRPC: the RPC server is the responder
# itself, so no broker); echo of each SIZE at 1 and 64 in flight.
# Three interleaved runs of each (take the medians); the RESULT lines are printed as they
# come, prefixed by the system.
# Needs `nats-server` (Debian: apt-get install -y nats-server) and release builds of
# qbus, qbus-broker and bench/nats-compare (outside the workspace, never built by CI).
# Usage: scripts/bench-rpc-vs-nats.sh [SECS] [SIZES] [CONCURRENCIES]   (default 3, 16,1024, 1,64)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}; sizes=${2:-16,1024}; concurrency=${3:-1,64}
cargo build --release -q -p qbus-cli -p qbus-broker
cargo build --release -q --manifest-path bench/nats-compare/Cargo.toml
store=$(mktemp -d)
qport=$((20000 + RANDOM % 10000)); nport=$((qport + 1))
target/release/qbus-broker --port "$qport" --store "$store" >"$store/broker.log" 2>&1 & qpid=$!
nats-server -a 127.0.0.1 -p "$nport" >"$store/nats.log" 2>&1 & npid=$!
# The servers end killed, so their wait fails; that must not skip the clean-up or fail the run.
trap 'kill "$qpid" "$npid" 2>/dev/null; wait "$qpid" "$npid" 2>/dev/null || true; rm -rf "$store"' EXIT
sleep 1
for run in 1 2 3; do
  target/release/qbus --threads 2 --broker "127.0.0.1:$qport" bench rpc --mq --in-process \
    --size "$sizes" --concurrency "$concurrency" --duration "$secs" | grep '^RESULT'
  target/release/qbus --threads 2 bench rpc --direct --in-process \
    --size "$sizes" --concurrency "$concurrency" --duration "$secs" | grep '^RESULT'
  bench/nats-compare/target/release/nats-compare rpc "127.0.0.1:$nport" "$sizes" "$concurrency" "$secs" \
    | grep '^RESULT'
done
