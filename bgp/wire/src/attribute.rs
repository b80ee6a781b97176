//! Path attributes (RFC 4271 §4.3, §5) and their RFC 7606 error handling.
//!
//! ```text
//! 0                   1
//! 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
//! +---------------+---------------+
//! |  Attr. Flags  |Attr. Type Code|   then Length: 1 octet, or 2 with Extended Length
//! +---------------+---------------+
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::BufMut;

use crate::context::Context;
use crate::error::{code, subcode, Discarded, EncodeError, ErrorKind};
use crate::prefix::{self, Family, Nlri, NlriIter};
use crate::AS_TRANS;

/// Attribute flag bits (RFC 4271 §4.3).
pub mod attr_flags {
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED_LENGTH: u8 = 0x10;
}

/// Attribute type codes this codec decodes.
pub mod attr_type {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MULTI_EXIT_DISC: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const EXTENDED_COMMUNITIES: u8 = 16;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    pub const LARGE_COMMUNITY: u8 = 32;
}

use attr_flags::{EXTENDED_LENGTH, OPTIONAL, PARTIAL, TRANSITIVE};
use attr_type::*;

/// ORIGIN (RFC 4271 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// AS_PATH segment types (RFC 4271 §4.3, RFC 5065 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    Set = 1,
    Sequence = 2,
    ConfedSequence = 3,
    ConfedSet = 4,
}

impl SegmentKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Set,
            2 => Self::Sequence,
            3 => Self::ConfedSequence,
            4 => Self::ConfedSet,
            _ => return None,
        })
    }

    pub fn is_confed(self) -> bool {
        matches!(self, Self::ConfedSequence | Self::ConfedSet)
    }
}

/// One AS_PATH segment: type, count (1 octet), then count ASes of 2 or 4 octets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AsSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// AS_PATH or AS4_PATH: a list of segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AsPath {
    pub segments: Vec<AsSegment>,
}

impl AsPath {
    /// A path of one AS_SEQUENCE (empty for an empty sequence).
    pub fn sequence(asns: impl IntoIterator<Item = u32>) -> Self {
        let asns: Vec<u32> = asns.into_iter().collect();
        if asns.is_empty() {
            return Self::default();
        }
        Self {
            segments: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns,
            }],
        }
    }

    /// Path length for route selection and the RFC 6793 merge: an AS_SET counts as
    /// one, confederation segments as none (RFC 4271 §9.1.2.2, RFC 5065 §5.3).
    pub fn route_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    /// The AS that originated the route: the last AS of a trailing AS_SEQUENCE.
    pub fn origin_as(&self) -> Option<u32> {
        match self.segments.last() {
            Some(AsSegment {
                kind: SegmentKind::Sequence,
                asns,
            }) => asns.last().copied(),
            _ => None,
        }
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| s.asns.contains(&asn))
    }

    /// Decodes segments of `width`-octet ASes; the error names the problem and its
    /// offset relative to `v`.
    fn decode(v: &[u8], width: usize) -> Result<Self, (usize, ErrorKind)> {
        let mut segments = Vec::new();
        let mut pos = 0;
        while pos < v.len() {
            if v.len() - pos < 2 {
                return Err((
                    pos,
                    ErrorKind::Truncated {
                        needed: 2,
                        available: v.len() - pos,
                    },
                ));
            }
            let kind =
                SegmentKind::from_u8(v[pos]).ok_or((pos, ErrorKind::BadSegmentType(v[pos])))?;
            let count = usize::from(v[pos + 1]);
            if count == 0 {
                return Err((pos + 1, ErrorKind::EmptySegment));
            }
            let avail = v.len() - pos - 2;
            if count * width > avail {
                return Err((
                    pos + 1,
                    ErrorKind::SegmentOverrun {
                        count,
                        available: avail,
                    },
                ));
            }
            let body = &v[pos + 2..pos + 2 + count * width];
            let asns = if width == 4 {
                body.chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                body.chunks_exact(2)
                    .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                    .collect()
            };
            segments.push(AsSegment { kind, asns });
            pos += 2 + count * width;
        }
        Ok(Self { segments })
    }

    fn wire_len(&self, width: usize) -> usize {
        self.segments
            .iter()
            .map(|s| {
                let chunks = s.asns.len().div_ceil(255).max(1);
                2 * chunks + width * s.asns.len()
            })
            .sum()
    }

    /// Writes the segments; a segment of more than 255 ASes is split, and towards a
    /// 2-octet peer a 4-octet AS becomes AS_TRANS (RFC 6793 §4.2.2).
    fn encode(&self, width: usize, buf: &mut impl BufMut) {
        for s in &self.segments {
            if s.asns.is_empty() {
                buf.put_u8(s.kind as u8);
                buf.put_u8(0);
                continue;
            }
            for chunk in s.asns.chunks(255) {
                buf.put_u8(s.kind as u8);
                buf.put_u8(chunk.len() as u8);
                for &a in chunk {
                    if width == 4 {
                        buf.put_u32(a);
                    } else {
                        buf.put_u16(u16::try_from(a).unwrap_or(AS_TRANS));
                    }
                }
            }
        }
    }
}

