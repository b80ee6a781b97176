//! The datastore contract suite: every case is written once, here, against
//! [`ContractTarget`], and run unchanged against the memory, etcd and Kubernetes backends
//! (`tests/contract_*.rs`, one test per case through [`contract_tests!`](crate::contract_tests)).
//!
//! A case gets a fresh target, so it sees only what it wrote itself.

use crate::apiserver::{require_apiserver, ApiServerProcess};
use crate::etcd::EtcdProcess;
use futures::stream::BoxStream;
use futures::StreamExt;
use margay_api::store::etcd::EtcdBackend;
use margay_api::store::kube::KubeBackend;
use margay_api::store::memory::MemoryBackend;
use margay_api::store::MAX_COMMIT_WRITES;
use margay_api::{
    Backend, Commit, Condition, IPAMHandle, IPAMHandleSpec, IPPool, IPPoolSpec, IPPoolStatus, Kind,
    Node, Reads, Revision, Store, StoreError, WatchEvent,
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How long a case waits for an event it expects.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A datastore under test, fresh for each case.
#[async_trait::async_trait]
pub trait ContractTarget: Send + Sync {
    /// The backend under test; every call returns the same store.
    fn backend(&self) -> Arc<dyn Backend>;

    /// The typed facade over [`backend`](Self::backend).
    fn store(&self) -> Store {
        Store::new(self.backend())
    }

    /// Discards history so that a watch from a revision well before `revision` fails with
    /// `TooOld`, while a watch from `revision` (the current one, from a listing) still works.
    async fn compact(&self, revision: Revision) -> anyhow::Result<()>;
}

// ===== targets =====

/// The in-memory backend.
pub struct MemoryTarget {
    backend: MemoryBackend,
}

impl MemoryTarget {
    pub fn new() -> MemoryTarget {
        MemoryTarget {
            backend: MemoryBackend::new(),
        }
    }

    /// For [`contract_tests!`](crate::contract_tests): never skipped.
    pub async fn start() -> Option<MemoryTarget> {
        Some(MemoryTarget::new())
    }
}

impl Default for MemoryTarget {
    fn default() -> Self {
        MemoryTarget::new()
    }
}

#[async_trait::async_trait]
impl ContractTarget for MemoryTarget {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }

    async fn compact(&self, revision: Revision) -> anyhow::Result<()> {
        self.backend.compact(revision);
        Ok(())
    }
}

/// A real etcd process of its own, used through [`EtcdBackend`].
pub struct EtcdTarget {
    backend: EtcdBackend,
    etcd: EtcdProcess,
}

impl EtcdTarget {
    /// Starts an etcd; fails the test (with the reason) if it cannot.
    pub async fn start() -> Option<EtcdTarget> {
        let etcd = EtcdProcess::start().await.expect("starting etcd");
        let backend = etcd
            .backend(margay_api::store::etcd::DEFAULT_PREFIX)
            .await
            .expect("connecting to etcd");
        Some(EtcdTarget { backend, etcd })
    }

    pub fn etcd(&self) -> &EtcdProcess {
        &self.etcd
    }
}

#[async_trait::async_trait]
impl ContractTarget for EtcdTarget {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }

    async fn compact(&self, revision: Revision) -> anyhow::Result<()> {
        self.etcd.compact(revision).await
    }
}

/// A real kube-apiserver with its own etcd, used through [`KubeBackend`].
pub struct KubeTarget {
    backend: KubeBackend,
    apiserver: ApiServerProcess,
}

impl KubeTarget {
    /// Starts an API server from `KUBE_APISERVER_BIN`; without it, prints one `SKIPPED` line per
    /// test process and returns `None`. A server that is named but does not start fails the
    /// test.
    pub async fn start() -> Option<KubeTarget> {
        let bin = require_apiserver("kubernetes datastore contract")?;
        let apiserver = ApiServerProcess::start(&bin)
            .await
            .expect("starting kube-apiserver");
        let backend = KubeBackend::new(apiserver.client().expect("kube client"))
            // Short watch requests, so that the suite also exercises re-establishing them.
            .with_watch_timeout(Duration::from_secs(15))
            .with_page_size(50);
        Some(KubeTarget { backend, apiserver })
    }

    pub fn apiserver(&self) -> &ApiServerProcess {
        &self.apiserver
    }
}

#[async_trait::async_trait]
impl ContractTarget for KubeTarget {
    fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(self.backend.clone())
    }

    async fn compact(&self, revision: Revision) -> anyhow::Result<()> {
        // resourceVersions are the API server's etcd revisions.
        self.apiserver.etcd().compact(revision).await
    }
}

