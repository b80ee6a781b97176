//! Socket options the standard library and tokio lack: TCP-MD5 signatures
//! (RFC 2385, Linux `TCP_MD5SIG`) and TTL security (RFC 5082, `IP_MINTTL` /
//! `IPV6_MINHOPCOUNT`, and on listeners TTL 255 and `TCP_SAVE_SYN`).
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

/// What a GTSM speaker sends with (RFC 5082 §3).
pub const GTSM_TTL: u8 = 255;

/// RFC 5082 §3: the lowest TTL (hop limit) a segment from a peer at most `hops` away
/// arrives with, since it leaves with 255.
pub fn gtsm_min_ttl(hops: u8) -> u8 {
    255 - (hops.max(1) - 1)
}

/// RFC 5082: send with TTL (hop limit) 255 and accept only packets that arrive
/// with at least `256 - hops`, so a spoofer more than `hops` away cannot reach us.
pub fn set_ttl_security<S: AsRawFd>(sock: &S, addr_family: SocketAddr, hops: u8) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let min = libc::c_int::from(gtsm_min_ttl(hops));
    let ttl = libc::c_int::from(GTSM_TTL);
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

/// Prepares a listening socket, before `listen`, for peers with TTL security
/// (RFC 5082) on the connections it accepts.
///
/// * Its SYN-ACKs leave with TTL (hop limit) 255, as BIRD's do. A GTSM peer sets its
///   minimum TTL before it connects, so a SYN-ACK with the default TTL (64) is dropped
///   and its connections to us never complete; two margay speakers with
///   `ttl_security` could then not connect either way. Accepted sockets inherit the
///   TTL, so nothing leaves below 255 before [`set_ttl_security`]. Peers without TTL
///   security don't look at our TTL.
/// * The kernel keeps each connection's SYN (`TCP_SAVE_SYN`) for [`syn_ttl`]: the
///   minimum TTL is set on the accepted socket, after segments may already have been
///   queued on it unchecked (the peer's OPEN often is), so the session checks the SYN.
pub fn prepare_listener<S: AsRawFd>(sock: &S) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let ttl = libc::c_int::from(GTSM_TTL);
    if is_v6_socket(fd)? {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &ttl)?;
        // IPv4 peers on a dual-stack socket.
        let _ = setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl);
    } else {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl)?;
    }
    let on: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_SAVE_SYN, &on)
}

/// IPv6 only (`IPV6_V6ONLY`) on an IPv6 socket, so an IPv4 socket can have the same
/// port (listening on both `0.0.0.0:179` and `[::]:179`).
pub fn set_v6_only<S: AsRawFd>(sock: &S, on: bool) -> io::Result<()> {
    let v = libc::c_int::from(on);
    setsockopt(sock.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &v)
}

/// The TTL (IPv4) or hop limit (IPv6) the SYN of an accepted connection arrived with,
/// if its listener kept the SYN ([`prepare_listener`]); `None` otherwise. The kernel
/// hands the SYN out once and frees it.
pub fn syn_ttl<S: AsRawFd>(sock: &S) -> io::Result<Option<u8>> {
    // IPv4 (at most 60) or IPv6 (40 and extension headers) plus TCP (at most 60).
    let mut buf = [0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for writes of `len` bytes and `len` for one write; the
    // kernel writes at most `len` bytes and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (len as usize).min(buf.len());
    if len == 0 {
        return Ok(None);
    }
    ip_header_ttl(&buf[..len]).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "saved SYN of {len} bytes does not start with an IPv4 or IPv6 header (first byte {:#04x})",
                buf[0]
            ),
        )
    })
}

