//! The datastore contract: a versioned key-value store of Margay resources with
//! compare-and-swap, shared by the allocator, the node agent and the controller.
//!
//! Two layers:
//! - [`Backend`]: object-safe, speaks JSON objects keyed by ([`Kind`], name). Each backend
//!   (memory, etcd v3, Kubernetes) implements it once.
//! - [`Store`]: the typed facade everyone else uses (`store.get::<IPPool>("default")`).
//!
//! Revisions are the backend's monotonically increasing store revision (etcd's `mod_revision`,
//! Kubernetes' `resourceVersion`, which is the same etcd revision underneath). Every write is
//! conditional: create only if absent, update and delete only if the object still has the
//! revision the caller read. Watches deliver every change *after* a revision, in revision order,
//! so a watcher that restarts from the last revision it saw misses nothing.
//!
//! Several conditional writes can be made one [`Backend::commit`]. Where the backend can
//! ([`Backend::atomic_commit`]: memory and etcd) it is all or nothing, at one revision; the
//! Kubernetes API server has no multi-object transaction, so there it is the writes in order,
//! stopping at the first that fails, and callers order them so that every prefix is safe.
//!
//! The semantics every backend must meet are pinned by the contract suite in
//! `margay-testkit::contract`, which runs unchanged against each of them.

pub mod config;
mod error;
pub mod etcd;
pub mod informer;
pub mod kube;
pub mod memory;
mod typed;

pub use config::DatastoreConfig;
pub use error::StoreError;
pub use typed::{Commit, Committed, Lenient, ReadSet, Reads, Store, WatchEvent};

use futures::stream::BoxStream;
use serde_json::Value;
use std::fmt;

/// A store revision. Strictly increasing across all writes of one store.
pub type Revision = u64;

/// Every kind of resource Margay keeps in a datastore.
///
/// All kinds are cluster-scoped. The list is closed on purpose: a backend knows its key layout
/// (etcd) or its CRD (Kubernetes) for each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    IPPool,
    IPAMBlock,
    BlockAffinity,
    IPAMHandle,
    IPAMConfig,
    IPReservation,
    BGPConfiguration,
    BGPPeer,
    Node,
    WorkloadEndpoint,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::IPPool,
        Kind::IPAMBlock,
        Kind::BlockAffinity,
        Kind::IPAMHandle,
        Kind::IPAMConfig,
        Kind::IPReservation,
        Kind::BGPConfiguration,
        Kind::BGPPeer,
        Kind::Node,
        Kind::WorkloadEndpoint,
    ];

    /// The API group of every Margay resource.
    pub const GROUP: &'static str = "margay.io";
    /// The only served version.
    pub const VERSION: &'static str = "v1";
    /// `apiVersion` as written in objects.
    pub const API_VERSION: &'static str = "margay.io/v1";

    /// The `kind` field, e.g. `IPPool`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::IPPool => "IPPool",
            Kind::IPAMBlock => "IPAMBlock",
            Kind::BlockAffinity => "BlockAffinity",
            Kind::IPAMHandle => "IPAMHandle",
            Kind::IPAMConfig => "IPAMConfig",
            Kind::IPReservation => "IPReservation",
            Kind::BGPConfiguration => "BGPConfiguration",
            Kind::BGPPeer => "BGPPeer",
            Kind::Node => "Node",
            Kind::WorkloadEndpoint => "WorkloadEndpoint",
        }
    }

    /// The lower-case plural used in Kubernetes URLs and etcd keys, e.g. `ippools`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::IPPool => "ippools",
            Kind::IPAMBlock => "ipamblocks",
            Kind::BlockAffinity => "blockaffinities",
            Kind::IPAMHandle => "ipamhandles",
            Kind::IPAMConfig => "ipamconfigs",
            Kind::IPReservation => "ipreservations",
            Kind::BGPConfiguration => "bgpconfigurations",
            Kind::BGPPeer => "bgppeers",
            Kind::Node => "nodes",
            Kind::WorkloadEndpoint => "workloadendpoints",
        }
    }

    /// Whether objects of this kind have a `status` written separately from `spec`
    /// (a status subresource in Kubernetes).
    pub fn has_status(self) -> bool {
        matches!(self, Kind::IPPool | Kind::Node)
    }

    /// Parses a `kind` field or a plural.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s) || k.plural() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One stored object as JSON, with the revision at which it was last written.
