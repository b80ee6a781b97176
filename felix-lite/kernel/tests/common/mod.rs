//! Helpers for the privileged tests: unique namespaces that delete themselves, `ip` as an
//! independent oracle, ping.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use margay_kernel::netns::{Netns, OwnedNetns};
use margay_kernel::Netlink;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Prints a `SKIPPED <test>: <why>` line straight to the process's stderr, which the test
/// harness does not capture, so it shows in every run.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
}

/// Returns false (after printing a SKIPPED line) when the test cannot run here.
pub fn can_run(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        skipped(test, "needs root to create network namespaces");
        return false;
    }
    true
}

/// Returns false (after printing a SKIPPED line) when `tool` is missing.
pub fn have_tool(test: &str, tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skipped(test, &format!("the {tool} command is not installed"));
    }
    ok
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
