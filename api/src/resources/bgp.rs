//! BGPConfiguration and BGPPeer: how nodes peer with each other and with routers.
// kube's derive takes one `printcolumn(...)` attribute per column; clippy reads the
// repeated `type_ = ...` keys as duplicates.
#![allow(clippy::duplicated_attributes)]

use super::common::*;
use crate::validation::ValidationErrors;
use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// The AS number nodes use when neither their Node nor BGPConfiguration sets one.
pub const DEFAULT_AS_NUMBER: u32 = 64512;
/// The standard BGP port.
pub const DEFAULT_BGP_PORT: u16 = 179;
/// The name of the cluster-wide BGPConfiguration; per-node ones are named `node.<node>`.
pub const BGP_CONFIGURATION_NAME: &str = "default";

/// A named community value that prefix advertisements can refer to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Community {
    pub name: String,
    /// `aa:nn` (RFC 1997) or `aa:nn:mm` (large community, RFC 8092).
    pub value: String,
}

/// Communities to attach to the advertisement of a CIDR (or of the blocks within it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PrefixAdvertisement {
    pub cidr: String,
    /// Names from `communities`, or literal `aa:nn` / `aa:nn:mm` values.
    #[serde(default)]
    pub communities: Vec<String>,
}

/// Log level of the BGP speaker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LogSeverity {
    Debug,
    #[default]
    Info,
    Warning,
    Error,
    Fatal,
}

fn default_mesh() -> Option<bool> {
    Some(true)
}

