//! Network namespaces for tests: created with unique names, joined by a bridge, and deleted
//! when their guard is dropped (also when the test fails). Only `ip` from iproute2 is used.

use anyhow::{bail, Context, Result};
use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether the tests can build namespaces here (root). When not, says so through
/// [`crate::skip`]: listed in the test command's summary, and a failure under `CI=true`.
pub fn can_build_namespaces(test: &str) -> bool {
    crate::root_or_skip(test)
}

/// A short prefix unique to this process and call, for namespace and interface names (which the
/// kernel limits to 15 characters): `<tag><pid mod 10000><n>`.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip <args>` in this namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(Command::new("ip").args(args))?.stdout).into_owned())
}

/// A network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    pub fn create(name: &str) -> Result<TestNetns> {
        // A leftover of a crashed run with the same name would make the add fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = TestNetns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, for `CNI_NETNS` and `setns`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (not started yet).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace and returns its output, failing on a non-zero
    /// exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&run(self.command(program).args(args))?.stdout).into_owned())
    }

    /// Whether `ping -c1 -W1 <dst>` from inside succeeds.
    pub fn ping(&self, dst: IpAddr) -> bool {
        self.command("ping")
            .args(["-c1", "-W1", "-q", &dst.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An L2 segment: a bridge in a namespace of its own, to which namespaces (and optionally this
/// one) are attached with veth pairs.
#[derive(Debug)]
pub struct Fabric {
    prefix: String,
    ns: TestNetns,
    ports: u32,
    /// Host-side interfaces to delete on drop (those in namespaces go with them).
    host_links: Vec<String>,
}

impl Fabric {
    /// A bridge `br0` in namespace `<prefix>f`.
    pub fn new(prefix: &str) -> Result<Fabric> {
        let ns = TestNetns::create(&format!("{prefix}f"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Fabric {
            prefix: prefix.to_owned(),
            ns,
            ports: 0,
            host_links: Vec::new(),
        })
    }

    pub fn netns(&self) -> &TestNetns {
        &self.ns
    }

    /// Attaches `ns` as `ifname` with `addr` (address/prefix length), up.
    pub fn attach(&mut self, ns: &TestNetns, ifname: &str, addr: &str) -> Result<()> {
        self.ports += 1;
        let outer = format!("{}p{}", self.prefix, self.ports);
        let tmp = format!("{}t{}", self.prefix, self.ports);
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &tmp])?;
        ip(&["link", "set", &outer, "netns", self.ns.name()])?;
        self.ns
            .ip(&["link", "set", &outer, "master", "br0", "up"])?;
        ip(&["link", "set", &tmp, "netns", ns.name()])?;
        ns.ip(&["link", "set", &tmp, "name", ifname])?;
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Attaches this (the test's own) namespace with `addr`, so that a process here (etcd) is
    /// reachable from the fabric. The host side is named `<prefix>h`.
    pub fn attach_host(&mut self, addr: &str) -> Result<()> {
        self.ports += 1;
        let host = format!("{}h", self.prefix);
        let outer = format!("{}p{}", self.prefix, self.ports);
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &outer])?;
        self.host_links.push(host.clone());
        ip(&["link", "set", &outer, "netns", self.ns.name()])?;
        self.ns
            .ip(&["link", "set", &outer, "master", "br0", "up"])?;
        ip(&["addr", "add", addr, "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for l in &self.host_links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}

/// A child process (a daemon a test started inside a namespace) that is killed by its PID and
/// reaped when dropped, also when the test fails.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 50 ms until it holds, for at most `limit`; panics naming `what` otherwise.
/// Returns how long it took.
pub fn wait_for(
    what: &str,
    limit: std::time::Duration,
    mut f: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    start.elapsed()
}
