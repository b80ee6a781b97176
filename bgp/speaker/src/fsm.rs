//! The BGP session state machine (RFC 4271 §8), without I/O.
//!
//! [`Fsm::handle`] takes one [`Event`] (named as in RFC 4271 §8.1) and returns the
//! [`Action`]s the driver must carry out: open a TCP connection, send a message on a
//! connection, close one, arm or stop a timer, report the session up or down. Nothing
//! here reads a clock or a socket, so every state and event is tested synchronously.
//!
//! Beyond the RFC's mandatory parts it does:
//! - connection collision detection (§6.8) with up to two connections at once (the
//!   session's own and one candidate that arrived while OPENs were in flight);
//! - connect modes: active only, passive only, or both;
//! - damping of peer oscillations (§8.1.1 `DampPeerOscillations`): after each failure
//!   the next automatic start waits an IdleHoldTime that doubles up to a ceiling, so a
//!   peer that answers every OPEN with a NOTIFICATION costs one attempt per back-off
//!   period, not a busy loop;
//! - the send hold timer (RFC 9687): the driver reports that a peer has not read from
//!   us for the send hold time, the FSM closes the session with error code 8;
//! - a GR peer that reconnects while its old session still looks Established (RFC 4724
//!   §4.2) replaces it rather than being refused.

use std::net::Ipv4Addr;
use std::time::Duration;

use margay_bgp_wire::{
    code, subcode, Capability, Context, Families, Family, GracefulRestart, Notification, Open,
};

/// RFC 4271 §8.2.2: "a large value" for the hold timer while waiting for OPEN.
pub const OPEN_HOLD_TIME: Duration = Duration::from_secs(240);

/// Error code for an expired send hold timer (RFC 9687 §4).
pub const SEND_HOLD_TIMER_EXPIRED: u8 = 8;

/// FSM error subcodes (RFC 6608 §3).
pub mod fsm_subcode {
    pub const UNEXPECTED_IN_OPENSENT: u8 = 1;
    pub const UNEXPECTED_IN_OPENCONFIRM: u8 = 2;
    pub const UNEXPECTED_IN_ESTABLISHED: u8 = 3;
}

/// Cease subcodes (RFC 4486 §4).
pub mod cease {
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    pub const CONNECTION_COLLISION_RESOLUTION: u8 = 7;
}

/// The six session states (RFC 4271 §8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Idle => "Idle",
            Self::Connect => "Connect",
            Self::Active => "Active",
            Self::OpenSent => "OpenSent",
            Self::OpenConfirm => "OpenConfirm",
            Self::Established => "Established",
        })
    }
}

/// Which side may open the TCP connection.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ConnectMode {
    /// Connect out and accept connections from the peer (the default).
    #[default]
    Both,
    /// Only connect out; refuse the peer's connections.
    Active,
    /// Only accept the peer's connections; never connect out.
    Passive,
}

/// A TCP connection, named by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// We connected to the peer.
    Outbound,
    /// The peer connected to us.
    Inbound,
}

/// The timers the FSM arms. The send hold timer lives in the driver, which alone knows
/// whether writes make progress; it reports expiry as [`Event::SendHoldTimerExpires`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
    /// Back-off before an automatic restart (RFC 4271 §8.1.1 IdleHoldTimer).
    IdleHold,
}

