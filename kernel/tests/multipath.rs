//! Multipath (ECMP) routes through the route writer, against a real kernel, in namespaces the
//! tests create. `ip -j` is the oracle.
//!
//! The lab: a namespace `node` with two veths, `v0` (192.0.2.1/24, 2001:db8::1/64) and `w0`
//! (203.0.113.1/24, 2001:db8:1::1/64), whose far ends `v1` and `w1` sit in a namespace `peer`
//! holding the gateways (192.0.2.2, 2001:db8::2 and 203.0.113.2, 2001:db8:1::2) and, on its
//! loopback, the destinations 10.80.0.1 and fd00:80::1.

mod common;

use std::collections::HashSet;

use common::{all_ok, can_run, dumped, hops, ip, kernel_hops, netns, nl, ping, replace, skipped};
use ipnet::IpNet;
use margay_kernel::netns::{Netns, OwnedNetns};
use margay_kernel::{
    AddressOptions, Family, KernelError, NextHop, PathHop, Route, RouteFilter, RouteKey,
    RouteWriter, VethSpec, WriteOp, MAIN_TABLE,
};
use serde_json::Value;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn hop(gw: &str) -> PathHop {
    PathHop::via(gw.parse().unwrap())
}

struct Lab {
    node: OwnedNetns,
    /// Held for its `Drop`, which deletes the namespace.
    _peer: OwnedNetns,
    v0: u32,
    w0: u32,
}

fn lab() -> Lab {
    let node = netns();
    let peer = netns();
    let mut n = nl(&node);
    let mut p = nl(&peer);
    let v6 = AddressOptions {
        nodad: true,
        ..Default::default()
    };
    for (here, there, a4, a6, b4, b6) in [
        (
            "v0",
            "v1",
            "192.0.2.1/24",
            "2001:db8::1/64",
            "192.0.2.2/24",
            "2001:db8::2/64",
        ),
        (
            "w0",
            "w1",
            "203.0.113.1/24",
            "2001:db8:1::1/64",
            "203.0.113.2/24",
            "2001:db8:1::2/64",
        ),
    ] {
        n.create_veth(&VethSpec {
            name: here.into(),
            mac: None,
            peer_name: there.into(),
            peer_mac: None,
            mtu: None,
            peer_netns: Some(peer.path().to_path_buf()),
        })
        .unwrap();
        n.add_address(here, net(a4), AddressOptions::default())
            .unwrap();
        n.add_address(here, net(a6), v6).unwrap();
        n.set_link_up(here, true).unwrap();
        p.add_address(there, net(b4), AddressOptions::default())
            .unwrap();
        p.add_address(there, net(b6), v6).unwrap();
        p.set_link_up(there, true).unwrap();
    }
    p.add_address("lo", net("10.80.0.1/32"), AddressOptions::default())
        .unwrap();
    p.add_address("lo", net("fd00:80::1/128"), v6).unwrap();
    let v0 = n.link_index("v0").unwrap().unwrap();
    let w0 = n.link_index("w0").unwrap().unwrap();
    Lab {
        node,
        _peer: peer,
        v0,
        w0,
    }
}

