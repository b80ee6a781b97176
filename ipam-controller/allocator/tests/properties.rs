//! Property tests on the in-memory store: random interleavings of assign, release (by handle,
//! by address, stale), claims and crashes between any two writes never hand one address to two
//! live handles, and released addresses come back only after, and as soon as, the cooldown
//! allows. Each case runs either with atomic commits (as on memory and etcd: the allocator's
//! one-commit paths) or with commits made write by write (as on Kubernetes: the ordered paths,
//! where a crash can fall between the writes of one commit).

mod common;

use common::*;
use margay_api::store::memory::MemoryBackend;
use margay_api::store::{
    commit_in_order, Backend, Kind, RawList, RawObject, RawWatch, RawWrite, Revision,
};
use margay_api::{Store, StoreError};
use margay_ipam::audit::{self, LiveSet, Snapshot};
use margay_ipam::{Allocator, AssignedAddress, Clock, IpamError};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A node's view of the shared store: it yields before every call (so concurrent requests
/// interleave at every datastore operation) and can be made to "crash": after `writes_left`
/// more writes every write fails, as if the process died there. An atomic commit is one write;
/// without `atomic`, a commit is its writes one by one, each counted.
#[derive(Debug)]
struct NodeBackend {
    inner: MemoryBackend,
    atomic: bool,
    /// Negative: no crash armed.
    writes_left: AtomicI64,
}

impl NodeBackend {
    fn write(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let left = self.writes_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Unavailable {
                backend: "memory",
                message: format!("simulated crash before writing {kind} {name}"),
                source: None,
            });
        }
        if left > 0 {
            self.writes_left.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for NodeBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError> {
        tokio::task::yield_now().await;
        self.inner.get(kind, name).await
    }
    async fn list(&self, kind: Kind) -> Result<RawList, StoreError> {
        tokio::task::yield_now().await;
        self.inner.list(kind).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<RawObject, StoreError> {
        tokio::task::yield_now().await;
        self.write(kind, name)?;
        self.inner.create(kind, name, value).await
    }
    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        tokio::task::yield_now().await;
        self.write(kind, name)?;
        self.inner.update(kind, name, value, expected).await
    }
    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        tokio::task::yield_now().await;
        self.write(kind, name)?;
        self.inner.update_status(kind, name, value, expected).await
    }
    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.write(kind, name)?;
        self.inner.delete(kind, name, expected).await
    }
    async fn commit(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError> {
        if !self.atomic {
            return commit_in_order(self, writes).await;
        }
        tokio::task::yield_now().await;
        if let Some(w) = writes.first() {
            self.write(w.kind(), w.name())?;
        }
        self.inner.commit(writes).await
    }
    fn atomic_commit(&self) -> bool {
        self.atomic
    }
    async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError> {
        self.inner.watch(kind, after).await
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Node assigns `n` IPv4 addresses to a fresh handle.
    Assign { node: usize, n: u32 },
    /// Release the `pick`th live handle by handle.
    ReleaseHandle { node: usize, pick: usize },
    /// Release the `pick`th live handle's addresses by address and sequence number.
    ReleaseIps { node: usize, pick: usize },
    /// Replay the release of an address already released (a stale, late DEL).
    StaleRelease { node: usize, pick: usize },
    /// The node's next request dies after `after` writes; the node then restarts.
    Crash { node: usize, after: u8 },
    /// Time passes.
    Advance { secs: u64 },
}

const NODES: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NODES, 1u32..4).prop_map(|(node, n)| Op::Assign { node, n }),
        2 => (0..NODES, any::<usize>()).prop_map(|(node, pick)| Op::ReleaseHandle { node, pick }),
        2 => (0..NODES, any::<usize>()).prop_map(|(node, pick)| Op::ReleaseIps { node, pick }),
        1 => (0..NODES, any::<usize>()).prop_map(|(node, pick)| Op::StaleRelease { node, pick }),
        1 => (0..NODES, 0u8..6).prop_map(|(node, after)| Op::Crash { node, after }),
        1 => (1u64..40).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// Steps of 1–3 operations that run concurrently.
