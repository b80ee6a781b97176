//! IPv4 routes through IPv6 gateways (`via inet6`, `RTA_VIA`; RFC 8950 next hops) through the
//! route writer, against a real kernel, in namespaces the tests create. `ip -j` is the oracle.
//!
//! The lab: a namespace `node` with two veths to a namespace `peer`. `v0`–`v1` is IPv6 only
//! (2001:db8::1/64 and 2001:db8::2/64, link-local fe80::1 and fe80::2); `w0`–`w1` has
//! 2001:db8:1::1/64 and 2001:db8:1::2/64, the same link-locals fe80::1 and fe80::2, and IPv4
//! 192.0.2.1/24 and 192.0.2.2/24. The IPv4 destination 10.80.0.1 sits on `peer`'s loopback,
//! the node's IPv4 source 10.79.0.1 on `node`'s, and `peer` routes back to it `via inet6
//! 2001:db8::1` over the IPv6-only link.

mod common;

use std::collections::HashSet;

use common::{all_ok, can_run, dumped, hops, ip, kernel_hops, netns, nl, ping, replace, skipped};
use ipnet::IpNet;
use margay_kernel::netns::{Netns, OwnedNetns};
use margay_kernel::{
    AddressOptions, KernelError, PathHop, Route, RouteFilter, RouteKey, RouteWriter, VethSpec,
    WriteOp, MAIN_TABLE,
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn gw(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
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
    let nodad = AddressOptions {
        nodad: true,
        ..Default::default()
    };
    for (here, there, a6, b6, v4) in [
        ("v0", "v1", "2001:db8::1/64", "2001:db8::2/64", None),
        (
            "w0",
            "w1",
            "2001:db8:1::1/64",
            "2001:db8:1::2/64",
            Some(("192.0.2.1/24", "192.0.2.2/24")),
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
        n.add_address(here, net(a6), nodad).unwrap();
        n.add_address(here, net("fe80::1/64"), nodad).unwrap();
        p.add_address(there, net(b6), nodad).unwrap();
        p.add_address(there, net("fe80::2/64"), nodad).unwrap();
        if let Some((a4, b4)) = v4 {
            n.add_address(here, net(a4), AddressOptions::default())
                .unwrap();
            p.add_address(there, net(b4), AddressOptions::default())
                .unwrap();
        }
        n.set_link_up(here, true).unwrap();
        p.set_link_up(there, true).unwrap();
    }
    n.add_address("lo", net("10.79.0.1/32"), AddressOptions::default())
        .unwrap();
    p.add_address("lo", net("10.80.0.1/32"), AddressOptions::default())
        .unwrap();
    // The way back, over the IPv6-only link (not a Margay route: `ip` writes it).
    ip(
        &peer,
        &[
            "-4",
            "route",
            "add",
            "10.79.0.1/32",
            "via",
            "inet6",
            "2001:db8::1",
            "dev",
            "v1",
        ],
    );
    let v0 = n.link_index("v0").unwrap().unwrap();
    let w0 = n.link_index("w0").unwrap().unwrap();
    Lab {
        node,
        _peer: peer,
        v0,
        w0,
    }
}

/// Whether the kernel of `node` takes `ip -4 route add <route>`; prints a SKIPPED line for
/// `test` when not (`via inet6` needs Linux 5.2, multipath CONFIG_IP_ROUTE_MULTIPATH).
fn kernel_takes(test: &str, node: &Netns, route: &[&str]) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", node.name(), "-4", "route", "add"])
        .args(route)
        .output()
        .expect("run ip");
    if !out.status.success() {
        skipped(
            test,
            &format!(
                "did not run: the kernel refuses `ip route add {}` ({}); an IPv4 route via an \
                 IPv6 gateway needs Linux 5.2 or later",
                route.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        return false;
    }
    ip(node, &["-4", "route", "del", route[0]]);
    true
}

fn all_routes(ns: &Netns) -> String {
    ip(ns, &["-j", "-4", "route", "show", "table", "all"])
}

#[test]
fn netns_ipv4_routes_via_ipv6_gateways_install_reapply_delete() {
    let test = "netns_ipv4_routes_via_ipv6_gateways_install_reapply_delete";
    if !can_run(test) {
        return;
    }
    let lab = lab();
    let node = &lab.node;
    if !kernel_takes(
        test,
        node,
        &["10.255.255.0/24", "via", "inet6", "2001:db8::2"],
    ) {
        return;
    }
    let (w, _t) = RouteWriter::spawn(Some(node.path().to_path_buf())).unwrap();

    // A global gateway without a device (the kernel finds v0), and a link-local one with its
    // device in a table above 255 with a metric.
    let global = Route::via(net("10.80.0.0/24"), gw("2001:db8::2"));
    let link_local = Route::via_dev(net("10.81.0.0/24"), gw("fe80::2"), "w0", false)
        .in_table(1000)
        .with_metric(300);
    replace(&w, &[&global, &link_local]);
    assert_eq!(
        kernel_hops(node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("inet6 2001:db8::2", "v0", 0)])
    );
    assert_eq!(
        kernel_hops(node, "10.81.0.0/24", 1000),
        hops(&[("inet6 fe80::2", "w0", 0)])
    );
    let show = ip(
        node,
        &["-4", "route", "show", "10.80.0.0/24", "proto", "77"],
    );
    assert!(show.contains("via inet6 2001:db8::2 dev v0"), "{show}");

    // The writer's dump reads the IPv6 gateways back, and the comparison the node agent uses
    // sees both routes as installed.
    let k = dumped(&w, global.key());
    assert_eq!((k.gateway, k.oif), (Some(gw("2001:db8::2")), Some(lab.v0)));
    assert!(global.matches(&k), "{global} vs {k}");
    let k = dumped(&w, link_local.key());
    assert_eq!((k.gateway, k.oif), (Some(gw("fe80::2")), Some(lab.w0)));
    assert_eq!(k.metric, Some(300));
    assert!(link_local.matches(&k), "{link_local} vs {k}");
    assert!(
        !Route::via(net("10.80.0.0/24"), gw("192.0.2.2")).matches(&dumped(&w, global.key())),
        "an IPv4 gateway is another route"
    );

    // IPv4 traffic crosses the IPv6-only link.
    assert!(ping(node, "10.80.0.1", 3), "ping 10.80.0.1 via inet6");

    // Re-applying changes nothing.
    let before = all_routes(node);
    replace(&w, &[&global, &link_local]);
    assert_eq!(all_routes(node), before);

    // The link-local gateway through the IPv6-only link replaces the global one, and still
    // forwards.
    let link_local_v0 = Route::via_dev(net("10.80.0.0/24"), gw("fe80::2"), "v0", false);
    assert!(!link_local_v0.matches(&dumped(&w, global.key())));
    replace(&w, &[&link_local_v0]);
    assert_eq!(
        kernel_hops(node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("inet6 fe80::2", "v0", 0)])
    );
    assert!(link_local_v0.matches(&dumped(&w, global.key())));
    assert!(
        ping(node, "10.80.0.1", 3),
        "ping 10.80.0.1 via inet6 fe80::2"
    );

    // Refused before the kernel sees them: a link-local gateway without its device, an IPv4
    // gateway for an IPv6 route. Nothing is installed for either.
    let results = w
        .apply_blocking(vec![
            WriteOp::ReplaceRoute(Route::via(net("10.90.0.0/24"), gw("fe80::2"))),
            WriteOp::ReplaceRoute(Route::via(net("fd00:90::/64"), gw("192.0.2.2"))),
        ])
        .unwrap();
    assert!(
        matches!(&results[0], Err(KernelError::Invalid(m)) if m.contains("link-local and needs a device")),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(KernelError::Invalid(m)) if m.contains("is IPv4 and the route IPv6")),
        "{:?}",
        results[1]
    );
    assert!(!all_routes(node).contains("10.90.0.0"));
    let all6 = ip(node, &["-6", "route", "show", "table", "all"]);
    assert!(!all6.contains("fd00:90::"), "{all6}");

    // Delete removes both; deleting again is success.
    let dels = vec![
        WriteOp::DeleteRoute(global.key()),
        WriteOp::DeleteRoute(link_local.key()),
    ];
    all_ok(&w.apply_blocking(dels.clone()).unwrap());
    let left = ip(
        node,
        &["-4", "route", "show", "table", "all", "proto", "77"],
    );
    assert_eq!(left.trim(), "", "{left}");
    all_ok(&w.apply_blocking(dels).unwrap());
    assert!(!ping(node, "10.80.0.1", 1), "no route, no reply");
}

