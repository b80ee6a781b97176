//! The CNI protocol (spec 1.1.0, with 0.3.0, 0.3.1, 0.4.0 and 1.0.0 accepted): versions, the
//! environment, `CNI_ARGS`, errors and results exactly as the spec writes them.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt;
use std::net::IpAddr;

/// Versions Margay accepts, oldest first. VERSION reports them all.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version Margay implements.
pub const LATEST_VERSION: &str = "1.1.0";

/// A CNI spec version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u16>().ok());
        let v = Version(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }

    /// Whether Margay speaks this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED_VERSIONS
            .iter()
            .any(|s| Version::parse(s) == Some(self))
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version(0, 4, 0)
    }

    /// GC and STATUS exist from 1.1.0 on.
    pub fn has_gc_and_status(self) -> bool {
        self >= Version(1, 1, 0)
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` on each IP.
    fn ips_carry_version(self) -> bool {
        self < Version(1, 0, 0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

// ===== errors =====

/// The spec's well-known error codes, and Margay's own from 100 on (each is documented in
/// `docs/cni.md`).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_RESOURCES: u32 = 51;
    /// No pool can give this pod an address: every eligible pool is full or disabled.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A requested address (`ipAddrs` annotation or the `ips` capability) is taken or outside
    /// every pool.
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    /// The kernel refused a change (veth, address, route).
    pub const KERNEL: u32 = 102;
    /// The datastore refused a write for a reason retrying will not fix.
    pub const DATASTORE: u32 = 103;
    /// CHECK found the container's network not as the result says.
    pub const CHECK_FAILED: u32 = 104;
    /// ADD found an interface of the requested name (`CNI_IFNAME`) already in the container.
    pub const INTERFACE_EXISTS: u32 = 105;
}

/// An error as the spec writes it on stdout: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the runtime reads. `version` is the request's, or the latest when unknown.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

// ===== environment =====

/// The operation the runtime asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// The `CNI_*` environment of one invocation, checked as the spec requires for its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<String>,
}

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENVIRONMENT, msg, details)
}

/// The spec's rule for container IDs: alphanumerics, then also `_`, `.` and `-`.
fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The spec's rule for interface names: 1–15 bytes, not `.` or `..`, no `/`, `:` or white space.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Reads the environment through `get` (so tests need not touch the process environment).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = match get("CNI_COMMAND") {
            None => {
                return Err(env_error(
                    "CNI_COMMAND is not set",
                    "expected ADD, DEL, CHECK, VERSION, GC or STATUS",
                ))
            }
            Some(c) => Command::parse(&c).ok_or_else(|| {
                env_error(
                    format!("CNI_COMMAND {c:?} is not a CNI command"),
                    "expected ADD, DEL, CHECK, VERSION, GC or STATUS",
                )
            })?,
        };
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let container_id = nonempty("CNI_CONTAINERID");
        let netns = nonempty("CNI_NETNS");
        let ifname = nonempty("CNI_IFNAME");
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        let path = get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let env = Env {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        };
        env.check()?;
        Ok(env)
    }

    fn check(&self) -> Result<(), CniError> {
        let needs_container = matches!(self.command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(self.command, Command::Add | Command::Check);
        if needs_container {
            match &self.container_id {
                None => return Err(env_error("CNI_CONTAINERID is not set", "")),
                Some(id) if !valid_container_id(id) => {
                    return Err(env_error(
                        format!("CNI_CONTAINERID {id:?} is not a valid container ID"),
                        "it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
                    ))
                }
                Some(_) => {}
            }
            match &self.ifname {
                None => return Err(env_error("CNI_IFNAME is not set", "")),
                Some(n) if !valid_ifname(n) => {
                    return Err(env_error(
                        format!("CNI_IFNAME {n:?} is not a valid interface name"),
                        "it must be 1 to 15 characters without '/', ':' or white space, and not '.' or '..'",
                    ))
                }
                Some(_) => {}
            }
        }
        if needs_netns && self.netns.is_none() {
            return Err(env_error("CNI_NETNS is not set", ""));
        }
        Ok(())
    }

    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or("")
    }

    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or("eth0")
    }
}

/// `CNI_ARGS`: `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub infra_container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl CniArgs {
    /// Parses the pairs; unknown keys are an error unless `IgnoreUnknown` is true, as libcni
    /// plugins do.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut out = CniArgs::default();
        let mut unknown = Vec::new();
        let mut ignore_unknown = false;
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(env_error(
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                    "CNI_ARGS is a ';'-separated list of KEY=VALUE pairs",
                ));
            };
            if k.is_empty() {
                return Err(env_error(
                    format!("CNI_ARGS: {pair:?} has an empty key"),
                    "",
                ));
            }
            match k {
                "IgnoreUnknown" => {
                    ignore_unknown = match v.to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(env_error(
                                format!("CNI_ARGS: IgnoreUnknown={v:?} is not a boolean"),
                                "use 1, 0, true or false",
                            ))
                        }
                    }
                }
                "K8S_POD_NAMESPACE" => out.pod_namespace = Some(v.to_owned()),
                "K8S_POD_NAME" => out.pod_name = Some(v.to_owned()),
                "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = Some(v.to_owned()),
                "K8S_POD_UID" => out.pod_uid = Some(v.to_owned()),
                other => unknown.push(other.to_owned()),
            }
        }
        if !unknown.is_empty() && !ignore_unknown {
            return Err(env_error(
                format!("CNI_ARGS: unknown keys {}", unknown.join(", ")),
                "set IgnoreUnknown=1 to let Margay ignore arguments meant for other plugins",
            ));
        }
        Ok(out)
    }
}

