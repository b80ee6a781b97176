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

/// `GET path` from the HTTP endpoint at `addr` (one request, connection closed after it):
/// the status code and the body. For the health and metrics endpoints of Margay's daemons.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    // One write: the daemons answer from their first read.
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{raw:?}"));
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .ok_or_else(bad)?;
    Ok((code, body))
}
