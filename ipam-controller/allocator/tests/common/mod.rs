//! Shared setup for the allocator's tests.
#![allow(dead_code)]

use margay_api::{
    AllowedUse, IPAMConfig, IPAMConfigSpec, IPPool, IPPoolSpec, IPReservation, IPReservationSpec,
    Store,
};
use margay_ipam::{Allocator, AllocatorConfig, AssignRequest, Clock};
use std::collections::BTreeMap;

pub fn pool(name: &str, cidr: &str, block: Option<u8>) -> IPPool {
    IPPool::new(
        name,
        IPPoolSpec {
            cidr: cidr.into(),
            block_size: block,
            ..IPPoolSpec::default()
        },
    )
}

pub fn pool_with(
    name: &str,
    cidr: &str,
    block: Option<u8>,
    f: impl FnOnce(&mut IPPoolSpec),
) -> IPPool {
    let mut p = pool(name, cidr, block);
    f(&mut p.spec);
    p
}

pub async fn set_config(store: &Store, f: impl FnOnce(&mut IPAMConfigSpec)) {
    let mut spec = IPAMConfigSpec::default();
    f(&mut spec);
    match store.try_get::<IPAMConfig>("default").await.unwrap() {
        Some(mut c) => {
            c.spec = spec;
            store.update(&c).await.unwrap();
        }
        None => {
            store
                .create(&IPAMConfig::new("default", spec))
                .await
                .unwrap();
        }
    }
}

pub async fn reserve(store: &Store, name: &str, cidrs: &[&str]) {
    store
        .create(&IPReservation::new(
            name,
            IPReservationSpec {
                reserved_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            },
        ))
        .await
        .unwrap();
}

pub fn cfg(clock: &Clock) -> AllocatorConfig {
    AllocatorConfig {
        node_labels: Some(BTreeMap::new()),
        policy_ttl: std::time::Duration::ZERO,
        clock: clock.clone(),
        ..AllocatorConfig::default()
    }
}

pub fn alloc(store: &Store, node: &str, clock: &Clock) -> Allocator {
    Allocator::new(store.clone(), node, cfg(clock))
}

pub fn v4(handle: &str, n: u32) -> AssignRequest {
    AssignRequest {
        handle_id: handle.into(),
        num_v4: n,
        ..AssignRequest::default()
    }
}

pub fn v6(handle: &str, n: u32) -> AssignRequest {
    AssignRequest {
        handle_id: handle.into(),
        num_v6: n,
        ..AssignRequest::default()
    }
}

pub const TUNNEL_ONLY: [AllowedUse; 1] = [AllowedUse::Tunnel];
