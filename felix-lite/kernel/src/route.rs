//! Routes: what Margay asks for ([`Route`], [`WriteOp`]), what the kernel has
//! ([`KernelRoute`]), and the pure pieces around them (message building, decoding, the sweep
//! plan).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType as NlRouteType,
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

/// Where a route sends traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// `<prefix> via <gw> [dev X] [onlink]`.
    Gateway {
        gw: IpAddr,
        dev: Option<Device>,
        onlink: bool,
    },
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

    pub(crate) fn device(&self) -> Option<&Device> {
        match &self.next_hop {
            NextHop::Gateway { dev, .. } => dev.as_ref(),
            NextHop::Device(d) => Some(d),
            NextHop::Blackhole => None,
        }
    }

    /// Checks what the kernel would refuse with a less helpful message.
    pub fn validate(&self) -> Result<(), crate::KernelError> {
        if let NextHop::Gateway { gw, dev, onlink } = &self.next_hop {
            if gw.is_ipv4() != self.dst.addr().is_ipv4() {
                return Err(crate::KernelError::Invalid(format!(
                    "route {}: gateway {gw} is of another address family",
                    self.dst
                )));
            }
            if *onlink && dev.is_none() {
                return Err(crate::KernelError::Invalid(format!(
                    "route {}: onlink needs a device",
                    self.dst
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.next_hop {
            NextHop::Gateway { gw, dev, onlink } => {
                write!(f, "{} via {gw}", self.dst)?;
                if let Some(d) = dev {
                    write!(f, " dev {d}")?;
                }
                if *onlink {
                    f.write_str(" onlink")?;
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

/// A route as the kernel reports it in a dump or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub table: u32,
    pub protocol: u8,
    pub kind: RouteType,
    pub scope: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub metric: Option<u32>,
}

impl KernelRoute {
    pub fn key(&self) -> RouteKey {
        RouteKey::new(self.table, self.dst)
    }

    pub fn family(&self) -> Family {
        Family::of(&self.dst)
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
            && oif.is_none_or(|i| r.oif == Some(i))
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

/// The `RTM_NEWROUTE` body for `route`; `oif` is the resolved device index, if the route has a
/// device.
pub fn replace_route_message(route: &Route, protocol: u8, oif: Option<u32>) -> RouteMessage {
    let family = route.family();
    let mut h = header(family, &route.dst, route.table, protocol);
    let mut attrs = Vec::with_capacity(5);
    if route.dst.prefix_len() > 0 {
        attrs.push(RouteAttribute::Destination(address(route.dst.addr())));
    }
    attrs.push(RouteAttribute::Table(route.table));
    match &route.next_hop {
        NextHop::Gateway { gw, onlink, .. } => {
            h.scope = RouteScope::Universe;
            h.kind = NlRouteType::Unicast;
            if *onlink {
                h.flags = RouteFlags::from_bits_retain(RTNH_F_ONLINK);
            }
            attrs.push(RouteAttribute::Gateway(address(*gw)));
        }
        NextHop::Device(_) => {
            h.scope = RouteScope::Link;
            h.kind = NlRouteType::Unicast;
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
    m
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
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(x)) => dst_addr = Some((*x).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(x)) => dst_addr = Some((*x).into()),
            RouteAttribute::Gateway(RouteAddress::Inet(x)) => gateway = Some((*x).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(x)) => gateway = Some((*x).into()),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
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
        let (buf, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, None));
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
        let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, Some(7)));
        assert!(back.onlink);
        assert_eq!(back.oif, Some(7));
        assert_eq!(back.gateway, Some("192.168.0.12".parse().unwrap()));
        assert_eq!(back.kind, RouteType::Unicast);
        assert_eq!(back.scope, 0);
    }

    #[test]
    fn device_route_is_link_scoped() {
        let r = Route::dev(net("10.65.0.5/32"), "cali1234567890a");
        let (_, back) = round_trip(replace_route_message(&r, MARGAY_RT_PROTO, Some(9)));
        assert_eq!(back.scope, 253);
        assert_eq!(back.oif, Some(9));
        assert_eq!(back.gateway, None);
    }

    #[test]
    fn v6_and_big_table() {
        let r = Route::via(net("fd00:65::/122"), "fd00::12".parse().unwrap())
            .in_table(1000)
            .with_metric(512);
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, None);
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
        let msg = replace_route_message(&r, MARGAY_RT_PROTO, Some(2));
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
    fn validate_catches_family_mismatch_and_onlink_without_dev() {
        let r = Route::via(net("10.0.0.0/8"), "fd00::1".parse().unwrap());
        assert!(r.validate().is_err());
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
}