fn steps() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..4), 1..40)
}

struct World {
    mem: MemoryBackend,
    shared: Store,
    backends: Vec<Arc<NodeBackend>>,
    allocators: Vec<Allocator>,
    clock: Clock,
    cooldown: u64,
    /// Handles the test holds (successful assigns not yet released) and their addresses.
    live: BTreeMap<String, Vec<AssignedAddress>>,
    /// When each address was last released for sure.
    released_at: HashMap<IpAddr, u64>,
    /// Releases already done, to replay as stale ones.
    old_releases: Vec<(IpAddr, u64)>,
    next_handle: u64,
}

impl World {
    async fn new(cooldown: u64, atomic: bool) -> World {
        let mem = MemoryBackend::new();
        let shared = Store::new(Arc::new(mem.clone()));
        // 16 addresses in four /30 blocks: exhaustion, borrowing and claims contend often.
        shared
            .create(&pool("p", "10.99.0.0/28", Some(30)))
            .await
            .unwrap();
        set_config(&shared, |c| c.ip_cooldown_seconds = cooldown as u32).await;
        let clock = Clock::manual(1_700_000_000);
        let mut w = World {
            mem,
            shared,
            backends: Vec::new(),
            allocators: Vec::new(),
            clock,
            cooldown,
            live: BTreeMap::new(),
            released_at: HashMap::new(),
            old_releases: Vec::new(),
            next_handle: 0,
        };
        for n in 0..NODES {
            let b = Arc::new(NodeBackend {
                inner: w.mem.clone(),
                atomic,
                writes_left: AtomicI64::new(-1),
            });
            w.allocators.push(alloc(
                &Store::new(b.clone()),
                &format!("node-{n}"),
                &w.clock,
            ));
            w.backends.push(b);
        }
        w
    }

    fn restart(&mut self, node: usize) {
        self.backends[node].writes_left.store(-1, Ordering::SeqCst);
        self.allocators[node] = alloc(
            &Store::new(self.backends[node].clone()),
            &format!("node-{node}"),
            &self.clock,
        );
    }

    fn pick(&self, pick: usize) -> Option<String> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(pick % self.live.len()).cloned()
    }
}

enum Done {
    Assigned(String, u32, Result<Vec<AssignedAddress>, IpamError>),
    Released(String, Result<(), IpamError>),
    Nothing,
}

