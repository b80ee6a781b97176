//! An in-memory backend with the same semantics as the real ones, for unit and property tests.
//! It keeps a history of changes so that watches can resume, and can be compacted on demand so
//! that the "too old" path is testable.

use super::{
    merge_status, merge_update, stamp, Backend, Kind, RawEvent, RawList, RawObject, RawWatch,
    Revision, StoreError,
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

    fn commit(&self, mut state: MutexGuard<'_, State>, kind: Kind, event: RawEvent) {
        let rev = event.revision();
        state.history.push((kind, event));
        // Bound memory in long property runs: keep the newest half of a long history.
        if state.history.len() > HISTORY_LIMIT {
            let cut = state.history.len() / 2;
            state.compacted = state.history[cut - 1].1.revision();
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

    fn put(
        &self,
        mut state: MutexGuard<'_, State>,
        kind: Kind,
        name: &str,
        value: Value,
        added: bool,
    ) -> RawObject {
        state.revision += 1;
        let revision = state.revision;
        let mut value = value;
        stamp(&mut value, name, revision);
        state.objects.insert(
            (kind, name.to_owned()),
            Stored {
                value: value.clone(),
                revision,
            },
        );
        let obj = RawObject {
            name: name.to_owned(),
            revision,
            value,
        };
        let ev = if added {
            RawEvent::Added(obj.clone())
        } else {
            RawEvent::Modified(obj.clone())
        };
        self.commit(state, kind, ev);
        obj
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

    async fn create(
        &self,
        kind: Kind,
        name: &str,
        mut value: Value,
    ) -> Result<RawObject, StoreError> {
        // Status is written only through update_status, as with the Kubernetes backend, whose
        // status subresource drops it from a create.
        if let Value::Object(map) = &mut value {
            map.remove("status");
        }
        let state = self.lock()?;
        if let Some(s) = state.objects.get(&(kind, name.to_owned())) {
            return Err(StoreError::AlreadyExists {
                kind,
                name: name.to_owned(),
                revision: Some(s.revision),
            });
        }
        Ok(self.put(state, kind, name, value, true))
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        let state = self.lock()?;
        let stored = Self::check_revision(&state, kind, name, expected)?;
        let merged = merge_update(&stored, &value);
        Ok(self.put(state, kind, name, merged, false))
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
        let state = self.lock()?;
        let stored = Self::check_revision(&state, kind, name, expected)?;
        let merged = merge_status(&stored, &value);
        Ok(self.put(state, kind, name, merged, false))
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        let last = Self::check_revision(&state, kind, name, expected)?;
        state.objects.remove(&(kind, name.to_owned()));
        state.revision += 1;
        let revision = state.revision;
        self.commit(
            state,
            kind,
            RawEvent::Deleted {
                name: name.to_owned(),
                revision,
                last: Some(last),
            },
        );
        Ok(())
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