impl fmt::Display for AsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let (open, close) = match s.kind {
                SegmentKind::Sequence => ("", ""),
                SegmentKind::Set => ("{", "}"),
                SegmentKind::ConfedSequence => ("(", ")"),
                SegmentKind::ConfedSet => ("[", "]"),
            };
            f.write_str(open)?;
            for (j, a) in s.asns.iter().enumerate() {
                if j > 0 {
                    f.write_str(" ")?;
                }
                write!(f, "{a}")?;
            }
            f.write_str(close)?;
        }
        Ok(())
    }
}

/// AGGREGATOR / AS4_AGGREGATOR (RFC 4271 §5.1.7, RFC 6793).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Aggregator {
    pub asn: u32,
    pub address: Ipv4Addr,
}

/// A COMMUNITIES value (RFC 1997).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Community(pub u32);

impl Community {
    pub const NO_EXPORT: Self = Self(0xFFFF_FF01);
    pub const NO_ADVERTISE: Self = Self(0xFFFF_FF02);
    pub const NO_EXPORT_SUBCONFED: Self = Self(0xFFFF_FF03);

    pub fn new(asn: u16, value: u16) -> Self {
        Self((u32::from(asn) << 16) | u32::from(value))
    }
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

/// An EXTENDED_COMMUNITIES value (RFC 4360), kept as its 8 octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtendedCommunity(pub [u8; 8]);

/// A LARGE_COMMUNITY value (RFC 8092).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    pub global_admin: u32,
    pub local_data1: u32,
    pub local_data2: u32,
}

impl fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.global_admin, self.local_data1, self.local_data2
        )
    }
}

/// An MP_REACH_NLRI next hop (RFC 4760 §3, RFC 2545 §3, RFC 8950 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NextHop {
    V4(Ipv4Addr),
    V6 {
        global: Ipv6Addr,
        link_local: Option<Ipv6Addr>,
    },
}

impl NextHop {
    fn wire_len(&self) -> usize {
        match self {
            Self::V4(_) => 4,
            Self::V6 {
                link_local: None, ..
            } => 16,
            Self::V6 {
                link_local: Some(_),
                ..
            } => 32,
        }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::V4(a) => buf.put_slice(&a.octets()),
            Self::V6 { global, link_local } => {
                buf.put_slice(&global.octets());
                if let Some(ll) = link_local {
                    buf.put_slice(&ll.octets());
                }
            }
        }
    }
}

/// MP_REACH_NLRI (RFC 4760 §3).
///
/// ```text
/// +---------------------------------------------------------+
/// | Address Family Identifier (2 octets)                    |
/// | Subsequent Address Family Identifier (1 octet)          |
/// | Length of Next Hop Network Address (1 octet)            |
/// | Network Address of Next Hop (variable)                  |
/// | Reserved (1 octet)                                      |
/// | Network Layer Reachability Information (variable)       |
/// +---------------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MpReach {
    /// IPv4 or IPv6 unicast, decoded.
    Unicast {
        family: Family,
        next_hop: NextHop,
        nlri: Vec<Nlri>,
    },
    /// Another family, kept as the octets after AFI and SAFI.
    Other { afi: u16, safi: u8, value: Vec<u8> },
}

/// MP_UNREACH_NLRI (RFC 4760 §4): AFI (2), SAFI (1), withdrawn routes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MpUnreach {
    Unicast {
        family: Family,
        withdrawn: Vec<Nlri>,
    },
    Other {
        afi: u16,
        safi: u8,
        value: Vec<u8>,
    },
}

/// An attribute this codec does not interpret, kept to pass on. Decoding sets the
/// Partial bit of an unrecognised optional transitive attribute (RFC 4271 §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttribute {
    /// Flags without the Extended Length bit, which encoding chooses.
    pub flags: u8,
    pub type_code: u8,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathAttribute {
    Origin(Origin),
    AsPath(AsPath),
    NextHop(Ipv4Addr),
    MultiExitDisc(u32),
    LocalPref(u32),
    AtomicAggregate,
    Aggregator(Aggregator),
    Communities(Vec<Community>),
    OriginatorId(Ipv4Addr),
    ClusterList(Vec<Ipv4Addr>),
    MpReachNlri(MpReach),
    MpUnreachNlri(MpUnreach),
    ExtendedCommunities(Vec<ExtendedCommunity>),
    As4Path(AsPath),
    As4Aggregator(Aggregator),
    LargeCommunities(Vec<LargeCommunity>),
    Unknown(RawAttribute),
}

