//! The Kubernetes backend: Margay's resources as CRDs of `margay.io/v1`, read and written with
//! plain HTTP requests through a [`kube::Client`] (no kube-runtime).
//!
//! # Mapping
//!
//! | operation | request | failure mapping |
//! |---|---|---|
//! | get | `GET /apis/margay.io/v1/<plural>/<name>` | 404 → `NotFound` |
//! | list | `GET …/<plural>?limit=N[&continue=…]` (pages at one resourceVersion) | 410 on a continue token → relist |
//! | create | `POST …/<plural>` | 409 → `AlreadyExists` |
//! | update | `PUT …/<plural>/<name>` with `metadata.resourceVersion = expected` | 409 → `Conflict`, 404 → `NotFound` |
//! | update_status | `PUT …/<plural>/<name>/status`, same precondition | as update |
//! | delete | `DELETE …/<plural>/<name>` with `preconditions.resourceVersion = expected` | 409 → `Conflict`, 404 → `NotFound` |
//! | watch | `GET …/<plural>?watch=1&resourceVersion=<after>&allowWatchBookmarks=true&timeoutSeconds=N` | 410 / ERROR 410 → `TooOld` |
//!
//! A 409 on update or delete is followed by a GET so that the error carries the revision now
//! stored (or becomes `NotFound` if the object is gone). Connection failures, timeouts, 429 and
//! 5xx answers are `Unavailable`; 401/403/400/422 and a missing CRD are `Rejected`.
//!
//! # Commits
//!
//! The API server has no transaction over several objects, so [`Backend::commit`] is the
//! writes one after another, each its own request with its own precondition, stopping at the
//! first that fails; [`Backend::atomic_commit`] is `false`. A failure (or a crash of the caller)
//! in the middle leaves the writes before it in place. Callers that need more order the writes
//! so that every prefix is a state they can recover from (the allocator does: the handle before
//! the block on assign, the block before the handle on release; see `docs/ipam.md`).
//!
//! # Revisions
//!
//! `resourceVersion` is the revision. Margay assumes an etcd-backed API server, whose
//! resourceVersions are etcd revisions: decimal numbers, strictly increasing across the store.
//! A resourceVersion that is not a number is refused with a `Rejected` error naming it.
//!
//! # Status
//!
//! With the status subresource enabled (every Margay kind that has a status), the API server
//! itself ignores `status` in a create or a PUT of the main resource and ignores everything but
//! `status` in a PUT of `/status`, which is exactly the datastore contract.
//!
//! # Watches
//!
//! The server ends a watch after `timeoutSeconds`; the backend then re-establishes it from the
//! last resourceVersion delivered (events or bookmarks), so the stream goes on. A watch from
//! revision 0 starts with the current objects as `Added` events (from a list), because the
//! API server does not replay history from the beginning. Losing the connection ends the stream
//! with `Unavailable`.

use super::{
    commit_in_order, normalise_for_storage, Backend, Kind, RawEvent, RawList, RawObject, RawRead,
    RawReadResult, RawWatch, RawWrite, Revision, StoreError,
};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

const BACKEND: &str = "kubernetes";

/// The Kubernetes datastore. Cheap to clone.
#[derive(Clone)]
pub struct KubeBackend {
    client: kube::Client,
    request_timeout: Duration,
    watch_timeout: Duration,
    page_size: u32,
}

impl std::fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeBackend")
            .field("request_timeout", &self.request_timeout)
            .field("watch_timeout", &self.watch_timeout)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// What one request was, for mapping its failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    List,
    Create,
    Update,
    UpdateStatus,
    Delete,
    Watch,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::List => "list",
            Op::Create => "create",
            Op::Update => "update",
            Op::UpdateStatus => "update status of",
            Op::Delete => "delete",
            Op::Watch => "watch",
        }
    }
}

/// A complete (non-watch) answer.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

/// A Kubernetes client for `config`, as kube's own but with `TCP_NODELAY` on its connections
/// and, over TLS, HTTP/2 only.
///
/// Without `TCP_NODELAY` a request written right after the TLS handshake waits for the ACK of
/// the handshake's last segment (Nagle), which the API server delays by 40 ms: every
/// short-lived client (the CNI plugin opens a connection per call) paid that on each
/// connection. HTTP/2 only (every kube-apiserver speaks it over TLS) lets the requests a caller
/// sends at once wait for one connection and share it: with HTTP/2 merely offered, requests
/// sent together before the first handshake had finished opened a connection and paid a
/// handshake each. A plain `http://` server (a local proxy) is spoken to in HTTP/1.1. The
/// layers are kube's: base URI, authentication (token files are re-read as they rotate),
/// extra headers, and connect, read and write timeouts.
pub fn client(config: kube::Config) -> Result<kube::Client, ClientError> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    if let Some(proxy) = &config.proxy_url {
        return Err(ClientError::Proxy(proxy.to_string()));
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let mut tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls_pki_types::ServerName::try_from(name.clone())
            .map_err(|e| ClientError::ServerName(name.clone(), e.to_string()))?;
        tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let tls_only_h2 = config.cluster_url.scheme_str() == Some("https");
    let https = if tls_only_h2 {
        tls.enable_http2().wrap_connector(http)
    } else {
        tls.enable_http1().wrap_connector(http)
    };
    let mut timed = hyper_timeout::TimeoutConnector::new(https);
    timed.set_connect_timeout(config.connect_timeout);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    timed.set_reset_reader_on_write(config.reset_reader_on_write);
    let transport =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(tls_only_h2)
            .build(timed);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        // As kube's own client: 429, 503 and 504 are tried again, with back-off.
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(transport);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// Why [`client`] could not make a client of a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("tls-server-name {0:?} is not a server name: {1}")]
    ServerName(String, String),
    #[error(
        "the kubeconfig names proxy {0}; Margay's Kubernetes client does not go through proxies"
    )]
    Proxy(String),
}

