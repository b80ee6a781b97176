//! The embedding API and the speaker task that owns the RIB.
//!
//! One task owns the route table and every peer's Adj-RIB-Out, like BIRD's main
//! loop: sessions hand it decoded routes, it runs policy and the decision process,
//! and it fills each established peer's writer only while that writer's queue is
//! under a high-water mark. A peer that reads slowly falls behind in the change
//! journal (bounded: past a limit it resyncs with a table walk) and never holds up
//! the others. Peers in sync with the same export settings share an update group
//! (`rib::group`): one Adj-RIB-Out and one encoding per batch for all of them; a
//! member whose writer stays full for [`SPLIT_AFTER`] leaves its group.
//!
//! That task runs on a thread of its own (with a current-thread runtime for its
//! timers), while sessions, their readers and writers stay on the embedder's
//! runtime. On a shared runtime a task woken by another runs next on the waker's
//! worker (tokio's LIFO slot), so a reader, its session and the speaker ran on one
//! core in turn: decoding, table work and encoding never overlapped. Apart, UPDATEs
//! are decoded and written while the table works (`bgp/bench` propagate: up to a
//! sixth less time on two cores).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use margay_bgp_wire::{Families, Family, Message, Notification, Prefix, Update};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn};

use crate::config::{ConfigError, PeerConfig, SpeakerConfig};
use crate::fsm::{cease, DownReason, Negotiated};
use crate::rib::attrs::next_hop_addr;
use crate::rib::graceful::{GrAction, GrHelper};
use crate::rib::group::{collect_group, GroupOut, NO_PEER};
use crate::rib::policy::{CommunityText, Outcome};
use crate::rib::refresh::{RefreshAction, RefreshState};
use crate::rib::table::{EntryId, Seq};
use crate::rib::{
    collect, encode, export::import_check, AdjRibOut, ExportCtx, ImportCtx, PathAttrs, PeerIdx,
    Rib, RouteUpdate, Source, SourceKind, LOCAL,
};
use crate::session::{
    self, PeerEvent, PeerStats, SessionCmd, SessionParams, SessionStatus, UpdateSink,
};

/// Prefix changes looked at per fill step for one peer.
const FILL_BUDGET: usize = 4096;
/// Journal records kept for laggards before they are made to resync.
const JOURNAL_LIMIT: u64 = 4 << 20;
/// How long an update group waits for members whose writers are full before it
/// goes on without them (they leave the group and continue on their own).
const SPLIT_AFTER: Duration = Duration::from_millis(500);
/// How long a member that left its group for reading slowly stays out of groups; it
/// doubles with each such exit of the session, up to [`REGROUP_HOLD_MAX`].
const REGROUP_HOLD: Duration = Duration::from_secs(10);
const REGROUP_HOLD_MAX: Duration = Duration::from_secs(300);

/// Errors of the embedding API.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("peer {0} already exists; use update_peer to change it")]
    PeerExists(IpAddr),
    #[error("no peer {0} is configured")]
    NoSuchPeer(IpAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the TCP-MD5 key for {peer} on the listener: {source}")]
    Md5 {
        peer: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the speaker has stopped")]
    Stopped,
    #[error("cannot start the speaker's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where a best route came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RouteOrigin {
    Local,
    Peer { address: IpAddr, ebgp: bool },
}

/// A best route as the embedder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestRoute {
    /// Next hops of the ECMP set (one without multipath); empty for local routes.
    pub next_hops: Vec<IpAddr>,
    pub attrs: Arc<PathAttrs>,
    pub origin: RouteOrigin,
}

/// One prefix's best route changed; `None` means it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestRouteChange {
    pub prefix: Prefix,
    pub best: Option<BestRoute>,
}

/// The stream of best-route changes, in batches.
pub struct BestRouteStream {
    rx: mpsc::Receiver<Vec<BestRouteChange>>,
}

impl BestRouteStream {
    /// The next batch; `None` once the speaker has stopped.
    pub async fn recv(&mut self) -> Option<Vec<BestRouteChange>> {
        self.rx.recv().await
    }
}

/// A peer's status, for `margayctl bgp peers` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub asn: u32,
    pub description: String,
    pub ebgp: bool,
    pub rr_client: bool,
    /// The session state (RFC 4271 §8.2.2); in JSON its name, e.g. `"Established"`.
    pub state: crate::fsm::State,
    /// Unix seconds of the last state change.
    pub since: u64,
    pub last_error: Option<String>,
    pub router_id: Option<String>,
    pub local_address: Option<String>,
    pub hold_time: Option<u16>,
    pub families: Vec<String>,
    pub graceful_restart: bool,
    /// Both sides use 4-octet AS numbers (RFC 6793); false for a 2-octet peer.
    pub four_octet_as: bool,
    /// Prefixes received in UPDATEs (announcements and withdrawals).
    pub prefixes_received: u64,
    /// Paths held after import policy.
    pub prefixes_accepted: usize,
    /// Prefixes in the Adj-RIB-Out.
    pub prefixes_advertised: usize,
    /// The update group the peer is in (peers sent the same UPDATEs share one);
    /// none while it catches up on its own.
    #[serde(default)]
    pub update_group: Option<usize>,
    /// Stale paths kept for a restarting peer.
    pub prefixes_stale: usize,
    /// Messages by type: open, update, notification, keepalive, route-refresh.
    pub messages_received: MessageCounts,
    pub messages_sent: MessageCounts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessageCounts {
    pub open: u64,
    pub update: u64,
    pub notification: u64,
    pub keepalive: u64,
    pub route_refresh: u64,
}

impl MessageCounts {
    fn of(c: &[AtomicU64; 6]) -> Self {
        let g = |i: usize| c[i].load(Ordering::Relaxed);
        Self {
            open: g(1),
            update: g(2),
            notification: g(3),
            keepalive: g(4),
            route_refresh: g(5),
        }
    }
}

/// One path of a prefix, for `margayctl bgp routes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStatus {
    pub best: bool,
    pub multipath: bool,
    pub from: String,
    pub next_hop: Option<String>,
    pub as_path: String,
    pub origin: String,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub communities: Vec<String>,
    pub large_communities: Vec<String>,
    pub originator_id: Option<String>,
    pub cluster_list: Vec<String>,
    pub stale: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteStatus {
    pub prefix: String,
    pub paths: Vec<PathStatus>,
}

/// Latency histogram of UPDATE processing (decoded → table updated), in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; 10],
    pub sum_micros: AtomicU64,
    pub count: AtomicU64,
}

impl Histogram {
    pub const BOUNDS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in Self::BOUNDS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Speaker-wide metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub update_latency: Histogram,
}

enum Command {
    Announce(Prefix, PathAttrs),
    Withdraw(Prefix),
    AddPeer(PeerConfig, oneshot::Sender<Result<(), SpeakerError>>),
    UpdatePeer(PeerConfig, oneshot::Sender<Result<(), SpeakerError>>),
    RemovePeer(IpAddr, oneshot::Sender<Result<(), SpeakerError>>),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    Routes(Option<Prefix>, oneshot::Sender<Vec<RouteStatus>>),
    RequestRefresh(IpAddr, oneshot::Sender<Result<(), SpeakerError>>),
    Shutdown(String, oneshot::Sender<()>),
    Stop(String, oneshot::Sender<()>),
}

/// The handle embedders hold. Cheap to clone.
#[derive(Clone)]
pub struct SpeakerHandle {
    tx: mpsc::UnboundedSender<Command>,
    metrics: Arc<Metrics>,
}

