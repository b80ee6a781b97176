//! Margay's test harness, shared by every integration suite of the project.
//!
//! - [`EtcdProcess`]: a real etcd on free loopback ports with its own data directory, that can
//!   be stopped, killed, restarted and compacted.
//! - [`ApiServerProcess`]: a real kube-apiserver (from `KUBE_APISERVER_BIN`, or on `PATH`) with
//!   its own etcd and Margay's CRDs installed.
//! - [`chart`]: the Helm chart rendered with helm and applied with kubectl.
//! - [`netns`]: network namespaces joined by bridges, deleted when dropped.
//! - [`contract`]: the datastore contract suite, written once and run against every backend.
//!
//! Processes are stopped by their PID (SIGTERM, then SIGKILL after a grace period) when dropped,
//! and their temporary directories removed.

pub mod apiserver;
pub mod chart;
pub mod contract;
pub mod etcd;
pub mod netns;
mod ports;
mod process;

pub use apiserver::ApiServerProcess;
pub use etcd::EtcdProcess;
pub use ports::free_port;

/// True under `CI=true`, where every test must run: a missing prerequisite is a failure there,
/// never a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says, once per test process and suite, that `suite` did not run and why.
pub fn skipped(suite: &str, why: &str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|s| s == suite) {
        return;
    }
    said.push(suite.to_owned());
    // Straight to the process's stderr, past the harness's capture of print macros.
    if let Err(e) = writeln!(std::io::stderr().lock(), "SKIPPED {suite}: {why}") {
        panic!("could not say that {suite} was skipped: {e}");
    }
}