impl KubeBackend {
    /// A backend over `client`, with a 30 s request timeout, 4-minute watch requests (under
    /// kube's default 295 s read timeout) and lists
    /// read 500 objects at a time.
    pub fn new(client: kube::Client) -> KubeBackend {
        KubeBackend {
            client,
            request_timeout: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(240),
            page_size: 500,
        }
    }

    /// Uses the kubeconfig file at `path` (its current context).
    pub async fn from_kubeconfig(path: impl AsRef<Path>) -> Result<KubeBackend, StoreError> {
        let path = path.as_ref();
        let refuse = |e: &dyn std::fmt::Display| StoreError::Rejected {
            backend: BACKEND,
            message: format!("cannot use kubeconfig {}: {e}", path.display()),
        };
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| refuse(&e))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| refuse(&e))?;
        let client = client(config).map_err(|e| refuse(&e))?;
        Ok(KubeBackend::new(client))
    }

    /// Uses the pod's service account (the in-cluster default).
    pub fn in_cluster() -> Result<KubeBackend, StoreError> {
        let refuse = |e: &dyn std::fmt::Display| {
            StoreError::Rejected {
            backend: BACKEND,
            message: format!("cannot configure the in-cluster Kubernetes client (is this running in a pod with a service account?): {e}"),
        }
        };
        let config = kube::Config::incluster().map_err(|e| refuse(&e))?;
        let client = client(config).map_err(|e| refuse(&e))?;
        Ok(KubeBackend::new(client))
    }

    /// Uses `$KUBECONFIG` or `~/.kube/config` when present, else the in-cluster configuration.
    pub async fn try_default() -> Result<KubeBackend, StoreError> {
        let refuse = |e: &dyn std::fmt::Display| StoreError::Rejected {
            backend: BACKEND,
            message: format!(
                "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
            ),
        };
        let config = kube::Config::infer().await.map_err(|e| refuse(&e))?;
        Ok(KubeBackend::new(client(config).map_err(|e| refuse(&e))?))
    }

    /// Bound on every request other than a watch's stream.
    pub fn with_request_timeout(mut self, timeout: Duration) -> KubeBackend {
        self.request_timeout = timeout;
        self
    }

    /// `timeoutSeconds` of each watch request; the backend re-establishes the watch after it.
    pub fn with_watch_timeout(mut self, timeout: Duration) -> KubeBackend {
        self.watch_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Objects per page when listing.
    pub fn with_page_size(mut self, page_size: u32) -> KubeBackend {
        self.page_size = page_size.max(1);
        self
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn collection(kind: Kind) -> String {
        format!("/apis/{}/{}/{}", Kind::GROUP, Kind::VERSION, kind.plural())
    }

    fn item(kind: Kind, name: &str) -> Result<String, StoreError> {
        // Object names of custom resources are DNS subdomains; anything else would need
        // escaping in the URL and would be refused by the API server anyway.
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(StoreError::Rejected {
                backend: BACKEND,
                message: format!(
                    "{kind} name {name:?} is not a valid Kubernetes object name (lower-case DNS subdomain)"
                ),
            });
        }
        Ok(format!("{}/{}", Self::collection(kind), name))
    }

    fn request(
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Request<Vec<u8>>, StoreError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::ACCEPT, "application/json");
        let bytes = match body {
            Some(v) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(v).map_err(|e| StoreError::Rejected {
                    backend: BACKEND,
                    message: format!("cannot encode the request body for {uri}: {e}"),
                })?
            }
            None => Vec::new(),
        };
        builder.body(bytes).map_err(|e| StoreError::Rejected {
            backend: BACKEND,
            message: format!("cannot build the request for {uri}: {e}"),
        })
    }

    /// Sends a request and reads the whole answer, under the request timeout.
    async fn send(&self, what: &str, req: Request<Vec<u8>>) -> Result<Reply, StoreError> {
        let uri = req.uri().to_string();
        let fut = async {
            let res = self
                .client
                .send(req.map(Body::from))
                .await
                .map_err(|e| transport_error(what, &uri, e))?;
            let status = res.status();
            let body = res
                .into_body()
                .collect_bytes()
                .await
                .map_err(|e| transport_error(what, &uri, e))?;
            Ok(Reply { status, body })
        };
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable {
                backend: BACKEND,
                message: format!(
                    "{what} {uri}: no answer from the API server within {:?}",
                    self.request_timeout
                ),
                source: None,
            }),
        }
    }

    /// After a 409 on update or delete: what is stored now decides between NotFound and
    /// Conflict, and gives the actual revision.
    async fn conflict(&self, kind: Kind, name: &str, expected: Revision) -> StoreError {
        match self.get(kind, name).await {
            Err(e @ StoreError::NotFound { .. }) => e,
            Ok(obj) if obj.revision == expected => {
                // The object is back at the expected revision; it cannot be, revisions only
                // grow, but report the 409 as it was rather than guess.
                StoreError::Conflict {
                    kind,
                    name: name.to_owned(),
                    expected,
                    actual: None,
                }
            }
            Ok(obj) => StoreError::Conflict {
                kind,
                name: name.to_owned(),
                expected,
                actual: Some(obj.revision),
            },
            Err(_) => StoreError::Conflict {
                kind,
                name: name.to_owned(),
                expected,
                actual: None,
            },
        }
    }

    /// A conditional PUT of the main resource or its status.
    async fn put(
        &self,
        op: Op,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        if expected == 0 {
            // No object is ever at revision 0; do not send resourceVersion "0", which the API
            // server could read as "any version".
            return Err(match self.get(kind, name).await {
                Ok(obj) => StoreError::Conflict {
                    kind,
                    name: name.to_owned(),
                    expected,
                    actual: Some(obj.revision),
                },
                Err(e) => e,
            });
        }
        let mut uri = Self::item(kind, name)?;
        if op == Op::UpdateStatus {
            uri.push_str("/status");
        }
        let body = write_body(kind, name, value, Some(expected), false);
        let reply = self
            .send(op.verb(), Self::request(Method::PUT, &uri, Some(&body))?)
            .await?;
        match reply.status {
            s if s.is_success() => object_from(kind, Some(name), &reply.body),
            StatusCode::CONFLICT => Err(self.conflict(kind, name, expected).await),
            _ => Err(api_error(op, kind, Some(name), &reply)),
        }
    }

    /// Every object as of one revision, read page by page.
    async fn list_once(&self, kind: Kind) -> Result<RawList, StoreError> {
        let mut items = Vec::new();
        let mut revision = None;
        let mut token: Option<String> = None;
        loop {
            let mut uri = format!("{}?limit={}", Self::collection(kind), self.page_size);
            if let Some(t) = &token {
                uri.push_str("&continue=");
                uri.push_str(&percent_encode(t));
            }
            let reply = self
                .send("list", Self::request(Method::GET, &uri, None)?)
                .await?;
            if !reply.status.is_success() {
                return Err(api_error(Op::List, kind, None, &reply));
            }
            let list: Value = parse_json(kind, "", &reply.body)?;
            if revision.is_none() {
                let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("");
                revision = Some(parse_rv(kind, rv)?);
            }
            if let Some(arr) = list["items"].as_array() {
                for item in arr {
                    items.push(raw_object(kind, None, item.clone())?);
                }
            }
            match list["metadata"]["continue"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(RawList {
            items,
            revision: revision.unwrap_or(0),
        })
    }

    /// Starts one watch request from `after`.
    async fn open_watch(&self, kind: Kind, after: Revision) -> Result<LineReader, StoreError> {
        let uri = format!(
            "{}?watch=1&resourceVersion={after}&allowWatchBookmarks=true&timeoutSeconds={}",
            Self::collection(kind),
            self.watch_timeout.as_secs()
        );
        let mut req = Self::request(Method::GET, &uri, None)?;
        // Watch streams are read line by line; keep them uncompressed.
        req.headers_mut().insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
        let fut = self.client.send(req.map(Body::from));
        let res = match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(r) => r.map_err(|e| transport_error("watch", &uri, e))?,
            Err(_) => {
                return Err(StoreError::Unavailable {
                    backend: BACKEND,
                    message: format!(
                        "watch {uri}: no answer from the API server within {:?}",
                        self.request_timeout
                    ),
                    source: None,
                })
            }
        };
        let status = res.status();
        if !status.is_success() {
            let body = res.into_body().collect_bytes().await.unwrap_or_default();
            return Err(
                match api_error(Op::Watch, kind, None, &Reply { status, body }) {
                    StoreError::TooOld { oldest, .. } => StoreError::TooOld {
                        kind,
                        requested: after,
                        oldest,
                    },
                    e => e,
                },
            );
        }
        Ok(LineReader {
            body: res.into_body(),
            buf: BytesMut::new(),
            // The server ends the request after timeoutSeconds; silence well past that means
            // the connection is dead.
            idle: self.watch_timeout + Duration::from_secs(30),
        })
    }
}

