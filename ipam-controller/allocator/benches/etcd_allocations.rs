//! Allocation throughput and latency on a real etcd, next to etcd's own compare-and-swap
//! transaction rate at the same concurrency on distinct keys, measured in the same run; and
//! etcd's rate for transactions shaped like one allocation (two keys, block- and handle-sized
//! values), the ceiling for a one-transaction allocation.
//!
//! ```text
//! cargo bench -p margay-ipam --bench etcd_allocations
//! IPAM_BENCH_ALLOCS=2000 cargo bench -p margay-ipam --bench etcd_allocations   # more samples
//! ```
//!
//! Prints a Markdown table (the figures in docs/benchmarks.md come from it).

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use margay_api::{IPPool, IPPoolSpec, Kind, Store};
use margay_ipam::{Allocator, AllocatorConfig, AssignRequest};
use margay_testkit::EtcdProcess;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Figures {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU seconds this process (the clients) and etcd spent during the run.
    cpu: (f64, f64),
}

/// CPU time (user + system) of a process so far, in seconds, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Measures the CPU that the clients and etcd use around `f`.
async fn with_cpu<F: std::future::Future<Output = Figures>>(etcd: &EtcdProcess, f: F) -> Figures {
    let etcd_pid = etcd.pid().map(|p| p.to_string()).unwrap_or_default();
    let (c0, e0) = (cpu_seconds("self"), cpu_seconds(&etcd_pid));
    let mut fig = f.await;
    fig.cpu = (cpu_seconds("self") - c0, cpu_seconds(&etcd_pid) - e0);
    fig
}

