//! The kernel side of an attachment, through `margay-kernel`: the cali veth, the pod's
//! addresses and routes, the host route, and the sysctls of the host end.
//!
//! "The node" is the plugin's own network namespace, or `node_netns` from the configuration
//! (the lab and the tests run nodes as namespaces while the datastore stays reachable from the
//! plugin's own namespace). Every host-side change happens there.

use ipnet::IpNet;
use margay_kernel::link::{ipv6_link_local, pod_routes, HOST_VETH_MAC, POD_GATEWAY_V4};
use margay_kernel::{
    netns, sysctl, AddressOptions, Device, KernelError, Mac, Netlink, Route, RouteFilter, VethSpec,
    WriteOp, MAIN_TABLE,
};
use std::net::IpAddr;
use std::path::Path;

/// Opens a netlink connection in the node's namespace.
pub fn open_node(node_netns: Option<&Path>) -> Result<Netlink, KernelError> {
    match node_netns {
        Some(p) => Netlink::open_in(p),
        None => Netlink::open(),
    }
}

/// Runs `f` in the node's namespace (sysctls under `/proc/sys/net` follow the thread's).
fn in_node<T: Send>(
    node_netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, KernelError> {
    match node_netns {
        Some(p) => netns::run_in(p, f),
        None => Ok(f()),
    }
}

/// Whether `path` is a namespace file (`nsfs`: a bind mount under `/var/run/netns`, or
/// `/proc/<pid>/ns/net`). A statfs, so no thread has to enter it to find out.
pub fn netns_usable(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Opens a netlink connection inside the pod's namespace and says whether it already has an
/// interface called `ifname`. The connection is reused by [`attach`].
pub fn open_pod(pod_netns: &Path, ifname: &str) -> Result<(Netlink, bool), KernelError> {
    let mut nl = Netlink::open_in(pod_netns)?;
    let exists = nl.link(ifname)?.is_some();
    Ok((nl, exists))
}

/// One attachment to make.
#[derive(Debug, Clone)]
pub struct PodAttach<'a> {
    pub node_netns: Option<&'a Path>,
    pub pod_netns: &'a Path,
    pub ifname: &'a str,
    pub host_veth: &'a str,
    pub mtu: u32,
    /// The `mac` runtime capability.
    pub pod_mac: Option<Mac>,
    /// The pod's addresses, /32 and /128.
    pub addrs: &'a [IpNet],
}

/// What attaching produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub pod_mac: Option<Mac>,
    /// A stale host veth of the same name was replaced.
    pub replaced_stale: bool,
}

fn first_error(results: Vec<Result<(), KernelError>>) -> Result<(), KernelError> {
    results.into_iter().collect()
}

/// Creates the veth with its pod end directly in the pod's namespace, configures both ends and
/// installs the host routes. On failure the veth is deleted again (which removes both ends and
/// every route through them), so nothing is left behind.
/// `pod` is a connection inside the pod's namespace ([`open_pod`]).
pub fn attach(a: &PodAttach<'_>, pod: Netlink) -> Result<Attached, KernelError> {
    let mut host = open_node(a.node_netns)?;
    // A host veth of this name is left over from a crash (or from an earlier sandbox of the same
    // pod whose DEL never came): the name is derived from namespace and pod, so it is ours now.
    let replaced_stale = host.link(a.host_veth)?.is_some();
    if replaced_stale {
        tracing::warn!(veth = %a.host_veth, "replacing a stale host veth of the same name");
        host.delete_link(a.host_veth)?;
    }
    host.create_veth(&VethSpec {
        name: a.host_veth.to_owned(),
        mac: Some(HOST_VETH_MAC),
        peer_name: a.ifname.to_owned(),
        peer_mac: a.pod_mac,
        mtu: Some(a.mtu),
        peer_netns: Some(a.pod_netns.to_path_buf()),
    })?;
    match configure(&mut host, pod, a) {
        Ok(pod_mac) => Ok(Attached {
            pod_mac,
            replaced_stale,
        }),
        Err(e) => {
            if let Err(e2) = host.delete_link(a.host_veth) {
                tracing::warn!(veth = %a.host_veth, error = %e2, "could not delete the veth of a failed ADD");
            }
            Err(e)
        }
    }
}

fn configure(
    host: &mut Netlink,
    mut pod: Netlink,
    a: &PodAttach<'_>,
) -> Result<Option<Mac>, KernelError> {
    let has_v4 = a.addrs.iter().any(|n| n.addr().is_ipv4());
    let has_v6 = a.addrs.iter().any(|n| n.addr().is_ipv6());
    let veth = a.host_veth;
    in_node(a.node_netns, || -> Result<(), KernelError> {
        // The host end answers ARP for 169.254.1.1 at once and forwards the pod's packets.
        sysctl::set_proxy_arp(veth, true)?;
        sysctl::set_neigh_proxy_delay(veth, 0)?;
        sysctl::set_iface_forwarding(veth, false, true)?;
        if has_v6 {
            sysctl::set_iface_forwarding(veth, true, true)?;
            sysctl::set_proxy_ndp(veth, true)?;
            sysctl::set_accept_ra(veth, 0)?;
        }
        Ok(())
    })??;
    host.set_link_up(veth, true)?;

    for addr in a.addrs {
        pod.add_address(
            a.ifname,
            *addr,
            AddressOptions {
                nodad: addr.addr().is_ipv6(),
                noprefixroute: false,
            },
        )?;
    }
    pod.set_link_up(a.ifname, true)?;
    let routes: Vec<WriteOp> = pod_routes(
        a.ifname,
        has_v4,
        has_v6.then(|| ipv6_link_local(&HOST_VETH_MAC)),
    )
    .into_iter()
    .map(WriteOp::ReplaceRoute)
    .collect();
    first_error(pod.apply(&routes))?;
    let mac = pod.link(a.ifname)?.and_then(|l| l.mac);

    let host_routes: Vec<WriteOp> = a
        .addrs
        .iter()
        .map(|n| WriteOp::ReplaceRoute(Route::dev(host_prefix(n.addr()), veth)))
        .collect();
    first_error(host.apply(&host_routes))?;
    Ok(mac)
}

