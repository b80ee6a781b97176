//! `margay-kernel`: Margay's one layer that talks to the Linux kernel.
//!
//! Used by the node agent `margay-node` (routes, tunnel devices, NAT, sysctls, MTU), by
//! `margay-bgpd` (installing learned routes) and by the CNI plugin (veths, pod addresses and
//! routes). Everything here speaks rtnetlink directly over sockets it owns; the only exception is
//! NAT, which drives the `nft` command (see [`nat`]). See `docs/kernel.md`.
//!
//! The main entry points:
//!
//! - [`Netlink`]: a synchronous rtnetlink connection, opened in the caller's network namespace
//!   or in another one ([`Netlink::open_in`]). Links, addresses, routes, neighbours, FDB
//!   entries, dumps. The CNI plugin uses it directly.
//! - [`RouteWriter`]: the single kernel-route writer of a long-running process. One thread owns
//!   one [`Netlink`]; callers submit [`WriteOp`]s and get one result per operation back.
//!   Requests are pipelined many per `sendmsg`.
//! - [`events`]: link and route change notifications as an async stream, plus a coalescer.
//! - [`netns`]: named network namespaces and running code inside one.
//! - [`sysctl`], [`mtu`], [`nat`].
//! - [`autodetect`]: finding the node's address the ways Calico users know (margay-node and
//!   margay-bgpd's cluster route reflector).
//!
//! Every route Margay writes carries [`MARGAY_RT_PROTO`]; deletes of things already gone are
//! success; adds replace.

pub mod autodetect;
pub mod error;
pub mod events;
pub mod link;
pub mod mtu;
pub mod nat;
pub mod netlink;
pub mod netns;
pub mod route;
pub mod sysctl;
pub mod tunnel;
pub mod writer;

pub use error::KernelError;
pub use link::{AddressOptions, LinkInfo, VethSpec};
pub use netlink::Netlink;
pub use route::{
    Device, Family, KernelPathHop, KernelRoute, NextHop, PathHop, Route, RouteFilter, RouteKey,
    RouteType, WriteOp, MAIN_TABLE, MARGAY_RT_PROTO,
};
pub use tunnel::{FdbEntry, Neighbour, VxlanSpec};
pub use writer::{RouteWriter, SweepReport};

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC address the way `ip link` prints it.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac, KernelError> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || {
        KernelError::Invalid(format!(
            "{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
        ))
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(bad());
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("ee:ee:ee:ee:ee:ee").unwrap();
        assert_eq!(mac, [0xee; 6]);
        assert_eq!(
            format_mac(&[0x02, 0, 0x5e, 0x10, 0xab, 0x01]),
            "02:00:5e:10:ab:01"
        );
        assert!(parse_mac("ee:ee:ee:ee:ee").is_err());
        assert!(parse_mac("ee:ee:ee:ee:ee:eg").is_err());
        assert!(parse_mac("eee:ee:ee:ee:ee:e").is_err());
    }
}
