//! UPDATE (RFC 4271 §4.3) and ROUTE-REFRESH (RFC 2918 §3, RFC 7313 §3.2).
//!
//! ```text
//! +-----------------------------------------------------+
//! |   Withdrawn Routes Length (2 octets)                |
//! +-----------------------------------------------------+
//! |   Withdrawn Routes (variable)                       |
//! +-----------------------------------------------------+
//! |   Total Path Attribute Length (2 octets)            |
//! +-----------------------------------------------------+
//! |   Path Attributes (variable)                        |
//! +-----------------------------------------------------+
//! |   Network Layer Reachability Information (variable) |
//! +-----------------------------------------------------+
//! ```

use std::ops::Range;

use bytes::BufMut;

use crate::attribute::{
    attr_type, decode_attributes, split_mp_reach, Fault, MpReach, MpUnreach, PathAttribute,
    RawAttributeIter, Severity, TypeCodeSet,
};
use crate::context::Context;
use crate::error::{code, subcode, Action, DecodeError, Discarded, EncodeError, ErrorKind};
use crate::header::{self, MessageType, HEADER_LEN};
use crate::notification::Notification;
use crate::prefix::{self, Family, Nlri, NlriIter};

/// An UPDATE, owned. `withdrawn` and `nlri` are the IPv4 unicast body fields; other
/// families travel in the MP_REACH_NLRI / MP_UNREACH_NLRI attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Nlri>,
    pub attributes: Vec<PathAttribute>,
    pub nlri: Vec<Nlri>,
    /// Attributes the peer wrote with Extended Length although their value fitted one
    /// octet (BIRD does so for MP_REACH_NLRI), kept so that re-encoding reproduces
    /// its bytes. Empty on anything built here.
    pub extended_length: TypeCodeSet,
    /// Filled by decoding: attributes dropped under RFC 7606 attribute discard, as
    /// duplicates, or as unrecognised optional non-transitive. Never encoded.
    pub discarded: Vec<Discarded>,
}

impl Update {
    /// End-of-RIB for `family` (RFC 4724 §2): an empty UPDATE for IPv4 unicast, an
    /// MP_UNREACH_NLRI with no NLRI otherwise.
    pub fn end_of_rib(family: Family) -> Self {
        match family {
            Family::Ipv4Unicast => Self::default(),
            _ => Self {
                attributes: vec![PathAttribute::MpUnreachNlri(MpUnreach::Unicast {
                    family,
                    withdrawn: Vec::new(),
                })],
                ..Self::default()
            },
        }
    }