/// One `#[tokio::test]` per contract case, against the target made by `$start` (an `async fn
/// () -> Option<Target>`; `None` skips).
#[macro_export]
macro_rules! contract_tests {
    ($start:path) => {
        $crate::contract_tests!(@cases $start;
            create_get_list_and_already_exists,
            update_needs_the_revision_it_read,
            update_keeps_status_and_update_status_keeps_spec,
            delete_needs_the_revision_it_read,
            watch_from_a_listing_sees_every_later_change_in_order,
            watch_resumes_from_the_last_seen_revision_without_gaps_or_repeats,
            compaction_makes_old_watches_too_old_and_relisting_recovers,
            kinds_are_isolated,
            concurrent_compare_and_swap_loses_no_increment,
            typed_round_trip_keeps_every_field,
            commit_is_all_or_nothing_and_names_the_failing_object,
            commit_creates_updates_and_deletes_together,
            a_commit_is_seen_by_watches_at_one_revision,
            concurrent_commits_on_overlapping_objects_never_both_succeed,
            a_commit_carries_up_to_its_limit_of_writes,
            prefix_listings_names_and_read_batches,
        );
    };
    (@cases $start:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(target) = $start().await else { return };
                $crate::contract::$case(&target).await;
            }
        )*
    };
}

// ===== objects =====

fn valid_condition() -> Condition {
    Condition {
        type_: "Valid".into(),
        status: "True".into(),
        reason: "Valid".into(),
        message: "ok".into(),
        last_transition_time: None,
    }
}

/// A pool with a status, which a create must not store.
pub fn pool(name: &str, cidr: &str) -> IPPool {
    let mut p = IPPool::new(
        name,
        IPPoolSpec {
            cidr: cidr.into(),
            ..Default::default()
        },
    );
    p.status = Some(IPPoolStatus {
        conditions: vec![valid_condition()],
        block_size: None,
    });
    p
}

const COUNTER_BLOCK: &str = "10.0.0.0/26";

/// A handle used as a counter of the addresses it holds in one block.
pub fn handle(name: &str) -> IPAMHandle {
    IPAMHandle::new(
        name,
        IPAMHandleSpec {
            handle_id: name.into(),
            block: BTreeMap::from([(COUNTER_BLOCK.into(), 0)]),
            deleted: false,
        },
    )
}

fn rev<R: kube::Resource>(obj: &R) -> Revision {
    obj.meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("objects read from a store carry a numeric resourceVersion")
}

fn name<R: kube::Resource>(obj: &R) -> String {
    obj.meta().name.clone().unwrap_or_default()
}

type Watch<R> = BoxStream<'static, Result<WatchEvent<R>, StoreError>>;

/// The next change (bookmarks skipped), failing the test after [`EVENT_TIMEOUT`].
async fn next_change<R: margay_api::MargayResource>(w: &mut Watch<R>) -> WatchEvent<R> {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Err(_) => panic!("no change seen within {EVENT_TIMEOUT:?}"),
            Ok(None) => panic!("the watch ended"),
            Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(Some(Ok(ev))) => return ev,
        }
    }
}

/// Fails the test if a change arrives within `quiet`.
async fn assert_no_change<R: margay_api::MargayResource>(w: &mut Watch<R>, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Err(_) => return,
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(other) => panic!("expected no more changes, got {other:?}"),
        }
    }
}

/// A short description of a change, to compare sequences.
fn describe<R: margay_api::MargayResource>(ev: &WatchEvent<R>) -> (String, String, Revision) {
    match ev {
        WatchEvent::Added(o) => ("Added".into(), name(o), rev(o)),
        WatchEvent::Modified(o) => ("Modified".into(), name(o), rev(o)),
        WatchEvent::Deleted { name, revision, .. } => ("Deleted".into(), name.clone(), *revision),
        WatchEvent::Bookmark(r) => ("Bookmark".into(), String::new(), *r),
    }
}

fn assert_strictly_increasing(revs: &[Revision]) {
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "revisions must strictly increase: {revs:?}"
    );
}

// ===== cases =====

