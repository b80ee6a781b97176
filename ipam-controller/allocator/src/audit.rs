//! A consistent picture of the allocator's records, the consistency check behind
//! `margayctl ipam check` and the GC, and the usage figures behind `margayctl ipam show` and the
//! controller's metrics.

use crate::block;
use crate::error::{IpamError, Result};
use crate::pool;
use ipnet::IpNet;
use margay_api::{
    AffinityState, BlockAffinity, IPAMBlock, IPAMHandle, IPPool, IPReservation, Node, Store,
    WorkloadEndpoint,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

/// Every allocator record, read at one moment (each kind listed once).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pools: Vec<IPPool>,
    pub blocks: Vec<IPAMBlock>,
    pub affinities: Vec<BlockAffinity>,
    pub handles: Vec<IPAMHandle>,
    pub reserved: Vec<IpNet>,
}

impl Snapshot {
    /// What `margayctl ipam show` needs, every kind read at once: pools, blocks, affinities
    /// and reservations, in the time of the slowest listing rather than the sum. Handles are
    /// not read (`handles` is empty: blocks name their owners), and the kinds may be read a
    /// moment apart. Never for checks or collection: those use [`Snapshot::read`], which reads
    /// everything, blocks before the handles they name.
    pub async fn read_for_display(store: &Store) -> Result<Snapshot> {
        let (pools, blocks, affinities, res) = tokio::try_join!(
            async {
                store
                    .list_lenient::<IPPool>()
                    .await
                    .map_err(IpamError::store("list IPPools"))
            },
            async {
                store
                    .list::<IPAMBlock>()
                    .await
                    .map_err(IpamError::store("list IPAMBlocks"))
            },
            async {
                store
                    .list::<BlockAffinity>()
                    .await
                    .map_err(IpamError::store("list BlockAffinities"))
            },
            async {
                store
                    .list::<IPReservation>()
                    .await
                    .map_err(IpamError::store("list IPReservations"))
            },
        )?;
        for (_, e) in &pools.undecodable {
            tracing::warn!(error = %e, "leaving out an IP pool that does not decode");
        }
        Ok(Snapshot {
            pools: pools.items,
            blocks: blocks.0,
            affinities: affinities.0,
            handles: Vec::new(),
            reserved: res.0.iter().flat_map(|r| r.spec.networks()).collect(),
        })
    }

    /// Every kind, blocks read before the handles they name: what checks and collection rely on.
    pub async fn read(store: &Store) -> Result<Snapshot> {
        // A pool that does not decode is left out: the controller marks it, and nothing here
        // decides from pools what to release.
        let listed = store
            .list_lenient::<IPPool>()
            .await
            .map_err(IpamError::store("list IPPools"))?;
        for (_, e) in &listed.undecodable {
            tracing::warn!(error = %e, "leaving out an IP pool that does not decode");
        }
        let pools = listed.items;
        let (blocks, _) = store
            .list::<IPAMBlock>()
            .await
            .map_err(IpamError::store("list IPAMBlocks"))?;
        let (affinities, _) = store
            .list::<BlockAffinity>()
            .await
            .map_err(IpamError::store("list BlockAffinities"))?;
        let (handles, _) = store
            .list::<IPAMHandle>()
            .await
            .map_err(IpamError::store("list IPAMHandles"))?;
        let (res, _) = store
            .list::<IPReservation>()
            .await
            .map_err(IpamError::store("list IPReservations"))?;
        Ok(Snapshot {
            pools,
            blocks,
            affinities,
            handles,
            reserved: res.iter().flat_map(|r| r.spec.networks()).collect(),
        })
    }

    /// Every allocated address.
    pub fn allocations(&self) -> Vec<Allocation> {
        let mut out = Vec::new();
        for b in &self.blocks {
            let Some(cidr) = b.spec.network() else {
                continue;
            };
            for o in 0..b.spec.allocations.len() as u32 {
                if let Some(a) = block::owner(&b.spec, o) {
                    out.push(Allocation {
                        ip: block::ip_of(&cidr, o),
                        block: cidr,
                        handle: a.handle_id.clone(),
                        attrs: a.secondary.clone(),
                        seq: block::sequence_of(&b.spec, o),
                        block_node: b.spec.affine_node().map(str::to_owned),
                    });
                }
            }
        }
        out
    }

    fn pool_of(&self, cidr: &IpNet) -> Option<&IPPool> {
        self.pools
            .iter()
            .find(|p| p.spec.network().is_some_and(|n| n.contains(cidr)))
    }
}

/// One allocated address and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub block: IpNet,
    pub handle: Option<String>,
    pub attrs: BTreeMap<String, String>,
    pub seq: Option<u64>,
    /// The node the block is affine to.
    pub block_node: Option<String>,
}

