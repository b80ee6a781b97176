//! IP prefixes and their NLRI encoding (RFC 4271 §4.3, RFC 4760 §5, RFC 7911 §3).
//!
//! ```text
//! +---------------------------+
//! |   Path Identifier (4)     |   only where ADD-PATH is negotiated
//! +---------------------------+
//! |   Length (1 octet, bits)  |
//! +---------------------------+
//! |   Prefix (variable)       |   ceil(Length / 8) octets
//! +---------------------------+
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use bytes::BufMut;

use crate::error::ErrorKind;

/// The address families this codec decodes NLRI for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

impl Family {
    pub const AFI_IPV4: u16 = 1;
    pub const AFI_IPV6: u16 = 2;
    pub const SAFI_UNICAST: u8 = 1;

    pub fn afi(self) -> u16 {
        match self {
            Self::Ipv4Unicast => Self::AFI_IPV4,
            Self::Ipv6Unicast => Self::AFI_IPV6,
        }
    }

    pub fn safi(self) -> u8 {
        Self::SAFI_UNICAST
    }

    pub fn from_afi_safi(afi: u16, safi: u8) -> Option<Self> {
        match (afi, safi) {
            (Self::AFI_IPV4, Self::SAFI_UNICAST) => Some(Self::Ipv4Unicast),
            (Self::AFI_IPV6, Self::SAFI_UNICAST) => Some(Self::Ipv6Unicast),
            _ => None,
        }
    }

    /// Longest prefix length in bits.
    pub fn max_len(self) -> u8 {
        match self {
            Self::Ipv4Unicast => 32,
            Self::Ipv6Unicast => 128,
        }
    }
}

/// Why a prefix could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("prefix length {length} exceeds {max}")]
    Length { length: u8, max: u8 },
    #[error("{addr}/{length} has host bits set; did you mean {masked}/{length}?")]
    HostBits {
        addr: IpAddr,
        masked: IpAddr,
        length: u8,
    },
    #[error("{0:?} is not ADDRESS/LENGTH")]
    Syntax(String),
}

/// An IPv4 or IPv6 prefix with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

fn mask_v4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

impl Prefix {
    /// A prefix; refuses lengths past the family's width and set host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let p = Self::new_masked(addr, len)?;
        if p.addr != addr {
            return Err(PrefixError::HostBits {
                addr,
                masked: p.addr,
                length: len,
            });
        }
        Ok(p)
    }

    /// A prefix with host bits cleared.
    pub fn new_masked(addr: IpAddr, len: u8) -> Result<Self, PrefixError> {
        let addr = match addr {
            IpAddr::V4(a) => {
                if len > 32 {
                    return Err(PrefixError::Length {
                        length: len,
                        max: 32,
                    });
                }
                IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), len)))
            }
            IpAddr::V6(a) => {
                if len > 128 {
                    return Err(PrefixError::Length {
                        length: len,
                        max: 128,
                    });
                }
                IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), len)))
            }
        };
        Ok(Self { addr, len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for the default route (length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::Ipv4Unicast,
            IpAddr::V6(_) => Family::Ipv6Unicast,
        }
    }

    /// Octets the prefix takes on the wire (length byte included).
    pub fn wire_len(&self) -> usize {
        1 + usize::from(self.len).div_ceil(8)
    }

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        let n = usize::from(self.len).div_ceil(8);
        buf.put_u8(self.len);
        match self.addr {
            IpAddr::V4(a) => buf.put_slice(&a.octets()[..n]),
            IpAddr::V6(a) => buf.put_slice(&a.octets()[..n]),
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::Syntax(s.to_owned()))?;
        let addr: IpAddr = a.parse().map_err(|_| PrefixError::Syntax(s.to_owned()))?;
        let len: u8 = l.parse().map_err(|_| PrefixError::Syntax(s.to_owned()))?;
        Self::new(addr, len)
    }
}

/// One NLRI entry: a prefix and, under ADD-PATH, its path identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nlri {
    pub path_id: Option<u32>,
    pub prefix: Prefix,
}

