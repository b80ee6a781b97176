//! The node agent's main loop: sync from the datastore, publish this node's data, and keep
//! the kernel matching the cluster's intent.
//!
//! Order of a start:
//! 1. Resolve the node name and write it where the CNI plugin reads it.
//! 2. Start informers on every kind the agent follows and wait until all have listed: no kernel
//!    write happens before the agent has the whole picture.
//! 3. Publish this node's address (and tunnel endpoints) in its `Node` object.
//! 4. Program: sysctls, tunnel devices, NAT sets, the MTU file, then routes, sweeping Margay
//!    routes nobody wants any more (mark and sweep).
//! 5. Reconcile again on every change of the followed kinds, on kernel route and link events
//!    (a route deleted by hand comes back), and every resync interval.
//!
//! On shutdown the routes are left in place, so traffic keeps flowing while the agent restarts.

use crate::config::{AddressSetting, NodeConfig};
use crate::routes::{self, RemoteRoute};
use ipnet::IpNet;
use margay_api::store::informer::Informer;
use margay_api::{
    AffinityState, BGPConfiguration, BGPPeer, BlockAffinity, EncapMode, IPAMBlock, IPPool, Node,
    NodeBGPSpec, Store, StoreError,
};
use margay_ipam::{
    tunnel_handle, AddressUse, Allocator, AllocatorConfig, AssignRequest, TunnelKind,
};
use margay_kernel::events::{
    Coalescer, CoalescerConfig, CoalescingSubscription, EventSubscription,
};
use margay_kernel::mtu::{pod_mtu, Encap};
use margay_kernel::nat::{Nat, NatPool};
use margay_kernel::tunnel::{VxlanSpec, VXLAN_DEVICE};
use margay_kernel::{
    FdbEntry, KernelError, Neighbour, RouteFilter, RouteKey, RouteWriter, WriteOp, MAIN_TABLE,
    MARGAY_RT_PROTO,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error("IPAM: {0}")]
    Ipam(#[from] margay_ipam::IpamError),
    #[error("node address: {0}")]
    Address(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Counters and gauges the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub routes_programmed: AtomicU64,
    pub resyncs: AtomicU64,
    pub repairs: AtomicU64,
    pub swept: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub skipped_prefixes: AtomicU64,
    pub bgp_sessions_established: AtomicU64,
    pub bgp_errors: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let g = |m: &AtomicU64| m.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "margay_node_routes_programmed",
                "gauge",
                "Routes Margay holds in the kernel.",
                g(&self.routes_programmed),
            ),
            (
                "margay_node_resyncs_total",
                "counter",
                "Reconciliations of the kernel with the cluster's state.",
                g(&self.resyncs),
            ),
            (
                "margay_node_repairs_total",
                "counter",
                "Routes found missing or changed in the kernel and put back.",
                g(&self.repairs),
            ),
            (
                "margay_node_routes_swept_total",
                "counter",
                "Margay routes removed because nothing wants them.",
                g(&self.swept),
            ),
            (
                "margay_node_reconcile_errors_total",
                "counter",
                "Reconciliations that failed and were retried.",
                g(&self.reconcile_errors),
            ),
            (
                "margay_node_skipped_prefixes",
                "gauge",
                "Remote prefixes that could not be programmed.",
                g(&self.skipped_prefixes),
            ),
            (
                "margay_node_bgp_sessions_established",
                "gauge",
                "BGP sessions in Established state (0 when the speaker does not answer).",
                g(&self.bgp_sessions_established),
            ),
            (
                "margay_node_bgp_errors_total",
                "counter",
                "Failed calls to the BGP speaker (peers, announcements, state) and restarts of it.",
                g(&self.bgp_errors),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        out
    }
}

/// Consecutive failed reconciles after which the agent reports itself not ready.
pub const NOT_READY_AFTER_FAILURES: u32 = 3;

/// Why the agent is not ready: the `Ready` condition's reason, and the message `/readyz` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

/// Liveness and readiness, shared with the HTTP endpoints.
///
/// - Live: a reconcile succeeded within the stall limit (three resync intervals, at least
///   30 s). Failed reconciles and a hung loop do not move it.
/// - Ready: the first reconcile succeeded, every informer follows the datastore, fewer than
///   [`NOT_READY_AFTER_FAILURES`] reconciles in a row failed, and, with BGP on, the speaker
///   and its route stream are running. Each comes back by itself when its cause is gone.
#[derive(Debug)]
pub struct Health {
    /// When a reconcile last succeeded, for liveness.
    heartbeat: Mutex<Instant>,
    /// The longest the agent may go without a successful reconcile and still be live.
    stall_limit: Duration,
    state: Mutex<HealthState>,
    /// The informers, whose failures make the agent not ready.
    datastore: Vec<margay_api::store::informer::InformerHealth>,
}

#[derive(Debug, Default)]
struct HealthState {
    synced: bool,
    failures: u32,
    last_error: Option<String>,
    /// Why BGP is not working, when it is on and is not.
    bgp: Option<String>,
}

impl Health {
    fn new(
        resync: Duration,
        datastore: Vec<margay_api::store::informer::InformerHealth>,
    ) -> Health {
        Health {
            heartbeat: Mutex::new(Instant::now()),
            stall_limit: (resync * 3).max(Duration::from_secs(30)),
            state: Mutex::new(HealthState::default()),
            datastore,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reconciled(&self) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let mut st = self.lock();
        st.synced = true;
        st.failures = 0;
        st.last_error = None;
    }

    fn reconcile_failed(&self, e: String) {
        let mut st = self.lock();
        st.failures = st.failures.saturating_add(1);
        st.last_error = Some(e);
    }

    fn set_bgp(&self, problem: Option<String>) {
        self.lock().bgp = problem;
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        self.check_ready().map_err(|n| n.message)
    }

    /// `Ok` when ready, else the cause (the `Ready` condition's reason) and the message.
    pub fn check_ready(&self) -> Result<(), NotReady> {
        let not_ready = |reason, message| Err(NotReady { reason, message });
        let st = self.lock();
        if !st.synced {
            return not_ready(
                "Starting",
                st.last_error
                    .clone()
                    .unwrap_or_else(|| "the first reconcile has not finished".into()),
            );
        }
        for d in &self.datastore {
            if let Err(e) = d.check() {
                return not_ready("DatastoreUnavailable", format!("datastore: {e}"));
            }
        }
        if st.failures >= NOT_READY_AFTER_FAILURES {
            return not_ready(
                "ReconcileFailing",
                format!(
                    "{} reconciles in a row failed; the last: {}",
                    st.failures,
                    st.last_error.as_deref().unwrap_or("?")
                ),
            );
        }
        if let Some(e) = &st.bgp {
            return not_ready("BGPFailing", format!("BGP: {e}"));
        }
        Ok(())
    }

    /// `Ok` while reconciles succeed, else for how long none has.
    pub fn live(&self) -> Result<(), String> {
        let since = self
            .heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if since > self.stall_limit {
            Err(format!(
                "no reconcile has succeeded for {} s (limit {} s)",
                since.as_secs(),
                self.stall_limit.as_secs()
            ))
        } else {
            Ok(())
        }
    }
}

/// What the HTTP server answers with.
pub struct Status {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

impl crate::http::Endpoints for Status {
    fn live(&self) -> Result<(), String> {
        self.health.live()
    }

