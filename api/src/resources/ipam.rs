//! IPAMBlock, BlockAffinity and IPAMHandle: the allocator's own records. Users read them;
//! only the allocator and the controller write them, always with compare-and-swap.
// kube's derive takes one `printcolumn(...)` attribute per column; clippy reads the
// repeated `type_ = ...` keys as duplicates.
#![allow(clippy::duplicated_attributes)]

use super::common::*;
use crate::names;
use crate::validation::ValidationErrors;
use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Who holds one allocated address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AllocationAttribute {
    /// The handle that owns the address, e.g. `k8s-pod-network.<containerID>`.
    #[serde(rename = "handle_id", default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// Free-form facts about the owner: namespace, pod, node, type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secondary: BTreeMap<String, String>,
}

/// A block of addresses within a pool, normally affine to one node, and which of its addresses
/// are allocated to whom.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    derive = "PartialEq",
    doc = "A block of pod addresses and its allocations.",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Affinity", type_ = "string", json_path = ".spec.affinity")
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    /// The block's range; the object's name is derived from it.
    pub cidr: String,
    /// `host:<node>` when the block belongs to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// RFC 3339 time at which the affinity was claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<String>,
    /// Whether the block was claimed under strict affinity (no borrowing).
    #[serde(default)]
    pub strict_affinity: bool,
    /// One entry per address (ordinal): the index into `attributes` of its owner, or null.
    #[serde(default)]
    pub allocations: Vec<Option<u32>>,
    /// Free ordinals, in the order they will be handed out (released ones go last).
    #[serde(default)]
    pub unallocated: Vec<u32>,
    /// Owners of allocated addresses, referenced from `allocations`.
    #[serde(default)]
    pub attributes: Vec<AllocationAttribute>,
    /// Set while the block is being released, so no new allocation lands in it.
    #[serde(default)]
    pub deleted: bool,
    /// Incremented on every allocation; copied into `sequenceNumberForAllocation`.
    #[serde(default)]
    pub sequence_number: u64,
    /// The sequence number each allocated ordinal was handed out with, keyed by ordinal.
    /// A release naming another number is stale and frees nothing.
    #[serde(default)]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    /// Unix time (seconds) before which a released ordinal must not be handed out again,
    /// keyed by ordinal (see IPAMConfig ipCooldownSeconds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cooldown_until: BTreeMap<String, u64>,
}

/// The prefix of `affinity` for node affinities.
pub const HOST_AFFINITY_PREFIX: &str = "host:";

impl IPAMBlockSpec {
    pub fn network(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }

    /// The node this block is affine to, if any.
    pub fn affine_node(&self) -> Option<&str> {
        self.affinity
            .as_deref()
            .and_then(|a| a.strip_prefix(HOST_AFFINITY_PREFIX))
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        self.network()
            .map(|n| 1u64 << (n.max_prefix_len() - n.prefix_len()).min(63))
            .unwrap_or(0)
    }
}

impl IPAMBlock {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        let s = &self.spec;
        let Some(net) = parse_masked_cidr("spec.cidr", &s.cidr, errs) else {
            return;
        };
        super::check_derived_name(&self.metadata, &names::block_name(&net), "spec.cidr", errs);
        let host_bits = net.max_prefix_len() - net.prefix_len();
        if host_bits > 12 {
            errs.add(
                "spec.cidr",
                &s.cidr,
                "a block holds at most 4096 addresses (IPv4 /20, IPv6 /116)",
            );
            return;
        }
        let size = 1usize << host_bits;
        if s.allocations.len() != size {
            errs.add(
                "spec.allocations",
                s.allocations.len(),
                format!("must have one entry per address of the block ({size})"),
            );
        }
        if let Some(a) = &s.affinity {
            if a.strip_prefix(HOST_AFFINITY_PREFIX)
                .is_none_or(str::is_empty)
            {
                errs.add("spec.affinity", a, "must be host:<node name>");
            }
        }
        let mut seen = vec![false; size];
        for (i, &o) in s.unallocated.iter().enumerate() {
            let path = format!("spec.unallocated[{i}]");
            match seen.get_mut(o as usize) {
                None => errs.add(
                    path,
                    o,
                    format!("is not an ordinal of the block (0..{size})"),
                ),
                Some(true) => errs.add(path, o, "is listed twice"),
                Some(s2) => *s2 = true,
            }
            if s.allocations.get(o as usize).is_some_and(Option::is_some) {
                errs.add(
                    format!("spec.unallocated[{i}]"),
                    o,
                    "is both free and allocated",
                );
            }
        }
        for (o, a) in s.allocations.iter().enumerate() {
            match a {
                Some(idx) if *idx as usize >= s.attributes.len() => errs.add(
                    format!("spec.allocations[{o}]"),
                    idx,
                    format!(
                        "refers to attribute {idx}, but there are {}",
                        s.attributes.len()
                    ),
                ),
                None if !seen.get(o).copied().unwrap_or(true) => errs.add(
                    format!("spec.allocations[{o}]"),
                    "null",
                    "is neither allocated nor listed in unallocated (the address would be lost)",
                ),
                _ => {}
            }
        }
    }
}

/// Whether a node's claim on a block is complete.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Being claimed: counts as absent for ownership and route export.
    #[default]
    Pending,
    /// Claimed: the node owns and advertises the block.
    Confirmed,
    /// Being released.
    PendingDeletion,
}

/// A node's claim on a block.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "BlockAffinity",
    plural = "blockaffinities",
    derive = "PartialEq",
    doc = "A node's claim on an address block.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state")
)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    pub state: AffinityState,
    pub node: String,
    pub cidr: String,
    #[serde(default)]
    pub deleted: bool,
}

impl BlockAffinity {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        let s = &self.spec;
        if !names::is_dns_subdomain(&s.node) {
            errs.add("spec.node", &s.node, "must be a node name");
        }
        if let Some(net) = parse_masked_cidr("spec.cidr", &s.cidr, errs) {
            super::check_derived_name(
                &self.metadata,
                &names::affinity_name(&s.node, &net),
                "spec.node and spec.cidr",
                errs,
            );
        }
    }
}

/// Everything one owner (a pod, a tunnel device) holds, by block.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "IPAMHandle",
    plural = "ipamhandles",
    derive = "PartialEq",
    doc = "The addresses held by one owner, counted per block.",
    printcolumn(name = "Handle", type_ = "string", json_path = ".spec.handleID")
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMHandleSpec {
    /// The owner's handle, e.g. `k8s-pod-network.<containerID>` or `vxlan-tunnel-addr-<node>`.
    #[serde(rename = "handleID")]
    pub handle_id: String,
    /// Number of addresses held in each block, keyed by the block's CIDR.
    #[serde(default)]
    pub block: BTreeMap<String, i64>,
    #[serde(default)]
    pub deleted: bool,
}

impl IPAMHandle {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        let s = &self.spec;
        if s.handle_id.is_empty() {
            errs.add("spec.handleID", "", "must not be empty");
        } else {
            super::check_derived_name(
                &self.metadata,
                &names::handle_name(&s.handle_id),
                "spec.handleID",
                errs,
            );
        }
        for (cidr, count) in &s.block {
            let path = format!("spec.block[{cidr}]");
            parse_masked_cidr(&path, cidr, errs);
            if *count < 0 {
                errs.add(path, count, "an address count cannot be negative");
            }
        }
    }
}
