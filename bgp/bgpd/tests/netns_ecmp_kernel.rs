//! ECMP end to end: margay-bgpd with `multipath: true` learns one prefix per family from two
//! eBGP peers (BIRD 2) on two links, and installs one multipath kernel route through both;
//! when one peer goes away the route becomes a plain `via` route, and when the kernel refuses
//! the set (a next hop on no connected subnet) the prefix is installed through its best next
//! hop alone. Needs root, `bird`, `birdc` and `ip` (scripts/setup.sh installs them).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// BIRD on a peer `id` (1 or 2): AS 6510<id>, 10.0.<id>.1 and fd00:<id>::1 facing margay,
/// originating 10.99.0.0/24 and fd00:99::/64, exporting to margay with `v4_export` on IPv4.
fn bird_conf(id: u8, v4_export: &str) -> String {
    let session = |name: &str, local: &str, neighbor: &str, extra: &str, channel: &str| {
        format!(
            "protocol bgp {name} {{\n  local {local} as 6510{id};\n  neighbor {neighbor} as 65001;\n  \
             hold time 9;\n  keepalive time 3;\n  connect retry time 1;\n  error wait time 1, 5;\n  \
             {channel} {{ import none; {extra} }};\n}}\n"
        )
    };
    format!(
        "router id 10.0.{id}.1;\nprotocol device {{}}\n\
         protocol static {{ ipv4; route 10.99.0.0/24 blackhole; }}\n\
         protocol static {{ ipv6; route fd00:99::/64 blackhole; }}\n{}{}",
        session(
            "m4",
            &format!("10.0.{id}.1"),
            &format!("10.0.{id}.2"),
            v4_export,
            "ipv4"
        ),
        session(
            "m6",
            &format!("fd00:{id}::1"),
            &format!("fd00:{id}::2"),
            "export all;",
            "ipv6"
        ),
    )
}

fn margay_conf() -> String {
    let mut peers = String::new();
    for (addr, asn) in [
        ("10.0.1.1", 65101),
        ("10.0.2.1", 65102),
        ("fd00:1::1", 65101),
        ("fd00:2::1", 65102),
    ] {
        peers += &format!(
            "  - address: {addr}\n    asn: {asn}\n    hold_time: 9\n    connect_retry: 1\n    idle_hold_time: 1\n"
        );
    }
    format!(
        "bgp:\n  asn: 65001\n  router_id: 10.0.1.2\n  listen: [\"10.0.1.2:179\", \"10.0.2.2:179\", \"[fd00:1::2]:179\", \"[fd00:2::2]:179\"]\n  \
         multipath: true\nstatus:\n  listen: 127.0.0.1:{STATUS_PORT}\npeers:\n{peers}kernel:\n  table: 254\n"
    )
}

/// The next hops (gateway, weight) of margay's kernel route `dst`, or `None` if there is
/// none; a single-path route gives its gateway with weight 0.
fn kernel_hops(m: &Ns, dst: &str) -> Option<Vec<(String, u64)>> {
    let fam = if dst.contains(':') { "-6" } else { "-4" };
    let out = m.ip(&["-j", fam, "route", "show", "proto", "77", "exact", dst]);
    let routes: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
    let r = routes.first()?;
    let gw = |v: &Value| v["gateway"].as_str().unwrap_or_default().to_string();
    Some(match r["nexthops"].as_array() {
        Some(hops) => hops
            .iter()
            .map(|h| (gw(h), h["weight"].as_u64().unwrap_or(0)))
            .collect(),
        None => vec![(gw(r), 0)],
    })
}

fn hops(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(g, w)| (g.to_string(), *w)).collect()
}

/// Waits until margay's kernel route `dst` has exactly `want` (in any order).
fn wait_hops(m: &Ns, dst: &str, want: &[(&str, u64)]) {
    let mut want = hops(want);
    want.sort();
    wait_for(T, &format!("kernel route {dst} through {want:?}"), || {
        let mut got = kernel_hops(m, dst)?;
        got.sort();
        (got == want).then_some(())
    });
}

