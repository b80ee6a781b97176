//! Operations on one block's allocation table, without I/O. The allocator reads a block, applies
//! one of these to a copy, and writes the copy back with compare-and-swap on the revision it
//! read; a conflict means "read again and re-apply".
//!
//! Layout (Calico's): `allocations[ordinal]` is an index into `attributes` or null;
//! `unallocated` lists the free ordinals in the order they are handed out; a released ordinal
//! goes to the back, so free addresses are reused first-in first-out; `cooldownUntil` holds a
//! released ordinal back until a time; `sequenceNumberForAllocation` records the sequence number
//! each allocation was made with, and a release naming another number frees nothing.

use ipnet::IpNet;
use margay_api::{AllocationAttribute, IPAMBlockSpec, HOST_AFFINITY_PREFIX};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses of a block that are never handed out.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    /// IPReservation ranges.
    pub reserved: Vec<IpNet>,
    /// The pool's `avoidBlockNetworkAndBroadcast`: keep the first and last address of blocks of
    /// four or more addresses.
    pub avoid_network_and_broadcast: bool,
}

impl Exclusions {
    /// Why `ordinal` of `cidr` may not be handed out, if it may not.
    pub fn reason(&self, cidr: &IpNet, ordinal: u32) -> Option<String> {
        let size = block_size(cidr);
        if self.avoid_network_and_broadcast
            && size >= 4
            && (ordinal == 0 || u64::from(ordinal) == size - 1)
        {
            return Some(
                "it is the block's network or broadcast address and the pool sets avoidBlockNetworkAndBroadcast"
                    .into(),
            );
        }
        let ip = ip_of(cidr, ordinal);
        self.reserved
            .iter()
            .find(|r| r.contains(&ip))
            .map(|r| format!("it is reserved by an IPReservation ({r})"))
    }

    pub fn excludes(&self, cidr: &IpNet, ordinal: u32) -> bool {
        self.reason(cidr, ordinal).is_some()
    }
}

/// Number of addresses in a block.
pub fn block_size(cidr: &IpNet) -> u64 {
    1u64 << (cidr.max_prefix_len() - cidr.prefix_len()).min(63)
}

/// The address at `ordinal` of the block.
pub fn ip_of(cidr: &IpNet, ordinal: u32) -> IpAddr {
    match cidr {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(ordinal))),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()).wrapping_add(u128::from(ordinal)),
        )),
    }
}

/// The ordinal of `ip` in the block, if the block contains it.
pub fn ordinal_of(cidr: &IpNet, ip: &IpAddr) -> Option<u32> {
    if !cidr.contains(ip) {
        return None;
    }
    match (cidr, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => Some(u32::from(*a) - u32::from(n.network())),
        (IpNet::V6(n), IpAddr::V6(a)) => {
            u32::try_from(u128::from(*a) - u128::from(n.network())).ok()
        }
        _ => None,
    }
}

/// A fresh block: every ordinal free, in address order.
pub fn new_block_spec(
    cidr: &IpNet,
    node: Option<&str>,
    strict_affinity: bool,
    claim_time: Option<String>,
    first_sequence: u64,
) -> IPAMBlockSpec {
    let size = block_size(cidr) as u32;
    IPAMBlockSpec {
        cidr: cidr.to_string(),
        affinity: node.map(|n| format!("{HOST_AFFINITY_PREFIX}{n}")),
        affinity_claim_time: claim_time,
        strict_affinity,
        allocations: vec![None; size as usize],
        unallocated: (0..size).collect(),
        attributes: Vec::new(),
        deleted: false,
        sequence_number: first_sequence,
        sequence_number_for_allocation: BTreeMap::new(),
        cooldown_until: BTreeMap::new(),
    }
}

/// The handle owning `ordinal`, if it is allocated.
pub fn owner(spec: &IPAMBlockSpec, ordinal: u32) -> Option<&AllocationAttribute> {
    let idx = (*spec.allocations.get(ordinal as usize)?)?;
    spec.attributes.get(idx as usize)
}

/// The sequence number `ordinal` was allocated with.
pub fn sequence_of(spec: &IPAMBlockSpec, ordinal: u32) -> Option<u64> {
    spec.sequence_number_for_allocation
        .get(&ordinal.to_string())
        .copied()
}

