//! Routes: what Margay asks for ([`Route`], [`WriteOp`]), what the kernel has
//! ([`KernelRoute`]), and the pure pieces around them (message building, decoding, the sweep
//! plan).
//!
//! # Multipath routes
//!
//! [`NextHop::Multipath`] is one route with several weighted next hops (`RTA_MULTIPATH`, what
//! `ip route add <prefix> nexthop via A weight 1 nexthop via B weight 1` writes): ECMP, or
//! weighted ECMP. A multipath route has at least two next hops; one next hop is a
//! [`NextHop::Gateway`]. [`Route::multipath`] turns a one-hop set into that form, and
//! [`Route::validate`] refuses a `Multipath` of fewer than two, so the kernel is never asked for
//! a one-hop `RTA_MULTIPATH` (it would store and report it as a plain `via` route anyway).
//!
//! IPv4 and IPv6 alike are sent as one `RTA_MULTIPATH` route, and a dump reports each as one
//! route with its next hops in [`KernelRoute::multipath`]: IPv6 keeps the next hops as sibling
//! routes internally, but has dumped them as one message since Linux 4.11. An older kernel
//! would list the siblings as separate single-hop routes of the same key; the sweep and the
//! replace-by-key semantics here still hold for those.
//!
//! # IPv4 routes through IPv6 gateways
//!
//! An IPv4 route may have an IPv6 gateway, alone or in any next hop of a multipath route
//! (RFC 8950: BGP carries IPv4 routes with IPv6 next hops; Linux 5.2 and later forward them,
//! resolving the gateway's link-layer address by NDP). The gateway then goes in `RTA_VIA`
//! (`struct rtvia`: family, then address) instead of `RTA_GATEWAY`, which is what
//! `ip route add 10.0.0.0/24 via inet6 fd00::2` writes, and dumps report it the same way;
//! [`decode_route`] reads either into the gateway. The other way round does not exist: the
//! kernel refuses `RTA_VIA` on IPv6 routes ("IPv6 does not support RTA_VIA attribute"), so
//! [`Route::validate`] refuses an IPv4 gateway for an IPv6 route.
//!
//! An IPv6 link-local gateway names no link, so the kernel wants the device beside it
//! ("Egress device not specified") for routes of either family; `validate` refuses one
//! without a device.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHop,
    RouteNextHopFlags, RouteProtocol, RouteScope, RouteType as NlRouteType, RouteVia,
};
use netlink_packet_route::AddressFamily;

use crate::tunnel::{FdbEntry, Neighbour};

/// Margay's route protocol number (`rtm_protocol`), on every route Margay writes.
///
/// 77 is ASCII `M`. It is not in iproute2's `rt_protos` (0–18 kernel and classic daemons, 42
/// babel, 99 openr, 186–192 FRR's bgp/isis/ospf/rip/eigrp) nor used by Calico's Felix (80),
/// BIRD (12), FRR (186–198), networkd/NetworkManager (3, 4, 9, 16) or keepalived (18).
/// Operators can name it with `echo '77 margay' > /etc/iproute2/rt_protos.d/margay.conf`.
pub const MARGAY_RT_PROTO: u8 = 77;

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// Address family of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub(crate) fn netlink(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

/// A network device, by name or by index. Names are resolved when the request is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Device {
    Name(String),
    Index(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Name(n) => f.write_str(n),
            Device::Index(i) => write!(f, "if{i}"),
        }
    }
}

impl From<&str> for Device {
    fn from(s: &str) -> Self {
        Device::Name(s.to_string())
    }
}

/// The weight of a next hop of a multipath route when none is given.
pub const DEFAULT_WEIGHT: u16 = 1;
/// The largest weight the kernel can store (`rtnh_hops` is a byte holding weight − 1).
pub const MAX_WEIGHT: u16 = 256;

/// One next hop of a multipath route: `nexthop via <gw> [dev X] [onlink] weight <w>`. The
/// gateway of a hop of an IPv4 route may be IPv6 (`nexthop via inet6 <gw>`, see the module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathHop {
    pub gw: IpAddr,
    pub dev: Option<Device>,
    pub onlink: bool,
    /// 1..=256: this hop's share of the flows is `weight / sum of weights`.
    pub weight: u16,
}

impl PathHop {
    /// `nexthop via <gw> weight 1`.
    pub fn via(gw: IpAddr) -> PathHop {
        PathHop {
            gw,
            dev: None,
            onlink: false,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// `nexthop via <gw> dev <dev> [onlink] weight 1`.
    pub fn via_dev(gw: IpAddr, dev: impl Into<Device>, onlink: bool) -> PathHop {
        PathHop {
            gw,
            dev: Some(dev.into()),
            onlink,
            weight: DEFAULT_WEIGHT,
        }
    }

    pub fn with_weight(mut self, weight: u16) -> PathHop {
        self.weight = weight;
        self
    }
}

/// `via <gw>`, or `via inet6 <gw>` for an IPv6 gateway of an IPv4 route, as `ip route` prints
/// them.
struct Via {
    gw: IpAddr,
    dst: Family,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.dst, self.gw) {
            (Family::V4, IpAddr::V6(g)) => write!(f, "via inet6 {g}"),
            (Family::V6, IpAddr::V4(g)) => write!(f, "via inet {g}"),
            (_, g) => write!(f, "via {g}"),
        }
    }
}

impl PathHop {
    /// `nexthop via [inet6] <gw> ...` of a route of family `dst`.
    fn write(&self, f: &mut fmt::Formatter<'_>, dst: Family) -> fmt::Result {
        write!(f, "nexthop {}", Via { gw: self.gw, dst })?;
        if let Some(d) = &self.dev {
            write!(f, " dev {d}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        write!(f, " weight {}", self.weight)
    }
}

/// Alone, a hop does not know its route's family: its gateway is printed without `inet6`.
impl fmt::Display for PathHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, Family::of(&IpNet::from(self.gw)))
    }
}

/// Where a route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// `<prefix> via <gw> [dev X] [onlink]`; an IPv4 route's gateway may be IPv6
    /// (`via inet6 <gw>`, see the module documentation).
    Gateway {
        gw: IpAddr,
        dev: Option<Device>,
        onlink: bool,
    },
    /// `<prefix> nexthop via <gw1> ... weight <w1> nexthop via <gw2> ...`: two or more next
    /// hops sharing the flows by weight (see the module documentation).
    Multipath(Vec<PathHop>),
    /// `<prefix> dev X scope link` (pod host routes on `cali*`).
    Device(Device),
    /// `blackhole <prefix>` (the node's own blocks).
    Blackhole,
}

/// A route Margay wants in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub table: u32,
    pub next_hop: NextHop,
    /// `metric`/`priority`; `None` leaves the kernel's default (0 for IPv4, 1024 for IPv6).
    pub metric: Option<u32>,
}

impl Route {
    /// `<dst> via <gw>` in the main table.
    pub fn via(dst: IpNet, gw: IpAddr) -> Route {
        Route::new(
            dst,
            NextHop::Gateway {
                gw,
                dev: None,
                onlink: false,
            },
        )
    }

    /// `<dst> via <gw> dev <dev>`, optionally `onlink` (IPIP: `via <node> dev tunl0 onlink`).
    pub fn via_dev(dst: IpNet, gw: IpAddr, dev: impl Into<Device>, onlink: bool) -> Route {
        Route::new(
            dst,
            NextHop::Gateway {
                gw,
                dev: Some(dev.into()),
                onlink,
            },
        )
    }

