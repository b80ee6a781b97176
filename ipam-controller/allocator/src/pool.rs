//! Which pools a request may use, and where in a pool a node looks for a free block.

use crate::error::{Family, IpamError};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use margay_api::selector::Selector;
use margay_api::{AllowedUse, IPPool, MargayResource};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The annotation in which the controller records the `cidr` it accepted for a pool.
pub const ANNOTATION_ACCEPTED_CIDR: &str = "margay.io/accepted-cidr";

/// The status condition the controller sets to `False` on a pool whose immutable fields were
/// changed after blocks were made from it; the allocator then gives no new addresses from it.
pub const CONDITION_VALID: &str = "Valid";

/// What addresses are for, which decides the pools that may give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressUse {
    #[default]
    Workload,
    Tunnel,
}

impl AddressUse {
    pub fn allowed_use(self) -> AllowedUse {
        match self {
            AddressUse::Workload => AllowedUse::Workload,
            AddressUse::Tunnel => AllowedUse::Tunnel,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AddressUse::Workload => "Workload",
            AddressUse::Tunnel => "Tunnel",
        }
    }
}

/// A pool as the allocator uses it.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub name: String,
    pub net: IpNet,
    pub block_prefix: u8,
    pub avoid_network_and_broadcast: bool,
    pub strict_affinity: bool,
}

impl PoolView {
    /// `cidr (name)`, the way messages name a pool.
    pub fn label(&self) -> String {
        format!("{} ({})", self.net, self.name)
    }

    pub fn family(&self) -> Family {
        if self.net.addr().is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The block of this pool that contains `ip`.
    pub fn block_of(&self, ip: &IpAddr) -> Option<IpNet> {
        if !self.net.contains(ip) {
            return None;
        }
        IpNet::new(*ip, self.block_prefix).ok().map(|n| n.trunc())
    }

    /// Number of blocks in the pool (saturating).
    pub fn block_count(&self) -> u128 {
        let bits = u32::from(self.block_prefix - self.net.prefix_len());
        if bits >= 127 {
            u128::MAX
        } else {
            1u128 << bits
        }
    }

    /// The `n`th block of the pool.
    pub fn nth_block(&self, n: u128) -> IpNet {
        match self.net {
            IpNet::V4(p) => {
                let step = 1u64 << (32 - self.block_prefix);
                let base = u64::from(u32::from(p.network()));
                let addr = (base + (n as u64) * step) as u32;
                IpNet::V4(Ipv4Net::new(addr.into(), self.block_prefix).expect("prefix within 32"))
            }
            IpNet::V6(p) => {
                let shift = 128 - u32::from(self.block_prefix);
                let base = u128::from(p.network());
                let addr = base.wrapping_add(n.checked_shl(shift).unwrap_or(0));
                IpNet::V6(Ipv6Net::new(addr.into(), self.block_prefix).expect("prefix within 128"))
            }
        }
    }

    /// Blocks of the pool in the order a node searches them: from a start point seeded by the
    /// node's name, wrapping around, at most `limit` of them.
    pub fn search_order(&self, node: &str, limit: u128) -> impl Iterator<Item = IpNet> + '_ {
        let count = self.block_count();
        let start = u128::from(seed(node)) % count;
        (0..count.min(limit)).map(move |i| self.nth_block((start + i) % count))
    }
}

