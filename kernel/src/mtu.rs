//! Host MTU detection and pod MTU arithmetic.

use crate::route::{Family, KernelRoute, RouteFilter, MAIN_TABLE};
use crate::{KernelError, Netlink};

/// An encapsulation that eats into the pod MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// Plain routing: no overhead.
    None,
    /// IP-in-IP: an outer IPv4 header.
    Ipip,
    /// VXLAN over an IPv4 underlay: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
    VxlanV4,
    /// VXLAN over an IPv6 underlay: outer IPv6 (40) + 8 + 8 + 14.
    VxlanV6,
}

impl Encap {
    /// Bytes of overhead per packet.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::None => 0,
            Encap::Ipip => 20,
            Encap::VxlanV4 => 50,
            Encap::VxlanV6 => 70,
        }
    }
}

/// The pod MTU for `host_mtu` when any of `encaps` may carry pod traffic: the host MTU less the
/// largest overhead (pods cannot know which path a packet takes). Saturates at 0.
pub fn pod_mtu(host_mtu: u32, encaps: &[Encap]) -> u32 {
    let overhead = encaps.iter().map(|e| e.overhead()).max().unwrap_or(0);
    host_mtu.saturating_sub(overhead)
}

impl Netlink {
    /// The MTU of the interface named `iface`, or, without a name, of the interface carrying
    /// the main table's IPv4 default route (IPv6 if there is no IPv4 one). When the default
    /// route has several next hops the smallest MTU of them is taken.
    pub fn host_mtu(&mut self, iface: Option<&str>) -> Result<u32, KernelError> {
        if let Some(name) = iface {
            return self
                .link(name)?
                .map(|l| l.mtu)
                .ok_or_else(|| KernelError::NoSuchDevice {
                    name: name.to_string(),
                });
        }
        for fam in [Family::V4, Family::V6] {
            let routes = self.routes(&RouteFilter {
                family: Some(fam),
                table: Some(MAIN_TABLE),
                ..Default::default()
            })?;
            let mut best: Option<u32> = None;
            let oifs: Vec<u32> = routes
                .iter()
                .filter(|r| r.dst.prefix_len() == 0)
                .flat_map(KernelRoute::oifs)
                .collect();
            for oif in oifs {
                if let Some(l) = self.link_by_index(oif)? {
                    best = Some(best.map_or(l.mtu, |b| b.min(l.mtu)));
                }
            }
            if let Some(m) = best {
                return Ok(m);
            }
        }
        Err(KernelError::Invalid(
            "no default route with an output device: name the host interface (e.g. mtuIface: eth0)"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overheads() {
        assert_eq!(pod_mtu(1500, &[]), 1500);
        assert_eq!(pod_mtu(1500, &[Encap::None]), 1500);
        assert_eq!(pod_mtu(1500, &[Encap::Ipip]), 1480);
        assert_eq!(pod_mtu(1500, &[Encap::VxlanV4]), 1450);
        assert_eq!(pod_mtu(1500, &[Encap::VxlanV6]), 1430);
        assert_eq!(pod_mtu(9001, &[Encap::VxlanV4]), 8951);
    }

    #[test]
    fn largest_overhead_wins() {
        assert_eq!(pod_mtu(1500, &[Encap::Ipip, Encap::VxlanV4]), 1450);
        assert_eq!(
            pod_mtu(1500, &[Encap::VxlanV6, Encap::Ipip, Encap::VxlanV4]),
            1430
        );
    }

    #[test]
    fn saturates() {
        assert_eq!(pod_mtu(40, &[Encap::VxlanV4]), 0);
    }
}
