//! The node agent's settings: a YAML file (`--config`, every key optional) and environment
//! variables on top, named as Calico's node names them where there is an equivalent, so the
//! chart and users can set them either way.
//!
//! | variable | setting | default |
//! |---|---|---|
//! | `NODENAME` | `nodeName` | the node-name file, else the host name |
//! | `MARGAY_NODENAME_FILE` | `nodeNameFile` | `/var/lib/margay/nodename` |
//! | `MARGAY_DATASTORE_TYPE`, `MARGAY_ETCD_ENDPOINTS`, `MARGAY_ETCD_{CA,CERT,KEY}_FILE`, `KUBECONFIG` | `datastore` | kubernetes |
//! | `IP` | `ipv4` | `autodetect` (also: `none`, or an address with prefix length) |
//! | `IP_AUTODETECTION_METHOD` | `ipv4AutodetectionMethod` | `first-found` |
//! | `IP6` | `ipv6` | `none` |
//! | `IP6_AUTODETECTION_METHOD` | `ipv6AutodetectionMethod` | `first-found` |
//! | `AS` | `asNumber` | the cluster's (BGPConfiguration) |
//! | `MARGAY_STATE_DIR` | `stateDir` | `/var/lib/margay` |
//! | `MARGAY_MTU` | `mtu` | 0: detect from the host |
//! | `MARGAY_HEALTH_LISTEN` | `healthListen` | `127.0.0.1:9099` |
//! | `MARGAY_METRICS_LISTEN` | `metricsListen` | `0.0.0.0:9091` |
//! | `MARGAY_LOG_LEVEL` | `logLevel` | `info` |
//! | `MARGAY_RESYNC_INTERVAL` | `resyncInterval` | `90s` |
//! | `MARGAY_BGP_ENABLED` | `bgpEnabled` | `true` |

use margay_api::resources::parse_duration;
use margay_api::DatastoreConfig;
use margay_kernel::autodetect::Method;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the node's address of one family is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressSetting {
    /// Detect it with the autodetection method.
    Autodetect,
    /// Do not use this family.
    None,
    /// This address (with prefix length).
    Fixed(ipnet::IpNet),
}

