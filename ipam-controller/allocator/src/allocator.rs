//! The allocator: assigns and releases addresses for one node over any datastore backend.
//!
//! Write order (`docs/ipam.md` lists what a crash between any two writes leaves and who cleans
//! it up). Where the store commits atomically ([`Store::atomic_commit`]: memory, etcd), the
//! writes of one step below are one commit; otherwise (Kubernetes) they are made in the order
//! given, each one compare-and-swap, and the order is what keeps every crash state safe:
//!
//! - assign in a block with room: (1) handle create/update with the block's count,
//!   (2) block update with the allocation. The handle comes first so that every allocation
//!   always has a handle naming its block, and release-by-handle can find it.
//! - claim a block: (1) BlockAffinity `Pending`, (2) IPAMBlock create with the affinity,
//!   (3) BlockAffinity `Confirmed`. The block create arbitrates between competing nodes. One
//!   commit makes it a create of the `Confirmed` affinity with the block; an affinity left by an
//!   interrupted claim is finished by the ordered steps.
//! - release by address: (1) block update freeing the ordinals, (2) handle decrement (delete at
//!   zero). Release by handle: (1) every block of the handle, (2) handle delete.

use crate::block::{self, Exclusions, Released, SpecificRefusal};
use crate::clock::{self, Clock};
use crate::error::{Family, IpamError, Result};
use crate::pool::{self, AddressUse, PoolView};
use ipnet::IpNet;
use margay_api::names;
use margay_api::store::MAX_COMMIT_WRITES;
use margay_api::{
    AffinityState, AllocationAttribute, BlockAffinity, BlockAffinitySpec, Commit, IPAMBlock,
    IPAMBlockSpec, IPAMConfig, IPAMConfigSpec, IPAMHandle, IPAMHandleSpec, IPPool, IPReservation,
    Kind, Node, Reads, Store, IPAM_CONFIG_NAME,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

/// The most objects read in one batch (etcd allows 128 operations per transaction).
const READ_BATCH: usize = 100;

/// Settings of one allocator.
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// The node's labels, for pools' nodeSelector. `None`: read them from the Node object.
    pub node_labels: Option<BTreeMap<String, String>>,
    /// Bound on compare-and-swap retries of one write.
    pub max_attempts: u32,
    /// How old another node's empty block must be (since its claim) before this node may take
    /// it over when its pools have no unclaimed block left.
    pub reclaim_after: Duration,
    /// How long pools, IPAMConfig and reservations read from the store are reused. Zero reads
    /// them on every request (the CNI plugin makes a new allocator per call anyway).
    pub policy_ttl: Duration,
    pub clock: Clock,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            node_labels: None,
            max_attempts: 10,
            reclaim_after: Duration::from_secs(15 * 60),
            policy_ttl: Duration::from_secs(2),
            clock: Clock::system(),
        }
    }
}

/// One allocation request. At least one of `num_v4`, `num_v6`, `addresses` must ask for
/// something.
#[derive(Debug, Clone, Default)]
pub struct AssignRequest {
    /// The owner: `k8s-pod-network.<containerID>` for pods (see [`crate::pod_handle`]).
    pub handle_id: String,
    /// Facts stored with each address: namespace, pod, node, type.
    pub attrs: BTreeMap<String, String>,
    pub num_v4: u32,
    pub num_v6: u32,
    /// Pools by name or CIDR; empty: every pool that fits the node and the use.
    pub pools: Vec<String>,
    pub use_: AddressUse,
    /// Specific addresses (the `ipAddrs` annotation); each fails clearly if taken.
    pub addresses: Vec<IpAddr>,
}

/// One address handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedAddress {
    pub ip: IpAddr,
    pub block: IpNet,
    pub pool: String,
    /// The sequence number of this allocation; a release naming it frees exactly this
    /// allocation and never a later one of the same address.
    pub seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub addresses: Vec<AssignedAddress>,
}

/// What releasing one address did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Freed; it was held by this handle.
    Released { handle: Option<String> },
    /// The address was not allocated (or its block does not exist).
    NotAllocated,
    /// The address was handed out again since; the stale release freed nothing.
    Stale { current: u64 },
}

/// The settings the allocator reads from the store, cached for `policy_ttl`.
#[derive(Debug, Clone)]
struct Policy {
    pools: Vec<IPPool>,
    config: IPAMConfigSpec,
    reserved: Vec<IpNet>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct NodeState {
    /// This node's confirmed blocks, as last read or written. `None` until loaded.
    blocks: Option<BTreeMap<IpNet, IPAMBlock>>,
    policy: Option<(Instant, Arc<Policy>)>,
    /// This node's affinities, read with the policy when the blocks were not loaded yet (one
    /// round trip instead of two); taken by the block load that follows.
    affinities: Option<Vec<BlockAffinity>>,
    /// Blocks read in the same batch by [`Allocator::prefetch`], by the caller's guess of this
    /// node's blocks; they stand in for the block load when they cover the affinities.
    hinted: Option<BTreeMap<IpNet, Option<IPAMBlock>>>,
    /// A handle written ahead by [`Allocator::prepare_handle`], taken by the request of that
    /// handle.
    prepared: Option<HandleTx>,
}

/// The allocator of one node. Cheap to clone; clones share the cache and the node lock, so
/// requests of one process for one node never race each other (other processes and nodes are
/// kept apart by compare-and-swap).
#[derive(Debug, Clone)]
pub struct Allocator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    node: String,
    cfg: AllocatorConfig,
    state: Mutex<NodeState>,
}

/// The handle of one request, with the counts written to it ahead of block writes.
#[derive(Debug)]
struct HandleTx {
    id: String,
    name: String,
    obj: Option<IPAMHandle>,
    /// Counts added to the handle for allocations whose block write has not succeeded yet.
    pending: BTreeMap<String, i64>,
}

impl HandleTx {
    fn new(id: &str) -> HandleTx {
        HandleTx {
            id: id.to_owned(),
            name: names::handle_name(id),
            obj: None,
            pending: BTreeMap::new(),
        }
    }
}

enum BlockMode {
    /// One of this node's blocks: give up if its affinity changed.
    Affine,
    /// Borrowing from another node's (or no node's) block.
    Borrow,
}

fn attribute(handle: &str, attrs: &BTreeMap<String, String>) -> AllocationAttribute {
    AllocationAttribute {
        handle_id: Some(handle.to_owned()),
        secondary: attrs.clone(),
    }
}

