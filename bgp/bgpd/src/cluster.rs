//! `margay-bgpd --cluster-route-reflector`: a dedicated route reflector of a Margay cluster,
//! driven by the datastore instead of a YAML file (the chart's `routeReflectors.enabled`).
//!
//! What it does, in order:
//! 1. Reads its settings from flags and the environment ([`Args`]; the datastore from
//!    `MARGAY_DATASTORE_TYPE`, `MARGAY_ETCD_*`, `KUBECONFIG`) and serves `/livez`, `/readyz`
//!    and `/metrics` at once, so probes answer while it connects.
//! 2. Connects to the datastore, follows Nodes, BGPPeers and BGPConfigurations with informers,
//!    and waits until all three have listed.
//! 3. Finds its BGP address (`MARGAY_IP`, an address the chart takes from `status.hostIP`, or
//!    autodetection as the node agent does it), starts the speaker on it with the AS the node
//!    agent would use (its Node's, else the cluster's, else 64512), and only then
//! 4. registers its margay.io `Node`: the address(es), `spec.bgp.routeReflectorClusterID`, and the
//!    label `margay.io/route-reflector: "true"`, leaving every other field as it is.
//! 5. Computes its peers exactly as a node agent with a cluster ID would
//!    ([`margay_peering::desired_peers_both_ways`]): every non-reflector node a BGPPeer pairs
//!    it with is a route-reflector client, other reflectors are plain iBGP peers; passwords come
//!    from Secrets. Changes are applied one peer at a time ([`BgpDriver`]), so sessions that did
//!    not change are never reset. It does so again on every change of the three kinds and every
//!    resync interval, and reports its sessions in its Node's status.
//!
//! It announces nothing of its own, reflects routes with their next hop unchanged (the
//! speaker's rule for reflected routes), and installs nothing into the kernel. SIGTERM or SIGINT
//! closes every session with Cease/Administrative Shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::IpNet;
use margay_api::store::config::{
    ENV_DATASTORE_TYPE, ENV_ETCD_CA_FILE, ENV_ETCD_CERT_FILE, ENV_ETCD_ENDPOINTS,
    ENV_ETCD_KEY_FILE, ENV_ETCD_PREFIX,
};
use margay_api::store::informer::Informer;
use margay_api::{
    BGPConfiguration, BGPPeer, BGPPeerState, DatastoreConfig, Node, NodeBGPSpec, Store, StoreError,
    BGP_CONFIGURATION_NAME,
};
use margay_bgp::{GracefulRestartConfig, Speaker, SpeakerConfig, SpeakerHandle};
use margay_kernel::autodetect::{self, InterfaceAddress, Method};
use margay_peering::{self as peering, BgpDriver, PeerInputs};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::http;

/// The label a route reflector's Node carries; the chart's BGPPeers select on it.
pub const ROUTE_REFLECTOR_LABEL: &str = "margay.io/route-reflector";

/// Environment variables the datastore is read from (through
/// [`DatastoreConfig::from_env`]), for `--help`.
pub fn datastore_help() -> String {
    format!(
        "The datastore is read from the environment, as every Margay component reads it: \
         {ENV_DATASTORE_TYPE} (kubernetes or etcd), {ENV_ETCD_ENDPOINTS}, {ENV_ETCD_PREFIX}, \
         {ENV_ETCD_CA_FILE}, {ENV_ETCD_CERT_FILE}, {ENV_ETCD_KEY_FILE}, KUBECONFIG."
    )
}

/// The settings of the cluster route reflector mode. Each has a flag and an environment
/// variable (the chart sets the variables).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Cluster route reflector (with --cluster-route-reflector)")]
pub struct Args {
    /// The node this reflector runs on: the name of the margay.io Node it registers.
    #[arg(long, env = "NODENAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// IPv4 BGP address: `autodetect`, an address of this host (its interface's prefix length
    /// is used), or address/prefix-length. It is also the router ID.
    #[arg(
        long,
        env = "MARGAY_IP",
        default_value = "autodetect",
        value_name = "ADDR"
    )]
    pub ip: String,
    /// IPv6 address to publish in the Node: `none`, `autodetect`, or an address.
    #[arg(long, env = "MARGAY_IP6", default_value = "none", value_name = "ADDR")]
    pub ip6: String,
    /// How `--ip autodetect` chooses: first-found, interface=REGEX, skip-interface=REGEX,
    /// cidr=CIDR, can-reach=DEST.
    #[arg(
        long,
        env = "MARGAY_IP_AUTODETECTION_METHOD",
        default_value = "first-found",
        value_name = "METHOD"
    )]
    pub ip_autodetection_method: String,
    /// How `--ip6 autodetect` chooses (as --ip-autodetection-method).
    #[arg(
        long,
        env = "MARGAY_IP6_AUTODETECTION_METHOD",
        default_value = "first-found",
        value_name = "METHOD"
    )]
    pub ip6_autodetection_method: String,
    /// Route-reflector cluster ID (dotted quad); give every reflector of one cluster the same.
    /// Default: the router ID.
    #[arg(long, env = "MARGAY_RR_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Where /livez, /readyz and /metrics are served.
    #[arg(
        long,
        env = "MARGAY_HEALTH_LISTEN",
        default_value = "127.0.0.1:9097",
        value_name = "ADDR:PORT"
    )]
    pub health_listen: String,
    /// Where /metrics (and the probes) are served for Prometheus.
    #[arg(
        long,
        env = "MARGAY_METRICS_LISTEN",
        default_value = "0.0.0.0:9095",
        value_name = "ADDR:PORT"
    )]
    pub metrics_listen: String,
    /// The status API that `margayctl bgp peers` and `margayctl bgp routes` read (loopback only:
    /// it has no authentication).
    #[arg(
        long,
        env = "MARGAY_BGP_STATUS_LISTEN",
        default_value = "127.0.0.1:9179",
        value_name = "ADDR:PORT"
    )]
    pub status_listen: String,
    /// error, warn, info, debug or trace (RUST_LOG, when set, takes precedence).
    #[arg(
        long,
        env = "MARGAY_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: String,
    /// How often peers, registration and Secrets are checked without a change to react to.
    #[arg(
        long,
        env = "MARGAY_RESYNC_INTERVAL",
        default_value = "90s",
        value_name = "DURATION"
    )]
    pub resync_interval: String,
    /// BGP passwords are read from <DIR>/<secret>/<key> first (a mounted Secret).
    #[arg(
        long,
        env = "MARGAY_SECRETS_DIR",
        default_value = "/etc/margay/secrets",
        value_name = "DIR"
    )]
    pub secrets_dir: PathBuf,
    /// With the Kubernetes datastore, Secrets not found in the directory are read from this
    /// namespace.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "margay-system",
        value_name = "NAMESPACE"
    )]
    pub secrets_namespace: String,
}