/// BGP settings for the whole cluster (`default`) or for one node (`node.<name>`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "BGPConfiguration",
    plural = "bgpconfigurations",
    derive = "PartialEq",
    doc = "BGP settings for the cluster (default) or one node (node.<name>).",
    printcolumn(name = "AS", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(
        name = "Mesh",
        type_ = "boolean",
        json_path = ".spec.nodeToNodeMeshEnabled"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BGPConfigurationSpec {
    /// The default AS of nodes that do not set their own (default 64512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Peer every node with every other node (default true).
    #[serde(default = "default_mesh", skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    /// TCP port the speakers listen on (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Named community values.
    #[serde(default)]
    pub communities: Vec<Community>,
    /// Communities to attach to advertised prefixes.
    #[serde(default)]
    pub prefix_advertisements: Vec<PrefixAdvertisement>,
    /// Log level of the speaker (default Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<LogSeverity>,
    /// Password of the node-to-node mesh sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<BGPPassword>,
    /// Graceful-restart time of the node-to-node mesh sessions (default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<String>,
}

impl Default for BGPConfigurationSpec {
    fn default() -> Self {
        BGPConfigurationSpec {
            as_number: None,
            node_to_node_mesh_enabled: default_mesh(),
            listen_port: None,
            communities: Vec::new(),
            prefix_advertisements: Vec::new(),
            log_severity_screen: None,
            node_mesh_password: None,
            node_mesh_max_restart_time: None,
        }
    }
}

impl BGPConfigurationSpec {
    pub fn effective_as_number(&self) -> u32 {
        self.as_number.unwrap_or(DEFAULT_AS_NUMBER)
    }
    pub fn mesh_enabled(&self) -> bool {
        self.node_to_node_mesh_enabled.unwrap_or(true)
    }
    pub fn effective_listen_port(&self) -> u16 {
        self.listen_port.unwrap_or(DEFAULT_BGP_PORT)
    }
}

/// Whether `v` is a community value: `aa:nn` with 16-bit parts or `aa:nn:mm` with 32-bit parts.
pub fn is_community_value(v: &str) -> bool {
    let parts: Vec<&str> = v.split(':').collect();
    match parts.len() {
        2 => parts.iter().all(|p| p.parse::<u16>().is_ok()),
        3 => parts.iter().all(|p| p.parse::<u32>().is_ok()),
        _ => false,
    }
}

impl BGPConfiguration {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        let name = self.metadata.name.as_deref().unwrap_or("");
        let per_node = name
            .strip_prefix("node.")
            .is_some_and(crate::names::is_dns_subdomain);
        if name != BGP_CONFIGURATION_NAME && !per_node {
            errs.add(
                "metadata.name",
                name,
                "must be \"default\" (cluster-wide) or \"node.<node name>\" (one node)",
            );
        }
        let s = &self.spec;
        if let Some(asn) = s.as_number {
            check_as_number("spec.asNumber", asn, errs);
        }
        if s.listen_port == Some(0) {
            errs.add("spec.listenPort", 0, "must be a TCP port from 1 to 65535");
        }
        for (i, c) in s.communities.iter().enumerate() {
            if c.name.is_empty() {
                errs.add(
                    format!("spec.communities[{i}].name"),
                    "",
                    "must not be empty",
                );
            }
            if !is_community_value(&c.value) {
                errs.add(
                    format!("spec.communities[{i}].value"),
                    &c.value,
                    "must be aa:nn (two 16-bit numbers) or aa:nn:mm (three 32-bit numbers)",
                );
            }
            if s.communities[..i].iter().any(|o| o.name == c.name) {
                errs.add(
                    format!("spec.communities[{i}].name"),
                    &c.name,
                    "is defined twice",
                );
            }
        }
        for (i, p) in s.prefix_advertisements.iter().enumerate() {
            parse_masked_cidr(
                &format!("spec.prefixAdvertisements[{i}].cidr"),
                &p.cidr,
                errs,
            );
            for (j, c) in p.communities.iter().enumerate() {
                if !is_community_value(c) && !s.communities.iter().any(|d| &d.name == c) {
                    errs.add(
                        format!("spec.prefixAdvertisements[{i}].communities[{j}]"),
                        c,
                        "is neither a community value nor the name of one in spec.communities",
                    );
                }
            }
        }
        if let Some(p) = &s.node_mesh_password {
            p.check("spec.nodeMeshPassword", errs);
        }
        check_duration(
            "spec.nodeMeshMaxRestartTime",
            &s.node_mesh_max_restart_time,
            errs,
        );
    }
}

/// How the next hop of routes sent to a peer is chosen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NextHopMode {
    /// Self for eBGP, unchanged for iBGP (and never changed when reflecting).
    #[default]
    Auto,
    /// Always this node's address.
    #[serde(rename = "Self")]
    SelfAddress,
    /// Always the next hop as learned.
    Keep,
}

/// Which local address sessions are sourced from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SourceAddress {
    /// The node's BGP address.
    #[default]
    UseNodeIP,
    /// Whatever the kernel chooses.
    None,
}

/// A BGP peering: between selected nodes and a router, or between selected nodes (for route
/// reflectors).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "BGPPeer",
    plural = "bgppeers",
    derive = "PartialEq",
    doc = "A BGP peering of selected nodes with a router or with other nodes.",
    printcolumn(name = "PeerIP", type_ = "string", json_path = ".spec.peerIP"),
    printcolumn(name = "AS", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(
        name = "PeerSelector",
        type_ = "string",
        json_path = ".spec.peerSelector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The one node that peers (empty: see nodeSelector; both empty: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The nodes that peer, as a selector expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// The router's address, optionally with a port: `10.0.0.1`, `10.0.0.1:1179`,
    /// `[fd00::1]:1179`.
    #[serde(rename = "peerIP", default, skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    /// Instead of peerIP: peer with the Margay nodes this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    /// The peer's AS; required with peerIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// TCP-MD5 password from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BGPPassword>,
    /// Keepalive interval, e.g. `30s` (the hold time is three times it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    /// Graceful-restart time advertised to this peer (default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<String>,
    /// How the next hop of routes sent to this peer is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<NextHopMode>,
    /// Which local address the session is sourced from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<SourceAddress>,
    /// Enables TTL security (RFC 5082): accept packets from at most this many hops away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
    /// Tear the session down (Cease/1) when the peer sends more prefixes than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<u32>,
}

/// Parses `peerIP`: an address, optionally with a port.
pub fn parse_peer_ip(v: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some((ip, None));
    }
    v.parse::<SocketAddr>()
        .ok()
        .filter(|s| s.port() != 0)
        .map(|s| (s.ip(), Some(s.port())))
}

