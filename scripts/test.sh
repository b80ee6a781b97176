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

# The Kubernetes suites (datastore contract, chart and CRDs, controller and CNI plugin under
# RBAC, the lab on Kubernetes) need a kube-apiserver, which no package registry ships
# (docs/datastore.md). Say whether they run, before the tests and again in the summary; under
# CI=true a missing one fails them.
kube_apiserver=${KUBE_APISERVER_BIN:-$(command -v kube-apiserver || true)}
if [ -n "$kube_apiserver" ]; then
  kube_line="Kubernetes suites: run against $("$kube_apiserver" --version 2>/dev/null || echo "$kube_apiserver")"
else
  kube_line="Kubernetes suites: NOT RUN (no kube-apiserver in KUBE_APISERVER_BIN or on PATH; each such test is listed as skipped at the end)"
fi
echo "== $kube_line" >&2

# Every test that did not run says so in this file (margay_testkit::skip); nextest hides a
# passing test's output, so the lines are printed after its summary. Under CI=true only a
# kernel feature this machine lacks may skip; a missing prerequisite fails its test.
skip_log=$(mktemp /tmp/margay-skips.XXXXXX)
trap 'rm -f "$skip_log"' EXIT
export MARGAY_SKIP_LOG=$skip_log

echo "== tests" >&2
status=0
cargo nextest run --workspace --locked --profile ci || status=$?

skips=$(sort -u "$skip_log")
if [ -n "$skips" ]; then
  echo "== skipped: $(printf '%s\n' "$skips" | wc -l) test(s) did not run, and why:" >&2
  printf '%s\n' "$skips" >&2
else
  echo "== skipped: none (every test ran; #[ignore]d long runs are counted by nextest above)" >&2
fi
echo "== $kube_line" >&2
exit "$status"
