//! The route writer against a real kernel, in namespaces the tests create. `ip` is the oracle.

mod common;

use std::collections::HashSet;

use common::{all_ok, can_run, ip, netns, nl};
use ipnet::IpNet;
use margay_kernel::netns::Netns;
use margay_kernel::{
    AddressOptions, Family, KernelError, Route, RouteFilter, RouteKey, RouteWriter, VethSpec,
    WriteOp, MAIN_TABLE,
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A namespace with a veth pair v0/v1 up, 192.0.2.1/24 and 2001:db8::1/64 on v0.
fn routed_netns() -> margay_kernel::netns::OwnedNetns {
    let ns = netns();
    let mut nl = nl(&ns);
    nl.create_veth(&VethSpec {
        name: "v0".into(),
        mac: None,
        peer_name: "v1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: None,
    })
    .unwrap();
    nl.set_link_up("v0", true).unwrap();
    nl.set_link_up("v1", true).unwrap();
    nl.add_address("v0", net("192.0.2.1/24"), AddressOptions::default())
        .unwrap();
    nl.add_address(
        "v0",
        net("2001:db8::1/64"),
        AddressOptions {
            nodad: true,
            ..Default::default()
        },
    )
    .unwrap();
    ns
}

fn show(ns: &Netns, args: &[&str]) -> String {
    let mut a = vec!["route", "show"];
    a.extend_from_slice(args);
    ip(ns, &a)
}

fn show6(ns: &Netns, args: &[&str]) -> String {
    let mut a = vec!["-6", "route", "show"];
    a.extend_from_slice(args);
    ip(ns, &a)
}

#[test]
fn netns_route_forms_add_replace_delete() {
    if !can_run("netns_route_forms_add_replace_delete") {
        return;
    }
    let ns = routed_netns();
    let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).unwrap();
    let gw = |s: &str| s.parse().unwrap();
    let routes = [
        Route::via(net("10.65.1.0/26"), gw("192.0.2.2")),
        Route::via_dev(net("10.65.2.0/26"), gw("192.0.2.9"), "v0", true),
        Route::dev(net("10.65.0.5/32"), "v0"),
        Route::blackhole(net("10.65.3.0/26")),
        Route::via(net("10.65.4.0/26"), gw("192.0.2.2")).in_table(100),
        Route::via(net("fd00:65::/122"), gw("2001:db8::2")),
        Route::dev(net("fd00:65::5/128"), "v0"),
        Route::blackhole(net("fd00:65:1::/122")),
    ];
    all_ok(
        &w.apply_blocking(routes.iter().cloned().map(WriteOp::ReplaceRoute).collect())
            .unwrap(),
    );

    let s = show(&ns, &["proto", "77"]);
    assert!(s.contains("10.65.1.0/26 via 192.0.2.2 dev v0"), "{s}");
    assert!(
        s.contains("10.65.2.0/26 via 192.0.2.9 dev v0 onlink"),
        "{s}"
    );
    assert!(s.contains("10.65.0.5 dev v0 scope link"), "{s}");
    assert!(s.contains("blackhole 10.65.3.0/26"), "{s}");
    assert!(
        show(&ns, &["table", "100"]).contains("10.65.4.0/26 via 192.0.2.2 dev v0 proto 77"),
        "table 100"
    );
    let s6 = show6(&ns, &["proto", "77"]);
    assert!(s6.contains("fd00:65::/122 via 2001:db8::2 dev v0"), "{s6}");
    assert!(s6.contains("fd00:65::5 dev v0"), "{s6}");
    assert!(s6.contains("blackhole fd00:65:1::/122"), "{s6}");

    // The dump sees exactly ours.
    let mut ours: Vec<RouteKey> = w
        .dump_blocking(RouteFilter::margay())
        .unwrap()
        .iter()
        .map(|r| r.key())
        .collect();
    ours.sort();
    let mut want: Vec<RouteKey> = routes.iter().map(Route::key).collect();
    want.sort();
    assert_eq!(ours, want);
    let v6_on_v0 = w
        .dump_blocking(RouteFilter {
            family: Some(Family::V6),
            device: Some("v0".into()),
            ..RouteFilter::margay()
        })
        .unwrap();
    assert_eq!(v6_on_v0.len(), 2, "{v6_on_v0:?}");

    // Replace: new gateway, and a blackhole becomes a unicast route; still one route each.
    all_ok(
        &w.apply_blocking(vec![
            WriteOp::ReplaceRoute(Route::via(net("10.65.1.0/26"), gw("192.0.2.3"))),
            WriteOp::ReplaceRoute(Route::via(net("10.65.3.0/26"), gw("192.0.2.4"))),
            WriteOp::ReplaceRoute(Route::via(net("fd00:65::/122"), gw("2001:db8::3"))),
        ])
        .unwrap(),
    );
    let s = show(&ns, &["10.65.1.0/26"]);
    assert_eq!(
        s.trim(),
        "10.65.1.0/26 via 192.0.2.3 dev v0 proto 77",
        "{s}"
    );
    let s = show(&ns, &["10.65.3.0/26"]);
    assert_eq!(
        s.trim(),
        "10.65.3.0/26 via 192.0.2.4 dev v0 proto 77",
        "{s}"
    );
    let s6 = show6(&ns, &["fd00:65::/122"]);
    assert_eq!(s6.lines().count(), 1, "{s6}");
    assert!(s6.contains("via 2001:db8::3"), "{s6}");

    // Delete everything, then delete again: gone is success.
    let dels: Vec<WriteOp> = routes
        .iter()
        .map(|r| WriteOp::DeleteRoute(r.key()))
        .collect();
    all_ok(&w.apply_blocking(dels.clone()).unwrap());
    assert_eq!(show(&ns, &["proto", "77"]).trim(), "");
    assert_eq!(show(&ns, &["table", "100"]).trim(), "");
    assert_eq!(show6(&ns, &["proto", "77"]).trim(), "");
    all_ok(&w.apply_blocking(dels).unwrap());
}

