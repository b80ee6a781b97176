//! The two plugins' commands: ADD, DEL, CHECK, VERSION, GC and STATUS, for `margay` (the
//! attachment) and `margay-ipam` (addresses only).
//!
//! ADD (margay): allocate (in process when `ipam.type` is `margay-ipam`, else the named IPAM
//! plugin from `CNI_PATH`), record the attachment on the node, create the veth with its pod end
//! directly in the pod's namespace, configure it, install the host route, and in etcd mode
//! write the WorkloadEndpoint. Any failure undoes what was done before it.
//!
//! DEL is best-effort and idempotent; it releases by the allocations' sequence numbers (or by
//! handle when it has none) and, when the datastore cannot be reached, records the release on
//! the node and succeeds.

use crate::config::{host_veth_name, IpamConf, NetConf};
use crate::datastore::{self, Datastore, Mode, PodIpam};
use crate::netsetup;
use crate::spec::{
    code, version_info, CniError, CniResult, Command, Env, Interface, IpConfig, Route, Version,
};
use ipnet::IpNet;
use margay_api::{IPAMBlock, IPAMConfig, IPAMHandle, Node, WorkloadEndpoint, IPAM_CONFIG_NAME};
use margay_ipam::node_state::{AttachmentRecord, PendingRelease, RecordedIp, StateDir};
use margay_ipam::pending::{self, allocator, drain_pending_releases, lock_epoch_if_free, IpamLock};
use margay_ipam::{audit, block, pool, AddressUse, AssignRequest};
use margay_kernel::link::{ipv6_link_local, HOST_VETH_MAC, POD_GATEWAY_V4};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Which of the two plugins this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginType {
    /// `margay`: the attachment.
    Main,
    /// `margay-ipam`: addresses only.
    Ipam,
}

/// The IPAM type Margay serves in process.
pub const IPAM_TYPE: &str = "margay-ipam";
/// The MTU when neither the configuration nor the node agent gives one.
pub const DEFAULT_MTU: u32 = 1500;
/// How long a plugin run spends retrying pending releases before its own work.
pub const DRAIN_BUDGET: Duration = Duration::from_millis(500);
/// How long DEL tries to release before it records the release as pending.
pub const DEL_RELEASE_BUDGET: Duration = Duration::from_secs(4);

/// Runs the plugin on the real environment and stdin; writes the result or error JSON to
/// stdout and returns the exit code.
pub fn run_plugin(kind: PluginType) -> i32 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let (out, rc) = match read {
        Ok(_) => run(kind, |k| std::env::var(k).ok(), &stdin),
        Err(e) => (
            Some(
                CniError::new(code::IO_FAILURE, "cannot read stdin", e.to_string())
                    .to_json(crate::spec::LATEST_VERSION),
            ),
            1,
        ),
    };
    if let Some(v) = out {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{v}");
        let _ = stdout.flush();
    }
    rc
}

/// The version an error should carry: the request's when it is one Margay speaks.
fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|s| Version::parse(s).is_some_and(|v| v.is_supported()))
        .unwrap_or_else(|| crate::spec::LATEST_VERSION.to_owned())
}

/// One invocation, given the environment through `get`. Returns what to print and the exit
/// code.
pub fn run(
    kind: PluginType,
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> (Option<Value>, i32) {
    let env = match Env::from_vars(&get) {
        Ok(e) => e,
        Err(e) => return (Some(e.to_json(&reply_version(stdin))), 1),
    };
    if env.command == Command::Version {
        return (Some(version_info()), 0);
    }
    let (conf, version) = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return (Some(e.to_json(&reply_version(stdin))), 1),
    };
    let vs = version.to_string();
    if let Err(e) = conf
        .validate()
        .and_then(|()| command_fits_version(&env, version))
    {
        return (Some(e.to_json(&vs)), 1);
    }
    crate::logging::init(&conf);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let e = CniError::new(code::IO_FAILURE, "cannot start the runtime", e.to_string());
            return (Some(e.to_json(&vs)), 1);
        }
    };
    let span = tracing::info_span!(
        "cni",
        cmd = ?env.command,
        container = %env.container_id(),
        pod = %format!("{}/{}", env.args.pod_namespace.as_deref().unwrap_or(""), env.args.pod_name.as_deref().unwrap_or("")),
    );
    let _enter = span.enter();
    let started = Instant::now();
    let ctx = match Ctx::new(kind, env, conf, version, stdin.to_vec()) {
        Ok(c) => c,
        Err(e) => return (Some(e.to_json(&vs)), 1),
    };
    let res = runtime.block_on(ctx.dispatch());
    // Nothing may outlive the command (an etcd connection task, a kube client).
    runtime.shutdown_timeout(Duration::from_millis(50));
    match res {
        Ok(out) => {
            debug!(elapsed = ?started.elapsed(), "done");
            (out, 0)
        }
        Err(e) => {
            warn!(code = e.code, error = %e, elapsed = ?started.elapsed(), "failed");
            (Some(e.to_json(&vs)), 1)
        }
    }
}

fn command_fits_version(env: &Env, v: Version) -> Result<(), CniError> {
    let needs = match env.command {
        Command::Check if !v.has_check() => "0.4.0",
        Command::Gc | Command::Status if !v.has_gc_and_status() => "1.1.0",
        _ => return Ok(()),
    };
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "{:?} needs cniVersion {needs} or later; the configuration says {v}",
            env.command
        ),
        "",
    ))
}

/// Everything one invocation works with.
struct Ctx {
    kind: PluginType,
    env: Env,
    conf: NetConf,
    version: Version,
    /// stdin, handed unchanged to a delegated IPAM plugin.
    raw: Vec<u8>,
    state: StateDir,
    node: String,
    node_netns: Option<PathBuf>,
}

