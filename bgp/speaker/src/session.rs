//! The tokio driver of one peer: connections, timers, and carrying out what the
//! [`Fsm`] decides.
//!
//! Each connection has a reader task (framing, decoding UPDATEs into RIB input off
//! the speaker's thread) and a writer task (coalescing writes, the RFC 9687 send
//! hold timer). Everything the reader produces flows through the session task to
//! the speaker task in order, so the speaker sees `Up`, then the peer's routes, then
//! `Down`, never mixed across sessions (each `Up` starts a new epoch).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use margay_bgp_wire::{
    code, frame_len, subcode, Context, Family, Message, MessageType, Notification, Update,
    HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::config::{PeerConfig, SpeakerConfig};
use crate::fsm::{Action, ConnId, DownReason, Event, Fsm, Negotiated, Outgoing, State, Timer};
use crate::rib::{route_update, PeerIdx, RouteUpdate};
use crate::sockopt;

/// Update bytes queued to a peer's writer above which the speaker stops filling.
pub(crate) const HIGH_WATER: usize = 1 << 20;
/// ... and below which the writer asks for more.
pub(crate) const LOW_WATER: usize = 256 << 10;

/// Commands from the speaker to a session.
#[derive(Debug)]
pub(crate) enum SessionCmd {
    Start,
    /// Administrative stop; `done` fires once the NOTIFICATION is flushed.
    Stop {
        message: String,
        done: Option<oneshot::Sender<()>>,
    },
    AutomaticStop(Notification),
    Inbound(TcpStream),
    /// Ask the peer to send its routes again (RFC 2918).
    RequestRefresh(Family),
}

/// What sessions tell the speaker.
#[derive(Debug)]
pub(crate) enum PeerEvent {
    Up {
        idx: PeerIdx,
        epoch: u64,
        negotiated: Box<Negotiated>,
        local: SocketAddr,
        sink: UpdateSink,
    },
    Down {
        idx: PeerIdx,
        epoch: u64,
        reason: DownReason,
    },
    Routes {
        idx: PeerIdx,
        epoch: u64,
        update: RouteUpdate,
        at: Instant,
    },
    /// A ROUTE-REFRESH message: a request (subtype 0) or an RFC 7313 marker.
    RouteRefresh {
        idx: PeerIdx,
        epoch: u64,
        family: Family,
        subtype: u8,
    },
}

/// Where the speaker writes UPDATEs for an established session.
#[derive(Debug, Clone)]
pub(crate) struct UpdateSink {
    tx: mpsc::UnboundedSender<WriterMsg>,
    queued: Arc<AtomicUsize>,
    want: Arc<AtomicBool>,
}

impl UpdateSink {
    /// Room for more under the high-water mark.
    pub fn has_room(&self) -> bool {
        self.queued.load(Ordering::Relaxed) < HIGH_WATER
    }

    pub fn send(&self, b: Bytes) -> bool {
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        self.tx.send(WriterMsg::Update(b)).is_ok()
    }

