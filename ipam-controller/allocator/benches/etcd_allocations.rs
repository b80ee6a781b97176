//! Allocation throughput and latency on a real etcd, next to etcd's own compare-and-swap
//! transaction rate at the same concurrency on distinct keys, measured in the same run.
//!
//! ```text
//! cargo bench -p margay-ipam --bench etcd_allocations
//! IPAM_BENCH_ALLOCS=2000 cargo bench -p margay-ipam --bench etcd_allocations   # more samples
//! ```
//!
//! Prints a Markdown table (the figures in docs/benchmarks.md come from it).

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use margay_api::{IPPool, IPPoolSpec, Store};
use margay_ipam::{Allocator, AllocatorConfig, AssignRequest};
use margay_testkit::EtcdProcess;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Figures {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
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
    }
}

/// `nodes` allocators, each assigning `per_node` addresses one pod at a time.
async fn allocation_rate(store: &Store, nodes: usize, per_node: usize, tag: &str) -> Figures {
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
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_node);
            for i in 0..per_node {
                let t = Instant::now();
                a.assign(&AssignRequest {
                    handle_id: format!("k8s-pod-network.{tag}-{n}-{i}"),
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
    }
}

fn row(what: &str, f: &Figures) -> String {
    format!(
        "| {what} | {} | {:.0} | {:.2} | {:.2} |",
        f.ops,
        f.rate(),
        f.pct(0.5).as_secs_f64() * 1e3,
        f.pct(0.99).as_secs_f64() * 1e3
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
        allocation_rate(&store, 1, 5, "warm").await;

        let one_100 = allocation_rate(&store, 1, 100, "hundred").await;
        let one = allocation_rate(&store, 1, total, "one").await;
        let cas1 = etcd_cas_rate(&etcd, 1, total).await;
        let fifty = allocation_rate(&store, 50, (total / 50).max(1) * 4, "fifty").await;
        let cas50 = etcd_cas_rate(&etcd, 50, (total / 50).max(1) * 4).await;

        println!("| run | operations | per second | p50 ms | p99 ms |");
        println!("|---|---|---|---|---|");
        println!("{}", row("allocator, 1 node, 100 allocations", &one_100));
        println!("{}", row("allocator, 1 node", &one));
        println!("{}", row("etcd CAS txn, 1 client, distinct keys", &cas1));
        println!("{}", row("allocator, 50 nodes", &fifty));
        println!("{}", row("etcd CAS txn, 50 clients, distinct keys", &cas50));
        println!();
        println!(
            "ratio allocations/CAS: 1 node {:.2}, 50 nodes {:.2}; 100 allocations on one node took {:.3} s",
            one.rate() / cas1.rate(),
            fifty.rate() / cas50.rate(),
            one_100.elapsed.as_secs_f64()
        );
    });
}