impl SpeakerHandle {
    fn send(&self, c: Command) -> Result<(), SpeakerError> {
        self.tx.send(c).map_err(|_| SpeakerError::Stopped)
    }

    async fn ask<T>(
        &self,
        f: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(f(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Originates `prefix` with `attrs` (a `None` next hop means ourselves).
    pub fn announce(&self, prefix: Prefix, attrs: PathAttrs) -> Result<(), SpeakerError> {
        self.send(Command::Announce(prefix, attrs))
    }

    pub fn withdraw(&self, prefix: Prefix) -> Result<(), SpeakerError> {
        self.send(Command::Withdraw(prefix))
    }

    pub async fn add_peer(&self, peer: PeerConfig) -> Result<(), SpeakerError> {
        self.ask(|tx| Command::AddPeer(peer, tx)).await?
    }

    /// Changes a peer. Policy, max-prefix and description changes apply without a
    /// reset (import changes ask the peer for a ROUTE-REFRESH, export changes resend
    /// the difference); anything else restarts that one session.
    pub async fn update_peer(&self, peer: PeerConfig) -> Result<(), SpeakerError> {
        self.ask(|tx| Command::UpdatePeer(peer, tx)).await?
    }

    /// Removes a peer, closing its session with Cease/Peer De-configured.
    pub async fn remove_peer(&self, address: IpAddr) -> Result<(), SpeakerError> {
        self.ask(|tx| Command::RemovePeer(address, tx)).await?
    }

    pub async fn peers(&self) -> Result<Vec<PeerStatus>, SpeakerError> {
        self.ask(Command::Peers).await
    }

    /// Every prefix with its paths, or only `prefix`.
    pub async fn routes(&self, prefix: Option<Prefix>) -> Result<Vec<RouteStatus>, SpeakerError> {
        self.ask(|tx| Command::Routes(prefix, tx)).await
    }

    /// Asks the peer to resend its routes (ROUTE-REFRESH, RFC 2918).
    pub async fn request_refresh(&self, address: IpAddr) -> Result<(), SpeakerError> {
        self.ask(|tx| Command::RequestRefresh(address, tx)).await?
    }

    /// Closes every session with Cease/Administrative Shutdown carrying `message`
    /// (RFC 9003) and returns once the NOTIFICATIONs are flushed.
    pub async fn shutdown(&self, message: &str) -> Result<(), SpeakerError> {
        let m = message.to_owned();
        self.ask(|tx| Command::Shutdown(m, tx)).await
    }

    /// Closes every session as [`shutdown`](Self::shutdown) does, then ends the speaker: its
    /// listeners are closed (their ports free again), its best-route streams end, and every
    /// later call returns [`SpeakerError::Stopped`].
    pub async fn stop(&self, message: &str) -> Result<(), SpeakerError> {
        let m = message.to_owned();
        self.ask(|tx| Command::Stop(m, tx)).await
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

/// Entry point.
pub struct Speaker;

impl Speaker {
    /// Validates `config`, binds its listeners and starts the speaker task.
    pub async fn start(
        config: SpeakerConfig,
    ) -> Result<(SpeakerHandle, BestRouteStream), SpeakerError> {
        config.validate()?;
        let registry: Registry = Arc::new(Mutex::new(HashMap::new()));
        let mut listeners = Vec::new();
        for addr in &config.listen {
            // An IPv6 wildcard beside an IPv4 listener on its port takes IPv6 only.
            let v6_only = addr.is_ipv6()
                && config
                    .listen
                    .iter()
                    .any(|o| o.is_ipv4() && o.port() == addr.port());
            let l = bind_listener(*addr, v6_only).map_err(|source| SpeakerError::Listen {
                addr: *addr,
                source,
            })?;
            let l = Arc::new(l);
            let h = tokio::spawn(accept_loop(l.clone(), registry.clone()));
            listeners.push((l, h));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let (gr_tx, gr_rx) = mpsc::unbounded_channel();
        let (best_tx, best_rx) = mpsc::channel(64);
        let metrics = Arc::new(Metrics::default());
        let mut rib = Rib::new(config.router_id);
        rib.multipath = config.multipath;
        let deferral = (config.restarting && config.graceful_restart.is_some()).then(|| {
            let t = config
                .graceful_restart
                .as_ref()
                .map(|g| g.restart_time)
                .unwrap_or(120);
            Instant::now() + Duration::from_secs(u64::from(t.max(1)))
        });
        let accepting: Vec<_> = listeners.iter().map(|(_, h)| h.abort_handle()).collect();
        let task = SpeakerTask {
            cfg: config,
            rib,
            peers: HashMap::new(),
            slots: vec![None],
            groups: Vec::new(),
            cmd_rx: rx,
            ev_rx,
            ev_tx,
            wake_rx,
            wake_tx,
            gr_rx,
            gr_tx,
            subscriber: Some(Subscriber {
                tx: best_tx,
                cursor: 0,
                walk: None,
            }),
            registry,
            listeners,
            metrics: metrics.clone(),
            deferral,
            sessions: tokio::runtime::Handle::current(),
        };
        // The runtime is built on the thread: one dropped in an async context (this
        // function's, on an error) would panic.
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("bgp-speaker".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt.block_on(task.run());
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        let started = match spawned {
            Err(e) => Err(SpeakerError::Thread(e)),
            Ok(_) => match ready_rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SpeakerError::Thread(e)),
                Err(_) => Err(SpeakerError::Stopped),
            },
        };
        if let Err(e) = started {
            accepting.iter().for_each(|a| a.abort());
            return Err(e);
        }
        Ok((
            SpeakerHandle { tx, metrics },
            BestRouteStream { rx: best_rx },
        ))
    }
}

type Registry = Arc<Mutex<HashMap<IpAddr, mpsc::UnboundedSender<SessionCmd>>>>;

fn bind_listener(addr: SocketAddr, v6_only: bool) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if v6_only {
        crate::sockopt::set_v6_only(&sock, true)?;
    }
    // TTL 255 on the handshake and the SYN kept, for peers with TTL security.
    crate::sockopt::prepare_listener(&sock)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn accept_loop(l: Arc<TcpListener>, registry: Registry) {
    loop {
        match l.accept().await {
            Ok((stream, from)) => {
                let peer = canonical(from.ip());
                let target = registry.lock().ok().and_then(|r| r.get(&peer).cloned());
                match target {
                    Some(tx) => {
                        let _ = tx.send(SessionCmd::Inbound(stream));
                    }
                    None => debug!(%from, "connection from an unconfigured address; closed"),
                }
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Subscriber {
    tx: mpsc::Sender<Vec<BestRouteChange>>,
    cursor: Seq,
    walk: Option<EntryId>,
}

struct UpState {
    negotiated: Box<Negotiated>,
    export: ExportCtx,
    out: Out,
    sink: UpdateSink,
    eor_sent: bool,
    /// End-of-RIB received from the peer (for the restarting speaker's deferral).
    eor_received: Families,
    /// Route refresh answers owed and awaited (RFC 7313 markers).
    refresh: RefreshState,
    /// Times this session left an update group for reading too slowly, and when it
    /// may join one again (a hold-down that doubles each time, so a slow reader does
    /// not stall a group at every burst).
    slow_splits: u32,
    regroup_after: Option<Instant>,
}

/// Where a peer's Adj-RIB-Out lives.
enum Out {
    /// Its own (a new session's table walk, or a peer with no group).
    Solo(AdjRibOut),
    /// In update group `groups[i]`.
    Member(usize),
}

/// Peers sent the same UPDATEs: one Adj-RIB-Out, each batch encoded once
/// (`rib::group`).
struct Group {
    /// The members' export context with `peer` [`NO_PEER`].
    export: ExportCtx,
    /// The members' codec context.
    ctx: margay_bgp_wire::Context,
    out: GroupOut,
    members: Vec<PeerIdx>,
    /// Since when some member's writer has been full.
    blocked_since: Option<Instant>,
}

struct PeerSlot {
    config: PeerConfig,
    cmd: mpsc::UnboundedSender<SessionCmd>,
    task: JoinHandle<()>,
    status: Arc<Mutex<SessionStatus>>,
    stats: Arc<PeerStats>,
    epoch: u64,
    up: Option<UpState>,
    gr: GrHelper,
    /// The peer's GR capability on the last established session.
    last_gr: Option<margay_bgp_wire::GracefulRestart>,
    gr_timer: Option<JoinHandle<()>>,
    gr_gen: u64,
}

struct SpeakerTask {
    cfg: SpeakerConfig,
    rib: Rib,
    peers: HashMap<IpAddr, PeerIdx>,
    slots: Vec<Option<PeerSlot>>,
    groups: Vec<Option<Group>>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    ev_rx: mpsc::Receiver<PeerEvent>,
    ev_tx: mpsc::Sender<PeerEvent>,
    wake_rx: mpsc::UnboundedReceiver<PeerIdx>,
    wake_tx: mpsc::UnboundedSender<PeerIdx>,
    gr_rx: mpsc::UnboundedReceiver<(PeerIdx, u64)>,
    gr_tx: mpsc::UnboundedSender<(PeerIdx, u64)>,
    subscriber: Option<Subscriber>,
    registry: Registry,
    listeners: Vec<(Arc<TcpListener>, JoinHandle<()>)>,
    metrics: Arc<Metrics>,
    /// While restarting (RFC 4724 §4.1): no advertisements until peers sent
    /// End-of-RIB, or this deadline.
    deferral: Option<Instant>,
    /// The embedder's runtime, where sessions run (the speaker has its own thread).
    sessions: tokio::runtime::Handle,
}

// ===== impl SpeakerTask =====

impl SpeakerTask {
    async fn run(mut self) {
        let span = info_span!("bgp_speaker", asn = self.cfg.asn, router_id = %self.cfg.router_id);
        let _enter = span.enter();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopped = None;
        loop {
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Stop(message, done)) => {
                        // Nothing is taken after this; the sessions' NOTIFICATIONs are
                        // flushed before the listeners close.
                        self.cmd_rx.close();
                        for w in self.stop_sessions(&message) {
                            // A session that does not confirm in time is dropped with the task.
                            if tokio::time::timeout(Duration::from_secs(5), w).await.is_err() {
                                debug!("a session did not confirm its stop in time");
                            }
                        }
                        stopped = Some(done);
                        break;
                    }
                    Some(c) => self.command(c),
                    None => break,
                },
                Some(ev) = self.ev_rx.recv() => {
                    // Take what else is waiting before sending anything (batching),
                    // but only about one fill step's worth: peers then receive the
                    // first routes while the speaker works on the rest.
                    let mut n = self.event(ev);
                    while n < FILL_BUDGET {
                        match self.ev_rx.try_recv() {
                            Ok(ev) => n += self.event(ev),
                            Err(_) => break,
                        }
                    }
                }
                Some(_) = self.wake_rx.recv() => {}
                Some((idx, gen)) = self.gr_rx.recv() => self.gr_timer(idx, gen),
                _ = tick.tick() => {
                    self.check_deferral();
                    self.check_refresh_deadlines();
                    self.pump();
                    self.regroup();
                }
            }
            self.pump();
        }
        for (_, h) in self.listeners.drain(..) {
            h.abort();
        }
        if let Some(done) = stopped {
            // The caller may have stopped waiting; nothing else to tell.
            drop(self);
            done.send(()).ok();
        }
    }

    /// Tells every session to close with Cease/Administrative Shutdown; the receivers fire as
    /// each has flushed its NOTIFICATION.
    fn stop_sessions(&self, message: &str) -> Vec<oneshot::Receiver<()>> {
        let mut waits = Vec::new();
        for s in self.slots.iter().flatten() {
            let (dtx, drx) = oneshot::channel();
            // A session whose task has ended has nothing to close.
            if s.cmd
                .send(SessionCmd::Stop {
                    message: message.to_owned(),
                    done: Some(dtx),
                })
                .is_ok()
            {
                waits.push(drx);
            }
        }
        waits
    }

    fn slot(&mut self, idx: PeerIdx) -> Option<&mut PeerSlot> {
        self.slots.get_mut(idx as usize).and_then(|s| s.as_mut())
    }

    // ----- commands -----

    fn command(&mut self, c: Command) {
        match c {
            Command::Announce(p, a) => {
                self.rib.update(LOCAL, p, Some(Arc::new(a)));
            }
            Command::Withdraw(p) => {
                self.rib.update(LOCAL, p, None);
            }
            Command::AddPeer(p, tx) => {
                let _ = tx.send(self.add_peer(p));
            }
            Command::UpdatePeer(p, tx) => {
                let _ = tx.send(self.update_peer(p));
            }
            Command::RemovePeer(a, tx) => {
                let _ = tx.send(self.remove_peer(a, "peer removed from the configuration"));
            }
            Command::Peers(tx) => {
                let _ = tx.send(self.peer_status());
            }
            Command::Routes(p, tx) => {
                let _ = tx.send(self.route_status(p));
            }
            Command::RequestRefresh(a, tx) => {
                let r = match self.peers.get(&a).copied() {
                    None => Err(SpeakerError::NoSuchPeer(a)),
                    Some(idx) => {
                        if let Some(s) = self.slot(idx) {
                            for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
                                let _ = s.cmd.send(SessionCmd::RequestRefresh(f));
                            }
                        }
                        Ok(())
                    }
                };
                let _ = tx.send(r);
            }
            // Taken by `run`, which ends the task, before it gets here.
            Command::Stop(_, done) => drop(done),
            Command::Shutdown(message, tx) => {
                let waits = self.stop_sessions(&message);
                tokio::spawn(async move {
                    for w in waits {
                        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
                    }
                    let _ = tx.send(());
                });
            }
        }
    }

    fn set_listener_md5(&self, peer: IpAddr, key: Option<&str>) -> Result<(), SpeakerError> {
        for (l, _) in &self.listeners {
            let v6 = l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
            if peer.is_ipv6() && !v6 {
                continue;
            }
            crate::sockopt::set_md5(l.as_ref(), peer, key.map(str::as_bytes))
                .map_err(|source| SpeakerError::Md5 { peer, source })?;
        }
        Ok(())
    }

    fn add_peer(&mut self, p: PeerConfig) -> Result<(), SpeakerError> {
        p.validate(&self.cfg)?;
        if self.peers.contains_key(&p.address) {
            return Err(SpeakerError::PeerExists(p.address));
        }
        if p.md5_password.is_some() {
            self.set_listener_md5(p.address, p.md5_password.as_deref())?;
        }
        let idx = self.slots.len() as PeerIdx;
        let status = Arc::new(Mutex::new(SessionStatus::default()));
        let stats = Arc::new(PeerStats::default());
        let _on_embedder_runtime = self.sessions.enter();
        let (cmd, task) = session::spawn(SessionParams {
            idx,
            peer: p.clone(),
            speaker: self.cfg.clone(),
            events: self.ev_tx.clone(),
            wake: self.wake_tx.clone(),
            status: status.clone(),
            stats: stats.clone(),
        });
        if !p.shutdown {
            let _ = cmd.send(SessionCmd::Start);
        }
        if let Ok(mut r) = self.registry.lock() {
            r.insert(p.address, cmd.clone());
        }
        info!(peer = %p.address, asn = p.asn, "peer added");
        self.peers.insert(p.address, idx);
        self.slots.push(Some(PeerSlot {
            config: p,
            cmd,
            task,
            status,
            stats,
            epoch: 0,
            up: None,
            gr: GrHelper::default(),
            last_gr: None,
            gr_timer: None,
            gr_gen: 0,
        }));
        Ok(())
    }

    fn remove_peer(&mut self, addr: IpAddr, why: &str) -> Result<(), SpeakerError> {
        let idx = self
            .peers
            .remove(&addr)
            .ok_or(SpeakerError::NoSuchPeer(addr))?;
        if let Ok(mut r) = self.registry.lock() {
            r.remove(&addr);
        }
        self.end_session(idx);
        if let Some(slot) = self.slots[idx as usize].take() {
            let _ = slot.cmd.send(SessionCmd::Stop {
                message: why.to_owned(),
                done: None,
            });
            if let Some(t) = slot.gr_timer {
                t.abort();
            }
            if slot.config.md5_password.is_some() {
                let _ = self.set_listener_md5(addr, None);
            }
            // Dropping `cmd` ends the session task after the stop.
            drop(slot.task);
        }
        self.rib.remove_source(idx);
        info!(peer = %addr, "peer removed");
        Ok(())
    }

    fn update_peer(&mut self, p: PeerConfig) -> Result<(), SpeakerError> {
        p.validate(&self.cfg)?;
        let idx = *self
            .peers
            .get(&p.address)
            .ok_or(SpeakerError::NoSuchPeer(p.address))?;
        let Some(slot) = self.slots[idx as usize].as_mut() else {
            return Err(SpeakerError::NoSuchPeer(p.address));
        };
        let old = slot.config.clone();
        let mut soft = p.clone();
        soft.import = old.import.clone();
        soft.export = old.export.clone();
        soft.max_prefixes = old.max_prefixes;
        soft.description = old.description.clone();
        if soft != old {
            // A session parameter changed: restart this session only.
            self.remove_peer(p.address, "configuration changed")?;
            return self.add_peer(p);
        }
        let import_changed = p.import != old.import;
        let export_changed = p.export != old.export;
        slot.config = p.clone();
        if export_changed && slot.up.is_some() {
            if let Some(up) = self.slots[idx as usize]
                .as_mut()
                .and_then(|s| s.up.as_mut())
            {
                up.export.policy = Arc::new(p.export.clone());
            }
            if let Some((rib, out)) = self.own_out(idx) {
                out.resync(rib);
            }
        }
        let Some(slot) = self.slots[idx as usize].as_mut() else {
            return Err(SpeakerError::NoSuchPeer(p.address));
        };
        if import_changed {
            let rr = slot.up.as_ref().map(|u| u.negotiated.peer_route_refresh);
            match rr {
                Some(true) => {
                    for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
                        let _ = slot.cmd.send(SessionCmd::RequestRefresh(f));
                    }
                }
                Some(false) => {
                    // Without route refresh the only way to see the routes again.
                    let _ = slot
                        .cmd
                        .send(SessionCmd::AutomaticStop(Notification::shutdown(
                            cease::ADMINISTRATIVE_RESET,
                            "import policy changed",
                        )));
                }
                None => {}
            }
        }
        self.check_max_prefixes(idx);
        Ok(())
    }

    // ----- session events -----

    /// Handles a session event; returns its weight for batching (prefixes carried,
    /// at least 1).
    fn event(&mut self, ev: PeerEvent) -> usize {
        let weight = match &ev {
            PeerEvent::Routes { update, .. } => update.prefix_count().max(1),
            _ => 1,
        };
        match ev {
            PeerEvent::Up {
                idx,
                epoch,
                negotiated,
                local,
                sink,
            } => self.peer_up(idx, epoch, negotiated, local, sink),
            PeerEvent::Down { idx, epoch, reason } => self.peer_down(idx, epoch, reason),
            PeerEvent::Routes {
                idx,
                epoch,
                update,
                at,
            } => {
                if self
                    .slot(idx)
                    .is_some_and(|s| s.epoch == epoch && s.up.is_some())
                {
                    self.routes(idx, update);
                    self.metrics.update_latency.observe(at.elapsed());
                }
            }
            PeerEvent::RouteRefresh {
                idx,
                epoch,
                family,
                subtype,
            } => self.route_refresh(idx, epoch, family, subtype),
        }
        weight
    }

    /// A ROUTE-REFRESH request or RFC 7313 marker from the peer.
    fn route_refresh(&mut self, idx: PeerIdx, epoch: u64, family: Family, subtype: u8) {
        let now = Instant::now();
        let Some(s) = self.slot(idx).filter(|s| s.epoch == epoch) else {
            return;
        };
        let peer = s.config.address;
        let Some(up) = s.up.as_mut() else { return };
        match up.refresh.received(family, subtype, now) {
            Ok(actions) => {
                debug!(%peer, ?family, subtype, "route refresh");
                self.apply_refresh(idx, actions);
            }
            Err(why) => info!(%peer, subtype, "route refresh message ignored: {why}"),
        }
    }

    fn apply_refresh(&mut self, idx: PeerIdx, actions: Vec<RefreshAction>) {
        for a in actions {
            match a {
                RefreshAction::Send(f, subtype) => {
                    let Some(up) = self.slot(idx).and_then(|s| s.up.as_mut()) else {
                        return;
                    };
                    let m = Message::RouteRefresh(margay_bgp_wire::RouteRefresh::new(f, subtype));
                    match m.to_bytes(&up.negotiated.ctx) {
                        Ok(b) => {
                            up.sink.send(b);
                        }
                        Err(e) => warn!(peer = idx, error = %e, "cannot encode ROUTE-REFRESH"),
                    }
                }
                RefreshAction::Walk(f) => {
                    // The answer is this peer's own walk, not its group's stream.
                    if let Some((rib, out)) = self.own_out(idx) {
                        out.refresh(rib, f);
                    }
                }
                RefreshAction::MarkStale(f) => {
                    let n = self.rib.mark_refresh_stale(idx, f);
                    debug!(peer = idx, ?f, stale = n, "route refresh begins (BoRR)");
                }
                RefreshAction::Sweep(f) => {
                    let n = self.rib.sweep_refresh_stale(idx, f);
                    info!(
                        peer = idx,
                        ?f,
                        swept = n,
                        "route refresh ended; routes not re-sent removed"
                    );
                }
            }
        }
    }

    /// Ends refreshes whose EoRR did not come in time (RFC 7313 §4).
    fn check_refresh_deadlines(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Some(up) = self.slots[i].as_mut().and_then(|s| s.up.as_mut()) else {
                continue;
            };
            let a = up.refresh.expired(now);
            if !a.is_empty() {
                warn!(
                    peer = i,
                    "no EoRR within {:?} of the BoRR",
                    crate::rib::refresh::EORR_WAIT
                );
                self.apply_refresh(i as PeerIdx, a);
            }
        }
    }

    fn peer_up(
        &mut self,
        idx: PeerIdx,
        epoch: u64,
        n: Box<Negotiated>,
        local: SocketAddr,
        sink: UpdateSink,
    ) {
        let cfg = self.cfg.clone();
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        let p = &slot.config;
        let ebgp = p.asn != cfg.asn;
        self.rib.set_source(
            idx,
            Source {
                kind: if ebgp {
                    SourceKind::Ebgp
                } else {
                    SourceKind::Ibgp
                },
                router_id: n.peer_id,
                addr: p.address,
                rr_client: p.rr_client,
            },
        );
        let local_ip = canonical(local.ip());
        let self_v4 = p.next_hop_v4.or(match local_ip {
            IpAddr::V4(a) => Some(a),
            _ => None,
        });
        let self_v6 = p.next_hop_v6.or(match local_ip {
            IpAddr::V6(a) if !a.is_unicast_link_local() => Some(a),
            _ => None,
        });
        let export = ExportCtx {
            peer: idx,
            ebgp,
            rr_client: p.rr_client,
            local_asn: cfg.asn,
            router_id: cfg.router_id,
            cluster_id: cfg.cluster_id(),
            next_hop: p.next_hop,
            self_v4,
            self_v6,
            families: n.families,
            extended_next_hop_v4: n.ctx.extended_next_hop.ipv4_unicast,
            policy: Arc::new(p.export.clone()),
        };
        slot.epoch = epoch;
        slot.last_gr = n.peer_graceful_restart.clone();
        let gr = slot.gr.session_up(n.peer_graceful_restart.as_ref());
        let refresh = RefreshState::new(n.enhanced_route_refresh, n.families);
        slot.up = Some(UpState {
            out: Out::Solo(AdjRibOut::new(&self.rib)),
            negotiated: n,
            export,
            sink,
            eor_sent: false,
            eor_received: Families::NONE,
            refresh,
            slow_splits: 0,
            regroup_after: None,
        });
        self.apply_gr(idx, gr);
    }

    fn peer_down(&mut self, idx: PeerIdx, epoch: u64, reason: DownReason) {
        if self.slot(idx).is_none_or(|s| s.epoch != epoch) {
            return;
        }
        self.end_session(idx);
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        let gr = slot
            .gr
            .session_down(reason.allows_graceful_restart(), slot.last_gr.as_ref());
        self.apply_gr(idx, gr);
    }

    fn apply_gr(&mut self, idx: PeerIdx, actions: Vec<GrAction>) {
        for a in actions {
            match a {
                GrAction::MarkStale => {
                    let n = self.rib.mark_stale(idx);
                    info!(
                        peer = idx,
                        stale = n,
                        "graceful restart: keeping routes as stale"
                    );
                }
                GrAction::RemoveAll => {
                    self.rib.remove_source(idx);
                }
                GrAction::Sweep(f) => {
                    let n = self.rib.sweep_stale(idx, f);
                    if n > 0 {
                        info!(
                            peer = idx,
                            swept = n,
                            "graceful restart: stale routes removed"
                        );
                    }
                }
                GrAction::StartTimer(d) => {
                    let tx = self.gr_tx.clone();
                    if let Some(s) = self.slot(idx) {
                        s.gr_gen += 1;
                        let gen = s.gr_gen;
                        if let Some(t) = s.gr_timer.take() {
                            t.abort();
                        }
                        s.gr_timer = Some(tokio::spawn(async move {
                            tokio::time::sleep(d).await;
                            let _ = tx.send((idx, gen));
                        }));
                    }
                }
                GrAction::StopTimer => {
                    if let Some(s) = self.slot(idx) {
                        s.gr_gen += 1;
                        if let Some(t) = s.gr_timer.take() {
                            t.abort();
                        }
                    }
                }
            }
        }
    }

    fn gr_timer(&mut self, idx: PeerIdx, gen: u64) {
        let Some(s) = self.slot(idx) else { return };
        if s.gr_gen != gen {
            return;
        }
        let a = s.gr.timer_expired();
        self.apply_gr(idx, a);
    }

    fn routes(&mut self, idx: PeerIdx, u: RouteUpdate) {
        let cfg = &self.cfg;
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        let ictx = ImportCtx {
            ebgp: slot.config.asn != cfg.asn,
            local_asn: cfg.asn,
            router_id: cfg.router_id,
            cluster_id: cfg.cluster_id(),
        };
        let families = slot
            .up
            .as_ref()
            .map(|u| u.negotiated.families)
            .unwrap_or(Families::NONE);
        let policy = &slot.config.import;
        let plain =
            policy.rules.is_empty() && policy.default == crate::rib::policy::Verdict::Accept;
        self.rib.update_many(idx, &u.withdrawn, |_| None);
        for (attrs, prefixes) in &u.announced {
            let ok = import_check(&ictx, attrs).is_ok();
            let mut cache: HashMap<Outcome, Option<Arc<PathAttrs>>> = HashMap::new();
            self.rib.update_many(idx, prefixes, |p| {
                if !ok || !families.contains(p.family()) {
                    None
                } else if plain {
                    Some(attrs.clone())
                } else {
                    let o = policy.evaluate(p, attrs);
                    cache
                        .entry(o)
                        .or_insert_with(|| policy.apply(o, attrs))
                        .clone()
                }
            });
        }
        if let Some(f) = u.end_of_rib {
            debug!(peer = idx, ?f, "End-of-RIB received");
            if let Some(up) = slot.up.as_mut() {
                up.eor_received.insert(f);
            }
            let a = slot.gr.end_of_rib(f);
            self.apply_gr(idx, a);
            self.check_deferral();
        }
        self.check_max_prefixes(idx);
    }

    fn check_max_prefixes(&mut self, idx: PeerIdx) {
        let count = self.rib.count(idx);
        let over = self.slot(idx).is_some_and(|s| {
            s.up.is_some()
                && s.config
                    .max_prefixes
                    .is_some_and(|m| count as u64 > u64::from(m))
        });
        if !over {
            return;
        }
        // Nothing more from this session counts.
        self.end_session(idx);
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) else {
            return;
        };
        let Some(max) = slot.config.max_prefixes else {
            return;
        };
        warn!(peer = %slot.config.address, count, max, "maximum prefix limit exceeded; closing the session");
        // RFC 4486 §4: AFI, SAFI and the upper bound.
        let mut data = vec![0, 1, 1];
        data.extend_from_slice(&max.to_be_bytes());
        let _ = slot.cmd.send(SessionCmd::AutomaticStop(Notification::error(
            margay_bgp_wire::code::CEASE,
            cease::MAX_PREFIXES,
            data,
        )));
        slot.epoch = u64::MAX;
        self.rib.remove_source(idx);
    }

    fn check_deferral(&mut self) {
        let Some(deadline) = self.deferral else {
            return;
        };
        let all_in = self
            .slots
            .iter()
            .flatten()
            .filter(|s| !s.config.shutdown)
            .all(|s| match &s.up {
                Some(up) => {
                    up.negotiated.peer_graceful_restart.is_none() || {
                        let f = up.negotiated.families;
                        (!f.ipv4_unicast || up.eor_received.ipv4_unicast)
                            && (!f.ipv6_unicast || up.eor_received.ipv6_unicast)
                    }
                }
                None => false,
            });
        if all_in || Instant::now() >= deadline {
            info!(
                all_peers_sent_end_of_rib = all_in,
                "restart deferral over; advertising"
            );
            self.deferral = None;
        }
    }

    // ----- output -----

    fn pump(&mut self) {
        if self.deferral.is_none() {
            for g in 0..self.groups.len() {
                self.pump_group(g);
            }
            for i in 0..self.slots.len() {
                self.pump_peer(i);
            }
        }
        self.pump_subscriber();
        self.trim();
    }

    fn pump_peer(&mut self, i: usize) {
        let rib = &self.rib;
        let Some(slot) = self.slots[i].as_mut() else {
            return;
        };
        let Some(up) = slot.up.as_mut() else { return };
        let Out::Solo(out) = &mut up.out else { return };
        while !out.is_synced(rib) {
            if !up.sink.has_room() {
                up.sink.want_wakeup();
                // The writer may have drained between the check and the flag.
                if !up.sink.has_room() {
                    return;
                }
            }
            let batch = collect(rib, out, &up.export, FILL_BUDGET);
            let mut buf = BytesMut::with_capacity(64 << 10);
            if let Err(e) = encode(&batch, &up.negotiated.ctx, &mut buf) {
                warn!(peer = %slot.config.address, error = %e, "cannot encode UPDATE; skipped");
            }
            if batch.walk_done && !up.eor_sent {
                up.eor_sent = true;
                for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
                    if up.negotiated.families.contains(f) {
                        let _ = Message::Update(Update::end_of_rib(f))
                            .encode(&up.negotiated.ctx, &mut buf);
                    }
                }
            }
            if batch.walk_done {
                // The walk answered the peer's route refresh requests (RFC 7313 §4).
                for a in up.refresh.walk_done() {
                    if let RefreshAction::Send(f, subtype) = a {
                        let m =
                            Message::RouteRefresh(margay_bgp_wire::RouteRefresh::new(f, subtype));
                        let _ = m.encode(&up.negotiated.ctx, &mut buf);
                    }
                }
            }
            if !buf.is_empty() && !up.sink.send(buf.freeze()) {
                return;
            }
        }
    }

    /// Brings update group `gi` up to date, one batch for all members at a time,
    /// while every member's writer has room. Members whose writers stay full for
    /// [`SPLIT_AFTER`] while others wait leave the group.
    fn pump_group(&mut self, gi: usize) {
        loop {
            let rib = &self.rib;
            let Some(g) = self.groups[gi].as_mut() else {
                return;
            };
            if g.out.is_trimmed(rib) {
                // Too far behind for the journal: every member walks the table again.
                for m in g.members.clone() {
                    if let Some((rib, out)) = self.own_out(m) {
                        out.resync(rib);
                    }
                }
                return;
            }
            if g.out.is_synced(rib) {
                g.blocked_since = None;
                return;
            }
            let mut full = Vec::new();
            let mut mask: Vec<u64> = Vec::new();
            for &m in &g.members {
                let Some(up) = self.slots[m as usize].as_ref().and_then(|s| s.up.as_ref()) else {
                    continue;
                };
                debug_assert!(matches!(up.out, Out::Member(i) if i == gi));
                if !up.sink.has_room() {
                    up.sink.want_wakeup();
                    if !up.sink.has_room() {
                        full.push(m);
                    }
                }
                let w = m as usize / 64;
                if mask.len() <= w {
                    mask.resize(w + 1, 0);
                }
                mask[w] |= 1 << (m % 64);
            }
            if full.len() == g.members.len() {
                // Everyone is behind: back-pressure, nobody holds anybody up.
                g.blocked_since = None;
                return;
            }
            if !full.is_empty() {
                let now = Instant::now();
                let since = *g.blocked_since.get_or_insert(now);
                if now.duration_since(since) < SPLIT_AFTER {
                    return;
                }
                g.blocked_since = None;
                for m in full {
                    self.leave_group(m);
                    if let Some(up) = self.slots[m as usize].as_mut().and_then(|s| s.up.as_mut()) {
                        let hold = REGROUP_HOLD
                            .saturating_mul(1 << up.slow_splits.min(5))
                            .min(REGROUP_HOLD_MAX);
                        up.slow_splits += 1;
                        up.regroup_after = Some(now + hold);
                        debug!(peer = m, ?hold, "slow reader leaves its update group");
                    }
                }
                continue;
            }
            g.blocked_since = None;
            let is_member = |p: PeerIdx| {
                mask.get(p as usize / 64)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0)
            };
            let batch = collect_group(rib, &mut g.out, &g.export, is_member, FILL_BUDGET);
            let encoded: Vec<(PeerIdx, bytes::Bytes, bytes::Bytes)> = batch
                .sections
                .iter()
                .map(|s| {
                    let mut others = BytesMut::new();
                    let mut own = BytesMut::new();
                    let withdrawals = crate::rib::OutBatch {
                        withdrawn: s.to_source.clone(),
                        ..Default::default()
                    };
                    if let Err(e) = encode(&s.others, &g.ctx, &mut others)
                        .and_then(|_| encode(&withdrawals, &g.ctx, &mut own))
                    {
                        warn!(error = %e, "cannot encode UPDATE for an update group; skipped");
                    }
                    (s.source, others.freeze(), own.freeze())
                })
                .collect();
            for &m in &g.members {
                let Some(up) = self.slots[m as usize].as_ref().and_then(|s| s.up.as_ref()) else {
                    continue;
                };
                if !matches!(up.out, Out::Member(i) if i == gi) {
                    continue;
                }
                for (source, others, own) in &encoded {
                    let b = if *source == m { own } else { others };
                    if !b.is_empty() {
                        up.sink.send(b.clone());
                    }
                }
            }
        }
    }

