//! Update groups: peers that would be sent the same UPDATEs share one Adj-RIB-Out,
//! and each batch of changes is collected and encoded once for all of them.
//!
//! Peers are in one group when their export settings are equal apart from who
//! they are (same policy, route-reflection role, next-hop handling and addresses,
//! families) and their sessions encode alike (the codec [`Context`]). What still
//! differs between members is split horizon: a path is never sent back to the
//! peer it came from. The group's Adj-RIB-Out therefore records, per advertised
//! entry, the source of the path it announced; member `m` holds an entry when the
//! group advertised it and its source was not `m`. A batch is cut into sections
//! by source: the common section goes to every member, the section of member `m`
//! goes to every member but `m`, and `m` alone gets the withdrawals of what it
//! held when a path of its own becomes the best.
//!
//! The source is recorded for every entry, member or not, so a peer can join or
//! leave without the group rewriting anything: a joining peer is in sync with
//! the table (it did its own table walk first), and a leaving one takes the
//! group's state minus what came from itself ([`GroupOut::member_view`]).
//!
//! [`Context`]: margay_bgp_wire::Context

use std::collections::HashMap;
use std::sync::Arc;

use margay_bgp_wire::{Family, Prefix};

use super::attrs::PathAttrs;
use super::decision::PeerIdx;
use super::export::{AdjRibOut, ExportCtx, OutBatch};
use super::policy::Outcome;
use super::table::{EntryId, FxBuild, Rib};

/// The `peer` of a group's [`ExportCtx`]: nobody, so no path is held back there;
/// split horizon is applied per member instead.
pub const NO_PEER: PeerIdx = PeerIdx::MAX;

/// A group's Adj-RIB-Out.
#[derive(Debug, Clone)]
pub struct GroupOut {
    /// Entries advertised to the group (to every member but the path's source).
    out: AdjRibOut,
    /// Per entry, the source of the best path last announced (meaningful where
    /// `out` has the entry).
    source: Vec<PeerIdx>,
    /// Advertised entries per source (by index), for each member's advertised count.
    by_source: Vec<usize>,
}

impl GroupOut {
    /// The Adj-RIB-Out of a group whose members are in sync with `rib` now: every
    /// entry whose best path `ctx` (with `peer` [`NO_PEER`]) exports.
    pub fn in_sync(rib: &Rib, ctx: &ExportCtx) -> Self {
        debug_assert_eq!(ctx.peer, NO_PEER);
        let mut g = Self {
            out: AdjRibOut::at_head(rib),
            source: Vec::new(),
            by_source: Vec::new(),
        };
        // As in collect: admitted and given attributes (a path with no usable next
        // hop for the session is not sent). Paths share attributes: decide once each.
        let mut sent: HashMap<(usize, Outcome, Family), bool, FxBuild> = HashMap::default();
        for (id, e) in rib.entries() {
            let Some(best) = e.best() else { continue };
            let src = rib.source(best.source);
            let Some(o) = ctx.admit(&e.prefix, best, src) else {
                continue;
            };
            let family = e.prefix.family();
            let key = (Arc::as_ptr(&best.attrs) as usize, o, family);
            if *sent
                .entry(key)
                .or_insert_with(|| ctx.transform(family, best, src, o).is_some())
            {
                g.set(id, Some(best.source));
            }
        }
        g
    }

    fn set(&mut self, id: EntryId, source: Option<PeerIdx>) {
        let i = id as usize;
        if self.out.is_advertised(id) {
            let old = self.source[i] as usize;
            self.by_source[old] -= 1;
        }
        match source {
            Some(s) => {
                if self.source.len() <= i {
                    self.source.resize(i + 1, NO_PEER);
                }
                self.source[i] = s;
                let s = s as usize;
                if self.by_source.len() <= s {
                    self.by_source.resize(s + 1, 0);
                }
                self.by_source[s] += 1;
                self.out.set(id, true);
            }
            None => self.out.set(id, false),
        }
    }

    /// Whether `member` holds entry `id` from the group.
    pub fn holds(&self, member: PeerIdx, id: EntryId) -> bool {
        self.out.is_advertised(id) && self.source[id as usize] != member
    }

    /// Prefixes `member` holds from the group.
    pub fn count_for(&self, member: PeerIdx) -> usize {
        self.out.count() - self.by_source.get(member as usize).copied().unwrap_or(0)
    }

    pub fn cursor(&self) -> super::table::Seq {
        self.out.cursor()
    }

    /// Nothing left to send.
    pub fn is_synced(&self, rib: &Rib) -> bool {
        self.out.cursor() >= rib.head()
    }

    /// The journal no longer reaches back to the group's position.
    pub fn is_trimmed(&self, rib: &Rib) -> bool {
        self.out.cursor() < rib.tail()
    }