    /// `<dst>` through every hop of `hops`, sharing flows by weight. One hop gives the plain
    /// `via` route of that hop (its weight means nothing alone); none gives a route that
    /// [`Route::validate`] refuses.
    pub fn multipath(dst: IpNet, mut hops: Vec<PathHop>) -> Route {
        if hops.len() == 1 {
            let PathHop {
                gw, dev, onlink, ..
            } = hops.remove(0);
            return Route::new(dst, NextHop::Gateway { gw, dev, onlink });
        }
        Route::new(dst, NextHop::Multipath(hops))
    }

    /// `<dst> dev <dev> scope link`.
    pub fn dev(dst: IpNet, dev: impl Into<Device>) -> Route {
        Route::new(dst, NextHop::Device(dev.into()))
    }

    /// `blackhole <dst>`.
    pub fn blackhole(dst: IpNet) -> Route {
        Route::new(dst, NextHop::Blackhole)
    }

    fn new(dst: IpNet, next_hop: NextHop) -> Route {
        Route {
            dst: dst.trunc(),
            table: MAIN_TABLE,
            next_hop,
            metric: None,
        }
    }

    pub fn in_table(mut self, table: u32) -> Route {
        self.table = table;
        self
    }

    pub fn with_metric(mut self, metric: u32) -> Route {
        self.metric = Some(metric);
        self
    }

    pub fn key(&self) -> RouteKey {
        RouteKey {
            table: self.table,
            dst: self.dst.trunc(),
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.dst)
    }

    /// Every device the route names (the route's, or its next hops').
    pub(crate) fn devices(&self) -> impl Iterator<Item = &Device> {
        let (single, hops): (Option<&Device>, &[PathHop]) = match &self.next_hop {
            NextHop::Gateway { dev, .. } => (dev.as_ref(), &[]),
            NextHop::Multipath(hops) => (None, hops),
            NextHop::Device(d) => (Some(d), &[]),
            NextHop::Blackhole => (None, &[]),
        };
        single
            .into_iter()
            .chain(hops.iter().filter_map(|h| h.dev.as_ref()))
    }

    /// Checks what the kernel would refuse with a less helpful message, and what it would
    /// take in a form that reads back differently (a one-hop multipath route).
    pub fn validate(&self) -> Result<(), crate::KernelError> {
        // The key, not the whole route: a route of thousands of next hops is refused for that.
        let invalid = |why: String| {
            Err(crate::KernelError::Invalid(format!(
                "route {}: {why}",
                self.key()
            )))
        };
        match &self.next_hop {
            NextHop::Gateway { gw, dev, onlink } => {
                if let Err(why) = check_gateway(self.family(), *gw, dev.as_ref()) {
                    return invalid(format!("gateway {why}"));
                }
                if *onlink && dev.is_none() {
                    return invalid("onlink needs a device".into());
                }
            }
            NextHop::Multipath(hops) => {
                if hops.len() < 2 {
                    return invalid(format!(
                        "a multipath route needs at least two next hops, this has {}; \
                         build it with Route::multipath, which makes one hop a plain via route",
                        hops.len()
                    ));
                }
                let bytes: usize = hops.iter().map(|h| path_hop_len(self.family(), h.gw)).sum();
                if bytes > MAX_MULTIPATH_BYTES {
                    let most = match self.family() {
                        Family::V4 => format!(
                            "{} with IPv4 gateways, {} with IPv6 ones",
                            max_path_hops(Family::V4),
                            MAX_MULTIPATH_BYTES
                                / path_hop_len(Family::V4, Ipv6Addr::UNSPECIFIED.into())
                        ),
                        Family::V6 => max_path_hops(Family::V6).to_string(),
                    };
                    return invalid(format!(
                        "{} next hops ({bytes} bytes) do not fit in one RTA_MULTIPATH attribute; \
                         at most {most} do",
                        hops.len()
                    ));
                }
                // Same gateway twice is a duplicate unless both hops name different devices
                // (an IPv6 link-local gateway can sit behind several interfaces).
                let mut seen: HashMap<IpAddr, Vec<Option<&Device>>> = HashMap::new();
                for h in hops {
                    if let Err(why) = check_gateway(self.family(), h.gw, h.dev.as_ref()) {
                        return invalid(format!("next hop {why}"));
                    }
                    if h.onlink && h.dev.is_none() {
                        return invalid(format!("next hop {}: onlink needs a device", h.gw));
                    }
                    if !(1..=MAX_WEIGHT).contains(&h.weight) {
                        return invalid(format!(
                            "next hop {}: weight {} is outside 1..={MAX_WEIGHT}",
                            h.gw, h.weight
                        ));
                    }
                    let devs = seen.entry(h.gw).or_default();
                    let dev = h.dev.as_ref();
                    if devs
                        .iter()
                        .any(|d| d.is_none() || dev.is_none() || *d == dev)
                    {
                        return invalid(format!(
                            "next hop {} appears twice; give each gateway once (or each on its \
                             own device)",
                            h.gw
                        ));
                    }
                    devs.push(dev);
                }
            }
            NextHop::Device(_) | NextHop::Blackhole => {}
        }
        Ok(())
    }

    /// Whether the kernel's route `have` (of the same key) is this route: same type, same
    /// gateway and onlink flag, and for a multipath route the same set of (gateway, onlink,
    /// weight), in any order. Devices are not compared (the kernel reports indexes, routes name
    /// devices).
    pub fn matches(&self, have: &KernelRoute) -> bool {
        match &self.next_hop {
            NextHop::Blackhole => have.kind == RouteType::Blackhole,
            NextHop::Gateway { gw, onlink, .. } => {
                have.kind == RouteType::Unicast
                    && have.multipath.is_empty()
                    && have.gateway == Some(*gw)
                    && have.onlink == *onlink
            }
            NextHop::Device(_) => {
                have.kind == RouteType::Unicast
                    && have.multipath.is_empty()
                    && have.gateway.is_none()
            }
            NextHop::Multipath(hops) => {
                if have.kind != RouteType::Unicast || have.multipath.len() != hops.len() {
                    return false;
                }
                let mut want: Vec<(Option<IpAddr>, bool, u16)> = hops
                    .iter()
                    .map(|h| (Some(h.gw), h.onlink, h.weight))
                    .collect();
                let mut got: Vec<(Option<IpAddr>, bool, u16)> = have
                    .multipath
                    .iter()
                    .map(|h| (h.gateway, h.onlink, h.weight))
                    .collect();
                want.sort_unstable();
                got.sort_unstable();
                want == got
            }
        }
    }
}

