//! The datastore as the plugin uses it: connecting with short timeouts, the pod's IPAM
//! annotations in Kubernetes mode, WorkloadEndpoints in etcd mode, and the mapping of store and
//! allocator errors to CNI codes.

use crate::config::NetConf;
use crate::spec::{code, CniError};
use margay_api::store::etcd::{EtcdBackend, EtcdConfig, DEFAULT_PREFIX};
use margay_api::store::kube::KubeBackend;
use margay_api::{names, Store, StoreError, WorkloadEndpoint, WorkloadEndpointSpec};
use margay_ipam::IpamError;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Bound on connecting to the datastore.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one datastore request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Pod annotations Margay reads in Kubernetes mode.
pub const ANNOTATION_IPV4_POOLS: &str = "margay.io/ipv4pools";
pub const ANNOTATION_IPV6_POOLS: &str = "margay.io/ipv6pools";
pub const ANNOTATION_IP_ADDRS: &str = "margay.io/ipAddrs";

/// Which datastore the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Kubernetes,
    Etcd,
}

pub fn mode(conf: &NetConf) -> Mode {
    match conf.datastore_type.as_deref() {
        Some("etcd") => Mode::Etcd,
        _ => Mode::Kubernetes,
    }
}

/// A connected datastore.
#[derive(Clone)]
pub struct Datastore {
    pub store: Store,
    pub mode: Mode,
    /// The Kubernetes client, in Kubernetes mode (for pod annotations).
    pub kube: Option<kube::Client>,
}

/// Connects as the configuration says. Connecting is lazy for etcd: an unreachable etcd shows
/// in the first request, as code 11.
pub async fn connect(conf: &NetConf) -> Result<Datastore, CniError> {
    match mode(conf) {
        Mode::Etcd => {
            let endpoints = conf
                .etcd_endpoints
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from);
            let mut cfg = EtcdConfig::new(endpoints)
                .with_prefix(conf.etcd_prefix.as_deref().unwrap_or(DEFAULT_PREFIX));
            cfg.connect_timeout = CONNECT_TIMEOUT;
            cfg.request_timeout = REQUEST_TIMEOUT;
            if let Err(e) = cfg.validate() {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "etcd_endpoints / etcd_prefix are not usable",
                    e.to_string(),
                ));
            }
            let backend = EtcdBackend::connect(cfg).await.map_err(store_error)?;
            Ok(Datastore {
                store: Store::new(Arc::new(backend)),
                mode: Mode::Etcd,
                kube: None,
            })
        }
        Mode::Kubernetes => {
            let backend = match conf.kubernetes.as_ref().and_then(|k| k.kubeconfig.as_ref()) {
                Some(path) => {
                    let refuse = |e: &dyn std::fmt::Display| {
                        CniError::new(
                            code::INVALID_CONFIG,
                            format!("kubernetes.kubeconfig {} is not usable", path.display()),
                            e.to_string(),
                        )
                    };
                    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| refuse(&e))?;
                    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                        .await
                        .map_err(|e| refuse(&e))?;
                    config.connect_timeout = Some(CONNECT_TIMEOUT);
                    config.read_timeout = Some(REQUEST_TIMEOUT);
                    config.write_timeout = Some(REQUEST_TIMEOUT);
                    let client = margay_api::store::kube::client(config).map_err(|e| refuse(&e))?;
                    KubeBackend::new(client)
                }
                None => KubeBackend::try_default().await.map_err(store_error)?,
            }
            .with_request_timeout(REQUEST_TIMEOUT);
            let client = backend.client().clone();
            Ok(Datastore {
                store: Store::new(Arc::new(backend)),
                mode: Mode::Kubernetes,
                kube: Some(client),
            })
        }
    }
}

/// A datastore error as a CNI error: unreachable is "try again later" (11).
pub fn store_error(e: StoreError) -> CniError {
    if matches!(e, StoreError::Unavailable { .. }) {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the datastore is unreachable",
            e.to_string(),
        )
    } else {
        CniError::new(
            code::DATASTORE,
            "the datastore refused the request",
            e.to_string(),
        )
    }
}

