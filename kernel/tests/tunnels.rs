//! VXLAN between two namespaces over a veth, and the IPIP probe.

mod common;

use common::{all_ok, can_run, have_tool, ip, netns, nl, ping};
use margay_kernel::netns::Netns;
use margay_kernel::tunnel::{VXLAN_DEVICE, VXLAN_VNI};
use margay_kernel::{
    format_mac, AddressOptions, Device, FdbEntry, Mac, Neighbour, Netlink, Route, VethSpec,
    VxlanSpec, WriteOp,
};

const MAC_A: Mac = [0x66, 0x5d, 0, 0, 0, 0x0a];
const MAC_B: Mac = [0x66, 0x5d, 0, 0, 0, 0x0b];

fn vxlan_dev() -> Device {
    Device::Name(VXLAN_DEVICE.into())
}

/// What node `me` programs to reach the remote VTEP: neighbour, FDB entry, block route.
fn remote_vtep_ops(tunnel_ip: &str, mac: Mac, underlay: &str, block: &str) -> Vec<WriteOp> {
    vec![
        WriteOp::ReplaceNeighbour(Neighbour {
            dev: vxlan_dev(),
            ip: tunnel_ip.parse().unwrap(),
            mac,
        }),
        WriteOp::ReplaceFdb(FdbEntry {
            dev: vxlan_dev(),
            mac,
            dst: underlay.parse().unwrap(),
        }),
        WriteOp::ReplaceRoute(Route::via_dev(
            block.parse().unwrap(),
            tunnel_ip.parse().unwrap(),
            VXLAN_DEVICE,
            true,
        )),
    ]
}