    /// The family this UPDATE marks the End-of-RIB of, if it is one.
    pub fn end_of_rib_family(&self) -> Option<Family> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() {
            return None;
        }
        match self.attributes.as_slice() {
            [] => Some(Family::Ipv4Unicast),
            [PathAttribute::MpUnreachNlri(MpUnreach::Unicast { family, withdrawn })]
                if withdrawn.is_empty() =>
            {
                Some(*family)
            }
            _ => None,
        }
    }

    /// The first attribute with `type_code`.
    pub fn attribute(&self, type_code: u8) -> Option<&PathAttribute> {
        self.attributes.iter().find(|a| a.type_code() == type_code)
    }

    pub fn mp_reach(&self) -> Option<&MpReach> {
        self.attributes.iter().find_map(|a| match a {
            PathAttribute::MpReachNlri(m) => Some(m),
            _ => None,
        })
    }

    pub fn mp_unreach(&self) -> Option<&MpUnreach> {
        self.attributes.iter().find_map(|a| match a {
            PathAttribute::MpUnreachNlri(m) => Some(m),
            _ => None,
        })
    }

    /// Every prefix announced, body and MP_REACH_NLRI alike.
    pub fn announced(&self) -> impl Iterator<Item = &Nlri> {
        let mp: &[Nlri] = match self.mp_reach() {
            Some(MpReach::Unicast { nlri, .. }) => nlri,
            _ => &[],
        };
        self.nlri.iter().chain(mp)
    }

    /// Every prefix withdrawn, body and MP_UNREACH_NLRI alike.
    pub fn withdrawn_all(&self) -> impl Iterator<Item = &Nlri> {
        let mp: &[Nlri] = match self.mp_unreach() {
            Some(MpUnreach::Unicast { withdrawn, .. }) => withdrawn,
            _ => &[],
        };
        self.withdrawn.iter().chain(mp)
    }

    fn attributes_len(&self, ctx: &Context) -> usize {
        self.attributes
            .iter()
            .map(|a| {
                let l = a.wire_len(ctx);
                if l == a.value_len(ctx) + 3 && self.extended_length.contains(a.type_code()) {
                    l + 1
                } else {
                    l
                }
            })
            .sum()
    }

    pub(crate) fn body_len(&self, ctx: &Context) -> usize {
        let ap = ctx.add_path_send.ipv4_unicast;
        4 + self.withdrawn.iter().map(|n| n.wire_len(ap)).sum::<usize>()
            + self.attributes_len(ctx)
            + self.nlri.iter().map(|n| n.wire_len(ap)).sum::<usize>()
    }

    pub(crate) fn encode_body(
        &self,
        ctx: &Context,
        buf: &mut impl BufMut,
    ) -> Result<(), EncodeError> {
        let ap = ctx.add_path_send.ipv4_unicast;
        if self
            .withdrawn
            .iter()
            .chain(&self.nlri)
            .any(|n| n.prefix.family() != Family::Ipv4Unicast)
        {
            return Err(EncodeError::Invalid(
                "the UPDATE body carries only IPv4 prefixes; put others in MP_REACH_NLRI / MP_UNREACH_NLRI",
            ));
        }
        let wlen: usize = self.withdrawn.iter().map(|n| n.wire_len(ap)).sum();
        let alen = self.attributes_len(ctx);
        if wlen > 0xffff || alen > 0xffff {
            return Err(EncodeError::TooLong {
                what: "the withdrawn routes or path attributes",
                length: wlen.max(alen),
                max: 0xffff,
            });
        }
        buf.put_u16(wlen as u16);
        self.withdrawn.iter().for_each(|n| n.encode(ap, buf));
        buf.put_u16(alen as u16);
        for a in &self.attributes {
            a.encode_with(ctx, self.extended_length.contains(a.type_code()), buf)?;
        }
        self.nlri.iter().for_each(|n| n.encode(ap, buf));
        Ok(())
    }

    /// Decodes an UPDATE message (the whole framed message) with RFC 7606 handling.
    pub fn decode(msg: &[u8], ctx: &Context) -> Result<Self, DecodeError> {
        UpdateView::parse(msg, ctx)?.to_update(ctx)
    }
}

/// An UPDATE read in place: section boundaries found and the body NLRI fields
/// checked, nothing copied. Iterating prefixes allocates nothing.
#[derive(Debug, Clone)]
pub struct UpdateView<'a> {
    msg: &'a [u8],
    withdrawn: Range<usize>,
    attributes: Range<usize>,
    nlri: Range<usize>,
    add_path: bool,
    /// Entries in the Withdrawn Routes and NLRI fields, counted while validating.
    counts: (usize, usize),
}

fn reset3(field: &'static str, offset: usize, kind: ErrorKind, sub: u8) -> DecodeError {
    DecodeError::reset(field, offset, kind, code::UPDATE_MESSAGE, sub, Vec::new())
}

