//! VXLAN end to end, and NAT to the outside. Nodes in two subnets joined by a router that knows
//! no pod routes; the pool is vxlanMode CrossSubnet with natOutgoing. Pods are plain network
//! namespaces wired as the CNI plugin wires them (veth, /32, gateway 169.254.1.1, host route).
//! Same-subnet traffic goes native, cross-subnet traffic goes through VXLAN (seen with tcpdump
//! on UDP 4789), pings pass both ways, and a pod reaches an outside host, which sees the node's
//! address.

use margay_api::store::etcd::{EtcdBackend, EtcdConfig};
use margay_api::{EncapMode, IPPool, IPPoolSpec, Store};
use margay_ipam::{AddressUse, Allocator, AllocatorConfig, AssignRequest};
mod common;

use common::{start_agent, Agent};
use margay_testkit::netns::{can_build_namespaces, unique_prefix, Fabric, KillOnDrop, TestNetns};
use margay_testkit::EtcdProcess;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct NodeDef {
    name: &'static str,
    addr: &'static str,
    gw: &'static str,
    etcd_ip: &'static str,
}

const NODES: [NodeDef; 3] = [
    NodeDef {
        name: "node1",
        addr: "192.168.252.11/24",
        gw: "192.168.252.254",
        etcd_ip: "192.168.252.1",
    },
    NodeDef {
        name: "node2",
        addr: "192.168.252.12/24",
        gw: "192.168.252.254",
        etcd_ip: "192.168.252.1",
    },
    NodeDef {
        name: "node3",
        addr: "192.168.253.13/24",
        gw: "192.168.253.254",
        etcd_ip: "192.168.253.1",
    },
];

/// Wires a pod the way the CNI plugin does: a veth whose host end has proxy ARP, the pod's /32
/// on eth0, a default route via 169.254.1.1, and a /32 host route on the node.
fn wire_pod(node: &TestNetns, pod: &TestNetns, host_if: &str, ip: IpAddr) {
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "tmp0",
    ])
    .unwrap();
    node.ip(&["link", "set", "tmp0", "netns", pod.name()])
        .unwrap();
    node.exec(
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")],
    )
    .unwrap();
    node.exec(
        "sysctl",
        &["-qw", &format!("net.ipv4.neigh.{host_if}.proxy_delay=0")],
    )
    .unwrap();
    node.ip(&["link", "set", host_if, "up"]).unwrap();
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])
        .unwrap();
    pod.ip(&["link", "set", "tmp0", "name", "eth0"]).unwrap();
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])
        .unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])
    .unwrap();
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])
    .unwrap();
}

