#!/usr/bin/env bash
# Runs every test: unit, end-to-end against real qbus-broker / qbus-tracker processes, and the
# monitor-page test in headless Chromium (installed here from Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  echo "scripts/test.sh: chromium is missing; installing Debian's chromium package with apt-get" >&2
  echo "scripts/test.sh: (the monitor-page tests load the pages in headless Chromium)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

# One build of every test and binary of the workspace (in the profile asked for), then the
# run: the testkit starts the binaries this build made instead of building each again with
# its own package's features (a minute each). A run filtered to some tests builds them all.
profile=()
for arg in "$@"; do
  [ "$arg" = "--" ] && break
  [ "$arg" = "--release" ] && profile=(--release)
done
cargo test --workspace --locked --no-run "${profile[@]}"
QBUS_TEST_PREBUILT=1 cargo test --workspace --locked "$@"
