//! The node-local side of IPAM that the CNI plugin and the node agent share: the node's
//! allocator lock, a release as the plugin makes it, and the retry of the releases DEL could
//! not finish while the datastore was away (`pending-releases/` in [`crate::node_state`]).

use crate::node_state::{self, RecordedIp, StateDir};
use crate::{Allocator, AllocatorConfig, IpamError};
use margay_api::{Store, WorkloadEndpoint};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Holds the node's allocator lock while alive. The lock file holds a count of the times the
/// lock was released, so that a process can tell whether anyone held the lock between two
/// moments (see [`lock_epoch_if_free`]); it is advanced when the lock is dropped.
pub struct IpamLock(Flock<File>);

impl IpamLock {
    /// The release count in the lock file (0 for an empty or unreadable one).
    fn count(f: &File) -> u64 {
        use std::io::{Read, Seek};
        let mut f = f;
        let mut s = String::new();
        if f.rewind().is_err() || f.read_to_string(&mut s).is_err() {
            return 0;
        }
        s.trim().parse().unwrap_or(0)
    }

    /// The release count as the lock was taken.
    pub fn epoch(&self) -> u64 {
        Self::count(&self.0)
    }
}

impl Drop for IpamLock {
    fn drop(&mut self) {
        use std::io::{Seek, Write};
        let next = Self::count(&self.0).wrapping_add(1);
        let mut f: &File = &self.0;
        let written = f
            .rewind()
            .and_then(|()| f.set_len(0))
            .and_then(|()| write!(f, "{next}"));
        if let Err(e) = written {
            // Only costs the next holder its prefetched blocks (they are read again).
            warn!(error = %e, "cannot advance the IPAM lock's release count");
        }
    }
}

/// The lock's release count if no one holds the lock now; `None` if someone does. Equal to
/// the count seen once the lock is taken, it says that no one held the lock in between: what
/// was read meanwhile was not changed by another request of this node.
pub fn lock_epoch_if_free(state: &StateDir) -> Option<u64> {
    let f = state.lock_file().ok()?;
    let held = Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()?;
    Some(IpamLock::count(&held))
}

/// Takes the node's allocator lock, waiting for it on a blocking thread when another process
/// holds it (so that timeouts around the caller keep working).
pub async fn lock_ipam(state: &StateDir) -> Result<IpamLock, IpamError> {
    let err = |what: &str, e: std::io::Error| IpamError::NodeState {
        what: what.into(),
        source: e,
    };
    let f = state
        .lock_file()
        .map_err(|e| err("cannot open the IPAM lock", e))?;
    let f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => return Ok(IpamLock(l)),
        Err((f, _)) => f,
    };
    let locked = tokio::task::spawn_blocking(move || Flock::lock(f, FlockArg::LockExclusive))
        .await
        .map_err(|e| err("cannot take the IPAM lock", std::io::Error::other(e)))?;
    locked
        .map(IpamLock)
        .map_err(|(_, e)| err("cannot take the IPAM lock", e.into()))
}

/// The allocator of the node's CNI calls: a fresh one per process.
pub fn allocator(store: &Store, node: &str) -> Allocator {
    Allocator::new(
        store.clone(),
        node,
        // The default settings lifetime (2 s): the settings `prefetch` read before the node
        // lock serve the request under it, unless the wait for the lock outlasted them.
        AllocatorConfig::default(),
    )
}

/// Releases what an attachment record (or a pending release) names: by sequence number when
/// every address has one, else by handle. Holds the node's allocator lock.
pub async fn release(
    state: &StateDir,
    store: &Store,
    node: &str,
    handle: &str,
    ips: &[RecordedIp],
) -> Result<(), IpamError> {
    // Connect (and find out that the datastore is down) and read the allocator's settings
    // before taking the node lock.
    let alloc = allocator(store, node);
    alloc.prefetch(&[]).await?;
    let _lock = lock_ipam(state).await?;
    if !ips.is_empty() && ips.iter().all(|r| r.seq.is_some()) {
        let req: Vec<(IpAddr, Option<u64>)> = ips.iter().map(|r| (r.ip, r.seq)).collect();
        let outcomes = alloc.release_ips(&req).await?;
        debug!(handle, ?outcomes, "released by sequence number");
    } else {
        let freed = alloc.release_by_handle(handle).await?;
        debug!(handle, ?freed, "released by handle");
    }
    Ok(())
}

/// Deletes WorkloadEndpoint `name` if it is still the one of `container_id` (a later sandbox of
/// the same pod may have replaced it).
pub async fn delete_workload_endpoint(
    store: &Store,
    name: &str,
    container_id: &str,
) -> Result<(), IpamError> {
    const ATTEMPTS: u32 = 5;
    let what = || format!("delete WorkloadEndpoint {name}");
    for _ in 0..ATTEMPTS {
        let cur = match store.try_get::<WorkloadEndpoint>(name).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => return Err(IpamError::store(what())(e)),
        };
        if cur.spec.container_id != container_id {
            return Ok(());
        }
        match store.delete(&cur).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(IpamError::store(what())(e)),
        }
    }
    Err(IpamError::Contention {
        what: what(),
        attempts: ATTEMPTS,
    })
}

/// What a drain of pending releases did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub completed: usize,
    /// Still pending (datastore unreachable, or the budget ran out).
    pub remaining: usize,
}

/// Retries the releases DEL recorded while the datastore was unreachable, within `budget`.
/// The CNI plugin calls it at the start of every run; the node agent calls it too (with its
/// own store). Files another process is draining are skipped.
pub async fn drain_pending_releases(
    state_dir: &Path,
    store: &Store,
    budget: Duration,
) -> DrainReport {
    let state = StateDir::new(state_dir);
    let files = match state.pending_files() {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot list pending releases");
            return DrainReport::default();
        }
    };
    let mut report = DrainReport::default();
    let deadline = Instant::now() + budget;
    let remove = |path: &Path| {
        if let Err(e) = node_state::remove_file(path) {
            // Tried again on the next drain; a release done twice frees nothing twice.
            warn!(file = %path.display(), error = %e, "cannot remove a pending release");
        }
    };
    for path in files {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            report.remaining += 1;
            continue;
        }
        let Ok(f) = File::open(&path) else {
            // Removed by another run since the listing.
            continue;
        };
        // Another run is on it.
        let Ok(guard) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
            report.remaining += 1;
            continue;
        };
        let p = match node_state::read_pending(&path) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "removing an unreadable pending release");
                remove(&path);
                continue;
            }
        };
        let work = async {
            release(&state, store, &p.node, &p.handle, &p.ips).await?;
            if let Some(w) = &p.workload_endpoint {
                delete_workload_endpoint(store, w, &p.container_id).await?;
            }
            Ok::<(), IpamError>(())
        };
        match tokio::time::timeout(left, work).await {
            Ok(Ok(())) => {
                info!(container = %p.container_id, handle = %p.handle, "completed a pending release");
                remove(&path);
                report.completed += 1;
            }
            Ok(Err(e)) => {
                debug!(container = %p.container_id, error = %e, "pending release still failing");
                report.remaining += 1;
            }
            Err(_) => report.remaining += 1,
        }
        drop(guard);
    }
    report
}