#[test]
fn netns_route_errors_are_reported_per_route() {
    if !can_run("netns_route_errors_are_reported_per_route") {
        return;
    }
    let ns = routed_netns();
    let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).unwrap();
    let results = w
        .apply_blocking(vec![
            WriteOp::ReplaceRoute(Route::blackhole(net("10.66.0.0/26"))),
            // No such device: caught before the kernel.
            WriteOp::ReplaceRoute(Route::dev(net("10.66.1.0/26"), "nosuchdev0")),
            // Gateway not on any link: the kernel refuses.
            WriteOp::ReplaceRoute(Route::via(
                net("10.66.2.0/26"),
                "198.51.100.1".parse().unwrap(),
            )),
            WriteOp::ReplaceRoute(Route::blackhole(net("10.66.3.0/26"))),
        ])
        .unwrap();
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(KernelError::NoSuchDevice { name }) if name == "nosuchdev0"),
        "{:?}",
        results[1]
    );
    let e = results[2].as_ref().unwrap_err();
    assert_eq!(
        e.errno(),
        Some(nix::errno::Errno::ENETUNREACH as i32),
        "{e}"
    );
    assert!(e.to_string().contains("10.66.2.0/26"), "{e}");
    assert!(results[3].is_ok());
    let s = show(&ns, &["proto", "77"]);
    assert!(
        s.contains("10.66.0.0/26") && s.contains("10.66.3.0/26"),
        "{s}"
    );
    assert!(!s.contains("10.66.2.0/26"), "{s}");
}

#[test]
fn netns_route_big_pipelined_batch_attributes_errors_exactly() {
    if !can_run("netns_route_big_pipelined_batch_attributes_errors_exactly") {
        return;
    }
    let ns = routed_netns();
    let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).unwrap();
    // 20,000 routes; every 997th has an unreachable gateway. The pipelined batches must pin
    // each refusal on the right route.
    let n = 20_000u32;
    let ops: Vec<WriteOp> = (0..n)
        .map(|i| {
            let dst = IpNet::new(
                std::net::Ipv4Addr::from(0x0a00_0000u32 + (i << 2)).into(),
                30,
            )
            .unwrap();
            let gw = if i % 997 == 0 {
                "198.51.100.1"
            } else {
                "192.0.2.2"
            };
            WriteOp::ReplaceRoute(Route::via(dst, gw.parse().unwrap()))
        })
        .collect();
    let results = w.apply_blocking(ops.clone()).unwrap();
    let failed: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i)
        .collect();
    let want: Vec<usize> = (0..n as usize).filter(|i| i % 997 == 0).collect();
    assert_eq!(failed, want);
    let installed = w.dump_blocking(RouteFilter::margay()).unwrap();
    assert_eq!(installed.len(), n as usize - want.len());
    // Delete all, including the ones that never made it: all succeed.
    let dels: Vec<WriteOp> = ops
        .iter()
        .map(|o| match o {
            WriteOp::ReplaceRoute(r) => WriteOp::DeleteRoute(r.key()),
            _ => unreachable!(),
        })
        .collect();
    all_ok(&w.apply_blocking(dels).unwrap());
    assert!(w.dump_blocking(RouteFilter::margay()).unwrap().is_empty());
}