    /// What `member` holds, as its own Adj-RIB-Out at the group's position (for a
    /// member that leaves the group).
    pub fn member_view(&self, rib: &Rib, member: PeerIdx) -> AdjRibOut {
        let mut a = AdjRibOut::at_head(rib);
        a.cursor = self.out.cursor();
        for id in self.out.advertised_ids() {
            if self.source[id as usize] != member {
                a.set(id, true);
            }
        }
        a
    }
}

/// Changes for the members other than `source` (all members for the common
/// section), and withdrawals for `source` alone.
#[derive(Debug, Default)]
pub struct Section {
    /// The member whose paths these are; [`NO_PEER`] for the common section.
    pub source: PeerIdx,
    pub others: OutBatch,
    pub to_source: Vec<Prefix>,
}

/// One batch of a group, cut by source.
#[derive(Debug, Default)]
pub struct GroupBatch {
    /// The common section first, then one per member whose paths changed.
    pub sections: Vec<Section>,
}

/// A run of announcements: (source attributes, policy outcome, source peer).
type RunKey = (usize, Outcome, PeerIdx);

/// Collects up to about `budget` journal records for a group. `ctx` is the
/// group's export context (`peer` [`NO_PEER`]); `is_member` says whether a peer
/// is in the group.
pub fn collect_group(
    rib: &Rib,
    g: &mut GroupOut,
    ctx: &ExportCtx,
    is_member: impl Fn(PeerIdx) -> bool,
    budget: usize,
) -> GroupBatch {
    let mut b = GroupBatch {
        sections: vec![Section {
            source: NO_PEER,
            ..Section::default()
        }],
    };
    let mut section_of: HashMap<PeerIdx, usize, FxBuild> = HashMap::default();
    // (source attrs, outcome) → exported attributes; (section, exported attrs) → slot.
    let mut exported: HashMap<(usize, Outcome), Option<Arc<PathAttrs>>, FxBuild> =
        HashMap::default();
    let mut slots: HashMap<(usize, usize), usize, FxBuild> = HashMap::default();
    // Runs of prefixes share attributes and source: (source attrs, outcome, source)
    // of the last announcement → its section and slot, checked before hashing.
    let mut last: Option<(RunKey, (usize, usize))> = None;
    let head = rib.head();
    let mut n = 0usize;
    while g.out.cursor < head && n < budget {
        let seq = g.out.cursor;
        g.out.cursor += 1;
        let Some(id) = rib.journal_at(seq) else {
            continue;
        };
        n += 1;
        let e = rib.entry(id);
        let was = g.out.is_advertised(id).then(|| g.source[id as usize]);
        let mut run_key = None;
        let now = e.best().and_then(|best| {
            let src = rib.source(best.source);
            let o = ctx.admit(&e.prefix, best, src)?;
            let key = (Arc::as_ptr(&best.attrs) as usize, o);
            run_key = Some((key.0, o, best.source));
            if let Some((k, at)) = last {
                if Some(k) == run_key {
                    return Some(Err((at, best.source)));
                }
            }
            let attrs = exported
                .entry(key)
                .or_insert_with(|| ctx.transform(e.prefix.family(), best, src, o))
                .clone()?;
            Some(Ok((attrs, best.source)))
        });
        let now = match now {
            Some(Err(((s, slot), source))) => {
                b.sections[s].others.announced[slot].1.push(e.prefix);
                if s != 0 && was.is_some_and(|w| w != source) {
                    b.sections[s].to_source.push(e.prefix);
                }
                g.set(id, Some(source));
                continue;
            }
            Some(Ok(x)) => Some(x),
            None => None,
        };
        let mut section = |source: PeerIdx, b: &mut GroupBatch| -> usize {
            if !is_member(source) {
                return 0;
            }
            *section_of.entry(source).or_insert_with(|| {
                b.sections.push(Section {
                    source,
                    ..Section::default()
                });
                b.sections.len() - 1
            })
        };
        match now {
            Some((attrs, source)) => {
                let s = section(source, &mut b);
                let others = &mut b.sections[s].others;
                let slot = *slots
                    .entry((s, Arc::as_ptr(&attrs) as usize))
                    .or_insert_with(|| {
                        others.announced.push((attrs, Vec::new()));
                        others.announced.len() - 1
                    });
                others.announced[slot].1.push(e.prefix);
                last = run_key.map(|k| (k, (s, slot)));
                // The source held another path's announcement: take it back.
                if s != 0 && was.is_some_and(|w| w != source) {
                    b.sections[s].to_source.push(e.prefix);
                }
                g.set(id, Some(source));
            }
            None => {
                if let Some(w) = was {
                    let s = section(w, &mut b);
                    b.sections[s].others.withdrawn.push(e.prefix);
                    g.set(id, None);
                }
            }
        }
    }
    b
}

#[cfg(test)]
mod tests;