/// FSM inputs, with the RFC 4271 §8.1 event names (event numbers in the comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// 1: the operator starts the session.
    ManualStart,
    /// 2: the operator stops the session; the text goes in the Cease/Administrative
    /// Shutdown NOTIFICATION (RFC 9003).
    ManualStop { message: String },
    /// 3: the local system starts the session (after an IdleHold back-off).
    AutomaticStart,
    /// 8: the local system stops the session, sending this NOTIFICATION (for example
    /// Cease/Maximum Number of Prefixes Reached). It restarts after the back-off.
    AutomaticStop(Notification),
    /// 9.
    ConnectRetryTimerExpires,
    /// 10.
    HoldTimerExpires,
    /// 11.
    KeepaliveTimerExpires,
    /// 13.
    IdleHoldTimerExpires,
    /// RFC 9687: the peer has not read from us for the send hold time.
    SendHoldTimerExpires,
    /// 16: our outbound connection is up.
    TcpCrAcked(ConnId),
    /// 17: the peer's connection to us was accepted.
    TcpConnectionConfirmed(ConnId),
    /// 18: a connection failed or was closed by the peer.
    TcpConnectionFails(ConnId),
    /// 19: a valid OPEN arrived.
    BgpOpen(ConnId, Open),
    /// 21: a message header could not be read; send this NOTIFICATION.
    BgpHeaderErr(ConnId, Notification),
    /// 22: an OPEN could not be read; send this NOTIFICATION.
    BgpOpenMsgErr(ConnId, Notification),
    /// 24: a NOTIFICATION with a version error arrived.
    NotifMsgVerErr(ConnId),
    /// 25: a NOTIFICATION arrived.
    NotifMsg(ConnId, Notification),
    /// 26.
    KeepAliveMsg(ConnId),
    /// 27.
    UpdateMsg(ConnId),
    /// 28: an UPDATE that calls for a session reset; send this NOTIFICATION.
    UpdateMsgErr(ConnId, Notification),
    /// A ROUTE-REFRESH arrived (RFC 2918); treated like an UPDATE for the FSM.
    RouteRefreshMsg(ConnId),
}

/// A message the FSM asks the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Open(Open),
    Keepalive,
    Notification(Notification),
}

/// Why a session or a connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    /// We sent this NOTIFICATION.
    NotificationSent(Notification),
    /// The peer sent this NOTIFICATION.
    NotificationReceived(Notification),
    /// The TCP connection failed or the peer closed it without a NOTIFICATION.
    ConnectionClosed,
    /// The peer (which had negotiated graceful restart) reconnected while the old
    /// session was up: it has restarted (RFC 4724 §4.2).
    PeerRestarted,
}

impl DownReason {
    /// RFC 4724 §4.2: routes are kept as stale only when the session ended without a
    /// NOTIFICATION.
    pub fn allows_graceful_restart(&self) -> bool {
        matches!(self, Self::ConnectionClosed | Self::PeerRestarted)
    }
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotificationSent(n) => write!(f, "sent {n}"),
            Self::NotificationReceived(n) => write!(f, "received {n}"),
            Self::ConnectionClosed => f.write_str("connection closed"),
            Self::PeerRestarted => f.write_str("peer restarted"),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start an outbound TCP connection; report it with `TcpCrAcked` or
    /// `TcpConnectionFails`.
    Connect,
    /// Give up an outbound connection attempt still in progress.
    AbortConnect,
    Send(ConnId, Outgoing),
    /// Close the connection (after sending what was queued on it).
    Close(ConnId),
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// The session is up.
    Established(Box<Negotiated>),
    /// The Established session went down: withdraw (or, with graceful restart, mark
    /// stale) what the peer sent us.
    SessionDown(DownReason),
    /// A session that had not reached Established failed (for status and logs).
    ConnectionFailed(DownReason),
}

/// What the two OPENs agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub conn: ConnId,
    pub direction: Direction,
    pub local_open: Open,
    pub peer_open: Open,
    pub peer_asn: u32,
    pub peer_id: Ipv4Addr,
    /// min(ours, theirs); 0 means no keepalives and no hold timer.
    pub hold_time: u16,
    pub keepalive_time: u16,
    /// Codec context for this session.
    pub ctx: Context,
    /// Address families both sides advertised (IPv4 unicast when the peer sent no
    /// Multiprotocol capability, RFC 4760 §8).
    pub families: Families,
    /// The peer accepts ROUTE-REFRESH (RFC 2918).
    pub peer_route_refresh: bool,
    /// Both OPENs carry the Enhanced Route Refresh capability (RFC 7313 §3): refresh
    /// answers are framed by BoRR and EoRR, both ways.
    pub enhanced_route_refresh: bool,
    /// The peer's graceful restart capability, if it sent one and we sent ours.
    pub peer_graceful_restart: Option<GracefulRestart>,
}

/// Configuration of one session's FSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsmConfig {
    pub local_asn: u32,
    pub peer_asn: u32,
    pub router_id: Ipv4Addr,
    /// The hold time we propose: 0, or at least 3.
    pub hold_time: u16,
    pub connect_retry: Duration,
    pub mode: ConnectMode,
    /// Capabilities for our OPEN (4-octet AS is added if missing).
    pub capabilities: Vec<Capability>,
    /// First back-off after a failure; doubles each further failure.
    pub idle_hold: Duration,
    pub max_idle_hold: Duration,
}

