use super::{Backend, Kind, RawEvent, RawObject, RawWrite, Revision, StoreError};
use crate::resources::MargayResource;
use futures::stream::{BoxStream, StreamExt};
use serde_json::Value;
use std::sync::Arc;

/// The typed datastore everyone uses. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

/// A typed change seen by [`Store::watch`].
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<R> {
    Added(R),
    Modified(R),
    Deleted {
        name: String,
        revision: Revision,
        last: Option<R>,
    },
    Bookmark(Revision),
}

impl<R: MargayResource> WatchEvent<R> {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Added(r) | WatchEvent::Modified(r) => revision_of(r).unwrap_or(0),
            WatchEvent::Deleted { revision, .. } | WatchEvent::Bookmark(revision) => *revision,
        }
    }
}

/// The revision recorded in an object read from a store (`metadata.resourceVersion`).
pub fn revision_of<R: MargayResource>(obj: &R) -> Option<Revision> {
    obj.meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
}

fn name_of<R: MargayResource>(obj: &R) -> Result<String, StoreError> {
    match obj.meta().name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_owned()),
        _ => Err(StoreError::Invalid {
            kind: R::KIND,
            name: String::new(),
            errors: crate::validation::ValidationErrors::single(
                "metadata.name",
                "",
                "a name is required",
            ),
        }),
    }
}

fn expected_revision<R: MargayResource>(obj: &R, name: &str) -> Result<Revision, StoreError> {
    revision_of(obj).ok_or_else(|| StoreError::Invalid {
        kind: R::KIND,
        name: name.to_owned(),
        errors: crate::validation::ValidationErrors::single(
            "metadata.resourceVersion",
            obj.meta().resource_version.as_deref().unwrap_or(""),
            "an update needs the revision the object was read at; read it from the store first",
        ),
    })
}

fn decode<R: MargayResource>(raw: RawObject) -> Result<R, StoreError> {
    decode_value(R::KIND, &raw.name, raw.value)
}

fn decode_value<R: MargayResource>(kind: Kind, name: &str, value: Value) -> Result<R, StoreError> {
    serde_json::from_value(value).map_err(|source| StoreError::Decode {
        kind,
        name: name.to_owned(),
        source,
    })
}

fn encode<R: MargayResource>(obj: &R, name: &str) -> Result<Value, StoreError> {
    let mut value = serde_json::to_value(obj).map_err(|source| StoreError::Decode {
        kind: R::KIND,
        name: name.to_owned(),
        source,
    })?;
    super::normalise_for_storage(R::KIND, name, &mut value);
    Ok(value)
}

fn validated<R: MargayResource>(obj: &R, name: &str) -> Result<(), StoreError> {
    obj.validate().map_err(|errors| StoreError::Invalid {
        kind: R::KIND,
        name: name.to_owned(),
        errors,
    })
}

/// Several conditional writes to make as one [`Store::commit`]:
/// `Commit::new().create(&handle).update(&block)`.
///
/// Each object is validated as [`Store::create`] and [`Store::update`] validate it; the first
/// problem is kept and returned by `Store::commit`, before anything is written.
#[derive(Debug, Default)]
pub struct Commit {
    writes: Vec<RawWrite>,
    error: Option<StoreError>,
}

impl Commit {
    pub fn new() -> Commit {
        Commit::default()
    }

    /// Creates `obj` if no object of its name exists.
    pub fn create<R: MargayResource>(mut self, obj: &R) -> Commit {
        let write = (|| {
            let name = name_of(obj)?;
            validated(obj, &name)?;
            let value = encode(obj, &name)?;
            Ok(RawWrite::Create {
                kind: R::KIND,
                name,
                value,
            })
        })();
        self.push(write);
        self
    }

    /// Replaces `obj`'s metadata and spec if it is still at the revision it was read at.
    pub fn update<R: MargayResource>(mut self, obj: &R) -> Commit {
        let write = (|| {
            let name = name_of(obj)?;
            validated(obj, &name)?;
            let expected = expected_revision(obj, &name)?;
            let value = encode(obj, &name)?;
            Ok(RawWrite::Update {
                kind: R::KIND,
                name,
                value,
                expected,
            })
        })();
        self.push(write);
        self
    }

    /// Deletes `obj` if it is still at the revision it was read at.
    pub fn delete<R: MargayResource>(mut self, obj: &R) -> Commit {
        let write = (|| {
            let name = name_of(obj)?;
            let expected = expected_revision(obj, &name)?;
            Ok(RawWrite::Delete {
                kind: R::KIND,
                name,
                expected,
            })
        })();
        self.push(write);
        self
    }