/// create, get, list; a second create of the same name is AlreadyExists; absent is NotFound.
pub async fn create_get_list_and_already_exists(t: &dyn ContractTarget) {
    let store = t.store();
    let a = store.create(&pool("a", "10.1.0.0/16")).await.unwrap();
    let b = store.create(&pool("b", "10.2.0.0/16")).await.unwrap();
    assert!(rev(&b) > rev(&a), "later writes have higher revisions");
    assert_eq!(a.spec.cidr, "10.1.0.0/16");

    let got: IPPool = store.get("a").await.unwrap();
    assert_eq!(got, a, "get returns what create returned");

    let (items, list_rev) = store.list::<IPPool>().await.unwrap();
    let names: BTreeSet<String> = items.iter().map(name).collect();
    assert_eq!(names, BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert!(
        list_rev >= rev(&b),
        "a listing is at least as new as its items"
    );

    let err = store.create(&pool("a", "10.3.0.0/16")).await.unwrap_err();
    assert!(err.is_already_exists(), "second create: {err:?}");
    let still: IPPool = store.get("a").await.unwrap();
    assert_eq!(
        still.spec.cidr, "10.1.0.0/16",
        "a refused create changes nothing"
    );

    let err = store.get::<IPPool>("missing").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(store.try_get::<IPPool>("missing").await.unwrap(), None);
    let (handles, _) = store.list::<IPAMHandle>().await.unwrap();
    assert!(
        handles.is_empty(),
        "an empty kind lists nothing: {handles:?}"
    );
}

/// update succeeds only at the revision read; a stale one is Conflict with the actual revision.
pub async fn update_needs_the_revision_it_read(t: &dyn ContractTarget) {
    let store = t.store();
    let v1 = store.create(&pool("p", "10.0.0.0/16")).await.unwrap();

    let mut change = v1.clone();
    change.spec.nat_outgoing = true;
    let v2 = store.update(&change).await.unwrap();
    assert!(rev(&v2) > rev(&v1));
    assert!(v2.spec.nat_outgoing);

    let mut stale = v1.clone();
    stale.spec.disabled = true;
    let err = store.update(&stale).await.unwrap_err();
    match err {
        StoreError::Conflict {
            expected, actual, ..
        } => {
            assert_eq!(expected, rev(&v1));
            assert_eq!(
                actual,
                Some(rev(&v2)),
                "the conflict names the stored revision"
            );
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let now: IPPool = store.get("p").await.unwrap();
    assert_eq!(now, v2, "a refused update changes nothing");
    assert!(!now.spec.disabled);

    let mut ghost = v2.clone();
    ghost.metadata.name = Some("ghost".into());
    let err = store.update(&ghost).await.unwrap_err();
    assert!(err.is_not_found(), "update of an absent object: {err:?}");
}

/// Status is written separately from spec, in both directions (IPPool has a status).
pub async fn update_keeps_status_and_update_status_keeps_spec(t: &dyn ContractTarget) {
    let store = t.store();
    let created = store.create(&pool("p", "10.0.0.0/16")).await.unwrap();
    assert_eq!(created.status, None, "create does not store a status");

    let mut with_status = created.clone();
    with_status.status = Some(IPPoolStatus {
        conditions: vec![valid_condition()],
        block_size: None,
    });
    // A spec change smuggled into a status write must be ignored.
    with_status.spec.cidr = "10.9.0.0/16".into();
    let s1 = store.update_status(&with_status).await.unwrap();
    assert!(rev(&s1) > rev(&created));
    let got: IPPool = store.get("p").await.unwrap();
    assert_eq!(
        got.status, with_status.status,
        "update_status writes status"
    );
    assert_eq!(got.spec.cidr, "10.0.0.0/16", "update_status keeps spec");

    let mut spec_change = got.clone();
    spec_change.spec.nat_outgoing = true;
    spec_change.status = None;
    let u = store.update(&spec_change).await.unwrap();
    let got: IPPool = store.get("p").await.unwrap();
    assert!(got.spec.nat_outgoing, "update writes spec");
    assert_eq!(got.status, with_status.status, "update keeps status");
    assert_eq!(rev(&got), rev(&u));

    let stale = s1;
    let err = store.update_status(&stale).await.unwrap_err();
    assert!(
        err.is_conflict(),
        "update_status at a stale revision: {err:?}"
    );
}

/// delete succeeds only at the revision read; afterwards the object is NotFound.
pub async fn delete_needs_the_revision_it_read(t: &dyn ContractTarget) {
    let store = t.store();
    let v1 = store.create(&handle("h")).await.unwrap();
    let mut change = v1.clone();
    change.spec.deleted = true;
    let v2 = store.update(&change).await.unwrap();

    let err = store.delete(&v1).await.unwrap_err();
    match err {
        StoreError::Conflict { actual, .. } => assert_eq!(actual, Some(rev(&v2))),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let kept: IPAMHandle = store.get("h").await.unwrap();
    assert_eq!(kept, v2, "a refused delete keeps the object");

    store.delete_at::<IPAMHandle>("h", rev(&v2)).await.unwrap();
    let err = store.get::<IPAMHandle>("h").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = store.delete(&v2).await.unwrap_err();
    assert!(err.is_not_found(), "second delete: {err:?}");
}

/// Watching from a listing's revision delivers every later change, in order, with the
/// revisions the writes returned.
pub async fn watch_from_a_listing_sees_every_later_change_in_order(t: &dyn ContractTarget) {
    let store = t.store();
    let a = store.create(&pool("a", "10.1.0.0/16")).await.unwrap();
    let (_, list_rev) = store.list::<IPPool>().await.unwrap();
    let mut w = store.watch::<IPPool>(list_rev).await.unwrap();

    let b = store.create(&pool("b", "10.2.0.0/16")).await.unwrap();
    let mut b2 = b.clone();
    b2.spec.nat_outgoing = true;
    let b2 = store.update(&b2).await.unwrap();
    let mut b3 = b2.clone();
    b3.status = Some(IPPoolStatus {
        conditions: vec![valid_condition()],
        block_size: None,
    });
    let b3 = store.update_status(&b3).await.unwrap();
    store.delete(&a).await.unwrap();
    let c = store.create(&pool("c", "10.3.0.0/16")).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_change(&mut w).await);
    }
    let got: Vec<_> = seen.iter().map(describe).collect();
    let kinds: Vec<(&str, &str)> = got
        .iter()
        .map(|(k, n, _)| (k.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("Added", "b"),
            ("Modified", "b"),
            ("Modified", "b"),
            ("Deleted", "a"),
            ("Added", "c")
        ]
    );
    let revs: Vec<Revision> = got.iter().map(|(_, _, r)| *r).collect();
    assert_strictly_increasing(&revs);
    assert!(revs[0] > list_rev);
    assert_eq!(revs[0], rev(&b));
    assert_eq!(revs[1], rev(&b2));
    assert_eq!(revs[2], rev(&b3));
    assert_eq!(revs[4], rev(&c));
    match &seen[0] {
        WatchEvent::Added(o) => assert_eq!(o, &b, "the event carries the object as written"),
        other => panic!("{other:?}"),
    }
    match &seen[2] {
        WatchEvent::Modified(o) => assert_eq!(o.status, b3.status),
        other => panic!("{other:?}"),
    }
    match &seen[3] {
        WatchEvent::Deleted {
            last: Some(last), ..
        } => {
            assert_eq!(
                last.spec, a.spec,
                "a delete carries the object's last state"
            )
        }
        other => panic!("expected Deleted with the last state, got {other:?}"),
    }
    assert_no_change(&mut w, Duration::from_millis(500)).await;
}

/// A watcher that restarts from the last revision it saw gets exactly what it missed.
pub async fn watch_resumes_from_the_last_seen_revision_without_gaps_or_repeats(
    t: &dyn ContractTarget,
) {
    let store = t.store();
    let (_, start) = store.list::<IPAMHandle>().await.unwrap();
    let mut w = store.watch::<IPAMHandle>(start).await.unwrap();
    let x1 = store.create(&handle("x1")).await.unwrap();
    store.create(&handle("x2")).await.unwrap();
    store.create(&handle("x3")).await.unwrap();
    let e1 = next_change(&mut w).await;
    let e2 = next_change(&mut w).await;
    let last_seen = e2.revision();
    assert_eq!(describe(&e1).1, "x1");
    assert_eq!(describe(&e2).1, "x2");
    drop(w);

    store.create(&handle("x4")).await.unwrap();
    let mut x1b = x1.clone();
    x1b.spec.deleted = true;
    store.update(&x1b).await.unwrap();
    let x2: IPAMHandle = store.get("x2").await.unwrap();
    store.delete(&x2).await.unwrap();

    let mut w = store.watch::<IPAMHandle>(last_seen).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(describe(&next_change(&mut w).await));
    }
    let names: Vec<(&str, &str)> = got
        .iter()
        .map(|(k, n, _)| (k.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Added", "x3"),
            ("Added", "x4"),
            ("Modified", "x1"),
            ("Deleted", "x2")
        ]
    );
    let revs: Vec<Revision> = got.iter().map(|(_, _, r)| *r).collect();
    assert_strictly_increasing(&revs);
    assert!(
        revs[0] > last_seen,
        "nothing at or before the resume point is repeated"
    );
    assert_no_change(&mut w, Duration::from_millis(500)).await;
}

/// After compaction a watch from an old revision is TooOld with advice; a fresh listing and a
/// watch from its revision work.
pub async fn compaction_makes_old_watches_too_old_and_relisting_recovers(t: &dyn ContractTarget) {
    let store = t.store();
    let mut p = store.create(&pool("p", "10.0.0.0/16")).await.unwrap();
    let (_, old) = store.list::<IPPool>().await.unwrap();
    for i in 0..5 {
        p.spec.node_selector = format!("rack == 'r{i}'");
        p = store.update(&p).await.unwrap();
    }
    let (_, now) = store.list::<IPPool>().await.unwrap();
    assert!(now >= old + 5);
    t.compact(now).await.unwrap();

    // TooOld may be reported by the watch call itself or as the stream's first item.
    let err = match store.watch::<IPPool>(old).await {
        Err(e) => e,
        Ok(mut w) => loop {
            match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
                Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
                Ok(Some(Err(e))) => break e,
                other => panic!("expected TooOld from a compacted revision, got {other:?}"),
            }
        },
    };
    match &err {
        StoreError::TooOld { kind, .. } => assert_eq!(*kind, Kind::IPPool),
        other => panic!("expected TooOld, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("too old") && msg.contains("list again"),
        "the error tells the caller what to do: {msg}"
    );

    let (items, relisted) = store.list::<IPPool>().await.unwrap();
    assert_eq!(items, vec![p.clone()]);
    let mut w = store.watch::<IPPool>(relisted).await.unwrap();
    p.spec.nat_outgoing = true;
    let p2 = store.update(&p).await.unwrap();
    match next_change(&mut w).await {
        WatchEvent::Modified(o) => assert_eq!(o, p2),
        other => panic!("expected Modified, got {other:?}"),
    }
}

/// Objects and watches of one kind never show another kind's, even under the same name.
pub async fn kinds_are_isolated(t: &dyn ContractTarget) {
    let store = t.store();
    let (_, start) = store.list::<IPPool>().await.unwrap();
    let mut pools = store.watch::<IPPool>(start).await.unwrap();
    let mut handles = store.watch::<IPAMHandle>(start).await.unwrap();

    let h = store.create(&handle("same")).await.unwrap();
    let p = store.create(&pool("same", "10.0.0.0/16")).await.unwrap();

    match next_change(&mut pools).await {
        WatchEvent::Added(o) => assert_eq!(o, p),
        other => panic!("the pool watch saw {other:?}"),
    }
    match next_change(&mut handles).await {
        WatchEvent::Added(o) => assert_eq!(o, h),
        other => panic!("the handle watch saw {other:?}"),
    }
    let (ps, _) = store.list::<IPPool>().await.unwrap();
    let (hs, _) = store.list::<IPAMHandle>().await.unwrap();
    assert_eq!(ps, vec![p.clone()]);
    assert_eq!(hs, vec![h.clone()]);

    store.delete(&h).await.unwrap();
    assert_eq!(store.get::<IPPool>("same").await.unwrap(), p);
    assert!(matches!(
        next_change(&mut handles).await,
        WatchEvent::Deleted { .. }
    ));
    assert_no_change(&mut pools, Duration::from_millis(500)).await;
}

/// Tasks incrementing one counter with read / update-if-revision / retry lose nothing, and
/// every successful write has its own revision.
pub async fn concurrent_compare_and_swap_loses_no_increment(t: &dyn ContractTarget) {
    const TASKS: usize = 8;
    const INCREMENTS: usize = 1000;
    let store = t.store();
    store.create(&handle("counter")).await.unwrap();

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::with_capacity(INCREMENTS);
            let mut conflicts = 0usize;
            for _ in 0..INCREMENTS {
                loop {
                    let mut h: IPAMHandle = store.get("counter").await.expect("read the counter");
                    *h.spec.block.get_mut(COUNTER_BLOCK).expect("counter block") += 1;
                    match store.update(&h).await {
                        Ok(written) => {
                            revisions.push(rev(&written));
                            break;
                        }
                        Err(e) if e.is_conflict() => conflicts += 1,
                        Err(e) => panic!("increment failed: {e}"),
                    }
                }
            }
            (revisions, conflicts)
        }));
    }
    let mut all = HashSet::new();
    let mut writes = 0;
    let mut conflicts = 0;
    for task in tasks {
        let (revs, c) = task.await.expect("an incrementing task panicked");
        writes += revs.len();
        conflicts += c;
        all.extend(revs);
    }
    let h: IPAMHandle = store.get("counter").await.unwrap();
    assert_eq!(
        h.spec.block[COUNTER_BLOCK],
        (TASKS * INCREMENTS) as i64,
        "every successful compare-and-swap counts exactly once ({conflicts} conflicts retried)"
    );
    assert_eq!(writes, TASKS * INCREMENTS);
    assert_eq!(
        all.len(),
        writes,
        "every successful write has a distinct revision"
    );
}

