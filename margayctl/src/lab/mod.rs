//! `margayctl lab`: a whole Margay cluster on one machine, out of network namespaces.
//!
//! `lab up` builds two L2 subnets joined by a router, etcd as the datastore (or, with
//! `--datastore kubernetes`, a kube-apiserver with RBAC on and the chart's CRDs, roles and
//! ServiceAccounts), `margay-node` on every node, the IPAM controller, and pods made by the
//! real CNI binaries; then it prints the
//! nodes, the pods and a reachability matrix with the time to full convergence. `lab status`
//! prints the same picture for a running lab; `lab down` removes everything the lab made, even
//! after a crash halfway through `up`. The lab touches nothing outside its own namespaces and
//! `/run/margay-lab`.

mod kube;
mod matrix;
mod plan;
mod pods;
mod proc;
mod scenario;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use margay_api::store::etcd::{EtcdBackend, EtcdConfig};
use margay_api::{
    AffinityState, BGPConfiguration, BGPConfigurationSpec, BlockAffinity, EncapMode, IPPool,
    IPPoolSpec, Node, Store,
};
use pods::Pod;
use proc::Daemon;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab and print its picture. Run as root.
    Up {
        /// Number of nodes (nodes whose number is a multiple of 3 go in subnet B).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
        nodes: u8,
        /// Pods on each node.
        #[arg(long, default_value_t = 2)]
        pods_per_node: u32,
        /// The pool's encapsulation.
        #[arg(long, value_enum, default_value_t = Encap::VxlanCrosssubnet)]
        encap: Encap,
        /// The router between the subnets: BIRD 2 as a ToR peering eBGP with every node, or
        /// margay-bgpd as a route reflector.
        #[arg(long, value_enum, default_value_t = Router::Bird)]
        router: Router,
        /// Where the Margay binaries are (default: next to margayctl).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Dual stack: IPv6 addresses on the fabric and the nodes, an IPv6 pool
        /// (fd00:10:244::/48, routed over BGP to the nodes' IPv6 addresses), pods with an
        /// address of each family, and the matrix in both.
        #[arg(long)]
        ipv6: bool,
    },
    /// Print the picture of the running lab.
    Status,
    /// Remove every namespace, process and file the lab made.
    Down,
    /// Run an end-to-end scenario against the running lab.
    Scenario {
        #[arg(value_enum)]
        name: scenario::Scenario,
    },
    /// Serve the TCP echo of the reachability matrix (run inside a pod by the lab).
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Datastore {
    #[default]
    Etcd,
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Router {
    Bird,
    Margay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Encap {
    /// VXLAN between nodes in different subnets, native within a subnet.
    VxlanCrosssubnet,
    /// VXLAN between all nodes.
    Vxlan,
    /// No encapsulation: the router must learn pod routes (over BGP).
    None,
}

impl Encap {
    fn vxlan_mode(self) -> EncapMode {
        match self {
            Encap::VxlanCrosssubnet => EncapMode::CrossSubnet,
            Encap::Vxlan => EncapMode::Always,
            Encap::None => EncapMode::Never,
        }
    }
}

/// Everything `lab down` needs to undo, written before each step of `lab up`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    nodes: Vec<String>,
    encap: Option<Encap>,
    router: Option<Router>,
    #[serde(default)]
    datastore: Datastore,
    /// Dual stack (`--ipv6`).
    #[serde(default)]
    ipv6: bool,
    bin_dir: PathBuf,
    daemons: Vec<Daemon>,
    pods: Vec<Pod>,
    /// Seconds from the first pod's creation to a full matrix.
    converged_after: Option<f64>,
}

fn state_path() -> PathBuf {
    Path::new(plan::STATE_DIR).join("state.json")
}

impl LabState {
    fn load() -> Result<Option<LabState>> {
        match std::fs::read(state_path()) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).context("reading the lab state")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self) -> Result<()> {
        std::fs::create_dir_all(plan::STATE_DIR)?;
        let tmp = state_path().with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, state_path())?;
        Ok(())
    }

    fn daemon(&self, name: &str) -> Option<&Daemon> {
        self.daemons.iter().find(|d| d.name == name)
    }
}

fn step(what: &str) -> Instant {
    eprintln!("==> {what}");
    Instant::now()
}

