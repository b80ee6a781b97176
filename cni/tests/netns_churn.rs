//! Load on one node: a burst of concurrent ADDs, and ADD/DEL churn with `kill -9` of the plugin
//! in the middle of ADDs, then GC. Afterwards: no cali veth without an allocation, no
//! allocation without a veth, no address on two pods.
//!
//! `netns_churn_with_kill9_then_gc` runs `MARGAY_CHURN_CYCLES` cycles (default 300, under a
//! minute); `netns_churn_full_2000_cycles` (ignored by default) runs 2,000.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_add(pod: &Pod, conf: &Value) -> std::process::Child {
    let mut cmd = Command::new(MARGAY);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in pod_env("ADD", pod) {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn margay");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child
}

#[test]
fn netns_burst_of_concurrent_adds_shares_one_block() {
    if !can_run("netns_burst_of_concurrent_adds_shares_one_block") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let mut conf = lab.conf("1.1.0");
    conf["log_level"] = json!("warn");
    const N: usize = 60;
    let pods: Vec<Pod> = (0..N).map(|i| Pod::new(&format!("burst-{i}"))).collect();
    let started = Instant::now();
    let children: Vec<_> = pods.iter().map(|p| spawn_add(p, &conf)).collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let elapsed = started.elapsed();
    say(&format!(
        "burst: {N} concurrent ADDs networked in {elapsed:?}"
    ));
    let mut ips = HashSet::new();
    for (p, o) in pods.iter().zip(&outs) {
        assert!(
            o.status.success(),
            "{}: {}",
            p.name,
            String::from_utf8_lossy(&o.stdout)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(ips.insert(v["ips"][0]["address"].as_str().unwrap().to_owned()));
    }
    // The node took one /26 block (64 addresses) for 60 pods: the lock kept the ADDs from
    // racing each other into claiming more blocks.
    let blocks: HashSet<String> = lab
        .allocations(&rt)
        .into_iter()
        .map(|(ip, _)| ipnet::IpNet::new(ip, 26).unwrap().trunc().to_string())
        .collect();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(lab.node.cali_veths().len(), N);
    assert!(ping(&pods[0].ns, NODE_IP, 3));
    assert!(ping(&pods[N - 1].ns, pods[0].ipv4().as_deref().unwrap(), 3));
    // And all of them go away concurrently.
    let dels: Vec<_> = pods
        .iter()
        .map(|p| {
            let conf = conf.clone();
            let env = pod_env("DEL", p);
            std::thread::spawn(move || exec(MARGAY, &env, conf.to_string().as_bytes()))
        })
        .collect();
    for d in dels {
        d.join().unwrap().ok();
    }
    assert!(lab.allocations(&rt).is_empty());
    assert!(lab.node.cali_veths().is_empty());
}

struct Live {
    pod: Pod,
    result: Value,
}

fn churn(cycles: usize) {
    let rt = runtime();
    let lab = Lab::new(&rt);
    let mut conf = lab.conf("1.1.0");
    conf["log_level"] = json!("warn");
    let seed: u64 = std::env::var("MARGAY_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    say(&format!("churn: {cycles} cycles, seed {seed}"));
    let mut rng = StdRng::seed_from_u64(seed);
    const SLOTS: usize = 8;
    let mut slots: Vec<Option<Live>> = (0..SLOTS).map(|_| None).collect();
    // Sandboxes whose ADD was killed and whose DEL the "runtime" never sent.
    let mut forgotten: Vec<Pod> = Vec::new();
    let (mut adds, mut killed, mut dels) = (0, 0, 0);
    let started = Instant::now();
    for _ in 0..cycles {
        let s = rng.random_range(0..SLOTS);
        if let Some(live) = slots[s].take() {
            cni("DEL", &live.pod, &conf).ok();
            dels += 1;
            continue;
        }
        let pod = Pod::new(&format!("churn-{s}"));
        adds += 1;
        let mut child = spawn_add(&pod, &conf);
        let kill = rng.random_bool(0.3);
        if kill {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..25_000)));
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            let result: Value = serde_json::from_slice(&out.stdout).unwrap();
            slots[s] = Some(Live { pod, result });
            continue;
        }
        assert!(
            kill,
            "ADD failed without being killed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        killed += 1;
        if rng.random_bool(0.5) {
            // The runtime cleans up after a failed ADD.
            cni("DEL", &pod, &conf).ok();
        } else if rng.random_bool(0.5) {
            // ... or forgets it, keeping the sandbox (and whatever the ADD left in it).
            forgotten.push(pod);
        }
        // ... or forgets it and the sandbox is gone.
    }
    say(&format!(
        "churn: {adds} ADDs ({killed} killed), {dels} DELs in {:?}",
        started.elapsed()
    ));

    let live: Vec<&Live> = slots.iter().flatten().collect();
    let attachments: Vec<Value> = live
        .iter()
        .map(|l| json!({"containerID": l.pod.container_id, "ifname": "eth0"}))
        .collect();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = Value::Array(attachments);
    cni_plain("GC", &gc).ok();

    // Invariants.
    let veths: HashSet<String> = lab.node.cali_veths().into_iter().collect();
    let want: HashSet<String> = live.iter().map(|l| l.pod.veth()).collect();
    assert_eq!(veths, want, "cali veths differ from the live pods'");
    let allocs = lab.allocations(&rt);
    let mut by_handle: HashMap<String, Vec<std::net::IpAddr>> = HashMap::new();
    for (ip, h) in &allocs {
        by_handle.entry(h.clone()).or_default().push(*ip);
    }
    assert_eq!(
        by_handle.len(),
        live.len(),
        "allocations without a live pod: {allocs:?}"
    );
    let mut seen = HashSet::new();
    for l in &live {
        let h = format!("k8s-pod-network.{}", l.pod.container_id);
        let ips = by_handle
            .get(&h)
            .unwrap_or_else(|| panic!("live pod {} has no allocation", l.pod.name));
        assert_eq!(ips.len(), 1);
        let in_pod = l.pod.ipv4().expect("live pod has an address");
        assert_eq!(in_pod, ips[0].to_string());
        assert!(seen.insert(in_pod.clone()), "{in_pod} on two pods");
        check(&l.pod, &conf, &l.result).ok();
    }
    for l in slots.iter().flatten() {
        cni("DEL", &l.pod, &conf).ok();
    }
    assert!(lab.allocations(&rt).is_empty());
    assert!(lab.node.cali_veths().is_empty());
    assert!(lab.pending_files().is_empty());
    drop(forgotten);
}

#[test]
fn netns_churn_with_kill9_then_gc() {
    if !can_run("netns_churn_with_kill9_then_gc") {
        return;
    }
    let cycles = std::env::var("MARGAY_CHURN_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    churn(cycles);
}

#[test]
#[ignore = "2,000 cycles take minutes; run with --ignored (results in docs/benchmarks.md)"]
fn netns_churn_full_2000_cycles() {
    if !can_run("netns_churn_full_2000_cycles") {
        return;
    }
    churn(2000);
}
