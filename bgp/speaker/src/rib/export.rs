//! Import checks and the Adj-RIB-Out: which best paths a peer is sent, with which
//! attributes (iBGP split horizon, route reflection per RFC 4456, eBGP rules,
//! well-known communities, next-hop handling, export policy), and the bookkeeping
//! of what each peer has been sent.
//!
//! The Adj-RIB-Out does not copy attributes per peer: it is a bitset of the table
//! entries advertised to the peer plus a position in the table's change journal.
//! Attributes are computed when a batch is sent, once per distinct (attribute set,
//! policy rule) in the batch, and shared by every prefix in it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bytes::BytesMut;
use margay_bgp_wire::{
    Community, Context, EncodeError, Families, Family, NextHop, Nlri, Prefix, Update, UpdatePacker,
};

use super::attrs::{mapped_v6, PathAttrs};
use super::decision::{Path, PeerIdx, Source, SourceKind, DEFAULT_LOCAL_PREF};
use super::policy::{Outcome, Policy};
use super::table::{EntryId, Rib, Seq};

/// How the next hop of advertised routes is chosen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum NextHopMode {
    /// RFC 4271 defaults: ourselves towards eBGP peers, unchanged towards iBGP peers.
    #[default]
    Auto,
    /// Always ourselves (`next-hop-self`), except on reflected routes.
    #[serde(rename = "self")]
    SelfAddr,
    /// Never changed, also towards eBGP peers (third-party next hop, for route
    /// servers and ToRs that share the segment).
    Keep,
}

/// Everything export needs to know about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportCtx {
    pub peer: PeerIdx,
    pub ebgp: bool,
    /// We reflect to this peer as its route reflector (RFC 4456).
    pub rr_client: bool,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub cluster_id: Ipv4Addr,
    pub next_hop: NextHopMode,
    /// Our addresses for next-hop-self, per family.
    pub self_v4: Option<Ipv4Addr>,
    pub self_v6: Option<Ipv6Addr>,
    /// Families negotiated on the session.
    pub families: Families,
    /// IPv4 routes may carry an IPv6 next hop (RFC 8950).
    pub extended_next_hop_v4: bool,
    pub policy: Arc<Policy>,
}

/// Why an imported path was refused before policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImportReject {
    #[error("AS path contains our AS {0} (loop)")]
    AsLoop(u32),
    #[error("ORIGINATOR_ID is our router ID (reflected back to us)")]
    OriginatorIsUs,
    #[error("CLUSTER_LIST contains our cluster ID (reflection loop)")]
    ClusterLoop,
    #[error("no usable next hop")]
    NoNextHop,
}

/// What import needs to know about the peer a path came from.
#[derive(Debug, Clone, Copy)]
pub struct ImportCtx {
    pub ebgp: bool,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub cluster_id: Ipv4Addr,
}

/// Loop and sanity checks on a received path (RFC 4271 §9.1.2, RFC 4456 §8).
pub fn import_check(ctx: &ImportCtx, a: &PathAttrs) -> Result<(), ImportReject> {
    if a.next_hop.is_none() {
        return Err(ImportReject::NoNextHop);
    }
    if ctx.ebgp {
        if a.as_path.contains(ctx.local_asn) {
            return Err(ImportReject::AsLoop(ctx.local_asn));
        }
    } else {
        if a.originator_id == Some(ctx.router_id) {
            return Err(ImportReject::OriginatorIsUs);
        }
        if a.cluster_list.contains(&ctx.cluster_id) {
            return Err(ImportReject::ClusterLoop);
        }
    }
    Ok(())
}

