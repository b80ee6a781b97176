//! The route table: per prefix, every peer's accepted path (so the union of the
//! Adj-RIBs-In after import policy) with the best one first (the Loc-RIB), and a
//! change journal that each Adj-RIB-Out and the best-route subscribers read at their
//! own pace.
//!
//! Paths are stored once: a peer's Adj-RIB-In is the set of paths whose source is
//! that peer, as in BIRD. Attributes are shared `Arc`s, one per received UPDATE. A
//! prefix keeps its entry index for life, so per-peer Adj-RIB-Out state can be a
//! bitset over entry indices.
//!
//! Memory traffic, not arithmetic, is what a table of 100 000 prefixes costs: the
//! prefix index holds 8-byte slots that point into the entry vector (the prefix is
//! stored once, in its entry), and a prefix's single path sits inline in its entry,
//! so adding a prefix allocates nothing of its own.

use std::collections::VecDeque;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use margay_bgp_wire::{Family, Prefix};

use super::attrs::PathAttrs;
use super::decision::{select, Path, PeerIdx, Source};

/// A multiply-rotate hasher (the rustc "Fx" hash). Prefixes are not chosen by an
/// attacker in a way that matters here (a peer can only fill its own max-prefix
/// budget), and SipHash was a fifth of the cost of an insert.
///
/// `finish` rotates as rustc-hash 2 does: hashbrown takes the bucket from the low
/// bits, and the low bits of a product depend only on the low bits of its factors,
/// so without the rotation prefixes that differ only above their last octet (every
/// /24 of a table) share about a thousand buckets and each insert probes a long run.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub type FxBuild = BuildHasherDefault<FxHasher>;

/// Index of a prefix's entry; stable for the life of the table.
pub type EntryId = u32;

/// Position in the change journal.
pub type Seq = u64;

/// One prefix: its paths, best first, then the rest of the ECMP set, then others.
#[derive(Debug, Clone)]
pub struct Entry {
    pub prefix: Prefix,
    pub paths: Paths,
    /// How many leading paths form the ECMP set (0 when there is no path).
    pub multipath: u16,
    /// Journal position of the latest change; older journal records of this entry
    /// are superseded.
    seq: Seq,
}

impl Entry {
    pub fn best(&self) -> Option<&Path> {
        self.paths.first()
    }

    /// The best path and its equal-cost companions.
    pub fn multipath_set(&self) -> &[Path] {
        &self.paths[..usize::from(self.multipath).min(self.paths.len())]
    }
}

/// The route table.
#[derive(Debug)]
pub struct Rib {
    index: PrefixIndex,
    entries: Vec<Entry>,
    journal: VecDeque<EntryId>,
    /// Sequence number of `journal[0]`.
    journal_base: Seq,
    sources: Vec<Option<Source>>,
    counts: Vec<usize>,
    /// Consider ECMP sets (else `multipath` is 1 whenever there is a path).
    pub multipath: bool,
    /// Scratch space of [`Rib::update_many`], kept to reuse its allocation.
    batch: Vec<(EntryId, Option<Arc<PathAttrs>>)>,
}

impl Rib {
    pub fn new(router_id: Ipv4Addr) -> Self {
        Self {
            index: PrefixIndex::default(),
            entries: Vec::new(),
            journal: VecDeque::new(),
            journal_base: 0,
            sources: vec![Some(Source::local(router_id))],
            counts: vec![0],
            multipath: false,
            batch: Vec::new(),
        }
    }

    pub fn set_source(&mut self, idx: PeerIdx, source: Source) {
        let i = idx as usize;
        if self.sources.len() <= i {
            self.sources.resize(i + 1, None);
            self.counts.resize(i + 1, 0);
        }
        self.sources[i] = Some(source);
    }

    pub fn source(&self, idx: PeerIdx) -> Option<&Source> {
        self.sources.get(idx as usize).and_then(|s| s.as_ref())
    }

