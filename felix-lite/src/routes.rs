//! What the kernel should hold, computed from the cluster's state: a pure function, so every
//! encapsulation rule is tested without a kernel (and IPIP, which this machine's kernel lacks,
//! is tested at all).
//!
//! - Each confirmed block affine to this node: `blackhole <block>` (pods get /32 host routes
//!   from the CNI plugin; the blackhole drops traffic to unallocated addresses instead of
//!   sending it back out of the default route).
//! - Each remote prefix, by its pool's encapsulation and whether the next hop shares a subnet
//!   with this node:
//!   - no encapsulation: `via <next hop>` when the next hop is on a local subnet; otherwise no
//!     route at all, so traffic follows the default route to a router that learned the prefix
//!     over BGP;
//!   - IPIP (Always, or CrossSubnet across subnets): `via <node> dev tunl0 onlink`;
//!   - VXLAN (Always, or CrossSubnet across subnets): `via <remote VTEP address> dev
//!     vxlan.margay onlink`, a permanent neighbour entry for that address with the remote
//!     VTEP's MAC, and an FDB entry sending that MAC to the remote node's address.

use ipnet::IpNet;
use margay_api::{EncapMode, IPPool, Node};
use margay_kernel::tunnel::{IPIP_DEVICE, VXLAN_DEVICE};
use margay_kernel::{Device, FdbEntry, Neighbour, Route};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub use margay_peering::RemoteRoute;

/// Everything the route computation reads.
#[derive(Debug, Default)]
pub struct Inputs<'a> {
    /// This node's addresses with their prefix lengths (the subnets it is directly on).
    pub local_subnets: &'a [IpNet],
    pub pools: &'a [IPPool],
    /// Confirmed blocks affine to this node.
    pub local_blocks: &'a [IpNet],
    pub remote: &'a [RemoteRoute],
    /// Every Margay Node, for the remote VTEP addresses and MACs.
    pub nodes: &'a [Node],
    /// Whether this kernel can carry IPIP (`tunl0`); when not, IPIP routes are reported as
    /// skipped instead of failing every pass.
    pub ipip_available: bool,
}

/// What the kernel should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    /// Prefixes that could not be programmed, and why (surfaced in logs and metrics).
    pub skipped: Vec<(IpNet, String)>,
}

/// A remote node's VXLAN endpoint.
struct Vtep {
    tunnel_addr: IpAddr,
    mac: margay_kernel::Mac,
}

fn vteps(nodes: &[Node]) -> BTreeMap<IpAddr, Vtep> {
    nodes
        .iter()
        .filter_map(|n| {
            let addr = n.address(false)?;
            let tunnel_addr = n.spec.ipv4_vxlan_tunnel_addr.as_deref()?.parse().ok()?;
            let mac = margay_kernel::parse_mac(n.spec.vxlan_tunnel_mac_addr.as_deref()?).ok()?;
            Some((addr, Vtep { tunnel_addr, mac }))
        })
        .collect()
}

/// Whether traffic to `next_hop` should be encapsulated under `mode`.
pub fn encapsulate(mode: EncapMode, next_hop: IpAddr, local_subnets: &[IpNet]) -> bool {
    match mode {
        EncapMode::Never => false,
        EncapMode::Always => true,
        EncapMode::CrossSubnet => !on_local_subnet(next_hop, local_subnets),
    }
}

fn on_local_subnet(addr: IpAddr, local_subnets: &[IpNet]) -> bool {
    local_subnets.iter().any(|n| n.contains(&addr))
}

