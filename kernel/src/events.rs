//! Link and route change notifications (`RTNLGRP_LINK`, `RTNLGRP_IPV4_ROUTE`,
//! `RTNLGRP_IPV6_ROUTE`) as an async stream of small typed events, so the node agent can resync
//! when someone changes the kernel behind its back; and a [`Coalescer`] that turns storms of
//! events (pods coming and going make `cali*`/`veth*` links and their routes churn) into a few
//! batches worth a resync.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::Stream;
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, TokioSocket};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

use crate::link::decode_link;
use crate::netlink::messages;
use crate::route::{decode_route, KernelRoute, RouteKey, MARGAY_RT_PROTO};
use crate::{netns, KernelError};

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// Whether a thing appeared (or changed) or went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// `RTM_NEWLINK`/`RTM_NEWROUTE`: created or changed.
    New,
    /// `RTM_DELLINK`/`RTM_DELROUTE`.
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub change: Change,
    pub index: u32,
    pub name: String,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEvent {
    pub change: Change,
    pub route: KernelRoute,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Link(LinkEvent),
    Route(RouteEvent),
    /// The kernel dropped notifications (our queue overflowed): anything may have changed,
    /// so resync everything.
    Overrun,
}

/// Decodes the events in one received datagram.
pub fn decode_events(datagram: &[u8]) -> Vec<KernelEvent> {
    let mut out = Vec::new();
    for m in messages(datagram) {
        let Ok(msg) =
            netlink_packet_core::NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes)
        else {
            continue;
        };
        let netlink_packet_core::NetlinkPayload::InnerMessage(inner) = msg.payload else {
            continue;
        };
        match inner {
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                let change = if m.kind == 16 {
                    Change::New
                } else {
                    Change::Deleted
                };
                let info = decode_link(&l);
                out.push(KernelEvent::Link(LinkEvent {
                    change,
                    index: info.index,
                    name: info.name,
                    up: l.header.flags.contains(LinkFlags::Up),
                }));
            }
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                let change = if m.kind == 24 {
                    Change::New
                } else {
                    Change::Deleted
                };
                if let Some(route) = decode_route(&r) {
                    out.push(KernelEvent::Route(RouteEvent { change, route }));
                }
            }
            _ => {}
        }
    }
    out
}

/// A subscription to link and route notifications of one network namespace.
pub struct EventSubscription {
    sock: TokioSocket,
    queue: VecDeque<KernelEvent>,
    buf: Vec<u8>,
}

impl EventSubscription {
    /// Subscribes in the calling thread's namespace, or in the one at `netns`. Must be called
    /// inside a tokio runtime.
    pub fn open(netns: Option<&Path>) -> Result<EventSubscription, KernelError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| KernelError::socket("open", std::io::Error::other(e.to_string())))?;
        let open = move || {
            let _entered = rt.enter();
            open_socket()
        };
        let sock = match netns {
            None => open()?,
            Some(p) => netns::run_in(p, open)??,
        };
        Ok(EventSubscription {
            sock,
            queue: VecDeque::new(),
            buf: Vec::with_capacity(256 * 1024),
        })
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Result<KernelEvent, KernelError> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            self.buf.clear();
            match self.sock.recv(&mut self.buf).await {
                Ok(()) => self.queue.extend(decode_events(&self.buf)),
                Err(e) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    return Ok(KernelEvent::Overrun)
                }
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => {}
                Err(e) => return Err(KernelError::socket("recv", e)),
            }
        }
    }

    /// The subscription as a `Stream`.
    pub fn into_stream(self) -> impl Stream<Item = Result<KernelEvent, KernelError>> {
        futures::stream::unfold(self, |mut s| async move {
            let e = s.next().await;
            Some((e, s))
        })
    }
}

fn open_socket() -> Result<TokioSocket, KernelError> {
    let mut ts = TokioSocket::new(NETLINK_ROUTE).map_err(|e| KernelError::socket("open", e))?;
    let s = ts.socket_mut();
    s.bind_auto().map_err(|e| KernelError::socket("bind", e))?;
    for g in [RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE] {
        s.add_membership(g)
            .map_err(|e| KernelError::socket("join multicast group", e))?;
    }
    if setsockopt(&s, sockopt::RcvBufForce, &(8usize << 20)).is_err() {
        let _ = s.set_rx_buf_sz(8usize << 20);
    }
    Ok(ts)
}