impl FsmConfig {
    /// A configuration with common defaults (hold 90 s, connect retry 30 s,
    /// back-off 1 s doubling to 120 s, both connect modes, IPv4 unicast only).
    pub fn new(local_asn: u32, peer_asn: u32, router_id: Ipv4Addr) -> Self {
        Self {
            local_asn,
            peer_asn,
            router_id,
            hold_time: 90,
            connect_retry: Duration::from_secs(30),
            mode: ConnectMode::Both,
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: Family::AFI_IPV4,
                    safi: Family::SAFI_UNICAST,
                },
                Capability::RouteRefresh,
            ],
            idle_hold: Duration::from_secs(1),
            max_idle_hold: Duration::from_secs(120),
        }
    }
}

/// A connection that arrived while the session's own one was exchanging OPENs.
#[derive(Debug, Clone)]
struct Candidate {
    conn: ConnId,
    direction: Direction,
    open: Option<Open>,
}

/// One BGP session's state machine.
#[derive(Debug, Clone)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    /// The connection the session runs on (from OpenSent on).
    conn: Option<(ConnId, Direction)>,
    candidate: Option<Candidate>,
    negotiated: Option<Negotiated>,
    /// The operator wants the session up: failures restart it after the back-off.
    admin_up: bool,
    /// Failures since the session was last stable; sets the back-off.
    failures: u32,
    /// KEEPALIVEs received since Established; three mean the session was stable.
    keepalives_in_established: u32,
    connect_retry_counter: u32,
    last_error: Option<DownReason>,
}

// ===== impl Fsm =====

