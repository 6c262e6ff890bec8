#!/usr/bin/env bash
# Runs every example that needs no outside server, as a newcomer would, so the README's
# examples never go stale: quickstart, reminders and transfer (embedded broker), ha_cluster (trackers and brokers in
# one process), and rpc_client against rpc_server (which runs its own broker). Everything
# listens on loopback only. Each run is bounded; a hang fails.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --locked -p qbus-examples --examples
bin=target/debug/examples

timeout 60 "$bin/quickstart"
timeout 60 "$bin/reminders"
timeout 60 "$bin/transfer"
timeout 120 "$bin/ha_cluster"

# rpc_server serves until stopped; rpc_client calls it through every invoker.
log=$(mktemp)
"$bin/rpc_server" --port 18000 --broker-port 15556 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  grep -q "Ctrl-C to stop" "$log" && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; echo "rpc_server exited" >&2; exit 1; }
  sleep 0.1
done
grep -q "Ctrl-C to stop" "$log" || { cat "$log"; echo "rpc_server did not start" >&2; exit 1; }
timeout 60 "$bin/rpc_client" --direct 127.0.0.1:18000 --broker 127.0.0.1:15556
kill -INT "$server"
wait "$server"
echo "scripts/examples.sh: every example ran"