impl ExportCtx {
    /// The policy outcome for `path` towards this peer, or `None` if the
    /// protocol rules already forbid sending it.
    pub fn admit(&self, prefix: &Prefix, path: &Path, src: Option<&Source>) -> Option<Outcome> {
        if path.source == self.peer || !self.families.contains(prefix.family()) {
            return None;
        }
        let src_kind = src.map(|s| s.kind).unwrap_or(SourceKind::Ibgp);
        if src_kind == SourceKind::Ibgp && !self.ebgp {
            // RFC 4456 §6: a client's routes go to everyone; a non-client's only to
            // clients. Without reflection (no clients) iBGP routes stay put.
            let from_client = src.is_some_and(|s| s.rr_client);
            if !from_client && !self.rr_client {
                return None;
            }
        }
        let a = &path.attrs;
        if a.communities.contains(&Community::NO_ADVERTISE) {
            return None;
        }
        if self.ebgp && a.communities.contains(&Community::NO_EXPORT) {
            return None;
        }
        match self.policy.evaluate(prefix, a) {
            Outcome::Reject => None,
            o => Some(o),
        }
    }

    /// The attributes sent for `path` after an accepting `outcome`.
    pub fn transform(
        &self,
        family: Family,
        path: &Path,
        src: Option<&Source>,
        outcome: Outcome,
    ) -> Option<Arc<PathAttrs>> {
        let policy_out = self.policy.apply(outcome, &path.attrs)?;
        let mut a = (*policy_out).clone();
        let src_kind = src.map(|s| s.kind).unwrap_or(SourceKind::Ibgp);
        let reflected = src_kind == SourceKind::Ibgp && !self.ebgp;
        if self.ebgp {
            a.prepend(self.local_asn, 1);
            a.local_pref = None;
            a.originator_id = None;
            a.cluster_list.clear();
            // RFC 4271 §5.1.4: a MED learnt from another AS is not passed on; one we
            // set (locally or by policy on this export) is.
            let med_set_here = policy_out.med != path.attrs.med;
            if src_kind != SourceKind::Local && !med_set_here {
                a.med = None;
            }
        } else {
            a.local_pref.get_or_insert(DEFAULT_LOCAL_PREF);
            if reflected {
                // RFC 4456 §8.
                if a.originator_id.is_none() {
                    a.originator_id = src.map(|s| s.router_id);
                }
                a.cluster_list.insert(0, self.cluster_id);
            }
        }
        let use_self = match self.next_hop {
            // Reflected routes keep their next hop whatever the mode: an RR that
            // makes itself the next hop pulls traffic through itself.
            _ if reflected => false,
            NextHopMode::Auto => self.ebgp,
            NextHopMode::SelfAddr => true,
            NextHopMode::Keep => false,
        };
        let unusable = match a.next_hop {
            None => true,
            // An IPv6 next hop for IPv4 needs RFC 8950 on the session.
            Some(NextHop::V6 { .. }) => family == Family::Ipv4Unicast && !self.extended_next_hop_v4,
            Some(NextHop::V4(_)) => family == Family::Ipv6Unicast,
        };
        if use_self || unusable {
            a.next_hop = Some(self.self_next_hop(family)?);
        }
        Some(Arc::new(a))
    }

    /// Our own next hop for `family`.
    pub fn self_next_hop(&self, family: Family) -> Option<NextHop> {
        match family {
            Family::Ipv4Unicast => match (self.self_v4, self.self_v6) {
                (Some(a), _) => Some(NextHop::V4(a)),
                (None, Some(g)) if self.extended_next_hop_v4 => Some(NextHop::V6 {
                    global: g,
                    link_local: None,
                }),
                _ => None,
            },
            Family::Ipv6Unicast => match (self.self_v6, self.self_v4) {
                (Some(g), _) => Some(NextHop::V6 {
                    global: g,
                    link_local: None,
                }),
                (None, Some(a)) => Some(NextHop::V6 {
                    global: mapped_v6(a),
                    link_local: None,
                }),
                _ => None,
            },
        }
    }

    /// The full export decision for the best path of an entry.
    pub fn export(
        &self,
        prefix: &Prefix,
        path: &Path,
        src: Option<&Source>,
    ) -> Option<Arc<PathAttrs>> {
        let o = self.admit(prefix, path, src)?;
        self.transform(prefix.family(), path, src, o)
    }
}