fn io_error(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::IO_FAILURE, what, e.to_string())
}

fn kernel_error(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::KERNEL, what, e.to_string())
}

/// The node's name: `nodename`, else the file `nodename_file` (default
/// `<state_dir>/nodename`), else the host name.
fn node_name(conf: &NetConf) -> Result<String, CniError> {
    if let Some(n) = conf.nodename.as_deref().filter(|n| !n.is_empty()) {
        return Ok(n.to_owned());
    }
    let file = conf
        .nodename_file
        .clone()
        .unwrap_or_else(|| conf.state_dir().join("nodename"));
    match std::fs::read_to_string(&file) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && conf.nodename_file.is_none() => {}
        Err(e) => {
            return Err(io_error(
                &format!("cannot read nodename_file {}", file.display()),
                e,
            ))
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .map_err(|e| io_error("cannot read the host name", e))
}

/// The pod MTU: `mtu`, else what the node agent wrote to `<state_dir>/mtu`, else 1500.
fn pod_mtu(conf: &NetConf) -> u32 {
    if conf.mtu != 0 {
        return conf.mtu;
    }
    std::fs::read_to_string(conf.state_dir().join("mtu"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|m| (68..=65535).contains(m))
        .unwrap_or(DEFAULT_MTU)
}

/// The ADD result of an attachment.
fn attachment_result(
    host_veth: &str,
    ifname: &str,
    netns: &str,
    pod_mac: Option<String>,
    mtu: u32,
    addrs: &[IpNet],
) -> CniResult {
    let mut routes = Vec::new();
    if addrs.iter().any(|a| a.addr().is_ipv4()) {
        routes.push(Route {
            dst: "0.0.0.0/0".parse().expect("valid"),
            gw: Some(IpAddr::V4(POD_GATEWAY_V4)),
        });
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        routes.push(Route {
            dst: "::/0".parse().expect("valid"),
            gw: Some(IpAddr::V6(ipv6_link_local(&HOST_VETH_MAC))),
        });
    }
    CniResult {
        interfaces: vec![
            Interface {
                name: host_veth.to_owned(),
                mac: Some(margay_kernel::format_mac(&HOST_VETH_MAC)),
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: ifname.to_owned(),
                mac: pod_mac,
                mtu: Some(mtu),
                sandbox: Some(netns.to_owned()),
            },
        ],
        ips: addrs
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: None,
                interface: Some(1),
            })
            .collect(),
        routes,
    }
}

/// [`pending::lock_ipam`], failing with the CNI error the spec wants.
async fn lock_ipam(state: &StateDir) -> Result<IpamLock, CniError> {
    pending::lock_ipam(state)
        .await
        .map_err(datastore::ipam_error)
}

/// [`pending::release`], failing with the CNI error the spec wants.
async fn release(
    state: &StateDir,
    store: &margay_api::Store,
    node: &str,
    handle: &str,
    ips: &[RecordedIp],
) -> Result<(), CniError> {
    pending::release(state, store, node, handle, ips)
        .await
        .map_err(datastore::ipam_error)
}

