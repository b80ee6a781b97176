//! Update groups against the per-peer Adj-RIB-Out: whatever the table does, every
//! member ends up holding exactly what it would hold on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use margay_bgp_wire::{AsPath, Families, NextHop};

use super::*;
use crate::rib::decision::{Source, SourceKind, LOCAL};
use crate::rib::export::{collect, NextHopMode};
use crate::rib::policy::Policy;

const RID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);

/// Sources 1..=4 are route-reflector clients, 5 an iBGP non-client, 6 eBGP.
fn rib() -> Rib {
    let mut r = Rib::new(RID);
    for i in 1..=6u8 {
        r.set_source(
            PeerIdx::from(i),
            Source {
                kind: if i == 6 {
                    SourceKind::Ebgp
                } else {
                    SourceKind::Ibgp
                },
                router_id: Ipv4Addr::new(10, 0, 0, i),
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
                rr_client: i <= 4,
            },
        );
    }
    r
}

/// The export context of a route-reflector client (`peer` [`NO_PEER`] for the group).
fn client(peer: PeerIdx) -> ExportCtx {
    ExportCtx {
        peer,
        ebgp: false,
        rr_client: true,
        local_asn: 65000,
        router_id: RID,
        cluster_id: RID,
        next_hop: NextHopMode::Auto,
        self_v4: Some(Ipv4Addr::new(10, 0, 0, 100)),
        self_v6: None,
        families: Families::ALL,
        extended_next_hop_v4: false,
        policy: Arc::new(Policy::accept_all()),
    }
}

fn attrs(source: u8, local_pref: u32) -> Arc<PathAttrs> {
    Arc::new(PathAttrs {
        as_path: if source == 6 {
            AsPath::sequence([65100])
        } else {
            AsPath::default()
        },
        next_hop: Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, source))),
        local_pref: (source != 6).then_some(local_pref),
        ..PathAttrs::default()
    })
}

fn p(i: u32) -> Prefix {
    Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap()
}

/// What a peer holds from us: prefix → attributes, built from what it is sent.
type Held = BTreeMap<Prefix, PathAttrs>;

fn apply(held: &mut Held, b: &OutBatch) {
    for w in &b.withdrawn {
        held.remove(w);
    }
    for (a, ps) in &b.announced {
        for p in ps {
            held.insert(*p, (**a).clone());
        }
    }
}

fn apply_withdrawals(held: &mut Held, ps: &[Prefix]) {
    for w in ps {
        held.remove(w);
    }
}

/// Delivers a group batch to every member the way the speaker fans it out.
fn deliver(b: &GroupBatch, members: &BTreeSet<PeerIdx>, held: &mut BTreeMap<PeerIdx, Held>) {
    for &m in members {
        let h = held.entry(m).or_default();
        for s in &b.sections {
            if s.source == m {
                apply_withdrawals(h, &s.to_source);
            } else {
                apply(h, &s.others);
            }
        }
    }
}

/// A peer on its own, as the speaker runs a peer outside any group.
struct Solo {
    out: AdjRibOut,
    held: Held,
}

impl Solo {
    fn sync(&mut self, rib: &Rib, peer: PeerIdx, budget: usize) {
        while !self.out.is_synced(rib) {
            let b = collect(rib, &mut self.out, &client(peer), budget);
            apply(&mut self.held, &b);
        }
    }
}

/// A small deterministic generator (xorshift), so a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Attributes per (source, local-pref choice), shared like those of one UPDATE, so
/// runs of prefixes with the same attributes occur.
fn pool() -> Vec<Vec<Arc<PathAttrs>>> {
    (0..=6u8)
        .map(|s| (0..3).map(|k| attrs(s, 100 + k * 50)).collect())
        .collect()
}

fn step(r: &mut Rib, rng: &mut Rng, pool: &[Vec<Arc<PathAttrs>>]) {
    let source = [LOCAL, 1, 2, 3, 4, 5, 6][rng.below(7) as usize];
    let prefix = p(rng.below(24) as u32);
    let a = (rng.below(4) != 0).then(|| pool[source as usize][rng.below(3) as usize].clone());
    r.update(source, prefix, a);
}

