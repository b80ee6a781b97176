//! Import and export policy: ordered rules that match prefixes (prefix lists with
//! ge/le), communities, large communities and AS paths, and accept or reject a route
//! after setting local-pref, MED, communities or prepending the AS path.
//!
//! The first rule that matches decides; a route no rule matches gets the policy's
//! default. [`Policy::evaluate`] returns which rule matched, so a caller can share one
//! modified attribute set among all prefixes that matched the same rule.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use margay_bgp_wire::{Community, LargeCommunity, Prefix};
use serde::{Deserialize, Serialize};

use super::attrs::PathAttrs;

/// A policy error, raised when a policy is built (never while evaluating).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "prefix-list entry {prefix}: ge {ge} / le {le} must satisfy {len} <= ge <= le <= {max}"
    )]
    Range {
        prefix: Prefix,
        ge: u8,
        le: u8,
        len: u8,
        max: u8,
    },
    #[error("community {0:?} is not ASN:VALUE with both parts in 0..=65535")]
    Community(String),
    #[error("large community {0:?} is not GLOBAL:DATA1:DATA2 with 32-bit parts")]
    LargeCommunity(String),
}

/// One prefix-list line: `prefix`, and how long a matching prefix may be.
/// Without `ge`/`le` only the exact prefix matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixMatch {
    #[serde(with = "prefix_string")]
    pub prefix: Prefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ge: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<u8>,
}

impl PrefixMatch {
    pub fn exact(prefix: Prefix) -> Self {
        Self {
            prefix,
            ge: None,
            le: None,
        }
    }

    fn bounds(&self) -> (u8, u8) {
        let len = self.prefix.len();
        let max = self.prefix.family().max_len();
        match (self.ge, self.le) {
            (None, None) => (len, len),
            (Some(ge), None) => (ge, max),
            (None, Some(le)) => (len, le),
            (Some(ge), Some(le)) => (ge, le),
        }
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        let (ge, le) = self.bounds();
        let len = self.prefix.len();
        let max = self.prefix.family().max_len();
        if !(len <= ge && ge <= le && le <= max) {
            return Err(PolicyError::Range {
                prefix: self.prefix,
                ge,
                le,
                len,
                max,
            });
        }
        Ok(())
    }

    /// `p` lies inside this prefix and its length is within ge..=le.
    pub fn matches(&self, p: &Prefix) -> bool {
        if p.family() != self.prefix.family() || p.len() < self.prefix.len() {
            return false;
        }
        let (ge, le) = self.bounds();
        if p.len() < ge || p.len() > le {
            return false;
        }
        Prefix::new_masked(p.addr(), self.prefix.len()).is_ok_and(|m| m == self.prefix)
    }
}

/// What a rule looks at. Every present condition must hold; an empty match matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The prefix matches one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<PrefixMatch>,
    /// The route carries at least one of these communities.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "community_strings"
    )]
    pub communities: Vec<Community>,
    /// The route carries at least one of these large communities.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "large_community_strings"
    )]
    pub large_communities: Vec<LargeCommunity>,
    /// The AS path contains this AS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_path_contains: Option<u32>,
    /// The route originated in this AS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_as: Option<u32>,
}

impl Match {
    pub fn matches(&self, prefix: &Prefix, a: &PathAttrs) -> bool {
        (self.prefixes.is_empty() || self.prefixes.iter().any(|m| m.matches(prefix)))
            && (self.communities.is_empty()
                || self.communities.iter().any(|c| a.communities.contains(c)))
            && (self.large_communities.is_empty()
                || self
                    .large_communities
                    .iter()
                    .any(|c| a.large_communities.contains(c)))
            && self.as_path_contains.is_none_or(|x| a.as_path.contains(x))
            && self
                .origin_as
                .is_none_or(|x| a.as_path.origin_as() == Some(x))
    }
}

/// Changes a rule makes to an accepted route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Set {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub med: Option<u32>,
    /// Prepend this AS...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepend_as: Option<u32>,
    /// ...this many times (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepend_count: Option<u8>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "community_strings"
    )]
    pub add_communities: Vec<Community>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "community_strings"
    )]
    pub remove_communities: Vec<Community>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "large_community_strings"
    )]
    pub add_large_communities: Vec<LargeCommunity>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "large_community_strings"
    )]
    pub remove_large_communities: Vec<LargeCommunity>,
}