impl Fsm {
    pub fn new(config: FsmConfig) -> Self {
        Self {
            config,
            state: State::Idle,
            conn: None,
            candidate: None,
            negotiated: None,
            admin_up: false,
            failures: 0,
            keepalives_in_established: 0,
            connect_retry_counter: 0,
            last_error: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &FsmConfig {
        &self.config
    }

    /// The session's connection, once one is in OpenSent or later.
    pub fn connection(&self) -> Option<ConnId> {
        self.conn.map(|c| c.0)
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    pub fn last_error(&self) -> Option<&DownReason> {
        self.last_error.as_ref()
    }

    /// Failures since the session was last stable.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn connect_retry_counter(&self) -> u32 {
        self.connect_retry_counter
    }

    /// The OPEN we send.
    pub fn local_open(&self) -> Open {
        Open::new(
            self.config.local_asn,
            self.config.hold_time,
            self.config.router_id,
            self.config.capabilities.clone(),
        )
    }

    /// The IdleHoldTime for the next automatic start.
    pub fn back_off(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(16);
        self.config
            .idle_hold
            .saturating_mul(1u32 << shift)
            .min(self.config.max_idle_hold)
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match self.state {
            State::Idle => self.idle(event, &mut out),
            State::Connect | State::Active => self.connect_or_active(event, &mut out),
            State::OpenSent | State::OpenConfirm => self.opening(event, &mut out),
            State::Established => self.established(event, &mut out),
        }
        out
    }

    // ----- per-state handlers -----

    fn idle(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::ManualStart => {
                self.admin_up = true;
                self.failures = 0;
                self.connect_retry_counter = 0;
                out.push(Action::StopTimer(Timer::IdleHold));
                self.start(out);
            }
            Event::AutomaticStart | Event::IdleHoldTimerExpires if self.admin_up => self.start(out),
            Event::ManualStop { .. } => {
                self.admin_up = false;
                out.push(Action::StopTimer(Timer::IdleHold));
            }
            // RFC 4271 §8.2.2 Idle: connections are refused.
            Event::TcpConnectionConfirmed(c) | Event::TcpCrAcked(c) => out.push(Action::Close(c)),
            _ => {}
        }
    }

    fn start(&mut self, out: &mut Vec<Action>) {
        self.conn = None;
        self.candidate = None;
        self.negotiated = None;
        if self.config.mode == ConnectMode::Passive {
            self.state = State::Active;
        } else {
            out.push(Action::StartTimer(
                Timer::ConnectRetry,
                self.config.connect_retry,
            ));
            out.push(Action::Connect);
            self.state = State::Connect;
        }
    }

    fn connect_or_active(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::ManualStart | Event::AutomaticStart | Event::IdleHoldTimerExpires => {}
            Event::ManualStop { .. } => {
                self.admin_up = false;
                self.connect_retry_counter = 0;
                self.abandon_connect(out);
                self.state = State::Idle;
            }
            Event::AutomaticStop(n) => {
                self.abandon_connect(out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::ConnectRetryTimerExpires => {
                if self.config.mode == ConnectMode::Passive {
                    return;
                }
                if self.state == State::Connect {
                    out.push(Action::AbortConnect);
                }
                self.connect_retry_counter += 1;
                out.push(Action::StartTimer(
                    Timer::ConnectRetry,
                    self.config.connect_retry,
                ));
                out.push(Action::Connect);
                self.state = State::Connect;
            }
            Event::TcpCrAcked(c) => self.connection_up(c, Direction::Outbound, out),
            Event::TcpConnectionConfirmed(c) => {
                if self.config.mode == ConnectMode::Active {
                    out.push(Action::Close(c));
                } else {
                    if self.state == State::Connect {
                        out.push(Action::AbortConnect);
                    }
                    self.connection_up(c, Direction::Inbound, out);
                }
            }
            // The outbound attempt failed: wait in Active (still accepting the
            // peer's connection) for the ConnectRetryTimer.
            Event::TcpConnectionFails(_) if self.state == State::Connect => {
                self.state = State::Active;
            }
            // No connection exists in these states: messages cannot arrive and the
            // session timers are not running, so anything else is stale.
            _ => {}
        }
    }

    fn abandon_connect(&mut self, out: &mut Vec<Action>) {
        if self.state == State::Connect {
            out.push(Action::AbortConnect);
        }
        out.push(Action::StopTimer(Timer::ConnectRetry));
    }

    fn connection_up(&mut self, c: ConnId, direction: Direction, out: &mut Vec<Action>) {
        out.push(Action::StopTimer(Timer::ConnectRetry));
        out.push(Action::Send(c, Outgoing::Open(self.local_open())));
        out.push(Action::StartTimer(Timer::Hold, OPEN_HOLD_TIME));
        self.conn = Some((c, direction));
        self.state = State::OpenSent;
    }

    /// OpenSent and OpenConfirm.
    fn opening(&mut self, event: Event, out: &mut Vec<Action>) {
        let Some((primary, _)) = self.conn else {
            // Unreachable by construction: these states always have a connection.
            self.state = State::Idle;
            return;
        };
        let unexpected = if self.state == State::OpenSent {
            fsm_subcode::UNEXPECTED_IN_OPENSENT
        } else {
            fsm_subcode::UNEXPECTED_IN_OPENCONFIRM
        };
        match event {
            Event::ManualStart | Event::AutomaticStart | Event::IdleHoldTimerExpires => {}
            Event::ManualStop { message } => self.manual_stop(&message, out),
            Event::AutomaticStop(n) => {
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::HoldTimerExpires => {
                let n = Notification::error(code::HOLD_TIMER_EXPIRED, 0, Vec::new());
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::SendHoldTimerExpires => {
                let n = Notification::error(SEND_HOLD_TIMER_EXPIRED, 0, Vec::new());
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::KeepaliveTimerExpires => {
                if self.state == State::OpenConfirm {
                    out.push(Action::Send(primary, Outgoing::Keepalive));
                    self.arm_keepalive(out);
                }
            }
            Event::ConnectRetryTimerExpires => {}
            Event::TcpConnectionConfirmed(c) | Event::TcpCrAcked(c) => {
                let direction = if matches!(event, Event::TcpCrAcked(_)) {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                };
                if self.candidate.is_some()
                    || (direction == Direction::Inbound && self.config.mode == ConnectMode::Active)
                {
                    out.push(Action::Close(c));
                } else {
                    // §6.8: both connections send OPEN; the first OPEN received settles
                    // which one survives.
                    out.push(Action::Send(c, Outgoing::Open(self.local_open())));
                    self.candidate = Some(Candidate {
                        conn: c,
                        direction,
                        open: None,
                    });
                }
            }
            Event::TcpConnectionFails(c) => {
                if self.is_candidate(c) {
                    self.candidate = None;
                } else if c == primary {
                    out.push(Action::Close(c));
                    if let Some(cand) = self.candidate.take() {
                        self.promote(cand, out);
                    } else if self.state == State::OpenSent {
                        // §8.2.2 OpenSent, event 18: back to Active, keep listening.
                        self.conn = None;
                        self.last_error = Some(DownReason::ConnectionClosed);
                        out.push(Action::ConnectionFailed(DownReason::ConnectionClosed));
                        out.push(Action::StopTimer(Timer::Hold));
                        out.push(Action::StartTimer(
                            Timer::ConnectRetry,
                            self.config.connect_retry,
                        ));
                        self.state = State::Active;
                    } else {
                        self.conn = None;
                        self.fail(DownReason::ConnectionClosed, out);
                    }
                }
            }
            Event::BgpOpen(c, open) => {
                if self.is_candidate(c) {
                    if let Some(cand) = self.candidate.as_mut() {
                        cand.open = Some(open.clone());
                    }
                    // If the candidate wins it becomes the primary and its OPEN is
                    // processed; if it loses it is closed.
                    if self.resolve_collision(open.bgp_id, out).is_some() {
                        self.process_open(c, open, out);
                    }
                } else if c == primary {
                    if self.state == State::OpenConfirm {
                        self.fsm_error(unexpected, out);
                        return;
                    }
                    if self.candidate.is_some() {
                        if let Some((winner, winner_open)) =
                            self.resolve_collision(open.bgp_id, out)
                        {
                            // The candidate won: it waits for its own OPEN, or
                            // processes the one it already has.
                            if let Some(o) = winner_open {
                                self.process_open(winner, o, out);
                            }
                            return;
                        }
                    }
                    self.process_open(c, open, out);
                }
            }
            Event::BgpHeaderErr(c, n) | Event::BgpOpenMsgErr(c, n) | Event::UpdateMsgErr(c, n) => {
                if self.is_candidate(c) {
                    out.push(Action::Send(c, Outgoing::Notification(n)));
                    out.push(Action::Close(c));
                    self.candidate = None;
                } else if c == primary {
                    self.close_all_with(&n, out);
                    self.fail(DownReason::NotificationSent(n), out);
                }
            }
            Event::NotifMsgVerErr(c) => {
                if self.is_candidate(c) {
                    out.push(Action::Close(c));
                    self.candidate = None;
                } else if c == primary {
                    // §8.2.2: a version error is not a failure to damp.
                    self.close_all(out);
                    let reason = DownReason::NotificationReceived(Notification::error(
                        code::OPEN_MESSAGE,
                        subcode::UNSUPPORTED_VERSION_NUMBER,
                        Vec::new(),
                    ));
                    self.last_error = Some(reason.clone());
                    out.push(Action::ConnectionFailed(reason));
                    out.push(Action::StopTimer(Timer::Hold));
                    out.push(Action::StopTimer(Timer::Keepalive));
                    self.state = State::Idle;
                    if self.admin_up {
                        out.push(Action::StartTimer(Timer::IdleHold, self.config.idle_hold));
                    }
                }
            }
            Event::NotifMsg(c, n) => {
                if self.is_candidate(c) {
                    out.push(Action::Close(c));
                    self.candidate = None;
                } else if c == primary {
                    self.close_all(out);
                    self.fail(DownReason::NotificationReceived(n), out);
                }
            }
            Event::KeepAliveMsg(c) => {
                if self.is_candidate(c) {
                    return;
                }
                if c != primary {
                    return;
                }
                if self.state == State::OpenSent {
                    self.fsm_error(unexpected, out);
                    return;
                }
                // OpenConfirm → Established.
                if let Some(cand) = self.candidate.take() {
                    out.push(Action::Send(
                        cand.conn,
                        Outgoing::Notification(Notification::error(
                            code::CEASE,
                            cease::CONNECTION_COLLISION_RESOLUTION,
                            Vec::new(),
                        )),
                    ));
                    out.push(Action::Close(cand.conn));
                }
                self.arm_hold(out);
                self.keepalives_in_established = 0;
                self.state = State::Established;
                if let Some(n) = self.negotiated.clone() {
                    out.push(Action::Established(Box::new(n)));
                }
            }
            Event::UpdateMsg(c) | Event::RouteRefreshMsg(c) => {
                if c == primary {
                    self.fsm_error(unexpected, out);
                }
            }
        }
    }

    fn established(&mut self, event: Event, out: &mut Vec<Action>) {
        let Some((primary, _)) = self.conn else {
            self.state = State::Idle;
            return;
        };
        match event {
            Event::ManualStart | Event::AutomaticStart | Event::IdleHoldTimerExpires => {}
            Event::ConnectRetryTimerExpires => {}
            Event::ManualStop { message } => self.manual_stop(&message, out),
            Event::AutomaticStop(n) => {
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::HoldTimerExpires => {
                let n = Notification::error(code::HOLD_TIMER_EXPIRED, 0, Vec::new());
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::SendHoldTimerExpires => {
                let n = Notification::error(SEND_HOLD_TIMER_EXPIRED, 0, Vec::new());
                self.close_all_with(&n, out);
                self.fail(DownReason::NotificationSent(n), out);
            }
            Event::KeepaliveTimerExpires => {
                out.push(Action::Send(primary, Outgoing::Keepalive));
                self.arm_keepalive(out);
            }
            Event::TcpConnectionConfirmed(c) | Event::TcpCrAcked(c) => {
                let inbound = matches!(event, Event::TcpConnectionConfirmed(_));
                let gr = self
                    .negotiated
                    .as_ref()
                    .is_some_and(|n| n.peer_graceful_restart.is_some());
                if inbound && gr && self.config.mode != ConnectMode::Active {
                    // RFC 4724 §4.2: the peer restarted; its old connection is dead.
                    out.push(Action::Close(primary));
                    out.push(Action::StopTimer(Timer::Keepalive));
                    out.push(Action::SessionDown(DownReason::PeerRestarted));
                    self.last_error = Some(DownReason::PeerRestarted);
                    self.negotiated = None;
                    self.connection_up(c, Direction::Inbound, out);
                } else {
                    // §6.8: a connection colliding with an Established one is closed.
                    out.push(Action::Send(
                        c,
                        Outgoing::Notification(Notification::error(
                            code::CEASE,
                            cease::CONNECTION_COLLISION_RESOLUTION,
                            Vec::new(),
                        )),
                    ));
                    out.push(Action::Close(c));
                }
            }
            Event::TcpConnectionFails(c) => {
                if c == primary {
                    out.push(Action::Close(c));
                    self.conn = None;
                    self.fail(DownReason::ConnectionClosed, out);
                }
            }
            Event::BgpOpen(c, _) => {
                if c == primary {
                    self.fsm_error(fsm_subcode::UNEXPECTED_IN_ESTABLISHED, out);
                }
            }
            Event::BgpHeaderErr(c, n) | Event::BgpOpenMsgErr(c, n) | Event::UpdateMsgErr(c, n) => {
                if c == primary {
                    self.close_all_with(&n, out);
                    self.fail(DownReason::NotificationSent(n), out);
                }
            }
            Event::NotifMsgVerErr(c) => {
                if c == primary {
                    self.close_all(out);
                    let n = Notification::error(
                        code::OPEN_MESSAGE,
                        subcode::UNSUPPORTED_VERSION_NUMBER,
                        Vec::new(),
                    );
                    self.fail(DownReason::NotificationReceived(n), out);
                }
            }
            Event::NotifMsg(c, n) => {
                if c == primary {
                    self.close_all(out);
                    self.fail(DownReason::NotificationReceived(n), out);
                }
            }
            Event::KeepAliveMsg(c) => {
                if c == primary {
                    self.keepalives_in_established =
                        self.keepalives_in_established.saturating_add(1);
                    if self.keepalives_in_established >= 3 {
                        self.failures = 0;
                    }
                    self.arm_hold(out);
                }
            }
            Event::UpdateMsg(c) | Event::RouteRefreshMsg(c) => {
                if c == primary {
                    self.arm_hold(out);
                }
            }
        }
    }

    // ----- helpers -----

    fn is_candidate(&self, c: ConnId) -> bool {
        self.candidate.as_ref().is_some_and(|cand| cand.conn == c)
    }

    /// §6.8: keep the connection opened by the speaker with the higher BGP
    /// Identifier; close the other with Cease/Connection Collision Resolution.
    /// Returns the candidate and its OPEN (if one came) when the candidate won.
    fn resolve_collision(
        &mut self,
        peer_id: Ipv4Addr,
        out: &mut Vec<Action>,
    ) -> Option<(ConnId, Option<Open>)> {
        let (Some((primary, pdir)), Some(cand)) = (self.conn, self.candidate.clone()) else {
            return None;
        };
        let keep_dir = if u32::from(self.config.router_id) < u32::from(peer_id) {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let collision = Notification::error(
            code::CEASE,
            cease::CONNECTION_COLLISION_RESOLUTION,
            Vec::new(),
        );
        if pdir != keep_dir && cand.direction == keep_dir {
            out.push(Action::Send(primary, Outgoing::Notification(collision)));
            out.push(Action::Close(primary));
            self.candidate = None;
            self.negotiated = None;
            self.conn = Some((cand.conn, cand.direction));
            self.state = State::OpenSent;
            out.push(Action::StopTimer(Timer::Keepalive));
            out.push(Action::StartTimer(Timer::Hold, OPEN_HOLD_TIME));
            Some((cand.conn, cand.open))
        } else {
            out.push(Action::Send(cand.conn, Outgoing::Notification(collision)));
            out.push(Action::Close(cand.conn));
            self.candidate = None;
            None
        }
    }

    /// The primary failed; the candidate takes over.
    fn promote(&mut self, cand: Candidate, out: &mut Vec<Action>) {
        self.conn = Some((cand.conn, cand.direction));
        self.negotiated = None;
        self.state = State::OpenSent;
        out.push(Action::StopTimer(Timer::Keepalive));
        out.push(Action::StartTimer(Timer::Hold, OPEN_HOLD_TIME));
        if let Some(open) = cand.open {
            self.process_open(cand.conn, open, out);
        }
    }

    /// Checks a received OPEN (§6.2 checks the codec cannot make) and moves to
    /// OpenConfirm.
    fn process_open(&mut self, c: ConnId, open: Open, out: &mut Vec<Action>) {
        if let Err(n) = self.check_open(&open) {
            self.close_all_with(&n, out);
            self.fail(DownReason::NotificationSent(n), out);
            return;
        }
        let local = self.local_open();
        let hold = self.config.hold_time.min(open.hold_time);
        let is_ebgp = self.config.local_asn != self.config.peer_asn;
        let ctx = Context::negotiate(&local, &open, is_ebgp);
        let families = negotiate_families(&local, &open);
        let peer_rr = open
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh));
        let has_err = |o: &Open| {
            o.capabilities
                .iter()
                .any(|c| matches!(c, Capability::EnhancedRouteRefresh))
        };
        let err = has_err(&local) && has_err(&open);
        let we_gr = local
            .capabilities
            .iter()
            .any(|c| matches!(c, Capability::GracefulRestart(_)));
        let peer_gr = open.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) if we_gr => Some(g.clone()),
            _ => None,
        });
        let direction = self.conn.map(|p| p.1).unwrap_or(Direction::Inbound);
        self.negotiated = Some(Negotiated {
            conn: c,
            direction,
            peer_asn: open.asn(),
            peer_id: open.bgp_id,
            hold_time: hold,
            keepalive_time: hold / 3,
            ctx,
            families,
            peer_route_refresh: peer_rr,
            enhanced_route_refresh: err,
            peer_graceful_restart: peer_gr,
            local_open: local,
            peer_open: open,
        });
        out.push(Action::StopTimer(Timer::ConnectRetry));
        out.push(Action::Send(c, Outgoing::Keepalive));
        if hold > 0 {
            self.arm_keepalive(out);
            out.push(Action::StartTimer(
                Timer::Hold,
                Duration::from_secs(u64::from(hold)),
            ));
        } else {
            out.push(Action::StopTimer(Timer::Hold));
        }
        self.state = State::OpenConfirm;
    }

    fn check_open(&self, open: &Open) -> Result<(), Notification> {
        let open_err = |sub: u8, data: Vec<u8>| Notification::error(code::OPEN_MESSAGE, sub, data);
        if open.asn() != self.config.peer_asn {
            return Err(open_err(
                subcode::BAD_PEER_AS,
                open.my_as.to_be_bytes().to_vec(),
            ));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return Err(open_err(subcode::UNACCEPTABLE_HOLD_TIME, Vec::new()));
        }
        // RFC 6286 §2.2: within an AS the identifiers must differ.
        if open.bgp_id == self.config.router_id && self.config.local_asn == self.config.peer_asn {
            return Err(open_err(subcode::BAD_BGP_IDENTIFIER, Vec::new()));
        }
        Ok(())
    }

    fn arm_keepalive(&self, out: &mut Vec<Action>) {
        let hold = self
            .negotiated
            .as_ref()
            .map(|n| n.hold_time)
            .unwrap_or(self.config.hold_time);
        if hold > 0 {
            let ka = Duration::from_millis(u64::from(hold) * 1000 / 3);
            out.push(Action::StartTimer(Timer::Keepalive, ka));
        }
    }

    fn arm_hold(&self, out: &mut Vec<Action>) {
        if let Some(n) = &self.negotiated {
            if n.hold_time > 0 {
                out.push(Action::StartTimer(
                    Timer::Hold,
                    Duration::from_secs(u64::from(n.hold_time)),
                ));
            }
        }
    }

    fn manual_stop(&mut self, message: &str, out: &mut Vec<Action>) {
        let n = Notification::shutdown(cease::ADMINISTRATIVE_SHUTDOWN, message);
        let was_established = self.state == State::Established;
        self.close_all_with(&n, out);
        self.stop_session_timers(out);
        self.admin_up = false;
        self.connect_retry_counter = 0;
        self.conn = None;
        self.negotiated = None;
        self.state = State::Idle;
        let reason = DownReason::NotificationSent(n);
        if was_established {
            out.push(Action::SessionDown(reason.clone()));
        }
        self.last_error = Some(reason);
    }

    fn fsm_error(&mut self, sub: u8, out: &mut Vec<Action>) {
        let n = Notification::error(code::FSM, sub, Vec::new());
        self.close_all_with(&n, out);
        self.fail(DownReason::NotificationSent(n), out);
    }

    fn close_all_with(&mut self, n: &Notification, out: &mut Vec<Action>) {
        if let Some((c, _)) = self.conn {
            out.push(Action::Send(c, Outgoing::Notification(n.clone())));
        }
        self.close_all(out);
    }

    fn close_all(&mut self, out: &mut Vec<Action>) {
        if let Some((c, _)) = self.conn.take() {
            out.push(Action::Close(c));
        }
        if let Some(cand) = self.candidate.take() {
            out.push(Action::Close(cand.conn));
        }
    }

    fn stop_session_timers(&self, out: &mut Vec<Action>) {
        out.push(Action::StopTimer(Timer::ConnectRetry));
        out.push(Action::StopTimer(Timer::Hold));
        out.push(Action::StopTimer(Timer::Keepalive));
    }

    /// Any failure: to Idle, and if the operator wants the session up, restart after
    /// the (growing) back-off.
    fn fail(&mut self, reason: DownReason, out: &mut Vec<Action>) {
        let was_established = self.state == State::Established;
        if was_established && self.keepalives_in_established >= 3 {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.connect_retry_counter += 1;
        self.stop_session_timers(out);
        self.conn = None;
        self.candidate = None;
        self.negotiated = None;
        self.state = State::Idle;
        if was_established {
            out.push(Action::SessionDown(reason.clone()));
        } else {
            out.push(Action::ConnectionFailed(reason.clone()));
        }
        self.last_error = Some(reason);
        if self.admin_up {
            out.push(Action::StartTimer(Timer::IdleHold, self.back_off()));
        }
    }
}

/// The unicast families both OPENs carry. An OPEN without any Multiprotocol
/// capability means IPv4 unicast only (RFC 4760 §8).
pub fn negotiate_families(local: &Open, remote: &Open) -> Families {
    let fams = |o: &Open| {
        let mut f = Families::NONE;
        let mut any = false;
        for c in &o.capabilities {
            if let Capability::Multiprotocol { afi, safi } = c {
                any = true;
                if let Some(fam) = Family::from_afi_safi(*afi, *safi) {
                    f.insert(fam);
                }
            }
        }
        if !any {
            f.insert(Family::Ipv4Unicast);
        }
        f
    };
    let (a, b) = (fams(local), fams(remote));
    Families {
        ipv4_unicast: a.ipv4_unicast && b.ipv4_unicast,
        ipv6_unicast: a.ipv6_unicast && b.ipv6_unicast,
    }
}

#[cfg(test)]
mod tests;
