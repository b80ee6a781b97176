//! Path attributes as the RIB keeps them: one [`PathAttrs`] value per distinct set,
//! shared by every prefix that carries it (all prefixes of one UPDATE share one
//! `Arc`), and conversion from and to the codec's attribute lists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use margay_bgp_wire::{
    Aggregator, AsPath, AsSegment, Community, ExtendedCommunity, Family, LargeCommunity, MpReach,
    NextHop, Nlri, Origin, PathAttribute, Prefix, RawAttribute, SegmentKind, Update,
};

/// The attributes of a path, decoded. Next hops are per family, so an UPDATE with
/// both IPv4 body NLRI and IPv6 MP_REACH_NLRI yields two of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathAttrs {
    pub origin: Origin,
    pub as_path: AsPath,
    /// `None` only for locally originated routes, whose next hop is the speaker.
    pub next_hop: Option<NextHop>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<Aggregator>,
    pub communities: Vec<Community>,
    pub ext_communities: Vec<ExtendedCommunity>,
    pub large_communities: Vec<LargeCommunity>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unrecognised optional transitive attributes, passed on with Partial set.
    pub other: Vec<RawAttribute>,
}

impl Default for PathAttrs {
    fn default() -> Self {
        Self {
            origin: Origin::Igp,
            as_path: AsPath::default(),
            next_hop: None,
            med: None,
            local_pref: None,
            atomic_aggregate: false,
            aggregator: None,
            communities: Vec::new(),
            ext_communities: Vec::new(),
            large_communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
            other: Vec::new(),
        }
    }
}

/// The address a next hop forwards to (the global one for IPv6).
pub fn next_hop_addr(nh: &NextHop) -> IpAddr {
    match nh {
        NextHop::V4(a) => IpAddr::V4(*a),
        NextHop::V6 { global, .. } => IpAddr::V6(*global),
    }
}

/// A next hop for an address.
pub fn next_hop_from(addr: IpAddr) -> NextHop {
    match addr {
        IpAddr::V4(a) => NextHop::V4(a),
        IpAddr::V6(a) => NextHop::V6 {
            global: a,
            link_local: None,
        },
    }
}

/// An IPv4 address as an IPv4-mapped IPv6 next hop (what BIRD sends for IPv6 routes
/// over an IPv4-only session without a configured IPv6 next hop).
pub fn mapped_v6(a: Ipv4Addr) -> Ipv6Addr {
    a.to_ipv6_mapped()
}

impl PathAttrs {
    /// The neighbouring AS for the MED comparison: the first AS of the path.
    pub fn neighbour_as(&self) -> Option<u32> {
        self.as_path
            .segments
            .iter()
            .find(|s| !s.kind.is_confed())
            .and_then(|s| s.asns.first().copied())
    }

    /// `asn` prepended `count` times, merging into a leading AS_SEQUENCE.
    pub fn prepend(&mut self, asn: u32, count: usize) {
        if count == 0 {
            return;
        }
        match self.as_path.segments.first_mut() {
            Some(AsSegment {
                kind: SegmentKind::Sequence,
                asns,
            }) => {
                asns.splice(0..0, std::iter::repeat_n(asn, count));
            }
            _ => self.as_path.segments.insert(
                0,
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn; count],
                },
            ),
        }
    }

    /// Builds the attribute list for `family` (with an empty MP_REACH_NLRI template
    /// where needed: IPv6, or IPv4 with an IPv6 next hop). `next_hop` must be set.
    pub fn to_wire(&self, family: Family) -> Vec<PathAttribute> {
        let mut v = Vec::with_capacity(8);
        v.push(PathAttribute::Origin(self.origin));
        v.push(PathAttribute::AsPath(self.as_path.clone()));
        let nh = self.next_hop.unwrap_or(NextHop::V4(Ipv4Addr::UNSPECIFIED));
        let mp = match (family, nh) {
            (Family::Ipv4Unicast, NextHop::V4(a)) => {
                v.push(PathAttribute::NextHop(a));
                None
            }
            _ => Some(PathAttribute::MpReachNlri(MpReach::Unicast {
                family,
                next_hop: nh,
                nlri: Vec::new(),
            })),
        };
        if let Some(m) = self.med {
            v.push(PathAttribute::MultiExitDisc(m));
        }
        if let Some(l) = self.local_pref {
            v.push(PathAttribute::LocalPref(l));
        }
        if self.atomic_aggregate {
            v.push(PathAttribute::AtomicAggregate);
        }
        if let Some(a) = self.aggregator {
            v.push(PathAttribute::Aggregator(a));
        }
        if !self.communities.is_empty() {
            v.push(PathAttribute::Communities(self.communities.clone()));
        }
        if let Some(o) = self.originator_id {
            v.push(PathAttribute::OriginatorId(o));
        }
        if !self.cluster_list.is_empty() {
            v.push(PathAttribute::ClusterList(self.cluster_list.clone()));
        }
        if let Some(m) = mp {
            v.push(m);
        }
        if !self.ext_communities.is_empty() {
            v.push(PathAttribute::ExtendedCommunities(
                self.ext_communities.clone(),
            ));
        }
        if !self.large_communities.is_empty() {
            v.push(PathAttribute::LargeCommunities(
                self.large_communities.clone(),
            ));
        }
        for o in &self.other {
            v.push(PathAttribute::Unknown(o.clone()));
        }
        v
    }
}

