//! Route refresh (RFC 2918) with the Enhanced Route Refresh markers (RFC 7313), per
//! session, without I/O.
//!
//! Out: a ROUTE-REFRESH request from the peer is answered with a walk of the table
//! (its Adj-RIB-Out again). With Enhanced Route Refresh negotiated the answer for a
//! family starts with a BoRR and, once the walk is complete, ends with an EoRR.
//!
//! In: a BoRR from the peer marks its paths in that family refresh-stale; what it
//! re-announces becomes fresh again, and at its EoRR the rest is removed (§4). A
//! peer that never sends the EoRR gets [`EORR_WAIT`], then the same happens.

use std::time::Duration;

use margay_bgp_wire::{Families, Family, RouteRefresh};
use tokio::time::Instant;

/// How long we wait for the EoRR after a BoRR before removing what the peer has
/// not re-announced (RFC 7313 §4 leaves the time to us). FRR's default stale-path
/// time; a table of millions of routes re-sends well within it.
pub const EORR_WAIT: Duration = Duration::from_secs(360);

/// What the speaker must do for one route refresh step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshAction {
    /// Send a ROUTE-REFRESH message with this subtype (BoRR or EoRR) for the family.
    Send(Family, u8),
    /// Walk the table: send the peer its Adj-RIB-Out of the family again.
    Walk(Family),
    /// Mark the peer's paths in the family refresh-stale.
    MarkStale(Family),
    /// Remove the peer's paths in the family that are still refresh-stale.
    Sweep(Family),
}

/// Why a ROUTE-REFRESH message changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefreshIgnored {
    #[error("route refresh for {0:?}, a family not negotiated on this session (RFC 2918 §4)")]
    FamilyNotNegotiated(Family),
    #[error("BoRR/EoRR (subtype {0}) without the Enhanced Route Refresh capability on both sides")]
    NotNegotiated(u8),
    #[error("EoRR for {0:?} without a BoRR before it")]
    EndWithoutBegin(Family),
    #[error("unknown route refresh subtype {0} (RFC 7313 §5)")]
    UnknownSubtype(u8),
}

/// Route refresh state of one established session.
#[derive(Debug, Clone, Default)]
pub struct RefreshState {
    enhanced: bool,
    families: Families,
    /// Families we sent a BoRR for and owe the EoRR when the walk completes.
    owed: Families,
    /// Deadlines for the peer's EoRR, by family (IPv4, IPv6), while it re-sends.
    receiving: [Option<Instant>; 2],
}

fn slot(f: Family) -> usize {
    match f {
        Family::Ipv4Unicast => 0,
        Family::Ipv6Unicast => 1,
    }
}

impl RefreshState {
    /// `enhanced`: both OPENs carried Enhanced Route Refresh; `families`: those
    /// negotiated.
    pub fn new(enhanced: bool, families: Families) -> Self {
        Self {
            enhanced,
            families,
            ..Self::default()
        }
    }

    /// A ROUTE-REFRESH message with `subtype` for `family` arrived at `now`.
    pub fn received(
        &mut self,
        family: Family,
        subtype: u8,
        now: Instant,
    ) -> Result<Vec<RefreshAction>, RefreshIgnored> {
        if !self.families.contains(family) {
            return Err(RefreshIgnored::FamilyNotNegotiated(family));
        }
        match subtype {
            RouteRefresh::NORMAL => {
                if !self.enhanced {
                    return Ok(vec![RefreshAction::Walk(family)]);
                }
                self.owed.insert(family);
                Ok(vec![
                    RefreshAction::Send(family, RouteRefresh::BEGIN),
                    RefreshAction::Walk(family),
                ])
            }
            RouteRefresh::BEGIN | RouteRefresh::END if !self.enhanced => {
                Err(RefreshIgnored::NotNegotiated(subtype))
            }
            RouteRefresh::BEGIN => {
                // A second BoRR restarts the refresh: everything is stale again.
                self.receiving[slot(family)] = Some(now + EORR_WAIT);
                Ok(vec![RefreshAction::MarkStale(family)])
            }
            RouteRefresh::END => match self.receiving[slot(family)].take() {
                Some(_) => Ok(vec![RefreshAction::Sweep(family)]),
                None => Err(RefreshIgnored::EndWithoutBegin(family)),
            },
            other => Err(RefreshIgnored::UnknownSubtype(other)),
        }
    }