/// Whether `gw` can be the gateway of a route of family `dst` through `dev` (the route's or
/// the hop's device); the reason, starting with the gateway, when not.
fn check_gateway(dst: Family, gw: IpAddr, dev: Option<&Device>) -> Result<(), String> {
    match (dst, gw) {
        (Family::V4, IpAddr::V4(_)) => {}
        (Family::V6, IpAddr::V4(_)) => {
            return Err(format!(
                "{gw} is IPv4 and the route IPv6; the kernel routes IPv4 through IPv6 gateways \
                 but not the other way round: give an IPv6 gateway"
            ))
        }
        (Family::V4, IpAddr::V6(g)) => {
            if let Some(v4) = g.to_ipv4_mapped() {
                return Err(format!(
                    "{gw} is an IPv4-mapped IPv6 address, which the kernel does not resolve as \
                     a gateway (\"No route to host\"); give it as the IPv4 address {v4}"
                ));
            }
        }
        (Family::V6, IpAddr::V6(_)) => {}
    }
    if let IpAddr::V6(g) = gw {
        if g.is_unicast_link_local() && dev.is_none() {
            return Err(format!(
                "{gw} is link-local and needs a device: the kernel cannot tell which link it \
                 is on (\"Egress device not specified\")"
            ));
        }
    }
    Ok(())
}

/// The most bytes the next hops of one `RTA_MULTIPATH` attribute can take: its length is 16
/// bits, 4 of them its own header.
const MAX_MULTIPATH_BYTES: usize = u16::MAX as usize - 4;

/// The bytes of one next hop in `RTA_MULTIPATH`: an 8-byte `rtnexthop`, then the gateway as
/// `RTA_GATEWAY` (8 bytes IPv4, 20 IPv6) or, for an IPv6 gateway of an IPv4 route, `RTA_VIA`
/// (4 + 2 + 16 bytes, padded to 24).
fn path_hop_len(dst: Family, gw: IpAddr) -> usize {
    8 + match (dst, gw) {
        (_, IpAddr::V4(_)) => 8,
        (Family::V6, IpAddr::V6(_)) => 20,
        (Family::V4, IpAddr::V6(_)) => 24,
    }
}

/// How many next hops with gateways of the route's own family fit in one `RTA_MULTIPATH`
/// attribute: 4095 IPv4, 2340 IPv6. An IPv4 route through IPv6 gateways fits fewer (2047 if
/// all are IPv6); [`Route::validate`] counts the bytes.
pub fn max_path_hops(family: Family) -> usize {
    let own = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    MAX_MULTIPATH_BYTES / path_hop_len(family, own)
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.next_hop {
            NextHop::Gateway { gw, dev, onlink } => {
                let via = Via {
                    gw: *gw,
                    dst: self.family(),
                };
                write!(f, "{} {via}", self.dst)?;
                if let Some(d) = dev {
                    write!(f, " dev {d}")?;
                }
                if *onlink {
                    f.write_str(" onlink")?;
                }
            }
            NextHop::Multipath(hops) => {
                write!(f, "{}", self.dst)?;
                for h in hops {
                    f.write_str(" ")?;
                    h.write(f, self.family())?;
                }
            }
            NextHop::Device(d) => write!(f, "{} dev {d} scope link", self.dst)?,
            NextHop::Blackhole => write!(f, "blackhole {}", self.dst)?,
        }
        write!(f, " table {}", self.table)?;
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

/// What identifies a Margay route for replace, delete and sweep: table and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub table: u32,
    pub dst: IpNet,
}

impl RouteKey {
    pub fn new(table: u32, dst: IpNet) -> RouteKey {
        RouteKey {
            table,
            dst: dst.trunc(),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} table {}", self.dst, self.table)
    }
}

/// One write to the kernel's routing, neighbour or FDB tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Add or replace (`NLM_F_CREATE|NLM_F_REPLACE`).
    ReplaceRoute(Route),
    /// Delete the Margay route (our protocol only) with this key; gone is success.
    DeleteRoute(RouteKey),
    /// Add or replace a permanent neighbour (ARP/NDP) entry.
    ReplaceNeighbour(Neighbour),
    /// Delete a neighbour entry; gone is success.
    DeleteNeighbour(Neighbour),
    /// Add or replace a bridge FDB entry (VXLAN remote VTEP).
    ReplaceFdb(FdbEntry),
    /// Delete an FDB entry; gone is success.
    DeleteFdb(FdbEntry),
}

impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteOp::ReplaceRoute(r) => write!(f, "replace route {r}"),
            WriteOp::DeleteRoute(k) => write!(f, "delete route {k}"),
            WriteOp::ReplaceNeighbour(n) => write!(f, "replace neighbour {n}"),
            WriteOp::DeleteNeighbour(n) => write!(f, "delete neighbour {n}"),
            WriteOp::ReplaceFdb(e) => write!(f, "replace fdb entry {e}"),
            WriteOp::DeleteFdb(e) => write!(f, "delete fdb entry {e}"),
        }
    }
}

/// The kernel's `rtm_type` of a dumped route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteType {
    Unicast,
    Local,
    Blackhole,
    Unreachable,
    Prohibit,
    Other(u8),
}

/// One next hop of a multipath route as the kernel reports it (`struct rtnexthop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPathHop {
    /// `None` for a hop without a gateway (`nexthop dev X`). May be IPv6 in an IPv4 route
    /// (`RTA_VIA`).
    pub gateway: Option<IpAddr>,
    /// `rtnh_ifindex`; `None` when the kernel reports 0.
    pub oif: Option<u32>,
    pub onlink: bool,
    /// 1..=256 (`rtnh_hops` + 1).
    pub weight: u16,
}

/// A route as the kernel reports it in a dump or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub table: u32,
    pub protocol: u8,
    pub kind: RouteType,
    pub scope: u8,
    /// The gateway of a single-path route (`RTA_GATEWAY`, or `RTA_VIA` for an IPv6 gateway of
    /// an IPv4 route); `None` for a multipath route.
    pub gateway: Option<IpAddr>,
    /// The output device of a single-path route; `None` for a multipath route (see
    /// [`KernelRoute::oifs`]).
    pub oif: Option<u32>,
    pub onlink: bool,
    pub metric: Option<u32>,
    /// The next hops of a multipath route (`RTA_MULTIPATH`), in the kernel's order; empty for
    /// every other route.
    pub multipath: Vec<KernelPathHop>,
}

impl KernelRoute {
    pub fn key(&self) -> RouteKey {
        RouteKey::new(self.table, self.dst)
    }

    pub fn family(&self) -> Family {
        Family::of(&self.dst)
    }

    /// Every output device of the route: its own, or those of its multipath next hops.
    pub fn oifs(&self) -> impl Iterator<Item = u32> + '_ {
        self.oif
            .into_iter()
            .chain(self.multipath.iter().filter_map(|h| h.oif))
    }
}

/// Like `ip route show`, with device indexes (`if7`) for device names.
impl fmt::Display for KernelRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteType::Unicast => {}
            RouteType::Local => f.write_str("local ")?,
            RouteType::Blackhole => f.write_str("blackhole ")?,
            RouteType::Unreachable => f.write_str("unreachable ")?,
            RouteType::Prohibit => f.write_str("prohibit ")?,
            RouteType::Other(t) => write!(f, "type {t} ")?,
        }
        write!(f, "{}", self.dst)?;
        let dst = self.family();
        if let Some(gw) = self.gateway {
            write!(f, " {}", Via { gw, dst })?;
        }
        if let Some(i) = self.oif {
            write!(f, " dev if{i}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        for h in &self.multipath {
            f.write_str(" nexthop")?;
            if let Some(gw) = h.gateway {
                write!(f, " {}", Via { gw, dst })?;
            }
            if let Some(i) = h.oif {
                write!(f, " dev if{i}")?;
            }
            if h.onlink {
                f.write_str(" onlink")?;
            }
            write!(f, " weight {}", h.weight)?;
        }
        write!(f, " proto {} table {}", self.protocol, self.table)?;
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

/// Which routes a dump returns. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteFilter {
    pub family: Option<Family>,
    pub protocol: Option<u8>,
    pub table: Option<u32>,
    pub device: Option<Device>,
}