    /// The established session of `idx` is over: out of its update group, then its
    /// state goes. Every end of a session comes through here, so no group keeps a
    /// member that has no session.
    fn end_session(&mut self, idx: PeerIdx) {
        self.leave_group(idx);
        if let Some(s) = self.slots.get_mut(idx as usize).and_then(|s| s.as_mut()) {
            s.up = None;
        }
    }

    /// Peer `idx`'s own Adj-RIB-Out, taking it out of its update group first (for
    /// a walk that answers this peer alone), with the table.
    fn own_out(&mut self, idx: PeerIdx) -> Option<(&Rib, &mut AdjRibOut)> {
        self.leave_group(idx);
        let up = self.slots.get_mut(idx as usize)?.as_mut()?.up.as_mut()?;
        match &mut up.out {
            Out::Solo(out) => Some((&self.rib, out)),
            Out::Member(_) => None,
        }
    }

    /// Takes peer `idx` out of its update group, with what it holds as its own
    /// Adj-RIB-Out. A group left empty is dropped.
    fn leave_group(&mut self, idx: PeerIdx) {
        let Some(up) = self.slots[idx as usize]
            .as_mut()
            .and_then(|s| s.up.as_mut())
        else {
            return;
        };
        let Out::Member(gi) = up.out else { return };
        let Some(g) = self.groups[gi].as_mut() else {
            return;
        };
        up.out = Out::Solo(g.out.member_view(&self.rib, idx));
        g.members.retain(|&m| m != idx);
        if g.members.is_empty() {
            self.groups[gi] = None;
        }
    }