/// Whether no address of the block is allocated.
pub fn is_empty(spec: &IPAMBlockSpec) -> bool {
    spec.allocations.iter().all(Option::is_none)
}

/// Number of allocated addresses.
pub fn allocated_count(spec: &IPAMBlockSpec) -> usize {
    spec.allocations.iter().filter(|a| a.is_some()).count()
}

/// Free ordinals that may be handed out now, in hand-out order.
pub fn available<'a>(
    spec: &'a IPAMBlockSpec,
    cidr: &'a IpNet,
    excl: &'a Exclusions,
    now: u64,
) -> impl Iterator<Item = u32> + 'a {
    spec.unallocated.iter().copied().filter(move |&o| {
        !excl.excludes(cidr, o) && cooldown_of(spec, o).is_none_or(|until| until <= now)
    })
}

fn cooldown_of(spec: &IPAMBlockSpec, ordinal: u32) -> Option<u64> {
    spec.cooldown_until.get(&ordinal.to_string()).copied()
}

/// Finds or adds the attribute entry for `attr`, returning its index.
fn attribute_index(spec: &mut IPAMBlockSpec, attr: &AllocationAttribute) -> u32 {
    if let Some(i) = spec.attributes.iter().position(|a| a == attr) {
        return i as u32;
    }
    spec.attributes.push(attr.clone());
    (spec.attributes.len() - 1) as u32
}

fn take(spec: &mut IPAMBlockSpec, ordinal: u32, attr_idx: u32) -> u64 {
    spec.unallocated.retain(|&o| o != ordinal);
    spec.allocations[ordinal as usize] = Some(attr_idx);
    spec.sequence_number += 1;
    let seq = spec.sequence_number;
    let key = ordinal.to_string();
    spec.sequence_number_for_allocation.insert(key.clone(), seq);
    spec.cooldown_until.remove(&key);
    seq
}

/// Drops cooldowns that have expired, so the table does not grow.
fn prune_cooldowns(spec: &mut IPAMBlockSpec, now: u64) {
    spec.cooldown_until.retain(|_, until| *until > now);
}

/// Allocates up to `n` addresses to `attr`, FIFO from the free list, skipping excluded and
/// cooling-down ordinals. Returns `(ordinal, sequence number)` of each. When it returns none,
/// `spec` is unchanged (the allocator relies on this to keep its copy without cloning).
pub fn allocate(
    spec: &mut IPAMBlockSpec,
    cidr: &IpNet,
    n: usize,
    attr: &AllocationAttribute,
    excl: &Exclusions,
    now: u64,
) -> Vec<(u32, u64)> {
    let picked: Vec<u32> = available(spec, cidr, excl, now).take(n).collect();
    if picked.is_empty() {
        return Vec::new();
    }
    prune_cooldowns(spec, now);
    let idx = attribute_index(spec, attr);
    picked
        .into_iter()
        .map(|o| (o, take(spec, o, idx)))
        .collect()
}

/// Why a specific ordinal could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecificRefusal {
    /// Allocated to this handle (empty when the attribute carries none).
    InUse(String),
    Excluded(String),
    CoolingDown(u64),
}

/// Allocates exactly `ordinal` to `attr`.
pub fn allocate_ordinal(
    spec: &mut IPAMBlockSpec,
    cidr: &IpNet,
    ordinal: u32,
    attr: &AllocationAttribute,
    excl: &Exclusions,
    now: u64,
) -> Result<u64, SpecificRefusal> {
    if let Some(a) = owner(spec, ordinal) {
        return Err(SpecificRefusal::InUse(
            a.handle_id.clone().unwrap_or_default(),
        ));
    }
    if let Some(r) = excl.reason(cidr, ordinal) {
        return Err(SpecificRefusal::Excluded(r));
    }
    if let Some(until) = cooldown_of(spec, ordinal).filter(|&u| u > now) {
        return Err(SpecificRefusal::CoolingDown(until));
    }
    prune_cooldowns(spec, now);
    let idx = attribute_index(spec, attr);
    Ok(take(spec, ordinal, idx))
}

/// What releasing one ordinal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// Freed; the handle that held it.
    Freed { handle: Option<String> },
    /// It was not allocated.
    NotAllocated,
    /// It is allocated with another sequence number than the release named: the address was
    /// handed out again since, and this (stale) release must not free it.
    StaleSequence { current: u64 },
}