// ===== request bodies and answers =====

/// The body of a create or PUT: identity fields set, and the precondition as
/// `metadata.resourceVersion`.
fn write_body(
    kind: Kind,
    name: &str,
    mut value: Value,
    expected: Option<Revision>,
    create: bool,
) -> Value {
    normalise_for_storage(kind, name, &mut value);
    if let Value::Object(map) = &mut value {
        if create {
            map.remove("status");
        }
        if let (Some(rv), Some(Value::Object(meta))) = (expected, map.get_mut("metadata")) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
    }
    value
}

fn parse_rv(kind: Kind, rv: &str) -> Result<Revision, StoreError> {
    rv.parse::<Revision>().map_err(|_| StoreError::Rejected {
        backend: BACKEND,
        message: format!(
            "{kind}: resourceVersion {rv:?} is not a number; Margay needs an etcd-backed API server whose resourceVersions are etcd revisions"
        ),
    })
}

fn parse_json(kind: Kind, name: &str, body: &[u8]) -> Result<Value, StoreError> {
    serde_json::from_slice(body).map_err(|source| StoreError::Decode {
        kind,
        name: name.to_owned(),
        source,
    })
}

/// A stored object as the API server returned it, with its revision.
fn raw_object(kind: Kind, name: Option<&str>, mut value: Value) -> Result<RawObject, StoreError> {
    let name = match value["metadata"]["name"].as_str() {
        Some(n) => n.to_owned(),
        None => name.unwrap_or_default().to_owned(),
    };
    let rv = value["metadata"]["resourceVersion"].as_str().unwrap_or("");
    let revision = parse_rv(kind, rv)?;
    if let Value::Object(map) = &mut value {
        // List items may come without their type fields.
        map.entry("apiVersion")
            .or_insert_with(|| Value::String(Kind::API_VERSION.into()));
        map.entry("kind")
            .or_insert_with(|| Value::String(kind.name().into()));
    }
    Ok(RawObject {
        name,
        revision,
        value,
    })
}

fn object_from(kind: Kind, name: Option<&str>, body: &[u8]) -> Result<RawObject, StoreError> {
    let value = parse_json(kind, name.unwrap_or_default(), body)?;
    raw_object(kind, name, value)
}

fn transport_error(what: &str, uri: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Auth(e) => StoreError::Rejected {
            backend: BACKEND,
            message: format!("{what} {uri}: cannot authenticate to the API server: {e}"),
        },
        e => StoreError::Unavailable {
            backend: BACKEND,
            message: format!("{what} {uri}: cannot reach the API server: {e}"),
            source: Some(Box::new(e)),
        },
    }
}

