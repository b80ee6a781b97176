//! Garbage collection of what the allocator's users never released: addresses whose pod is
//! gone, everything of a deleted node, empty blocks without an owner, handles without
//! addresses, and stale affinities.
//!
//! Every candidate must be seen as garbage in passes spanning the grace period before it is
//! collected, and liveness is checked again just before each release. Releases carry the
//! allocation's sequence number, so an address handed out again meanwhile is never freed.
//! Releases are rate-limited and each is logged with its reason.

use crate::metrics::Metrics;
use ipnet::IpNet;
use margay_api::{AffinityState, Store};
use margay_ipam::audit::Snapshot;
use margay_ipam::live::LiveSource;
use margay_ipam::maintenance::{self, BlockRelease};
use margay_ipam::{block, Allocator, AllocatorConfig, Clock, IpamError, ReleaseOutcome};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Why something was collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GcReason {
    /// The pod (workload) holding the address no longer exists.
    PodGone,
    /// The address, tunnel address, block or affinity belonged to a deleted node.
    NodeDeleted,
    /// A handle object with no address left in any block.
    HandleWithoutAllocations,
    /// A handle whose per-block counts disagreed with the blocks (an assignment interrupted
    /// between its handle write and its block write); the counts were corrected.
    HandleCountRepaired,
    /// An empty block that no node's confirmed affinity owns.
    EmptyBlockWithoutAffinity,
    /// An affinity that does not match its block (or has none).
    StaleAffinity,
}

impl GcReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GcReason::PodGone => "pod-gone",
            GcReason::NodeDeleted => "node-deleted",
            GcReason::HandleWithoutAllocations => "handle-without-allocations",
            GcReason::HandleCountRepaired => "handle-count-repaired",
            GcReason::EmptyBlockWithoutAffinity => "empty-block-without-affinity",
            GcReason::StaleAffinity => "stale-affinity",
        }
    }
}

impl fmt::Display for GcReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcAction {
    pub reason: GcReason,
    /// What was released, e.g. `address 10.0.0.5 (handle k8s-pod-network.abc)`.
    pub what: String,
}