fn vxlan_node(ns: &Netns, underlay: &str, mac: Mac, tunnel_addr: &str) -> Netlink {
    let mut n = nl(ns);
    let spec = VxlanSpec::margay(underlay.parse().unwrap(), mac, 1450);
    let l = n.ensure_vxlan(&spec).unwrap();
    assert!(l.up);
    n.add_address(
        VXLAN_DEVICE,
        tunnel_addr.parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    n
}

#[test]
fn netns_vxlan_overlay_between_two_nodes() {
    let t = "netns_vxlan_overlay_between_two_nodes";
    if !can_run(t) || !have_tool(t, "ping") || !have_tool(t, "bridge") {
        return;
    }
    let a = netns();
    let b = netns();
    // Underlay: a veth from a to b.
    let mut na = nl(&a);
    na.create_veth(&VethSpec {
        name: "ul0".into(),
        mac: None,
        peer_name: "ul1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: Some(b.path().to_path_buf()),
    })
    .unwrap();
    na.add_address(
        "ul0",
        "192.0.2.1/24".parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    na.set_link_up("ul0", true).unwrap();
    let mut nb = nl(&b);
    nb.add_address(
        "ul1",
        "192.0.2.2/24".parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    nb.set_link_up("ul1", true).unwrap();

    let mut na = vxlan_node(&a, "192.0.2.1", MAC_A, "10.70.1.0/32");
    let mut nb = vxlan_node(&b, "192.0.2.2", MAC_B, "10.70.2.0/32");
    let dev = na.link(VXLAN_DEVICE).unwrap().unwrap();
    assert_eq!(dev.mac, Some(MAC_A));
    assert_eq!(dev.mtu, 1450);
    let p = dev.vxlan.clone().unwrap();
    assert_eq!(p.vni, Some(VXLAN_VNI));
    assert_eq!(p.port, Some(4789));
    assert_eq!(p.learning, Some(false));
    assert_eq!(p.local, Some("192.0.2.1".parse().unwrap()));

    let a_ops = remote_vtep_ops("10.70.2.0", MAC_B, "192.0.2.2", "10.70.2.0/26");
    let b_ops = remote_vtep_ops("10.70.1.0", MAC_A, "192.0.2.1", "10.70.1.0/26");
    all_ok(&na.apply(&a_ops));
    all_ok(&nb.apply(&b_ops));
    // Replace semantics: applying again is fine.
    all_ok(&na.apply(&a_ops));

    let fdb = ip_bridge(&a);
    assert!(
        fdb.contains(&format!("{} dst 192.0.2.2", format_mac(&MAC_B))),
        "{fdb}"
    );
    let neigh = ip(&a, &["neigh", "show", "dev", VXLAN_DEVICE]);
    assert!(
        neigh.contains(&format!(
            "10.70.2.0 lladdr {} PERMANENT",
            format_mac(&MAC_B)
        )),
        "{neigh}"
    );
    assert!(ping(&a, "10.70.2.0", 3), "a -> b through the VXLAN overlay");

    // ensure_vxlan is idempotent; MTU changes in place; another VNI recreates the device.
    let spec = VxlanSpec::margay("192.0.2.1".parse().unwrap(), MAC_A, 1450);
    assert_eq!(na.ensure_vxlan(&spec).unwrap().index, dev.index);
    let mut bigger = spec.clone();
    bigger.mtu = 1400;
    let l = na.ensure_vxlan(&bigger).unwrap();
    assert_eq!((l.index, l.mtu), (dev.index, 1400));
    assert!(ping(&a, "10.70.2.0", 3), "still works after the MTU change");

    // Remove the FDB entry and the neighbour: the overlay stops; removing again is success.
    let removals = vec![
        WriteOp::DeleteFdb(FdbEntry {
            dev: vxlan_dev(),
            mac: MAC_B,
            dst: "192.0.2.2".parse().unwrap(),
        }),
        WriteOp::DeleteNeighbour(Neighbour {
            dev: vxlan_dev(),
            ip: "10.70.2.0".parse().unwrap(),
            mac: MAC_B,
        }),
    ];
    all_ok(&na.apply(&removals));
    all_ok(&na.apply(&removals));
    assert!(!ip_bridge(&a).contains(&format_mac(&MAC_B)));
    assert!(!ping(&a, "10.70.2.0", 1), "no FDB entry, no overlay");

    let mut other_vni = spec.clone();
    other_vni.vni = 4097;
    let l = na.ensure_vxlan(&other_vni).unwrap();
    assert_ne!(l.index, dev.index, "recreated");
    assert_eq!(l.vxlan.unwrap().vni, Some(4097));
    na.delete_link(VXLAN_DEVICE).unwrap();
    na.delete_link(VXLAN_DEVICE).unwrap();
    assert_eq!(na.link(VXLAN_DEVICE).unwrap(), None);
}

fn ip_bridge(ns: &Netns) -> String {
    let out = std::process::Command::new("bridge")
        .args(["-n", ns.name(), "fdb", "show", "dev", VXLAN_DEVICE])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_ipip_tunl0() {
    let t = "netns_ipip_tunl0";
    if !can_run(t) {
        return;
    }
    let ns = netns();
    let mut n = nl(&ns);
    if let Err(e) = n.ipip_probe() {
        // Only a kernel without IPIP skips; any other failure is a failure.
        assert!(e.is_not_supported(), "probing for ipip: {e}");
        margay_testkit::skip(
            t,
            margay_testkit::Lack::KernelFeature,
            &format!("this kernel has no ipip module (creating an ipip link: {e})"),
        );
        return;
    }
    let l = n
        .ensure_tunl0(Some("10.65.4.0".parse().unwrap()), 1480)
        .unwrap();
    assert!(l.up);
    assert_eq!(l.mtu, 1480);
    assert!(n
        .addresses("tunl0")
        .unwrap()
        .contains(&"10.65.4.0/32".parse().unwrap()));
    // The IPIP route form: via <node> dev tunl0 onlink.
    all_ok(&n.apply(&[WriteOp::ReplaceRoute(Route::via_dev(
        "10.65.5.0/26".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        "tunl0",
        true,
    ))]));
    let s = ip(&ns, &["route", "show", "10.65.5.0/26"]);
    assert!(s.contains("via 192.0.2.2 dev tunl0 proto 77 onlink"), "{s}");
}