/// FNV-1a of the node name: a stable, well-spread start point for the block search.
pub fn seed(node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What Margay's own rules find wrong with each pool, by pool name: its fields
/// ([`MargayResource::validate`]), or an overlap with an older pool whose fields are fine.
/// Pools with nothing wrong are absent. The API server may not have checked (servers before
/// v1.25 run no CEL rules, and the etcd datastore has no server at all), so the controller
/// reports these and the allocator refuses these pools whether or not the controller has run.
///
/// Of two overlapping pools the older one stays usable, so that a pool created on top of another
/// never takes the other's addresses away. Older means: accepted by the controller first (it
/// carries the accepted-cidr annotation, which the controller never writes on a pool with a
/// problem), then created earlier (a pool with no creation time, as on etcd, counts as newest),
/// then by name.
pub fn spec_problems(pools: &[IPPool]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut sound: Vec<(&IPPool, IpNet)> = Vec::new();
    for p in pools {
        let name = pool_name(p);
        match p.validate() {
            Err(errs) => {
                out.insert(name.to_owned(), format!("its spec is invalid: {errs}"));
            }
            Ok(()) => {
                if let Some(net) = p.spec.network() {
                    sound.push((p, net.trunc()));
                }
            }
        }
    }
    let age = |p: &IPPool| {
        let accepted = p
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ANNOTATION_ACCEPTED_CIDR));
        let created = p.metadata.creation_timestamp.clone();
        (
            !accepted,
            created.is_none(),
            created,
            pool_name(p).to_owned(),
        )
    };
    sound.sort_by_key(|(p, _)| age(p));
    for (i, (p, net)) in sound.iter().enumerate() {
        let older: Vec<String> = sound[..i]
            .iter()
            .filter(|(_, o)| o.contains(&net.network()) || net.contains(&o.network()))
            .map(|(o, onet)| format!("{} ({onet})", pool_name(o)))
            .collect();
        if !older.is_empty() {
            out.insert(
                pool_name(p).to_owned(),
                format!(
                    "its cidr {net} overlaps the older pool(s) {}; change its cidr or delete one of them",
                    older.join(", ")
                ),
            );
        }
    }
    out
}

fn pool_name(p: &IPPool) -> &str {
    p.metadata.name.as_deref().unwrap_or("")
}

/// Why each pool gives no new addresses, by pool name: disabled, refused by
/// [`spec_problems`], or marked `Valid=False` by the controller (an immutable field changed).
/// Pools that may give addresses are absent.
pub fn unusable(pools: &[IPPool]) -> BTreeMap<String, String> {
    let mut out = spec_problems(pools);
    for p in pools {
        if out.contains_key(pool_name(p)) {
            continue;
        }
        let reason = if p.spec.disabled {
            Some("the pool is disabled".to_owned())
        } else {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_VALID))
                .filter(|c| c.status == "False")
                .map(|c| format!("the controller marked it invalid: {}", c.message))
        };
        if let Some(r) = reason {
            out.insert(pool_name(p).to_owned(), r);
        }
    }
    out
}

pub fn view(pool: &IPPool, strict_affinity: bool) -> Option<PoolView> {
    let net = pool.spec.network()?.trunc();
    Some(PoolView {
        name: pool.metadata.name.clone().unwrap_or_default(),
        net,
        block_prefix: pool.spec.effective_block_size(),
        avoid_network_and_broadcast: pool.spec.avoid_block_network_and_broadcast,
        strict_affinity,
    })
}