impl Set {
    pub fn is_empty(&self) -> bool {
        *self == Set::default()
    }

    pub fn apply(&self, a: &mut PathAttrs) {
        if let Some(lp) = self.local_pref {
            a.local_pref = Some(lp);
        }
        if let Some(m) = self.med {
            a.med = Some(m);
        }
        if let Some(asn) = self.prepend_as {
            a.prepend(asn, usize::from(self.prepend_count.unwrap_or(1)));
        }
        a.communities
            .retain(|c| !self.remove_communities.contains(c));
        for c in &self.add_communities {
            if !a.communities.contains(c) {
                a.communities.push(*c);
            }
        }
        a.large_communities
            .retain(|c| !self.remove_large_communities.contains(c));
        for c in &self.add_large_communities {
            if !a.large_communities.contains(c) {
                a.large_communities.push(*c);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, rename = "match")]
    pub matches: Match,
    #[serde(default, skip_serializing_if = "Set::is_empty")]
    pub set: Set,
    pub action: Verdict,
}

/// An ordered rule list with a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// What happens to a route no rule matches (default: accept).
    #[serde(default = "accept")]
    pub default: Verdict,
}

fn accept() -> Verdict {
    Verdict::Accept
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            default: Verdict::Accept,
        }
    }
}

/// The outcome for one route: accepted (by a rule, or by default) or rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Accepted by rule `Some(i)` or by the default.
    Accept(Option<usize>),
    Reject,
}

impl Policy {
    pub fn accept_all() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        for r in &self.rules {
            for p in &r.matches.prefixes {
                p.validate()?;
            }
        }
        Ok(())
    }

    pub fn evaluate(&self, prefix: &Prefix, a: &PathAttrs) -> Outcome {
        for (i, r) in self.rules.iter().enumerate() {
            if r.matches.matches(prefix, a) {
                return match r.action {
                    Verdict::Accept => Outcome::Accept(Some(i)),
                    Verdict::Reject => Outcome::Reject,
                };
            }
        }
        match self.default {
            Verdict::Accept => Outcome::Accept(None),
            Verdict::Reject => Outcome::Reject,
        }
    }

    /// The attributes after an accepting outcome: the same `Arc` when the rule sets
    /// nothing.
    pub fn apply(&self, outcome: Outcome, a: &Arc<PathAttrs>) -> Option<Arc<PathAttrs>> {
        match outcome {
            Outcome::Reject => None,
            Outcome::Accept(None) => Some(a.clone()),
            Outcome::Accept(Some(i)) => {
                let set = &self.rules[i].set;
                if set.is_empty() {
                    Some(a.clone())
                } else {
                    let mut m = (**a).clone();
                    set.apply(&mut m);
                    Some(Arc::new(m))
                }
            }
        }
    }

    /// Evaluate and apply in one step.
    pub fn run(&self, prefix: &Prefix, a: &Arc<PathAttrs>) -> Option<Arc<PathAttrs>> {
        self.apply(self.evaluate(prefix, a), a)
    }
}

// ----- text forms -----

/// Parses `ASN:VALUE`.
pub fn parse_community(s: &str) -> Result<Community, PolicyError> {
    match s {
        "no-export" | "NO_EXPORT" => return Ok(Community::NO_EXPORT),
        "no-advertise" | "NO_ADVERTISE" => return Ok(Community::NO_ADVERTISE),
        _ => {}
    }
    let bad = || PolicyError::Community(s.to_owned());
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    Ok(Community::new(
        a.parse().map_err(|_| bad())?,
        b.parse().map_err(|_| bad())?,
    ))
}

/// Parses `GLOBAL:DATA1:DATA2`.
pub fn parse_large_community(s: &str) -> Result<LargeCommunity, PolicyError> {
    let bad = || PolicyError::LargeCommunity(s.to_owned());
    let mut it = s.split(':').map(|x| x.parse::<u32>().map_err(|_| bad()));
    let (Some(a), Some(b), Some(c), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    Ok(LargeCommunity {
        global_admin: a?,
        local_data1: b?,
        local_data2: c?,
    })
}

/// A community as text.
pub struct CommunityText(pub Community);

impl fmt::Display for CommunityText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 .0 >> 16, self.0 .0 & 0xffff)
    }
}