impl RouteFilter {
    /// Margay's own routes (any table, both families).
    pub fn margay() -> RouteFilter {
        RouteFilter {
            protocol: Some(MARGAY_RT_PROTO),
            ..Default::default()
        }
    }

    pub(crate) fn matches(&self, r: &KernelRoute, oif: Option<u32>) -> bool {
        self.family.is_none_or(|f| f == r.family())
            && self.protocol.is_none_or(|p| p == r.protocol)
            && self.table.is_none_or(|t| t == r.table)
            && oif.is_none_or(|i| r.oifs().any(|o| o == i))
    }
}

/// The stale routes of a mark-and-sweep: those of `protocol` in `installed` whose key is not
/// in `desired`.
pub fn plan_sweep(
    installed: &[KernelRoute],
    desired: &HashSet<RouteKey>,
    protocol: u8,
) -> Vec<RouteKey> {
    let mut seen = HashSet::new();
    installed
        .iter()
        .filter(|r| r.protocol == protocol)
        .map(KernelRoute::key)
        .filter(|k| !desired.contains(k) && seen.insert(*k))
        .collect()
}

// ===== message building =====

const RTNH_F_ONLINK: u32 = 4;

fn header(family: Family, dst: &IpNet, table: u32, protocol: u8) -> RouteHeader {
    RouteHeader {
        address_family: family.netlink(),
        destination_prefix_length: dst.prefix_len(),
        table: if table < 256 {
            table as u8
        } else {
            RouteHeader::RT_TABLE_UNSPEC
        },
        protocol: RouteProtocol::from(protocol),
        ..Default::default()
    }
}

fn address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The gateway attribute of a route of family `dst`: `RTA_GATEWAY` for a gateway of the same
/// family, `RTA_VIA` (family and address) for one of the other (an IPv6 gateway of an IPv4
/// route; the kernel refuses it on an IPv6 route, which [`Route::validate`] catches first).
fn gateway_attribute(dst: Family, gw: IpAddr) -> RouteAttribute {
    if Family::of(&IpNet::from(gw)) == dst {
        RouteAttribute::Gateway(address(gw))
    } else {
        RouteAttribute::Via(RouteVia::from(gw))
    }
}

/// A gateway from `RTA_GATEWAY` or an IPv4/IPv6 `RTA_VIA`.
fn gateway_of(a: &RouteAttribute) -> Option<IpAddr> {
    match a {
        RouteAttribute::Gateway(RouteAddress::Inet(x)) | RouteAttribute::Via(RouteVia::Inet(x)) => {
            Some(IpAddr::V4(*x))
        }
        RouteAttribute::Gateway(RouteAddress::Inet6(x))
        | RouteAttribute::Via(RouteVia::Inet6(x)) => Some(IpAddr::V6(*x)),
        _ => None,
    }
}

/// The `RTM_NEWROUTE` body for `route`; `ifindex` resolves the devices the route names (its
/// error is returned as is). Does not validate: [`Route::validate`] first.
pub fn replace_route_message(
    route: &Route,
    protocol: u8,
    ifindex: impl Fn(&Device) -> Result<u32, crate::KernelError>,
) -> Result<RouteMessage, crate::KernelError> {
    let family = route.family();
    let mut h = header(family, &route.dst, route.table, protocol);
    let mut attrs = Vec::with_capacity(5);
    if route.dst.prefix_len() > 0 {
        attrs.push(RouteAttribute::Destination(address(route.dst.addr())));
    }
    attrs.push(RouteAttribute::Table(route.table));
    let mut oif = None;
    match &route.next_hop {
        NextHop::Gateway { gw, dev, onlink } => {
            h.scope = RouteScope::Universe;
            h.kind = NlRouteType::Unicast;
            if *onlink {
                h.flags = RouteFlags::from_bits_retain(RTNH_F_ONLINK);
            }
            attrs.push(gateway_attribute(family, *gw));
            oif = dev.as_ref().map(&ifindex).transpose()?;
        }
        NextHop::Multipath(hops) => {
            h.scope = RouteScope::Universe;
            h.kind = NlRouteType::Unicast;
            let mut nhs = Vec::with_capacity(hops.len());
            for hop in hops {
                nhs.push(path_hop(family, hop, &ifindex)?);
            }
            attrs.push(RouteAttribute::MultiPath(nhs));
        }
        NextHop::Device(d) => {
            h.scope = RouteScope::Link;
            h.kind = NlRouteType::Unicast;
            oif = Some(ifindex(d)?);
        }
        NextHop::Blackhole => {
            h.scope = RouteScope::Universe;
            h.kind = NlRouteType::BlackHole;
        }
    }
    if let Some(i) = oif {
        attrs.push(RouteAttribute::Oif(i));
    }
    if let Some(m) = route.metric {
        attrs.push(RouteAttribute::Priority(m));
    }
    let mut m = RouteMessage::default();
    m.header = h;
    m.attributes = attrs;
    Ok(m)
}

/// One `struct rtnexthop` of `RTA_MULTIPATH` (rtnetlink(7)): length, flags, `rtnh_hops` (the
/// weight minus one), ifindex (0: the kernel finds the device from the gateway), then the
/// hop's own `RTA_GATEWAY` (or `RTA_VIA`, for an IPv6 gateway of an IPv4 route of family `dst`).
fn path_hop(
    dst: Family,
    hop: &PathHop,
    ifindex: impl Fn(&Device) -> Result<u32, crate::KernelError>,
) -> Result<RouteNextHop, crate::KernelError> {
    let mut nh = RouteNextHop::default();
    if hop.onlink {
        nh.flags = RouteNextHopFlags::Onlink;
    }
    // Validated to 1..=256; clamped so an unvalidated route cannot wrap to another weight.
    nh.hops = (hop.weight.clamp(1, MAX_WEIGHT) - 1) as u8;
    nh.interface_index = match &hop.dev {
        Some(d) => ifindex(d)?,
        None => 0,
    };
    nh.attributes = vec![gateway_attribute(dst, hop.gw)];
    Ok(nh)
}

/// The `RTM_DELROUTE` body for the route `key` of `protocol`. The protocol is part of the match,
/// so a delete never removes another daemon's route; scope `nowhere` and type `unspec` match
/// any scope and type, like `ip route del`.
pub fn delete_route_message(key: &RouteKey, protocol: u8) -> RouteMessage {
    let family = Family::of(&key.dst);
    let mut h = header(family, &key.dst, key.table, protocol);
    h.scope = RouteScope::NoWhere;
    h.kind = NlRouteType::Unspec;
    let mut attrs = Vec::with_capacity(2);
    if key.dst.prefix_len() > 0 {
        attrs.push(RouteAttribute::Destination(address(key.dst.addr())));
    }
    attrs.push(RouteAttribute::Table(key.table));
    let mut m = RouteMessage::default();
    m.header = h;
    m.attributes = attrs;
    m
}

