//! The etcd v3 backend, for clusters that keep networking state outside the API server (as
//! Calico's etcd mode does), for the local lab, and for tests of real concurrency.
//!
//! # Key layout
//!
//! One key per object: `<prefix><plural>/<name>` (default prefix `/margay/v1/`, e.g.
//! `/margay/v1/ippools/default`). The value is the whole object as JSON (`apiVersion`, `kind`,
//! `metadata`, `spec`, `status`) *without* `metadata.resourceVersion`: the revision of an object
//! is its key's `mod_revision`, and a list's revision is the response header's revision.
//!
//! # Atomicity
//!
//! Every write is one etcd transaction guarded by a compare on the key:
//! create by `create_revision == 0`, update, update_status and delete by
//! `mod_revision == expected` (and `version > 0`, so that a missing key never matches). Update
//! reads the stored document to merge into it; the write is conditional on the revision the
//! merge was computed from, so a concurrent writer makes it fail with `Conflict` instead of
//! being overwritten. When a compare fails, the transaction's else-branch reads the key back in
//! the same round trip to tell `NotFound` from `Conflict { actual }`.
//!
//! A [`Backend::commit`] is one transaction too: the compares of all its writes, all their puts
//! and deletes in the then-branch, and a read of every key in the else-branch, from which the
//! first write whose condition failed is named. etcd gives every key written by one
//! transaction the same `mod_revision`. Updates of kinds with a status (which the update must
//! keep) read those objects first, as `update` does, and the transaction is conditional on the
//! revisions read.
//!
//! # Watches
//!
//! An etcd watch on the kind's key prefix from `after + 1`, with the previous value of deleted
//! keys and progress notifications (turned into [`RawEvent::Bookmark`]). When the connection to
//! etcd is lost, the watch is re-established transparently from the last revision delivered, for
//! at most [`EtcdConfig::watch_reconnect`]; after that the stream ends with
//! [`StoreError::Unavailable`]. A compacted start revision ends it with [`StoreError::TooOld`].

use super::{
    check_commit, merge_status, merge_update, normalise_for_storage, stamp, Backend, Kind,
    RawEvent, RawList, RawObject, RawRead, RawReadResult, RawWatch, RawWrite, Revision, StoreError,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions, WatchResponse, WatchStream,
};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const BACKEND: &str = "etcd";

/// The default key prefix; every Margay key lives under it.
pub const DEFAULT_PREFIX: &str = "/margay/v1/";

// ===== configuration =====

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` or `https://etcd-0:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every key, ending in `/`. Tests use their own to isolate themselves.
    pub prefix: String,
    /// TLS settings; required for `https://` endpoints that use a private CA or client
    /// certificates.
    pub tls: Option<EtcdTls>,
    /// Bound on every request (and on each attempt to (re)establish a watch).
    #[serde(with = "duration_secs_f64")]
    pub request_timeout: Duration,
    /// Bound on connecting to an endpoint.
    #[serde(with = "duration_secs_f64")]
    pub connect_timeout: Duration,
    /// How long a watch keeps trying to re-establish itself after the connection is lost before
    /// it ends with `Unavailable`.
    #[serde(with = "duration_secs_f64")]
    pub watch_reconnect: Duration,
    /// Keys per range request when listing; big lists are read in pages at one revision.
    pub page_size: u32,
}

/// TLS material for etcd, as PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EtcdTls {
    /// CA bundle that signed etcd's serving certificate; the system roots are not used.
    pub ca_file: PathBuf,
    /// Client certificate, when etcd requires client authentication.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name to verify in etcd's certificate when it differs from the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

mod duration_secs_f64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            tls: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            watch_reconnect: Duration::from_secs(10),
            page_size: 500,
        }
    }
}

impl EtcdConfig {
    /// A configuration for `endpoints` with every other setting at its default.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdConfig::default()
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> EtcdConfig {
        self.prefix = prefix.into();
        self
    }