/// The Optional and Transitive bits a known attribute must carry.
fn expected_class(type_code: u8) -> Option<u8> {
    Some(match type_code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE => TRANSITIVE,
        MULTI_EXIT_DISC | ORIGINATOR_ID | CLUSTER_LIST | MP_REACH_NLRI | MP_UNREACH_NLRI => {
            OPTIONAL
        }
        AGGREGATOR | COMMUNITIES | EXTENDED_COMMUNITIES | AS4_PATH | AS4_AGGREGATOR
        | LARGE_COMMUNITY => OPTIONAL | TRANSITIVE,
        _ => return None,
    })
}

impl PathAttribute {
    pub fn type_code(&self) -> u8 {
        match self {
            Self::Origin(_) => ORIGIN,
            Self::AsPath(_) => AS_PATH,
            Self::NextHop(_) => NEXT_HOP,
            Self::MultiExitDisc(_) => MULTI_EXIT_DISC,
            Self::LocalPref(_) => LOCAL_PREF,
            Self::AtomicAggregate => ATOMIC_AGGREGATE,
            Self::Aggregator(_) => AGGREGATOR,
            Self::Communities(_) => COMMUNITIES,
            Self::OriginatorId(_) => ORIGINATOR_ID,
            Self::ClusterList(_) => CLUSTER_LIST,
            Self::MpReachNlri(_) => MP_REACH_NLRI,
            Self::MpUnreachNlri(_) => MP_UNREACH_NLRI,
            Self::ExtendedCommunities(_) => EXTENDED_COMMUNITIES,
            Self::As4Path(_) => AS4_PATH,
            Self::As4Aggregator(_) => AS4_AGGREGATOR,
            Self::LargeCommunities(_) => LARGE_COMMUNITY,
            Self::Unknown(r) => r.type_code,
        }
    }

    /// Flags as sent, without Extended Length.
    pub fn flags(&self) -> u8 {
        match self {
            Self::Unknown(r) => r.flags & !EXTENDED_LENGTH,
            other => expected_class(other.type_code()).unwrap_or(OPTIONAL | TRANSITIVE),
        }
    }

    /// Length of the value on the wire under `ctx`.
    pub fn value_len(&self, ctx: &Context) -> usize {
        let w = if ctx.four_octet_as { 4 } else { 2 };
        match self {
            Self::Origin(_) => 1,
            Self::AsPath(p) => p.wire_len(w),
            Self::As4Path(p) => p.wire_len(4),
            Self::NextHop(_)
            | Self::MultiExitDisc(_)
            | Self::LocalPref(_)
            | Self::OriginatorId(_) => 4,
            Self::AtomicAggregate => 0,
            Self::Aggregator(_) => w + 4,
            Self::As4Aggregator(_) => 8,
            Self::Communities(c) => 4 * c.len(),
            Self::ClusterList(c) => 4 * c.len(),
            Self::ExtendedCommunities(c) => 8 * c.len(),
            Self::LargeCommunities(c) => 12 * c.len(),
            Self::MpReachNlri(MpReach::Unicast {
                family,
                next_hop,
                nlri,
            }) => {
                let ap = ctx.add_path_send.contains(*family);
                5 + next_hop.wire_len() + nlri.iter().map(|n| n.wire_len(ap)).sum::<usize>()
            }
            Self::MpReachNlri(MpReach::Other { value, .. })
            | Self::MpUnreachNlri(MpUnreach::Other { value, .. }) => 3 + value.len(),
            Self::MpUnreachNlri(MpUnreach::Unicast { family, withdrawn }) => {
                let ap = ctx.add_path_send.contains(*family);
                3 + withdrawn.iter().map(|n| n.wire_len(ap)).sum::<usize>()
            }
            Self::Unknown(r) => r.value.len(),
        }
    }

    /// Length on the wire, header included.
    pub fn wire_len(&self, ctx: &Context) -> usize {
        let v = self.value_len(ctx);
        v + if v > 255 { 4 } else { 3 }
    }

    /// Writes the attribute, using Extended Length only when the value needs it.
    pub fn encode(&self, ctx: &Context, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        self.encode_with(ctx, false, buf)
    }

