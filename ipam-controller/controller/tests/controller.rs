//! The controller on the in-memory store: garbage collection (etcd mode, liveness from
//! WorkloadEndpoints and Nodes), pool validation and metrics.

use margay_api::names;
use margay_api::{
    BlockAffinity, IPAMBlock, IPAMHandle, IPAMHandleSpec, IPPool, IPPoolSpec, Node, NodeSpec,
    Store, WorkloadEndpoint, WorkloadEndpointSpec,
};
use margay_ipam::audit::{self, LiveSet, Snapshot};
use margay_ipam::live::StoreLiveness;
use margay_ipam::{
    attr, pod_handle, tunnel_handle, AddressUse, Allocator, AllocatorConfig, AssignRequest, Clock,
    IpamError, TunnelKind,
};
use margay_ipam_controller::gc::{GcConfig, GcReason};
use margay_ipam_controller::metrics::Metrics;
use margay_ipam_controller::pools;
use margay_ipam_controller::Controller;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

const GRACE: u64 = 15 * 60;

struct Env {
    store: Store,
    clock: Clock,
    controller: Controller,
    live: StoreLiveness,
}

async fn env(max_releases: usize) -> Env {
    let store = Store::memory();
    store
        .create(&IPPool::new(
            "default-ipv4",
            IPPoolSpec {
                cidr: "10.244.0.0/16".into(),
                ..IPPoolSpec::default()
            },
        ))
        .await
        .unwrap();
    let clock = Clock::manual(1_700_000_000);
    let controller = Controller::new(
        store.clone(),
        GcConfig {
            grace: Duration::from_secs(GRACE),
            max_releases_per_pass: max_releases,
            release_interval: Duration::ZERO,
            clock: clock.clone(),
        },
        Arc::new(Metrics::default()),
    );
    Env {
        live: StoreLiveness {
            store: store.clone(),
        },
        store,
        clock,
        controller,
    }
}

fn allocator(e: &Env, node: &str) -> Allocator {
    Allocator::new(
        e.store.clone(),
        node,
        AllocatorConfig {
            node_labels: Some(BTreeMap::new()),
            policy_ttl: Duration::ZERO,
            clock: e.clock.clone(),
            ..AllocatorConfig::default()
        },
    )
}

async fn add_node(store: &Store, name: &str) -> Node {
    store
        .create(&Node::new(name, NodeSpec::default()))
        .await
        .unwrap()
}