/// Every field, labels and annotations included, survives a create and a get.
pub async fn typed_round_trip_keeps_every_field(t: &dyn ContractTarget) {
    let store = t.store();
    let mut p = IPPool::new(
        "rich",
        IPPoolSpec {
            cidr: "10.244.0.0/16".into(),
            block_size: Some(24),
            ipip_mode: margay_api::EncapMode::CrossSubnet,
            nat_outgoing: true,
            disable_bgp_export: true,
            node_selector: "zone == 'a'".into(),
            ..Default::default()
        },
    );
    p.metadata.labels = Some(BTreeMap::from([
        ("margay.io/zone".to_string(), "a".to_string()),
        ("team".to_string(), "net".to_string()),
    ]));
    p.metadata.annotations = Some(BTreeMap::from([(
        "margay.io/note".to_string(),
        "kept".to_string(),
    )]));
    let created = store.create(&p).await.unwrap();
    let got: IPPool = store.get("rich").await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.spec, p.spec);
    assert_eq!(got.metadata.labels, p.metadata.labels);
    assert_eq!(got.metadata.annotations, p.metadata.annotations);
    assert_eq!(got.metadata.name.as_deref(), Some("rich"));
    assert!(rev(&got) > 0);

    let mut relabel = got.clone();
    relabel
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "infra".into());
    store.update(&relabel).await.unwrap();
    let got: IPPool = store.get("rich").await.unwrap();
    assert_eq!(
        got.metadata.labels.as_ref().unwrap()["team"],
        "infra",
        "update writes labels"
    );
}

