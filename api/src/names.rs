//! Object names derived from what the object is, as Calico derives them, so that two different
//! objects never share a name and an object's name never changes.
//!
//! - A block is named from its CIDR: `10.0.1.64/26` → `10-0-1-64-26`. IPv6 CIDRs are written
//!   with all eight groups zero-padded to four hex digits (`fd00::/122` →
//!   `fd00-0000-0000-0000-0000-0000-0000-0000-122`) so that the form is fixed-width and can
//!   never be read as an IPv4 name or as another IPv6 CIDR.
//! - An affinity is `<node>-<block name>`. Because the CIDR part has a fixed number of
//!   components, the split between node and CIDR is unambiguous.
//! - Any name that would exceed Kubernetes' 253 characters keeps a readable prefix and ends in a
//!   hash of the full name, so it stays unique.

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// Kubernetes' limit for object names (DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// How much of a readable name a hashed name keeps: the limit less a dash and 16 hex digits.
const HASHED_PREFIX_ROOM: usize = MAX_NAME_LEN - 16 - 1;

/// The name of the IPAMBlock for `cidr`.
pub fn block_name(cidr: &IpNet) -> String {
    let cidr = cidr.trunc();
    match cidr.addr() {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}-{}-{}-{}-{}", o[0], o[1], o[2], o[3], cidr.prefix_len())
        }
        IpAddr::V6(a) => {
            let groups: Vec<String> = a.segments().iter().map(|s| format!("{s:04x}")).collect();
            format!("{}-{}", groups.join("-"), cidr.prefix_len())
        }
    }
}

/// The name of the BlockAffinity of `node` for the block `cidr`.
pub fn affinity_name(node: &str, cidr: &IpNet) -> String {
    bounded(&format!(
        "{}-{}",
        node.to_ascii_lowercase(),
        block_name(cidr)
    ))
}

/// The CIDR a block name stands for: the inverse of [`block_name`]. `None` for a name that
/// `block_name` would not have made.
pub fn parse_block_name(name: &str) -> Option<IpNet> {
    let parts: Vec<&str> = name.split('-').collect();
    let (len, addr): (u8, IpAddr) = match parts.as_slice() {
        [a, b, c, d, len] => {
            let o: Vec<u8> = [a, b, c, d]
                .iter()
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            (len.parse().ok()?, IpAddr::from([o[0], o[1], o[2], o[3]]))
        }
        [groups @ .., len] if groups.len() == 8 => {
            let mut seg = [0u16; 8];
            for (s, g) in seg.iter_mut().zip(groups) {
                if g.len() != 4 {
                    return None;
                }
                *s = u16::from_str_radix(g, 16).ok()?;
            }
            (len.parse().ok()?, IpAddr::from(seg))
        }
        _ => return None,
    };
    let net = IpNet::new(addr, len).ok()?;
    (block_name(&net) == name).then_some(net)
}

/// What every [`affinity_name`] of `node` starts with, to list one node's affinities by name
/// prefix. Other nodes' affinities can share it (node `a` and node `a-b`), so a caller still
/// checks each affinity's node.
pub fn affinity_prefix(node: &str) -> String {
    let full = format!("{}-", node.to_ascii_lowercase());
    if full.len() <= HASHED_PREFIX_ROOM {
        full
    } else {
        let prefix: String = full.chars().take(HASHED_PREFIX_ROOM).collect();
        prefix
            .trim_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_owned()
    }
}

/// The name of the IPAMHandle object for a handle ID such as `k8s-pod-network.<containerID>`.
/// IDs that are already valid names are used as they are.
pub fn handle_name(handle_id: &str) -> String {
    if is_dns_subdomain(handle_id) {
        return handle_id.to_owned();
    }
    let cleaned: String = handle_id
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    with_hash(&cleaned, handle_id)
}

/// The name of the WorkloadEndpoint of a pod's interface. Dashes inside each part are doubled
/// (as Calico does) so that the parts can be told apart again.
pub fn workload_name(node: &str, namespace: &str, pod: &str, interface: &str) -> String {
    let esc = |s: &str| s.to_ascii_lowercase().replace('-', "--");
    bounded(&format!(
        "{}-k8s-{}-{}-{}",
        esc(node),
        esc(namespace),
        esc(pod),
        esc(interface)
    ))
}

/// Whether `s` is a valid Kubernetes object name (RFC 1123 DNS subdomain).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Returns `name` if it fits, else a prefix of it plus a hash of the whole.
fn bounded(name: &str) -> String {
    if name.len() <= MAX_NAME_LEN {
        name.to_owned()
    } else {
        with_hash(name, name)
    }
}