///
/// `value` is the whole object (`apiVersion`, `kind`, `metadata`, `spec`, and `status` where the
/// kind has one). Backends set `metadata.resourceVersion` in `value` to `revision` on every read.
#[derive(Debug, Clone, PartialEq)]
pub struct RawObject {
    pub name: String,
    pub revision: Revision,
    pub value: Value,
}

/// A consistent listing: every object of a kind as of `revision`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawList {
    pub items: Vec<RawObject>,
    /// The store revision of the listing; watch from here to follow on without a gap.
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum RawEvent {
    /// The object was created; `revision` of the object is the creating write.
    Added(RawObject),
    /// The object was replaced (spec or status).
    Modified(RawObject),
    /// The object was deleted at `revision`. `last` is its final state when the backend knows it.
    Deleted {
        name: String,
        revision: Revision,
        last: Option<Value>,
    },
    /// Nothing of this kind changed up to `revision`; a watcher may resume from here.
    Bookmark(Revision),
}

impl RawEvent {
    /// The revision a watcher has seen once it has handled this event.
    pub fn revision(&self) -> Revision {
        match self {
            RawEvent::Added(o) | RawEvent::Modified(o) => o.revision,
            RawEvent::Deleted { revision, .. } | RawEvent::Bookmark(revision) => *revision,
        }
    }
}

/// One conditional write of a [`Backend::commit`], with the same conditions as the single
/// operation of the same name.
#[derive(Debug, Clone, PartialEq)]
pub enum RawWrite {
    /// Create if absent; a `status` in the value is dropped.
    Create {
        kind: Kind,
        name: String,
        value: Value,
    },
    /// Replace metadata and spec (keeping the stored status) if the object is at `expected`.
    Update {
        kind: Kind,
        name: String,
        value: Value,
        expected: Revision,
    },
    /// Remove the object if it is at `expected`.
    Delete {
        kind: Kind,
        name: String,
        expected: Revision,
    },
}

impl RawWrite {
    pub fn kind(&self) -> Kind {
        match self {
            RawWrite::Create { kind, .. }
            | RawWrite::Update { kind, .. }
            | RawWrite::Delete { kind, .. } => *kind,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            RawWrite::Create { name, .. }
            | RawWrite::Update { name, .. }
            | RawWrite::Delete { name, .. } => name,
        }
    }
}

/// One read of a [`Backend::read_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRead {
    /// One object; absence is not an error here.
    Get { kind: Kind, name: String },
    /// Every object of a kind whose name starts with `prefix` (`""`: all of them).
    List { kind: Kind, prefix: String },
}

impl RawRead {
    pub fn kind(&self) -> Kind {
        match self {
            RawRead::Get { kind, .. } | RawRead::List { kind, .. } => *kind,
        }
    }
}

/// What one [`RawRead`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum RawReadResult {
    Object(Option<RawObject>),
    List(RawList),
}

/// `read_batch` for a backend without multi-key reads: the reads one after another. Each is
/// consistent in itself; together they are not one snapshot.
pub async fn read_in_order<B: Backend + ?Sized>(
    backend: &B,
    reads: Vec<RawRead>,
) -> Result<Vec<RawReadResult>, StoreError> {
    let mut out = Vec::with_capacity(reads.len());
    for r in reads {
        out.push(read_one(backend, r).await?);
    }
    Ok(out)
}

/// `read_batch` for a backend without multi-key reads whose reads may run at once (one
/// request each): the same answers as [`read_in_order`], in the time of the slowest read.
pub async fn read_concurrently<B: Backend + ?Sized>(
    backend: &B,
    reads: Vec<RawRead>,
) -> Result<Vec<RawReadResult>, StoreError> {
    use futures::stream::{StreamExt, TryStreamExt};
    // At most 16 in flight: the allocator sends batches of up to 100 reads.
    futures::stream::iter(reads)
        .map(|r| read_one(backend, r))
        .buffered(16)
        .try_collect()
        .await
}