    fn push(&mut self, write: Result<RawWrite, StoreError>) {
        match write {
            Ok(w) => self.writes.push(w),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// The number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// What a [`Store::commit`] wrote: each created or updated object as stored, by kind and name.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    written: Vec<(Kind, String, Option<RawObject>)>,
}

impl Committed {
    /// The object `name` of kind `R` as this commit wrote it. `NotFound` if the commit did not
    /// create or update it (it deleted it, or did not touch it).
    pub fn get<R: MargayResource>(&self, name: &str) -> Result<R, StoreError> {
        self.written
            .iter()
            .find(|(k, n, _)| *k == R::KIND && n == name)
            .and_then(|(_, _, o)| o.clone())
            .ok_or_else(|| StoreError::NotFound {
                kind: R::KIND,
                name: name.to_owned(),
            })
            .and_then(decode)
    }

    /// The revision of each write, in the commit's order (`None` for deletes). An atomic
    /// commit writes everything at one revision.
    pub fn revisions(&self) -> Vec<Option<Revision>> {
        self.written
            .iter()
            .map(|(_, _, o)| o.as_ref().map(|o| o.revision))
            .collect()
    }
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>) -> Store {
        Store { backend }
    }

    /// A fresh in-memory store, for tests and for tools that run without a cluster.
    pub fn memory() -> Store {
        Store::new(Arc::new(super::memory::MemoryBackend::new()))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub async fn get<R: MargayResource>(&self, name: &str) -> Result<R, StoreError> {
        decode(self.backend.get(R::KIND, name).await?)
    }

    /// Like [`get`](Self::get), but absence is `Ok(None)`.
    pub async fn try_get<R: MargayResource>(&self, name: &str) -> Result<Option<R>, StoreError> {
        match self.get(name).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object of a kind, and the revision of the listing (watch from it to follow on).
    pub async fn list<R: MargayResource>(&self) -> Result<(Vec<R>, Revision), StoreError> {
        let list = self.backend.list(R::KIND).await?;
        let items = list
            .items
            .into_iter()
            .map(decode)
            .collect::<Result<Vec<R>, _>>()?;
        Ok((items, list.revision))
    }

    /// Creates `obj` if no object of its name exists. Validates first.
    pub async fn create<R: MargayResource>(&self, obj: &R) -> Result<R, StoreError> {
        let name = name_of(obj)?;
        validated(obj, &name)?;
        let value = encode(obj, &name)?;
        decode(self.backend.create(R::KIND, &name, value).await?)
    }

    /// Replaces `obj`'s metadata and spec if the stored revision is still the one `obj` was read
    /// at. The stored status is kept. Validates first.
    pub async fn update<R: MargayResource>(&self, obj: &R) -> Result<R, StoreError> {
        let name = name_of(obj)?;
        validated(obj, &name)?;
        let expected = expected_revision(obj, &name)?;
        let value = encode(obj, &name)?;
        decode(self.backend.update(R::KIND, &name, value, expected).await?)
    }

    /// Replaces only `obj`'s status, under the same revision condition as `update`.
    pub async fn update_status<R: MargayResource>(&self, obj: &R) -> Result<R, StoreError> {
        let name = name_of(obj)?;
        let expected = expected_revision(obj, &name)?;
        let value = encode(obj, &name)?;
        decode(
            self.backend
                .update_status(R::KIND, &name, value, expected)
                .await?,
        )
    }

    /// Deletes `obj` if the stored revision is still the one it was read at.
    pub async fn delete<R: MargayResource>(&self, obj: &R) -> Result<(), StoreError> {
        let name = name_of(obj)?;
        let expected = expected_revision(obj, &name)?;
        self.backend.delete(R::KIND, &name, expected).await
    }

    /// Deletes the object `name` if it is at revision `expected`.
    pub async fn delete_at<R: MargayResource>(
        &self,
        name: &str,
        expected: Revision,
    ) -> Result<(), StoreError> {
        self.backend.delete(R::KIND, name, expected).await
    }

    /// Makes the writes of `commit`: all or nothing at one revision where the backend
    /// [commits atomically](Self::atomic_commit), else in order up to the first that fails.
    /// A failed condition's error (`Conflict`, `NotFound`, `AlreadyExists`) names its object.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        if let Some(e) = commit.error {
            return Err(e);
        }
        let keys: Vec<(Kind, String)> = commit
            .writes
            .iter()
            .map(|w| (w.kind(), w.name().to_owned()))
            .collect();
        let objects = self.backend.commit(commit.writes).await?;
        Ok(Committed {
            written: keys
                .into_iter()
                .zip(objects)
                .map(|((k, n), o)| (k, n, o))
                .collect(),
        })
    }

    /// Whether [`commit`](Self::commit) is all or nothing (memory, etcd) or the writes in
    /// order (Kubernetes).
    pub fn atomic_commit(&self) -> bool {
        self.backend.atomic_commit()
    }

    /// Every change to objects of kind `R` after revision `after`, in order.
    pub async fn watch<R: MargayResource>(
        &self,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<WatchEvent<R>, StoreError>>, StoreError> {
        let raw = self.backend.watch(R::KIND, after).await?;
        Ok(raw
            .map(|ev| {
                ev.and_then(|ev| {
                    Ok(match ev {
                        RawEvent::Added(o) => WatchEvent::Added(decode(o)?),
                        RawEvent::Modified(o) => WatchEvent::Modified(decode(o)?),
                        RawEvent::Deleted {
                            name,
                            revision,
                            last,
                        } => {
                            let last = match last {
                                Some(v) => Some(decode_value(R::KIND, &name, v)?),
                                None => None,
                            };
                            WatchEvent::Deleted {
                                name,
                                revision,
                                last,
                            }
                        }
                        RawEvent::Bookmark(r) => WatchEvent::Bookmark(r),
                    })
                })
            })
            .boxed())
    }
}
