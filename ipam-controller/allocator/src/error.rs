//! What the allocator can fail with. Every message names the pool, block or address involved
//! and, where there is one, what to do about it.

use margay_api::StoreError;
use std::net::IpAddr;

/// An address family, for messages and requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every candidate pool was searched and none had room for this node.
    #[error("{}: no free block and no free address for node {node}{}",
        pools_phrase(pools), if *strict { " (strict affinity forbids borrowing from other nodes' blocks)" } else { "" })]
    PoolsFull {
        /// `cidr (name)` of each pool searched.
        pools: Vec<String>,
        node: String,
        strict: bool,
    },

    /// The node holds as many blocks as IPAMConfig allows and they are all full.
    #[error("node {node} holds {held} blocks, the most IPAMConfig maxBlocksPerHost ({max}) allows, and they are full{}; raise maxBlocksPerHost or free addresses",
        if *strict { " (strict affinity forbids borrowing)" } else { " and no other node's block has room" })]
    BlockLimit {
        node: String,
        held: u32,
        max: u32,
        strict: bool,
    },

    /// No pool may give this node addresses of this family and use.
    #[error("no enabled {family} pool allows {use_} addresses on node {node}{}; create one or check nodeSelector, allowedUses and disabled",
        if considered.is_empty() { String::new() } else { format!(" (pools considered: {})", considered.join(", ")) })]
    NoPool {
        family: Family,
        use_: &'static str,
        node: String,
        considered: Vec<String>,
    },

    /// The request named a pool that does not exist or cannot be used.
    #[error("pool {pool:?} cannot be used for this request: {reason}")]
    PoolUnusable { pool: String, reason: String },

    /// A specific address was requested and another owner holds it.
    #[error("address {ip} in block {block} is already allocated to handle {owner}; choose another address or release it first")]
    AddressInUse {
        ip: IpAddr,
        block: String,
        owner: String,
    },

    /// A specific address was requested that may not be handed out.
    #[error("address {ip} in block {block} cannot be allocated: {reason}")]
    AddressUnavailable {
        ip: IpAddr,
        block: String,
        reason: String,
    },

    /// A specific address was requested that no enabled pool contains.
    #[error("address {ip} is not in any enabled pool{}", if pools.is_empty() { String::new() } else { format!(" (pools: {})", pools.join(", ")) })]
    AddressNotInPool { ip: IpAddr, pools: Vec<String> },

    /// The request itself makes no sense.
    #[error("invalid IPAM request: {0}")]
    InvalidRequest(String),

    /// Other writers kept changing the same object; the bound on retries was reached.
    #[error("{what}: gave up after {attempts} attempts because of concurrent changes; retry the operation")]
    Contention { what: String, attempts: u32 },

    /// The datastore failed.
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },

    /// The node's own IPAM state (its state directory, its lock) could not be read or
    /// written.
    #[error("{what}: {source}")]
    NodeState {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn pools_phrase(pools: &[String]) -> String {
    match pools {
        [one] => format!("pool {one} is full"),
        many => format!("pools {} are full", many.join(", ")),
    }
}

impl IpamError {
    pub(crate) fn store(what: impl Into<String>) -> impl FnOnce(StoreError) -> IpamError {
        let what = what.into();
        move |source| IpamError::Store { what, source }
    }

    /// Whether retrying the same request later may succeed (datastore trouble, contention).
    pub fn is_retryable(&self) -> bool {
        match self {
            IpamError::Contention { .. } => true,
            IpamError::Store { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;
