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

/// The file the test command (`scripts/test.sh`) collects skips in, to list them in its
/// summary: nextest shows nothing of a passing test's output.
pub const SKIP_LOG_VAR: &str = "MARGAY_SKIP_LOG";

/// What a test found missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack {
    /// Root, or something `scripts/setup.sh` installs: under `CI=true` the test fails.
    Prerequisite,
    /// A kernel feature this machine does not have (the ipip module, multipath routes, IPv4
    /// routes via IPv6): a skip everywhere, listed in the summary. (A missing kube-apiserver
    /// goes through [`apiserver::require_apiserver`], which fails under `CI=true`.)
    KernelFeature,
}

/// Says that `test` does not run here, and why. A missing prerequisite under `CI=true` fails
/// the test (this panics). Otherwise the line goes to stderr and to the test command's skip
/// log, whose lines its summary prints; the caller then returns.
pub fn skip(test: &str, lack: Lack, why: &str) {
    if fails_under(lack, ci()) {
        panic!("{test}: {why}; under CI=true a missing prerequisite is a failure, not a skip");
    }
    record_skip(test, why);
}

/// Whether a test lacking `lack` fails rather than skips.
fn fails_under(lack: Lack, ci: bool) -> bool {
    ci && lack == Lack::Prerequisite
}

/// Says, once per test process and suite, that `suite` did not run and why (see [`skip`]).
pub fn skipped(suite: &str, why: &str) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|s| s == suite) {
        return;
    }
    said.push(suite.to_owned());
    record_skip(suite, why);
}

fn record_skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {why}\n");
    // Straight to the process's stderr, past the harness's capture of print macros.
    if let Err(e) = std::io::stderr().lock().write_all(line.as_bytes()) {
        panic!("could not say that {test} was skipped: {e}");
    }
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR) {
        if let Err(e) = append_line(std::path::Path::new(&path), &line) {
            panic!("could not record that {test} was skipped in {path:?}: {e}");
        }
    }
}

/// One append of one short line: whole, however many test processes write at once.
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
}

/// True when running as root; otherwise says so through [`skip`] (a failure under `CI=true`).
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    skip(
        test,
        Lack::Prerequisite,
        "needs root to create network namespaces",
    );
    false
}

/// True when `tool` is on `PATH`; otherwise says so through [`skip`] (a failure under
/// `CI=true`: `scripts/setup.sh` installs every tool the tests use).
pub fn tool_or_skip(test: &str, tool: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(tool)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    });
    if !found {
        skip(
            test,
            Lack::Prerequisite,
            &format!("the {tool} command is not installed (scripts/setup.sh installs it)"),
        );
    }
    found
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_prerequisite_under_ci_fails() {
        assert!(fails_under(Lack::Prerequisite, true));
        assert!(!fails_under(Lack::Prerequisite, false));
        assert!(!fails_under(Lack::KernelFeature, true));
        assert!(!fails_under(Lack::KernelFeature, false));
    }

    #[test]
    fn skip_lines_from_many_writers_arrive_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        std::thread::scope(|s| {
            for t in 0..8 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..50 {
                        append_line(log, &format!("SKIPPED t{t}-{i}: why\n")).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 400);
        assert!(text
            .lines()
            .all(|l| l.starts_with("SKIPPED t") && l.ends_with(": why")));
    }
}
