#!/usr/bin/env bash
# qbus memory-MQ fan-out and NATS core pub/sub, measured back to back in one run:
# one unthrottled publisher, one subscriber per group, each on its own connection, 16 B.
# Needs `nats-server` (Debian: apt-get install -y nats-server) and release builds of
# qbus, qbus-broker and bench/nats-compare (outside the workspace, never built by CI).
# Usage: scripts/bench-fanout-vs-nats.sh [COUNT] [GROUPS...]   (default 1000000, 1 and 4)
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000}; shift || true
groups=("${@:-1 4}")
cargo build --release -q -p qbus-cli -p qbus-broker
cargo build --release -q --manifest-path bench/nats-compare/Cargo.toml
store=$(mktemp -d)
qport=$((20000 + RANDOM % 10000)); nport=$((qport + 1))
target/release/qbus-broker --port "$qport" --store "$store" >"$store/broker.log" 2>&1 & qpid=$!
nats-server -a 127.0.0.1 -p "$nport" >"$store/nats.log" 2>&1 & npid=$!
# The servers end killed, so their wait fails; that must not skip the clean-up or fail the run.
trap 'kill "$qpid" "$npid" 2>/dev/null; wait "$qpid" "$npid" 2>/dev/null || true; rm -rf "$store"' EXIT
sleep 1
for g in ${groups[*]}; do
  for run in 1 2 3; do
    target/release/qbus --broker "127.0.0.1:$qport" bench fanout --groups "$g" --count "$count" | grep '^RESULT'
    bench/nats-compare/target/release/nats-compare "127.0.0.1:$nport" "$count" "$g" 16 | grep '^RESULT'
  done
done