/// Who is alive, as the controller or `margayctl` learned it.
#[derive(Debug, Clone, Default)]
pub struct LiveSet {
    /// Existing nodes.
    pub nodes: HashSet<String>,
    /// Handles of live workloads (etcd mode: the WorkloadEndpoints' handle IDs).
    pub handles: HashSet<String>,
    /// Kubernetes mode: live pods by (namespace, name), with their addresses (empty while the
    /// pod has none reported yet).
    pub pods: Option<HashMap<(String, String), Vec<IpAddr>>>,
}

impl LiveSet {
    /// Liveness as the datastore records it (etcd mode): the WorkloadEndpoints the CNI plugin
    /// writes for each pod, and Margay's Node objects.
    pub async fn from_store(store: &Store) -> Result<LiveSet> {
        let (weps, _) = store
            .list::<WorkloadEndpoint>()
            .await
            .map_err(IpamError::store("list WorkloadEndpoints"))?;
        let (nodes, _) = store
            .list::<Node>()
            .await
            .map_err(IpamError::store("list Nodes"))?;
        Ok(LiveSet {
            nodes: nodes.into_iter().filter_map(|n| n.metadata.name).collect(),
            handles: weps.into_iter().map(|w| w.spec.handle_id).collect(),
            pods: None,
        })
    }

    /// Whether the owner of `a` is alive; `Err` says why not.
    pub fn owner_alive(&self, a: &Allocation) -> std::result::Result<(), String> {
        let Some(h) = &a.handle else {
            return Err("the allocation has no handle".into());
        };
        if let Some(node) = crate::tunnel_handle_node(h) {
            return if self.nodes.contains(node) {
                Ok(())
            } else {
                Err(format!(
                    "tunnel address of node {node}, which no longer exists"
                ))
            };
        }
        if self.handles.contains(h) {
            return Ok(());
        }
        if let Some(pods) = &self.pods {
            let ns = a.attrs.get(crate::attr::NAMESPACE);
            let pod = a.attrs.get(crate::attr::POD);
            if let (Some(ns), Some(pod)) = (ns, pod) {
                return match pods.get(&(ns.clone(), pod.clone())) {
                    Some(ips) if ips.is_empty() || ips.contains(&a.ip) => Ok(()),
                    Some(_) => Err(format!(
                        "pod {ns}/{pod} exists but no longer has this address"
                    )),
                    None => Err(format!("pod {ns}/{pod} no longer exists")),
                };
            }
        }
        Err(format!("no live workload holds handle {h}"))
    }
}

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Allocated to an owner that is gone.
    Leaked {
        ip: IpAddr,
        block: IpNet,
        handle: Option<String>,
        reason: String,
    },
    /// A handle object whose blocks hold nothing for it.
    HandleWithoutAllocations { handle: String },
    /// A handle whose count for a block differs from the block's allocations.
    HandleCountMismatch {
        handle: String,
        block: String,
        recorded: i64,
        actual: i64,
    },
    /// An allocation whose handle object does not exist.
    AllocationWithoutHandle {
        ip: IpAddr,
        block: IpNet,
        handle: Option<String>,
    },
    /// An address held in two places (overlapping blocks) or a block claimed by two nodes.
    DuplicateOwnership { what: String, holders: Vec<String> },
    /// An affinity that does not match its block.
    StaleAffinity {
        node: String,
        cidr: String,
        state: AffinityState,
        reason: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Leaked {
                ip,
                block,
                handle,
                reason,
            } => write!(
                f,
                "leaked address {ip} (block {block}, handle {}): {reason}",
                handle.as_deref().unwrap_or("-")
            ),
            Finding::HandleWithoutAllocations { handle } => {
                write!(f, "handle {handle} holds no address in any block")
            }
            Finding::HandleCountMismatch {
                handle,
                block,
                recorded,
                actual,
            } => write!(
                f,
                "handle {handle} records {recorded} addresses in block {block}, the block has {actual}"
            ),
            Finding::AllocationWithoutHandle { ip, block, handle } => write!(
                f,
                "address {ip} (block {block}) is allocated to handle {} which does not exist",
                handle.as_deref().unwrap_or("<none>")
            ),
            Finding::DuplicateOwnership { what, holders } => {
                write!(f, "{what} is held by {}", holders.join(" and "))
            }
            Finding::StaleAffinity {
                node,
                cidr,
                state,
                reason,
            } => write!(f, "stale {state:?} affinity of node {node} for {cidr}: {reason}"),
        }
    }
}

