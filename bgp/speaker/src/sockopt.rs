//! Socket options the standard library and tokio lack: TCP-MD5 signatures
//! (RFC 2385, Linux `TCP_MD5SIG`) and TTL security (RFC 5082, `IP_MINTTL` /
//! `IPV6_MINHOPCOUNT`).
//!
//! The libc crate has the option numbers but not `struct tcp_md5sig`, so it is
//! declared here with the kernel's layout (`include/uapi/linux/tcp.h`).
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

/// TCP_MD5SIG_MAXKEYLEN.
pub const MD5_MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig` from `linux/tcp.h`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

fn sockaddr_for(peer: IpAddr, socket_is_v6: bool) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let as_v6 = match peer {
        IpAddr::V6(a) => Some(a),
        // An IPv6 socket talks to IPv4 peers through mapped addresses.
        IpAddr::V4(a) if socket_is_v6 => Some(a.to_ipv6_mapped()),
        IpAddr::V4(_) => None,
    };
    match (as_v6, peer) {
        (Some(a6), _) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for
            // sockaddr_in6; we write exactly one sockaddr_in6 at its start.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
        }
        (None, IpAddr::V4(a4)) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: as above, for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in>(), sin) };
        }
        (None, IpAddr::V6(_)) => unreachable!("IPv6 peers always take the first arm"),
    }
    ss
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live, initialised T of the size we pass; the
    // kernel only reads it for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_v6_socket(fd: RawFd) -> io::Result<bool> {
    // SAFETY: zeroed sockaddr_storage is valid; getsockname writes at most `len`
    // bytes into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` are valid for writes for the call's duration.
    let rc = unsafe {
        libc::getsockname(
            fd,
            std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(ss.ss_family) == libc::AF_INET6)
}

/// Sets (or with `None` removes) the TCP-MD5 key for `peer` on a socket: a
/// connecting socket before `connect`, or a listening socket for peers that connect
/// to us.
pub fn set_md5<S: AsRawFd>(sock: &S, peer: IpAddr, key: Option<&[u8]>) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let key = key.unwrap_or(&[]);
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TCP-MD5 key is {} bytes; at most {MD5_MAX_KEY_LEN}",
                key.len()
            ),
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: sockaddr_for(peer, is_v6_socket(fd)?),
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; MD5_MAX_KEY_LEN],
    };
    sig.key[..key.len()].copy_from_slice(key);
    match setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig) {
        // Removing a key that is not there is success.
        Err(e) if key.is_empty() && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// RFC 5082: send with TTL (hop limit) 255 and accept only packets that arrive
/// with at least `256 - hops`, so a spoofer more than `hops` away cannot reach us.
pub fn set_ttl_security<S: AsRawFd>(sock: &S, addr_family: SocketAddr, hops: u8) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let min = 256 - i32::from(hops.max(1));
    let ttl: libc::c_int = 255;
    if addr_family.is_ipv4() || !is_v6_socket(fd)? {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl)?;
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &min)?;
    } else {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &ttl)?;
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, &min)?;
        // IPv4 peers on a dual-stack socket.
        let _ = setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl);
        let _ = setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &min);
    }
    Ok(())
}

/// The TTL for plain eBGP (RFC 4271 peers on the segment expect 1; multihop more).
pub fn set_ttl<S: AsRawFd>(sock: &S, v6: bool, ttl: u8) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let t = libc::c_int::from(ttl);
    if v6 {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &t)
    } else {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_keys_can_be_set_and_removed_on_listeners_of_both_families() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_md5(&l4, "127.0.0.2".parse().unwrap(), Some(b"secret")).unwrap();
        set_md5(&l4, "127.0.0.2".parse().unwrap(), None).unwrap();
        set_md5(&l4, "127.0.0.3".parse().unwrap(), None).unwrap();
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            set_md5(&l6, "::2".parse().unwrap(), Some(b"secret")).unwrap();
            set_md5(&l6, "127.0.0.2".parse().unwrap(), Some(b"secret")).unwrap();
        }
        let long = [b'x'; 81];
        assert!(set_md5(&l4, "127.0.0.2".parse().unwrap(), Some(&long)).is_err());
    }

    #[test]
    fn ttl_security_sets_min_ttl() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_ttl_security(&l4, l4.local_addr().unwrap(), 1).unwrap();
    }
}