/// One peer's Adj-RIB-Out: which entries it holds from us, and how far through the
/// change journal it has been brought up to date.
#[derive(Debug, Clone, Default)]
pub struct AdjRibOut {
    advertised: Vec<u64>,
    count: usize,
    /// Next journal record to look at.
    pub(super) cursor: Seq,
    /// During a table walk (session start, route refresh, resync), the next entry
    /// to look at; the journal is read after the walk.
    pub(super) walk: Option<EntryId>,
    /// The family a walk is limited to (a ROUTE-REFRESH for one family); `None`
    /// walks everything.
    walk_family: Option<Family>,
}

impl AdjRibOut {
    /// An empty Adj-RIB-Out that starts with a full table walk.
    pub fn new(rib: &Rib) -> Self {
        Self {
            advertised: Vec::new(),
            count: 0,
            cursor: rib.head(),
            walk: Some(0),
            walk_family: None,
        }
    }

    /// An empty Adj-RIB-Out already at the head of the journal, with no walk: for
    /// state that is filled in by the caller (update groups).
    pub(super) fn at_head(rib: &Rib) -> Self {
        Self {
            advertised: Vec::new(),
            count: 0,
            cursor: rib.head(),
            walk: None,
            walk_family: None,
        }
    }

    /// The entries advertised, in order.
    pub(super) fn advertised_ids(&self) -> impl Iterator<Item = EntryId> + '_ {
        self.advertised.iter().enumerate().flat_map(|(w, &bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                (b != 0).then(|| {
                    let i = b.trailing_zeros();
                    b &= b - 1;
                    (w * 64) as EntryId + i
                })
            })
        })
    }

    pub fn is_advertised(&self, id: EntryId) -> bool {
        self.advertised
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    pub(super) fn set(&mut self, id: EntryId, on: bool) {
        let w = id as usize / 64;
        if self.advertised.len() <= w {
            self.advertised.resize(w + 1, 0);
        }
        let bit = 1u64 << (id % 64);
        let was = self.advertised[w] & bit != 0;
        if on && !was {
            self.advertised[w] |= bit;
            self.count += 1;
        } else if !on && was {
            self.advertised[w] &= !bit;
            self.count -= 1;
        }
    }

    /// Prefixes currently advertised.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The journal position this peer still needs (nothing before it).
    pub fn cursor(&self) -> Seq {
        self.cursor
    }

    pub fn in_walk(&self) -> bool {
        self.walk.is_some()
    }

    /// Start over with a full walk (ROUTE-REFRESH received, export policy changed,
    /// or the peer fell so far behind that its journal records were trimmed).
    pub fn resync(&mut self, rib: &Rib) {
        self.cursor = rib.head();
        self.walk = Some(0);
        self.walk_family = None;
    }

    /// Sends `family` again (ROUTE-REFRESH for it): a walk of that family's entries.
    /// The journal position stays, so changes of other families since then still
    /// come from the journal (entries of `family` may be visited twice, which sends
    /// them twice, harmlessly). A walk already under way is started over, for both
    /// families if it was for the other one.
    pub fn refresh(&mut self, rib: &Rib, family: Family) {
        match (self.walk, self.walk_family) {
            (Some(_), None) => self.resync(rib),
            (Some(_), Some(f)) if f != family => {
                self.walk = Some(0);
                self.walk_family = None;
            }
            _ => {
                self.walk = Some(0);
                self.walk_family = Some(family);
            }
        }
    }

    /// Nothing left to send.
    pub fn is_synced(&self, rib: &Rib) -> bool {
        self.walk.is_none() && self.cursor >= rib.head()
    }
}

/// The changes for one peer, ready to encode.
#[derive(Debug, Default)]
pub struct OutBatch {
    pub withdrawn: Vec<Prefix>,
    pub announced: Vec<(Arc<PathAttrs>, Vec<Prefix>)>,
    /// The peer is now in sync with the table (a walk, if one ran, is complete).
    pub synced: bool,
    /// A full table walk finished in this batch (send End-of-RIB after it).
    pub walk_done: bool,
}

impl OutBatch {
    pub fn is_empty(&self) -> bool {
        self.withdrawn.is_empty() && self.announced.is_empty()
    }

    pub fn prefix_count(&self) -> usize {
        self.withdrawn.len() + self.announced.iter().map(|(_, p)| p.len()).sum::<usize>()
    }
}

