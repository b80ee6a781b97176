//! Speaker and peer configuration, shared by embedders and `margay-bgpd`'s YAML.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use margay_bgp_wire::{
    Capability, ExtendedNextHopFamily, Family, GracefulRestart, GracefulRestartFamily,
};
use serde::{Deserialize, Serialize};

use crate::fsm::{ConnectMode, FsmConfig};
use crate::rib::{NextHopMode, Policy};

/// A configuration mistake, found before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("asn 0 is reserved (RFC 7607); set the AS number this speaker belongs to")]
    ZeroAsn,
    #[error(
        "router_id 0.0.0.0 is not a valid BGP identifier; use one of this node's IPv4 addresses"
    )]
    ZeroRouterId,
    #[error("peer {peer}: asn 0 is reserved; set the peer's AS number")]
    PeerZeroAsn { peer: IpAddr },
    #[error("peer {peer}: hold_time {hold} s is not allowed; use 0 (no keepalives) or at least 3")]
    HoldTime { peer: IpAddr, hold: u16 },
    #[error("peer {peer}: TCP-MD5 password is {len} bytes; at most 80 fit (RFC 2385)")]
    Md5TooLong { peer: IpAddr, len: usize },
    #[error("peer {peer}: ttl_security hops must be 1..=254, not {hops}")]
    TtlHops { peer: IpAddr, hops: u8 },
    #[error("peer {peer}: rr_client needs an iBGP peer (asn {asn} differs from ours)")]
    RrClientEbgp { peer: IpAddr, asn: u32 },
    #[error("peer {peer}: no address families; list at least one of ipv4-unicast, ipv6-unicast")]
    NoFamilies { peer: IpAddr },
    #[error("peer {peer}: local_address {local} is not of the same family as the peer")]
    LocalAddressFamily { peer: IpAddr, local: IpAddr },
    #[error("peer {peer}: {source}")]
    Policy {
        peer: IpAddr,
        #[source]
        source: crate::rib::policy::PolicyError,
    },
    #[error("peer {peer} is configured twice")]
    DuplicatePeer { peer: IpAddr },
    #[error("graceful_restart.restart_time {0} s exceeds the 12-bit field's 4095")]
    RestartTime(u16),
}

/// Address families, as written in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressFamily {
    #[serde(rename = "ipv4-unicast")]
    Ipv4Unicast,
    #[serde(rename = "ipv6-unicast")]
    Ipv6Unicast,
}

impl AddressFamily {
    pub fn family(self) -> Family {
        match self {
            Self::Ipv4Unicast => Family::Ipv4Unicast,
            Self::Ipv6Unicast => Family::Ipv6Unicast,
        }
    }
}

fn default_families() -> Vec<AddressFamily> {
    vec![AddressFamily::Ipv4Unicast, AddressFamily::Ipv6Unicast]
}
fn default_port() -> u16 {
    179
}
fn default_hold() -> u16 {
    90
}
fn default_connect_retry() -> u32 {
    30
}
fn default_true() -> bool {
    true
}
fn default_restart_time() -> u16 {
    120
}

/// Graceful restart (RFC 4724).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GracefulRestartConfig {
    /// Seconds peers keep our routes while we restart.
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    /// We keep forwarding across a restart (the routes we installed stay in the
    /// kernel), so peers may keep theirs (the F bit).
    #[serde(default = "default_true")]
    pub forwarding_preserved: bool,
}

/// The speaker as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Addresses to accept connections on (empty: no listener, outbound only).
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Route-reflector cluster ID (default: the router ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<Ipv4Addr>,
    /// Keep ECMP sets (equal up to the router-ID tie-break) and report all next hops.
    #[serde(default)]
    pub multipath: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<GracefulRestartConfig>,
    /// This start is a restart (sets the R bit, defers the first advertisement until
    /// peers sent End-of-RIB). `margay-bgpd` sets it from its state file.
    #[serde(skip)]
    pub restarting: bool,
}

impl SpeakerConfig {
    pub fn new(asn: u32, router_id: Ipv4Addr) -> Self {
        Self {
            asn,
            router_id,
            listen: Vec::new(),
            cluster_id: None,
            multipath: false,
            graceful_restart: None,
            restarting: false,
        }
    }

    pub fn cluster_id(&self) -> Ipv4Addr {
        self.cluster_id.unwrap_or(self.router_id)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.asn == 0 {
            return Err(ConfigError::ZeroAsn);
        }
        if self.router_id.is_unspecified() {
            return Err(ConfigError::ZeroRouterId);
        }
        if let Some(gr) = &self.graceful_restart {
            if gr.restart_time > 4095 {
                return Err(ConfigError::RestartTime(gr.restart_time));
            }
        }
        Ok(())
    }
}