    /// Writes the attribute; `extended` forces a 2-octet length field.
    pub(crate) fn encode_with(
        &self,
        ctx: &Context,
        extended: bool,
        buf: &mut impl BufMut,
    ) -> Result<(), EncodeError> {
        let len = self.value_len(ctx);
        if len > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong {
                what: "a path attribute",
                length: len,
                max: usize::from(u16::MAX),
            });
        }
        if len > 255 || extended {
            buf.put_u8(self.flags() | EXTENDED_LENGTH);
            buf.put_u8(self.type_code());
            buf.put_u16(len as u16);
        } else {
            buf.put_u8(self.flags());
            buf.put_u8(self.type_code());
            buf.put_u8(len as u8);
        }
        self.encode_value(ctx, buf);
        Ok(())
    }

    fn encode_value(&self, ctx: &Context, buf: &mut impl BufMut) {
        let w = if ctx.four_octet_as { 4 } else { 2 };
        match self {
            Self::Origin(o) => buf.put_u8(*o as u8),
            Self::AsPath(p) => p.encode(w, buf),
            Self::As4Path(p) => p.encode(4, buf),
            Self::NextHop(a) | Self::OriginatorId(a) => buf.put_slice(&a.octets()),
            Self::MultiExitDisc(v) | Self::LocalPref(v) => buf.put_u32(*v),
            Self::AtomicAggregate => {}
            Self::Aggregator(a) => {
                if w == 4 {
                    buf.put_u32(a.asn);
                } else {
                    buf.put_u16(u16::try_from(a.asn).unwrap_or(AS_TRANS));
                }
                buf.put_slice(&a.address.octets());
            }
            Self::As4Aggregator(a) => {
                buf.put_u32(a.asn);
                buf.put_slice(&a.address.octets());
            }
            Self::Communities(c) => c.iter().for_each(|c| buf.put_u32(c.0)),
            Self::ClusterList(c) => c.iter().for_each(|a| buf.put_slice(&a.octets())),
            Self::ExtendedCommunities(c) => c.iter().for_each(|c| buf.put_slice(&c.0)),
            Self::LargeCommunities(c) => c.iter().for_each(|c| {
                buf.put_u32(c.global_admin);
                buf.put_u32(c.local_data1);
                buf.put_u32(c.local_data2);
            }),
            Self::MpReachNlri(MpReach::Unicast {
                family,
                next_hop,
                nlri,
            }) => {
                let ap = ctx.add_path_send.contains(*family);
                buf.put_u16(family.afi());
                buf.put_u8(family.safi());
                buf.put_u8(next_hop.wire_len() as u8);
                next_hop.encode(buf);
                buf.put_u8(0);
                nlri.iter().for_each(|n| n.encode(ap, buf));
            }
            Self::MpReachNlri(MpReach::Other { afi, safi, value })
            | Self::MpUnreachNlri(MpUnreach::Other { afi, safi, value }) => {
                buf.put_u16(*afi);
                buf.put_u8(*safi);
                buf.put_slice(value);
            }
            Self::MpUnreachNlri(MpUnreach::Unicast { family, withdrawn }) => {
                let ap = ctx.add_path_send.contains(*family);
                buf.put_u16(family.afi());
                buf.put_u8(family.safi());
                withdrawn.iter().for_each(|n| n.encode(ap, buf));
            }
            Self::Unknown(r) => buf.put_slice(&r.value),
        }
    }
}

// ===== Zero-copy attribute walk =====

/// One attribute as it sits in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeRef<'a> {
    pub flags: u8,
    pub type_code: u8,
    pub value: &'a [u8],
    /// Offset of the flags octet in the message.
    pub offset: usize,
    /// Flags, type, length and value: the NOTIFICATION data for most attribute errors.
    pub raw: &'a [u8],
}

/// Walks the path attribute section without copying. Yields `Err` once, at the
/// first attribute whose header or length overruns the section, then stops.
#[derive(Debug, Clone)]
pub struct RawAttributeIter<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

/// An attribute header or length that overruns the section (RFC 7606 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrOverrun {
    pub offset: usize,
    pub type_code: Option<u8>,
    pub field: &'static str,
    pub kind: ErrorKind,
}

impl<'a> RawAttributeIter<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }
}

impl<'a> Iterator for RawAttributeIter<'a> {
    type Item = Result<AttributeRef<'a>, AttrOverrun>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let offset = self.base + self.pos;
        let fail = |field, type_code, kind| {
            Some(Err(AttrOverrun {
                offset,
                type_code,
                field,
                kind,
            }))
        };
        let hdr = if rest[0] & EXTENDED_LENGTH != 0 { 4 } else { 3 };
        if rest.len() < hdr {
            self.pos = self.buf.len();
            return fail(
                "attribute header",
                rest.get(1).copied(),
                ErrorKind::Truncated {
                    needed: hdr,
                    available: rest.len(),
                },
            );
        }
        let len = if hdr == 4 {
            usize::from(u16::from_be_bytes([rest[2], rest[3]]))
        } else {
            usize::from(rest[2])
        };
        if rest.len() - hdr < len {
            self.pos = self.buf.len();
            return fail(
                "attribute length",
                Some(rest[1]),
                ErrorKind::Overrun {
                    declared: len,
                    available: rest.len() - hdr,
                },
            );
        }
        self.pos += hdr + len;
        Some(Ok(AttributeRef {
            flags: rest[0],
            type_code: rest[1],
            value: &rest[hdr..hdr + len],
            offset,
            raw: &rest[..hdr + len],
        }))
    }
}

// ===== RFC 7606 decoding =====

/// How bad an attribute error is (RFC 7606 §2), weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Severity {
    Discard,
    Withdraw,
    Disable { afi: u16, safi: u8 },
    Reset,
}

impl Severity {
    fn rank(self) -> u8 {
        match self {
            Self::Discard => 0,
            Self::Withdraw => 1,
            Self::Disable { .. } => 2,
            Self::Reset => 3,
        }
    }
}