// ===== results =====

/// An interface in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into the result's interfaces.
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// The result of ADD (and the prevResult of CHECK and DEL), independent of version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
}

impl CniResult {
    /// The JSON for a request of `version`: before 1.0.0 each IP carries its family, and only
    /// 1.1.0 results carry an interface MTU.
    pub fn to_json(&self, version: Version) -> Value {
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({ "address": ip.address.to_string() });
                if version.ips_carry_version() {
                    v["version"] = json!(if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    });
                }
                if let Some(gw) = ip.gateway {
                    v["gateway"] = json!(gw.to_string());
                }
                if let Some(i) = ip.interface {
                    v["interface"] = json!(i);
                }
                v
            })
            .collect();
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if version < Version(1, 1, 0) {
                    i.mtu = None;
                }
                serde_json::to_value(i).unwrap_or(Value::Null)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                v
            })
            .collect();
        let mut out = json!({ "cniVersion": version.to_string(), "ips": ips, "dns": {} });
        if !interfaces.is_empty() {
            out["interfaces"] = Value::Array(interfaces);
        }
        if !routes.is_empty() {
            out["routes"] = Value::Array(routes);
        }
        out
    }

    /// Reads a result of any supported version (a `prevResult`).
    pub fn from_json(v: &Value) -> Result<CniResult, CniError> {
        let bad =
            |what: String| CniError::new(code::DECODE_FAILURE, "prevResult does not decode", what);
        let mut out = CniResult::default();
        if let Some(ifaces) = v.get("interfaces") {
            out.interfaces = serde_json::from_value(ifaces.clone())
                .map_err(|e| bad(format!("interfaces: {e}")))?;
        }
        for (i, ip) in v
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpNet>().ok())
                .ok_or_else(|| bad(format!("ips[{i}].address is not a CIDR")))?;
            let gateway = match ip.get("gateway").and_then(Value::as_str) {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("ips[{i}].gateway {g:?} is not an address")))?,
                ),
                None => None,
            };
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            out.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        for (i, r) in v
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let dst = r
                .get("dst")
                .and_then(Value::as_str)
                .and_then(|d| d.parse::<IpNet>().ok())
                .ok_or_else(|| bad(format!("routes[{i}].dst is not a CIDR")))?;
            let gw = match r.get("gw").and_then(Value::as_str) {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("routes[{i}].gw {g:?} is not an address")))?,
                ),
                None => None,
            };
            out.routes.push(Route { dst, gw });
        }
        Ok(out)
    }
}

/// The answer to VERSION.
pub fn version_info() -> Value {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn versions_parse_and_order() {
        assert!(Version::parse("0.3.1").unwrap().is_supported());
        assert!(!Version::parse("0.2.0").unwrap().is_supported());
        assert!(!Version::parse("2.0.0").unwrap().is_supported());
        assert_eq!(Version::parse("1.1"), None);
        assert_eq!(Version::parse("1.1.0.0"), None);
        assert!(Version(0, 4, 0).has_check() && !Version(0, 3, 1).has_check());
        assert!(Version(1, 1, 0).has_gc_and_status() && !Version(1, 0, 0).has_gc_and_status());
    }

    #[test]
    fn environment_is_checked_per_command() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        assert!(env(&add).is_ok());
        // DEL needs no netns; VERSION needs nothing else.
        assert!(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok());
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        for (what, pairs) in [
            ("no command", vec![]),
            ("bad command", vec![("CNI_COMMAND", "ATTACH")]),
            (
                "no netns on ADD",
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                ],
            ),
            (
                "bad container id",
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "-a"),
                    ("CNI_IFNAME", "eth0"),
                ],
            ),
            (
                "long ifname",
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "averyveryverylongname"),
                ],
            ),
            (
                "bad args",
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "K8S_POD_NAME"),
                ],
            ),
        ] {
            let e = env(&pairs).expect_err(what);
            assert_eq!(e.code, code::INVALID_ENVIRONMENT, "{what}: {e}");
        }
    }

    #[test]
    fn cni_args_follow_ignore_unknown() {
        let a =
            CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar")
                .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert!(CniArgs::parse("K8S_POD_NAME=web;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn results_are_written_per_version_and_read_back() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("ee:ee:ee:ee:ee:ee".into()),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/x".into()),
            }],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
        };
        let old = r.to_json(Version(0, 3, 1));
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new = r.to_json(Version(1, 1, 0));
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["mtu"], 1450);
        assert_eq!(new["cniVersion"], "1.1.0");
        let mut back = CniResult::from_json(&new).unwrap();
        assert_eq!(back, r);
        back = CniResult::from_json(&old).unwrap();
        assert_eq!(back.ips, r.ips);
    }

    #[test]
    fn errors_are_written_as_the_spec_says() {
        let e = CniError::new(
            code::TRY_AGAIN_LATER,
            "datastore unreachable",
            "etcd at http://x: timeout",
        );
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion": "1.1.0", "code": 11, "msg": "datastore unreachable", "details": "etcd at http://x: timeout"})
        );
    }
}
