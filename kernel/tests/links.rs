//! Links, addresses, pod wiring, sysctls, MTU and the netns helpers against a real kernel.

mod common;

use common::{attach_pod, can_run, exec, have_tool, ip, netns, nl, node_uplink, ping};
use margay_kernel::link::HOST_VETH_MAC;
use margay_kernel::netns::{self, Netns};
use margay_kernel::{sysctl, AddressOptions, Netlink, RouteWriter, VethSpec};

#[test]
fn netns_veth_pod_wiring_and_ping() {
    let t = "netns_veth_pod_wiring_and_ping";
    if !can_run(t) || !have_tool(t, "ping") {
        return;
    }
    let node = netns();
    let pod = netns();
    node_uplink(
        &node,
        "192.0.2.10/24",
        "192.0.2.1",
        "2001:db8::10/64",
        "2001:db8::1",
    );
    let (w, _t) = RouteWriter::spawn(Some(node.path().to_path_buf())).unwrap();
    let p = attach_pod(
        &node,
        &pod,
        &w,
        "cali0123456789a",
        "10.65.0.5/32",
        "fd00:65::5/128",
    );

    // The host side, as the agent reads it.
    let mut n = Netlink::open_in(node.path()).unwrap();
    let cali = n.links_with_prefix("cali").unwrap();
    assert_eq!(cali.len(), 1);
    assert_eq!(cali[0].name, p.host_if);
    assert_eq!(cali[0].mac, Some(HOST_VETH_MAC));
    assert_eq!(cali[0].mtu, 1450);
    assert_eq!(cali[0].kind.as_deref(), Some("veth"));
    assert!(cali[0].up);
    assert_eq!(n.link_index(&p.host_if).unwrap(), Some(cali[0].index));
    assert_eq!(n.link("tmp56789a").unwrap(), None, "the peer left the node");

    // The pod side.
    let mut pn = Netlink::open_in(pod.path()).unwrap();
    let eth0 = pn.link("eth0").unwrap().expect("eth0 in the pod");
    assert_eq!(eth0.mtu, 1450);
    let addrs = pn.addresses("eth0").unwrap();
    assert!(addrs.contains(&p.v4) && addrs.contains(&p.v6), "{addrs:?}");
    let r = ip(&pod, &["route", "show"]);
    assert!(r.contains("default via 169.254.1.1 dev eth0"), "{r}");
    assert!(
        r.contains("169.254.1.1 dev eth0 proto 77 scope link"),
        "{r}"
    );
    let r6 = ip(&pod, &["-6", "route", "show", "default"]);
    assert!(
        r6.contains("via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{r6}"
    );
    assert!(
        node.run(|| sysctl::proxy_arp("cali0123456789a"))
            .unwrap()
            .unwrap(),
        "proxy_arp on the host side"
    );

    // Traffic both ways, IPv4 and IPv6.
    assert!(ping(&node, "10.65.0.5", 3), "node -> pod v4");
    assert!(
        ping(&pod, "192.0.2.10", 3),
        "pod -> node v4 (through proxy ARP)"
    );
    // The host side's link-local finishes DAD about a second after it comes up.
    assert!(ping(&node, "fd00:65::5", 6), "node -> pod v6");
    assert!(ping(&pod, "2001:db8::10", 3), "pod -> node v6");

    // Delete: both ends go; deleting again is success.
    n.delete_link(&p.host_if).unwrap();
    assert_eq!(pn.link("eth0").unwrap(), None);
    n.delete_link(&p.host_if).unwrap();
    assert!(n.links_with_prefix("cali").unwrap().is_empty());
}

#[test]
fn netns_veth_created_straight_into_pod() {
    if !can_run("netns_veth_created_straight_into_pod") {
        return;
    }
    let node = netns();
    let pod = netns();
    let mut n = nl(&node);
    n.create_veth(&VethSpec {
        name: "calib".into(),
        mac: Some(HOST_VETH_MAC),
        peer_name: "eth0".into(),
        peer_mac: Some([0x02, 0, 0, 0, 0, 5]),
        mtu: Some(1480),
        peer_netns: Some(pod.path().to_path_buf()),
    })
    .unwrap();
    let mut p = Netlink::open_in(pod.path()).unwrap();
    let eth0 = p.link("eth0").unwrap().expect("created in the pod");
    assert_eq!(eth0.mac, Some([0x02, 0, 0, 0, 0, 5]));
    assert_eq!(eth0.mtu, 1480);
    n.set_link_mtu("calib", 1400).unwrap();
    assert_eq!(n.link("calib").unwrap().unwrap().mtu, 1400);
    // Creating it again is refused, with the kernel's reason.
    let e = n
        .create_veth(&VethSpec {
            name: "calib".into(),
            mac: None,
            peer_name: "x0".into(),
            peer_mac: None,
            mtu: None,
            peer_netns: None,
        })
        .unwrap_err();
    assert_eq!(e.errno(), Some(nix::errno::Errno::EEXIST as i32), "{e}");
    // Addresses: add, replace (same address again), list, delete, delete again.
    let a = "10.65.9.1/32".parse().unwrap();
    n.add_address("calib", a, AddressOptions::default())
        .unwrap();
    n.add_address("calib", a, AddressOptions::default())
        .unwrap();
    assert_eq!(
        n.addresses("calib")
            .unwrap()
            .iter()
            .filter(|x| **x == a)
            .count(),
        1
    );
    n.delete_address("calib", a).unwrap();
    n.delete_address("calib", a).unwrap();
    assert!(!n.addresses("calib").unwrap().contains(&a));
    n.delete_link("calib").unwrap();
    assert_eq!(p.link("eth0").unwrap(), None);
}

#[test]
fn netns_sysctls_are_per_namespace() {
    if !can_run("netns_sysctls_are_per_namespace") {
        return;
    }
    let host_before = sysctl::read("net.ipv4.ip_forward").unwrap();
    let ns = netns();
    let mut n = nl(&ns);
    n.create_veth(&VethSpec {
        name: "s0".into(),
        mac: None,
        peer_name: "s1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: None,
    })
    .unwrap();
    let inside = ns
        .run(|| -> Result<_, margay_kernel::KernelError> {
            sysctl::set_ipv4_forwarding(true)?;
            sysctl::set_ipv6_forwarding(true)?;
            sysctl::set_proxy_arp("s0", true)?;
            sysctl::set_neigh_proxy_delay("s0", 0)?;
            sysctl::set_route_localnet("s0", true)?;
            sysctl::set_proxy_ndp("s0", true)?;
            sysctl::set_accept_ra("s0", 2)?;
            sysctl::set_iface_forwarding("s0", false, true)?;
            Ok((
                sysctl::ipv4_forwarding()?,
                sysctl::read("ipv6/conf/all/forwarding")?,
                sysctl::proxy_arp("s0")?,
                sysctl::read("ipv4/neigh/s0/proxy_delay")?,
                sysctl::read_iface(false, "s0", "route_localnet")?,
                sysctl::read_iface(true, "s0", "proxy_ndp")?,
                sysctl::read_iface(true, "s0", "accept_ra")?,
                sysctl::proxy_arp("s1")?,
            ))
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        inside,
        (
            true,
            "1".into(),
            true,
            "0".into(),
            "1".into(),
            "1".into(),
            "2".into(),
            false
        )
    );
    assert_eq!(sysctl::read("net.ipv4.ip_forward").unwrap(), host_before);
    // The node's interfaces are not visible from here.
    assert!(sysctl::proxy_arp("s0").is_err());
    let e = ns
        .run(|| sysctl::set_accept_ra("s0", 3))
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("accept_ra"), "{e}");
}

#[test]
fn netns_host_mtu_follows_default_route() {
    if !can_run("netns_host_mtu_follows_default_route") {
        return;
    }
    let ns = netns();
    let mut n = nl(&ns);
    assert!(n.host_mtu(None).is_err(), "no default route yet");
    n.create_veth(&VethSpec {
        name: "eth9".into(),
        mac: None,
        peer_name: "eth9p".into(),
        peer_mac: None,
        mtu: Some(9000),
        peer_netns: None,
    })
    .unwrap();
    n.set_link_up("eth9", true).unwrap();
    n.add_address(
        "eth9",
        "192.0.2.10/24".parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    ip(
        &ns,
        &["route", "add", "default", "via", "192.0.2.1", "dev", "eth9"],
    );
    let host = n.host_mtu(None).unwrap();
    assert_eq!(host, 9000);
    assert_eq!(n.host_mtu(Some("lo")).unwrap(), 65536);
    assert!(n.host_mtu(Some("nope0")).is_err());
    use margay_kernel::mtu::{pod_mtu, Encap};
    assert_eq!(pod_mtu(host, &[Encap::VxlanV4]), 8950);
}

#[test]
fn netns_helpers_create_run_delete() {
    if !can_run("netns_helpers_create_run_delete") {
        return;
    }
    let name = format!("mgk-{}-helpers", std::process::id());
    let ns = Netns::create(&name).unwrap();
    assert!(netns::list_named().unwrap().contains(&name));
    assert!(Netns::create(&name).is_err(), "name taken");
    // Inside: only lo, and the host's links are invisible.
    let links = ns
        .run(|| Netlink::open().and_then(|mut n| n.links()))
        .unwrap()
        .unwrap();
    assert_eq!(
        links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        vec!["lo"]
    );
    // `ip` sees it as one of its own.
    let (ok, out) = exec(&ns, &["ip", "link", "show", "lo"]);
    assert!(ok, "{out}");
    ns.delete().unwrap();
    assert!(!netns::list_named().unwrap().contains(&name));
    ns.delete().unwrap();
    assert!(Netlink::open_in(ns.path()).is_err());
}