/// Runs a lab command. `lab up` builds the lab on `datastore` (margayctl's global
/// `--datastore`): etcd by default, or `kubernetes` for a real kube-apiserver (from
/// KUBE_APISERVER_BIN or PATH) with RBAC on, every component authenticated as its chart
/// ServiceAccount, and the lab playing the kubelet (Nodes, Pods).
pub async fn run(cmd: &LabCommand, datastore: Option<&str>) -> Result<ExitCode> {
    let datastore = match datastore {
        None | Some("etcd") | Some("etcdv3") => Datastore::Etcd,
        Some("kubernetes") | Some("kdd") => Datastore::Kubernetes,
        Some(other) => bail!("--datastore {other:?}: the lab runs on etcd or kubernetes"),
    };
    if !matches!(cmd, LabCommand::Echo { .. }) && !nix::unistd::Uid::effective().is_root() {
        bail!("the lab builds network namespaces: run margayctl lab as root");
    }
    match cmd {
        LabCommand::Up {
            nodes,
            pods_per_node,
            encap,
            router,
            bin_dir,
            ipv6,
        } => {
            up(
                *nodes,
                *pods_per_node,
                *encap,
                *router,
                datastore,
                bin_dir.clone(),
                *ipv6,
            )
            .await
        }
        LabCommand::Status => status().await,
        LabCommand::Down => down(),
        LabCommand::Scenario { name } => run_scenario(*name).await,
        LabCommand::Echo { name } => {
            matrix::serve_echo(plan::ECHO_PORT, name)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Debian packages the lab needs, by the program it runs.
const NEEDED: &[(&str, &str)] = &[
    ("etcd", "etcd-server"),
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("nft", "nftables"),
    ("bird", "bird2"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(prog, _)| !on_path(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "==> installing missing packages with apt-get: {}",
        missing.join(" ")
    );
    let ok = std::process::Command::new("apt-get")
        .arg("update")
        .arg("-qq")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok {
        bail!(
            "could not install {}; install them and run lab up again",
            missing.join(" ")
        );
    }
    Ok(())
}

fn bin_dir(given: Option<PathBuf>, router: Router) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_owned)
            .context("locating margayctl's directory")?,
    };
    let router_bin = (router == Router::Margay).then_some("margay-bgpd");
    for b in [
        "margay-node",
        "margay",
        "margay-ipam",
        "margay-ipam-controller",
    ]
    .into_iter()
    .chain(router_bin)
    {
        if !dir.join(b).is_file() {
            bail!(
                "{} is missing: build the workspace (cargo build --workspace) or pass --bin-dir",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

/// A bridge namespace for a subnet, and a veth from it into `ns` named `ifname` with `addr`.
fn attach(bridge_ns: &str, port: &str, ns: &str, ifname: &str, addr: &str) -> Result<()> {
    let tmp = format!("{port}x");
    proc::ip(&["link", "add", port, "type", "veth", "peer", "name", &tmp])?;
    proc::ip(&["link", "set", port, "netns", bridge_ns])?;
    proc::ip_in(bridge_ns, &["link", "set", port, "master", "br0", "up"])?;
    proc::ip(&["link", "set", &tmp, "netns", ns])?;
    proc::ip_in(ns, &["link", "set", &tmp, "name", ifname])?;
    proc::ip_in(ns, &["addr", "add", addr, "dev", ifname])?;
    proc::ip_in(ns, &["link", "set", ifname, "up"])?;
    Ok(())
}

fn add_netns(name: &str) -> Result<()> {
    proc::ip(&["netns", "add", name])?;
    proc::ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

fn build_fabric(nodes: &[plan::NodePlan], ipv6: bool) -> Result<()> {
    use plan::Subnet;
    for s in [Subnet::A, Subnet::B] {
        add_netns(&s.bridge_ns())?;
        proc::ip_in(&s.bridge_ns(), &["link", "add", "br0", "type", "bridge"])?;
        proc::ip_in(&s.bridge_ns(), &["link", "set", "br0", "up"])?;
    }
    add_netns(plan::ROUTER_NS)?;
    attach(
        &Subnet::A.bridge_ns(),
        "mglra",
        plan::ROUTER_NS,
        "eth0",
        &format!("{}/24", Subnet::A.router_addr()),
    )?;
    attach(
        &Subnet::B.bridge_ns(),
        "mglrb",
        plan::ROUTER_NS,
        "eth1",
        &format!("{}/24", Subnet::B.router_addr()),
    )?;
    proc::exec_in(plan::ROUTER_NS, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    if ipv6 {
        for (s, dev) in [(Subnet::A, "eth0"), (Subnet::B, "eth1")] {
            let a = format!("{}/64", s.router_addr6());
            proc::ip_in(plan::ROUTER_NS, &["addr", "add", &a, "dev", dev, "nodad"])?;
        }
        proc::exec_in(
            plan::ROUTER_NS,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.forwarding=1"],
        )?;
    }
    // The outside host sits behind the router on a link of its own.
    add_netns(plan::OUTSIDE_NS)?;
    proc::ip(&[
        "link", "add", "mglo0", "type", "veth", "peer", "name", "mglo1",
    ])?;
    proc::ip(&["link", "set", "mglo0", "netns", plan::ROUTER_NS])?;
    proc::ip(&["link", "set", "mglo1", "netns", plan::OUTSIDE_NS])?;
    proc::ip_in(plan::ROUTER_NS, &["link", "set", "mglo0", "name", "eth2"])?;
    proc::ip_in(
        plan::ROUTER_NS,
        &[
            "addr",
            "add",
            &format!("{}/24", plan::ROUTER_OUTSIDE_ADDR),
            "dev",
            "eth2",
        ],
    )?;
    proc::ip_in(plan::ROUTER_NS, &["link", "set", "eth2", "up"])?;
    proc::ip_in(plan::OUTSIDE_NS, &["link", "set", "mglo1", "name", "eth0"])?;
    proc::ip_in(
        plan::OUTSIDE_NS,
        &[
            "addr",
            "add",
            &format!("{}/24", plan::OUTSIDE_ADDR),
            "dev",
            "eth0",
        ],
    )?;
    proc::ip_in(plan::OUTSIDE_NS, &["link", "set", "eth0", "up"])?;
    proc::ip_in(
        plan::OUTSIDE_NS,
        &[
            "route",
            "add",
            "default",
            "via",
            &plan::ROUTER_OUTSIDE_ADDR.to_string(),
        ],
    )?;
    // The infrastructure namespace: etcd and the controller.
    add_netns(plan::INFRA_NS)?;
    attach(
        &Subnet::A.bridge_ns(),
        "mgli",
        plan::INFRA_NS,
        "eth0",
        &format!("{}/24", plan::INFRA_ADDR),
    )?;
    proc::ip_in(
        plan::INFRA_NS,
        &[
            "route",
            "add",
            "default",
            "via",
            &Subnet::A.router_addr().to_string(),
        ],
    )?;
    for n in nodes {
        add_netns(&n.netns)?;
        attach(
            &n.subnet.bridge_ns(),
            &format!("mgln{}", n.index),
            &n.netns,
            "eth0",
            &n.addr_cidr(),
        )?;
        proc::ip_in(
            &n.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &n.subnet.router_addr().to_string(),
            ],
        )?;
        if ipv6 {
            proc::ip_in(
                &n.netns,
                &["addr", "add", &n.addr6_cidr(), "dev", "eth0", "nodad"],
            )?;
            proc::ip_in(
                &n.netns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &n.subnet.router_addr6().to_string(),
                ],
            )?;
        }
    }
    Ok(())
}

/// The lab's datastore, as its administrator (from inside the infrastructure namespace).
async fn connect_store(datastore: Datastore) -> Result<Store> {
    if datastore == Datastore::Kubernetes {
        let backend =
            margay_api::store::kube::KubeBackend::from_kubeconfig(kube::kubeconfig("admin"))
                .await
                .context("connecting to the lab's API server")?;
        return Ok(Store::new(Arc::new(backend)));
    }
    let backend = EtcdBackend::connect(
        EtcdConfig::new([plan::etcd_endpoint()]).with_prefix(plan::ETCD_PREFIX),
    )
    .await
    .context("connecting to the lab's etcd")?;
    Ok(Store::new(Arc::new(backend)))
}

async fn wait_etcd() -> Result<Store> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(store) = connect_store(Datastore::Etcd).await {
            if store.list::<IPPool>().await.is_ok() {
                return Ok(store);
            }
        }
        if Instant::now() > deadline {
            bail!("etcd in {} did not answer within 30 s", plan::INFRA_NS);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The environment that points a component at the lab's datastore, as `who` (its
/// ServiceAccount in Kubernetes mode).
fn datastore_env(datastore: Datastore, who: &str) -> Vec<(String, String)> {
    match datastore {
        Datastore::Etcd => vec![
            ("MARGAY_DATASTORE_TYPE".into(), "etcd".into()),
            ("MARGAY_ETCD_ENDPOINTS".into(), plan::etcd_endpoint()),
            ("MARGAY_ETCD_PREFIX".into(), plan::ETCD_PREFIX.into()),
        ],
        Datastore::Kubernetes => vec![
            ("MARGAY_DATASTORE_TYPE".into(), "kubernetes".into()),
            (
                "KUBECONFIG".into(),
                kube::kubeconfig(who).display().to_string(),
            ),
            ("POD_NAMESPACE".into(), kube::NAMESPACE.into()),
        ],
    }
}

fn node_env(n: &plan::NodePlan, datastore: Datastore, ipv6: bool) -> Vec<(String, String)> {
    let state = Path::new(plan::STATE_DIR).join(&n.name);
    let mut env = vec![("NODENAME".into(), n.name.clone())];
    env.extend(datastore_env(datastore, "margay-node"));
    env.extend([
        ("IP".into(), n.addr_cidr()),
        ("MARGAY_STATE_DIR".into(), state.display().to_string()),
        ("MARGAY_BGP_ENABLED".into(), "true".into()),
        ("MARGAY_HEALTH_LISTEN".into(), "127.0.0.1:9099".into()),
        ("MARGAY_METRICS_LISTEN".into(), "127.0.0.1:9091".into()),
        ("MARGAY_RESYNC_INTERVAL".into(), "30s".into()),
    ]);
    if ipv6 {
        env.push(("IP6".into(), n.addr6_cidr()));
    }
    env
}

fn start_node(st: &mut LabState, n: &plan::NodePlan) -> Result<()> {
    let dir = Path::new(plan::STATE_DIR).join(&n.name);
    std::fs::create_dir_all(&dir)?;
    let d = proc::spawn_daemon(
        &format!("agent-{}", n.name),
        &n.netns,
        &st.bin_dir.join("margay-node"),
        &[],
        &node_env(n, st.datastore, st.ipv6),
        &dir.join("margay-node.log"),
    )?;
    st.daemons.retain(|x| x.name != d.name);
    st.daemons.push(d);
    st.save()
}

async fn up(
    n_nodes: u8,
    pods_per_node: u32,
    encap: Encap,
    router: Router,
    datastore: Datastore,
    bin: Option<PathBuf>,
    ipv6: bool,
) -> Result<ExitCode> {
    let t0 = Instant::now();
    if LabState::load()?.is_some() || !proc::namespaces_with_prefix(plan::PREFIX).is_empty() {
        bail!("a lab is already up (or left over): run `margayctl lab down` first");
    }
    ensure_packages()?;
    let bin_dir = bin_dir(bin, router)?;
    if datastore == Datastore::Kubernetes {
        // Before anything is built: without an API server there is no lab to build.
        kube::apiserver_binary()?;
    }
    let nodes = plan::nodes(n_nodes);
    let mut st = LabState {
        nodes: nodes.iter().map(|n| n.name.clone()).collect(),
        encap: Some(encap),
        router: Some(router),
        datastore,
        ipv6,
        bin_dir: bin_dir.clone(),
        ..Default::default()
    };
    st.save()?;
    if ipv6 {
        std::fs::write(plan::ipv6_marker(), "dual stack\n")?;
    }

    step(&format!(
        "building the fabric: subnets A and B, a router, {n_nodes} nodes"
    ));
    build_fabric(&nodes, ipv6)?;

    step("starting etcd");
    let etcd_dir = Path::new(plan::STATE_DIR).join("etcd");
    let peer = format!("http://{}:2380", plan::INFRA_ADDR);
    let client = format!(
        "http://127.0.0.1:{p},{e}",
        p = plan::ETCD_PORT,
        e = plan::etcd_endpoint()
    );
    let etcd = proc::spawn_daemon(
        "etcd",
        plan::INFRA_NS,
        Path::new("etcd"),
        &[
            "--name=lab".into(),
            format!("--data-dir={}", etcd_dir.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={}", plan::etcd_endpoint()),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=lab={peer}"),
            "--log-level=warn".into(),
        ],
        &[],
        &Path::new(plan::STATE_DIR).join("etcd.log"),
    )?;
    st.daemons.push(etcd);
    st.save()?;
    // From here on this process lives in the infrastructure namespace, beside etcd.
    proc::enter_netns(plan::INFRA_NS)?;
    let mut store = wait_etcd().await?;
    if datastore == Datastore::Kubernetes {
        step("starting kube-apiserver (RBAC) and installing the chart's CRDs, roles and ServiceAccounts");
        st.daemons.push(kube::start_apiserver()?);
        st.save()?;
        kube::wait_ready(&bin_dir)?;
        kube::install_chart(&bin_dir, false)?;
        for n in &nodes {
            kube::register_node(
                &bin_dir,
                &n.name,
                &[
                    ("lab.margay.io/subnet", n.subnet.label()),
                    ("kubernetes.io/hostname", &n.name),
                ],
            )?;
        }
        store = connect_store(datastore).await?;
    }

    step(&format!(
        "creating the default pool {} ({encap:?})",
        plan::POOL_CIDR
    ));
    store
        .create(&IPPool::new(
            "default-ipv4",
            IPPoolSpec {
                cidr: plan::POOL_CIDR.into(),
                vxlan_mode: encap.vxlan_mode(),
                nat_outgoing: true,
                ..Default::default()
            },
        ))
        .await?;
    if ipv6 {
        step(&format!(
            "creating the IPv6 pool {} (no encapsulation)",
            plan::POOL6_CIDR
        ));
        store
            .create(&IPPool::new(
                "default-ipv6",
                IPPoolSpec {
                    cidr: plan::POOL6_CIDR.into(),
                    ..Default::default()
                },
            ))
            .await?;
    }
    store
        .create(&BGPConfiguration::new(
            "default",
            BGPConfigurationSpec {
                as_number: Some(plan::NODE_AS),
                ..Default::default()
            },
        ))
        .await?;

    step(&format!(
        "starting the router ({router:?}) and its BGP peerings"
    ));
    seed_bgp(&store, &nodes, router).await?;
    start_router(&mut st, &nodes, router)?;

    step("starting the IPAM controller");
    start_controllers(&mut st)?;

    step("starting margay-node on every node");
    for n in &nodes {
        start_node(&mut st, n)?;
    }
    wait_nodes_published(&store, &nodes, encap).await?;

    step(&format!(
        "creating {} pods through the CNI plugin",
        pods_per_node * u32::from(n_nodes)
    ));
    let t_pods = Instant::now();
    for n in &nodes {
        for i in 0..pods_per_node {
            let pod = create_pod(&mut st, n, &format!("pod-{}-{i}", n.name), i)?;
            eprintln!(
                "    {}/{} on {}: {}",
                pod.namespace,
                pod.name,
                pod.node,
                pod.ip.map(|i| i.to_string()).unwrap_or_default()
            );
        }
    }

    step("waiting for full pod-to-pod reachability");
    let endpoints = endpoints(&st);
    let converged = loop {
        let m = matrix::probe(&endpoints);
        if matrix::full(&endpoints, &m)? {
            break Some(t_pods.elapsed());
        }
        if t_pods.elapsed() > Duration::from_secs(90) {
            eprintln!("{}", matrix::render(&endpoints, &m));
            break None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    st.converged_after = converged.map(|d| d.as_secs_f64());
    st.save()?;
    print_picture(&st, &store).await?;
    match converged {
        Some(d) => {
            println!(
                "\nfull reachability {:.2} s after the first pod was created; lab up took {:.1} s",
                d.as_secs_f64(),
                t0.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            println!(
                "\nreachability is NOT full after 90 s; logs are under {}",
                plan::STATE_DIR
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Node objects with the lab's labels (the agents keep them), and the peerings with the
/// router: eBGP from each subnet's nodes to its ToR address (BIRD), or iBGP to the route
/// reflector (margay-bgpd), besides the node-to-node mesh.
async fn seed_bgp(store: &Store, nodes: &[plan::NodePlan], router: Router) -> Result<()> {
    use margay_api::{BGPPeer, BGPPeerSpec};
    for n in nodes {
        let mut node = Node::new(&n.name, Default::default());
        node.metadata.labels = Some(
            [
                (
                    "lab.margay.io/subnet".to_owned(),
                    n.subnet.label().to_owned(),
                ),
                ("kubernetes.io/hostname".to_owned(), n.name.clone()),
            ]
            .into(),
        );
        store.create(&node).await?;
    }
    for s in [plan::Subnet::A, plan::Subnet::B] {
        let (asn, name) = match router {
            Router::Bird => (plan::ROUTER_AS, format!("tor-{}", s.label())),
            Router::Margay => (plan::NODE_AS, format!("rr-{}", s.label())),
        };
        store
            .create(&BGPPeer::new(
                &name,
                BGPPeerSpec {
                    node_selector: Some(format!("lab.margay.io/subnet == '{}'", s.label())),
                    peer_ip: Some(s.router_addr().to_string()),
                    as_number: Some(asn),
                    keepalive_time: Some("10s".into()),
                    ..Default::default()
                },
            ))
            .await?;
    }
    Ok(())
}

/// Starts BIRD (eBGP ToR that installs what it learns) or margay-bgpd (route reflector that
/// installs what it learns) in the router namespace.
fn start_router(st: &mut LabState, nodes: &[plan::NodePlan], router: Router) -> Result<()> {
    let dir = Path::new(plan::STATE_DIR).join("router");
    std::fs::create_dir_all(&dir)?;
    let d = match router {
        Router::Bird => {
            let conf = dir.join("bird.conf");
            std::fs::write(&conf, plan::bird_config(nodes, st.ipv6))?;
            proc::spawn_daemon(
                "router",
                plan::ROUTER_NS,
                Path::new("bird"),
                &[
                    "-f".into(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-s".into(),
                    dir.join("bird.ctl").display().to_string(),
                    "-P".into(),
                    dir.join("bird.pid").display().to_string(),
                ],
                &[],
                &dir.join("bird.log"),
            )?
        }
        Router::Margay => {
            let conf = dir.join("margay-bgpd.yaml");
            std::fs::write(&conf, plan::bgpd_config(nodes, &dir))?;
            proc::spawn_daemon(
                "router",
                plan::ROUTER_NS,
                &st.bin_dir.join("margay-bgpd"),
                &["--config".into(), conf.display().to_string()],
                &[],
                &dir.join("margay-bgpd.log"),
            )?
        }
    };
    st.daemons.push(d);
    st.save()
}

/// Waits until every node has published its address (and VTEP where VXLAN is used).
async fn wait_nodes_published(store: &Store, nodes: &[plan::NodePlan], encap: Encap) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (published, _) = store.list::<Node>().await?;
        let ready = nodes.iter().all(|n| {
            published.iter().any(|p| {
                p.metadata.name.as_deref() == Some(n.name.as_str())
                    && p.spec.bgp.as_ref().and_then(|b| b.ipv4_address.as_deref())
                        == Some(n.addr_cidr().as_str())
                    && (encap == Encap::None
                        || p.spec.vxlan_tunnel_mac_addr.is_some()
                        || encap == Encap::VxlanCrosssubnet
                            && nodes.iter().all(|o| o.subnet == n.subnet))
            })
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node agents did not publish their nodes within 60 s; see {}/node*/margay-node.log", plan::STATE_DIR);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The IPAM controller: one replica on etcd; on Kubernetes two, electing a leader through a
/// Lease, with a short GC grace so that the lab can show a deleted Pod's address coming back.
/// Replicas that run already are left alone.
fn start_controllers(st: &mut LabState) -> Result<()> {
    let replicas: &[&str] = match st.datastore {
        Datastore::Etcd => &["lab"],
        Datastore::Kubernetes => &["lab", "lab-2"],
    };
    for (i, identity) in replicas.iter().enumerate() {
        let name = controller_name(i);
        if st.daemon(&name).is_some_and(proc::is_running) {
            continue;
        }
        let mut args: Vec<String> = vec![
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", 9094 + i),
            "--identity".into(),
            (*identity).into(),
        ];
        if st.datastore == Datastore::Kubernetes {
            args.extend(
                [
                    "--interval",
                    "2s",
                    "--gc-grace",
                    "5s",
                    "--lease-namespace",
                    kube::NAMESPACE,
                    "--lease-duration",
                    "4s",
                ]
                .map(String::from),
            );
        } else {
            args.extend(["--interval", "10s"].map(String::from));
        }
        let d = proc::spawn_daemon(
            &name,
            plan::INFRA_NS,
            &st.bin_dir.join("margay-ipam-controller"),
            &args,
            &datastore_env(st.datastore, "margay-ipam-controller"),
            &Path::new(plan::STATE_DIR).join(format!("{name}.log")),
        )?;
        st.daemons.retain(|x| x.name != d.name);
        st.daemons.push(d);
        st.save()?;
    }
    Ok(())
}

/// The daemon name of controller replica `i`.
fn controller_name(i: usize) -> String {
    if i == 0 {
        "ipam-controller".into()
    } else {
        format!("ipam-controller-{}", i + 1)
    }
}

fn create_pod(st: &mut LabState, n: &plan::NodePlan, name: &str, i: u32) -> Result<Pod> {
    let netns = plan::pod_netns(&n.name, i);
    add_netns(&netns)?;
    let mut pod = Pod {
        name: name.to_owned(),
        namespace: "default".into(),
        node: n.name.clone(),
        node_netns: n.netns.clone(),
        netns: netns.clone(),
        container_id: pods::container_id(&n.name, name, std::process::id() as u64),
        ip: None,
        ip6: None,
        echo: None,
    };
    st.pods.push(pod.clone());
    st.save()?;
    let state_dir = Path::new(plan::STATE_DIR).join(&n.name);
    if st.datastore == Datastore::Kubernetes {
        kube::create_pod(&st.bin_dir, &pod.namespace, name, &n.name, &[])?;
    }
    let result = pods::cni(&st.bin_dir, "ADD", &pod, &state_dir, st.datastore)?;
    pod.ip = pods::result_ip(&result);
    pod.ip6 = pods::result_ip6(&result);
    if st.ipv6 && pod.ip6.is_none() {
        bail!("{name} got no IPv6 address in a dual-stack lab: {result}");
    }
    let me = std::env::current_exe()?;
    pod.echo = Some(proc::spawn_daemon(
        &format!("echo-{name}"),
        &netns,
        &me,
        &[
            "lab".into(),
            "echo".into(),
            "--name".into(),
            name.to_owned(),
        ],
        &[],
        &state_dir.join("echo.log"),
    )?);
    if let Some(p) = st.pods.iter_mut().find(|p| p.name == pod.name) {
        *p = pod.clone();
    }
    st.save()?;
    Ok(pod)
}

/// Every pod address as a probe target: a dual-stack pod is two endpoints, so the matrix
/// covers both families (from every pod to every address).
fn endpoints(st: &LabState) -> Vec<matrix::Endpoint> {
    st.pods
        .iter()
        .flat_map(|p| {
            let v6 = p.ip6.map(|ip| matrix::Endpoint {
                name: format!("{} v6", p.name),
                netns: p.netns.clone(),
                ip,
            });
            let v4 = p.ip.map(|ip| matrix::Endpoint {
                name: p.name.clone(),
                netns: p.netns.clone(),
                ip,
            });
            v4.into_iter().chain(v6)
        })
        .collect()
}

/// A node's BGP sessions as its agent reports them in the Node status.
fn bgp_sessions(nodes: &[Node], name: &str) -> String {
    let sessions: Vec<String> = nodes
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some(name))
        .and_then(|o| o.status.as_ref())
        .map(|s| {
            s.bgp_peers
                .iter()
                .map(|p| {
                    format!(
                        "{} {} {}/{}",
                        p.peer_ip, p.state, p.prefixes_received, p.prefixes_advertised
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if sessions.is_empty() {
        "-".into()
    } else {
        sessions.join(", ")
    }
}

async fn print_picture(st: &LabState, store: &Store) -> Result<()> {
    let (affinities, _) = store.list::<BlockAffinity>().await?;
    let (node_objs, _) = store.list::<Node>().await?;
    println!("\nNODES");
    let rows: Vec<Vec<String>> = st
        .nodes
        .iter()
        .map(|name| {
            let n = plan::node(name[4..].parse().unwrap_or(1));
            let blocks: Vec<String> = affinities
                .iter()
                .filter(|a| a.spec.node == *name && a.spec.state == AffinityState::Confirmed)
                .map(|a| a.spec.cidr.clone())
                .collect();
            let agent = st
                .daemon(&format!("agent-{name}"))
                .map(|d| {
                    if proc::is_running(d) {
                        "running"
                    } else {
                        "DOWN"
                    }
                })
                .unwrap_or("-");
            vec![
                name.clone(),
                n.addr_cidr(),
                n.subnet.label().to_owned(),
                agent.to_owned(),
                if blocks.is_empty() {
                    "-".into()
                } else {
                    blocks.join(",")
                },
                bgp_sessions(&node_objs, name),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::output::table(
            &[
                "NODE",
                "ADDRESS",
                "SUBNET",
                "AGENT",
                "BLOCKS",
                "BGP (peer state received/advertised)"
            ],
            &rows
        )
    );
    println!("\nPODS");
    let rows: Vec<Vec<String>> = st
        .pods
        .iter()
        .map(|p| {
            let mut row = vec![
                format!("{}/{}", p.namespace, p.name),
                p.node.clone(),
                p.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            ];
            if st.ipv6 {
                row.push(p.ip6.map(|i| i.to_string()).unwrap_or_else(|| "-".into()));
            }
            row
        })
        .collect();
    let head: &[&str] = if st.ipv6 {
        &["POD", "NODE", "IP", "IPV6"]
    } else {
        &["POD", "NODE", "IP"]
    };
    print!("{}", crate::output::table(head, &rows));
    let eps = endpoints(st);
    let m = matrix::probe(&eps);
    println!("\nREACHABILITY (ICMP and TCP; ✓ both, i ICMP only, t TCP only, ✗ neither, ! probe failed to run)");
    print!("{}", matrix::render(&eps, &m));
    Ok(())
}

async fn run_scenario(name: scenario::Scenario) -> Result<ExitCode> {
    let Some(mut st) = LabState::load()? else {
        bail!("no lab is up: run `margayctl lab up` first");
    };
    proc::enter_netns(plan::INFRA_NS)?;
    let store = connect_store(st.datastore).await?;
    eprintln!("==> scenario {name:?}");
    match scenario::run(&mut st, &store, name).await {
        Ok(out) => {
            for n in &out.notes {
                println!("  {n}");
            }
            if let Some(g) = out.longest_gap {
                println!("  longest reachability gap: {:.2} s", g.as_secs_f64());
            }
            println!("scenario {name:?} passed in {:.1} s", out.seconds);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("scenario {name:?} FAILED: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn status() -> Result<ExitCode> {
    let Some(st) = LabState::load()? else {
        bail!("no lab is up (no {})", state_path().display());
    };
    proc::enter_netns(plan::INFRA_NS)?;
    let store = connect_store(st.datastore).await?;
    print_picture(&st, &store).await?;
    let eps = endpoints(&st);
    Ok(if matrix::full(&eps, &matrix::probe(&eps))? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn down() -> Result<ExitCode> {
    let st = LabState::load().ok().flatten();
    let mut stopped = 0;
    if let Some(st) = &st {
        for p in &st.pods {
            if let Some(e) = &p.echo {
                proc::stop(e, Duration::from_secs(2));
            }
        }
        // Agents first (they keep routes), then the controller, then etcd.
        for d in st.daemons.iter().rev() {
            proc::stop(d, Duration::from_secs(5));
            stopped += 1;
        }
    }
    let namespaces = proc::namespaces_with_prefix(plan::PREFIX);
    for ns in &namespaces {
        let _ = proc::ip(&["netns", "del", ns]);
    }
    let _ = std::fs::remove_dir_all(plan::STATE_DIR);
    let left = proc::namespaces_with_prefix(plan::PREFIX);
    println!(
        "lab down: stopped {stopped} processes, removed {} namespaces{}",
        namespaces.len() - left.len(),
        if left.is_empty() {
            String::new()
        } else {
            format!("; could not remove {left:?}")
        }
    );
    Ok(if left.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
