//! Which datastore a component talks to, from its config file or the environment.

use super::etcd::{EtcdBackend, EtcdConfig};
use super::kube::KubeBackend;
use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// The datastore a component uses: Kubernetes (the default in a cluster) or etcd v3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DatastoreConfig {
    /// CRDs through the API server. Without a kubeconfig path: `KUBECONFIG`, `~/.kube/config`,
    /// then the in-cluster service account.
    Kubernetes {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kubeconfig: Option<PathBuf>,
    },
    /// etcd v3.
    Etcd(EtcdConfig),
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        DatastoreConfig::Kubernetes { kubeconfig: None }
    }
}

/// Environment variables read by [`DatastoreConfig::from_env`].
pub const ENV_DATASTORE_TYPE: &str = "MARGAY_DATASTORE_TYPE";
pub const ENV_ETCD_ENDPOINTS: &str = "MARGAY_ETCD_ENDPOINTS";
pub const ENV_ETCD_PREFIX: &str = "MARGAY_ETCD_PREFIX";

impl DatastoreConfig {
    /// Reads `MARGAY_DATASTORE_TYPE` (`kubernetes` or `etcd`; default `etcd` when
    /// `MARGAY_ETCD_ENDPOINTS` is set, else `kubernetes`), `MARGAY_ETCD_ENDPOINTS` (comma
    /// separated), `MARGAY_ETCD_PREFIX` and `KUBECONFIG`.
    pub fn from_env() -> Result<DatastoreConfig, StoreError> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoints = get(ENV_ETCD_ENDPOINTS);
        let kind = get(ENV_DATASTORE_TYPE).unwrap_or_else(|| {
            if endpoints.is_some() {
                "etcd".into()
            } else {
                "kubernetes".into()
            }
        });
        match kind.as_str() {
            "kubernetes" | "kdd" => Ok(DatastoreConfig::Kubernetes {
                kubeconfig: get("KUBECONFIG").map(PathBuf::from),
            }),
            "etcd" | "etcdv3" => {
                let endpoints = endpoints.ok_or_else(|| StoreError::Rejected {
                    backend: "etcd",
                    message: format!(
                        "{ENV_DATASTORE_TYPE}=etcd needs {ENV_ETCD_ENDPOINTS}, e.g. http://127.0.0.1:2379"
                    ),
                })?;
                let mut cfg = EtcdConfig::new(endpoints.split(',').map(|e| e.trim().to_owned()));
                if let Some(p) = get(ENV_ETCD_PREFIX) {
                    cfg = cfg.with_prefix(p);
                }
                Ok(DatastoreConfig::Etcd(cfg))
            }
            other => Err(StoreError::Rejected {
                backend: "config",
                message: format!(
                    "{ENV_DATASTORE_TYPE}={other:?} is not a datastore; use kubernetes or etcd"
                ),
            }),
        }
    }

    /// Connects to the datastore.
    pub async fn connect(&self) -> Result<Store, StoreError> {
        match self {
            DatastoreConfig::Kubernetes {
                kubeconfig: Some(p),
            } => Ok(Store::new(Arc::new(KubeBackend::from_kubeconfig(p).await?))),
            DatastoreConfig::Kubernetes { kubeconfig: None } => {
                Ok(Store::new(Arc::new(KubeBackend::try_default().await?)))
            }
            DatastoreConfig::Etcd(cfg) => {
                cfg.validate()?;
                Ok(Store::new(Arc::new(
                    EtcdBackend::connect(cfg.clone()).await?,
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_kinds_from_yaml() {
        let k: DatastoreConfig =
            serde_yaml::from_str("type: kubernetes\nkubeconfig: /etc/margay/kubeconfig").unwrap();
        assert_eq!(
            k,
            DatastoreConfig::Kubernetes {
                kubeconfig: Some("/etc/margay/kubeconfig".into())
            }
        );
        let e: DatastoreConfig =
            serde_yaml::from_str("type: etcd\nendpoints: [\"http://10.0.0.1:2379\"]").unwrap();
        match e {
            DatastoreConfig::Etcd(c) => assert_eq!(c.endpoints, vec!["http://10.0.0.1:2379"]),
            other => panic!("{other:?}"),
        }
        assert!(serde_yaml::from_str::<DatastoreConfig>("type: consul").is_err());
    }
}
