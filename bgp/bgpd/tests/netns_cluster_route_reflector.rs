//! `margay-bgpd --cluster-route-reflector` as the Helm chart runs it, with real margay-node
//! agents, each in a network namespace of its own on one bridge: on a real etcd, and on a real
//! kube-apiserver with RBAC where the reflector and the agents authenticate as their chart
//! ServiceAccounts and no request of theirs may be refused.
//!
//! The chart is rendered with `routeReflectors.enabled` and the mesh off; the margay.io
//! resources it creates at install time (pool, BGPConfiguration, the BGPPeers
//! `peer-with-route-reflectors` and `route-reflector-mesh`) are written to etcd as the
//! post-install hook would (on Kubernetes the whole rendered chart is applied with kubectl),
//! and the reflector runs with the exact command and environment of the StatefulSet's
//! container (the downward-API fields filled in as the kubelet would; on Kubernetes a
//! kubeconfig with its ServiceAccount's token stands in for the mounted token).
//!
//! It shows that the reflector registers its Node (label, cluster ID, address from
//! `status.hostIP`), turns ready, gives each agent the other's pod block with the original next
//! hop, installs nothing itself, picks up a node added later without resetting the sessions
//! it has, and closes its sessions with a NOTIFICATION on SIGTERM.

use margay_api::store::etcd::{EtcdBackend, EtcdConfig};
use margay_api::store::kube::KubeBackend;
use margay_api::{BGPConfiguration, BGPPeer, IPAMConfig, IPPool, Node, Store};
use margay_ipam::{AddressUse, Allocator, AllocatorConfig, AssignRequest};
use margay_testkit::apiserver::{require_apiserver, ApiServerProcess, Options};
use margay_testkit::chart;
use margay_testkit::netns::{
    can_build_namespaces, unique_prefix, wait_for, Fabric, KillOnDrop, TestNetns,
};
use margay_testkit::EtcdProcess;
use serde_json::Value as Json;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ETCD_PREFIX: &str = "/margay-rr-test/";
const POOL: &str = "10.78.0.0/16";

/// The lab's bridge: the host at .1, the reflector at .10, node i at .1i. Each datastore's
/// test has a subnet of its own, so that both may run at once.
#[derive(Clone, Copy)]
struct Net(&'static str);

impl Net {
    fn host(self) -> String {
        format!("{}.1", self.0)
    }
    fn rr(self) -> String {
        format!("{}.10", self.0)
    }
    fn node(self, i: u8) -> String {
        format!("{}.1{i}", self.0)
    }
}

/// Where the cluster's state lives, and how each component reaches it.
enum Datastore {
    Etcd {
        _etcd: EtcdProcess,
        endpoint: String,
    },
    Kubernetes {
        api: ApiServerProcess,
        admin: PathBuf,
        /// Kubeconfigs with the tokens of the ServiceAccounts margay-node and margay-bgpd.
        node: PathBuf,
        reflector: PathBuf,
    },
}

impl Datastore {
    /// The chart values that point every component at this datastore.
    fn values(&self) -> String {
        match self {
            Datastore::Etcd { endpoint, .. } => format!(
                "datastore:\n  type: etcd\n  etcd:\n    endpoints: [\"{endpoint}\"]\n    prefix: \"{ETCD_PREFIX}\"\n"
            ),
            Datastore::Kubernetes { .. } => "datastore:\n  type: kubernetes\n".into(),
        }
    }

    /// What a node agent needs besides the chart's environment to reach the datastore.
    fn agent_env(&self) -> Vec<(String, String)> {
        match self {
            Datastore::Etcd { endpoint, .. } => vec![
                ("MARGAY_ETCD_ENDPOINTS".into(), endpoint.clone()),
                ("MARGAY_ETCD_PREFIX".into(), ETCD_PREFIX.into()),
            ],
            Datastore::Kubernetes { node, .. } => vec![
                ("MARGAY_DATASTORE_TYPE".into(), "kubernetes".into()),
                ("KUBECONFIG".into(), node.display().to_string()),
                ("POD_NAMESPACE".into(), chart::NAMESPACE.into()),
            ],
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// margay-node, built by cargo (a test can only name the binaries of its own package).
/// `MARGAY_NODE_BIN` points at one built already.
fn margay_node_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MARGAY_NODE_BIN") {
        return p.into();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "build",
            "-p",
            "margay-node",
            "--bin",
            "margay-node",
            "--message-format=json",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo build -p margay-node failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "margay-node")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the margay-node executable")
}

/// GET `path` from `port` on the loopback of `ns`: (status code, body).
fn http_get(ns: &TestNetns, port: u16, path: &str) -> Option<(u16, String)> {
    let nspath = ns.path();
    let path = path.to_owned();
    std::thread::spawn(move || -> Option<(u16, String)> {
        let f = std::fs::File::open(nspath).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let (head, body) = buf.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    })
    .join()
    .ok()
    .flatten()
}

fn margay_routes(ns: &TestNetns) -> String {
    ns.ip(&["route", "show", "proto", "77"]).unwrap_or_default()
}

/// The reflector's view of one peer, from the status API `margayctl bgp peers` reads.
fn rr_peer(rr: &TestNetns, addr: &str) -> Option<Json> {
    let (code, body) = http_get(rr, 9179, "/peers")?;
    if code != 200 {
        return None;
    }
    let peers: Vec<Json> = serde_json::from_str(&body).ok()?;
    peers.into_iter().find(|p| p["address"] == addr)
}

fn established(p: &Option<Json>) -> bool {
    p.as_ref().is_some_and(|p| p["state"] == "Established")
}

/// Prints the reflector's log when the test fails.
struct LogOnFailure(PathBuf);

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("---- margay-bgpd log ----\n{log}");
        }
    }
}

