//! IPPool, IPReservation and IPAMConfig: the address space users manage.
// kube's derive takes one `printcolumn(...)` attribute per column; clippy reads the
// repeated `type_ = ...` keys as duplicates.
#![allow(clippy::duplicated_attributes)]

use super::common::*;
use crate::validation::ValidationErrors;
use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// What the API server accepts as a pool's `cidr`: an IPv4 or IPv6 address, `/`, and a prefix
/// length that fits the family. Host bits and reserved ranges are left to `IPPool::check`.
pub const CIDR_PATTERN: &str = concat!(
    r"^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])",
    r"|[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){2,8}(:((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))?/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))$"
);

/// Default block size of IPv4 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
/// Default block size of IPv6 pools: 64 addresses per block.
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

/// What addresses from a pool may be used for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AllowedUse {
    /// Pod addresses.
    Workload,
    /// Tunnel device addresses (tunl0, vxlan.margay).
    Tunnel,
    /// Service load-balancer addresses. Refused by validation (the controller marks such a
    /// pool `Valid=False`, the allocator does not use it) until Margay allocates and
    /// advertises service addresses.
    LoadBalancer,
}

fn default_allowed_uses() -> Vec<AllowedUse> {
    vec![AllowedUse::Workload, AllowedUse::Tunnel]
}

fn default_node_selector() -> String {
    "all()".into()
}

/// A range of addresses from which pods (and tunnels) get theirs, split into per-node blocks.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "IPPool",
    plural = "ippools",
    status = "IPPoolStatus",
    derive = "PartialEq",
    doc = "A range of pod addresses, allocated to nodes in blocks.",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    ),
    printcolumn(name = "Block", type_ = "integer", json_path = ".status.blockSize"),
    printcolumn(name = "IPIP", type_ = "string", json_path = ".spec.ipipMode"),
    printcolumn(name = "VXLAN", type_ = "string", json_path = ".spec.vxlanMode"),
    printcolumn(name = "NAT", type_ = "boolean", json_path = ".spec.natOutgoing"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled")
)]
#[serde(rename_all = "camelCase")]
// What a schema can check of a pool, the API server checks: servers with CEL (v1.25 on) also
// run these rules. Older servers skip them, so the controller and the allocator check the same
// again (`IPPool::check`), together with what no schema can say (host bits, the selector's
// grammar, overlaps with other pools).
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.ipipMode) && has(self.vxlanMode) && self.ipipMode != 'Never' && self.vxlanMode != 'Never')",
        "message": "ipipMode and vxlanMode cannot both be enabled: choose one encapsulation"
    },
    {
        "rule": "!(self.cidr.contains(':') && has(self.ipipMode) && self.ipipMode != 'Never')",
        "message": "ipipMode carries only IPv4: an IPv6 pool is routed without encapsulation"
    },
    {
        "rule": "!(self.cidr.contains(':') && has(self.vxlanMode) && self.vxlanMode != 'Never')",
        "message": "Margay does not carry IPv6 in VXLAN yet: an IPv6 pool is routed without encapsulation"
    },
    {
        "rule": "!has(self.blockSize) || (self.cidr.contains(':') ? self.blockSize >= 116 : self.blockSize <= 32)",
        "message": "blockSize must be 20 to 32 for an IPv4 pool and 116 to 128 for an IPv6 pool"
    },
    {
        "rule": "!self.cidr.contains('/') || int(self.cidr.split('/')[1]) <= (has(self.blockSize) ? self.blockSize : (self.cidr.contains(':') ? 122 : 26))",
        "message": "the pool is smaller than one block: blockSize (default 26 for IPv4, 122 for IPv6) must be at least the cidr's prefix length"
    },
    {
        "rule": "!has(self.allowedUses) || !self.allowedUses.exists(u, u == 'LoadBalancer')",
        "message": "allowedUses LoadBalancer is not supported yet: Margay does not allocate or advertise service addresses"
    }
]))]
pub struct IPPoolSpec {
    /// The pool's range, e.g. 10.244.0.0/16. Immutable once addresses are allocated.
    #[schemars(length(max = 64), pattern(CIDR_PATTERN))]
    pub cidr: String,
    /// Prefix length of the per-node blocks: 20–32 for IPv4 (default 26), 116–128 for IPv6
    /// (default 122). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 128))]
    pub block_size: Option<u8>,
    /// IP-in-IP encapsulation between nodes (IPv4 only).
    #[serde(default)]
    pub ipip_mode: EncapMode,
    /// VXLAN encapsulation between nodes.
    #[serde(default)]
    pub vxlan_mode: EncapMode,
    /// Masquerade traffic from this pool's pods to destinations outside every pool.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// A disabled pool hands out no new addresses; existing ones keep working.
    #[serde(default)]
    pub disabled: bool,
    /// Do not advertise this pool's blocks over BGP.
    #[serde(rename = "disableBGPExport", default)]
    pub disable_bgp_export: bool,
    /// Which nodes may take blocks from this pool (selector expression, default `all()`).
    #[serde(default = "default_node_selector")]
    #[schemars(length(max = 1024))]
    pub node_selector: String,
    /// What the addresses may be used for (default Workload and Tunnel).
    #[serde(default = "default_allowed_uses")]
    #[schemars(length(min = 1, max = 3))]
    pub allowed_uses: Vec<AllowedUse>,
    /// Never hand out the first and last address of each block (for networks where those are
    /// the subnet's network and broadcast addresses). Off by default, as in Calico.
    #[serde(default)]
    pub avoid_block_network_and_broadcast: bool,
}

