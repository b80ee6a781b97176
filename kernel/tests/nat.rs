//! Outgoing NAT: a pod in a natOutgoing pool reaches an "outside" namespace that has no route
//! back to pods, so replies can only come back if the node masqueraded the pod.

mod common;

use common::{attach_pod, can_run, exec, have_tool, netns, nl, node_uplink, ping};
use margay_kernel::nat::{Nat, NatPool};
use margay_kernel::{AddressOptions, RouteWriter, VethSpec};

fn set_handle(node: &margay_kernel::netns::Netns, set: &str) -> u64 {
    let (ok, out) = exec(node, &["nft", "-j", "list", "set", "inet", "margay", set]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|i| i.get("set").and_then(|s| s["handle"].as_u64()))
        .unwrap()
}

fn masquerade_packets(node: &margay_kernel::netns::Netns) -> u64 {
    let (ok, out) = exec(
        node,
        &[
            "nft",
            "-j",
            "list",
            "chain",
            "inet",
            "margay",
            "postrouting",
        ],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rules: Vec<&serde_json::Value> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .collect();
    assert_eq!(rules.len(), 2, "exactly the two masquerade rules: {out}");
    rules
        .iter()
        .flat_map(|r| r["expr"].as_array().unwrap().iter())
        .filter_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
        .sum()
}

#[test]
fn netns_nat_masquerades_pool_sources_to_outside() {
    let t = "netns_nat_masquerades_pool_sources_to_outside";
    if !can_run(t) || !have_tool(t, "nft") || !have_tool(t, "ping") {
        return;
    }
    let node = netns();
    let pod = netns();
    let outside = netns();
    node_uplink(
        &node,
        "192.0.2.10/24",
        "192.0.2.1",
        "2001:db8::10/64",
        "2001:db8::1",
    );
    let (w, _t) = RouteWriter::spawn(Some(node.path().to_path_buf())).unwrap();
    attach_pod(
        &node,
        &pod,
        &w,
        "cali00000000nat",
        "10.65.0.5/32",
        "fd00:65::5/128",
    );
    // The outside world: 198.51.100.1 on a link from the node; no route to pods.
    let mut n = nl(&node);
    n.create_veth(&VethSpec {
        name: "ext0".into(),
        mac: None,
        peer_name: "ext1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: Some(outside.path().to_path_buf()),
    })
    .unwrap();
    n.add_address(
        "ext0",
        "198.51.100.2/24".parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    n.set_link_up("ext0", true).unwrap();
    let mut o = nl(&outside);
    o.add_address(
        "ext1",
        "198.51.100.1/24".parse().unwrap(),
        AddressOptions::default(),
    )
    .unwrap();
    o.set_link_up("ext1", true).unwrap();

    assert!(ping(&node, "198.51.100.1", 2), "node reaches outside");
    assert!(
        !ping(&pod, "198.51.100.1", 1),
        "without NAT the outside cannot answer a pod"
    );

    let nat = Nat::default();
    let pools = [NatPool {
        cidr: "10.65.0.0/16".parse().unwrap(),
        nat_outgoing: true,
    }];
    node.run(|| {
        nat.ensure()?;
        nat.ensure()?; // idempotent: still two rules (checked below)
        nat.sync_pools(&pools)
    })
    .unwrap()
    .unwrap();
    let nat_handle = set_handle(&node, "nat-pools");
    assert!(
        ping(&pod, "198.51.100.1", 3),
        "masqueraded pod reaches outside"
    );
    assert!(
        masquerade_packets(&node) > 0,
        "the masquerade rule counted the flow"
    );
    // The outside has no route to the pod, so its replies went to the node's address.
    let (routable, why) = exec(&outside, &["ip", "route", "get", "10.65.0.5"]);
    assert!(!routable, "outside must not route to pods: {why}");

    // A destination inside some pool is not masqueraded: declare the outside subnet a pool.
    let with_outside_pool = [
        pools[0],
        NatPool {
            cidr: "198.51.100.0/24".parse().unwrap(),
            nat_outgoing: false,
        },
    ];
    node.run(|| nat.sync_pools(&with_outside_pool))
        .unwrap()
        .unwrap();
    let sets = node.run(|| nat.pool_sets()).unwrap().unwrap();
    assert_eq!(sets.all.len(), 2);
    assert_eq!(sets.nat.len(), 1);
    // (Each ping process uses a new ICMP id, so this is a new conntrack flow.)
    assert!(
        !ping(&pod, "198.51.100.1", 1),
        "destination in a pool: no NAT"
    );

    // natOutgoing off: the element leaves nat-pools in place (the set is not rebuilt).
    let off = [NatPool {
        cidr: "10.65.0.0/16".parse().unwrap(),
        nat_outgoing: false,
    }];
    node.run(|| nat.sync_pools(&off)).unwrap().unwrap();
    assert_eq!(
        set_handle(&node, "nat-pools"),
        nat_handle,
        "same set, updated in place"
    );
    let sets = node.run(|| nat.pool_sets()).unwrap().unwrap();
    assert!(sets.nat.is_empty());
    assert!(!ping(&pod, "198.51.100.1", 1), "no NAT without natOutgoing");

    // Remove the table; again is success.
    node.run(|| {
        nat.remove()?;
        nat.remove()
    })
    .unwrap()
    .unwrap();
    let (_, tables) = exec(&node, &["nft", "list", "tables"]);
    assert!(!tables.contains("margay"), "{tables}");
}
