//! Node (Margay's per-node data) and WorkloadEndpoint (a pod's attachment, written by the CNI
//! plugin in etcd mode).
// kube's derive takes one `printcolumn(...)` attribute per column; clippy reads the
// repeated `type_ = ...` keys as duplicates.
#![allow(clippy::duplicated_attributes)]

use super::bgp::check_interface_address;
use super::common::*;
use crate::validation::ValidationErrors;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// A node's BGP identity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBGPSpec {
    /// The node's IPv4 address with prefix length, e.g. 192.168.1.10/24.
    #[serde(
        rename = "ipv4Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<String>,
    /// The node's IPv6 address with prefix length.
    #[serde(
        rename = "ipv6Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
    /// This node's AS; unset means the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Set on route reflectors: the cluster ID (dotted quad) they reflect with.
    #[serde(
        rename = "routeReflectorClusterID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
    /// The address of this node's tunl0 device.
    #[serde(
        rename = "ipv4IPIPTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_ipip_tunnel_addr: Option<String>,
}

/// Margay's data about one node: BGP identity, tunnel addresses and the VXLAN MAC.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "Node",
    plural = "nodes",
    status = "NodeStatus",
    derive = "PartialEq",
    doc = "Margay's data about one node: BGP identity, tunnel addresses, VXLAN MAC.",
    printcolumn(name = "IPv4", type_ = "string", json_path = ".spec.bgp.ipv4Address"),
    printcolumn(name = "AS", type_ = "integer", json_path = ".spec.bgp.asNumber"),
    printcolumn(
        name = "VXLAN",
        type_ = "string",
        json_path = ".spec.ipv4VXLANTunnelAddr"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBGPSpec>,
    /// The address of this node's vxlan.margay device.
    #[serde(
        rename = "ipv4VXLANTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_vxlan_tunnel_addr: Option<String>,
    /// The MAC of this node's vxlan.margay device.
    #[serde(
        rename = "vxlanTunnelMACAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr: Option<String>,
    /// The address of this node's IPv6 VXLAN device. Refused by validation: Margay does not
    /// carry IPv6 in VXLAN yet.
    #[serde(
        rename = "ipv6VXLANTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_vxlan_tunnel_addr: Option<String>,
    /// The MAC of this node's IPv6 VXLAN device. Refused by validation, as above.
    #[serde(
        rename = "vxlanTunnelMACAddrV6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr_v6: Option<String>,
}

/// The state of one BGP session, as the node agent reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerState {
    #[serde(rename = "peerIP")]
    pub peer_ip: String,
    /// `Established`, `Active`, `Idle`, ...
    pub state: String,
    /// RFC 3339 time of the last state change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default)]
    pub prefixes_received: u64,
    #[serde(default)]
    pub prefixes_advertised: u64,
}

/// What the node agent reports about its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub bgp_peers: Vec<BGPPeerState>,
}