    /// Puts peers that are on their own and in sync into update groups: into a
    /// group with their settings that is in sync too, or into a new one with
    /// another such peer.
    fn regroup(&mut self) {
        if self.deferral.is_some() {
            return;
        }
        let rib = &self.rib;
        let now = Instant::now();
        let ready = |s: &PeerSlot| {
            s.up.as_ref().is_some_and(|u| {
                u.eor_sent
                    && !u.refresh.owes_end()
                    && u.sink.has_room()
                    && u.regroup_after.is_none_or(|t| now >= t)
                    && matches!(&u.out, Out::Solo(o) if o.is_synced(rib))
            })
        };
        let key = |u: &UpState| ExportCtx {
            peer: NO_PEER,
            ..u.export.clone()
        };
        for i in 1..self.slots.len() {
            let Some(slot) = self.slots[i].as_ref().filter(|s| ready(s)) else {
                continue;
            };
            let Some(up) = slot.up.as_ref() else { continue };
            let k = key(up);
            let ctx = &up.negotiated.ctx;
            let joins = self.groups.iter().position(|g| {
                g.as_ref()
                    .is_some_and(|g| g.out.is_synced(rib) && g.ctx == *ctx && g.export == k)
            });
            let gi = match joins {
                Some(gi) => gi,
                None => {
                    let partner = (i + 1..self.slots.len()).find(|&j| {
                        self.slots[j].as_ref().is_some_and(|s| {
                            ready(s)
                                && s.up
                                    .as_ref()
                                    .is_some_and(|u| u.negotiated.ctx == *ctx && key(u) == k)
                        })
                    });
                    if partner.is_none() {
                        continue;
                    }
                    let g = Group {
                        out: GroupOut::in_sync(rib, &k),
                        export: k,
                        ctx: ctx.clone(),
                        members: Vec::new(),
                        blocked_since: None,
                    };
                    match self.groups.iter().position(Option::is_none) {
                        Some(free) => {
                            self.groups[free] = Some(g);
                            free
                        }
                        None => {
                            self.groups.push(Some(g));
                            self.groups.len() - 1
                        }
                    }
                }
            };
            if let Some(g) = self.groups[gi].as_mut() {
                g.members.push(i as PeerIdx);
            }
            if let Some(up) = self.slots[i].as_mut().and_then(|s| s.up.as_mut()) {
                up.out = Out::Member(gi);
            }
            debug!(peer = i, group = gi, "peer joins an update group");
        }
        // Two groups with one key (the second formed while the first was behind):
        // both in sync means both hold the same, so the second's members move over.
        for a in 0..self.groups.len() {
            for b in a + 1..self.groups.len() {
                let same = match (&self.groups[a], &self.groups[b]) {
                    (Some(x), Some(y)) => {
                        x.out.is_synced(rib)
                            && y.out.is_synced(rib)
                            && x.ctx == y.ctx
                            && x.export == y.export
                    }
                    _ => false,
                };
                if !same {
                    continue;
                }
                let Some(moved) = self.groups[b].take() else {
                    continue;
                };
                for &m in &moved.members {
                    if let Some(up) = self.slots[m as usize].as_mut().and_then(|s| s.up.as_mut()) {
                        up.out = Out::Member(a);
                    }
                }
                if let Some(g) = self.groups[a].as_mut() {
                    g.members.extend(moved.members);
                }
                debug!(from = b, into = a, "update groups merged");
            }
        }
    }

