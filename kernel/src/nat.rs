//! Outgoing NAT for pools with `natOutgoing`, in an nftables table of Margay's own.
//!
//! ```text
//! table inet margay {
//!     set nat-pools     { type ipv4_addr; flags interval; }   # pools with natOutgoing
//!     set all-pools     { type ipv4_addr; flags interval; }   # every pool
//!     set nat-pools-v6  { type ipv6_addr; flags interval; }
//!     set all-pools-v6  { type ipv6_addr; flags interval; }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr @nat-pools ip daddr != @all-pools masquerade
//!         ip6 saddr @nat-pools-v6 ip6 daddr != @all-pools-v6 masquerade
//!     }
//! }
//! ```
//!
//! This module drives the `nft` command (`nft -f -` for changes, `nft -j` to read) rather than
//! speaking nf_tables netlink: that protocol (expressions, set element encodings, batches with
//! generation ids) is large, and `nft -f` already applies a script as one atomic transaction.
//! It touches only the table `inet margay`. Pool sets are updated element by element; the
//! chain's two rules are rewritten (flush + add, atomically) by [`Nat::ensure`].
//!
//! Like `/proc/sys/net`, `nft` acts on the network namespace of the thread that runs it; use
//! [`crate::netns::run_in`] for another namespace.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::KernelError;

/// The nftables family and table Margay owns.
pub const NAT_TABLE: &str = "inet margay";
pub const SET_NAT_POOLS: &str = "nat-pools";
pub const SET_ALL_POOLS: &str = "all-pools";
pub const SET_NAT_POOLS_V6: &str = "nat-pools-v6";
pub const SET_ALL_POOLS_V6: &str = "all-pools-v6";

/// A pool as NAT sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPool {
    pub cidr: IpNet,
    pub nat_outgoing: bool,
}

/// What the sets hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSets {
    pub nat: BTreeSet<IpNet>,
    pub all: BTreeSet<IpNet>,
}

impl PoolSets {
    pub fn from_pools(pools: &[NatPool]) -> PoolSets {
        let mut s = PoolSets::default();
        for p in pools {
            s.all.insert(p.cidr.trunc());
            if p.nat_outgoing {
                s.nat.insert(p.cidr.trunc());
            }
        }
        s
    }
}

/// Handle on the `nft` command.
#[derive(Debug, Clone)]
pub struct Nat {
    nft: String,
}

impl Default for Nat {
    fn default() -> Self {
        Nat { nft: "nft".into() }
    }
}

/// The script that creates the table, sets and chain if missing and rewrites the rules.
pub fn ensure_script() -> String {
    format!(
        "add table {t}\n\
         add set {t} {SET_NAT_POOLS} {{ type ipv4_addr; flags interval; }}\n\
         add set {t} {SET_ALL_POOLS} {{ type ipv4_addr; flags interval; }}\n\
         add set {t} {SET_NAT_POOLS_V6} {{ type ipv6_addr; flags interval; }}\n\
         add set {t} {SET_ALL_POOLS_V6} {{ type ipv6_addr; flags interval; }}\n\
         add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain {t} postrouting\n\
         add rule {t} postrouting ip saddr @{SET_NAT_POOLS} ip daddr != @{SET_ALL_POOLS} counter masquerade\n\
         add rule {t} postrouting ip6 saddr @{SET_NAT_POOLS_V6} ip6 daddr != @{SET_ALL_POOLS_V6} counter masquerade\n",
        t = NAT_TABLE
    )
}

fn set_for(net: &IpNet, nat: bool) -> &'static str {
    match (net, nat) {
        (IpNet::V4(_), true) => SET_NAT_POOLS,
        (IpNet::V4(_), false) => SET_ALL_POOLS,
        (IpNet::V6(_), true) => SET_NAT_POOLS_V6,
        (IpNet::V6(_), false) => SET_ALL_POOLS_V6,
    }
}

/// The element changes that turn `current` into `want`; empty when they are equal.
pub fn sync_script(current: &PoolSets, want: &PoolSets) -> String {
    let mut s = String::new();
    for (cur, wan, nat) in [
        (&current.nat, &want.nat, true),
        (&current.all, &want.all, false),
    ] {
        for n in cur.difference(wan) {
            s.push_str(&format!(
                "delete element {NAT_TABLE} {} {{ {n} }}\n",
                set_for(n, nat)
            ));
        }
        for n in wan.difference(cur) {
            s.push_str(&format!(
                "add element {NAT_TABLE} {} {{ {n} }}\n",
                set_for(n, nat)
            ));
        }
    }
    s
}

/// Reads the elements of `nft -j list set` output.
pub fn parse_set_elements(json: &str) -> Result<Vec<IpNet>, KernelError> {
    let bad = |d: String| KernelError::Nft {
        what: "list set (decoding its JSON)".into(),
        detail: d,
    };
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let items = v
        .get("nftables")
        .and_then(|x| x.as_array())
        .ok_or_else(|| bad("no \"nftables\" array".into()))?;
    let mut out = Vec::new();
    for item in items {
        let Some(set) = item.get("set") else { continue };
        let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
            continue;
        };
        for e in elems {
            // An element is an address string, {"prefix": {"addr", "len"}}, or wrapped in
            // {"elem": {"val": ...}} when it has a counter or comment.
            let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            if let Some(a) = e.as_str() {
                let ip: std::net::IpAddr = a.parse().map_err(|_| bad(format!("element {a}")))?;
                out.push(IpNet::from(ip));
            } else if let Some(p) = e.get("prefix") {
                let addr = p.get("addr").and_then(|x| x.as_str()).unwrap_or_default();
                let len = p.get("len").and_then(|x| x.as_u64()).unwrap_or(255);
                let net = format!("{addr}/{len}")
                    .parse::<IpNet>()
                    .map_err(|_| bad(format!("element {p}")))?;
                out.push(net);
            } else {
                return Err(bad(format!("unexpected element {e}")));
            }
        }
    }
    Ok(out)
}

