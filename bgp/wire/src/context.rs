//! Negotiated session state that changes how bytes are read and written.

use crate::capability::{AddPathMode, Capability};
use crate::open::Open;
use crate::prefix::Family;

/// A set of the address families this codec knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Families {
    pub ipv4_unicast: bool,
    pub ipv6_unicast: bool,
}

impl Families {
    pub const NONE: Self = Self {
        ipv4_unicast: false,
        ipv6_unicast: false,
    };
    pub const ALL: Self = Self {
        ipv4_unicast: true,
        ipv6_unicast: true,
    };

    pub fn contains(&self, family: Family) -> bool {
        match family {
            Family::Ipv4Unicast => self.ipv4_unicast,
            Family::Ipv6Unicast => self.ipv6_unicast,
        }
    }

    pub fn insert(&mut self, family: Family) {
        match family {
            Family::Ipv4Unicast => self.ipv4_unicast = true,
            Family::Ipv6Unicast => self.ipv6_unicast = true,
        }
    }
}

/// What the two OPENs agreed, plus the one fact about the peer RFC 7606 needs.
///
/// Decoding uses the `*_receive` side, encoding the `*_send` side. The default is a
/// session before capabilities are known: 2-octet AS, no ADD-PATH, 4096-byte messages,
/// iBGP rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Both sides advertised the 4-octet AS capability (RFC 6793).
    pub four_octet_as: bool,
    /// Both sides advertised extended messages (RFC 8654): UPDATE, NOTIFICATION and
    /// ROUTE-REFRESH may be up to 65535 bytes.
    pub extended_message: bool,
    /// Families whose received NLRI carry a path identifier (RFC 7911).
    pub add_path_receive: Families,
    /// Families whose sent NLRI carry a path identifier.
    pub add_path_send: Families,
    /// NLRI families allowed an IPv6 next hop (RFC 8950; only IPv4 unicast applies).
    pub extended_next_hop: Families,
    /// The peer is external and not a confederation member. LOCAL_PREF, ORIGINATOR_ID
    /// and CLUSTER_LIST from it are discarded, confederation segments are malformed
    /// (RFC 4271 §5.1.5, RFC 4456 §8, RFC 5065 §5, RFC 7606 §7).
    pub is_ebgp: bool,
}

impl Context {
    /// Largest UPDATE / NOTIFICATION / ROUTE-REFRESH this session may carry.
    pub fn max_message_len(&self) -> usize {
        if self.extended_message {
            crate::header::MAX_EXTENDED_LEN
        } else {
            crate::header::MAX_LEN
        }
    }

    /// Context for a session whose OPENs were `local` (ours) and `remote` (theirs).
    pub fn negotiate(local: &Open, remote: &Open, is_ebgp: bool) -> Self {
        let has =
            |open: &Open, pred: &dyn Fn(&Capability) -> bool| open.capabilities.iter().any(pred);
        let mut ctx = Context {
            four_octet_as: has(local, &|c| matches!(c, Capability::FourOctetAs(_)))
                && has(remote, &|c| matches!(c, Capability::FourOctetAs(_))),
            extended_message: has(local, &|c| matches!(c, Capability::ExtendedMessage))
                && has(remote, &|c| matches!(c, Capability::ExtendedMessage)),
            is_ebgp,
            ..Context::default()
        };
        for family in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            let mode = |open: &Open| {
                open.capabilities.iter().find_map(|c| match c {
                    Capability::AddPath(fams) => fams
                        .iter()
                        .find(|f| f.afi == family.afi() && f.safi == family.safi())
                        .map(|f| f.mode),
                    _ => None,
                })
            };
            let (ours, theirs) = (mode(local), mode(remote));
            let can = |m: Option<AddPathMode>, send: bool| match m {
                Some(AddPathMode::Both) => true,
                Some(AddPathMode::Send) => send,
                Some(AddPathMode::Receive) => !send,
                _ => false,
            };
            if can(ours, false) && can(theirs, true) {
                ctx.add_path_receive.insert(family);
            }
            if can(ours, true) && can(theirs, false) {
                ctx.add_path_send.insert(family);
            }
            let enh = |open: &Open| {
                open.capabilities.iter().any(|c| match c {
                    Capability::ExtendedNextHop(v) => v.iter().any(|e| {
                        e.nlri_afi == family.afi()
                            && e.nlri_safi == u16::from(family.safi())
                            && e.nexthop_afi == 2
                    }),
                    _ => false,
                })
            };
            if family == Family::Ipv4Unicast && enh(local) && enh(remote) {
                ctx.extended_next_hop.insert(family);
            }
        }
        ctx
    }
}