    fn ready(&self) -> Result<(), String> {
        self.health.ready()
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// The informers the agent reads from.
struct View {
    pools: Informer<IPPool>,
    affinities: Informer<BlockAffinity>,
    nodes: Informer<Node>,
    bgp_configs: Informer<BGPConfiguration>,
    bgp_peers: Informer<BGPPeer>,
    blocks: Informer<IPAMBlock>,
}

impl View {
    fn spawn(store: &Store) -> View {
        View {
            pools: Informer::spawn(store.clone()),
            affinities: Informer::spawn(store.clone()),
            nodes: Informer::spawn(store.clone()),
            bgp_configs: Informer::spawn(store.clone()),
            bgp_peers: Informer::spawn(store.clone()),
            blocks: Informer::spawn(store.clone()),
        }
    }

    fn health(&self) -> Vec<margay_api::store::informer::InformerHealth> {
        vec![
            self.pools.health(),
            self.affinities.health(),
            self.nodes.health(),
            self.bgp_configs.health(),
            self.bgp_peers.health(),
            self.blocks.health(),
        ]
    }

    async fn wait_synced(&self) {
        self.pools.wait_synced().await;
        self.affinities.wait_synced().await;
        self.nodes.wait_synced().await;
        self.bgp_configs.wait_synced().await;
        self.bgp_peers.wait_synced().await;
        self.blocks.wait_synced().await;
    }

    /// The cluster-wide BGPConfiguration, with a per-node one's settings taking precedence.
    fn bgp_config(&self, node: &str) -> Option<BGPConfiguration> {
        margay_peering::effective_config(
            self.bgp_configs.get(margay_api::BGP_CONFIGURATION_NAME),
            self.bgp_configs.get(&format!("node.{node}")),
        )
    }
}

/// A running agent.
pub struct Agent {
    cfg: NodeConfig,
    node: String,
    store: Store,
    view: View,
    writer: RouteWriter,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    address: Option<IpNet>,
    /// This node's IPv6 address (`IP6`), published in its Node: other nodes route its IPv6
    /// blocks to it, and it is the next hop of the IPv6 routes it announces.
    address6: Option<IpNet>,
    /// Neighbour and FDB entries this agent has written, to remove them when unwanted.
    tunnel_entries: (Vec<Neighbour>, Vec<FdbEntry>),
    vxlan: Option<VtepState>,
    /// Why IPIP devices cannot be made, as last logged (each new reason is logged once).
    ipip_warned: Option<String>,
    /// The Kubernetes Node's labels (Kubernetes mode only), copied into the Margay Node, and
    /// when they were last read.
    k8s_labels: Option<BTreeMap<String, String>>,
    k8s_labels_read: Instant,
    /// The embedded BGP speaker, when BGP is enabled.
    bgp: Option<margay_peering::BgpDriver>,
    /// The speaker stopped (a call found it gone, or its route stream ended): the next BGP
    /// sync starts it again.
    speaker_stopped: bool,
    /// The log filter, for `logSeverityScreen` (absent when the caller set up logging).
    log: Option<crate::logging::LogControl>,
    best_routes: Option<margay_bgp::BestRouteStream>,
    /// The routes the last pass programmed: one of them missing from the kernel now is drift
    /// (a repair), not a change of intent.
    programmed: HashMap<RouteKey, margay_kernel::Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct VtepState {
    tunnel_addr: IpAddr,
    mac: margay_kernel::Mac,
}

/// A stable, locally administered MAC for this node's VTEP.
pub fn vtep_mac(node: &str) -> margay_kernel::Mac {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(node.as_bytes());
    [0x66, h[0], h[1], h[2], h[3], h[4]]
}

fn write_file_atomic(path: &Path, content: &str) -> Result<(), AgentError> {
    let io = |source| AgentError::Io {
        path: path.display().to_string(),
        source,
    };
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, content).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Agent {
    /// Starts the agent: connects, syncs, publishes the node. Kernel writes begin with the first
    /// [`Agent::reconcile`].
    pub async fn start(cfg: NodeConfig) -> Result<(Agent, Status), AgentError> {
        let node = cfg.resolve_node_name()?;
        write_file_atomic(&cfg.node_name_file, &node)?;
        let store = cfg.datastore.connect().await?;
        let metrics = Arc::new(Metrics::default());
        let view = View::spawn(&store);
        let health = Arc::new(Health::new(cfg.resync_interval, view.health()));
        tracing::info!(node = %node, "waiting for the datastore sync");
        view.wait_synced().await;
        let address = resolve_address(&cfg.ipv4, &cfg.ipv4_method, false)?;
        let address6 = resolve_address(&cfg.ipv6, &cfg.ipv6_method, true)?;
        tracing::info!(node = %node, address = ?address, address6 = ?address6, "node addresses");
        let (writer, _thread) = RouteWriter::spawn(None)?;
        let status = Status {
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let agent = Agent {
            cfg,
            node,
            store,
            view,
            writer,
            metrics,
            health,
            address,
            address6,
            tunnel_entries: Default::default(),
            vxlan: None,
            programmed: HashMap::new(),
            ipip_warned: None,
            k8s_labels: None,
            k8s_labels_read: Instant::now(),
            bgp: None,
            speaker_stopped: false,
            log: None,
            best_routes: None,
        };
        let mut agent = agent;
        agent.k8s_labels = agent.kubernetes_node_labels().await;
        agent.publish_node(None).await?;
        if agent.cfg.bgp_enabled {
            agent.start_bgp().await?;
        }
        Ok((agent, status))
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The embedded speaker's handle, when BGP runs (for status tools and tests); a speaker
    /// the agent started again has a new one.
    pub fn bgp_handle(&self) -> Option<margay_bgp::SpeakerHandle> {
        self.bgp.as_ref().map(|b| b.handle.clone())
    }

    /// Lets the BGPConfiguration's `logSeverityScreen` set the BGP log level.
    pub fn with_log_control(mut self, log: crate::logging::LogControl) -> Agent {
        self.log = Some(log);
        self
    }

    /// Applies `logSeverityScreen` (unset: the agent's own level) to the BGP log targets.
    fn apply_log_severity(&self, config: Option<&BGPConfiguration>) {
        let Some(log) = &self.log else { return };
        let sev = config.and_then(|c| c.spec.log_severity_screen);
        match log.set_bgp(sev) {
            Ok(true) => tracing::info!(
                level = sev
                    .map(crate::logging::level_of)
                    .unwrap_or("as the agent's"),
                "BGP log level changed (logSeverityScreen)"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot apply logSeverityScreen"),
        }
    }

    /// Starts the embedded speaker on the node's address. When the kernel still holds routes
    /// from the previous run, this is a graceful restart: forwarding was preserved.
    async fn start_bgp(&mut self) -> Result<(), AgentError> {
        let Some(IpAddr::V4(router_id)) = self.address.map(|a| a.addr()) else {
            tracing::warn!("BGP needs an IPv4 node address for its router ID; BGP not started");
            return Ok(());
        };
        let config = self.view.bgp_config(&self.node);
        let me = self.view.nodes.get(&self.node);
        let asn = margay_peering::node_as(me.as_ref(), config.as_ref());
        let port = config
            .as_ref()
            .map(|c| c.spec.effective_listen_port())
            .unwrap_or(179);
        let restart_time = config
            .as_ref()
            .and_then(|c| c.spec.node_mesh_max_restart_time.as_deref())
            .and_then(margay_api::parse_duration)
            .map(|d| d.as_secs().min(4095) as u16)
            .unwrap_or(120);
        let ours = self
            .writer
            .dump(RouteFilter {
                protocol: Some(MARGAY_RT_PROTO),
                table: Some(MAIN_TABLE),
                ..Default::default()
            })
            .await?;
        let mut sc = margay_bgp::SpeakerConfig::new(asn, router_id);
        sc.listen = vec![std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port,
        )];
        sc.cluster_id = me
            .and_then(|n| n.spec.bgp)
            .and_then(|b| b.route_reflector_cluster_id)
            .and_then(|c| c.parse().ok());
        sc.graceful_restart = Some(margay_bgp::GracefulRestartConfig {
            restart_time,
            forwarding_preserved: true,
        });
        sc.restarting = !ours.is_empty();
        let (handle, stream) = margay_bgp::Speaker::start(sc)
            .await
            .map_err(|e| AgentError::Address(format!("starting the BGP speaker: {e}")))?;
        tracing::info!(asn, router_id = %router_id, port, restarting = !ours.is_empty(), "BGP speaker started");
        let tag = Some(margay_peering::origin_tag(asn, router_id));
        self.bgp = Some(match self.bgp.take() {
            // A restart: keep what the stopped speaker learned for the restart time.
            Some(old) => margay_peering::BgpDriver::restarted(
                handle,
                tag,
                old,
                Duration::from_secs(u64::from(restart_time)),
            ),
            None => margay_peering::BgpDriver::new(handle, tag),
        });
        self.best_routes = Some(stream);
        Ok(())
    }

    /// Brings the speaker's peers and announcements in line with the cluster, starting the
    /// speaker again if it stopped. Every failure is logged, counted
    /// (`margay_node_bgp_errors_total`) and shown by readiness; the caller tries again with
    /// back-off.
    async fn sync_bgp(&mut self) -> Result<(), String> {
        if !self.cfg.bgp_enabled {
            return Ok(());
        }
        if self.speaker_stopped {
            if let Some(old) = &self.bgp {
                // Frees its port if it still runs (its route stream may have ended alone).
                match old.handle.stop("restarting the speaker").await {
                    Ok(()) | Err(margay_bgp::SpeakerError::Stopped) => {}
                    Err(e) => tracing::warn!(error = %e, "stopping the old BGP speaker"),
                }
            }
            if let Err(e) = self.start_bgp().await {
                let m = format!("the BGP speaker stopped and could not be started again: {e}");
                return Err(self.bgp_failed(m, 1));
            }
            self.speaker_stopped = false;
            tracing::info!("BGP speaker started again");
        }
        let labels = self
            .view
            .nodes
            .get(&self.node)
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default();
        let nodes = self.view.nodes.snapshot();
        let config = self.view.bgp_config(&self.node);
        self.apply_log_severity(config.as_ref());
        let peers = self.view.bgp_peers.snapshot();
        let secrets = self.resolve_secrets(config.as_ref(), &peers).await;
        let want = margay_peering::desired_peers_both_ways(&margay_peering::PeerInputs {
            me: &self.node,
            my_ip: self.address.map(|a| a.addr()),
            my_ip6: self.address6.map(|a| a.addr()),
            secrets: &secrets,
            my_labels: &labels,
            nodes: &nodes,
            config: config.as_ref(),
            peers: &peers,
        });
        let local = self.local_blocks();
        let borrowed = self.borrowed_addresses();
        let pools = self.view.pools.snapshot();
        // BGP on without an IPv4 address for the router ID: start_bgp said so; the node
        // cannot take part in routing, which readiness says too.
        let Some(bgp) = self.bgp.as_mut() else {
            self.health.set_bgp(Some(
                "BGP is on but the speaker is not running: the node has no IPv4 address for its router ID (set IP)".into(),
            ));
            return Ok(());
        };
        let mut problems = margay_peering::SyncProblems::default();
        bgp.set_peers(want, &mut problems).await;
        let announce = margay_peering::announcements(&local, &borrowed, &pools)
            .into_iter()
            .map(|n| (n, margay_peering::communities_for(&n, config.as_ref())))
            .collect();
        bgp.set_announcements(announce, &mut problems);
        let mut states = None;
        match bgp.handle.peers().await {
            Ok(peers) => {
                let up = peers
                    .iter()
                    .filter(|p| p.state == margay_bgp::State::Established)
                    .count();
                self.metrics
                    .bgp_sessions_established
                    .store(up as u64, Ordering::Relaxed);
                states = Some(margay_peering::peer_states(&peers));
            }
            Err(e) => {
                // No answer: no session is known to be up.
                self.metrics
                    .bgp_sessions_established
                    .store(0, Ordering::Relaxed);
                problems.add("reading the peers' state".into(), e);
            }
        }
        if let Some(states) = states {
            self.publish_bgp_status(states).await;
        }
        if problems.stopped {
            self.speaker_stopped = true;
        }
        if problems.is_empty() {
            self.health.set_bgp(None);
            return Ok(());
        }
        let n = problems.errors.len() as u64;
        Err(self.bgp_failed(problems.summary(), n))
    }

    /// Logs, counts and shows a BGP failure; returns its message.
    fn bgp_failed(&self, message: String, count: u64) -> String {
        tracing::warn!(error = %message, "BGP");
        self.metrics.bgp_errors.fetch_add(count, Ordering::Relaxed);
        self.health.set_bgp(Some(message.clone()));
        message
    }

    /// The secret values the BGP resources refer to: from files `<dir>/<secret>/<key>` (a
    /// mounted Secret volume, or any directory in etcd mode; `MARGAY_SECRETS_DIR`, default
    /// `/etc/margay/secrets`), else, in Kubernetes mode, from the Secret in the agent's
    /// namespace (`POD_NAMESPACE`).
    async fn resolve_secrets(
        &self,
        config: Option<&BGPConfiguration>,
        peers: &[BGPPeer],
    ) -> BTreeMap<(String, String), String> {
        let dir =
            std::env::var("MARGAY_SECRETS_DIR").unwrap_or_else(|_| "/etc/margay/secrets".into());
        let mut out = BTreeMap::new();
        for (name, key) in margay_peering::secret_refs(config, peers) {
            let path = Path::new(&dir).join(&name).join(&key);
            let value = match std::fs::read_to_string(&path) {
                Ok(v) => Some(v.trim_end_matches('\n').to_owned()),
                Err(_) => self.kube_secret(&name, &key).await,
            };
            match value {
                Some(v) => {
                    out.insert((name, key), v);
                }
                None => {
                    tracing::warn!(secret = %name, key = %key, "BGP password not found in {} nor the API", path.display())
                }
            }
        }
        out
    }

    /// A client for the Kubernetes API, in Kubernetes mode.
    async fn kube_client(&self) -> Option<kube::Client> {
        let margay_api::DatastoreConfig::Kubernetes { kubeconfig } = &self.cfg.datastore else {
            return None;
        };
        match kubeconfig {
            Some(p) => {
                let kc = kube::config::Kubeconfig::read_from(p).ok()?;
                let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .ok()?;
                margay_api::store::kube::client(cfg).ok()
            }
            None => margay_api::store::kube::client(kube::Config::infer().await.ok()?).ok(),
        }
    }

    /// The Kubernetes Node's labels, in Kubernetes mode.
    async fn kubernetes_node_labels(&self) -> Option<BTreeMap<String, String>> {
        let client = self.kube_client().await?;
        let req = http::Request::get(format!("/api/v1/nodes/{}", self.node))
            .body(Vec::new())
            .ok()?;
        let node: serde_json::Value = match client.request(req).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading the Kubernetes Node's labels");
                return None;
            }
        };
        serde_json::from_value(node["metadata"]["labels"].clone()).ok()
    }

    async fn kube_secret(&self, name: &str, key: &str) -> Option<String> {
        use base64::Engine;
        let client = self.kube_client().await?;
        let ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "margay-system".into());
        let req = http::Request::get(format!("/api/v1/namespaces/{ns}/secrets/{name}"))
            .body(Vec::new())
            .ok()?;
        let secret: serde_json::Value = client.request(req).await.ok()?;
        let data = secret["data"][key].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        String::from_utf8(bytes).ok()
    }

    /// Reports the BGP sessions in the Node's status (what `margayctl lab status` and users
    /// read), when they changed.
    async fn publish_bgp_status(&self, mut peers: Vec<margay_api::BGPPeerState>) {
        peers.sort_by(|a, b| a.peer_ip.cmp(&b.peer_ip));
        self.update_node_status("the BGP sessions", |st| {
            if st.bgp_peers == peers {
                return false;
            }
            st.bgp_peers = peers.clone();
            true
        })
        .await;
    }

    /// Writes the agent's readiness into its Node's status as the `Ready` condition, when its
    /// status or reason changed (the message follows them; the transition time moves only with
    /// the status).
    async fn publish_ready(&self) {
        let (status, reason, message) = match self.health.check_ready() {
            Ok(()) => (
                "True",
                "Ready",
                "the node agent's last reconcile succeeded".to_owned(),
            ),
            Err(n) => ("False", n.reason, n.message),
        };
        let now = margay_ipam::clock::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        self.update_node_status("the Ready condition", |st| {
            let old = st.conditions.iter().find(|c| c.type_ == "Ready");
            if old.is_some_and(|c| c.status == status && c.reason == reason) {
                return false;
            }
            let changed_at = match old {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => Some(now.clone()),
            };
            st.conditions.retain(|c| c.type_ != "Ready");
            st.conditions.push(margay_api::Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: reason.into(),
                message: message.clone(),
                last_transition_time: changed_at,
            });
            true
        })
        .await;
    }

    /// Changes this node's status with `change` (which says whether it changed anything) and
    /// writes it with compare-and-swap, from the informer's copy first.
    async fn update_node_status(
        &self,
        what: &str,
        mut change: impl FnMut(&mut margay_api::NodeStatus) -> bool,
    ) {
        let mut current = self.view.nodes.get(&self.node);
        for _ in 0..3 {
            let Some(mut n) = current.take() else { return };
            if !change(n.status.get_or_insert_with(Default::default)) {
                return;
            }
            match self.store.update_status(&n).await {
                Ok(_) => return,
                // The informer's copy was behind a write of ours: read the Node afresh.
                Err(e) if e.is_conflict() => {
                    current = self.store.try_get::<Node>(&self.node).await.ok().flatten()
                }
                Err(e) => {
                    // Written again on a later pass.
                    tracing::warn!(error = %e, "cannot write {what} into the Node's status");
                    return;
                }
            }
        }
    }

    /// Addresses of pods on this node that came from other nodes' blocks (borrowed when this
    /// node could get no block of its own); they are announced as host routes.
    fn borrowed_addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for b in self.view.blocks.snapshot() {
            if b.spec.affine_node() == Some(self.node.as_str()) {
                continue;
            }
            let Some(cidr) = b.spec.network() else {
                continue;
            };
            for (ordinal, a) in b.spec.allocations.iter().enumerate() {
                let Some(idx) = a else { continue };
                let on_me = b
                    .spec
                    .attributes
                    .get(*idx as usize)
                    .and_then(|attr| attr.secondary.get(margay_ipam::attr::NODE))
                    .is_some_and(|n| *n == self.node);
                if on_me {
                    out.push(margay_ipam::block::ip_of(&cidr, ordinal as u32));
                }
            }
        }
        out
    }

