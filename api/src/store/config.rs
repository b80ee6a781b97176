//! Which datastore a component talks to, from its config file or the environment.

use super::etcd::{EtcdBackend, EtcdConfig, EtcdTls};
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
pub const ENV_ETCD_CA_FILE: &str = "MARGAY_ETCD_CA_FILE";
pub const ENV_ETCD_CERT_FILE: &str = "MARGAY_ETCD_CERT_FILE";
pub const ENV_ETCD_KEY_FILE: &str = "MARGAY_ETCD_KEY_FILE";

impl DatastoreConfig {
    /// Reads the datastore from the process environment; see [`DatastoreConfig::from_vars`].
    pub fn from_env() -> Result<DatastoreConfig, StoreError> {
        DatastoreConfig::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads `MARGAY_DATASTORE_TYPE` (`kubernetes` or `etcd`; default `etcd` when
    /// `MARGAY_ETCD_ENDPOINTS` is set, else `kubernetes`), `MARGAY_ETCD_ENDPOINTS` (comma
    /// separated), `MARGAY_ETCD_PREFIX`, the etcd TLS files `MARGAY_ETCD_CA_FILE`,
    /// `MARGAY_ETCD_CERT_FILE`, `MARGAY_ETCD_KEY_FILE`, and `KUBECONFIG`, through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<DatastoreConfig, StoreError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
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
                if let Some(ca) = get(ENV_ETCD_CA_FILE) {
                    cfg.tls = Some(EtcdTls {
                        ca_file: ca.into(),
                        cert_file: get(ENV_ETCD_CERT_FILE).map(PathBuf::from),
                        key_file: get(ENV_ETCD_KEY_FILE).map(PathBuf::from),
                        server_name: None,
                    });
                }
                cfg.validate()?;
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

    #[test]
    fn reads_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let cfg = DatastoreConfig::from_vars(vars(&[
            (
                "MARGAY_ETCD_ENDPOINTS",
                "https://10.0.0.1:2379,https://10.0.0.2:2379",
            ),
            ("MARGAY_ETCD_CA_FILE", "/etc/margay/etcd/ca.crt"),
        ]))
        .unwrap();
        match cfg {
            DatastoreConfig::Etcd(c) => {
                assert_eq!(c.endpoints.len(), 2);
                assert_eq!(
                    c.tls.unwrap().ca_file,
                    PathBuf::from("/etc/margay/etcd/ca.crt")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            DatastoreConfig::from_vars(vars(&[])).unwrap(),
            DatastoreConfig::Kubernetes { kubeconfig: None }
        );
        let err =
            DatastoreConfig::from_vars(vars(&[("MARGAY_DATASTORE_TYPE", "etcd")])).unwrap_err();
        assert!(err.to_string().contains("MARGAY_ETCD_ENDPOINTS"), "{err}");
    }
}
