//! Capabilities advertised in OPEN (RFC 5492 §4).
//!
//! ```text
//! +------------------------------+
//! | Capability Code (1 octet)    |
//! +------------------------------+
//! | Capability Length (1 octet)  |
//! +------------------------------+
//! | Capability Value (variable)  |
//! +------------------------------+
//! ```

use bytes::BufMut;

use crate::error::ErrorKind;

/// Capability codes (IANA "Capability Codes").
pub mod cap_code {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const EXTENDED_NEXT_HOP: u8 = 5;
    pub const EXTENDED_MESSAGE: u8 = 6;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
    pub const ADD_PATH: u8 = 69;
    pub const ENHANCED_ROUTE_REFRESH: u8 = 70;
    pub const LONG_LIVED_GRACEFUL_RESTART: u8 = 71;
    pub const FQDN: u8 = 73;
}

/// How the capabilities were spread over OPEN optional parameters. RFC 5492 allows
/// one parameter holding them all (BIRD, FRR) or one parameter each (GoBGP and
/// others); kept so a decoded OPEN re-encodes to the same bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CapabilityLayout {
    #[default]
    OneParameter,
    ParameterPerCapability,
}

/// RFC 7911 §4 Send/Receive field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddPathMode {
    Receive,
    Send,
    Both,
    /// A value RFC 7911 does not define; kept, and treated as neither.
    Other(u8),
}

impl AddPathMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Receive,
            2 => Self::Send,
            3 => Self::Both,
            v => Self::Other(v),
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Receive => 1,
            Self::Send => 2,
            Self::Both => 3,
            Self::Other(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddPathFamily {
    pub afi: u16,
    pub safi: u8,
    pub mode: AddPathMode,
}

/// RFC 8950 §3: NLRI of (`nlri_afi`, `nlri_safi`) may carry a next hop of `nexthop_afi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtendedNextHopFamily {
    pub nlri_afi: u16,
    pub nlri_safi: u16,
    pub nexthop_afi: u16,
}

/// RFC 4724 §3 per-family entry; `flags` bit 0x80 is "Forwarding State preserved".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GracefulRestartFamily {
    pub afi: u16,
    pub safi: u8,
    pub flags: u8,
}

/// RFC 4724 §3 (with the N bit of RFC 8538).
///
/// ```text
/// +--------------------------------------------------+
/// | Restart Flags (4 bits)                           |
/// +--------------------------------------------------+
/// | Restart Time in seconds (12 bits)                |
/// +--------------------------------------------------+
/// | AFI (16 bits) | SAFI (8 bits) | Flags (8 bits)   |  repeated
/// +--------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GracefulRestart {
    /// The 4 restart-flag bits, in the low nibble (0x8 = R, 0x4 = N).
    pub restart_flags: u8,
    /// 0..=4095 seconds.
    pub restart_time: u16,
    pub families: Vec<GracefulRestartFamily>,
}

impl GracefulRestart {
    pub const RESTART_STATE: u8 = 0x8;
    pub const NOTIFICATION: u8 = 0x4;
    pub const FORWARDING_STATE: u8 = 0x80;
}

/// RFC 9494 §3 per-family entry; `stale_time` is 24 bits of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LlgrFamily {
    pub afi: u16,
    pub safi: u8,
    pub flags: u8,
    pub stale_time: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Capability {
    /// RFC 4760 §8: AFI, reserved octet, SAFI.
    Multiprotocol { afi: u16, safi: u8 },
    /// RFC 2918.
    RouteRefresh,
    /// RFC 7313.
    EnhancedRouteRefresh,
    /// RFC 6793: the speaker's 4-octet AS number.
    FourOctetAs(u32),
    /// RFC 4724.
    GracefulRestart(GracefulRestart),
    /// RFC 9494 (decoded; the speaker need not act on it).
    LongLivedGracefulRestart(Vec<LlgrFamily>),
    /// RFC 7911.
    AddPath(Vec<AddPathFamily>),
    /// RFC 8950.
    ExtendedNextHop(Vec<ExtendedNextHopFamily>),
    /// RFC 8654.
    ExtendedMessage,
    /// draft-walton-bgp-hostname: host and domain name (decoded; invalid UTF-8 is
    /// replaced).
    Fqdn { hostname: String, domain: String },
    /// Anything else, kept as sent and never refused.
    Unknown { code: u8, value: Vec<u8> },
}