impl Figures {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// `workers` tasks, each doing `per_worker` CAS transactions on its own key: compare the
/// key's mod revision with the one it last wrote, then put.
async fn etcd_cas_rate(etcd: &EtcdProcess, workers: usize, per_worker: usize) -> Figures {
    let client = etcd.client().await.expect("etcd client");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut kv = client.kv_client();
        tasks.push(tokio::spawn(async move {
            let key = format!("/bench/cas/{workers}/{w}");
            let mut rev = 0i64;
            let mut lat = Vec::with_capacity(per_worker);
            for i in 0..per_worker {
                let t = Instant::now();
                let cmp = if rev == 0 {
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
                };
                let resp = kv
                    .txn(Txn::new().when(vec![cmp]).and_then(vec![TxnOp::put(
                        key.clone(),
                        format!("v{i}"),
                        None,
                    )]))
                    .await
                    .expect("txn");
                assert!(resp.succeeded(), "CAS on a private key failed");
                rev = resp.header().expect("header").revision();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("worker"));
    }
    Figures {
        ops: workers * per_worker,
        elapsed: start.elapsed(),
        latencies,
        cpu: (0.0, 0.0),
    }
}

/// `workers` tasks, each doing `per_worker` transactions shaped like one allocation on a
/// store that commits atomically: compare the mod revision of the worker's own "block" key and
/// that a new "handle" key is absent, then put both (`block` and `handle` bytes, the sizes of
/// real objects). The ceiling etcd sets for one-transaction allocations at this concurrency.
async fn etcd_allocation_shaped_rate(
    etcd: &EtcdProcess,
    workers: usize,
    per_worker: usize,
    block: Arc<Vec<u8>>,
    handle: Arc<Vec<u8>>,
) -> Figures {
    let client = etcd.client().await.expect("etcd client");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut kv = client.kv_client();
        let (block, handle) = (block.clone(), handle.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("/bench/shaped/{workers}/{w}/block");
            let mut rev = 0i64;
            let mut lat = Vec::with_capacity(per_worker);
            for i in 0..per_worker {
                let t = Instant::now();
                let hkey = format!("/bench/shaped/{workers}/{w}/handle-{i}");
                let cmp = if rev == 0 {
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
                };
                let resp = kv
                    .txn(
                        Txn::new()
                            .when(vec![
                                cmp,
                                Compare::create_revision(hkey.clone(), CompareOp::Equal, 0),
                            ])
                            .and_then(vec![
                                TxnOp::put(hkey, handle.as_slice(), None),
                                TxnOp::put(key.clone(), block.as_slice(), None),
                            ]),
                    )
                    .await
                    .expect("txn");
                assert!(resp.succeeded(), "a transaction on private keys failed");
                rev = resp.header().expect("header").revision();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("worker"));
    }
    Figures {
        ops: workers * per_worker,
        elapsed: start.elapsed(),
        latencies,
        cpu: (0.0, 0.0),
    }
}

/// The stored size (JSON bytes) of the fullest block and of the first handle.
async fn object_sizes(store: &Store) -> (Vec<u8>, Vec<u8>) {
    let blocks = store.backend().list(Kind::IPAMBlock).await.expect("list");
    let handles = store.backend().list(Kind::IPAMHandle).await.expect("list");
    let json = |v: &serde_json::Value| serde_json::to_vec(v).expect("json");
    let block = blocks
        .items
        .iter()
        .map(|o| json(&o.value))
        .max_by_key(Vec::len)
        .expect("a block");
    (block, json(&handles.items[0].value))
}

/// `nodes` allocators (nodes `<tag>-node-<n>`), each assigning `per_node` addresses one pod at
/// a time, to pods `<round>-<n>-<i>`.
async fn allocation_rate(
    store: &Store,
    nodes: usize,
    per_node: usize,
    tag: &str,
    round: &str,
) -> Figures {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..nodes {
        let a = Allocator::new(
            store.clone(),
            format!("{tag}-node-{n}"),
            AllocatorConfig {
                node_labels: Some(Default::default()),
                ..AllocatorConfig::default()
            },
        );
        let round = round.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_node);
            for i in 0..per_node {
                let t = Instant::now();
                a.assign(&AssignRequest {
                    handle_id: format!("k8s-pod-network.{round}-{n}-{i}"),
                    num_v4: 1,
                    ..AssignRequest::default()
                })
                .await
                .expect("assign");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("node"));
    }
    Figures {
        ops: nodes * per_node,
        elapsed: start.elapsed(),
        latencies,
        cpu: (0.0, 0.0),
    }
}

fn row(what: &str, f: &Figures) -> String {
    format!(
        "| {what} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} |",
        f.ops,
        f.rate(),
        f.pct(0.5).as_secs_f64() * 1e3,
        f.pct(0.99).as_secs_f64() * 1e3,
        f.cpu.0 * 1e6 / f.ops as f64,
        f.cpu.1 * 1e6 / f.ops as f64,
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let total: usize = std::env::var("IPAM_BENCH_ALLOCS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let etcd = EtcdProcess::start().await.expect("start etcd");
        let store = Store::new(Arc::new(etcd.backend("/margay/v1/").await.expect("backend")));
        store
            .create(&IPPool::new(
                "bench",
                IPPoolSpec {
                    cidr: "10.128.0.0/12".into(),
                    ..IPPoolSpec::default()
                },
            ))
            .await
            .expect("pool");

        // Warm-up: connections, the first block of the one-node run.
        allocation_rate(&store, 1, 5, "warm", "warm").await;

        let one_100 = with_cpu(&etcd, allocation_rate(&store, 1, 100, "hundred", "hundred")).await;
        let one = with_cpu(&etcd, allocation_rate(&store, 1, total, "one", "one")).await;
        let cas1 = with_cpu(&etcd, etcd_cas_rate(&etcd, 1, total)).await;
        let per_node = (total / 50).max(1) * 4;
        let fifty = with_cpu(&etcd, allocation_rate(&store, 50, per_node, "fifty", "fifty")).await;
        // The same nodes again, with new allocators (whose first request loads the node's
        // blocks), as many pods as the last block of each node still has room for (80 pods
        // fill 64 + 16 of two /26 blocks), at most half a round: no claims are timed.
        let room = 64 - per_node % 64;
        let again = room.min(per_node / 2).max(1);
        let fifty_warm =
            with_cpu(&etcd, allocation_rate(&store, 50, again, "fifty", "fifty-again")).await;
        let cas50 = with_cpu(&etcd, etcd_cas_rate(&etcd, 50, (total / 50).max(1) * 4)).await;
        let (block, handle) = object_sizes(&store).await;
        let (block_len, handle_len) = (block.len(), handle.len());
        let (block, handle) = (Arc::new(block), Arc::new(handle));
        let shaped1 = with_cpu(
            &etcd,
            etcd_allocation_shaped_rate(&etcd, 1, total, block.clone(), handle.clone()),
        )
        .await;
        let shaped50 = with_cpu(
            &etcd,
            etcd_allocation_shaped_rate(&etcd, 50, (total / 50).max(1) * 4, block, handle),
        )
        .await;

        println!("| run | operations | per second | p50 ms | p99 ms | client CPU µs/op | etcd CPU µs/op |");
        println!("|---|---|---|---|---|---|---|");
        println!("{}", row("allocator, 1 node, 100 allocations", &one_100));
        println!("{}", row("allocator, 1 node", &one));
        println!("{}", row("etcd CAS txn, 1 client, distinct keys", &cas1));
        println!(
            "{}",
            row(
                &format!("etcd allocation-shaped txn (block {block_len} B + handle {handle_len} B), 1 client"),
                &shaped1
            )
        );
        println!("{}", row("allocator, 50 nodes", &fifty));
        println!(
            "{}",
            row("allocator, 50 nodes, blocks already claimed", &fifty_warm)
        );
        println!("{}", row("etcd CAS txn, 50 clients, distinct keys", &cas50));
        println!(
            "{}",
            row(
                &format!("etcd allocation-shaped txn (block {block_len} B + handle {handle_len} B), 50 clients"),
                &shaped50
            )
        );
        println!();
        println!(
            "ratio allocations/CAS: 1 node {:.2}, 50 nodes {:.2}; 100 allocations on one node took {:.3} s",
            one.rate() / cas1.rate(),
            fifty.rate() / cas50.rate(),
            one_100.elapsed.as_secs_f64()
        );
        println!(
            "1 node: {:.2} of the allocation-shaped txn rate; 50 nodes, blocks already claimed: {:.2} of the CAS rate, {:.2} of the allocation-shaped txn rate; 50 nodes with claims: {:.2} of the allocation-shaped txn rate",
            one.rate() / shaped1.rate(),
            fifty_warm.rate() / cas50.rate(),
            fifty_warm.rate() / shaped50.rate(),
            fifty.rate() / shaped50.rate()
        );
    });
}
