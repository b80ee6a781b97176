#!/usr/bin/env bash
# BGP speaker benchmarks in the style of bgperf2, with Margay, BIRD, GoBGP and FRR each
# as the device under test (DUT), run side by side on this machine.
#
#   propagate  one injector peer sends N IPv4 prefixes; time from the first UPDATE until
#              a second peer behind the DUT holds them all, then the same for the
#              withdrawal of all of them.
#   receive    N prefixes from one peer; time until the DUT reports them accepted, and
#              the DUT's peak RSS.
#   rr         C clients × M prefixes with the DUT as route reflector; time until every
#              client holds every other client's prefixes, peak RSS, bytes per path.
#
# Usage: bgp/bench/run.sh [RUNS] [TESTS] [DUTS]
#   RUNS   runs per test and DUT (default 3); medians are reported
#   TESTS  default "propagate receive rr"
#   DUTS   default "margay bird gobgp frr"
# Environment: PREFIXES (100000), RR_CLIENTS (100), RR_PER (10000), SKIP_BUILD=1,
#   BGPD (the margay-bgpd to run), PREV_BGPD (a second one, as DUT "margayprev").
# Output: one JSON line per run on stdout-results file, and a Markdown summary.
# Needs root (network namespaces), bird, gobgpd, FRR's bgpd, vtysh, curl.
set -euo pipefail

RUNS=${1:-3}
TESTS=${2:-"propagate receive rr"}
DUTS=${3:-"margay bird gobgp frr"}
PREFIXES=${PREFIXES:-100000}
RR_CLIENTS=${RR_CLIENTS:-100}
RR_PER=${RR_PER:-10000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -p margay-bgpd -p margay-bgp-bench --manifest-path "$ROOT/Cargo.toml" >&2
fi
BGPD=${BGPD:-"$ROOT/target/release/margay-bgpd"}
BENCH="$ROOT/target/release/bgp-bench"
P="mgbb$$"
WORK=$(mktemp -d /tmp/mgbb-XXXX)
chmod 755 "$WORK"
RESULTS="$WORK/results.jsonl"
DUT_PID=""

cleanup() {
  stop_dut
  ip netns del "$P-dut" 2>/dev/null || true
  ip netns del "$P-tst" 2>/dev/null || true
}
trap cleanup EXIT

stop_dut() {
  if [ -n "$DUT_PID" ]; then
    kill "$DUT_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$DUT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$DUT_PID" 2>/dev/null || true
    DUT_PID=""
  fi
}

setup_net() {
  ip netns del "$P-dut" 2>/dev/null || true
  ip netns del "$P-tst" 2>/dev/null || true
  ip netns add "$P-dut"; ip netns add "$P-tst"
  ip -n "$P-dut" link set lo up; ip -n "$P-tst" link set lo up
  ip link add "${P}d" netns "$P-dut" type veth peer name "${P}t" netns "$P-tst"
  ip -n "$P-dut" addr add 10.9.0.1/16 dev "${P}d"
  ip -n "$P-tst" addr add 10.9.0.2/16 dev "${P}t"
  ip -n "$P-tst" addr add 10.9.0.3/16 dev "${P}t"
  for i in $(seq 1 "$RR_CLIENTS"); do
    ip -n "$P-tst" addr add "10.9.1.$i/16" dev "${P}t"
  done
  ip -n "$P-dut" link set "${P}d" up; ip -n "$P-tst" link set "${P}t" up
}

# peers_for TEST -> lines "ADDRESS ASN RRCLIENT"
peers_for() {
  case "$1" in
    propagate) echo "10.9.0.2 65001 0"; echo "10.9.0.3 65002 0" ;;
    receive) echo "10.9.0.2 65001 0" ;;
    rr) for i in $(seq 1 "$RR_CLIENTS"); do echo "10.9.1.$i 65000 1"; done ;;
  esac
}

start_margay() {
  local test=$1 bin=${2:-$BGPD} conf="$WORK/margay.yaml"
  {
    echo "bgp: { asn: 65000, router_id: 10.9.0.1, listen: [\"10.9.0.1:179\"] }"
    echo "status: { listen: \"127.0.0.1:9179\" }"
    echo "peers:"
    peers_for "$test" | while read -r a asn rr; do
      echo "  - { address: $a, asn: $asn, mode: passive, rr_client: $([ "$rr" = 1 ] && echo true || echo false) }"
    done
  } >"$conf"
  ip netns exec "$P-dut" "$bin" -c "$conf" >"$WORK/margay.log" 2>&1 &
  DUT_PID=$!
}

# Another margay-bgpd binary (PREV_BGPD), for before/after comparisons in one run.
start_margayprev() {
  start_margay "$1" "${PREV_BGPD:?set PREV_BGPD to the margay-bgpd binary to compare with}"
}

start_bird() {
  local test=$1 conf="$WORK/bird.conf" n=0
  {
    echo "router id 10.9.0.1;"
    echo "protocol device {}"
    peers_for "$test" | while read -r a asn rr; do
      n=$((n + 1))
      echo "protocol bgp p$n { local 10.9.0.1 as 65000; neighbor $a as $asn; passive; $([ "$rr" = 1 ] && echo "rr client;") ipv4 { import all; export all; }; }"
    done
  } >"$conf"
  ip netns exec "$P-dut" bird -f -s "$WORK/bird.ctl" -c "$conf" -P "$WORK/bird.pid" >"$WORK/bird.log" 2>&1 &
  DUT_PID=$!
}

