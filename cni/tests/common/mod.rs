//! The harness of the plugin tests: a real etcd, a "node" network namespace with an uplink
//! (so that it has a default route, as a node does), pod namespaces, and the real plugin
//! binaries run as a runtime runs them (environment plus stdin). Everything is created with
//! unique names (`mgc-<pid>-<n>`) and removed on drop, also when a test fails.
#![allow(dead_code)]

use margay_api::{IPPool, IPPoolSpec, Store};
use margay_kernel::netns::{Netns, OwnedNetns};
use margay_testkit::EtcdProcess;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
pub const MARGAY_IPAM: &str = env!("CARGO_BIN_EXE_margay-ipam");

/// The node's uplink address (pods ping it).
pub const NODE_IP: &str = "10.99.0.1";

/// Prints a line the harness does not capture.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Returns false (saying so) when the test cannot run here: not root. Under `CI=true` that
/// fails the test instead.
pub fn can_run(test: &str) -> bool {
    margay_testkit::root_or_skip(test)
}

pub fn unique(tag: &str) -> String {
    format!(
        "mgc-{}-{tag}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A fresh network namespace with `lo` up, deleted on drop.
pub fn netns(tag: &str) -> OwnedNetns {
    let name = unique(tag);
    let ns = OwnedNetns::create(&name).unwrap_or_else(|e| panic!("create netns {name}: {e}"));
    ip(&ns, &["link", "set", "lo", "up"]);
    ns
}

/// `ip -n <ns> <args>`; panics on failure.
pub fn ip(ns: &Netns, args: &[&str]) -> String {
    let (ok, out) = ip_try(ns, args);
    assert!(ok, "ip -n {} {}: {out}", ns.name(), args.join(" "));
    out
}

pub fn ip_try(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("run ip");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Pings `addr` from `ns`, up to `tries` one-second attempts.
pub fn ping(ns: &Netns, addr: &str, tries: u32) -> bool {
    (0..tries).any(|_| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                addr,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

/// The node: its namespace, with an uplink to an "upstream" namespace holding the default
/// route, like a node's NIC.
pub struct Node {
    pub name: String,
    // Declared first: dropped (deleted) before the upstream.
    pub ns: OwnedNetns,
    pub upstream: OwnedNetns,
}

impl Node {
    pub fn new() -> Node {
        let ns = netns("node");
        let upstream = netns("up");
        ip(
            &ns,
            &[
                "link",
                "add",
                "uplink0",
                "type",
                "veth",
                "peer",
                "name",
                "downlink0",
                "netns",
                upstream.name(),
            ],
        );
        ip(&ns, &["addr", "add", "10.99.0.1/24", "dev", "uplink0"]);
        ip(&ns, &["link", "set", "uplink0", "up"]);
        ip(
            &upstream,
            &["addr", "add", "10.99.0.2/24", "dev", "downlink0"],
        );
        ip(&upstream, &["link", "set", "downlink0", "up"]);
        ip(&ns, &["route", "add", "default", "via", "10.99.0.2"]);
        Node {
            name: ns.name().to_owned(),
            ns,
            upstream,
        }
    }

    /// Host-side veths with the cali prefix.
    pub fn cali_veths(&self) -> Vec<String> {
        let mut nl = margay_kernel::Netlink::open_in(self.ns.path()).unwrap();
        nl.links_with_prefix("cali")
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    }
}

/// A running etcd with a pool, a node, a state directory and the network configuration.
pub struct Lab {
    pub node: Node,
    pub state: tempfile::TempDir,
    pub prefix: String,
    pub store: Store,
    // Last: stopped after everything that uses it.
    pub etcd: EtcdProcess,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Lab {
    /// etcd, a node and a pool `10.244.0.0/16` with /26 blocks.
    pub fn new(rt: &tokio::runtime::Runtime) -> Lab {
        Lab::with_pool(rt, "default-ipv4", "10.244.0.0/16", 26)
    }

    pub fn with_pool(rt: &tokio::runtime::Runtime, name: &str, cidr: &str, block: u8) -> Lab {
        let etcd = rt.block_on(EtcdProcess::start()).expect("start etcd");
        let prefix = format!("/margay-cni-{}/", std::process::id());
        let backend = rt.block_on(etcd.backend(&prefix)).expect("etcd backend");
        let store = Store::new(Arc::new(backend));
        let lab = Lab {
            node: Node::new(),
            state: tempfile::tempdir().unwrap(),
            prefix,
            store,
            etcd,
        };
        lab.add_pool(rt, name, cidr, block);
        lab
    }

    pub fn add_pool(&self, rt: &tokio::runtime::Runtime, name: &str, cidr: &str, block: u8) {
        rt.block_on(self.store.create(&IPPool::new(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                block_size: Some(block),
                ..IPPoolSpec::default()
            },
        )))
        .expect("create pool");
    }

    /// The conflist entry for `margay` at `version`.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "margay",
            "nodename": "node-a",
            "datastore_type": "etcd",
            "etcd_endpoints": self.etcd.endpoint(),
            "etcd_prefix": self.prefix,
            "mtu": 1400,
            "ipam": {"type": "margay-ipam"},
            "state_dir": self.state.path(),
            "node_netns": self.node.ns.path(),
            "log_level": "debug",
            "custom_field": {"passed": "through"},
        })
    }

    pub fn pending_files(&self) -> Vec<std::path::PathBuf> {
        match std::fs::read_dir(self.state.path().join("pending-releases")) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Allocated pod addresses with their handles.
    pub fn allocations(&self, rt: &tokio::runtime::Runtime) -> Vec<(std::net::IpAddr, String)> {
        let snap = rt
            .block_on(margay_ipam::audit::Snapshot::read(&self.store))
            .unwrap();
        snap.allocations()
            .into_iter()
            .map(|a| (a.ip, a.handle.unwrap_or_default()))
            .collect()
    }
}

/// A pod: its namespace and identity.
pub struct Pod {
    pub ns: OwnedNetns,
    pub namespace: String,
    pub name: String,
    pub container_id: String,
}

impl Pod {
    pub fn new(name: &str) -> Pod {
        let ns = netns("pod");
        Pod {
            container_id: format!("{}{}", name.replace('-', ""), ns.name().replace('-', "")),
            ns,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    pub fn args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-1",
            self.namespace, self.name, self.container_id
        )
    }

    pub fn netns_path(&self) -> String {
        self.ns.path().display().to_string()
    }

    pub fn veth(&self) -> String {
        margay_cni::config::host_veth_name("cali", &self.namespace, &self.name)
    }

    /// The pod's first IPv4 address on eth0, as `ip` reports it.
    pub fn ipv4(&self) -> Option<String> {
        let out = ip_try(&self.ns, &["-4", "-o", "addr", "show", "dev", "eth0"]).1;
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .map(|a| a.split('/').next().unwrap().to_owned())
    }
}

/// What a plugin run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success and returns the result (Null when nothing was printed).
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.rc, 0,
            "plugin failed: stdout {} stderr {}",
            self.stdout, self.stderr
        );
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts failure with `code` and returns the error JSON.
    pub fn err(&self, code: u32) -> Value {
        assert_ne!(self.rc, 0, "expected an error, got stdout {}", self.stdout);
        let v = self.json();
        assert_eq!(
            v["code"], code,
            "wrong error code: {v}\nstderr: {}",
            self.stderr
        );
        assert!(v["msg"].is_string(), "{v}");
        v
    }
}

/// Runs `bin` with exactly `env` and `stdin`, as a runtime does.
pub fn exec(bin: &str, env: &[(&str, String)], stdin: &[u8]) -> Run {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn plugin");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        rc: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The environment of `command` for `pod`.
pub fn pod_env(command: &str, pod: &Pod) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", pod.container_id.clone()),
        ("CNI_NETNS", pod.netns_path()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_ARGS", pod.args()),
        ("CNI_PATH", "/usr/lib/cni".to_owned()),
    ]
}

/// Runs `margay` for `pod`.
pub fn cni(command: &str, pod: &Pod, conf: &Value) -> Run {
    exec(MARGAY, &pod_env(command, pod), conf.to_string().as_bytes())
}

/// CHECK with `prev` as prevResult.
pub fn check(pod: &Pod, conf: &Value, prev: &Value) -> Run {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    cni("CHECK", pod, &c)
}

/// GC/STATUS-style run without container variables.
pub fn cni_plain(command: &str, conf: &Value) -> Run {
    exec(
        MARGAY,
        &[
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_PATH", "/usr/lib/cni".to_owned()),
        ],
        conf.to_string().as_bytes(),
    )
}
