//! End-to-end scenarios against a live lab. Each prints what it did and what it measured, and
//! fails (non-zero exit) when the behaviour a user relies on does not hold.

use super::matrix::{self, Endpoint};
use super::pods::{self, Pod};
use super::{kube, plan, proc, Datastore, LabState};
use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use margay_api::{BGPConfiguration, BGPPeer, BGPPeerSpec, IPPool, IPPoolSpec, Node, Store};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Create and delete 100 pods across nodes; survivors keep full reachability and
    /// `margayctl ipam check` is clean afterwards.
    PodChurn,
    /// Add a second pool and disable the first: new pods come from the new pool, old pods keep
    /// working.
    PoolEdit,
    /// Kill node 2's agent: with graceful restart its routes stay, no ping between surviving
    /// pods is lost; it comes back and the matrix is full again.
    NodeLoss,
    /// Turn the node-to-node mesh off in favour of a route reflector (node 1).
    MeshToRr,
    /// An outside host behind the router reaches every pod (the router learned them over BGP).
    ExternalAccess,
    /// Pods reach the outside host through natOutgoing; it sees node addresses.
    Nat,
    /// Kubernetes datastore: a Pod deleted through the API whose CNI DEL never ran gets its
    /// address back from the controller's garbage collection after the grace period.
    GcDeletedPod,
    /// Kubernetes datastore: the leading controller replica is killed with SIGKILL; the other
    /// leads within the lease duration.
    LeaderFailover,
    /// A pool that Margay refuses (block size 33) is applied through the datastore's API: it is
    /// refused or marked Valid=False, a pod that asks for it is told why, and no pod gets an
    /// address from it.
    InvalidPool,
    /// BGPConfiguration communities and prefixAdvertisements: every node's block reaches the
    /// BIRD ToR carrying the configured standard and large communities, and loses them when
    /// the advertisement is removed.
    Communities,
}

/// What a scenario measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub seconds: f64,
    /// The longest a probed pair went without an answer, if probed continuously.
    pub longest_gap: Option<Duration>,
    pub notes: Vec<String>,
}

pub async fn run(st: &mut LabState, store: &Store, s: Scenario) -> Result<Outcome> {
    let t = Instant::now();
    let mut out = match s {
        Scenario::PodChurn => pod_churn(st, store).await?,
        Scenario::PoolEdit => pool_edit(st, store).await?,
        Scenario::NodeLoss => node_loss(st).await?,
        Scenario::MeshToRr => mesh_to_rr(st, store).await?,
        Scenario::ExternalAccess => external_access(st)?,
        Scenario::Nat => nat(st)?,
        Scenario::GcDeletedPod => gc_deleted_pod(st, store).await?,
        Scenario::LeaderFailover => leader_failover(st).await?,
        Scenario::InvalidPool => invalid_pool(st, store).await?,
        Scenario::Communities => communities(st, store).await?,
    };
    out.seconds = t.elapsed().as_secs_f64();
    Ok(out)
}

fn endpoints(st: &LabState) -> Vec<Endpoint> {
    super::endpoints(st)
}