impl Finding {
    /// A short machine-readable kind, for metrics and JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::Leaked { .. } => "leaked",
            Finding::HandleWithoutAllocations { .. } => "handle-without-allocations",
            Finding::HandleCountMismatch { .. } => "handle-count-mismatch",
            Finding::AllocationWithoutHandle { .. } => "allocation-without-handle",
            Finding::DuplicateOwnership { .. } => "duplicate-ownership",
            Finding::StaleAffinity { .. } => "stale-affinity",
        }
    }
}

/// Checks the snapshot. Without `live`, leaks cannot be told and are not reported.
pub fn check(snap: &Snapshot, live: Option<&LiveSet>) -> Vec<Finding> {
    let mut out = Vec::new();
    let allocs = snap.allocations();

    // Duplicate ownership: one address in two blocks, or one block claimed by two nodes.
    let mut by_ip: HashMap<IpAddr, Vec<&Allocation>> = HashMap::new();
    for a in &allocs {
        by_ip.entry(a.ip).or_default().push(a);
    }
    let mut dups: Vec<_> = by_ip.iter().filter(|(_, v)| v.len() > 1).collect();
    dups.sort_by_key(|(ip, _)| **ip);
    for (ip, v) in dups {
        out.push(Finding::DuplicateOwnership {
            what: format!("address {ip}"),
            holders: v
                .iter()
                .map(|a| {
                    format!(
                        "handle {} in block {}",
                        a.handle.as_deref().unwrap_or("-"),
                        a.block
                    )
                })
                .collect(),
        });
    }
    let mut confirmed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in &snap.affinities {
        if a.spec.state == AffinityState::Confirmed {
            confirmed
                .entry(&a.spec.cidr)
                .or_default()
                .push(&a.spec.node);
        }
    }
    for (cidr, nodes) in &confirmed {
        if nodes.len() > 1 {
            out.push(Finding::DuplicateOwnership {
                what: format!("block {cidr}"),
                holders: nodes.iter().map(|n| format!("node {n}")).collect(),
            });
        }
    }

    // Handles against allocations.
    let mut actual: BTreeMap<&str, BTreeMap<String, i64>> = BTreeMap::new();
    for a in &allocs {
        if let Some(h) = &a.handle {
            *actual
                .entry(h.as_str())
                .or_default()
                .entry(a.block.to_string())
                .or_default() += 1;
        }
    }
    let handles: HashMap<&str, &IPAMHandle> = snap
        .handles
        .iter()
        .map(|h| (h.spec.handle_id.as_str(), h))
        .collect();
    for h in &snap.handles {
        let id = h.spec.handle_id.as_str();
        match actual.get(id) {
            None => out.push(Finding::HandleWithoutAllocations { handle: id.into() }),
            Some(counts) => {
                let keys: std::collections::BTreeSet<&String> =
                    counts.keys().chain(h.spec.block.keys()).collect();
                for k in keys {
                    let recorded = h.spec.block.get(k).copied().unwrap_or(0);
                    let act = counts.get(k).copied().unwrap_or(0);
                    if recorded != act {
                        out.push(Finding::HandleCountMismatch {
                            handle: id.into(),
                            block: k.clone(),
                            recorded,
                            actual: act,
                        });
                    }
                }
            }
        }
    }
    for a in &allocs {
        let has = a.handle.as_deref().is_some_and(|h| handles.contains_key(h));
        if !has {
            out.push(Finding::AllocationWithoutHandle {
                ip: a.ip,
                block: a.block,
                handle: a.handle.clone(),
            });
        }
    }

    // Affinities against blocks.
    let blocks: HashMap<&str, &IPAMBlock> = snap
        .blocks
        .iter()
        .map(|b| (b.spec.cidr.as_str(), b))
        .collect();
    for a in &snap.affinities {
        let reason = match blocks.get(a.spec.cidr.as_str()) {
            None => Some("the block does not exist".to_owned()),
            Some(b) if b.spec.affine_node() != Some(a.spec.node.as_str()) => Some(format!(
                "the block is affine to {}",
                b.spec.affinity.as_deref().unwrap_or("no node")
            )),
            Some(_) if a.spec.state != AffinityState::Confirmed => {
                Some("the claim was never completed".into())
            }
            Some(_) => None,
        };
        let reason = match (reason, live) {
            (None, Some(l)) if !l.nodes.contains(&a.spec.node) => {
                Some("the node no longer exists".into())
            }
            (r, _) => r,
        };
        if let Some(reason) = reason {
            out.push(Finding::StaleAffinity {
                node: a.spec.node.clone(),
                cidr: a.spec.cidr.clone(),
                state: a.spec.state,
                reason,
            });
        }
    }

    // Leaks.
    if let Some(live) = live {
        for a in &allocs {
            if let Err(reason) = live.owner_alive(a) {
                out.push(Finding::Leaked {
                    ip: a.ip,
                    block: a.block,
                    handle: a.handle.clone(),
                    reason,
                });
            }
        }
    }
    out
}