impl Ctx {
    fn new(
        kind: PluginType,
        env: Env,
        conf: NetConf,
        version: Version,
        raw: Vec<u8>,
    ) -> Result<Ctx, CniError> {
        let node = node_name(&conf)?;
        let state = StateDir::new(conf.state_dir());
        let node_netns = conf.node_netns.clone();
        if let Some(p) = &node_netns {
            if !netsetup::netns_usable(p) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("node_netns {} is not a network namespace", p.display()),
                    "",
                ));
            }
        }
        Ok(Ctx {
            kind,
            env,
            conf,
            version,
            raw,
            state,
            node,
            node_netns,
        })
    }

    fn ipam_type(&self) -> &str {
        self.conf
            .ipam
            .as_ref()
            .map(|i| i.type_.as_str())
            .unwrap_or("")
    }

    /// Whether addresses come from Margay's allocator in this process.
    fn in_process_ipam(&self) -> bool {
        self.kind == PluginType::Ipam || self.ipam_type() == IPAM_TYPE
    }

    fn handle(&self) -> String {
        margay_ipam::pod_handle(self.env.container_id())
    }

    fn host_veth(&self) -> String {
        match (&self.env.args.pod_namespace, &self.env.args.pod_name) {
            (Some(ns), Some(pod)) => host_veth_name(self.conf.veth_prefix(), ns, pod),
            // Outside Kubernetes the container ID names the attachment.
            _ => host_veth_name(
                self.conf.veth_prefix(),
                "container",
                self.env.container_id(),
            ),
        }
    }

    fn workload_endpoint_name(&self) -> String {
        margay_api::names::workload_name(
            &self.node,
            self.env
                .args
                .pod_namespace
                .as_deref()
                .unwrap_or("container"),
            self.env
                .args
                .pod_name
                .as_deref()
                .unwrap_or(self.env.container_id()),
            self.env.ifname(),
        )
    }

    async fn connect(&self) -> Result<Datastore, CniError> {
        datastore::connect(&self.conf).await
    }

    async fn dispatch(&self) -> Result<Option<Value>, CniError> {
        // Releases earlier DELs could not complete go first, briefly.
        if self.in_process_ipam()
            && matches!(self.state.pending_files().map(|f| f.is_empty()), Ok(false))
        {
            if let Ok(ds) = self.connect().await {
                let r = drain_pending_releases(self.state.root(), &ds.store, DRAIN_BUDGET).await;
                debug!(?r, "drained pending releases");
            }
        }
        match (self.kind, self.env.command) {
            (_, Command::Version) => Ok(Some(version_info())),
            (PluginType::Main, Command::Add) => self.add().await.map(Some),
            (PluginType::Main, Command::Del) => self.del().await.map(|()| None),
            (PluginType::Main, Command::Check) => self.check().await.map(|()| None),
            (PluginType::Ipam, Command::Add) => self.ipam_add().await.map(Some),
            (PluginType::Ipam, Command::Del) => self.ipam_del().await.map(|()| None),
            (PluginType::Ipam, Command::Check) => self.ipam_check().await.map(|()| None),
            (_, Command::Gc) => self.gc().await.map(|()| None),
            (_, Command::Status) => self.status().await.map(|()| None),
        }
    }

    // ===== addresses =====

    /// The specific addresses the pod must get: the `ips` capability, else the `ipAddrs`
    /// annotation.
    fn requested_addresses(&self, pod: &PodIpam) -> Result<Vec<IpAddr>, CniError> {
        let caps = self
            .conf
            .runtime_config
            .as_ref()
            .map(|r| r.ips.clone())
            .unwrap_or_default();
        if caps.is_empty() {
            return Ok(pod.ip_addrs.clone().unwrap_or_default());
        }
        caps.iter()
            .map(|s| {
                s.parse::<IpAddr>()
                    .or_else(|_| s.parse::<IpNet>().map(|n| n.addr()))
                    .map_err(|_| {
                        CniError::new(
                            code::INVALID_CONFIG,
                            format!("runtimeConfig.ips: {s:?} is not an address"),
                            "",
                        )
                    })
            })
            .collect()
    }

    /// The block to write the pod's handle ahead for: the first hinted block of the one family
    /// this network assigns, unless the runtime asks for specific addresses. (The pod's
    /// annotations, read meanwhile, may still send the address elsewhere; that costs a write.)
    fn handle_ahead(&self, ipam: &IpamConf, hint: &[IpNet]) -> Option<IpNet> {
        let asks_ips = self
            .conf
            .runtime_config
            .as_ref()
            .is_some_and(|r| !r.ips.is_empty());
        let want_v4 = ipam.assign_ipv4.map(|b| b.get()).unwrap_or(true);
        let want_v6 = ipam
            .assign_ipv6
            .map(|b| b.get())
            .unwrap_or(!ipam.ipv6_pools.is_empty());
        if asks_ips || want_v4 == want_v6 {
            return None;
        }
        hint.iter().find(|b| b.addr().is_ipv4() == want_v4).copied()
    }

    /// Allocates the pod's addresses in process, under the node's allocator lock.
    async fn assign(&self, ds: &Datastore) -> Result<Vec<RecordedIp>, CniError> {
        let ipam = self.conf.ipam.clone().unwrap_or_default();
        let pod = async {
            match (
                ds.mode,
                &ds.kube,
                &self.env.args.pod_namespace,
                &self.env.args.pod_name,
            ) {
                (Mode::Kubernetes, Some(client), Some(ns), Some(name)) => {
                    datastore::pod_ipam(client, ns, name).await
                }
                _ => Ok(PodIpam::default()),
            }
        };
        // The allocator's settings and this node's affinities are read before the node lock
        // (which also opens the datastore connection), while the pod's annotations are read:
        // under the lock the allocator reads and writes only its block.
        // With them, the blocks this node held at its last ADD, so that under the lock the
        // allocator only writes, unless another request of this node held the lock meanwhile.
        // Where the handle is a write of its own (Kubernetes), it is written now too, counting
        // the address in the block the last ADD used: under the lock only the block is then
        // written (see `Allocator::prepare_handle`).
        let alloc = allocator(&ds.store, &self.node);
        let epoch = lock_epoch_if_free(&self.state);
        let hint = self.state.block_hint();
        let ahead = self.handle_ahead(&ipam, &hint);
        let prepare = async {
            match ahead {
                Some(block) => alloc.prepare_handle(&self.handle(), block).await.map(drop),
                None => Ok(()),
            }
        };
        let (pod, prefetched, prepared) = futures::join!(pod, alloc.prefetch(&hint), prepare);
        if let Err(e) = prepared {
            // Not fatal: the request writes its handle under the lock as it would anyway.
            debug!(error = %e, "cannot write the pod's handle ahead");
        }
        let pod = pod?;
        prefetched.map_err(datastore::ipam_error)?;
        let addresses = self.requested_addresses(&pod)?;
        let v4_pools = pod.ipv4_pools.clone().unwrap_or(ipam.ipv4_pools.clone());
        let v6_pools = pod.ipv6_pools.clone().unwrap_or(ipam.ipv6_pools.clone());
        let want_v4 = ipam.assign_ipv4.map(|b| b.get()).unwrap_or(true);
        let want_v6 = ipam
            .assign_ipv6
            .map(|b| b.get())
            .unwrap_or(!v6_pools.is_empty());
        let mut attrs = BTreeMap::new();
        if let Some(ns) = &self.env.args.pod_namespace {
            attrs.insert(margay_ipam::attr::NAMESPACE.to_owned(), ns.clone());
        }
        if let Some(p) = &self.env.args.pod_name {
            attrs.insert(margay_ipam::attr::POD.to_owned(), p.clone());
        }
        attrs.insert(margay_ipam::attr::NODE.to_owned(), self.node.clone());
        attrs.insert(
            margay_ipam::attr::TYPE.to_owned(),
            margay_ipam::attr::TYPE_POD.to_owned(),
        );
        let base = AssignRequest {
            handle_id: self.handle(),
            attrs,
            use_: AddressUse::Workload,
            ..AssignRequest::default()
        };
        // The allocator applies one pool list to both families: a family without a list of
        // its own gets a request of its own, so that it may use every eligible pool.
        let reqs: Vec<AssignRequest> = if !addresses.is_empty() {
            vec![AssignRequest {
                addresses,
                pools: v4_pools.into_iter().chain(v6_pools).collect(),
                ..base
            }]
        } else if want_v4 && want_v6 && v4_pools.is_empty() != v6_pools.is_empty() {
            vec![
                AssignRequest {
                    num_v4: 1,
                    pools: v4_pools,
                    ..base.clone()
                },
                AssignRequest {
                    num_v6: 1,
                    pools: v6_pools,
                    ..base
                },
            ]
        } else {
            vec![AssignRequest {
                num_v4: u32::from(want_v4),
                num_v6: u32::from(want_v6),
                pools: v4_pools.into_iter().chain(v6_pools).collect(),
                ..base
            }]
        };
        let lock = lock_ipam(&self.state).await?;
        if epoch != Some(lock.epoch()) {
            alloc.forget_prefetched_blocks().await;
        }
        let mut out: Vec<RecordedIp> = Vec::new();
        let mut used_blocks: Vec<IpNet> = Vec::new();
        for req in &reqs {
            match alloc.assign(req).await {
                Ok(got) => {
                    used_blocks.extend(got.addresses.iter().map(|a| a.block));
                    out.extend(got.addresses.iter().map(|a| RecordedIp {
                        ip: a.ip,
                        seq: Some(a.seq),
                    }))
                }
                Err(e) => {
                    // All or nothing across the requests too.
                    if !out.is_empty() {
                        let ips: Vec<(IpAddr, Option<u64>)> =
                            out.iter().map(|r| (r.ip, r.seq)).collect();
                        if let Err(e2) = alloc.release_ips(&ips).await {
                            warn!(error = %e2, "cannot release the first family's address after the second failed");
                        }
                    }
                    return Err(datastore::ipam_error(e));
                }
            }
        }
        // The blocks this ADD used first: the next ADD writes its handle ahead for the first.
        let mut hint = used_blocks;
        for b in alloc.known_blocks().await {
            if !hint.contains(&b) {
                hint.push(b);
            }
        }
        self.state.set_block_hint(&hint);
        drop(lock);
        Ok(out)
    }

    /// Runs the delegated IPAM plugin (`ipam.type` on `CNI_PATH`) for `command`, with the same
    /// environment and stdin, as libcni does.
    fn exec_ipam(&self, command: &str) -> Result<Option<CniResult>, CniError> {
        let ty = self.ipam_type();
        if ty.is_empty() || ty.contains('/') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("ipam.type {ty:?} is not a plugin name"),
                "",
            ));
        }
        let bin = self
            .env
            .path
            .iter()
            .map(|d| Path::new(d).join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("IPAM plugin {ty:?} is not in CNI_PATH"),
                    format!("searched {}", self.env.path.join(":")),
                )
            })?;
        let mut child = std::process::Command::new(&bin)
            .env("CNI_COMMAND", command)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| io_error(&format!("cannot run {}", bin.display()), e))?;
        if let Some(mut sin) = child.stdin.take() {
            sin.write_all(&self.raw)
                .map_err(|e| io_error(&format!("cannot write to {}", bin.display()), e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| io_error(&format!("cannot run {}", bin.display()), e))?;
        let v: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let (c, msg, details) = match &v {
                Some(v) => (
                    v.get("code").and_then(Value::as_u64).unwrap_or(999) as u32,
                    v.get("msg")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    v.get("details")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                ),
                None => (
                    code::IO_FAILURE,
                    format!("{ty} failed ({})", out.status),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                ),
            };
            return Err(CniError::new(c, format!("{ty}: {msg}"), details));
        }
        match (command, v) {
            ("ADD", Some(v)) => CniResult::from_json(&v).map(Some),
            ("ADD", None) => Err(CniError::new(
                code::DECODE_FAILURE,
                format!("{ty} printed no result"),
                "",
            )),
            _ => Ok(None),
        }
    }

    /// Releases after a failed ADD; when the datastore is unreachable, records it as pending.
    async fn undo_allocation(&self, ds: Option<&Datastore>, ips: &[RecordedIp]) {
        if !self.in_process_ipam() {
            if let Err(e) = self.exec_ipam("DEL") {
                warn!(error = %e, "the IPAM plugin could not release after a failed ADD");
            }
            return;
        }
        let Some(ds) = ds else { return };
        let r = tokio::time::timeout(
            DEL_RELEASE_BUDGET,
            release(&self.state, &ds.store, &self.node, &self.handle(), ips),
        )
        .await;
        if !matches!(r, Ok(Ok(()))) {
            warn!("could not release the addresses of a failed ADD; recording it as pending");
            self.record_pending(ips, None);
        }
    }

    fn record_pending(&self, ips: &[RecordedIp], wep: Option<String>) {
        let p = PendingRelease {
            container_id: self.env.container_id().to_owned(),
            handle: self.handle(),
            node: self.node.clone(),
            ips: ips.to_vec(),
            workload_endpoint: wep,
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if let Err(e) = self.state.write_pending(&p) {
            warn!(error = %e, "cannot record the pending release; the controller's GC will collect the addresses");
        }
    }

    // ===== margay: ADD =====

    async fn add(&self) -> Result<Value, CniError> {
        let netns = self.env.netns.clone().unwrap_or_default();
        let netns_path = PathBuf::from(&netns);
        let ifname = self.env.ifname().to_owned();
        if !netsetup::netns_usable(&netns_path) {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_NETNS {netns:?} is not a network namespace"),
                "the path must name an existing network namespace (/var/run/netns/<name> or /proc/<pid>/ns/net)",
            ));
        }
        let pod_nl = match netsetup::open_pod(&netns_path, &ifname) {
            Ok((nl, false)) => nl,
            Ok((_, true)) => {
                return Err(CniError::new(
                    code::INTERFACE_EXISTS,
                    format!("the container already has an interface {ifname}"),
                    format!("CNI_IFNAME={ifname} in {netns}; DEL the earlier attachment first"),
                ))
            }
            Err(e) => return Err(kernel_error("cannot read the container's interfaces", e)),
        };
        let pod_mac = match self
            .conf
            .runtime_config
            .as_ref()
            .and_then(|r| r.mac.as_deref())
        {
            Some(m) => Some(margay_kernel::parse_mac(m).map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "runtimeConfig.mac is not a MAC",
                    e.to_string(),
                )
            })?),
            None => None,
        };
        let host_veth = self.host_veth();
        let mtu = pod_mtu(&self.conf);
        let etcd_mode = datastore::mode(&self.conf) == Mode::Etcd;

        // 1. Addresses.
        let ds = if self.in_process_ipam() || etcd_mode {
            Some(self.connect().await?)
        } else {
            None
        };
        let ips: Vec<RecordedIp> = if self.in_process_ipam() {
            self.assign(ds.as_ref().expect("connected above")).await?
        } else {
            let r = self.exec_ipam("ADD")?.unwrap_or_default();
            r.ips
                .iter()
                .map(|c| RecordedIp {
                    ip: c.address.addr(),
                    seq: None,
                })
                .collect()
        };
        if ips.is_empty() {
            self.undo_allocation(ds.as_ref(), &ips).await;
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "the IPAM configuration gave the pod no address",
                "set ipam.assign_ipv4 or ipam.assign_ipv6",
            ));
        }
        let addrs: Vec<IpNet> = ips.iter().map(|r| netsetup::host_prefix(r.ip)).collect();
        info!(?addrs, veth = %host_veth, "allocated");

        // 2. The record, before anything exists in the kernel.
        let mut record = AttachmentRecord {
            container_id: self.env.container_id().to_owned(),
            ifname: ifname.clone(),
            host_veth: host_veth.clone(),
            netns: netns.clone(),
            namespace: self.env.args.pod_namespace.clone(),
            pod: self.env.args.pod_name.clone(),
            handle: self.handle(),
            ips: if self.in_process_ipam() {
                ips.clone()
            } else {
                Vec::new()
            },
            ipam_type: self.ipam_type().to_owned(),
            workload_endpoint: etcd_mode.then(|| self.workload_endpoint_name()),
        };
        if let Err(e) = self.state.write_attachment(&record) {
            self.undo_allocation(ds.as_ref(), &ips).await;
            return Err(io_error("cannot record the attachment on the node", e));
        }

        // 3. The kernel: veth, pod addresses and routes, host route.
        let t_kernel = Instant::now();
        let attached = netsetup::attach(
            &netsetup::PodAttach {
                node_netns: self.node_netns.as_deref(),
                pod_netns: &netns_path,
                ifname: &ifname,
                host_veth: &host_veth,
                mtu,
                pod_mac,
                addrs: &addrs,
            },
            pod_nl,
        );
        let attached = match attached {
            Ok(a) => a,
            Err(e) => {
                self.undo_allocation(ds.as_ref(), &ips).await;
                let _ = self.state.remove_attachment(&record.container_id, &ifname);
                return Err(kernel_error("cannot set up the pod's network", e));
            }
        };

        debug!(elapsed = ?t_kernel.elapsed(), "kernel work done");
        // 4. etcd mode: the WorkloadEndpoint the controller's GC reads.
        if let (true, Some(ds)) = (etcd_mode, ds.as_ref()) {
            let spec = margay_api::WorkloadEndpointSpec {
                node: self.node.clone(),
                namespace: self
                    .env
                    .args
                    .pod_namespace
                    .clone()
                    .unwrap_or_else(|| "container".into()),
                pod: self
                    .env
                    .args
                    .pod_name
                    .clone()
                    .unwrap_or_else(|| self.env.container_id().to_owned()),
                container_id: self.env.container_id().to_owned(),
                endpoint: ifname.clone(),
                interface_name: host_veth.clone(),
                mac: attached.pod_mac.as_ref().map(margay_kernel::format_mac),
                ip_networks: addrs.iter().map(|a| a.to_string()).collect(),
                handle_id: self.handle(),
            };
            match datastore::put_workload_endpoint(&ds.store, spec).await {
                Ok(name) => record.workload_endpoint = Some(name),
                Err(e) => {
                    if let Err(e2) =
                        netsetup::delete_host_veth(self.node_netns.as_deref(), &host_veth)
                    {
                        warn!(error = %e2, "cannot delete the veth of a failed ADD");
                    }
                    self.undo_allocation(Some(ds), &ips).await;
                    let _ = self.state.remove_attachment(&record.container_id, &ifname);
                    return Err(e);
                }
            }
        }
        let result = attachment_result(
            &host_veth,
            &ifname,
            &netns,
            attached.pod_mac.as_ref().map(margay_kernel::format_mac),
            mtu,
            &addrs,
        );
        info!(veth = %host_veth, replaced_stale = attached.replaced_stale, "attached");
        Ok(result.to_json(self.version))
    }

    // ===== margay: DEL =====

    async fn del(&self) -> Result<(), CniError> {
        let cid = self.env.container_id().to_owned();
        let ifname = self.env.ifname().to_owned();
        let record = self
            .state
            .read_attachment(&cid, &ifname)
            .unwrap_or_else(|e| {
                warn!(error = %e, "unreadable attachment record; releasing by handle");
                None
            });
        let host_veth = record
            .as_ref()
            .map(|r| r.host_veth.clone())
            .unwrap_or_else(|| self.host_veth());
        // The kernel: the pod's end inside its namespace takes the host end and its routes
        // along. A host veth whose namespace is gone is deleted by name, unless another
        // attachment (a newer sandbox of the same pod) owns that name now.
        if let Some(ns) = &self.env.netns {
            match netsetup::delete_pod_interface(Path::new(ns), &ifname) {
                Ok(found) => debug!(found, "deleted the pod interface"),
                Err(e) => warn!(error = %e, "cannot delete the pod interface"),
            }
        }
        self.delete_host_veth_if_ours(&cid, &host_veth);

        let ips = record.as_ref().map(|r| r.ips.clone()).unwrap_or_default();
        let wep = record
            .as_ref()
            .and_then(|r| r.workload_endpoint.clone())
            .or_else(|| {
                (datastore::mode(&self.conf) == Mode::Etcd).then(|| self.workload_endpoint_name())
            });
        if self.in_process_ipam() {
            let work = async {
                let ds = self.connect().await?;
                release(&self.state, &ds.store, &self.node, &self.handle(), &ips).await?;
                if let Some(w) = &wep {
                    datastore::delete_workload_endpoint(&ds.store, w, &cid).await?;
                }
                Ok::<(), CniError>(())
            };
            match tokio::time::timeout(DEL_RELEASE_BUDGET, work).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot release now; recorded as pending");
                    self.record_pending(&ips, wep);
                }
                Err(_) => {
                    warn!(
                        "the datastore did not answer in time; the release is recorded as pending"
                    );
                    self.record_pending(&ips, wep);
                }
            }
        } else {
            self.exec_ipam("DEL")?;
            if let Some(w) = &wep {
                let r = async {
                    let ds = self.connect().await?;
                    datastore::delete_workload_endpoint(&ds.store, w, &cid).await
                };
                if let Err(e) = r.await {
                    warn!(error = %e, "cannot delete the WorkloadEndpoint; the controller's GC will");
                }
            }
        }
        self.state
            .remove_attachment(&cid, &ifname)
            .map_err(|e| io_error("cannot remove the attachment record", e))?;
        info!(veth = %host_veth, "detached");
        Ok(())
    }

    /// Deletes `host_veth` unless an attachment of another container owns the name now.
    fn delete_host_veth_if_ours(&self, cid: &str, host_veth: &str) {
        let exists = netsetup::open_node(self.node_netns.as_deref())
            .and_then(|mut nl| nl.link(host_veth))
            .map(|l| l.is_some())
            .unwrap_or(false);
        if !exists {
            return;
        }
        let others = self.state.attachments_all().unwrap_or_default();
        if let Some(o) = others
            .iter()
            .find(|r| r.host_veth == host_veth && r.container_id != cid)
        {
            info!(veth = %host_veth, owner = %o.container_id, "the host veth belongs to a newer attachment; left alone");
            return;
        }
        if let Err(e) = netsetup::delete_host_veth(self.node_netns.as_deref(), host_veth) {
            warn!(veth = %host_veth, error = %e, "cannot delete the host veth");
        }
    }

    // ===== margay: CHECK =====

    fn prev_result(&self) -> Result<CniResult, CniError> {
        let prev = self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "CHECK needs prevResult",
                "the runtime passes the ADD result as prevResult",
            )
        })?;
        CniResult::from_json(prev)
    }

    async fn check(&self) -> Result<(), CniError> {
        let prev = self.prev_result()?;
        let netns = self.env.netns.clone().unwrap_or_default();
        let ifname = self.env.ifname().to_owned();
        let host_veth = prev
            .interfaces
            .iter()
            .find(|i| i.sandbox.is_none())
            .map(|i| i.name.clone())
            .unwrap_or_else(|| self.host_veth());
        let sandbox = prev
            .interfaces
            .iter()
            .position(|i| i.sandbox.is_some() && i.name == ifname);
        let addrs: Vec<IpNet> = prev
            .ips
            .iter()
            .filter(|c| c.interface.is_none() || c.interface == sandbox)
            .map(|c| c.address)
            .collect();
        if addrs.is_empty() {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("prevResult gives {ifname} no address"),
                "",
            ));
        }
        let expected = netsetup::Expected {
            node_netns: self.node_netns.as_deref(),
            pod_netns: Path::new(&netns),
            ifname: &ifname,
            host_veth: &host_veth,
            addrs,
            routes: prev.routes.iter().map(|r| (r.dst, r.gw)).collect(),
        };
        netsetup::check(&expected).map_err(|why| {
            CniError::new(
                code::CHECK_FAILED,
                "the pod's network is not as ADD left it",
                why,
            )
        })
    }

    // ===== margay-ipam =====

    async fn ipam_add(&self) -> Result<Value, CniError> {
        let ds = self.connect().await?;
        let ips = self.assign(&ds).await?;
        let mut result = CniResult {
            interfaces: Vec::new(),
            ips: ips
                .iter()
                .map(|r| IpConfig {
                    address: netsetup::host_prefix(r.ip),
                    gateway: None,
                    interface: None,
                })
                .collect(),
            routes: Vec::new(),
        };
        if ips.iter().any(|r| r.ip.is_ipv4()) {
            result.routes.push(Route {
                dst: "0.0.0.0/0".parse().expect("valid"),
                gw: None,
            });
        }
        if ips.iter().any(|r| r.ip.is_ipv6()) {
            result.routes.push(Route {
                dst: "::/0".parse().expect("valid"),
                gw: None,
            });
        }
        Ok(result.to_json(self.version))
    }

    async fn ipam_del(&self) -> Result<(), CniError> {
        let work = async {
            let ds = self.connect().await?;
            release(&self.state, &ds.store, &self.node, &self.handle(), &[]).await
        };
        match tokio::time::timeout(DEL_RELEASE_BUDGET, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot release now; recorded as pending");
                self.record_pending(&[], None);
            }
            Err(_) => {
                warn!("the datastore did not answer in time; the release is recorded as pending");
                self.record_pending(&[], None);
            }
        }
        Ok(())
    }

    async fn ipam_check(&self) -> Result<(), CniError> {
        let prev = self.prev_result()?;
        let ds = self.connect().await?;
        let handle = self.handle();
        let h = ds
            .store
            .try_get::<IPAMHandle>(&margay_api::names::handle_name(&handle))
            .await
            .map_err(datastore::store_error)?;
        if h.is_none() {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("handle {handle} holds no addresses"),
                "",
            ));
        }
        let held = self.node_allocations(&ds).await?;
        for ip in prev.ips.iter().map(|c| c.address.addr()) {
            if !held.iter().any(|a| a.ip == ip && a.handle == handle) {
                return Err(CniError::new(
                    code::CHECK_FAILED,
                    format!("{ip} is not allocated to {handle}"),
                    "",
                ));
            }
        }
        Ok(())
    }

    // ===== GC =====

    /// This node's pod allocations.
    async fn node_allocations(&self, ds: &Datastore) -> Result<Vec<NodeAllocation>, CniError> {
        let (blocks, _) = ds
            .store
            .list::<IPAMBlock>()
            .await
            .map_err(datastore::store_error)?;
        let mut out = Vec::new();
        for b in &blocks {
            let Some(cidr) = b.spec.network() else {
                continue;
            };
            for o in 0..b.spec.allocations.len() as u32 {
                let Some(a) = block::owner(&b.spec, o) else {
                    continue;
                };
                let Some(handle) = a.handle_id.as_deref() else {
                    continue;
                };
                if !handle.starts_with(margay_ipam::POD_HANDLE_PREFIX)
                    || a.secondary.get(margay_ipam::attr::NODE) != Some(&self.node)
                {
                    continue;
                }
                out.push(NodeAllocation {
                    ip: block::ip_of(&cidr, o),
                    seq: block::sequence_of(&b.spec, o),
                    handle: handle.to_owned(),
                });
            }
        }
        Ok(out)
    }

    async fn gc(&self) -> Result<(), CniError> {
        let valid = self.conf.gc_attachments().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments",
                "the runtime lists the attachments that are still in use",
            )
        })?;
        let valid_ids: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
        let valid_pairs: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();

        let mut ds = None;
        if self.in_process_ipam() || datastore::mode(&self.conf) == Mode::Etcd {
            ds = Some(self.connect().await?);
        }

        // 1. Records of attachments that are no longer valid.
        let records = self
            .state
            .attachments_all()
            .map_err(|e| io_error("cannot read the attachment records", e))?;
        let (keep, stale): (Vec<AttachmentRecord>, Vec<AttachmentRecord>) = records
            .into_iter()
            .partition(|r| valid_pairs.contains(&(r.container_id.as_str(), r.ifname.as_str())));
        let mut released = 0usize;
        for r in &stale {
            info!(container = %r.container_id, veth = %r.host_veth, "GC: attachment no longer valid");
            if self.kind == PluginType::Main && !keep.iter().any(|k| k.host_veth == r.host_veth) {
                if let Err(e) = netsetup::delete_host_veth(self.node_netns.as_deref(), &r.host_veth)
                {
                    warn!(veth = %r.host_veth, error = %e, "GC: cannot delete the veth");
                }
            }
            if let Some(ds) = &ds {
                if self.in_process_ipam() && r.ipam_type == IPAM_TYPE {
                    release(&self.state, &ds.store, &self.node, &r.handle, &r.ips).await?;
                    released += r.ips.len();
                }
                if let Some(w) = &r.workload_endpoint {
                    datastore::delete_workload_endpoint(&ds.store, w, &r.container_id).await?;
                }
            }
            self.state
                .remove_attachment(&r.container_id, &r.ifname)
                .map_err(|e| io_error("cannot remove an attachment record", e))?;
        }

        // 2. cali* veths that no valid attachment owns.
        if self.kind == PluginType::Main {
            let owned: HashSet<&str> = keep.iter().map(|r| r.host_veth.as_str()).collect();
            let veths = netsetup::host_veths(self.node_netns.as_deref(), self.conf.veth_prefix())
                .map_err(|e| kernel_error("cannot list the host veths", e))?;
            for v in veths.iter().filter(|v| !owned.contains(v.as_str())) {
                info!(veth = %v, "GC: deleting a veth no valid attachment owns");
                if let Err(e) = netsetup::delete_host_veth(self.node_netns.as_deref(), v) {
                    warn!(veth = %v, error = %e, "GC: cannot delete the veth");
                }
            }
        }

        // 3. This node's allocations that no valid attachment holds.
        if let (true, Some(ds)) = (self.in_process_ipam(), &ds) {
            let leaked: Vec<NodeAllocation> = self
                .node_allocations(ds)
                .await?
                .into_iter()
                .filter(|a| {
                    let cid = &a.handle[margay_ipam::POD_HANDLE_PREFIX.len()..];
                    !valid_ids.contains(cid)
                })
                .collect();
            if !leaked.is_empty() {
                let _lock = lock_ipam(&self.state).await?;
                let req: Vec<(IpAddr, Option<u64>)> =
                    leaked.iter().map(|a| (a.ip, a.seq)).collect();
                for a in &leaked {
                    info!(ip = %a.ip, handle = %a.handle, "GC: releasing an address no valid attachment holds");
                }
                allocator(&ds.store, &self.node)
                    .release_ips(&req)
                    .await
                    .map_err(datastore::ipam_error)?;
                released += leaked.len();
            }
        }

        // 4. etcd mode: WorkloadEndpoints of this node that no valid attachment holds.
        if let (Mode::Etcd, Some(ds)) = (datastore::mode(&self.conf), &ds) {
            let (weps, _) = ds
                .store
                .list::<WorkloadEndpoint>()
                .await
                .map_err(datastore::store_error)?;
            for w in weps.iter().filter(|w| {
                w.spec.node == self.node
                    && !valid_pairs
                        .contains(&(w.spec.container_id.as_str(), w.spec.endpoint.as_str()))
            }) {
                if let Some(name) = &w.metadata.name {
                    datastore::delete_workload_endpoint(&ds.store, name, &w.spec.container_id)
                        .await?;
                }
            }
        }
        let swept = self.state.sweep_temporaries(Duration::from_secs(60));
        info!(stale = stale.len(), released, swept, "GC done");
        Ok(())
    }

    // ===== STATUS =====

    async fn status(&self) -> Result<(), CniError> {
        let unavailable =
            |msg: String, details: String| CniError::new(code::NOT_AVAILABLE, msg, details);
        if !self.in_process_ipam() {
            // The delegated IPAM plugin answers for addresses; the datastore matters only for
            // WorkloadEndpoints.
            return Ok(());
        }
        let ds = self
            .connect()
            .await
            .map_err(|e| unavailable("the datastore is unreachable".into(), e.to_string()))?;
        let snap = audit::Snapshot::read(&ds.store)
            .await
            .map_err(|e| unavailable("the datastore is unreachable".into(), e.to_string()))?;
        let labels = ds
            .store
            .try_get::<Node>(&self.node)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default();
        let strict = ds
            .store
            .try_get::<IPAMConfig>(IPAM_CONFIG_NAME)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.spec.strict_affinity);
        let ipam = self.conf.ipam.clone().unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let usage = audit::block_usage(&snap, now);
        let owner = format!("{}{}", margay_api::HOST_AFFINITY_PREFIX, self.node);
        let want_v6 = ipam
            .assign_ipv6
            .map(|b| b.get())
            .unwrap_or(!ipam.ipv6_pools.is_empty());
        let mut families = Vec::new();
        if ipam.assign_ipv4.map(|b| b.get()).unwrap_or(true) {
            families.push((margay_ipam::Family::V4, &ipam.ipv4_pools));
        }
        if want_v6 {
            families.push((margay_ipam::Family::V6, &ipam.ipv6_pools));
        }
        for (fam, requested) in families {
            let pools = pool::select(
                &snap.pools,
                fam,
                AddressUse::Workload,
                &self.node,
                &labels,
                requested,
                strict,
            )
            .map_err(|e| {
                unavailable(
                    format!("no {fam} pool serves node {}", self.node),
                    e.to_string(),
                )
            })?;
            let room = pools.iter().any(|p| {
                let blocks: Vec<_> = usage.iter().filter(|b| p.net.contains(&b.cidr)).collect();
                blocks
                    .iter()
                    .any(|b| b.owner.as_deref() == Some(owner.as_str()) && b.available > 0)
                    || (blocks.len() as u128) < p.block_count()
                    || (!p.strict_affinity && blocks.iter().any(|b| b.available > 0))
            });
            if !room {
                return Err(unavailable(
                    format!("no {fam} pool has room for node {}", self.node),
                    pools
                        .iter()
                        .map(|p| p.label())
                        .collect::<Vec<_>>()
                        .join(", "),
                ));
            }
        }
        Ok(())
    }
}

