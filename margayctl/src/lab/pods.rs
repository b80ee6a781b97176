//! Pods, made the way a container runtime makes them: a network namespace per pod, then the
//! real `margay` CNI binary run with the CNI environment and the network configuration on
//! stdin, inside the node's namespace.

use super::{plan, Datastore};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub node_netns: String,
    pub netns: String,
    pub container_id: String,
    pub ip: Option<IpAddr>,
    /// The pod's IPv6 address, in a dual-stack lab.
    #[serde(default)]
    pub ip6: Option<IpAddr>,
    /// The TCP echo server inside the pod.
    pub echo: Option<super::proc::Daemon>,
}

/// The network configuration the runtime passes on stdin, for `node`: the lab's etcd, or its
/// API server as the chart's `margay-cni` ServiceAccount.
pub fn network_config(node: &str, state_dir: &Path, datastore: Datastore) -> serde_json::Value {
    let mut conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "margay",
        "nodename": node,
        "state_dir": state_dir,
        "log_level": "info",
        "log_file": state_dir.join("cni.log"),
        "ipam": { "type": "margay-ipam" }
    });
    if plan::ipv6_marker().exists() {
        conf["ipam"]["assign_ipv6"] = "true".into();
    }
    match datastore {
        Datastore::Etcd => {
            conf["datastore_type"] = "etcd".into();
            conf["etcd_endpoints"] = plan::etcd_endpoint().into();
            conf["etcd_prefix"] = plan::ETCD_PREFIX.into();
        }
        Datastore::Kubernetes => {
            conf["datastore_type"] = "kubernetes".into();
            conf["kubernetes"] = serde_json::json!({
                "kubeconfig": super::kube::kubeconfig("margay-cni"),
            });
        }
    }
    conf
}

/// Runs one CNI command of the `margay` plugin for `pod`; returns the parsed stdout.
pub fn cni(
    bin_dir: &Path,
    command: &str,
    pod: &Pod,
    state_dir: &Path,
    datastore: Datastore,
) -> Result<serde_json::Value> {
    cni_with_pools(bin_dir, command, pod, state_dir, datastore, &[])
}

/// Like [`cni`], with `ipam.ipv4_pools` set to `pools` when there are any.
pub fn cni_with_pools(
    bin_dir: &Path,
    command: &str,
    pod: &Pod,
    state_dir: &Path,
    datastore: Datastore,
    pools: &[&str],
) -> Result<serde_json::Value> {
    let mut conf = network_config(&pod.node, state_dir, datastore);
    if !pools.is_empty() {
        conf["ipam"]["ipv4_pools"] = pools.into();
    }
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod.node_netns])
        .arg(bin_dir.join("margay"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_dir)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                pod.namespace, pod.name, pod.container_id
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the margay CNI plugin")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI {command} for {}/{} on {}: {}{}",
            pod.namespace,
            pod.name,
            pod.node,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("CNI {command} printed {stdout:?}"))
}

/// The pod's first address from an ADD result.
pub fn result_ip(result: &serde_json::Value) -> Option<IpAddr> {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
}

/// The pod's IPv6 address from an ADD result, if it got one.
pub fn result_ip6(result: &serde_json::Value) -> Option<IpAddr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .find(IpAddr::is_ipv6)
}

/// A container ID like a runtime's: 64 hex characters, unique per pod.
pub fn container_id(node: &str, name: &str, nonce: u64) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for round in 0u64..4 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (node, name, nonce, round).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_config_is_what_the_plugin_reads() {
        let c = network_config("node1", Path::new("/run/margay-lab/node1"), Datastore::Etcd);
        assert_eq!(c["type"], "margay");
        assert_eq!(c["ipam"]["type"], "margay-ipam");
        assert_eq!(c["datastore_type"], "etcd");
        assert_eq!(c["etcd_endpoints"], "http://172.30.1.2:2379");
        let k = network_config(
            "node1",
            Path::new("/run/margay-lab/node1"),
            Datastore::Kubernetes,
        );
        assert_eq!(k["datastore_type"], "kubernetes");
        assert_eq!(
            k["kubernetes"]["kubeconfig"],
            "/run/margay-lab/kube/margay-cni.kubeconfig"
        );
        assert!(k.get("etcd_endpoints").is_none(), "{k}");
    }

    #[test]
    fn container_ids_look_like_a_runtimes() {
        let a = container_id("node1", "pod-0", 1);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, container_id("node1", "pod-0", 2));
    }

    #[test]
    fn addresses_come_from_the_result() {
        let r = serde_json::json!({"ips": [{"address": "10.244.1.5/32"}]});
        assert_eq!(result_ip(&r), Some("10.244.1.5".parse().unwrap()));
    }
}
