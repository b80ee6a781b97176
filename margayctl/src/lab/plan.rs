//! The lab's addresses and names: a pure plan, so what `lab up` builds and what `lab down`
//! removes come from one place.
//!
//! ```text
//!   subnet A 172.30.1.0/24            subnet B 172.30.2.0/24
//!   node1 .11  node2 .12  infra .2 ─┐ ┌─ node3 .13 ...
//!           [bridge mgl-fa]       router      [bridge mgl-fb]
//!                                  .254 │ .254
//!                          outside 172.30.3.100/24 (behind the router)
//! ```
//! Node *i* sits in subnet B when *i* is a multiple of 3, else in subnet A, so the default three
//! nodes put nodes 1–2 in A and node 3 in B.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Every lab namespace starts with this, so `lab down` can find them all even without state.
pub const PREFIX: &str = "mgl-";
/// Where the lab keeps its state, logs and per-node state directories.
pub const STATE_DIR: &str = "/run/margay-lab";
/// The etcd key prefix of the lab's datastore.
pub const ETCD_PREFIX: &str = "/margay/v1/";
/// The etcd client port (inside the infra namespace, so it collides with nothing).
pub const ETCD_PORT: u16 = 2379;
/// The port every pod's TCP echo listens on for the reachability matrix.
pub const ECHO_PORT: u16 = 7777;
/// The nodes' AS and the router's.
pub const NODE_AS: u32 = 64512;
pub const ROUTER_AS: u32 = 65000;
/// The default pool.
pub const POOL_CIDR: &str = "10.244.0.0/16";
/// The IPv6 pool of a dual-stack lab (`lab up --ipv6`): routed without encapsulation, over
/// BGP to the nodes' IPv6 addresses.
pub const POOL6_CIDR: &str = "fd00:10:244::/48";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subnet {
    A,
    B,
}

impl Subnet {
    pub fn octet(self) -> u8 {
        match self {
            Subnet::A => 1,
            Subnet::B => 2,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Subnet::A => "a",
            Subnet::B => "b",
        }
    }
    pub fn bridge_ns(self) -> String {
        format!("{PREFIX}f{}", self.label())
    }
    pub fn router_addr(self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.octet(), 254)
    }
    /// The router's IPv6 address on this subnet (`fd00:30:<octet>::/64`).
    pub fn router_addr6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x30, u16::from(self.octet()), 0, 0, 0, 0, 0xfe)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub index: u8,
    pub name: String,
    pub netns: String,
    pub subnet: Subnet,
    pub addr: Ipv4Addr,
    /// Used in a dual-stack lab only.
    pub addr6: Ipv6Addr,
}

impl NodePlan {
    pub fn addr_cidr(&self) -> String {
        format!("{}/24", self.addr)
    }
    pub fn addr6_cidr(&self) -> String {
        format!("{}/64", self.addr6)
    }
}

pub fn node(index: u8) -> NodePlan {
    let subnet = if index.is_multiple_of(3) {
        Subnet::B
    } else {
        Subnet::A
    };
    NodePlan {
        index,
        name: format!("node{index}"),
        netns: format!("{PREFIX}node{index}"),
        subnet,
        addr: Ipv4Addr::new(172, 30, subnet.octet(), 10 + index),
        addr6: Ipv6Addr::new(
            0xfd00,
            0x30,
            u16::from(subnet.octet()),
            0,
            0,
            0,
            0,
            0x10 + u16::from(index),
        ),
    }
}

pub fn nodes(n: u8) -> Vec<NodePlan> {
    (1..=n).map(node).collect()
}

pub const INFRA_NS: &str = "mgl-infra";
pub const ROUTER_NS: &str = "mgl-router";
pub const OUTSIDE_NS: &str = "mgl-outside";
pub const INFRA_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 2);
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 3, 100);
pub const ROUTER_OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 3, 254);

/// Present while a dual-stack lab is up: the CNI configuration then asks for IPv6 too.
pub fn ipv6_marker() -> std::path::PathBuf {
    std::path::Path::new(STATE_DIR).join("ipv6")
}

pub fn etcd_endpoint() -> String {
    format!("http://{INFRA_ADDR}:{ETCD_PORT}")
}

/// The namespace of pod `i` on `node`.
pub fn pod_netns(node: &str, i: u32) -> String {
    format!("{PREFIX}p-{node}-{i}")
}