pub fn desired(inputs: &Inputs<'_>) -> Desired {
    let mut out = Desired::default();
    for b in inputs.local_blocks {
        out.routes.push(Route::blackhole(*b));
    }
    let vteps = vteps(inputs.nodes);
    let mut remote: Vec<&RemoteRoute> = inputs.remote.iter().collect();
    remote.sort();
    remote.dedup_by(|a, b| a.prefix == b.prefix);
    for r in remote {
        let prefix = r.prefix.trunc();
        if inputs.local_blocks.contains(&prefix) {
            continue;
        }
        if inputs.local_subnets.iter().any(|s| s.addr() == r.next_hop) {
            // Our own advertisement reflected back.
            continue;
        }
        let direct = on_local_subnet(r.next_hop, inputs.local_subnets);
        let pool = margay_api::pool_of(inputs.pools, &prefix);
        let (ipip, vxlan) = pool
            .map(|p| (p.spec.ipip_mode, p.spec.vxlan_mode))
            .unwrap_or((EncapMode::Never, EncapMode::Never));
        if vxlan != EncapMode::Never && prefix.addr().is_ipv6() {
            // Validation refuses vxlanMode on IPv6 pools; one written before that is reported.
            out.skipped.push((
                prefix,
                "the pool asks for VXLAN, which Margay does not carry for IPv6 yet".into(),
            ));
        } else if vxlan != EncapMode::Never && encapsulate(vxlan, r.next_hop, inputs.local_subnets)
        {
            match vteps.get(&r.next_hop) {
                Some(v) => {
                    out.routes
                        .push(Route::via_dev(prefix, v.tunnel_addr, VXLAN_DEVICE, true));
                    let neighbour = Neighbour {
                        dev: Device::Name(VXLAN_DEVICE.into()),
                        ip: v.tunnel_addr,
                        mac: v.mac,
                    };
                    if !out.neighbours.contains(&neighbour) {
                        out.neighbours.push(neighbour);
                    }
                    let fdb = FdbEntry {
                        dev: Device::Name(VXLAN_DEVICE.into()),
                        mac: v.mac,
                        dst: r.next_hop,
                    };
                    if !out.fdb.contains(&fdb) {
                        out.fdb.push(fdb);
                    }
                }
                None => out.skipped.push((
                    prefix,
                    format!(
                        "pool needs VXLAN but node {} has published no VTEP address and MAC yet",
                        r.next_hop
                    ),
                )),
            }
        } else if ipip != EncapMode::Never
            && prefix.addr().is_ipv4()
            && encapsulate(ipip, r.next_hop, inputs.local_subnets)
        {
            if inputs.ipip_available {
                out.routes
                    .push(Route::via_dev(prefix, r.next_hop, IPIP_DEVICE, true));
            } else {
                out.skipped.push((
                    prefix,
                    "the pool needs IPIP but this node cannot make ipip devices (the agent's log says why)".into(),
                ));
            }
        } else if direct {
            out.routes.push(Route::via(prefix, r.next_hop));
        } else {
            out.skipped.push((
                prefix,
                format!(
                    "next hop {} is not on a local subnet and the pool is not encapsulated: \
                     traffic follows the default route",
                    r.next_hop
                ),
            ));
        }
    }
    out
}