// ===== commits =====

fn count(h: &IPAMHandle) -> i64 {
    h.spec.block[COUNTER_BLOCK]
}

fn with_count(h: &IPAMHandle, n: i64) -> IPAMHandle {
    let mut h = h.clone();
    h.spec.block.insert(COUNTER_BLOCK.into(), n);
    h
}

fn with_nat(p: &IPPool) -> IPPool {
    let mut p = p.clone();
    p.spec.nat_outgoing = !p.spec.nat_outgoing;
    p
}

fn assert_names(err: &StoreError, kind: Kind, name: &str) {
    assert!(
        err.is_about(kind, name),
        "the error must name {kind} {name:?}: {err:?}"
    );
}

/// A commit with a failed condition writes nothing (atomic backends) and its error names the
/// object whose condition failed, the first in the commit's order. On a backend that commits
/// in order, the writes before the failed one stay and none after it is made. Refusals found
/// before writing (an invalid object, an object written twice) write nothing on any backend.
pub async fn commit_is_all_or_nothing_and_names_the_failing_object(t: &dyn ContractTarget) {
    let store = t.store();
    let atomic = store.atomic_commit();
    store.create(&pool("p", "10.1.0.0/16")).await.unwrap();
    let h = store.create(&handle("h")).await.unwrap();
    let h_now = store.update(&with_count(&h, 5)).await.unwrap();

    // A stale revision, last in the commit.
    let p: IPPool = store.get("p").await.unwrap();
    let err = store
        .commit(
            Commit::new()
                .create(&pool("n", "10.9.0.0/16"))
                .update(&with_nat(&p))
                .update(&with_count(&h, 1)),
        )
        .await
        .unwrap_err();
    match &err {
        StoreError::Conflict {
            kind: Kind::IPAMHandle,
            name,
            expected,
            actual,
        } if name == "h" => {
            assert_eq!(*expected, rev(&h));
            assert_eq!(*actual, Some(rev(&h_now)));
        }
        other => panic!("expected Conflict naming IPAMHandle h, got {other:?}"),
    }
    assert_eq!(
        store.get::<IPAMHandle>("h").await.unwrap(),
        h_now,
        "the stale object is untouched"
    );
    let p_after: IPPool = store.get("p").await.unwrap();
    let n_after = store.try_get::<IPPool>("n").await.unwrap();
    if atomic {
        assert_eq!(p_after, p, "nothing of a failed commit is written");
        assert_eq!(n_after, None, "nothing of a failed commit is written");
    } else {
        assert_eq!(
            p_after.spec,
            with_nat(&p).spec,
            "writes before the failure stay"
        );
        assert!(n_after.is_some(), "writes before the failure stay");
        store.delete(&n_after.unwrap()).await.unwrap();
    }

    // A create of a name that exists, after an update that would succeed.
    let p: IPPool = store.get("p").await.unwrap();
    let err = store
        .commit(Commit::new().update(&with_nat(&p)).create(&handle("h")))
        .await
        .unwrap_err();
    assert!(err.is_already_exists(), "{err:?}");
    assert_names(&err, Kind::IPAMHandle, "h");
    if atomic {
        assert_eq!(store.get::<IPPool>("p").await.unwrap(), p);
    }

    // An update of an object that is gone.
    let gone = store.create(&pool("gone", "10.8.0.0/16")).await.unwrap();
    store.delete(&gone).await.unwrap();
    let err = store
        .commit(
            Commit::new()
                .create(&pool("n2", "10.7.0.0/16"))
                .update(&with_nat(&gone)),
        )
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_names(&err, Kind::IPPool, "gone");
    if atomic {
        assert_eq!(store.try_get::<IPPool>("n2").await.unwrap(), None);
    }

    // Two failing conditions: the first in the commit's order is the one named.
    let p: IPPool = store.get("p").await.unwrap();
    let err = store
        .commit(
            Commit::new()
                .update(&with_count(&h, 2))
                .create(&pool("p", "10.1.0.0/16")),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    assert_names(&err, Kind::IPAMHandle, "h");
    assert_eq!(store.get::<IPPool>("p").await.unwrap(), p);

    // Refused before anything is written, on every backend: an invalid object ...
    let err = store
        .commit(
            Commit::new()
                .create(&pool("n3", "10.6.0.0/16"))
                .create(&pool("bad", "not-a-cidr")),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err:?}");
    assert_names(&err, Kind::IPPool, "bad");
    assert_eq!(store.try_get::<IPPool>("n3").await.unwrap(), None);
    // ... and one object written twice.
    let err = store
        .commit(
            Commit::new()
                .create(&pool("n4", "10.5.0.0/16"))
                .update(&with_nat(&p))
                .update(&p),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
    assert!(err.to_string().contains("twice"), "{err}");
    assert_eq!(store.try_get::<IPPool>("n4").await.unwrap(), None);
    assert_eq!(store.get::<IPPool>("p").await.unwrap(), p);
}

/// One commit creates, updates and deletes objects of several kinds. Each result is the object
/// as stored; an update keeps the stored status and a create drops one; an atomic commit
/// writes everything at one revision, newer than anything before.
pub async fn commit_creates_updates_and_deletes_together(t: &dyn ContractTarget) {
    let store = t.store();
    let p = store.create(&pool("p", "10.1.0.0/16")).await.unwrap();
    let mut with_status = p.clone();
    with_status.status = Some(IPPoolStatus {
        conditions: vec![valid_condition()],
        block_size: None,
    });
    let p = store.update_status(&with_status).await.unwrap();
    let old = store.create(&handle("old")).await.unwrap();

    let mut p2 = with_nat(&p);
    p2.status = None; // an update never writes status, so none is kept from here
    let done = store
        .commit(
            Commit::new()
                .create(&pool("q", "10.2.0.0/16"))
                .update(&p2)
                .delete(&old)
                .create(&with_count(&handle("new"), 3)),
        )
        .await
        .unwrap();

    let q: IPPool = done.get("q").unwrap();
    assert_eq!(store.get::<IPPool>("q").await.unwrap(), q);
    assert_eq!(q.status, None, "a create in a commit drops the status");
    let p_now: IPPool = done.get("p").unwrap();
    assert_eq!(store.get::<IPPool>("p").await.unwrap(), p_now);
    assert!(p_now.spec.nat_outgoing);
    assert_eq!(
        p_now.status, p.status,
        "an update in a commit keeps the status"
    );
    let new: IPAMHandle = done.get("new").unwrap();
    assert_eq!(count(&new), 3);
    assert_eq!(store.get::<IPAMHandle>("new").await.unwrap(), new);
    assert_eq!(store.try_get::<IPAMHandle>("old").await.unwrap(), None);
    assert!(done.get::<IPAMHandle>("old").unwrap_err().is_not_found());

    let revs = done.revisions();
    assert_eq!(revs.len(), 4);
    assert_eq!(revs[2], None, "a delete has no object");
    let written: Vec<Revision> = revs.iter().flatten().copied().collect();
    assert_eq!(written, vec![rev(&q), rev(&p_now), rev(&new)]);
    assert!(written.iter().all(|&r| r > rev(&old)));
    if store.atomic_commit() {
        assert!(
            written.iter().all(|&r| r == written[0]),
            "an atomic commit writes at one revision: {revs:?}"
        );
        let (_, list_rev) = store.list::<IPPool>().await.unwrap();
        assert_eq!(list_rev, written[0], "the commit is the latest write");
    } else {
        assert_strictly_increasing(&written);
    }
}

/// Watches see every change of a commit, with the revisions the commit returned: one revision
/// for all of them on an atomic backend, even several objects of one kind. A watch resumed
/// from that revision sees none of them again.
pub async fn a_commit_is_seen_by_watches_at_one_revision(t: &dyn ContractTarget) {
    let store = t.store();
    let a = store.create(&pool("a", "10.1.0.0/16")).await.unwrap();
    let h = store.create(&handle("h")).await.unwrap();
    let (_, from) = store.list::<IPPool>().await.unwrap();
    let mut pools = store.watch::<IPPool>(from).await.unwrap();
    let mut handles = store.watch::<IPAMHandle>(from).await.unwrap();

    let done = store
        .commit(
            Commit::new()
                .create(&pool("b", "10.2.0.0/16"))
                .create(&pool("c", "10.3.0.0/16"))
                .update(&with_nat(&a))
                .update(&with_count(&h, 7)),
        )
        .await
        .unwrap();
    let revs: Vec<Revision> = done.revisions().into_iter().flatten().collect();

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next_change(&mut pools).await));
    }
    let expected: Vec<(String, String, Revision)> = vec![
        ("Added".into(), "b".into(), revs[0]),
        ("Added".into(), "c".into(), revs[1]),
        ("Modified".into(), "a".into(), revs[2]),
    ];
    assert_eq!(seen, expected);
    match next_change(&mut handles).await {
        WatchEvent::Modified(o) => {
            assert_eq!(count(&o), 7);
            assert_eq!(rev(&o), revs[3]);
        }
        other => panic!("expected the handle's change, got {other:?}"),
    }
    if store.atomic_commit() {
        assert!(
            revs.iter().all(|&r| r == revs[0]),
            "one revision for the whole commit: {revs:?}"
        );
    } else {
        assert_strictly_increasing(&revs);
    }
    assert_no_change(&mut pools, Duration::from_millis(300)).await;

    // Resuming from the last revision handled: nothing of the commit comes again, and what
    // follows does.
    let mut resumed = store.watch::<IPPool>(revs[2]).await.unwrap();
    let d = store.create(&pool("d", "10.4.0.0/16")).await.unwrap();
    assert_eq!(
        describe(&next_change(&mut resumed).await),
        ("Added".to_string(), "d".to_string(), rev(&d))
    );
    assert_no_change(&mut resumed, Duration::from_millis(300)).await;
}