impl AddressSetting {
    fn parse(key: &str, v: &str, v6: bool) -> Result<AddressSetting, ConfigError> {
        match v.trim() {
            "" | "autodetect" => Ok(AddressSetting::Autodetect),
            "none" => Ok(AddressSetting::None),
            s => match s.parse::<ipnet::IpNet>() {
                Ok(n) if n.addr().is_ipv6() == v6 => Ok(AddressSetting::Fixed(n)),
                _ => Err(ConfigError::invalid(
                    key,
                    v,
                    format!(
                        "must be autodetect, none, or an IPv{} address with prefix length",
                        if v6 { 6 } else { 4 }
                    ),
                )),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {value:?}: {reason}")]
    Invalid {
        setting: String,
        value: String,
        reason: String,
    },
    #[error("config file: {0}")]
    File(String),
}

impl ConfigError {
    fn invalid(setting: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            setting: setting.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The file form: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileConfig {
    node_name: Option<String>,
    node_name_file: Option<PathBuf>,
    datastore: Option<DatastoreConfig>,
    ipv4: Option<String>,
    ipv4_autodetection_method: Option<String>,
    ipv6: Option<String>,
    ipv6_autodetection_method: Option<String>,
    as_number: Option<u32>,
    state_dir: Option<PathBuf>,
    mtu: Option<u32>,
    health_listen: Option<String>,
    metrics_listen: Option<String>,
    log_level: Option<String>,
    resync_interval: Option<String>,
    bgp_enabled: Option<bool>,
}

/// The agent's settings, validated.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Set explicitly; otherwise resolved at start-up by [`NodeConfig::resolve_node_name`].
    pub node_name: Option<String>,
    pub node_name_file: PathBuf,
    pub datastore: DatastoreConfig,
    pub ipv4: AddressSetting,
    pub ipv4_method: Method,
    pub ipv6: AddressSetting,
    pub ipv6_method: Method,
    pub as_number: Option<u32>,
    pub state_dir: PathBuf,
    /// 0: detect the host MTU and subtract the encapsulation overhead.
    pub mtu: u32,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub log_level: String,
    pub resync_interval: Duration,
    pub bgp_enabled: bool,
}

impl NodeConfig {
    /// Builds the settings from an optional YAML file's text and the environment (read through
    /// `env`, so tests need not touch the process environment). The environment wins.
    pub fn load(
        file: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let f: FileConfig = match file {
            Some(text) => {
                serde_yaml::from_str(text).map_err(|e| ConfigError::File(e.to_string()))?
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());

        let datastore =
            if env("MARGAY_DATASTORE_TYPE").is_some() || env("MARGAY_ETCD_ENDPOINTS").is_some() {
                DatastoreConfig::from_vars(env).map_err(|e| {
                    ConfigError::invalid(
                        "MARGAY_DATASTORE_TYPE",
                        &env("MARGAY_DATASTORE_TYPE").unwrap_or_default(),
                        e.to_string(),
                    )
                })?
            } else {
                f.datastore.unwrap_or_default()
            };
        let pick = |var: &str, file: Option<String>| env(var).or(file);
        let ipv4 = AddressSetting::parse("IP", &pick("IP", f.ipv4).unwrap_or_default(), false)?;
        let ipv6 = AddressSetting::parse(
            "IP6",
            &pick("IP6", f.ipv6).unwrap_or_else(|| "none".into()),
            true,
        )?;
        let method = |key: &str, v: Option<String>| {
            Method::parse(v.as_deref().unwrap_or("first-found"))
                .map_err(|e| ConfigError::invalid(key, v.as_deref().unwrap_or(""), e.to_string()))
        };
        let ipv4_method = method(
            "IP_AUTODETECTION_METHOD",
            pick("IP_AUTODETECTION_METHOD", f.ipv4_autodetection_method),
        )?;
        let ipv6_method = method(
            "IP6_AUTODETECTION_METHOD",
            pick("IP6_AUTODETECTION_METHOD", f.ipv6_autodetection_method),
        )?;
        let as_number = match env("AS") {
            Some(v) => Some(
                v.parse::<u32>()
                    .ok()
                    .filter(|a| *a != 0 && *a != 23456)
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            "AS",
                            &v,
                            "must be an AS number from 1 to 4294967295, not 23456 (AS_TRANS)",
                        )
                    })?,
            ),
            None => f.as_number,
        };
        let mtu = match env("MARGAY_MTU") {
            Some(v) => v
                .parse::<u32>()
                .map_err(|_| ConfigError::invalid("MARGAY_MTU", &v, "must be a number"))?,
            None => f.mtu.unwrap_or(0),
        };
        if mtu != 0 && !(576..=65535).contains(&mtu) {
            return Err(ConfigError::invalid(
                "MARGAY_MTU",
                &mtu.to_string(),
                "must be 0 (detect) or 576–65535",
            ));
        }
        let addr =
            |key: &str, v: Option<String>, default: &str| -> Result<SocketAddr, ConfigError> {
                let v = v.unwrap_or_else(|| default.to_owned());
                v.parse().map_err(|_| {
                    ConfigError::invalid(key, &v, "must be address:port, e.g. 127.0.0.1:9099")
                })
            };
        let resync =
            pick("MARGAY_RESYNC_INTERVAL", f.resync_interval).unwrap_or_else(|| "90s".into());
        let resync_interval = parse_duration(&resync)
            .filter(|d| *d >= Duration::from_secs(1))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "MARGAY_RESYNC_INTERVAL",
                    &resync,
                    "must be a duration of at least 1s, e.g. 90s",
                )
            })?;
        let bgp_enabled = match env("MARGAY_BGP_ENABLED") {
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::invalid(
                        "MARGAY_BGP_ENABLED",
                        &v,
                        "must be true or false",
                    ))
                }
            },
            None => f.bgp_enabled.unwrap_or(true),
        };
        let log_level = pick("MARGAY_LOG_LEVEL", f.log_level).unwrap_or_else(|| "info".into());
        if !matches!(
            log_level.to_ascii_lowercase().as_str(),
            "error" | "warn" | "warning" | "info" | "debug" | "trace"
        ) {
            return Err(ConfigError::invalid(
                "MARGAY_LOG_LEVEL",
                &log_level,
                "must be error, warn, info, debug or trace",
            ));
        }
        let node_name = pick("NODENAME", f.node_name);
        if let Some(n) = &node_name {
            if !margay_api::names::is_dns_subdomain(n) {
                return Err(ConfigError::invalid(
                    "NODENAME",
                    n,
                    "must be a lower-case DNS subdomain, as Kubernetes node names are",
                ));
            }
        }
        let state_dir = pick("MARGAY_STATE_DIR", None)
            .map(PathBuf::from)
            .or(f.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/margay"));
        Ok(NodeConfig {
            node_name,
            node_name_file: env("MARGAY_NODENAME_FILE")
                .map(PathBuf::from)
                .or(f.node_name_file)
                .unwrap_or_else(|| state_dir.join("nodename")),
            datastore,
            ipv4,
            ipv4_method,
            ipv6,
            ipv6_method,
            as_number,
            mtu,
            health_listen: addr(
                "MARGAY_HEALTH_LISTEN",
                pick("MARGAY_HEALTH_LISTEN", f.health_listen),
                "127.0.0.1:9099",
            )?,
            metrics_listen: addr(
                "MARGAY_METRICS_LISTEN",
                pick("MARGAY_METRICS_LISTEN", f.metrics_listen),
                "0.0.0.0:9091",
            )?,
            log_level,
            resync_interval,
            bgp_enabled,
            state_dir,
        })
    }

    /// The node's name: the configured one, else the node-name file, else the host name.
    pub fn resolve_node_name(&self) -> Result<String, ConfigError> {
        if let Some(n) = &self.node_name {
            return Ok(n.clone());
        }
        if let Ok(text) = std::fs::read_to_string(&self.node_name_file) {
            let n = text.trim();
            if !n.is_empty() {
                return Ok(n.to_owned());
            }
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if margay_api::names::is_dns_subdomain(&host) {
            Ok(host)
        } else {
            Err(ConfigError::invalid(
                "NODENAME",
                &host,
                "is not set, the node-name file is empty, and the host name is not a valid node name",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NodeConfig::load(file, |k| m.get(k).cloned())
    }

    #[test]
    fn defaults_are_calico_like() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.ipv4, AddressSetting::Autodetect);
        assert_eq!(c.ipv6, AddressSetting::None);
        assert_eq!(
            c.datastore,
            DatastoreConfig::Kubernetes { kubeconfig: None }
        );
        assert_eq!(c.node_name_file, PathBuf::from("/var/lib/margay/nodename"));
        assert_eq!(c.resync_interval, Duration::from_secs(90));
        assert!(c.bgp_enabled);
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = "nodeName: from-file\nipv4: 10.0.0.5/24\nmtu: 1400\n";
        let c = load(
            Some(file),
            &[
                ("NODENAME", "from-env"),
                ("MARGAY_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                ("AS", "65010"),
            ],
        )
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("from-env"));
        assert_eq!(
            c.ipv4,
            AddressSetting::Fixed("10.0.0.5/24".parse().unwrap())
        );
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.as_number, Some(65010));
        assert!(matches!(c.datastore, DatastoreConfig::Etcd(_)));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        for (vars, file, setting) in [
            (vec![("IP", "fd00::1/64")], None, "IP"),
            (vec![("AS", "23456")], None, "AS"),
            (vec![("MARGAY_MTU", "100")], None, "MARGAY_MTU"),
            (
                vec![("IP_AUTODETECTION_METHOD", "magic")],
                None,
                "IP_AUTODETECTION_METHOD",
            ),
            (
                vec![("MARGAY_DATASTORE_TYPE", "etcd")],
                None,
                "MARGAY_DATASTORE_TYPE",
            ),
            (
                vec![("MARGAY_RESYNC_INTERVAL", "0s")],
                None,
                "MARGAY_RESYNC_INTERVAL",
            ),
            (vec![("NODENAME", "Bad_Name")], None, "NODENAME"),
            (
                vec![],
                Some("healthListen: nowhere"),
                "MARGAY_HEALTH_LISTEN",
            ),
        ] {
            match load(file, &vars) {
                Err(ConfigError::Invalid { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{vars:?}: {other:?}"),
            }
        }
        assert!(matches!(
            load(Some("bogus: 1"), &[]),
            Err(ConfigError::File(_))
        ));
    }
}