/// Remote routes derived from the datastore instead of BGP: every confirmed block affine to
/// another node, via that node's address. Used when BGP is off (VXLAN-only clusters), as
/// Calico's VXLAN mode does.
pub fn remote_from_affinities(
    me: &str,
    affinities: &[margay_api::BlockAffinity],
    nodes: &[Node],
) -> Vec<RemoteRoute> {
    // A block is reached through its node's address of the block's family.
    let addr_of: BTreeMap<&str, (Option<IpAddr>, Option<IpAddr>)> = nodes
        .iter()
        .filter_map(|n| {
            Some((
                n.metadata.name.as_deref()?,
                (n.address(false), n.address(true)),
            ))
        })
        .collect();
    affinities
        .iter()
        .filter(|a| {
            a.spec.state == margay_api::AffinityState::Confirmed
                && !a.spec.deleted
                && a.spec.node != me
        })
        .filter_map(|a| {
            let prefix: IpNet = a.spec.cidr.parse().ok()?;
            let (v4, v6) = addr_of.get(a.spec.node.as_str())?;
            let next_hop = if prefix.addr().is_ipv4() { *v4 } else { *v6 }?;
            Some(RemoteRoute { prefix, next_hop })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_api::{IPPoolSpec, NodeBGPSpec, NodeSpec};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn pool(cidr: &str, ipip: EncapMode, vxlan: EncapMode) -> IPPool {
        IPPool::new(
            "p",
            IPPoolSpec {
                cidr: cidr.into(),
                ipip_mode: ipip,
                vxlan_mode: vxlan,
                ..Default::default()
            },
        )
    }

    fn node(name: &str, addr: &str, vtep: Option<(&str, &str)>) -> Node {
        Node::new(
            name,
            NodeSpec {
                bgp: Some(NodeBGPSpec {
                    ipv4_address: Some(addr.into()),
                    ..Default::default()
                }),
                ipv4_vxlan_tunnel_addr: vtep.map(|v| v.0.into()),
                vxlan_tunnel_mac_addr: vtep.map(|v| v.1.into()),
                ..Default::default()
            },
        )
    }

    /// Routes as `ip route` prints them in the main table.
    fn show(r: &Route) -> String {
        r.to_string().trim_end_matches(" table 254").to_owned()
    }

    const LOCAL: &str = "192.168.1.10/24";

    fn remote(prefix: &str, nh: &str) -> RemoteRoute {
        RemoteRoute {
            prefix: net(prefix),
            next_hop: nh.parse().unwrap(),
        }
    }

    fn compute(pools: &[IPPool], remote: &[RemoteRoute], nodes: &[Node]) -> Vec<String> {
        let subnets = [net(LOCAL)];
        let blocks = [net("10.244.1.0/26")];
        desired(&Inputs {
            local_subnets: &subnets,
            pools,
            local_blocks: &blocks,
            remote,
            nodes,
            ipip_available: true,
        })
        .routes
        .iter()
        .map(show)
        .collect()
    }

    #[test]
    fn local_blocks_are_blackholed() {
        let r = compute(
            &[pool("10.244.0.0/16", EncapMode::Never, EncapMode::Never)],
            &[],
            &[],
        );
        assert_eq!(r, vec!["blackhole 10.244.1.0/26"]);
    }

    #[test]
    fn no_encapsulation_routes_directly_or_leaves_it_to_the_router() {
        let pools = [pool("10.244.0.0/16", EncapMode::Never, EncapMode::Never)];
        let r = compute(
            &pools,
            &[
                remote("10.244.2.0/26", "192.168.1.11"),
                remote("10.244.3.0/26", "192.168.2.12"),
            ],
            &[],
        );
        assert_eq!(
            r,
            vec!["blackhole 10.244.1.0/26", "10.244.2.0/26 via 192.168.1.11"]
        );
    }

    #[test]
    fn ipip_always_and_cross_subnet() {
        let always = [pool("10.244.0.0/16", EncapMode::Always, EncapMode::Never)];
        let routes = [
            remote("10.244.2.0/26", "192.168.1.11"),
            remote("10.244.3.0/26", "192.168.2.12"),
        ];
        assert_eq!(
            compute(&always, &routes, &[])[1..],
            [
                "10.244.2.0/26 via 192.168.1.11 dev tunl0 onlink",
                "10.244.3.0/26 via 192.168.2.12 dev tunl0 onlink"
            ]
        );
        let cross = [pool(
            "10.244.0.0/16",
            EncapMode::CrossSubnet,
            EncapMode::Never,
        )];
        assert_eq!(
            compute(&cross, &routes, &[])[1..],
            [
                "10.244.2.0/26 via 192.168.1.11",
                "10.244.3.0/26 via 192.168.2.12 dev tunl0 onlink"
            ]
        );
    }

    #[test]
    fn ipip_routes_are_reported_not_written_without_the_module() {
        let pools = [pool("10.244.0.0/16", EncapMode::Always, EncapMode::Never)];
        let subnets = [net(LOCAL)];
        let d = desired(&Inputs {
            local_subnets: &subnets,
            pools: &pools,
            local_blocks: &[],
            remote: &[remote("10.244.2.0/26", "192.168.1.11")],
            nodes: &[],
            ipip_available: false,
        });
        assert!(d.routes.is_empty());
        assert!(
            d.skipped[0].1.contains("cannot make ipip devices"),
            "{:?}",
            d.skipped
        );
    }

    #[test]
    fn vxlan_cross_subnet_programs_route_neighbour_and_fdb() {
        let pools = [pool(
            "10.244.0.0/16",
            EncapMode::Never,
            EncapMode::CrossSubnet,
        )];
        let nodes = [
            node(
                "n2",
                "192.168.1.11/24",
                Some(("10.244.2.0", "66:00:00:00:00:02")),
            ),
            node(
                "n3",
                "192.168.2.12/24",
                Some(("10.244.3.0", "66:00:00:00:00:03")),
            ),
        ];
        let remote = [
            remote("10.244.2.0/26", "192.168.1.11"),
            remote("10.244.3.0/26", "192.168.2.12"),
        ];
        let subnets = [net(LOCAL)];
        let blocks = [net("10.244.1.0/26")];
        let d = desired(&Inputs {
            local_subnets: &subnets,
            pools: &pools,
            local_blocks: &blocks,
            remote: &remote,
            nodes: &nodes,
            ipip_available: true,
        });
        let routes: Vec<String> = d.routes.iter().map(show).collect();
        assert_eq!(
            routes[1..],
            [
                "10.244.2.0/26 via 192.168.1.11",
                "10.244.3.0/26 via 10.244.3.0 dev vxlan.margay onlink"
            ]
        );
        assert_eq!(d.neighbours.len(), 1);
        assert_eq!(
            d.neighbours[0].to_string(),
            "10.244.3.0 lladdr 66:00:00:00:00:03 dev vxlan.margay"
        );
        assert_eq!(
            d.fdb[0].to_string(),
            "66:00:00:00:00:03 dev vxlan.margay dst 192.168.2.12"
        );
    }

    #[test]
    fn vxlan_waits_for_the_remote_vtep() {
        let pools = [pool("10.244.0.0/16", EncapMode::Never, EncapMode::Always)];
        let subnets = [net(LOCAL)];
        let d = desired(&Inputs {
            local_subnets: &subnets,
            pools: &pools,
            local_blocks: &[],
            remote: &[remote("10.244.2.0/26", "192.168.1.11")],
            nodes: &[node("n2", "192.168.1.11/24", None)],
            ipip_available: true,
        });
        assert!(d.routes.is_empty());
        assert_eq!(d.skipped.len(), 1);
    }

    #[test]
    fn ipip_never_applies_to_ipv6_and_reflected_own_routes_are_ignored() {
        let pools = [pool("fd00:10::/48", EncapMode::Always, EncapMode::Never)];
        let subnets = [net(LOCAL), net("fd00:1::10/64")];
        let d = desired(&Inputs {
            local_subnets: &subnets,
            pools: &pools,
            local_blocks: &[],
            remote: &[
                remote("fd00:10::40/122", "fd00:1::11"),
                remote("10.9.0.0/24", "192.168.1.10"),
            ],
            nodes: &[],
            ipip_available: true,
        });
        let routes: Vec<String> = d.routes.iter().map(show).collect();
        assert_eq!(routes, vec!["fd00:10::40/122 via fd00:1::11"]);
    }

    #[test]
    fn datastore_routes_come_from_other_nodes_confirmed_affinities() {
        use margay_api::{AffinityState, BlockAffinity, BlockAffinitySpec};
        let aff = |node: &str, cidr: &str, state| {
            BlockAffinity::new(
                "x",
                BlockAffinitySpec {
                    state,
                    node: node.into(),
                    cidr: cidr.into(),
                    deleted: false,
                },
            )
        };
        let affs = [
            aff("n1", "10.244.1.0/26", AffinityState::Confirmed),
            aff("n2", "10.244.2.0/26", AffinityState::Confirmed),
            aff("n2", "10.244.5.0/26", AffinityState::Pending),
        ];
        let nodes = [node("n2", "192.168.1.11/24", None)];
        let r = remote_from_affinities("n1", &affs, &nodes);
        assert_eq!(r, vec![remote("10.244.2.0/26", "192.168.1.11")]);
    }

    /// Dual stack: an IPv6 block goes via its node's IPv6 address (never an IPv4 one), directly
    /// on a shared subnet; a node without one gets no IPv6 route; a VXLAN IPv6 pool (refused by
    /// validation now) is reported, not programmed.
    #[test]
    fn ipv6_blocks_go_via_the_nodes_ipv6_address() {
        use margay_api::{AffinityState, BlockAffinity, BlockAffinitySpec};
        let aff = |node: &str, cidr: &str| {
            BlockAffinity::new(
                "x",
                BlockAffinitySpec {
                    state: AffinityState::Confirmed,
                    node: node.into(),
                    cidr: cidr.into(),
                    deleted: false,
                },
            )
        };
        let mut n2 = node("n2", "192.168.1.11/24", None);
        n2.spec.bgp.as_mut().unwrap().ipv6_address = Some("fd00:1::11/64".into());
        let n3 = node("n3", "192.168.1.12/24", None);
        let affs = [
            aff("n2", "10.244.2.0/26"),
            aff("n2", "fd00:244::40/122"),
            aff("n3", "fd00:244::80/122"),
        ];
        let r = remote_from_affinities("n1", &affs, &[n2, n3]);
        assert_eq!(
            r,
            vec![
                remote("10.244.2.0/26", "192.168.1.11"),
                remote("fd00:244::40/122", "fd00:1::11"),
            ]
        );
        let local = [net(LOCAL), net("fd00:1::10/64")];
        let pools = [pool("fd00:244::/48", EncapMode::Never, EncapMode::Never)];
        let d = desired(&Inputs {
            local_subnets: &local,
            pools: &pools,
            remote: &r[1..],
            ..Default::default()
        });
        let routes: Vec<String> = d.routes.iter().map(show).collect();
        assert_eq!(routes, vec!["fd00:244::40/122 via fd00:1::11"]);
        let vxlan = [pool("fd00:244::/48", EncapMode::Never, EncapMode::Always)];
        let d = desired(&Inputs {
            local_subnets: &local,
            pools: &vxlan,
            remote: &r[1..],
            ..Default::default()
        });
        assert!(d.routes.is_empty());
        assert!(d.skipped[0].1.contains("VXLAN"), "{:?}", d.skipped);
    }
}