impl<'a> UpdateView<'a> {
    /// Checks the header and the section lengths of the UPDATE `msg`, and the syntax
    /// of the withdrawn routes and NLRI fields (both session reset when wrong:
    /// RFC 4271 §6.3, RFC 7606 §5.3).
    pub fn parse(msg: &'a [u8], ctx: &Context) -> Result<Self, DecodeError> {
        let kind = header::check(msg, ctx)?;
        if kind != MessageType::Update {
            return Err(DecodeError::reset(
                "message type",
                18,
                ErrorKind::BadType(msg[18]),
                code::MESSAGE_HEADER,
                subcode::BAD_MESSAGE_TYPE,
                vec![msg[18]],
            ));
        }
        // The header check guarantees at least the two 2-octet length fields' room
        // for the first one; the second is checked here.
        let body_end = msg.len();
        let wlen = usize::from(u16::from_be_bytes([msg[19], msg[20]]));
        let w_start = 21;
        if w_start + wlen + 2 > body_end {
            return Err(reset3(
                "withdrawn routes length",
                19,
                ErrorKind::Overrun {
                    declared: wlen,
                    available: body_end - w_start - 2,
                },
                subcode::MALFORMED_ATTRIBUTE_LIST,
            ));
        }
        let a_len_off = w_start + wlen;
        let alen = usize::from(u16::from_be_bytes([msg[a_len_off], msg[a_len_off + 1]]));
        let a_start = a_len_off + 2;
        if a_start + alen > body_end {
            return Err(reset3(
                "total path attribute length",
                a_len_off,
                ErrorKind::Overrun {
                    declared: alen,
                    available: body_end - a_start,
                },
                subcode::MALFORMED_ATTRIBUTE_LIST,
            ));
        }
        let add_path = ctx.add_path_receive.ipv4_unicast;
        let view = Self {
            msg,
            withdrawn: w_start..a_len_off,
            attributes: a_start..a_start + alen,
            nlri: a_start + alen..body_end,
            add_path,
            counts: (0, 0),
        };
        let check = |range: &Range<usize>, what: &'static str| {
            prefix::validate(&msg[range.clone()], Family::Ipv4Unicast, add_path).map_err(
                |(rel, field, kind)| {
                    let field = if what == "NLRI" { field } else { what };
                    reset3(
                        field,
                        range.start + rel,
                        kind,
                        subcode::INVALID_NETWORK_FIELD,
                    )
                },
            )
        };
        let w = check(&view.withdrawn, "withdrawn routes")?;
        let n = check(&view.nlri, "NLRI")?;
        Ok(Self {
            counts: (w, n),
            ..view
        })
    }

    /// IPv4 prefixes in the Withdrawn Routes field.
    pub fn withdrawn(&self) -> NlriIter<'a> {
        NlriIter::new(
            &self.msg[self.withdrawn.clone()],
            Family::Ipv4Unicast,
            self.add_path,
        )
    }

    /// IPv4 prefixes in the NLRI field.
    pub fn nlri(&self) -> NlriIter<'a> {
        NlriIter::new(
            &self.msg[self.nlri.clone()],
            Family::Ipv4Unicast,
            self.add_path,
        )
    }

    /// The raw path attributes, in order.
    pub fn attributes(&self) -> RawAttributeIter<'a> {
        RawAttributeIter::new(&self.msg[self.attributes.clone()], self.attributes.start)
    }

    /// Prefixes in a well-formed unicast MP_REACH_NLRI, without decoding anything
    /// else; `None` if there is none or it is not well-formed (use
    /// [`Self::to_update`] for the verdict).
    pub fn mp_reach_nlri(&self, ctx: &Context) -> Option<NlriIter<'a>> {
        let a = self
            .attributes()
            .map_while(Result::ok)
            .find(|a| a.type_code == attr_type::MP_REACH_NLRI)?;
        let r = split_mp_reach(a.value, ctx).ok()??;
        let ap = ctx.add_path_receive.contains(r.family);
        prefix::validate(r.nlri, r.family, ap).ok()?;
        Some(NlriIter::new(r.nlri, r.family, ap))
    }

    /// Prefixes in a well-formed unicast MP_UNREACH_NLRI.
    pub fn mp_unreach_nlri(&self, ctx: &Context) -> Option<NlriIter<'a>> {
        let a = self
            .attributes()
            .map_while(Result::ok)
            .find(|a| a.type_code == attr_type::MP_UNREACH_NLRI)?;
        let v = a.value;
        let family =
            Family::from_afi_safi(u16::from_be_bytes([*v.first()?, *v.get(1)?]), *v.get(2)?)?;
        let ap = ctx.add_path_receive.contains(family);
        prefix::validate(&v[3..], family, ap).ok()?;
        Some(NlriIter::new(&v[3..], family, ap))
    }

    /// Decodes the path attributes with RFC 7606 handling and copies the prefixes
    /// out: the owned [`Update`], or the error and what to do about it.
    pub fn to_update(&self, ctx: &Context) -> Result<Update, DecodeError> {
        let attrs = match decode_attributes(
            &self.msg[self.attributes.clone()],
            self.attributes.start,
            ctx,
        ) {
            Ok(a) => a,
            Err(f) => return Err(fault_error(f, Vec::new)),
        };
        let mut worst = attrs.worst.clone();
        let mp_nlri = attrs.list.iter().any(|a| {
            matches!(a, PathAttribute::MpReachNlri(MpReach::Unicast { nlri, .. }) if !nlri.is_empty())
                || matches!(a, PathAttribute::MpReachNlri(MpReach::Other { .. }))
        });
        let body_nlri = !self.nlri.is_empty();
        if body_nlri || mp_nlri {
            // RFC 7606 §3 (d): a missing well-known mandatory attribute is
            // treat-as-withdraw. NEXT_HOP is needed only for body NLRI (RFC 4760 §3).
            let needed: &[u8] = if body_nlri {
                &[attr_type::ORIGIN, attr_type::AS_PATH, attr_type::NEXT_HOP]
            } else {
                &[attr_type::ORIGIN, attr_type::AS_PATH]
            };
            if let Some(&missing) = needed.iter().find(|&&t| !attrs.has(t)) {
                let f = Fault {
                    field: "path attributes",
                    offset: self.attributes.start,
                    kind: ErrorKind::MissingWellKnown(missing),
                    severity: Severity::Withdraw,
                    subcode: subcode::MISSING_WELL_KNOWN_ATTRIBUTE,
                    data: vec![missing],
                    type_code: missing,
                };
                if f.stronger_than(&worst) {
                    worst = Some(f);
                }
            }
        }
        if let Some(f) = worst {
            return Err(fault_error(f, || {
                let mut all: Vec<Nlri> = Vec::new();
                all.extend(self.withdrawn());
                all.extend(self.nlri());
                for a in &attrs.list {
                    match a {
                        PathAttribute::MpReachNlri(MpReach::Unicast { nlri, .. }) => {
                            all.extend_from_slice(nlri)
                        }
                        PathAttribute::MpUnreachNlri(MpUnreach::Unicast { withdrawn, .. }) => {
                            all.extend_from_slice(withdrawn)
                        }
                        _ => {}
                    }
                }
                all
            }));
        }
        let withdrawn = collect_exact(self.withdrawn(), self.counts.0);
        let nlri = collect_exact(self.nlri(), self.counts.1);
        Ok(Update {
            withdrawn,
            attributes: attrs.list,
            extended_length: attrs.extended_length,
            nlri,
            discarded: attrs.discarded,
        })
    }
}

