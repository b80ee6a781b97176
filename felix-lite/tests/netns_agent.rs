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
    // And says so in its Node's status.
    for i in 1..=3 {
        let name = format!("node{i}");
        let t = std::time::Instant::now();
        loop {
            let n: margay_api::Node = store.get(&name).await.unwrap();
            let ready = n
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready");
            if ready.as_ref().is_some_and(|c| c.status == "True") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{name}: {ready:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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

/// The embedded speaker stops under a running agent (in process, inside a node namespace, on
/// a real etcd): readiness turns 503 naming BGP, the failure is counted, the agent starts the
/// speaker again, and readiness comes back.
#[test]
fn netns_a_stopped_speaker_makes_the_agent_unready_until_it_is_started_again() {
    let test = "netns_a_stopped_speaker_makes_the_agent_unready_until_it_is_started_again";
    if !can_build_namespaces(test) {
        return;
    }
    let p = unique_prefix("mgs");
    let mut fabric = Fabric::new(&p).unwrap();
    fabric.attach_host("192.168.252.1/24").unwrap();
    let ns = TestNetns::create(&format!("{p}n1")).unwrap();
    fabric.attach(&ns, "eth0", "192.168.252.11/24").unwrap();
    let host: IpAddr = "192.168.252.1".parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt
        .block_on(EtcdProcess::start_listening_on(&[host]))
        .unwrap();
    let endpoint = etcd.endpoint_on(host);
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    margay_kernel::netns::run_in(std::path::Path::new(&ns.path()), move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let env = |k: &str| -> Option<String> {
                Some(
                    match k {
                        "NODENAME" => "node1",
                        "MARGAY_DATASTORE_TYPE" => "etcd",
                        "MARGAY_ETCD_ENDPOINTS" => &endpoint,
                        "MARGAY_ETCD_PREFIX" => "/margay-speaker-test/",
                        "IP" => "192.168.252.11/24",
                        "MARGAY_STATE_DIR" => &state_dir,
                        "MARGAY_BGP_ENABLED" => "true",
                        "MARGAY_RESYNC_INTERVAL" => "30s",
                        _ => return None,
                    }
                    .to_owned(),
                )
            };
            let cfg = margay_node::config::NodeConfig::load(None, env).unwrap();
            let (agent, status) = margay_node::agent::Agent::start(cfg).await.unwrap();
            let first = agent.bgp_handle().expect("BGP runs");
            let health = status.health.clone();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = tokio::spawn(agent.run(async move {
                if stop_rx.await.is_err() {
                    panic!("the test dropped the agent's stop signal");
                }
            }));
            let ready = |what: &str, limit: Duration| {
                let t = std::time::Instant::now();
                while health.ready().is_err() {
                    assert!(t.elapsed() < limit, "{what}: {:?}", health.ready());
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            ready("ready at first", Duration::from_secs(20));
            // Watch readiness closely from another thread: the agent starts the speaker again
            // on its next pass, so the 503 lasts about one pass.
            let watcher = {
                let health = health.clone();
                std::thread::spawn(move || {
                    let t = std::time::Instant::now();
                    while t.elapsed() < Duration::from_secs(20) {
                        if let Err(why) = health.ready() {
                            return Some(why);
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    None
                })
            };
            first.stop("the test stops the speaker").await.unwrap();
            let why = watcher.join().unwrap().expect("readiness turned 503");
            assert!(why.starts_with("BGP: "), "{why}");
            ready("ready again", Duration::from_secs(20));
            assert!(
                status
                    .metrics
                    .bgp_errors
                    .load(std::sync::atomic::Ordering::Relaxed)
                    >= 1,
                "the failure is counted"
            );
            assert!(
                status
                    .metrics
                    .render()
                    .contains("margay_node_bgp_errors_total"),
                "and exported"
            );
            stop_tx.send(()).unwrap();
            run.await.unwrap().unwrap();
        });
    })
    .unwrap();
}
