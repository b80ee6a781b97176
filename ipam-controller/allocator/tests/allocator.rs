//! The allocator's behaviour on the in-memory store: claims, limits, borrowing, exhaustion,
//! specific addresses, reservations, cooldown, sequence-numbered releases and crash recovery.

mod common;

use common::*;
use margay_api::names;
use margay_api::{
    AffinityState, BlockAffinity, BlockAffinitySpec, IPAMBlock, IPAMHandle, IPPool, Store,
};
use margay_ipam::audit::{self, Snapshot};
use margay_ipam::{
    AddressUse, Allocator, AllocatorConfig, AssignRequest, Clock, IpamError, ReleaseOutcome,
};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

async fn store_with(pools: &[IPPool]) -> Store {
    let store = Store::memory();
    for p in pools {
        store.create(p).await.unwrap();
    }
    store
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn assert_consistent(store: &Store) {
    let snap = Snapshot::read(store).await.unwrap();
    let findings = audit::check(&snap, None);
    assert!(findings.is_empty(), "inconsistent: {findings:#?}");
}

#[tokio::test]
async fn first_assignment_claims_a_block_with_a_confirmed_affinity_and_a_handle() {
    let store = store_with(&[pool("default-ipv4", "10.244.0.0/16", None)]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let got = a.assign(&v4("k8s-pod-network.c1", 1)).await.unwrap();
    assert_eq!(got.addresses.len(), 1);
    let addr = &got.addresses[0];
    assert_eq!(addr.block.prefix_len(), 26);
    assert!(addr.block.contains(&addr.ip));
    let blk = store
        .get::<IPAMBlock>(&names::block_name(&addr.block))
        .await
        .unwrap();
    assert_eq!(blk.spec.affine_node(), Some("n1"));
    let aff = store
        .get::<BlockAffinity>(&names::affinity_name("n1", &addr.block))
        .await
        .unwrap();
    assert_eq!(aff.spec.state, AffinityState::Confirmed);
    let h = store.get::<IPAMHandle>("k8s-pod-network.c1").await.unwrap();
    assert_eq!(h.spec.block.get(&addr.block.to_string()), Some(&1));
    assert_eq!(a.affine_blocks().await.unwrap(), vec![addr.block]);
    // The next pod lands in the same (affine) block.
    let next = a.assign(&v4("k8s-pod-network.c2", 1)).await.unwrap();
    assert_eq!(next.addresses[0].block, addr.block);
    assert_ne!(next.addresses[0].ip, addr.ip);
    assert!(next.addresses[0].seq > addr.seq);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn a_full_pool_gives_an_error_naming_the_pool_and_node() {
    let store = store_with(&[pool("tiny", "10.9.0.0/30", Some(32))]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    for i in 0..4 {
        a.assign(&v4(&format!("h{i}"), 1)).await.unwrap();
    }
    let err = a.assign(&v4("h4", 1)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool 10.9.0.0/30 (tiny) is full: no free block and no free address for node n1"
    );
    // The failed request left nothing behind.
    assert!(store.try_get::<IPAMHandle>("h4").await.unwrap().is_none());
    assert_consistent(&store).await;
}

#[tokio::test]
async fn slash_32_blocks_work() {
    let store = store_with(&[pool("p32", "10.9.0.0/29", Some(32))]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let got = a.assign(&v4("h", 3)).await.unwrap();
    let blocks: HashSet<_> = got.addresses.iter().map(|a| a.block).collect();
    assert_eq!(blocks.len(), 3, "one /32 block per address");
    for x in &got.addresses {
        assert_eq!(x.block.prefix_len(), 32);
        assert_eq!(x.block.addr(), x.ip);
    }
    assert_eq!(a.release_by_handle("h").await.unwrap().len(), 3);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn ipv6_122_blocks_and_dual_stack_in_one_request() {
    let store = store_with(&[
        pool("v4", "10.1.0.0/24", Some(26)),
        pool("v6", "fd00:1::/120", Some(122)),
    ])
    .await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let got = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.ds".into(),
            num_v4: 1,
            num_v6: 1,
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(got.addresses.len(), 2);
    assert!(got.addresses[0].ip.is_ipv4());
    assert!(got.addresses[1].ip.is_ipv6());
    assert_eq!(got.addresses[1].block.prefix_len(), 122);
    // 64 more IPv6 addresses overflow the first /122 into a second block of the pool.
    let more = a.assign(&v6("big", 64)).await.unwrap();
    let blocks: HashSet<_> = more.addresses.iter().map(|a| a.block).collect();
    assert_eq!(blocks.len(), 2);
    let pool6: ipnet::IpNet = "fd00:1::/120".parse().unwrap();
    assert!(more.addresses.iter().all(|a| pool6.contains(&a.ip)));
    let distinct: HashSet<_> = more.addresses.iter().map(|a| a.ip).collect();
    assert_eq!(distinct.len(), 64);
    assert_eq!(
        a.release_by_handle("k8s-pod-network.ds")
            .await
            .unwrap()
            .len(),
        2
    );
    assert_consistent(&store).await;
}

#[tokio::test]
async fn max_blocks_per_host_is_enforced_and_borrowing_fills_in() {
    let store = store_with(&[pool("p", "10.2.0.0/29", Some(30))]).await;
    set_config(&store, |c| c.max_blocks_per_host = 1).await;
    let clock = Clock::manual(1_000_000);
    let n1 = alloc(&store, "n1", &clock);
    let n2 = alloc(&store, "n2", &clock);
    n1.assign(&v4("a", 4)).await.unwrap();
    n2.assign(&v4("b", 1)).await.unwrap();
    // n1 may not claim a second block, so it borrows from n2's.
    let borrowed = n1.assign(&v4("c", 1)).await.unwrap();
    let snap = Snapshot::read(&store).await.unwrap();
    let n1_affs = snap
        .affinities
        .iter()
        .filter(|a| a.spec.node == "n1")
        .count();
    assert_eq!(n1_affs, 1, "n1 holds one block");
    let n2_block = snap
        .blocks
        .iter()
        .find(|b| b.spec.affine_node() == Some("n2"))
        .unwrap();
    assert_eq!(
        borrowed.addresses[0].block.to_string(),
        n2_block.spec.cidr,
        "borrowed from n2's block"
    );
    assert_consistent(&store).await;

    // Under strict affinity the same request is refused with the limit named.
    set_config(&store, |c| {
        c.max_blocks_per_host = 1;
        c.strict_affinity = true;
    })
    .await;
    let err = n1.assign(&v4("d", 1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            IpamError::BlockLimit {
                max: 1,
                held: 1,
                strict: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("maxBlocksPerHost (1)"), "{err}");
    assert!(err.to_string().contains("strict affinity"), "{err}");
}

#[tokio::test]
async fn strict_affinity_refuses_borrowing_when_the_pool_has_no_free_block() {
    let store = store_with(&[pool("p", "10.3.0.0/29", Some(30))]).await;
    set_config(&store, |c| c.strict_affinity = true).await;
    let clock = Clock::manual(1_000_000);
    let n1 = alloc(&store, "n1", &clock);
    let n2 = alloc(&store, "n2", &clock);
    n1.assign(&v4("a", 4)).await.unwrap();
    n2.assign(&v4("b", 1)).await.unwrap();
    let err = n1.assign(&v4("c", 1)).await.unwrap_err();
    assert!(
        matches!(err, IpamError::PoolsFull { strict: true, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("pool 10.3.0.0/29 (p) is full"),
        "{err}"
    );
    // A specific address in n2's block is refused too, naming the owner.
    let n2_ip = store
        .get::<IPAMHandle>("b")
        .await
        .unwrap()
        .spec
        .block
        .keys()
        .next()
        .unwrap()
        .parse::<ipnet::IpNet>()
        .unwrap()
        .hosts()
        .last()
        .unwrap();
    let err = n1
        .assign(&AssignRequest {
            handle_id: "s".into(),
            addresses: vec![n2_ip],
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("host:n2"), "{err}");
}

#[tokio::test]
async fn specific_addresses_succeed_or_fail_clearly() {
    let store = store_with(&[pool("p", "10.4.0.0/24", Some(26))]).await;
    reserve(&store, "keep", &["10.4.0.10"]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let want = ip("10.4.0.77");
    let got = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.x".into(),
            addresses: vec![want],
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(got.addresses[0].ip, want);
    assert_eq!(got.addresses[0].block.to_string(), "10.4.0.64/26");
    let taken = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.y".into(),
            addresses: vec![want],
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        taken.to_string(),
        "address 10.4.0.77 in block 10.4.0.64/26 is already allocated to handle k8s-pod-network.x; choose another address or release it first"
    );
    let reserved = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.y".into(),
            addresses: vec![ip("10.4.0.10")],
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert!(
        reserved
            .to_string()
            .contains("reserved by an IPReservation"),
        "{reserved}"
    );
    let outside = a
        .assign(&AssignRequest {
            handle_id: "k8s-pod-network.y".into(),
            addresses: vec![ip("192.168.1.1")],
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(outside, IpamError::AddressNotInPool { .. }),
        "{outside}"
    );
    // Failed requests leave no handle behind.
    assert!(store
        .try_get::<IPAMHandle>("k8s-pod-network.y")
        .await
        .unwrap()
        .is_none());
    assert_consistent(&store).await;
}

#[tokio::test]
async fn reservations_and_network_and_broadcast_are_never_handed_out() {
    let store = store_with(&[pool_with("p", "10.5.0.0/28", Some(29), |s| {
        s.avoid_block_network_and_broadcast = true
    })])
    .await;
    reserve(&store, "r", &["10.5.0.2/31", "10.5.0.9"]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let mut got = Vec::new();
    while let Ok(x) = a.assign(&v4(&format!("h{}", got.len()), 1)).await {
        got.push(x.addresses[0].ip);
    }
    let mut got: Vec<String> = got.iter().map(|i| i.to_string()).collect();
    got.sort();
    // 16 addresses − 4 network/broadcast (2 blocks) − 3 reserved = 9.
    assert_eq!(
        got,
        vec![
            "10.5.0.1",
            "10.5.0.10",
            "10.5.0.11",
            "10.5.0.12",
            "10.5.0.13",
            "10.5.0.14",
            "10.5.0.4",
            "10.5.0.5",
            "10.5.0.6"
        ]
    );
}

#[tokio::test]
async fn release_by_address_honours_sequence_numbers() {
    let store = store_with(&[pool("p", "10.6.0.0/30", Some(32))]).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let first = a.assign(&v4("old", 1)).await.unwrap().addresses[0].clone();
    let out = a.release_ips(&[(first.ip, Some(first.seq))]).await.unwrap();
    assert_eq!(
        out,
        vec![ReleaseOutcome::Released {
            handle: Some("old".into())
        }]
    );
    assert!(
        store.try_get::<IPAMHandle>("old").await.unwrap().is_none(),
        "handle removed at zero"
    );
    // The address is handed out again (FIFO puts it last, so take them all).
    let again = a
        .assign(&AssignRequest {
            handle_id: "new".into(),
            addresses: vec![first.ip],
            ..AssignRequest::default()
        })
        .await
        .unwrap()
        .addresses[0]
        .clone();
    assert_ne!(again.seq, first.seq);
    // A late release of the old allocation frees nothing.
    let out = a.release_ips(&[(first.ip, Some(first.seq))]).await.unwrap();
    assert_eq!(out, vec![ReleaseOutcome::Stale { current: again.seq }]);
    let snap = Snapshot::read(&store).await.unwrap();
    let info = audit::find_address(&snap, first.ip);
    assert_eq!(info.allocation.unwrap().handle.as_deref(), Some("new"));
    assert_eq!(
        a.release_ips(&[(ip("10.6.0.3"), None)]).await.unwrap(),
        vec![ReleaseOutcome::NotAllocated]
    );
    assert_consistent(&store).await;
}

#[tokio::test]
async fn free_addresses_are_reused_fifo_after_the_cooldown() {
    let store = store_with(&[pool("p", "10.7.0.0/30", Some(30))]).await;
    set_config(&store, |c| c.ip_cooldown_seconds = 60).await;
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let all = a.assign(&v4("a", 4)).await.unwrap();
    let ips: Vec<IpAddr> = all.addresses.iter().map(|x| x.ip).collect();
    a.release_ips(&[(ips[2], None)]).await.unwrap();
    clock.advance(1);
    a.release_ips(&[(ips[0], None)]).await.unwrap();
    // Both in cooldown: the block is full for now.
    let err = a.assign(&v4("b", 1)).await.unwrap_err();
    assert!(matches!(err, IpamError::PoolsFull { .. }), "{err}");
    clock.advance(59);
    // ips[2] was released first and its cooldown has run out; ips[0]'s has not.
    assert_eq!(a.assign(&v4("b", 1)).await.unwrap().addresses[0].ip, ips[2]);
    assert!(a.assign(&v4("c", 1)).await.is_err());
    clock.advance(1);
    assert_eq!(a.assign(&v4("c", 1)).await.unwrap().addresses[0].ip, ips[0]);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn pools_are_chosen_by_node_selector_use_and_name_and_disabled_pools_keep_their_addresses() {
    let store = store_with(&[
        pool_with("rack-a", "10.10.0.0/24", None, |s| {
            s.node_selector = "rack == 'a'".into()
        }),
        pool_with("tunnels", "10.11.0.0/24", None, |s| {
            s.allowed_uses = TUNNEL_ONLY.to_vec()
        }),
        pool("general", "10.12.0.0/24", None),
    ])
    .await;
    let clock = Clock::manual(1_000_000);
    let mut c = cfg(&clock);
    c.node_labels = Some(BTreeMap::from([("rack".into(), "a".into())]));
    let a = margay_ipam::Allocator::new(store.clone(), "n1", c);
    let b = alloc(&store, "n2", &clock);
    let in_net = |x: &IpAddr, n: &str| n.parse::<ipnet::IpNet>().unwrap().contains(x);
    // n2 (no rack label) can use only "general" for workloads.
    let x = b.assign(&v4("w2", 1)).await.unwrap().addresses[0].clone();
    assert_eq!(x.pool, "general");
    // Tunnel addresses may come from the tunnel pool (first by name: "general" < "tunnels").
    let t = b
        .assign(&AssignRequest {
            handle_id: "vxlan-tunnel-addr-n2".into(),
            num_v4: 1,
            use_: AddressUse::Tunnel,
            pools: vec!["tunnels".into()],
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    assert!(in_net(&t.addresses[0].ip, "10.11.0.0/24"));
    // A workload may not use the tunnel pool even when it names it.
    let e = b
        .assign(&AssignRequest {
            handle_id: "w3".into(),
            num_v4: 1,
            pools: vec!["tunnels".into()],
            ..AssignRequest::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("allowedUses"), "{e}");
    // n1 (rack a) may use rack-a, named by CIDR.
    let y = a
        .assign(&AssignRequest {
            handle_id: "w1".into(),
            num_v4: 1,
            pools: vec!["10.10.0.0/24".into()],
            ..AssignRequest::default()
        })
        .await
        .unwrap();
    assert!(in_net(&y.addresses[0].ip, "10.10.0.0/24"));

    // Disable "general": no new addresses from it, the existing one stays and can be released.
    let mut g = store.get::<IPPool>("general").await.unwrap();
    g.spec.disabled = true;
    store.update(&g).await.unwrap();
    let e = b.assign(&v4("w4", 1)).await.unwrap_err();
    assert!(matches!(e, IpamError::NoPool { .. }), "{e}");
    let snap = Snapshot::read(&store).await.unwrap();
    assert_eq!(
        audit::find_address(&snap, x.ip)
            .allocation
            .unwrap()
            .handle
            .as_deref(),
        Some("w2")
    );
    assert_eq!(b.release_by_handle("w2").await.unwrap(), vec![x.ip]);
    assert_consistent(&store).await;
}

#[tokio::test]
async fn interrupted_claims_are_completed_and_pending_affinities_count_as_absent() {
    let store = store_with(&[pool("p", "10.20.0.0/24", Some(26))]).await;
    let clock = Clock::manual(1_000_000);
    // A crash after step 1 (pending affinity, no block).
    let c1: ipnet::IpNet = "10.20.0.128/26".parse().unwrap();
    store
        .create(&BlockAffinity::new(
            &names::affinity_name("n1", &c1),
            BlockAffinitySpec {
                state: AffinityState::Pending,
                node: "n1".into(),
                cidr: c1.to_string(),
                deleted: false,
            },
        ))
        .await
        .unwrap();
    // A crash after step 2 (block created, affinity still pending).
    let c2: ipnet::IpNet = "10.20.0.64/26".parse().unwrap();
    store
        .create(&BlockAffinity::new(
            &names::affinity_name("n1", &c2),
            BlockAffinitySpec {
                state: AffinityState::Pending,
                node: "n1".into(),
                cidr: c2.to_string(),
                deleted: false,
            },
        ))
        .await
        .unwrap();
    store
        .create(&IPAMBlock::new(
            &names::block_name(&c2),
            margay_ipam::block::new_block_spec(&c2, Some("n1"), false, None, 0),
        ))
        .await
        .unwrap();
    // A stale affinity: n1 thinks it owns a block that n2 holds.
    let c3: ipnet::IpNet = "10.20.0.0/26".parse().unwrap();
    store
        .create(&BlockAffinity::new(
            &names::affinity_name("n1", &c3),
            BlockAffinitySpec {
                state: AffinityState::Confirmed,
                node: "n1".into(),
                cidr: c3.to_string(),
                deleted: false,
            },
        ))
        .await
        .unwrap();
    store
        .create(&IPAMBlock::new(
            &names::block_name(&c3),
            margay_ipam::block::new_block_spec(&c3, Some("n2"), false, None, 0),
        ))
        .await
        .unwrap();
    // Pending affinities are not ownership.
    assert!(margay_ipam::affine_blocks(&store, "n1")
        .await
        .unwrap()
        .is_empty());

    let a = alloc(&store, "n1", &clock);
    let got = a.assign(&v4("h", 1)).await.unwrap();
    assert!(got.addresses[0].block == c1 || got.addresses[0].block == c2);
    let mine = a.affine_blocks().await.unwrap();
    assert_eq!(mine, vec![c2, c1]);
    assert!(store
        .try_get::<BlockAffinity>(&names::affinity_name("n1", &c3))
        .await
        .unwrap()
        .is_none());
    // n2 has no affinity for c3 in this setup; that is the only remaining finding.
    let snap = Snapshot::read(&store).await.unwrap();
    assert!(audit::check(&snap, None).is_empty());
}

#[tokio::test]
async fn an_empty_block_of_another_node_is_taken_over_only_after_the_safe_age() {
    let store = store_with(&[pool("p", "10.30.0.0/30", Some(30))]).await;
    set_config(&store, |c| c.strict_affinity = true).await;
    let clock = Clock::manual(1_000_000);
    let n1 = alloc(&store, "n1", &clock);
    let n2 = alloc(&store, "n2", &clock);
    n1.assign(&v4("a", 1)).await.unwrap();
    n1.release_by_handle("a").await.unwrap();
    let e = n2.assign(&v4("b", 1)).await.unwrap_err();
    assert!(matches!(e, IpamError::PoolsFull { .. }), "{e}");
    clock.advance(15 * 60);
    let got = n2.assign(&v4("b", 1)).await.unwrap();
    assert_eq!(got.addresses[0].block.to_string(), "10.30.0.0/30");
    assert_eq!(n2.affine_blocks().await.unwrap().len(), 1);
    assert!(n1.affine_blocks().await.unwrap().is_empty());
    // n1's cached view is stale; its next request finds out and does not use the block.
    let e = n1.assign(&v4("c", 1)).await.unwrap_err();
    assert!(matches!(e, IpamError::PoolsFull { .. }), "{e}");
    assert_consistent(&store).await;
}

#[tokio::test]
async fn many_nodes_claiming_at_once_get_distinct_blocks_and_addresses() {
    let store = store_with(&[pool("p", "10.40.0.0/22", Some(28))]).await;
    let clock = Clock::manual(1_000_000);
    let mut tasks = Vec::new();
    for n in 0..20 {
        let a = alloc(&store, &format!("node-{n}"), &clock);
        tasks.push(tokio::spawn(async move {
            let mut ips = Vec::new();
            for i in 0..20 {
                let got = a.assign(&v4(&format!("h-{n}-{i}"), 1)).await.unwrap();
                ips.push(got.addresses[0].ip);
            }
            ips
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for ip in t.await.unwrap() {
            assert!(all.insert(ip), "{ip} handed out twice");
        }
    }
    assert_eq!(all.len(), 400);
    let snap = Snapshot::read(&store).await.unwrap();
    for b in &snap.blocks {
        assert!(b.spec.affinity.is_some());
    }
    assert_consistent(&store).await;
}

#[tokio::test]
async fn an_unavailable_store_fails_with_a_retryable_error() {
    let backend = margay_api::store::memory::MemoryBackend::new();
    let store = Store::new(std::sync::Arc::new(backend.clone()));
    store
        .create(&pool("p", "10.50.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    backend.set_offline(true);
    let e = a.assign(&v4("h", 1)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    backend.set_offline(false);
    a.assign(&v4("h", 1)).await.unwrap();
    assert_consistent(&store).await;
}

// ===== writes per operation =====

/// A memory store that logs every call (`get IPAMHandle x`, `update IPAMBlock y`,
/// `commit [create IPAMHandle x, update IPAMBlock y]`, with ` failed` when it failed), and
/// commits atomically or, like the Kubernetes backend, write by write.
#[derive(Debug)]
struct Recording {
    inner: margay_api::store::memory::MemoryBackend,
    atomic: bool,
    log: std::sync::Mutex<Vec<String>>,
}

mod recording {
    use super::Recording;
    use margay_api::store::{
        commit_in_order, Backend, Kind, RawList, RawObject, RawRead, RawReadResult, RawWatch,
        RawWrite, Revision,
    };
    use margay_api::StoreError;
    use serde_json::Value;

    impl Recording {
        fn note<T>(&self, what: String, r: Result<T, StoreError>) -> Result<T, StoreError> {
            let failed = if r.is_err() { " failed" } else { "" };
            self.log.lock().unwrap().push(format!("{what}{failed}"));
            r
        }

        pub fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    fn describe(w: &RawWrite) -> String {
        let op = match w {
            RawWrite::Create { .. } => "create",
            RawWrite::Update { .. } => "update",
            RawWrite::Delete { .. } => "delete",
        };
        format!("{op} {} {}", w.kind(), w.name())
    }

    #[async_trait::async_trait]
    impl Backend for Recording {
        fn name(&self) -> &'static str {
            "memory"
        }
        async fn get(&self, kind: Kind, name: &str) -> Result<RawObject, StoreError> {
            self.note(
                format!("get {kind} {name}"),
                self.inner.get(kind, name).await,
            )
        }
        async fn list(&self, kind: Kind) -> Result<RawList, StoreError> {
            self.note(format!("list {kind}"), self.inner.list(kind).await)
        }
        async fn list_prefix(&self, kind: Kind, prefix: &str) -> Result<RawList, StoreError> {
            let r = self.inner.list_prefix(kind, prefix).await;
            self.note(format!("list {kind} {prefix}*"), r)
        }
        async fn list_names(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
            let r = self.inner.list_names(kind).await;
            self.note(format!("list {kind} names"), r)
        }
        async fn read_batch(&self, reads: Vec<RawRead>) -> Result<Vec<RawReadResult>, StoreError> {
            let what = format!(
                "read [{}]",
                reads
                    .iter()
                    .map(|r| match r {
                        RawRead::Get { kind, name } => format!("get {kind} {name}"),
                        RawRead::List { kind, prefix } => format!("list {kind} {prefix}*"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let r = self.inner.read_batch(reads).await;
            self.note(what, r)
        }
        async fn create(&self, kind: Kind, name: &str, v: Value) -> Result<RawObject, StoreError> {
            let r = self.inner.create(kind, name, v).await;
            self.note(format!("create {kind} {name}"), r)
        }
        async fn update(
            &self,
            kind: Kind,
            name: &str,
            v: Value,
            expected: Revision,
        ) -> Result<RawObject, StoreError> {
            let r = self.inner.update(kind, name, v, expected).await;
            self.note(format!("update {kind} {name}"), r)
        }
        async fn update_status(
            &self,
            kind: Kind,
            name: &str,
            v: Value,
            expected: Revision,
        ) -> Result<RawObject, StoreError> {
            let r = self.inner.update_status(kind, name, v, expected).await;
            self.note(format!("update_status {kind} {name}"), r)
        }
        async fn delete(&self, kind: Kind, name: &str, rev: Revision) -> Result<(), StoreError> {
            let r = self.inner.delete(kind, name, rev).await;
            self.note(format!("delete {kind} {name}"), r)
        }
        async fn commit(
            &self,
            writes: Vec<RawWrite>,
        ) -> Result<Vec<Option<RawObject>>, StoreError> {
            if !self.atomic {
                return commit_in_order(self, writes).await;
            }
            let what = format!(
                "commit [{}]",
                writes.iter().map(describe).collect::<Vec<_>>().join(", ")
            );
            let r = self.inner.commit(writes).await;
            self.note(what, r)
        }
        fn atomic_commit(&self) -> bool {
            self.atomic
        }
        async fn watch(&self, kind: Kind, after: Revision) -> Result<RawWatch, StoreError> {
            self.inner.watch(kind, after).await
        }
    }
}

fn recording(atomic: bool) -> (std::sync::Arc<Recording>, Store) {
    let b = std::sync::Arc::new(Recording {
        inner: margay_api::store::memory::MemoryBackend::new(),
        atomic,
        log: Default::default(),
    });
    (b.clone(), Store::new(b))
}

fn writes(log: Vec<String>) -> Vec<String> {
    log.into_iter()
        .filter(|l| !l.starts_with("get ") && !l.starts_with("list ") && !l.starts_with("read ["))
        .collect()
}

/// On a store that commits atomically, a block claim is one commit (confirmed affinity and
/// block), an allocation in a block with room is one commit (handle and block), and so is each
/// kind of release.
/// When every block the node holds looks full, they are all read again in one batch (someone
/// may have released an address) before a new block is claimed; not one read per block.
#[tokio::test]
async fn full_blocks_are_read_again_in_one_batch_before_a_claim() {
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.62.0.0/24", Some(30)))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    for i in 0..8 {
        a.assign(&v4(&format!("h{i}"), 1)).await.unwrap();
    }
    rec.take();
    a.assign(&v4("h8", 1)).await.unwrap();
    let log = rec.take();
    let reads: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("IPAMBlock 10-62"))
        .collect();
    let blocks: Vec<String> = ["10.62.0.0/30", "10.62.0.4/30"]
        .iter()
        .map(|c| names::block_name(&c.parse().unwrap()))
        .collect();
    let batch = format!(
        "read [get IPAMBlock {}, get IPAMBlock {}]",
        blocks[0], blocks[1]
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("read [get IPAMBlock"))
            .count(),
        1,
        "one batch for the full blocks: {log:#?}"
    );
    assert!(log.contains(&batch), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.starts_with("get IPAMBlock")),
        "no block read on its own: {reads:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("commit [create BlockAffinity")),
        "then a claim: {log:#?}"
    );
    assert_consistent(&store).await;
}

/// Round trips, not just writes: a fresh allocator (a CNI process) reads everything it needs
/// in two batches (settings with this node's affinities, then its blocks), and an allocation
/// in a block with room is then one commit; a block claim lists block names, not documents.
#[tokio::test]
async fn a_fresh_allocator_reads_in_two_batches_and_allocates_in_one_round_trip() {
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.61.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let cfg = |clock: &Clock| AllocatorConfig {
        node_labels: None,
        policy_ttl: std::time::Duration::from_secs(600),
        clock: clock.clone(),
        ..AllocatorConfig::default()
    };
    let first = Allocator::new(store.clone(), "n1", cfg(&clock));
    rec.take();
    first.assign(&v4("h0", 1)).await.unwrap();
    let aff = names::affinity_name("n1", &"10.61.0.0/26".parse().unwrap());
    assert_eq!(
        rec.take(),
        vec![
            "read [list IPPool *, get IPAMConfig default, list IPReservation *, get Node n1, list BlockAffinity n1-*]".to_string(),
            "list BlockAffinity n1-*".into(),
            "list IPAMBlock names".into(),
            format!("commit [create BlockAffinity {aff}, create IPAMBlock 10-61-0-0-26]"),
            format!(
                "commit [create IPAMHandle {}, update IPAMBlock 10-61-0-0-26]",
                names::handle_name("h0")
            ),
        ],
        "a claim: the node's block count by its affinities, the free blocks by name"
    );

    let fresh = Allocator::new(store.clone(), "n1", cfg(&clock));
    fresh.assign(&v4("h1", 1)).await.unwrap();
    assert_eq!(
        rec.take(),
        vec![
            "read [list IPPool *, get IPAMConfig default, list IPReservation *, get Node n1, list BlockAffinity n1-*]".to_string(),
            "read [get IPAMBlock 10-61-0-0-26]".into(),
            format!(
                "commit [create IPAMHandle {}, update IPAMBlock 10-61-0-0-26]",
                names::handle_name("h1")
            ),
        ]
    );
    fresh.assign(&v4("h2", 1)).await.unwrap();
    assert_eq!(
        rec.take(),
        vec![format!(
            "commit [create IPAMHandle {}, update IPAMBlock 10-61-0-0-26]",
            names::handle_name("h2")
        )],
        "with the settings and the block in hand, an allocation is one round trip"
    );
    assert_consistent(&store).await;
}

#[tokio::test]
async fn with_atomic_commits_an_allocation_and_a_release_are_one_commit_each() {
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.60.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let block = "IPAMBlock 10-60-0-0-26";
    let aff = format!(
        "BlockAffinity {}",
        names::affinity_name("n1", &"10.60.0.0/26".parse().unwrap())
    );
    let h = |id: &str| format!("IPAMHandle {}", names::handle_name(id));
    rec.take();
    a.assign(&v4("h1", 1)).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![
            format!("commit [create {aff}, create {block}]"),
            format!("commit [create {}, update {block}]", h("h1")),
        ],
        "a claim is one commit, and so is the allocation in the new block"
    );
    let affinity: BlockAffinity = store.get(&aff["BlockAffinity ".len()..]).await.unwrap();
    assert_eq!(affinity.spec.state, AffinityState::Confirmed);

    let got = a.assign(&v4("h2", 1)).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("commit [create {}, update {block}]", h("h2"))]
    );
    a.release_by_handle("h2").await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("commit [update {block}, delete {}]", h("h2"))]
    );

    let h3 = a.assign(&v4("h3", 2)).await.unwrap();
    rec.take();
    let one = &h3.addresses[0];
    a.release_ips(&[(one.ip, Some(one.seq))]).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("commit [update {block}, update {}]", h("h3"))],
        "one of two addresses released: the handle's count goes down"
    );
    let two = &h3.addresses[1];
    a.release_ips(&[(two.ip, Some(two.seq))]).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("commit [update {block}, delete {}]", h("h3"))],
        "the last address released: the handle goes"
    );
    assert!(store
        .try_get::<IPAMHandle>(&names::handle_name("h3"))
        .await
        .unwrap()
        .is_none());
    assert!(got.addresses[0].ip.to_string().starts_with("10.60.0."));
    assert_consistent(&store).await;
}

/// A handle that changed under a commit is read again, alone, and the same block change is
/// committed with it: a repeated ADD for one handle adds to the handle's count.
#[tokio::test]
async fn a_conflict_on_the_handle_rereads_only_the_handle() {
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.61.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    a.assign(&v4("h", 1)).await.unwrap();
    rec.take();
    // The same handle again: the request starts without the handle, tries to create it, and
    // meets the one written by the first request.
    a.assign(&v4("h", 1)).await.unwrap();
    let log = rec.take();
    let first = log.iter().position(|l| l.starts_with("commit")).unwrap();
    let hname = names::handle_name("h");
    assert_eq!(
        log[first..].to_vec(),
        vec![
            format!("commit [create IPAMHandle {hname}, update IPAMBlock 10-61-0-0-26] failed"),
            format!("get IPAMHandle {hname}"),
            format!("commit [update IPAMHandle {hname}, update IPAMBlock 10-61-0-0-26]"),
        ]
    );
    let handle: IPAMHandle = store.get(&hname).await.unwrap();
    assert_eq!(handle.spec.block["10.61.0.0/26"], 2);
    assert_consistent(&store).await;
}

/// Without atomic commits (Kubernetes) the writes are made one by one in the safe order: the
/// claim in three steps, the handle before the block on assign, the block before the handle on
/// release.
#[tokio::test]
async fn without_atomic_commits_the_handle_is_written_before_the_block_and_after_on_release() {
    let (rec, store) = recording(false);
    store
        .create(&pool("p", "10.62.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    let block = "IPAMBlock 10-62-0-0-26";
    let aff = format!(
        "BlockAffinity {}",
        names::affinity_name("n1", &"10.62.0.0/26".parse().unwrap())
    );
    let h = |id: &str| format!("IPAMHandle {}", names::handle_name(id));
    rec.take();
    a.assign(&v4("h1", 1)).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![
            format!("create {aff}"),
            format!("create {block}"),
            format!("update {aff}"),
            format!("create {}", h("h1")),
            format!("update {block}"),
        ],
        "claim: pending affinity, block, confirmed affinity; then handle and block"
    );

    let got = a.assign(&v4("h2", 1)).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("create {}", h("h2")), format!("update {block}")]
    );
    a.release_by_handle("h2").await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("update {block}"), format!("delete {}", h("h2"))]
    );
    let h3 = a.assign(&v4("h3", 1)).await.unwrap();
    rec.take();
    let x = &h3.addresses[0];
    a.release_ips(&[(x.ip, Some(x.seq))]).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![format!("update {block}"), format!("delete {}", h("h3"))]
    );
    assert!(got.addresses[0].ip.to_string().starts_with("10.62.0."));
    assert_consistent(&store).await;
}

/// Without atomic commits a request's handle may be written ahead (the CNI plugin does so while
/// it waits for its node lock): a right guess of the block leaves only the block write; a wrong
/// one costs one more handle write and the unused count is taken back; a request that fails
/// takes back the whole handle; an existing handle is not written ahead; with atomic commits
/// nothing is.
#[tokio::test]
async fn a_handle_written_ahead_counts_only_what_its_request_holds() {
    let (rec, store) = recording(false);
    store
        .create(&pool("p", "10.64.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let a = alloc(&store, "n1", &clock);
    a.assign(&v4("h0", 1)).await.unwrap();
    let right: ipnet::IpNet = "10.64.0.0/26".parse().unwrap();
    let wrong: ipnet::IpNet = "10.64.0.192/26".parse().unwrap();
    let block = "IPAMBlock 10-64-0-0-26";
    let h = |id: &str| format!("IPAMHandle {}", names::handle_name(id));
    let counts = |store: Store, id: &'static str| async move {
        store
            .try_get::<IPAMHandle>(&names::handle_name(id))
            .await
            .unwrap()
            .map(|h| h.spec.block)
    };
    rec.take();

    // The right block: the request writes only the block.
    assert!(a.prepare_handle("h1", right).await.unwrap());
    assert_eq!(writes(rec.take()), vec![format!("create {}", h("h1"))]);
    a.assign(&v4("h1", 1)).await.unwrap();
    assert_eq!(writes(rec.take()), vec![format!("update {block}")]);
    assert_eq!(
        counts(store.clone(), "h1").await,
        Some(BTreeMap::from([("10.64.0.0/26".to_owned(), 1)]))
    );

    // A wrong block: counted where the address is, and no longer where it is not.
    assert!(a.prepare_handle("h2", wrong).await.unwrap());
    rec.take();
    a.assign(&v4("h2", 1)).await.unwrap();
    assert_eq!(
        writes(rec.take()),
        vec![
            format!("update {}", h("h2")),
            format!("update {block}"),
            format!("update {}", h("h2")),
        ]
    );
    assert_eq!(
        counts(store.clone(), "h2").await,
        Some(BTreeMap::from([("10.64.0.0/26".to_owned(), 1)]))
    );

    // A request that fails leaves no handle.
    assert!(a.prepare_handle("h3", right).await.unwrap());
    let mut bad = v4("h3", 1);
    bad.pools = vec!["no-such-pool".into()];
    a.assign(&bad).await.unwrap_err();
    assert_eq!(counts(store.clone(), "h3").await, None);

    // A handle that exists is left to the request: the create is refused, nothing changes.
    rec.take();
    assert!(!a.prepare_handle("h1", right).await.unwrap());
    assert_eq!(
        writes(rec.take()),
        vec![format!("create {} failed", h("h1"))]
    );
    assert_eq!(
        counts(store.clone(), "h1").await,
        Some(BTreeMap::from([("10.64.0.0/26".to_owned(), 1)]))
    );
    assert_consistent(&store).await;

    // With atomic commits the handle is part of the block's commit: nothing is written ahead.
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.64.0.0/24", None))
        .await
        .unwrap();
    let a = alloc(&store, "n1", &clock);
    rec.take();
    assert!(!a.prepare_handle("h1", right).await.unwrap());
    assert_eq!(writes(rec.take()), Vec::<String>::new());
}

/// An allocator as the CNI plugin makes one: the node's labels read from its Node, settings
/// kept long enough for the request that follows a prefetch.
fn cni_like(store: &Store, node: &str, clock: &Clock) -> Allocator {
    Allocator::new(
        store.clone(),
        node,
        AllocatorConfig {
            node_labels: None,
            policy_ttl: std::time::Duration::from_secs(600),
            clock: clock.clone(),
            ..AllocatorConfig::default()
        },
    )
}

/// The CNI plugin's path: settings, affinities and the blocks it guesses this node holds are
/// read in one batch before its lock; under the lock an allocation is then one commit. A
/// guess that does not match the affinities (a block the node no longer holds) is not used.
#[tokio::test]
async fn a_prefetch_with_the_right_blocks_leaves_one_commit_and_a_wrong_guess_is_not_used() {
    let (rec, store) = recording(true);
    store
        .create(&pool("p", "10.63.0.0/24", None))
        .await
        .unwrap();
    let clock = Clock::manual(1_000_000);
    let first = alloc(&store, "n1", &clock);
    first.assign(&v4("h0", 1)).await.unwrap();
    let known = first.known_blocks().await;
    assert_eq!(known, vec!["10.63.0.0/26".parse().unwrap()]);

    let next = cni_like(&store, "n1", &clock);
    rec.take();
    next.prefetch(&known).await.unwrap();
    next.assign(&v4("h1", 1)).await.unwrap();
    assert_eq!(
        rec.take(),
        vec![
            "read [list IPPool *, get IPAMConfig default, list IPReservation *, get Node n1, list BlockAffinity n1-*, get IPAMBlock 10-63-0-0-26]".to_string(),
            format!(
                "commit [create IPAMHandle {}, update IPAMBlock 10-63-0-0-26]",
                names::handle_name("h1")
            ),
        ]
    );

    // A guess naming a block this node does not hold: the blocks are loaded from the
    // affinities instead.
    let wrong = cni_like(&store, "n1", &clock);
    rec.take();
    wrong
        .prefetch(&["10.63.0.64/26".parse().unwrap()])
        .await
        .unwrap();
    let got = wrong.assign(&v4("h2", 1)).await.unwrap();
    assert!(
        "10.63.0.0/26"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got.addresses[0].ip),
        "{got:?}"
    );
    let log = rec.take();
    assert!(
        log.contains(&"read [get IPAMBlock 10-63-0-0-26]".to_string()),
        "{log:#?}"
    );

    // Told that the prefetched blocks may be stale, it reads them again.
    let told = cni_like(&store, "n1", &clock);
    told.prefetch(&known).await.unwrap();
    told.forget_prefetched_blocks().await;
    rec.take();
    told.assign(&v4("h3", 1)).await.unwrap();
    assert_eq!(
        rec.take()[0],
        "read [get IPAMBlock 10-63-0-0-26]",
        "the block is read again under the caller's lock"
    );
    assert_consistent(&store).await;
}

/// Affinities read ahead of the caller's lock can miss a block another process of the node
/// claimed meanwhile. Finding its known blocks full, the allocator uses that block rather
/// than claim another.
#[tokio::test]
async fn a_block_claimed_by_another_process_meanwhile_is_used_not_a_new_one() {
    let store = store_with(&[pool("p", "10.64.0.0/24", Some(30))]).await;
    let clock = Clock::manual(1_000_000);
    let early = cni_like(&store, "n1", &clock);
    let other = alloc(&store, "n1", &clock);
    // The other process fills the first block (a /30: four addresses).
    for i in 0..4 {
        other.assign(&v4(&format!("o{i}"), 1)).await.unwrap();
    }
    early.prefetch(&other.known_blocks().await).await.unwrap();
    // Meanwhile the other process claims a second block.
    other.assign(&v4("o4", 1)).await.unwrap();
    let blocks = other.known_blocks().await;
    assert_eq!(blocks.len(), 2, "{blocks:?}");

    let got = early.assign(&v4("e0", 1)).await.unwrap();
    assert!(
        blocks[1].contains(&got.addresses[0].ip),
        "the second block, not a third: {got:?}"
    );
    let (affs, _) = store.list::<BlockAffinity>().await.unwrap();
    assert_eq!(affs.len(), 2, "no third block: {affs:#?}");
    assert_consistent(&store).await;
}