/// The TTL of an IPv4 header (RFC 791, octet 8) or the hop limit of an IPv6 header
/// (RFC 8200, octet 7).
fn ip_header_ttl(h: &[u8]) -> Option<u8> {
    match h.first()? >> 4 {
        4 if h.len() >= 20 => Some(h[8]),
        6 if h.len() >= 40 => Some(h[7]),
        _ => None,
    }
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
    use std::time::Duration;

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
        assert_eq!(gtsm_min_ttl(1), 255);
        assert_eq!(gtsm_min_ttl(0), 255);
        assert_eq!(gtsm_min_ttl(3), 253);
        assert_eq!(gtsm_min_ttl(254), 2);
    }

    fn listener(addr: &str, prepared: bool) -> tokio::net::TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4().unwrap()
        } else {
            tokio::net::TcpSocket::new_v6().unwrap()
        };
        if prepared {
            prepare_listener(&sock).unwrap();
        }
        sock.bind(addr).unwrap();
        sock.listen(8).unwrap()
    }

    /// A connection from a socket whose segments leave with `ttl`, with TTL security
    /// (minimum 255) when `gtsm`. Loopback does not decrement the TTL.
    async fn connect(
        to: SocketAddr,
        ttl: u8,
        gtsm: bool,
    ) -> Result<tokio::net::TcpStream, tokio::time::error::Elapsed> {
        let sock = if to.is_ipv4() {
            tokio::net::TcpSocket::new_v4().unwrap()
        } else {
            tokio::net::TcpSocket::new_v6().unwrap()
        };
        if gtsm {
            set_ttl_security(&sock, to, 1).unwrap();
        } else {
            set_ttl(&sock, to.is_ipv6(), ttl).unwrap();
        }
        tokio::time::timeout(Duration::from_millis(1500), sock.connect(to))
            .await
            .map(|r| r.unwrap())
    }

    fn has_ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    #[tokio::test]
    async fn a_gtsm_peer_connects_only_to_a_prepared_listener() {
        // The unprepared listener answers with TTL 64; the peer's minimum TTL drops
        // the SYN-ACK and its connect never completes.
        let plain = listener("127.0.0.1:0", false);
        let r = connect(plain.local_addr().unwrap(), 255, true).await;
        assert!(
            r.is_err(),
            "connected although the SYN-ACK left with TTL 64"
        );
        let l = listener("127.0.0.1:0", true);
        connect(l.local_addr().unwrap(), 255, true)
            .await
            .expect("the prepared listener's SYN-ACK leaves with TTL 255");
        if has_ipv6_loopback() {
            let l6 = listener("[::1]:0", true);
            connect(l6.local_addr().unwrap(), 255, true)
                .await
                .expect("IPv6: hop limit 255 on the SYN-ACK");
        }
    }

    #[tokio::test]
    async fn a_prepared_listener_keeps_the_syn_ttl_once() {
        let l = listener("127.0.0.1:0", true);
        let _c = connect(l.local_addr().unwrap(), 7, false).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(syn_ttl(&s).unwrap(), Some(7));
        assert_eq!(syn_ttl(&s).unwrap(), None, "handed out once");
        let _c = connect(l.local_addr().unwrap(), 255, true).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(syn_ttl(&s).unwrap(), Some(255));
        // Without TCP_SAVE_SYN there is nothing to read.
        let plain = listener("127.0.0.1:0", false);
        let _c = connect(plain.local_addr().unwrap(), 7, false)
            .await
            .unwrap();
        let (s, _) = plain.accept().await.unwrap();
        assert_eq!(syn_ttl(&s).unwrap(), None);
        if has_ipv6_loopback() {
            let l6 = listener("[::1]:0", true);
            let _c = connect(l6.local_addr().unwrap(), 9, false).await.unwrap();
            let (s, _) = l6.accept().await.unwrap();
            assert_eq!(syn_ttl(&s).unwrap(), Some(9));
        }
    }

    #[test]
    fn ip_header_ttl_reads_both_families() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[8] = 61;
        assert_eq!(ip_header_ttl(&v4), Some(61));
        assert_eq!(ip_header_ttl(&v4[..19]), None);
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[7] = 254;
        assert_eq!(ip_header_ttl(&v6), Some(254));
        assert_eq!(ip_header_ttl(&v6[..39]), None);
        assert_eq!(ip_header_ttl(&[0x50; 40]), None);
        assert_eq!(ip_header_ttl(&[]), None);
    }
}