/// The fields of a `metav1.Status` a caller may need.
#[derive(Debug, Default)]
struct ApiStatus {
    code: u16,
    reason: String,
    message: String,
    detail_name: String,
}

impl ApiStatus {
    fn parse(code: u16, body: &[u8]) -> ApiStatus {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => ApiStatus::from_value(code, &v),
            Err(_) => ApiStatus {
                code,
                message: String::from_utf8_lossy(body).trim().to_owned(),
                ..Default::default()
            },
        }
    }

    fn from_value(code: u16, v: &Value) -> ApiStatus {
        let s = |p: &Value| p.as_str().unwrap_or_default().to_owned();
        let mut message = s(&v["message"]);
        if let Some(causes) = v["details"]["causes"].as_array() {
            for c in causes {
                message.push_str(&format!("; {}: {}", s(&c["field"]), s(&c["message"])));
            }
        }
        ApiStatus {
            code: v["code"].as_u64().map(|c| c as u16).unwrap_or(code),
            reason: s(&v["reason"]),
            message,
            detail_name: s(&v["details"]["name"]),
        }
    }

    /// The oldest available revision from "too old resource version: 5 (10)".
    fn oldest(&self) -> Option<Revision> {
        let open = self.message.rfind('(')?;
        let close = self.message[open..].find(')')? + open;
        self.message[open + 1..close].trim().parse().ok()
    }
}

/// Maps an unsuccessful answer (other than a 409 on update/delete, handled by the caller).
fn api_error(op: Op, kind: Kind, name: Option<&str>, reply: &Reply) -> StoreError {
    let st = ApiStatus::parse(reply.status.as_u16(), &reply.body);
    status_error(op, kind, name, st)
}

fn status_error(op: Op, kind: Kind, name: Option<&str>, st: ApiStatus) -> StoreError {
    let name_s = name.unwrap_or_default();
    let target = match name {
        Some(n) => format!("{kind} {n:?}"),
        None => format!("{kind} objects"),
    };
    let crd = format!("{}.{}", kind.plural(), Kind::GROUP);
    match st.code {
        404 if name.is_some() && st.detail_name == name_s && op != Op::Create => {
            StoreError::NotFound {
                kind,
                name: name_s.to_owned(),
            }
        }
        404 => StoreError::Rejected {
            backend: BACKEND,
            message: format!(
                "{} {target}: the API server does not serve {crd} ({}); install Margay's CRDs from charts/margay/crds",
                op.verb(),
                st.message
            ),
        },
        409 if op == Op::Create => StoreError::AlreadyExists {
            kind,
            name: name_s.to_owned(),
            revision: None,
        },
        409 => StoreError::Conflict {
            kind,
            name: name_s.to_owned(),
            expected: 0,
            actual: None,
        },
        410 => StoreError::TooOld {
            kind,
            requested: 0,
            oldest: st.oldest(),
        },
        401 | 403 => StoreError::Rejected {
            backend: BACKEND,
            message: format!(
                "{} {target}: the API server denied it ({}): grant this service account access to {crd}",
                op.verb(),
                st.message
            ),
        },
        429 | 500..=599 => StoreError::Unavailable {
            backend: BACKEND,
            message: format!(
                "{} {target}: the API server answered {} {}: {}",
                op.verb(),
                st.code,
                st.reason,
                st.message
            ),
            source: None,
        },
        _ => StoreError::Rejected {
            backend: BACKEND,
            message: format!(
                "{} {target}: the API server refused it with {} {}: {}",
                op.verb(),
                st.code,
                st.reason,
                st.message
            ),
        },
    }
}

/// Escapes a continue token for a query string (tokens are base64, which has `+`, `/`, `=`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ===== watch =====

/// Reads a watch body as newline-separated JSON events.
struct LineReader {
    body: Body,
    buf: BytesMut,
    idle: Duration,
}

enum Line {
    Event(Bytes),
    End,
}

impl LineReader {
    async fn next_line(&mut self) -> Result<Line, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1).freeze();
                let line = line.slice(..pos);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Line::Event(line));
            }
            match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => return Err(format!("no data for {:?}", self.idle)),
                Ok(None) => {
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        return Ok(Line::End);
                    }
                    let rest = self.buf.split().freeze();
                    return Ok(Line::Event(rest));
                }
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

struct WatchState {
    backend: KubeBackend,
    kind: Kind,
    last: Revision,
    reader: Option<LineReader>,
    pending: VecDeque<Result<RawEvent, StoreError>>,
    done: bool,
}