    fn pump_subscriber(&mut self) {
        let Some(sub) = self.subscriber.as_mut() else {
            return;
        };
        if sub.tx.is_closed() {
            self.subscriber = None;
            return;
        }
        if sub.cursor < self.rib.tail() {
            sub.walk = Some(0);
            sub.cursor = self.rib.head();
        }
        loop {
            let done = sub.walk.is_none() && sub.cursor >= self.rib.head();
            if done {
                return;
            }
            let Ok(permit) = sub.tx.try_reserve() else {
                return;
            };
            let mut batch = Vec::new();
            if let Some(mut w) = sub.walk {
                while (w as usize) < self.rib.len() && batch.len() < FILL_BUDGET {
                    let e = self.rib.entry(w);
                    if e.best().is_some() {
                        batch.push(best_change(&self.rib, e));
                    }
                    w += 1;
                }
                sub.walk = ((w as usize) < self.rib.len()).then_some(w);
            }
            if sub.walk.is_none() {
                while sub.cursor < self.rib.head() && batch.len() < FILL_BUDGET {
                    if let Some(id) = self.rib.journal_at(sub.cursor) {
                        batch.push(best_change(&self.rib, self.rib.entry(id)));
                    }
                    sub.cursor += 1;
                }
            }
            if batch.is_empty() {
                continue;
            }
            permit.send(batch);
        }
    }