/// Waits for a full matrix among `eps`, for at most `limit`.
async fn wait_full(eps: &[Endpoint], limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let m = matrix::probe(eps);
        if matrix::full(eps, &m)? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!(
                "reachability not full after {limit:?}:\n{}",
                matrix::render(eps, &m)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Probes every ordered pair of `eps` over TCP every 100 ms in the background and records the
/// longest time any pair went without an answer. A probe that cannot run stops it with an
/// error, which `finish` returns: a gap it did not measure is not "no gap".
struct GapProbe {
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<Duration>>,
    failed: Arc<Mutex<Option<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl GapProbe {
    fn start(eps: Vec<Endpoint>) -> GapProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let longest = Arc::new(Mutex::new(Duration::ZERO));
        let failed = Arc::new(Mutex::new(None));
        let (s2, l2, f2) = (stop.clone(), longest.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let n = eps.len();
            let mut last_ok = vec![vec![Instant::now(); n]; n];
            while !s2.load(Ordering::SeqCst) {
                for i in 0..n {
                    for j in 0..n {
                        if i == j {
                            continue;
                        }
                        let now = Instant::now();
                        match matrix::tcp(&eps[i].netns, eps[j].ip, plan::ECHO_PORT) {
                            Ok(true) => last_ok[i][j] = now,
                            Ok(false) => {
                                let gap = now - last_ok[i][j];
                                let mut l = l2.lock().unwrap_or_else(|p| p.into_inner());
                                *l = (*l).max(gap);
                            }
                            Err(e) => {
                                *f2.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("{e:#}"));
                                return;
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        GapProbe {
            stop,
            longest,
            failed,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Result<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                bail!("the reachability probe panicked: the gap was not measured");
            }
        }
        if let Some(e) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bail!("the reachability probe could not run: {e}");
        }
        Ok(*self.longest.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

async fn wait_sessions(node_ns: &str, n: u64) -> Result<()> {
    let t = Instant::now();
    loop {
        let got = agent_metric(node_ns, "margay_node_bgp_sessions_established");
        if got == Some(n) {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "{node_ns} has {got:?} BGP sessions, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A gauge or counter from a node agent's /metrics (served on the node's loopback).
fn agent_metric(node_ns: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let body = proc::in_netns(node_ns, || -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:9091".parse().expect("address"),
            Duration::from_secs(1),
        )?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })
    .ok()?
    .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn ipam_check_clean(findings: &[margay_ipam::audit::Finding]) -> Result<()> {
    if findings.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = findings.iter().map(|f| format!("{f:?}")).collect();
    bail!(
        "margayctl ipam check found problems:\n  {}",
        list.join("\n  ")
    )
}

/// `margayctl ipam check` on the lab: who is alive comes from WorkloadEndpoints on etcd, from
/// Pods on Kubernetes.
async fn ipam_check(st: &LabState, store: &Store) -> Result<()> {
    let snap = margay_ipam::audit::Snapshot::read(store).await?;
    let live = match st.datastore {
        Datastore::Etcd => margay_ipam::audit::LiveSet::from_store(store).await?,
        Datastore::Kubernetes => {
            let ds = margay_api::DatastoreConfig::Kubernetes {
                kubeconfig: Some(kube::kubeconfig("admin")),
            };
            crate::ipam::live_set(store, &ds).await?
        }
    };
    ipam_check_clean(&margay_ipam::audit::check(&snap, Some(&live)))
}

async fn pod_churn(st: &mut LabState, store: &Store) -> Result<Outcome> {
    let base = endpoints(st);
    let nodes: Vec<plan::NodePlan> = st
        .nodes
        .iter()
        .map(|n| plan::node(n[4..].parse().unwrap_or(1)))
        .collect();
    let mut created = 0;
    let kube = st.datastore == Datastore::Kubernetes;
    if kube {
        kube::pod_namespace(&st.bin_dir, "churn")?;
    }
    // The survivors are probed all through the churn (and their full matrix checked after
    // each wave's ADDs, with the wave's pods alive): churn must not touch their routes.
    let probe = GapProbe::start(base.clone());
    let mut during = Duration::ZERO;
    // In waves of 10, so that pods exist side by side and addresses get reused.
    for wave in 0..10u32 {
        let mut wave_pods = Vec::new();
        for k in 0..10u32 {
            let i = wave * 10 + k;
            let n = &nodes[(i as usize) % nodes.len()];
            let name = format!("churn-{i}");
            let netns = plan::pod_netns(&n.name, 1000 + i);
            super::add_netns(&netns)?;
            let pod = Pod {
                name: name.clone(),
                namespace: "churn".into(),
                node: n.name.clone(),
                node_netns: n.netns.clone(),
                netns,
                container_id: pods::container_id(&n.name, &name, u64::from(wave)),
                ip: None,
                ip6: None,
                echo: None,
            };
            let state_dir = Path::new(plan::STATE_DIR).join(&n.name);
            if kube {
                kube::create_pod(&st.bin_dir, "churn", &name, &n.name, &[])?;
            }
            let r = pods::cni(&st.bin_dir, "ADD", &pod, &state_dir, st.datastore)?;
            ensure!(
                pods::result_ip(&r).is_some(),
                "ADD of {name} gave no address: {r}"
            );
            created += 1;
            wave_pods.push(pod);
        }
        during = during.max(
            wait_full(&base, Duration::from_secs(5))
                .await
                .with_context(|| format!("survivors' matrix during wave {wave} of the churn"))?,
        );
        for pod in &wave_pods {
            let state_dir = Path::new(plan::STATE_DIR).join(&pod.node);
            pods::cni(&st.bin_dir, "DEL", pod, &state_dir, st.datastore)?;
            proc::ip(&["netns", "del", &pod.netns])?;
            if kube {
                kube::delete_pod(&st.bin_dir, "churn", &pod.name)?;
            }
        }
    }
    let gap = probe.finish()?;
    ensure!(
        gap < Duration::from_secs(1),
        "a surviving pod pair went {gap:?} without a TCP answer during the churn"
    );
    let took = wait_full(&base, Duration::from_secs(30)).await?;
    ipam_check(st, store).await?;
    Ok(Outcome {
        longest_gap: Some(gap),
        notes: vec![
            format!("{created} pods created and deleted through the CNI plugin"),
            format!(
                "survivors' matrix full after every wave's ADDs (longest wait {:.2} s) and after the churn ({:.2} s to confirm)",
                during.as_secs_f64(),
                took.as_secs_f64()
            ),
            "margayctl ipam check: clean".into(),
        ],
        ..Default::default()
    })
}

async fn pool_edit(st: &mut LabState, store: &Store) -> Result<Outcome> {
    let old = store.get::<IPPool>("default-ipv4").await?;
    let second = IPPool::new(
        "second-ipv4",
        IPPoolSpec {
            cidr: "10.245.0.0/16".into(),
            vxlan_mode: old.spec.vxlan_mode,
            nat_outgoing: true,
            ..Default::default()
        },
    );
    store.create(&second).await?;
    let mut old = old;
    old.spec.disabled = true;
    store.update(&old).await?;
    let nodes: Vec<plan::NodePlan> = st
        .nodes
        .iter()
        .map(|n| plan::node(n[4..].parse().unwrap_or(1)))
        .collect();
    let mut notes = Vec::new();
    for n in &nodes {
        let i = 100 + st.pods.iter().filter(|p| p.node == n.name).count() as u32;
        let pod = super::create_pod(st, n, &format!("pod-{}-new", n.name), i)?;
        let ip = pod.ip.context("the new pod got no address")?;
        let net: ipnet::IpNet = "10.245.0.0/16".parse()?;
        ensure!(
            net.contains(&ip),
            "new pod {} got {ip}, not from the new pool",
            pod.name
        );
        notes.push(format!("{} got {ip} from the new pool", pod.name));
    }
    let took = wait_full(&endpoints(st), Duration::from_secs(30)).await?;
    notes.push(format!(
        "old and new pods all reach each other ({:.2} s)",
        took.as_secs_f64()
    ));
    // The old pool is disabled, not gone: its pods keep reaching the outside through NAT.
    nat(st).context("after disabling the old pool")?;
    notes.push("old and new pods still reach the outside through natOutgoing".into());
    Ok(Outcome {
        notes,
        ..Default::default()
    })
}

async fn node_loss(st: &mut LabState) -> Result<Outcome> {
    let victim = "node2";
    let survivors: Vec<Endpoint> = endpoints(st)
        .into_iter()
        .filter(|e| !e.name.contains(victim))
        .collect();
    ensure!(
        survivors.len() >= 2,
        "node-loss needs pods on at least two other nodes"
    );
    let agent = st
        .daemon(&format!("agent-{victim}"))
        .cloned()
        .context("node2's agent is not in the lab state")?;
    let victim_pod = st
        .pods
        .iter()
        .find(|p| p.node == victim)
        .and_then(|p| p.ip)
        .context("no pod on node2")?;
    let n1 = plan::node(1);
    // `ip route get` adds cache details that change by themselves; compare the path only.
    let path_to = |ns: &str| -> Result<String> {
        let out = proc::ip_in(ns, &["route", "get", &victim_pod.to_string()])?;
        Ok(out
            .lines()
            .next()
            .unwrap_or("")
            .split(" uid")
            .next()
            .unwrap_or("")
            .trim()
            .to_owned())
    };
    // Settled means node1 routes to node2's pods itself, not through the router.
    let router = n1.subnet.router_addr().to_string();
    let t = Instant::now();
    let block = loop {
        let p = path_to(&n1.netns)?;
        if !p.contains(&router) {
            break p;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "node1 never learned node2's block: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Start from a settled cluster: node1 holds its three sessions (node2, node3, the ToR).
    wait_sessions(&n1.netns, 3).await?;
    let probe = GapProbe::start(survivors.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    proc::kill_now(&agent);
    // Graceful restart: the peers keep node2's routes for the restart time, and node2's kernel
    // keeps forwarding. Watch for 5 s, then bring the agent back whatever was seen.
    let mut during = Ok(());
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = path_to(&n1.netns)?;
        if now != block {
            during = Err(anyhow::anyhow!("node1's route to node2's pods changed while node2's agent was down: {block} -> {now}"));
            break;
        }
        if !matrix::ping(&survivors[0].netns, victim_pod)? {
            during = Err(anyhow::anyhow!(
                "{} could not reach node2's pod {victim_pod} while node2's agent was down",
                survivors[0].name
            ));
            break;
        }
    }
    let n2 = plan::node(2);
    super::start_node(st, &n2)?;
    during?;
    let all = endpoints(st);
    let back = wait_full(&all, Duration::from_secs(60)).await?;
    let gap = probe.finish()?;
    ensure!(
        gap < Duration::from_secs(1),
        "surviving pods lost each other for {gap:?} while node2's agent was down"
    );
    Ok(Outcome {
        longest_gap: Some(gap),
        notes: vec![
            "killed node2's agent with SIGKILL, restarted it after 5 s".into(),
            "node1 kept its route to node2's block and reached node2's pods throughout".into(),
            format!(
                "longest gap between surviving pods: {:.2} s (graceful restart)",
                gap.as_secs_f64()
            ),
            format!(
                "full matrix again {:.2} s after the restart",
                back.as_secs_f64()
            ),
        ],
        ..Default::default()
    })
}

async fn mesh_to_rr(st: &mut LabState, store: &Store) -> Result<Outcome> {
    let eps = endpoints(st);
    wait_sessions(&plan::node(2).netns, 3).await?;
    let probe = GapProbe::start(eps.clone());
    // Node 1 becomes the route reflector; the others peer with it; then the mesh goes. On
    // Kubernetes a node's labels are its Kubernetes Node's (its agent copies them over the
    // Margay Node's), so the label goes there too.
    if st.datastore == Datastore::Kubernetes {
        kube::kubectl(
            &st.bin_dir,
            &[
                "label",
                "node",
                "node1",
                "route-reflector=true",
                "--overwrite",
            ],
            "",
        )?;
    }
    let mut n1: Node = store.get("node1").await?;
    n1.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("route-reflector".into(), "true".into());
    let mut bgp = n1.spec.bgp.clone().unwrap_or_default();
    bgp.route_reflector_cluster_id = Some("224.0.0.1".into());
    n1.spec.bgp = Some(bgp);
    store.update(&n1).await?;
    for (name, node_sel, peer_sel) in [
        (
            "peer-with-rr",
            "!has(route-reflector)",
            "has(route-reflector)",
        ),
        (
            "rr-to-clients",
            "has(route-reflector)",
            "!has(route-reflector)",
        ),
    ] {
        store
            .create(&BGPPeer::new(
                name,
                BGPPeerSpec {
                    node_selector: Some(node_sel.into()),
                    peer_selector: Some(peer_sel.into()),
                    ..Default::default()
                },
            ))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut cfg: BGPConfiguration = store.get("default").await?;
    cfg.spec.node_to_node_mesh_enabled = Some(false);
    store.update(&cfg).await?;
    // The mesh sessions go: node2 keeps only the reflector and its ToR.
    wait_sessions(&plan::node(2).netns, 2)
        .await
        .context("with the mesh off node2 should keep two sessions: the reflector and the ToR")?;
    let took = wait_full(&eps, Duration::from_secs(30)).await?;
    let gap = probe.finish()?;
    ensure!(
        gap < Duration::from_secs(5),
        "a pod lost reachability for {gap:?} during the switch"
    );
    Ok(Outcome {
        longest_gap: Some(gap),
        notes: vec![
            "node1 reflects for the others; nodeToNodeMeshEnabled: false".into(),
            format!(
                "longest reachability gap during the switch: {:.2} s",
                gap.as_secs_f64()
            ),
            "node2 keeps two BGP sessions (the reflector and the ToR) instead of the mesh".into(),
            format!(
                "matrix full {:.2} s after the mesh sessions closed",
                took.as_secs_f64()
            ),
        ],
        ..Default::default()
    })
}

fn external_access(st: &LabState) -> Result<Outcome> {
    let mut notes = Vec::new();
    for p in &st.pods {
        let Some(ip) = p.ip else { continue };
        ensure!(
            matrix::ping(plan::OUTSIDE_NS, ip)?,
            "the outside host cannot reach {} ({ip})",
            p.name
        );
        ensure!(
            matrix::tcp(plan::OUTSIDE_NS, ip, plan::ECHO_PORT)?,
            "the outside host cannot connect to {} ({ip})",
            p.name
        );
    }
    notes.push(format!(
        "the outside host reached all {} pods (ICMP and TCP)",
        st.pods.len()
    ));
    Ok(Outcome {
        notes,
        ..Default::default()
    })
}

fn nat(st: &LabState) -> Result<Outcome> {
    // Watch what the outside host sees while every pod pings it.
    let dump = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            plan::OUTSIDE_NS,
            "timeout",
            "10",
            "tcpdump",
            "-n",
            "-l",
            "-i",
            "eth0",
            "icmp[icmptype] == icmp-echo",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running tcpdump (install tcpdump)")?;
    std::thread::sleep(Duration::from_millis(700));
    for p in &st.pods {
        ensure!(
            matrix::ping(&p.netns, plan::OUTSIDE_ADDR.into())?,
            "{} cannot reach the outside host",
            p.name
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    // `timeout` passes SIGINT on; tcpdump then prints what it has and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .context("stopping tcpdump")?;
    let out = dump.wait_with_output()?;
    ensure!(
        out.status.success(),
        "tcpdump on the outside host failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let seen = String::from_utf8_lossy(&out.stdout);
    let sources: std::collections::BTreeSet<String> = seen
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    ensure!(!sources.is_empty(), "the outside host saw no pings");
    for s in &sources {
        ensure!(
            s.starts_with("172.30."),
            "the outside host saw a pod address {s}: natOutgoing did not apply"
        );
    }
    Ok(Outcome {
        notes: vec![format!(
            "every pod reached the outside host, which saw only node addresses: {}",
            sources.into_iter().collect::<Vec<_>>().join(", ")
        )],
        ..Default::default()
    })
}

fn kubernetes_only(st: &LabState, what: &str) -> Result<()> {
    ensure!(
        st.datastore == Datastore::Kubernetes,
        "{what} needs the Kubernetes datastore: lab up --datastore kubernetes"
    );
    Ok(())
}

fn lab_nodes(st: &LabState) -> Vec<plan::NodePlan> {
    st.nodes
        .iter()
        .map(|n| plan::node(n[4..].parse().unwrap_or(1)))
        .collect()
}

/// The routes the BIRD ToR holds for prefixes in `pool`, each with its attribute lines
/// (`birdc show route all`).
fn bird_routes(pool: &ipnet::IpNet) -> Result<Vec<(ipnet::IpNet, String)>> {
    let ctl = Path::new(plan::STATE_DIR).join("router").join("bird.ctl");
    let out = std::process::Command::new("birdc")
        .arg("-s")
        .arg(&ctl)
        .args(["show", "route", "all"])
        .output()
        .context("running birdc (bird2)")?;
    ensure!(
        out.status.success(),
        "birdc show route all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut routes: Vec<(ipnet::IpNet, String)> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        match first.parse::<ipnet::IpNet>() {
            Ok(net) if !line.starts_with(char::is_whitespace) => routes.push((net, String::new())),
            _ => {
                if let Some((_, attrs)) = routes.last_mut() {
                    attrs.push_str(line.trim());
                    attrs.push('\n');
                }
            }
        }
    }
    routes.retain(|(n, _)| pool.contains(n));
    Ok(routes)
}

async fn communities(st: &LabState, store: &Store) -> Result<Outcome> {
    ensure!(
        st.router == Some(super::Router::Bird),
        "the communities scenario reads them at the BIRD ToR: bring the lab up with --router bird"
    );
    let pool: ipnet::IpNet = store
        .get::<IPPool>("default-ipv4")
        .await?
        .spec
        .cidr
        .parse()?;
    let blocks = bird_routes(&pool)?.len();
    ensure!(blocks > 0, "the ToR holds no route in {pool}");
    let standard = "BGP.community: (65010,77)";
    let large = "BGP.large_community: (65010, 1, 2)";
    let mut cfg: BGPConfiguration = store.get("default").await?;
    cfg.spec.communities = vec![margay_api::Community {
        name: "lab-pods".into(),
        value: "65010:77".into(),
    }];
    cfg.spec.prefix_advertisements = vec![margay_api::PrefixAdvertisement {
        cidr: pool.to_string(),
        communities: vec!["lab-pods".into(), "65010:1:2".into()],
    }];
    store.update(&cfg).await?;
    let (n, took) = wait_until(
        "every block at the ToR with both communities",
        Duration::from_secs(30),
        async || {
            let r = bird_routes(&pool)?;
            let tagged = r
                .iter()
                .filter(|(_, a)| a.contains(standard) && a.contains(large))
                .count();
            Ok((tagged == r.len() && tagged >= blocks).then_some(tagged))
        },
    )
    .await?;
    let mut cfg: BGPConfiguration = store.get("default").await?;
    cfg.spec.prefix_advertisements.clear();
    cfg.spec.communities.clear();
    store.update(&cfg).await?;
    let (_, gone) = wait_until(
        "the communities gone from the ToR's routes",
        Duration::from_secs(30),
        async || {
            let r = bird_routes(&pool)?;
            Ok(r.iter()
                .all(|(_, a)| !a.contains(standard) && !a.contains(large))
                .then_some(()))
        },
    )
    .await?;
    Ok(Outcome {
        notes: vec![
            format!(
                "{n} routes in {pool} reached the ToR with (65010,77) and (65010,1,2) {:.2} s after the BGPConfiguration changed",
                took.as_secs_f64()
            ),
            format!(
                "gone {:.2} s after the prefixAdvertisements were removed",
                gone.as_secs_f64()
            ),
        ],
        ..Default::default()
    })
}

/// Polls `f` every 200 ms until it gives a value or `limit` passes.
async fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<(T, Duration)> {
    let t = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok((v, t.elapsed()));
        }
        if t.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn gc_deleted_pod(st: &mut LabState, store: &Store) -> Result<Outcome> {
    kubernetes_only(st, "gc-deleted-pod")?;
    let n = lab_nodes(st).remove(0);
    let i = 200 + st.pods.iter().filter(|p| p.node == n.name).count() as u32;
    let pod = super::create_pod(st, &n, &format!("pod-{}-gone", n.name), i)?;
    let ip = pod.ip.context("the pod got no address")?;
    let held =
        |snap: &margay_ipam::audit::Snapshot| snap.allocations().into_iter().any(|a| a.ip == ip);
    let snap = margay_ipam::audit::Snapshot::read(store).await?;
    ensure!(held(&snap), "{ip} is not allocated after ADD");
    // The API deletes the Pod; the runtime never calls DEL (a node that died, say).
    kube::delete_pod(&st.bin_dir, &pod.namespace, &pod.name)?;
    let deleted = Instant::now();
    let (_, _) = wait_until(
        "the controller releases the deleted pod's address",
        Duration::from_secs(60),
        async || {
            let snap = margay_ipam::audit::Snapshot::read(store).await?;
            Ok((!held(&snap)).then_some(()))
        },
    )
    .await?;
    let took = deleted.elapsed();
    // What the runtime left behind on the node goes too: the pod's namespace and its echo.
    if let Some(e) = &pod.echo {
        proc::stop(e, Duration::from_secs(2));
    }
    st.pods.retain(|p| p.name != pod.name);
    st.save()?;
    proc::ip(&["netns", "del", &pod.netns])?;
    Ok(Outcome {
        notes: vec![
            format!(
                "{} ({ip}) deleted through the API with no CNI DEL",
                pod.name
            ),
            format!(
                "the controller released {ip} {:.1} s later (GC grace 5 s, pass every 2 s)",
                took.as_secs_f64()
            ),
        ],
        ..Default::default()
    })
}

async fn leader_failover(st: &mut LabState) -> Result<Outcome> {
    kubernetes_only(st, "leader-failover")?;
    const LEASE: Duration = Duration::from_secs(4);
    let bin = st.bin_dir.clone();
    let (leader, _) = wait_until("a controller leads", Duration::from_secs(30), async || {
        kube::lease_holder(&bin)
    })
    .await?;
    let (victim, other) = match leader.as_str() {
        "lab" => ("ipam-controller", "lab-2"),
        "lab-2" => ("ipam-controller-2", "lab"),
        x => bail!("the lease is held by {x:?}, not by a lab replica"),
    };
    let d = st
        .daemon(victim)
        .cloned()
        .with_context(|| format!("no daemon {victim}"))?;
    proc::kill_now(&d);
    let killed = Instant::now();
    let (_, _) = wait_until(
        "the other replica leads",
        LEASE + Duration::from_secs(6),
        async || Ok(kube::lease_holder(&bin)?.filter(|h| h == other)),
    )
    .await?;
    let took = killed.elapsed();
    ensure!(
        took <= LEASE + Duration::from_secs(3),
        "{other} took over {:.1} s after {leader} died; the lease is {LEASE:?}",
        took.as_secs_f64()
    );
    // The killed replica comes back as a follower, as its Deployment would restart it.
    super::start_controllers(st)?;
    Ok(Outcome {
        notes: vec![
            format!("{leader} led; killed with SIGKILL"),
            format!(
                "{other} leads {:.1} s later (lease {} s)",
                took.as_secs_f64(),
                LEASE.as_secs()
            ),
        ],
        ..Default::default()
    })
}

async fn invalid_pool(st: &mut LabState, store: &Store) -> Result<Outcome> {
    const NAME: &str = "invalid-ipv4";
    // Host bits set: no schema or CEL rule sees them, so every API server takes the pool, and
    // Margay must refuse it itself.
    const CIDR: &str = "10.246.0.1/16";
    let net: ipnet::IpNet = "10.246.0.0/16".parse()?;
    let mut notes = Vec::new();
    // A pool left by an interrupted run of this scenario goes first.
    match store.get::<IPPool>(NAME).await {
        Ok(p) => store.delete(&p).await?,
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    // Through the datastore's own API (the API server in Kubernetes mode), around Margay's
    // client-side validation, as `kubectl apply` would write it.
    let value = serde_json::json!({
        "apiVersion": "margay.io/v1", "kind": "IPPool",
        "metadata": {"name": NAME},
        "spec": {"cidr": CIDR},
    });
    store
        .backend()
        .create(margay_api::Kind::IPPool, NAME, value)
        .await?;
    let result = invalid_pool_checks(st, store, NAME, &net, &mut notes).await;
    let cleanup = match store.get::<IPPool>(NAME).await {
        Ok(p) => store.delete(&p).await.map_err(anyhow::Error::from),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    };
    result?;
    cleanup?;
    Ok(Outcome {
        notes,
        ..Default::default()
    })
}

async fn invalid_pool_checks(
    st: &mut LabState,
    store: &Store,
    name: &str,
    net: &ipnet::IpNet,
    notes: &mut Vec<String>,
) -> Result<()> {
    let (reason, took) = wait_until(
        "the controller marks the pool Valid=False",
        Duration::from_secs(30),
        async || {
            let p = store.get::<IPPool>(name).await?;
            Ok(p.status
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Valid"))
                .filter(|c| c.status == "False")
                .map(|c| format!("{}: {}", c.reason, c.message)))
        },
    )
    .await?;
    ensure!(
        reason.contains("spec.cidr"),
        "Valid=False, but for {reason}"
    );
    notes.push(format!(
        "the datastore took it; the controller marked it Valid=False {:.1} s later: {reason}",
        took.as_secs_f64()
    ));
    // A pod that asks for the pool is told which pool and why.
    let n = lab_nodes(st).remove(0);
    let i = 300 + st.pods.iter().filter(|p| p.node == n.name).count() as u32;
    let pod_name = format!("pod-{}-picky", n.name);
    let netns = plan::pod_netns(&n.name, i);
    super::add_netns(&netns)?;
    let picky = Pod {
        name: pod_name.clone(),
        namespace: "default".into(),
        node: n.name.clone(),
        node_netns: n.netns.clone(),
        netns: netns.clone(),
        container_id: pods::container_id(&n.name, &pod_name, 7),
        ip: None,
        ip6: None,
        echo: None,
    };
    let state_dir = Path::new(plan::STATE_DIR).join(&n.name);
    let asked = format!("[\"{name}\"]");
    let refused = if st.datastore == Datastore::Kubernetes {
        let r = match kube::create_pod(
            &st.bin_dir,
            "default",
            &pod_name,
            &n.name,
            &[("margay.io/ipv4pools", &asked)],
        ) {
            Ok(()) => pods::cni(&st.bin_dir, "ADD", &picky, &state_dir, st.datastore),
            Err(e) => Err(e),
        };
        let deleted = kube::delete_pod(&st.bin_dir, "default", &pod_name);
        r.and_then(|r| deleted.map(|()| r))
    } else {
        // etcd mode reads no annotations; the plugin's ipam.ipv4_pools asks instead.
        pods::cni_with_pools(
            &st.bin_dir,
            "ADD",
            &picky,
            &state_dir,
            st.datastore,
            &[name],
        )
    };
    // The namespace goes whatever happened above.
    proc::ip(&["netns", "del", &netns])?;
    match refused {
        Ok(r) => bail!("a pod that asked for {name} got {r}"),
        Err(e) => {
            let e = format!("{e:#}");
            ensure!(
                e.contains(name) && e.contains("spec.cidr"),
                "the error does not name the pool and the reason: {e}"
            );
            notes.push(format!(
                "a pod asking for {name} was refused: {}",
                e.lines().next().unwrap_or("")
            ));
        }
    }
    // Every other pod keeps getting addresses, never from the refused pool.
    let i = 400 + st.pods.iter().filter(|p| p.node == n.name).count() as u32;
    let pod = super::create_pod(st, &n, &format!("pod-{}-after", n.name), i)?;
    let ip = pod
        .ip
        .context("a pod after the invalid pool got no address")?;
    ensure!(
        !net.contains(&ip),
        "{} got {ip} from the refused pool",
        pod.name
    );
    let snap = margay_ipam::audit::Snapshot::read(store).await?;
    let from_refused: Vec<_> = snap
        .allocations()
        .into_iter()
        .filter(|a| net.contains(&a.ip))
        .collect();
    ensure!(
        from_refused.is_empty(),
        "addresses from the refused pool: {from_refused:?}"
    );
    notes.push(format!(
        "{} got {ip}, and no address is allocated from {net}",
        pod.name
    ));
    Ok(())
}