/// Tasks committing increments of two counters together, in either order, with re-read and
/// retry on failure: on an atomic backend both counters end at the number of commits (no
/// commit half-applied, none lost), and no two successful commits share a revision. On a
/// backend that commits in order, the first counter of a commit whose second write failed was
/// incremented, and exactly those extra increments show.
pub async fn concurrent_commits_on_overlapping_objects_never_both_succeed(t: &dyn ContractTarget) {
    const TASKS: usize = 4;
    const COMMITS: usize = 250;
    let store = t.store();
    let atomic = store.atomic_commit();
    store.create(&handle("a")).await.unwrap();
    store.create(&handle("b")).await.unwrap();

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let order = if task % 2 == 0 {
                ["a", "b"]
            } else {
                ["b", "a"]
            };
            let mut revisions = Vec::with_capacity(COMMITS);
            // Increments of one counter alone (its commit failed on the other, second write).
            let mut alone: BTreeMap<&str, i64> = BTreeMap::new();
            let mut failures = 0usize;
            for _ in 0..COMMITS {
                loop {
                    let first: IPAMHandle = store.get(order[0]).await.expect("read");
                    let second: IPAMHandle = store.get(order[1]).await.expect("read");
                    let commit = Commit::new()
                        .update(&with_count(&first, count(&first) + 1))
                        .update(&with_count(&second, count(&second) + 1));
                    match store.commit(commit).await {
                        Ok(done) => {
                            revisions.push(done.revisions());
                            break;
                        }
                        Err(e) if e.is_conflict() => {
                            failures += 1;
                            if e.is_about(Kind::IPAMHandle, order[1]) && !atomic {
                                *alone.entry(order[0]).or_default() += 1;
                            }
                        }
                        Err(e) => panic!("commit failed: {e}"),
                    }
                }
            }
            (revisions, alone, failures)
        }));
    }
    let mut all = HashSet::new();
    let mut alone: BTreeMap<&str, i64> = BTreeMap::new();
    let mut failures = 0;
    let mut commits = 0;
    for task in tasks {
        let (revs, a, f) = task.await.expect("a committing task panicked");
        commits += revs.len();
        failures += f;
        for (k, n) in a {
            *alone.entry(k).or_default() += n;
        }
        for r in revs {
            if atomic {
                assert!(
                    r[0].is_some() && r[0] == r[1],
                    "one revision per commit: {r:?}"
                );
            }
            all.insert(r[0]);
        }
    }
    assert_eq!(commits, TASKS * COMMITS);
    assert_eq!(
        all.len(),
        commits,
        "no two successful commits share a revision"
    );
    let total = (TASKS * COMMITS) as i64;
    for name in ["a", "b"] {
        let h: IPAMHandle = store.get(name).await.unwrap();
        assert_eq!(
            count(&h),
            total + alone.get(name).copied().unwrap_or(0),
            "counter {name}: every successful commit counts once ({failures} failed commits retried)"
        );
    }
    if atomic {
        assert!(alone.is_empty());
    }
}