/// Collects `n` validated entries into a vector of exactly that size.
fn collect_exact(mut it: NlriIter<'_>, n: usize) -> Vec<Nlri> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        match it.next() {
            Some(x) => v.push(x),
            None => break,
        }
    }
    v
}

fn fault_error(f: Fault, withdrawn: impl FnOnce() -> Vec<Nlri>) -> DecodeError {
    let notification = Notification::error(f.code(), f.subcode, f.data);
    let action = match f.severity {
        Severity::Reset => Action::SessionReset(notification),
        Severity::Disable { afi, safi } => Action::AfiSafiDisable {
            afi,
            safi,
            notification,
        },
        Severity::Withdraw | Severity::Discard => Action::TreatAsWithdraw {
            withdrawn: withdrawn(),
            notification,
        },
    };
    DecodeError {
        field: f.field,
        offset: f.offset,
        kind: f.kind,
        action,
    }
}

/// ROUTE-REFRESH (RFC 2918 §3; the reserved octet is the RFC 7313 subtype).
///
/// ```text
/// 0       7      15      23      31
/// +-------+-------+-------+-------+
/// |      AFI      | Subtype| SAFI  |
/// +-------+-------+-------+-------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteRefresh {
    pub afi: u16,
    /// 0 normal, 1 Beginning of Route Refresh, 2 End of Route Refresh; others are
    /// kept and should be ignored (RFC 7313 §5).
    pub subtype: u8,
    pub safi: u8,
}

impl RouteRefresh {
    pub const NORMAL: u8 = 0;
    pub const BEGIN: u8 = 1;
    pub const END: u8 = 2;

    pub fn new(family: Family, subtype: u8) -> Self {
        Self {
            afi: family.afi(),
            subtype,
            safi: family.safi(),
        }
    }

    pub(crate) fn decode(msg: &[u8]) -> Result<Self, DecodeError> {
        if msg.len() != HEADER_LEN + 4 {
            // RFC 7313 §5: the data is the complete message.
            return Err(DecodeError::reset(
                "message length",
                16,
                ErrorKind::RouteRefreshLength(msg.len() as u16),
                code::ROUTE_REFRESH,
                subcode::INVALID_MESSAGE_LENGTH,
                msg.to_vec(),
            ));
        }
        Ok(Self {
            afi: u16::from_be_bytes([msg[19], msg[20]]),
            subtype: msg[21],
            safi: msg[22],
        })
    }

    pub(crate) fn encode_body(&self, buf: &mut impl BufMut) {
        buf.put_u16(self.afi);
        buf.put_u8(self.subtype);
        buf.put_u8(self.safi);
    }
}
