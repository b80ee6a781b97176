//! Who is alive: the sources the controller's garbage collector and `margayctl ipam` ask
//! before they call an address leaked. etcd mode reads Margay's own objects (the
//! WorkloadEndpoints the CNI plugin writes, the Nodes); Kubernetes mode reads pods and nodes
//! from the API server.

use crate::audit::{Allocation, LiveSet};
use crate::IpamError;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use margay_api::{Store, StoreError};
use std::collections::HashMap;
use std::net::IpAddr;

/// Where the garbage collector learns who is alive.
#[async_trait]
pub trait LiveSource: Send + Sync {
    /// Everything alive now.
    async fn live(&self) -> Result<LiveSet, IpamError>;
    /// Whether the owner of `a` is alive, asked again just before releasing it.
    async fn still_alive(&self, a: &Allocation) -> Result<bool, IpamError> {
        Ok(self.live().await?.owner_alive(a).is_ok())
    }
}

/// etcd mode: the WorkloadEndpoints the CNI plugin writes, and Margay's Node objects.
pub struct StoreLiveness {
    pub store: Store,
}

#[async_trait]
impl LiveSource for StoreLiveness {
    async fn live(&self) -> Result<LiveSet, IpamError> {
        LiveSet::from_store(&self.store).await
    }
}

/// Pods and nodes from the Kubernetes API.
pub struct KubeLiveness {
    pub client: kube::Client,
}

fn kube_err(what: &str, e: kube::Error) -> IpamError {
    IpamError::Store {
        what: what.into(),
        source: StoreError::unavailable("kubernetes", e.to_string(), e),
    }
}

/// A pod's addresses, or `None` for a pod that has finished (it holds no address any more).
fn pod_ips(p: &Pod) -> Option<Vec<IpAddr>> {
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return None;
    }
    Some(
        status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default(),
    )
}

#[async_trait]
impl LiveSource for KubeLiveness {
    async fn live(&self) -> Result<LiveSet, IpamError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());
        let pod_list = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_err("list pods", e))?;
        let node_list = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| kube_err("list nodes", e))?;
        let mut map = HashMap::new();
        for p in &pod_list.items {
            let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) else {
                continue;
            };
            if let Some(ips) = pod_ips(p) {
                map.insert((ns.clone(), name.clone()), ips);
            }
        }
        Ok(LiveSet {
            nodes: node_list
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect(),
            handles: Default::default(),
            pods: Some(map),
        })
    }

    async fn still_alive(&self, a: &Allocation) -> Result<bool, IpamError> {
        if crate::tunnel_handle_node(a.handle.as_deref().unwrap_or("")).is_some() {
            return Ok(self.live().await?.owner_alive(a).is_ok());
        }
        let (Some(ns), Some(name)) = (
            a.attrs.get(crate::attr::NAMESPACE),
            a.attrs.get(crate::attr::POD),
        ) else {
            return Ok(false);
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| kube_err(&format!("read pod {ns}/{name}"), e))?;
        Ok(pod
            .as_ref()
            .and_then(pod_ips)
            .is_some_and(|ips| ips.is_empty() || ips.contains(&a.ip)))
    }
}
