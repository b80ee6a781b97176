#!/usr/bin/env bash
# Steady state: margay-bgpd peered with BIRD (eBGP) and GoBGP (iBGP, RR client) in
# network namespaces for DURATION seconds (default 1800); passes when no
# NOTIFICATION was sent or received and no session was ever re-established.
# Usage: bgp/bench/steady.sh [margay-bgpd binary] [duration-seconds]
set -euo pipefail
BIN=${1:-target/release/margay-bgpd}
DURATION=${2:-1800}
P="mgst-$$"
DIR=$(mktemp -d /tmp/mgst-XXXX)
cleanup() {
  for pidf in "$DIR"/*.pid; do [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null || true; done
  for n in m bird gobgp; do ip netns del "$P-$n" 2>/dev/null || true; done
}
trap cleanup EXIT
for n in m bird gobgp; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip link add "${P:0:8}a" netns "$P-m" type veth peer name "${P:0:8}b" netns "$P-bird"
ip link add "${P:0:8}c" netns "$P-m" type veth peer name "${P:0:8}d" netns "$P-gobgp"
ip -n "$P-m" addr add 10.0.1.1/24 dev "${P:0:8}a"; ip -n "$P-m" link set "${P:0:8}a" up
ip -n "$P-bird" addr add 10.0.1.2/24 dev "${P:0:8}b"; ip -n "$P-bird" link set "${P:0:8}b" up
ip -n "$P-m" addr add 10.0.2.1/24 dev "${P:0:8}c"; ip -n "$P-m" link set "${P:0:8}c" up
ip -n "$P-gobgp" addr add 10.0.2.2/24 dev "${P:0:8}d"; ip -n "$P-gobgp" link set "${P:0:8}d" up

cat > "$DIR/bgpd.yaml" <<Y
bgp: { asn: 65001, router_id: 10.0.1.1, listen: ["0.0.0.0:179"], graceful_restart: { restart_time: 120 } }
status: { listen: "127.0.0.1:9179" }
peers:
  - { address: 10.0.1.2, asn: 65100, hold_time: 9 }
  - { address: 10.0.2.2, asn: 65001, hold_time: 9, rr_client: true }
announce:
  - { prefix: 10.200.0.0/24 }
Y
cat > "$DIR/bird.conf" <<B
router id 10.0.1.2;
protocol device {}
protocol static { ipv4; route 10.100.0.0/24 blackhole; }
protocol bgp m { local 10.0.1.2 as 65100; neighbor 10.0.1.1 as 65001; hold time 9; graceful restart on; ipv4 { import all; export all; }; }
B
cat > "$DIR/gobgp.toml" <<G
[global.config]
  as = 65001
  router-id = "10.0.2.2"
  port = -1
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.0.2.1"
    peer-as = 65001
  [neighbors.timers.config]
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
G
ip netns exec "$P-m" "$BIN" -c "$DIR/bgpd.yaml" >"$DIR/bgpd.log" 2>&1 & echo $! >"$DIR/bgpd.pid"
# BIRD runs from a copy named mgst-bird: on a shared machine, other tools that stop
# "bird" processes by a recorded PID cannot mistake it for theirs.
cp "$(command -v bird)" "$DIR/mgst-bird"
ip netns exec "$P-bird" "$DIR/mgst-bird" -f -s "$DIR/bird.ctl" -c "$DIR/bird.conf" -P "$DIR/bird.pidfile" >"$DIR/bird.log" 2>&1 & echo $! >"$DIR/bird.pid"
ip netns exec "$P-gobgp" gobgpd -f "$DIR/gobgp.toml" -p --pprof-disable >"$DIR/gobgp.log" 2>&1 & echo $! >"$DIR/gobgp.pid"
sleep 10
ip netns exec "$P-gobgp" gobgp global rib add -a ipv4 10.50.0.0/24 nexthop 10.0.2.2 >/dev/null
peers() { ip netns exec "$P-m" curl -s http://127.0.0.1:9179/peers; }
start=$(peers)
echo "start: $start" >&2
sleep "$DURATION"
end=$(peers)
echo "end: $end" >&2
python3 - "$start" "$end" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ok = True
for p, q in zip(a, b):
    n = q["messages_received"]["notification"] + q["messages_sent"]["notification"]
    same = p["since"] == q["since"] and q["state"] == "Established"
    print(f'{q["address"]}: state {q["state"]}, up since {q["since"]} (unchanged: {same}), '
          f'NOTIFICATIONs {n}, keepalives in/out {q["messages_received"]["keepalive"]}/{q["messages_sent"]["keepalive"]}, '
          f'accepted {q["prefixes_accepted"]}, advertised {q["prefixes_advertised"]}')
    ok &= same and n == 0
sys.exit(0 if ok else 1)
PY
echo "BIRD: $(birdc -s "$DIR/bird.ctl" show protocols m | tail -1)"
echo "GoBGP: $(ip netns exec "$P-gobgp" gobgp neighbor | tail -1)"
