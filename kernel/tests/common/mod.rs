//! Helpers for the privileged tests: unique namespaces that delete themselves, `ip` as an
//! independent oracle, ping.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use margay_kernel::netns::{Netns, OwnedNetns};
use margay_kernel::Netlink;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Says that `test` did not run because this kernel lacks a feature (listed in the test
/// command's summary; allowed under `CI=true`).
pub fn skipped(test: &str, why: &str) {
    margay_testkit::skip(test, margay_testkit::Lack::KernelFeature, why);
}

/// Returns false (after saying so) when the test cannot run here: not root. Under `CI=true`
/// that fails the test instead.
pub fn can_run(test: &str) -> bool {
    margay_testkit::root_or_skip(test)
}

/// Returns false (after saying so) when `tool` is missing; a failure under `CI=true`.
pub fn have_tool(test: &str, tool: &str) -> bool {
    margay_testkit::tool_or_skip(test, tool)
}

/// A fresh namespace `mgk-<pid>-<n>`, deleted on drop.
///
/// The first call also deletes `mgk-<pid>-*` namespaces whose process is gone (a test that was
/// killed never ran its guards' `Drop`).
pub fn netns() -> OwnedNetns {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for name in margay_kernel::netns::list_named().unwrap_or_default() {
            let Some(pid) = name
                .strip_prefix("mgk-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = margay_kernel::netns::delete_named(&name);
            }
        }
    });
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let name = format!("mgk-{}-{n}", std::process::id());
    OwnedNetns::create(&name).unwrap_or_else(|e| panic!("create netns {name}: {e}"))
}