    /// Paths held from `idx` (its Adj-RIB-In size after policy).
    pub fn count(&self, idx: PeerIdx) -> usize {
        self.counts.get(idx as usize).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Prefixes with at least one path.
    pub fn routes(&self) -> usize {
        self.entries.iter().filter(|e| !e.paths.is_empty()).count()
    }

    pub fn entry(&self, id: EntryId) -> &Entry {
        &self.entries[id as usize]
    }

    pub fn get(&self, prefix: &Prefix) -> Option<&Entry> {
        self.index
            .find(prefix, &self.entries)
            .map(|i| &self.entries[i as usize])
    }

    pub fn entries(&self) -> impl Iterator<Item = (EntryId, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as EntryId, e))
    }

    fn entry_id(&mut self, prefix: Prefix) -> EntryId {
        let next = self.entries.len() as EntryId;
        let id = self.index.find_or_insert(&prefix, next, &self.entries);
        if id == next {
            self.entries.push(Entry {
                prefix,
                paths: Paths::default(),
                multipath: 0,
                seq: 0,
            });
        }
        id
    }

    /// Sets (`Some`) or removes (`None`) `source`'s path to `prefix`. Returns true
    /// when the best path or its ECMP set changed (and the change was journaled).
    pub fn update(
        &mut self,
        source: PeerIdx,
        prefix: Prefix,
        attrs: Option<Arc<PathAttrs>>,
    ) -> bool {
        let id = match attrs {
            Some(_) => self.entry_id(prefix),
            None => match self.index.find(&prefix, &self.entries) {
                Some(i) => i,
                None => return false,
            },
        };
        self.update_entry(id, source, attrs)
    }

    /// [`Rib::update`] for every prefix of `prefixes`, with the attributes `attrs`
    /// gives each (an UPDATE's worth). Returns how many best paths or ECMP sets
    /// changed.
    ///
    /// All prefixes are looked up (or given entries) before any path changes: the
    /// index probes of a batch do not depend on each other, so the processor
    /// overlaps their cache misses, where a lookup between two path changes waits
    /// for its miss alone (a withdrawal of 100 000 prefixes from a cold table: a
    /// third less time).
    pub fn update_many(
        &mut self,
        source: PeerIdx,
        prefixes: &[Prefix],
        mut attrs: impl FnMut(&Prefix) -> Option<Arc<PathAttrs>>,
    ) -> usize {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        batch.extend(prefixes.iter().map(|p| {
            let a = attrs(p);
            let id = match a {
                Some(_) => self.entry_id(*p),
                None => self.index.find(p, &self.entries).unwrap_or(EMPTY),
            };
            (id, a)
        }));
        let mut changed = 0;
        for (id, a) in batch.drain(..) {
            if id != EMPTY && self.update_entry(id, source, a) {
                changed += 1;
            }
        }
        self.batch = batch;
        changed
    }

    fn update_entry(
        &mut self,
        id: EntryId,
        source: PeerIdx,
        attrs: Option<Arc<PathAttrs>>,
    ) -> bool {
        let e = &mut self.entries[id as usize];
        let pos = e.paths.iter().position(|p| p.source == source);
        let before = signature(e);
        let counts = &mut self.counts;
        let bump = |counts: &mut Vec<usize>, d: isize| {
            let i = source as usize;
            if counts.len() <= i {
                counts.resize(i + 1, 0);
            }
            counts[i] = counts[i].saturating_add_signed(d);
        };
        match (pos, attrs) {
            (Some(i), Some(a)) => {
                let p = &mut e.paths[i];
                if Arc::ptr_eq(&p.attrs, &a) && !p.stale && !p.refresh_stale {
                    return false;
                }
                p.attrs = a;
                p.stale = false;
                p.refresh_stale = false;
            }
            (None, Some(a)) => {
                e.paths.push(Path {
                    source,
                    attrs: a,
                    stale: false,
                    refresh_stale: false,
                });
                bump(counts, 1);
            }
            (Some(i), None) => {
                e.paths.swap_remove(i);
                bump(counts, -1);
            }
            (None, None) => return false,
        }
        self.reselect(id, before)
    }

    /// Runs the decision process for entry `id` and journals it if its best path
    /// or ECMP set differ from `before`.
    fn reselect(&mut self, id: EntryId, before: Signature) -> bool {
        let sources = &self.sources;
        let e = &mut self.entries[id as usize];
        if e.paths.len() > 1 {
            let sel = select(&e.paths, |i| {
                sources.get(i as usize).and_then(|s| s.as_ref())
            });
            let order = if self.multipath {
                sel.multipath.clone()
            } else {
                sel.best.into_iter().collect()
            };
            e.paths.reorder(&order);
            e.multipath = order.len() as u16;
        } else {
            e.multipath = e.paths.len() as u16;
        }
        if signature(e) == before {
            return false;
        }
        let seq = self.journal_base + self.journal.len() as Seq;
        e.seq = seq;
        self.journal.push_back(id);
        true
    }

    /// Removes every path from `source` (its session went down without graceful
    /// restart). Returns how many prefixes changed best path.
    pub fn remove_source(&mut self, source: PeerIdx) -> usize {
        self.remove_where(source, None, |_| true)
    }

    /// Marks every path from `source` stale (RFC 4724 §4.2). Returns the count.
    pub fn mark_stale(&mut self, source: PeerIdx) -> usize {
        let mut n = 0;
        for e in &mut self.entries {
            for p in e.paths.iter_mut() {
                if p.source == source {
                    p.stale = true;
                    n += 1;
                }
            }
        }
        n
    }

    /// Removes `source`'s paths that are still stale, in `family` or all families.
    pub fn sweep_stale(&mut self, source: PeerIdx, family: Option<Family>) -> usize {
        self.remove_where(source, family, |p| p.stale)
    }

    /// Marks every path from `source` in `family` as awaiting the peer's route
    /// refresh answer (its BoRR arrived, RFC 7313 §4). Returns the count.
    pub fn mark_refresh_stale(&mut self, source: PeerIdx, family: Family) -> usize {
        let mut n = 0;
        for e in self
            .entries
            .iter_mut()
            .filter(|e| e.prefix.family() == family)
        {
            for p in e.paths.iter_mut().filter(|p| p.source == source) {
                p.refresh_stale = true;
                n += 1;
            }
        }
        n
    }

    /// Ends a route refresh from `source` in `family` (its EoRR arrived, or we gave
    /// up waiting): removes the paths it did not re-announce. Paths graceful
    /// restart holds as stale stay for its own End-of-RIB or timer. Returns how
    /// many prefixes changed best path.
    pub fn sweep_refresh_stale(&mut self, source: PeerIdx, family: Family) -> usize {
        let n = self.remove_where(source, Some(family), |p| p.refresh_stale && !p.stale);
        for e in self
            .entries
            .iter_mut()
            .filter(|e| e.prefix.family() == family)
        {
            for p in e.paths.iter_mut().filter(|p| p.source == source) {
                p.refresh_stale = false;
            }
        }
        n
    }

    /// Paths from `source` that are stale (graceful restart).
    pub fn stale_count(&self, source: PeerIdx) -> usize {
        self.entries
            .iter()
            .flat_map(|e| e.paths.iter())
            .filter(|p| p.source == source && p.stale)
            .count()
    }

    fn remove_where(
        &mut self,
        source: PeerIdx,
        family: Option<Family>,
        doomed: impl Fn(&Path) -> bool,
    ) -> usize {
        let mut changed = 0;
        for id in 0..self.entries.len() as EntryId {
            let e = &self.entries[id as usize];
            if family.is_some_and(|f| e.prefix.family() != f) {
                continue;
            }
            if e.paths.iter().any(|p| p.source == source && doomed(p))
                && self.update_entry(id, source, None)
            {
                changed += 1;
            }
        }
        changed
    }

    /// Forces entry `id` into the journal (for example after an export policy
    /// change) without changing it.
    pub fn touch(&mut self, id: EntryId) {
        let seq = self.journal_base + self.journal.len() as Seq;
        self.entries[id as usize].seq = seq;
        self.journal.push_back(id);
    }

    // ----- journal -----

    /// The sequence number the next change will get.
    pub fn head(&self) -> Seq {
        self.journal_base + self.journal.len() as Seq
    }

    /// The oldest sequence number still held.
    pub fn tail(&self) -> Seq {
        self.journal_base
    }

    /// The entry changed at `seq`, unless a later change supersedes that record (or
    /// it was trimmed).
    pub fn journal_at(&self, seq: Seq) -> Option<EntryId> {
        let off = seq.checked_sub(self.journal_base)?;
        let id = *self.journal.get(off as usize)?;
        (self.entries[id as usize].seq == seq).then_some(id)
    }

    /// Drops journal records before `seq` (every reader has passed them).
    pub fn trim_journal(&mut self, seq: Seq) {
        while self.journal_base < seq && !self.journal.is_empty() {
            self.journal.pop_front();
            self.journal_base += 1;
        }
    }

    pub fn journal_len(&self) -> usize {
        self.journal.len()
    }
}