    /// The routes to program for other nodes' pods: learned over BGP, or from the datastore
    /// when BGP is off.
    fn remote_routes(&mut self) -> Vec<RemoteRoute> {
        match &mut self.bgp {
            Some(b) => b.remote_routes(),
            None => self.datastore_routes(),
        }
    }

    /// Writes this node's address, AS and VTEP into its Node object (created if missing),
    /// with compare-and-swap, leaving every other field alone.
    async fn publish_node(&self, vtep: Option<&VtepState>) -> Result<(), AgentError> {
        for _ in 0..10 {
            let existing = self.store.try_get::<Node>(&self.node).await?;
            let mut n = existing
                .clone()
                .unwrap_or_else(|| Node::new(&self.node, Default::default()));
            let mut bgp = n.spec.bgp.clone().unwrap_or_else(NodeBGPSpec::default);
            bgp.ipv4_address = self.address.map(|a| a.to_string());
            bgp.ipv6_address = self.address6.map(|a| a.to_string());
            if self.cfg.as_number.is_some() {
                bgp.as_number = self.cfg.as_number;
            }
            n.spec.bgp = Some(bgp);
            if let Some(labels) = &self.k8s_labels {
                // In Kubernetes mode the node's labels are the Kubernetes Node's: copy them, so
                // that selectors read one place in every datastore.
                n.metadata.labels = Some(labels.clone());
            }
            n.spec.ipv4_vxlan_tunnel_addr = vtep.map(|v| v.tunnel_addr.to_string());
            n.spec.vxlan_tunnel_mac_addr = vtep.map(|v| margay_kernel::format_mac(&v.mac));
            if existing
                .as_ref()
                .is_some_and(|e| e.spec == n.spec && e.metadata.labels == n.metadata.labels)
            {
                return Ok(());
            }
            let result = match existing {
                None => self.store.create(&n).await.map(|_| ()),
                Some(_) => self.store.update(&n).await.map(|_| ()),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_conflict() || e.is_already_exists() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AgentError::Store(StoreError::Rejected {
            backend: "agent",
            message: format!("Node {} kept changing while being published", self.node),
        }))
    }

    /// Pools that select this node.
    fn my_pools(&self) -> Vec<IPPool> {
        let labels = self
            .view
            .nodes
            .get(&self.node)
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default();
        self.view
            .pools
            .snapshot()
            .into_iter()
            .filter(|p| {
                margay_api::selector::Selector::parse(&p.spec.node_selector)
                    .map(|s| s.matches(&labels))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Confirmed blocks affine to this node. Pending claims are not ours yet.
    fn local_blocks(&self) -> Vec<IpNet> {
        self.view
            .affinities
            .snapshot()
            .into_iter()
            .filter(|a| {
                a.spec.node == self.node
                    && a.spec.state == AffinityState::Confirmed
                    && !a.spec.deleted
            })
            .filter_map(|a| a.spec.cidr.parse().ok())
            .collect()
    }

    fn local_subnets(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = margay_kernel::autodetect::interface_addresses()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| {
                !a.interface.starts_with("cali")
                    && a.interface != VXLAN_DEVICE
                    && a.interface != "lo"
            })
            .map(|a| a.address)
            .collect();
        for a in [self.address, self.address6].into_iter().flatten() {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// Ensures the VXLAN device and its tunnel address when a pool for this node needs VXLAN,
    /// and removes them when none does.
    async fn ensure_vxlan(&mut self, pools: &[IPPool], host_mtu: u32) -> Result<(), AgentError> {
        let wanted: Vec<&IPPool> = pools
            .iter()
            .filter(|p| {
                p.spec.vxlan_mode != EncapMode::Never
                    && p.spec.network().is_some_and(|n| n.addr().is_ipv4())
            })
            .collect();
        let handle = tunnel_handle(TunnelKind::Vxlan, &self.node);
        let Some(local) = self.address.filter(|_| !wanted.is_empty()) else {
            if self.vxlan.take().is_some()
                || self
                    .view
                    .nodes
                    .get(&self.node)
                    .is_some_and(|n| n.spec.ipv4_vxlan_tunnel_addr.is_some())
            {
                self.writer.run(|nl| nl.delete_link(VXLAN_DEVICE)).await??;
                let alloc =
                    Allocator::new(self.store.clone(), &self.node, AllocatorConfig::default());
                alloc.release_by_handle(&handle).await?;
                self.publish_node(None).await?;
            }
            return Ok(());
        };
        let current = self
            .view
            .nodes
            .get(&self.node)
            .and_then(|n| n.spec.ipv4_vxlan_tunnel_addr)
            .and_then(|a| a.parse::<IpAddr>().ok());
        let tunnel_addr = self
            .tunnel_address(TunnelKind::Vxlan, current, &wanted)
            .await?;
        let mac = vtep_mac(&self.node);
        let spec = VxlanSpec::margay(
            local.addr(),
            mac,
            host_mtu.saturating_sub(Encap::VxlanV4.overhead()),
        );
        let addr = IpNet::new(tunnel_addr, 32).map_err(|e| AgentError::Address(e.to_string()))?;
        self.writer
            .run(move |nl| -> Result<(), KernelError> {
                nl.ensure_vxlan(&spec)?;
                if !nl.addresses(VXLAN_DEVICE)?.contains(&addr) {
                    nl.add_address(VXLAN_DEVICE, addr, Default::default())?;
                }
                Ok(())
            })
            .await??;
        let state = VtepState { tunnel_addr, mac };
        self.publish_node(Some(&state)).await?;
        self.vxlan = Some(state);
        Ok(())
    }

    /// This node's tunnel address of `kind`: the one already published if it is still
    /// allocated to the node's tunnel handle, otherwise a new one from `pools` (anything the
    /// handle held before is released first, so a node never holds two).
    async fn tunnel_address(
        &self,
        kind: TunnelKind,
        current: Option<IpAddr>,
        pools: &[&IPPool],
    ) -> Result<IpAddr, AgentError> {
        let handle = tunnel_handle(kind, &self.node);
        if let Some(ip) = current {
            if self.holds(&handle, ip).await? {
                return Ok(ip);
            }
        }
        let alloc = Allocator::new(self.store.clone(), &self.node, AllocatorConfig::default());
        alloc.release_by_handle(&handle).await?;
        let mut attrs = BTreeMap::new();
        attrs.insert(margay_ipam::attr::NODE.to_owned(), self.node.clone());
        attrs.insert(
            margay_ipam::attr::TYPE.to_owned(),
            kind.attr_type().to_owned(),
        );
        let got = alloc
            .assign(&AssignRequest {
                handle_id: handle.clone(),
                attrs,
                num_v4: 1,
                pools: pools
                    .iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect(),
                use_: AddressUse::Tunnel,
                ..Default::default()
            })
            .await?;
        got.addresses
            .first()
            .map(|a| a.ip)
            .ok_or_else(|| AgentError::Address("the allocator returned no tunnel address".into()))
    }

    /// Ensures `tunl0` with its tunnel address when a pool for this node uses IPIP and the
    /// kernel can do IPIP. Returns whether IPIP routes can be programmed.
    async fn ensure_ipip(&mut self, pools: &[IPPool], host_mtu: u32) -> Result<bool, AgentError> {
        let wanted: Vec<&IPPool> = pools
            .iter()
            .filter(|p| {
                p.spec.ipip_mode != EncapMode::Never
                    && p.spec.network().is_some_and(|n| n.addr().is_ipv4())
            })
            .collect();
        let handle = tunnel_handle(TunnelKind::Ipip, &self.node);
        let published = self
            .view
            .nodes
            .get(&self.node)
            .and_then(|n| n.spec.bgp.and_then(|b| b.ipv4_ipip_tunnel_addr))
            .and_then(|a| a.parse::<IpAddr>().ok());
        if wanted.is_empty() || self.address.is_none() {
            if published.is_some() {
                let alloc =
                    Allocator::new(self.store.clone(), &self.node, AllocatorConfig::default());
                alloc.release_by_handle(&handle).await?;
                self.publish_ipip(None).await?;
            }
            return Ok(false);
        }
        if let Err(e) = self.writer.run(|nl| nl.ipip_probe()).await? {
            let why = if e.is_not_supported() {
                format!("this kernel has no ipip module ({e})")
            } else {
                format!("creating an ipip device failed: {e}")
            };
            // Said once per distinct reason; a different failure is said again.
            if self.ipip_warned.as_deref() != Some(why.as_str()) {
                tracing::error!(reason = %why, "a pool uses IPIP but this node cannot make ipip devices; IPIP routes are not programmed");
                self.ipip_warned = Some(why);
            }
            return Ok(false);
        }
        self.ipip_warned = None;
        let addr = self
            .tunnel_address(TunnelKind::Ipip, published, &wanted)
            .await?;
        let IpAddr::V4(v4) = addr else {
            return Err(AgentError::Address(format!(
                "IPIP tunnel address {addr} is not IPv4"
            )));
        };
        let mtu = host_mtu.saturating_sub(Encap::Ipip.overhead());
        self.writer
            .run(move |nl| nl.ensure_tunl0(Some(v4), mtu))
            .await??;
        self.publish_ipip(Some(addr)).await?;
        Ok(true)
    }

    /// Records this node's IPIP tunnel address in its Node object.
    async fn publish_ipip(&self, addr: Option<IpAddr>) -> Result<(), AgentError> {
        for _ in 0..10 {
            let Some(mut n) = self.store.try_get::<Node>(&self.node).await? else {
                return Ok(());
            };
            let mut bgp = n.spec.bgp.clone().unwrap_or_default();
            let want = addr.map(|a| a.to_string());
            if bgp.ipv4_ipip_tunnel_addr == want {
                return Ok(());
            }
            bgp.ipv4_ipip_tunnel_addr = want;
            n.spec.bgp = Some(bgp);
            match self.store.update(&n).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Per-interface sysctls of every pod interface: the CNI plugin sets them when it creates
    /// the veth; the agent puts back any that drifted.
    fn ensure_pod_interface_sysctls(names: &[String]) {
        use margay_kernel::sysctl;
        for n in names {
            let result = (|| -> Result<(), KernelError> {
                sysctl::set_proxy_arp(n, true)?;
                sysctl::set_neigh_proxy_delay(n, 0)?;
                sysctl::set_iface_forwarding(n, false, true)?;
                sysctl::set_route_localnet(n, true)?;
                Ok(())
            })();
            // IPv6 settings exist only where the interface has IPv6; their absence is fine.
            let _ = (|| -> Result<(), KernelError> {
                sysctl::set_proxy_ndp(n, true)?;
                sysctl::set_accept_ra(n, 0)?;
                sysctl::set_iface_forwarding(n, true, true)?;
                Ok(())
            })();
            if let Err(e) = result {
                // The interface may have gone between the listing and the write.
                tracing::debug!(iface = %n, error = %e, "pod interface sysctls");
            }
        }
    }

    /// Whether `ip` is allocated to `handle`.
    async fn holds(&self, handle: &str, ip: IpAddr) -> Result<bool, AgentError> {
        let snap = margay_ipam::audit::Snapshot::read(&self.store).await?;
        Ok(margay_ipam::audit::find_address(&snap, ip)
            .allocation
            .is_some_and(|a| a.handle.as_deref() == Some(handle)))
    }

    /// Brings the kernel in line with the cluster. Safe to run any number of times.
    pub async fn reconcile(&mut self, remote: &[RemoteRoute]) -> Result<(), AgentError> {
        let r = self.reconcile_once(remote).await;
        match &r {
            Ok(()) => self.health.reconciled(),
            Err(e) => self.health.reconcile_failed(e.to_string()),
        }
        r
    }

    async fn reconcile_once(&mut self, remote: &[RemoteRoute]) -> Result<(), AgentError> {
        self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
        // Kubernetes mode: follow label changes of the Kubernetes Node, once per resync interval.
        if self.k8s_labels.is_some() && self.k8s_labels_read.elapsed() >= self.cfg.resync_interval {
            self.k8s_labels_read = Instant::now();
            if let Some(l) = self.kubernetes_node_labels().await {
                if Some(&l) != self.k8s_labels.as_ref() {
                    self.k8s_labels = Some(l);
                    let vtep = self.vxlan.clone();
                    self.publish_node(vtep.as_ref()).await?;
                }
            }
        }
        // Releases the CNI plugin could not make while the datastore was away.
        let drained = margay_ipam::pending::drain_pending_releases(
            &self.cfg.state_dir,
            &self.store,
            Duration::from_secs(2),
        )
        .await;
        tracing::debug!(?drained, "pending CNI releases");
        let pools = self.my_pools();
        // Sysctls first: forwarding is what makes this machine a router for its pods (IPv6
        // too, once the node has an IPv6 address or one of its pools is IPv6).
        margay_kernel::sysctl::set_ipv4_forwarding(true)?;
        let v6_pools = pools
            .iter()
            .any(|p| p.spec.network().is_some_and(|n| n.addr().is_ipv6()));
        if self.address6.is_some() || v6_pools {
            margay_kernel::sysctl::set_ipv6_forwarding(true)?;
        }
        // MTU: the host's, less the largest overhead any of this node's pools can add.
        let host_mtu = self
            .writer
            .run(|nl| nl.host_mtu(None))
            .await?
            .unwrap_or(1500);
        let mut encaps = vec![Encap::None];
        if pools.iter().any(|p| p.spec.vxlan_mode != EncapMode::Never) {
            encaps.push(Encap::VxlanV4);
        }
        if pools.iter().any(|p| p.spec.ipip_mode != EncapMode::Never) {
            encaps.push(Encap::Ipip);
        }
        let mtu = if self.cfg.mtu != 0 {
            self.cfg.mtu
        } else {
            pod_mtu(host_mtu, &encaps)
        };
        write_file_atomic(&self.cfg.state_dir.join("mtu"), &format!("{mtu}\n"))?;
        self.ensure_vxlan(&pools, host_mtu).await?;
        let ipip_available = self.ensure_ipip(&pools, host_mtu).await?;
        let cali: Vec<String> = self
            .writer
            .run(|nl| nl.links_with_prefix("cali"))
            .await??
            .into_iter()
            .map(|l| l.name)
            .collect();
        tokio::task::spawn_blocking(move || Agent::ensure_pod_interface_sysctls(&cali))
            .await
            .map_err(|e| AgentError::Address(format!("sysctl task: {e}")))?;
        // NAT: pod sources in a natOutgoing pool going anywhere outside every pool. A disabled
        // pool gives no new addresses, but its pods keep working, NAT included.
        let all_pools = self.view.pools.snapshot();
        let nat_pools: Vec<NatPool> = all_pools
            .iter()
            .filter_map(|p| {
                Some(NatPool {
                    cidr: p.spec.network()?,
                    nat_outgoing: p.spec.nat_outgoing,
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let nat = Nat::default();
            nat.ensure()?;
            nat.sync_pools(&nat_pools)
        })
        .await
        .map_err(|e| AgentError::Address(format!("NAT task: {e}")))??;
        // Routes.
        let subnets = self.local_subnets();
        let blocks = self.local_blocks();
        let nodes = self.view.nodes.snapshot();
        let desired = routes::desired(&routes::Inputs {
            local_subnets: &subnets,
            pools: &all_pools,
            local_blocks: &blocks,
            remote,
            nodes: &nodes,
            ipip_available,
        });
        self.metrics
            .skipped_prefixes
            .store(desired.skipped.len() as u64, Ordering::Relaxed);
        for (p, why) in &desired.skipped {
            tracing::debug!(prefix = %p, "{why}");
        }
        self.program(desired).await
    }

    async fn program(&mut self, desired: routes::Desired) -> Result<(), AgentError> {
        let installed = self
            .writer
            .dump(RouteFilter {
                protocol: Some(MARGAY_RT_PROTO),
                table: Some(MAIN_TABLE),
                ..Default::default()
            })
            .await?;
        let cali: HashSet<u32> = self
            .writer
            .run(|nl| nl.links_with_prefix("cali"))
            .await??
            .into_iter()
            .map(|l| l.index)
            .collect();
        let by_key: BTreeMap<RouteKey, &margay_kernel::KernelRoute> =
            installed.iter().map(|r| (r.key(), r)).collect();
        let mut ops = Vec::new();
        let mut repairs = 0;
        for r in &desired.routes {
            let same = by_key.get(&r.key()).is_some_and(|k| r.matches(k));
            if !same {
                if self.programmed.get(&r.key()) == Some(r) {
                    repairs += 1;
                }
                ops.push(WriteOp::ReplaceRoute(r.clone()));
            }
        }
        // Neighbour entries before the routes that use them, FDB entries alongside.
        let (old_neigh, old_fdb) = std::mem::take(&mut self.tunnel_entries);
        let mut tunnel_ops: Vec<WriteOp> = desired
            .neighbours
            .iter()
            .cloned()
            .map(WriteOp::ReplaceNeighbour)
            .collect();
        tunnel_ops.extend(desired.fdb.iter().cloned().map(WriteOp::ReplaceFdb));
        tunnel_ops.extend(
            old_neigh
                .into_iter()
                .filter(|n| !desired.neighbours.contains(n))
                .map(WriteOp::DeleteNeighbour),
        );
        tunnel_ops.extend(
            old_fdb
                .into_iter()
                .filter(|f| !desired.fdb.contains(f))
                .map(WriteOp::DeleteFdb),
        );
        let wanted: HashSet<RouteKey> = desired.routes.iter().map(|r| r.key()).collect();
        let mut swept = 0;
        for k in installed.iter() {
            // Host routes on cali* belong to the CNI plugin and go with their interface.
            if k.oif.is_some_and(|i| cali.contains(&i)) {
                continue;
            }
            if !wanted.contains(&k.key()) {
                ops.push(WriteOp::DeleteRoute(k.key()));
                swept += 1;
            }
        }
        let mut all = tunnel_ops;
        all.extend(ops);
        let results = if all.is_empty() {
            Vec::new()
        } else {
            self.writer.apply(all.clone()).await?
        };
        let mut first_err = None;
        for (op, res) in all.iter().zip(results) {
            if let Err(e) = res {
                tracing::warn!(op = %op, error = %e, "kernel refused a change");
                first_err.get_or_insert(e);
            }
        }
        self.tunnel_entries = (desired.neighbours, desired.fdb);
        self.programmed = desired
            .routes
            .iter()
            .map(|r| (r.key(), r.clone()))
            .collect();
        self.metrics.repairs.fetch_add(repairs, Ordering::Relaxed);
        self.metrics.swept.fetch_add(swept, Ordering::Relaxed);
        self.metrics
            .routes_programmed
            .store(desired.routes.len() as u64, Ordering::Relaxed);
        if repairs > 0 {
            tracing::info!(repairs, "put back routes missing or changed in the kernel");
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Remote routes from the datastore: other nodes' confirmed blocks via their addresses.
    pub fn datastore_routes(&self) -> Vec<RemoteRoute> {
        routes::remote_from_affinities(
            &self.node,
            &self.view.affinities.snapshot(),
            &self.view.nodes.snapshot(),
        )
    }

    /// Runs until `shutdown` resolves: reconciles on changes, kernel events and the resync
    /// interval. Routes stay in the kernel afterwards.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let mut pools_rx = self.view.pools.subscribe();
        let mut aff_rx = self.view.affinities.subscribe();
        let mut nodes_rx = self.view.nodes.subscribe();
        let mut cfg_rx = self.view.bgp_configs.subscribe();
        let mut peers_rx = self.view.bgp_peers.subscribe();
        let mut blocks_rx = self.view.blocks.subscribe();
        let mut best = self.best_routes.take();
        let mut events = match EventSubscription::open(None) {
            Ok(sub) => Some(CoalescingSubscription::new(
                sub,
                Coalescer::new(CoalescerConfig::default()),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "no kernel event subscription; relying on the periodic resync");
                None
            }
        };
        let mut ticker = tokio::time::interval(self.cfg.resync_interval);
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(200);
        // BGP failures are retried on their own back-off, 200 ms doubling to 30 s.
        let mut bgp_backoff = Duration::from_millis(200);
        loop {
            let bgp_retry = match self.sync_bgp().await {
                Ok(()) => {
                    bgp_backoff = Duration::from_millis(200);
                    None
                }
                Err(_) => {
                    let at = tokio::time::Instant::now() + bgp_backoff;
                    bgp_backoff = (bgp_backoff * 2).min(Duration::from_secs(30));
                    Some(at)
                }
            };
            // A speaker (re)started by the sync brings its own stream; the old one, if it has
            // not ended yet, belongs to the stopped speaker and must not stop the new one.
            if let Some(fresh) = self.best_routes.take() {
                best = Some(fresh);
            }
            let remote = self.remote_routes();
            let reconciled = self.reconcile(&remote).await;
            self.publish_ready().await;
            match reconciled {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    self.metrics
                        .reconcile_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "reconcile failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("shutting down; routes stay in place");
                    return Ok(());
                }
                _ = ticker.tick() => {}
                _ = pools_rx.changed() => {}
                _ = aff_rx.changed() => {}
                _ = nodes_rx.changed() => {}
                _ = cfg_rx.changed() => {}
                _ = peers_rx.changed() => {}
                _ = blocks_rx.changed() => {}
                changes = next_best(&mut best) => {
                    match (changes, self.bgp.as_mut()) {
                        (Some(c), Some(b)) => b.learn(c),
                        (None, Some(_)) => {
                            best = None;
                            self.speaker_stopped = true;
                            self.bgp_failed(
                                "the speaker's route stream ended; starting the speaker again".into(),
                                1,
                            );
                        }
                        _ => best = None,
                    }
                }
                _ = sleep_until_opt(bgp_retry) => {}
                batch = next_event(&mut events) => {
                    if let Some(Err(e)) = batch {
                        tracing::warn!(error = %e, "kernel event subscription failed");
                        events = None;
                    }
                }
            }
            // Let a burst of changes settle into one pass.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The node's address of one family, as its setting says: fixed, none, or detected from the
/// host's interfaces by `method`.
fn resolve_address(
    setting: &AddressSetting,
    method: &margay_kernel::autodetect::Method,
    v6: bool,
) -> Result<Option<IpNet>, AgentError> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    match setting {
        AddressSetting::Fixed(n) => Ok(Some(*n)),
        AddressSetting::None => Ok(None),
        AddressSetting::Autodetect => {
            let addrs = margay_kernel::autodetect::interface_addresses()
                .map_err(|e| AgentError::Address(format!("{family}: {e}")))?;
            let found = method
                .select(&addrs, v6)
                .map_err(|e| AgentError::Address(format!("{family}: {e}")))?;
            Ok(Some(found.address))
        }
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next_best(
    best: &mut Option<margay_bgp::BestRouteStream>,
) -> Option<Vec<margay_bgp::BestRouteChange>> {
    match best {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_event(
    events: &mut Option<CoalescingSubscription>,
) -> Option<Result<margay_kernel::events::EventBatch, KernelError>> {
    match events {
        Some(sub) => Some(sub.next_batch().await),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_drops_after_failures_and_bgp_trouble_and_comes_back() {
        let h = Health::new(Duration::from_secs(30), Vec::new());
        assert!(h.ready().unwrap_err().contains("first reconcile"));
        h.reconciled();
        assert_eq!(h.ready(), Ok(()));
        for i in 1..NOT_READY_AFTER_FAILURES {
            h.reconcile_failed(format!("route {i} refused"));
            assert_eq!(h.ready(), Ok(()), "{i} failure(s) in a row: still ready");
        }
        h.reconcile_failed("route refused".into());
        let why = h.ready().unwrap_err();
        assert!(
            why.contains("3 reconciles in a row failed") && why.contains("route refused"),
            "{why}"
        );
        h.reconciled();
        assert_eq!(h.ready(), Ok(()));
        h.set_bgp(Some("the speaker's route stream ended".into()));
        assert!(h.ready().unwrap_err().starts_with("BGP: "));
        h.set_bgp(None);
        assert_eq!(h.ready(), Ok(()));
    }

    #[test]
    fn the_ready_condition_names_the_cause() {
        let reason = |h: &Health| h.check_ready().unwrap_err().reason;
        let h = Health::new(Duration::from_secs(30), Vec::new());
        assert_eq!(reason(&h), "Starting");
        h.reconciled();
        h.set_bgp(Some("the speaker stopped".into()));
        assert_eq!(reason(&h), "BGPFailing");
        h.set_bgp(None);
        for _ in 0..NOT_READY_AFTER_FAILURES {
            h.reconcile_failed("refused".into());
        }
        assert_eq!(reason(&h), "ReconcileFailing");
        let ippools = margay_api::store::informer::InformerHealth::new("ippools");
        let h = Health::new(Duration::from_secs(30), vec![ippools.clone()]);
        h.reconciled();
        ippools.set(Some("down".into()));
        assert_eq!(reason(&h), "DatastoreUnavailable");
        assert_eq!(
            h.ready(),
            Err("datastore: cannot follow ippools: down".into())
        );
        ippools.set(None);
        assert_eq!(h.ready(), Ok(()));
    }

    #[test]
    fn liveness_moves_only_with_successful_reconciles() {
        let h = Health {
            stall_limit: Duration::from_millis(40),
            ..Health::new(Duration::from_secs(30), Vec::new())
        };
        h.reconciled();
        std::thread::sleep(Duration::from_millis(60));
        h.reconcile_failed("still failing".into());
        assert!(h.live().unwrap_err().contains("no reconcile has succeeded"));
        h.reconciled();
        assert_eq!(h.live(), Ok(()));
    }
}