/// Whether the kernel of `node` takes multipath routes of both families; prints a SKIPPED line
/// for `test` when not (IPv4 multipath needs CONFIG_IP_ROUTE_MULTIPATH).
fn kernel_has_multipath(test: &str, node: &Netns) -> bool {
    for (fam, dst, a, b) in [
        ("-4", "10.255.255.0/24", "192.0.2.2", "203.0.113.2"),
        ("-6", "fd00:ffff::/64", "2001:db8::2", "2001:db8:1::2"),
    ] {
        let out = std::process::Command::new("ip")
            .args(["-n", node.name(), fam, "route", "add", dst])
            .args(["nexthop", "via", a, "nexthop", "via", b])
            .output()
            .expect("run ip");
        if !out.status.success() {
            skipped(
                test,
                &format!(
                    "the kernel refuses a {fam} multipath route ({}); is CONFIG_IP_ROUTE_MULTIPATH off?",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return false;
        }
        ip(node, &[fam, "route", "del", dst]);
    }
    true
}

#[test]
fn netns_multipath_routes_install_reapply_replace_delete() {
    let test = "netns_multipath_routes_install_reapply_replace_delete";
    if !can_run(test) {
        return;
    }
    let lab = lab();
    if !kernel_has_multipath(test, &lab.node) {
        return;
    }
    let (w, _t) = RouteWriter::spawn(Some(lab.node.path().to_path_buf())).unwrap();

    // One hop names its device, the other lets the kernel find it from the gateway.
    let v4 = Route::multipath(
        net("10.80.0.0/24"),
        vec![
            PathHop::via_dev("192.0.2.2".parse().unwrap(), "v0", false).with_weight(3),
            hop("203.0.113.2"),
        ],
    );
    let v6 = Route::multipath(
        net("fd00:80::/64"),
        vec![
            hop("2001:db8::2").with_weight(2),
            PathHop::via_dev("2001:db8:1::2".parse().unwrap(), "w0", false),
        ],
    );
    // A table above 255 (RTA_TABLE only) and a metric, IPv6.
    let v6_t = Route::multipath(
        net("fd00:81::/64"),
        vec![hop("2001:db8::2"), hop("2001:db8:1::2").with_weight(256)],
    )
    .in_table(1000)
    .with_metric(300);
    replace(&w, &[&v4, &v6, &v6_t]);

    let v4_hops = hops(&[("192.0.2.2", "v0", 3), ("203.0.113.2", "w0", 1)]);
    let v6_hops = hops(&[("2001:db8::2", "v0", 2), ("2001:db8:1::2", "w0", 1)]);
    assert_eq!(kernel_hops(&lab.node, "10.80.0.0/24", MAIN_TABLE), v4_hops);
    assert_eq!(kernel_hops(&lab.node, "fd00:80::/64", MAIN_TABLE), v6_hops);
    assert_eq!(
        kernel_hops(&lab.node, "fd00:81::/64", 1000),
        hops(&[("2001:db8::2", "v0", 1), ("2001:db8:1::2", "w0", 256)])
    );

    // The writer's dump reads each back as one multipath route, devices resolved, and the
    // comparison the node agent uses sees them as installed.
    for r in [&v4, &v6, &v6_t] {
        let k = dumped(&w, r.key());
        assert!(r.matches(&k), "{r} vs {k}");
        assert_eq!((k.gateway, k.oif), (None, None), "{k}");
        let oifs: HashSet<u32> = k.oifs().collect();
        assert_eq!(oifs, [lab.v0, lab.w0].into(), "{k}");
    }
    assert_eq!(dumped(&w, v6_t.key()).metric, Some(300));
    // A device filter finds a multipath route through any of its next hops.
    let through_w0 = w
        .dump_blocking(RouteFilter {
            device: Some("w0".into()),
            ..RouteFilter::margay()
        })
        .unwrap();
    assert_eq!(through_w0.len(), 3, "{through_w0:?}");

    // Traffic flows through the route.
    assert!(ping(&lab.node, "10.80.0.1", 3), "ping 10.80.0.1");
    assert!(ping(&lab.node, "fd00:80::1", 3), "ping fd00:80::1");

    // Re-applying the same routes changes nothing: same next hops, no extra IPv6 siblings.
    let before4 = ip(&lab.node, &["-j", "-4", "route", "show", "table", "all"]);
    let before6 = ip(&lab.node, &["-j", "-6", "route", "show", "table", "all"]);
    replace(&w, &[&v4, &v6, &v6_t]);
    assert_eq!(
        ip(&lab.node, &["-j", "-4", "route", "show", "table", "all"]),
        before4
    );
    assert_eq!(
        ip(&lab.node, &["-j", "-6", "route", "show", "table", "all"]),
        before6
    );

    // A changed set replaces the route: another gateway and weights for IPv4; IPv6 goes to a
    // single next hop and back to a set of three.
    let v4b = Route::multipath(
        net("10.80.0.0/24"),
        vec![hop("192.0.2.3"), hop("203.0.113.2").with_weight(5)],
    );
    let v6_single = Route::via(net("fd00:80::/64"), "2001:db8:1::2".parse().unwrap());
    assert!(!v4b.matches(&dumped(&w, v4.key())));
    replace(&w, &[&v4b, &v6_single]);
    assert_eq!(
        kernel_hops(&lab.node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("192.0.2.3", "v0", 1), ("203.0.113.2", "w0", 5)])
    );
    assert_eq!(
        kernel_hops(&lab.node, "fd00:80::/64", MAIN_TABLE),
        hops(&[("2001:db8:1::2", "w0", 0)])
    );
    assert!(v4b.matches(&dumped(&w, v4.key())));
    assert!(!v4.matches(&dumped(&w, v4.key())));
    assert!(v6_single.matches(&dumped(&w, v6.key())));
    assert!(!v6.matches(&dumped(&w, v6.key())));
    let v6c = Route::multipath(
        net("fd00:80::/64"),
        vec![hop("2001:db8::2"), hop("2001:db8::3"), hop("2001:db8:1::2")],
    );
    replace(&w, &[&v6c]);
    assert_eq!(
        kernel_hops(&lab.node, "fd00:80::/64", MAIN_TABLE),
        hops(&[
            ("2001:db8::2", "v0", 1),
            ("2001:db8::3", "v0", 1),
            ("2001:db8:1::2", "w0", 1)
        ])
    );
    assert!(v6c.matches(&dumped(&w, v6.key())));

    // Refusals are per route: a gateway that is on no link makes the kernel refuse the whole
    // set (nothing installed); a one-hop multipath route never reaches the kernel.
    let unreachable = Route::multipath(
        net("10.90.0.0/24"),
        vec![hop("192.0.2.2"), hop("198.51.100.1")],
    );
    let one_hop = Route {
        next_hop: NextHop::Multipath(vec![hop("192.0.2.2")]),
        ..Route::blackhole(net("10.91.0.0/24"))
    };
    let results = w
        .apply_blocking(vec![
            WriteOp::ReplaceRoute(unreachable.clone()),
            WriteOp::ReplaceRoute(one_hop),
        ])
        .unwrap();
    let e = results[0].as_ref().unwrap_err();
    assert!(matches!(e, KernelError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("10.90.0.0/24"), "{e}");
    assert!(
        matches!(&results[1], Err(KernelError::Invalid(m)) if m.contains("at least two")),
        "{:?}",
        results[1]
    );
    let all4 = ip(&lab.node, &["-4", "route", "show", "table", "all"]);
    assert!(
        !all4.contains("10.90.0.0") && !all4.contains("10.91.0.0"),
        "{all4}"
    );

    // Delete removes every next hop; deleting again is success.
    let dels: Vec<WriteOp> = [&v4, &v6, &v6_t]
        .iter()
        .map(|r| WriteOp::DeleteRoute(r.key()))
        .collect();
    all_ok(&w.apply_blocking(dels.clone()).unwrap());
    for fam in ["-4", "-6"] {
        let left = ip(
            &lab.node,
            &[fam, "route", "show", "table", "all", "proto", "77"],
        );
        assert_eq!(left.trim(), "", "{fam}: {left}");
    }
    all_ok(&w.apply_blocking(dels).unwrap());
    assert!(w.dump_blocking(RouteFilter::margay()).unwrap().is_empty());
}

#[test]
fn netns_multipath_sweep_removes_stale_multipath_routes_only() {
    let test = "netns_multipath_sweep_removes_stale_multipath_routes_only";
    if !can_run(test) {
        return;
    }
    let lab = lab();
    if !kernel_has_multipath(test, &lab.node) {
        return;
    }
    let node = &lab.node;
    // Left by a previous run (ours, protocol 77), and another daemon's multipath route.
    let mp = |fam: &str, dst: &str, proto: &str, a: &str, b: &str| {
        ip(
            node,
            &[
                fam, "route", "add", dst, "proto", proto, "nexthop", "via", a, "weight", "2",
                "nexthop", "via", b,
            ],
        );
    };
    mp("-4", "10.81.0.0/24", "77", "192.0.2.2", "203.0.113.2");
    mp("-6", "fd00:81::/64", "77", "2001:db8::2", "2001:db8:1::2");
    mp("-4", "10.82.0.0/24", "bird", "192.0.2.2", "203.0.113.2");
    mp("-6", "fd00:82::/64", "bird", "2001:db8::2", "2001:db8:1::2");

    let (w, _t) = RouteWriter::spawn(Some(node.path().to_path_buf())).unwrap();
    let keep4 = Route::multipath(
        net("10.83.0.0/24"),
        vec![hop("192.0.2.2"), hop("203.0.113.2")],
    );
    let keep6 = Route::multipath(
        net("fd00:83::/64"),
        vec![hop("2001:db8::2"), hop("2001:db8:1::2")],
    );
    replace(&w, &[&keep4, &keep6]);

    // The stale routes decode as ours, one route per prefix, with their weights.
    let stale6 = dumped(&w, RouteKey::new(MAIN_TABLE, net("fd00:81::/64")));
    let weights: Vec<u16> = stale6.multipath.iter().map(|h| h.weight).collect();
    assert_eq!(weights, vec![2, 1], "{stale6}");
    assert_eq!(stale6.family(), Family::V6);

    let desired: HashSet<RouteKey> = [keep4.key(), keep6.key()].into();
    let report = w.sweep_blocking(RouteFilter::default(), desired).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        report.examined, 4,
        "four multipath routes of ours, each seen once"
    );
    let mut removed = report.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            RouteKey::new(MAIN_TABLE, net("10.81.0.0/24")),
            RouteKey::new(MAIN_TABLE, net("fd00:81::/64")),
        ]
    );
    let s4 = ip(node, &["-4", "route", "show"]);
    let s6 = ip(node, &["-6", "route", "show"]);
    assert!(!s4.contains("10.81.0.0/24"), "{s4}");
    assert!(!s6.contains("fd00:81::/64"), "{s6}");
    for (dst, proto) in [
        ("10.82.0.0/24", "bird"),
        ("fd00:82::/64", "bird"),
        ("10.83.0.0/24", "77"),
        ("fd00:83::/64", "77"),
    ] {
        let fam = if dst.contains(':') { "-6" } else { "-4" };
        let out = ip(
            node,
            &["-j", fam, "route", "show", "proto", proto, "exact", dst],
        );
        let routes: Vec<Value> = serde_json::from_str(&out).unwrap();
        assert_eq!(routes.len(), 1, "{dst}: {out}");
        assert_eq!(
            routes[0]["nexthops"].as_array().map(Vec::len),
            Some(2),
            "{dst} keeps both next hops: {out}"
        );
    }

    // Nothing left to sweep.
    let again = w
        .sweep_blocking(RouteFilter::default(), [keep4.key(), keep6.key()].into())
        .unwrap();
    assert!(again.removed.is_empty(), "{:?}", again.removed);
}

#[test]
fn netns_host_mtu_is_the_smallest_over_a_multipath_default_route() {
    let test = "netns_host_mtu_is_the_smallest_over_a_multipath_default_route";
    if !can_run(test) {
        return;
    }
    let lab = lab();
    if !kernel_has_multipath(test, &lab.node) {
        return;
    }
    let mut n = nl(&lab.node);
    n.set_link_mtu("w0", 1400).unwrap();
    all_ok(&n.apply(&[WriteOp::ReplaceRoute(Route::multipath(
        net("0.0.0.0/0"),
        vec![hop("192.0.2.2"), hop("203.0.113.2")],
    ))]));
    assert_eq!(n.host_mtu(None).unwrap(), 1400);
}
