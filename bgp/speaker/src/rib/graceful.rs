//! The graceful-restart helper (RFC 4724 §4.2), per peer, without I/O.
//!
//! When a GR peer's session ends without a NOTIFICATION its routes are kept, marked
//! stale, for the restart time it advertised. If it comes back within that time, the
//! stale routes of each family it preserved forwarding state for stay until its
//! End-of-RIB for that family (or, at the latest, another restart time), then the
//! ones it did not re-announce are swept. Families it no longer preserves are swept
//! at once. Nothing waits longer than the restart time at either step.

use std::time::Duration;

use margay_bgp_wire::{Families, Family, GracefulRestart};

/// What the speaker must do to the peer's routes and the helper's one timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrAction {
    /// Keep the peer's routes, marked stale.
    MarkStale,
    /// The session ended without graceful restart: remove everything from the peer.
    RemoveAll,
    /// Remove the peer's still-stale routes of one family (`None`: all families).
    Sweep(Option<Family>),
    StartTimer(Duration),
    StopTimer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Nothing stale.
    Normal,
    /// Session down, routes stale, waiting for the peer to come back.
    Restarting {
        families: Families,
        restart_time: u16,
    },
    /// Session back, waiting for End-of-RIB in these families.
    AwaitingEndOfRib { families: Families },
}

/// Helper state for one peer.
#[derive(Debug, Clone)]
pub struct GrHelper {
    phase: Phase,
}

impl Default for GrHelper {
    fn default() -> Self {
        Self {
            phase: Phase::Normal,
        }
    }
}

fn families_of(cap: &GracefulRestart, only_forwarding: bool) -> Families {
    let mut f = Families::NONE;
    for fam in &cap.families {
        if only_forwarding && fam.flags & GracefulRestart::FORWARDING_STATE == 0 {
            continue;
        }
        if let Some(x) = Family::from_afi_safi(fam.afi, fam.safi) {
            f.insert(x);
        }
    }
    f
}

impl GrHelper {
    /// Stale routes are held.
    pub fn is_active(&self) -> bool {
        self.phase != Phase::Normal
    }

