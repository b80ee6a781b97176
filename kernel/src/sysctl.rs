//! Sysctls under `/proc/sys/net`.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens the file, so these
//! functions act on the calling thread's namespace; to act on another one, call them inside
//! [`crate::netns::run_in`].

use std::fs;
use std::path::{Path, PathBuf};

use crate::link::validate_ifname;
use crate::KernelError;

/// Where `/proc/sys` is: `$MARGAY_SYSCTL_ROOT` (the chart mounts the host's `/proc/sys/net`
/// at `/host/proc/sys/net`, because a container's own `/proc/sys` is read-only without
/// privilege), else `/proc/sys`.
fn root() -> PathBuf {
    let base = std::env::var_os("MARGAY_SYSCTL_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/sys"));
    base.join("net")
}

/// Path of `net.<key>` (dots or slashes accepted), checked to stay under `/proc/sys/net`.
pub fn path(key: &str) -> Result<PathBuf, KernelError> {
    let rel = key.strip_prefix("net.").unwrap_or(key);
    if rel.is_empty()
        || rel.contains("..")
        || rel.starts_with('/')
        || rel.chars().any(char::is_whitespace)
    {
        return Err(KernelError::Invalid(format!(
            "{key:?} is not a net sysctl key"
        )));
    }
    // Dots separate levels, except inside interface names (`vxlan.margay`), so callers with
    // such names use the typed helpers below, which build slash paths.
    let rel = if rel.contains('/') {
        rel.to_string()
    } else {
        rel.replace('.', "/")
    };
    Ok(root().join(rel))
}

fn sysctl_err(path: &Path, op: &'static str, source: std::io::Error) -> KernelError {
    KernelError::Sysctl {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Reads a sysctl (trimmed).
pub fn read(key: &str) -> Result<String, KernelError> {
    read_path(&path(key)?)
}

/// Writes a sysctl; does nothing if it already has that value (some writes have side effects,
/// e.g. `forwarding` resets other settings).
pub fn write(key: &str, value: &str) -> Result<(), KernelError> {
    write_path(&path(key)?, value)
}

fn read_path(p: &Path) -> Result<String, KernelError> {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| sysctl_err(p, "read", e))
}

fn write_path(p: &Path, value: &str) -> Result<(), KernelError> {
    if read_path(p).ok().as_deref() == Some(value) {
        return Ok(());
    }
    fs::write(p, value).map_err(|e| sysctl_err(p, "write", e))
}

fn iface_path(family: &str, iface: &str, leaf: &str) -> Result<PathBuf, KernelError> {
    validate_ifname(iface)?;
    Ok(root().join(family).join("conf").join(iface).join(leaf))
}

fn neigh_path(family: &str, iface: &str, leaf: &str) -> Result<PathBuf, KernelError> {
    validate_ifname(iface)?;
    Ok(root().join(family).join("neigh").join(iface).join(leaf))
}

fn b(v: bool) -> &'static str {
    if v {
        "1"
    } else {
        "0"
    }
}

/// `net.ipv4.ip_forward`.
pub fn set_ipv4_forwarding(on: bool) -> Result<(), KernelError> {
    write("ipv4/ip_forward", b(on))
}

/// `net.ipv6.conf.all.forwarding`.
pub fn set_ipv6_forwarding(on: bool) -> Result<(), KernelError> {
    write("ipv6/conf/all/forwarding", b(on))
}

pub fn ipv4_forwarding() -> Result<bool, KernelError> {
    Ok(read("ipv4/ip_forward")? == "1")
}

/// `net.ipv4.conf.<iface>.proxy_arp`: the host side of a pod veth answers ARP for
/// 169.254.1.1.
pub fn set_proxy_arp(iface: &str, on: bool) -> Result<(), KernelError> {
    write_path(&iface_path("ipv4", iface, "proxy_arp")?, b(on))
}

pub fn proxy_arp(iface: &str) -> Result<bool, KernelError> {
    Ok(read_path(&iface_path("ipv4", iface, "proxy_arp")?)? == "1")
}

/// `net.ipv4.neigh.<iface>.proxy_delay` in jiffies-as-milliseconds (0: answer at once).
pub fn set_neigh_proxy_delay(iface: &str, value: u32) -> Result<(), KernelError> {
    write_path(
        &neigh_path("ipv4", iface, "proxy_delay")?,
        &value.to_string(),
    )
}

/// `net.ipv4.conf.<iface>.forwarding` or `net.ipv6.conf.<iface>.forwarding`.
pub fn set_iface_forwarding(iface: &str, v6: bool, on: bool) -> Result<(), KernelError> {
    let fam = if v6 { "ipv6" } else { "ipv4" };
    write_path(&iface_path(fam, iface, "forwarding")?, b(on))
}

/// `net.ipv4.conf.<iface>.route_localnet`.
pub fn set_route_localnet(iface: &str, on: bool) -> Result<(), KernelError> {
    write_path(&iface_path("ipv4", iface, "route_localnet")?, b(on))
}

/// `net.ipv6.conf.<iface>.proxy_ndp`.
pub fn set_proxy_ndp(iface: &str, on: bool) -> Result<(), KernelError> {
    write_path(&iface_path("ipv6", iface, "proxy_ndp")?, b(on))
}

/// `net.ipv6.conf.<iface>.accept_ra` (0, 1 or 2).
pub fn set_accept_ra(iface: &str, value: u8) -> Result<(), KernelError> {
    if value > 2 {
        return Err(KernelError::Invalid(format!(
            "accept_ra must be 0, 1 or 2, not {value}"
        )));
    }
    write_path(&iface_path("ipv6", iface, "accept_ra")?, &value.to_string())
}

/// Reads `net.<family>.conf.<iface>.<leaf>`.
pub fn read_iface(family_v6: bool, iface: &str, leaf: &str) -> Result<String, KernelError> {
    if leaf.contains('/') || leaf.contains("..") {
        return Err(KernelError::Invalid(format!(
            "{leaf:?} is not a sysctl leaf"
        )));
    }
    let fam = if family_v6 { "ipv6" } else { "ipv4" };
    read_path(&iface_path(fam, iface, leaf)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_paths_under_proc_sys_net() {
        assert_eq!(
            path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            path("ipv4/conf/vxlan.margay/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/vxlan.margay/rp_filter")
        );
        assert!(path("../../etc/passwd").is_err());
        assert!(path("").is_err());
        assert!(iface_path("ipv4", "a/../../x", "proxy_arp").is_err());
        assert_eq!(
            iface_path("ipv4", "vxlan.margay", "proxy_arp").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/vxlan.margay/proxy_arp")
        );
    }

    #[test]
    fn reads_a_real_sysctl() {
        // Present on every Linux with IPv4.
        let v = read("net.ipv4.ip_forward").unwrap();
        assert!(v == "0" || v == "1", "{v}");
        assert!(read_iface(false, "lo", "../x").is_err());
    }
}