/// Why a pass of the route reflector failed.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("datastore: {0}")]
    Datastore(#[from] StoreError),
    #[error("BGP speaker: {0}")]
    Speaker(String),
    #[error("the BGP speaker has stopped")]
    SpeakerStopped,
}

/// A setting that cannot be used, named as the user set it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{setting}: {value:?}: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("the node name is not set: set NODENAME (the chart sets it from spec.nodeName) or pass --node-name")]
    NoNodeName,
    #[error("datastore: {0}")]
    Datastore(#[source] StoreError),
}

fn invalid(setting: &'static str, value: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        setting,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// How one address family's BGP address is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressChoice {
    None,
    Autodetect,
    /// An address, with its prefix length when given.
    Fixed(IpAddr, Option<u8>),
}

impl AddressChoice {
    fn parse(setting: &'static str, v: &str, v6: bool) -> Result<AddressChoice, SettingsError> {
        let family = if v6 { 6 } else { 4 };
        let wrong = || {
            invalid(
                setting,
                v,
                format!("must be autodetect, none, or an IPv{family} address (optionally with prefix length)"),
            )
        };
        match v.trim() {
            "autodetect" => Ok(AddressChoice::Autodetect),
            "none" | "" => Ok(AddressChoice::None),
            s => {
                let (ip, len) = match s.parse::<IpNet>() {
                    Ok(n) => (n.addr(), Some(n.prefix_len())),
                    Err(_) => (s.parse::<IpAddr>().map_err(|_| wrong())?, None),
                };
                if ip.is_ipv6() != v6 {
                    return Err(wrong());
                }
                Ok(AddressChoice::Fixed(ip, len))
            }
        }
    }

    /// The address with its prefix length, from the host's interface addresses.
    fn resolve(
        &self,
        setting: &'static str,
        method: &Method,
        host: &[InterfaceAddress],
        v6: bool,
    ) -> Result<Option<IpNet>, SettingsError> {
        match self {
            AddressChoice::None => Ok(None),
            AddressChoice::Autodetect => method
                .select(host, v6)
                .map(|a| Some(a.address))
                .map_err(|e| invalid(setting, "autodetect", e.to_string())),
            AddressChoice::Fixed(ip, Some(len)) => IpNet::new(*ip, *len)
                .map(Some)
                .map_err(|e| invalid(setting, &ip.to_string(), e.to_string())),
            AddressChoice::Fixed(ip, None) => host
                .iter()
                .find(|a| a.address.addr() == *ip)
                .map(|a| Some(a.address))
                .ok_or_else(|| {
                    invalid(
                        setting,
                        &ip.to_string(),
                        format!(
                            "is not an address of this host, so BGP sessions cannot use it (have: {}); \
                             run with hostNetwork or give address/prefix-length",
                            host.iter()
                                .map(|a| a.address.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                }),
        }
    }
}

impl std::fmt::Display for AddressChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressChoice::None => f.write_str("none"),
            AddressChoice::Autodetect => f.write_str("autodetect"),
            AddressChoice::Fixed(ip, Some(len)) => write!(f, "{ip}/{len}"),
            AddressChoice::Fixed(ip, None) => {
                write!(f, "{ip} (prefix length from its interface)")
            }
        }
    }
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub ipv4: AddressChoice,
    pub ipv4_method: Method,
    pub ipv6: AddressChoice,
    pub ipv6_method: Method,
    pub cluster_id: Option<Ipv4Addr>,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub status_listen: SocketAddr,
    pub log_level: String,
    pub resync_interval: Duration,
    pub secrets_dir: PathBuf,
    pub secrets_namespace: String,
    pub datastore: DatastoreConfig,
}

impl Settings {
    /// Validates `args`; the datastore is read through `env`.
    pub fn new(
        args: &Args,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, SettingsError> {
        let node_name = args
            .node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or(SettingsError::NoNodeName)?;
        if !margay_api::names::is_dns_subdomain(&node_name) {
            return Err(invalid(
                "NODENAME",
                &node_name,
                "must be a lower-case DNS subdomain, as Kubernetes node names are",
            ));
        }
        let ipv4 = AddressChoice::parse("MARGAY_IP", &args.ip, false)?;
        if ipv4 == AddressChoice::None {
            return Err(invalid(
                "MARGAY_IP",
                &args.ip,
                "a route reflector needs an IPv4 address: it is the BGP router ID and the address its clients peer with",
            ));
        }
        let ipv6 = AddressChoice::parse("MARGAY_IP6", &args.ip6, true)?;
        let method = |setting: &'static str, v: &str| {
            Method::parse(v).map_err(|e| invalid(setting, v, e.to_string()))
        };
        let ipv4_method = method(
            "MARGAY_IP_AUTODETECTION_METHOD",
            &args.ip_autodetection_method,
        )?;
        let ipv6_method = method(
            "MARGAY_IP6_AUTODETECTION_METHOD",
            &args.ip6_autodetection_method,
        )?;
        let cluster_id = match args.cluster_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(v.parse::<Ipv4Addr>().map_err(|_| {
                invalid(
                    "MARGAY_RR_CLUSTER_ID",
                    v,
                    "must be a cluster ID in dotted-quad form, e.g. 224.0.0.1",
                )
            })?),
        };
        let listen = |setting: &'static str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|_| invalid(setting, v, "must be address:port, e.g. 127.0.0.1:9097"))
        };
        let health_listen = listen("MARGAY_HEALTH_LISTEN", &args.health_listen)?;
        let metrics_listen = listen("MARGAY_METRICS_LISTEN", &args.metrics_listen)?;
        let status_listen = listen("MARGAY_BGP_STATUS_LISTEN", &args.status_listen)?;
        if !status_listen.ip().is_loopback() {
            return Err(invalid(
                "MARGAY_BGP_STATUS_LISTEN",
                &args.status_listen,
                "the status API has no authentication and shows every route; bind it to 127.0.0.1 or ::1",
            ));
        }
        if status_listen == health_listen || status_listen == metrics_listen {
            return Err(invalid(
                "MARGAY_BGP_STATUS_LISTEN",
                &args.status_listen,
                "must differ from MARGAY_HEALTH_LISTEN and MARGAY_METRICS_LISTEN",
            ));
        }
        let log_level = args.log_level.to_ascii_lowercase();
        if !matches!(
            log_level.as_str(),
            "error" | "warn" | "warning" | "info" | "debug" | "trace"
        ) {
            return Err(invalid(
                "MARGAY_LOG_LEVEL",
                &args.log_level,
                "must be error, warn, info, debug or trace",
            ));
        }
        let resync_interval = margay_api::parse_duration(&args.resync_interval)
            .filter(|d| *d >= Duration::from_secs(1))
            .ok_or_else(|| {
                invalid(
                    "MARGAY_RESYNC_INTERVAL",
                    &args.resync_interval,
                    "must be a duration of at least 1s, e.g. 90s",
                )
            })?;
        let datastore = DatastoreConfig::from_vars(env).map_err(SettingsError::Datastore)?;
        Ok(Settings {
            node_name,
            ipv4,
            ipv4_method,
            ipv6,
            ipv6_method,
            cluster_id,
            health_listen,
            metrics_listen,
            status_listen,
            log_level: if log_level == "warning" {
                "warn".into()
            } else {
                log_level
            },
            resync_interval,
            secrets_dir: args.secrets_dir.clone(),
            secrets_namespace: args.secrets_namespace.clone(),
            datastore,
        })
    }

    /// One line per setting, for `--check`.
    pub fn summary(&self) -> String {
        let datastore = match &self.datastore {
            DatastoreConfig::Kubernetes { kubeconfig } => format!(
                "kubernetes ({})",
                kubeconfig
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "in-cluster or ~/.kube/config".into())
            ),
            DatastoreConfig::Etcd(c) => format!("etcd {}", c.endpoints.join(",")),
        };
        format!(
            "node: {}\nipv4: {}\nipv6: {}\ncluster ID: {}\nhealth: {}\nmetrics: {}\nstatus API: {}\ndatastore: {datastore}\n",
            self.node_name,
            self.ipv4,
            self.ipv6,
            self.cluster_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "the router ID".into()),
            self.health_listen,
            self.metrics_listen,
            self.status_listen,
        )
    }
}