    /// Ask the writer to wake the speaker when the queue drains.
    pub fn want_wakeup(&self) {
        self.want.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum WriterMsg {
    Control(Bytes),
    Update(Bytes),
    Close,
}

/// Per-peer message counters, by message type (index = type code).
#[derive(Debug, Default)]
pub struct PeerStats {
    pub received: [AtomicU64; 6],
    pub sent: [AtomicU64; 6],
    pub updates_received_prefixes: AtomicU64,
}

impl PeerStats {
    fn count(counters: &[AtomicU64; 6], bytes: &[u8]) {
        let mut rest = bytes;
        while rest.len() >= HEADER_LEN {
            let len = usize::from(u16::from_be_bytes([rest[16], rest[17]])).max(HEADER_LEN);
            let t = usize::from(rest[18]);
            if t < 6 {
                counters[t].fetch_add(1, Ordering::Relaxed);
            }
            rest = &rest[len.min(rest.len())..];
        }
    }
}

/// Live session facts for status output.
#[derive(Debug, Clone)]
pub struct SessionStatus {
    pub state: State,
    pub since: SystemTime,
    pub last_error: Option<String>,
    pub negotiated: Option<NegotiatedSummary>,
    pub local: Option<SocketAddr>,
}

/// The parts of [`Negotiated`] status output shows.
#[derive(Debug, Clone)]
pub struct NegotiatedSummary {
    pub peer_id: std::net::Ipv4Addr,
    pub peer_asn: u32,
    pub hold_time: u16,
    pub keepalive_time: u16,
    pub four_octet_as: bool,
    pub ipv4_unicast: bool,
    pub ipv6_unicast: bool,
    pub route_refresh: bool,
    pub graceful_restart: bool,
    pub extended_next_hop: bool,
}

impl Default for SessionStatus {
    fn default() -> Self {
        Self {
            state: State::Idle,
            since: SystemTime::now(),
            last_error: None,
            negotiated: None,
            local: None,
        }
    }
}

pub(crate) struct SessionParams {
    pub idx: PeerIdx,
    pub peer: PeerConfig,
    pub speaker: SpeakerConfig,
    pub events: mpsc::Sender<PeerEvent>,
    pub wake: mpsc::UnboundedSender<PeerIdx>,
    pub status: Arc<Mutex<SessionStatus>>,
    pub stats: Arc<PeerStats>,
}

/// Starts the session task.
pub(crate) fn spawn(p: SessionParams) -> (mpsc::UnboundedSender<SessionCmd>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("bgp_session", peer = %p.peer.address);
    let fsm = Fsm::new(p.peer.fsm_config(&p.speaker));
    let (conn_tx, conn_rx) = mpsc::channel(256);
    let s = Session {
        p,
        fsm,
        conns: HashMap::new(),
        next_conn: 1,
        timers: HashMap::new(),
        connecting: None,
        conn_tx,
        conn_rx,
        cmd_rx: rx,
        epoch: 0,
        closing: Vec::new(),
    };
    let h = tokio::spawn(s.run().instrument(span));
    (tx, h)
}

struct Conn {
    writer_tx: mpsc::UnboundedSender<WriterMsg>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    mode: watch::Sender<Option<Context>>,
    local: SocketAddr,
    queued: Arc<AtomicUsize>,
    want: Arc<AtomicBool>,
}

#[derive(Debug)]
enum ConnEvent {
    Connected(ConnId, io::Result<TcpStream>),
    Msg(ConnId, Message),
    /// An UPDATE read before the reader knew the session's codec context.
    RawUpdate(ConnId, Bytes),
    Routes(ConnId, RouteUpdate, Instant),
    HeaderErr(ConnId, Notification),
    OpenErr(ConnId, Notification),
    UpdateErr(ConnId, Notification),
    Closed(ConnId),
    SendHoldExpired(ConnId),
}

struct Session {
    p: SessionParams,
    fsm: Fsm,
    conns: HashMap<ConnId, Conn>,
    next_conn: u64,
    timers: HashMap<Timer, Instant>,
    connecting: Option<(ConnId, JoinHandle<()>)>,
    conn_tx: mpsc::Sender<ConnEvent>,
    conn_rx: mpsc::Receiver<ConnEvent>,
    cmd_rx: mpsc::UnboundedReceiver<SessionCmd>,
    epoch: u64,
    /// Writers flushing a last NOTIFICATION.
    closing: Vec<JoinHandle<()>>,
}

// ===== impl Session =====

impl Session {
    async fn run(mut self) {
        loop {
            let next = self
                .timers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, at)| (*t, *at));
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    None => {
                        self.handle(Event::ManualStop { message: "peer removed".into() }).await;
                        self.flush_closing().await;
                        return;
                    }
                    Some(SessionCmd::Stop { message, done }) => {
                        self.handle(Event::ManualStop { message }).await;
                        self.flush_closing().await;
                        if let Some(d) = done {
                            let _ = d.send(());
                        }
                    }
                    Some(SessionCmd::Start) => self.handle(Event::ManualStart).await,
                    Some(SessionCmd::AutomaticStop(n)) => self.handle(Event::AutomaticStop(n)).await,
                    Some(SessionCmd::Inbound(stream)) => self.inbound(stream).await,
                    Some(SessionCmd::RequestRefresh(f)) => self.request_refresh(f),
                },
                Some(ev) = self.conn_rx.recv() => self.conn_event(ev).await,
                _ = sleep_until_opt(next.map(|n| n.1)) => {
                    if let Some((t, _)) = next {
                        self.timers.remove(&t);
                        self.timer_fired(t).await;
                    }
                }
            }
        }
    }

    async fn flush_closing(&mut self) {
        for h in self.closing.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
    }

    async fn timer_fired(&mut self, t: Timer) {
        let e = match t {
            Timer::ConnectRetry => Event::ConnectRetryTimerExpires,
            Timer::Hold => Event::HoldTimerExpires,
            Timer::Keepalive => Event::KeepaliveTimerExpires,
            Timer::IdleHold => Event::IdleHoldTimerExpires,
        };
        self.handle(e).await;
    }

    fn request_refresh(&mut self, f: Family) {
        let Some(n) = self.fsm.negotiated() else {
            return;
        };
        if !n.peer_route_refresh || !n.families.contains(f) {
            return;
        }
        let msg = Message::RouteRefresh(margay_bgp_wire::RouteRefresh::new(
            f,
            margay_bgp_wire::RouteRefresh::NORMAL,
        ));
        if let (Some(conn), Ok(b)) = (self.conns.get(&n.conn), msg.to_bytes(&n.ctx)) {
            PeerStats::count(&self.p.stats.sent, &b);
            let _ = conn.writer_tx.send(WriterMsg::Control(b));
        }
    }

    async fn inbound(&mut self, stream: TcpStream) {
        let peer = &self.p.peer;
        if let Some(h) = peer.ttl_security {
            if let Ok(a) = stream.local_addr() {
                if let Err(e) = sockopt::set_ttl_security(&stream, a, h) {
                    warn!(error = %e, "cannot set TTL security on an inbound connection; refusing it");
                    return;
                }
            }
            // The minimum TTL holds from now on; what was queued since the handshake
            // (often the peer's OPEN) passed unchecked. The SYN says whether the peer
            // sends at TTL 255 at all, when the listener kept it (prepare_listener).
            let min = sockopt::gtsm_min_ttl(h);
            match sockopt::syn_ttl(&stream) {
                Ok(Some(ttl)) if ttl < min => {
                    let e = format!(
                        "refused a connection from the peer: its SYN arrived with TTL {ttl}, \
                         ttl_security needs at least {min}; enable TTL security (GTSM) on the \
                         peer, or raise ttl_security to the number of hops between us"
                    );
                    warn!(ttl, min, "{e}");
                    self.set_error(e);
                    return;
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "cannot read the SYN of an inbound connection"),
            }
        }
        let id = self.new_conn_id();
        self.attach(id, stream);
        self.handle(Event::TcpConnectionConfirmed(id)).await;
    }

    fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        id
    }

    fn attach(&mut self, id: ConnId, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
        let (r, w) = stream.into_split();
        let (wtx, wrx) = mpsc::unbounded_channel();
        let (mode_tx, mode_rx) = watch::channel(None);
        let queued = Arc::new(AtomicUsize::new(0));
        let want = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(
            reader(r, id, self.conn_tx.clone(), mode_rx, self.p.stats.clone()).in_current_span(),
        );
        let writer = tokio::spawn(
            writer(
                w,
                id,
                wrx,
                WriterShared {
                    queued: queued.clone(),
                    want: want.clone(),
                    wake: self.p.wake.clone(),
                    idx: self.p.idx,
                    events: self.conn_tx.clone(),
                    send_hold: self.p.peer.send_hold(),
                    stats: self.p.stats.clone(),
                },
            )
            .in_current_span(),
        );
        self.conns.insert(
            id,
            Conn {
                writer_tx: wtx,
                reader,
                writer,
                mode: mode_tx,
                local,
                queued,
                want,
            },
        );
    }

    async fn conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Connected(id, res) => {
                if self.connecting.as_ref().map(|c| c.0) != Some(id) {
                    return; // an attempt we already gave up on
                }
                self.connecting = None;
                match res {
                    Ok(stream) => {
                        self.attach(id, stream);
                        self.handle(Event::TcpCrAcked(id)).await;
                    }
                    Err(e) => {
                        debug!(error = %e, "connect failed");
                        self.set_error(format!("connect: {e}"));
                        self.handle(Event::TcpConnectionFails(id)).await;
                    }
                }
            }
            ConnEvent::Msg(id, m) => {
                let e = match m {
                    Message::Open(o) => Event::BgpOpen(id, o),
                    Message::Keepalive => Event::KeepAliveMsg(id),
                    Message::Notification(n) => {
                        if let Some(t) = n.shutdown_communication() {
                            info!(code = n.code, subcode = n.subcode, message = %t, "peer sent shutdown");
                        } else {
                            info!(notification = %n, "peer sent NOTIFICATION");
                        }
                        if n.code == code::OPEN_MESSAGE
                            && n.subcode == subcode::UNSUPPORTED_VERSION_NUMBER
                        {
                            Event::NotifMsgVerErr(id)
                        } else {
                            Event::NotifMsg(id, n)
                        }
                    }
                    Message::Update(_) => Event::UpdateMsg(id),
                    Message::RouteRefresh(rr) => {
                        if self.fsm.state() == State::Established
                            && self.fsm.connection() == Some(id)
                        {
                            // Requests and RFC 7313 markers alike go to the speaker,
                            // in order with the UPDATEs around them; it ignores
                            // unknown subtypes (§5). Unknown families are ignored
                            // here (RFC 2918 §4).
                            match Family::from_afi_safi(rr.afi, rr.safi) {
                                Some(f) => {
                                    let _ = self
                                        .p
                                        .events
                                        .send(PeerEvent::RouteRefresh {
                                            idx: self.p.idx,
                                            epoch: self.epoch,
                                            family: f,
                                            subtype: rr.subtype,
                                        })
                                        .await;
                                }
                                None => debug!(
                                    afi = rr.afi,
                                    safi = rr.safi,
                                    "route refresh for an unknown family ignored"
                                ),
                            }
                        }
                        Event::RouteRefreshMsg(id)
                    }
                };
                self.handle(e).await;
            }
            ConnEvent::RawUpdate(id, bytes) => {
                let established =
                    self.fsm.state() == State::Established && self.fsm.connection() == Some(id);
                if !established {
                    self.handle(Event::UpdateMsg(id)).await;
                    return;
                }
                let ctx = self
                    .fsm
                    .negotiated()
                    .map(|n| n.ctx.clone())
                    .unwrap_or_default();
                match decode_update(&bytes, &ctx) {
                    Ok(ru) => self.routes(id, ru, Instant::now()).await,
                    Err(n) => self.handle(Event::UpdateMsgErr(id, n)).await,
                }
            }
            ConnEvent::Routes(id, ru, at) => self.routes(id, ru, at).await,
            ConnEvent::HeaderErr(id, n) => self.handle(Event::BgpHeaderErr(id, n)).await,
            ConnEvent::OpenErr(id, n) => self.handle(Event::BgpOpenMsgErr(id, n)).await,
            ConnEvent::UpdateErr(id, n) => self.handle(Event::UpdateMsgErr(id, n)).await,
            ConnEvent::Closed(id) => {
                if self.conns.contains_key(&id) {
                    self.handle(Event::TcpConnectionFails(id)).await;
                }
            }
            ConnEvent::SendHoldExpired(id) => {
                if self.fsm.connection() == Some(id) {
                    warn!("peer has not read from us for the send hold time");
                    self.handle(Event::SendHoldTimerExpires).await;
                }
            }
        }
    }

    async fn routes(&mut self, id: ConnId, ru: RouteUpdate, at: Instant) {
        if self.fsm.connection() != Some(id) || self.fsm.state() != State::Established {
            return;
        }
        self.p
            .stats
            .updates_received_prefixes
            .fetch_add(ru.prefix_count() as u64, Ordering::Relaxed);
        self.handle(Event::UpdateMsg(id)).await;
        let _ = self
            .p
            .events
            .send(PeerEvent::Routes {
                idx: self.p.idx,
                epoch: self.epoch,
                update: ru,
                at,
            })
            .await;
    }

    fn set_error(&self, e: String) {
        if let Ok(mut s) = self.p.status.lock() {
            s.last_error = Some(e);
        }
    }

    async fn handle(&mut self, e: Event) {
        let before = self.fsm.state();
        let actions = self.fsm.handle(e);
        for a in actions {
            self.execute(a).await;
        }
        let after = self.fsm.state();
        if before != after {
            debug!(from = %before, to = %after, "state change");
            if let Ok(mut s) = self.p.status.lock() {
                s.state = after;
                s.since = SystemTime::now();
                if after != State::Established {
                    s.negotiated = None;
                }
            }
        }
    }

    async fn execute(&mut self, a: Action) {
        match a {
            Action::Connect => self.connect(),
            Action::AbortConnect => {
                if let Some((_, h)) = self.connecting.take() {
                    h.abort();
                }
            }
            Action::Send(id, out) => {
                let msg = match out {
                    Outgoing::Open(o) => Message::Open(o),
                    Outgoing::Keepalive => Message::Keepalive,
                    Outgoing::Notification(n) => {
                        info!(notification = %n, "sending NOTIFICATION");
                        Message::Notification(n)
                    }
                };
                let ctx = self
                    .fsm
                    .negotiated()
                    .map(|n| n.ctx.clone())
                    .unwrap_or_default();
                match (self.conns.get(&id), msg.to_bytes(&ctx)) {
                    (Some(c), Ok(b)) => {
                        PeerStats::count(&self.p.stats.sent, &b);
                        let _ = c.writer_tx.send(WriterMsg::Control(b));
                    }
                    (_, Err(e)) => warn!(error = %e, "cannot encode {:?}", msg.message_type()),
                    _ => {}
                }
            }
            Action::Close(id) => {
                if let Some(c) = self.conns.remove(&id) {
                    let _ = c.writer_tx.send(WriterMsg::Close);
                    c.reader.abort();
                    self.closing.retain(|h| !h.is_finished());
                    self.closing.push(c.writer);
                }
            }
            Action::StartTimer(t, d) => {
                self.timers.insert(t, Instant::now() + d);
            }
            Action::StopTimer(t) => {
                self.timers.remove(&t);
            }
            Action::Established(n) => {
                self.epoch += 1;
                let Some(c) = self.conns.get(&n.conn) else {
                    return;
                };
                info!(
                    peer_id = %n.peer_id,
                    hold = n.hold_time,
                    four_octet_as = n.ctx.four_octet_as,
                    "session established"
                );
                let sink = UpdateSink {
                    tx: c.writer_tx.clone(),
                    queued: c.queued.clone(),
                    want: c.want.clone(),
                };
                let local = c.local;
                let _ = c.mode.send(Some(n.ctx.clone()));
                if let Ok(mut s) = self.p.status.lock() {
                    s.negotiated = Some(NegotiatedSummary {
                        peer_id: n.peer_id,
                        peer_asn: n.peer_asn,
                        hold_time: n.hold_time,
                        keepalive_time: n.keepalive_time,
                        four_octet_as: n.ctx.four_octet_as,
                        ipv4_unicast: n.families.ipv4_unicast,
                        ipv6_unicast: n.families.ipv6_unicast,
                        route_refresh: n.peer_route_refresh,
                        graceful_restart: n.peer_graceful_restart.is_some(),
                        extended_next_hop: n.ctx.extended_next_hop.ipv4_unicast,
                    });
                    s.local = Some(local);
                    s.last_error = None;
                }
                let _ = self
                    .p
                    .events
                    .send(PeerEvent::Up {
                        idx: self.p.idx,
                        epoch: self.epoch,
                        negotiated: n,
                        local,
                        sink,
                    })
                    .await;
            }
            Action::SessionDown(reason) => {
                info!(reason = %reason, "session down");
                self.set_error(reason.to_string());
                let _ = self
                    .p
                    .events
                    .send(PeerEvent::Down {
                        idx: self.p.idx,
                        epoch: self.epoch,
                        reason,
                    })
                    .await;
            }
            Action::ConnectionFailed(reason) => {
                debug!(reason = %reason, "connection failed");
                self.set_error(reason.to_string());
            }
        }
    }

    fn connect(&mut self) {
        if let Some((_, h)) = self.connecting.take() {
            h.abort();
        }
        let id = self.new_conn_id();
        let peer = self.p.peer.clone();
        let ebgp = peer.is_ebgp(&self.p.speaker);
        let tx = self.conn_tx.clone();
        let h = tokio::spawn(
            async move {
                let r = connect(&peer, ebgp).await;
                let _ = tx.send(ConnEvent::Connected(id, r)).await;
            }
            .in_current_span(),
        );
        self.connecting = Some((id, h));
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens our TCP connection to the peer, with source address, TCP-MD5 and TTL set
/// before the SYN goes out.
async fn connect(peer: &PeerConfig, ebgp: bool) -> io::Result<TcpStream> {
    let addr = peer.socket_addr();
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if let Some(l) = peer.local_address {
        sock.bind(SocketAddr::new(l, 0))?;
    }
    if let Some(pw) = &peer.md5_password {
        sockopt::set_md5(&sock, peer.address, Some(pw.as_bytes()))?;
    }
    if let Some(h) = peer.ttl_security {
        sockopt::set_ttl_security(&sock, addr, h)?;
    } else if let Some(t) = peer.multihop {
        sockopt::set_ttl(&sock, addr.is_ipv6(), t)?;
    } else if ebgp {
        sockopt::set_ttl(&sock, addr.is_ipv6(), 1)?;
    }
    let timeout = Duration::from_secs(u64::from(peer.connect_retry.clamp(1, 30)));
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Decodes an UPDATE for the RIB; `Err` is the NOTIFICATION of a session reset.
fn decode_update(msg: &[u8], ctx: &Context) -> Result<RouteUpdate, Notification> {
    // A pure IPv4 withdrawal (no attributes, no NLRI) needs no attribute decoding:
    // read the prefixes in place. The view has checked the withdrawn field's syntax.
    if let Ok(v) = margay_bgp_wire::UpdateView::parse(msg, ctx) {
        if v.attributes().next().is_none() && v.nlri().next().is_none() {
            let withdrawn: Vec<_> = v.withdrawn().map(|n| n.prefix).collect();
            if !withdrawn.is_empty() {
                return Ok(RouteUpdate {
                    withdrawn,
                    ..RouteUpdate::default()
                });
            }
        }
    }
    match Update::decode(msg, ctx) {
        Ok(mut u) => {
            if !ctx.four_octet_as {
                u.reconstruct_as4();
            }
            Ok(route_update(&u))
        }
        Err(e) => {
            let what = e.to_string();
            match e.action {
                margay_bgp_wire::Action::TreatAsWithdraw { withdrawn, .. } => {
                    warn!(error = %what, "UPDATE treated as withdraw (RFC 7606)");
                    Ok(RouteUpdate {
                        withdrawn: withdrawn.into_iter().map(|n| n.prefix).collect(),
                        ..RouteUpdate::default()
                    })
                }
                // This speaker does not disable single families: it resets.
                margay_bgp_wire::Action::SessionReset(n)
                | margay_bgp_wire::Action::AfiSafiDisable {
                    notification: n, ..
                } => {
                    warn!(error = %what, "malformed UPDATE");
                    Err(n)
                }
            }
        }
    }
}

async fn reader(
    mut r: OwnedReadHalf,
    id: ConnId,
    tx: mpsc::Sender<ConnEvent>,
    mut mode: watch::Receiver<Option<Context>>,
    stats: Arc<PeerStats>,
) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let frame_ctx = Context::default();
    loop {
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(64 << 10);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(ConnEvent::Closed(id)).await;
                return;
            }
            Ok(_) => {}
        }
        loop {
            let n = match frame_len(&buf, &frame_ctx) {
                Ok(Some(n)) if buf.len() >= n => n,
                Ok(_) => break,
                Err(e) => {
                    let _ = tx
                        .send(ConnEvent::HeaderErr(id, e.notification().clone()))
                        .await;
                    return;
                }
            };
            let msg = buf.split_to(n).freeze();
            let t = msg[18];
            if usize::from(t) < 6 {
                stats.received[usize::from(t)].fetch_add(1, Ordering::Relaxed);
            }
            let ev = if t == MessageType::Update as u8 {
                let ctx = mode.borrow_and_update().clone();
                match ctx {
                    Some(ctx) => match decode_update(&msg, &ctx) {
                        Ok(ru) => ConnEvent::Routes(id, ru, Instant::now()),
                        Err(n) => ConnEvent::UpdateErr(id, n),
                    },
                    None => ConnEvent::RawUpdate(id, msg),
                }
            } else {
                match Message::decode(&msg, &frame_ctx) {
                    Ok(m) => ConnEvent::Msg(id, m),
                    Err(e) if t == MessageType::Open as u8 => {
                        ConnEvent::OpenErr(id, e.notification().clone())
                    }
                    Err(e) => ConnEvent::HeaderErr(id, e.notification().clone()),
                }
            };
            let stop = matches!(
                ev,
                ConnEvent::HeaderErr(..) | ConnEvent::OpenErr(..) | ConnEvent::UpdateErr(..)
            );
            let routes = matches!(ev, ConnEvent::Routes(..));
            if tx.send(ev).await.is_err() || stop {
                return;
            }
            if routes {
                // The session task that passes these on was woken onto this worker
                // and waits for it: let it run now rather than after the whole read
                // is decoded, so the speaker starts on the first UPDATE at once.
                tokio::task::yield_now().await;
            }
        }
    }
}

