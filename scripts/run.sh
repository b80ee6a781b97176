#!/usr/bin/env bash
# The main job. Until `margayctl lab up` lands, this runs what works end to end today: a real
# etcd datastore on loopback, pools applied and validated through margayctl, and the result
# listed. Everything it starts is stopped by PID and its files removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
echo "== building margayctl" >&2
cargo build --locked -q -p margayctl
ctl=target/debug/margayctl

work=$(mktemp -d /tmp/margay-run.XXXXXX)
etcd_pid=""
cleanup() {
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
peer=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$port" \
  --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "default=http://127.0.0.1:$peer" \
  >"$work/etcd.log" 2>&1 &
etcd_pid=$!
export MARGAY_ETCD_ENDPOINTS="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  if $ctl pool list >/dev/null 2>&1; then break; fi
  sleep 0.1
done
echo "== etcd datastore at $MARGAY_ETCD_ENDPOINTS (pid $etcd_pid)"

echo "== margayctl pool apply -f examples/pools.yaml"
$ctl pool apply -f examples/pools.yaml
echo "== margayctl pool apply -f examples/bad-pool.yaml (must be rejected)"
if $ctl pool apply -f examples/bad-pool.yaml; then
  echo "error: an invalid pool was accepted" >&2
  exit 1
fi
echo "== margayctl pool disable default-ipv6"
$ctl pool disable default-ipv6
echo "== margayctl pool list"
$ctl pool list