/// Whether `s` is a MAC address written as six colon-separated hex octets.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Node {
    /// The node's IPv4 address (or, with `v6`, its IPv6 address) as its agent published it in
    /// `spec.bgp`, without the prefix length; `None` when unset or unparsable.
    pub fn address(&self, v6: bool) -> Option<IpAddr> {
        let bgp = self.spec.bgp.as_ref()?;
        let a = if v6 {
            bgp.ipv6_address.as_deref()?
        } else {
            bgp.ipv4_address.as_deref()?
        };
        a.parse::<ipnet::IpNet>().ok().map(|n| n.addr())
    }

    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        super::check_name(&self.metadata, errs);
        let s = &self.spec;
        if let Some(b) = &s.bgp {
            if let Some(a) = &b.ipv4_address {
                check_interface_address("spec.bgp.ipv4Address", a, false, errs);
            }
            if let Some(a) = &b.ipv6_address {
                check_interface_address("spec.bgp.ipv6Address", a, true, errs);
            }
            if let Some(asn) = b.as_number {
                check_as_number("spec.bgp.asNumber", asn, errs);
            }
            if let Some(id) = &b.route_reflector_cluster_id {
                if id.parse::<Ipv4Addr>().is_err() {
                    errs.add(
                        "spec.bgp.routeReflectorClusterID",
                        id,
                        "must be a cluster ID in dotted-quad form, e.g. 224.0.0.1",
                    );
                }
            }
            check_ip(
                "spec.bgp.ipv4IPIPTunnelAddr",
                &b.ipv4_ipip_tunnel_addr,
                false,
                errs,
            );
        }
        check_ip(
            "spec.ipv4VXLANTunnelAddr",
            &s.ipv4_vxlan_tunnel_addr,
            false,
            errs,
        );
        // Margay does not carry IPv6 in VXLAN (IPv6 pools are routed without encapsulation):
        // nothing would read these, so they are refused rather than ignored.
        for (path, v) in [
            ("spec.ipv6VXLANTunnelAddr", &s.ipv6_vxlan_tunnel_addr),
            ("spec.vxlanTunnelMACAddrV6", &s.vxlan_tunnel_mac_addr_v6),
        ] {
            if let Some(v) = v {
                errs.add(
                    path,
                    v,
                    "Margay does not carry IPv6 in VXLAN yet; leave it unset",
                );
            }
        }
        if let Some(m) = &s.vxlan_tunnel_mac_addr {
            if !is_mac(m) {
                errs.add(
                    "spec.vxlanTunnelMACAddr",
                    m,
                    "must be a MAC address like ee:ee:ee:00:11:22",
                );
            }
        }
    }
}

fn check_ip(path: &str, v: &Option<String>, v6: bool, errs: &mut ValidationErrors) {
    if let Some(v) = v {
        match v.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => {}
            _ => errs.add(
                path,
                v,
                if v6 {
                    "must be an IPv6 address"
                } else {
                    "must be an IPv4 address"
                },
            ),
        }
    }
}

/// A pod's network attachment on a node, recorded by the CNI plugin in etcd mode so that the
/// controller's garbage collection knows which addresses are live.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "margay.io",
    version = "v1",
    kind = "WorkloadEndpoint",
    plural = "workloadendpoints",
    derive = "PartialEq",
    doc = "A pod's network attachment (written by the CNI plugin in etcd mode).",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.pod"),
    printcolumn(
        name = "Interface",
        type_ = "string",
        json_path = ".spec.interfaceName"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpointSpec {
    pub node: String,
    /// The pod's namespace.
    pub namespace: String,
    pub pod: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface inside the pod, e.g. eth0.
    pub endpoint: String,
    /// The host side of the veth, e.g. cali1234567890a.
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The pod's addresses as /32 and /128 CIDRs.
    #[serde(default)]
    pub ip_networks: Vec<String>,
    /// The IPAM handle holding the addresses.
    #[serde(rename = "handleID")]
    pub handle_id: String,
}

impl WorkloadEndpoint {
    pub(crate) fn check(&self, errs: &mut ValidationErrors) {
        super::check_name(&self.metadata, errs);
        let s = &self.spec;
        for (path, v) in [
            ("spec.node", &s.node),
            ("spec.namespace", &s.namespace),
            ("spec.pod", &s.pod),
            ("spec.containerID", &s.container_id),
            ("spec.endpoint", &s.endpoint),
            ("spec.interfaceName", &s.interface_name),
            ("spec.handleID", &s.handle_id),
        ] {
            if v.is_empty() {
                errs.add(path, "", "must not be empty");
            }
        }
        for (i, n) in s.ip_networks.iter().enumerate() {
            if let Some(net) = parse_masked_cidr(&format!("spec.ipNetworks[{i}]"), n, errs) {
                if net.prefix_len() != net.max_prefix_len() {
                    errs.add(
                        format!("spec.ipNetworks[{i}]"),
                        n,
                        "a pod address must be a /32 or /128",
                    );
                }
            }
        }
        if let Some(m) = &s.mac {
            if !is_mac(m) {
                errs.add("spec.mac", m, "must be a MAC address");
            }
        }
    }
}