/// An allocator error as a CNI error.
pub fn ipam_error(e: IpamError) -> CniError {
    let details = e.to_string();
    let c = match &e {
        IpamError::PoolsFull { .. } | IpamError::BlockLimit { .. } | IpamError::NoPool { .. } => {
            code::POOL_EXHAUSTED
        }
        IpamError::AddressInUse { .. }
        | IpamError::AddressUnavailable { .. }
        | IpamError::AddressNotInPool { .. } => code::ADDRESS_UNAVAILABLE,
        IpamError::PoolUnusable { .. } | IpamError::InvalidRequest(_) => code::INVALID_CONFIG,
        IpamError::Contention { .. } => code::TRY_AGAIN_LATER,
        IpamError::NodeState { .. } => code::IO_FAILURE,
        IpamError::Store { source, .. } => return store_error_ctx(source, details),
    };
    let msg = match c {
        code::POOL_EXHAUSTED => "no pool can give this pod an address",
        code::ADDRESS_UNAVAILABLE => "the requested address cannot be given to this pod",
        code::INVALID_CONFIG => "the IPAM request is not valid",
        code::IO_FAILURE => "the node's IPAM state (state directory, lock) cannot be used",
        _ => "too many concurrent changes to the same object",
    };
    CniError::new(c, msg, details)
}

fn store_error_ctx(source: &StoreError, details: String) -> CniError {
    if matches!(source, StoreError::Unavailable { .. }) {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the datastore is unreachable",
            details,
        )
    } else {
        CniError::new(
            code::DATASTORE,
            "the datastore refused the request",
            details,
        )
    }
}

/// Whether an error means "the datastore could not be reached".
pub fn is_unreachable(e: &CniError) -> bool {
    e.code == code::TRY_AGAIN_LATER
}

// ===== Kubernetes annotations =====

/// What the pod's (and its namespace's) annotations ask of IPAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIpam {
    pub ipv4_pools: Option<Vec<String>>,
    pub ipv6_pools: Option<Vec<String>>,
    pub ip_addrs: Option<Vec<IpAddr>>,
}

fn json_list(key: &str, v: &str, whose: &str) -> Result<Vec<String>, CniError> {
    serde_json::from_str::<Vec<String>>(v).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("{whose} annotation {key} is not a JSON list of strings"),
            format!("{v:?}: {e}"),
        )
    })
}

/// Reads the annotations: the pod's pools win over the namespace's; `ipAddrs` is per pod.
pub fn parse_annotations(
    pod: &BTreeMap<String, String>,
    namespace: &BTreeMap<String, String>,
) -> Result<PodIpam, CniError> {
    let mut out = PodIpam::default();
    for (key, slot) in [
        (ANNOTATION_IPV4_POOLS, &mut out.ipv4_pools),
        (ANNOTATION_IPV6_POOLS, &mut out.ipv6_pools),
    ] {
        if let Some(v) = pod.get(key) {
            *slot = Some(json_list(key, v, "the pod's")?);
        } else if let Some(v) = namespace.get(key) {
            *slot = Some(json_list(key, v, "the namespace's")?);
        }
    }
    if let Some(v) = pod.get(ANNOTATION_IP_ADDRS) {
        let mut ips = Vec::new();
        for s in json_list(ANNOTATION_IP_ADDRS, v, "the pod's")? {
            let ip = s.parse::<IpAddr>().map_err(|_| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("the pod's annotation {ANNOTATION_IP_ADDRS} holds {s:?}, which is not an IP address"),
                    "",
                )
            })?;
            ips.push(ip);
        }
        out.ip_addrs = Some(ips);
    }
    Ok(out)
}