/// `<prefix of readable>-<16 hex digits of sha256(identity)>`, within the name limit and
/// starting and ending with an alphanumeric character.
fn with_hash(readable: &str, identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    let hash = hex::encode(&digest[..8]);
    let room = HASHED_PREFIX_ROOM;
    let prefix: String = readable.chars().take(room).collect();
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn block_names_follow_calico_for_ipv4_and_are_fixed_width_for_ipv6() {
        assert_eq!(block_name(&net("10.0.1.64/26")), "10-0-1-64-26");
        assert_eq!(block_name(&net("192.168.0.0/32")), "192-168-0-0-32");
        assert_eq!(
            block_name(&net("fd00::40/122")),
            "fd00-0000-0000-0000-0000-0000-0000-0040-122"
        );
    }

    #[test]
    fn affinity_names_never_collide_across_nodes_and_families() {
        // Node names chosen to look like parts of CIDR names.
        let nodes = [
            "a",
            "a-1",
            "a-1-2",
            "10-0-0",
            "fd00-0000",
            "n",
            "n.example.com",
        ];
        let cidrs = [
            "1.2.3.0/24",
            "2.3.0.0/24",
            "10.0.0.0/26",
            "0.0.0.0/26",
            "fd00::/122",
            "0:0:0:0:0:0:a00:0/122",
        ];
        let mut seen = HashSet::new();
        for n in nodes {
            for c in cidrs {
                let name = affinity_name(n, &net(c));
                assert!(is_dns_subdomain(&name), "{name}");
                assert!(seen.insert(name.clone()), "collision on {name}");
            }
        }
    }

    #[test]
    fn long_names_are_bounded_unique_and_valid() {
        let long_a = format!("{}a", "x".repeat(250));
        let long_b = format!("{}b", "x".repeat(250));
        let a = affinity_name(&long_a, &net("10.0.0.0/26"));
        let b = affinity_name(&long_b, &net("10.0.0.0/26"));
        assert!(a.len() <= MAX_NAME_LEN && b.len() <= MAX_NAME_LEN);
        assert_ne!(a, b);
        assert!(is_dns_subdomain(&a), "{a}");
        // Stable: the same inputs always give the same name.
        assert_eq!(a, affinity_name(&long_a, &net("10.0.0.0/26")));
    }

    #[test]
    fn handle_names_keep_valid_ids_and_hash_the_rest() {
        assert_eq!(
            handle_name("k8s-pod-network.0123abcd"),
            "k8s-pod-network.0123abcd"
        );
        let odd = handle_name("k8s-pod-network.ABC_def");
        assert!(is_dns_subdomain(&odd), "{odd}");
        assert_ne!(odd, handle_name("k8s-pod-network.abc_def"));
    }

    #[test]
    fn workload_names_escape_dashes() {
        assert_ne!(
            workload_name("n", "a-b", "c", "eth0"),
            workload_name("n", "a", "b-c", "eth0")
        );
        assert_eq!(
            workload_name("node-1", "default", "web", "eth0"),
            "node--1-k8s-default-web-eth0"
        );
    }

    #[test]
    fn block_names_parse_back_to_their_cidr_and_nothing_else_parses() {
        for c in [
            "10.0.1.64/26",
            "0.0.0.0/32",
            "255.255.255.252/30",
            "fd00::40/122",
            "fd00:1:2:3:4:5:6:0/128",
        ] {
            assert_eq!(parse_block_name(&block_name(&net(c))), Some(net(c)), "{c}");
        }
        for bad in [
            "",
            "10-0-1-64",
            "10-0-1-64-33",
            "10-0-1-064-26",
            "010-0-1-64-26",
            "10-0-1-65-26",
            "fd00-0-0-0-0-0-0-40-122",
            "fd00-0000-0000-0000-0000-0000-0000-0040-129",
            "node-a-10-0-1-64-26",
            "10-0-1-64-26-x",
        ] {
            assert_eq!(parse_block_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_affinity_name_of_a_node_starts_with_its_prefix() {
        for len in [1, 20, 200, 215, 226, 234, 235, 236, 237, 240, 252, 253] {
            let node: String = "n".repeat(len);
            let node_dotted = format!("{}.{}", "a".repeat(len / 2), "b".repeat(len - len / 2));
            for node in [node, node_dotted] {
                let p = affinity_prefix(&node);
                for c in ["10.0.0.0/26", "fd00::/122", "192.168.255.0/32"] {
                    let name = affinity_name(&node, &net(c));
                    assert!(
                        name.starts_with(&p),
                        "node of {} chars: {name} does not start with {p}",
                        node.len()
                    );
                }
            }
        }
        assert_eq!(affinity_prefix("Node-1"), "node-1-");
        // Why callers check each affinity's node: `a-b`'s names carry `a`'s prefix.
        assert!(affinity_name("a-b", &net("10.0.0.0/26")).starts_with(&affinity_prefix("a")));
    }
}
