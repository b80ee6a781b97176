//! Tunnel devices: the VXLAN device `vxlan.margay` with its static neighbour and FDB entries
//! for remote VTEPs, and `tunl0` (IPIP) where the kernel has it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::link::{AddressOptions, LinkInfo};
use crate::route::Device;
use crate::{format_mac, KernelError, Mac, Netlink};

/// Name of Margay's VXLAN device.
pub const VXLAN_DEVICE: &str = "vxlan.margay";
/// Name of Margay's IPv6-underlay VXLAN device.
pub const VXLAN_DEVICE_V6: &str = "vxlan-v6.margay";
/// VXLAN network identifier (as Calico's default).
pub const VXLAN_VNI: u32 = 4096;
/// IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// The kernel's IPIP fallback device.
pub const IPIP_DEVICE: &str = "tunl0";

/// A permanent neighbour (ARP/NDP) entry: `<ip> lladdr <mac> dev <dev> nud permanent`.
/// For VXLAN: the remote VTEP's tunnel address and its device MAC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Neighbour {
    pub dev: Device,
    pub ip: IpAddr,
    pub mac: Mac,
}

impl fmt::Display for Neighbour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lladdr {} dev {}",
            self.ip,
            format_mac(&self.mac),
            self.dev
        )
    }
}

/// A bridge FDB entry on a VXLAN device: frames for `mac` go to the VTEP at `dst`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub dev: Device,
    pub mac: Mac,
    pub dst: IpAddr,
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} dev {} dst {}",
            format_mac(&self.mac),
            self.dev,
            self.dst
        )
    }
}

/// The VXLAN device Margay wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// This node's underlay address (the VTEP address).
    pub local: IpAddr,
    pub mac: Mac,
    pub mtu: u32,
    /// Index of the underlay device to bind to, if any.
    pub parent: Option<u32>,
}

impl VxlanSpec {
    /// Margay's defaults: `vxlan.margay`, VNI 4096, port 4789.
    pub fn margay(local: IpAddr, mac: Mac, mtu: u32) -> VxlanSpec {
        VxlanSpec {
            name: if local.is_ipv4() {
                VXLAN_DEVICE
            } else {
                VXLAN_DEVICE_V6
            }
            .to_string(),
            vni: VXLAN_VNI,
            port: VXLAN_PORT,
            local,
            mac,
            mtu,
            parent: None,
        }
    }

    fn matches(&self, l: &LinkInfo) -> bool {
        l.kind.as_deref() == Some("vxlan")
            && l.vxlan.as_ref().is_some_and(|p| {
                p.vni == Some(self.vni)
                    && p.port == Some(self.port)
                    && p.local == Some(self.local)
                    && p.learning == Some(false)
            })
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

/// The `RTM_NEWNEIGH`/`RTM_DELNEIGH` body for a neighbour entry on link `index`.
pub fn neighbour_message(n: &Neighbour, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match n.ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(neigh_addr(n.ip)));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(n.mac.to_vec()));
    m
}

/// The `RTM_NEWNEIGH`/`RTM_DELNEIGH` body (family `AF_BRIDGE`, `NTF_SELF`) for an FDB entry of
/// VXLAN device `index`.
pub fn fdb_message(e: &FdbEntry, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(neigh_addr(e.dst)));
    m
}

/// The `RTM_NEWLINK` body creating the VXLAN device.
pub fn vxlan_message(spec: &VxlanSpec) -> LinkMessage {
    let mut data = vec![InfoVxlan::Id(spec.vni)];
    match spec.local {
        IpAddr::V4(a) => data.push(InfoVxlan::Local(a)),
        IpAddr::V6(a) => data.push(InfoVxlan::Local6(a)),
    }
    if let Some(p) = spec.parent {
        data.push(InfoVxlan::Link(p));
    }
    data.push(InfoVxlan::Port(spec.port));
    data.push(InfoVxlan::Learning(false));
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
    m.attributes.push(LinkAttribute::Address(spec.mac.to_vec()));
    m.attributes.push(LinkAttribute::Mtu(spec.mtu));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        NlLinkInfo::Kind(InfoKind::Vxlan),
        NlLinkInfo::Data(InfoData::Vxlan(data)),
    ]));
    m
}

// ===== impl Netlink: tunnels =====

impl Netlink {
    /// Makes the VXLAN device match `spec` and be up: created if missing, recreated if its
    /// tunnel parameters (VNI, port, local address, learning) differ, MAC and MTU set in place
    /// otherwise. Idempotent. Returns the device.
    pub fn ensure_vxlan(&mut self, spec: &VxlanSpec) -> Result<LinkInfo, KernelError> {
        crate::link::validate_ifname(&spec.name)?;
        if let Some(l) = self.link(&spec.name)? {
            if spec.matches(&l) {
                if l.mac != Some(spec.mac) {
                    self.set_link_mac(&spec.name, spec.mac)?;
                }
                if l.mtu != spec.mtu {
                    self.set_link_mtu(&spec.name, spec.mtu)?;
                }
            } else {
                tracing::info!(dev = %spec.name, "VXLAN device differs from the wanted one; recreating it");
                self.delete_link(&spec.name)?;
                self.create_vxlan(spec)?;
            }
        } else {
            self.create_vxlan(spec)?;
        }
        self.set_link_up(&spec.name, true)?;
        self.link(&spec.name)?
            .ok_or_else(|| KernelError::NoSuchDevice {
                name: spec.name.clone(),
            })
    }

    fn create_vxlan(&mut self, spec: &VxlanSpec) -> Result<(), KernelError> {
        self.request(
            RouteNetlinkMessage::NewLink(vxlan_message(spec)),
            NLM_F_CREATE | NLM_F_EXCL,
            format!(
                "create vxlan device {} (vni {}, port {}, local {})",
                spec.name, spec.vni, spec.port, spec.local
            ),
        )
    }