/// Reads the pod's and its namespace's annotations from the API server.
pub async fn pod_ipam(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
) -> Result<PodIpam, CniError> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let unreachable = |what: String, e: kube::Error| {
        let c = match &e {
            kube::Error::Api(s) if s.code == 404 => code::UNKNOWN_CONTAINER,
            kube::Error::Api(_) => code::DATASTORE,
            _ => code::TRY_AGAIN_LATER,
        };
        CniError::new(c, what, e.to_string())
    };
    // The pod and its namespace are read at once: two requests, one round trip of waiting.
    // Only their metadata (the annotations are all that is used): a pod's spec and status can
    // be many times larger.
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let nss: kube::Api<Namespace> = kube::Api::all(client.clone());
    let timed_out = |what: String| CniError::new(code::TRY_AGAIN_LATER, what, "");
    let (p, n) = futures::join!(
        tokio::time::timeout(REQUEST_TIMEOUT, pods.get_metadata(pod)),
        tokio::time::timeout(REQUEST_TIMEOUT, nss.get_metadata(namespace)),
    );
    let p = p
        .map_err(|_| timed_out(format!("reading pod {namespace}/{pod} timed out")))?
        .map_err(|e| unreachable(format!("cannot read pod {namespace}/{pod}"), e))?;
    let n = n
        .map_err(|_| timed_out(format!("reading namespace {namespace} timed out")))?
        .map_err(|e| unreachable(format!("cannot read namespace {namespace}"), e))?;
    let pod_ann = p.metadata.annotations.unwrap_or_default();
    let ns_ann = n.metadata.annotations.unwrap_or_default();
    parse_annotations(&pod_ann, &ns_ann)
}

// ===== WorkloadEndpoints (etcd mode) =====

/// Writes (or replaces) the WorkloadEndpoint of an attachment; returns its name.
pub async fn put_workload_endpoint(
    store: &Store,
    spec: WorkloadEndpointSpec,
) -> Result<String, CniError> {
    let name = names::workload_name(&spec.node, &spec.namespace, &spec.pod, &spec.endpoint);
    let wep = WorkloadEndpoint::new(&name, spec);
    for _ in 0..5 {
        match store.create(&wep).await {
            Ok(_) => return Ok(name),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(store_error(e)),
        }
        // An earlier sandbox of the same pod left one: it is replaced.
        match store.try_get::<WorkloadEndpoint>(&name).await {
            Ok(Some(mut cur)) => {
                cur.spec = wep.spec.clone();
                match store.update(&cur).await {
                    Ok(_) => return Ok(name),
                    Err(e) if e.is_conflict() || e.is_not_found() => continue,
                    Err(e) => return Err(store_error(e)),
                }
            }
            Ok(None) => continue,
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(CniError::new(
        code::TRY_AGAIN_LATER,
        format!("WorkloadEndpoint {name} kept changing while it was written"),
        "",
    ))
}

/// Deletes WorkloadEndpoint `name` if it still belongs to `container_id`
/// ([`margay_ipam::pending::delete_workload_endpoint`]).
pub async fn delete_workload_endpoint(
    store: &Store,
    name: &str,
    container_id: &str,
) -> Result<(), CniError> {
    margay_ipam::pending::delete_workload_endpoint(store, name, container_id)
        .await
        .map_err(ipam_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pod_annotations_win_over_the_namespace() {
        let ns = m(&[
            (ANNOTATION_IPV4_POOLS, r#"["ns-pool"]"#),
            (ANNOTATION_IPV6_POOLS, r#"["ns-v6"]"#),
        ]);
        let pod = m(&[
            (ANNOTATION_IPV4_POOLS, r#"["pod-pool"]"#),
            (ANNOTATION_IP_ADDRS, r#"["10.1.2.3","fd00::5"]"#),
        ]);
        let got = parse_annotations(&pod, &ns).unwrap();
        assert_eq!(got.ipv4_pools, Some(vec!["pod-pool".to_string()]));
        assert_eq!(got.ipv6_pools, Some(vec!["ns-v6".to_string()]));
        assert_eq!(
            got.ip_addrs,
            Some(vec![
                "10.1.2.3".parse().unwrap(),
                "fd00::5".parse().unwrap()
            ])
        );
        assert_eq!(
            parse_annotations(&m(&[]), &m(&[])).unwrap(),
            PodIpam::default()
        );
    }

    #[test]
    fn bad_annotations_are_invalid_config() {
        for pod in [
            m(&[(ANNOTATION_IPV4_POOLS, "pool-a")]),
            m(&[(ANNOTATION_IP_ADDRS, r#"["10.1.2.300"]"#)]),
        ] {
            let e = parse_annotations(&pod, &m(&[])).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{e}");
        }
    }
}
