#!/usr/bin/env bash
# Captures a BIRD 2 <-> GoBGP session for the codec's real-peer test vectors.
#
# Two network namespaces (mgw-a: BIRD, AS 65001; mgw-b: GoBGP, AS 65002) joined by a
# veth; tcpdump records TCP port 179 in mgw-a. Both sides announce IPv4 and IPv6
# prefixes with communities, large and extended communities; BIRD then disables the
# session with a shutdown communication, re-enables it, GoBGP withdraws a prefix and
# finally shuts the peer down with its own communication. extract.py turns the pcap
# into one hex file per direction under ../data/.
#
# Needs root, bird, birdc, gobgpd, gobgp, tcpdump, python3. Everything started here is
# killed by PID and the namespaces are deleted on exit, failure included.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="$HERE/../data"
WORK="$(mktemp -d /tmp/mgw-capture.XXXXXX)"
PCAP="$DATA/bird2-gobgp.pcap"
PIDS=()

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null
    done
    ip netns del mgw-a 2>/dev/null
    ip netns del mgw-b 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # seconds, command...
    local n=$1; shift
    for _ in $(seq "$n"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "timed out waiting for: $*" >&2
    return 1
}

birdc_() { birdc -s "$WORK/bird.ctl" "$@"; }
gobgp_() { ip netns exec mgw-b gobgp "$@"; }
established() { birdc_ show protocols gobgp | grep -q Established; }

ip netns add mgw-a
ip netns add mgw-b
ip link add mgw-va type veth peer name mgw-vb
ip link set mgw-va netns mgw-a
ip link set mgw-vb netns mgw-b
ip -n mgw-a link set lo up
ip -n mgw-b link set lo up
ip -n mgw-a addr add 10.99.0.1/24 dev mgw-va
ip -n mgw-b addr add 10.99.0.2/24 dev mgw-vb
ip -n mgw-a addr add fd99::1/64 dev mgw-va nodad
ip -n mgw-b addr add fd99::2/64 dev mgw-vb nodad
ip -n mgw-a link set mgw-va up
ip -n mgw-b link set mgw-vb up

ip netns exec mgw-a tcpdump -i mgw-va -U -s 0 -w "$WORK/cap.pcap" tcp port 179 2>"$WORK/tcpdump.log" &
PIDS+=($!)
wait_for 10 grep -q listening "$WORK/tcpdump.log"

ip netns exec mgw-b gobgpd -f "$HERE/gobgpd.toml" -t toml --log-level=warn >"$WORK/gobgpd.log" 2>&1 &
PIDS+=($!)
wait_for 20 gobgp_ global
gobgp_ global rib -a ipv4 add 10.20.1.0/24 nexthop 10.99.0.2 community 65002:200 large-community 65002:1:1 med 10
gobgp_ global rib -a ipv4 add 10.20.2.0/24 nexthop 10.99.0.2 community 65002:200 large-community 65002:1:1 med 10
gobgp_ global rib -a ipv4 add 10.21.0.0/16 nexthop 10.99.0.2 community 65002:201 origin incomplete
gobgp_ global rib -a ipv6 add 2001:db8:20::/48 nexthop fd99::2 community 65002:300 large-community 65002:3:3
gobgp_ global rib -a ipv6 add 2001:db8:21::/56 nexthop fd99::2 community 65002:300

ip netns exec mgw-a bird -c "$HERE/bird.conf" -s "$WORK/bird.ctl" -P "$WORK/bird.pid" -f >"$WORK/bird.log" 2>&1 &
PIDS+=($!)
wait_for 30 established
sleep 4

# BIRD closes the session with an RFC 8203 shutdown communication.
birdc_ disable gobgp '"margay capture: BIRD maintenance"'
sleep 2
birdc_ enable gobgp
wait_for 60 established
sleep 4

# GoBGP withdraws one prefix per family, then shuts the session down.
gobgp_ global rib -a ipv4 del 10.20.2.0/24
gobgp_ global rib -a ipv6 del 2001:db8:21::/56
sleep 2
# `disable --reason` sends Cease/2 without the text in GoBGP 3.10; the deprecated
# `shutdown` verb is the one that carries the RFC 8203 communication.
gobgp_ neighbor 10.99.0.1 shutdown --reason "margay capture: GoBGP going down"
sleep 2

kill -INT "${PIDS[0]}"
wait "${PIDS[0]}" || true
cp "$WORK/cap.pcap" "$PCAP"
python3 "$HERE/extract.py" "$PCAP" "$DATA"
echo "capture written to $PCAP; hex vectors in $DATA"
for f in bird2-to-gobgp gobgp-to-bird2; do
    grep -q NOTIFICATION "$DATA/$f.hex" || { echo "no NOTIFICATION in $f.hex" >&2; exit 1; }
done
# Both NOTIFICATIONs must carry their shutdown communication ("margay capture: ").
[ "$(grep -c 6d617267617920636170747572653a20 "$DATA"/*.hex | awk -F: '{s+=$2} END {print s}')" = 2 ] ||
    { echo "a shutdown communication is missing" >&2; exit 1; }