/// Use of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: String,
    pub disabled: bool,
    pub blocks: usize,
    /// Addresses in the pool.
    pub size: u128,
    pub allocated: u64,
}

/// Use of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    pub cidr: IpNet,
    pub pool: Option<String>,
    /// `host:<node>` owner, if any.
    pub owner: Option<String>,
    /// The owner's affinity state (None when no affinity object matches).
    pub affinity_state: Option<AffinityState>,
    pub size: u64,
    pub allocated: u64,
    /// Free and not excluded (reservations, network/broadcast).
    pub available: u64,
}

pub fn pool_usage(snap: &Snapshot) -> Vec<PoolUsage> {
    let mut out: Vec<PoolUsage> = snap
        .pools
        .iter()
        .map(|p| {
            let net = p.spec.network();
            let blocks: Vec<&IPAMBlock> = snap
                .blocks
                .iter()
                .filter(|b| {
                    b.spec
                        .network()
                        .zip(net)
                        .is_some_and(|(c, n)| n.contains(&c))
                })
                .collect();
            PoolUsage {
                name: p.metadata.name.clone().unwrap_or_default(),
                cidr: p.spec.cidr.clone(),
                disabled: p.spec.disabled,
                blocks: blocks.len(),
                size: net
                    .map(|n| {
                        let bits = u32::from(n.max_prefix_len() - n.prefix_len());
                        if bits >= 128 {
                            u128::MAX
                        } else {
                            1u128 << bits
                        }
                    })
                    .unwrap_or(0),
                allocated: blocks
                    .iter()
                    .map(|b| block::allocated_count(&b.spec) as u64)
                    .sum(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn block_usage(snap: &Snapshot, now: u64) -> Vec<BlockUsage> {
    let mut out: Vec<BlockUsage> = snap
        .blocks
        .iter()
        .filter_map(|b| {
            let cidr = b.spec.network()?;
            let pool = snap.pool_of(&cidr);
            let excl = block::Exclusions {
                reserved: snap.reserved.clone(),
                avoid_network_and_broadcast: pool
                    .is_some_and(|p| p.spec.avoid_block_network_and_broadcast),
            };
            let state = b.spec.affine_node().and_then(|n| {
                snap.affinities
                    .iter()
                    .find(|a| a.spec.node == n && a.spec.cidr == b.spec.cidr)
                    .map(|a| a.spec.state)
            });
            Some(BlockUsage {
                cidr,
                pool: pool.and_then(|p| p.metadata.name.clone()),
                owner: b.spec.affinity.clone(),
                affinity_state: state,
                size: block::block_size(&cidr),
                allocated: block::allocated_count(&b.spec) as u64,
                available: block::available(&b.spec, &cidr, &excl, now).count() as u64,
            })
        })
        .collect();
    out.sort_by_key(|b| b.cidr);
    out
}

/// What is known about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    pub ip: IpAddr,
    pub pool: Option<String>,
    pub block: Option<IpNet>,
    pub block_owner: Option<String>,
    /// The allocation, if the address is allocated.
    pub allocation: Option<Allocation>,
}

pub fn find_address(snap: &Snapshot, ip: IpAddr) -> AddressInfo {
    let pool = snap
        .pools
        .iter()
        .find(|p| p.spec.network().is_some_and(|n| n.contains(&ip)));
    let blk = snap
        .blocks
        .iter()
        .find(|b| b.spec.network().is_some_and(|c| c.contains(&ip)));
    let allocation = blk.and_then(|b| {
        let cidr = b.spec.network()?;
        let o = block::ordinal_of(&cidr, &ip)?;
        let a = block::owner(&b.spec, o)?;
        Some(Allocation {
            ip,
            block: cidr,
            handle: a.handle_id.clone(),
            attrs: a.secondary.clone(),
            seq: block::sequence_of(&b.spec, o),
            block_node: b.spec.affine_node().map(str::to_owned),
        })
    });
    AddressInfo {
        ip,
        pool: pool.and_then(|p| p.metadata.name.clone()),
        block: blk.and_then(|b| b.spec.network()),
        block_owner: blk.and_then(|b| b.spec.affinity.clone()),
        allocation,
    }
}

/// The pool view of a block's pool, for callers that need its block size.
pub fn pool_view_of(snap: &Snapshot, ip: &IpAddr) -> Option<pool::PoolView> {
    snap.pools
        .iter()
        .filter_map(|p| pool::view(p, false))
        .find(|p| p.net.contains(ip))
}