/// What the CNI plugin does on ADD in etcd mode: assign, then record the workload.
async fn add_pod(e: &Env, a: &Allocator, node: &str, pod: &str) -> (IpAddr, WorkloadEndpoint) {
    let cid = format!("{pod}-cid");
    let handle = pod_handle(&cid);
    let got = a
        .assign(&AssignRequest {
            handle_id: handle.clone(),
            attrs: BTreeMap::from([
                (attr::NAMESPACE.into(), "default".into()),
                (attr::POD.into(), pod.into()),
                (attr::NODE.into(), node.into()),
            ]),
            num_v4: 1,
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    let ip = got.addresses[0].ip;
    let wep = e
        .store
        .create(&WorkloadEndpoint::new(
            &names::workload_name(node, "default", pod, "eth0"),
            WorkloadEndpointSpec {
                node: node.into(),
                namespace: "default".into(),
                pod: pod.into(),
                container_id: cid,
                endpoint: "eth0".into(),
                interface_name: "cali0123456789a".into(),
                mac: None,
                ip_networks: vec![format!("{ip}/32")],
                handle_id: handle,
            },
        ))
        .await
        .unwrap();
    (ip, wep)
}

async fn holder(store: &Store, ip: IpAddr) -> Option<String> {
    let snap = Snapshot::read(store).await.unwrap();
    audit::find_address(&snap, ip)
        .allocation
        .and_then(|a| a.handle)
}

#[tokio::test]
async fn leaked_addresses_are_released_only_after_the_grace_period() {
    let mut e = env(100).await;
    add_node(&e.store, "n1").await;
    let a = allocator(&e, "n1");
    let (live_ip, _) = add_pod(&e, &a, "n1", "web").await;
    let (gone_ip, wep) = add_pod(&e, &a, "n1", "batch").await;
    // The pod is deleted but DEL never released its address.
    e.store.delete(&wep).await.unwrap();

    let r = e.controller.pass(&e.live).await.unwrap();
    assert!(
        r.gc.is_empty(),
        "nothing before the grace period: {:?}",
        r.gc
    );
    e.clock.advance(GRACE - 1);
    assert!(e.controller.pass(&e.live).await.unwrap().gc.is_empty());
    e.clock.advance(1);
    let r = e.controller.pass(&e.live).await.unwrap();
    let released: Vec<_> =
        r.gc.iter()
            .filter(|x| x.reason == GcReason::PodGone)
            .collect();
    assert_eq!(released.len(), 1, "{:?}", r.gc);
    assert!(released[0].what.contains(&gone_ip.to_string()));
    assert_eq!(holder(&e.store, gone_ip).await, None);
    assert_eq!(
        holder(&e.store, live_ip).await.as_deref(),
        Some("k8s-pod-network.web-cid")
    );
    assert!(e
        .store
        .try_get::<IPAMHandle>("k8s-pod-network.batch-cid")
        .await
        .unwrap()
        .is_none());
    let metrics = e.controller.metrics().render();
    assert!(
        metrics.contains("margay_ipam_gc_actions_total{reason=\"pod-gone\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "margay_ipam_pool_addresses_allocated{pool=\"default-ipv4\",cidr=\"10.244.0.0/16\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("margay_ipam_block_addresses_allocated{block="),
        "{metrics}"
    );
    // The check is clean afterwards.
    let snap = Snapshot::read(&e.store).await.unwrap();
    let live = LiveSet::from_store(&e.store).await.unwrap();
    assert_eq!(audit::check(&snap, Some(&live)), vec![]);
}

#[tokio::test]
async fn a_pod_that_comes_back_during_the_grace_period_keeps_its_address() {
    let mut e = env(100).await;
    add_node(&e.store, "n1").await;
    let a = allocator(&e, "n1");
    let (ip, wep) = add_pod(&e, &a, "n1", "web").await;
    e.store.delete(&wep).await.unwrap();
    e.controller.pass(&e.live).await.unwrap();
    // The workload record reappears (e.g. written late): the candidate is dropped.
    let mut again = wep.clone();
    again.metadata.resource_version = None;
    e.store.create(&again).await.unwrap();
    e.clock.advance(GRACE);
    let r = e.controller.pass(&e.live).await.unwrap();
    assert!(r.gc.is_empty(), "{:?}", r.gc);
    assert_eq!(
        holder(&e.store, ip).await.as_deref(),
        Some("k8s-pod-network.web-cid")
    );
}

#[tokio::test]
async fn an_address_handed_out_again_during_the_grace_period_is_not_freed() {
    let mut e = env(100).await;
    add_node(&e.store, "n1").await;
    let a = allocator(&e, "n1");
    let (ip, wep) = add_pod(&e, &a, "n1", "web").await;
    e.store.delete(&wep).await.unwrap();
    e.controller.pass(&e.live).await.unwrap();
    // Released by a late DEL and handed to a new (live) pod meanwhile.
    a.release_by_handle("k8s-pod-network.web-cid")
        .await
        .unwrap();
    let got = a
        .assign(&AssignRequest {
            handle_id: pod_handle("new"),
            addresses: vec![ip],
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(got.addresses[0].ip, ip);
    e.clock.advance(GRACE);
    e.controller.pass(&e.live).await.unwrap();
    // The new owner has no workload record yet either, but its own grace period has only
    // just begun.
    assert_eq!(holder(&e.store, ip).await, Some(pod_handle("new")));
}

#[tokio::test]
async fn a_deleted_nodes_addresses_tunnel_address_affinities_and_blocks_are_collected() {
    let mut e = env(100).await;
    let node = add_node(&e.store, "gone").await;
    add_node(&e.store, "stays").await;
    let a = allocator(&e, "gone");
    let (pod_ip, wep) = add_pod(&e, &a, "gone", "web").await;
    let tunnel = a
        .assign(&AssignRequest {
            handle_id: tunnel_handle(TunnelKind::Vxlan, "gone"),
            attrs: BTreeMap::from([
                (attr::NODE.into(), "gone".into()),
                (attr::TYPE.into(), TunnelKind::Vxlan.attr_type().into()),
            ]),
            num_v4: 1,
            use_: AddressUse::Tunnel,
            ..AssignRequest::default()
        })
        .await
        .unwrap()
        .addresses[0]
        .ip;
    let b = allocator(&e, "stays");
    let (kept, _) = add_pod(&e, &b, "stays", "db").await;
    // The node and its pods go away.
    e.store.delete(&wep).await.unwrap();
    e.store.delete(&node).await.unwrap();

    e.controller.pass(&e.live).await.unwrap();
    e.clock.advance(GRACE);
    let r = e.controller.pass(&e.live).await.unwrap();
    let reasons: Vec<GcReason> = r.gc.iter().map(|x| x.reason).collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == GcReason::NodeDeleted)
            .count(),
        2,
        "{:?}",
        r.gc
    );
    assert_eq!(holder(&e.store, pod_ip).await, None);
    assert_eq!(holder(&e.store, tunnel).await, None);
    // The block, now empty, goes after its own grace period (from the pass that first saw it
    // empty), with its affinity.
    e.controller.pass(&e.live).await.unwrap();
    e.clock.advance(GRACE - 1);
    let r = e.controller.pass(&e.live).await.unwrap();
    assert!(r.gc.is_empty(), "{:?}", r.gc);
    e.clock.advance(1);
    let r = e.controller.pass(&e.live).await.unwrap();
    assert!(
        r.gc.iter()
            .any(|x| x.reason == GcReason::NodeDeleted && x.what.starts_with("block ")),
        "{:?}",
        r.gc
    );
    let snap = Snapshot::read(&e.store).await.unwrap();
    assert!(snap
        .blocks
        .iter()
        .all(|b| b.spec.affine_node() == Some("stays")));
    assert!(snap.affinities.iter().all(|a| a.spec.node == "stays"));
    assert_eq!(holder(&e.store, kept).await, Some(pod_handle("db-cid")));
    let live = LiveSet::from_store(&e.store).await.unwrap();
    assert_eq!(audit::check(&snap, Some(&live)), vec![]);
}

#[tokio::test]
async fn empty_blocks_without_affinity_and_handles_without_addresses_are_collected() {
    let mut e = env(100).await;
    add_node(&e.store, "n1").await;
    let cidr: ipnet::IpNet = "10.244.7.0/26".parse().unwrap();
    e.store
        .create(&IPAMBlock::new(
            &names::block_name(&cidr),
            margay_ipam::block::new_block_spec(&cidr, None, false, None, 0),
        ))
        .await
        .unwrap();
    e.store
        .create(&IPAMHandle::new(
            "k8s-pod-network.orphan",
            IPAMHandleSpec {
                handle_id: "k8s-pod-network.orphan".into(),
                block: BTreeMap::from([(cidr.to_string(), 1)]),
                deleted: false,
            },
        ))
        .await
        .unwrap();
    // A live node's block with a confirmed affinity is not touched even when empty.
    let a = allocator(&e, "n1");
    let (_, wep) = add_pod(&e, &a, "n1", "web").await;
    a.release_by_handle(&wep.spec.handle_id).await.unwrap();
    e.store.delete(&wep).await.unwrap();

    e.controller.pass(&e.live).await.unwrap();
    e.clock.advance(GRACE);
    let r = e.controller.pass(&e.live).await.unwrap();
    let mut reasons: Vec<GcReason> = r.gc.iter().map(|x| x.reason).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            GcReason::HandleWithoutAllocations,
            GcReason::EmptyBlockWithoutAffinity
        ],
        "{:?}",
        r.gc
    );
    let snap = Snapshot::read(&e.store).await.unwrap();
    assert_eq!(snap.blocks.len(), 1);
    assert_eq!(snap.blocks[0].spec.affine_node(), Some("n1"));
    assert!(snap.handles.is_empty());
}

#[tokio::test]
async fn releases_are_rate_limited_per_pass() {
    let mut e = env(3).await;
    add_node(&e.store, "n1").await;
    let a = allocator(&e, "n1");
    for i in 0..7 {
        let (_, wep) = add_pod(&e, &a, "n1", &format!("p{i}")).await;
        e.store.delete(&wep).await.unwrap();
    }
    e.controller.pass(&e.live).await.unwrap();
    e.clock.advance(GRACE);
    let mut per_pass = Vec::new();
    for _ in 0..4 {
        per_pass.push(
            e.controller
                .pass(&e.live)
                .await
                .unwrap()
                .gc
                .iter()
                .filter(|x| x.reason == GcReason::PodGone)
                .count(),
        );
    }
    assert_eq!(per_pass, vec![3, 3, 1, 0]);
}

#[tokio::test]
async fn overlapping_pools_are_reported_and_immutable_changes_refused() {
    let mut e = env(100).await;
    e.store
        .create(&IPPool::new(
            "overlapping",
            IPPoolSpec {
                cidr: "10.244.128.0/17".into(),
                ..IPPoolSpec::default()
            },
        ))
        .await
        .unwrap();
    add_node(&e.store, "n1").await;
    let a = allocator(&e, "n1");
    let (ip, _) = add_pod(&e, &a, "n1", "web").await;
    let r = e.controller.pass(&e.live).await.unwrap();
    let f = pools::by_name(r.pools);
    assert_eq!(
        f["default-ipv4"].overlaps,
        vec!["overlapping (10.244.128.0/17)"]
    );
    let p = e.store.get::<IPPool>("overlapping").await.unwrap();
    let c = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == pools::CONDITION_OVERLAPPING)
        .unwrap();
    assert_eq!(c.status, "True");
    assert!(
        c.message.contains("default-ipv4 (10.244.0.0/16)"),
        "{}",
        c.message
    );
    e.store
        .delete(&e.store.get::<IPPool>("overlapping").await.unwrap())
        .await
        .unwrap();

    // Changing the block size of a pool with blocks is refused in status, and the allocator
    // stops giving addresses from it; the existing address stays.
    let mut p = e.store.get::<IPPool>("default-ipv4").await.unwrap();
    p.spec.block_size = Some(28);
    e.store.update(&p).await.unwrap();
    e.controller.pass(&e.live).await.unwrap();
    let p = e.store.get::<IPPool>("default-ipv4").await.unwrap();
    let valid = p
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Valid")
        .unwrap();
    assert_eq!(valid.status, "False");
    assert_eq!(valid.reason, "ImmutableFieldChanged");
    assert!(
        valid.message.contains("blockSize from 26 to 28"),
        "{}",
        valid.message
    );
    let err = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.more".into(),
            num_v4: 1,
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, IpamError::NoPool { .. }), "{err}");
    assert_eq!(holder(&e.store, ip).await, Some(pod_handle("web-cid")));
    // Restoring the field makes the pool valid again.
    let mut p = e.store.get::<IPPool>("default-ipv4").await.unwrap();
    p.spec.block_size = None;
    e.store.update(&p).await.unwrap();
    e.controller.pass(&e.live).await.unwrap();
    a.assign(&AssignRequest {
        handle_id: "k8s-pod-network.more".into(),
        num_v4: 1,
        ..AssignRequest::default()
    })
    .await
    .unwrap();
    assert!(e
        .store
        .list::<BlockAffinity>()
        .await
        .unwrap()
        .0
        .iter()
        .all(|a| a.spec.node == "n1"));
}