/// BIRD's configuration for the router: eBGP with every node, routes learned into the kernel,
/// so the router forwards pod traffic when the pool is not encapsulated. With `ipv6`, the same
/// sessions also carry IPv6 unicast (next hops: the nodes' IPv6 addresses).
pub fn bird_config(nodes: &[NodePlan], ipv6: bool) -> String {
    let (direct6, kernel6, channel6) = if ipv6 {
        (
            " ipv6;",
            "protocol kernel {\n  ipv6 { import none; export where source = RTS_BGP; };\n  merge paths on;\n}\n",
            "  ipv6 { import all; export none; next hop keep; };\n",
        )
    } else {
        ("", "", "")
    };
    let mut out = format!(
        "# Written by margayctl lab up.\n\
router id {ra};\n\
log stderr all;\n\
protocol device {{ }}\n\
protocol direct {{ ipv4;{direct6} interface \"eth*\"; }}\n\
protocol kernel {{\n  ipv4 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n{kernel6}",
        ra = Subnet::A.router_addr()
    );
    for n in nodes {
        out.push_str(&format!(
            "protocol bgp {name} {{\n  local {local} as {ras};\n  neighbor {addr} as {nas};\n  graceful restart on;\n  ipv4 {{ import all; export none; next hop keep; }};\n{channel6}}}\n",
            name = n.name,
            local = n.subnet.router_addr(),
            ras = ROUTER_AS,
            addr = n.addr,
            nas = NODE_AS,
        ));
    }
    out
}

/// margay-bgpd's configuration as the lab's route reflector: iBGP with every node (its
/// clients), next hops left alone, learned routes installed so it also forwards between the
/// subnets.
pub fn bgpd_config(nodes: &[NodePlan], state_dir: &std::path::Path) -> String {
    let mut out = format!(
        "# Written by margayctl lab up.\nbgp:\n  asn: {NODE_AS}\n  router_id: {rid}\n  listen: [\"0.0.0.0:179\"]\n  cluster_id: 224.0.0.1\n  graceful_restart: {{ restart_time: 120 }}\npeers:\n",
        rid = Subnet::A.router_addr()
    );
    for n in nodes {
        out.push_str(&format!(
            "  - address: {addr}\n    asn: {NODE_AS}\n    description: {name}\n    rr_client: true\n    hold_time: 30\n",
            addr = n.addr,
            name = n.name
        ));
    }
    out.push_str(&format!(
        "status:\n  listen: 127.0.0.1:9179\nstate_dir: {}\nkernel:\n  table: 254\n",
        state_dir.display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nodes_put_two_in_subnet_a_and_one_in_b() {
        let n = nodes(3);
        assert_eq!(n[0].addr_cidr(), "172.30.1.11/24");
        assert_eq!(n[1].subnet, Subnet::A);
        assert_eq!(n[2].subnet, Subnet::B);
        assert_eq!(n[2].addr_cidr(), "172.30.2.13/24");
        assert!(n
            .iter()
            .all(|x| x.netns.starts_with(PREFIX) && x.netns.len() <= 15));
        assert!(pod_netns("node3", 12).starts_with(PREFIX));
    }

    #[test]
    fn bird_peers_with_every_node_from_its_subnet() {
        let conf = bird_config(&nodes(3), false);
        assert!(conf.contains("local 172.30.1.254 as 65000;\n  neighbor 172.30.1.11 as 64512;"));
        assert!(conf.contains("local 172.30.2.254 as 65000;\n  neighbor 172.30.2.13 as 64512;"));
        assert_eq!(conf.matches("protocol bgp").count(), 3);
        assert!(!conf.contains("ipv6"));
        let dual = bird_config(&nodes(3), true);
        assert_eq!(dual.matches("  ipv6 { import all;").count(), 3);
        assert!(dual.contains("protocol direct { ipv4; ipv6;"));
        assert_eq!(node(3).addr6_cidr(), "fd00:30:2::13/64");
        assert_eq!(Subnet::A.router_addr6().to_string(), "fd00:30:1::fe");
    }

    #[test]
    fn the_route_reflector_has_every_node_as_a_client() {
        let yaml = bgpd_config(&nodes(3), std::path::Path::new("/run/margay-lab/router"));
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(v["peers"].as_sequence().unwrap().len(), 3);
        assert_eq!(v["peers"][2]["address"].as_str(), Some("172.30.2.13"));
        assert_eq!(v["peers"][0]["rr_client"].as_bool(), Some(true));
    }
}