// ===== registration =====

/// How this reflector's Node must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub node: String,
    pub ipv4: IpNet,
    pub ipv6: Option<IpNet>,
    pub cluster_id: Ipv4Addr,
}

impl Registration {
    /// `existing` (or a new Node) with this reflector's addresses, cluster ID and label; `None`
    /// when `existing` has them already. Every other field, label and the AS stay as they are.
    pub fn apply(&self, existing: Option<&Node>) -> Option<Node> {
        let mut n = existing
            .cloned()
            .unwrap_or_else(|| Node::new(&self.node, Default::default()));
        let mut bgp = n.spec.bgp.clone().unwrap_or_else(NodeBGPSpec::default);
        bgp.ipv4_address = Some(self.ipv4.to_string());
        bgp.ipv6_address = self.ipv6.map(|a| a.to_string());
        bgp.route_reflector_cluster_id = Some(self.cluster_id.to_string());
        n.spec.bgp = Some(bgp);
        n.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(ROUTE_REFLECTOR_LABEL.into(), "true".into());
        let unchanged =
            existing.is_some_and(|e| e.spec == n.spec && e.metadata.labels == n.metadata.labels);
        (!unchanged).then_some(n)
    }

    /// Writes the Node with compare-and-swap until it is as wanted.
    async fn write(&self, store: &Store) -> Result<(), StoreError> {
        for _ in 0..10 {
            let existing = store.try_get::<Node>(&self.node).await?;
            let Some(n) = self.apply(existing.as_ref()) else {
                return Ok(());
            };
            let result = match existing {
                None => store.create(&n).await.map(|_| ()),
                Some(_) => store.update(&n).await.map(|_| ()),
            };
            match result {
                Ok(()) => {
                    info!(node = %self.node, address = %self.ipv4, cluster_id = %self.cluster_id, "Node registered");
                    return Ok(());
                }
                Err(e) if e.is_conflict() || e.is_already_exists() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Rejected {
            backend: "margay-bgpd",
            message: format!("Node {} kept changing while being registered", self.node),
        })
    }
}

// ===== health and metrics =====

/// Readiness, liveness and the mode's own metrics.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// What readiness waits for, or the last error.
    waiting: Mutex<String>,
    heartbeat: Mutex<Instant>,
    stall_limit: Duration,
    peers_configured: AtomicU64,
    clients: AtomicU64,
    established: AtomicU64,
    sync_errors: AtomicU64,
}