/// A short pause before retrying after a conflict, growing with the attempt, with jitter so
/// that competing writers spread out.
async fn backoff(attempt: u32) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let base = 1u64 << attempt.min(6);
    let ms = base + u64::from(nanos) % (base + 1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Allocator {
    pub fn new(store: Store, node: impl Into<String>, config: AllocatorConfig) -> Allocator {
        Allocator {
            inner: Arc::new(Inner {
                store,
                node: node.into(),
                cfg: config,
                state: Mutex::new(NodeState::default()),
            }),
        }
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    fn now(&self) -> u64 {
        self.inner.cfg.clock.now()
    }

    fn max_attempts(&self) -> u32 {
        self.inner.cfg.max_attempts.max(1)
    }

    /// Reads the settings (pools, IPAMConfig, reservations, the node's labels), this node's
    /// affinities and the blocks `blocks` (the caller's guess of this node's blocks, from its
    /// last request) now, in one batch, so that a request that follows within `policy_ttl`
    /// reads no more than it must write.
    ///
    /// A caller that serialises requests with a lock of its own (the CNI plugin's per-node file
    /// lock) calls this before taking it: the reads then happen while it waits, not while it
    /// holds the lock. If another holder of that lock may have written meanwhile, the caller
    /// calls [`Allocator::forget_prefetched_blocks`] once it holds the lock. Anything else that
    /// changed a block since (another node borrowing, the controller) is caught by the
    /// compare-and-swap of the write, which reads the block again. Affinities read this early
    /// may miss a block another process claimed; a request that finds its known blocks full
    /// reads them again before it claims one.
    pub async fn prefetch(&self, blocks: &[IpNet]) -> Result<()> {
        let mut st = self.inner.state.lock().await;
        self.policy_with(&mut st, blocks).await.map(drop)
    }

    /// Where the store has no commit across objects (Kubernetes), the handle of a request is a
    /// write of its own ahead of the block write. This writes it before the request, counting
    /// one allocation in `block` (the caller's guess of where the address will be, e.g. the
    /// block its last request used), so that it can happen while the caller waits for its node
    /// lock: a request of `handle_id` that then takes an address in `block` writes only the
    /// block. A wrong guess costs the request one more handle write, and a count the request
    /// does not use is taken back by the request, so the handle counts only what it holds.
    ///
    /// Returns whether the handle was written. It is not when the store commits atomically
    /// (the handle then costs nothing) and when the handle already exists (a repeated request:
    /// it is read and updated under the lock as always). The caller must not run another
    /// request of the same handle concurrently (the CNI runtime never does). A handle left
    /// alone by a caller that dies first holds no address, and the controller deletes it.
    pub async fn prepare_handle(&self, handle_id: &str, block: IpNet) -> Result<bool> {
        let store = &self.inner.store;
        if store.atomic_commit() || handle_id.is_empty() {
            return Ok(false);
        }
        let mut h = HandleTx::new(handle_id);
        let key = block.to_string();
        let obj = IPAMHandle::new(
            &h.name,
            IPAMHandleSpec {
                handle_id: h.id.clone(),
                block: BTreeMap::from([(key.clone(), 1)]),
                deleted: false,
            },
        );
        match store.create(&obj).await {
            Ok(written) => {
                h.obj = Some(written);
                h.pending.insert(key, 1);
                self.inner.state.lock().await.prepared = Some(h);
                Ok(true)
            }
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(IpamError::Store {
                what: format!("write handle {handle_id}"),
                source: e,
            }),
        }
    }

    /// Drops the blocks [`Allocator::prefetch`] read: they are to be read again.
    pub async fn forget_prefetched_blocks(&self) {
        self.inner.state.lock().await.hinted = None;
    }

    /// The CIDRs of this node's blocks as last read or written (empty before a request).
    pub async fn known_blocks(&self) -> Vec<IpNet> {
        let st = self.inner.state.lock().await;
        st.blocks
            .as_ref()
            .map(|b| b.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets cached blocks and settings; the next request reads them again.
    pub async fn invalidate(&self) {
        let mut st = self.inner.state.lock().await;
        *st = NodeState::default();
    }

    // ===== policy =====

    async fn policy(&self, st: &mut NodeState) -> Result<Arc<Policy>> {
        self.policy_with(st, &[]).await
    }

    /// [`Self::policy`], with the blocks `hint` in the same batch when the affinities are read.
    async fn policy_with(&self, st: &mut NodeState, hint: &[IpNet]) -> Result<Arc<Policy>> {
        if let Some((at, p)) = &st.policy {
            if at.elapsed() < self.inner.cfg.policy_ttl {
                return Ok(p.clone());
            }
        }
        // One batch: the pools, the IPAM settings, the reservations, the node's labels when
        // they are not given, and this node's affinities when its blocks are still to be read.
        let node = &self.inner.node;
        let want_labels = self.inner.cfg.node_labels.is_none();
        let want_affinities = st.blocks.is_none();
        let mut reads = Reads::new()
            .list::<IPPool>()
            .get::<IPAMConfig>(IPAM_CONFIG_NAME)
            .list::<IPReservation>();
        if want_labels {
            reads = reads.get::<Node>(node);
        }
        let hint: &[IpNet] = if want_affinities { hint } else { &[] };
        if want_affinities {
            reads = reads.list_prefix::<BlockAffinity>(&names::affinity_prefix(node));
        }
        for cidr in hint {
            reads = reads.get::<IPAMBlock>(&names::block_name(cidr));
        }
        let what =
            "read the IP pools, IPAMConfig default, IPReservations, Node and BlockAffinities";
        let mut set = self
            .inner
            .store
            .read(reads)
            .await
            .map_err(IpamError::store(what))?;
        let listed = set
            .list_lenient::<IPPool>(0)
            .map_err(IpamError::store(what))?;
        for (_, e) in &listed.undecodable {
            warn!(error = %e, "skipping an IP pool that does not decode; fix or delete it");
        }
        let pools = listed.items;
        let config = set
            .get::<IPAMConfig>(1)
            .map_err(IpamError::store(what))?
            .map(|c| c.spec)
            .unwrap_or_default();
        let (reservations, _) = set
            .list::<IPReservation>(2)
            .map_err(IpamError::store(what))?;
        let reserved = reservations
            .iter()
            .flat_map(|r| r.spec.networks())
            .collect();
        let labels = match &self.inner.cfg.node_labels {
            Some(l) => l.clone(),
            None => set
                .get::<Node>(3)
                .map_err(IpamError::store(what))?
                .and_then(|n| n.metadata.labels)
                .unwrap_or_default(),
        };
        if want_affinities {
            let i = if want_labels { 4 } else { 3 };
            let (affs, _) = set
                .list::<BlockAffinity>(i)
                .map_err(IpamError::store(what))?;
            st.affinities = Some(affs.into_iter().filter(|a| a.spec.node == *node).collect());
            let mut hinted = BTreeMap::new();
            for (k, cidr) in hint.iter().enumerate() {
                let b = set
                    .get::<IPAMBlock>(i + 1 + k)
                    .map_err(IpamError::store(format!("read block {cidr}")))?;
                hinted.insert(*cidr, b);
            }
            st.hinted = (!hint.is_empty()).then_some(hinted);
        }
        let p = Arc::new(Policy {
            pools,
            config,
            reserved,
            labels,
        });
        st.policy = Some((Instant::now(), p.clone()));
        Ok(p)
    }

    /// This node's affinities (not those of nodes whose names share the prefix).
    async fn my_affinities(&self) -> Result<Vec<BlockAffinity>> {
        let node = &self.inner.node;
        let (affs, _) = self
            .inner
            .store
            .list_prefix::<BlockAffinity>(&names::affinity_prefix(node))
            .await
            .map_err(IpamError::store("list this node's BlockAffinities"))?;
        Ok(affs.into_iter().filter(|a| a.spec.node == *node).collect())
    }

    fn exclusions(policy: &Policy, pool: Option<&PoolView>) -> Exclusions {
        Exclusions {
            reserved: policy.reserved.clone(),
            avoid_network_and_broadcast: pool.is_some_and(|p| p.avoid_network_and_broadcast),
        }
    }

    /// The pool view for a block, among all pools (for exclusions when borrowing or
    /// releasing).
    fn pool_of_block(policy: &Policy, cidr: &IpNet) -> Option<PoolView> {
        policy
            .pools
            .iter()
            .filter_map(|p| pool::view(p, policy.config.strict_affinity))
            .find(|p| p.net.contains(cidr))
    }

    // ===== this node's blocks =====

    /// Loads this node's blocks, finishing or undoing what an interrupted claim left behind.
    async fn my_blocks<'a>(
        &self,
        st: &'a mut NodeState,
        policy: &Policy,
    ) -> Result<&'a mut BTreeMap<IpNet, IPAMBlock>> {
        if st.blocks.is_none() {
            let affs = match st.affinities.take() {
                Some(a) => a,
                None => self.my_affinities().await?,
            };
            let hinted = st.hinted.take();
            let blocks = match hinted.and_then(|h| self.blocks_from_hint(&affs, h)) {
                Some(b) => b,
                None => self.load_blocks(policy, affs).await?,
            };
            st.blocks = Some(blocks);
        }
        Ok(st.blocks.get_or_insert_with(BTreeMap::new))
    }

    /// This node's blocks from the prefetched ones, when they are exactly what the affinities
    /// say this node holds, all confirmed; else `None`, and the blocks are loaded (which also
    /// finishes interrupted claims).
    fn blocks_from_hint(
        &self,
        affs: &[BlockAffinity],
        mut hinted: BTreeMap<IpNet, Option<IPAMBlock>>,
    ) -> Option<BTreeMap<IpNet, IPAMBlock>> {
        let node = self.inner.node.as_str();
        let mut out = BTreeMap::new();
        let mut held = 0;
        for a in affs {
            if a.spec.node != node || a.spec.state == AffinityState::PendingDeletion {
                continue;
            }
            if a.spec.state != AffinityState::Confirmed {
                return None;
            }
            held += 1;
            let cidr: IpNet = a.spec.cidr.parse().ok()?;
            let b = hinted.remove(&cidr)??;
            if b.spec.affine_node() != Some(node) {
                return None;
            }
            if !b.spec.deleted {
                out.insert(cidr, b);
            }
        }
        // A guessed block this node no longer holds: the guess is stale; load properly.
        (hinted.is_empty() && held > 0).then_some(out)
    }

    async fn load_blocks(
        &self,
        policy: &Policy,
        affs: Vec<BlockAffinity>,
    ) -> Result<BTreeMap<IpNet, IPAMBlock>> {
        let node = &self.inner.node;
        let affs: Vec<(IpNet, BlockAffinity)> = affs
            .into_iter()
            .filter(|a| a.spec.node == *node && a.spec.state != AffinityState::PendingDeletion)
            .filter_map(|a| Some((a.spec.cidr.parse::<IpNet>().ok()?, a)))
            .collect();
        let cidrs: Vec<IpNet> = affs.iter().map(|(c, _)| *c).collect();
        let found = self.read_blocks(&cidrs).await?;
        let mut out = BTreeMap::new();
        for ((cidr, aff), blk) in affs.into_iter().zip(found) {
            match blk {
                Some(b) if b.spec.affine_node() == Some(node.as_str()) => {
                    if aff.spec.state == AffinityState::Pending {
                        info!(node = %node, block = %cidr, "confirming the affinity of a block claimed before an interruption");
                        self.confirm_affinity(&cidr).await?;
                    }
                    if !b.spec.deleted {
                        out.insert(cidr, b);
                    }
                }
                Some(b) => {
                    info!(node = %node, block = %cidr, owner = ?b.spec.affinity, "dropping a stale affinity: the block belongs to another owner");
                    self.delete_affinity(&aff).await?;
                }
                None if aff.spec.state == AffinityState::Pending
                    && Self::pool_of_block(policy, &cidr)
                        .is_some_and(|p| !policy_pool_disabled(policy, &p)) =>
                {
                    info!(node = %node, block = %cidr, "completing a block claim interrupted before the block was created");
                    let pv = Self::pool_of_block(policy, &cidr).expect("checked above");
                    if let Some(b) = self.claim(&cidr, &pv, policy).await? {
                        out.insert(cidr, b);
                    }
                }
                None => {
                    info!(node = %node, block = %cidr, state = ?aff.spec.state, "dropping an affinity whose block does not exist");
                    self.delete_affinity(&aff).await?;
                }
            }
        }
        Ok(out)
    }

    /// The blocks `cidrs`, in batches of reads (one round trip each on etcd); `None` for a
    /// block that does not exist.
    async fn read_blocks(&self, cidrs: &[IpNet]) -> Result<Vec<Option<IPAMBlock>>> {
        let mut found = Vec::with_capacity(cidrs.len());
        for chunk in cidrs.chunks(READ_BATCH) {
            let reads = chunk.iter().fold(Reads::new(), |r, cidr| {
                r.get::<IPAMBlock>(&names::block_name(cidr))
            });
            let mut set = self
                .inner
                .store
                .read(reads)
                .await
                .map_err(IpamError::store("read this node's blocks"))?;
            for (i, cidr) in chunk.iter().enumerate() {
                found.push(
                    set.get::<IPAMBlock>(i)
                        .map_err(IpamError::store(format!("read block {cidr}")))?,
                );
            }
        }
        Ok(found)
    }

    async fn delete_affinity(&self, aff: &BlockAffinity) -> Result<()> {
        match self.inner.store.delete(aff).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() || e.is_conflict() => Ok(()),
            Err(e) => Err(IpamError::Store {
                what: format!("delete BlockAffinity {}", aff.spec.cidr),
                source: e,
            }),
        }
    }

    async fn confirm_affinity(&self, cidr: &IpNet) -> Result<()> {
        let store = &self.inner.store;
        let name = names::affinity_name(&self.inner.node, cidr);
        for attempt in 0..self.max_attempts() {
            let cur = store
                .try_get::<BlockAffinity>(&name)
                .await
                .map_err(IpamError::store(format!("read BlockAffinity {name}")))?;
            let res = match cur {
                Some(a) if a.spec.state == AffinityState::Confirmed => return Ok(()),
                Some(mut a) => {
                    a.spec.state = AffinityState::Confirmed;
                    store.update(&a).await.map(drop)
                }
                None => store
                    .create(&self.affinity(cidr, AffinityState::Confirmed))
                    .await
                    .map(drop),
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if e.is_conflict() || e.is_already_exists() || e.is_not_found() => {
                    backoff(attempt).await
                }
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("confirm BlockAffinity {name}"),
                        source: e,
                    })
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("confirm the affinity of block {cidr}"),
            attempts: self.max_attempts(),
        })
    }

    fn affinity(&self, cidr: &IpNet, state: AffinityState) -> BlockAffinity {
        BlockAffinity::new(
            &names::affinity_name(&self.inner.node, cidr),
            BlockAffinitySpec {
                state,
                node: self.inner.node.clone(),
                cidr: cidr.to_string(),
                deleted: false,
            },
        )
    }

    // ===== claiming blocks =====

    /// Claims the unowned block `cidr` for this node: affinity pending, block created with the
    /// affinity, affinity confirmed. `None` if another node won it. With atomic commits, the
    /// confirmed affinity and the block are one commit, unless an affinity of this node for the
    /// block exists already (an interrupted or concurrent claim), which the ordered steps
    /// finish.
    async fn claim(
        &self,
        cidr: &IpNet,
        pool: &PoolView,
        policy: &Policy,
    ) -> Result<Option<IPAMBlock>> {
        let store = &self.inner.store;
        let node = &self.inner.node;
        if store.atomic_commit() {
            let name = names::block_name(cidr);
            let commit = Commit::new()
                .create(&self.affinity(cidr, AffinityState::Confirmed))
                .create(&IPAMBlock::new(&name, self.new_block(cidr, pool, policy)));
            match store.commit(commit).await {
                Ok(done) => {
                    info!(node = %node, block = %cidr, pool = %pool.name, "claimed block");
                    return done
                        .get::<IPAMBlock>(&name)
                        .map(Some)
                        .map_err(IpamError::store(format!("claim block {cidr}")));
                }
                // Nothing was written: the affinity did not exist (it comes first in the
                // commit), the block did.
                Err(e) if e.is_already_exists() && e.is_about(Kind::IPAMBlock, &name) => {
                    let b = store
                        .try_get::<IPAMBlock>(&name)
                        .await
                        .map_err(IpamError::store(format!("read block {cidr}")))?;
                    return match b {
                        Some(b)
                            if b.spec.affine_node() == Some(node.as_str()) && !b.spec.deleted =>
                        {
                            self.confirm_affinity(cidr).await?;
                            Ok(Some(b))
                        }
                        _ => {
                            debug!(node = %node, block = %cidr, "another node claimed the block first");
                            Ok(None)
                        }
                    };
                }
                Err(e) if e.is_already_exists() => {}
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("claim block {cidr}"),
                        source: e,
                    })
                }
            }
        }
        // (1) Pending affinity. It exists already if an earlier claim was interrupted.
        let pending = match store
            .create(&self.affinity(cidr, AffinityState::Pending))
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_already_exists() => {
                let a = store
                    .get::<BlockAffinity>(&names::affinity_name(node, cidr))
                    .await
                    .map_err(IpamError::store(format!("read BlockAffinity for {cidr}")))?;
                if a.spec.state == AffinityState::PendingDeletion {
                    return Ok(None);
                }
                a
            }
            Err(e) => {
                return Err(IpamError::Store {
                    what: format!("claim block {cidr}: create pending BlockAffinity"),
                    source: e,
                })
            }
        };
        // (2) The block, carrying the affinity. Whoever creates it owns it.
        let spec = self.new_block(cidr, pool, policy);
        let blk = match store
            .create(&IPAMBlock::new(&names::block_name(cidr), spec))
            .await
        {
            Ok(b) => b,
            Err(e) if e.is_already_exists() => {
                let b = store
                    .try_get::<IPAMBlock>(&names::block_name(cidr))
                    .await
                    .map_err(IpamError::store(format!("read block {cidr}")))?;
                match b {
                    Some(b) if b.spec.affine_node() == Some(node.as_str()) && !b.spec.deleted => b,
                    _ => {
                        debug!(node = %node, block = %cidr, "another node claimed the block first");
                        self.delete_affinity(&pending).await?;
                        return Ok(None);
                    }
                }
            }
            Err(e) => {
                return Err(IpamError::Store {
                    what: format!("claim block {cidr}: create IPAMBlock"),
                    source: e,
                })
            }
        };
        // (3) Confirm.
        self.confirm_affinity(cidr).await?;
        info!(node = %node, block = %cidr, pool = %pool.name, "claimed block");
        Ok(Some(blk))
    }

    /// The spec of a block claimed now for this node.
    fn new_block(&self, cidr: &IpNet, pool: &PoolView, policy: &Policy) -> IPAMBlockSpec {
        block::new_block_spec(
            cidr,
            Some(&self.inner.node),
            policy.config.strict_affinity || pool.strict_affinity,
            Some(clock::rfc3339(self.now())),
            self.inner.cfg.clock.now_micros(),
        )
    }

    /// Takes over another node's empty block that is older than `reclaim_after` (or a block
    /// no node holds): our affinity pending, the block re-pointed at us (only while still
    /// empty), our affinity confirmed, the old owner's affinity removed.
    async fn reclaim(
        &self,
        mut blk: IPAMBlock,
        pool: &PoolView,
        policy: &Policy,
    ) -> Result<Option<IPAMBlock>> {
        let store = &self.inner.store;
        let node = self.inner.node.clone();
        let Some(cidr) = blk.spec.network() else {
            return Ok(None);
        };
        let old = blk.spec.affine_node().map(str::to_owned);
        let pending = match store
            .create(&self.affinity(&cidr, AffinityState::Pending))
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_already_exists() => store
                .get::<BlockAffinity>(&names::affinity_name(&node, &cidr))
                .await
                .map_err(IpamError::store(format!("read BlockAffinity for {cidr}")))?,
            Err(e) => {
                return Err(IpamError::Store {
                    what: format!("reclaim block {cidr}: create pending BlockAffinity"),
                    source: e,
                })
            }
        };
        let now = self.now();
        let mut taken = None;
        for attempt in 0..self.max_attempts() {
            if !block::is_empty(&blk.spec)
                || blk.spec.deleted
                || blk.spec.affinity != blk_affinity(&old)
            {
                break;
            }
            let mut new = blk.clone();
            new.spec.affinity = Some(format!("{}{node}", margay_api::HOST_AFFINITY_PREFIX));
            new.spec.affinity_claim_time = Some(clock::rfc3339(now));
            new.spec.strict_affinity = policy.config.strict_affinity || pool.strict_affinity;
            match store.update(&new).await {
                Ok(b) => {
                    taken = Some(b);
                    break;
                }
                Err(e) if e.is_conflict() => {
                    backoff(attempt).await;
                    match store
                        .try_get::<IPAMBlock>(&names::block_name(&cidr))
                        .await
                        .map_err(IpamError::store(format!("read block {cidr}")))?
                    {
                        Some(b) => blk = b,
                        None => break,
                    }
                }
                Err(e) if e.is_not_found() => break,
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("reclaim block {cidr}"),
                        source: e,
                    })
                }
            }
        }
        let Some(b) = taken else {
            self.delete_affinity(&pending).await?;
            return Ok(None);
        };
        self.confirm_affinity(&cidr).await?;
        if let Some(old) = &old {
            if let Some(a) = store
                .try_get::<BlockAffinity>(&names::affinity_name(old, &cidr))
                .await
                .map_err(IpamError::store(format!(
                    "read BlockAffinity of {old} for {cidr}"
                )))?
            {
                self.delete_affinity(&a).await?;
            }
        }
        info!(node = %node, block = %cidr, previous = ?old, "took over an empty block");
        Ok(Some(b))
    }

    // ===== writing allocations =====

    /// Makes the handle's count for `cidr` equal to what it held before this request plus
    /// `want` pending allocations, in one handle write (none if already so).
    async fn ensure_handle(&self, h: &mut HandleTx, cidr: &IpNet, want: i64) -> Result<()> {
        let key = cidr.to_string();
        let have = h.pending.get(&key).copied().unwrap_or(0);
        if have == want {
            return Ok(());
        }
        self.adjust_handle(h, &key, want - have).await?;
        if want == 0 {
            h.pending.remove(&key);
        } else {
            h.pending.insert(key, want);
        }
        Ok(())
    }

    /// Adds `delta` to the handle's count for block `key` (creating the handle, or deleting it
    /// when nothing is left), with compare-and-swap.
    async fn adjust_handle(&self, h: &mut HandleTx, key: &str, delta: i64) -> Result<()> {
        let store = &self.inner.store;
        if delta == 0 {
            return Ok(());
        }
        for attempt in 0..self.max_attempts() {
            let res = match h.obj.clone() {
                None if delta < 0 => match store
                    .try_get::<IPAMHandle>(&h.name)
                    .await
                    .map_err(IpamError::store(format!("read handle {}", h.id)))?
                {
                    Some(o) => {
                        h.obj = Some(o);
                        continue;
                    }
                    None => return Ok(()),
                },
                None => {
                    let obj = IPAMHandle::new(
                        &h.name,
                        IPAMHandleSpec {
                            handle_id: h.id.clone(),
                            block: BTreeMap::from([(key.to_owned(), delta)]),
                            deleted: false,
                        },
                    );
                    store.create(&obj).await.map(Some)
                }
                Some(cur) => match adjusted(&cur, key, delta) {
                    None => store.delete(&cur).await.map(|()| None),
                    Some(new) => store.update(&new).await.map(Some),
                },
            };
            match res {
                Ok(o) => {
                    h.obj = o;
                    return Ok(());
                }
                Err(e) if e.is_conflict() || e.is_already_exists() || e.is_not_found() => {
                    h.obj = store
                        .try_get::<IPAMHandle>(&h.name)
                        .await
                        .map_err(IpamError::store(format!("read handle {}", h.id)))?;
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("write handle {}", h.id),
                        source: e,
                    })
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("update handle {}", h.id),
            attempts: self.max_attempts(),
        })
    }

    /// Writes `new`, a block change adding `count` allocations of the handle in `cidr`, together
    /// with the handle's count for the block. Where the store commits atomically (memory, etcd)
    /// both are one commit; a conflict on the handle re-reads only the handle and commits the
    /// same block change again. Elsewhere (Kubernetes) the handle is written first, then the
    /// block, so that an allocation always has a handle naming its block.
    ///
    /// `Ok(None)`: the block changed or vanished since it was read; read it again and re-plan.
    async fn write_allocation(
        &self,
        h: &mut HandleTx,
        cidr: &IpNet,
        new: IPAMBlock,
        count: i64,
        what: impl Fn() -> String,
    ) -> Result<Option<IPAMBlock>> {
        let store = &self.inner.store;
        if !store.atomic_commit() {
            self.ensure_handle(h, cidr, count).await?;
            return match store.update(&new).await {
                Ok(written) => {
                    h.pending.remove(&cidr.to_string());
                    Ok(Some(written))
                }
                Err(e) if e.is_conflict() || e.is_not_found() => Ok(None),
                // The write may or may not have happened. The handle already counts it, so a
                // release by handle frees it either way; keep the handle as it is.
                Err(e) => {
                    h.pending.remove(&cidr.to_string());
                    Err(IpamError::Store {
                        what: what(),
                        source: e,
                    })
                }
            };
        }
        let key = cidr.to_string();
        let block_name = names::block_name(cidr);
        for attempt in 0..self.max_attempts() {
            let (handle, commit) = match &h.obj {
                None => {
                    let handle = IPAMHandle::new(
                        &h.name,
                        IPAMHandleSpec {
                            handle_id: h.id.clone(),
                            block: BTreeMap::from([(key.clone(), count)]),
                            deleted: false,
                        },
                    );
                    let commit = Commit::new().create(&handle);
                    (handle, commit)
                }
                Some(cur) => {
                    let mut next = cur.clone();
                    *next.spec.block.entry(key.clone()).or_insert(0) += count;
                    let commit = Commit::new().update(&next);
                    (next, commit)
                }
            };
            match store.commit(commit.update(&new)).await {
                Ok(done) => {
                    // What was written is what was sent, at the commit's revision: keep the
                    // copies instead of decoding the stored documents back.
                    let (Some(hrev), Some(brev)) = (
                        done.revision::<IPAMHandle>(&h.name),
                        done.revision::<IPAMBlock>(&block_name),
                    ) else {
                        return Err(IpamError::Store {
                            what: what(),
                            source: margay_api::StoreError::Rejected {
                                backend: store.backend().name(),
                                message: "a commit did not report the objects it wrote".into(),
                            },
                        });
                    };
                    let mut handle = handle;
                    handle.metadata.resource_version = Some(hrev.to_string());
                    h.obj = Some(handle);
                    let mut written = new;
                    written.metadata.resource_version = Some(brev.to_string());
                    return Ok(Some(written));
                }
                Err(e)
                    if e.is_about(Kind::IPAMHandle, &h.name)
                        && (e.is_conflict() || e.is_already_exists() || e.is_not_found()) =>
                {
                    h.obj = store
                        .try_get::<IPAMHandle>(&h.name)
                        .await
                        .map_err(IpamError::store(format!("read handle {}", h.id)))?;
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
                Err(e) if e.is_conflict() || e.is_not_found() => return Ok(None),
                // Both writes happened or neither did. If they did, the handle counts the
                // allocation and a release by handle frees it.
                Err(e) => {
                    return Err(IpamError::Store {
                        what: what(),
                        source: e,
                    })
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("{}: update handle {}", what(), h.id),
            attempts: self.max_attempts(),
        })
    }

    /// Allocates up to `n` addresses in the block `cidr` (see [`Self::write_allocation`]).
    /// Returns fewer (or none) when the block has no more room.
    #[allow(clippy::too_many_arguments)]
    async fn alloc_in_block(
        &self,
        cache: Option<&mut BTreeMap<IpNet, IPAMBlock>>,
        start: Option<IPAMBlock>,
        cidr: &IpNet,
        n: usize,
        h: &mut HandleTx,
        attrs: &BTreeMap<String, String>,
        pool: &PoolView,
        policy: &Policy,
        mode: BlockMode,
    ) -> Result<Vec<AssignedAddress>> {
        let store = &self.inner.store;
        let name = names::block_name(cidr);
        let excl = Self::exclusions(policy, Some(pool));
        let attr = attribute(&h.id, attrs);
        let mut cache = cache;
        // A block taken from the cache may be stale; one that looks full is read again
        // before it is given up (others' releases do not reach this cache). It is taken out
        // rather than copied and put back on every way out but an error, after which
        // `assign` drops the whole cache.
        let (mut cur, mut fresh) = match start {
            Some(b) => (Some(b), true),
            None => (cache.as_mut().and_then(|c| c.remove(cidr)), false),
        };
        for attempt in 0..self.max_attempts() {
            let blk = match cur.take() {
                Some(b) => b,
                None => match store
                    .try_get::<IPAMBlock>(&name)
                    .await
                    .map_err(IpamError::store(format!("read block {cidr}")))?
                {
                    Some(b) => {
                        fresh = true;
                        b
                    }
                    None => {
                        if let Some(c) = cache.as_mut() {
                            c.remove(cidr);
                        }
                        self.ensure_handle(h, cidr, 0).await?;
                        return Ok(Vec::new());
                    }
                },
            };
            let ours = blk.spec.affine_node() == Some(self.inner.node.as_str());
            let usable = !blk.spec.deleted
                && match mode {
                    BlockMode::Affine => ours,
                    BlockMode::Borrow => {
                        !blk.spec.strict_affinity && !policy.config.strict_affinity
                    }
                };
            if !usable {
                if let Some(c) = cache.as_mut() {
                    c.remove(cidr);
                }
                self.ensure_handle(h, cidr, 0).await?;
                return Ok(Vec::new());
            }
            let now = self.now();
            // `allocate` changes nothing when it finds no room, so `new` is then still `blk`.
            let mut new = blk;
            let got = block::allocate(&mut new.spec, cidr, n, &attr, &excl, now);
            if got.is_empty() && !fresh {
                continue;
            }
            if got.is_empty() {
                if let Some(c) = cache.as_mut() {
                    c.insert(*cidr, new);
                }
                self.ensure_handle(h, cidr, 0).await?;
                return Ok(Vec::new());
            }
            let what = || format!("allocate in block {cidr}");
            match self
                .write_allocation(h, cidr, new, got.len() as i64, what)
                .await?
            {
                Some(written) => {
                    if let Some(c) = cache.as_mut() {
                        c.insert(*cidr, written);
                    }
                    return Ok(got
                        .into_iter()
                        .map(|(o, seq)| AssignedAddress {
                            ip: block::ip_of(cidr, o),
                            block: *cidr,
                            pool: pool.name.clone(),
                            seq,
                        })
                        .collect());
                }
                None => {
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("allocate in block {cidr}"),
            attempts: self.max_attempts(),
        })
    }

    // ===== assign =====

    /// Assigns addresses as the request asks. All or nothing: when any part fails, what this
    /// call already assigned is released again before the error is returned.
    pub async fn assign(&self, req: &AssignRequest) -> Result<Assignment> {
        if req.handle_id.is_empty() {
            return Err(IpamError::InvalidRequest("the handle ID is empty".into()));
        }
        if req.num_v4 == 0 && req.num_v6 == 0 && req.addresses.is_empty() {
            return Err(IpamError::InvalidRequest(format!(
                "handle {}: the request asks for no address (numV4, numV6 and addresses are all empty)",
                req.handle_id
            )));
        }
        let mut st = self.inner.state.lock().await;
        let mut h = match st.prepared.take() {
            Some(p) if p.id == req.handle_id => p,
            other => {
                st.prepared = other;
                HandleTx::new(&req.handle_id)
            }
        };
        let policy = self.policy(&mut st).await;
        let mut out = Vec::new();
        let res = match policy {
            Ok(policy) => {
                let res = self
                    .assign_locked(&mut st, &policy, req, &mut h, &mut out)
                    .await;
                (res, Some(policy))
            }
            Err(e) => (Err(e), None),
        };
        // Counts written ahead (a prepared handle) for blocks that got no address.
        let unused: Vec<String> = h.pending.keys().cloned().collect();
        for key in unused {
            let have = h.pending.get(&key).copied().unwrap_or(0);
            if let Err(e) = self.adjust_handle(&mut h, &key, -have).await {
                warn!(handle = %req.handle_id, block = %key, error = %e, "cannot take back a handle count the request did not use; the controller's GC will correct it");
            }
            h.pending.remove(&key);
        }
        match res {
            (Ok(()), _) => Ok(Assignment { addresses: out }),
            (Err(e), None) => Err(e),
            (Err(e), Some(policy)) => {
                // The cached blocks may be missing one taken out for the failed write, or be
                // stale: read them again next time.
                st.blocks = None;
                if !out.is_empty() {
                    warn!(handle = %req.handle_id, error = %e, "releasing the addresses of a failed request");
                    let ips: Vec<(IpAddr, Option<u64>)> =
                        out.iter().map(|a| (a.ip, Some(a.seq))).collect();
                    if let Err(e2) = self.release_locked(&mut st, &policy, &ips).await {
                        warn!(handle = %req.handle_id, error = %e2, "could not release the addresses of a failed request; the controller's GC will");
                    }
                }
                Err(e)
            }
        }
    }

    async fn assign_locked(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        req: &AssignRequest,
        h: &mut HandleTx,
        out: &mut Vec<AssignedAddress>,
    ) -> Result<()> {
        for ip in &req.addresses {
            out.push(self.assign_specific(st, policy, req, h, *ip).await?);
        }
        for (fam, n) in [(Family::V4, req.num_v4), (Family::V6, req.num_v6)] {
            if n > 0 {
                let got = self
                    .assign_family(st, policy, req, h, fam, n as usize)
                    .await?;
                out.extend(got);
            }
        }
        Ok(())
    }

    async fn assign_family(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        req: &AssignRequest,
        h: &mut HandleTx,
        fam: Family,
        n: usize,
    ) -> Result<Vec<AssignedAddress>> {
        let node = self.inner.node.clone();
        let strict = policy.config.strict_affinity;
        let pools = pool::select(
            &policy.pools,
            fam,
            req.use_,
            &node,
            &policy.labels,
            &req.pools,
            strict,
        )?;
        let mut out = Vec::new();

        // 1. This node's blocks in the chosen pools: those with room in the cached copy first;
        // the ones that look full are read again, all in one batch, only if those do not
        // suffice (others' releases do not reach the cache).
        let mine: Vec<(bool, IpNet, PoolView)> = {
            let now = self.now();
            let blocks = self.my_blocks(st, policy).await?;
            let mut v: Vec<(bool, IpNet, PoolView)> = blocks
                .iter()
                .filter_map(|(c, b)| {
                    let pv = pools.iter().find(|p| p.net.contains(c))?;
                    let excl = Self::exclusions(policy, Some(pv));
                    let full = block::available(&b.spec, c, &excl, now).next().is_none();
                    Some((full, *c, pv.clone()))
                })
                .collect();
            v.sort_by_key(|(full, c, _)| (*full, *c));
            v
        };
        let mut refreshed = false;
        for (i, (full, cidr, pv)) in mine.iter().enumerate() {
            let mut start = None;
            if *full {
                if !refreshed {
                    let rest: Vec<IpNet> = mine[i..].iter().map(|(_, c, _)| *c).collect();
                    let fresh = self.read_blocks(&rest).await?;
                    if let Some(cache) = st.blocks.as_mut() {
                        for (c, b) in rest.iter().zip(fresh) {
                            match b {
                                Some(b) => cache.insert(*c, b),
                                None => cache.remove(c),
                            };
                        }
                    }
                    refreshed = true;
                }
                // Just read: `alloc_in_block` takes it as fresh and does not read it again.
                start = st.blocks.as_mut().and_then(|c| c.remove(cidr));
                if start.is_none() {
                    continue;
                }
            }
            let want = n - out.len();
            let cache = st.blocks.as_mut();
            let got = self
                .alloc_in_block(
                    cache,
                    start,
                    cidr,
                    want,
                    h,
                    &req.attrs,
                    pv,
                    policy,
                    BlockMode::Affine,
                )
                .await?;
            out.extend(got);
            if out.len() == n {
                return Ok(out);
            }
        }

        // 2. Blocks this node holds that the cache does not know: another process for this
        // node (a CNI plugin, the node agent) claimed them after the cache was filled, or the
        // affinities were read ahead of the caller's lock (`prefetch`). They come before a
        // new claim, which would leave the node holding a block it does not need.
        let known: HashSet<IpNet> = st
            .blocks
            .as_ref()
            .map(|b| b.keys().copied().collect())
            .unwrap_or_default();
        let held_affs = self.my_affinities().await?;
        // The node's block count for the first claim below, from the same read.
        let mut held_now = Some(
            held_affs
                .iter()
                .filter(|a| a.spec.state != AffinityState::PendingDeletion)
                .count() as u32,
        );
        let unseen: Vec<BlockAffinity> = held_affs
            .into_iter()
            .filter(|a| {
                a.spec.state != AffinityState::PendingDeletion
                    && a.spec.cidr.parse::<IpNet>().is_ok_and(|c| {
                        !known.contains(&c) && pools.iter().any(|p| p.net.contains(&c))
                    })
            })
            .collect();
        if !unseen.is_empty() {
            for (cidr, blk) in self.load_blocks(policy, unseen).await? {
                let Some(pv) = pools.iter().find(|p| p.net.contains(&cidr)) else {
                    continue;
                };
                let want = n - out.len();
                let got = self
                    .alloc_in_block(
                        st.blocks.as_mut(),
                        Some(blk),
                        &cidr,
                        want,
                        h,
                        &req.attrs,
                        pv,
                        policy,
                        BlockMode::Affine,
                    )
                    .await?;
                out.extend(got);
                if out.len() == n {
                    return Ok(out);
                }
            }
        }

        // 3. New blocks, while the node may hold more.
        let mut limited = false;
        if policy.config.auto_allocate_blocks {
            for pv in &pools {
                while out.len() < n {
                    let held = match held_now.take() {
                        Some(h) => h,
                        None => self.blocks_held().await?,
                    };
                    let max = policy.config.max_blocks_per_host;
                    if max > 0 && held >= max {
                        limited = true;
                        break;
                    }
                    let Some(blk) = self.find_and_claim(pv, policy).await? else {
                        break;
                    };
                    let cidr = blk.spec.network().expect("claimed block has a CIDR");
                    let want = n - out.len();
                    let cache = st.blocks.as_mut();
                    let got = self
                        .alloc_in_block(
                            cache,
                            Some(blk),
                            &cidr,
                            want,
                            h,
                            &req.attrs,
                            pv,
                            policy,
                            BlockMode::Affine,
                        )
                        .await?;
                    if got.is_empty() {
                        // Excluded throughout (reservations): try another.
                        continue;
                    }
                    out.extend(got);
                }
                if out.len() == n {
                    return Ok(out);
                }
            }
        }

        // 4. Borrow from other nodes' blocks.
        if !strict {
            for pv in &pools {
                let (blocks, _) = self
                    .inner
                    .store
                    .list::<IPAMBlock>()
                    .await
                    .map_err(IpamError::store("list IPAMBlocks"))?;
                let mut cands: Vec<IPAMBlock> = blocks
                    .into_iter()
                    .filter(|b| {
                        b.spec.network().is_some_and(|c| pv.net.contains(&c))
                            && b.spec.affine_node() != Some(node.as_str())
                            && !b.spec.strict_affinity
                            && !b.spec.deleted
                    })
                    .collect();
                // Start at a node-seeded place so that borrowers spread out.
                if !cands.is_empty() {
                    let k = (pool::seed(&node) % cands.len() as u64) as usize;
                    cands.rotate_left(k);
                }
                for b in cands {
                    let cidr = b.spec.network().expect("filtered");
                    let want = n - out.len();
                    let got = self
                        .alloc_in_block(
                            None,
                            Some(b),
                            &cidr,
                            want,
                            h,
                            &req.attrs,
                            pv,
                            policy,
                            BlockMode::Borrow,
                        )
                        .await?;
                    if !got.is_empty() {
                        debug!(node = %node, block = %cidr, n = got.len(), "borrowed addresses from another node's block");
                    }
                    out.extend(got);
                    if out.len() == n {
                        return Ok(out);
                    }
                }
            }
        }

        // Give back what we got: the request fails as a whole.
        if !out.is_empty() {
            let ips: Vec<(IpAddr, Option<u64>)> = out.iter().map(|a| (a.ip, Some(a.seq))).collect();
            self.release_locked(st, policy, &ips).await?;
        }
        if limited {
            return Err(IpamError::BlockLimit {
                node,
                held: self.blocks_held().await?,
                max: policy.config.max_blocks_per_host,
                strict,
            });
        }
        Err(IpamError::PoolsFull {
            pools: pools.iter().map(PoolView::label).collect(),
            node,
            strict,
        })
    }

    /// The CIDR of every block, from the blocks' names (keys only on etcd); from the documents
    /// if a name is not one the allocator makes.
    async fn block_cidrs(&self) -> Result<Vec<IpNet>> {
        let store = &self.inner.store;
        let names = store
            .list_names::<IPAMBlock>()
            .await
            .map_err(IpamError::store("list IPAMBlock names"))?;
        if let Some(cidrs) = names.iter().map(|n| names::parse_block_name(n)).collect() {
            return Ok(cidrs);
        }
        let (all, _) = store
            .list::<IPAMBlock>()
            .await
            .map_err(IpamError::store("list IPAMBlocks"))?;
        Ok(all.iter().filter_map(|b| b.spec.network()).collect())
    }

    /// Number of blocks this node holds or is claiming.
    async fn blocks_held(&self) -> Result<u32> {
        Ok(self
            .my_affinities()
            .await?
            .iter()
            .filter(|a| a.spec.state != AffinityState::PendingDeletion)
            .count() as u32)
    }

    /// Searches the pool from this node's start point for a block no one has made yet and
    /// claims it; failing that, takes over an empty block old enough to reclaim.
    async fn find_and_claim(&self, pv: &PoolView, policy: &Policy) -> Result<Option<IPAMBlock>> {
        // Which blocks exist, from their names alone (a block is named by its CIDR); whole
        // documents only if a name is not one the allocator makes, or to reclaim below.
        let existing: HashSet<IpNet> = self.block_cidrs().await?.into_iter().collect();
        let excl = Self::exclusions(policy, Some(pv));
        let limit = existing.len() as u128 + 4096;
        for cidr in pv.search_order(&self.inner.node, limit) {
            if existing.contains(&cidr)
                || existing
                    .iter()
                    .any(|e| e.contains(&cidr) || cidr.contains(e))
            {
                continue;
            }
            let size = block::block_size(&cidr).min(1 << 16) as u32;
            if (0..size).all(|o| excl.excludes(&cidr, o)) {
                continue;
            }
            if let Some(b) = self.claim(&cidr, pv, policy).await? {
                return Ok(Some(b));
            }
        }
        // Nothing unclaimed: take over an old enough empty block.
        let (blocks, _) = self
            .inner
            .store
            .list::<IPAMBlock>()
            .await
            .map_err(IpamError::store("list IPAMBlocks"))?;
        let now = self.now();
        let min_age = self.inner.cfg.reclaim_after.as_secs();
        let mut cands: Vec<IPAMBlock> = blocks
            .into_iter()
            .filter(|b| {
                b.spec.network().is_some_and(|c| pv.net.contains(&c))
                    && b.spec.affine_node() != Some(self.inner.node.as_str())
                    && !b.spec.deleted
                    && block::is_empty(&b.spec)
                    && (b.spec.affinity.is_none()
                        || b.spec
                            .affinity_claim_time
                            .as_deref()
                            .and_then(clock::parse_rfc3339)
                            .is_none_or(|t| t + min_age <= now))
            })
            .collect();
        if !cands.is_empty() {
            let k = (pool::seed(&self.inner.node) % cands.len() as u64) as usize;
            cands.rotate_left(k);
        }
        for b in cands {
            if let Some(b) = self.reclaim(b, pv, policy).await? {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    async fn assign_specific(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        req: &AssignRequest,
        h: &mut HandleTx,
        ip: IpAddr,
    ) -> Result<AssignedAddress> {
        let fam = Family::of(&ip);
        let strict = policy.config.strict_affinity;
        let pools = match pool::select(
            &policy.pools,
            fam,
            req.use_,
            &self.inner.node,
            &policy.labels,
            &req.pools,
            strict,
        ) {
            Ok(p) => p,
            Err(IpamError::NoPool { considered, .. }) => {
                return Err(IpamError::AddressNotInPool {
                    ip,
                    pools: considered,
                })
            }
            Err(e) => return Err(e),
        };
        let Some(pv) = pools.iter().find(|p| p.net.contains(&ip)).cloned() else {
            return Err(IpamError::AddressNotInPool {
                ip,
                pools: pools.iter().map(PoolView::label).collect(),
            });
        };
        let cidr = pv.block_of(&ip).expect("pool contains ip");
        let ordinal = block::ordinal_of(&cidr, &ip).expect("block contains ip");
        let store = &self.inner.store;
        let name = names::block_name(&cidr);
        let excl = Self::exclusions(policy, Some(&pv));
        let attr = attribute(&h.id, &req.attrs);
        let block_label = cidr.to_string();
        for attempt in 0..self.max_attempts() {
            let blk = match store
                .try_get::<IPAMBlock>(&name)
                .await
                .map_err(IpamError::store(format!("read block {cidr}")))?
            {
                Some(b) => b,
                None => match self.claim(&cidr, &pv, policy).await? {
                    Some(b) => {
                        if let Some(c) = st.blocks.as_mut() {
                            c.insert(cidr, b.clone());
                        }
                        b
                    }
                    None => continue,
                },
            };
            if blk.spec.deleted {
                return Err(IpamError::AddressUnavailable {
                    ip,
                    block: block_label,
                    reason: "the block is being released; try again shortly".into(),
                });
            }
            let ours = blk.spec.affine_node() == Some(self.inner.node.as_str());
            if !ours && (strict || blk.spec.strict_affinity) {
                return Err(IpamError::AddressUnavailable {
                    ip,
                    block: block_label,
                    reason: format!(
                        "the block belongs to {} and strict affinity forbids using another node's block",
                        blk.spec.affinity.as_deref().unwrap_or("no node")
                    ),
                });
            }
            let mut new = blk.clone();
            let seq = match block::allocate_ordinal(
                &mut new.spec,
                &cidr,
                ordinal,
                &attr,
                &excl,
                self.now(),
            ) {
                Ok(s) => s,
                Err(SpecificRefusal::InUse(owner)) => {
                    self.ensure_handle(h, &cidr, 0).await?;
                    return Err(IpamError::AddressInUse {
                        ip,
                        block: block_label,
                        owner,
                    });
                }
                Err(SpecificRefusal::Excluded(reason)) => {
                    self.ensure_handle(h, &cidr, 0).await?;
                    return Err(IpamError::AddressUnavailable {
                        ip,
                        block: block_label,
                        reason,
                    });
                }
                Err(SpecificRefusal::CoolingDown(until)) => {
                    self.ensure_handle(h, &cidr, 0).await?;
                    return Err(IpamError::AddressUnavailable {
                        ip,
                        block: block_label,
                        reason: format!(
                            "it was released recently and is held back by ipCooldownSeconds until {}",
                            clock::rfc3339(until)
                        ),
                    });
                }
            };
            let base = h.pending.get(&cidr.to_string()).copied().unwrap_or(0);
            let what = || format!("allocate {ip} in block {cidr}");
            match self
                .write_allocation(h, &cidr, new, base.max(1), what)
                .await?
            {
                Some(written) => {
                    if ours {
                        if let Some(c) = st.blocks.as_mut() {
                            c.insert(cidr, written);
                        }
                    }
                    return Ok(AssignedAddress {
                        ip,
                        block: cidr,
                        pool: pv.name.clone(),
                        seq,
                    });
                }
                None => backoff(attempt).await,
            }
        }
        Err(IpamError::Contention {
            what: format!("allocate {ip} in block {cidr}"),
            attempts: self.max_attempts(),
        })
    }

    // ===== release =====

    /// Releases addresses. With a sequence number, an address is freed only if it is still the
    /// allocation that number names; without one, whatever holds it is freed.
    pub async fn release_ips(&self, ips: &[(IpAddr, Option<u64>)]) -> Result<Vec<ReleaseOutcome>> {
        let mut st = self.inner.state.lock().await;
        let policy = self.policy(&mut st).await?;
        self.release_locked(&mut st, &policy, ips).await
    }

    async fn release_locked(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        ips: &[(IpAddr, Option<u64>)],
    ) -> Result<Vec<ReleaseOutcome>> {
        let store = &self.inner.store;
        let mut outcomes = vec![ReleaseOutcome::NotAllocated; ips.len()];
        // Group by block.
        let mut by_block: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        let mut all_blocks: Option<Vec<IpNet>> = None;
        for (i, (ip, _)) in ips.iter().enumerate() {
            let cidr = match policy
                .pools
                .iter()
                .filter_map(|p| pool::view(p, false))
                .find_map(|p| p.block_of(ip))
            {
                Some(c) => Some(c),
                None => {
                    // The pool is gone; find the block among those that exist.
                    if all_blocks.is_none() {
                        all_blocks = Some(self.block_cidrs().await?);
                    }
                    all_blocks
                        .as_ref()
                        .and_then(|bs| bs.iter().find(|b| b.contains(ip)).copied())
                }
            };
            if let Some(c) = cidr {
                by_block.entry(c).or_default().push(i);
            }
        }
        let cooldown = u64::from(policy.config.ip_cooldown_seconds);
        // Handle counts still to decrease after the block writes (the ordered path).
        let mut freed: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        // Handles read or written by this call, by object name (`None`: absent).
        let mut handles: HashMap<String, Option<IPAMHandle>> = HashMap::new();
        for (cidr, idxs) in by_block {
            let name = names::block_name(&cidr);
            let key = cidr.to_string();
            let mut done = false;
            // The block as last read; kept when only a handle changed.
            let mut cur: Option<IPAMBlock> = None;
            for attempt in 0..self.max_attempts() {
                let blk = match cur.take() {
                    Some(b) => b,
                    None => match store
                        .try_get::<IPAMBlock>(&name)
                        .await
                        .map_err(IpamError::store(format!("read block {cidr}")))?
                    {
                        Some(b) => b,
                        None => {
                            done = true;
                            break;
                        }
                    },
                };
                let now = self.now();
                let mut new = blk.clone();
                let mut results = Vec::new();
                for &i in &idxs {
                    let (ip, seq) = ips[i];
                    let r = match block::ordinal_of(&cidr, &ip) {
                        Some(o) => block::release_ordinal(&mut new.spec, o, seq, cooldown, now),
                        None => Released::NotAllocated,
                    };
                    results.push((i, r));
                }
                let mut here: BTreeMap<String, i64> = BTreeMap::new();
                for (_, r) in &results {
                    if let Released::Freed { handle: Some(hd) } = r {
                        *here.entry(names::handle_name(hd)).or_default() += 1;
                    }
                }
                let any = results
                    .iter()
                    .any(|(_, r)| matches!(r, Released::Freed { .. }));
                // With an atomic store the block and its handles' counts are one commit;
                // otherwise the block first and the handles after every block.
                let atomic = store.atomic_commit() && here.len() < MAX_COMMIT_WRITES;
                if any {
                    let res = if atomic {
                        self.commit_release(&new, &key, &here, &mut handles).await?
                    } else {
                        store.update(&new).await
                    };
                    match res {
                        Ok(written) => {
                            if let Some(c) = st.blocks.as_mut() {
                                if c.contains_key(&cidr) {
                                    c.insert(cidr, written);
                                }
                            }
                        }
                        // Only a handle changed: read it again, keep the block.
                        Err(e)
                            if e.object().is_some_and(|(k, _)| k == Kind::IPAMHandle)
                                && (e.is_conflict() || e.is_not_found()) =>
                        {
                            if let Some((_, hname)) = e.object() {
                                handles.remove(hname);
                            }
                            cur = Some(blk);
                            if attempt > 0 {
                                backoff(attempt).await;
                            }
                            continue;
                        }
                        Err(e) if e.is_conflict() || e.is_not_found() => {
                            backoff(attempt).await;
                            continue;
                        }
                        Err(e) => {
                            return Err(IpamError::Store {
                                what: format!("release addresses in block {cidr}"),
                                source: e,
                            })
                        }
                    }
                }
                for (i, r) in results {
                    outcomes[i] = match r {
                        Released::Freed { handle } => {
                            if let (Some(hd), false) = (&handle, atomic) {
                                *freed
                                    .entry(hd.clone())
                                    .or_default()
                                    .entry(key.clone())
                                    .or_default() += 1;
                            }
                            debug!(ip = %ips[i].0, block = %cidr, handle = ?handle, "released");
                            ReleaseOutcome::Released { handle }
                        }
                        Released::NotAllocated => ReleaseOutcome::NotAllocated,
                        Released::StaleSequence { current } => {
                            info!(ip = %ips[i].0, block = %cidr, current, wanted = ?ips[i].1, "stale release ignored: the address was handed out again");
                            ReleaseOutcome::Stale { current }
                        }
                    };
                }
                done = true;
                break;
            }
            if !done {
                return Err(IpamError::Contention {
                    what: format!("release addresses in block {cidr}"),
                    attempts: self.max_attempts(),
                });
            }
        }
        // Then the handles (the ordered path).
        for (handle, counts) in freed {
            let mut h = HandleTx::new(&handle);
            for (key, n) in counts {
                self.adjust_handle(&mut h, &key, -n).await?;
            }
        }
        Ok(outcomes)
    }

    /// One commit of a block change that frees addresses, with the counts of the handles that
    /// held them (`freed`: per handle object name, how many in block `key`) decreased, and
    /// handles left with nothing deleted. Handles not in `handles` are read first; absent
    /// handles have nothing to decrease. The outer `Result` is a failed read, the inner one the
    /// commit's outcome, for the caller to retry on.
    async fn commit_release(
        &self,
        new: &IPAMBlock,
        key: &str,
        freed: &BTreeMap<String, i64>,
        handles: &mut HashMap<String, Option<IPAMHandle>>,
    ) -> Result<std::result::Result<IPAMBlock, margay_api::StoreError>> {
        let store = &self.inner.store;
        let mut commit = Commit::new().update(new);
        for (hname, n) in freed {
            if !handles.contains_key(hname) {
                let h = store
                    .try_get::<IPAMHandle>(hname)
                    .await
                    .map_err(IpamError::store(format!("read handle {hname}")))?;
                handles.insert(hname.clone(), h);
            }
            if let Some(cur) = &handles[hname] {
                commit = match adjusted(cur, key, -n) {
                    Some(next) => commit.update(&next),
                    None => commit.delete(cur),
                };
            }
        }
        Ok(store.commit(commit).await.and_then(|done| {
            for hname in freed.keys() {
                // Written, or deleted (NotFound), or absent all along.
                handles.insert(hname.clone(), done.get::<IPAMHandle>(hname).ok());
            }
            done.get::<IPAMBlock>(new.metadata.name.as_deref().unwrap_or_default())
        }))
    }

    /// Releases every address of a handle, then the handle. Returns the addresses freed.
    pub async fn release_by_handle(&self, handle_id: &str) -> Result<Vec<IpAddr>> {
        let mut st = self.inner.state.lock().await;
        let policy = self.policy(&mut st).await?;
        self.release_handle_locked(&mut st, &policy, handle_id)
            .await
    }

    async fn release_handle_locked(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        handle_id: &str,
    ) -> Result<Vec<IpAddr>> {
        if self.inner.store.atomic_commit() {
            self.release_handle_atomic(st, policy, handle_id).await
        } else {
            self.release_handle_ordered(st, policy, handle_id).await
        }
    }

    /// Release by handle as one commit: every block of the handle freed of its addresses and
    /// the handle deleted. A conflict re-reads only the object that changed.
    async fn release_handle_atomic(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        handle_id: &str,
    ) -> Result<Vec<IpAddr>> {
        let store = &self.inner.store;
        let hname = names::handle_name(handle_id);
        let cooldown = u64::from(policy.config.ip_cooldown_seconds);
        let mut handle: Option<IPAMHandle> = None;
        // Blocks as last read, by name (`None`: absent).
        let mut blocks: BTreeMap<String, Option<IPAMBlock>> = BTreeMap::new();
        for attempt in 0..self.max_attempts() {
            let h = match handle.take() {
                Some(h) => h,
                None => match store
                    .try_get::<IPAMHandle>(&hname)
                    .await
                    .map_err(IpamError::store(format!("read handle {handle_id}")))?
                {
                    Some(h) => h,
                    None => return Ok(Vec::new()),
                },
            };
            let cidrs: Vec<IpNet> = h.spec.block.keys().filter_map(|k| k.parse().ok()).collect();
            if cidrs.len() >= MAX_COMMIT_WRITES {
                return self.release_handle_ordered(st, policy, handle_id).await;
            }
            let now = self.now();
            let mut commit = Commit::new();
            let mut freed = Vec::new();
            let mut touched = Vec::new();
            for cidr in &cidrs {
                let name = names::block_name(cidr);
                if !blocks.contains_key(&name) {
                    let b = store
                        .try_get::<IPAMBlock>(&name)
                        .await
                        .map_err(IpamError::store(format!("read block {cidr}")))?;
                    blocks.insert(name.clone(), b);
                }
                let Some(blk) = &blocks[&name] else { continue };
                let mut new = blk.clone();
                let ords = block::release_handle(&mut new.spec, handle_id, cooldown, now);
                if ords.is_empty() {
                    continue;
                }
                freed.extend(ords.iter().map(|&o| block::ip_of(cidr, o)));
                commit = commit.update(&new);
                touched.push((*cidr, name));
            }
            match store.commit(commit.delete(&h)).await {
                Ok(done) => {
                    if let Some(c) = st.blocks.as_mut() {
                        for (cidr, name) in touched {
                            if let Some(cached) = c.get_mut(&cidr) {
                                *cached = done
                                    .get::<IPAMBlock>(&name)
                                    .map_err(IpamError::store(format!("read block {cidr}")))?;
                            }
                        }
                    }
                    debug!(handle = %handle_id, n = freed.len(), "released handle");
                    return Ok(freed);
                }
                // The handle was written meanwhile (an assign for the same handle) or
                // released by someone else: read it again.
                Err(e)
                    if e.is_about(Kind::IPAMHandle, &hname)
                        && (e.is_conflict() || e.is_not_found()) =>
                {
                    backoff(attempt).await
                }
                Err(e)
                    if e.object().is_some_and(|(k, _)| k == Kind::IPAMBlock)
                        && (e.is_conflict() || e.is_not_found()) =>
                {
                    if let Some((_, name)) = e.object() {
                        blocks.remove(name);
                    }
                    handle = Some(h);
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("release handle {handle_id}"),
                        source: e,
                    })
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("release handle {handle_id}"),
            attempts: self.max_attempts(),
        })
    }

    /// Release by handle for stores without atomic commits: each block freed of the handle's
    /// addresses, then the handle deleted, so that a crash midway leaves a handle that still
    /// names every block with its addresses.
    async fn release_handle_ordered(
        &self,
        st: &mut NodeState,
        policy: &Policy,
        handle_id: &str,
    ) -> Result<Vec<IpAddr>> {
        let store = &self.inner.store;
        let hname = names::handle_name(handle_id);
        let cooldown = u64::from(policy.config.ip_cooldown_seconds);
        let mut freed_all = Vec::new();
        for attempt in 0..self.max_attempts() {
            let Some(handle) = store
                .try_get::<IPAMHandle>(&hname)
                .await
                .map_err(IpamError::store(format!("read handle {handle_id}")))?
            else {
                return Ok(freed_all);
            };
            for key in handle.spec.block.keys() {
                let Ok(cidr) = key.parse::<IpNet>() else {
                    continue;
                };
                let name = names::block_name(&cidr);
                let mut ok = false;
                for attempt in 0..self.max_attempts() {
                    let Some(blk) = store
                        .try_get::<IPAMBlock>(&name)
                        .await
                        .map_err(IpamError::store(format!("read block {cidr}")))?
                    else {
                        ok = true;
                        break;
                    };
                    let mut new = blk.clone();
                    let ords =
                        block::release_handle(&mut new.spec, handle_id, cooldown, self.now());
                    if ords.is_empty() {
                        ok = true;
                        break;
                    }
                    match store.update(&new).await {
                        Ok(written) => {
                            if let Some(c) = st.blocks.as_mut() {
                                if c.contains_key(&cidr) {
                                    c.insert(cidr, written);
                                }
                            }
                            freed_all.extend(ords.iter().map(|&o| block::ip_of(&cidr, o)));
                            ok = true;
                            break;
                        }
                        Err(e) if e.is_conflict() || e.is_not_found() => backoff(attempt).await,
                        Err(e) => {
                            return Err(IpamError::Store {
                                what: format!("release handle {handle_id} in block {cidr}"),
                                source: e,
                            })
                        }
                    }
                }
                if !ok {
                    return Err(IpamError::Contention {
                        what: format!("release handle {handle_id} in block {cidr}"),
                        attempts: self.max_attempts(),
                    });
                }
            }
            match store.delete(&handle).await {
                Ok(()) => {
                    debug!(handle = %handle_id, n = freed_all.len(), "released handle");
                    return Ok(freed_all);
                }
                Err(e) if e.is_not_found() => return Ok(freed_all),
                // Written meanwhile (an assign for the same handle): go round again.
                Err(e) if e.is_conflict() => backoff(attempt).await,
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("delete handle {handle_id}"),
                        source: e,
                    })
                }
            }
        }
        Err(IpamError::Contention {
            what: format!("release handle {handle_id}"),
            attempts: self.max_attempts(),
        })
    }

    /// Loads this node's blocks, finishing claims an interruption left half done (pending
    /// affinities) and dropping affinities whose block belongs to someone else. The node agent
    /// calls it at start; requests do it on first use anyway.
    pub async fn recover(&self) -> Result<Vec<IpNet>> {
        let mut st = self.inner.state.lock().await;
        st.blocks = None;
        let policy = self.policy(&mut st).await?;
        let blocks = self.my_blocks(&mut st, &policy).await?;
        Ok(blocks.keys().copied().collect())
    }

    /// This node's blocks as the rest of Margay should see them: confirmed affinity and a
    /// block that names the node. Pending claims count as absent (no route export).
    pub async fn affine_blocks(&self) -> Result<Vec<IpNet>> {
        affine_blocks(&self.inner.store, &self.inner.node).await
    }
}

/// `cur` with `delta` added to its count for block `key` (never below zero; a zero count is
/// removed). `None` when no count is left: the handle is to be deleted.
fn adjusted(cur: &IPAMHandle, key: &str, delta: i64) -> Option<IPAMHandle> {
    let mut new = cur.clone();
    let c = new.spec.block.entry(key.to_owned()).or_insert(0);
    *c = (*c + delta).max(0);
    if *c == 0 {
        new.spec.block.remove(key);
    }
    (!new.spec.block.is_empty()).then_some(new)
}

fn blk_affinity(node: &Option<String>) -> Option<String> {
    node.as_ref()
        .map(|n| format!("{}{n}", margay_api::HOST_AFFINITY_PREFIX))
}

fn policy_pool_disabled(policy: &Policy, pv: &PoolView) -> bool {
    !policy
        .pools
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some(pv.name.as_str()))
        || pool::unusable(&policy.pools).contains_key(&pv.name)
}

/// The blocks `node` owns for ownership and route export: a confirmed affinity whose block
/// exists and names the node.
pub async fn affine_blocks(store: &Store, node: &str) -> Result<Vec<IpNet>> {
    let (affs, _) = store
        .list::<BlockAffinity>()
        .await
        .map_err(IpamError::store("list BlockAffinities"))?;
    let (blocks, _) = store
        .list::<IPAMBlock>()
        .await
        .map_err(IpamError::store("list IPAMBlocks"))?;
    let owners: HashMap<String, Option<String>> = blocks
        .iter()
        .map(|b| (b.spec.cidr.clone(), b.spec.affine_node().map(str::to_owned)))
        .collect();
    let mut out: Vec<IpNet> = affs
        .iter()
        .filter(|a| a.spec.node == node && a.spec.state == AffinityState::Confirmed)
        .filter(|a| {
            owners
                .get(&a.spec.cidr)
                .is_some_and(|o| o.as_deref() == Some(node))
        })
        .filter_map(|a| a.spec.cidr.parse().ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Retries a store read on `Unavailable` a few times; used by tools that run after outages.
pub async fn with_retries<T, F, Fut>(attempts: u32, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                last = Some(e);
                backoff(attempt + 3).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}
