//! The network configuration Margay's plugins read from stdin.
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "margay",
//!   "mtu": 0, "nodename_file": "/var/lib/margay/nodename",
//!   "datastore_type": "etcd", "etcd_endpoints": "http://10.0.0.1:2379",
//!   "ipam": { "type": "margay-ipam", "ipv4_pools": ["default-ipv4"] },
//!   "log_level": "info", "log_file": "/var/log/margay/cni.log"
//! }
//! ```
//!
//! Unknown fields are kept (the spec requires plugins to pass them through), not refused.

use crate::spec::{code, CniError, Version};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Where the node agent writes state the plugin reads.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/margay";

/// Booleans that Calico-style configs write as strings ("true").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum BoolOrString {
    Bool(bool),
    String(StringBool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StringBool {
    True,
    False,
}

impl BoolOrString {
    pub fn get(self) -> bool {
        matches!(
            self,
            BoolOrString::Bool(true) | BoolOrString::String(StringBool::True)
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct KubernetesConf {
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub type_: String,
    /// Pools (names or CIDRs) to take IPv4 addresses from; empty means every eligible pool.
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
    #[serde(default)]
    pub assign_ipv4: Option<BoolOrString>,
    #[serde(default)]
    pub assign_ipv6: Option<BoolOrString>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Runtime capabilities Margay honours.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RuntimeConfig {
    /// `ips` capability: the addresses the pod must get.
    #[serde(default)]
    pub ips: Vec<String>,
    /// `mac` capability: the pod interface's MAC.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One attachment named in a GC request.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The whole stdin configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub type_: String,
    /// Pod MTU; 0 means the value the node agent wrote to `<state dir>/mtu`.
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub nodename: Option<String>,
    #[serde(default)]
    pub nodename_file: Option<PathBuf>,
    /// `kubernetes` or `etcd`.
    #[serde(default)]
    pub datastore_type: Option<String>,
    /// Comma-separated etcd client URLs.
    #[serde(default)]
    pub etcd_endpoints: Option<String>,
    #[serde(default)]
    pub etcd_prefix: Option<String>,
    #[serde(default)]
    pub kubernetes: Option<KubernetesConf>,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Prefix of host-side veth names (default `cali`); with 11 hex characters it must fit the
    /// kernel's 15-character limit.
    #[serde(default)]
    pub veth_prefix: Option<String>,
    /// Where the node agent keeps the MTU file, the node name and pending releases.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The network namespace that plays the node (a path such as `/var/run/netns/node1`).
    /// Unset in a cluster: the node is the plugin's own namespace. The lab and the tests run
    /// nodes as namespaces while the datastore stays reachable from the plugin's namespace.
    #[serde(default)]
    pub node_netns: Option<PathBuf>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<RuntimeConfig>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The misspelling libcni also sends.
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<Attachment>>,
    /// Everything else, passed through.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl NetConf {
    /// Parses stdin. Undecodable JSON is code 6; a missing or unsupported version is code 1.
    pub fn parse(stdin: &[u8]) -> Result<(NetConf, Version), CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration is not JSON",
                e.to_string(),
            )
        })?;
        let version_str = value
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CniError::new(
                    code::DECODE_FAILURE,
                    "the network configuration has no cniVersion",
                    "",
                )
            })?
            .to_owned();
        let version = Version::parse(&version_str)
            .filter(|v| v.is_supported())
            .ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("CNI version {version_str:?} is not supported"),
                    format!(
                        "Margay supports {}",
                        crate::spec::SUPPORTED_VERSIONS.join(", ")
                    ),
                )
            })?;
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration does not decode",
                e.to_string(),
            )
        })?;
        Ok((conf, version))
    }

    /// Checks the values Margay uses; code 7 names the field.
    pub fn validate(&self) -> Result<(), CniError> {
        let invalid = |field: &str, msg: String| {
            Err(CniError::new(
                code::INVALID_CONFIG,
                format!("{field}: {msg}"),
                "",
            ))
        };
        if self.name.is_empty() {
            return invalid("name", "the network needs a name".into());
        }
        if self.mtu != 0 && !(68..=65535).contains(&self.mtu) {
            return invalid(
                "mtu",
                format!("{} is not 0 (use the node's) or 68–65535", self.mtu),
            );
        }
        let prefix = self.veth_prefix();
        if prefix.is_empty()
            || prefix.len() > 4
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return invalid(
                "veth_prefix",
                format!("{prefix:?} must be 1–4 letters or digits (the name adds 11 hex characters; the kernel allows 15)"),
            );
        }
        match self.datastore_type.as_deref() {
            None | Some("kubernetes") => {}
            Some("etcd") => {
                if self
                    .etcd_endpoints
                    .as_deref()
                    .unwrap_or("")
                    .trim()
                    .is_empty()
                {
                    return invalid(
                        "etcd_endpoints",
                        "datastore_type etcd needs etcd_endpoints".into(),
                    );
                }
            }
            Some(other) => {
                return invalid(
                    "datastore_type",
                    format!("{other:?} is not kubernetes or etcd"),
                )
            }
        }
        if let Some(level) = &self.log_level {
            if !matches!(
                level.to_ascii_lowercase().as_str(),
                "error" | "warn" | "warning" | "info" | "debug" | "trace" | "off"
            ) {
                return invalid(
                    "log_level",
                    format!("{level:?} is not error, warn, info, debug or trace"),
                );
            }
        }
        if let Some(ipam) = &self.ipam {
            if ipam.type_.is_empty() {
                return invalid("ipam.type", "an IPAM plugin type is required".into());
            }
        }
        if let Some(mac) = self.runtime_config.as_ref().and_then(|r| r.mac.as_deref()) {
            if !margay_api::is_mac(mac) {
                return invalid("runtimeConfig.mac", format!("{mac:?} is not a MAC address"));
            }
        }
        for (i, ip) in self
            .runtime_config
            .iter()
            .flat_map(|r| r.ips.iter())
            .enumerate()
        {
            if ip.parse::<std::net::IpAddr>().is_err() && ip.parse::<ipnet::IpNet>().is_err() {
                return invalid(
                    &format!("runtimeConfig.ips[{i}]"),
                    format!("{ip:?} is not an address"),
                );
            }
        }
        Ok(())
    }

    pub fn veth_prefix(&self) -> &str {
        self.veth_prefix.as_deref().unwrap_or("cali")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// The attachments a GC request says are still valid (either spelling).
    pub fn gc_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.attachments.as_deref())
    }
}

/// The host-side veth name of a pod: the prefix and the first 11 hex characters of
/// sha1(`<namespace>.<pod>`), as Calico names them.
pub fn host_veth_name(prefix: &str, namespace: &str, pod: &str) -> String {
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    format!("{prefix}{}", &hex::encode(digest)[..11])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_match_calico() {
        // sha1("default.nginx") = 5c1f3ba5c7b0...; the name uses its first 11 hex characters.
        let name = host_veth_name("cali", "default", "nginx");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("cali"));
        use sha1::{Digest, Sha1};
        let full = hex::encode(Sha1::digest(b"default.nginx"));
        assert_eq!(&name[4..], &full[..11]);
    }

    #[test]
    fn unknown_fields_pass_through_and_strings_are_booleans() {
        let (c, v) = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"margay","custom":{"a":1},
            "ipam":{"type":"margay-ipam","assign_ipv6":"true","extra":2}}"#,
        )
        .unwrap();
        assert_eq!(v, Version(1, 0, 0));
        assert_eq!(c.other["custom"]["a"], 1);
        let ipam = c.ipam.unwrap();
        assert!(ipam.assign_ipv6.unwrap().get());
        assert_eq!(ipam.other["extra"], 2);
    }
}
