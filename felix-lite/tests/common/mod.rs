//! What the node-agent namespace tests share: starting margay-node inside a node namespace.

use margay_testkit::netns::{KillOnDrop, TestNetns};
use std::path::Path;
use std::process::Stdio;

/// How one agent is started.
pub struct Agent<'a> {
    pub node: &'a str,
    /// The node's address with prefix length.
    pub addr: &'a str,
    pub etcd: &'a str,
    pub etcd_prefix: &'a str,
    pub state: &'a Path,
    pub bgp: bool,
}

/// Starts margay-node in `ns`; it is killed by PID when the guard is dropped.
pub fn start_agent(ns: &TestNetns, a: Agent<'_>) -> KillOnDrop {
    KillOnDrop(
        ns.command(env!("CARGO_BIN_EXE_margay-node"))
            .env("NODENAME", a.node)
            .env("MARGAY_ETCD_ENDPOINTS", a.etcd)
            .env("MARGAY_ETCD_PREFIX", a.etcd_prefix)
            .env("IP", a.addr)
            .env("MARGAY_STATE_DIR", a.state)
            .env("MARGAY_BGP_ENABLED", if a.bgp { "true" } else { "false" })
            .env("MARGAY_RESYNC_INTERVAL", "30s")
            // On the node's address, so that the test probes it from the host.
            .env(
                "MARGAY_HEALTH_LISTEN",
                format!("{}:9099", a.addr.split('/').next().unwrap_or(a.addr)),
            )
            .env("MARGAY_METRICS_LISTEN", "127.0.0.1:9091")
            .env("MARGAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("margay-node starts"),
    )
}