impl Default for IPPoolSpec {
    fn default() -> Self {
        IPPoolSpec {
            cidr: String::new(),
            block_size: None,
            ipip_mode: EncapMode::Never,
            vxlan_mode: EncapMode::Never,
            nat_outgoing: false,
            disabled: false,
            disable_bgp_export: false,
            node_selector: default_node_selector(),
            allowed_uses: default_allowed_uses(),
            avoid_block_network_and_broadcast: false,
        }
    }
}

/// What the controller found about a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct IPPoolStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The block size in force: the one set, or the family's default.
    #[serde(rename = "blockSize", default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
}

impl IPPoolSpec {
    /// The parsed CIDR, if valid.
    pub fn network(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }

    /// The block size in force: the one set, or the family's default.
    pub fn effective_block_size(&self) -> u8 {
        match (self.block_size, self.network()) {
            (Some(b), _) => b,
            (None, Some(IpNet::V6(_))) => DEFAULT_BLOCK_SIZE_V6,
            (None, _) => DEFAULT_BLOCK_SIZE_V4,
        }
    }
}

impl IPPool {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        super::check_name(&self.metadata, errs);
        let s = &self.spec;
        parse_masked_cidr("spec.cidr", &s.cidr, errs);
        // Keep checking the rest against the masked range even when the CIDR had host bits,
        // so that one pass reports every problem.
        if let Some(net) = s.network().map(|n| n.trunc()) {
            let (lo, hi, fam) = match net {
                IpNet::V4(_) => (20, 32, "IPv4"),
                IpNet::V6(_) => (116, 128, "IPv6"),
            };
            let bs = s.effective_block_size();
            if !(lo..=hi).contains(&bs) {
                errs.add(
                    "spec.blockSize",
                    bs,
                    format!("must be between {lo} and {hi} for an {fam} pool"),
                );
            } else if bs < net.prefix_len() {
                errs.add(
                    "spec.blockSize",
                    bs,
                    format!(
                        "blocks of /{bs} do not fit in the pool /{}; use a block size of at least {}",
                        net.prefix_len(),
                        net.prefix_len()
                    ),
                );
            }
            check_pool_range(&net, errs);
            if net.addr().is_ipv6() && s.ipip_mode.is_enabled() {
                errs.add(
                    "spec.ipipMode",
                    format!("{:?}", s.ipip_mode),
                    "IP-in-IP carries only IPv4; an IPv6 pool is routed without encapsulation",
                );
            }
            if net.addr().is_ipv6() && s.vxlan_mode.is_enabled() {
                errs.add(
                    "spec.vxlanMode",
                    format!("{:?}", s.vxlan_mode),
                    "Margay does not carry IPv6 in VXLAN yet; an IPv6 pool is routed without encapsulation (BGP to the nodes' IPv6 addresses)",
                );
            }
        }
        if s.ipip_mode.is_enabled() && s.vxlan_mode.is_enabled() {
            errs.add(
                "spec.vxlanMode",
                format!("{:?}", s.vxlan_mode),
                format!(
                    "cannot be enabled together with ipipMode {:?}; choose one encapsulation",
                    s.ipip_mode
                ),
            );
        }
        check_selector("spec.nodeSelector", &s.node_selector, errs);
        if s.allowed_uses.is_empty() {
            errs.add(
                "spec.allowedUses",
                "[]",
                "must list at least one of Workload, Tunnel",
            );
        }
        for (i, u) in s.allowed_uses.iter().enumerate() {
            if s.allowed_uses[..i].contains(u) {
                errs.add(
                    format!("spec.allowedUses[{i}]"),
                    format!("{u:?}"),
                    "is listed twice",
                );
            }
        }
        if let Some(i) = s
            .allowed_uses
            .iter()
            .position(|u| *u == AllowedUse::LoadBalancer)
        {
            errs.add(
                format!("spec.allowedUses[{i}]"),
                "LoadBalancer",
                "is not supported yet: Margay does not allocate or advertise service addresses; use Workload or Tunnel",
            );
        }
    }
}

