//! Route-writing throughput: Margay's pipelined writer against `ip -batch`, same routes, same
//! namespace set-up, same run.
//!
//! ```text
//! cargo bench -p margay-kernel --bench routes
//! MARGAY_BENCH_ROUTES=100000 MARGAY_BENCH_RUNS=5 cargo bench -p margay-kernel --bench routes
//! ```
//!
//! Each run makes a fresh namespace `mgkb-<pid>-<run>` with a veth pair up and 192.0.2.1/24 on
//! `mgb0`, then for each tool: installs N routes `10.x.y.z/32 via 192.0.2.2 dev mgb0 proto 77`,
//! replaces them all with `via 192.0.2.3`, deletes them all. Every phase is checked (route
//! count, gateway) outside the timed part. The tools alternate which goes first. Needs root.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use margay_kernel::netns::OwnedNetns;
use margay_kernel::{AddressOptions, Netlink, Route, RouteFilter, RouteWriter, VethSpec, WriteOp};

const PHASES: [&str; 3] = ["install", "replace", "delete"];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dst(i: usize) -> IpNet {
    IpNet::new(Ipv4Addr::from(0x0a00_0000u32 + i as u32).into(), 32).expect("valid")
}

fn setup(name: &str) -> OwnedNetns {
    let ns = OwnedNetns::create(name).expect("create netns");
    let mut nl = Netlink::open_in(ns.path()).expect("netlink");
    nl.set_link_up("lo", true).expect("lo up");
    nl.create_veth(&VethSpec {
        name: "mgb0".into(),
        mac: None,
        peer_name: "mgb1".into(),
        peer_mac: None,
        mtu: None,
        peer_netns: None,
    })
    .expect("veth");
    nl.set_link_up("mgb0", true).expect("up");
    nl.set_link_up("mgb1", true).expect("up");
    nl.add_address(
        "mgb0",
        "192.0.2.1/24".parse().expect("net"),
        AddressOptions::default(),
    )
    .expect("address");
    ns
}

fn count(w: &RouteWriter, gw: Option<&str>) -> usize {
    w.dump_blocking(RouteFilter::margay())
        .expect("dump")
        .iter()
        .filter(|r| gw.is_none_or(|g| r.gateway == Some(g.parse().expect("ip"))))
        .count()
}

fn margay(w: &RouteWriter, n: usize) -> [Duration; 3] {
    let mut out = [Duration::ZERO; 3];
    for (p, gw) in [(0, "192.0.2.2"), (1, "192.0.2.3")] {
        let ops: Vec<WriteOp> = (0..n)
            .map(|i| {
                WriteOp::ReplaceRoute(Route::via_dev(
                    dst(i),
                    gw.parse().expect("ip"),
                    "mgb0",
                    false,
                ))
            })
            .collect();
        let t = Instant::now();
        let res = w.apply_blocking(ops).expect("writer");
        out[p] = t.elapsed();
        assert!(res.iter().all(Result::is_ok), "margay {} failed", PHASES[p]);
        assert_eq!(count(w, Some(gw)), n, "margay {}", PHASES[p]);
    }
    let ops: Vec<WriteOp> = (0..n)
        .map(|i| WriteOp::DeleteRoute(Route::blackhole(dst(i)).key()))
        .collect();
    let t = Instant::now();
    let res = w.apply_blocking(ops).expect("writer");
    out[2] = t.elapsed();
    assert!(res.iter().all(Result::is_ok), "margay delete failed");
    assert_eq!(count(w, None), 0, "margay delete");
    out
}

fn ip_batch(ns: &OwnedNetns, w: &RouteWriter, n: usize, dir: &std::path::Path) -> [Duration; 3] {
    let mut out = [Duration::ZERO; 3];
    let scripts = [
        ("add", "via 192.0.2.2 dev mgb0 proto 77", Some("192.0.2.2")),
        (
            "replace",
            "via 192.0.2.3 dev mgb0 proto 77",
            Some("192.0.2.3"),
        ),
        ("del", "proto 77", None),
    ];
    for (p, (verb, rest, gw)) in scripts.iter().enumerate() {
        let path = dir.join(format!("{verb}.batch"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("batch file"));
        for i in 0..n {
            writeln!(f, "route {verb} {} {rest}", dst(i)).expect("write");
        }
        f.flush().expect("flush");
        drop(f);
        let t = Instant::now();
        let st = Command::new("ip")
            .args(["-n", ns.name(), "-batch"])
            .arg(&path)
            .status()
            .expect("run ip");
        out[p] = t.elapsed();
        assert!(st.success(), "ip -batch {verb} failed");
        let want = if gw.is_some() { n } else { 0 };
        assert_eq!(count(w, *gw), want, "ip {verb}");
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED routes benchmark: needs root to create a network namespace");
        return;
    }
    let n = env_or("MARGAY_BENCH_ROUTES", 100_000);
    let runs = env_or("MARGAY_BENCH_RUNS", 3).max(1);
    let dir = std::env::temp_dir().join(format!("mgkb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ipv = Command::new("ip").arg("-V").output().expect("ip -V");
    println!(
        "routes benchmark: {n} IPv4 /32 routes via a gateway, {runs} runs; {}",
        String::from_utf8_lossy(&ipv.stdout).trim()
    );
    // rates[tool][phase] = routes/s per run
    let mut rates = [
        [Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new(), Vec::new()],
    ];
    for run in 0..runs {
        let ns = setup(&format!("mgkb-{}-{run}", std::process::id()));
        let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).expect("writer");
        let (m, i) = if run % 2 == 0 {
            let m = margay(&w, n);
            (m, ip_batch(&ns, &w, n, &dir))
        } else {
            let i = ip_batch(&ns, &w, n, &dir);
            (margay(&w, n), i)
        };
        for p in 0..3 {
            rates[0][p].push(n as f64 / m[p].as_secs_f64());
            rates[1][p].push(n as f64 / i[p].as_secs_f64());
        }
        println!(
            "run {run}: margay {:.0}/{:.0}/{:.0} ms, ip -batch {:.0}/{:.0}/{:.0} ms (install/replace/delete)",
            m[0].as_secs_f64() * 1e3,
            m[1].as_secs_f64() * 1e3,
            m[2].as_secs_f64() * 1e3,
            i[0].as_secs_f64() * 1e3,
            i[1].as_secs_f64() * 1e3,
            i[2].as_secs_f64() * 1e3,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!("| phase | margay routes/s | ip -batch routes/s | ratio |");
    println!("|---|---:|---:|---:|");
    for (p, name) in PHASES.iter().enumerate() {
        let m = median(rates[0][p].clone());
        let i = median(rates[1][p].clone());
        println!("| {name} | {m:.0} | {i:.0} | {:.2}x |", m / i);
    }
}
