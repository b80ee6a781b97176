//! Links and addresses: veth pairs for pods, moving a link into a pod's namespace, MTU, up,
//! addresses, listing `cali*` links.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags as NlAddressFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo,
    LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::netlink::{gone, REPLACE};
use crate::route::Route;
use crate::{format_mac, KernelError, Mac, Netlink};

/// What the kernel says about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND`: `veth`, `vxlan`, `ipip`, `bridge`…
    pub kind: Option<String>,
    /// VXLAN parameters, for `kind == "vxlan"`.
    pub vxlan: Option<VxlanParams>,
}

/// The parameters that identify a VXLAN device's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
}

/// A veth pair to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// The end that stays in this namespace (`cali…`).
    pub name: String,
    pub mac: Option<Mac>,
    /// The other end.
    pub peer_name: String,
    pub peer_mac: Option<Mac>,
    pub mtu: Option<u32>,
    /// Create the peer directly inside this namespace (by path), instead of here.
    pub peer_netns: Option<std::path::PathBuf>,
}

/// Options of an address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressOptions {
    /// IPv6: skip duplicate address detection (the address is usable at once).
    pub nodad: bool,
    /// Do not add the prefix route the kernel adds for the address's subnet.
    pub noprefixroute: bool,
}

/// Checks a Linux interface name: 1–15 bytes, no `/`, whitespace or `:`.
pub fn validate_ifname(name: &str) -> Result<(), KernelError> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(KernelError::Invalid(format!(
            "{name:?} is not a Linux interface name (1-15 bytes, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// The IPv6 link-local address the kernel derives from `mac` (EUI-64): the address a pod
/// uses as its IPv6 default gateway, the host side of its veth.
pub fn ipv6_link_local(mac: &Mac) -> Ipv6Addr {
    let b = [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    Ipv6Addr::from(b)
}

/// The gateway pods use: the host side answers ARP for it by proxy ARP.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The MAC of the host side of every pod veth.
pub const HOST_VETH_MAC: Mac = [0xee; 6];

/// The routes inside a pod: `169.254.1.1 dev <iface> scope link` and `default via 169.254.1.1
/// dev <iface>` for IPv4; `default via <host link-local> dev <iface>` for IPv6.
pub fn pod_routes(iface: &str, v4: bool, v6_gateway: Option<Ipv6Addr>) -> Vec<Route> {
    let mut out = Vec::new();
    if v4 {
        out.push(Route::dev(
            IpNet::new(IpAddr::V4(POD_GATEWAY_V4), 32).expect("valid"),
            iface,
        ));
        out.push(Route::via_dev(
            "0.0.0.0/0".parse().expect("valid"),
            IpAddr::V4(POD_GATEWAY_V4),
            iface,
            false,
        ));
    }
    if let Some(gw) = v6_gateway {
        out.push(Route::via_dev(
            "::/0".parse().expect("valid"),
            IpAddr::V6(gw),
            iface,
            false,
        ));
    }
    out
}

pub(crate) fn decode_link(m: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(v) => info.mtu = *v,
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(b);
                info.mac = Some(mac);
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(kind_name(k)),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut p = VxlanParams {
                                vni: None,
                                port: None,
                                local: None,
                                learning: None,
                            };
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => p.vni = Some(*id),
                                    InfoVxlan::Port(port) => p.port = Some(*port),
                                    InfoVxlan::Local(a) => p.local = Some((*a).into()),
                                    InfoVxlan::Local6(a) => p.local = Some((*a).into()),
                                    InfoVxlan::Learning(l) => p.learning = Some(*l),
                                    _ => {}
                                }
                            }
                            info.vxlan = Some(p);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::IpIp => "ipip".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m
}

fn open_netns(path: &Path) -> Result<File, KernelError> {
    File::open(path).map_err(|e| KernelError::Netns {
        path: path.to_path_buf(),
        op: "open",
        source: e,
    })
}

/// The `RTM_NEWLINK` body creating a veth pair.
pub fn veth_message(spec: &VethSpec, peer_netns_fd: Option<i32>) -> LinkMessage {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.peer_name.clone()));
    if let Some(mac) = spec.peer_mac {
        peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    if let Some(mtu) = spec.mtu {
        peer.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(fd) = peer_netns_fd {
        peer.attributes.push(LinkAttribute::NetNsFd(fd));
    }
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
    if let Some(mac) = spec.mac {
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    if let Some(mtu) = spec.mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        NlLinkInfo::Kind(InfoKind::Veth),
        NlLinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    m
}

/// The `RTM_NEWADDR`/`RTM_DELADDR` body for `addr` on link `index`.
pub fn address_message(index: u32, addr: IpNet, opts: AddressOptions) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = match addr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    m.header.prefix_len = addr.prefix_len();
    m.header.index = index;
    m.header.scope = AddressScope::Universe;
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    let mut flags = NlAddressFlags::empty();
    if opts.nodad {
        flags |= NlAddressFlags::Nodad;
    }
    if opts.noprefixroute {
        flags |= NlAddressFlags::Noprefixroute;
    }
    if !flags.is_empty() {
        m.attributes.push(AddressAttribute::Flags(flags));
    }
    m
}

// ===== impl Netlink: links =====

impl Netlink {
    /// The link named `name`, if any.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkInfo>, KernelError> {
        validate_ifname(name)?;
        match self.get(RouteNetlinkMessage::GetLink(by_name(name)), "get link")? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(Some(decode_link(&l))),
            _ => Ok(None),
        }
    }

    /// The link with index `index`, if any.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkInfo>, KernelError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.get(RouteNetlinkMessage::GetLink(m), "get link")? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(Some(decode_link(&l))),
            _ => Ok(None),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, KernelError> {
        Ok(self
            .dump(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                "dump links",
            )?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(decode_link(l)),
                _ => None,
            })
            .collect())
    }

    /// The links whose names start with `prefix` (`"cali"`).
    pub fn links_with_prefix(&mut self, prefix: &str) -> Result<Vec<LinkInfo>, KernelError> {
        let mut v: Vec<LinkInfo> = self
            .links()?
            .into_iter()
            .filter(|l| l.name.starts_with(prefix))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    fn index_of(&mut self, name: &str) -> Result<u32, KernelError> {
        validate_ifname(name)?;
        self.link_index(name)?
            .ok_or_else(|| KernelError::NoSuchDevice {
                name: name.to_string(),
            })
    }

    /// Creates a veth pair (fails if `spec.name` exists).
    pub fn create_veth(&mut self, spec: &VethSpec) -> Result<(), KernelError> {
        validate_ifname(&spec.name)?;
        validate_ifname(&spec.peer_name)?;
        let ns = spec.peer_netns.as_deref().map(open_netns).transpose()?;
        let msg = veth_message(spec, ns.as_ref().map(|f| f.as_raw_fd()));
        // `ns` stays open until the kernel has answered.
        let r = self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("create veth {} (peer {})", spec.name, spec.peer_name),
        );
        drop(ns);
        r
    }

    /// Moves link `name` into the namespace at `netns`.
    pub fn move_link_to_netns(&mut self, name: &str, netns: &Path) -> Result<(), KernelError> {
        let index = self.index_of(name)?;
        let ns = open_netns(netns)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        let r = self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            format!("move link {name} to {}", netns.display()),
        );
        drop(ns);
        r
    }

    /// Moves link `name` into `netns` and renames it `new_name` there, using a connection
    /// opened inside that namespace. Returns that connection, for configuring the link further.
    pub fn move_link_and_rename(
        &mut self,
        name: &str,
        netns: &Path,
        new_name: &str,
    ) -> Result<Netlink, KernelError> {
        validate_ifname(new_name)?;
        self.move_link_to_netns(name, netns)?;
        let mut there = Netlink::open_in(netns)?;
        if name != new_name {
            there.rename_link(name, new_name)?;
        }
        Ok(there)
    }

    /// Renames a link (it must be down).
    pub fn rename_link(&mut self, name: &str, new_name: &str) -> Result<(), KernelError> {
        validate_ifname(new_name)?;
        let index = self.index_of(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes
            .push(LinkAttribute::IfName(new_name.to_string()));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            format!("rename link {name} to {new_name}"),
        )
    }

    pub fn set_link_mtu(&mut self, name: &str, mtu: u32) -> Result<(), KernelError> {
        let index = self.index_of(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            format!("set mtu {mtu} on {name}"),
        )
    }

    pub fn set_link_mac(&mut self, name: &str, mac: Mac) -> Result<(), KernelError> {
        let index = self.index_of(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            format!("set address {} on {name}", format_mac(&mac)),
        )
    }

    /// Sets a link administratively up or down.
    pub fn set_link_up(&mut self, name: &str, up: bool) -> Result<(), KernelError> {
        let index = self.index_of(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        if up {
            m.header.flags = LinkFlags::Up;
        }
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            format!("set {name} {}", if up { "up" } else { "down" }),
        )
    }

    /// Deletes a link (for a veth, both ends). A link already gone is success.
    pub fn delete_link(&mut self, name: &str) -> Result<(), KernelError> {
        validate_ifname(name)?;
        match self.request_errno(RouteNetlinkMessage::DelLink(by_name(name)), 0) {
            Ok(()) => Ok(()),
            Err(e) if e.errno == nix::errno::Errno::ENODEV as i32 || gone(e.errno) => Ok(()),
            Err(e) => Err(KernelError::refused(
                format!("delete link {name}"),
                e.errno,
                e.ext,
            )),
        }
    }

    // ===== addresses =====

    /// Adds `addr` to link `name`, replacing an existing entry for it.
    pub fn add_address(
        &mut self,
        name: &str,
        addr: IpNet,
        opts: AddressOptions,
    ) -> Result<(), KernelError> {
        let index = self.index_of(name)?;
        self.request(
            RouteNetlinkMessage::NewAddress(address_message(index, addr, opts)),
            REPLACE,
            format!("add address {addr} to {name}"),
        )
    }

    /// Removes `addr` from link `name`; gone (or no such link) is success.
    pub fn delete_address(&mut self, name: &str, addr: IpNet) -> Result<(), KernelError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(());
        };
        match self.request_errno(
            RouteNetlinkMessage::DelAddress(address_message(
                index,
                addr,
                AddressOptions::default(),
            )),
            0,
        ) {
            Ok(()) => Ok(()),
            Err(e) if gone(e.errno) || e.errno == nix::errno::Errno::EADDRNOTAVAIL as i32 => Ok(()),
            Err(e) => Err(KernelError::refused(
                format!("delete address {addr} from {name}"),
                e.errno,
                e.ext,
            )),
        }
    }

    /// The addresses on link `name` (IPv4 and IPv6, link-local included).
    pub fn addresses(&mut self, name: &str) -> Result<Vec<IpNet>, KernelError> {
        let index = self.index_of(name)?;
        let mut out = Vec::new();
        for m in self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "dump addresses",
        )? {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                if let Ok(n) = IpNet::new(ip, a.header.prefix_len) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_from_host_veth_mac() {
        assert_eq!(
            ipv6_link_local(&HOST_VETH_MAC),
            "fe80::ecee:eeff:feee:eeee".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_link_local(&[0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            "fe80::42:acff:fe11:2".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn pod_routes_are_calico_shaped() {
        let r = pod_routes("eth0", true, Some(ipv6_link_local(&HOST_VETH_MAC)));
        let s: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            s,
            vec![
                "169.254.1.1/32 dev eth0 scope link table 254",
                "0.0.0.0/0 via 169.254.1.1 dev eth0 table 254",
                "::/0 via fe80::ecee:eeff:feee:eeee dev eth0 table 254",
            ]
        );
        assert!(pod_routes("eth0", false, None).is_empty());
    }

    #[test]
    fn ifnames() {
        assert!(validate_ifname("cali1234567890a").is_ok());
        assert!(validate_ifname("cali1234567890ab").is_err(), "16 bytes");
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("vxlan.margay").is_ok());
    }

    #[test]
    fn veth_message_carries_both_ends() {
        let spec = VethSpec {
            name: "cali0123456789a".into(),
            mac: Some(HOST_VETH_MAC),
            peer_name: "tmp0123".into(),
            peer_mac: None,
            mtu: Some(1450),
            peer_netns: None,
        };
        let m = veth_message(&spec, None);
        assert!(m
            .attributes
            .contains(&LinkAttribute::IfName("cali0123456789a".into())));
        assert!(m.attributes.contains(&LinkAttribute::Mtu(1450)));
        let info = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .unwrap();
        assert_eq!(info[0], NlLinkInfo::Kind(InfoKind::Veth));
        let NlLinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = &info[1] else {
            panic!("no peer")
        };
        assert!(p
            .attributes
            .contains(&LinkAttribute::IfName("tmp0123".into())));
        assert!(p.attributes.contains(&LinkAttribute::Mtu(1450)));
    }

    #[test]
    fn address_message_v6_nodad() {
        let m = address_message(
            3,
            "fd00:65::5/128".parse().unwrap(),
            AddressOptions {
                nodad: true,
                noprefixroute: false,
            },
        );
        assert_eq!(m.header.prefix_len, 128);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert!(m
            .attributes
            .contains(&AddressAttribute::Flags(NlAddressFlags::Nodad)));
    }
}