impl BGPPeer {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        super::check_name(&self.metadata, errs);
        let s = &self.spec;
        if s.node.is_some() && s.node_selector.is_some() {
            errs.add(
                "spec.nodeSelector",
                s.node_selector.as_deref().unwrap_or(""),
                "cannot be set together with spec.node; choose one",
            );
        }
        if let Some(n) = &s.node {
            if !crate::names::is_dns_subdomain(n) {
                errs.add("spec.node", n, "must be a node name");
            }
        }
        if let Some(sel) = &s.node_selector {
            check_selector("spec.nodeSelector", sel, errs);
        }
        match (&s.peer_ip, &s.peer_selector) {
            (Some(_), Some(sel)) => errs.add(
                "spec.peerSelector",
                sel,
                "cannot be set together with spec.peerIP; choose one",
            ),
            (None, None) => errs.add(
                "spec.peerIP",
                "",
                "one of spec.peerIP or spec.peerSelector is required",
            ),
            (Some(ip), None) => {
                if parse_peer_ip(ip).is_none() {
                    errs.add(
                        "spec.peerIP",
                        ip,
                        "must be an IP address, optionally with a port (10.0.0.1:179, [fd00::1]:179)",
                    );
                }
                if s.as_number.is_none() {
                    errs.add("spec.asNumber", "", "is required with spec.peerIP");
                }
            }
            (None, Some(sel)) => check_selector("spec.peerSelector", sel, errs),
        }
        if let Some(asn) = s.as_number {
            check_as_number("spec.asNumber", asn, errs);
        }
        if let Some(p) = &s.password {
            p.check("spec.password", errs);
        }
        check_duration("spec.keepaliveTime", &s.keepalive_time, errs);
        if let Some(k) = s.keepalive_time.as_deref().and_then(parse_duration) {
            // Hold time is 3 x keepalive; RFC 4271 forbids hold times of 1 and 2 seconds and
            // caps them at 65535.
            if !k.is_zero() && (k.as_secs() < 1 || k.as_secs() > 21_845) {
                errs.add(
                    "spec.keepaliveTime",
                    s.keepalive_time.as_deref().unwrap_or(""),
                    "must be 0 (no keepalives) or between 1s and 21845s",
                );
            }
        }
        check_duration("spec.maxRestartTime", &s.max_restart_time, errs);
        if let Some(t) = s.max_restart_time.as_deref().and_then(parse_duration) {
            if t.as_secs() > 4095 {
                errs.add(
                    "spec.maxRestartTime",
                    s.max_restart_time.as_deref().unwrap_or(""),
                    "must be at most 4095s, the largest restart time BGP can carry (RFC 4724)",
                );
            }
        }
        if s.ttl_security == Some(0) {
            errs.add("spec.ttlSecurity", 0, "must be between 1 and 255 hops");
        }
    }
}

/// Checks an interface address in CIDR form (host bits allowed), of the given family.
pub(crate) fn check_interface_address(
    path: &str,
    value: &str,
    v6: bool,
    errs: &mut ValidationErrors,
) {
    match value.parse::<IpNet>() {
        Ok(n) if n.addr().is_ipv6() == v6 => {}
        Ok(_) => errs.add(
            path,
            value,
            if v6 {
                "must be an IPv6 address"
            } else {
                "must be an IPv4 address"
            },
        ),
        Err(_) => errs.add(
            path,
            value,
            "must be an address with its prefix length, e.g. 192.168.1.10/24",
        ),
    }
}