struct WriterShared {
    queued: Arc<AtomicUsize>,
    want: Arc<AtomicBool>,
    wake: mpsc::UnboundedSender<PeerIdx>,
    idx: PeerIdx,
    events: mpsc::Sender<ConnEvent>,
    send_hold: Duration,
    stats: Arc<PeerStats>,
}

async fn writer(
    mut w: OwnedWriteHalf,
    id: ConnId,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    sh: WriterShared,
) {
    let mut buf = BytesMut::with_capacity(256 << 10);
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut close = false;
        let mut update_bytes = 0usize;
        let mut push = |m: WriterMsg, buf: &mut BytesMut, close: &mut bool| match m {
            WriterMsg::Control(b) => buf.extend_from_slice(&b),
            WriterMsg::Update(b) => {
                PeerStats::count(&sh.stats.sent, &b);
                update_bytes += b.len();
                buf.extend_from_slice(&b);
            }
            WriterMsg::Close => *close = true,
        };
        push(first, &mut buf, &mut close);
        while !close && buf.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(m) => push(m, &mut buf, &mut close),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            match tokio::time::timeout(sh.send_hold, w.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    let _ = sh.events.send(ConnEvent::Closed(id)).await;
                    return;
                }
                Err(_) => {
                    let _ = sh.events.send(ConnEvent::SendHoldExpired(id)).await;
                    return;
                }
            }
            buf.clear();
        }
        if update_bytes > 0 {
            let left = sh.queued.fetch_sub(update_bytes, Ordering::Relaxed) - update_bytes;
            if left < LOW_WATER && sh.want.swap(false, Ordering::Relaxed) {
                let _ = sh.wake.send(sh.idx);
            }
        }
        if close {
            let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
            return;
        }
    }
}