impl Nat {
    /// Uses the `nft` binary at `path`.
    pub fn with_binary(path: impl Into<String>) -> Nat {
        Nat { nft: path.into() }
    }

    fn run(&self, what: &str, args: &[&str], stdin: Option<&str>) -> Result<String, KernelError> {
        let err = |detail: String| KernelError::Nft {
            what: what.to_string(),
            detail,
        };
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot run {}: {e}", self.nft)))?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped");
            pipe.write_all(input.as_bytes())
                .map_err(|e| err(format!("writing the script: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| err(format!("waiting: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the table, sets and chain if missing and (re)writes the two masquerade rules.
    /// Set contents are kept. Idempotent.
    pub fn ensure(&self) -> Result<(), KernelError> {
        self.run(
            "ensure table inet margay",
            &["-f", "-"],
            Some(&ensure_script()),
        )
        .map(drop)
    }

    /// What the four sets hold now.
    pub fn pool_sets(&self) -> Result<PoolSets, KernelError> {
        let mut s = PoolSets::default();
        for (name, nat) in [
            (SET_NAT_POOLS, true),
            (SET_ALL_POOLS, false),
            (SET_NAT_POOLS_V6, true),
            (SET_ALL_POOLS_V6, false),
        ] {
            let json = self.run(
                &format!("list set {NAT_TABLE} {name}"),
                &["-j", "list", "set", "inet", "margay", name],
                None,
            )?;
            let target = if nat { &mut s.nat } else { &mut s.all };
            target.extend(parse_set_elements(&json)?);
        }
        Ok(s)
    }

    /// Makes the sets hold exactly `pools` (all of them in `all-pools*`, those with
    /// natOutgoing in `nat-pools*`), adding and deleting elements in place in one transaction.
    /// Calls [`Nat::ensure`] first when the table is missing.
    pub fn sync_pools(&self, pools: &[NatPool]) -> Result<(), KernelError> {
        let current = match self.pool_sets() {
            Ok(c) => c,
            Err(_) => {
                self.ensure()?;
                self.pool_sets()?
            }
        };
        let script = sync_script(&current, &PoolSets::from_pools(pools));
        if script.is_empty() {
            return Ok(());
        }
        self.run("update pool sets", &["-f", "-"], Some(&script))
            .map(drop)
    }

    /// Removes the table and everything in it; a table already gone is success.
    pub fn remove(&self) -> Result<(), KernelError> {
        // `destroy` (nft ≥ 1.0.8) would do this in one step; list first for older nft.
        match self.run("list tables", &["list", "tables", "inet"], None) {
            Ok(out) if !out.lines().any(|l| l.trim() == "table inet margay") => return Ok(()),
            _ => {}
        }
        self.run(
            "delete table inet margay",
            &["delete", "table", "inet", "margay"],
            None,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn pool_sets_from_pools() {
        let s = PoolSets::from_pools(&[
            NatPool {
                cidr: n("10.65.0.0/16"),
                nat_outgoing: true,
            },
            NatPool {
                cidr: n("10.66.0.0/16"),
                nat_outgoing: false,
            },
        ]);
        assert_eq!(s.nat, [n("10.65.0.0/16")].into());
        assert_eq!(s.all, [n("10.65.0.0/16"), n("10.66.0.0/16")].into());
    }

    #[test]
    fn sync_script_adds_and_deletes_only_the_difference() {
        let cur = PoolSets {
            nat: [n("10.65.0.0/16"), n("10.67.0.0/16")].into(),
            all: [n("10.65.0.0/16"), n("10.67.0.0/16")].into(),
        };
        let want = PoolSets {
            nat: [n("10.65.0.0/16")].into(),
            all: [n("10.65.0.0/16"), n("fd00:65::/48")].into(),
        };
        let s = sync_script(&cur, &want);
        assert_eq!(
            s,
            "delete element inet margay nat-pools { 10.67.0.0/16 }\n\
             delete element inet margay all-pools { 10.67.0.0/16 }\n\
             add element inet margay all-pools-v6 { fd00:65::/48 }\n"
        );
        assert_eq!(sync_script(&want, &want), "");
    }

    #[test]
    fn ensure_script_is_one_transaction_with_the_masquerade_rules() {
        let s = ensure_script();
        assert!(s.starts_with("add table inet margay\n"));
        assert!(s.contains("flush chain inet margay postrouting\n"));
        assert!(s.contains("ip saddr @nat-pools ip daddr != @all-pools counter masquerade"));
        assert!(s.contains("ip6 saddr @nat-pools-v6 ip6 daddr != @all-pools-v6 counter masquerade"));
        assert!(!s.contains("delete"), "ensure never deletes sets");
    }

    #[test]
    fn parses_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"set": {"family": "inet", "name": "nat-pools", "table": "margay", "type": "ipv4_addr",
           "handle": 2, "flags": ["interval"],
           "elem": [{"prefix": {"addr": "10.65.0.0", "len": 16}}, "192.0.2.7",
                    {"elem": {"val": {"prefix": {"addr": "fd00::", "len": 48}}, "counter": {}}}]}}]}"#;
        let v = parse_set_elements(json).unwrap();
        assert_eq!(
            v,
            vec![n("10.65.0.0/16"), n("192.0.2.7/32"), n("fd00::/48")]
        );
        let empty = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "x"}}]}"#;
        assert!(parse_set_elements(empty).unwrap().is_empty());
        assert!(parse_set_elements("not json").is_err());
    }
}