impl WatchState {
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
            let reader = match self.reader.as_mut() {
                Some(r) => r,
                None => match self.backend.open_watch(self.kind, self.last).await {
                    Ok(r) => self.reader.insert(r),
                    Err(e) => {
                        self.pending.push_back(Err(e));
                        continue;
                    }
                },
            };
            match reader.next_line().await {
                Ok(Line::Event(line)) => self.handle(&line),
                // The server ended the watch (timeoutSeconds): go on from the last revision.
                Ok(Line::End) => self.reader = None,
                Err(cause) => {
                    self.reader = None;
                    self.pending.push_back(Err(StoreError::Unavailable {
                        backend: BACKEND,
                        message: format!(
                            "watch of {} lost after revision {}: {cause}",
                            self.kind, self.last
                        ),
                        source: None,
                    }));
                }
            }
        }
    }

    fn fail(&mut self, e: StoreError) {
        self.reader = None;
        self.pending.push_back(Err(e));
    }

    fn handle(&mut self, line: &[u8]) {
        let event: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(source) => {
                return self.fail(StoreError::Decode {
                    kind: self.kind,
                    name: String::new(),
                    source,
                })
            }
        };
        let object = event["object"].clone();
        let typ = event["type"].as_str().unwrap_or_default();
        if typ == "ERROR" {
            let st = ApiStatus::from_value(0, &object);
            let err = match status_error(Op::Watch, self.kind, None, st) {
                StoreError::TooOld { oldest, .. } => StoreError::TooOld {
                    kind: self.kind,
                    requested: self.last,
                    oldest,
                },
                e => e,
            };
            return self.fail(err);
        }
        let obj = match raw_object(self.kind, None, object) {
            Ok(o) => o,
            Err(e) => return self.fail(e),
        };
        if obj.revision <= self.last {
            // Delivered before the watch was re-established.
            return;
        }
        self.last = obj.revision;
        let ev = match typ {
            "ADDED" => RawEvent::Added(obj),
            "MODIFIED" => RawEvent::Modified(obj),
            "DELETED" => RawEvent::Deleted {
                name: obj.name,
                revision: obj.revision,
                last: Some(obj.value),
            },
            "BOOKMARK" => RawEvent::Bookmark(obj.revision),
            other => {
                return self.fail(StoreError::Rejected {
                    backend: BACKEND,
                    message: format!("watch of {}: unknown event type {other:?}", self.kind),
                })
            }
        };
        self.pending.push_back(Ok(ev));
    }
}

#[async_trait::async_trait]
impl Backend for KubeBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// The API server reads one object or one kind per request, so the reads of a batch go out
    /// together rather than one after another.
    async fn read_batch(&self, reads: Vec<RawRead>) -> Result<Vec<RawReadResult>, StoreError> {
        super::read_concurrently(self, reads).await
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError> {
        let uri = Self::item(kind, name)?;
        let reply = self
            .send("get", Self::request(Method::GET, &uri, None)?)
            .await?;
        if reply.status.is_success() {
            object_from(kind, Some(name), &reply.body)
        } else {
            Err(api_error(Op::Get, kind, Some(name), &reply))
        }
    }

    async fn list(&self, kind: Kind) -> Result<RawList, StoreError> {
        // A continue token expires with compaction (410); a fresh listing is then consistent
        // again. Give up after a few rounds rather than loop on a store compacting constantly.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.list_once(kind).await {
                Err(StoreError::TooOld { .. }) if attempt < 3 => continue,
                r => return r,
            }
        }
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> Result<RawObject, StoreError> {
        Self::item(kind, name)?;
        let uri = Self::collection(kind);
        let body = write_body(kind, name, value, None, true);
        let reply = self
            .send("create", Self::request(Method::POST, &uri, Some(&body))?)
            .await?;
        if reply.status.is_success() {
            object_from(kind, Some(name), &reply.body)
        } else {
            Err(api_error(Op::Create, kind, Some(name), &reply))
        }
    }

    async fn update(
        &self,
        kind: Kind,
        name: &str,
        value: Value,
        expected: Revision,
    ) -> Result<RawObject, StoreError> {
        self.put(Op::Update, kind, name, value, expected).await
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
        self.put(Op::UpdateStatus, kind, name, value, expected)
            .await
    }

    async fn delete(&self, kind: Kind, name: &str, expected: Revision) -> Result<(), StoreError> {
        let uri = Self::item(kind, name)?;
        if expected == 0 {
            return Err(match self.get(kind, name).await {
                Ok(obj) => StoreError::Conflict {
                    kind,
                    name: name.to_owned(),
                    expected,
                    actual: Some(obj.revision),
                },
                Err(e) => e,
            });
        }
        let body = json!({
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": { "resourceVersion": expected.to_string() },
        });
        let reply = self
            .send("delete", Self::request(Method::DELETE, &uri, Some(&body))?)
            .await?;
        match reply.status {
            s if s.is_success() => Ok(()),
            StatusCode::CONFLICT => Err(self.conflict(kind, name, expected).await),
            _ => Err(api_error(Op::Delete, kind, Some(name), &reply)),
        }
    }

    async fn commit(&self, writes: Vec<RawWrite>) -> Result<Vec<Option<RawObject>>, StoreError> {
        commit_in_order(self, writes).await
    }

    fn atomic_commit(&self) -> bool {
        false
    }

    async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError> {
        let mut pending = VecDeque::new();
        let mut from = after;
        if after == 0 {
            // The API server does not replay history from the start; begin with the current
            // state, in revision order, then follow on from the listing.
            let mut list = self.list(kind).await?;
            list.items.sort_by_key(|o| o.revision);
            pending.extend(list.items.into_iter().map(|o| Ok(RawEvent::Added(o))));
            from = list.revision;
        }
        // Open the first request now, so that an unreachable server or a compacted revision
        // is reported by this call.
        let reader = self.open_watch(kind, from).await?;
        let state = WatchState {
            backend: self.clone(),
            kind,
            last: from,
            reader: Some(reader),
            pending,
            done: false,
        };
        Ok(stream::unfold(state, |mut st| async move {
            let item = st.next_item().await?;
            Some((item, st))
        })
        .boxed())
    }
}