/// What one received UPDATE means for the RIB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteUpdate {
    pub withdrawn: Vec<Prefix>,
    /// Prefixes announced, grouped by their (shared) attributes.
    pub announced: Vec<(Arc<PathAttrs>, Vec<Prefix>)>,
    /// The UPDATE was an End-of-RIB marker for this family (RFC 4724 §2).
    pub end_of_rib: Option<Family>,
}

impl RouteUpdate {
    pub fn prefix_count(&self) -> usize {
        self.withdrawn.len() + self.announced.iter().map(|(_, p)| p.len()).sum::<usize>()
    }
}

/// Turns a decoded UPDATE into RIB input. AS4_PATH is folded in for 2-octet peers
/// (RFC 6793 §4.2.3) before this is called.
pub fn route_update(update: &Update) -> RouteUpdate {
    if let Some(f) = update.end_of_rib_family() {
        return RouteUpdate {
            end_of_rib: Some(f),
            ..RouteUpdate::default()
        };
    }
    let mut base = PathAttrs::default();
    let mut body_nh = None;
    let mut mp: Option<(NextHop, &Vec<Nlri>)> = None;
    for a in &update.attributes {
        match a {
            PathAttribute::Origin(o) => base.origin = *o,
            PathAttribute::AsPath(p) => base.as_path = p.clone(),
            PathAttribute::NextHop(n) => body_nh = Some(NextHop::V4(*n)),
            PathAttribute::MultiExitDisc(m) => base.med = Some(*m),
            PathAttribute::LocalPref(l) => base.local_pref = Some(*l),
            PathAttribute::AtomicAggregate => base.atomic_aggregate = true,
            PathAttribute::Aggregator(g) => base.aggregator = Some(*g),
            PathAttribute::Communities(c) => base.communities = c.clone(),
            PathAttribute::OriginatorId(o) => base.originator_id = Some(*o),
            PathAttribute::ClusterList(c) => base.cluster_list = c.clone(),
            PathAttribute::MpReachNlri(MpReach::Unicast { next_hop, nlri, .. }) => {
                mp = Some((*next_hop, nlri))
            }
            PathAttribute::ExtendedCommunities(c) => base.ext_communities = c.clone(),
            PathAttribute::LargeCommunities(c) => base.large_communities = c.clone(),
            PathAttribute::Unknown(r) if r.flags & 0x40 != 0 => base.other.push(r.clone()),
            _ => {}
        }
    }
    let withdrawn = update.withdrawn_all().map(|n| n.prefix).collect();
    let mut announced = Vec::new();
    if !update.nlri.is_empty() {
        let mut a = base.clone();
        a.next_hop = body_nh;
        announced.push((Arc::new(a), update.nlri.iter().map(|n| n.prefix).collect()));
    }
    if let Some((nh, nlri)) = mp {
        if !nlri.is_empty() {
            let mut a = base;
            a.next_hop = Some(nh);
            announced.push((Arc::new(a), nlri.iter().map(|n| n.prefix).collect()));
        }
    }
    RouteUpdate {
        withdrawn,
        announced,
        end_of_rib: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_family_update_gives_each_family_its_next_hop() {
        let p4: Prefix = "10.1.0.0/16".parse().unwrap();
        let p6: Prefix = "2001:db8::/32".parse().unwrap();
        let nh6 = NextHop::V6 {
            global: "2001:db8::1".parse().unwrap(),
            link_local: None,
        };
        let u = Update {
            attributes: vec![
                PathAttribute::Origin(Origin::Igp),
                PathAttribute::AsPath(AsPath::sequence([65001])),
                PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 1)),
                PathAttribute::MpReachNlri(MpReach::Unicast {
                    family: Family::Ipv6Unicast,
                    next_hop: nh6,
                    nlri: vec![Nlri::new(p6)],
                }),
            ],
            nlri: vec![Nlri::new(p4)],
            ..Update::default()
        };
        let r = route_update(&u);
        assert_eq!(r.announced.len(), 2);
        assert_eq!(
            r.announced[0].0.next_hop,
            Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(r.announced[0].1, vec![p4]);
        assert_eq!(r.announced[1].0.next_hop, Some(nh6));
        assert_eq!(r.announced[1].1, vec![p6]);
    }

    #[test]
    fn end_of_rib_is_recognised() {
        let r = route_update(&Update::end_of_rib(Family::Ipv6Unicast));
        assert_eq!(r.end_of_rib, Some(Family::Ipv6Unicast));
        assert!(r.announced.is_empty());
    }

    #[test]
    fn prepend_merges_into_the_leading_sequence() {
        let mut a = PathAttrs {
            as_path: AsPath::sequence([65002]),
            ..PathAttrs::default()
        };
        a.prepend(65001, 2);
        assert_eq!(a.as_path, AsPath::sequence([65001, 65001, 65002]));
        let mut e = PathAttrs::default();
        e.prepend(7, 1);
        assert_eq!(e.as_path, AsPath::sequence([7]));
    }

    #[test]
    fn to_wire_puts_ipv6_next_hops_in_mp_reach() {
        let a = PathAttrs {
            next_hop: Some(NextHop::V6 {
                global: "2001:db8::1".parse().unwrap(),
                link_local: None,
            }),
            ..PathAttrs::default()
        };
        let w = a.to_wire(Family::Ipv4Unicast);
        assert!(w.iter().any(|x| matches!(x, PathAttribute::MpReachNlri(_))));
        assert!(!w.iter().any(|x| matches!(x, PathAttribute::NextHop(_))));
    }
}