    fn trim(&mut self) {
        let head = self.rib.head();
        let mut min = head;
        for s in self.slots.iter().flatten() {
            if let Some(Out::Solo(out)) = s.up.as_ref().map(|u| &u.out) {
                min = min.min(out.cursor());
            }
        }
        for g in self.groups.iter().flatten() {
            min = min.min(g.out.cursor());
        }
        if let Some(sub) = &self.subscriber {
            min = min.min(sub.cursor);
        }
        let floor = head.saturating_sub(JOURNAL_LIMIT.max(2 * self.rib.len() as u64));
        self.rib.trim_journal(min.max(floor));
    }

    // ----- status -----

    fn peer_status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as PeerIdx, s)))
            .map(|(idx, s)| {
                let st = s.status.lock().map(|g| g.clone()).unwrap_or_default();
                let neg = st.negotiated.as_ref();
                let mut families = Vec::new();
                if let Some(n) = neg {
                    if n.ipv4_unicast {
                        families.push("ipv4-unicast".to_owned());
                    }
                    if n.ipv6_unicast {
                        families.push("ipv6-unicast".to_owned());
                    }
                }
                PeerStatus {
                    address: s.config.address,
                    asn: s.config.asn,
                    description: s.config.description.clone(),
                    ebgp: s.config.asn != self.cfg.asn,
                    rr_client: s.config.rr_client,
                    state: st.state,
                    since: st
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    last_error: st.last_error.clone(),
                    router_id: neg.map(|n| n.peer_id.to_string()),
                    local_address: st.local.map(|l| l.ip().to_string()),
                    hold_time: neg.map(|n| n.hold_time),
                    families,
                    graceful_restart: neg.is_some_and(|n| n.graceful_restart),
                    four_octet_as: neg.is_some_and(|n| n.four_octet_as),
                    prefixes_received: s.stats.updates_received_prefixes.load(Ordering::Relaxed),
                    prefixes_accepted: self.rib.count(idx),
                    prefixes_advertised: s
                        .up
                        .as_ref()
                        .map(|u| match u.out {
                            Out::Solo(ref o) => o.count(),
                            Out::Member(gi) => {
                                self.groups[gi].as_ref().map_or(0, |g| g.out.count_for(idx))
                            }
                        })
                        .unwrap_or(0),
                    update_group: match s.up.as_ref().map(|u| &u.out) {
                        Some(Out::Member(gi)) => Some(*gi),
                        _ => None,
                    },
                    prefixes_stale: if s.gr.is_active() {
                        self.rib.stale_count(idx)
                    } else {
                        0
                    },
                    messages_received: MessageCounts::of(&s.stats.received),
                    messages_sent: MessageCounts::of(&s.stats.sent),
                }
            })
            .collect();
        v.sort_by_key(|p| p.address);
        v
    }

    fn route_status(&self, filter: Option<Prefix>) -> Vec<RouteStatus> {
        let show = |e: &crate::rib::Entry| RouteStatus {
            prefix: e.prefix.to_string(),
            paths: e
                .paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let a = &p.attrs;
                    PathStatus {
                        best: i == 0,
                        multipath: i < usize::from(e.multipath),
                        from: if p.source == LOCAL {
                            "local".to_owned()
                        } else {
                            self.rib
                                .source(p.source)
                                .map(|s| s.addr.to_string())
                                .unwrap_or_else(|| "?".into())
                        },
                        next_hop: a.next_hop.as_ref().map(|n| next_hop_addr(n).to_string()),
                        as_path: a.as_path.to_string(),
                        origin: format!("{:?}", a.origin).to_uppercase(),
                        local_pref: a.local_pref,
                        med: a.med,
                        communities: a
                            .communities
                            .iter()
                            .map(|c| CommunityText(*c).to_string())
                            .collect(),
                        large_communities: a
                            .large_communities
                            .iter()
                            .map(|c| c.to_string())
                            .collect(),
                        originator_id: a.originator_id.map(|o| o.to_string()),
                        cluster_list: a.cluster_list.iter().map(|c| c.to_string()).collect(),
                        stale: p.stale || p.refresh_stale,
                    }
                })
                .collect(),
        };
        match filter {
            Some(p) => self
                .rib
                .get(&p)
                .filter(|e| !e.paths.is_empty())
                .map(show)
                .into_iter()
                .collect(),
            None => {
                let mut v: Vec<(Prefix, RouteStatus)> = self
                    .rib
                    .entries()
                    .filter(|(_, e)| !e.paths.is_empty())
                    .map(|(_, e)| (e.prefix, show(e)))
                    .collect();
                v.sort_by_key(|a| a.0);
                v.into_iter().map(|x| x.1).collect()
            }
        }
    }
}