async fn run_step(w: &mut World, step: &[Op]) {
    // A "pool full" answer can be checked against the store only when nothing else ran
    // concurrently (another request may hold addresses briefly and give them back).
    let alone = step.len() == 1;
    let mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Done>>>> = Vec::new();
    let mut taken: Vec<String> = Vec::new();
    let mut crashed: Vec<usize> = Vec::new();
    for op in step {
        match op {
            Op::Assign { node, n } => {
                let h = format!("h{}", w.next_handle);
                w.next_handle += 1;
                let a = w.allocators[*node].clone();
                let n = *n;
                futs.push(Box::pin(async move {
                    let r = a.assign(&v4(&h, n)).await.map(|x| x.addresses);
                    Done::Assigned(h, n, r)
                }));
            }
            Op::ReleaseHandle { node, pick } | Op::ReleaseIps { node, pick } => {
                let Some(h) = w.pick(*pick).filter(|h| !taken.contains(h)) else {
                    continue;
                };
                taken.push(h.clone());
                let a = w.allocators[*node].clone();
                let by_ip = matches!(op, Op::ReleaseIps { .. });
                let ips: Vec<(IpAddr, Option<u64>)> =
                    w.live[&h].iter().map(|x| (x.ip, Some(x.seq))).collect();
                futs.push(Box::pin(async move {
                    let r = if by_ip {
                        a.release_ips(&ips).await.map(|out| {
                            for o in out {
                                assert!(
                                    matches!(o, margay_ipam::ReleaseOutcome::Released { .. }),
                                    "a live allocation was not released: {o:?}"
                                );
                            }
                        })
                    } else {
                        a.release_by_handle(&h).await.map(drop)
                    };
                    Done::Released(h, r)
                }));
            }
            Op::StaleRelease { node, pick } => {
                if w.old_releases.is_empty() {
                    continue;
                }
                let (ip, seq) = w.old_releases[pick % w.old_releases.len()];
                let a = w.allocators[*node].clone();
                futs.push(Box::pin(async move {
                    // Whatever it finds, it must not free a newer allocation; the invariant
                    // check after the step tells.
                    let _ = a.release_ips(&[(ip, Some(seq))]).await;
                    Done::Nothing
                }));
            }
            Op::Crash { node, after } => {
                w.backends[*node]
                    .writes_left
                    .store(i64::from(*after), Ordering::SeqCst);
                crashed.push(*node);
            }
            Op::Advance { secs } => w.clock.advance(*secs),
        }
    }
    // Clock changes of this step happened above, so every request of the step runs at `now`.
    let now = w.clock.now();
    let mut results = futures::future::join_all(futs).await;
    // Releases first: an address released in this step may be handed out again in it.
    results.sort_by_key(|r| !matches!(r, Done::Released(..)));
    for r in results {
        match r {
            Done::Assigned(h, _, Ok(addrs)) => {
                for a in &addrs {
                    // Cooldown: never handed out before its cooldown ran out.
                    if let Some(&t) = w.released_at.get(&a.ip) {
                        assert!(
                            now >= t + w.cooldown,
                            "{} handed out at {now}, released at {t}, cooldown {}",
                            a.ip,
                            w.cooldown
                        );
                    }
                    for (other, held) in &w.live {
                        assert!(
                            held.iter().all(|x| x.ip != a.ip),
                            "{} handed to {h} while {other} holds it",
                            a.ip
                        );
                    }
                }
                w.live.insert(h, addrs);
            }
            Done::Assigned(h, n, Err(e)) => {
                if !e.is_retryable() {
                    assert!(
                        matches!(e, IpamError::PoolsFull { .. }),
                        "unexpected error for {h}: {e}"
                    );
                    if alone {
                        assert_really_full(w, n).await;
                    }
                }
                // A failed (or crashed) request's handle is not live: the runtime follows a
                // failed ADD with a DEL, which the GC below stands in for.
            }
            Done::Released(h, Ok(())) => {
                let held = w.live.remove(&h).unwrap_or_default();
                let t = now;
                for a in held {
                    w.released_at.insert(a.ip, t);
                    w.old_releases.push((a.ip, a.seq));
                }
            }
            Done::Released(h, Err(e)) => {
                assert!(e.is_retryable(), "release of {h} failed: {e}");
                // Crashed midway: the handle is dead to the test, some addresses may remain
                // allocated; they are leaks for the GC.
                w.live.remove(&h);
            }
            Done::Nothing => {}
        }
    }
    for n in crashed {
        w.restart(n);
    }
    check_invariants(w).await;
}

/// A "pool full" answer to a request for `n` must be true: every block exists and fewer than
/// `n` addresses may be handed out now.
async fn assert_really_full(w: &World, n: u32) {
    let snap = Snapshot::read(&w.shared).await.unwrap();

    let usage = audit::block_usage(&snap, w.clock.now());
    assert_eq!(usage.len(), 4, "a block was still unclaimed: {usage:#?}");
    assert!(
        usage.iter().map(|b| b.available).sum::<u64>() < u64::from(n),
        "pool reported full for {n} addresses with more free: {usage:#?}"
    );
}