/// One of this node's pod allocations, as GC sees it.
#[derive(Debug, Clone)]
struct NodeAllocation {
    ip: IpAddr,
    seq: Option<u64>,
    handle: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> (Option<Value>, i32) {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run(PluginType::Main, |k| m.get(k).cloned(), stdin.as_bytes())
    }

    #[test]
    fn version_answers_without_configuration() {
        let (out, rc) = run_with(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(rc, 0);
        assert_eq!(out.unwrap(), version_info());
    }

    #[test]
    fn errors_carry_the_request_version_when_supported() {
        let (out, rc) = run_with(
            &[("CNI_COMMAND", "FOO")],
            r#"{"cniVersion":"0.4.0","name":"n","type":"margay"}"#,
        );
        assert_eq!(rc, 1);
        let out = out.unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["code"], code::INVALID_ENVIRONMENT);
        let (out, _) = run_with(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"1.0.0","name":"n","type":"margay"}"#,
        );
        assert_eq!(out.unwrap()["code"], code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn results_name_both_ends_and_the_routes() {
        let r = attachment_result(
            "cali0123456789a",
            "eth0",
            "/var/run/netns/p",
            Some("02:00:00:00:00:01".into()),
            1450,
            &[
                "10.0.0.5/32".parse().unwrap(),
                "fd00::5/128".parse().unwrap(),
            ],
        );
        let v = r.to_json(Version(1, 1, 0));
        assert_eq!(v["interfaces"][0]["name"], "cali0123456789a");
        assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["routes"][0]["gw"], "169.254.1.1");
        assert_eq!(v["routes"][1]["gw"], "fe80::ecee:eeff:feee:eeee");
        let old = r.to_json(Version(0, 3, 0));
        assert_eq!(old["ips"][1]["version"], "6");
    }
}