impl Nlri {
    pub fn new(prefix: Prefix) -> Self {
        Self {
            path_id: None,
            prefix,
        }
    }

    /// Octets on the wire with or without a path identifier.
    pub fn wire_len(&self, add_path: bool) -> usize {
        self.prefix.wire_len() + if add_path { 4 } else { 0 }
    }

    /// Writes the entry; with `add_path` a missing path id is written as 0.
    pub(crate) fn encode(&self, add_path: bool, buf: &mut impl BufMut) {
        if add_path {
            buf.put_u32(self.path_id.unwrap_or(0));
        }
        self.prefix.encode(buf);
    }
}

impl fmt::Display for Nlri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path_id {
            Some(id) => write!(f, "{} path-id {id}", self.prefix),
            None => write!(f, "{}", self.prefix),
        }
    }
}

/// Checks an NLRI field; returns the number of entries, or the offset (relative to
/// `buf`) and kind of the first problem.
pub(crate) fn validate(
    buf: &[u8],
    family: Family,
    add_path: bool,
) -> Result<usize, (usize, &'static str, ErrorKind)> {
    let max = family.max_len();
    let mut pos = 0;
    let mut count = 0;
    while pos < buf.len() {
        if add_path {
            if buf.len() - pos < 5 {
                return Err((
                    pos,
                    "NLRI path identifier",
                    ErrorKind::Truncated {
                        needed: 5,
                        available: buf.len() - pos,
                    },
                ));
            }
            pos += 4;
        }
        let len = buf[pos];
        if len > max {
            return Err((
                pos,
                "NLRI prefix length",
                ErrorKind::PrefixLength { length: len, max },
            ));
        }
        let n = usize::from(len).div_ceil(8);
        if buf.len() - pos - 1 < n {
            return Err((
                pos + 1,
                "NLRI prefix",
                ErrorKind::Truncated {
                    needed: n,
                    available: buf.len() - pos - 1,
                },
            ));
        }
        pos += 1 + n;
        count += 1;
    }
    Ok(count)
}

/// Zero-copy iterator over an NLRI field that has been validated. Trailing host bits
/// are irrelevant on the wire (RFC 4271 §4.3) and are cleared.
#[derive(Debug, Clone)]
pub struct NlriIter<'a> {
    buf: &'a [u8],
    family: Family,
    add_path: bool,
}

impl<'a> NlriIter<'a> {
    /// Iterates `buf`, which must have passed validation; stops at the first
    /// malformed entry if it did not.
    pub(crate) fn new(buf: &'a [u8], family: Family, add_path: bool) -> Self {
        Self {
            buf,
            family,
            add_path,
        }
    }

    /// An iterator over nothing.
    pub fn empty() -> Self {
        Self::new(&[], Family::Ipv4Unicast, false)
    }

    pub fn family(&self) -> Family {
        self.family
    }
}

impl Iterator for NlriIter<'_> {
    type Item = Nlri;

    #[inline]
    fn next(&mut self) -> Option<Nlri> {
        let mut b = self.buf;
        let path_id = if self.add_path {
            if b.len() < 5 {
                return None;
            }
            let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            b = &b[4..];
            Some(id)
        } else {
            None
        };
        let (&len, rest) = b.split_first()?;
        let n = usize::from(len).div_ceil(8);
        let prefix = match self.family {
            Family::Ipv4Unicast => {
                if len > 32 || rest.len() < n {
                    self.buf = &[];
                    return None;
                }
                let mut o = [0u8; 4];
                o[..n].copy_from_slice(&rest[..n]);
                Prefix {
                    addr: IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from_be_bytes(o), len))),
                    len,
                }
            }
            Family::Ipv6Unicast => {
                if len > 128 || rest.len() < n {
                    self.buf = &[];
                    return None;
                }
                let mut o = [0u8; 16];
                o[..n].copy_from_slice(&rest[..n]);
                Prefix {
                    addr: IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from_be_bytes(o), len))),
                    len,
                }
            }
        };
        self.buf = &rest[n..];
        Some(Nlri { path_id, prefix })
    }
}