async fn check_invariants(w: &World) {
    let snap = Snapshot::read(&w.shared).await.unwrap();
    let allocs = snap.allocations();
    let by_ip: HashMap<IpAddr, Option<String>> =
        allocs.iter().map(|a| (a.ip, a.handle.clone())).collect();
    assert_eq!(by_ip.len(), allocs.len(), "an address is allocated twice");
    // Every address the test holds is allocated in the store to its handle, with its seq.
    for (h, held) in &w.live {
        for a in held {
            let found = allocs.iter().find(|x| x.ip == a.ip);
            assert_eq!(
                found.and_then(|x| x.handle.as_deref()),
                Some(h.as_str()),
                "{} held by {h} in the test but not in the store",
                a.ip
            );
            assert_eq!(found.and_then(|x| x.seq), Some(a.seq));
        }
    }
    // No duplicate ownership of blocks, and every allocation has its handle object.
    for f in audit::check(&snap, None) {
        assert!(
            !matches!(
                f,
                audit::Finding::DuplicateOwnership { .. }
                    | audit::Finding::AllocationWithoutHandle { .. }
            ),
            "{f}"
        );
    }
}

/// What the controller's GC does, from the test's knowledge of live handles: release leaked
/// addresses and handles without allocations. Afterwards the records are consistent.
async fn collect_garbage(w: &mut World) {
    let snap = Snapshot::read(&w.shared).await.unwrap();
    let live = LiveSet {
        nodes: (0..NODES).map(|n| format!("node-{n}")).collect(),
        handles: w.live.keys().cloned().collect(),
        pods: None,
    };
    let gc = alloc(&w.shared, "gc", &w.clock);
    for f in audit::check(&snap, Some(&live)) {
        match f {
            audit::Finding::Leaked { ip, handle, .. } => {
                let seq = snap
                    .allocations()
                    .into_iter()
                    .find(|a| a.ip == ip && a.handle == handle)
                    .and_then(|a| a.seq);
                gc.release_ips(&[(ip, seq)]).await.unwrap();
            }
            audit::Finding::HandleWithoutAllocations { handle }
            | audit::Finding::HandleCountMismatch { handle, .. }
                if !w.live.contains_key(&handle) =>
            {
                gc.release_by_handle(&handle).await.unwrap();
            }
            _ => {}
        }
    }
    // Stale affinities (claims cut short) are finished or dropped by their node's next load.
    for a in &w.allocators {
        a.invalidate().await;
    }
    let snap = Snapshot::read(&w.shared).await.unwrap();
    let left: Vec<_> = audit::check(&snap, Some(&live))
        .into_iter()
        .filter(|f| !matches!(f, audit::Finding::StaleAffinity { .. }))
        .collect();
    assert!(left.is_empty(), "after GC: {left:#?}");
}

fn run(cooldown: u64, atomic: bool, steps: Vec<Vec<Op>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut w = World::new(cooldown, atomic).await;
        for step in &steps {
            run_step(&mut w, step).await;
        }
        collect_garbage(&mut w).await;
        // Everything can be handed out again once the cooldown has passed: the pool's 16
        // addresses, less what live handles hold.
        w.clock.advance(cooldown + 1);
        let held: usize = w.live.values().map(Vec::len).sum();
        let a = alloc(&w.shared, "node-0", &w.clock);
        let mut more = 0;
        while a.assign(&v4(&format!("fill{more}"), 1)).await.is_ok() {
            more += 1;
        }
        assert_eq!(held + more, 16, "held {held}, got {more} more");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_address_is_held_by_two_live_handles(steps in steps()) {
        run(0, true, steps);
    }

    #[test]
    fn no_address_is_held_by_two_live_handles_with_ordered_commits(steps in steps()) {
        run(0, false, steps);
    }

    #[test]
    fn released_addresses_return_within_the_cooldown_rules(steps in steps()) {
        run(30, true, steps);
    }

    #[test]
    fn released_addresses_return_within_the_cooldown_rules_with_ordered_commits(
        steps in steps(),
    ) {
        run(30, false, steps);
    }
}