#[test]
fn netns_ipv4_multipath_routes_through_ipv6_gateways_and_sweep() {
    let test = "netns_ipv4_multipath_routes_through_ipv6_gateways_and_sweep";
    if !can_run(test) {
        return;
    }
    let lab = lab();
    let node = &lab.node;
    if !kernel_takes(
        test,
        node,
        &[
            "10.255.255.0/24",
            "nexthop",
            "via",
            "inet6",
            "2001:db8::2",
            "nexthop",
            "via",
            "192.0.2.2",
        ],
    ) {
        return;
    }
    let (w, _t) = RouteWriter::spawn(Some(node.path().to_path_buf())).unwrap();
    let dst = net("10.80.0.0/24");

    // Every gateway IPv6: a global one without a device, a link-local one with.
    let all_v6 = Route::multipath(
        dst,
        vec![
            PathHop::via(gw("2001:db8::2")).with_weight(2),
            PathHop::via_dev(gw("fe80::2"), "w0", false),
        ],
    );
    replace(&w, &[&all_v6]);
    assert_eq!(
        kernel_hops(node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("inet6 2001:db8::2", "v0", 2), ("inet6 fe80::2", "w0", 1)])
    );
    let k = dumped(&w, all_v6.key());
    assert!(all_v6.matches(&k), "{all_v6} vs {k}");
    assert_eq!((k.gateway, k.oif), (None, None), "{k}");
    let oifs: HashSet<u32> = k.oifs().collect();
    assert_eq!(oifs, [lab.v0, lab.w0].into(), "{k}");
    assert!(ping(node, "10.80.0.1", 3), "ping 10.80.0.1, all-IPv6 set");

    let before = all_routes(node);
    replace(&w, &[&all_v6]);
    assert_eq!(all_routes(node), before, "re-applying changes nothing");

    // IPv4 and IPv6 gateways mixed in one set replace it.
    let mixed = Route::multipath(
        dst,
        vec![
            PathHop::via(gw("192.0.2.2")),
            PathHop::via_dev(gw("fe80::2"), "v0", false).with_weight(3),
        ],
    );
    assert!(!mixed.matches(&dumped(&w, all_v6.key())));
    replace(&w, &[&mixed]);
    assert_eq!(
        kernel_hops(node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("192.0.2.2", "w0", 1), ("inet6 fe80::2", "v0", 3)])
    );
    assert!(mixed.matches(&dumped(&w, mixed.key())));
    assert!(!all_v6.matches(&dumped(&w, mixed.key())));
    assert!(ping(node, "10.80.0.1", 3), "ping 10.80.0.1, mixed set");
    let before = all_routes(node);
    replace(&w, &[&mixed]);
    assert_eq!(all_routes(node), before, "re-applying changes nothing");

    // The same link-local gateway behind both links is two next hops.
    let both_links = Route::multipath(
        dst,
        vec![
            PathHop::via_dev(gw("fe80::2"), "v0", false),
            PathHop::via_dev(gw("fe80::2"), "w0", false),
        ],
    );
    replace(&w, &[&both_links]);
    assert_eq!(
        kernel_hops(node, "10.80.0.0/24", MAIN_TABLE),
        hops(&[("inet6 fe80::2", "v0", 1), ("inet6 fe80::2", "w0", 1)])
    );
    assert!(both_links.matches(&dumped(&w, both_links.key())));

    // Sweep: stale routes of ours through IPv6 gateways go, another daemon's stays.
    for (dst, proto, rest) in [
        (
            "10.82.0.0/24",
            "77",
            &[
                "nexthop",
                "via",
                "inet6",
                "2001:db8::2",
                "nexthop",
                "via",
                "inet6",
                "2001:db8:1::2",
            ][..],
        ),
        ("10.83.0.0/24", "77", &["via", "inet6", "2001:db8:1::2"][..]),
        ("10.84.0.0/24", "bird", &["via", "inet6", "2001:db8::2"][..]),
    ] {
        let mut args = vec!["-4", "route", "add", dst, "proto", proto];
        args.extend_from_slice(rest);
        ip(node, &args);
    }
    let report = w
        .sweep_blocking(RouteFilter::default(), [both_links.key()].into())
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.examined, 3, "three routes of ours");
    let mut removed = report.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            RouteKey::new(MAIN_TABLE, net("10.82.0.0/24")),
            RouteKey::new(MAIN_TABLE, net("10.83.0.0/24")),
        ]
    );
    let s = ip(node, &["-4", "route", "show"]);
    assert!(
        !s.contains("10.82.0.0/24") && !s.contains("10.83.0.0/24"),
        "{s}"
    );
    assert!(s.contains("10.84.0.0/24 via inet6 2001:db8::2"), "{s}");
    assert!(s.contains("10.80.0.0/24"), "{s}");

    // Delete removes every next hop; deleting again is success.
    let del = vec![WriteOp::DeleteRoute(both_links.key())];
    all_ok(&w.apply_blocking(del.clone()).unwrap());
    let left = ip(
        node,
        &["-4", "route", "show", "table", "all", "proto", "77"],
    );
    assert_eq!(left.trim(), "", "{left}");
    all_ok(&w.apply_blocking(del).unwrap());
    ip(
        node,
        &["-4", "route", "del", "10.84.0.0/24", "proto", "bird"],
    );
}
