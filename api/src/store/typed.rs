use super::{
    Backend, Kind, RawEvent, RawList, RawObject, RawRead, RawReadResult, RawWrite, Revision,
    StoreError,
};
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

/// A listing in which each object decodes on its own: one object that does not fit the type
/// (written around the API server's schema, or by an older Margay) leaves the others readable.
#[derive(Debug)]
pub struct Lenient<R> {
    pub items: Vec<R>,
    /// The objects that did not decode, each as a [`StoreError::Decode`] naming it, with the
    /// raw object for callers that report on it.
    pub undecodable: Vec<(RawObject, StoreError)>,
    pub revision: Revision,
}

fn decode_each<R: MargayResource>(list: RawList) -> Lenient<R> {
    let mut items = Vec::with_capacity(list.items.len());
    let mut undecodable = Vec::new();
    for raw in list.items {
        match decode_value(R::KIND, &raw.name, raw.value.clone()) {
            Ok(obj) => items.push(obj),
            Err(e) => undecodable.push((raw, e)),
        }
    }
    Lenient {
        items,
        undecodable,
        revision: list.revision,
    }
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
            .and_then(|(_, _, o)| o.as_ref())
            .ok_or_else(|| StoreError::NotFound {
                kind: R::KIND,
                name: name.to_owned(),
            })
            .and_then(|o| {
                R::deserialize(&o.value).map_err(|source| StoreError::Decode {
                    kind: R::KIND,
                    name: name.to_owned(),
                    source,
                })
            })
    }

    /// The revision at which this commit wrote the object `name` of kind `R`, if it created
    /// or updated it: what a caller that keeps its own copy of the object needs to update it
    /// again, without decoding it back.
    pub fn revision<R: MargayResource>(&self, name: &str) -> Option<Revision> {
        self.written
            .iter()
            .find(|(k, n, _)| *k == R::KIND && n == name)
            .and_then(|(_, _, o)| o.as_ref())
            .map(|o| o.revision)
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

/// Several reads to make as one [`Store::read`]: `Reads::new().list::<IPPool>().get::<Node>("n")`.
/// The results come back in the same order, taken from the [`ReadSet`] by position.
#[derive(Debug, Default, Clone)]
pub struct Reads {
    reads: Vec<RawRead>,
}

impl Reads {
    pub fn new() -> Reads {
        Reads::default()
    }

    /// The object `name` of kind `R`, or its absence.
    pub fn get<R: MargayResource>(mut self, name: &str) -> Reads {
        self.reads.push(RawRead::Get {
            kind: R::KIND,
            name: name.to_owned(),
        });
        self
    }

    /// Every object of kind `R`.
    pub fn list<R: MargayResource>(self) -> Reads {
        self.list_prefix::<R>("")
    }

    /// The objects of kind `R` whose names start with `prefix`.
    pub fn list_prefix<R: MargayResource>(mut self, prefix: &str) -> Reads {
        self.reads.push(RawRead::List {
            kind: R::KIND,
            prefix: prefix.to_owned(),
        });
        self
    }

    pub fn len(&self) -> usize {
        self.reads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }
}

/// What a [`Store::read`] found, one entry per read in the order they were asked for.
#[derive(Debug, Default)]
pub struct ReadSet {
    results: Vec<Option<(RawRead, RawReadResult)>>,
}

impl ReadSet {
    fn take(&mut self, i: usize, kind: Kind) -> Result<(RawRead, RawReadResult), StoreError> {
        let slot = self.results.get_mut(i);
        match slot {
            Some(entry @ Some(_)) if entry.as_ref().is_some_and(|(r, _)| r.kind() == kind) => {
                Ok(entry.take().expect("checked"))
            }
            other => Err(StoreError::Rejected {
                backend: "store",
                message: format!(
                    "read {i} of the batch is {}, not a read of {kind} that has not been taken yet",
                    match other {
                        Some(Some((r, _))) => format!("{r:?}"),
                        _ => "absent or taken".into(),
                    }
                ),
            }),
        }
    }

    /// The result of read `i`, a `get` of kind `R`.
    pub fn get<R: MargayResource>(&mut self, i: usize) -> Result<Option<R>, StoreError> {
        match self.take(i, R::KIND)? {
            (_, RawReadResult::Object(o)) => o.map(decode).transpose(),
            (r, RawReadResult::List(_)) => Err(StoreError::Rejected {
                backend: "store",
                message: format!("read {i} of the batch ({r:?}) is a listing, not a get"),
            }),
        }
    }

    /// Like [`list`](Self::list), but an object that does not decode is set aside instead of
    /// failing the read.
    pub fn list_lenient<R: MargayResource>(&mut self, i: usize) -> Result<Lenient<R>, StoreError> {
        match self.take(i, R::KIND)? {
            (_, RawReadResult::List(l)) => Ok(decode_each(l)),
            (r, RawReadResult::Object(_)) => Err(StoreError::Rejected {
                backend: "store",
                message: format!("read {i} of the batch ({r:?}) is a get, not a listing"),
            }),
        }
    }

    /// The result of read `i`, a `list` or `list_prefix` of kind `R`, with its revision.
    pub fn list<R: MargayResource>(&mut self, i: usize) -> Result<(Vec<R>, Revision), StoreError> {
        match self.take(i, R::KIND)? {
            (_, RawReadResult::List(l)) => Ok((
                l.items.into_iter().map(decode).collect::<Result<_, _>>()?,
                l.revision,
            )),
            (r, RawReadResult::Object(_)) => Err(StoreError::Rejected {
                backend: "store",
                message: format!("read {i} of the batch ({r:?}) is a get, not a listing"),
            }),
        }
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

    /// Like [`list`](Self::list), but an object that does not decode is set aside instead of
    /// failing the listing.
    pub async fn list_lenient<R: MargayResource>(&self) -> Result<Lenient<R>, StoreError> {
        Ok(decode_each(self.backend.list(R::KIND).await?))
    }

    /// The objects of a kind whose names start with `prefix`, and the revision of the listing.
    pub async fn list_prefix<R: MargayResource>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<R>, Revision), StoreError> {
        let list = self.backend.list_prefix(R::KIND, prefix).await?;
        let items = list
            .items
            .into_iter()
            .map(decode)
            .collect::<Result<Vec<R>, _>>()?;
        Ok((items, list.revision))
    }

    /// The names of every object of a kind, without reading the objects.
    pub async fn list_names<R: MargayResource>(&self) -> Result<Vec<String>, StoreError> {
        self.backend.list_names(R::KIND).await
    }

    /// Makes the reads of `reads`: one round trip, one revision where the backend can (etcd).
    pub async fn read(&self, reads: Reads) -> Result<ReadSet, StoreError> {
        let asked = reads.reads.clone();
        let results = self.backend.read_batch(reads.reads).await?;
        if results.len() != asked.len() {
            return Err(StoreError::Rejected {
                backend: self.backend.name(),
                message: format!(
                    "a batch of {} reads came back with {} results",
                    asked.len(),
                    results.len()
                ),
            });
        }
        Ok(ReadSet {
            results: asked.into_iter().zip(results).map(Some).collect(),
        })
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
