//! An in-memory backend with the same semantics as the real ones, for unit and property tests.
//! It keeps a history of changes so that watches can resume, and can be compacted on demand so
//! that the "too old" path is testable.

use super::{
    check_commit, merge_status, merge_update, stamp, Backend, Kind, RawEvent, RawList, RawObject,
    RawWatch, RawWrite, Revision, StoreError,
};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Changes kept for watchers before the oldest half is compacted away.
const HISTORY_LIMIT: usize = 1 << 18;

#[derive(Debug)]
struct Stored {
    value: Value,
    revision: Revision,
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    objects: BTreeMap<(Kind, String), Stored>,
    /// Every change after `compacted`, in revision order.
    history: Vec<(Kind, RawEvent)>,
    compacted: Revision,
    /// When set, every call fails as if the store could not be reached.
    offline: bool,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: watch::Sender<Revision>,
}

/// The in-memory datastore. Clones share one store.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    pub fn new() -> MemoryBackend {
        let (changed, _) = watch::channel(0);
        MemoryBackend {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed,
            }),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        // A panic while holding the lock cannot leave a half-applied write: every write is
        // computed before it is applied. Recover the guard rather than poisoning every caller.
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.offline {
            return Err(StoreError::Unavailable {
                backend: "memory",
                message: "the in-memory store is set offline".into(),
                source: None,
            });
        }
        Ok(state)
    }

    /// Forgets history up to and including `revision`; watches from before it fail with
    /// [`StoreError::TooOld`].
    pub fn compact(&self, revision: Revision) {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let revision = revision.min(state.revision);
        state.history.retain(|(_, ev)| ev.revision() > revision);
        state.compacted = state.compacted.max(revision);
    }

    /// The current store revision.
    pub fn revision(&self) -> Revision {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revision
    }

    /// Makes every call fail with [`StoreError::Unavailable`] until set back, to test callers'
    /// behaviour when the datastore is down.
    pub fn set_offline(&self, offline: bool) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .offline = offline;
        self.inner.changed.send_replace(self.revision());
    }

    /// Appends the events of one write (one revision) to the history and wakes watchers.
    fn record(&self, mut state: MutexGuard<'_, State>, events: Vec<(Kind, RawEvent)>) {
        let Some(rev) = events.last().map(|(_, ev)| ev.revision()) else {
            return;
        };
        state.history.extend(events);
        // Bound memory in long property runs: keep the newest half of a long history, cut at
        // a revision boundary so that a commit's events are kept or dropped together.
        if state.history.len() > HISTORY_LIMIT {
            let mut cut = state.history.len() / 2;
            let at = state.history[cut - 1].1.revision();
            while cut < state.history.len() && state.history[cut].1.revision() == at {
                cut += 1;
            }
            state.compacted = at;
            state.history.drain(..cut);
        }
        drop(state);
        self.inner.changed.send_replace(rev);
    }

    fn check_revision(
        state: &State,
        kind: Kind,
        name: &str,
        expected: Revision,
    ) -> Result<Value, StoreError> {
        match state.objects.get(&(kind, name.to_owned())) {
            None => Err(StoreError::NotFound {
                kind,
                name: name.to_owned(),
            }),
            Some(s) if s.revision != expected => Err(StoreError::Conflict {
                kind,
                name: name.to_owned(),
                expected,
                actual: Some(s.revision),
            }),
            Some(s) => Ok(s.value.clone()),
        }
    }

    /// The condition of one write against the current state; for an update or a delete, the
    /// stored value it applies to.
    fn check_write(state: &State, write: &RawWrite) -> Result<Option<Value>, StoreError> {
        match write {
            RawWrite::Create { kind, name, .. } => {
                match state.objects.get(&(*kind, name.clone())) {
                    Some(s) => Err(StoreError::AlreadyExists {
                        kind: *kind,
                        name: name.clone(),
                        revision: Some(s.revision),
                    }),
                    None => Ok(None),
                }
            }
            RawWrite::Update {
                kind,
                name,
                expected,
                ..
            }
            | RawWrite::Delete {
                kind,
                name,
                expected,
            } => Self::check_revision(state, *kind, name, *expected).map(Some),
        }
    }

    fn store(state: &mut State, kind: Kind, name: &str, mut value: Value) -> RawObject {
        let revision = state.revision;
        stamp(&mut value, name, revision);
        state.objects.insert(
            (kind, name.to_owned()),
            Stored {
                value: value.clone(),
                revision,
            },
        );
        RawObject {
            name: name.to_owned(),
            revision,
            value,
        }
    }

    /// Every write of a commit under one lock: all conditions are checked before anything is
    /// written, and all writes get the same revision.
    fn apply(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError> {
        check_commit("memory", &writes)?;
        let mut state = self.lock()?;
        let stored = writes
            .iter()
            .map(|w| Self::check_write(&state, w))
            .collect::<Result<Vec<_>, _>>()?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        state.revision += 1;
        let revision = state.revision;
        let mut out = Vec::with_capacity(writes.len());
        let mut events = Vec::with_capacity(writes.len());
        for (write, stored) in writes.into_iter().zip(stored) {
            match write {
                RawWrite::Create {
                    kind,
                    name,
                    mut value,
                } => {
                    // Status is written only through update_status, as with the Kubernetes
                    // backend, whose status subresource drops it from a create.
                    if let Value::Object(map) = &mut value {
                        map.remove("status");
                    }
                    let obj = Self::store(&mut state, kind, &name, value);
                    events.push((kind, RawEvent::Added(obj.clone())));
                    out.push(Some(obj));
                }
                RawWrite::Update {
                    kind, name, value, ..
                } => {
                    let merged = merge_update(&stored.unwrap_or_default(), &value);
                    let obj = Self::store(&mut state, kind, &name, merged);
                    events.push((kind, RawEvent::Modified(obj.clone())));
                    out.push(Some(obj));
                }
                RawWrite::Delete { kind, name, .. } => {
                    state.objects.remove(&(kind, name.clone()));
                    events.push((
                        kind,
                        RawEvent::Deleted {
                            name,
                            revision,
                            last: stored,
                        },
                    ));
                    out.push(None);
                }
            }
        }
        self.record(state, events);
        Ok(out)
    }

    /// [`apply`](Self::apply) of a single write.
    fn apply_one(&self, write: RawWrite) -> Result<Option<RawObject>, StoreError> {
        Ok(self.apply(vec![write])?.pop().flatten())
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError> {
        let state = self.lock()?;
        match state.objects.get(&(kind, name.to_owned())) {
            Some(s) => Ok(RawObject {
                name: name.to_owned(),
                revision: s.revision,
                value: s.value.clone(),
            }),
            None => Err(StoreError::NotFound {
                kind,
                name: name.to_owned(),
            }),
        }
    }

    async fn list(&self, kind: Kind) -> Result<RawList, StoreError> {
        let state = self.lock()?;
        let items = state
            .objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, name), s)| RawObject {
                name: name.clone(),
                revision: s.revision,
                value: s.value.clone(),
            })
            .collect();
        Ok(RawList {
            items,
            revision: state.revision,
        })
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<RawObject, StoreError> {
        let name = name.to_owned();
        let obj = self.apply_one(RawWrite::Create { kind, name, value })?;
        Ok(obj.expect("a create returns the object"))
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        let name = name.to_owned();
        let obj = self.apply_one(RawWrite::Update {
            kind,
            name,
            value,
            expected,
        })?;
        Ok(obj.expect("an update returns the object"))
    }

    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        if !kind.has_status() {
            return Err(StoreError::Rejected {
                backend: "memory",
                message: format!("{kind} has no status"),
            });
        }
        let mut state = self.lock()?;
        let stored = Self::check_revision(&state, kind, name, expected)?;
        let merged = merge_status(&stored, &value);
        state.revision += 1;
        let obj = Self::store(&mut state, kind, name, merged);
        self.record(state, vec![(kind, RawEvent::Modified(obj.clone()))]);
        Ok(obj)
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.apply_one(RawWrite::Delete {
            kind,
            name,
            expected,
        })?;
        Ok(())
    }

    async fn commit(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError> {
        self.apply(writes)
    }

    fn atomic_commit(&self) -> bool {
        true
    }

    async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError> {
        {
            let state = self.lock()?;
            if after < state.compacted {
                return Err(StoreError::TooOld {
                    kind,
                    requested: after,
                    oldest: Some(state.compacted + 1),
                });
            }
        }
        let me = self.clone();
        let rx = self.inner.changed.subscribe();
        let init = (me, rx, after, VecDeque::<RawEvent>::new(), false);
        Ok(stream::unfold(
            init,
            move |(me, mut rx, mut last, mut buf, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(ev) = buf.pop_front() {
                        last = ev.revision();
                        return Some((Ok(ev), (me, rx, last, buf, false)));
                    }
                    {
                        let state = me.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                        if state.offline {
                            let err = StoreError::Unavailable {
                                backend: "memory",
                                message: "the in-memory store went offline".into(),
                                source: None,
                            };
                            return Some((Err(err), (me.clone(), rx, last, buf, true)));
                        }
                        if last < state.compacted {
                            let err = StoreError::TooOld {
                                kind,
                                requested: last,
                                oldest: Some(state.compacted + 1),
                            };
                            return Some((Err(err), (me.clone(), rx, last, buf, true)));
                        }
                        let start = state
                            .history
                            .partition_point(|(_, ev)| ev.revision() <= last);
                        buf.extend(
                            state.history[start..]
                                .iter()
                                .filter(|(k, ev)| *k == kind && ev.revision() > last)
                                .map(|(_, ev)| ev.clone()),
                        );
                        if buf.is_empty() {
                            // Nothing of this kind yet; remember how far we looked.
                            rx.mark_unchanged();
                        }
                    }
                    if buf.is_empty() && rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
        .boxed())
    }
}
