//! Free loopback ports for the processes a test starts.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it before the
/// caller binds it; callers that start servers retry on "address already in use".
pub fn free_port() -> std::io::Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct free ports, all held until every one is chosen so they cannot repeat.
pub(crate) fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}