/// The pools a request of `family` and `use_` may draw from on a node with `labels`: the ones it
/// names (by name or CIDR), else every enabled pool whose nodeSelector matches and whose
/// allowedUses fit. Sorted by name so that every node tries them in the same order.
pub fn select(
    pools: &[IPPool],
    family: Family,
    use_: AddressUse,
    node: &str,
    labels: &BTreeMap<String, String>,
    requested: &[String],
    strict_affinity: bool,
) -> Result<Vec<PoolView>, IpamError> {
    let fam_ok = |p: &IPPool| {
        p.spec
            .network()
            .is_some_and(|n| n.addr().is_ipv4() == (family == Family::V4))
    };
    let unusable = unusable(pools);
    if !requested.is_empty() {
        let mut out = Vec::new();
        for r in requested {
            let found = pools.iter().find(|p| {
                p.metadata.name.as_deref() == Some(r.as_str())
                    || p.spec.cidr == *r
                    || r.parse::<IpNet>().ok().map(|n| n.trunc()) == p.spec.network()
            });
            let Some(p) = found else {
                return Err(IpamError::PoolUnusable {
                    pool: r.clone(),
                    reason: "no such pool (give an IPPool name or its exact CIDR)".into(),
                });
            };
            // A pool whose cidr does not parse has no family: its reason is the answer.
            if p.spec.network().is_some() && !fam_ok(p) {
                continue;
            }
            if let Some(reason) = unusable.get(pool_name(p)) {
                return Err(IpamError::PoolUnusable {
                    pool: r.clone(),
                    reason: reason.clone(),
                });
            }
            if !p.spec.allowed_uses.contains(&use_.allowed_use()) {
                return Err(IpamError::PoolUnusable {
                    pool: r.clone(),
                    reason: format!(
                        "its allowedUses {:?} do not include {}",
                        p.spec.allowed_uses,
                        use_.name()
                    ),
                });
            }
            out.extend(view(p, strict_affinity));
        }
        if out.is_empty() {
            return Err(IpamError::NoPool {
                family,
                use_: use_.name(),
                node: node.into(),
                considered: requested.to_vec(),
            });
        }
        return Ok(out);
    }
    let mut considered = Vec::new();
    let mut out: Vec<PoolView> = pools
        .iter()
        .filter(|p| fam_ok(p))
        .filter(|p| {
            let reason = unusable.get(pool_name(p));
            considered.push(match reason {
                None => format!("{} ({})", p.spec.cidr, pool_name(p)),
                Some(r) => format!("{} ({}): {r}", p.spec.cidr, pool_name(p)),
            });
            reason.is_none()
                && p.spec.allowed_uses.contains(&use_.allowed_use())
                && Selector::parse(&p.spec.node_selector).is_ok_and(|s| s.matches(labels))
        })
        .filter_map(|p| view(p, strict_affinity))
        .collect();
    if out.is_empty() {
        return Err(IpamError::NoPool {
            family,
            use_: use_.name(),
            node: node.into(),
            considered,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(cidr: &str, bs: u8) -> PoolView {
        PoolView {
            name: "p".into(),
            net: cidr.parse().unwrap(),
            block_prefix: bs,
            avoid_network_and_broadcast: false,
            strict_affinity: false,
        }
    }

    #[test]
    fn blocks_are_enumerated_for_both_families() {
        let p = v("10.244.0.0/16", 26);
        assert_eq!(p.block_count(), 1024);
        assert_eq!(p.nth_block(1).to_string(), "10.244.0.64/26");
        assert_eq!(p.nth_block(1023).to_string(), "10.244.255.192/26");
        let p6 = v("fd00::/64", 122);
        assert_eq!(p6.block_count(), 1 << 58);
        assert_eq!(p6.nth_block(1).to_string(), "fd00::40/122");
        assert_eq!(
            p6.block_of(&"fd00::1234".parse().unwrap())
                .unwrap()
                .to_string(),
            "fd00::1200/122"
        );
    }

    #[test]
    fn different_nodes_start_their_search_in_different_places() {
        let p = v("10.244.0.0/16", 26);
        let starts: std::collections::HashSet<IpNet> = (0..50)
            .map(|i| p.search_order(&format!("node-{i}"), 1).next().unwrap())
            .collect();
        assert!(starts.len() >= 45, "only {} distinct starts", starts.len());
        let all: std::collections::HashSet<IpNet> = p.search_order("n", u128::MAX).collect();
        assert_eq!(all.len(), 1024);
    }

    fn pool(name: &str, spec: IPPoolSpec) -> IPPool {
        IPPool::new(name, spec)
    }

    fn cidr(c: &str) -> IPPoolSpec {
        IPPoolSpec {
            cidr: c.into(),
            ..Default::default()
        }
    }

    use margay_api::{EncapMode, IPPoolSpec};

    #[test]
    fn pools_that_fail_validation_or_overlap_an_older_pool_are_refused_with_the_reason() {
        let pools = vec![
            pool("good", cidr("10.1.0.0/16")),
            pool("host-bits", cidr("10.2.0.1/16")),
            pool(
                "block-33",
                IPPoolSpec {
                    block_size: Some(33),
                    ..cidr("10.3.0.0/16")
                },
            ),
            pool(
                "two-encaps",
                IPPoolSpec {
                    ipip_mode: EncapMode::Always,
                    vxlan_mode: EncapMode::Always,
                    ..cidr("10.4.0.0/16")
                },
            ),
            pool(
                "bad-selector",
                IPPoolSpec {
                    node_selector: "zone ==".into(),
                    ..cidr("10.5.0.0/16")
                },
            ),
            pool("tiny", cidr("10.6.0.0/28")),
            // Sorted after "good" by name (no creation times here): the younger of the two.
            pool("inner", cidr("10.1.8.0/24")),
        ];
        let problems = spec_problems(&pools);
        let names: Vec<&str> = problems.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "bad-selector",
                "block-33",
                "host-bits",
                "inner",
                "tiny",
                "two-encaps"
            ]
        );
        assert!(problems["host-bits"].contains("spec.cidr"), "{problems:?}");
        assert!(
            problems["block-33"].contains("spec.blockSize"),
            "{problems:?}"
        );
        assert!(
            problems["two-encaps"].contains("spec.vxlanMode"),
            "{problems:?}"
        );
        assert!(
            problems["bad-selector"].contains("spec.nodeSelector"),
            "{problems:?}"
        );
        assert!(problems["tiny"].contains("spec.blockSize"), "{problems:?}");
        assert!(
            problems["inner"].contains("overlaps the older pool(s) good (10.1.0.0/16)"),
            "{problems:?}"
        );

        // Asked for by name, a refused pool answers with its reason, not "no pool".
        for name in names {
            let e = select(
                &pools,
                Family::V4,
                AddressUse::Workload,
                "n1",
                &BTreeMap::new(),
                &[name.to_owned()],
                false,
            )
            .unwrap_err();
            match e {
                IpamError::PoolUnusable { pool, reason } => {
                    assert_eq!(pool, name);
                    assert_eq!(reason, problems[name]);
                }
                other => panic!("{name}: {other}"),
            }
        }
        // Unasked, only the good pool serves, and the error of a node with no pool says why
        // the others were passed over.
        let got = select(
            &pools,
            Family::V4,
            AddressUse::Workload,
            "n1",
            &BTreeMap::new(),
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        // ("inner" overlaps nothing once "good" is gone.)
        let only_bad: Vec<IPPool> = pools[1..pools.len() - 1].to_vec();
        let e = select(
            &only_bad,
            Family::V4,
            AddressUse::Workload,
            "n1",
            &BTreeMap::new(),
            &[],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("10.2.0.1/16 (host-bits): its spec is invalid"),
            "{e}"
        );
    }

    #[test]
    fn of_two_overlapping_pools_the_older_one_keeps_serving() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let mut old = pool("zz-old", cidr("10.1.0.0/16"));
        let mut young = pool("aa-young", cidr("10.1.0.0/24"));
        let t = |s: &str| Some(Time(s.parse().unwrap()));
        old.metadata.creation_timestamp = t("2026-01-01T00:00:00Z");
        young.metadata.creation_timestamp = t("2026-06-01T00:00:00Z");
        let problems = spec_problems(&[young.clone(), old.clone()]);
        assert_eq!(problems.keys().collect::<Vec<_>>(), ["aa-young"]);
        // Without creation times (etcd), the pool the controller accepted is the older one,
        // whatever the names say; with none accepted, a pool with a creation time is older.
        let mut established = pool("z-established", cidr("10.1.0.0/16"));
        established.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_ACCEPTED_CIDR.to_owned(),
            "10.1.0.0/16".to_owned(),
        )]));
        let newcomer = pool("a-newcomer", cidr("10.1.8.0/24"));
        let problems = spec_problems(&[newcomer.clone(), established]);
        assert_eq!(problems.keys().collect::<Vec<_>>(), ["a-newcomer"]);
        let problems = spec_problems(&[newcomer, old]);
        assert_eq!(problems.keys().collect::<Vec<_>>(), ["a-newcomer"]);
    }

    #[test]
    fn a_pool_whose_cidr_does_not_parse_answers_with_its_reason() {
        let pools = vec![pool("broken", cidr("10.300.0.0/16"))];
        for fam in [Family::V4, Family::V6] {
            let e = select(
                &pools,
                fam,
                AddressUse::Workload,
                "n1",
                &BTreeMap::new(),
                &["broken".to_owned()],
                false,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("\"broken\"") && e.contains("spec.cidr"), "{e}");
        }
    }
}