    /// The session went down. `graceful` is whether the way it ended allows GR
    /// (no NOTIFICATION); `peer_cap` the peer's capability on that session.
    pub fn session_down(
        &mut self,
        graceful: bool,
        peer_cap: Option<&GracefulRestart>,
    ) -> Vec<GrAction> {
        let cap = match peer_cap {
            Some(c) if graceful && c.restart_time > 0 => c,
            _ => {
                self.phase = Phase::Normal;
                return vec![GrAction::StopTimer, GrAction::RemoveAll];
            }
        };
        let families = families_of(cap, false);
        if families == Families::NONE {
            self.phase = Phase::Normal;
            return vec![GrAction::StopTimer, GrAction::RemoveAll];
        }
        // A second failure while still waiting for End-of-RIB keeps the routes
        // already stale and starts a fresh restart period.
        self.phase = Phase::Restarting {
            families,
            restart_time: cap.restart_time,
        };
        let mut out = vec![GrAction::MarkStale];
        for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            if !families.contains(f) {
                out.push(GrAction::Sweep(Some(f)));
            }
        }
        out.push(GrAction::StartTimer(Duration::from_secs(u64::from(
            cap.restart_time,
        ))));
        out
    }

    /// The session is back; `peer_cap` is the capability in the new OPEN.
    pub fn session_up(&mut self, peer_cap: Option<&GracefulRestart>) -> Vec<GrAction> {
        let Phase::Restarting {
            families,
            restart_time,
        } = self.phase.clone()
        else {
            return Vec::new();
        };
        let kept = peer_cap
            .map(|c| families_of(c, true))
            .unwrap_or(Families::NONE);
        let mut waiting = Families::NONE;
        let mut out = vec![GrAction::StopTimer];
        for f in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            if !families.contains(f) {
                continue;
            }
            if kept.contains(f) {
                waiting.insert(f);
            } else {
                out.push(GrAction::Sweep(Some(f)));
            }
        }
        if waiting == Families::NONE {
            self.phase = Phase::Normal;
        } else {
            self.phase = Phase::AwaitingEndOfRib { families: waiting };
            out.push(GrAction::StartTimer(Duration::from_secs(u64::from(
                restart_time.max(1),
            ))));
        }
        out
    }

    /// End-of-RIB arrived for `family`.
    pub fn end_of_rib(&mut self, family: Family) -> Vec<GrAction> {
        let Phase::AwaitingEndOfRib { mut families } = self.phase.clone() else {
            return Vec::new();
        };
        if !families.contains(family) {
            return Vec::new();
        }
        match family {
            Family::Ipv4Unicast => families.ipv4_unicast = false,
            Family::Ipv6Unicast => families.ipv6_unicast = false,
        }
        let mut out = vec![GrAction::Sweep(Some(family))];
        if families == Families::NONE {
            self.phase = Phase::Normal;
            out.push(GrAction::StopTimer);
        } else {
            self.phase = Phase::AwaitingEndOfRib { families };
        }
        out
    }

    /// The restart timer (peer did not come back) or the End-of-RIB wait expired.
    pub fn timer_expired(&mut self) -> Vec<GrAction> {
        if self.phase == Phase::Normal {
            return Vec::new();
        }
        self.phase = Phase::Normal;
        vec![GrAction::Sweep(None)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bgp_wire::GracefulRestartFamily;

    fn cap(time: u16, fams: &[(u16, u8)]) -> GracefulRestart {
        GracefulRestart {
            restart_flags: 0,
            restart_time: time,
            families: fams
                .iter()
                .map(|&(afi, flags)| GracefulRestartFamily {
                    afi,
                    safi: 1,
                    flags,
                })
                .collect(),
        }
    }

    #[test]
    fn connection_loss_keeps_routes_stale_for_the_restart_time() {
        let mut h = GrHelper::default();
        let a = h.session_down(true, Some(&cap(120, &[(1, 0x80), (2, 0x80)])));
        assert_eq!(
            a,
            vec![
                GrAction::MarkStale,
                GrAction::StartTimer(Duration::from_secs(120))
            ]
        );
        assert!(h.is_active());
    }

    #[test]
    fn notification_or_no_capability_removes_everything() {
        let mut h = GrHelper::default();
        assert!(h
            .session_down(false, Some(&cap(120, &[(1, 0x80)])))
            .contains(&GrAction::RemoveAll));
        assert!(h.session_down(true, None).contains(&GrAction::RemoveAll));
        assert!(
            h.session_down(true, Some(&cap(120, &[])))
                .contains(&GrAction::RemoveAll),
            "a GR-aware peer without families restarts nothing"
        );
        assert!(!h.is_active());
    }

    #[test]
    fn families_not_in_the_capability_are_swept_at_once() {
        let mut h = GrHelper::default();
        let a = h.session_down(true, Some(&cap(60, &[(1, 0x80)])));
        assert!(a.contains(&GrAction::Sweep(Some(Family::Ipv6Unicast))));
    }

    #[test]
    fn peer_back_with_forwarding_state_sweeps_after_end_of_rib() {
        let mut h = GrHelper::default();
        h.session_down(true, Some(&cap(60, &[(1, 0x80), (2, 0x80)])));
        let a = h.session_up(Some(&cap(60, &[(1, 0x80), (2, 0)])));
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer,
                GrAction::Sweep(Some(Family::Ipv6Unicast)),
                GrAction::StartTimer(Duration::from_secs(60))
            ],
            "IPv6 forwarding state was not preserved"
        );
        assert!(h.end_of_rib(Family::Ipv6Unicast).is_empty());
        assert_eq!(
            h.end_of_rib(Family::Ipv4Unicast),
            vec![
                GrAction::Sweep(Some(Family::Ipv4Unicast)),
                GrAction::StopTimer
            ]
        );
        assert!(!h.is_active());
    }

    #[test]
    fn no_end_of_rib_means_a_sweep_after_the_restart_time() {
        let mut h = GrHelper::default();
        h.session_down(true, Some(&cap(30, &[(1, 0x80)])));
        h.session_up(Some(&cap(30, &[(1, 0x80)])));
        assert_eq!(h.timer_expired(), vec![GrAction::Sweep(None)]);
        assert!(!h.is_active());
        assert!(h.timer_expired().is_empty());
    }

    #[test]
    fn peer_not_back_in_time_is_swept() {
        let mut h = GrHelper::default();
        h.session_down(true, Some(&cap(30, &[(1, 0x80)])));
        assert_eq!(h.timer_expired(), vec![GrAction::Sweep(None)]);
        assert!(h.session_up(Some(&cap(30, &[(1, 0x80)]))).is_empty());
    }

    #[test]
    fn peer_back_without_graceful_restart_sweeps_everything() {
        let mut h = GrHelper::default();
        h.session_down(true, Some(&cap(30, &[(1, 0x80)])));
        let a = h.session_up(None);
        assert_eq!(
            a,
            vec![
                GrAction::StopTimer,
                GrAction::Sweep(Some(Family::Ipv4Unicast))
            ]
        );
        assert!(!h.is_active());
    }
}