start_gobgp() {
  local test=$1 conf="$WORK/gobgp.toml"
  {
    printf '[global.config]\n  as = 65000\n  router-id = "10.9.0.1"\n  local-address-list = ["10.9.0.1"]\n'
    peers_for "$test" | while read -r a asn rr; do
      printf '[[neighbors]]\n  [neighbors.config]\n    neighbor-address = "%s"\n    peer-as = %s\n' "$a" "$asn"
      printf '  [neighbors.transport.config]\n    passive-mode = true\n'
      if [ "$rr" = 1 ]; then
        printf '  [neighbors.route-reflector.config]\n    route-reflector-client = true\n    route-reflector-cluster-id = "10.9.0.1"\n'
      fi
      printf '  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = "ipv4-unicast"\n'
    done
  } >"$conf"
  ip netns exec "$P-dut" gobgpd -f "$conf" -p --pprof-disable --api-hosts 127.0.0.1:50051 -l warn >"$WORK/gobgp.log" 2>&1 &
  DUT_PID=$!
}

start_frr() {
  local test=$1 conf="$WORK/frr.conf"
  {
    echo "frr defaults traditional"
    echo "router bgp 65000"
    echo " bgp router-id 10.9.0.1"
    echo " no bgp ebgp-requires-policy"
    echo " no bgp network import-check"
    peers_for "$test" | while read -r a asn rr; do
      echo " neighbor $a remote-as $asn"
      echo " neighbor $a passive"
    done
    echo " address-family ipv4 unicast"
    peers_for "$test" | while read -r a asn rr; do
      if [ "$rr" = 1 ]; then echo "  neighbor $a route-reflector-client"; fi
    done
    echo " exit-address-family"
  } >"$conf"
  ip netns exec "$P-dut" /usr/lib/frr/bgpd -Z -S -n -f "$conf" -i "$WORK/frr.pid" --vty_socket "$WORK" \
    -A 127.0.0.1 -P 2605 >"$WORK/frr.log" 2>&1 &
  DUT_PID=$!
}

# count_cmd DUT -> shell command printing the prefixes accepted from 10.9.0.2
count_cmd() {
  case "$1" in
    margay|margayprev) echo "ip netns exec $P-dut curl -s 127.0.0.1:9179/peers | grep -o '\"prefixes_accepted\":[0-9]*' | head -1 | cut -d: -f2" ;;
    bird) echo "birdc -s $WORK/bird.ctl show protocols all p1 | awk '/Routes:/ {print \$2; exit}'" ;;
    gobgp) echo "ip netns exec $P-dut gobgp -u 127.0.0.1 -p 50051 neighbor 10.9.0.2 -j | grep -o '\"accepted\":[0-9]*' | head -1 | cut -d: -f2" ;;
    frr) echo "ip netns exec $P-dut vtysh --vty_socket $WORK -c 'show bgp ipv4 unicast summary json' | grep -o '\"pfxRcd\":[0-9]*' | head -1 | cut -d: -f2" ;;
  esac
}

run_one() {
  local dut=$1 test=$2 run=$3 out
  setup_net
  "start_$dut" "$test"
  sleep 2
  case "$test" in
    propagate)
      out=$(ip netns exec "$P-tst" "$BENCH" propagate --dut 10.9.0.1 --dut-asn 65000 --injector 10.9.0.2 \
        --collector 10.9.0.3 --prefixes "$PREFIXES" --dut-pid "$DUT_PID") || out='{"error":"failed"}' ;;
    receive)
      out=$(ip netns exec "$P-tst" "$BENCH" receive --dut 10.9.0.1 --dut-asn 65000 --injector 10.9.0.2 \
        --prefixes "$PREFIXES" --count-cmd "$(count_cmd "$dut")" --dut-pid "$DUT_PID") || out='{"error":"failed"}' ;;
    rr)
      out=$(ip netns exec "$P-tst" "$BENCH" rr --dut 10.9.0.1 --asn 65000 --first-client 10.9.1.1 \
        --clients "$RR_CLIENTS" --per-client "$RR_PER" --dut-pid "$DUT_PID" --timeout 900) || out='{"error":"timeout or failure"}' ;;
  esac
  stop_dut
  echo "{\"dut\":\"$dut\",\"run\":$run,\"result\":$out}" | tee -a "$RESULTS"
}

for test in $TESTS; do
  for run in $(seq 1 "$RUNS"); do
    for dut in $DUTS; do
      run_one "$dut" "$test" "$run"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def fmt(v, unit=""):
    return "—" if v is None else (f"{v:.3f}{unit}" if isinstance(v, float) else f"{v}{unit}")
tests = {}
for r in rows:
    tests.setdefault(r["result"].get("test", "failed runs"), {}).setdefault(r["dut"], []).append(r["result"])
for test, by in tests.items():
    print(f"\n### {test} (medians of {max(len(v) for v in by.values())} runs)\n")
    if test == "propagate":
        keys = [("announce_s", "announce s"), ("withdraw_s", "withdraw s"), ("dut_peak_rss_kib", "peak RSS KiB")]
    elif test == "receive":
        keys = [("seconds", "seconds"), ("dut_peak_rss_kib", "peak RSS KiB")]
    else:
        keys = [("seconds", "seconds"), ("dut_peak_rss_kib", "peak RSS KiB"), ("bytes_per_path", "bytes/path")]
    print("| DUT | " + " | ".join(k[1] for k in keys) + " | time vs Margay |")
    print("|---|" + "---|" * (len(keys) + 1))
    m = med([x.get(keys[0][0]) for x in by.get("margay", [])])
    for dut, rs in by.items():
        vals = [med([x.get(k) for x in rs]) for k, _ in keys]
        ratio = f"{vals[0] / m:.2f}×" if m and vals[0] else "—"
        print(f"| {dut} | " + " | ".join(fmt(v) for v in vals) + f" | {ratio} |")
PY
echo "raw results: $RESULTS" >&2
