//! `margayctl ipam show` over 1,000 blocks, against a real kube-apiserver and against etcd, in
//! one run on the same machine: the wall time of the whole command as a user runs it (process
//! start, connection, listing every pool, block, affinity and handle, the table), median and
//! worst of 5 runs each, alternating. Goal: ≤ 1 s on the API server.
//!
//! `cargo bench -p margayctl --bench ipam_show` (needs etcd, and a kube-apiserver in
//! `KUBE_APISERVER_BIN` or on `PATH`). `MARGAY_BENCH_BLOCKS` changes the block count (≤ 1024).

use futures::stream::{self, StreamExt, TryStreamExt};
use margay_api::store::kube::KubeBackend;
use margay_api::{
    names, AllocationAttribute, BlockAffinity, BlockAffinitySpec, IPAMBlock, IPAMHandle,
    IPAMHandleSpec, IPPool, IPPoolSpec, Store,
};
use margay_testkit::apiserver::{apiserver_binary, Options};
use margay_testkit::{ApiServerProcess, EtcdProcess};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PODS_PER_BLOCK: u32 = 8;

/// One block per node, each with a few pods' addresses and their handles.
async fn seed(store: &Store, blocks: usize) -> anyhow::Result<()> {
    store
        .create(&IPPool::new(
            "default-ipv4",
            IPPoolSpec {
                cidr: "10.244.0.0/16".into(),
                ..Default::default()
            },
        ))
        .await?;
    stream::iter(0..blocks)
        .map(|i| async move {
            let node = format!("node-{i}");
            let cidr: ipnet::IpNet = format!("10.244.{}.{}/26", i / 4, (i % 4) * 64).parse()?;
            let mut spec = margay_ipam::block::new_block_spec(&cidr, Some(&node), false, None, 0);
            for o in 0..PODS_PER_BLOCK {
                let handle = format!("k8s-pod-network.{i:04}{o:02}");
                spec.attributes.push(AllocationAttribute {
                    handle_id: Some(handle.clone()),
                    secondary: BTreeMap::from([
                        ("namespace".into(), "bench".into()),
                        ("pod".into(), format!("pod-{i}-{o}")),
                        ("node".into(), node.clone()),
                    ]),
                });
                spec.allocations[o as usize] = Some(o);
                spec.unallocated.retain(|u| *u != o);
                spec.sequence_number += 1;
                store
                    .create(&IPAMHandle::new(
                        &names::handle_name(&handle),
                        IPAMHandleSpec {
                            handle_id: handle.clone(),
                            block: BTreeMap::from([(cidr.to_string(), 1)]),
                            deleted: false,
                        },
                    ))
                    .await?;
            }
            store
                .create(&IPAMBlock::new(&names::block_name(&cidr), spec))
                .await?;
            store
                .create(&BlockAffinity::new(
                    &names::affinity_name(&node, &cidr),
                    BlockAffinitySpec {
                        node: node.clone(),
                        cidr: cidr.to_string(),
                        state: margay_api::AffinityState::Confirmed,
                        deleted: false,
                    },
                ))
                .await?;
            anyhow::Ok(())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn show(env: &[(&str, String)]) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_margayctl"))
        .args(["ipam", "show"])
        .env_remove("KUBECONFIG")
        .env_remove("MARGAY_ETCD_ENDPOINTS")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("margayctl runs");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "margayctl ipam show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn stats(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    (v[v.len() / 2].as_secs_f64(), v[v.len() - 1].as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        println!("ipam_show: benchmark");
        return Ok(());
    }
    let Some(bin) = apiserver_binary() else {
        eprintln!("SKIPPED ipam_show: no kube-apiserver (KUBE_APISERVER_BIN or PATH)");
        return Ok(());
    };
    let blocks: usize = std::env::var("MARGAY_BENCH_BLOCKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
        .min(1024);
    let api = ApiServerProcess::start_with(
        &bin,
        Options {
            audit: false,
            ..Options::RBAC
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("admin.kubeconfig");
    api.write_kubeconfig(&kubeconfig, None)?;
    let kube = Store::new(Arc::new(KubeBackend::from_kubeconfig(&kubeconfig).await?));
    let etcd = EtcdProcess::start().await?;
    let prefix = "/margay/v1/";
    let etcd_store = Store::new(Arc::new(etcd.backend(prefix).await?));
    let t = Instant::now();
    seed(&kube, blocks).await?;
    let seeded_kube = t.elapsed();
    let t = Instant::now();
    seed(&etcd_store, blocks).await?;
    let seeded_etcd = t.elapsed();
    println!(
        "\n`margayctl ipam show` over {blocks} blocks ({} addresses and handles); seeding took {:.1} s (API server) and {:.1} s (etcd)\n",
        blocks * PODS_PER_BLOCK as usize,
        seeded_kube.as_secs_f64(),
        seeded_etcd.as_secs_f64()
    );
    let kube_env = [
        ("MARGAY_DATASTORE_TYPE", "kubernetes".to_owned()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
    ];
    let etcd_env = [
        ("MARGAY_DATASTORE_TYPE", "etcd".to_owned()),
        ("MARGAY_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MARGAY_ETCD_PREFIX", prefix.to_owned()),
    ];
    show(&kube_env);
    show(&etcd_env);
    let (mut k, mut e) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        k.push(show(&kube_env));
        e.push(show(&etcd_env));
    }
    let (k50, kmax) = stats(&mut k);
    let (e50, emax) = stats(&mut e);
    println!("| datastore | median | worst of 5 |");
    println!("|---|---|---|");
    println!("| kubernetes (kube-apiserver, RBAC) | {k50:.3} s | {kmax:.3} s |");
    println!("| etcd | {e50:.3} s | {emax:.3} s |");
    println!(
        "\nkubernetes / etcd = {:.2}; goal: ≤ 1 s on the API server: {}",
        k50 / e50,
        if kmax <= 1.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