    /// Checks the configuration; every error says which setting and what would be right.
    pub fn validate(&self) -> Result<(), StoreError> {
        let reject = |message: String| {
            Err(StoreError::Rejected {
                backend: BACKEND,
                message,
            })
        };
        if self.endpoints.is_empty() {
            return reject("no etcd endpoints configured; give at least one client URL such as http://127.0.0.1:2379".into());
        }
        for e in &self.endpoints {
            let https = e.starts_with("https://");
            if !https && !e.starts_with("http://") {
                return reject(format!(
                    "etcd endpoint {e:?} must be a URL starting with http:// or https://"
                ));
            }
            if https && self.tls.is_none() {
                return reject(format!(
                    "etcd endpoint {e:?} uses https but no tls settings (caFile) are configured"
                ));
            }
            if !https && self.tls.is_some() {
                return reject(format!(
                    "tls settings are configured but etcd endpoint {e:?} uses http://; use https://"
                ));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return reject(format!(
                "etcd key prefix {:?} must start and end with '/', e.g. {DEFAULT_PREFIX:?}",
                self.prefix
            ));
        }
        if self.page_size == 0 {
            return reject("etcd pageSize must be at least 1".into());
        }
        for (what, d) in [
            ("requestTimeout", self.request_timeout),
            ("connectTimeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return reject(format!("etcd {what} must be greater than zero"));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return reject(
                    "etcd tls: certFile and keyFile must be given together (client certificate and its key)".into(),
                );
            }
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            // Detect a silently dead connection (and so a stuck watch) within seconds.
            .with_keep_alive(Duration::from_secs(5), self.request_timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            let read = |path: &PathBuf, what: &str| {
                std::fs::read(path).map_err(|e| StoreError::Rejected {
                    backend: BACKEND,
                    message: format!("cannot read etcd tls {what} {}: {e}", path.display()),
                })
            };
            let mut t = etcd_client::TlsOptions::new().ca_certificate(
                etcd_client::Certificate::from_pem(read(&tls.ca_file, "caFile")?),
            );
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(etcd_client::Identity::from_pem(
                    read(cert, "certFile")?,
                    read(key, "keyFile")?,
                ));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            opts = opts.with_tls(t);
        }
        Ok(opts)
    }
}

// ===== backend =====

/// The etcd v3 datastore. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: EtcdConfig,
    /// The endpoints as one string, for error messages.
    endpoints: String,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .finish()
    }
}