// ===== paths of one prefix =====

/// The paths of one prefix. Nearly every prefix has exactly one, which is kept
/// inline rather than in a heap vector of its own; the rarer vector is boxed so
/// that `Paths` is no larger than one path (16 bytes, an entry 48).
#[derive(Debug, Clone, Default)]
pub enum Paths {
    #[default]
    Empty,
    One(Path),
    Many(Box<Vec<Path>>),
}

impl std::ops::Deref for Paths {
    type Target = [Path];

    fn deref(&self) -> &[Path] {
        match self {
            Paths::Empty => &[],
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Paths {
    fn deref_mut(&mut self) -> &mut [Path] {
        match self {
            Paths::Empty => &mut [],
            Paths::One(p) => std::slice::from_mut(p),
            Paths::Many(v) => v,
        }
    }
}

impl Paths {
    fn push(&mut self, p: Path) {
        *self = match std::mem::take(self) {
            Paths::Empty => Paths::One(p),
            Paths::One(a) => Paths::Many(Box::new(vec![a, p])),
            Paths::Many(mut v) => {
                v.push(p);
                Paths::Many(v)
            }
        };
    }

    /// Removes path `i`, moving the last one into its place (as `Vec::swap_remove`).
    fn swap_remove(&mut self, i: usize) {
        *self = match std::mem::take(self) {
            Paths::Empty | Paths::One(_) => Paths::Empty,
            Paths::Many(mut v) => {
                v.swap_remove(i);
                match v.len() {
                    0 => Paths::Empty,
                    1 => v.pop().map(Paths::One).unwrap_or_default(),
                    _ => Paths::Many(v),
                }
            }
        };
    }

    /// Puts the paths at positions `order` first, in that order, then the others in
    /// their current order.
    fn reorder(&mut self, order: &[usize]) {
        if let Paths::Many(v) = self {
            let mut paths: Vec<Option<Path>> =
                std::mem::take(&mut **v).into_iter().map(Some).collect();
            let mut sorted = Vec::with_capacity(paths.len());
            for &i in order {
                if let Some(p) = paths.get_mut(i).and_then(Option::take) {
                    sorted.push(p);
                }
            }
            sorted.extend(paths.into_iter().flatten());
            **v = sorted;
        }
    }
}

// ===== prefix index =====

/// One slot of the [`PrefixIndex`]: the low 32 bits of the prefix's hash and its
/// entry, or `EMPTY`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u32,
    id: EntryId,
}

const EMPTY: EntryId = EntryId::MAX;

/// Prefix → entry, by open addressing with linear probing. A slot is 8 bytes (a
/// `HashMap<Prefix, EntryId>` bucket is 24 and repeats the prefix its entry
/// holds), so 100 000 prefixes index in 2 MiB, and a probe compares the stored hash
/// before it looks at the entry. Entries are never removed (an entry keeps its id
/// for life), so there are no tombstones. At most three quarters of the slots are
/// used; growth rehashes from the stored hashes alone.
#[derive(Debug, Default)]
struct PrefixIndex {
    slots: Vec<Slot>,
    len: usize,
}

impl PrefixIndex {
    fn hash(p: &Prefix) -> u32 {
        // The low bits are the slot: FxHasher::finish rotates the well-mixed high
        // bits of the product there.
        FxBuild::default().hash_one(p) as u32
    }

    fn find(&self, p: &Prefix, entries: &[Entry]) -> Option<EntryId> {
        if self.slots.is_empty() {
            return None;
        }
        let hash = Self::hash(p);
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = self.slots[i];
            if s.id == EMPTY {
                return None;
            }
            if s.hash == hash && entries[s.id as usize].prefix == *p {
                return Some(s.id);
            }
            i = (i + 1) & mask;
        }
    }

    /// The entry of `p`, or `next` after recording it as `p`'s entry.
    fn find_or_insert(&mut self, p: &Prefix, next: EntryId, entries: &[Entry]) -> EntryId {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let hash = Self::hash(p);
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = self.slots[i];
            if s.id == EMPTY {
                self.slots[i] = Slot { hash, id: next };
                self.len += 1;
                return next;
            }
            if s.hash == hash && entries[s.id as usize].prefix == *p {
                return s.id;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(64);
        let old = std::mem::replace(&mut self.slots, vec![Slot { hash: 0, id: EMPTY }; n]);
        let mask = n - 1;
        for s in old.into_iter().filter(|s| s.id != EMPTY) {
            let mut i = s.hash as usize & mask;
            while self.slots[i].id != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }
}

/// What decides whether an entry's visible state changed: the sources and attribute
/// sets of the ECMP set, in order.
type Signature = smallsig::Sig;

fn signature(e: &Entry) -> Signature {
    smallsig::Sig::of(e.multipath_set())
}

mod smallsig {
    use super::*;

    /// Up to four (source, attributes pointer) pairs inline, which covers nearly
    /// every prefix; longer ECMP sets fall back to a vector.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Sig {
        Inline(u8, [(PeerIdx, usize); 4]),
        Long(Vec<(PeerIdx, usize)>),
    }

    impl Sig {
        pub fn of(paths: &[Path]) -> Self {
            let key = |p: &Path| (p.source, Arc::as_ptr(&p.attrs) as usize);
            if paths.len() <= 4 {
                let mut a = [(0, 0); 4];
                for (i, p) in paths.iter().enumerate() {
                    a[i] = key(p);
                }
                Sig::Inline(paths.len() as u8, a)
            } else {
                Sig::Long(paths.iter().map(key).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rib::decision::{SourceKind, LOCAL};
    use margay_bgp_wire::AsPath;
    use std::net::IpAddr;

    fn rib() -> Rib {
        let mut r = Rib::new(Ipv4Addr::new(9, 9, 9, 9));
        for i in 1..=3u8 {
            r.set_source(
                u32::from(i),
                Source {
                    kind: SourceKind::Ebgp,
                    router_id: Ipv4Addr::new(i, i, i, i),
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
                    rr_client: false,
                },
            );
        }
        r
    }

    fn attrs(path: &[u32]) -> Arc<PathAttrs> {
        Arc::new(PathAttrs {
            as_path: AsPath::sequence(path.iter().copied()),
            ..PathAttrs::default()
        })
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn best_path_is_kept_first_and_changes_are_journaled() {
        let mut r = rib();
        let pre = p("10.1.0.0/16");
        assert!(r.update(1, pre, Some(attrs(&[1, 2]))));
        assert!(
            r.update(2, pre, Some(attrs(&[2]))),
            "shorter path takes over"
        );
        assert_eq!(r.get(&pre).unwrap().best().unwrap().source, 2);
        assert!(
            !r.update(1, pre, Some(attrs(&[1, 2, 3]))),
            "a worse alternative changes nothing visible"
        );
        assert_eq!(r.count(1), 1);
        assert!(r.update(2, pre, None), "withdrawing the best falls back");
        assert_eq!(r.get(&pre).unwrap().best().unwrap().source, 1);
        assert!(r.update(1, pre, None));
        assert!(r.get(&pre).unwrap().best().is_none());
        assert!(!r.update(1, pre, None), "withdrawing twice is a no-op");
        assert_eq!(r.count(1), 0);
    }

    #[test]
    fn journal_records_are_superseded_by_later_changes() {
        let mut r = rib();
        let a = p("10.1.0.0/16");
        let b = p("10.2.0.0/16");
        let start = r.head();
        r.update(1, a, Some(attrs(&[1])));
        r.update(1, b, Some(attrs(&[1])));
        r.update(1, a, None);
        let live: Vec<EntryId> = (start..r.head()).filter_map(|s| r.journal_at(s)).collect();
        assert_eq!(live.len(), 2, "a's first record is superseded");
        assert_eq!(r.entry(live[0]).prefix, b);
        assert_eq!(r.entry(live[1]).prefix, a);
        r.trim_journal(r.head());
        assert_eq!(r.journal_len(), 0);
        assert_eq!(r.journal_at(start), None);
    }

    #[test]
    fn removing_a_source_withdraws_only_its_paths() {
        let mut r = rib();
        for i in 0..100u32 {
            let pre =
                Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap();
            r.update(1, pre, Some(attrs(&[1])));
            if i % 2 == 0 {
                r.update(2, pre, Some(attrs(&[2, 2])));
            }
        }
        let changed = r.remove_source(1);
        assert_eq!(changed, 100);
        assert_eq!(r.count(1), 0);
        assert_eq!(r.routes(), 50);
    }

    #[test]
    fn stale_paths_are_swept_unless_refreshed() {
        let mut r = rib();
        let a = p("10.1.0.0/16");
        let b = p("10.2.0.0/16");
        let v6 = p("2001:db8::/32");
        let x = attrs(&[1]);
        r.update(1, a, Some(x.clone()));
        r.update(1, b, Some(x.clone()));
        r.update(1, v6, Some(x.clone()));
        assert_eq!(r.mark_stale(1), 3);
        let head = r.head();
        // The restarted peer sends `a` again with the same attributes: it is fresh
        // and the best path did not change, so nothing is journaled.
        assert!(!r.update(1, a, Some(x.clone())));
        assert_eq!(r.head(), head);
        assert_eq!(r.stale_count(1), 2);
        assert_eq!(r.sweep_stale(1, Some(Family::Ipv4Unicast)), 1);
        assert!(r.get(&b).unwrap().best().is_none());
        assert!(r.get(&a).unwrap().best().is_some());
        assert!(r.get(&v6).unwrap().best().is_some());
        assert_eq!(r.sweep_stale(1, None), 1);
        assert_eq!(r.stale_count(1), 0);
    }

    #[test]
    fn a_route_refresh_sweeps_one_family_of_one_peer_and_spares_graceful_restart() {
        let mut r = rib();
        let a = p("10.1.0.0/16");
        let b = p("10.2.0.0/16");
        let v6 = p("2001:db8::/32");
        let x = attrs(&[1]);
        let y = attrs(&[2]);
        for q in [a, b, v6] {
            r.update(1, q, Some(x.clone()));
        }
        r.update(2, b, Some(y.clone()));
        assert_eq!(r.mark_refresh_stale(1, Family::Ipv4Unicast), 2);
        // Re-announced unchanged: fresh again, and not a best-path change.
        let head = r.head();
        assert!(!r.update(1, a, Some(x.clone())));
        assert_eq!(r.head(), head);
        assert_eq!(r.sweep_refresh_stale(1, Family::Ipv4Unicast), 1);
        assert!(r.get(&a).unwrap().best().is_some_and(|p| p.source == 1));
        let paths_b: Vec<_> = r.get(&b).unwrap().paths.iter().map(|p| p.source).collect();
        assert_eq!(paths_b, vec![2], "only peer 1's unrefreshed path goes");
        assert!(
            r.get(&v6).unwrap().best().is_some(),
            "other family untouched"
        );
        assert_eq!(r.sweep_refresh_stale(1, Family::Ipv4Unicast), 0);

        // A path graceful restart holds stays through a refresh, for GR to decide.
        r.update(1, b, Some(x.clone()));
        assert_eq!(r.mark_stale(1), 3);
        r.mark_refresh_stale(1, Family::Ipv4Unicast);
        assert_eq!(r.sweep_refresh_stale(1, Family::Ipv4Unicast), 0);
        assert_eq!(r.stale_count(1), 3);
        assert!(r.get(&a).unwrap().paths.iter().all(|p| !p.refresh_stale));
        // ... and GR's sweep leaves a path only the refresh marked.
        r.update(1, a, Some(x.clone()));
        r.mark_refresh_stale(1, Family::Ipv4Unicast);
        assert_eq!(r.sweep_stale(1, Some(Family::Ipv4Unicast)), 1);
        assert!(r.get(&a).unwrap().best().is_some_and(|p| p.source == 1));
        assert_eq!(r.sweep_refresh_stale(1, Family::Ipv4Unicast), 1);
        assert!(r.get(&a).unwrap().best().is_none());
    }

    #[test]
    fn prefixes_of_a_table_spread_over_the_hash_buckets() {
        use std::hash::BuildHasher;
        // 100 000 consecutive /24s, as a full-table feed sends them; hashbrown picks
        // the bucket from the low bits of the hash.
        let n = 100_000u32;
        let mask = (1u64 << 17) - 1;
        let mut buckets = std::collections::HashSet::new();
        for i in 0..n {
            let pre =
                Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0100_0000 + (i << 8))), 24).unwrap();
            buckets.insert(FxBuild::default().hash_one(pre) & mask);
        }
        assert!(
            buckets.len() > (n as usize) / 2,
            "only {} distinct buckets for {n} prefixes",
            buckets.len()
        );
    }

    #[test]
    fn the_index_finds_every_prefix_across_growth_and_families() {
        let mut r = rib();
        let a = attrs(&[1]);
        let mut all = Vec::new();
        for i in 0..5_000u32 {
            all.push(
                Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap(),
            );
            // The same address with another length is another prefix.
            all.push(
                Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 32).unwrap(),
            );
            all.push(
                Prefix::new_masked(
                    IpAddr::V6(std::net::Ipv6Addr::from(
                        0x2001_0db8_u128 << 96 | u128::from(i) << 64,
                    )),
                    64,
                )
                .unwrap(),
            );
        }
        for (n, pre) in all.iter().enumerate() {
            assert!(r.update(1, *pre, Some(a.clone())));
            assert_eq!(r.len(), n + 1, "{pre} got an entry of its own");
        }
        for pre in &all {
            assert_eq!(r.get(pre).map(|e| e.prefix), Some(*pre));
        }
        assert!(r.get(&p("10.0.0.0/23")).is_none());
        assert!(r.get(&p("2001:db8::/63")).is_none());
        // Withdrawn prefixes keep their entries; announcing again reuses them.
        for pre in &all {
            assert!(r.update(1, *pre, None));
        }
        assert_eq!(r.routes(), 0);
        r.update(2, all[7], Some(a.clone()));
        assert_eq!(r.len(), all.len());
    }

    #[test]
    fn entries_stay_small() {
        // 100 000 prefixes are 100 000 entries: every byte here is 100 kB of RSS.
        assert_eq!(std::mem::size_of::<Paths>(), std::mem::size_of::<Path>());
        assert!(std::mem::size_of::<Entry>() <= 48);
    }

    #[test]
    fn paths_stay_inline_until_a_second_one_and_shrink_back() {
        let mut r = rib();
        let pre = p("10.1.0.0/16");
        r.update(1, pre, Some(attrs(&[1, 1])));
        assert!(matches!(r.get(&pre).unwrap().paths, Paths::One(_)));
        r.update(2, pre, Some(attrs(&[2])));
        r.update(3, pre, Some(attrs(&[3, 3, 3])));
        let e = r.get(&pre).unwrap();
        assert!(matches!(e.paths, Paths::Many(_)));
        let order: Vec<PeerIdx> = e.paths.iter().map(|p| p.source).collect();
        assert_eq!(order[0], 2, "shortest AS path first: {order:?}");
        r.update(2, pre, None);
        r.update(3, pre, None);
        let e = r.get(&pre).unwrap();
        assert!(matches!(e.paths, Paths::One(_)));
        assert_eq!(e.best().unwrap().source, 1);
        r.update(1, pre, None);
        assert!(matches!(r.get(&pre).unwrap().paths, Paths::Empty));
    }

    #[test]
    fn ecmp_set_is_tracked_when_multipath_is_on() {
        let mut r = rib();
        r.multipath = true;
        let pre = p("10.1.0.0/16");
        r.update(1, pre, Some(attrs(&[7])));
        assert!(
            r.update(2, pre, Some(attrs(&[8]))),
            "a second equal path changes the set"
        );
        let e = r.get(&pre).unwrap();
        assert_eq!(e.multipath_set().len(), 2);
        assert_eq!(e.best().unwrap().source, 1);
        r.update(LOCAL, pre, Some(attrs(&[])));
        assert_eq!(r.get(&pre).unwrap().multipath_set().len(), 1);
    }
}