/// The agent for node `i` (address .1i), with BGP, the way felix-lite's own tests run it.
fn start_agent(
    bin: &Path,
    ns: &TestNetns,
    i: u8,
    net: Net,
    ds: &Datastore,
    state: &Path,
) -> KillOnDrop {
    KillOnDrop(
        ns.command(bin.to_str().unwrap())
            .env("NODENAME", format!("node{i}"))
            .envs(ds.agent_env())
            .env("IP", format!("{}/24", net.node(i)))
            .env("MARGAY_STATE_DIR", state.join(format!("n{i}")))
            .env("MARGAY_BGP_ENABLED", "true")
            .env("MARGAY_RESYNC_INTERVAL", "30s")
            .env("MARGAY_HEALTH_LISTEN", "127.0.0.1:9099")
            .env("MARGAY_METRICS_LISTEN", "127.0.0.1:9091")
            .env("MARGAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("margay-node starts"),
    )
}

/// Claims node `i` a block by giving one of its pods an address; returns the block.
async fn claim_block(store: &Store, i: u8) -> ipnet::IpNet {
    let alloc = Allocator::new(
        store.clone(),
        format!("node{i}"),
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
    got.addresses[0].block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_cluster_route_reflector_as_the_chart_runs_it() {
    if !can_build_namespaces("netns_cluster_route_reflector_as_the_chart_runs_it") {
        return;
    }
    run(Net("192.168.247"), false).await;
}

/// The same on a real kube-apiserver with RBAC, every component as its chart ServiceAccount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_kube_cluster_route_reflector_under_the_charts_rbac() {
    const TEST: &str = "netns_kube_cluster_route_reflector_under_the_charts_rbac";
    if !can_build_namespaces(TEST) || require_apiserver(TEST).is_none() {
        return;
    }
    run(Net("192.168.246"), true).await;
}

async fn run(net: Net, kubernetes: bool) {
    let build = Instant::now();
    let node_bin = margay_node_binary();
    println!(
        "margay-node built (or found fresh) in {:?}",
        build.elapsed()
    );
    let started = Instant::now();
    let p = unique_prefix(if kubernetes { "mrk" } else { "mrr" });
    let mut fabric = Fabric::new(&p).unwrap();
    fabric.attach_host(&format!("{}/24", net.host())).unwrap();
    let rr = TestNetns::create(&format!("{p}r")).unwrap();
    let rr_addr = net.rr();
    fabric
        .attach(&rr, "eth0", &format!("{rr_addr}/24"))
        .unwrap();
    let nodes: Vec<TestNetns> = (1..=3)
        .map(|i| TestNetns::create(&format!("{p}n{i}")).unwrap())
        .collect();
    // Nodes 1 and 2 now; node 3 joins later.
    for (i, ns) in nodes.iter().enumerate().take(2) {
        fabric
            .attach(ns, "eth0", &format!("{}/24", net.node(i as u8 + 1)))
            .unwrap();
    }
    let host: IpAddr = net.host().parse().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ds = if kubernetes {
        // Served on the bridge, where the agents and the reflector reach it.
        let bin = require_apiserver("netns_kube_cluster_route_reflector_under_the_charts_rbac")
            .expect("checked by the test");
        let api = ApiServerProcess::start_with(
            &bin,
            Options {
                listen: host,
                ..Options::RBAC
            },
        )
        .await
        .expect("starting kube-apiserver");
        let admin = work.path().join("admin.kubeconfig");
        api.write_kubeconfig(&admin, None).unwrap();
        println!("{} on {}", api.version(), api.url());
        Datastore::Kubernetes {
            api,
            admin,
            node: work.path().join("node.kubeconfig"),
            reflector: work.path().join("bgpd.kubeconfig"),
        }
    } else {
        let etcd = EtcdProcess::start_listening_on(&[host]).await.unwrap();
        let endpoint = etcd.endpoint_on(host);
        Datastore::Etcd {
            _etcd: etcd,
            endpoint,
        }
    };
    let store = match &ds {
        Datastore::Etcd { _etcd: etcd, .. } => Store::new(Arc::new(
            EtcdBackend::connect(EtcdConfig::new([etcd.endpoint()]).with_prefix(ETCD_PREFIX))
                .await
                .unwrap(),
        )),
        Datastore::Kubernetes { admin, .. } => {
            Store::new(Arc::new(KubeBackend::from_kubeconfig(admin).await.unwrap()))
        }
    };

    // ---- the chart, rendered for this lab ----
    let values = format!(
        "{}bgp:\n  nodeToNodeMesh: false\n\
         routeReflectors:\n  enabled: true\n\
         ipPools:\n  - {{name: rr-test, cidr: \"{POOL}\", blockSize: 26, ipipMode: Never, vxlanMode: Never}}\n",
        ds.values()
    );
    let values_file = work.path().join("values.yaml");
    std::fs::write(&values_file, &values).unwrap();
    let objs = chart::render(std::slice::from_ref(&values_file), false)
        .unwrap_or_else(|e| panic!("helm template failed: {e}"));
    // What the post-install hook creates: on Kubernetes the whole chart is applied (and the
    // components' tokens are made); on etcd its margay.io objects are written.
    if let Datastore::Kubernetes {
        api,
        admin,
        node,
        reflector,
    } = &ds
    {
        chart::apply(admin, std::slice::from_ref(&values_file))
            .expect("the rendered chart applies");
        // The kubelets' Nodes, which the agents read their labels from.
        let items: Vec<Json> = ["node1", "node2", "node3", "rr1"]
            .iter()
            .map(|n| serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))
            .collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        chart::run_kubectl(admin, &["apply", "-f", "-"], &list.to_string())
            .expect("the Kubernetes Nodes");
        for (sa, path) in [("margay-node", node), ("margay-bgpd", reflector)] {
            let token = api
                .service_account_token(chart::NAMESPACE, sa)
                .await
                .unwrap();
            api.write_kubeconfig(path, Some(&token)).unwrap();
        }
    }
    let mut peer_names = Vec::new();
    for o in objs
        .iter()
        .filter(|o| o["apiVersion"].as_str() == Some("margay.io/v1"))
    {
        let kind = o["kind"].as_str().unwrap();
        let write = !kubernetes;
        match kind {
            "IPPool" if write => {
                store.create(&from_yaml::<IPPool>(o)).await.unwrap();
            }
            "IPAMConfig" if write => {
                store.create(&from_yaml::<IPAMConfig>(o)).await.unwrap();
            }
            "BGPConfiguration" => {
                let c = from_yaml::<BGPConfiguration>(o);
                assert_eq!(c.spec.node_to_node_mesh_enabled, Some(false));
                if write {
                    store.create(&c).await.unwrap();
                }
            }
            "BGPPeer" => {
                let bp = from_yaml::<BGPPeer>(o);
                peer_names.push(bp.metadata.name.clone().unwrap());
                if write {
                    store.create(&bp).await.unwrap();
                }
            }
            "IPPool" | "IPAMConfig" => {}
            other => panic!("the chart renders a margay.io {other} this test does not create"),
        }
    }
    let mut stored: Vec<String> = store
        .list::<BGPPeer>()
        .await
        .unwrap()
        .0
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    stored.sort();
    peer_names.sort();
    assert_eq!(
        peer_names,
        ["peer-with-route-reflectors", "route-reflector-mesh"]
    );
    assert_eq!(stored, peer_names, "the BGPPeers in the datastore");
    let sts = objs
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "margay-bgpd")
        .expect("the chart renders the margay-bgpd StatefulSet");
    let container = &sts["spec"]["template"]["spec"]["containers"][0];

    let mut blocks = BTreeMap::new();
    for i in 1..=3u8 {
        blocks.insert(i, claim_block(&store, i).await);
    }

    // ---- two agents, then the reflector exactly as the StatefulSet runs it ----
    let mut agents: Vec<KillOnDrop> = (1..=2u8)
        .map(|i| {
            start_agent(
                &node_bin,
                &nodes[usize::from(i) - 1],
                i,
                net,
                &ds,
                work.path(),
            )
        })
        .collect();
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(container["args"].as_sequence().into_iter().flatten())
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "margay-bgpd");
    let mut cmd = rr.command(env!("CARGO_BIN_EXE_margay-bgpd"));
    cmd.args(&command[1..]);
    // Only what the chart sets (and PATH, for `ip netns exec`).
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for e in container["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("spec.nodeName")) => "rr1".to_owned(),
            (None, Some("status.hostIP")) => rr_addr.clone(),
            (None, Some("metadata.namespace")) => "margay-system".to_owned(),
            _ => panic!("the test cannot provide env {name} = {e:?} as the kubelet would"),
        };
        cmd.env(name, value);
    }
    if let Datastore::Kubernetes { reflector, .. } = &ds {
        // In a pod the client finds the mounted token; here, a kubeconfig with it.
        cmd.env("KUBECONFIG", reflector);
    }
    let log = work.path().join("margay-bgpd.log");
    let _show_log = LogOnFailure(log.clone());
    let mut reflector = KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("margay-bgpd starts"),
    );
    let rr_started = Instant::now();

    // Ready once synced and registered; the probe says so on the chart's health port.
    let ready = wait_for(
        "the reflector's /readyz to answer 200",
        Duration::from_secs(30),
        || http_get(&rr, 9097, "/readyz").is_some_and(|(c, _)| c == 200),
    );
    println!("reflector ready {ready:?} after start");
    let me: Node = store.get("rr1").await.unwrap();
    let bgp = me.spec.bgp.clone().unwrap();
    assert_eq!(
        me.metadata.labels.as_ref().unwrap()["margay.io/route-reflector"],
        "true"
    );
    assert_eq!(bgp.route_reflector_cluster_id.as_deref(), Some("224.0.0.1"));
    assert_eq!(
        bgp.ipv4_address.as_deref(),
        Some(format!("{rr_addr}/24").as_str()),
        "status.hostIP with its interface's prefix length"
    );

    // Each agent learns the other's block from the reflector, with the other node as next hop.
    let route = |to: u8| format!("{} via {} dev eth0", blocks[&to], net.node(to));
    for (me, other) in [(1u8, 2u8), (2, 1)] {
        let ns = &nodes[usize::from(me) - 1];
        let took = wait_for(
            &format!("node{me} to learn node{other}'s block"),
            Duration::from_secs(60),
            || margay_routes(ns).contains(&route(other)),
        );
        println!("node{me} has node{other}'s block {took:?} later");
        assert!(
            !margay_routes(ns).contains(&rr_addr),
            "a route points at the reflector: {}",
            margay_routes(ns)
        );
    }
    println!(
        "both blocks reflected {:?} after the reflector started",
        rr_started.elapsed()
    );
    // The reflector holds both clients as such, and installed nothing.
    let before: Vec<Json> = [1u8, 2]
        .iter()
        .map(|i| rr_peer(&rr, &net.node(*i)).expect("the reflector has the peer"))
        .collect();
    for p in &before {
        assert_eq!(p["state"], "Established", "{p}");
        assert_eq!(p["rr_client"], true, "{p}");
        // One OPEN per connection: two when both ends connected at once and
        // collision resolution (RFC 4271 §6.8) closed one of them.
        let opens = p["messages_received"]["open"].as_u64().unwrap_or(0);
        assert!((1..=2).contains(&opens), "{p}");
    }
    assert_eq!(margay_routes(&rr), "", "the reflector installs no routes");
    assert!(!rr.ip(&["route"]).unwrap().contains("10.78."));
    let (_, metrics) = http_get(&rr, 9095, "/metrics").expect("metrics answer");
    assert!(
        metrics.contains("margay_bgpd_route_reflector_clients 2\n")
            && metrics.contains(&format!(
                "margay_bgp_session_established{{peer=\"{}\"}} 1",
                net.node(1)
            )),
        "{metrics}"
    );

    // ---- a node joins ----
    fabric
        .attach(&nodes[2], "eth0", &format!("{}/24", net.node(3)))
        .unwrap();
    let joined = Instant::now();
    agents.push(start_agent(&node_bin, &nodes[2], 3, net, &ds, work.path()));
    for (me, other) in [(1u8, 3u8), (2, 3), (3, 1), (3, 2)] {
        let ns = &nodes[usize::from(me) - 1];
        wait_for(
            &format!("node{me} to learn node{other}'s block"),
            Duration::from_secs(60),
            || margay_routes(ns).contains(&route(other)),
        );
    }
    println!(
        "node3's block everywhere and every block on node3 {:?} after it started",
        joined.elapsed()
    );
    assert!(established(&rr_peer(&rr, &net.node(3))));
    // The sessions with nodes 1 and 2 were not reset: same session, no OPEN or
    // NOTIFICATION since.
    for (i, old) in [1u8, 2].iter().zip(&before) {
        let now = rr_peer(&rr, &net.node(*i)).unwrap();
        assert_eq!(now["state"], "Established", "{now}");
        assert_eq!(now["since"], old["since"], "node{i}'s session restarted");
        assert_eq!(
            now["messages_received"]["open"], old["messages_received"]["open"],
            "{now}"
        );
        assert_eq!(
            now["messages_sent"]["notification"], old["messages_sent"]["notification"],
            "{now}"
        );
        assert_eq!(
            now["messages_received"]["notification"], old["messages_received"]["notification"],
            "{now}"
        );
    }
    // Its sessions are in the Node's status too.
    wait_for(
        "the reflector to report three sessions in its Node's status",
        Duration::from_secs(20),
        || {
            let n: Option<Node> = block_on_store(store.try_get::<Node>("rr1")).flatten();
            n.and_then(|n| n.status)
                .map(|s| {
                    s.bgp_peers
                        .iter()
                        .filter(|p| p.state == "Established")
                        .count()
                        == 3
                })
                .unwrap_or(false)
        },
    );

    // ---- SIGTERM: every session closed with a NOTIFICATION ----
    let pid = nix::unistd::Pid::from_raw(reflector.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stop = Instant::now();
    let mut status = None;
    wait_for(
        "margay-bgpd to exit after SIGTERM",
        Duration::from_secs(10),
        || {
            status = reflector.0.try_wait().unwrap();
            status.is_some()
        },
    );
    assert!(status.unwrap().success(), "exit status {status:?}");
    // A NOTIFICATION (Cease) tells the agents not to keep the routes as a graceful restart
    // would (they keep them for 120 s after a crash): the reflected block goes at once.
    wait_for(
        "node1 to drop node2's block after the reflector's Cease",
        Duration::from_secs(10),
        || !margay_routes(&nodes[0]).contains(&blocks[&2].to_string()),
    );
    println!(
        "after SIGTERM: exited and node1 dropped the reflected route within {:?}",
        stop.elapsed()
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("shutting down"), "{log_text}");
    drop(agents);
    if let Datastore::Kubernetes { api, .. } = &ds {
        let refused = api
            .forbidden(&format!("system:serviceaccount:{}:", chart::NAMESPACE))
            .unwrap();
        assert!(
            refused.is_empty(),
            "requests of the chart's ServiceAccounts the server refused:\n{}",
            refused.join("\n")
        );
    }
    println!("whole test {:?}", started.elapsed());
}

fn from_yaml<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_yaml::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:?}"))
}

/// Runs a datastore read from the synchronous `wait_for` closure.
fn block_on_store<T>(
    f: impl std::future::Future<Output = Result<T, margay_api::StoreError>>,
) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).ok()
}