fn free(spec: &mut IPAMBlockSpec, ordinal: u32, cooldown_secs: u64, now: u64) {
    spec.allocations[ordinal as usize] = None;
    let key = ordinal.to_string();
    spec.sequence_number_for_allocation.remove(&key);
    if cooldown_secs > 0 {
        spec.cooldown_until.insert(key, now + cooldown_secs);
    }
    if !spec.unallocated.contains(&ordinal) {
        spec.unallocated.push(ordinal);
    }
}

/// Removes attributes no allocation refers to and renumbers the rest.
fn compact_attributes(spec: &mut IPAMBlockSpec) {
    let mut used = vec![false; spec.attributes.len()];
    for a in spec.allocations.iter().flatten() {
        if let Some(u) = used.get_mut(*a as usize) {
            *u = true;
        }
    }
    if used.iter().all(|u| *u) {
        return;
    }
    let mut remap = vec![0u32; used.len()];
    let mut kept = Vec::new();
    for (i, attr) in std::mem::take(&mut spec.attributes).into_iter().enumerate() {
        if used[i] {
            remap[i] = kept.len() as u32;
            kept.push(attr);
        }
    }
    spec.attributes = kept;
    for a in spec.allocations.iter_mut().flatten() {
        *a = remap[*a as usize];
    }
}

/// Releases one ordinal, if `seq` (when given) is the sequence number it was allocated with.
pub fn release_ordinal(
    spec: &mut IPAMBlockSpec,
    ordinal: u32,
    seq: Option<u64>,
    cooldown_secs: u64,
    now: u64,
) -> Released {
    let Some(attr) = owner(spec, ordinal) else {
        return Released::NotAllocated;
    };
    let handle = attr.handle_id.clone();
    if let (Some(want), Some(current)) = (seq, sequence_of(spec, ordinal)) {
        if want != current {
            return Released::StaleSequence { current };
        }
    }
    prune_cooldowns(spec, now);
    free(spec, ordinal, cooldown_secs, now);
    compact_attributes(spec);
    Released::Freed { handle }
}

/// Releases every ordinal held by `handle`; returns them.
pub fn release_handle(
    spec: &mut IPAMBlockSpec,
    handle: &str,
    cooldown_secs: u64,
    now: u64,
) -> Vec<u32> {
    let ordinals: Vec<u32> = (0..spec.allocations.len() as u32)
        .filter(|&o| owner(spec, o).and_then(|a| a.handle_id.as_deref()) == Some(handle))
        .collect();
    if ordinals.is_empty() {
        return ordinals;
    }
    prune_cooldowns(spec, now);
    for &o in &ordinals {
        free(spec, o, cooldown_secs, now);
    }
    compact_attributes(spec);
    ordinals
}