// ===== coalescing =====

/// How the [`Coalescer`] groups events.
#[derive(Debug, Clone)]
pub struct CoalescerConfig {
    /// Events arriving within this time of the first one go into one batch.
    pub window: Duration,
    /// Links whose names start with one of these are workload (pod) interfaces: their link
    /// events and the events of routes through them are counted, not reported. The CNI plugin
    /// owns those; the agent does not resync for them.
    pub workload_prefixes: Vec<String>,
}

impl Default for CoalescerConfig {
    fn default() -> Self {
        CoalescerConfig {
            window: Duration::from_millis(200),
            workload_prefixes: vec!["cali".into(), "veth".into()],
        }
    }
}

/// A batch of coalesced events: the last state of each link and route that changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    pub links: Vec<LinkEvent>,
    pub routes: Vec<RouteEvent>,
    /// Events dropped as workload churn in this window.
    pub suppressed: u64,
    /// Notifications were lost: resync everything.
    pub overrun: bool,
}

impl EventBatch {
    /// Whether a Margay route changed (someone deleted or replaced one of ours).
    pub fn touches_margay_routes(&self) -> bool {
        self.routes
            .iter()
            .any(|r| r.route.protocol == MARGAY_RT_PROTO)
    }
}

/// Groups events into batches (sans I/O: the caller passes the time).
#[derive(Debug)]
pub struct Coalescer {
    cfg: CoalescerConfig,
    workload_links: HashSet<u32>,
    links: BTreeMap<u32, LinkEvent>,
    routes: BTreeMap<(RouteKey, Option<u32>), RouteEvent>,
    suppressed: u64,
    overrun: bool,
    started: Option<Instant>,
}

impl Coalescer {
    pub fn new(cfg: CoalescerConfig) -> Coalescer {
        Coalescer {
            cfg,
            workload_links: HashSet::new(),
            links: BTreeMap::new(),
            routes: BTreeMap::new(),
            suppressed: 0,
            overrun: false,
            started: None,
        }
    }

    /// Tells the coalescer about links that exist already (from a dump), so routes through
    /// workload links are recognised before any link event.
    pub fn seed_links<'a>(&mut self, links: impl IntoIterator<Item = (u32, &'a str)>) {
        for (index, name) in links {
            if self.is_workload(name) {
                self.workload_links.insert(index);
            }
        }
    }

    fn is_workload(&self, name: &str) -> bool {
        self.cfg
            .workload_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    }

    /// Adds one event received at `now`.
    pub fn push(&mut self, ev: KernelEvent, now: Instant) {
        match ev {
            KernelEvent::Overrun => {
                self.overrun = true;
                self.started.get_or_insert(now);
            }
            KernelEvent::Link(l) => {
                if self.is_workload(&l.name) {
                    match l.change {
                        Change::New => self.workload_links.insert(l.index),
                        Change::Deleted => self.workload_links.remove(&l.index),
                    };
                    self.suppressed += 1;
                    return;
                }
                self.workload_links.remove(&l.index);
                self.links.insert(l.index, l);
                self.started.get_or_insert(now);
            }
            KernelEvent::Route(r) => {
                if r.route
                    .oif
                    .is_some_and(|i| self.workload_links.contains(&i))
                {
                    self.suppressed += 1;
                    return;
                }
                self.routes.insert((r.route.key(), r.route.oif), r);
                self.started.get_or_insert(now);
            }
        }
    }

    /// When the pending batch is due, if one is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|s| s + self.cfg.window)
    }

    /// Takes the pending batch if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<EventBatch> {
        match self.deadline() {
            Some(d) if d <= now => self.take(),
            _ => None,
        }
    }

    /// Takes the pending batch, due or not; `None` if nothing worth reporting is pending.
    pub fn take(&mut self) -> Option<EventBatch> {
        self.started = None;
        let batch = EventBatch {
            links: std::mem::take(&mut self.links).into_values().collect(),
            routes: std::mem::take(&mut self.routes).into_values().collect(),
            suppressed: std::mem::take(&mut self.suppressed),
            overrun: std::mem::take(&mut self.overrun),
        };
        if batch.links.is_empty() && batch.routes.is_empty() && !batch.overrun {
            None
        } else {
            Some(batch)
        }
    }
}