/// The /32 or /128 of an address.
pub fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("full-length prefix")
}

/// Deletes the pod's interface inside its namespace (the host end goes with it). `Ok(false)`
/// when the namespace or the interface is already gone.
pub fn delete_pod_interface(pod_netns: &Path, ifname: &str) -> Result<bool, KernelError> {
    if !netns_usable(pod_netns) {
        return Ok(false);
    }
    let mut nl = Netlink::open_in(pod_netns)?;
    if nl.link(ifname)?.is_none() {
        return Ok(false);
    }
    nl.delete_link(ifname)?;
    Ok(true)
}

/// Deletes a host veth (both ends); gone is success.
pub fn delete_host_veth(node_netns: Option<&Path>, name: &str) -> Result<(), KernelError> {
    open_node(node_netns)?.delete_link(name)
}

/// The host veths whose names start with `prefix`.
pub fn host_veths(node_netns: Option<&Path>, prefix: &str) -> Result<Vec<String>, KernelError> {
    Ok(open_node(node_netns)?
        .links_with_prefix(prefix)?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .map(|l| l.name)
        .collect())
}

/// What CHECK compares against the kernel.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub node_netns: Option<&'a Path>,
    pub pod_netns: &'a Path,
    pub ifname: &'a str,
    pub host_veth: &'a str,
    /// The pod's addresses as the result gave them.
    pub addrs: Vec<IpNet>,
    /// The routes of the result: (destination, gateway).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Verifies an attachment; the error says the first thing that is not as expected.
pub fn check(e: &Expected<'_>) -> Result<(), String> {
    let kerr = |what: &str, err: KernelError| format!("{what}: {err}");
    if !netns_usable(e.pod_netns) {
        return Err(format!(
            "the pod's network namespace {} cannot be entered",
            e.pod_netns.display()
        ));
    }
    let mut pod = Netlink::open_in(e.pod_netns).map_err(|x| kerr("open the pod's namespace", x))?;
    let link = pod
        .link(e.ifname)
        .map_err(|x| kerr("read the pod interface", x))?
        .ok_or_else(|| format!("the pod has no interface {}", e.ifname))?;
    if !link.up {
        return Err(format!("the pod interface {} is down", e.ifname));
    }
    let have = pod
        .addresses(e.ifname)
        .map_err(|x| kerr("read the pod's addresses", x))?;
    for a in &e.addrs {
        if !have.contains(a) {
            return Err(format!(
                "the pod interface {} lacks address {a} (it has {})",
                e.ifname,
                list(&have)
            ));
        }
    }
    let routes = pod
        .routes(&RouteFilter {
            table: Some(MAIN_TABLE),
            device: Some(Device::Name(e.ifname.to_owned())),
            ..RouteFilter::default()
        })
        .map_err(|x| kerr("read the pod's routes", x))?;
    let has_route = |dst: IpNet, gw: Option<IpAddr>| {
        routes
            .iter()
            .any(|r| r.dst == dst.trunc() && (gw.is_none() || r.gateway == gw))
    };
    let mut want: Vec<(IpNet, Option<IpAddr>)> = e.routes.clone();
    if e.addrs.iter().any(|a| a.addr().is_ipv4()) {
        want.push((host_prefix(IpAddr::V4(POD_GATEWAY_V4)), None));
        want.push((
            "0.0.0.0/0".parse().expect("valid"),
            Some(IpAddr::V4(POD_GATEWAY_V4)),
        ));
    }
    if e.addrs.iter().any(|a| a.addr().is_ipv6()) {
        want.push((
            "::/0".parse().expect("valid"),
            Some(IpAddr::V6(ipv6_link_local(&HOST_VETH_MAC))),
        ));
    }
    for (dst, gw) in want {
        if !has_route(dst, gw) {
            return Err(format!(
                "the pod has no route {dst}{} dev {}",
                gw.map(|g| format!(" via {g}")).unwrap_or_default(),
                e.ifname
            ));
        }
    }

    let mut host = open_node(e.node_netns).map_err(|x| kerr("open the node's namespace", x))?;
    let veth = host
        .link(e.host_veth)
        .map_err(|x| kerr("read the host veth", x))?
        .ok_or_else(|| format!("the host veth {} does not exist", e.host_veth))?;
    if !veth.up {
        return Err(format!("the host veth {} is down", e.host_veth));
    }
    let host_routes = host
        .routes(&RouteFilter {
            table: Some(MAIN_TABLE),
            ..RouteFilter::default()
        })
        .map_err(|x| kerr("read the node's routes", x))?;
    for a in &e.addrs {
        let dst = host_prefix(a.addr());
        match host_routes.iter().find(|r| r.dst == dst) {
            None => return Err(format!("the node has no route to {dst}")),
            Some(r) if r.oif != Some(veth.index) => {
                return Err(format!(
                    "the node's route to {dst} leaves through interface index {:?}, not {} ({})",
                    r.oif, e.host_veth, veth.index
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn list(v: &[IpNet]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