// ===== tests with a mocked API server =====

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http::Response;
    use tower_test::mock::{self, Handle, SendResponse};

    type Mock = Handle<Request<Body>, Response<Body>>;

    fn backend() -> (KubeBackend, Mock) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        (
            KubeBackend::new(client).with_request_timeout(Duration::from_secs(5)),
            handle,
        )
    }

    async fn next(handle: &mut Mock) -> (Request<Body>, SendResponse<Response<Body>>) {
        tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("the backend sent no request")
            .expect("the service was dropped")
    }

    async fn body_json(req: Request<Body>) -> Value {
        let bytes = req.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn reply(code: u16, body: Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn pool(name: &str, rv: u64) -> Value {
        json!({
            "apiVersion": "margay.io/v1",
            "kind": "IPPool",
            "metadata": {"name": name, "resourceVersion": rv.to_string(), "uid": "u-1"},
            "spec": {"cidr": "10.0.0.0/16"},
        })
    }

    fn status(code: u16, reason: &str, message: &str, name: &str) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": reason, "code": code,
            "details": {"name": name, "group": "margay.io", "kind": "ippools"},
        })
    }

    fn not_found(name: &str) -> Value {
        status(
            404,
            "NotFound",
            &format!("ippools.margay.io \"{name}\" not found"),
            name,
        )
    }

    fn query(req: &Request<Body>) -> Vec<(String, String)> {
        let mut q: Vec<(String, String)> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        q.sort();
        q
    }

    #[tokio::test]
    async fn get_requests_the_object_path_and_reads_its_revision() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.get(Kind::IPPool, "p1").await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools/p1");
        send.send_response(reply(200, pool("p1", 42)));
        let obj = op.await.unwrap().unwrap();
        assert_eq!(obj.name, "p1");
        assert_eq!(obj.revision, 42);
        assert_eq!(obj.value["spec"]["cidr"], "10.0.0.0/16");
    }

    #[tokio::test]
    async fn get_404_is_not_found() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.get(Kind::IPAMBlock, "b1").await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ipamblocks/b1");
        send.send_response(reply(404, not_found("b1")));
        let err = op.await.unwrap().unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { kind: Kind::IPAMBlock, ref name } if name == "b1"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_crd_is_rejected_with_what_to_install() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.get(Kind::BGPPeer, "x").await });
        let (_, send) = next(&mut h).await;
        send.send_response(
            Response::builder()
                .status(404)
                .body(Body::from(b"404 page not found\n".to_vec()))
                .unwrap(),
        );
        let err = op.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
        assert!(err.to_string().contains("bgppeers.margay.io"), "{err}");
        assert!(err.to_string().contains("charts/margay/crds"), "{err}");
    }

    #[tokio::test]
    async fn list_pages_with_limit_and_continue_and_keeps_the_first_revision() {
        let (b, mut h) = backend();
        let b = b.with_page_size(2);
        let op = tokio::spawn(async move { b.list(Kind::IPPool).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools");
        assert_eq!(query(&req), vec![("limit".into(), "2".into())]);
        send.send_response(reply(
            200,
            json!({"kind": "IPPoolList", "apiVersion": "margay.io/v1",
                   "metadata": {"resourceVersion": "100", "continue": "eyJ2Ijo+/x=="},
                   "items": [pool("a", 5), pool("b", 7)]}),
        ));
        let (req, send) = next(&mut h).await;
        assert_eq!(
            query(&req),
            vec![
                ("continue".into(), "eyJ2Ijo%2B%2Fx%3D%3D".into()),
                ("limit".into(), "2".into())
            ]
        );
        // Items of a CR list can lack apiVersion/kind; the backend fills them in.
        let mut c = pool("c", 9);
        c.as_object_mut().unwrap().remove("kind");
        send.send_response(reply(
            200,
            json!({"metadata": {"resourceVersion": "100"}, "items": [c]}),
        ));
        let list = op.await.unwrap().unwrap();
        assert_eq!(list.revision, 100);
        let names: Vec<_> = list
            .items
            .iter()
            .map(|o| (o.name.as_str(), o.revision))
            .collect();
        assert_eq!(names, vec![("a", 5), ("b", 7), ("c", 9)]);
        assert_eq!(list.items[2].value["kind"], "IPPool");
    }

    #[tokio::test]
    async fn create_posts_to_the_collection_without_revision_or_status() {
        let (b, mut h) = backend();
        let mut value = pool("p1", 3);
        value["status"] = json!({"conditions": []});
        let op = tokio::spawn(async move { b.create(Kind::IPPool, "p1", value).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools");
        assert_eq!(req.headers()["content-type"], "application/json");
        let body = body_json(req).await;
        assert_eq!(body["metadata"]["name"], "p1");
        assert_eq!(body["apiVersion"], "margay.io/v1");
        assert_eq!(body["kind"], "IPPool");
        assert!(body["metadata"].get("resourceVersion").is_none(), "{body}");
        assert!(body.get("status").is_none(), "{body}");
        send.send_response(reply(201, pool("p1", 11)));
        assert_eq!(op.await.unwrap().unwrap().revision, 11);
    }

    #[tokio::test]
    async fn create_409_is_already_exists() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.create(Kind::IPPool, "p1", pool("p1", 0)).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(
            409,
            status(
                409,
                "AlreadyExists",
                "ippools.margay.io \"p1\" already exists",
                "p1",
            ),
        ));
        let err = op.await.unwrap().unwrap_err();
        assert!(err.is_already_exists(), "{err:?}");
    }

    #[tokio::test]
    async fn update_puts_with_the_expected_resource_version() {
        let (b, mut h) = backend();
        let op =
            tokio::spawn(async move { b.update(Kind::IPPool, "p1", pool("p1", 999), 12).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools/p1");
        let body = body_json(req).await;
        assert_eq!(body["metadata"]["resourceVersion"], "12");
        send.send_response(reply(200, pool("p1", 13)));
        assert_eq!(op.await.unwrap().unwrap().revision, 13);
    }

    #[tokio::test]
    async fn update_409_is_conflict_with_the_revision_read_back() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.update(Kind::IPPool, "p1", pool("p1", 0), 12).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(
            409,
            status(409, "Conflict", "Operation cannot be fulfilled on ippools.margay.io \"p1\": the object has been modified; please apply your changes to the latest version and try again", "p1"),
        ));
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools/p1");
        send.send_response(reply(200, pool("p1", 20)));
        let err = op.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    expected: 12,
                    actual: Some(20),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn commit_is_the_writes_in_order_and_stops_at_the_first_failure() {
        let (b, mut h) = backend();
        assert!(
            !b.atomic_commit(),
            "the API server has no multi-object transaction"
        );
        let writes = vec![
            RawWrite::Create {
                kind: Kind::IPPool,
                name: "p2".into(),
                value: pool("p2", 0),
            },
            RawWrite::Update {
                kind: Kind::IPPool,
                name: "p1".into(),
                value: pool("p1", 0),
                expected: 12,
            },
            RawWrite::Delete {
                kind: Kind::IPPool,
                name: "p3".into(),
                expected: 7,
            },
        ];
        let op = tokio::spawn(async move { b.commit(writes).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(body_json(req).await["metadata"]["name"], "p2");
        send.send_response(reply(201, pool("p2", 13)));
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools/p1");
        assert_eq!(body_json(req).await["metadata"]["resourceVersion"], "12");
        send.send_response(reply(
            409,
            status(409, "Conflict", "the object has been modified", "p1"),
        ));
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::GET);
        send.send_response(reply(200, pool("p1", 20)));
        // The commit ends with the update's error, naming p1; the delete is never sent.
        let err = op.await.unwrap().unwrap_err();
        assert!(
            err.is_conflict() && err.is_about(Kind::IPPool, "p1"),
            "{err:?}"
        );
        assert!(
            !matches!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request()).await,
                Ok(Some(_))
            ),
            "no request after the failed write"
        );
    }

    #[tokio::test]
    async fn update_of_a_missing_object_is_not_found() {
        let (b, mut h) = backend();
        let op =
            tokio::spawn(async move { b.update(Kind::IPPool, "gone", pool("gone", 0), 4).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(404, not_found("gone")));
        assert!(op.await.unwrap().unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn update_status_puts_the_status_subresource() {
        let (b, mut h) = backend();
        let mut v = pool("p1", 0);
        v["status"] = json!({"conditions": [{"type": "Valid", "status": "True"}]});
        let op = tokio::spawn(async move { b.update_status(Kind::IPPool, "p1", v, 5).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools/p1/status");
        let body = body_json(req).await;
        assert_eq!(body["metadata"]["resourceVersion"], "5");
        assert_eq!(body["status"]["conditions"][0]["type"], "Valid");
        send.send_response(reply(200, pool("p1", 6)));
        assert_eq!(op.await.unwrap().unwrap().revision, 6);
    }

    #[tokio::test]
    async fn update_status_of_a_kind_without_status_is_refused_locally() {
        let (b, mut h) = backend();
        let err = b
            .update_status(Kind::IPAMHandle, "h", json!({}), 3)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
        // Nothing was sent.
        let sent = tokio::time::timeout(Duration::from_millis(50), h.next_request()).await;
        assert!(sent.is_err(), "a request was sent");
    }

    #[tokio::test]
    async fn delete_sends_resource_version_preconditions() {
        let (b, mut h) = backend();
        let op =
            tokio::spawn(async move { b.delete(Kind::BlockAffinity, "n1-10-0-0-0-26", 77).await });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::DELETE);
        assert_eq!(
            req.uri().path(),
            "/apis/margay.io/v1/blockaffinities/n1-10-0-0-0-26"
        );
        let body = body_json(req).await;
        assert_eq!(body["kind"], "DeleteOptions");
        assert_eq!(body["preconditions"]["resourceVersion"], "77");
        send.send_response(reply(200, json!({"kind": "Status", "status": "Success"})));
        op.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn delete_409_is_conflict_and_404_is_not_found() {
        let (b, mut h) = backend();
        let b2 = b.clone();
        let op = tokio::spawn(async move { b.delete(Kind::IPPool, "p1", 5).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(
            409,
            status(409, "Conflict", "Precondition failed: ResourceVersion in precondition: 5, ResourceVersion in object meta: 8", "p1"),
        ));
        let (_, send) = next(&mut h).await;
        send.send_response(reply(200, pool("p1", 8)));
        let err = op.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    actual: Some(8),
                    ..
                }
            ),
            "{err:?}"
        );

        let op = tokio::spawn(async move { b2.delete(Kind::IPPool, "p1", 8).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(404, not_found("p1")));
        assert!(op.await.unwrap().unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_unavailable() {
        for code in [500u16, 503, 429] {
            let (b, mut h) = backend();
            let op = tokio::spawn(async move { b.get(Kind::IPPool, "p").await });
            let (_, send) = next(&mut h).await;
            send.send_response(reply(
                code,
                status(code, "InternalError", "etcdserver: request timed out", ""),
            ));
            let err = op.await.unwrap().unwrap_err();
            assert!(
                matches!(err, StoreError::Unavailable { .. }),
                "{code}: {err:?}"
            );
            assert!(err.is_retryable());
        }
    }

    #[tokio::test]
    async fn forbidden_is_rejected_with_the_resource_to_grant() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.list(Kind::IPAMHandle).await });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(
            403,
            status(
                403,
                "Forbidden",
                "ipamhandles.margay.io is forbidden: User \"x\" cannot list resource",
                "",
            ),
        ));
        let err = op.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
        assert!(err.to_string().contains("ipamhandles.margay.io"), "{err}");
    }

    #[tokio::test]
    async fn connection_errors_are_unavailable() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.get(Kind::IPPool, "p").await });
        let (_, send) = next(&mut h).await;
        send.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        let err = op.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/apis/margay.io/v1/ippools/p"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_unavailable_after_the_request_timeout() {
        let (b, mut h) = backend();
        let b = b.with_request_timeout(Duration::from_millis(200));
        let op = tokio::spawn(async move { b.get(Kind::IPPool, "p").await });
        let (_req, _send) = next(&mut h).await;
        let err = op.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn non_numeric_resource_versions_are_refused() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.get(Kind::IPPool, "p").await });
        let (_, send) = next(&mut h).await;
        let mut v = pool("p", 1);
        v["metadata"]["resourceVersion"] = json!("a1b2");
        send.send_response(reply(200, v));
        let err = op.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
        assert!(err.to_string().contains("\"a1b2\""), "{err}");
    }

    fn watch_body(lines: &[Value]) -> Response<Body> {
        let mut text = String::new();
        for l in lines {
            text.push_str(&l.to_string());
            text.push('\n');
        }
        Response::builder()
            .status(200)
            .body(Body::from(text.into_bytes()))
            .unwrap()
    }

    #[tokio::test]
    async fn watch_sends_its_parameters_maps_events_and_resumes_after_the_server_ends_it() {
        let (b, mut h) = backend();
        let b = b.with_watch_timeout(Duration::from_secs(60));
        let task = tokio::spawn(async move {
            let mut w = b.watch(Kind::IPPool, 10).await?;
            let mut got = Vec::new();
            while got.len() < 5 {
                match w.next().await {
                    Some(Ok(ev)) => got.push(ev),
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            Ok(got)
        });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/ippools");
        assert_eq!(
            query(&req),
            vec![
                ("allowWatchBookmarks".into(), "true".into()),
                ("resourceVersion".into(), "10".into()),
                ("timeoutSeconds".into(), "60".into()),
                ("watch".into(), "1".into()),
            ]
        );
        let mut deleted = pool("a", 13);
        deleted["metadata"]["resourceVersion"] = json!("13");
        send.send_response(watch_body(&[
            json!({"type": "ADDED", "object": pool("a", 11)}),
            json!({"type": "MODIFIED", "object": pool("a", 12)}),
            json!({"type": "DELETED", "object": deleted}),
            json!({"type": "BOOKMARK", "object": {"kind": "IPPool", "apiVersion": "margay.io/v1", "metadata": {"resourceVersion": "15"}}}),
        ]));
        // The body ended: the backend watches again from the last revision it delivered.
        let (req, send) = next(&mut h).await;
        assert!(
            query(&req).contains(&("resourceVersion".into(), "15".into())),
            "{:?}",
            query(&req)
        );
        send.send_response(watch_body(&[
            // A repeat of an event already delivered is dropped.
            json!({"type": "MODIFIED", "object": pool("a", 12)}),
            json!({"type": "ADDED", "object": pool("b", 16)}),
        ]));
        let got = task.await.unwrap().unwrap();
        assert!(matches!(&got[0], RawEvent::Added(o) if o.name == "a" && o.revision == 11));
        assert!(matches!(&got[1], RawEvent::Modified(o) if o.revision == 12));
        assert!(
            matches!(&got[2], RawEvent::Deleted { name, revision: 13, last: Some(_) } if name == "a")
        );
        assert_eq!(got[3], RawEvent::Bookmark(15));
        assert!(matches!(&got[4], RawEvent::Added(o) if o.name == "b" && o.revision == 16));
    }

    #[tokio::test]
    async fn watch_410_is_too_old() {
        let (b, mut h) = backend();
        let op = tokio::spawn(async move { b.watch(Kind::IPPool, 3).await.map(|_| ()) });
        let (_, send) = next(&mut h).await;
        send.send_response(reply(
            410,
            status(410, "Expired", "too old resource version: 3 (250)", ""),
        ));
        let err = op.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::TooOld {
                    requested: 3,
                    oldest: Some(250),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn watch_error_event_410_ends_the_stream_with_too_old() {
        let (b, mut h) = backend();
        let task = tokio::spawn(async move {
            let mut w = b.watch(Kind::Node, 7).await.unwrap();
            let mut got = Vec::new();
            while let Some(item) = w.next().await {
                got.push(item);
            }
            got
        });
        let (req, send) = next(&mut h).await;
        assert_eq!(req.uri().path(), "/apis/margay.io/v1/nodes");
        send.send_response(watch_body(&[json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "The resourceVersion for the provided watch is too old.",
            "reason": "Expired", "code": 410}})]));
        let got = task.await.unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            matches!(
                got[0],
                Err(StoreError::TooOld {
                    kind: Kind::Node,
                    requested: 7,
                    ..
                })
            ),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn watch_from_zero_lists_first_then_watches_from_the_listing() {
        let (b, mut h) = backend();
        let task = tokio::spawn(async move {
            let mut w = b.watch(Kind::IPPool, 0).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(w.next().await.unwrap().unwrap());
            }
            got
        });
        let (req, send) = next(&mut h).await;
        assert!(query(&req).iter().all(|(k, _)| k != "watch"));
        send.send_response(reply(
            200,
            json!({"metadata": {"resourceVersion": "30"}, "items": [pool("b", 20), pool("a", 9)]}),
        ));
        let (req, send) = next(&mut h).await;
        assert!(query(&req).contains(&("resourceVersion".into(), "30".into())));
        send.send_response(watch_body(&[
            json!({"type": "ADDED", "object": pool("c", 31)}),
        ]));
        let got = task.await.unwrap();
        let revs: Vec<_> = got.iter().map(RawEvent::revision).collect();
        assert_eq!(revs, vec![9, 20, 31]);
    }

    #[test]
    fn write_body_sets_identity_and_precondition() {
        let v = json!({"metadata": {"name": "other", "namespace": "x", "resourceVersion": "1"}, "spec": {}});
        let b = write_body(Kind::IPPool, "p", v, Some(9), false);
        assert_eq!(b["metadata"]["name"], "p");
        assert_eq!(b["metadata"]["resourceVersion"], "9");
        assert!(b["metadata"].get("namespace").is_none());
        assert_eq!(b["apiVersion"], "margay.io/v1");
    }
}