impl EtcdBackend {
    /// Validates `config` and sets up the connection. Connecting is lazy: an etcd that is down
    /// now makes the first operations fail with `Unavailable`, not this call.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdBackend, StoreError> {
        config.validate()?;
        let endpoints = config.endpoints.join(",");
        let opts = config.connect_options()?;
        let client = tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| StoreError::Unavailable {
            backend: BACKEND,
            message: format!(
                "connecting to etcd at {endpoints} took longer than {:?}",
                config.connect_timeout
            ),
            source: None,
        })?
        .map_err(|e| map_error(e, &endpoints, "connect"))?;
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                client,
                config,
                endpoints,
            }),
        })
    }

    /// The underlying client, for what the datastore contract does not cover (leader-election
    /// leases, health checks). It talks to the same endpoints; keys outside
    /// [`prefix`](Self::prefix) are not Margay's to touch.
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The key prefix of this backend.
    pub fn prefix(&self) -> &str {
        &self.inner.config.prefix
    }

    /// The etcd key of an object: `<prefix><plural>/<name>`.
    pub fn key(&self, kind: Kind, name: &str) -> String {
        format!("{}{}/{}", self.inner.config.prefix, kind.plural(), name)
    }

    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}{}/", self.inner.config.prefix, kind.plural())
    }

    /// The store's current revision.
    pub async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.inner.client.kv_client();
        let key = self.inner.config.prefix.clone();
        let resp = self
            .call("read the current revision", async move {
                kv.get(key, Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(header_revision(resp.header()))
    }

    /// Discards the history before `revision` (etcd's own compaction; the whole store, not only
    /// Margay's keys). Watches from before it then fail with [`StoreError::TooOld`].
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.inner.client.kv_client();
        let rev = to_i64(revision)?;
        self.call("compact", async move {
            kv.compact(
                rev,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
        })
        .await?;
        Ok(())
    }

    /// Runs one request under the configured timeout and maps its errors.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_error(e, &self.inner.endpoints, what)),
            Err(_) => Err(StoreError::Unavailable {
                backend: BACKEND,
                message: format!(
                    "{what}: no answer from etcd at {} within {timeout:?}",
                    self.inner.endpoints
                ),
                source: None,
            }),
        }
    }

    /// Every key of `kind` whose name starts with `name_prefix`, page by page at one
    /// revision: names with their objects (`None` with `keys_only`), and that revision. A
    /// page read at the listing's revision can meet a compaction that happened meanwhile;
    /// the listing starts over at a fresh revision a few times before giving up.
    async fn scan(
        &self,
        kind: Kind,
        name_prefix: &str,
        keys_only: bool,
    ) -> Result<(Vec<(String, Option<RawObject>)>, Revision), StoreError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.scan_from(kind, name_prefix, keys_only, 0, None).await {
                Err(e) if is_compacted(&e) && attempts < 3 => continue,
                other => return other,
            }
        }
    }

    /// The rest of a listing at `revision`, after the key `after`.
    async fn scan_at(
        &self,
        kind: Kind,
        name_prefix: &str,
        keys_only: bool,
        revision: Revision,
        after: Option<Vec<u8>>,
    ) -> Result<Vec<(String, Option<RawObject>)>, StoreError> {
        Ok(self
            .scan_from(kind, name_prefix, keys_only, revision, after)
            .await?
            .0)
    }

    async fn scan_from(
        &self,
        kind: Kind,
        name_prefix: &str,
        keys_only: bool,
        revision: Revision,
        after: Option<Vec<u8>>,
    ) -> Result<(Vec<(String, Option<RawObject>)>, Revision), StoreError> {
        let kind_prefix = self.kind_prefix(kind);
        let prefix = format!("{kind_prefix}{name_prefix}");
        let end = range_end(prefix.as_bytes());
        let page = i64::from(self.inner.config.page_size);
        let mut items = Vec::new();
        let mut revision = to_i64(revision)?;
        let mut start = match after {
            Some(mut k) => {
                k.push(0);
                k
            }
            None => prefix.into_bytes(),
        };
        loop {
            let mut kv = self.inner.client.kv_client();
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            if keys_only {
                opts = opts.with_keys_only();
            }
            let key = start.clone();
            let resp = self
                .call("list", async move { kv.get(key, Some(opts)).await })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                let name = String::from_utf8_lossy(&kv.key()[kind_prefix.len()..]).into_owned();
                let obj = if keys_only {
                    None
                } else {
                    Some(self.decode(kind, &name, kv)?)
                };
                items.push((name, obj));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((items, revision.max(0) as Revision)),
            }
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut kv = self.inner.client.kv_client();
        self.call(what, async move { kv.txn(txn).await }).await
    }

    fn check_name(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        if name.is_empty() || name.contains('/') {
            return Err(StoreError::Rejected {
                backend: BACKEND,
                message: format!(
                    "{kind} name {name:?} cannot be stored: a name must be non-empty and contain no '/'"
                ),
            });
        }
        Ok(())
    }

    fn decode(&self, kind: Kind, name: &str, kv: &KeyValue) -> Result<RawObject, StoreError> {
        let revision = kv.mod_revision() as Revision;
        let mut value: Value =
            serde_json::from_slice(kv.value()).map_err(|source| StoreError::Decode {
                kind,
                name: name.to_owned(),
                source,
            })?;
        stamp(&mut value, name, revision);
        Ok(RawObject {
            name: name.to_owned(),
            revision,
            value,
        })
    }

    fn encode(kind: Kind, name: &str, value: &Value) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            kind,
            name: name.to_owned(),
            source,
        })
    }

    /// Reads one object, `None` if absent.
    async fn read(&self, kind: Kind, name: &str) -> Result<Option<RawObject>, StoreError> {
        self.check_name(kind, name)?;
        let mut kv = self.inner.client.kv_client();
        let key = self.key(kind, name);
        let resp = self
            .call("get", async move { kv.get(key, None).await })
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(self.decode(kind, name, kv)?)),
            None => Ok(None),
        }
    }

    /// Writes `value` if the stored object is at `expected`; the else-branch reads the key so
    /// that a failed compare tells absent from changed.
    async fn put_if_revision(
        &self,
        what: &str,
        kind: Kind,
        name: &str,
        mut value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        let key = self.key(kind, name);
        normalise_for_storage(kind, name, &mut value);
        let bytes = Self::encode(kind, name, &value)?;
        let txn = Txn::new()
            .when(guard(&key, expected)?)
            .and_then(vec![TxnOp::put(key.clone(), bytes, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn(what, txn).await?;
        if !resp.succeeded() {
            return Err(self.compare_failed(kind, name, expected, &resp));
        }
        let revision = header_revision(resp.header());
        stamp(&mut value, name, revision);
        Ok(RawObject {
            name: name.to_owned(),
            revision,
            value,
        })
    }

    fn compare_failed(
        &self,
        kind: Kind,
        name: &str,
        expected: Revision,
        resp: &TxnResponse,
    ) -> StoreError {
        let actual = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision() as Revision)),
            _ => None,
        });
        match actual.flatten() {
            None => StoreError::NotFound {
                kind,
                name: name.to_owned(),
            },
            Some(actual) => StoreError::Conflict {
                kind,
                name: name.to_owned(),
                expected,
                actual: Some(actual),
            },
        }
    }

    /// Read, merge, conditional write: the shared body of `update` and `update_status`.
    async fn merge_and_put(
        &self,
        what: &str,
        kind: Kind,
        name: &str,
        expected: Revision,
        merge: impl FnOnce(&Value) -> Value,
    ) -> Result<RawObject, StoreError> {
        let stored = self.read(kind, name).await?.ok_or(StoreError::NotFound {
            kind,
            name: name.to_owned(),
        })?;
        if stored.revision != expected {
            return Err(StoreError::Conflict {
                kind,
                name: name.to_owned(),
                expected,
                actual: Some(stored.revision),
            });
        }
        let merged = merge(&stored.value);
        self.put_if_revision(what, kind, name, merged, expected)
            .await
    }
}

