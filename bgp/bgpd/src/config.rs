//! `margay-bgpd`'s YAML configuration: loading, validation with errors that say
//! what to change, and the difference between two configurations for reload.
//!
//! ```yaml
//! bgp:                       # the speaker (margay_bgp::SpeakerConfig)
//!   asn: 65000
//!   router_id: 10.0.0.1
//!   listen: ["0.0.0.0:179", "[::]:179"]
//!   graceful_restart: { restart_time: 120 }
//! peers:                     # margay_bgp::PeerConfig each
//!   - address: 10.0.0.2
//!     asn: 65000
//!     rr_client: true
//!     import: { rules: [...], default: accept }   # reuse with YAML anchors
//! announce:
//!   - prefix: 10.10.0.0/24
//!     communities: ["65000:100"]
//! status:
//!   listen: 127.0.0.1:9179   # /metrics, /peers, /routes
//! state_dir: /var/lib/margay-bgpd
//! kernel:                    # install best routes learned from peers
//!   table: 254
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use margay_bgp::rib::policy::{parse_community, parse_large_community};
use margay_bgp::wire::{AsPath, NextHop, Origin, Prefix};
use margay_bgp::{PathAttrs, PeerConfig, SpeakerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ValidationError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error(transparent)]
    Speaker(#[from] margay_bgp::ConfigError),
    #[error("announce[{index}]: prefix {prefix:?}: {reason}")]
    Announce {
        index: usize,
        prefix: String,
        reason: String,
    },
    #[error("kernel.table {0} is not usable; use 1..=252 or 254 (main)")]
    KernelTable(u32),
    #[error("status.listen {0} is not a loopback address; the status API has no authentication, so bind it to 127.0.0.1 or ::1 (or set status.allow_remote: true)")]
    StatusRemote(SocketAddr),
}

fn default_status() -> Option<StatusConfig> {
    None
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bgp: SpeakerConfig,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub announce: Vec<Announcement>,
    #[serde(default = "default_status")]
    pub status: Option<StatusConfig>,
    /// Where the restart marker lives (graceful restart needs it to know that a start
    /// is a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Routing table for learned routes (254 = main).
    #[serde(default = "main_table")]
    pub table: u32,
    /// Network namespace to install into (a path like /run/netns/NAME); default ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

fn main_table() -> u32 {
    254
}

/// A locally originated prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    pub prefix: String,
    /// Next hop to advertise (default: ourselves, per peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub med: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// AS path to originate with (normally empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub as_path: Vec<u32>,
}

impl Announcement {
    /// The prefix and attributes; the error says what is wrong.
    pub fn resolve(&self) -> Result<(Prefix, PathAttrs), String> {
        let prefix: Prefix = self.prefix.parse().map_err(|e| format!("{e}"))?;
        let mut a = PathAttrs {
            origin: Origin::Igp,
            as_path: AsPath::sequence(self.as_path.iter().copied()),
            med: self.med,
            local_pref: self.local_pref,
            ..PathAttrs::default()
        };
        if let Some(nh) = self.next_hop {
            a.next_hop = Some(match nh {
                IpAddr::V4(v) => NextHop::V4(v),
                IpAddr::V6(v) => NextHop::V6 {
                    global: v,
                    link_local: None,
                },
            });
        }
        for c in &self.communities {
            a.communities
                .push(parse_community(c).map_err(|e| e.to_string())?);
        }
        for c in &self.large_communities {
            a.large_communities
                .push(parse_large_community(c).map_err(|e| e.to_string())?);
        }
        Ok((prefix, a))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let c: Config = serde_yaml::from_str(&text).map_err(|source| ConfigFileError::Parse {
            path: path.to_owned(),
            source,
        })?;
        c.validate().map_err(|source| ConfigFileError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        self.bgp.validate()?;
        let mut seen = HashSet::new();
        for p in &self.peers {
            p.validate(&self.bgp)?;
            if !seen.insert(p.address) {
                return Err(margay_bgp::ConfigError::DuplicatePeer { peer: p.address }.into());
            }
        }
        for (index, a) in self.announce.iter().enumerate() {
            a.resolve().map_err(|reason| ValidationError::Announce {
                index,
                prefix: a.prefix.clone(),
                reason,
            })?;
        }
        if let Some(k) = &self.kernel {
            if k.table == 0 || k.table == 253 || k.table == 255 {
                return Err(ValidationError::KernelTable(k.table));
            }
        }
        if let Some(s) = &self.status {
            if !s.allow_remote && !s.listen.ip().is_loopback() {
                return Err(ValidationError::StatusRemote(s.listen));
            }
        }
        Ok(())
    }

    pub fn announcements(&self) -> BTreeMap<Prefix, PathAttrs> {
        self.announce
            .iter()
            .filter_map(|a| a.resolve().ok())
            .collect()
    }
}

/// What a reload must do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub remove_peers: Vec<IpAddr>,
    pub add_peers: Vec<PeerConfig>,
    pub update_peers: Vec<PeerConfig>,
    pub withdraw: Vec<Prefix>,
    pub announce: Vec<(Prefix, PathAttrs)>,
    /// Settings a reload cannot change (restart needed), by name.
    pub needs_restart: Vec<&'static str>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.remove_peers.is_empty()
            && self.add_peers.is_empty()
            && self.update_peers.is_empty()
            && self.withdraw.is_empty()
            && self.announce.is_empty()
            && self.needs_restart.is_empty()
    }
}

pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    if old.bgp != new.bgp {
        d.needs_restart.push("bgp");
    }
    if old.status != new.status {
        d.needs_restart.push("status");
    }
    if old.kernel != new.kernel {
        d.needs_restart.push("kernel");
    }
    for p in &old.peers {
        match new.peers.iter().find(|n| n.address == p.address) {
            None => d.remove_peers.push(p.address),
            Some(n) if n != p => d.update_peers.push(n.clone()),
            Some(_) => {}
        }
    }
    for n in &new.peers {
        if !old.peers.iter().any(|p| p.address == n.address) {
            d.add_peers.push(n.clone());
        }
    }
    let (oa, na) = (old.announcements(), new.announcements());
    for p in oa.keys() {
        if !na.contains_key(p) {
            d.withdraw.push(*p);
        }
    }
    for (p, a) in &na {
        if oa.get(p) != Some(a) {
            d.announce.push((*p, a.clone()));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
bgp:
  asn: 65000
  router_id: 10.0.0.1
  listen: ["127.0.0.1:1179"]
peers:
  - address: 10.0.0.2
    asn: 65000
    rr_client: true
  - address: 10.0.0.3
    asn: 65100
    import: &only10
      rules:
        - match: { prefixes: [{ prefix: 10.0.0.0/8, le: 32 }] }
          action: accept
      default: reject
announce:
  - prefix: 10.10.0.0/24
    communities: ["65000:1"]
status:
  listen: 127.0.0.1:9179
"#;

    fn parse(s: &str) -> Config {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn example_parses_and_validates() {
        let c = parse(BASE);
        c.validate().unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].import.rules.len(), 1);
        assert_eq!(c.announcements().len(), 1);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let e = serde_yaml::from_str::<Config>(&BASE.replace("rr_client: true", "rr_clinet: true"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rr_clinet"), "{e}");
    }

    #[test]
    fn validation_names_the_problem() {
        let c = parse(&BASE.replace("asn: 65100", "asn: 0"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("10.0.0.3") && e.contains("asn 0"), "{e}");
        let c = parse(&BASE.replace("10.10.0.0/24", "10.10.0.1/24"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("host bits") && e.contains("10.10.0.0/24"), "{e}");
        let c = parse(&BASE.replace("127.0.0.1:9179", "0.0.0.0:9179"));
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        let c = parse(&BASE.replace("asn: 65100", "asn: 65100\n    hold_time: 2"));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("hold_time 2"));
        let dup = BASE.replace("address: 10.0.0.3", "address: 10.0.0.2");
        assert!(parse(&dup)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let c = parse(&BASE.replace(
            "    asn: 65000\n    rr_client",
            "    asn: 65009\n    rr_client",
        ));
        assert!(c.validate().unwrap_err().to_string().contains("rr_client"));
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let old = parse(BASE);
        let mut new = old.clone();
        new.peers.remove(0);
        new.peers[0].export.default = margay_bgp::rib::policy::Verdict::Reject;
        let mut p = PeerConfig::new("10.0.0.9".parse().unwrap(), 65200);
        p.description = "new".into();
        new.peers.push(p);
        new.announce[0].communities.clear();
        new.announce.push(Announcement {
            prefix: "10.11.0.0/24".into(),
            next_hop: None,
            communities: vec![],
            large_communities: vec![],
            med: None,
            local_pref: None,
            as_path: vec![],
        });
        let d = diff(&old, &new);
        assert_eq!(d.remove_peers, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(d.update_peers.len(), 1);
        assert_eq!(d.add_peers.len(), 1);
        assert_eq!(d.announce.len(), 2);
        assert!(d.withdraw.is_empty());
        assert!(d.needs_restart.is_empty());
        assert!(diff(&old, &old).is_empty());
        let mut asn = old.clone();
        asn.bgp.asn = 65001;
        assert_eq!(diff(&old, &asn).needs_restart, vec!["bgp"]);
    }
}