    /// Adds or replaces a permanent neighbour entry.
    pub fn replace_neighbour(&mut self, n: &Neighbour) -> Result<(), KernelError> {
        one(self.apply(&[crate::WriteOp::ReplaceNeighbour(n.clone())]))
    }

    /// Deletes a neighbour entry; gone is success.
    pub fn delete_neighbour(&mut self, n: &Neighbour) -> Result<(), KernelError> {
        one(self.apply(&[crate::WriteOp::DeleteNeighbour(n.clone())]))
    }

    /// Adds or replaces an FDB entry.
    pub fn replace_fdb(&mut self, e: &FdbEntry) -> Result<(), KernelError> {
        one(self.apply(&[crate::WriteOp::ReplaceFdb(e.clone())]))
    }

    /// Deletes an FDB entry; gone is success.
    pub fn delete_fdb(&mut self, e: &FdbEntry) -> Result<(), KernelError> {
        one(self.apply(&[crate::WriteOp::DeleteFdb(e.clone())]))
    }

    /// Whether this kernel can make IPIP devices. `Ok(())` if so; otherwise the kernel's
    /// refusal, which says why (no `ipip` module: "Operation not supported").
    ///
    /// Cheap when `tunl0` exists already. Otherwise it creates and deletes a probe device,
    /// which loads the `ipip` module if it is available (and with it `tunl0`).
    pub fn ipip_probe(&mut self) -> Result<(), KernelError> {
        if let Some(l) = self.link(IPIP_DEVICE)? {
            if l.kind.as_deref() == Some("ipip") {
                return Ok(());
            }
        }
        let name = format!("mgipip{}", std::process::id() % 100_000);
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.clone()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(
                InfoKind::IpIp,
            )]));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("create probe ipip device {name}"),
        )?;
        self.delete_link(&name)
    }

    /// Ensures `tunl0` is up, with `mtu` and (if given) the address `addr/32`. Fails with the
    /// kernel's refusal where there is no IPIP.
    pub fn ensure_tunl0(
        &mut self,
        addr: Option<Ipv4Addr>,
        mtu: u32,
    ) -> Result<LinkInfo, KernelError> {
        if self.link(IPIP_DEVICE)?.is_none() {
            let mut m = LinkMessage::default();
            m.attributes
                .push(LinkAttribute::IfName(IPIP_DEVICE.to_string()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(
                    InfoKind::IpIp,
                )]));
            match self.request_errno(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE) {
                Ok(()) => {}
                // Loading the module created tunl0 first.
                Err(e) if e.errno == nix::errno::Errno::EEXIST as i32 => {}
                Err(e) => {
                    return Err(KernelError::refused(
                        "create ipip device tunl0",
                        e.errno,
                        e.ext,
                    ))
                }
            }
        }
        self.set_link_mtu(IPIP_DEVICE, mtu)?;
        if let Some(a) = addr {
            self.add_address(
                IPIP_DEVICE,
                IpNet::new(IpAddr::V4(a), 32).expect("valid"),
                AddressOptions::default(),
            )?;
        }
        self.set_link_up(IPIP_DEVICE, true)?;
        self.link(IPIP_DEVICE)?
            .ok_or_else(|| KernelError::NoSuchDevice {
                name: IPIP_DEVICE.into(),
            })
    }
}

fn one(mut v: Vec<Result<(), KernelError>>) -> Result<(), KernelError> {
    v.pop().unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdb_message_is_bridge_family_self() {
        let e = FdbEntry {
            dev: Device::Index(5),
            mac: [0x66, 0x5d, 0, 0, 0, 2],
            dst: "192.168.0.12".parse().unwrap(),
        };
        let m = fdb_message(&e, 5);
        assert_eq!(m.header.family, AddressFamily::Bridge);
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert!(m
            .attributes
            .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                "192.168.0.12".parse().unwrap()
            ))));
        assert_eq!(e.to_string(), "66:5d:00:00:00:02 dev if5 dst 192.168.0.12");
    }

    #[test]
    fn neighbour_message_is_permanent() {
        let n = Neighbour {
            dev: Device::Name(VXLAN_DEVICE.into()),
            ip: "10.65.2.0".parse().unwrap(),
            mac: [0x66, 0x5d, 0, 0, 0, 2],
        };
        let m = neighbour_message(&n, 9);
        assert_eq!(m.header.family, AddressFamily::Inet);
        assert_eq!(m.header.ifindex, 9);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert!(m
            .attributes
            .contains(&NeighbourAttribute::LinkLayerAddress(n.mac.to_vec())));
    }

    #[test]
    fn vxlan_message_has_margay_parameters() {
        let spec = VxlanSpec::margay(
            "192.168.0.11".parse().unwrap(),
            [0x66, 0x5d, 0, 0, 0, 1],
            1450,
        );
        assert_eq!(spec.name, "vxlan.margay");
        let m = vxlan_message(&spec);
        let info = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .unwrap();
        let NlLinkInfo::Data(InfoData::Vxlan(d)) = &info[1] else {
            panic!()
        };
        assert!(d.contains(&InfoVxlan::Id(4096)));
        assert!(d.contains(&InfoVxlan::Port(4789)));
        assert!(d.contains(&InfoVxlan::Learning(false)));
        assert!(d.contains(&InfoVxlan::Local("192.168.0.11".parse().unwrap())));
        assert_eq!(
            VxlanSpec::margay("fd00::11".parse().unwrap(), [0; 6], 1430).name,
            "vxlan-v6.margay"
        );
    }
}