/// Pools written around validation: by kubectl on an API server that runs no CEL rules, by hand
/// into etcd, or by an older Margay.
async fn raw_pool(store: &Store, name: &str, spec: serde_json::Value) {
    let value = serde_json::json!({
        "apiVersion": "margay.io/v1",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": spec,
    });
    store
        .backend()
        .create(margay_api::Kind::IPPool, name, value)
        .await
        .unwrap();
}

#[tokio::test]
async fn each_pool_is_validated_on_its_own_and_an_invalid_one_gives_no_address() {
    let mut e = env(100).await;
    let bad = [
        (
            "host-bits",
            serde_json::json!({"cidr": "10.9.0.1/16"}),
            "spec.cidr",
        ),
        (
            "block-33",
            serde_json::json!({"cidr": "10.10.0.0/16", "blockSize": 33}),
            "spec.blockSize",
        ),
        (
            "two-encaps",
            serde_json::json!({"cidr": "10.11.0.0/16", "ipipMode": "Always", "vxlanMode": "Always"}),
            "spec.vxlanMode",
        ),
        (
            "bad-selector",
            serde_json::json!({"cidr": "10.12.0.0/16", "nodeSelector": "zone =="}),
            "spec.nodeSelector",
        ),
        (
            "inner",
            serde_json::json!({"cidr": "10.244.8.0/24"}),
            "overlaps the older pool(s) default-ipv4",
        ),
    ];
    for (name, spec, _) in &bad {
        raw_pool(&e.store, name, spec.clone()).await;
    }
    raw_pool(
        &e.store,
        "undecodable",
        serde_json::json!({"cidr": "10.13.0.0/16", "blockSize": "big"}),
    )
    .await;
    add_node(&e.store, "n1").await;

    let r = e.controller.pass(&e.live).await.unwrap();
    let f = pools::by_name(r.pools);
    assert!(f["default-ipv4"].valid(), "{:?}", f["default-ipv4"]);
    let good = e.store.get::<IPPool>("default-ipv4").await.unwrap();
    let status = good.status.unwrap();
    assert_eq!(status.block_size, Some(26));
    assert_eq!(status.conditions[0].status, "True");

    for (name, _, why) in &bad {
        assert!(!f[*name].valid(), "{name}: {:?}", f[*name]);
        let p = e.store.get::<IPPool>(name).await.unwrap();
        let status = p.status.unwrap_or_default();
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .unwrap_or_else(|| panic!("{name} has no Valid condition"));
        assert_eq!(valid.status, "False", "{name}");
        assert!(valid.message.contains(why), "{name}: {}", valid.message);
        assert_eq!(status.block_size, None, "{name}");
        // The accepted-field annotations are only ever written for a pool with no problem, so
        // that a newcomer overlapping an established pool never looks older than it.
        let accepted = p
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(pools::ANNOTATION_CIDR);
        assert!(!accepted, "{name} was accepted");
    }
    let raw = e
        .store
        .backend()
        .get(margay_api::Kind::IPPool, "undecodable")
        .await
        .unwrap();
    let c = &raw.value["status"]["conditions"][0];
    assert_eq!(c["type"], "Valid");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "Undecodable");

    // The allocator gives from the good pool only, and a pod that asks for a refused pool by
    // name is told why.
    let a = allocator(&e, "n1");
    let (ip, _) = add_pod(&e, &a, "n1", "web").await;
    assert!(good.spec.network().unwrap().contains(&ip), "{ip}");
    for (name, _, why) in &bad {
        let err = a
            .assign(&AssignRequest {
                handle_id: pod_handle(&format!("{name}-cid")),
                num_v4: 1,
                pools: vec![(*name).to_owned()],
                ..AssignRequest::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IpamError::PoolUnusable { pool, reason } if pool == name && reason.contains(why)),
            "{name}: {err}"
        );
    }
}