fn best_change(rib: &Rib, e: &crate::rib::Entry) -> BestRouteChange {
    let best = e.best().map(|b| {
        let origin = if b.source == LOCAL {
            RouteOrigin::Local
        } else {
            let s = rib.source(b.source);
            RouteOrigin::Peer {
                address: s
                    .map(|s| s.addr)
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                ebgp: s.is_some_and(|s| s.kind == SourceKind::Ebgp),
            }
        };
        let next_hops = if b.source == LOCAL {
            Vec::new()
        } else {
            // Best path's next hop first; two paths through one router (say, two
            // sessions to it) are one next hop.
            let mut v: Vec<IpAddr> = Vec::with_capacity(e.multipath_set().len());
            for nh in e
                .multipath_set()
                .iter()
                .filter_map(|p| p.attrs.next_hop.as_ref().map(next_hop_addr))
            {
                if !v.contains(&nh) {
                    v.push(nh);
                }
            }
            v
        };
        BestRoute {
            next_hops,
            attrs: b.attrs.clone(),
            origin,
        }
    });
    BestRouteChange {
        prefix: e.prefix,
        best,
    }
}

/// Seconds since the Unix epoch, for status output.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bgp_wire::{AsPath, NextHop};
    use std::net::Ipv4Addr;

    fn peer(i: u8) -> Source {
        Source {
            kind: SourceKind::Ebgp,
            router_id: Ipv4Addr::new(i, i, i, i),
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
            rr_client: false,
        }
    }

    fn via(asn: u32, nh: [u8; 4]) -> Option<Arc<PathAttrs>> {
        Some(Arc::new(PathAttrs {
            as_path: AsPath::sequence([asn]),
            next_hop: Some(NextHop::V4(Ipv4Addr::from(nh))),
            ..PathAttrs::default()
        }))
    }

    fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    /// What a best-route subscriber receives for the changes since `from`.
    fn changes(rib: &Rib, from: Seq) -> Vec<BestRouteChange> {
        (from..rib.head())
            .filter_map(|s| rib.journal_at(s))
            .map(|id| best_change(rib, rib.entry(id)))
            .collect()
    }

    #[test]
    fn a_multipath_best_route_change_carries_every_next_hop_of_the_set() {
        let mut rib = Rib::new(Ipv4Addr::new(9, 9, 9, 9));
        rib.multipath = true;
        for i in 1..=4 {
            rib.set_source(u32::from(i), peer(i));
        }
        let pre: Prefix = "10.8.0.0/24".parse().unwrap();
        rib.update(2, pre, via(65002, [10, 0, 0, 2]));
        let mark = rib.head();
        // An equal-cost path joins: the best path (lowest router ID) stays first
        // and the change lists both next hops.
        rib.update(1, pre, via(65001, [10, 0, 0, 1]));
        let c = changes(&rib, mark);
        assert_eq!(c.len(), 1);
        let best = c[0].best.as_ref().unwrap();
        assert_eq!(best.next_hops, vec![ip([10, 0, 0, 1]), ip([10, 0, 0, 2])]);
        assert_eq!(
            best.origin,
            RouteOrigin::Peer {
                address: ip([10, 0, 0, 1]),
                ebgp: true
            }
        );
        // A third equal path joins the set, and leaves it when its AS path grows.
        let mark = rib.head();
        rib.update(3, pre, via(65003, [10, 0, 0, 3]));
        assert_eq!(
            changes(&rib, mark)[0].best.as_ref().unwrap().next_hops,
            vec![ip([10, 0, 0, 1]), ip([10, 0, 0, 2]), ip([10, 0, 0, 3])]
        );
        let mark = rib.head();
        rib.update(3, pre, {
            let mut a = (*via(65003, [10, 0, 0, 3]).unwrap()).clone();
            a.as_path = AsPath::sequence([65003, 65003]);
            Some(Arc::new(a))
        });
        let c = changes(&rib, mark);
        assert_eq!(
            c.last().unwrap().best.as_ref().unwrap().next_hops,
            vec![ip([10, 0, 0, 1]), ip([10, 0, 0, 2])],
            "the set is back to two once 10.0.0.3's path is longer"
        );
        // A fourth equal path through a router already in the set adds no next hop.
        let mark = rib.head();
        rib.update(4, pre, via(65004, [10, 0, 0, 2]));
        let c = changes(&rib, mark);
        assert_eq!(
            c[0].best.as_ref().unwrap().next_hops,
            vec![ip([10, 0, 0, 1]), ip([10, 0, 0, 2])]
        );
        // Set members leaving shrink the list down to the last path; then the
        // prefix is gone.
        let mark = rib.head();
        rib.update(1, pre, None);
        rib.update(4, pre, None);
        let c = changes(&rib, mark);
        assert_eq!(
            c.last().unwrap().best.as_ref().unwrap().next_hops,
            vec![ip([10, 0, 0, 2])]
        );
        let mark = rib.head();
        rib.update(2, pre, None);
        rib.update(3, pre, None);
        let c = changes(&rib, mark);
        assert!(c.last().unwrap().best.is_none());
    }

    #[test]
    fn without_multipath_only_the_best_next_hop_is_sent() {
        let mut rib = Rib::new(Ipv4Addr::new(9, 9, 9, 9));
        for i in 1..=2 {
            rib.set_source(u32::from(i), peer(i));
        }
        let pre: Prefix = "10.8.0.0/24".parse().unwrap();
        let mark = rib.head();
        rib.update(2, pre, via(65002, [10, 0, 0, 2]));
        rib.update(1, pre, via(65001, [10, 0, 0, 1]));
        let c = changes(&rib, mark);
        assert_eq!(
            c.last().unwrap().best.as_ref().unwrap().next_hops,
            vec![ip([10, 0, 0, 1])]
        );
    }
}