impl Capability {
    pub fn code(&self) -> u8 {
        use cap_code::*;
        match self {
            Self::Multiprotocol { .. } => MULTIPROTOCOL,
            Self::RouteRefresh => ROUTE_REFRESH,
            Self::EnhancedRouteRefresh => ENHANCED_ROUTE_REFRESH,
            Self::FourOctetAs(_) => FOUR_OCTET_AS,
            Self::GracefulRestart(_) => GRACEFUL_RESTART,
            Self::LongLivedGracefulRestart(_) => LONG_LIVED_GRACEFUL_RESTART,
            Self::AddPath(_) => ADD_PATH,
            Self::ExtendedNextHop(_) => EXTENDED_NEXT_HOP,
            Self::ExtendedMessage => EXTENDED_MESSAGE,
            Self::Fqdn { .. } => FQDN,
            Self::Unknown { code, .. } => *code,
        }
    }

    /// Decodes one capability value. A known capability with an impossible length
    /// is an error; an unknown one never is.
    pub(crate) fn decode(code: u8, v: &[u8]) -> Result<Self, ErrorKind> {
        use cap_code::*;
        let bad = || ErrorKind::MalformedCapability {
            code,
            length: v.len(),
        };
        let u16_at = |i: usize| u16::from_be_bytes([v[i], v[i + 1]]);
        Ok(match code {
            MULTIPROTOCOL => {
                if v.len() != 4 {
                    return Err(bad());
                }
                Self::Multiprotocol {
                    afi: u16_at(0),
                    safi: v[3],
                }
            }
            ROUTE_REFRESH | ENHANCED_ROUTE_REFRESH | EXTENDED_MESSAGE => {
                if !v.is_empty() {
                    return Err(bad());
                }
                match code {
                    ROUTE_REFRESH => Self::RouteRefresh,
                    ENHANCED_ROUTE_REFRESH => Self::EnhancedRouteRefresh,
                    _ => Self::ExtendedMessage,
                }
            }
            FOUR_OCTET_AS => {
                if v.len() != 4 {
                    return Err(bad());
                }
                Self::FourOctetAs(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            GRACEFUL_RESTART => {
                if v.len() < 2 || !(v.len() - 2).is_multiple_of(4) {
                    return Err(bad());
                }
                let head = u16_at(0);
                Self::GracefulRestart(GracefulRestart {
                    restart_flags: (head >> 12) as u8,
                    restart_time: head & 0x0fff,
                    families: v[2..]
                        .chunks_exact(4)
                        .map(|c| GracefulRestartFamily {
                            afi: u16::from_be_bytes([c[0], c[1]]),
                            safi: c[2],
                            flags: c[3],
                        })
                        .collect(),
                })
            }
            LONG_LIVED_GRACEFUL_RESTART => {
                if !v.len().is_multiple_of(7) {
                    return Err(bad());
                }
                Self::LongLivedGracefulRestart(
                    v.chunks_exact(7)
                        .map(|c| LlgrFamily {
                            afi: u16::from_be_bytes([c[0], c[1]]),
                            safi: c[2],
                            flags: c[3],
                            stale_time: u32::from_be_bytes([0, c[4], c[5], c[6]]),
                        })
                        .collect(),
                )
            }
            ADD_PATH => {
                if !v.len().is_multiple_of(4) {
                    return Err(bad());
                }
                Self::AddPath(
                    v.chunks_exact(4)
                        .map(|c| AddPathFamily {
                            afi: u16::from_be_bytes([c[0], c[1]]),
                            safi: c[2],
                            mode: AddPathMode::from_u8(c[3]),
                        })
                        .collect(),
                )
            }
            EXTENDED_NEXT_HOP => {
                if !v.len().is_multiple_of(6) {
                    return Err(bad());
                }
                Self::ExtendedNextHop(
                    v.chunks_exact(6)
                        .map(|c| ExtendedNextHopFamily {
                            nlri_afi: u16::from_be_bytes([c[0], c[1]]),
                            nlri_safi: u16::from_be_bytes([c[2], c[3]]),
                            nexthop_afi: u16::from_be_bytes([c[4], c[5]]),
                        })
                        .collect(),
                )
            }
            FQDN => {
                let hl = usize::from(*v.first().ok_or_else(bad)?);
                let host = v.get(1..1 + hl).ok_or_else(bad)?;
                let dl = usize::from(*v.get(1 + hl).ok_or_else(bad)?);
                let dom = v.get(2 + hl..2 + hl + dl).ok_or_else(bad)?;
                if v.len() != 2 + hl + dl {
                    return Err(bad());
                }
                Self::Fqdn {
                    hostname: String::from_utf8_lossy(host).into_owned(),
                    domain: String::from_utf8_lossy(dom).into_owned(),
                }
            }
            _ => Self::Unknown {
                code,
                value: v.to_vec(),
            },
        })
    }

    /// Length of the value on the wire.
    pub(crate) fn value_len(&self) -> usize {
        match self {
            Self::Multiprotocol { .. } | Self::FourOctetAs(_) => 4,
            Self::RouteRefresh | Self::EnhancedRouteRefresh | Self::ExtendedMessage => 0,
            Self::GracefulRestart(g) => 2 + 4 * g.families.len(),
            Self::LongLivedGracefulRestart(f) => 7 * f.len(),
            Self::AddPath(f) => 4 * f.len(),
            Self::ExtendedNextHop(f) => 6 * f.len(),
            Self::Fqdn { hostname, domain } => 2 + hostname.len().min(255) + domain.len().min(255),
            Self::Unknown { value, .. } => value.len(),
        }
    }

    /// Writes code, length and value. The caller checked `value_len() <= 255`.
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.code());
        buf.put_u8(self.value_len() as u8);
        match self {
            Self::Multiprotocol { afi, safi } => {
                buf.put_u16(*afi);
                buf.put_u8(0);
                buf.put_u8(*safi);
            }
            Self::RouteRefresh | Self::EnhancedRouteRefresh | Self::ExtendedMessage => {}
            Self::FourOctetAs(asn) => buf.put_u32(*asn),
            Self::GracefulRestart(g) => {
                buf.put_u16((u16::from(g.restart_flags & 0x0f) << 12) | (g.restart_time & 0x0fff));
                for f in &g.families {
                    buf.put_u16(f.afi);
                    buf.put_u8(f.safi);
                    buf.put_u8(f.flags);
                }
            }
            Self::LongLivedGracefulRestart(fams) => {
                for f in fams {
                    buf.put_u16(f.afi);
                    buf.put_u8(f.safi);
                    buf.put_u8(f.flags);
                    buf.put_slice(&(f.stale_time & 0x00ff_ffff).to_be_bytes()[1..]);
                }
            }
            Self::AddPath(fams) => {
                for f in fams {
                    buf.put_u16(f.afi);
                    buf.put_u8(f.safi);
                    buf.put_u8(f.mode.to_u8());
                }
            }
            Self::ExtendedNextHop(fams) => {
                for f in fams {
                    buf.put_u16(f.nlri_afi);
                    buf.put_u16(f.nlri_safi);
                    buf.put_u16(f.nexthop_afi);
                }
            }
            Self::Fqdn { hostname, domain } => {
                for s in [hostname, domain] {
                    let b = &s.as_bytes()[..s.len().min(255)];
                    buf.put_u8(b.len() as u8);
                    buf.put_slice(b);
                }
            }
            Self::Unknown { value, .. } => buf.put_slice(value),
        }
    }
}