/// Ordinals held by `handle`.
pub fn ordinals_of_handle(spec: &IPAMBlockSpec, handle: &str) -> Vec<u32> {
    (0..spec.allocations.len() as u32)
        .filter(|&o| owner(spec, o).and_then(|a| a.handle_id.as_deref()) == Some(handle))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(h: &str) -> AllocationAttribute {
        AllocationAttribute {
            handle_id: Some(h.into()),
            secondary: BTreeMap::new(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ordinals_map_to_addresses_both_ways() {
        let c = net("10.0.0.64/26");
        assert_eq!(ip_of(&c, 5), "10.0.0.69".parse::<IpAddr>().unwrap());
        assert_eq!(ordinal_of(&c, &"10.0.0.127".parse().unwrap()), Some(63));
        assert_eq!(ordinal_of(&c, &"10.0.0.128".parse().unwrap()), None);
        let c6 = net("fd00::40/122");
        assert_eq!(ip_of(&c6, 1), "fd00::41".parse::<IpAddr>().unwrap());
        assert_eq!(ordinal_of(&c6, &"fd00::7f".parse().unwrap()), Some(63));
    }

    #[test]
    fn released_addresses_are_reused_first_in_first_out() {
        let c = net("10.0.0.0/30");
        let mut b = new_block_spec(&c, Some("n1"), false, None, 0);
        let ex = Exclusions::default();
        let got = allocate(&mut b, &c, 4, &attr("a"), &ex, 0);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(allocate(&mut b, &c, 1, &attr("b"), &ex, 0), vec![]);
        for o in [2, 0, 3] {
            assert!(matches!(
                release_ordinal(&mut b, o, None, 0, 0),
                Released::Freed { .. }
            ));
        }
        let order: Vec<u32> = allocate(&mut b, &c, 3, &attr("b"), &ex, 0)
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(order, vec![2, 0, 3]);
    }

    #[test]
    fn an_allocation_that_finds_no_room_changes_nothing() {
        let c = net("10.0.0.0/31");
        let mut b = new_block_spec(&c, None, false, None, 0);
        let ex = Exclusions::default();
        allocate(&mut b, &c, 2, &attr("a"), &ex, 100);
        // One released address still cooling down, one expired cooldown entry elsewhere: a
        // fruitless allocation must not even prune the expired one.
        release_ordinal(&mut b, 1, None, 30, 100);
        b.cooldown_until.insert("7".into(), 50);
        let before = b.clone();
        assert!(allocate(&mut b, &c, 1, &attr("b"), &ex, 110).is_empty());
        assert_eq!(b, before);
    }

    #[test]
    fn cooldown_holds_a_released_address_back_until_it_expires() {
        let c = net("10.0.0.0/31");
        let mut b = new_block_spec(&c, None, false, None, 0);
        let ex = Exclusions::default();
        allocate(&mut b, &c, 2, &attr("a"), &ex, 100);
        release_ordinal(&mut b, 1, None, 30, 100);
        assert!(allocate(&mut b, &c, 1, &attr("b"), &ex, 129).is_empty());
        assert!(matches!(
            allocate_ordinal(&mut b, &c, 1, &attr("b"), &ex, 129),
            Err(SpecificRefusal::CoolingDown(130))
        ));
        assert_eq!(allocate(&mut b, &c, 1, &attr("b"), &ex, 130)[0].0, 1);
        assert!(b.cooldown_until.is_empty());
    }

    #[test]
    fn a_stale_sequence_number_frees_nothing() {
        let c = net("10.0.0.0/32");
        let mut b = new_block_spec(&c, None, false, None, 7);
        let ex = Exclusions::default();
        let (_, s1) = allocate(&mut b, &c, 1, &attr("a"), &ex, 0)[0];
        assert_eq!(s1, 8);
        assert!(matches!(
            release_ordinal(&mut b, 0, Some(s1), 0, 0),
            Released::Freed { .. }
        ));
        let (_, s2) = allocate(&mut b, &c, 1, &attr("b"), &ex, 0)[0];
        assert_ne!(s1, s2);
        assert_eq!(
            release_ordinal(&mut b, 0, Some(s1), 0, 0),
            Released::StaleSequence { current: s2 }
        );
        assert_eq!(owner(&b, 0).unwrap().handle_id.as_deref(), Some("b"));
    }

    #[test]
    fn exclusions_skip_reserved_network_and_broadcast() {
        let c = net("10.0.0.0/29");
        let mut b = new_block_spec(&c, None, false, None, 0);
        let ex = Exclusions {
            reserved: vec![net("10.0.0.2/31")],
            avoid_network_and_broadcast: true,
        };
        let got: Vec<u32> = allocate(&mut b, &c, 8, &attr("a"), &ex, 0)
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(got, vec![1, 4, 5, 6]);
        // A /32 or /31 block has no network/broadcast to avoid.
        let c32 = net("10.0.0.9/32");
        assert!(!ex.excludes(&c32, 0));
    }

    #[test]
    fn attributes_are_shared_and_compacted() {
        let c = net("10.0.0.0/29");
        let mut b = new_block_spec(&c, None, false, None, 0);
        let ex = Exclusions::default();
        allocate(&mut b, &c, 2, &attr("a"), &ex, 0);
        allocate(&mut b, &c, 2, &attr("b"), &ex, 0);
        assert_eq!(b.attributes.len(), 2);
        assert_eq!(release_handle(&mut b, "a", 0, 0), vec![0, 1]);
        assert_eq!(b.attributes, vec![attr("b")]);
        assert_eq!(owner(&b, 2).unwrap().handle_id.as_deref(), Some("b"));
        assert_eq!(ordinals_of_handle(&b, "b"), vec![2, 3]);
    }
}