/// A commit may carry MAX_COMMIT_WRITES writes (etcd's default transaction limit allows them);
/// one more is refused before anything is written.
pub async fn a_commit_carries_up_to_its_limit_of_writes(t: &dyn ContractTarget) {
    let store = t.store();
    let mut commit = Commit::new();
    for i in 0..MAX_COMMIT_WRITES {
        commit = commit.create(&handle(&format!("h{i}")));
    }
    let done = store.commit(commit).await.unwrap();
    assert_eq!(done.revisions().len(), MAX_COMMIT_WRITES);
    let (items, _) = store.list::<IPAMHandle>().await.unwrap();
    assert_eq!(items.len(), MAX_COMMIT_WRITES);

    let mut commit = Commit::new();
    for i in 0..=MAX_COMMIT_WRITES {
        commit = commit.create(&handle(&format!("x{i}")));
    }
    let err = store.commit(commit).await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&MAX_COMMIT_WRITES.to_string()),
        "{err}"
    );
    let (items, _) = store.list::<IPAMHandle>().await.unwrap();
    assert_eq!(
        items.len(),
        MAX_COMMIT_WRITES,
        "a refused commit writes nothing"
    );
}

/// `list_prefix` returns exactly the names with the prefix; `list_names` every name without
/// the objects; a batch of reads returns each result in order, absent objects as `None`, and
/// refuses to hand a result out as the wrong kind or twice.
pub async fn prefix_listings_names_and_read_batches(t: &dyn ContractTarget) {
    let store = t.store();
    for (n, cidr) in [
        ("node-a-1", "10.1.0.0/16"),
        ("node-a-2", "10.2.0.0/16"),
        ("node-ab-1", "10.3.0.0/16"),
        ("other", "10.4.0.0/16"),
    ] {
        store.create(&pool(n, cidr)).await.unwrap();
    }
    let h = store.create(&handle("h1")).await.unwrap();

    let (items, list_rev) = store.list_prefix::<IPPool>("node-a-").await.unwrap();
    let names: Vec<String> = items.iter().map(name).collect();
    assert_eq!(
        names,
        ["node-a-1", "node-a-2"],
        "only the prefix, in name order"
    );
    assert!(
        list_rev >= rev(&h),
        "a prefix listing is at the current revision"
    );
    let (none, _) = store.list_prefix::<IPPool>("zzz").await.unwrap();
    assert!(none.is_empty(), "no name has the prefix: {none:?}");

    let mut all = store.list_names::<IPPool>().await.unwrap();
    all.sort();
    assert_eq!(all, ["node-a-1", "node-a-2", "node-ab-1", "other"]);
    assert_eq!(store.list_names::<IPAMHandle>().await.unwrap(), ["h1"]);

    let mut set = store
        .read(
            Reads::new()
                .list_prefix::<IPPool>("node-a")
                .get::<IPPool>("other")
                .get::<IPPool>("missing")
                .list::<IPAMHandle>()
                .get::<Node>("no-such-node"),
        )
        .await
        .unwrap();
    let (pools, batch_rev) = set.list::<IPPool>(0).unwrap();
    let names: Vec<String> = pools.iter().map(name).collect();
    assert_eq!(names, ["node-a-1", "node-a-2", "node-ab-1"]);
    assert!(batch_rev >= rev(&h));
    let other = set.get::<IPPool>(1).unwrap().expect("other exists");
    assert_eq!(other.spec.cidr, "10.4.0.0/16");
    assert_eq!(
        other.status, None,
        "what a batch reads is what get reads: a create stores no status"
    );
    assert_eq!(other, store.get::<IPPool>("other").await.unwrap());
    assert_eq!(set.get::<IPPool>(2).unwrap(), None, "absent is None");
    let (handles, _) = set.list::<IPAMHandle>(3).unwrap();
    assert_eq!(handles, vec![h]);
    assert!(
        set.get::<IPPool>(4).is_err(),
        "a Node read is not handed out as an IPPool"
    );
    assert_eq!(set.get::<Node>(4).unwrap(), None);
    assert!(set.get::<Node>(4).is_err(), "a result is taken once");
    assert!(set.list::<IPPool>(9).is_err(), "no such read");

    let empty = store.read(Reads::new()).await.unwrap();
    drop(empty);
}
