#!/usr/bin/env bash
# The main job: set up the machine, build Margay, and bring up the local lab, a whole Margay
# cluster in network namespaces (nodes in two subnets, a BIRD router, etcd, pods made by the
# real CNI binaries), ending with a reachability matrix. Run as root. Extra arguments go to
# `margayctl lab up` (e.g. --nodes 4 --pods-per-node 3 --encap none --router margay).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "== building Margay" >&2
cargo build --locked -q -p margayctl -p margay-node -p margay-cni -p margay-ipam-controller -p margay-bgpd
ctl=target/debug/margayctl

# A lab from an earlier run (or a crashed one) is removed first.
$ctl lab down >/dev/null 2>&1 || true
$ctl lab up "$@"
cat <<MSG

The lab stays up. Explore it:
  $ctl lab status
  $ctl lab scenario node-loss        # or pod-churn, pool-edit, mesh-to-rr, external-access, nat
  ip netns exec mgl-p-node1-0 ping 10.244.x.y
and remove everything it made with:
  $ctl lab down
MSG