impl Health {
    pub fn new(resync: Duration) -> Health {
        Health {
            ready: AtomicBool::new(false),
            waiting: Mutex::new("starting".into()),
            heartbeat: Mutex::new(Instant::now()),
            // The loop goes round at least every resync interval and every status tick.
            stall_limit: (resync * 3).max(Duration::from_secs(60)),
            peers_configured: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            established: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn not_ready(&self, why: impl Into<String>) {
        self.ready.store(false, Ordering::SeqCst);
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why.into();
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
}

impl http::Probes for Health {
    fn live(&self) -> Result<(), String> {
        let since = self
            .heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if since > self.stall_limit {
            Err(format!(
                "the route reflector's loop has not run for {since:?}"
            ))
        } else {
            Ok(())
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone())
        }
    }

    fn metrics(&self) -> String {
        let g = |m: &AtomicU64| m.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "margay_bgpd_ready",
                "gauge",
                "1 once the datastore is synced, the Node registered and the peers applied.",
                u64::from(self.ready.load(Ordering::SeqCst)),
            ),
            (
                "margay_bgpd_peers_configured",
                "gauge",
                "Peers the datastore gives this route reflector.",
                g(&self.peers_configured),
            ),
            (
                "margay_bgpd_route_reflector_clients",
                "gauge",
                "Configured peers that are route-reflector clients.",
                g(&self.clients),
            ),
            (
                "margay_bgpd_sessions_established",
                "gauge",
                "BGP sessions in Established state at the last check.",
                g(&self.established),
            ),
            (
                "margay_bgpd_sync_errors_total",
                "counter",
                "Passes that failed to register the Node or report its sessions, and were retried.",
                g(&self.sync_errors),
            ),
        ] {
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"),
            );
        }
        out
    }
}

// ===== secrets =====

/// BGP passwords, read from files (`<dir>/<secret>/<key>`) or, with the Kubernetes datastore,
/// from Secrets in one namespace; re-read when the references change or the cache is older
/// than the resync interval.
struct Secrets {
    dir: PathBuf,
    namespace: String,
    kube: Option<kube::Client>,
    values: BTreeMap<(String, String), String>,
    refs: BTreeSet<(String, String)>,
    read: Option<Instant>,
    max_age: Duration,
}

impl Secrets {
    async fn new(s: &Settings) -> Secrets {
        let kube = match &s.datastore {
            DatastoreConfig::Kubernetes { kubeconfig } => kube_client(kubeconfig.as_deref()).await,
            DatastoreConfig::Etcd(_) => None,
        };
        Secrets {
            dir: s.secrets_dir.clone(),
            namespace: s.secrets_namespace.clone(),
            kube,
            values: BTreeMap::new(),
            refs: BTreeSet::new(),
            read: None,
            max_age: s.resync_interval,
        }
    }

    async fn resolve(
        &mut self,
        refs: BTreeSet<(String, String)>,
    ) -> &BTreeMap<(String, String), String> {
        let fresh = self.read.is_some_and(|t| t.elapsed() < self.max_age);
        if fresh && refs == self.refs {
            return &self.values;
        }
        let mut values = BTreeMap::new();
        for (name, key) in &refs {
            let path = self.dir.join(name).join(key);
            let value = match std::fs::read_to_string(&path) {
                Ok(v) => Some(v.trim_end_matches('\n').to_owned()),
                Err(_) => self.kube_secret(name, key).await,
            };
            match value {
                Some(v) => {
                    values.insert((name.clone(), key.clone()), v);
                }
                None => warn!(
                    secret = %name, key = %key,
                    "BGP password not found in {} nor in Secret {}/{name}",
                    path.display(), self.namespace
                ),
            }
        }
        self.values = values;
        self.refs = refs;
        self.read = Some(Instant::now());
        &self.values
    }

    async fn kube_secret(&self, name: &str, key: &str) -> Option<String> {
        use base64::Engine as _;
        let client = self.kube.as_ref()?;
        let req = ::http::Request::get(format!(
            "/api/v1/namespaces/{}/secrets/{name}",
            self.namespace
        ))
        .body(Vec::new())
        .ok()?;
        let secret: serde_json::Value = match client.request(req).await {
            Ok(v) => v,
            Err(e) => {
                warn!(secret = %name, error = %e, "reading a BGP password Secret");
                return None;
            }
        };
        let data = secret["data"][key].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        String::from_utf8(bytes).ok()
    }
}

