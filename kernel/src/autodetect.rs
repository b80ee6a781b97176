//! Choosing the node's address, as Calico's `IP_AUTODETECTION_METHOD` does:
//!
//! - `first-found`: the first global address on an interface that is not a known virtual one
//!   (`cali*`, `vxlan.margay`, `tunl0`, `docker*`, `veth*`, `lo`, ...);
//! - `interface=<regex>[,<regex>]`: the first address on an interface whose name matches;
//! - `skip-interface=<regex>[,<regex>]`: like first-found, skipping matching interfaces;
//! - `cidr=<cidr>[,<cidr>]`: the first address inside one of the ranges;
//! - `can-reach=<address or host>`: the source address the kernel picks towards it (no packet
//!   is sent: a UDP socket is connected and its local address read).

use ipnet::IpNet;
use regex::Regex;
use std::net::{IpAddr, SocketAddr, UdpSocket};

/// An address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    /// The address with the interface's prefix length.
    pub address: IpNet,
}

/// How to find the node's address.
#[derive(Clone, Debug)]
pub enum Method {
    FirstFound,
    Interface(Vec<Regex>),
    SkipInterface(Vec<Regex>),
    Cidr(Vec<IpNet>),
    CanReach(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AutodetectError {
    #[error("autodetection method {method:?} is not valid: {reason}")]
    InvalidMethod { method: String, reason: String },
    #[error("autodetection {method} found no IPv{family} address{}", if seen.is_empty() { String::new() } else { format!(" (saw {})", seen.join(", ")) })]
    NotFound {
        method: String,
        family: u8,
        seen: Vec<String>,
    },
    #[error("can-reach={target}: {reason}")]
    Unreachable { target: String, reason: String },
}

/// Interfaces Margay and container runtimes create; never the node's address.
const VIRTUAL_INTERFACES: &str = r"^(lo|cali.*|vxlan\.margay|vxlan-v6\.margay|tunl\d*|docker.*|cni.*|flannel.*|veth.*|virbr.*|kube-ipvs.*|nodelocaldns.*|br-.*)$";

impl Method {
    pub fn parse(s: &str) -> Result<Method, AutodetectError> {
        let invalid = |reason: String| AutodetectError::InvalidMethod {
            method: s.to_owned(),
            reason,
        };
        let regexes = |list: &str| -> Result<Vec<Regex>, AutodetectError> {
            list.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| Regex::new(&format!("^(?:{p})$")).map_err(|e| invalid(e.to_string())))
                .collect()
        };
        let s = s.trim();
        if s.is_empty() || s == "first-found" {
            return Ok(Method::FirstFound);
        }
        let (key, value) = s.split_once('=').ok_or_else(|| {
            invalid("expected first-found, interface=, skip-interface=, cidr= or can-reach=".into())
        })?;
        if value.is_empty() {
            return Err(invalid(format!("{key}= needs a value")));
        }
        Ok(match key {
            "interface" => Method::Interface(regexes(value)?),
            "skip-interface" => Method::SkipInterface(regexes(value)?),
            "cidr" => Method::Cidr(
                value
                    .split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<IpNet>()
                            .map(|n| n.trunc())
                            .map_err(|_| invalid(format!("{c:?} is not a CIDR")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "can-reach" => Method::CanReach(value.to_owned()),
            other => return Err(invalid(format!("unknown method {other:?}"))),
        })
    }

    fn describe(&self) -> String {
        match self {
            Method::FirstFound => "first-found".into(),
            Method::Interface(r) => format!("interface={}", join(r)),
            Method::SkipInterface(r) => format!("skip-interface={}", join(r)),
            Method::Cidr(c) => format!(
                "cidr={}",
                c.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Method::CanReach(t) => format!("can-reach={t}"),
        }
    }

    /// Picks the node's address of one family from the machine's interface addresses.
    pub fn select(
        &self,
        addresses: &[InterfaceAddress],
        v6: bool,
    ) -> Result<InterfaceAddress, AutodetectError> {
        let family = |a: &&InterfaceAddress| a.address.addr().is_ipv6() == v6;
        let usable = |a: &&InterfaceAddress| is_usable(&a.address.addr());
        let virtual_re = Regex::new(VIRTUAL_INTERFACES).expect("constant regex");
        let mut candidates = addresses.iter().filter(family).filter(usable);
        let found = match self {
            Method::FirstFound => candidates
                .find(|a| !virtual_re.is_match(&a.interface))
                .cloned(),
            Method::Interface(res) => candidates
                .find(|a| res.iter().any(|r| r.is_match(&a.interface)))
                .cloned(),
            Method::SkipInterface(res) => candidates
                .find(|a| {
                    !virtual_re.is_match(&a.interface)
                        && !res.iter().any(|r| r.is_match(&a.interface))
                })
                .cloned(),
            Method::Cidr(nets) => candidates
                .find(|a| nets.iter().any(|n| n.contains(&a.address.addr())))
                .cloned(),
            Method::CanReach(target) => {
                let src = source_towards(target, v6)?;
                // Report the address with its interface's prefix length when we know it.
                return Ok(addresses
                    .iter()
                    .find(|a| a.address.addr() == src)
                    .cloned()
                    .unwrap_or(InterfaceAddress {
                        interface: String::new(),
                        address: IpNet::from(src),
                    }));
            }
        };
        found.ok_or_else(|| AutodetectError::NotFound {
            method: self.describe(),
            family: if v6 { 6 } else { 4 },
            seen: addresses
                .iter()
                .map(|a| format!("{} on {}", a.address, a.interface))
                .collect(),
        })
    }
}

fn join(r: &[Regex]) -> String {
    r.iter()
        .map(|r| {
            let s = r.as_str();
            s.strip_prefix("^(?:")
                .and_then(|s| s.strip_suffix(")$"))
                .unwrap_or(s)
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Addresses that can identify a node: not loopback, link-local, multicast or unspecified.
fn is_usable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The source address the kernel would use towards `target` (`addr`, `addr:port` or a host
/// name). Connecting a UDP socket sends nothing.
pub fn source_towards(target: &str, v6: bool) -> Result<IpAddr, AutodetectError> {
    use std::net::ToSocketAddrs;
    let unreachable = |reason: String| AutodetectError::Unreachable {
        target: target.to_owned(),
        reason,
    };
    let with_port = if target.parse::<IpAddr>().is_ok() {
        match target.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]:53"),
            Ok(a) => format!("{a}:53"),
            Err(_) => unreachable!("checked above"),
        }
    } else if target.parse::<SocketAddr>().is_ok() {
        target.to_owned()
    } else {
        format!("{target}:53")
    };
    let dest = with_port
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .find(|a| a.is_ipv6() == v6)
        .ok_or_else(|| unreachable(format!("no IPv{} address", if v6 { 6 } else { 4 })))?;
    let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .expect("constant address");
    let sock = UdpSocket::bind(bind).map_err(|e| unreachable(e.to_string()))?;
    sock.connect(dest)
        .map_err(|e| unreachable(format!("no route: {e}")))?;
    Ok(sock
        .local_addr()
        .map_err(|e| unreachable(e.to_string()))?
        .ip())
}

/// The machine's interface addresses, in interface order.
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, nix::Error> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones() as u8).ok()
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            IpNet::new(IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones() as u8).ok()
        } else {
            None
        };
        if let Some(address) = net {
            out.push(InterfaceAddress {
                interface: ifa.interface_name,
                address,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<InterfaceAddress> {
        [
            ("lo", "127.0.0.1/8"),
            ("cali1234567890a", "169.254.1.1/32"),
            ("docker0", "172.17.0.1/16"),
            ("eth0", "fe80::1/64"),
            ("eth0", "192.168.1.10/24"),
            ("eth1", "10.10.0.5/16"),
            ("eth1", "fd00:10::5/64"),
            ("vxlan.margay", "10.244.3.0/32"),
        ]
        .into_iter()
        .map(|(i, a)| InterfaceAddress {
            interface: i.into(),
            address: a.parse().unwrap(),
        })
        .collect()
    }

    fn pick(method: &str, v6: bool) -> Result<String, AutodetectError> {
        Method::parse(method)?
            .select(&addrs(), v6)
            .map(|a| format!("{} {}", a.interface, a.address))
    }

    #[test]
    fn methods_pick_as_calico_does() {
        assert_eq!(pick("first-found", false).unwrap(), "eth0 192.168.1.10/24");
        assert_eq!(pick("", false).unwrap(), "eth0 192.168.1.10/24");
        assert_eq!(pick("first-found", true).unwrap(), "eth1 fd00:10::5/64");
        assert_eq!(pick("interface=eth1", false).unwrap(), "eth1 10.10.0.5/16");
        assert_eq!(
            pick("interface=en.*,eth1", false).unwrap(),
            "eth1 10.10.0.5/16"
        );
        assert_eq!(
            pick("skip-interface=eth0", false).unwrap(),
            "eth1 10.10.0.5/16"
        );
        assert_eq!(pick("cidr=10.0.0.0/8", false).unwrap(), "eth1 10.10.0.5/16");
        // A regex must match the whole name: "eth" alone matches nothing.
        assert!(matches!(
            pick("interface=eth", false),
            Err(AutodetectError::NotFound { .. })
        ));
        let err = pick("cidr=172.16.99.0/24", false).unwrap_err();
        assert!(err.to_string().contains("found no IPv4 address"), "{err}");
    }

    #[test]
    fn bad_methods_are_refused_with_the_reason() {
        for m in [
            "interface=",
            "cidr=10.0.0.300/8",
            "bogus=1",
            "nonsense",
            "interface=(eth",
        ] {
            assert!(
                matches!(Method::parse(m), Err(AutodetectError::InvalidMethod { .. })),
                "{m}"
            );
        }
    }

    #[test]
    fn can_reach_uses_the_kernels_source_address() {
        let got = Method::parse("can-reach=127.0.0.1")
            .unwrap()
            .select(&[], false)
            .unwrap();
        assert_eq!(got.address.addr(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_machines_addresses_can_be_read() {
        let all = interface_addresses().expect("getifaddrs");
        assert!(
            all.iter()
                .any(|a| a.interface == "lo" && a.address.addr().is_loopback()),
            "{all:?}"
        );
    }
}