/// An [`EventSubscription`] read through a [`Coalescer`].
pub struct CoalescingSubscription {
    sub: EventSubscription,
    co: Coalescer,
}

impl CoalescingSubscription {
    pub fn new(sub: EventSubscription, co: Coalescer) -> Self {
        CoalescingSubscription { sub, co }
    }

    /// The next batch worth a look: waits for a first reportable event, then for the window
    /// to pass while collecting more.
    pub async fn next_batch(&mut self) -> Result<EventBatch, KernelError> {
        loop {
            match self.co.deadline() {
                None => {
                    let ev = self.sub.next().await?;
                    self.co.push(ev, Instant::now());
                }
                Some(d) => {
                    tokio::select! {
                        ev = self.sub.next() => self.co.push(ev?, Instant::now()),
                        _ = tokio::time::sleep_until(d.into()) => {
                            if let Some(b) = self.co.take() {
                                return Ok(b);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RouteType;

    fn link(change: Change, index: u32, name: &str) -> KernelEvent {
        KernelEvent::Link(LinkEvent {
            change,
            index,
            name: name.into(),
            up: true,
        })
    }

    fn route(change: Change, dst: &str, oif: Option<u32>, protocol: u8) -> KernelEvent {
        KernelEvent::Route(RouteEvent {
            change,
            route: KernelRoute {
                dst: dst.parse().unwrap(),
                table: 254,
                protocol,
                kind: RouteType::Unicast,
                scope: 0,
                gateway: None,
                oif,
                onlink: false,
                metric: None,
                multipath: Vec::new(),
            },
        })
    }

    #[test]
    fn workload_storm_is_suppressed_but_margay_route_deletion_is_reported() {
        let mut c = Coalescer::new(CoalescerConfig::default());
        let t0 = Instant::now();
        for i in 0..500u32 {
            c.push(link(Change::New, 100 + i, &format!("cali{i:011x}")), t0);
            c.push(
                route(
                    Change::New,
                    &format!("10.65.{}.{}/32", i / 256, i % 256),
                    Some(100 + i),
                    4,
                ),
                t0,
            );
            c.push(link(Change::Deleted, 100 + i, &format!("cali{i:011x}")), t0);
        }
        assert_eq!(c.deadline(), None, "nothing reportable yet");
        assert_eq!(c.take(), None);
        c.push(
            route(Change::Deleted, "10.65.7.0/26", None, MARGAY_RT_PROTO),
            t0,
        );
        assert!(c.take_due(t0).is_none(), "not due before the window");
        let b = c.take_due(t0 + Duration::from_millis(250)).expect("due");
        assert_eq!(b.routes.len(), 1);
        assert!(b.touches_margay_routes());
        assert_eq!(b.routes[0].change, Change::Deleted);
        assert_eq!(
            b.suppressed, 0,
            "suppressed count was reset by the empty take"
        );
    }

    #[test]
    fn repeated_changes_of_one_route_collapse_to_the_last() {
        let mut c = Coalescer::new(CoalescerConfig::default());
        let t = Instant::now();
        c.push(route(Change::New, "10.65.1.0/26", None, MARGAY_RT_PROTO), t);
        c.push(
            route(Change::Deleted, "10.65.1.0/26", None, MARGAY_RT_PROTO),
            t,
        );
        c.push(route(Change::New, "10.65.1.0/26", None, MARGAY_RT_PROTO), t);
        c.push(link(Change::New, 2, "eth0"), t);
        c.push(link(Change::New, 2, "eth0"), t);
        let b = c.take().unwrap();
        assert_eq!(b.routes.len(), 1);
        assert_eq!(b.routes[0].change, Change::New);
        assert_eq!(b.links.len(), 1);
    }

    #[test]
    fn seeded_workload_links_hide_their_routes_and_overrun_is_reported() {
        let mut c = Coalescer::new(CoalescerConfig::default());
        c.seed_links([(7, "cali0123456789a"), (2, "eth0")]);
        let t = Instant::now();
        c.push(
            route(Change::Deleted, "10.65.0.9/32", Some(7), MARGAY_RT_PROTO),
            t,
        );
        assert_eq!(c.take(), None);
        c.push(route(Change::Deleted, "0.0.0.0/0", Some(2), 16), t);
        c.push(KernelEvent::Overrun, t);
        let b = c.take().unwrap();
        assert!(b.overrun);
        assert_eq!(b.routes.len(), 1);
    }
}
