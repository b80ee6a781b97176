//! A small lab harness for interop tests: network namespaces joined by veth pairs
//! (or a bridge in a hub namespace), and the real daemons (margay-bgpd, BIRD 2,
//! GoBGP) running inside them. Every namespace and process is removed by a Drop
//! guard, so a failing test cleans up too. Names are `mgb-<pid>-<n>` so parallel
//! runs never collide. Processes are stopped by their PID.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fails the test with the fix when a tool is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).exists();
    assert!(
        found,
        "`{tool}` is not installed; run scripts/setup.sh (it installs bird2, gobgpd, frr, iproute2 and nftables)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "interop tests build network namespaces and need root"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace; deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("mgb-{}-{n}-{tag}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
        ns
    }

    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    pub fn ip(&self, args: &[&str]) -> String {
        check(self.cmd("ip").args(args))
    }

    pub fn sh(&self, script: &str) -> String {
        check(self.cmd("sh").args(["-c", script]))
    }

    pub fn try_sh(&self, script: &str) -> Output {
        run(self.cmd("sh").args(["-c", script]))
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// HTTP GET inside this namespace (the status API listens on its loopback).
    pub fn http_get(&self, port: u16, path: &str) -> Option<String> {
        let nspath = self.path();
        let path = path.to_owned();
        std::thread::spawn(move || -> Option<String> {
            let f = File::open(nspath).ok()?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).ok()?;
            let (head, body) = buf.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
        })
        .join()
        .ok()
        .flatten()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins `a` and `b` with a veth pair and gives each end its addresses
/// ("10.0.0.1/24", "fd00::1/64").
pub fn link(a: &Ns, a_addrs: &[&str], b: &Ns, b_addrs: &[&str]) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let (ia, ib) = (format!("mgv{n}a"), format!("mgv{n}b"));
    check(Command::new("ip").args([
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ]));
    for (ns, ifc, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifc, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifc]);
            }
        }
        ns.ip(&["link", "set", ifc, "up"]);
    }
}

/// A shared segment: a bridge in `hub` with `hub_addrs`, and each member linked to
/// it with its own addresses.
pub fn segment(hub: &Ns, hub_addrs: &[&str], members: &[(&Ns, &[&str])]) {
    hub.ip(&["link", "add", "br0", "type", "bridge"]);
    for a in hub_addrs {
        if a.contains(':') {
            hub.ip(&["addr", "add", a, "dev", "br0", "nodad"]);
        } else {
            hub.ip(&["addr", "add", a, "dev", "br0"]);
        }
    }
    hub.ip(&["link", "set", "br0", "up"]);
    for (ns, addrs) in members {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (ia, ib) = (format!("mgs{n}m"), format!("mgs{n}h"));
        check(Command::new("ip").args([
            "link", "add", &ia, "netns", &ns.name, "type", "veth", "peer", "name", &ib, "netns",
            &hub.name,
        ]));
        for addr in *addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", &ia, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", &ia]);
            }
        }
        ns.ip(&["link", "set", &ia, "up"]);
        hub.ip(&["link", "set", &ib, "master", "br0"]);
        hub.ip(&["link", "set", &ib, "up"]);
    }
}