    /// Our table walk for the peer completed: the EoRRs owed, to send after it.
    pub fn walk_done(&mut self) -> Vec<RefreshAction> {
        let owed = std::mem::replace(&mut self.owed, Families::NONE);
        [Family::Ipv4Unicast, Family::Ipv6Unicast]
            .into_iter()
            .filter(|f| owed.contains(*f))
            .map(|f| RefreshAction::Send(f, RouteRefresh::END))
            .collect()
    }

    /// An EoRR is still to be sent (the peer must not join an update group yet).
    pub fn owes_end(&self) -> bool {
        self.owed != Families::NONE
    }

    /// Sweeps for families whose EoRR did not arrive by `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<RefreshAction> {
        let mut out = Vec::new();
        for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            let r = &mut self.receiving[slot(f)];
            if r.is_some_and(|d| now >= d) {
                *r = None;
                out.push(RefreshAction::Sweep(f));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RefreshAction::*;

    const V4: Family = Family::Ipv4Unicast;
    const V6: Family = Family::Ipv6Unicast;

    fn both() -> Families {
        Families::ALL
    }

    #[test]
    fn a_request_is_answered_with_borr_walk_and_eorr_only_with_the_capability() {
        let now = Instant::now();
        let mut plain = RefreshState::new(false, both());
        assert_eq!(plain.received(V4, 0, now), Ok(vec![Walk(V4)]));
        assert!(plain.walk_done().is_empty());

        let mut err = RefreshState::new(true, both());
        assert_eq!(err.received(V4, 0, now), Ok(vec![Send(V4, 1), Walk(V4)]));
        assert!(err.owes_end());
        // A second request before the walk ends restarts it; both families end
        // after the complete walk.
        assert_eq!(err.received(V6, 0, now), Ok(vec![Send(V6, 1), Walk(V6)]));
        assert_eq!(err.walk_done(), vec![Send(V4, 2), Send(V6, 2)]);
        assert!(!err.owes_end());
        assert!(err.walk_done().is_empty(), "an EoRR is sent once");
    }

    #[test]
    fn requests_for_families_not_negotiated_are_ignored() {
        let v4_only = Families {
            ipv4_unicast: true,
            ipv6_unicast: false,
        };
        let mut s = RefreshState::new(true, v4_only);
        assert_eq!(
            s.received(V6, 0, Instant::now()),
            Err(RefreshIgnored::FamilyNotNegotiated(V6))
        );
        assert!(!s.owes_end());
    }

    #[test]
    fn borr_marks_stale_and_eorr_sweeps_one_family() {
        let now = Instant::now();
        let mut s = RefreshState::new(true, both());
        assert_eq!(s.received(V6, 1, now), Ok(vec![MarkStale(V6)]));
        assert_eq!(
            s.received(V4, 2, now),
            Err(RefreshIgnored::EndWithoutBegin(V4))
        );
        assert_eq!(s.received(V6, 2, now), Ok(vec![Sweep(V6)]));
        assert_eq!(
            s.received(V6, 2, now),
            Err(RefreshIgnored::EndWithoutBegin(V6)),
            "a repeated EoRR sweeps nothing more"
        );
        assert!(s.expired(now + EORR_WAIT).is_empty());
    }

    #[test]
    fn without_an_eorr_the_stale_paths_go_after_the_wait() {
        let now = Instant::now();
        let mut s = RefreshState::new(true, both());
        s.received(V4, 1, now).unwrap();
        assert!(s
            .expired(now + EORR_WAIT - Duration::from_secs(1))
            .is_empty());
        assert_eq!(s.expired(now + EORR_WAIT), vec![Sweep(V4)]);
        assert!(s.expired(now + 2 * EORR_WAIT).is_empty());
        assert_eq!(
            s.received(V4, 2, now + EORR_WAIT),
            Err(RefreshIgnored::EndWithoutBegin(V4)),
            "a late EoRR finds nothing to end"
        );
    }

    #[test]
    fn markers_without_the_capability_and_unknown_subtypes_are_ignored() {
        let now = Instant::now();
        let mut plain = RefreshState::new(false, both());
        assert_eq!(
            plain.received(V4, 1, now),
            Err(RefreshIgnored::NotNegotiated(1))
        );
        assert_eq!(
            plain.received(V4, 2, now),
            Err(RefreshIgnored::NotNegotiated(2))
        );
        let mut err = RefreshState::new(true, both());
        for sub in [3u8, 128, 255] {
            assert_eq!(
                err.received(V4, sub, now),
                Err(RefreshIgnored::UnknownSubtype(sub))
            );
        }
        assert!(err.expired(now + EORR_WAIT).is_empty());
        assert!(!err.owes_end());
    }
}