/// Collects up to about `budget` prefix changes for the peer described by `ctx`.
pub fn collect(rib: &Rib, out: &mut AdjRibOut, ctx: &ExportCtx, budget: usize) -> OutBatch {
    let mut b = OutBatch::default();
    // (source attrs pointer, outcome) → exported attributes and their group.
    let mut cache: HashMap<(usize, Outcome), Option<usize>, super::table::FxBuild> =
        HashMap::default();
    let mut last: Option<((usize, Outcome), Option<usize>)> = None;
    let mut n = 0usize;
    if out.cursor < rib.tail() {
        // Trimmed past us: the journal no longer says what changed.
        out.resync(rib);
    }
    let mut visit = |id: EntryId, out: &mut AdjRibOut, b: &mut OutBatch| {
        let e = rib.entry(id);
        let exported = e.best().and_then(|best| {
            let src = rib.source(best.source);
            let o = ctx.admit(&e.prefix, best, src)?;
            let key = (Arc::as_ptr(&best.attrs) as usize, o);
            // Runs of prefixes share attributes: check the last key before hashing.
            if let Some((k, g)) = last {
                if k == key {
                    return g;
                }
            }
            let slot = *cache.entry(key).or_insert_with(|| {
                ctx.transform(e.prefix.family(), best, src, o).map(|a| {
                    b.announced.push((a, Vec::new()));
                    b.announced.len() - 1
                })
            });
            last = Some((key, slot));
            slot
        });
        match exported {
            Some(g) => {
                b.announced[g].1.push(e.prefix);
                out.set(id, true);
            }
            None => {
                if out.is_advertised(id) {
                    b.withdrawn.push(e.prefix);
                    out.set(id, false);
                }
            }
        }
    };
    if let Some(mut next) = out.walk {
        let len = rib.len() as EntryId;
        while next < len && n < budget {
            if out
                .walk_family
                .is_none_or(|f| rib.entry(next).prefix.family() == f)
            {
                visit(next, out, &mut b);
                n += 1;
            }
            next += 1;
        }
        if next >= len {
            out.walk = None;
            out.walk_family = None;
            b.walk_done = true;
        } else {
            out.walk = Some(next);
        }
    }
    if out.walk.is_none() {
        let head = rib.head();
        while out.cursor < head && n < budget {
            if let Some(id) = rib.journal_at(out.cursor) {
                visit(id, out, &mut b);
                n += 1;
            }
            out.cursor += 1;
        }
    }
    b.announced.retain(|(_, p)| !p.is_empty());
    b.synced = out.is_synced(rib);
    b
}

/// Encodes a batch into UPDATEs for a session with codec context `ctx`, packing
/// as many prefixes per message as fit. `four_octet_as` false means the peer needs
/// AS4_PATH (RFC 6793 §4.2.2).
pub fn encode(batch: &OutBatch, ctx: &Context, out: &mut BytesMut) -> Result<usize, EncodeError> {
    let packer = UpdatePacker::new(ctx);
    let mut n = 0;
    for family in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
        let mut w = batch
            .withdrawn
            .iter()
            .filter(|p| p.family() == family)
            .map(|p| Nlri::new(*p))
            .peekable();
        if w.peek().is_some() {
            n += packer.withdraw(family, w, out)?;
        }
    }
    for (attrs, prefixes) in &batch.announced {
        for family in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            let mut it = prefixes.iter().filter(|p| p.family() == family).peekable();
            if it.peek().is_none() {
                continue;
            }
            let mut list = attrs.to_wire(family);
            if !ctx.four_octet_as {
                let mut u = Update {
                    attributes: list,
                    ..Update::default()
                };
                u.prepare_for_two_octet_peer();
                list = u.attributes;
            }
            n += packer.announce(&list, it.map(|p| Nlri::new(*p)), out)?;
        }
    }
    Ok(n)
}

/// Addresses of a next hop, for reporting.
pub fn next_hop_ip(nh: &NextHop) -> IpAddr {
    super::attrs::next_hop_addr(nh)
}

#[cfg(test)]
mod tests;