/// One read of a batch: a get (absence is `None`, not an error) or a listing.
async fn read_one<B: Backend + ?Sized>(
    backend: &B,
    r: RawRead,
) -> Result<RawReadResult, StoreError> {
    Ok(match r {
        RawRead::Get { kind, name } => match backend.get(kind, &name).await {
            Ok(o) => RawReadResult::Object(Some(o)),
            Err(e) if e.is_not_found() => RawReadResult::Object(None),
            Err(e) => return Err(e),
        },
        RawRead::List { kind, prefix } => {
            RawReadResult::List(backend.list_prefix(kind, &prefix).await?)
        }
    })
}

/// The most writes one [`Backend::commit`] may carry. etcd refuses a transaction with more than
/// 128 compares or 128 operations per branch (its default `--max-txn-ops`); a commit costs up to
/// two compares per write, so 64 writes is what fits on every etcd with default settings.
pub const MAX_COMMIT_WRITES: usize = 64;

/// Checks what every backend refuses in a commit before touching the store: too many writes,
/// and one object written twice (etcd refuses a transaction that puts one key twice, and the
/// outcome would depend on the order anyway).
pub fn check_commit(backend: &'static str, writes: &[RawWrite]) -> Result<(), StoreError> {
    if writes.len() > MAX_COMMIT_WRITES {
        return Err(StoreError::Rejected {
            backend,
            message: format!(
                "a commit of {} writes is more than the {MAX_COMMIT_WRITES} one commit may carry; split it",
                writes.len()
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for w in writes {
        if !seen.insert((w.kind(), w.name())) {
            return Err(StoreError::Rejected {
                backend,
                message: format!(
                    "a commit writes {} {:?} twice; write each object at most once per commit",
                    w.kind(),
                    w.name()
                ),
            });
        }
    }
    Ok(())
}

/// `commit` for a backend without multi-object transactions: the writes one after another,
/// stopping at the first that fails (whose error is returned; the writes before it stay).
pub async fn commit_in_order<B: Backend + ?Sized>(
    backend: &B,
    writes: Vec<RawWrite>,
) -> Result<Vec<Option<RawObject>>, StoreError> {
    check_commit(backend.name(), &writes)?;
    let mut out = Vec::with_capacity(writes.len());
    for w in writes {
        out.push(match w {
            RawWrite::Create { kind, name, value } => {
                Some(backend.create(kind, &name, value).await?)
            }
            RawWrite::Update {
                kind,
                name,
                value,
                expected,
            } => Some(backend.update(kind, &name, value, expected).await?),
            RawWrite::Delete {
                kind,
                name,
                expected,
            } => {
                backend.delete(kind, &name, expected).await?;
                None
            }
        });
    }
    Ok(out)
}

/// A stream of changes. It ends with `Err(StoreError::TooOld{..})` when the requested revision
/// has been compacted away, and with `Err(StoreError::Unavailable{..})` when the backend is lost
/// for good; callers then relist (or retry after back-off) and watch again.
pub type RawWatch = BoxStream<'static, Result<RawEvent, StoreError>>;

/// What every datastore backend implements. All writes are conditional.
///
/// Semantics (checked by the contract suite):
/// - `create`: fails with [`StoreError::AlreadyExists`] if the name exists. A `status` in the
///   value is dropped (as a Kubernetes status subresource does); write it with `update_status`.
/// - `update`: replaces `metadata` (labels, annotations) and `spec`, and keeps the stored
///   `status`; fails with [`StoreError::Conflict`] unless the stored revision equals `expected`,
///   and [`StoreError::NotFound`] if absent.
/// - `update_status`: replaces only `status`, same conditions; only for kinds with
///   [`Kind::has_status`].
/// - `delete`: removes the object only if its revision equals `expected`.
/// - `commit`: several of the writes above (at most [`MAX_COMMIT_WRITES`], each object at most
///   once). With [`atomic_commit`](Backend::atomic_commit) all of them happen, at one revision,
///   or none; the error of a failed condition names the object (`Conflict`, `NotFound`,
///   `AlreadyExists`), the first such in the commit's order. Without it, they happen in order
///   up to the first that fails.
/// - `watch`: every change with a revision strictly greater than `after`, in order. The changes
///   of one atomic commit share a revision and arrive together: a stream never ends between
///   two of them.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// A short name for logs and errors: `memory`, `etcd`, `kubernetes`.
    fn name(&self) -> &'static str;
    async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError>;
    async fn list(&self, kind: Kind) -> Result<RawList, StoreError>;
    /// The objects of a kind whose names start with `prefix`, as one consistent listing.
    /// Backends that can select by key range override this; the default filters a full list.
    async fn list_prefix(&self, kind: Kind, prefix: &str) -> Result<RawList, StoreError> {
        let mut list = self.list(kind).await?;
        list.items.retain(|o| o.name.starts_with(prefix));
        Ok(list)
    }
    /// The names of every object of a kind, without the objects (etcd reads keys only).
    async fn list_names(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list(kind)
            .await?
            .items
            .into_iter()
            .map(|o| o.name)
            .collect())
    }
    /// Several reads, one result each in order. etcd makes them one transaction, so they see
    /// one revision and cost one round trip; the default makes them one after another.
    async fn read_batch(&self, reads: Vec<RawRead>) -> Result<Vec<RawReadResult>, StoreError> {
        read_in_order(self, reads).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<RawObject, StoreError>;
    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError>;
    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError>;
    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError>;
    /// Applies `writes`; one entry per write in the result, in order: the object as written for
    /// a create or an update, `None` for a delete.
    async fn commit(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError>;
    /// Whether [`commit`](Backend::commit) is all or nothing, at one revision.
    fn atomic_commit(&self) -> bool;
    async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError>;
}

/// Sets `metadata.resourceVersion` and `metadata.name` in a JSON object as backends must on read.
pub(crate) fn stamp(value: &mut Value, name: &str, revision: Revision) {
    if let Value::Object(map) = value {
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(meta) = meta {
            meta.insert("name".into(), Value::String(name.to_owned()));
            meta.insert(
                "resourceVersion".into(),
                Value::String(revision.to_string()),
            );
        }
    }
}

/// Normalises an object before it is stored by a non-Kubernetes backend: the identity fields
/// are the store's, not the caller's, and the revision is never stored inside the value.
pub(crate) fn normalise_for_storage(kind: Kind, name: &str, value: &mut Value) {
    if let Value::Object(map) = value {
        map.insert("apiVersion".into(), Value::String(Kind::API_VERSION.into()));
        map.insert("kind".into(), Value::String(kind.name().into()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(meta) = meta {
            meta.insert("name".into(), Value::String(name.to_owned()));
            meta.remove("resourceVersion");
            meta.remove("namespace");
        }
        if !kind.has_status() {
            map.remove("status");
        }
    }
}

/// Merges the parts `update` may change (metadata labels/annotations and spec) from `new` into a
/// copy of the stored object, keeping its status and identity. Used by backends that store whole
/// JSON documents.
pub(crate) fn merge_update(stored: &Value, new: &Value) -> Value {
    let mut out = stored.clone();
    if let (Value::Object(out), Value::Object(new)) = (&mut out, new) {
        for (k, v) in new {
            if k != "status" && k != "apiVersion" && k != "kind" {
                out.insert(k.clone(), v.clone());
            }
        }
        if !new.contains_key("spec") {
            out.remove("spec");
        }
    }
    out
}

/// Copies only `status` from `new` into a copy of the stored object.
pub(crate) fn merge_status(stored: &Value, new: &Value) -> Value {
    let mut out = stored.clone();
    if let Value::Object(out) = &mut out {
        match new.get("status") {
            Some(s) => {
                out.insert("status".into(), s.clone());
            }
            None => {
                out.remove("status");
            }
        }
    }
    out
}
