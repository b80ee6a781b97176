//! Margay's plugin with each datastore side by side with Debian's `ptp` + `host-local`, on the
//! same machine, in the same run: ADD and DEL latency (p50/p99) over 100 sequential pods, 5
//! rounds of 20 concurrent pods, and the wall time of a burst of 100 pods on one node.
//!
//! Every plugin runs as a runtime on a node runs it: exec'd inside the node's network namespace
//! (`ip netns exec <node> <plugin>`) with the CNI environment and the configuration on stdin.
//! Margay in etcd mode talks to a real etcd in that namespace (every ADD writes the
//! allocation, its handle and a WorkloadEndpoint). Margay in Kubernetes mode talks to a real
//! kube-apiserver (with its own etcd) in that namespace, with RBAC on, as the chart's
//! `margay-cni` ServiceAccount; every ADD reads the Pod and its Namespace (annotations) and
//! writes the allocation and its handle as custom resources. host-local writes files.
//!
//! `cargo bench -p margay-cni --bench cni_vs_ptp` (root; needs etcd, containernetworking-plugins,
//! and a kube-apiserver in `KUBE_APISERVER_BIN` or on `PATH`; without one the Kubernetes row
//! is left out, saying so). `MARGAY_BENCH_SEQ`, `MARGAY_BENCH_CONC`, `MARGAY_BENCH_BURST`
//! change the sizes.

use margay_api::{IPPool, IPPoolSpec, Store};
use margay_kernel::netns::OwnedNetns;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
const PTP_DIR: &str = "/usr/lib/cni";
const ETCD_PORT: u16 = 23790;

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?} failed");
}

