//! Packing prefixes that share attributes into as few UPDATEs as the session's
//! maximum message size allows. Nothing this module writes exceeds that size.

use bytes::{BufMut, BytesMut};

use crate::attribute::{attr_flags, attr_type, MpReach, MpUnreach, NextHop, PathAttribute};
use crate::context::Context;
use crate::error::EncodeError;
use crate::header::{HEADER_LEN, MARKER};
use crate::message::Message;
use crate::prefix::{Family, Nlri};
use crate::update::Update;

/// Writes framed UPDATEs back to back into a buffer.
#[derive(Debug, Clone)]
pub struct UpdatePacker<'c> {
    ctx: &'c Context,
    max: usize,
}

/// Where the attributes go around the NLRI.
struct Template {
    /// Attributes before the MP attribute (all of them for the IPv4 body).
    pre: Vec<u8>,
    /// Attributes after it.
    post: Vec<u8>,
    /// MP_REACH_NLRI (or MP_UNREACH_NLRI) fixed part: AFI, SAFI and for reach the
    /// next hop and reserved octet.
    mp: Option<(u8, Vec<u8>)>,
    family: Family,
    withdraw: bool,
}

impl<'c> UpdatePacker<'c> {
    pub fn new(ctx: &'c Context) -> Self {
        Self {
            ctx,
            max: ctx.max_message_len(),
        }
    }

    /// A packer with a smaller limit than the session's (never a larger one).
    pub fn with_max_len(ctx: &'c Context, max: usize) -> Self {
        Self {
            ctx,
            max: max.min(ctx.max_message_len()),
        }
    }

    /// Announces `prefixes` with `attributes`. If `attributes` holds an
    /// MP_REACH_NLRI it is the template (its next hop is used, its NLRI replaced) and
    /// every prefix must be of its family; otherwise the prefixes must be IPv4 and go
    /// in the body NLRI, and `attributes` should hold NEXT_HOP. Returns the number of
    /// UPDATEs written; on error `out` is left as it was.
    pub fn announce<I>(
        &self,
        attributes: &[PathAttribute],
        prefixes: I,
        out: &mut BytesMut,
    ) -> Result<usize, EncodeError>
    where
        I: IntoIterator<Item = Nlri>,
    {
        let mut pre = Vec::new();
        let mut post = Vec::new();
        let mut mp = None;
        let mut family = Family::Ipv4Unicast;
        for a in attributes {
            match a {
                PathAttribute::MpReachNlri(MpReach::Unicast {
                    family: f, next_hop, ..
                }) => {
                    if mp.is_some() {
                        return Err(EncodeError::Invalid("more than one MP_REACH_NLRI"));
                    }
                    family = *f;
                    mp = Some((attr_type::MP_REACH_NLRI, mp_reach_head(*f, next_hop)));
                }
                PathAttribute::MpReachNlri(MpReach::Other { .. }) | PathAttribute::MpUnreachNlri(_) => {
                    return Err(EncodeError::Invalid(
                        "announce takes an IPv4/IPv6 unicast MP_REACH_NLRI template and no MP_UNREACH_NLRI",
                    ))
                }
                a => {
                    let dst = if mp.is_some() { &mut post } else { &mut pre };
                    a.encode(self.ctx, dst)?;
                }
            }
        }
        let t = Template {
            pre,
            post,
            mp,
            family,
            withdraw: false,
        };
        self.pack(&t, prefixes, out)
    }

    /// Withdraws `prefixes` of `family`: the body Withdrawn Routes field for IPv4
    /// unicast, MP_UNREACH_NLRI for IPv6 unicast.
    pub fn withdraw<I>(
        &self,
        family: Family,
        prefixes: I,
        out: &mut BytesMut,
    ) -> Result<usize, EncodeError>
    where
        I: IntoIterator<Item = Nlri>,
    {
        let mp = (family != Family::Ipv4Unicast).then(|| {
            let mut h = Vec::with_capacity(3);
            h.put_u16(family.afi());
            h.put_u8(family.safi());
            (attr_type::MP_UNREACH_NLRI, h)
        });
        let t = Template {
            pre: Vec::new(),
            post: Vec::new(),
            mp,
            family,
            withdraw: true,
        };
        self.pack(&t, prefixes, out)
    }

