#!/usr/bin/env bash
# The test command: sets up the machine and runs every gate Margay has. `.ci/run` runs exactly
# this. Run as root from the repository root (network-namespace tests need it).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests" >&2
cargo nextest run --workspace --locked --profile ci
