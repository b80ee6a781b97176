//! The decision process (RFC 4271 §9.1.2.2, RFC 4456 §9): which of a prefix's
//! paths is best, and which are equal enough to share traffic (ECMP).
//!
//! Each step removes the candidates that lose it, as the RFC describes, so MED (which
//! only compares paths from the same neighbouring AS) cannot make the order depend
//! on the order paths arrived in.

use std::cmp::Ordering;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::attrs::PathAttrs;

/// A session (or the local speaker) that contributes paths; index into the RIB's
/// source table. 0 is the local speaker.
pub type PeerIdx = u32;

/// The local speaker's source index.
pub const LOCAL: PeerIdx = 0;

/// LOCAL_PREF assumed when a path has none (RFC 4271 leaves it to configuration;
/// 100 is what every implementation uses).
pub const DEFAULT_LOCAL_PREF: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Local,
    Ebgp,
    Ibgp,
}

/// What the decision process needs to know about where a path came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub kind: SourceKind,
    pub router_id: Ipv4Addr,
    pub addr: IpAddr,
    /// The peer is one of our route-reflector clients.
    pub rr_client: bool,
}

impl Source {
    pub fn local(router_id: Ipv4Addr) -> Self {
        Self {
            kind: SourceKind::Local,
            router_id,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            rr_client: false,
        }
    }
}

/// One path to a prefix, after import policy (the Adj-RIB-In content of one peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub source: PeerIdx,
    pub attrs: Arc<PathAttrs>,
    /// Kept from a graceful-restart peer whose session went down (RFC 4724 §4.2).
    pub stale: bool,
    /// Not yet re-announced in the peer's answer to our route refresh, between its
    /// BoRR and EoRR (RFC 7313 §4). Kept apart from `stale`: the refresh neither
    /// removes nor revives a path graceful restart holds.
    pub refresh_stale: bool,
}

/// The outcome: `order[0]` is the best path and `order[..multipath]` the paths equal
/// to it up to (not including) the router-ID tie-breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub best: Option<usize>,
    pub multipath: Vec<usize>,
}

fn local_pref(a: &PathAttrs) -> u32 {
    a.local_pref.unwrap_or(DEFAULT_LOCAL_PREF)
}