async fn kube_client(kubeconfig: Option<&Path>) -> Option<kube::Client> {
    let result = match kubeconfig {
        Some(p) => match kube::config::Kubeconfig::read_from(p) {
            Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string())
                .and_then(|c| margay_api::store::kube::client(c).map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        },
        None => match kube::Config::infer().await {
            Ok(c) => margay_api::store::kube::client(c).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    match result {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no Kubernetes client for BGP password Secrets; only files are read");
            None
        }
    }
}

// ===== the loop =====

/// The kinds the reflector follows.
struct View {
    nodes: Informer<Node>,
    peers: Informer<BGPPeer>,
    configs: Informer<BGPConfiguration>,
}

impl View {
    fn spawn(store: &Store) -> View {
        View {
            nodes: Informer::spawn(store.clone()),
            peers: Informer::spawn(store.clone()),
            configs: Informer::spawn(store.clone()),
        }
    }

    async fn wait_synced(&self) {
        self.nodes.wait_synced().await;
        self.peers.wait_synced().await;
        self.configs.wait_synced().await;
    }

    fn config(&self, node: &str) -> Option<BGPConfiguration> {
        peering::effective_config(
            self.configs.get(BGP_CONFIGURATION_NAME),
            self.configs.get(&format!("node.{node}")),
        )
    }
}

/// Connects, retrying with back-off: a datastore that is not up yet is not a reason to exit.
async fn connect(cfg: &DatastoreConfig, health: &Health) -> Store {
    let mut backoff = Duration::from_millis(500);
    loop {
        match cfg.connect().await {
            Ok(s) => return s,
            Err(e) => {
                warn!(error = %e, "connecting to the datastore; retrying");
                health.not_ready(format!("connecting to the datastore: {e}"));
                health.beat();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn spawn_listener(
    addr: SocketAddr,
    endpoints: http::Endpoints,
    what: &str,
) -> anyhow::Result<()> {
    let l = http::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))?;
    info!(listen = %addr, "{what} up");
    tokio::spawn(http::serve(l, endpoints));
    Ok(())
}

/// The running reflector: what one pass reads and changes.
struct Reflector {
    settings: Settings,
    store: Store,
    view: View,
    registration: Registration,
    driver: BgpDriver,
    secrets: Secrets,
    health: Arc<Health>,
    /// The AS and port the speaker runs with; a datastore change of either needs a restart.
    running: (u32, u16),
    /// The last (AS, port) a restart warning was logged for.
    warned: Option<(u32, u16)>,
    /// The session states last written to the Node's status.
    reported: Option<Vec<BGPPeerState>>,
}

impl Reflector {
    /// One pass: registration, peers, status. Idempotent.
    async fn pass(&mut self) -> Result<(), PassError> {
        let name = self.settings.node_name.clone();
        let existing = self.view.nodes.get(&name);
        // The informer's copy decides whether a write is due; the write itself reads afresh.
        let me = match self.registration.apply(existing.as_ref()) {
            Some(wanted) => {
                self.registration.write(&self.store).await?;
                wanted
            }
            None => existing.unwrap_or_else(|| Node::new(&name, Default::default())),
        };
        // Until the informer shows the write, use the Node as written, so the peers are computed
        // as a reflector's from the first pass on (a later flip of rr_client would reset them).
        let mut nodes = self.view.nodes.snapshot();
        nodes.retain(|n| n.metadata.name.as_deref() != Some(name.as_str()));
        nodes.push(me.clone());
        let labels = me.metadata.labels.clone().unwrap_or_default();
        let config = self.view.config(&name);
        let bgp_peers = self.view.peers.snapshot();
        let secrets = self
            .secrets
            .resolve(peering::secret_refs(config.as_ref(), &bgp_peers))
            .await
            .clone();
        let want = peering::desired_peers_both_ways(&PeerInputs {
            me: &name,
            my_ip: Some(self.registration.ipv4.addr()),
            my_ip6: self.registration.ipv6.map(|a| a.addr()),
            my_labels: &labels,
            nodes: &nodes,
            config: config.as_ref(),
            peers: &bgp_peers,
            secrets: &secrets,
        });
        self.health
            .peers_configured
            .store(want.len() as u64, Ordering::Relaxed);
        self.health.clients.store(
            want.values().filter(|p| p.rr_client).count() as u64,
            Ordering::Relaxed,
        );
        let mut problems = margay_peering::SyncProblems::default();
        self.driver.set_peers(want, &mut problems).await;
        if problems.stopped {
            return Err(PassError::SpeakerStopped);
        }
        if !problems.is_empty() {
            return Err(PassError::Speaker(problems.summary()));
        }
        let asn = peering::node_as(Some(&me), config.as_ref());
        let port = config
            .as_ref()
            .map(|c| c.spec.effective_listen_port())
            .unwrap_or(margay_api::DEFAULT_BGP_PORT);
        if (asn, port) != self.running && self.warned != Some((asn, port)) {
            warn!(
                running_asn = self.running.0, running_port = self.running.1, asn, port,
                "the AS or BGP port in the datastore changed; restart margay-bgpd to apply it (sessions keep the running values)"
            );
            self.warned = Some((asn, port));
        }
        self.report().await
    }

    /// Writes the session states into the Node's status when they changed.
    async fn report(&mut self) -> Result<(), PassError> {
        let peers = match self.driver.handle.peers().await {
            Ok(p) => p,
            Err(margay_bgp::SpeakerError::Stopped) => return Err(PassError::SpeakerStopped),
            Err(e) => {
                // No answer: no session is known to be up.
                self.health.established.store(0, Ordering::Relaxed);
                return Err(PassError::Speaker(format!("reading the peers' state: {e}")));
            }
        };
        self.health.established.store(
            peers
                .iter()
                .filter(|p| p.state == margay_bgp::State::Established)
                .count() as u64,
            Ordering::Relaxed,
        );
        let states = margay_peering::peer_states(&peers);
        if self.reported.as_ref() == Some(&states) {
            return Ok(());
        }
        let name = &self.settings.node_name;
        for _ in 0..3 {
            let Some(mut n) = self.store.try_get::<Node>(name).await? else {
                return Ok(());
            };
            if n.status.as_ref().map(|s| &s.bgp_peers) != Some(&states) {
                n.status.get_or_insert_with(Default::default).bgp_peers = states.clone();
                match self.store.update_status(&n).await {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            self.reported = Some(states);
            return Ok(());
        }
        Ok(())
    }
}

/// Runs the mode until SIGTERM or SIGINT.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let health = Arc::new(Health::new(s.resync_interval));
    let speaker_cell: Arc<OnceLock<SpeakerHandle>> = Arc::default();
    let probes: Arc<dyn http::Probes> = health.clone();
    spawn_listener(
        s.health_listen,
        http::Endpoints::with_probes(speaker_cell.clone(), probes.clone(), false),
        "health endpoint",
    )
    .await?;
    if s.metrics_listen != s.health_listen {
        spawn_listener(
            s.metrics_listen,
            http::Endpoints::with_probes(speaker_cell.clone(), probes.clone(), false),
            "metrics endpoint",
        )
        .await?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    health.not_ready("connecting to the datastore");
    let store = tokio::select! {
        s = connect(&s.datastore, &health) => s,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let view = View::spawn(&store);
    health.not_ready("waiting for the datastore sync (Nodes, BGPPeers, BGPConfigurations)");
    info!(node = %s.node_name, "waiting for the datastore sync");
    tokio::select! {
        _ = view.wait_synced() => {}
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    }

    let host =
        autodetect::interface_addresses().context("listing this host's interface addresses")?;
    let ipv4 = s
        .ipv4
        .resolve("MARGAY_IP", &s.ipv4_method, &host, false)?
        .context("no IPv4 address")?;
    let ipv6 = s.ipv6.resolve("MARGAY_IP6", &s.ipv6_method, &host, true)?;
    let IpAddr::V4(router_id) = ipv4.addr() else {
        anyhow::bail!("MARGAY_IP resolved to {ipv4}, which is not IPv4");
    };
    let registration = Registration {
        node: s.node_name.clone(),
        ipv4,
        ipv6,
        cluster_id: s.cluster_id.unwrap_or(router_id),
    };

    // The speaker listens before the Node is registered: clients configure the session as soon
    // as they see the Node, and find the port open.
    let config = view.config(&s.node_name);
    let asn = peering::node_as(view.nodes.get(&s.node_name).as_ref(), config.as_ref());
    let port = config
        .as_ref()
        .map(|c| c.spec.effective_listen_port())
        .unwrap_or(margay_api::DEFAULT_BGP_PORT);
    let restart_time = config
        .as_ref()
        .and_then(|c| c.spec.node_mesh_max_restart_time.as_deref())
        .and_then(margay_api::parse_duration)
        .map(|d| d.as_secs().min(4095) as u16)
        .unwrap_or(120);
    let mut sc = SpeakerConfig::new(asn, router_id);
    sc.listen = vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)];
    sc.cluster_id = Some(registration.cluster_id);
    // Clients forward straight to each other, never through the reflector: their forwarding
    // survives a restart of the reflector.
    sc.graceful_restart = Some(GracefulRestartConfig {
        restart_time,
        forwarding_preserved: true,
    });
    sc.validate().context("the speaker's settings")?;
    let (handle, best) = Speaker::start(sc)
        .await
        .with_context(|| format!("starting the BGP speaker on port {port}"))?;
    // Nothing is installed into the kernel: the best routes are not needed.
    drop(best);
    let _ = speaker_cell.set(handle.clone());
    spawn_listener(
        s.status_listen,
        http::Endpoints::with_probes(speaker_cell.clone(), probes, true),
        "status API",
    )
    .await?;
    info!(asn, router_id = %router_id, port, cluster_id = %registration.cluster_id, "BGP speaker started");

    let mut r = Reflector {
        secrets: Secrets::new(&s).await,
        settings: s,
        store,
        view,
        registration,
        driver: BgpDriver::new(handle.clone(), None),
        health: health.clone(),
        running: (asn, port),
        warned: None,
        reported: None,
    };
    let mut nodes_rx = r.view.nodes.subscribe();
    let mut peers_rx = r.view.peers.subscribe();
    let mut configs_rx = r.view.configs.subscribe();
    let mut resync = tokio::time::interval(r.settings.resync_interval);
    // Session states change without a datastore event; they are reported this often.
    let mut status_tick = tokio::time::interval(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(200);
    info!(node = %r.settings.node_name, "margay-bgpd running as a cluster route reflector");
    loop {
        health.beat();
        match r.pass().await {
            Ok(()) => {
                health.set_ready();
                backoff = Duration::from_millis(200);
            }
            Err(PassError::SpeakerStopped) => {
                // Nothing to reflect with: exit, so that the orchestrator starts it again.
                health.not_ready("the BGP speaker has stopped");
                anyhow::bail!(
                    "the BGP speaker has stopped; exiting so that margay-bgpd is restarted"
                );
            }
            Err(e) => {
                health.sync_errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "route reflector pass failed; retrying");
                health.not_ready(e.to_string());
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        }
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = nodes_rx.changed() => {}
            _ = peers_rx.changed() => {}
            _ = configs_rx.changed() => {}
            _ = resync.tick() => {}
            _ = status_tick.tick() => {}
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!("shutting down");
    health.not_ready("shutting down");
    if let Err(e) = handle.shutdown("margay-bgpd shutting down").await {
        warn!(error = %e, "shutdown incomplete");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_api::{BGPConfigurationSpec, BGPPeerSpec, NodeSpec};
    use std::collections::HashMap;

    fn args(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Flags stand in for the environment here, so the test does not touch the process's.
        let mut argv = vec!["margay-bgpd".to_string()];
        for (k, v) in vars {
            let flag = match *k {
                "NODENAME" => "--node-name",
                "MARGAY_IP" => "--ip",
                "MARGAY_IP6" => "--ip6",
                "MARGAY_RR_CLUSTER_ID" => "--cluster-id",
                "MARGAY_BGP_STATUS_LISTEN" => "--status-listen",
                "MARGAY_LOG_LEVEL" => "--log-level",
                "MARGAY_RESYNC_INTERVAL" => "--resync-interval",
                "MARGAY_IP_AUTODETECTION_METHOD" => "--ip-autodetection-method",
                _ => continue,
            };
            argv.push(format!("{flag}={v}"));
        }
        let cli = Cli::try_parse_from(argv).expect("flags parse");
        Settings::new(&cli.a, |k| m.get(k).cloned())
    }

    #[test]
    fn settings_from_the_charts_environment() {
        let s = args(&[
            ("NODENAME", "rr-1"),
            ("MARGAY_IP", "10.0.0.5"),
            ("MARGAY_RR_CLUSTER_ID", "224.0.0.1"),
            ("MARGAY_DATASTORE_TYPE", "etcd"),
            ("MARGAY_ETCD_ENDPOINTS", "http://10.0.0.1:2379"),
        ])
        .unwrap();
        assert_eq!(s.node_name, "rr-1");
        assert_eq!(
            s.ipv4,
            AddressChoice::Fixed("10.0.0.5".parse().unwrap(), None)
        );
        assert_eq!(s.ipv6, AddressChoice::None);
        assert_eq!(s.cluster_id, Some(Ipv4Addr::new(224, 0, 0, 1)));
        assert_eq!(s.health_listen, "127.0.0.1:9097".parse().unwrap());
        assert_eq!(s.metrics_listen, "0.0.0.0:9095".parse().unwrap());
        assert!(matches!(s.datastore, DatastoreConfig::Etcd(_)));
    }

    #[test]
    fn bad_settings_name_the_variable() {
        let base = [("NODENAME", "rr-1")];
        for (extra, setting) in [
            (("MARGAY_IP", "fd00::1"), "MARGAY_IP"),
            (("MARGAY_IP", "none"), "MARGAY_IP"),
            (("MARGAY_IP6", "10.0.0.1"), "MARGAY_IP6"),
            (
                ("MARGAY_RR_CLUSTER_ID", "cluster-1"),
                "MARGAY_RR_CLUSTER_ID",
            ),
            (
                ("MARGAY_BGP_STATUS_LISTEN", "0.0.0.0:9179"),
                "MARGAY_BGP_STATUS_LISTEN",
            ),
            (("MARGAY_LOG_LEVEL", "loud"), "MARGAY_LOG_LEVEL"),
            (("MARGAY_RESYNC_INTERVAL", "0s"), "MARGAY_RESYNC_INTERVAL"),
            (
                ("MARGAY_IP_AUTODETECTION_METHOD", "magic"),
                "MARGAY_IP_AUTODETECTION_METHOD",
            ),
            (("NODENAME", "Bad_Name"), "NODENAME"),
        ] {
            let mut vars = base.to_vec();
            vars.retain(|(k, _)| *k != extra.0);
            vars.push(extra);
            match args(&vars) {
                Err(SettingsError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{extra:?}: {other:?}"),
            }
        }
        assert!(matches!(args(&[]), Err(SettingsError::NoNodeName)));
        let e = args(&[("NODENAME", "rr-1"), ("MARGAY_DATASTORE_TYPE", "etcd")]).unwrap_err();
        assert!(e.to_string().contains("MARGAY_ETCD_ENDPOINTS"), "{e}");
    }

    #[test]
    fn a_bare_address_takes_the_prefix_length_of_its_interface() {
        let host = [InterfaceAddress {
            interface: "eth0".into(),
            address: "10.0.0.5/24".parse().unwrap(),
        }];
        let m = Method::parse("first-found").unwrap();
        let bare = AddressChoice::Fixed("10.0.0.5".parse().unwrap(), None);
        assert_eq!(
            bare.resolve("MARGAY_IP", &m, &host, false).unwrap(),
            Some("10.0.0.5/24".parse().unwrap())
        );
        let elsewhere = AddressChoice::Fixed("10.9.9.9".parse().unwrap(), None);
        let e = elsewhere
            .resolve("MARGAY_IP", &m, &host, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.9.9.9")
                && e.contains("not an address of this host")
                && e.contains("10.0.0.5/24"),
            "{e}"
        );
        assert_eq!(
            AddressChoice::Autodetect
                .resolve("MARGAY_IP", &m, &host, false)
                .unwrap(),
            Some("10.0.0.5/24".parse().unwrap())
        );
    }

    fn registration() -> Registration {
        Registration {
            node: "rr-1".into(),
            ipv4: "10.0.0.5/24".parse().unwrap(),
            ipv6: None,
            cluster_id: Ipv4Addr::new(224, 0, 0, 1),
        }
    }

    #[test]
    fn registration_sets_address_cluster_id_and_label_and_keeps_the_rest() {
        let r = registration();
        let new = r.apply(None).expect("a new Node");
        let bgp = new.spec.bgp.as_ref().unwrap();
        assert_eq!(bgp.ipv4_address.as_deref(), Some("10.0.0.5/24"));
        assert_eq!(bgp.route_reflector_cluster_id.as_deref(), Some("224.0.0.1"));
        assert_eq!(
            new.metadata.labels.as_ref().unwrap()[ROUTE_REFLECTOR_LABEL],
            "true"
        );
        assert!(r.apply(Some(&new)).is_none(), "nothing to write twice");
        // A Node someone gave an AS and a label keeps both.
        let mut edited = new.clone();
        edited.spec.bgp.as_mut().unwrap().as_number = Some(65010);
        edited
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("rack".into(), "r1".into());
        edited.spec.bgp.as_mut().unwrap().route_reflector_cluster_id = None;
        let fixed = r.apply(Some(&edited)).expect("cluster ID restored");
        assert_eq!(fixed.spec.bgp.as_ref().unwrap().as_number, Some(65010));
        assert_eq!(fixed.metadata.labels.as_ref().unwrap()["rack"], "r1");
        assert_eq!(
            fixed
                .spec
                .bgp
                .as_ref()
                .unwrap()
                .route_reflector_cluster_id
                .as_deref(),
            Some("224.0.0.1")
        );
    }

    fn node(name: &str, ip: &str) -> Node {
        Node::new(
            name,
            NodeSpec {
                bgp: Some(NodeBGPSpec {
                    ipv4_address: Some(format!("{ip}/24")),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    }

    /// The chart's two BGPPeers (templates/resources.yaml).
    fn chart_peers() -> Vec<BGPPeer> {
        let sel = |name: &str, node: &str, peer: &str| {
            BGPPeer::new(
                name,
                BGPPeerSpec {
                    node_selector: Some(node.into()),
                    peer_selector: Some(peer.into()),
                    ..Default::default()
                },
            )
        };
        vec![
            sel(
                "peer-with-route-reflectors",
                "!has(margay.io/route-reflector)",
                "has(margay.io/route-reflector)",
            ),
            sel(
                "route-reflector-mesh",
                "has(margay.io/route-reflector)",
                "has(margay.io/route-reflector)",
            ),
        ]
    }

    #[test]
    fn with_the_charts_peers_a_reflector_serves_every_node_and_meshes_with_reflectors() {
        let rr1 = registration().apply(None).unwrap();
        let rr2 = Registration {
            node: "rr-2".into(),
            ipv4: "10.0.0.6/24".parse().unwrap(),
            ..registration()
        }
        .apply(None)
        .unwrap();
        let nodes = vec![
            rr1.clone(),
            rr2,
            node("a", "10.0.0.11"),
            node("b", "10.0.0.12"),
        ];
        let cfg = BGPConfiguration::new(
            "default",
            BGPConfigurationSpec {
                as_number: Some(64512),
                node_to_node_mesh_enabled: Some(false),
                ..Default::default()
            },
        );
        let peers = chart_peers();
        let peers_of = |me: &str, labels: &BTreeMap<String, String>, both_ways: bool| {
            let secrets = BTreeMap::new();
            let i = PeerInputs {
                me,
                my_ip: None,
                my_ip6: None,
                my_labels: labels,
                nodes: &nodes,
                config: Some(&cfg),
                peers: &peers,
                secrets: &secrets,
            };
            let got = if both_ways {
                peering::desired_peers_both_ways(&i)
            } else {
                peering::desired_peers(&i)
            };
            got.values()
                .map(|p| (p.address.to_string(), p.rr_client))
                .collect::<Vec<_>>()
        };
        let rr_labels = rr1.metadata.labels.clone().unwrap();
        assert_eq!(
            peers_of("rr-1", &rr_labels, true),
            vec![
                ("10.0.0.6".to_string(), false),
                ("10.0.0.11".to_string(), true),
                ("10.0.0.12".to_string(), true),
            ]
        );
        // The one-way computation alone would leave the reflector without clients.
        assert_eq!(
            peers_of("rr-1", &rr_labels, false),
            vec![("10.0.0.6".to_string(), false)]
        );
        // A node peers with both reflectors, as an ordinary iBGP peer.
        assert_eq!(
            peers_of("a", &BTreeMap::new(), true),
            vec![
                ("10.0.0.5".to_string(), false),
                ("10.0.0.6".to_string(), false)
            ]
        );
    }

    #[test]
    fn metrics_and_probes_say_what_they_wait_for() {
        use crate::http::Probes as _;
        let h = Health::new(Duration::from_secs(90));
        h.not_ready("waiting for the datastore sync");
        assert_eq!(
            h.ready().unwrap_err(),
            "waiting for the datastore sync".to_string()
        );
        assert!(h.live().is_ok());
        h.clients.store(2, Ordering::Relaxed);
        h.set_ready();
        assert!(h.ready().is_ok());
        let m = h.metrics();
        assert!(m.contains("margay_bgpd_ready 1\n"), "{m}");
        assert!(m.contains("margay_bgpd_route_reflector_clients 2\n"), "{m}");
    }
}