/// Whether this kernel takes IPv4 and IPv6 multipath routes in `m`; prints a SKIPPED line
/// when it does not.
fn kernel_has_multipath(test: &str, m: &Ns) -> bool {
    for (fam, dst, a, b) in [
        ("-4", "10.255.255.0/24", "10.0.1.1", "10.0.2.1"),
        ("-6", "fd00:ffff::/64", "fd00:1::1", "fd00:2::1"),
    ] {
        let out = m.try_sh(&format!(
            "ip {fam} route add {dst} nexthop via {a} nexthop via {b}"
        ));
        if !out.status.success() {
            margay_testkit::skip(
                test,
                margay_testkit::Lack::KernelFeature,
                &format!(
                    "the kernel refuses a {fam} multipath route ({}); is CONFIG_IP_ROUTE_MULTIPATH off?",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return false;
        }
        m.ip(&[fam, "route", "del", dst]);
    }
    true
}

#[test]
fn netns_ecmp_set_becomes_one_multipath_kernel_route() {
    let test = "netns_ecmp_set_becomes_one_multipath_kernel_route";
    require("bird");
    require("birdc");
    let dir = TestDir::new();
    let a = Ns::new("ecmpa");
    let b = Ns::new("ecmpb");
    let m = Ns::new("ecmpm");
    link(
        &a,
        &["10.0.1.1/24", "fd00:1::1/64"],
        &m,
        &["10.0.1.2/24", "fd00:1::2/64"],
    );
    link(
        &b,
        &["10.0.2.1/24", "fd00:2::1/64"],
        &m,
        &["10.0.2.2/24", "fd00:2::2/64"],
    );
    if !kernel_has_multipath(test, &m) {
        return;
    }
    let _ba = bird(&a, dir.path(), &bird_conf(1, "export all;"));
    let bb = bird(&b, dir.path(), &bird_conf(2, "export all;"));
    let g = margay(&m, dir.path(), &margay_conf());

    // Both peers' paths tie down to the router ID: one route through both, weight 1 each.
    wait_hops(&m, "10.99.0.0/24", &[("10.0.1.1", 1), ("10.0.2.1", 1)]);
    wait_hops(&m, "fd00:99::/64", &[("fd00:1::1", 1), ("fd00:2::1", 1)]);

    // One peer goes away: a plain via route through the other.
    bb.birdc("disable m4");
    bb.birdc("disable m6");
    wait_hops(&m, "10.99.0.0/24", &[("10.0.1.1", 0)]);
    wait_hops(&m, "fd00:99::/64", &[("fd00:1::1", 0)]);
    // And back.
    bb.birdc("enable m4");
    bb.birdc("enable m6");
    wait_hops(&m, "10.99.0.0/24", &[("10.0.1.1", 1), ("10.0.2.1", 1)]);
    wait_hops(&m, "fd00:99::/64", &[("fd00:1::1", 1), ("fd00:2::1", 1)]);

    // Peer 2 now announces a next hop on no subnet of margay's: the kernel refuses the set,
    // and margay installs the best path (peer 1, the lower router ID) alone.
    let conf = dir.path().join(format!("{}-bird.conf", b.name));
    std::fs::write(
        &conf,
        bird_conf(
            2,
            "next hop keep; export filter { bgp_next_hop = 10.0.9.9; accept; };",
        ),
    )
    .unwrap();
    let out = bb.birdc("configure");
    assert!(out.contains("Reconfigured"), "birdc configure: {out}");
    wait_for(T, "margay to learn 10.99.0.0/24 via 10.0.9.9", || {
        let r = margay_route(&m, "10.99.0.0/24")?;
        r["paths"]
            .as_array()?
            .iter()
            .any(|p| p["next_hop"] == "10.0.9.9")
            .then_some(())
    });
    wait_for(T, "margay to fall back to the best next hop", || {
        g.proc
            .log_text()
            .contains("the kernel refused multipath routes")
            .then_some(())
    });
    wait_hops(&m, "10.99.0.0/24", &[("10.0.1.1", 0)]);
    wait_hops(&m, "fd00:99::/64", &[("fd00:1::1", 1), ("fd00:2::1", 1)]);
}