/// An error found in the attribute section, before it is turned into an [`crate::Action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub field: &'static str,
    pub offset: usize,
    pub kind: ErrorKind,
    pub severity: Severity,
    pub subcode: u8,
    pub data: Vec<u8>,
    pub type_code: u8,
}

impl Fault {
    pub(crate) fn code(&self) -> u8 {
        code::UPDATE_MESSAGE
    }

    pub(crate) fn stronger_than(&self, other: &Option<Fault>) -> bool {
        other
            .as_ref()
            .is_none_or(|o| self.severity.rank() > o.severity.rank())
    }
}

/// A set of attribute type codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TypeCodeSet([u64; 4]);

impl TypeCodeSet {
    pub fn contains(&self, type_code: u8) -> bool {
        self.0[usize::from(type_code >> 6)] & (1u64 << (type_code & 63)) != 0
    }

    pub fn insert(&mut self, type_code: u8) {
        self.0[usize::from(type_code >> 6)] |= 1u64 << (type_code & 63);
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

/// The attribute section, decoded as far as RFC 7606 lets it be.
#[derive(Debug, Default)]
pub(crate) struct Attributes {
    pub list: Vec<PathAttribute>,
    /// Attributes sent with Extended Length though their value fit one octet.
    pub extended_length: TypeCodeSet,
    pub discarded: Vec<Discarded>,
    /// The strongest error below session reset, if any.
    pub worst: Option<Fault>,
    /// Type codes present (first occurrences), for the mandatory check.
    pub seen: [u64; 4],
}

impl Attributes {
    pub(crate) fn has(&self, type_code: u8) -> bool {
        self.seen[usize::from(type_code >> 6)] & (1u64 << (type_code & 63)) != 0
    }

    fn mark(&mut self, type_code: u8) {
        self.seen[usize::from(type_code >> 6)] |= 1u64 << (type_code & 63);
    }

    pub(crate) fn note(&mut self, f: Fault) {
        if f.severity == Severity::Discard {
            self.discarded.push(Discarded {
                type_code: f.type_code,
                offset: f.offset,
                kind: Some(f.kind),
            });
        } else if f.stronger_than(&self.worst) {
            self.worst = Some(f);
        }
    }
}

struct AttrCtx<'a, 'c> {
    a: AttributeRef<'a>,
    ctx: &'c Context,
}

impl AttrCtx<'_, '_> {
    fn fault(
        &self,
        field: &'static str,
        rel: usize,
        kind: ErrorKind,
        severity: Severity,
        sub: u8,
    ) -> Fault {
        Fault {
            field,
            offset: self.value_offset() + rel,
            kind,
            severity,
            subcode: sub,
            data: self.a.raw.to_vec(),
            type_code: self.a.type_code,
        }
    }

    fn value_offset(&self) -> usize {
        self.a.offset + self.a.raw.len() - self.a.value.len()
    }

    fn length_fault(&self, field: &'static str, severity: Severity, sub: u8) -> Fault {
        let kind = ErrorKind::AttributeLength {
            type_code: self.a.type_code,
            length: self.a.value.len(),
        };
        let mut f = self.fault(field, 0, kind, severity, sub);
        f.offset = self.a.offset + 2;
        f
    }
}

fn ipv4(v: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(v[0], v[1], v[2], v[3])
}

fn u32_at(v: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]])
}

/// Decodes the path attribute section `buf`, which starts at `base` in the message.
/// `Err` is a session reset; everything milder is recorded in the result.
pub(crate) fn decode_attributes(
    buf: &[u8],
    base: usize,
    ctx: &Context,
) -> Result<Attributes, Fault> {
    let mut out = Attributes {
        // Bounded by the section: each attribute takes at least 3 octets.
        list: Vec::with_capacity((buf.len() / 3).min(16)),
        ..Attributes::default()
    };
    for item in RawAttributeIter::new(buf, base) {
        let a = match item {
            Ok(a) => a,
            Err(o) => {
                // RFC 7606 §4: treat-as-withdraw, the NLRI field being located by the
                // Total Path Attribute Length. An MP attribute cut short hides NLRI
                // that can no longer be found: session reset (§5.3).
                let mp = matches!(o.type_code, Some(MP_REACH_NLRI | MP_UNREACH_NLRI));
                let f = Fault {
                    field: o.field,
                    offset: o.offset,
                    kind: o.kind,
                    severity: if mp {
                        Severity::Reset
                    } else {
                        Severity::Withdraw
                    },
                    subcode: subcode::MALFORMED_ATTRIBUTE_LIST,
                    data: Vec::new(),
                    type_code: o.type_code.unwrap_or(0),
                };
                if mp {
                    return Err(f);
                }
                out.note(f);
                break;
            }
        };
        let tc = a.type_code;
        if out.has(tc) {
            // RFC 7606 §3 (g).
            if tc == MP_REACH_NLRI || tc == MP_UNREACH_NLRI {
                return Err(Fault {
                    field: "attribute type",
                    offset: a.offset + 1,
                    kind: ErrorKind::DuplicateAttribute(tc),
                    severity: Severity::Reset,
                    subcode: subcode::MALFORMED_ATTRIBUTE_LIST,
                    data: Vec::new(),
                    type_code: tc,
                });
            }
            out.discarded.push(Discarded {
                type_code: tc,
                offset: a.offset,
                kind: Some(ErrorKind::DuplicateAttribute(tc)),
            });
            continue;
        }
        out.mark(tc);
        match decode_one(&AttrCtx { a, ctx }) {
            Ok(Some(attr)) => {
                if a.flags & EXTENDED_LENGTH != 0 && a.value.len() <= 255 {
                    out.extended_length.insert(tc);
                }
                out.list.push(attr)
            }
            Ok(None) => out.discarded.push(Discarded {
                type_code: tc,
                offset: a.offset,
                kind: None,
            }),
            Err(f) if f.severity == Severity::Reset => return Err(f),
            Err(f) => out.note(f),
        }
    }
    Ok(out)
}