/// Runs `ip -n <ns> <args>` and returns stdout; panics with stderr on failure.
pub fn ip(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {} {}: {}",
        ns.name(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command inside `ns` (`ip netns exec`), returning (success, stdout+stderr).
pub fn exec(ns: &Netns, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(cmd)
        .output()
        .expect("run ip netns exec");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Pings `addr` from `ns` up to `tries` times (1 s each); true on the first reply.
pub fn ping(ns: &Netns, addr: &str, tries: u32) -> bool {
    for _ in 0..tries {
        if exec(ns, &["ping", "-c", "1", "-W", "1", addr]).0 {
            return true;
        }
    }
    false
}

/// Opens a netlink connection in `ns` and brings `lo` up.
pub fn nl(ns: &Netns) -> Netlink {
    let mut nl = Netlink::open_in(ns.path()).expect("open netlink in netns");
    nl.set_link_up("lo", true).expect("lo up");
    nl
}

/// Asserts every result is Ok.
pub fn all_ok(results: &[Result<(), margay_kernel::KernelError>]) {
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            panic!("op {i} failed: {e}");
        }
    }
}

/// What [`attach_pod`] made.
pub struct Pod {
    pub host_if: String,
    pub v4: IpNet,
    pub v6: IpNet,
}

use ipnet::IpNet;
use margay_kernel::link::{ipv6_link_local, pod_routes, HOST_VETH_MAC};
use margay_kernel::{sysctl, AddressOptions, Route, RouteWriter, VethSpec, WriteOp};

/// Wires `pod` to `node` the way the CNI plugin does: a veth `host_if` (MAC ee:ee:ee:ee:ee:ee,
/// proxy ARP, proxy_delay 0) in `node`, its peer moved into `pod` and renamed `eth0`, the pod's
/// /32 and /128 with Calico's routes, and host routes to them in `node` through `writer`.
pub fn attach_pod(
    node: &Netns,
    pod: &Netns,
    writer: &RouteWriter,
    host_if: &str,
    v4: &str,
    v6: &str,
) -> Pod {
    let v4: IpNet = v4.parse().unwrap();
    let v6: IpNet = v6.parse().unwrap();
    let mut n = Netlink::open_in(node.path()).unwrap();
    let tmp = format!("tmp{}", &host_if[host_if.len() - 6..]);
    n.create_veth(&VethSpec {
        name: host_if.into(),
        mac: Some(HOST_VETH_MAC),
        peer_name: tmp.clone(),
        peer_mac: None,
        mtu: Some(1450),
        peer_netns: None,
    })
    .unwrap();
    let mut p = n.move_link_and_rename(&tmp, pod.path(), "eth0").unwrap();
    p.set_link_up("lo", true).unwrap();
    p.add_address("eth0", v4, AddressOptions::default())
        .unwrap();
    p.add_address(
        "eth0",
        v6,
        AddressOptions {
            nodad: true,
            ..Default::default()
        },
    )
    .unwrap();
    p.set_link_up("eth0", true).unwrap();
    let routes = pod_routes("eth0", true, Some(ipv6_link_local(&HOST_VETH_MAC)));
    let ops: Vec<WriteOp> = routes.into_iter().map(WriteOp::ReplaceRoute).collect();
    all_ok(&p.apply(&ops));

    let host = host_if.to_string();
    node.run(move || {
        sysctl::set_proxy_arp(&host, true).unwrap();
        sysctl::set_neigh_proxy_delay(&host, 0).unwrap();
        sysctl::set_accept_ra(&host, 0).unwrap();
    })
    .unwrap();
    n.set_link_up(host_if, true).unwrap();
    all_ok(
        &writer
            .apply_blocking(vec![
                WriteOp::ReplaceRoute(Route::dev(v4, host_if)),
                WriteOp::ReplaceRoute(Route::dev(v6, host_if)),
            ])
            .unwrap(),
    );
    Pod {
        host_if: host_if.into(),
        v4,
        v6,
    }
}

/// Gives `node` an uplink veth `up0` (peer `up1`, both in `node`, both up) with `addr`
/// (v4 /24) and `addr6` (/64), and default routes through it, so proxy ARP has a route to
/// answer for and the node has source addresses; turns forwarding on.
pub fn node_uplink(node: &Netns, addr: &str, gw: &str, addr6: &str, gw6: &str) {
    // A node forwards (proxy ARP also answers only for forwarded destinations).
    node.run(|| {
        sysctl::set_ipv4_forwarding(true).unwrap();
        sysctl::set_ipv6_forwarding(true).unwrap();
    })
    .unwrap();
    let mut n = Netlink::open_in(node.path()).unwrap();
    n.set_link_up("lo", true).unwrap();
    n.create_veth(&VethSpec {
        name: "up0".into(),
        mac: None,
        peer_name: "up1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: None,
    })
    .unwrap();
    n.set_link_up("up0", true).unwrap();
    n.set_link_up("up1", true).unwrap();
    n.add_address("up0", addr.parse().unwrap(), AddressOptions::default())
        .unwrap();
    n.add_address(
        "up0",
        addr6.parse().unwrap(),
        AddressOptions {
            nodad: true,
            ..Default::default()
        },
    )
    .unwrap();
    all_ok(&n.apply(&[
        WriteOp::ReplaceRoute(Route::via(
            "0.0.0.0/0".parse().unwrap(),
            gw.parse().unwrap(),
        )),
        WriteOp::ReplaceRoute(Route::via("::/0".parse().unwrap(), gw6.parse().unwrap())),
    ]));
}

/// The next hops `ip -j` reports for the one route `dst` of ours (protocol 77) in `table`, as
/// (gateway as `ip route` writes it, device, weight): `inet6 <addr>` for a `via` (`RTA_VIA`)
/// gateway, the bare address for an `RTA_GATEWAY` one. A single-path route gives one entry of
/// weight 0 (`ip` prints none).
pub fn kernel_hops(ns: &Netns, dst: &str, table: u32) -> Vec<(String, String, u64)> {
    let fam = if dst.contains(':') { "-6" } else { "-4" };
    let table = table.to_string();
    let out = ip(
        ns,
        &[
            "-j", fam, "route", "show", "table", &table, "proto", "77", "exact", dst,
        ],
    );
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(routes.len(), 1, "one route {dst} in table {table}: {out}");
    let r = &routes[0];
    let gateway = |h: &serde_json::Value| match (&h["via"], &h["gateway"]) {
        (serde_json::Value::Object(via), _) => format!(
            "{} {}",
            via["family"].as_str().unwrap_or("?"),
            via["host"].as_str().unwrap_or("?")
        ),
        (_, serde_json::Value::String(g)) => g.clone(),
        _ => String::new(),
    };
    let dev = |h: &serde_json::Value| h["dev"].as_str().unwrap_or_default().to_string();
    match r["nexthops"].as_array() {
        Some(hops) => hops
            .iter()
            .map(|h| (gateway(h), dev(h), h["weight"].as_u64().unwrap()))
            .collect(),
        None => vec![(gateway(r), dev(r), 0)],
    }
}

/// `(gateway, device, weight)` triples as [`kernel_hops`] returns them.
pub fn hops(v: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    v.iter()
        .map(|(g, d, w)| (g.to_string(), d.to_string(), *w))
        .collect()
}

/// The writer's dump of our route `key`; exactly one route, or a panic.
pub fn dumped(w: &RouteWriter, key: margay_kernel::RouteKey) -> margay_kernel::KernelRoute {
    let all: Vec<margay_kernel::KernelRoute> = w
        .dump_blocking(margay_kernel::RouteFilter::margay())
        .unwrap()
        .into_iter()
        .filter(|r| r.key() == key)
        .collect();
    assert_eq!(all.len(), 1, "one route for {key}: {all:?}");
    all.into_iter().next().unwrap()
}

/// Replaces `routes` through the writer; every op must succeed.
pub fn replace(w: &RouteWriter, routes: &[&Route]) {
    all_ok(
        &w.apply_blocking(
            routes
                .iter()
                .map(|r| WriteOp::ReplaceRoute((*r).clone()))
                .collect(),
        )
        .unwrap(),
    );
}
