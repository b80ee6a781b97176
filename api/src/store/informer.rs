//! A local, continuously updated copy of every object of one kind: list once, then follow the
//! watch, resuming from the last revision after a lost connection and listing again when the
//! history is gone. The node agent, the controller and the route reflector read from it instead
//! of asking the datastore on every decision.

use super::{Revision, Store, StoreError, WatchEvent};
use crate::resources::MargayResource;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What an informer has seen so far.
#[derive(Debug)]
struct Cache<R> {
    objects: BTreeMap<String, R>,
    revision: Revision,
    synced: bool,
}

/// A live copy of all objects of kind `R`. Dropping it stops the background task.
#[derive(Debug)]
pub struct Informer<R: MargayResource> {
    cache: Arc<RwLock<Cache<R>>>,
    changed: watch::Receiver<u64>,
    task: JoinHandle<()>,
    failing: InformerHealth,
}

/// Whether an informer is following the datastore: cheap to clone, for health endpoints.
#[derive(Debug, Clone)]
pub struct InformerHealth {
    kind: &'static str,
    /// The error of the last failed list or watch, until one succeeds again.
    failing: Arc<std::sync::Mutex<Option<String>>>,
}

impl InformerHealth {
    /// A handle for `kind` that reports no failure yet.
    pub fn new(kind: &'static str) -> InformerHealth {
        InformerHealth {
            kind,
            failing: Arc::default(),
        }
    }

    /// Records the last list or watch failure (`None`: following again).
    pub fn set(&self, e: Option<String>) {
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// `Err` (naming the kind) while the informer cannot list or watch.
    pub fn check(&self) -> Result<(), String> {
        match &*self.failing.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(e) => Err(format!("cannot follow {}: {e}", self.kind)),
        }
    }
}

impl<R: MargayResource> Drop for Informer<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The back-off between attempts after the datastore failed: doubling from 100 ms to 5 s.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl<R: MargayResource> Informer<R> {
    /// Starts following kind `R` in `store`.
    pub fn spawn(store: Store) -> Informer<R> {
        let cache = Arc::new(RwLock::new(Cache {
            objects: BTreeMap::new(),
            revision: 0,
            synced: false,
        }));
        let (tx, changed) = watch::channel(0u64);
        let failing = InformerHealth::new(R::KIND.plural());
        let task = tokio::spawn(run(store, cache.clone(), tx, failing.clone()));
        Informer {
            cache,
            changed,
            task,
            failing,
        }
    }