/// Decodes one attribute. `Ok(None)`: an unrecognised optional non-transitive
/// attribute, quietly ignored (RFC 4271 §5).
fn decode_one(c: &AttrCtx<'_, '_>) -> Result<Option<PathAttribute>, Fault> {
    let AttributeRef {
        flags,
        type_code: tc,
        value: v,
        ..
    } = c.a;
    let ctx = c.ctx;
    let Some(class) = expected_class(tc) else {
        if flags & OPTIONAL == 0 {
            return Err(c.fault(
                "attribute type",
                0,
                ErrorKind::UnrecognizedWellKnown(tc),
                Severity::Reset,
                subcode::UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE,
            ));
        }
        if flags & TRANSITIVE == 0 {
            return Ok(None);
        }
        return Ok(Some(PathAttribute::Unknown(RawAttribute {
            flags: (flags & (OPTIONAL | TRANSITIVE | PARTIAL)) | PARTIAL,
            type_code: tc,
            value: v.to_vec(),
        })));
    };

    // Attributes an external peer must not send are dropped before any other check
    // (RFC 7606 §7.5, §7.9, §7.10).
    if ctx.is_ebgp && matches!(tc, LOCAL_PREF | ORIGINATOR_ID | CLUSTER_LIST) {
        return Err(c.fault(
            "attribute type",
            0,
            ErrorKind::NotFromExternal(tc),
            Severity::Discard,
            0,
        ));
    }
    // RFC 6793 §4.1: AS4_PATH and AS4_AGGREGATOR between NEW speakers are discarded.
    if ctx.four_octet_as && matches!(tc, AS4_PATH | AS4_AGGREGATOR) {
        return Err(c.fault(
            "attribute type",
            0,
            ErrorKind::As4FromNewSpeaker(tc),
            Severity::Discard,
            0,
        ));
    }

    let mp_family = || {
        if v.len() >= 3 {
            Severity::Disable {
                afi: u16::from_be_bytes([v[0], v[1]]),
                safi: v[2],
            }
        } else {
            Severity::Reset
        }
    };

    if flags & (OPTIONAL | TRANSITIVE) != class {
        // RFC 7606 §3 (c): treat-as-withdraw; for MP_REACH/MP_UNREACH the NLRI
        // can no longer be trusted (§5.3, §7.11).
        let sev = if tc == MP_REACH_NLRI || tc == MP_UNREACH_NLRI {
            mp_family()
        } else {
            Severity::Withdraw
        };
        let mut f = c.fault(
            "attribute flags",
            0,
            ErrorKind::AttributeFlags {
                type_code: tc,
                flags,
            },
            sev,
            subcode::ATTRIBUTE_FLAGS_ERROR,
        );
        f.offset = c.a.offset;
        return Err(f);
    }

    let w = if ctx.four_octet_as { 4 } else { 2 };
    let withdraw = Severity::Withdraw;
    let discard = Severity::Discard;
    Ok(Some(match tc {
        ORIGIN => {
            if v.len() != 1 {
                return Err(c.length_fault(
                    "ORIGIN length",
                    withdraw,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::Origin(match v[0] {
                0 => Origin::Igp,
                1 => Origin::Egp,
                2 => Origin::Incomplete,
                x => {
                    return Err(c.fault(
                        "ORIGIN",
                        0,
                        ErrorKind::InvalidOrigin(x),
                        withdraw,
                        subcode::INVALID_ORIGIN_ATTRIBUTE,
                    ))
                }
            })
        }
        AS_PATH => {
            let path = AsPath::decode(v, w).map_err(|(rel, kind)| {
                let mut f = c.fault(
                    "AS_PATH segment",
                    rel,
                    kind,
                    withdraw,
                    subcode::MALFORMED_AS_PATH,
                );
                f.data.clear();
                f
            })?;
            if ctx.is_ebgp && path.segments.iter().any(|s| s.kind.is_confed()) {
                let mut f = c.fault(
                    "AS_PATH segment type",
                    0,
                    ErrorKind::ConfedSegmentFromExternal,
                    withdraw,
                    subcode::MALFORMED_AS_PATH,
                );
                f.data.clear();
                return Err(f);
            }
            PathAttribute::AsPath(path)
        }
        AS4_PATH => {
            // RFC 6793 §6: a malformed AS4_PATH is discarded, the UPDATE kept.
            let path = AsPath::decode(v, 4).map_err(|(rel, kind)| {
                c.fault(
                    "AS4_PATH segment",
                    rel,
                    kind,
                    discard,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                )
            })?;
            PathAttribute::As4Path(path)
        }
        NEXT_HOP => {
            if v.len() != 4 {
                return Err(c.length_fault(
                    "NEXT_HOP length",
                    withdraw,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::NextHop(ipv4(v))
        }
        MULTI_EXIT_DISC => {
            if v.len() != 4 {
                return Err(c.length_fault(
                    "MULTI_EXIT_DISC length",
                    withdraw,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::MultiExitDisc(u32_at(v, 0))
        }
        LOCAL_PREF => {
            if v.len() != 4 {
                return Err(c.length_fault(
                    "LOCAL_PREF length",
                    withdraw,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::LocalPref(u32_at(v, 0))
        }
        ATOMIC_AGGREGATE => {
            if !v.is_empty() {
                return Err(c.length_fault(
                    "ATOMIC_AGGREGATE length",
                    discard,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::AtomicAggregate
        }
        AGGREGATOR | AS4_AGGREGATOR => {
            let width = if tc == AGGREGATOR { w } else { 4 };
            let name = if tc == AGGREGATOR {
                "AGGREGATOR length"
            } else {
                "AS4_AGGREGATOR length"
            };
            if v.len() != width + 4 {
                return Err(c.length_fault(name, discard, subcode::ATTRIBUTE_LENGTH_ERROR));
            }
            let asn = if width == 4 {
                u32_at(v, 0)
            } else {
                u32::from(u16::from_be_bytes([v[0], v[1]]))
            };
            if asn == 0 {
                // RFC 7607 §2.
                return Err(c.fault(
                    "aggregator AS",
                    0,
                    ErrorKind::BadPeerAs(0),
                    discard,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                ));
            }
            let agg = Aggregator {
                asn,
                address: ipv4(&v[width..]),
            };
            if tc == AGGREGATOR {
                PathAttribute::Aggregator(agg)
            } else {
                PathAttribute::As4Aggregator(agg)
            }
        }
        COMMUNITIES => {
            if v.is_empty() || !v.len().is_multiple_of(4) {
                return Err(c.length_fault(
                    "COMMUNITIES length",
                    withdraw,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                ));
            }
            PathAttribute::Communities(v.chunks_exact(4).map(|x| Community(u32_at(x, 0))).collect())
        }
        ORIGINATOR_ID => {
            if v.len() != 4 {
                return Err(c.length_fault(
                    "ORIGINATOR_ID length",
                    withdraw,
                    subcode::ATTRIBUTE_LENGTH_ERROR,
                ));
            }
            PathAttribute::OriginatorId(ipv4(v))
        }
        CLUSTER_LIST => {
            if v.is_empty() || !v.len().is_multiple_of(4) {
                return Err(c.length_fault(
                    "CLUSTER_LIST length",
                    withdraw,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                ));
            }
            PathAttribute::ClusterList(v.chunks_exact(4).map(ipv4).collect())
        }
        EXTENDED_COMMUNITIES => {
            if v.is_empty() || !v.len().is_multiple_of(8) {
                return Err(c.length_fault(
                    "EXTENDED_COMMUNITIES length",
                    withdraw,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                ));
            }
            PathAttribute::ExtendedCommunities(
                v.chunks_exact(8)
                    .map(|x| ExtendedCommunity([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]))
                    .collect(),
            )
        }
        LARGE_COMMUNITY => {
            if v.is_empty() || !v.len().is_multiple_of(12) {
                return Err(c.length_fault(
                    "LARGE_COMMUNITY length",
                    withdraw,
                    subcode::OPTIONAL_ATTRIBUTE_ERROR,
                ));
            }
            PathAttribute::LargeCommunities(
                v.chunks_exact(12)
                    .map(|x| LargeCommunity {
                        global_admin: u32_at(x, 0),
                        local_data1: u32_at(x, 4),
                        local_data2: u32_at(x, 8),
                    })
                    .collect(),
            )
        }
        MP_REACH_NLRI => PathAttribute::MpReachNlri(decode_mp_reach(c, mp_family())?),
        MP_UNREACH_NLRI => PathAttribute::MpUnreachNlri(decode_mp_unreach(c, mp_family())?),
        _ => unreachable!("expected_class covers exactly the matched codes"),
    }))
}

/// Parsed MP_REACH_NLRI pieces without allocation: family, next hop, NLRI octets
/// and their offset in `v`.
pub(crate) struct MpReachRef<'a> {
    pub family: Family,
    pub next_hop: NextHop,
    pub nlri: &'a [u8],
    pub nlri_rel: usize,
}

/// Reads the MP_REACH_NLRI header of a known family. `Ok(None)` for other families.
pub(crate) fn split_mp_reach<'a>(
    v: &'a [u8],
    ctx: &Context,
) -> Result<Option<MpReachRef<'a>>, (usize, &'static str, ErrorKind)> {
    if v.len() < 5 {
        return Err((
            0,
            "MP_REACH_NLRI header",
            ErrorKind::Truncated {
                needed: 5,
                available: v.len(),
            },
        ));
    }
    let afi = u16::from_be_bytes([v[0], v[1]]);
    let safi = v[2];
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(None);
    };
    let nh_len = usize::from(v[3]);
    if v.len() < 5 + nh_len {
        return Err((
            3,
            "MP_REACH_NLRI next hop length",
            ErrorKind::Overrun {
                declared: nh_len,
                available: v.len() - 5,
            },
        ));
    }
    let nh = &v[4..4 + nh_len];
    let v6 = |b: &[u8]| {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[..16]);
        Ipv6Addr::from(o)
    };
    let ext = family == Family::Ipv4Unicast && ctx.extended_next_hop.contains(Family::Ipv4Unicast);
    let next_hop = match (family, nh_len) {
        (Family::Ipv4Unicast, 4) => NextHop::V4(ipv4(nh)),
        (Family::Ipv6Unicast, 16) => NextHop::V6 {
            global: v6(nh),
            link_local: None,
        },
        (Family::Ipv6Unicast, 32) => NextHop::V6 {
            global: v6(nh),
            link_local: Some(v6(&nh[16..])),
        },
        (Family::Ipv4Unicast, 16) if ext => NextHop::V6 {
            global: v6(nh),
            link_local: None,
        },
        (Family::Ipv4Unicast, 32) if ext => NextHop::V6 {
            global: v6(nh),
            link_local: Some(v6(&nh[16..])),
        },
        _ => {
            return Err((
                3,
                "MP_REACH_NLRI next hop length",
                ErrorKind::NextHopLength {
                    afi,
                    safi,
                    length: nh_len,
                },
            ))
        }
    };
    // The reserved octet (formerly the SNPA count) is ignored (RFC 4760 §3).
    Ok(Some(MpReachRef {
        family,
        next_hop,
        nlri: &v[5 + nh_len..],
        nlri_rel: 5 + nh_len,
    }))
}

fn decode_mp_reach(c: &AttrCtx<'_, '_>, sev: Severity) -> Result<MpReach, Fault> {
    let v = c.a.value;
    let fault = |(rel, field, kind): (usize, &'static str, ErrorKind)| {
        c.fault(field, rel, kind, sev, subcode::OPTIONAL_ATTRIBUTE_ERROR)
    };
    let Some(r) = split_mp_reach(v, c.ctx).map_err(fault)? else {
        return Ok(MpReach::Other {
            afi: u16::from_be_bytes([v[0], v[1]]),
            safi: v[2],
            value: v[3..].to_vec(),
        });
    };
    let ap = c.ctx.add_path_receive.contains(r.family);
    let count = prefix::validate(r.nlri, r.family, ap)
        .map_err(|(rel, field, kind)| fault((r.nlri_rel + rel, field, kind)))?;
    let mut nlri = Vec::with_capacity(count);
    nlri.extend(NlriIter::new(r.nlri, r.family, ap));
    Ok(MpReach::Unicast {
        family: r.family,
        next_hop: r.next_hop,
        nlri,
    })
}

fn decode_mp_unreach(c: &AttrCtx<'_, '_>, sev: Severity) -> Result<MpUnreach, Fault> {
    let v = c.a.value;
    if v.len() < 3 {
        return Err(c.fault(
            "MP_UNREACH_NLRI header",
            0,
            ErrorKind::Truncated {
                needed: 3,
                available: v.len(),
            },
            sev,
            subcode::OPTIONAL_ATTRIBUTE_ERROR,
        ));
    }
    let afi = u16::from_be_bytes([v[0], v[1]]);
    let safi = v[2];
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(MpUnreach::Other {
            afi,
            safi,
            value: v[3..].to_vec(),
        });
    };
    let ap = c.ctx.add_path_receive.contains(family);
    let count = prefix::validate(&v[3..], family, ap).map_err(|(rel, field, kind)| {
        c.fault(field, 3 + rel, kind, sev, subcode::OPTIONAL_ATTRIBUTE_ERROR)
    })?;
    let mut withdrawn = Vec::with_capacity(count);
    withdrawn.extend(NlriIter::new(&v[3..], family, ap));
    Ok(MpUnreach::Unicast { family, withdrawn })
}