/// Decodes a route from a dump or an event. Returns `None` for families other than IPv4/IPv6
/// and for routes without a usable destination.
pub fn decode_route(msg: &RouteMessage) -> Option<KernelRoute> {
    let h = &msg.header;
    let v6 = match h.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut dst_addr: Option<IpAddr> = None;
    let mut table = u32::from(h.table);
    let mut gateway = None;
    let mut oif = None;
    let mut metric = None;
    let mut multipath = Vec::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(x)) => dst_addr = Some((*x).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(x)) => dst_addr = Some((*x).into()),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                gateway = gateway_of(a).or(gateway)
            }
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::MultiPath(nhs) => multipath = nhs.iter().map(decode_path_hop).collect(),
            _ => {}
        }
    }
    let addr = dst_addr.unwrap_or(if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let dst = IpNet::new(addr, h.destination_prefix_length).ok()?;
    let kind = match u8::from(h.kind) {
        1 => RouteType::Unicast,
        2 => RouteType::Local,
        6 => RouteType::Blackhole,
        7 => RouteType::Unreachable,
        8 => RouteType::Prohibit,
        o => RouteType::Other(o),
    };
    Some(KernelRoute {
        dst,
        table,
        protocol: u8::from(h.protocol),
        kind,
        scope: u8::from(h.scope),
        gateway,
        oif,
        onlink: h.flags.bits() & RTNH_F_ONLINK != 0,
        metric,
        multipath,
    })
}

