//! Types and checks shared by several resources.

use crate::validation::ValidationErrors;
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A status condition, in the shape Kubernetes tooling understands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The aspect this condition describes, e.g. `Valid` or `Overlapping`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase machine-readable reason.
    #[serde(default)]
    pub reason: String,
    /// A sentence for people.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// How traffic to another node's pods is encapsulated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum EncapMode {
    /// Never encapsulate: the fabric routes pod addresses.
    #[default]
    Never,
    /// Always encapsulate.
    Always,
    /// Encapsulate only towards nodes outside the local subnet.
    CrossSubnet,
}

impl EncapMode {
    pub fn is_enabled(self) -> bool {
        self != EncapMode::Never
    }
}

/// A reference to one key of a Kubernetes Secret (in Margay's namespace).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret.
    pub key: String,
}

/// A BGP password taken from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPassword {
    pub secret_key_ref: SecretKeyRef,
}

impl BGPPassword {
    pub(crate) fn check(&self, path: &str, errs: &mut ValidationErrors) {
        let r = &self.secret_key_ref;
        if !crate::names::is_dns_subdomain(&r.name) {
            errs.add(
                format!("{path}.secretKeyRef.name"),
                &r.name,
                "must name a Secret (a lower-case DNS subdomain)",
            );
        }
        if r.key.is_empty()
            || !r
                .key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errs.add(
                format!("{path}.secretKeyRef.key"),
                &r.key,
                "must be a Secret key (letters, digits, '-', '_', '.')",
            );
        }
    }
}

/// Parses a CIDR that must have no host bits set. Errors say what the masked form would be.
pub fn parse_masked_cidr(path: &str, value: &str, errs: &mut ValidationErrors) -> Option<IpNet> {
    match value.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Some(net),
        Ok(net) => {
            errs.add(
                path,
                value,
                format!("has host bits set; did you mean {}?", net.trunc()),
            );
            None
        }
        Err(_) => {
            errs.add(
                path,
                value,
                "is not a CIDR (expected e.g. 10.244.0.0/16 or fd00:10:244::/64)",
            );
            None
        }
    }
}

/// Parses a Go-style duration such as `90s`, `1m30s`, `2h` or `500ms`, as Calico and
/// Kubernetes write them.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let num: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => num / 1e9,
            "us" | "µs" => num / 1e6,
            "ms" => num / 1e3,
            "s" => num,
            "m" => num * 60.0,
            "h" => num * 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += Duration::try_from_secs_f64(secs).ok()?;
    }
    Some(total)
}

/// Checks an optional duration field.
pub(crate) fn check_duration(path: &str, value: &Option<String>, errs: &mut ValidationErrors) {
    if let Some(v) = value {
        if parse_duration(v).is_none() {
            errs.add(path, v, "is not a duration (expected e.g. 30s, 1m30s, 2h)");
        }
    }
}

/// Checks an AS number: 0 is reserved (RFC 7607) and 23456 is AS_TRANS (RFC 6793).
pub(crate) fn check_as_number(path: &str, asn: u32, errs: &mut ValidationErrors) {
    match asn {
        0 => errs.add(path, asn, "AS 0 is reserved (RFC 7607) and cannot be used"),
        23456 => errs.add(
            path,
            asn,
            "AS 23456 is AS_TRANS (RFC 6793), a placeholder that cannot be a real AS",
        ),
        _ => {}
    }
}

/// Checks a selector expression field.
pub(crate) fn check_selector(path: &str, value: &str, errs: &mut ValidationErrors) {
    if let Err(e) = crate::selector::Selector::parse(value) {
        errs.add(
            path,
            value,
            format!(
                "is not a valid selector: at offset {}: {}",
                e.offset, e.message
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "s", "10", "10x", "1m-3s", "--"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