/// Runs the decision process over `paths`. `source` looks up each path's origin.
pub fn select<'a>(paths: &[Path], source: impl Fn(PeerIdx) -> Option<&'a Source>) -> Selection {
    match paths.len() {
        0 => {
            return Selection {
                best: None,
                multipath: Vec::new(),
            }
        }
        1 => {
            return Selection {
                best: Some(0),
                multipath: vec![0],
            }
        }
        _ => {}
    }
    let kind = |i: usize| {
        source(paths[i].source)
            .map(|s| s.kind)
            .unwrap_or(SourceKind::Ibgp)
    };
    let mut c: Vec<usize> = (0..paths.len()).collect();

    // Keep the candidates with the best value of `key` (smaller is better).
    fn keep_min<K: Ord>(c: &mut Vec<usize>, key: impl Fn(usize) -> K) {
        if let Some(best) = c.iter().map(|&i| key(i)).min() {
            c.retain(|&i| key(i) == best);
        }
    }

    // 1. Highest LOCAL_PREF.
    keep_min(&mut c, |i| std::cmp::Reverse(local_pref(&paths[i].attrs)));
    // 2. Locally originated.
    keep_min(&mut c, |i| kind(i) != SourceKind::Local);
    // 3. Shortest AS path.
    keep_min(&mut c, |i| paths[i].attrs.as_path.route_len());
    // 4. Lowest ORIGIN.
    keep_min(&mut c, |i| paths[i].attrs.origin);
    // 5. Lowest MED among paths from the same neighbouring AS; a missing MED is 0.
    if c.len() > 1 {
        let med = |i: usize| paths[i].attrs.med.unwrap_or(0);
        let nas = |i: usize| paths[i].attrs.neighbour_as();
        let snapshot = c.clone();
        c.retain(|&r| {
            !snapshot
                .iter()
                .any(|&s| s != r && nas(s) == nas(r) && med(s) < med(r))
        });
    }
    // 6. eBGP over iBGP.
    keep_min(&mut c, |i| kind(i) == SourceKind::Ibgp);
    let multipath = c.clone();
    // 7. Lowest router ID, or ORIGINATOR_ID for reflected paths.
    keep_min(&mut c, |i| {
        paths[i]
            .attrs
            .originator_id
            .or_else(|| source(paths[i].source).map(|s| s.router_id))
            .map(u32::from)
            .unwrap_or(u32::MAX)
    });
    // 8. Shortest CLUSTER_LIST.
    keep_min(&mut c, |i| paths[i].attrs.cluster_list.len());
    // 9. Lowest peer address.
    c.sort_by(|&a, &b| {
        let aa = source(paths[a].source).map(|s| s.addr);
        let bb = source(paths[b].source).map(|s| s.addr);
        aa.partial_cmp(&bb).unwrap_or(Ordering::Equal)
    });
    let best = c[0];
    let mut mp = vec![best];
    mp.extend(multipath.into_iter().filter(|&i| i != best));
    Selection {
        best: Some(best),
        multipath: mp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bgp_wire::{AsPath, Origin};

    fn src(kind: SourceKind, id: [u8; 4], addr: [u8; 4]) -> Source {
        Source {
            kind,
            router_id: Ipv4Addr::from(id),
            addr: IpAddr::V4(Ipv4Addr::from(addr)),
            rr_client: false,
        }
    }

    struct T {
        sources: Vec<Source>,
    }

    impl T {
        fn new() -> Self {
            Self {
                sources: vec![
                    Source::local(Ipv4Addr::new(9, 9, 9, 9)),
                    src(SourceKind::Ebgp, [1, 1, 1, 1], [10, 0, 0, 1]),
                    src(SourceKind::Ebgp, [2, 2, 2, 2], [10, 0, 0, 2]),
                    src(SourceKind::Ibgp, [3, 3, 3, 3], [10, 0, 0, 3]),
                    src(SourceKind::Ibgp, [4, 4, 4, 4], [10, 0, 0, 4]),
                ],
            }
        }

        fn best(&self, paths: &[Path]) -> PeerIdx {
            let s = select(paths, |i| self.sources.get(i as usize));
            paths[s.best.unwrap()].source
        }
    }

    fn path(source: PeerIdx, f: impl FnOnce(&mut PathAttrs)) -> Path {
        let mut a = PathAttrs {
            as_path: AsPath::sequence([65000 + source]),
            ..PathAttrs::default()
        };
        f(&mut a);
        Path {
            source,
            attrs: Arc::new(a),
            stale: false,
            refresh_stale: false,
        }
    }

    #[test]
    fn highest_local_pref_wins_over_everything_after_it() {
        let t = T::new();
        let a = path(1, |a| a.local_pref = Some(100));
        let b = path(3, |a| {
            a.local_pref = Some(200);
            a.as_path = AsPath::sequence([1, 2, 3, 4]);
        });
        assert_eq!(t.best(&[a, b]), 3);
    }

    #[test]
    fn local_routes_beat_learned_ones() {
        let t = T::new();
        let a = path(1, |a| a.as_path = AsPath::default());
        let b = path(0, |a| a.as_path = AsPath::sequence([5, 6]));
        assert_eq!(t.best(&[a, b]), 0);
    }

    #[test]
    fn shorter_as_path_then_lower_origin() {
        let t = T::new();
        let a = path(1, |a| a.as_path = AsPath::sequence([1, 2]));
        let b = path(2, |a| a.as_path = AsPath::sequence([1]));
        assert_eq!(t.best(&[a.clone(), b]), 2);
        let c = path(2, |a| {
            a.as_path = AsPath::sequence([7, 8]);
            a.origin = Origin::Incomplete;
        });
        let d = path(1, |a| {
            a.as_path = AsPath::sequence([7, 8]);
            a.origin = Origin::Egp;
        });
        assert_eq!(t.best(&[c, d]), 1);
    }

    #[test]
    fn med_compares_only_within_the_same_neighbour_as() {
        let t = T::new();
        // Same neighbour AS 7: lower MED wins even against a lower router ID.
        let a = path(1, |a| {
            a.as_path = AsPath::sequence([7]);
            a.med = Some(50);
        });
        let b = path(2, |a| {
            a.as_path = AsPath::sequence([7]);
            a.med = Some(10);
        });
        assert_eq!(t.best(&[a, b]), 2);
        // Different neighbour ASes: MED is ignored; router ID decides.
        let a = path(1, |a| {
            a.as_path = AsPath::sequence([7]);
            a.med = Some(50);
        });
        let b = path(2, |a| {
            a.as_path = AsPath::sequence([8]);
            a.med = Some(10);
        });
        assert_eq!(t.best(&[a, b]), 1);
    }

    #[test]
    fn med_selection_does_not_depend_on_arrival_order() {
        let t = T::new();
        // The classic intransitive triple: A(AS7, MED 10), B(AS8, MED 5), C(AS7, MED 5).
        let a = path(1, |a| {
            a.as_path = AsPath::sequence([7]);
            a.med = Some(10);
        });
        let b = path(4, |a| {
            a.as_path = AsPath::sequence([8]);
            a.med = Some(5);
            a.local_pref = Some(100);
        });
        let c = path(3, |a| {
            a.as_path = AsPath::sequence([7]);
            a.med = Some(5);
        });
        let orders = [
            vec![a.clone(), b.clone(), c.clone()],
            vec![c.clone(), b.clone(), a.clone()],
            vec![b.clone(), a.clone(), c.clone()],
        ];
        let winners: Vec<PeerIdx> = orders.iter().map(|o| t.best(o)).collect();
        assert!(winners.windows(2).all(|w| w[0] == w[1]), "{winners:?}");
    }

    #[test]
    fn ebgp_beats_ibgp_then_router_id_then_cluster_list_then_address() {
        let t = T::new();
        assert_eq!(t.best(&[path(3, |_| {}), path(2, |_| {})]), 2);
        // Two iBGP paths: lower router ID.
        assert_eq!(t.best(&[path(4, |_| {}), path(3, |_| {})]), 3);
        // ORIGINATOR_ID stands in for the router ID of a reflected path.
        let refl = path(3, |a| a.originator_id = Some(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(t.best(&[refl, path(4, |_| {})]), 4);
        // Same originator: shorter CLUSTER_LIST.
        let x = path(3, |a| {
            a.originator_id = Some(Ipv4Addr::new(1, 0, 0, 1));
            a.cluster_list = vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(2, 2, 2, 2)];
        });
        let y = path(4, |a| {
            a.originator_id = Some(Ipv4Addr::new(1, 0, 0, 1));
            a.cluster_list = vec![Ipv4Addr::new(1, 1, 1, 1)];
        });
        assert_eq!(t.best(&[x.clone(), y.clone()]), 4);
        // Everything equal: lower peer address.
        let x2 = path(4, |a| a.originator_id = Some(Ipv4Addr::new(1, 0, 0, 1)));
        let y2 = path(3, |a| a.originator_id = Some(Ipv4Addr::new(1, 0, 0, 1)));
        assert_eq!(t.best(&[x2, y2]), 3);
    }

    #[test]
    fn multipath_holds_the_paths_equal_before_the_router_id_step() {
        let t = T::new();
        let a = path(1, |a| a.as_path = AsPath::sequence([7]));
        let b = path(2, |a| a.as_path = AsPath::sequence([8]));
        let c = path(3, |a| a.as_path = AsPath::sequence([9]));
        let s = select(&[c, b, a], |i| t.sources.get(i as usize));
        assert_eq!(s.best, Some(2), "router ID 1.1.1.1 wins");
        assert_eq!(s.multipath, vec![2, 1], "the iBGP path is not equal-cost");
    }
}