/// One neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Source address for our connections (and our next hop, if set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_address: Option<IpAddr>,
    #[serde(default)]
    pub mode: ConnectMode,
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    /// Seconds between connection attempts.
    #[serde(default = "default_connect_retry")]
    pub connect_retry: u32,
    /// Seconds; default max(8 min, 2 × hold time) (RFC 9687).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_hold_time: Option<u32>,
    /// TCP-MD5 password (RFC 2385).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5_password: Option<String>,
    /// RFC 5082 TTL security: the peer is at most this many hops away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
    /// TTL for eBGP multihop (default 1 for eBGP, 64 for iBGP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multihop: Option<u8>,
    /// We are this peer's route reflector.
    #[serde(default)]
    pub rr_client: bool,
    #[serde(default)]
    pub next_hop: NextHopMode,
    /// Our next hop for IPv4 routes (default: the session's local address when IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Our next hop for IPv6 routes (default: the session's local address when IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_v6: Option<Ipv6Addr>,
    #[serde(default = "default_families")]
    pub families: Vec<AddressFamily>,
    /// Offer IPv4 routes with IPv6 next hops (RFC 8950).
    #[serde(default)]
    pub extended_next_hop: bool,
    #[serde(default)]
    pub import: Policy,
    #[serde(default)]
    pub export: Policy,
    /// Tear the session down with Cease/1 when the peer sends more prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<u32>,
    /// Seconds before an automatic restart after a failure (doubles per failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_hold_time: Option<u32>,
    /// Don't start the session (configured but administratively down).
    #[serde(default)]
    pub shutdown: bool,
    /// Seconds this peer is asked to keep our routes while we restart (the restart time of
    /// the graceful restart capability we send it); default the speaker's
    /// `graceful_restart.restart_time`. At most 4095 (12 bits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_time: Option<u16>,
}

impl PeerConfig {
    pub fn new(address: IpAddr, asn: u32) -> Self {
        Self {
            address,
            asn,
            description: String::new(),
            port: 179,
            local_address: None,
            mode: ConnectMode::Both,
            hold_time: 90,
            connect_retry: 30,
            send_hold_time: None,
            md5_password: None,
            ttl_security: None,
            multihop: None,
            rr_client: false,
            next_hop: NextHopMode::Auto,
            next_hop_v4: None,
            next_hop_v6: None,
            families: default_families(),
            extended_next_hop: false,
            import: Policy::default(),
            export: Policy::default(),
            max_prefixes: None,
            idle_hold_time: None,
            shutdown: false,
            restart_time: None,
        }
    }

    pub fn validate(&self, speaker: &SpeakerConfig) -> Result<(), ConfigError> {
        let peer = self.address;
        if self.asn == 0 {
            return Err(ConfigError::PeerZeroAsn { peer });
        }
        if self.hold_time == 1 || self.hold_time == 2 {
            return Err(ConfigError::HoldTime {
                peer,
                hold: self.hold_time,
            });
        }
        if let Some(p) = &self.md5_password {
            if p.len() > 80 {
                return Err(ConfigError::Md5TooLong { peer, len: p.len() });
            }
        }
        if let Some(h) = self.ttl_security {
            if h == 0 || h == 255 {
                return Err(ConfigError::TtlHops { peer, hops: h });
            }
        }
        if self.rr_client && self.asn != speaker.asn {
            return Err(ConfigError::RrClientEbgp {
                peer,
                asn: self.asn,
            });
        }
        if self.families.is_empty() {
            return Err(ConfigError::NoFamilies { peer });
        }
        if let Some(t) = self.restart_time {
            if t > 4095 {
                return Err(ConfigError::RestartTime(t));
            }
        }
        if let Some(l) = self.local_address {
            if l.is_ipv4() != peer.is_ipv4() {
                return Err(ConfigError::LocalAddressFamily { peer, local: l });
            }
        }
        self.import
            .validate()
            .and_then(|_| self.export.validate())
            .map_err(|source| ConfigError::Policy { peer, source })?;
        Ok(())
    }

    pub fn is_ebgp(&self, speaker: &SpeakerConfig) -> bool {
        self.asn != speaker.asn
    }

    pub fn send_hold(&self) -> Duration {
        Duration::from_secs(u64::from(
            self.send_hold_time
                .unwrap_or_else(|| 480u32.max(2 * u32::from(self.hold_time))),
        ))
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The FSM configuration: capabilities from the families, graceful restart
    /// and extended next hop settings.
    pub fn fsm_config(&self, speaker: &SpeakerConfig) -> FsmConfig {
        let mut caps = Vec::new();
        for f in &self.families {
            let fam = f.family();
            caps.push(Capability::Multiprotocol {
                afi: fam.afi(),
                safi: fam.safi(),
            });
        }
        caps.push(Capability::RouteRefresh);
        caps.push(Capability::EnhancedRouteRefresh);
        if self.extended_next_hop {
            caps.push(Capability::ExtendedNextHop(vec![ExtendedNextHopFamily {
                nlri_afi: Family::AFI_IPV4,
                nlri_safi: u16::from(Family::SAFI_UNICAST),
                nexthop_afi: Family::AFI_IPV6,
            }]));
        }
        if let Some(gr) = &speaker.graceful_restart {
            let flags = if gr.forwarding_preserved {
                GracefulRestart::FORWARDING_STATE
            } else {
                0
            };
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restart_flags: if speaker.restarting {
                    GracefulRestart::RESTART_STATE
                } else {
                    0
                },
                restart_time: self.restart_time.unwrap_or(gr.restart_time),
                families: self
                    .families
                    .iter()
                    .map(|f| GracefulRestartFamily {
                        afi: f.family().afi(),
                        safi: f.family().safi(),
                        flags,
                    })
                    .collect(),
            }));
        }
        caps.push(Capability::FourOctetAs(speaker.asn));
        let mut c = FsmConfig::new(speaker.asn, self.asn, speaker.router_id);
        c.hold_time = self.hold_time;
        c.connect_retry = Duration::from_secs(u64::from(self.connect_retry.max(1)));
        c.mode = self.mode;
        c.capabilities = caps;
        if let Some(s) = self.idle_hold_time {
            c.idle_hold = Duration::from_secs(u64::from(s.max(1)));
        }
        c
    }
}