impl EtcdBackend {
    /// One transaction for all of `writes`; see the module documentation.
    async fn commit_txn(
        &self,
        mut writes: Vec<RawWrite>,
    ) -> Result<Vec<Option<RawObject>>, StoreError> {
        check_commit(BACKEND, &writes)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut compares = Vec::with_capacity(writes.len() * 2);
        let mut then = Vec::with_capacity(writes.len());
        let mut reads = Vec::with_capacity(writes.len());
        // What each write leaves: the value written (`None` for a delete).
        let mut written: Vec<Option<Value>> = Vec::with_capacity(writes.len());
        // The values move into the transaction; what stays of `writes` (kinds, names,
        // expected revisions) is what `commit_failed` reads.
        for w in writes.iter_mut() {
            let (kind, name) = (w.kind(), w.name().to_owned());
            let name = name.as_str();
            self.check_name(kind, name)?;
            let key = self.key(kind, name);
            reads.push(TxnOp::get(key.clone(), None));
            match w {
                RawWrite::Create { value, .. } => {
                    let mut value = std::mem::take(value);
                    normalise_for_storage(kind, name, &mut value);
                    // A create never carries a status (see `create`).
                    if let Value::Object(map) = &mut value {
                        map.remove("status");
                    }
                    compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    then.push(TxnOp::put(key, Self::encode(kind, name, &value)?, None));
                    written.push(Some(value));
                }
                RawWrite::Update {
                    value, expected, ..
                } => {
                    let mut value = if kind.has_status() {
                        // Keep the stored status: merge into what is stored at `expected`.
                        let stored = self.read(kind, name).await?.ok_or(StoreError::NotFound {
                            kind,
                            name: name.to_owned(),
                        })?;
                        if stored.revision != *expected {
                            return Err(StoreError::Conflict {
                                kind,
                                name: name.to_owned(),
                                expected: *expected,
                                actual: Some(stored.revision),
                            });
                        }
                        merge_update(&stored.value, value)
                    } else {
                        std::mem::take(value)
                    };
                    normalise_for_storage(kind, name, &mut value);
                    compares.extend(guard(&key, *expected)?);
                    then.push(TxnOp::put(key, Self::encode(kind, name, &value)?, None));
                    written.push(Some(value));
                }
                RawWrite::Delete { expected, .. } => {
                    compares.extend(guard(&key, *expected)?);
                    then.push(TxnOp::delete(key, None));
                    written.push(None);
                }
            }
        }
        let txn = Txn::new().when(compares).and_then(then).or_else(reads);
        let resp = self.txn("commit", txn).await?;
        if !resp.succeeded() {
            return Err(Self::commit_failed(&writes, &resp));
        }
        let revision = header_revision(resp.header());
        Ok(writes
            .iter()
            .zip(written)
            .map(|(w, value)| {
                value.map(|mut value| {
                    stamp(&mut value, w.name(), revision);
                    RawObject {
                        name: w.name().to_owned(),
                        revision,
                        value,
                    }
                })
            })
            .collect())
    }

