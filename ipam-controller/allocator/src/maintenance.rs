//! Writes the controller (and `margayctl`) make on blocks and affinities that are not theirs:
//! releasing a block and its affinity, and removing stale affinities. Each is a sequence of
//! compare-and-swap writes that is safe to repeat after a crash at any point.

use crate::block;
use crate::error::{IpamError, Result};
use ipnet::IpNet;
use margay_api::names;
use margay_api::{AffinityState, BlockAffinity, IPAMBlock, Store};
use tracing::info;

/// What [`release_block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRelease {
    Released,
    /// Addresses were allocated in it (perhaps meanwhile); nothing was removed and the
    /// owner's affinity is confirmed again.
    NotEmpty,
    /// The block did not exist; any affinity left for it was removed.
    Gone,
}

/// Releases the block `cidr` if it is empty: (1) the owner's affinity set to
/// `PendingDeletion` (the node stops using it), (2) the block deleted on the revision seen
/// empty, (3) the affinity deleted. A crash after (1) leaves a `PendingDeletion` affinity that
/// the next call (or the node, which skips it) resolves; after (2), an affinity without block,
/// which the next call deletes.
pub async fn release_block(store: &Store, cidr: &IpNet, max_attempts: u32) -> Result<BlockRelease> {
    let name = names::block_name(cidr);
    for _ in 0..max_attempts.max(1) {
        let blk = store
            .try_get::<IPAMBlock>(&name)
            .await
            .map_err(IpamError::store(format!("read block {cidr}")))?;
        let Some(blk) = blk else {
            remove_affinities_for(store, cidr, None).await?;
            return Ok(BlockRelease::Gone);
        };
        let node = blk.spec.affine_node().map(str::to_owned);
        let aff = match &node {
            Some(n) => store
                .try_get::<BlockAffinity>(&names::affinity_name(n, cidr))
                .await
                .map_err(IpamError::store(format!(
                    "read BlockAffinity of {n} for {cidr}"
                )))?,
            None => None,
        };
        if !block::is_empty(&blk.spec) {
            if let Some(a) = aff.filter(|a| a.spec.state == AffinityState::PendingDeletion) {
                set_state(store, a, AffinityState::Confirmed).await?;
            }
            return Ok(BlockRelease::NotEmpty);
        }
        let aff = match aff {
            Some(a) if a.spec.state != AffinityState::PendingDeletion => {
                match set_state(store, a, AffinityState::PendingDeletion).await? {
                    Some(a) => Some(a),
                    None => continue,
                }
            }
            other => other,
        };
        match store.delete(&blk).await {
            Ok(()) => {}
            Err(e) if e.is_conflict() => {
                // Written meanwhile: look again (it may hold an address now).
                continue;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                return Err(IpamError::Store {
                    what: format!("delete block {cidr}"),
                    source: e,
                })
            }
        }
        if let Some(a) = aff {
            match store.delete(&a).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(e) => {
                    return Err(IpamError::Store {
                        what: format!("delete BlockAffinity for {cidr}"),
                        source: e,
                    })
                }
            }
        }
        remove_affinities_for(store, cidr, None).await?;
        info!(block = %cidr, node = ?node, "released empty block");
        return Ok(BlockRelease::Released);
    }
    Err(IpamError::Contention {
        what: format!("release block {cidr}"),
        attempts: max_attempts,
    })
}

/// Sets an affinity's state with compare-and-swap. `None` if it changed meanwhile.
async fn set_state(
    store: &Store,
    mut a: BlockAffinity,
    state: AffinityState,
) -> Result<Option<BlockAffinity>> {
    a.spec.state = state;
    match store.update(&a).await {
        Ok(a) => Ok(Some(a)),
        Err(e) if e.is_conflict() || e.is_not_found() => Ok(None),
        Err(e) => Err(IpamError::Store {
            what: format!("set BlockAffinity for {} to {state:?}", a.spec.cidr),
            source: e,
        }),
    }
}

/// Deletes the affinities for `cidr` that do not match its block (all of them when the block
/// is gone), except `keep_node`'s.
pub async fn remove_affinities_for(
    store: &Store,
    cidr: &IpNet,
    keep_node: Option<&str>,
) -> Result<usize> {
    let (affs, _) = store
        .list::<BlockAffinity>()
        .await
        .map_err(IpamError::store("list BlockAffinities"))?;
    let mut n = 0;
    for a in affs.iter().filter(|a| {
        a.spec.cidr.parse::<IpNet>().ok() == Some(*cidr) && Some(a.spec.node.as_str()) != keep_node
    }) {
        match store.delete(a).await {
            Ok(()) => n += 1,
            Err(e) if e.is_not_found() || e.is_conflict() => {}
            Err(e) => {
                return Err(IpamError::Store {
                    what: format!("delete BlockAffinity of {} for {cidr}", a.spec.node),
                    source: e,
                })
            }
        }
    }
    Ok(n)
}

/// Deletes one affinity on the revision it was read at (a no-op if it changed or is gone).
pub async fn delete_affinity(store: &Store, a: &BlockAffinity) -> Result<bool> {
    match store.delete(a).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() || e.is_conflict() => Ok(false),
        Err(e) => Err(IpamError::Store {
            what: format!(
                "delete BlockAffinity of {} for {}",
                a.spec.node, a.spec.cidr
            ),
            source: e,
        }),
    }
}