#[test]
fn a_path_never_goes_back_to_the_member_it_came_from() {
    let mut r = rib();
    let ctx = client(NO_PEER);
    let mut g = GroupOut::in_sync(&r, &ctx);
    let members: BTreeSet<PeerIdx> = [1, 2, 3].into();
    let is_member = |m: PeerIdx| members.contains(&m);
    let mut held = BTreeMap::new();

    r.update(1, p(1), Some(attrs(1, 100)));
    let b = collect_group(&r, &mut g, &ctx, is_member, 100);
    deliver(&b, &members, &mut held);
    assert!(!held[&1].contains_key(&p(1)), "back to its source");
    assert_eq!(
        held[&2][&p(1)].originator_id,
        Some(Ipv4Addr::new(10, 0, 0, 1))
    );
    assert!(held[&3].contains_key(&p(1)));
    assert_eq!((g.count_for(1), g.count_for(2)), (0, 1));
    assert!(!g.holds(1, 0) && g.holds(2, 0));

    // Member 2's own path wins: 2 must lose 1's path, 1 now gets 2's.
    r.update(2, p(1), Some(attrs(2, 200)));
    let b = collect_group(&r, &mut g, &ctx, is_member, 100);
    assert_eq!(b.sections.len(), 2, "common section and member 2's");
    assert_eq!(b.sections[1].to_source, vec![p(1)]);
    deliver(&b, &members, &mut held);
    assert!(!held[&2].contains_key(&p(1)));
    assert_eq!(held[&1][&p(1)].local_pref, Some(200));
    assert_eq!(held[&3][&p(1)].local_pref, Some(200));

    // Gone everywhere: the withdrawal skips the member that never held it.
    r.update(1, p(1), None);
    r.update(2, p(1), None);
    let b = collect_group(&r, &mut g, &ctx, is_member, 100);
    assert!(b.sections[0].others.withdrawn.is_empty());
    assert_eq!(b.sections[1].source, 2);
    assert_eq!(b.sections[1].others.withdrawn, vec![p(1)]);
    deliver(&b, &members, &mut held);
    assert!(held.values().all(|h| h.is_empty()));
    assert_eq!(g.count_for(1) + g.count_for(2) + g.count_for(3), 0);
}

#[test]
fn members_hold_what_they_would_hold_alone_through_joins_and_splits() {
    for seed in 1..=40u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let mut r = rib();
        let ctx = client(NO_PEER);
        // Peers 1..=4 start on their own; some join a group, some leave it.
        let mut solos: BTreeMap<PeerIdx, Solo> = (1..=4)
            .map(|m| {
                (
                    m,
                    Solo {
                        out: AdjRibOut::new(&r),
                        held: Held::new(),
                    },
                )
            })
            .collect();
        let mut group: Option<GroupOut> = None;
        let mut members = BTreeSet::new();
        let mut held: BTreeMap<PeerIdx, Held> = BTreeMap::new();
        let pool = pool();
        for round in 0..60 {
            for _ in 0..rng.below(12) {
                step(&mut r, &mut rng, &pool);
            }
            let budget = 1 + rng.below(16) as usize;
            // The group moves in budget-sized batches.
            if let Some(g) = group.as_mut() {
                while !g.is_synced(&r) {
                    let b = collect_group(&r, g, &ctx, |m| members.contains(&m), budget);
                    deliver(&b, &members, &mut held);
                }
            }
            for (&m, s) in solos.iter_mut() {
                s.sync(&r, m, budget);
            }
            // Everyone is in sync: compare with fresh solo peers that saw only the end.
            for m in 1..=4 {
                let mut fresh = Solo {
                    out: AdjRibOut::new(&r),
                    held: Held::new(),
                };
                fresh.sync(&r, m, 1000);
                let mine = solos.get(&m).map(|s| &s.held).or(held.get(&m));
                assert_eq!(
                    mine.cloned().unwrap_or_default(),
                    fresh.held,
                    "seed {seed} round {round}: peer {m} (member: {})",
                    members.contains(&m)
                );
                if let Some(g) = &group {
                    if members.contains(&m) {
                        assert_eq!(g.count_for(m), fresh.held.len());
                        let view = g.member_view(&r, m);
                        assert_eq!(view.count(), fresh.held.len());
                        assert_eq!(view.cursor(), r.head());
                        // A group formed now holds the same (groups of one key merge).
                        let fresh_group = GroupOut::in_sync(&r, &ctx).member_view(&r, m);
                        assert!(view.advertised_ids().eq(fresh_group.advertised_ids()));
                    }
                }
            }
            // Membership changes, only at synced points as in the speaker.
            let m = 1 + rng.below(4) as PeerIdx;
            if let Some(s) = solos.remove(&m) {
                group.get_or_insert_with(|| GroupOut::in_sync(&r, &ctx));
                members.insert(m);
                held.insert(m, s.held);
            } else if let Some(g) = &group {
                members.remove(&m);
                solos.insert(
                    m,
                    Solo {
                        out: g.member_view(&r, m),
                        held: held.remove(&m).unwrap(),
                    },
                );
            }
        }
    }
}

#[test]
fn a_group_formed_now_does_not_count_paths_it_could_not_send() {
    let mut r = rib();
    // A local route with no next hop, and no address of ours for the session:
    // nothing to put in NEXT_HOP, so it is not sent.
    r.update(LOCAL, p(1), Some(Arc::new(PathAttrs::default())));
    r.update(1, p(2), Some(attrs(1, 100)));
    let ctx = ExportCtx {
        self_v4: None,
        ..client(NO_PEER)
    };
    let g = GroupOut::in_sync(&r, &ctx);
    assert_eq!(g.count_for(2), 1, "only client 1's route");
    assert_eq!(g.count_for(1), 0);
    let mut alone = AdjRibOut::new(&r);
    let b = collect(
        &r,
        &mut alone,
        &ExportCtx {
            self_v4: None,
            ..client(2)
        },
        100,
    );
    assert_eq!(b.prefix_count(), 1);
    assert_eq!(alone.count(), g.count_for(2));
}