    /// Names the first write of a failed commit whose condition does not hold, from the
    /// else-branch's reads (one per write, in order, at the revision the compares saw).
    fn commit_failed(writes: &[RawWrite], resp: &TxnResponse) -> StoreError {
        let stored: Vec<Option<Revision>> = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision() as Revision),
                _ => None,
            })
            .collect();
        for (w, actual) in writes.iter().zip(stored.iter().copied()) {
            let (kind, name) = (w.kind(), w.name().to_owned());
            match (w, actual) {
                (RawWrite::Create { .. }, Some(revision)) => {
                    return StoreError::AlreadyExists {
                        kind,
                        name,
                        revision: Some(revision),
                    }
                }
                (RawWrite::Update { .. } | RawWrite::Delete { .. }, None) => {
                    return StoreError::NotFound { kind, name }
                }
                (
                    RawWrite::Update { expected, .. } | RawWrite::Delete { expected, .. },
                    Some(actual),
                ) if actual != *expected => {
                    return StoreError::Conflict {
                        kind,
                        name,
                        expected: *expected,
                        actual: Some(actual),
                    }
                }
                _ => {}
            }
        }
        // The reads run in the same transaction as the compares, so one of them shows the
        // failed condition; this is reached only if etcd answered something else.
        StoreError::Unavailable {
            backend: BACKEND,
            message: format!(
                "etcd refused a commit of {} writes but its read-back ({} results) shows no failed condition",
                writes.len(),
                stored.len()
            ),
            source: None,
        }
    }
}

/// The compare of a conditional write: the key exists and was last written at `expected`.
fn guard(key: &str, expected: Revision) -> Result<Vec<Compare>, StoreError> {
    Ok(vec![
        Compare::version(key, CompareOp::Greater, 0),
        Compare::mod_revision(key, CompareOp::Equal, to_i64(expected)?),
    ])
}

fn to_i64(revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision).map_err(|_| StoreError::Rejected {
        backend: BACKEND,
        message: format!("revision {revision} is beyond etcd's range"),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map(|h| h.revision()).unwrap_or(0).max(0) as Revision
}

/// The smallest key greater than every key that starts with `prefix`.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Maps a client error to what a caller can act on. Transport failures and etcd's "unavailable"
/// family are retryable; the rest are refusals.
fn map_error(e: etcd_client::Error, endpoints: &str, what: &str) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let unavailable = |message: String, e: E| StoreError::Unavailable {
        backend: BACKEND,
        message,
        source: Some(Box::new(e)),
    };
    match &e {
        E::TransportError(_) | E::IoError(_) => unavailable(
            format!("{what}: cannot reach etcd at {endpoints}: {e}"),
            e,
        ),
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal => unavailable(
                format!("{what}: etcd at {endpoints} failed: {}", s.message()),
                e,
            ),
            Code::PermissionDenied | Code::Unauthenticated => StoreError::Rejected {
                backend: BACKEND,
                message: format!(
                    "{what}: etcd at {endpoints} denied access ({}); check the client certificate or credentials",
                    s.message()
                ),
            },
            _ => StoreError::Rejected {
                backend: BACKEND,
                message: format!("{what}: etcd at {endpoints} refused: {}", s.message()),
            },
        },
        _ => StoreError::Rejected {
            backend: BACKEND,
            message: format!("{what}: etcd client error talking to {endpoints}: {e}"),
        },
    }
}

