//! margay-node on three "nodes" (network namespaces on one bridge) against a real etcd: blocks
//! become kernel routes of the right form everywhere, a released block disappears everywhere,
//! a route deleted by hand comes back within 2 s, and a foreign route is left alone.

use margay_api::store::etcd::{EtcdBackend, EtcdConfig};
use margay_api::{IPPool, IPPoolSpec, Store};
use margay_ipam::{AddressUse, Allocator, AllocatorConfig, AssignRequest};
mod common;

use common::{start_agent, Agent};
use margay_testkit::netns::{
    can_build_namespaces, unique_prefix, wait_for, Fabric, KillOnDrop, TestNetns,
};
use margay_testkit::EtcdProcess;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

fn margay_routes(ns: &TestNetns) -> String {
    ns.ip(&["route", "show", "proto", "77"]).unwrap_or_default()
}

/// Routes from the datastore (BGP off: the VXLAN-only way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_blocks_become_routes_and_drift_is_repaired() {
    if !can_build_namespaces("netns_blocks_become_routes_and_drift_is_repaired") {
        return;
    }
    blocks_become_routes(false).await;
}

/// The same over the BGP full mesh of the embedded speakers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_bgp_mesh_carries_blocks_between_nodes() {
    if !can_build_namespaces("netns_bgp_mesh_carries_blocks_between_nodes") {
        return;
    }
    blocks_become_routes(true).await;
}

async fn blocks_become_routes(bgp: bool) {
    let p = unique_prefix("mgn");
    let mut fabric = Fabric::new(&p).unwrap();
    fabric.attach_host("192.168.251.1/24").unwrap();
    let nodes: Vec<TestNetns> = (1..=3)
        .map(|i| TestNetns::create(&format!("{p}n{i}")).unwrap())
        .collect();
    for (i, ns) in nodes.iter().enumerate() {
        fabric
            .attach(ns, "eth0", &format!("192.168.251.1{}/24", i + 1))
            .unwrap();
    }
    let host: IpAddr = "192.168.251.1".parse().unwrap();
    let mut etcd = EtcdProcess::start_listening_on(&[host]).await.unwrap();
    let store = Store::new(Arc::new(
        EtcdBackend::connect(EtcdConfig::new([etcd.endpoint()]).with_prefix("/margay-agent-test/"))
            .await
            .unwrap(),
    ));
    store
        .create(&IPPool::new(
            "pool",
            IPPoolSpec {
                cidr: "10.77.0.0/16".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // One pod address per node claims each node a block.
    let mut blocks = BTreeMap::new();
    for i in 1..=3 {
        let node = format!("node{i}");
        let alloc = Allocator::new(
            store.clone(),
            &node,
            AllocatorConfig {
                node_labels: Some(BTreeMap::new()),
                ..Default::default()
            },
        );
        let got = alloc
            .assign(&AssignRequest {
                handle_id: format!("k8s-pod-network.pod{i}"),
                num_v4: 1,
                use_: AddressUse::Workload,
                ..Default::default()
            })
            .await
            .unwrap();
        blocks.insert(node, got.addresses[0].block);
    }
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint_on(host);
    let _agents: Vec<KillOnDrop> = nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let dir = state.path().join(format!("n{}", i + 1));
            start_agent(
                ns,
                Agent {
                    node: &format!("node{}", i + 1),
                    addr: &format!("192.168.251.1{}/24", i + 1),
                    etcd: &endpoint,
                    etcd_prefix: "/margay-agent-test/",
                    state: &dir,
                    bgp,
                },
            )
        })
        .collect();

    // Every node: a blackhole for its own block, and a direct route to each other node's.
    for (i, ns) in nodes.iter().enumerate() {
        let me = format!("node{}", i + 1);
        wait_for(&format!("routes on {me}"), Duration::from_secs(20), || {
            let r = margay_routes(ns);
            blocks.iter().all(|(node, b)| {
                if *node == me {
                    r.contains(&format!("blackhole {b}"))
                } else {
                    let n: usize = node[4..].parse().unwrap();
                    r.contains(&format!("{b} via 192.168.251.1{n} dev eth0"))
                }
            })
        });
        // The agent wrote the MTU file for the CNI plugin and the node-name file.
        let dir = state.path().join(format!("n{}", i + 1));
        assert_eq!(
            std::fs::read_to_string(dir.join("mtu")).unwrap().trim(),
            "1500"
        );
        assert_eq!(std::fs::read_to_string(dir.join("nodename")).unwrap(), me);
    }

    // A foreign route in the same table is left alone; a Margay route deleted by hand is back
    // within 2 s.
    let n1 = &nodes[0];
    n1.ip(&["route", "add", "10.123.0.0/24", "via", "192.168.251.12"])
        .unwrap();
    let b2 = blocks["node2"].to_string();
    n1.ip(&["route", "del", &b2]).unwrap();
    let took = wait_for(
        "the deleted route to come back",
        Duration::from_secs(2),
        || margay_routes(n1).contains(&b2),
    );
    println!("route repaired after {took:?}");
    // The agent counted exactly that one repair.
    let metrics = n1
        .exec(
            "bash",
            &["-c", "exec 3<>/dev/tcp/127.0.0.1/9091; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"],
        )
        .unwrap();
    assert!(
        metrics.contains("margay_node_repairs_total 1\n"),
        "{metrics}"
    );
    assert!(n1
        .ip(&["route", "show", "10.123.0.0/24"])
        .unwrap()
        .contains("via 192.168.251.12"));

    // A block released by the allocator disappears from every node.
    let alloc = Allocator::new(
        store.clone(),
        "node3",
        AllocatorConfig {
            node_labels: Some(BTreeMap::new()),
            ..Default::default()
        },
    );
    alloc
        .release_by_handle("k8s-pod-network.pod3")
        .await
        .unwrap();
    margay_ipam::maintenance::release_block(&store, &blocks["node3"], 10)
        .await
        .unwrap();
    let b3 = blocks["node3"].to_string();
    for ns in &nodes {
        wait_for(
            "the released block to disappear",
            Duration::from_secs(10),
            || !margay_routes(ns).contains(&b3),
        );
    }
    // The foreign route is still there after all those resyncs.
    assert!(n1
        .ip(&["route", "show", "10.123.0.0/24"])
        .unwrap()
        .contains("via 192.168.251.12"));

    // Readiness follows the datastore: every agent is ready, then not (saying why) while
    // etcd is down, then ready again; liveness holds throughout (the routes stay).
    let probe = |i: usize, path: &str| {
        let addr: std::net::SocketAddr = format!("192.168.251.1{i}:9099").parse().unwrap();
        margay_testkit::http_get(addr, path).unwrap_or_else(|e| (0, e.to_string()))
    };
    let all = |want: u16| move || (1..=3).all(|i| probe(i, "/readyz").0 == want);
    wait_for("every agent ready", Duration::from_secs(20), all(200));
    etcd.stop().await;
    wait_for(
        "every agent not ready while etcd is down",
        Duration::from_secs(20),
        all(503),
    );
    for i in 1..=3 {
        let (_, why) = probe(i, "/readyz");
        assert!(why.contains("datastore"), "node{i}: {why}");
        let (code, body) = probe(i, "/livez");
        assert_eq!(code, 200, "node{i} stays live: {body}");
    }
    etcd.restart().await.unwrap();
    wait_for(
        "every agent ready again after etcd came back",
        Duration::from_secs(30),
        all(200),
    );
}