    /// Writes the End-of-RIB marker for `family`.
    pub fn end_of_rib(&self, family: Family, out: &mut BytesMut) -> Result<(), EncodeError> {
        Message::Update(Update::end_of_rib(family)).encode(self.ctx, out)
    }

    fn pack<I>(&self, t: &Template, prefixes: I, out: &mut BytesMut) -> Result<usize, EncodeError>
    where
        I: IntoIterator<Item = Nlri>,
    {
        let start = out.len();
        let r = self.pack_inner(t, prefixes, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn pack_inner<I>(
        &self,
        t: &Template,
        prefixes: I,
        out: &mut BytesMut,
    ) -> Result<usize, EncodeError>
    where
        I: IntoIterator<Item = Nlri>,
    {
        let ap = self.ctx.add_path_send.contains(t.family);
        // Fixed cost of one message: header, two length fields, attributes, and the
        // MP attribute's header (4 octets, Extended Length) and fixed part.
        let fixed = HEADER_LEN
            + 4
            + t.pre.len()
            + t.post.len()
            + t.mp.as_ref().map_or(0, |(_, h)| 4 + h.len());
        let largest = 1 + usize::from(t.family.max_len()) / 8 + if ap { 4 } else { 0 };
        if fixed + largest > self.max {
            return Err(EncodeError::TooLong {
                what: "the shared attributes",
                length: fixed + largest,
                max: self.max,
            });
        }
        let mut it = prefixes.into_iter().peekable();
        let mut count = 0;
        while it.peek().is_some() {
            let msg_start = out.len();
            out.reserve(self.max);
            out.put_slice(&MARKER);
            out.put_u16(0);
            out.put_u8(2);
            let body_withdrawn = t.withdraw && t.mp.is_none();
            // Withdrawn Routes Length, patched below when the body carries them.
            let wlen_at = out.len();
            out.put_u16(0);
            let nlri_start_w = out.len();
            if body_withdrawn {
                // Leave room for the Total Path Attribute Length that follows.
                let room = self.max - 2 - t.pre.len() - t.post.len();
                self.fill_until(t.family, ap, &mut it, out, msg_start, room)?;
            }
            let wlen = out.len() - nlri_start_w;
            out[wlen_at..wlen_at + 2].copy_from_slice(&(wlen as u16).to_be_bytes());
            let alen_at = out.len();
            out.put_u16(0);
            let attr_start = out.len();
            out.put_slice(&t.pre);
            if let Some((tc, head)) = &t.mp {
                let hdr_at = out.len();
                out.put_u8(attr_flags::OPTIONAL | attr_flags::EXTENDED_LENGTH);
                out.put_u8(*tc);
                out.put_u16(0);
                out.put_slice(head);
                // Leave room for the attributes that follow.
                let room = self.max - t.post.len();
                self.fill_until(t.family, ap, &mut it, out, msg_start, room)?;
                let vlen = out.len() - hdr_at - 4;
                if vlen <= 255 {
                    // Canonical form: one length octet when it suffices.
                    out[hdr_at] = attr_flags::OPTIONAL;
                    out[hdr_at + 2] = vlen as u8;
                    let end = out.len();
                    out.copy_within(hdr_at + 4..end, hdr_at + 3);
                    out.truncate(end - 1);
                } else {
                    out[hdr_at + 2..hdr_at + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
                }
            }
            out.put_slice(&t.post);
            let alen = out.len() - attr_start;
            out[alen_at..alen_at + 2].copy_from_slice(&(alen as u16).to_be_bytes());
            if !t.withdraw && t.mp.is_none() {
                self.fill(t.family, ap, &mut it, out, msg_start)?;
            }
            let total = out.len() - msg_start;
            assert!(
                total <= self.max,
                "UpdatePacker wrote {total} octets over its {} limit",
                self.max
            );
            out[msg_start + 16..msg_start + 18].copy_from_slice(&(total as u16).to_be_bytes());
            count += 1;
        }
        Ok(count)
    }

    fn fill<I: Iterator<Item = Nlri>>(
        &self,
        family: Family,
        ap: bool,
        it: &mut std::iter::Peekable<I>,
        out: &mut BytesMut,
        msg_start: usize,
    ) -> Result<(), EncodeError> {
        self.fill_until(family, ap, it, out, msg_start, self.max)
    }

    /// Appends prefixes while the message stays within `limit` octets.
    fn fill_until<I: Iterator<Item = Nlri>>(
        &self,
        family: Family,
        ap: bool,
        it: &mut std::iter::Peekable<I>,
        out: &mut BytesMut,
        msg_start: usize,
        limit: usize,
    ) -> Result<(), EncodeError> {
        while let Some(n) = it.peek() {
            if n.prefix.family() != family {
                return Err(EncodeError::Invalid(
                    "a prefix is not of the family being packed",
                ));
            }
            if out.len() - msg_start + n.wire_len(ap) > limit {
                break;
            }
            n.encode(ap, out);
            it.next();
        }
        Ok(())
    }
}

fn mp_reach_head(family: Family, nh: &NextHop) -> Vec<u8> {
    let mut h = Vec::with_capacity(37);
    h.put_u16(family.afi());
    h.put_u8(family.safi());
    let nh_bytes: Vec<u8> = match nh {
        NextHop::V4(a) => a.octets().to_vec(),
        NextHop::V6 { global, link_local } => {
            let mut v = global.octets().to_vec();
            if let Some(ll) = link_local {
                v.extend_from_slice(&ll.octets());
            }
            v
        }
    };
    h.put_u8(nh_bytes.len() as u8);
    h.put_slice(&nh_bytes);
    h.put_u8(0);
    h
}

impl Update {
    /// Encodes this UPDATE as one message if it fits the session's limit, or else
    /// as several that carry the same routes: withdrawals first, then
    /// announcements with the same attributes. Returns the number of messages.
    pub fn encode_split(&self, ctx: &Context, out: &mut BytesMut) -> Result<usize, EncodeError> {
        let msg = Message::Update(self.clone());
        match msg.encode(ctx, out) {
            Ok(()) => return Ok(1),
            Err(EncodeError::TooLong { .. }) => {}
            Err(e) => return Err(e),
        }
        let start = out.len();
        let packer = UpdatePacker::new(ctx);
        let r = (|| {
            let mut n =
                packer.withdraw(Family::Ipv4Unicast, self.withdrawn.iter().copied(), out)?;
            if let Some(MpUnreach::Unicast { family, withdrawn }) = self.mp_unreach() {
                n += packer.withdraw(*family, withdrawn.iter().copied(), out)?;
            }
            let plain: Vec<PathAttribute> = self
                .attributes
                .iter()
                .filter(|a| {
                    !matches!(
                        a,
                        PathAttribute::MpReachNlri(_) | PathAttribute::MpUnreachNlri(_)
                    )
                })
                .cloned()
                .collect();
            n += packer.announce(&plain, self.nlri.iter().copied(), out)?;
            if let Some(MpReach::Unicast { nlri, .. }) = self.mp_reach() {
                let with_mp: Vec<PathAttribute> = self
                    .attributes
                    .iter()
                    .filter(|a| !matches!(a, PathAttribute::MpUnreachNlri(_)))
                    .cloned()
                    .collect();
                n += packer.announce(&with_mp, nlri.iter().copied(), out)?;
            }
            Ok(n)
        })();
        if r.is_err() {
            out.truncate(start);
        }
        r
    }
}