    /// Whether this informer is following the datastore now.
    pub fn health(&self) -> InformerHealth {
        self.failing.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache<R>> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the first full listing has been loaded. Before that the copy is incomplete and
    /// must not be acted on.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// Waits until the first listing is loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.changed.clone();
        while !self.synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Every object, by name.
    pub fn snapshot(&self) -> Vec<R> {
        self.read().objects.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<R> {
        self.read().objects.get(name).cloned()
    }

    /// The store revision the copy reflects.
    pub fn revision(&self) -> Revision {
        self.read().revision
    }

    /// A receiver that changes whenever the copy does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|g| *g = g.wrapping_add(1));
}

async fn run<R: MargayResource>(
    store: Store,
    cache: Arc<RwLock<Cache<R>>>,
    tx: watch::Sender<u64>,
    failing: InformerHealth,
) {
    let mut backoff = BACKOFF_START;
    let mut need_list = true;
    loop {
        if need_list {
            match store.list::<R>().await {
                Ok((items, revision)) => {
                    let mut c = cache.write().unwrap_or_else(|p| p.into_inner());
                    c.objects = items
                        .into_iter()
                        .filter_map(|o| o.meta().name.clone().map(|n| (n, o)))
                        .collect();
                    c.revision = revision;
                    c.synced = true;
                    drop(c);
                    bump(&tx);
                    need_list = false;
                    backoff = BACKOFF_START;
                    failing.set(None);
                }
                Err(e) => {
                    tracing::warn!(kind = %R::KIND, error = %e, "listing failed; retrying");
                    failing.set(Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let after = cache.read().unwrap_or_else(|p| p.into_inner()).revision;
        let mut stream = match store.watch::<R>(after).await {
            Ok(s) => {
                failing.set(None);
                s
            }
            Err(StoreError::TooOld { .. }) => {
                need_list = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(kind = %R::KIND, error = %e, "watch failed; retrying");
                failing.set(Some(e.to_string()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    backoff = BACKOFF_START;
                    apply(&cache, ev);
                    bump(&tx);
                }
                Err(StoreError::TooOld { .. }) => {
                    need_list = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(kind = %R::KIND, error = %e, "watch ended; resuming");
                    failing.set(Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    break;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

fn apply<R: MargayResource>(cache: &RwLock<Cache<R>>, ev: WatchEvent<R>) {
    let mut c = cache.write().unwrap_or_else(|p| p.into_inner());
    let rev = ev.revision();
    match ev {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => {
            if let Some(n) = o.meta().name.clone() {
                c.objects.insert(n, o);
            }
        }
        WatchEvent::Deleted { name, .. } => {
            c.objects.remove(&name);
        }
        WatchEvent::Bookmark(_) => {}
    }
    c.revision = c.revision.max(rev);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{IPPool, IPPoolSpec};
    use crate::store::memory::MemoryBackend;

    fn pool(name: &str, cidr: &str) -> IPPool {
        IPPool::new(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                ..Default::default()
            },
        )
    }

    async fn until(inf: &Informer<IPPool>, what: &str, f: impl Fn(&Informer<IPPool>) -> bool) {
        let mut rx = inf.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f(inf) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    }

    #[tokio::test]
    async fn follows_creates_updates_and_deletes() {
        let mem = MemoryBackend::new();
        let store = Store::new(Arc::new(mem.clone()));
        store.create(&pool("a", "10.1.0.0/16")).await.unwrap();
        let inf = Informer::<IPPool>::spawn(store.clone());
        inf.wait_synced().await;
        assert_eq!(inf.snapshot().len(), 1);
        let mut b = store.create(&pool("b", "10.2.0.0/16")).await.unwrap();
        until(&inf, "b added", |i| i.get("b").is_some()).await;
        b.spec.disabled = true;
        let b = store.update(&b).await.unwrap();
        until(&inf, "b disabled", |i| {
            i.get("b").is_some_and(|p| p.spec.disabled)
        })
        .await;
        store.delete(&b).await.unwrap();
        until(&inf, "b deleted", |i| i.get("b").is_none()).await;
        assert_eq!(inf.revision(), mem.revision());
    }

    #[tokio::test]
    async fn relists_after_compaction_and_recovers_from_an_outage() {
        let mem = MemoryBackend::new();
        let store = Store::new(Arc::new(mem.clone()));
        let inf = Informer::<IPPool>::spawn(store.clone());
        inf.wait_synced().await;
        // While the datastore is away nothing is lost: changes made before and after it
        // returns all arrive.
        mem.set_offline(true);
        tokio::time::sleep(Duration::from_millis(150)).await;
        mem.set_offline(false);
        store.create(&pool("c", "10.3.0.0/16")).await.unwrap();
        until(&inf, "c after outage", |i| i.get("c").is_some()).await;
        // History compacted beyond what the informer saw: while it backs off after losing the
        // datastore, "d" is written and compacted away. Watching on from its old revision fails
        // with TooOld; only a relist finds "d".
        mem.set_offline(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        mem.set_offline(false);
        store.create(&pool("d", "10.4.0.0/16")).await.unwrap();
        mem.compact(mem.revision());
        store.create(&pool("e", "10.5.0.0/16")).await.unwrap();
        until(&inf, "d and e", |i| {
            i.get("d").is_some() && i.get("e").is_some()
        })
        .await;
        assert_eq!(inf.snapshot().len(), 3);
    }
}