/// Settings of the garbage collector.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// How long something must look like garbage before it is collected.
    pub grace: Duration,
    /// At most this many releases per pass; the rest wait for the next pass.
    pub max_releases_per_pass: usize,
    /// Pause between two releases.
    pub release_interval: Duration,
    pub clock: Clock,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace: Duration::from_secs(15 * 60),
            max_releases_per_pass: 100,
            release_interval: Duration::from_millis(20),
            clock: Clock::system(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Candidate {
    Address(IpAddr, Option<String>, Option<u64>),
    Handle(String),
    HandleCounts(String, BTreeMap<String, i64>),
    Block(IpNet),
    Affinity(String, String),
}

/// The garbage collector. Keeps, between passes, when each candidate was first seen.
pub struct GarbageCollector {
    store: Store,
    allocator: Allocator,
    cfg: GcConfig,
    first_seen: HashMap<Candidate, u64>,
    metrics: Arc<Metrics>,
}

impl GarbageCollector {
    pub fn new(store: Store, cfg: GcConfig, metrics: Arc<Metrics>) -> GarbageCollector {
        let allocator = Allocator::new(
            store.clone(),
            "margay-ipam-controller",
            AllocatorConfig {
                node_labels: Some(Default::default()),
                policy_ttl: Duration::ZERO,
                clock: cfg.clock.clone(),
                ..AllocatorConfig::default()
            },
        );
        GarbageCollector {
            store,
            allocator,
            cfg,
            first_seen: HashMap::new(),
            metrics,
        }
    }

    /// Whether `c` has been garbage for the whole grace period (recording it if new).
    fn ripe(&mut self, c: Candidate, now: u64, seen: &mut HashSet<Candidate>) -> bool {
        seen.insert(c.clone());
        let first = *self.first_seen.entry(c).or_insert(now);
        now >= first + self.cfg.grace.as_secs()
    }

    /// Whether another release may happen in this pass (and waits the release interval).
    /// Callers keep scanning when it says no, so candidates keep their first-seen time.
    async fn pace(&self, released: &mut usize) -> bool {
        if *released >= self.cfg.max_releases_per_pass {
            return false;
        }
        if *released > 0 && !self.cfg.release_interval.is_zero() {
            tokio::time::sleep(self.cfg.release_interval).await;
        }
        *released += 1;
        true
    }

    fn record(&self, actions: &mut Vec<GcAction>, reason: GcReason, what: String) {
        info!(reason = %reason, "gc: released {what}");
        self.metrics.gc_action(reason);
        actions.push(GcAction { reason, what });
    }

    /// One pass. Returns what was collected.
    pub async fn pass(&mut self, source: &dyn LiveSource) -> Result<Vec<GcAction>, IpamError> {
        let now = self.cfg.clock.now();
        let snap = Snapshot::read(&self.store).await?;
        let live = source.live().await?;
        let mut seen = HashSet::new();
        let mut actions = Vec::new();
        let mut released = 0usize;

        // 1. Addresses whose owner is gone.
        let allocs = snap.allocations();
        for a in &allocs {
            let Err(why) = live.owner_alive(a) else {
                continue;
            };
            let c = Candidate::Address(a.ip, a.handle.clone(), a.seq);
            if !self.ripe(c, now, &mut seen) {
                continue;
            }
            if source.still_alive(a).await? {
                continue;
            }
            if !self.pace(&mut released).await {
                continue;
            }
            let node_gone = a
                .attrs
                .get(margay_ipam::attr::NODE)
                .or(a.block_node.as_ref())
                .is_some_and(|n| !live.nodes.contains(n))
                || a.handle
                    .as_deref()
                    .and_then(margay_ipam::tunnel_handle_node)
                    .is_some();
            let reason = if node_gone {
                GcReason::NodeDeleted
            } else {
                GcReason::PodGone
            };
            match self
                .allocator
                .release_ips(&[(a.ip, a.seq)])
                .await?
                .as_slice()
            {
                [ReleaseOutcome::Released { handle }] => self.record(
                    &mut actions,
                    reason,
                    format!(
                        "address {} (handle {}, block {}): {why}",
                        a.ip,
                        handle.as_deref().unwrap_or("-"),
                        a.block
                    ),
                ),
                other => {
                    info!(ip = %a.ip, outcome = ?other, "gc: address changed before release; left alone")
                }
            }
        }

        // 2. Handles with no address in any block, or with wrong counts.
        let mut held: HashMap<&str, BTreeMap<String, i64>> = HashMap::new();
        for a in &allocs {
            if let Some(h) = a.handle.as_deref() {
                *held
                    .entry(h)
                    .or_default()
                    .entry(a.block.to_string())
                    .or_default() += 1;
            }
        }
        for h in &snap.handles {
            let id = h.spec.handle_id.clone();
            if let Some(actual) = held.get(id.as_str()) {
                if *actual == h.spec.block {
                    continue;
                }
                let c = Candidate::HandleCounts(id.clone(), h.spec.block.clone());
                if !self.ripe(c, now, &mut seen) || !self.pace(&mut released).await {
                    continue;
                }
                let mut fixed = h.clone();
                fixed.spec.block = actual.clone();
                match self.store.update(&fixed).await {
                    Ok(_) => self.record(
                        &mut actions,
                        GcReason::HandleCountRepaired,
                        format!(
                            "handle {id}: counts {:?} corrected to {:?}",
                            h.spec.block, actual
                        ),
                    ),
                    Err(e) if e.is_conflict() || e.is_not_found() => {}
                    Err(e) => {
                        return Err(IpamError::Store {
                            what: format!("repair handle {id}"),
                            source: e,
                        })
                    }
                }
                continue;
            }
            if !self.ripe(Candidate::Handle(id.clone()), now, &mut seen) {
                continue;
            }
            if !self.pace(&mut released).await {
                continue;
            }
            // Deletes on the revision read; a handle written meanwhile is left alone.
            match self.store.delete(h).await {
                Ok(()) => self.record(
                    &mut actions,
                    GcReason::HandleWithoutAllocations,
                    format!("handle {id}"),
                ),
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("delete handle {id}"),
                        source: e,
                    })
                }
            }
        }

        // 3. Empty blocks of deleted nodes, and empty blocks no confirmed affinity owns.
        let confirmed: HashSet<(&str, &str)> = snap
            .affinities
            .iter()
            .filter(|a| a.spec.state == AffinityState::Confirmed)
            .map(|a| (a.spec.node.as_str(), a.spec.cidr.as_str()))
            .collect();
        for b in &snap.blocks {
            let Some(cidr) = b.spec.network() else {
                continue;
            };
            if !block::is_empty(&b.spec) {
                continue;
            }
            let reason = match b.spec.affine_node() {
                Some(n) if !live.nodes.contains(n) => GcReason::NodeDeleted,
                Some(n) if confirmed.contains(&(n, b.spec.cidr.as_str())) => continue,
                _ => GcReason::EmptyBlockWithoutAffinity,
            };
            if !self.ripe(Candidate::Block(cidr), now, &mut seen) {
                continue;
            }
            if !self.pace(&mut released).await {
                continue;
            }
            match maintenance::release_block(&self.store, &cidr, 5).await? {
                BlockRelease::Released => self.record(
                    &mut actions,
                    reason,
                    format!(
                        "block {cidr} (owner {})",
                        b.spec.affinity.as_deref().unwrap_or("none")
                    ),
                ),
                BlockRelease::NotEmpty | BlockRelease::Gone => {}
            }
        }

        // 4. Affinities that do not match their block, or whose node is gone.
        let blocks: HashMap<&str, Option<&str>> = snap
            .blocks
            .iter()
            .map(|b| (b.spec.cidr.as_str(), b.spec.affine_node()))
            .collect();
        for a in &snap.affinities {
            let stale = match blocks.get(a.spec.cidr.as_str()) {
                None => true,
                Some(owner) => *owner != Some(a.spec.node.as_str()),
            };
            let node_gone =
                !live.nodes.contains(&a.spec.node) && !blocks.contains_key(a.spec.cidr.as_str());
            if !stale && !node_gone {
                continue;
            }
            let c = Candidate::Affinity(a.spec.node.clone(), a.spec.cidr.clone());
            if !self.ripe(c, now, &mut seen) {
                continue;
            }
            if !self.pace(&mut released).await {
                continue;
            }
            if maintenance::delete_affinity(&self.store, a).await? {
                let reason = if node_gone {
                    GcReason::NodeDeleted
                } else {
                    GcReason::StaleAffinity
                };
                self.record(
                    &mut actions,
                    reason,
                    format!(
                        "{:?} affinity of node {} for block {}",
                        a.spec.state, a.spec.node, a.spec.cidr
                    ),
                );
            }
        }

        // Forget candidates that are no longer garbage: their clock starts again if they
        // become garbage later.
        self.first_seen.retain(|c, _| seen.contains(c));
        if released >= self.cfg.max_releases_per_pass {
            warn!(
                limit = self.cfg.max_releases_per_pass,
                "gc: release limit of this pass reached; the rest waits for the next pass"
            );
        }
        self.metrics
            .observe_snapshot(&Snapshot::read(&self.store).await?, now);
        Ok(actions)
    }
}