/// Rejects ranges that can never be pod addresses.
fn check_pool_range(net: &IpNet, errs: &mut ValidationErrors) {
    let bad = match net {
        IpNet::V4(n) => {
            let link_local: ipnet::Ipv4Net = "169.254.0.0/16".parse().expect("literal");
            let multicast: ipnet::Ipv4Net = "224.0.0.0/4".parse().expect("literal");
            let loopback: ipnet::Ipv4Net = "127.0.0.0/8".parse().expect("literal");
            if n.prefix_len() == 0 {
                Some("covers the whole IPv4 space")
            } else if overlaps4(n, &link_local) {
                Some("overlaps the link-local range 169.254.0.0/16, which Margay uses for the pod gateway")
            } else if overlaps4(n, &multicast) || n.addr() >= Ipv4Addr::new(240, 0, 0, 0) {
                Some("is multicast or reserved address space")
            } else if overlaps4(n, &loopback) {
                Some("overlaps the loopback range 127.0.0.0/8")
            } else {
                None
            }
        }
        IpNet::V6(n) => {
            let a = n.addr();
            if n.prefix_len() == 0 {
                Some("covers the whole IPv6 space")
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                Some("overlaps the link-local range fe80::/10")
            } else if a.segments()[0] & 0xff00 == 0xff00 {
                Some("is multicast address space (ff00::/8)")
            } else if a.is_loopback() {
                Some("is the loopback address")
            } else {
                None
            }
        }
    };
    if let Some(reason) = bad {
        errs.add("spec.cidr", net, reason);
    }
}

fn overlaps4(a: &ipnet::Ipv4Net, b: &ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Address ranges never handed out, whatever pool they fall in.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "IPReservation",
    plural = "ipreservations",
    derive = "PartialEq",
    doc = "Addresses the allocator must never hand out."
)]
#[serde(rename_all = "camelCase")]
pub struct IPReservationSpec {
    /// CIDRs (or single addresses as /32 and /128) to keep out of allocation.
    #[serde(rename = "reservedCIDRs", default)]
    pub reserved_cidrs: Vec<String>,
}

impl IPReservationSpec {
    /// The parsed ranges; invalid entries (rejected by validation) are skipped.
    pub fn networks(&self) -> Vec<IpNet> {
        self.reserved_cidrs
            .iter()
            .filter_map(|c| {
                c.parse::<IpNet>()
                    .ok()
                    .or_else(|| c.parse::<std::net::IpAddr>().ok().map(IpNet::from))
            })
            .collect()
    }
}

impl IPReservation {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        super::check_name(&self.metadata, errs);
        for (i, c) in self.spec.reserved_cidrs.iter().enumerate() {
            if c.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            parse_masked_cidr(&format!("spec.reservedCIDRs[{i}]"), c, errs);
        }
    }
}

fn default_true() -> bool {
    true
}

/// Cluster-wide allocator settings. There is one, named `default`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "IPAMConfig",
    plural = "ipamconfigs",
    derive = "PartialEq",
    doc = "Cluster-wide IPAM settings; the object is named default."
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMConfigSpec {
    /// Never borrow addresses from another node's block.
    #[serde(default)]
    pub strict_affinity: bool,
    /// Claim new blocks when a node's blocks are full.
    #[serde(default = "default_true")]
    pub auto_allocate_blocks: bool,
    /// The most blocks one node may hold; 0 means no limit.
    #[serde(default)]
    pub max_blocks_per_host: u32,
    /// How long a released address is held back before it is handed out again.
    #[serde(default)]
    pub ip_cooldown_seconds: u32,
}

impl Default for IPAMConfigSpec {
    fn default() -> Self {
        IPAMConfigSpec {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: 0,
            ip_cooldown_seconds: 0,
        }
    }
}

/// The name of the one IPAMConfig object.
pub const IPAM_CONFIG_NAME: &str = "default";

impl IPAMConfig {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        let name = self.metadata.name.as_deref().unwrap_or("");
        if name != IPAM_CONFIG_NAME {
            errs.add(
                "metadata.name",
                name,
                "there is one IPAMConfig and it must be named \"default\"",
            );
        }
        if self.spec.ip_cooldown_seconds > 86_400 {
            errs.add(
                "spec.ipCooldownSeconds",
                self.spec.ip_cooldown_seconds,
                "must be at most 86400 (one day)",
            );
        }
    }
}

/// The most specific pool containing `prefix`.
pub fn pool_of<'a>(pools: &'a [IPPool], prefix: &ipnet::IpNet) -> Option<&'a IPPool> {
    pools
        .iter()
        .filter(|p| p.spec.network().is_some_and(|n| n.contains(prefix)))
        .max_by_key(|p| p.spec.network().map(|n| n.prefix_len()).unwrap_or(0))
}