/// A child process killed (by PID) on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str, log: PathBuf) -> Proc {
        let f = File::create(&log).unwrap();
        cmd.stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, s: Signal) {
        if let Some(p) = self.pid() {
            let _ = kill(Pid::from_raw(p), s);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `t`, then SIGKILL. Returns whether it exited by itself.
    pub fn terminate(&mut self, t: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < t {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` every 200 ms until it returns `Some`, or panics after `t` with `what`.
pub fn wait_for<T>(t: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > t {
            panic!("timed out after {t:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ----- margay-bgpd -----

pub const STATUS_PORT: u16 = 9179;

pub struct Margay {
    pub proc: Proc,
    pub ns_name: String,
    pub conf: PathBuf,
    pub dir: PathBuf,
}

pub fn margay(ns: &Ns, dir: &Path, yaml: &str) -> Margay {
    let conf = dir.join(format!("{}-bgpd.yaml", ns.name));
    std::fs::write(&conf, yaml).unwrap();
    let proc = start_margay(ns, dir, &conf);
    Margay {
        proc,
        ns_name: ns.name.clone(),
        conf,
        dir: dir.to_owned(),
    }
}

pub fn start_margay(ns: &Ns, dir: &Path, conf: &Path) -> Proc {
    let mut c = ns.cmd(env!("CARGO_BIN_EXE_margay-bgpd"));
    c.args(["-c", conf.to_str().unwrap()])
        .env("RUST_LOG", "info,margay_bgp=debug");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    Proc::spawn(
        c,
        "margay-bgpd",
        dir.join(format!("{}-bgpd-{n}.log", ns.name)),
    )
}

pub fn margay_peers(ns: &Ns) -> Vec<Value> {
    ns.http_get(STATUS_PORT, "/peers")
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

pub fn margay_peer(ns: &Ns, addr: &str) -> Option<Value> {
    margay_peers(ns).into_iter().find(|p| p["address"] == addr)
}

pub fn margay_established(ns: &Ns, addr: &str) -> bool {
    margay_peer(ns, addr).is_some_and(|p| p["state"] == "Established")
}

/// The paths margay holds for `prefix`.
pub fn margay_route(ns: &Ns, prefix: &str) -> Option<Value> {
    let body = ns.http_get(STATUS_PORT, &format!("/routes?prefix={prefix}"))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v.as_array()?.first().cloned()
}

/// The best path's next hop for `prefix` at margay.
pub fn margay_next_hop(ns: &Ns, prefix: &str) -> Option<String> {
    let r = margay_route(ns, prefix)?;
    r["paths"][0]["next_hop"].as_str().map(str::to_owned)
}

// ----- BIRD -----

pub struct Bird {
    pub proc: Proc,
    pub sock: PathBuf,
    pub ns_name: String,
}

pub fn bird(ns: &Ns, dir: &Path, conf: &str) -> Bird {
    require("bird");
    let cfile = dir.join(format!("{}-bird.conf", ns.name));
    let sock = dir.join(format!("{}-bird.ctl", ns.name));
    let pid = dir.join(format!("{}-bird.pid", ns.name));
    std::fs::write(&cfile, conf).unwrap();
    let mut c = ns.cmd("bird");
    c.args([
        "-f",
        "-s",
        sock.to_str().unwrap(),
        "-c",
        cfile.to_str().unwrap(),
        "-P",
        pid.to_str().unwrap(),
    ]);
    let proc = Proc::spawn(c, "bird", dir.join(format!("{}-bird.log", ns.name)));
    let b = Bird {
        proc,
        sock,
        ns_name: ns.name.clone(),
    };
    wait_for(Duration::from_secs(10), "BIRD's control socket", || {
        b.sock.exists().then_some(())
    });
    b
}

impl Bird {
    pub fn birdc(&self, cmd: &str) -> String {
        let out = Command::new("birdc")
            .args(["-s", self.sock.to_str().unwrap()])
            .args(cmd.split_whitespace())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn established(&self, proto: &str) -> bool {
        self.birdc(&format!("show protocols {proto}"))
            .contains("Established")
    }

    /// `show route <prefix> all` output, if the route is there.
    pub fn route(&self, prefix: &str) -> Option<String> {
        let out = self.birdc(&format!("show route {prefix} all"));
        out.contains(prefix.split('/').next().unwrap())
            .then_some(out)
    }
}

// ----- GoBGP -----

pub struct Gobgp {
    pub proc: Proc,
    pub ns_name: String,
}

pub fn gobgp(ns: &Ns, dir: &Path, toml: &str) -> Gobgp {
    require("gobgpd");
    let cfile = dir.join(format!("{}-gobgp.toml", ns.name));
    std::fs::write(&cfile, toml).unwrap();
    let mut c = ns.cmd("gobgpd");
    c.args([
        "-f",
        cfile.to_str().unwrap(),
        "-p",
        "--pprof-disable",
        "--api-hosts",
        "127.0.0.1:50051",
    ]);
    let proc = Proc::spawn(c, "gobgpd", dir.join(format!("{}-gobgp.log", ns.name)));
    let g = Gobgp {
        proc,
        ns_name: ns.name.clone(),
    };
    wait_for(Duration::from_secs(10), "gobgpd's API", || {
        g.cli(ns, "global").ok().map(|_| ())
    });
    g
}

impl Gobgp {
    pub fn cli(&self, ns: &Ns, args: &str) -> Result<String, String> {
        let out = run(ns
            .cmd("gobgp")
            .args(["-u", "127.0.0.1", "-p", "50051"])
            .args(args.split_whitespace()));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The global RIB as JSON (prefix → paths).
    pub fn rib(&self, ns: &Ns, family: &str) -> Value {
        self.cli(ns, &format!("global rib -a {family} -j"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    pub fn established(&self, ns: &Ns, addr: &str) -> bool {
        self.cli(ns, &format!("neighbor {addr}"))
            .is_ok_and(|s| s.contains("BGP state = established"))
    }
}

/// A temporary directory for configs, sockets and logs; logs are printed if the
/// test panics so failures can be diagnosed.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new().prefix("mgb-").tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "log") {
                        let t = std::fs::read_to_string(&p).unwrap_or_default();
                        let tail: String = t
                            .lines()
                            .rev()
                            .take(60)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect::<Vec<_>>()
                            .join("\n");
                        eprintln!("===== {} (last 60 lines) =====\n{tail}", p.display());
                    }
                }
            }
        }
    }
}