fn env_or(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

/// etcd inside the node's namespace, killed (by PID) on drop.
struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd(node: &OwnedNetns) -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{ETCD_PORT}");
    let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 10);
    let child = Command::new("ip")
        .args(["netns", "exec", node.name(), "etcd"])
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=default={peer}"))
        .args(["--log-level=error", "--logger=zap"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    Etcd { child, _dir: dir }
}

/// Creates the pool from a thread inside the node's namespace (where etcd listens).
fn create_pool(node: &Path) {
    margay_kernel::netns::run_in(node, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg =
                margay_api::store::etcd::EtcdConfig::new([format!("http://127.0.0.1:{ETCD_PORT}")]);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let r = async {
                    let b = margay_api::store::etcd::EtcdBackend::connect(cfg.clone()).await?;
                    let store = Store::new(Arc::new(b));
                    store
                        .create(&IPPool::new(
                            "bench",
                            IPPoolSpec {
                                cidr: "10.244.0.0/16".into(),
                                block_size: Some(26),
                                ..IPPoolSpec::default()
                            },
                        ))
                        .await
                        .map(drop)
                }
                .await;
                match r {
                    Ok(()) => return,
                    Err(e) if Instant::now() > deadline => panic!("etcd not ready: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    })
    .expect("enter the node namespace");
}

struct Plugin {
    label: &'static str,
    /// Names this plugin's pods (container IDs `<tag><round>x<i>`).
    tag: &'static str,
    bin: PathBuf,
    conf: Value,
}

/// The container IDs (and Kubernetes Pod names) `run_all` and the warm-up give a plugin's pods.
fn pod_names(tag: &str, seq: usize, conc: usize, burst: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..3).map(|i| format!("w0x{i}")).collect();
    names.extend((0..seq).map(|i| format!("{tag}0x{i}")));
    for round in 1..=5 {
        names.extend((0..conc).map(|i| format!("{tag}{round}x{i}")));
    }
    names.extend((0..burst).map(|i| format!("{tag}9x{i}")));
    names
}

/// A kube-apiserver (RBAC on, with its own etcd) started from inside the node's namespace, so
/// that the plugin reaches it on the node's loopback, with the chart's objects installed and a
/// Pod object for every pod the benchmark will run. Stopped when `stop` is dropped.
struct KubeSide {
    kubeconfig: PathBuf,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KubeSide {
    fn drop(&mut self) {
        // The thread stops the API server when the channel says so (or closes).
        if self.stop.send(()).is_err() {
            eprintln!("the API server thread had ended before the benchmark did");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("the API server thread panicked while stopping");
            }
        }
    }
}

fn start_kube(node: &Path, dir: &Path, pods: Vec<String>) -> Option<KubeSide> {
    use margay_testkit::apiserver::{apiserver_binary, Options};
    use margay_testkit::chart;
    let Some(bin) = apiserver_binary() else {
        eprintln!(
            "no kube-apiserver (KUBE_APISERVER_BIN or PATH): the Kubernetes-mode row is left out"
        );
        return None;
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let node = node.to_owned();
    let dir = dir.to_owned();
    let thread = std::thread::spawn(move || {
        margay_kernel::netns::run_in(&node, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let api = rt
                .block_on(margay_testkit::ApiServerProcess::start_with(
                    &bin,
                    // As a cluster runs by default: RBAC, no audit log.
                    Options { audit: false, ..Options::RBAC },
                ))
                .expect("starting kube-apiserver");
            let admin = dir.join("admin.kubeconfig");
            api.write_kubeconfig(&admin, None).unwrap();
            chart::apply(&admin, &[]).expect("the chart's objects");
            let bench_pool = "apiVersion: margay.io/v1\nkind: IPPool\nmetadata: {name: bench}\nspec: {cidr: 10.245.0.0/16, blockSize: 26}\n";
            chart::run_kubectl(&admin, &["apply", "-f", "-"], bench_pool).expect("pool");
            // The chart's default pool is left out: every address comes from `bench`.
            chart::run_kubectl(&admin, &["delete", "ippool", "default-ipv4"], "").expect("delete");
            chart::run_kubectl(&admin, &["create", "namespace", "bench"], "").expect("namespace");
            chart::run_kubectl(&admin, &["create", "serviceaccount", "default", "-n", "bench"], "")
                .expect("default ServiceAccount");
            let items: Vec<Value> = pods
                .iter()
                .map(|name| {
                    json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": "bench"},
                        "spec": {"nodeName": "bench-node", "automountServiceAccountToken": false,
                                 "containers": [{"name": "main", "image": "registry.invalid/pause"}]}})
                })
                .collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
            chart::run_kubectl(&admin, &["apply", "-f", "-"], &list.to_string()).expect("pods");
            let token = rt
                .block_on(api.service_account_token(chart::NAMESPACE, "margay-cni"))
                .expect("token");
            let kubeconfig = dir.join("cni.kubeconfig");
            api.write_kubeconfig(&kubeconfig, Some(&token)).unwrap();
            ready_tx.send(kubeconfig).unwrap();
            // Until the benchmark is done (a message, or the sender dropped).
            if stop_rx.recv().is_err() {
                eprintln!("the benchmark ended without saying stop; stopping the API server");
            }
            drop(api);
        })
        .expect("entering the node namespace");
    });
    let kubeconfig = ready_rx.recv().expect("the API server started");
    Some(KubeSide {
        kubeconfig,
        stop: stop_tx,
        thread: Some(thread),
    })
}

fn spawn(node: &str, p: &Plugin, cmd: &str, cid: &str, pod: &OwnedNetns) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", node])
        .arg(&p.bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"),
        )
        .env("CNI_PATH", PTP_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(p.conf.to_string().as_bytes())
        .unwrap();
    child
}

fn finish(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn timed(node: &str, p: &Plugin, cmd: &str, cid: &str, pod: &OwnedNetns) -> Duration {
    let t = Instant::now();
    finish(spawn(node, p, cmd, cid, pod), &format!("{} {cmd}", p.label));
    t.elapsed()
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Figures {
    seq_add: Vec<Duration>,
    seq_del: Vec<Duration>,
    conc_add: Vec<Duration>,
    conc_del: Vec<Duration>,
    burst: Duration,
}

fn pods(n: usize, tag: &str, round: usize) -> Vec<(String, OwnedNetns)> {
    (0..n)
        .map(|i| {
            let name = format!("mgcb-{}-{tag}{round}-{i}", std::process::id());
            let ns = OwnedNetns::create(&name).expect("create pod netns");
            (format!("{tag}{round}x{i}"), ns)
        })
        .collect()
}

/// Starts `cmd` for every pod at once; returns each one's latency and the wall time.
fn concurrent(
    node: &str,
    p: &Plugin,
    cmd: &str,
    set: &[(String, OwnedNetns)],
) -> (Vec<Duration>, Duration) {
    let t0 = Instant::now();
    let running: Vec<(Instant, Child)> = set
        .iter()
        .map(|(cid, ns)| (Instant::now(), spawn(node, p, cmd, cid, ns)))
        .collect();
    let mut lat = Vec::new();
    for (t, c) in running {
        finish(c, &format!("{} {cmd}", p.label));
        lat.push(t.elapsed());
    }
    (lat, t0.elapsed())
}

/// Runs every plugin through every phase, alternating between them pod by pod (and round by
/// round), so that the shared machine's background load falls on all alike.
fn run_all(
    node: &OwnedNetns,
    ps: &[&Plugin],
    seq: usize,
    conc: usize,
    burst: usize,
) -> Vec<Figures> {
    let n = node.name();
    let mut f: Vec<Figures> = ps.iter().map(|_| Figures::default()).collect();
    let tags: Vec<&str> = ps.iter().map(|p| p.tag).collect();
    let sets: Vec<_> = tags.iter().map(|t| pods(seq, t, 0)).collect();
    // Pod i of Margay, then pod i of ptp, and so on.
    for (cmd, i) in ["ADD", "DEL"]
        .into_iter()
        .flat_map(|c| (0..seq).map(move |i| (c, i)))
    {
        for (k, set) in sets.iter().enumerate() {
            let (cid, ns) = &set[i];
            let t = timed(n, ps[k], cmd, cid, ns);
            if cmd == "ADD" {
                f[k].seq_add.push(t);
            } else {
                f[k].seq_del.push(t);
            }
        }
    }
    drop(sets);
    for round in 1..=5 {
        for k in 0..ps.len() {
            let set = pods(conc, tags[k], round);
            f[k].conc_add.extend(concurrent(n, ps[k], "ADD", &set).0);
            f[k].conc_del.extend(concurrent(n, ps[k], "DEL", &set).0);
        }
    }
    for k in 0..ps.len() {
        let set = pods(burst, tags[k], 9);
        let (_, wall) = concurrent(n, ps[k], "ADD", &set);
        f[k].burst = wall;
        // Fully networked: every pod holds its address and default route.
        for (_, ns) in &set {
            let out = Command::new("ip")
                .args(["-n", ns.name(), "route", "show", "default"])
                .output()
                .unwrap();
            assert!(
                !out.stdout.is_empty(),
                "{}: pod {} has no default route after the burst",
                ps[k].label,
                ns.name()
            );
        }
        concurrent(n, ps[k], "DEL", &set);
    }
    f
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("cni_vs_ptp: benchmark");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED cni_vs_ptp: needs root");
        return;
    }
    let ptp = Path::new(PTP_DIR).join("ptp");
    if !ptp.is_file() || !Path::new(PTP_DIR).join("host-local").is_file() {
        eprintln!("SKIPPED cni_vs_ptp: containernetworking-plugins is not installed");
        return;
    }
    let (seq, conc, burst) = (
        env_or("MARGAY_BENCH_SEQ", 100),
        env_or("MARGAY_BENCH_CONC", 20),
        env_or("MARGAY_BENCH_BURST", 100),
    );
    let id = std::process::id();
    let node = OwnedNetns::create(&format!("mgcb-{id}-node")).unwrap();
    let up = OwnedNetns::create(&format!("mgcb-{id}-up")).unwrap();
    let nn = node.name().to_owned();
    sh(&["ip", "-n", &nn, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        &nn,
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        "down0",
        "netns",
        up.name(),
    ]);
    sh(&[
        "ip",
        "-n",
        &nn,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "uplink0",
    ]);
    sh(&["ip", "-n", &nn, "link", "set", "uplink0", "up"]);
    sh(&["ip", "-n", up.name(), "link", "set", "down0", "up"]);
    sh(&[
        "ip",
        "-n",
        &nn,
        "route",
        "add",
        "default",
        "via",
        "10.99.0.2",
    ]);
    let etcd = start_etcd(&node);
    create_pool(node.path());
    let state = tempfile::tempdir().unwrap();

    let kube = start_kube(node.path(), state.path(), pod_names("k", seq, conc, burst));
    let margay = Plugin {
        label: "margay (etcd)",
        tag: "m",
        bin: PathBuf::from(MARGAY),
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench", "type": "margay",
            "nodename": "bench-node", "datastore_type": "etcd",
            "etcd_endpoints": format!("http://127.0.0.1:{ETCD_PORT}"),
            "mtu": 1400, "ipam": {"type": "margay-ipam"},
            "state_dir": state.path().join("margay"),
        }),
    };
    let margay_kube = kube.as_ref().map(|k| Plugin {
        label: "margay (kubernetes)",
        tag: "k",
        bin: PathBuf::from(MARGAY),
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench", "type": "margay",
            "nodename": "bench-node", "datastore_type": "kubernetes",
            "kubernetes": {"kubeconfig": k.kubeconfig},
            "mtu": 1400, "ipam": {"type": "margay-ipam"},
            "state_dir": state.path().join("margay-kube"),
        }),
    });
    let ptp = Plugin {
        label: "ptp + host-local",
        tag: "p",
        bin: ptp,
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp",
            "ipMasq": false, "mtu": 1400,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.77.0.0/16"}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": state.path().join("host-local")},
        }),
    };
    let mut plugins = vec![&margay];
    plugins.extend(margay_kube.as_ref());
    plugins.push(&ptp);
    // Warm every plugin up (page cache, the datastores' first requests).
    for p in &plugins {
        let w = pods(3, "w", 0);
        for (cid, ns) in &w {
            timed(&nn, p, "ADD", cid, ns);
            timed(&nn, p, "DEL", cid, ns);
        }
    }
    println!(
        "\nCNI benchmark: {seq} sequential pods, 5 x {conc} concurrent, burst of {burst}; \
         each plugin exec'd in the node namespace with `ip netns exec`\n"
    );
    println!("| plugin | seq ADD p50 | seq ADD p99 | seq DEL p50 | seq DEL p99 | {conc}-conc ADD p50 | {conc}-conc ADD p99 | {conc}-conc DEL p50 | {conc}-conc DEL p99 | burst of {burst} |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let figures = run_all(&node, &plugins, seq, conc, burst);
    let mut add_p50 = Vec::new();
    for (label, mut f) in plugins.iter().map(|p| p.label).zip(figures) {
        add_p50.push((label, pct(&mut f.seq_add, 0.5)));
        println!(
            "| {label} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms |",
            pct(&mut f.seq_add, 0.5),
            pct(&mut f.seq_add, 0.99),
            pct(&mut f.seq_del, 0.5),
            pct(&mut f.seq_del, 0.99),
            pct(&mut f.conc_add, 0.5),
            pct(&mut f.conc_add, 0.99),
            pct(&mut f.conc_del, 0.5),
            pct(&mut f.conc_del, 0.99),
            f.burst.as_secs_f64() * 1000.0,
        );
    }
    let of = |l: &str| add_p50.iter().find(|(x, _)| *x == l).map(|(_, v)| *v);
    if let (Some(k), Some(e), Some(p)) = (
        of("margay (kubernetes)"),
        of("margay (etcd)"),
        of("ptp + host-local"),
    ) {
        println!(
            "\nsequential ADD p50: kubernetes / etcd = {:.2} (goal <= 2), kubernetes / ptp = {:.2}",
            k / e,
            k / p
        );
    }
    drop(kube);
    drop(etcd);
    drop(up);
    drop(node);
}