/// Runs `tcpdump` in `ns` on `iface` with `filter` while `traffic` runs; returns what it saw.
/// A tcpdump that failed (rather than saw nothing for its 4 s) fails the test: "no packets"
/// must mean no packets.
fn capture(ns: &TestNetns, iface: &str, filter: &str, traffic: impl FnOnce()) -> String {
    let child = ns
        .command("timeout")
        .args(["4", "tcpdump", "-n", "-l", "-c", "3", "-i", iface, filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump starts");
    let mut guard = KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(500));
    traffic();
    let mut text = String::new();
    if let Some(mut s) = guard.0.stdout.take() {
        std::io::Read::read_to_string(&mut s, &mut text).expect("reading tcpdump's output");
    }
    let status = guard.0.wait().expect("waiting for tcpdump");
    let mut err = String::new();
    if let Some(mut s) = guard.0.stderr.take() {
        std::io::Read::read_to_string(&mut s, &mut err).expect("reading tcpdump's errors");
    }
    // 0: it saw its 3 packets; 124: `timeout` ended it after 4 s. Anything else: it failed.
    assert!(
        matches!(status.code(), Some(0) | Some(124)),
        "tcpdump -i {iface} '{filter}' in {} failed ({status}): {err}",
        ns.name()
    );
    text
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_vxlan_cross_subnet_and_nat_outgoing() {
    if !can_build_namespaces("netns_vxlan_cross_subnet_and_nat_outgoing") {
        return;
    }
    if Command::new("tcpdump").arg("--version").output().is_err() {
        panic!("tcpdump is not installed: run scripts/setup.sh");
    }
    let p = unique_prefix("mgv");
    let mut fab_a = Fabric::new(&format!("{p}a")).unwrap();
    let mut fab_b = Fabric::new(&format!("{p}b")).unwrap();
    fab_a.attach_host("192.168.252.1/24").unwrap();
    fab_b.attach_host("192.168.253.1/24").unwrap();
    let router = TestNetns::create(&format!("{p}r")).unwrap();
    fab_a.attach(&router, "eth0", "192.168.252.254/24").unwrap();
    fab_b.attach(&router, "eth1", "192.168.253.254/24").unwrap();
    router
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let outside = TestNetns::create(&format!("{p}o")).unwrap();
    fab_b
        .attach(&outside, "eth0", "192.168.253.100/24")
        .unwrap();
    outside
        .ip(&["route", "add", "default", "via", "192.168.253.254"])
        .unwrap();
    let nodes: Vec<TestNetns> = (1..=3)
        .map(|i| TestNetns::create(&format!("{p}n{i}")).unwrap())
        .collect();
    for (i, (ns, def)) in nodes.iter().zip(NODES.iter()).enumerate() {
        if i < 2 {
            fab_a.attach(ns, "eth0", def.addr).unwrap();
        } else {
            fab_b.attach(ns, "eth0", def.addr).unwrap();
        }
        ns.ip(&["route", "add", "default", "via", def.gw]).unwrap();
    }
    let etcd = EtcdProcess::start_listening_on(&[
        "192.168.252.1".parse().unwrap(),
        "192.168.253.1".parse().unwrap(),
    ])
    .await
    .unwrap();
    let prefix = "/margay-vxlan-test/";
    let store = Store::new(Arc::new(
        EtcdBackend::connect(EtcdConfig::new([etcd.endpoint()]).with_prefix(prefix))
            .await
            .unwrap(),
    ));
    store
        .create(&IPPool::new(
            "pool",
            IPPoolSpec {
                cidr: "10.78.0.0/16".into(),
                vxlan_mode: EncapMode::CrossSubnet,
                nat_outgoing: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let _agents: Vec<KillOnDrop> = nodes
        .iter()
        .zip(NODES.iter())
        .map(|(ns, def)| {
            start_agent(
                ns,
                Agent {
                    node: def.name,
                    addr: def.addr,
                    etcd: &etcd.endpoint_on(def.etcd_ip.parse().unwrap()),
                    etcd_prefix: prefix,
                    state: &state.path().join(def.name),
                    bgp: false,
                },
            )
        })
        .collect();
    // A pod on each node, with an address from its node's block.
    let mut pods = Vec::new();
    for (i, def) in NODES.iter().enumerate() {
        let alloc = Allocator::new(
            store.clone(),
            def.name,
            AllocatorConfig {
                node_labels: Some(BTreeMap::new()),
                ..Default::default()
            },
        );
        let ip = alloc
            .assign(&AssignRequest {
                handle_id: format!("k8s-pod-network.pod{i}"),
                num_v4: 1,
                use_: AddressUse::Workload,
                ..Default::default()
            })
            .await
            .unwrap()
            .addresses[0]
            .ip;
        let pod = TestNetns::create(&format!("{p}p{i}")).unwrap();
        wire_pod(&nodes[i], &pod, &format!("cali{p}{i}"), ip);
        pods.push((pod, ip));
    }
    // Wait until node1 has routes to both other pods' blocks.
    wait_for("pod-to-pod reachability", Duration::from_secs(30), || {
        pods[0].0.ping(pods[1].1) && pods[0].0.ping(pods[2].1)
    });
    // Same subnet: native. Nothing on UDP 4789 at node2 while pod1 pings pod2.
    let native = capture(&nodes[1], "eth0", "udp port 4789", || {
        assert!(pods[0].0.ping(pods[1].1));
    });
    assert!(
        native.trim().is_empty(),
        "same-subnet traffic was encapsulated:\n{native}"
    );
    let routes = nodes[0].ip(&["route", "show", "proto", "77"]).unwrap();
    assert!(routes.contains("dev vxlan.margay onlink"), "{routes}");
    // Across subnets: VXLAN, seen on the wire at node3.
    let tunnelled = capture(&nodes[2], "eth0", "udp port 4789", || {
        assert!(pods[0].0.ping(pods[2].1), "pod1 -> pod3 across subnets");
    });
    assert!(
        tunnelled.contains("VXLAN"),
        "no VXLAN packets seen at node3:\n{tunnelled}"
    );
    // And back.
    assert!(pods[2].0.ping(pods[0].1), "pod3 -> pod1");
    assert!(pods[1].0.ping(pods[2].1), "pod2 -> pod3");
    // NAT: the outside host (the router knows no pod routes) answers pod1, and sees node1.
    let seen = capture(&outside, "eth0", "icmp", || {
        assert!(
            pods[0].0.ping("192.168.253.100".parse().unwrap()),
            "pod1 -> outside through NAT"
        );
    });
    assert!(
        seen.contains("192.168.252.11 > 192.168.253.100"),
        "outside saw:\n{seen}"
    );
}