#[test]
fn netns_route_sweep_removes_only_stale_margay_routes() {
    if !can_run("netns_route_sweep_removes_only_stale_margay_routes") {
        return;
    }
    let ns = routed_netns();
    // What a previous run left: ours (proto 77), and other daemons' routes.
    ip(
        &ns,
        &[
            "route",
            "add",
            "10.70.1.0/24",
            "via",
            "192.0.2.2",
            "proto",
            "77",
        ],
    );
    ip(
        &ns,
        &[
            "route",
            "add",
            "blackhole",
            "10.70.9.0/24",
            "proto",
            "77",
            "table",
            "100",
        ],
    );
    ip(
        &ns,
        &[
            "-6",
            "route",
            "add",
            "fd00:70:1::/64",
            "via",
            "2001:db8::2",
            "proto",
            "77",
        ],
    );
    ip(
        &ns,
        &[
            "route",
            "add",
            "10.70.0.0/24",
            "via",
            "192.0.2.2",
            "proto",
            "static",
        ],
    );
    ip(
        &ns,
        &[
            "route",
            "add",
            "10.70.5.0/24",
            "via",
            "192.0.2.2",
            "proto",
            "bird",
        ],
    );
    let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).unwrap();
    let keep = Route::blackhole(net("10.70.2.0/24"));
    all_ok(
        &w.apply_blocking(vec![WriteOp::ReplaceRoute(keep.clone())])
            .unwrap(),
    );

    let desired: HashSet<RouteKey> = [keep.key()].into();
    let report = w.sweep_blocking(RouteFilter::default(), desired).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut removed = report.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            RouteKey::new(100, net("10.70.9.0/24")),
            RouteKey::new(MAIN_TABLE, net("10.70.1.0/24")),
            RouteKey::new(MAIN_TABLE, net("fd00:70:1::/64")),
        ]
    );
    let s = show(&ns, &[]);
    assert!(
        s.contains("10.70.0.0/24 via 192.0.2.2 dev v0 proto static"),
        "{s}"
    );
    assert!(
        s.contains("10.70.5.0/24 via 192.0.2.2 dev v0 proto bird"),
        "{s}"
    );
    assert!(s.contains("blackhole 10.70.2.0/24 proto 77"), "{s}");
    assert!(!s.contains("10.70.1.0/24"), "{s}");
    assert_eq!(show(&ns, &["table", "100"]).trim(), "");
    assert_eq!(show6(&ns, &["proto", "77"]).trim(), "");

    // A delete of a prefix someone else owns succeeds for us (ours is gone) but leaves theirs.
    all_ok(
        &w.apply_blocking(vec![WriteOp::DeleteRoute(RouteKey::new(
            MAIN_TABLE,
            net("10.70.0.0/24"),
        ))])
        .unwrap(),
    );
    assert!(show(&ns, &["10.70.0.0/24"]).contains("proto static"));

    // Sweeping again finds nothing.
    let again = w
        .sweep_blocking(RouteFilter::default(), [keep.key()].into())
        .unwrap();
    assert!(again.removed.is_empty());
}

#[test]
fn netns_route_receive_queue_overflow_falls_back_without_losing_errors() {
    if !can_run("netns_route_receive_queue_overflow_falls_back_without_losing_errors") {
        return;
    }
    let ns = routed_netns();
    let mut n = nl(&ns);
    // A tiny receive buffer and long batches: a batch of failures overflows the queue, the
    // kernel drops error replies, and the writer must notice and resend one by one.
    n.tune(Some(4096), Some(4096)).unwrap();
    let gone: Vec<WriteOp> = (0..3000u32)
        .map(|i| {
            let dst = IpNet::new(
                std::net::Ipv4Addr::from(0x0b00_0000u32 + (i << 8)).into(),
                24,
            )
            .unwrap();
            WriteOp::DeleteRoute(RouteKey::new(MAIN_TABLE, dst))
        })
        .collect();
    all_ok(&n.apply(&gone));
    let mut mixed = Vec::new();
    for i in 0..3000u32 {
        let dst = IpNet::new(
            std::net::Ipv4Addr::from(0x0c00_0000u32 + (i << 8)).into(),
            24,
        )
        .unwrap();
        // Two thirds refused (gateway unreachable), one third fine.
        let gw = if i % 3 == 0 {
            "192.0.2.2"
        } else {
            "198.51.100.1"
        };
        mixed.push(WriteOp::ReplaceRoute(Route::via(dst, gw.parse().unwrap())));
    }
    let results = n.apply(&mixed);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i % 3 == 0, "op {i}: {r:?}");
    }
    assert_eq!(n.routes(&RouteFilter::margay()).unwrap().len(), 1000);
}