fn is_compacted(e: &StoreError) -> bool {
    matches!(e, StoreError::Rejected { message, .. } if message.contains("required revision has been compacted"))
}

#[async_trait::async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError> {
        self.read(kind, name).await?.ok_or(StoreError::NotFound {
            kind,
            name: name.to_owned(),
        })
    }

    async fn list(&self, kind: Kind) -> Result<RawList, StoreError> {
        let (items, revision) = self.scan(kind, "", false).await?;
        Ok(RawList {
            items: items.into_iter().flat_map(|(_, o)| o).collect(),
            revision,
        })
    }

    async fn list_prefix(&self, kind: Kind, prefix: &str) -> Result<RawList, StoreError> {
        let (items, revision) = self.scan(kind, prefix, false).await?;
        Ok(RawList {
            items: items.into_iter().flat_map(|(_, o)| o).collect(),
            revision,
        })
    }

    async fn list_names(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        let (items, _) = self.scan(kind, "", true).await?;
        Ok(items.into_iter().map(|(n, _)| n).collect())
    }

    /// One transaction of range reads, so the results share a revision. A listing longer than
    /// a page is finished with paged reads at that same revision.
    async fn read_batch(&self, reads: Vec<RawRead>) -> Result<Vec<RawReadResult>, StoreError> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let page = i64::from(self.inner.config.page_size);
        let mut ops = Vec::with_capacity(reads.len());
        for r in &reads {
            match r {
                RawRead::Get { kind, name } => {
                    self.check_name(*kind, name)?;
                    ops.push(TxnOp::get(self.key(*kind, name), None));
                }
                RawRead::List { kind, prefix } => {
                    let start = format!("{}{prefix}", self.kind_prefix(*kind));
                    let end = range_end(start.as_bytes());
                    ops.push(TxnOp::get(
                        start,
                        Some(GetOptions::new().with_range(end).with_limit(page)),
                    ));
                }
            }
        }
        let resp = self.txn("read", Txn::new().and_then(ops)).await?;
        let revision = header_revision(resp.header());
        let mut out = Vec::with_capacity(reads.len());
        for (r, op) in reads.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(g) = op else {
                return Err(StoreError::Unavailable {
                    backend: BACKEND,
                    message: "etcd answered a read transaction with something other than reads"
                        .into(),
                    source: None,
                });
            };
            out.push(match r {
                RawRead::Get { kind, name } => RawReadResult::Object(match g.kvs().first() {
                    Some(kv) => Some(self.decode(*kind, name, kv)?),
                    None => None,
                }),
                RawRead::List { kind, prefix } => {
                    let kind_prefix = self.kind_prefix(*kind);
                    let mut items = Vec::with_capacity(g.kvs().len());
                    for kv in g.kvs() {
                        let name =
                            String::from_utf8_lossy(&kv.key()[kind_prefix.len()..]).into_owned();
                        items.push(self.decode(*kind, &name, kv)?);
                    }
                    if g.more() {
                        let after = g.kvs().last().map(|kv| kv.key().to_vec());
                        let rest = self.scan_at(*kind, prefix, false, revision, after).await?;
                        items.extend(rest.into_iter().flat_map(|(_, o)| o));
                    }
                    RawReadResult::List(RawList { items, revision })
                }
            });
        }
        Ok(out)
    }

    async fn create(
        &self,
        kind: Kind,
        name: &str,
        mut value: Value,
    ) -> Result<RawObject, StoreError> {
        self.check_name(kind, name)?;
        let key = self.key(kind, name);
        normalise_for_storage(kind, name, &mut value);
        // Status is written only through update_status, as the Kubernetes backend's status
        // subresource does; a create never carries one.
        if let Value::Object(map) = &mut value {
            map.remove("status");
        }
        let bytes = Self::encode(kind, name, &value)?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), bytes, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn("create", txn).await?;
        if !resp.succeeded() {
            let revision = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision() as Revision),
                _ => None,
            });
            return Err(StoreError::AlreadyExists {
                kind,
                name: name.to_owned(),
                revision,
            });
        }
        let revision = header_revision(resp.header());
        stamp(&mut value, name, revision);
        Ok(RawObject {
            name: name.to_owned(),
            revision,
            value,
        })
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        if !kind.has_status() {
            // Nothing of the stored object survives an update of a kind without status, so
            // skip the read: one conditional transaction is the whole update. This keeps the
            // allocator's hot path at one round trip per write.
            self.check_name(kind, name)?;
            return self
                .put_if_revision("update", kind, name, value, expected)
                .await;
        }
        self.merge_and_put("update", kind, name, expected, |stored| {
            merge_update(stored, &value)
        })
        .await
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
                backend: BACKEND,
                message: format!("{kind} has no status"),
            });
        }
        self.merge_and_put("update status", kind, name, expected, |stored| {
            merge_status(stored, &value)
        })
        .await
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError> {
        self.check_name(kind, name)?;
        let key = self.key(kind, name);
        let txn = Txn::new()
            .when(guard(&key, expected)?)
            .and_then(vec![TxnOp::delete(key.clone(), None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self.txn("delete", txn).await?;
        if !resp.succeeded() {
            return Err(self.compare_failed(kind, name, expected, &resp));
        }
        Ok(())
    }

    async fn commit(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError> {
        self.commit_txn(writes).await
    }

    fn atomic_commit(&self) -> bool {
        true
    }

    async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError> {
        to_i64(after.saturating_add(1))?;
        let state = WatchState {
            backend: self.clone(),
            kind,
            prefix: self.kind_prefix(kind),
            last: after,
            announced: after,
            stream: None,
            pending: VecDeque::new(),
            done: false,
        };
        // Establish the first watch now, so that an unreachable etcd is reported by this call.
        let mut state = state;
        state.stream = Some(state.open().await?);
        Ok(stream::unfold(state, |mut st| async move {
            let item = st.next_item().await?;
            Some((item, st))
        })
        .boxed())
    }
}

// ===== watch =====

struct WatchState {
    backend: EtcdBackend,
    kind: Kind,
    prefix: String,
    /// The revision of the last event delivered (or the starting point): where a lost watch
    /// resumes, and below which events are repeats.
    last: Revision,
    /// The highest revision delivered as an event or a bookmark; bookmarks only move forward.
    announced: Revision,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<RawEvent, StoreError>>,
    done: bool,
}

impl WatchState {
    async fn open(&self) -> Result<WatchStream, StoreError> {
        let mut client = self.backend.inner.client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(to_i64(self.last + 1)?)
            .with_prev_key()
            .with_progress_notify();
        let key = self.prefix.clone();
        self.backend
            .call("watch", async move { client.watch(key, Some(opts)).await })
            .await
    }

    /// Re-establishes the watch from the last revision delivered, for at most
    /// `watch_reconnect`.
    async fn reopen(&mut self, cause: String) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.backend.inner.config.watch_reconnect;
        let mut delay = Duration::from_millis(100);
        tracing::warn!(kind = %self.kind, last = self.last, %cause, "etcd watch lost; re-establishing");
        loop {
            match self.open().await {
                Ok(s) => {
                    self.stream = Some(s);
                    return Ok(());
                }
                Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(StoreError::Unavailable {
                        backend: BACKEND,
                        message: format!(
                            "watch of {} lost ({cause}) and not re-established within {:?}; last revision seen {}: {e}",
                            self.kind, self.backend.inner.config.watch_reconnect, self.last
                        ),
                        source: Some(Box::new(e)),
                    })
                }
            }
        }
    }

    async fn next_item(&mut self) -> Option<Result<RawEvent, StoreError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.is_err() {
                    self.done = true;
                    self.pending.clear();
                }
                return Some(item);
            }
            if self.done {
                return None;
            }
            let message = match self.stream.as_mut() {
                Some(s) => s.message().await,
                None => Ok(None),
            };
            match message {
                Ok(Some(resp)) => self.handle(resp),
                Ok(None) => {
                    self.stream = None;
                    if let Err(e) = self.reopen("the server closed the stream".into()).await {
                        self.pending.push_back(Err(e));
                    }
                }
                Err(e) => {
                    self.stream = None;
                    if let Err(e) = self.reopen(e.to_string()).await {
                        self.pending.push_back(Err(e));
                    }
                }
            }
        }
    }

    fn handle(&mut self, resp: WatchResponse) {
        if resp.canceled() {
            let err = if resp.compact_revision() > 0 {
                StoreError::TooOld {
                    kind: self.kind,
                    requested: self.last,
                    oldest: Some(resp.compact_revision() as Revision),
                }
            } else {
                StoreError::Unavailable {
                    backend: BACKEND,
                    message: format!(
                        "etcd cancelled the watch of {}: {}",
                        self.kind,
                        resp.cancel_reason()
                    ),
                    source: None,
                }
            };
            self.stream = None;
            self.pending.push_back(Err(err));
            return;
        }
        if resp.created() {
            return;
        }
        if resp.events().is_empty() {
            // A progress notification: everything up to the header revision has been sent.
            // It is passed on but not used as the resume point: etcd before 3.4.24 can send one
            // ahead of the events of a watcher still catching up (etcd issue 15220), and
            // resuming from it would skip those events.
            let rev = header_revision(resp.header());
            if rev > self.announced {
                self.announced = rev;
                self.pending.push_back(Ok(RawEvent::Bookmark(rev)));
            }
            return;
        }
        // etcd sends all events of one revision (one transaction, e.g. a commit writing several
        // objects of this kind) in one response, so repeats after a re-established watch are
        // whole revisions at or below where this response starts.
        let floor = self.last;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let revision = kv.mod_revision() as Revision;
            if revision <= floor {
                // Already delivered before a re-established watch.
                continue;
            }
            let name = String::from_utf8_lossy(&kv.key()[self.prefix.len()..]).into_owned();
            let item = match ev.event_type() {
                EventType::Put => self.backend.decode(self.kind, &name, kv).map(|obj| {
                    if kv.create_revision() == kv.mod_revision() {
                        RawEvent::Added(obj)
                    } else {
                        RawEvent::Modified(obj)
                    }
                }),
                EventType::Delete => {
                    let last = ev
                        .prev_kv()
                        .and_then(|p| self.backend.decode(self.kind, &name, p).ok())
                        .map(|o| o.value);
                    Ok(RawEvent::Deleted {
                        name,
                        revision,
                        last,
                    })
                }
            };
            self.last = revision;
            self.announced = self.announced.max(revision);
            self.pending.push_back(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_of_prefix() {
        assert_eq!(
            range_end(b"/margay/v1/ippools/"),
            b"/margay/v1/ippools0".to_vec()
        );
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn config_validation_names_the_setting() {
        let ok = EtcdConfig::new(["http://127.0.0.1:2379"]);
        assert!(ok.validate().is_ok());
        let e = EtcdConfig::new(["127.0.0.1:2379"]).validate().unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = EtcdConfig::new(["https://etcd:2379"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("caFile"), "{e}");
        let e = EtcdConfig::new(["http://a:1"])
            .with_prefix("margay")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
        let e = EtcdConfig::new(Vec::<String>::new())
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("no etcd endpoints"), "{e}");
    }

    #[test]
    fn config_reads_from_yaml_and_refuses_unknown_fields() {
        let c: EtcdConfig = serde_yaml::from_str(
            "endpoints: [\"http://10.0.0.1:2379\"]\nprefix: /x/\nrequestTimeout: 2.5\n",
        )
        .unwrap();
        assert_eq!(c.prefix, "/x/");
        assert_eq!(c.request_timeout, Duration::from_millis(2500));
        assert_eq!(c.page_size, 500);
        assert!(serde_yaml::from_str::<EtcdConfig>("endpoint: [x]\n").is_err());
    }

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable_within_the_timeout() {
        // Port 1 on loopback refuses connections.
        let mut cfg = EtcdConfig::new(["http://127.0.0.1:1"]);
        cfg.request_timeout = Duration::from_millis(500);
        cfg.connect_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let backend = EtcdBackend::connect(cfg).await.unwrap();
        let err = backend.get(Kind::IPPool, "p").await.unwrap_err();
        assert!(
            matches!(err, StoreError::Unavailable { .. }),
            "expected Unavailable, got {err:?}"
        );
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