mod prefix_string {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Prefix, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        let s = String::deserialize(d)?;
        Prefix::from_str(&s).map_err(serde::de::Error::custom)
    }
}

mod community_strings {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Community], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| CommunityText(*c).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Community>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| parse_community(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

mod large_community_strings {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[LargeCommunity], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| c.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LargeCommunity>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| parse_large_community(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bgp_wire::AsPath;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_list_ge_le() {
        let m = PrefixMatch {
            prefix: p("10.0.0.0/8"),
            ge: Some(16),
            le: Some(24),
        };
        assert!(m.matches(&p("10.1.0.0/16")));
        assert!(m.matches(&p("10.1.2.0/24")));
        assert!(!m.matches(&p("10.0.0.0/8")));
        assert!(!m.matches(&p("10.1.2.128/25")));
        assert!(!m.matches(&p("11.1.0.0/16")));
        assert!(!m.matches(&p("2001:db8::/32")));
        let exact = PrefixMatch::exact(p("10.0.0.0/8"));
        assert!(exact.matches(&p("10.0.0.0/8")) && !exact.matches(&p("10.0.0.0/9")));
        let le = PrefixMatch {
            prefix: p("10.0.0.0/8"),
            ge: None,
            le: Some(9),
        };
        assert!(
            le.matches(&p("10.0.0.0/8"))
                && le.matches(&p("10.128.0.0/9"))
                && !le.matches(&p("10.0.0.0/10"))
        );
        let bad = PrefixMatch {
            prefix: p("10.0.0.0/16"),
            ge: Some(8),
            le: None,
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn first_matching_rule_decides_and_sets_attributes() {
        let yaml = r#"
rules:
  - match: { communities: ["65000:666"] }
    action: reject
  - match: { prefixes: [{ prefix: 10.0.0.0/8, le: 32 }] }
    set: { local_pref: 200, add_communities: ["65000:1"], prepend_as: 65000, prepend_count: 2, med: 7 }
    action: accept
default: reject
"#;
        let pol: Policy = serde_yaml_from(yaml);
        pol.validate().unwrap();
        let a = Arc::new(PathAttrs {
            as_path: AsPath::sequence([65010]),
            ..PathAttrs::default()
        });
        let out = pol.run(&p("10.1.0.0/16"), &a).unwrap();
        assert_eq!(out.local_pref, Some(200));
        assert_eq!(out.med, Some(7));
        assert_eq!(out.communities, vec![Community::new(65000, 1)]);
        assert_eq!(out.as_path, AsPath::sequence([65000, 65000, 65010]));
        assert!(
            pol.run(&p("192.168.0.0/16"), &a).is_none(),
            "default reject"
        );
        let tagged = Arc::new(PathAttrs {
            communities: vec![Community::new(65000, 666)],
            ..PathAttrs::default()
        });
        assert!(pol.run(&p("10.1.0.0/16"), &tagged).is_none());
    }

    #[test]
    fn rule_without_changes_shares_the_attributes() {
        let pol = Policy {
            rules: vec![Rule {
                matches: Match::default(),
                set: Set::default(),
                action: Verdict::Accept,
            }],
            default: Verdict::Reject,
        };
        let a = Arc::new(PathAttrs::default());
        assert!(Arc::ptr_eq(&pol.run(&p("10.0.0.0/8"), &a).unwrap(), &a));
    }

    #[test]
    fn large_communities_match_and_set() {
        let lc = parse_large_community("65000:1:2").unwrap();
        assert!(parse_large_community("1:2").is_err());
        assert!(parse_community("70000:1").is_err());
        let m = Match {
            large_communities: vec![lc],
            ..Match::default()
        };
        let a = PathAttrs {
            large_communities: vec![lc],
            ..PathAttrs::default()
        };
        assert!(m.matches(&p("10.0.0.0/8"), &a));
        assert!(!m.matches(&p("10.0.0.0/8"), &PathAttrs::default()));
    }

    fn serde_yaml_from(s: &str) -> Policy {
        serde_yaml::from_str(s).unwrap()
    }
}