fn decode_path_hop(nh: &RouteNextHop) -> KernelPathHop {
    let gateway = nh.attributes.iter().find_map(gateway_of);
    KernelPathHop {
        gateway,
        oif: (nh.interface_index != 0).then_some(nh.interface_index),
        onlink: nh.flags.contains(RouteNextHopFlags::Onlink),
        weight: u16::from(nh.hops) + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// A device resolver for routes that name none.
    fn no_dev(d: &Device) -> Result<u32, crate::KernelError> {
        panic!("route names device {d}")
    }

    /// A device resolver giving every device index `i`.
    fn idx(i: u32) -> impl Fn(&Device) -> Result<u32, crate::KernelError> {
        move |_| Ok(i)
    }

    /// Emits `msg` as a full netlink message and decodes it again, as the kernel's echo would.
    fn round_trip(msg: RouteMessage) -> (Vec<u8>, KernelRoute) {
        let mut nl = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(msg)),
        );
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.emit(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) = back.payload else {
            panic!("not a route")
        };
        (buf, decode_route(&m).unwrap())
    }

    #[test]
    fn blackhole_v4_bytes() {
        let r = Route::blackhole(net("10.65.1.0/26"));
        let (buf, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, no_dev).unwrap());
        // rtmsg: family 2, dst_len 26, src_len 0, tos 0, table 254, proto 77, scope 0, type 6.
        assert_eq!(&buf[16..24], &[2, 26, 0, 0, 254, 77, 0, 6]);
        // RTA_DST (1), 8 bytes, 10.65.1.0.
        assert_eq!(&buf[28..36], &[8, 0, 1, 0, 10, 65, 1, 0]);
        assert_eq!(back.kind, RouteType::Blackhole);
        assert_eq!(back.dst, net("10.65.1.0/26"));
        assert_eq!(back.table, 254);
        assert_eq!(back.protocol, 77);
    }

    #[test]
    fn onlink_gateway_sets_flag_and_oif() {
        let r = Route::via_dev(
            net("10.65.2.0/26"),
            "192.168.0.12".parse().unwrap(),
            "tunl0",
            true,
        );
        let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, idx(7)).unwrap());
        assert!(back.onlink);
        assert_eq!(back.oif, Some(7));
        assert_eq!(back.gateway, Some("192.168.0.12".parse().unwrap()));
        assert_eq!(back.kind, RouteType::Unicast);
        assert_eq!(back.scope, 0);
    }

    #[test]
    fn device_route_is_link_scoped() {
        let r = Route::dev(net("10.65.0.5/32"), "cali1234567890a");
        let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, idx(9)).unwrap());
        assert_eq!(back.scope, 253);
        assert_eq!(back.oif, Some(9));
        assert_eq!(back.gateway, None);
    }

    #[test]
    fn v6_and_big_table() {
        let r = Route::via(net("fd00:65::/122"), "fd00::12".parse().unwrap())
            .in_table(1000)
            .with_metric(512);
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, no_dev).unwrap();
        assert_eq!(msg.header.table, 0, "tables >255 go in RTA_TABLE only");
        let (_, back) = round_trip(msg);
        assert_eq!(back.table, 1000);
        assert_eq!(back.metric, Some(512));
        assert_eq!(back.family(), Family::V6);
        assert_eq!(back.dst, net("fd00:65::/122"));
    }

    #[test]
    fn default_route_has_no_dst_attribute() {
        let r = Route::via(net("0.0.0.0/0"), "169.254.1.1".parse().unwrap());
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, idx(2)).unwrap();
        assert!(!msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        let (_, back) = round_trip(msg);
        assert_eq!(back.dst, net("0.0.0.0/0"));
    }

    #[test]
    fn delete_matches_protocol_any_scope_any_type() {
        let m = delete_route_message(&RouteKey::new(254, net("10.65.1.7/26")), MARGAY_RT_PROTO);
        assert_eq!(u8::from(m.header.protocol), MARGAY_RT_PROTO);
        assert_eq!(u8::from(m.header.scope), 255);
        assert_eq!(u8::from(m.header.kind), 0);
        assert_eq!(m.header.destination_prefix_length, 26);
        assert!(m
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                "10.65.1.0".parse().unwrap()
            ))));
    }

    #[test]
    fn routes_are_normalised_to_their_network() {
        assert_eq!(
            Route::blackhole(net("10.65.1.9/26")).dst,
            net("10.65.1.0/26")
        );
    }

    #[test]
    fn validate_checks_gateway_families_and_devices() {
        let err = |r: Route| r.validate().unwrap_err().to_string();
        // IPv4 through IPv6 is fine (RTA_VIA); IPv6 through IPv4 the kernel does not do.
        Route::via(net("10.0.0.0/8"), ip("fd00::1"))
            .validate()
            .unwrap();
        let e = err(Route::via(net("fd00:1::/64"), ip("10.1.1.1")));
        assert!(
            e.contains("route fd00:1::/64 table 254: gateway 10.1.1.1 is IPv4 and the route IPv6"),
            "{e}"
        );
        // A link-local gateway needs its device, for either family.
        for dst in ["10.0.0.0/8", "fd00:1::/64"] {
            let e = err(Route::via(net(dst), ip("fe80::b")));
            assert!(
                e.contains("gateway fe80::b is link-local and needs a device"),
                "{e}"
            );
            Route::via_dev(net(dst), ip("fe80::b"), "eth0", false)
                .validate()
                .unwrap();
        }
        // An IPv4-mapped gateway is an IPv4 gateway written the wrong way.
        let e = err(Route::via(net("10.0.0.0/8"), ip("::ffff:192.0.2.2")));
        assert!(e.contains("give it as the IPv4 address 192.0.2.2"), "{e}");

        let mut r = Route::via(net("10.0.0.0/8"), "10.1.1.1".parse().unwrap());
        assert!(r.validate().is_ok());
        r.next_hop = NextHop::Gateway {
            gw: "10.1.1.1".parse().unwrap(),
            dev: None,
            onlink: true,
        };
        assert!(r.validate().is_err());
    }

    fn kr(dst: &str, table: u32, protocol: u8) -> KernelRoute {
        KernelRoute {
            dst: net(dst),
            table,
            protocol,
            kind: RouteType::Unicast,
            scope: 0,
            gateway: None,
            oif: None,
            onlink: false,
            metric: None,
            multipath: Vec::new(),
        }
    }

    #[test]
    fn sweep_plan_removes_only_our_undesired_routes() {
        let installed = vec![
            kr("10.65.1.0/26", 254, MARGAY_RT_PROTO),
            kr("10.65.2.0/26", 254, MARGAY_RT_PROTO),
            kr("10.65.2.0/26", 100, MARGAY_RT_PROTO),
            kr("10.99.0.0/16", 254, 12), // BIRD's
            kr("10.65.3.0/26", 254, 4),  // static
        ];
        let desired: HashSet<RouteKey> = [RouteKey::new(254, net("10.65.1.0/26"))].into();
        let mut stale = plan_sweep(&installed, &desired, MARGAY_RT_PROTO);
        stale.sort();
        assert_eq!(
            stale,
            vec![
                RouteKey::new(100, net("10.65.2.0/26")),
                RouteKey::new(254, net("10.65.2.0/26")),
            ]
        );
    }

    #[test]
    fn filter_matches_fields() {
        let r = kr("10.65.1.0/26", 254, MARGAY_RT_PROTO);
        assert!(RouteFilter::margay().matches(&r, None));
        let f = RouteFilter {
            table: Some(100),
            ..RouteFilter::margay()
        };
        assert!(!f.matches(&r, None));
        let f = RouteFilter {
            family: Some(Family::V6),
            ..Default::default()
        };
        assert!(!f.matches(&r, None));
        assert!(!RouteFilter::default().matches(&r, Some(3)));
    }

    // ===== multipath =====

    fn two_hops_v4() -> Route {
        Route::multipath(
            net("10.80.0.0/24"),
            vec![
                PathHop::via_dev(ip("192.0.2.2"), "v0", false).with_weight(3),
                PathHop::via_dev(ip("203.0.113.2"), "w0", true),
            ],
        )
    }

    #[test]
    fn multipath_v4_bytes_and_round_trip() {
        let r = two_hops_v4();
        r.validate().unwrap();
        let dev = |d: &Device| match d.to_string().as_str() {
            "v0" => Ok(2),
            "w0" => Ok(3),
            o => panic!("unexpected device {o}"),
        };
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, dev).unwrap();
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Oif(_))),
            "a multipath route has its gateways and devices in RTA_MULTIPATH only"
        );
        let (buf, back) = round_trip(msg);
        // rtmsg: family 2, dst_len 24, table 254, proto 77, scope universe, type unicast.
        assert_eq!(&buf[16..24], &[2, 24, 0, 0, 254, 77, 0, 1]);
        // RTA_MULTIPATH (9), 4 + 2 × 16 bytes, after RTA_DST (8 bytes) and RTA_TABLE (8 bytes).
        assert_eq!(&buf[44..48], &[36, 0, 9, 0]);
        // rtnexthop: len 16, flags 0, hops 2 (weight 3), ifindex 2; RTA_GATEWAY 192.0.2.2.
        assert_eq!(
            &buf[48..64],
            &[16, 0, 0, 2, 2, 0, 0, 0, 8, 0, 5, 0, 192, 0, 2, 2]
        );
        // rtnexthop: len 16, flags RTNH_F_ONLINK, hops 0 (weight 1), ifindex 3.
        assert_eq!(
            &buf[64..80],
            &[16, 0, 4, 0, 3, 0, 0, 0, 8, 0, 5, 0, 203, 0, 113, 2]
        );
        assert_eq!(back.gateway, None);
        assert_eq!(back.oif, None);
        assert_eq!(
            back.multipath,
            vec![
                KernelPathHop {
                    gateway: Some(ip("192.0.2.2")),
                    oif: Some(2),
                    onlink: false,
                    weight: 3,
                },
                KernelPathHop {
                    gateway: Some(ip("203.0.113.2")),
                    oif: Some(3),
                    onlink: true,
                    weight: 1,
                },
            ]
        );
        assert_eq!(back.oifs().collect::<Vec<_>>(), vec![2, 3]);
        assert!(r.matches(&back));
    }

    #[test]
    fn multipath_v6_round_trip_with_extreme_weights() {
        let r = Route::multipath(
            net("fd00:80::/64"),
            vec![
                PathHop::via(ip("2001:db8::2")).with_weight(MAX_WEIGHT),
                PathHop::via(ip("2001:db8:1::2")),
                PathHop::via(ip("2001:db8:2::2")).with_weight(7),
            ],
        )
        .with_metric(1024);
        r.validate().unwrap();
        let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, no_dev).unwrap());
        assert_eq!(back.family(), Family::V6);
        assert_eq!(back.metric, Some(1024));
        let got: Vec<(Option<IpAddr>, Option<u32>, u16)> = back
            .multipath
            .iter()
            .map(|h| (h.gateway, h.oif, h.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(ip("2001:db8::2")), None, 256),
                (Some(ip("2001:db8:1::2")), None, 1),
                (Some(ip("2001:db8:2::2")), None, 7),
            ]
        );
        assert!(r.matches(&back));
    }

    /// Decodes one `RTM_NEWROUTE` as the kernel sent it.
    fn decode_captured(hex_msg: &str) -> KernelRoute {
        let buf: Vec<u8> = (0..hex_msg.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex_msg[i..i + 2], 16).unwrap())
            .collect();
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) = m.payload else {
            panic!("not a route")
        };
        decode_route(&m).unwrap()
    }

    #[test]
    fn multipath_routes_dumped_by_linux_6_18_decode() {
        // `ip route add 10.80.0.0/24 proto 77 nexthop via 192.0.2.2 dev v0 weight 3 nexthop
        // via 203.0.113.2 dev w0 onlink` (v0 is ifindex 2, w0 3), then an RTM_GETROUTE dump.
        let v4 = decode_captured(
            "500000001800020001000000894e000002180000fe4d00010000000008000f00fe000000080001000a\
             50000024000900100000020200000008000500c0000202100004000300000008000500cb007102",
        );
        assert_eq!(v4.dst, net("10.80.0.0/24"));
        assert_eq!(
            (v4.protocol, v4.kind, v4.gateway, v4.oif),
            (77, RouteType::Unicast, None, None)
        );
        assert_eq!(
            v4.to_string(),
            "10.80.0.0/24 nexthop via 192.0.2.2 dev if2 weight 3 \
             nexthop via 203.0.113.2 dev if3 onlink weight 1 proto 77 table 254"
        );
        assert!(two_hops_v4().matches(&v4));

        // `ip -6 route add fd00:80::/64 proto 77 nexthop via 2001:db8::2 dev v0 weight 2
        // nexthop via 2001:db8:1::2 dev w0`: the kernel keeps two sibling routes and dumps
        // them as one message with RTA_MULTIPATH (and RTA_CACHEINFO, RTA_PREF).
        let v6 = decode_captured(
            "a80000001800020001000000b44e00000a400000fe4d00010000000008000f00fe00000014000100fd\
             00008000000000000000000000000008000600000400003c0009001c000001020000001400050020010d\
             b80000000000000000000000021c000000030000001400050020010db800010000000000000000000224\
             000c0000000000000000000000000000000000000000000000000000000000000000000500140000000000",
        );
        assert_eq!(v6.dst, net("fd00:80::/64"));
        assert_eq!(v6.metric, Some(1024));
        assert_eq!(
            v6.to_string(),
            "fd00:80::/64 nexthop via 2001:db8::2 dev if2 weight 2 \
             nexthop via 2001:db8:1::2 dev if3 weight 1 proto 77 table 254 metric 1024"
        );
        let want = Route::multipath(
            net("fd00:80::/64"),
            vec![
                PathHop::via(ip("2001:db8:1::2")),
                PathHop::via(ip("2001:db8::2")).with_weight(2),
            ],
        );
        assert!(
            want.matches(&v6),
            "the order of the next hops does not matter"
        );
    }

    #[test]
    fn one_hop_multipath_is_a_via_route() {
        let r = Route::multipath(
            net("10.80.0.0/24"),
            vec![PathHop::via_dev(ip("192.0.2.2"), "v0", true).with_weight(9)],
        );
        assert_eq!(
            r,
            Route::via_dev(net("10.80.0.0/24"), ip("192.0.2.2"), "v0", true)
        );
    }

    #[test]
    fn validate_refuses_bad_multipath_routes() {
        let dst = net("10.80.0.0/24");
        let mp = |hops: Vec<PathHop>| Route {
            next_hop: NextHop::Multipath(hops),
            ..Route::blackhole(dst)
        };
        let err = |r: Route| r.validate().unwrap_err().to_string();
        let a = || PathHop::via(ip("192.0.2.2"));
        let b = || PathHop::via(ip("192.0.2.3"));

        assert!(err(mp(vec![])).contains("at least two next hops, this has 0"));
        assert!(err(mp(vec![a()])).contains("at least two next hops, this has 1"));
        // An IPv4 route may mix IPv6 gateways in; an IPv6 route may not take IPv4 ones.
        mp(vec![a(), PathHop::via(ip("2001:db8::2"))])
            .validate()
            .unwrap();
        let v6 = |hops: Vec<PathHop>| Route {
            next_hop: NextHop::Multipath(hops),
            ..Route::blackhole(net("fd00:80::/64"))
        };
        assert!(err(v6(vec![PathHop::via(ip("2001:db8::2")), a()]))
            .contains("next hop 192.0.2.2 is IPv4 and the route IPv6"));
        assert!(err(mp(vec![a(), PathHop::via(ip("fe80::b"))]))
            .contains("next hop fe80::b is link-local and needs a device"));
        mp(vec![a(), PathHop::via_dev(ip("fe80::b"), "v0", false)])
            .validate()
            .unwrap();
        assert!(err(mp(vec![a(), b(), a()])).contains("next hop 192.0.2.2 appears twice"));
        assert!(
            err(mp(vec![
                PathHop::via_dev(ip("192.0.2.2"), "v0", false),
                a()
            ]))
            .contains("appears twice"),
            "a gateway without a device may resolve to the same device"
        );
        assert!(err(mp(vec![a().with_weight(0), b()])).contains("weight 0 is outside 1..=256"));
        assert!(err(mp(vec![a(), b().with_weight(257)])).contains("weight 257 is outside"));
        let onlink_no_dev = PathHop {
            onlink: true,
            ..b()
        };
        assert!(err(mp(vec![a(), onlink_no_dev])).contains("192.0.2.3: onlink needs a device"));
        let many: Vec<PathHop> = (0..=max_path_hops(Family::V4) as u32)
            .map(|i| PathHop::via(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
            .collect();
        assert!(err(mp(many)).contains("do not fit in one RTA_MULTIPATH attribute"));

        assert!(mp(vec![a().with_weight(1), b().with_weight(MAX_WEIGHT)])
            .validate()
            .is_ok());
        // The same IPv6 link-local gateway behind two interfaces is two next hops.
        let ll = ip("fe80::1");
        let r = Route::multipath(
            net("fd00:80::/64"),
            vec![
                PathHop::via_dev(ll, "eth0", false),
                PathHop::via_dev(ll, "eth1", false),
            ],
        );
        assert!(r.validate().is_ok(), "{:?}", r.validate());
    }

    #[test]
    fn the_largest_multipath_route_fits_its_attribute() {
        for (fam, dst) in [(Family::V4, "10.80.0.0/24"), (Family::V6, "fd00:80::/64")] {
            let hops: Vec<PathHop> = (0..max_path_hops(fam) as u32)
                .map(|i| {
                    PathHop::via(match fam {
                        Family::V4 => IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                        Family::V6 => {
                            IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)))
                        }
                    })
                })
                .collect();
            let r = Route::multipath(net(dst), hops);
            r.validate().unwrap();
            let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, no_dev).unwrap());
            assert_eq!(back.multipath.len(), max_path_hops(fam), "{fam:?}");
            assert!(r.matches(&back));
        }
        // An IPv4 route through IPv6 gateways: 32 bytes a hop (RTA_VIA) instead of 16.
        let v6_hops = |n: u32| -> Vec<PathHop> {
            (0..n)
                .map(|i| {
                    PathHop::via(IpAddr::V6(Ipv6Addr::from(
                        0x2001_0db8_u128 << 96 | u128::from(i),
                    )))
                })
                .collect()
        };
        let r = Route::multipath(net("10.80.0.0/24"), v6_hops(2047));
        r.validate().unwrap();
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, no_dev).unwrap();
        let (_, back) = round_trip(msg);
        assert_eq!(back.multipath.len(), 2047);
        assert!(r.matches(&back));
        let e = Route::multipath(net("10.80.0.0/24"), v6_hops(2048))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "2048 next hops (65536 bytes) do not fit in one RTA_MULTIPATH attribute; \
                        at most 4095 with IPv4 gateways, 2047 with IPv6 ones do"
            ),
            "{e}"
        );
    }

    #[test]
    fn matches_compares_the_set_of_next_hops() {
        let r = two_hops_v4();
        let mut have = kr("10.80.0.0/24", 254, MARGAY_RT_PROTO);
        have.multipath = vec![
            KernelPathHop {
                gateway: Some(ip("203.0.113.2")),
                oif: Some(3),
                onlink: true,
                weight: 1,
            },
            KernelPathHop {
                gateway: Some(ip("192.0.2.2")),
                oif: Some(2),
                onlink: false,
                weight: 3,
            },
        ];
        assert!(r.matches(&have));
        let mut other_weight = have.clone();
        other_weight.multipath[1].weight = 1;
        assert!(!r.matches(&other_weight));
        let mut other_gw = have.clone();
        other_gw.multipath[0].gateway = Some(ip("203.0.113.3"));
        assert!(!r.matches(&other_gw));
        let mut fewer = have.clone();
        fewer.multipath.pop();
        assert!(!r.matches(&fewer));
        // A multipath route in the kernel is neither a via route nor a device route.
        assert!(!Route::via(net("10.80.0.0/24"), ip("192.0.2.2")).matches(&have));
        assert!(!Route::dev(net("10.80.0.0/24"), "v0").matches(&have));
        // And a via route in the kernel is not a multipath route.
        let mut single = kr("10.80.0.0/24", 254, MARGAY_RT_PROTO);
        single.gateway = Some(ip("192.0.2.2"));
        assert!(!r.matches(&single));
        assert!(Route::via(net("10.80.0.0/24"), ip("192.0.2.2")).matches(&single));
    }

    #[test]
    fn device_filter_matches_any_next_hop_of_a_multipath_route() {
        let r = decode_captured(
            "500000001800020001000000894e000002180000fe4d00010000000008000f00fe000000080001000a\
             50000024000900100000020200000008000500c0000202100004000300000008000500cb007102",
        );
        assert!(RouteFilter::default().matches(&r, Some(2)));
        assert!(RouteFilter::default().matches(&r, Some(3)));
        assert!(!RouteFilter::default().matches(&r, Some(4)));
    }

    // ===== IPv4 through IPv6 gateways (RTA_VIA) =====

    #[test]
    fn ipv4_route_via_ipv6_gateway_bytes_and_round_trip() {
        let r = Route::via_dev(net("10.81.0.0/24"), ip("2001:db8::2"), "v0", false);
        r.validate().unwrap();
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, idx(2)).unwrap();
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_))),
            "an IPv6 gateway of an IPv4 route is not an RTA_GATEWAY"
        );
        let (buf, back) = round_trip(msg);
        // rtmsg: family 2 (the route's), dst_len 24, table 254, proto 77, universe, unicast.
        assert_eq!(&buf[16..24], &[2, 24, 0, 0, 254, 77, 0, 1]);
        // After RTA_DST and RTA_TABLE: RTA_VIA (18), 4 + 2 + 16 bytes: AF_INET6 (10), address,
        // two bytes of padding; then RTA_OIF.
        let mut via = vec![22, 0, 18, 0, 10, 0];
        via.extend_from_slice(&ip6("2001:db8::2").octets());
        via.extend_from_slice(&[0, 0]);
        assert_eq!(&buf[44..68], &via[..]);
        assert_eq!(&buf[68..76], &[8, 0, 4, 0, 2, 0, 0, 0]);
        assert_eq!(back.gateway, Some(ip("2001:db8::2")));
        assert_eq!(back.family(), Family::V4);
        assert_eq!(back.oif, Some(2));
        assert!(r.matches(&back));
        // The same address as an IPv6 route's gateway stays an RTA_GATEWAY.
        let r6 = Route::via(net("fd00:81::/64"), ip("2001:db8::2"));
        let msg = replace_route_message(&r6, MARGAY_RT_PROTO, no_dev).unwrap();
        assert!(msg
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet6(ip6(
                "2001:db8::2"
            )))));
    }

    #[test]
    fn multipath_mixing_ipv4_and_ipv6_gateways_bytes_and_round_trip() {
        let r = Route::multipath(
            net("10.80.0.0/24"),
            vec![
                PathHop::via(ip("192.0.2.2")).with_weight(3),
                PathHop::via_dev(ip("fe80::b"), "v0", false),
            ],
        );
        r.validate().unwrap();
        let (buf, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, idx(2)).unwrap());
        // RTA_MULTIPATH: 4 + 16 (IPv4 hop) + 32 (IPv6 hop: 8 + RTA_VIA padded to 24).
        assert_eq!(&buf[44..48], &[52, 0, 9, 0]);
        assert_eq!(
            &buf[48..64],
            &[16, 0, 0, 2, 0, 0, 0, 0, 8, 0, 5, 0, 192, 0, 2, 2]
        );
        // rtnexthop: len 32, no flags, weight 1, ifindex 2; RTA_VIA inet6 fe80::b.
        assert_eq!(&buf[64..76], &[32, 0, 0, 0, 2, 0, 0, 0, 22, 0, 18, 0]);
        assert_eq!(&buf[76..78], &[10, 0]);
        assert_eq!(&buf[78..94], &ip6("fe80::b").octets());
        let got: Vec<(Option<IpAddr>, Option<u32>, u16)> = back
            .multipath
            .iter()
            .map(|h| (h.gateway, h.oif, h.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(ip("192.0.2.2")), None, 3),
                (Some(ip("fe80::b")), Some(2), 1)
            ]
        );
        assert!(r.matches(&back));
    }

    #[test]
    fn ipv6_gateways_of_ipv4_routes_dumped_by_linux_6_18_decode() {
        // `ip route add 10.81.0.0/24 proto 77 via inet6 2001:db8::2 dev pa` (pa is ifindex
        // 2), then an RTM_GETROUTE dump.
        let single = decode_captured(
            "4c0000001800020001000000833a000002180000fe4d00010000000008000f00fe000000080001000a\
             510000160012000a0020010db800000000000000000000000200000800040002000000",
        );
        assert_eq!(single.dst, net("10.81.0.0/24"));
        assert_eq!(
            (single.protocol, single.gateway, single.oif),
            (77, Some(ip("2001:db8::2")), Some(2))
        );
        assert_eq!(
            single.to_string(),
            "10.81.0.0/24 via inet6 2001:db8::2 dev if2 proto 77 table 254"
        );
        assert!(
            Route::via_dev(net("10.81.0.0/24"), ip("2001:db8::2"), "pa", false).matches(&single)
        );
        assert!(!Route::via(net("10.81.0.0/24"), ip("192.0.2.2")).matches(&single));

        // `ip route add 10.80.0.0/24 proto 77 nexthop via 192.0.2.2 dev pa weight 3 nexthop
        // via inet6 fe80::b dev pa`.
        let mp = decode_captured(
            "600000001800020001000000833a000002180000fe4d00010000000008000f00fe000000080001000a\
             50000034000900100000020200000008000500c00002022000000002000000160012000a00fe8000\
             0000000000000000000000000b0000",
        );
        assert_eq!((mp.gateway, mp.oif), (None, None));
        assert_eq!(
            mp.to_string(),
            "10.80.0.0/24 nexthop via 192.0.2.2 dev if2 weight 3 \
             nexthop via inet6 fe80::b dev if2 weight 1 proto 77 table 254"
        );
        let want = Route::multipath(
            net("10.80.0.0/24"),
            vec![
                PathHop::via_dev(ip("fe80::b"), "pa", false),
                PathHop::via_dev(ip("192.0.2.2"), "pa", false).with_weight(3),
            ],
        );
        assert!(want.matches(&mp));
    }

    #[test]
    fn ipv6_gateways_of_ipv4_routes_display_as_inet6() {
        assert_eq!(
            Route::via_dev(net("10.81.0.0/24"), ip("fe80::b"), "v0", false).to_string(),
            "10.81.0.0/24 via inet6 fe80::b dev v0 table 254"
        );
        assert_eq!(
            Route::multipath(
                net("10.80.0.0/24"),
                vec![
                    PathHop::via(ip("192.0.2.2")),
                    PathHop::via(ip("2001:db8::2"))
                ]
            )
            .to_string(),
            "10.80.0.0/24 nexthop via 192.0.2.2 weight 1 nexthop via inet6 2001:db8::2 weight 1 \
             table 254"
        );
        // An IPv6 route's gateway is plain `via`, as `ip -6 route` prints it.
        assert_eq!(
            Route::via(net("fd00:81::/64"), ip("2001:db8::2")).to_string(),
            "fd00:81::/64 via 2001:db8::2 table 254"
        );
    }

    #[test]
    fn multipath_display() {
        assert_eq!(
            two_hops_v4().in_table(100).to_string(),
            "10.80.0.0/24 nexthop via 192.0.2.2 dev v0 weight 3 \
             nexthop via 203.0.113.2 dev w0 onlink weight 1 table 100"
        );
    }
}
