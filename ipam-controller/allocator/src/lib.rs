//! Margay's address allocator, used by the CNI IPAM plugin (pod addresses), the node agent
//! (tunnel addresses) and the controller (releases). It works over any [`margay_api::Store`]
//! backend; every write is compare-and-swap on the revision read, with bounded retries.
//!
//! - [`Allocator`]: assign and release for one node.
//! - [`block`]: the allocation table of one block, without I/O.
//! - [`pool`]: pool selection and the node-seeded block search.
//! - [`audit`]: the consistency check and the views behind `margayctl ipam show/check`.
//!
//! `docs/ipam.md` describes the write order of every operation and what a crash between any
//! two writes leaves behind.

mod allocator;
pub mod audit;
pub mod block;
pub mod clock;
mod error;
pub mod live;
pub mod maintenance;
pub mod node_state;
pub mod pending;
pub mod pool;

pub use allocator::{
    affine_blocks, with_retries, Allocator, AllocatorConfig, AssignRequest, AssignedAddress,
    Assignment, ReleaseOutcome,
};
pub use clock::Clock;
pub use error::{Family, IpamError, Result};
pub use pool::AddressUse;

/// The handle of a pod's addresses: `k8s-pod-network.<containerID>`, as Calico names it.
pub fn pod_handle(container_id: &str) -> String {
    format!("{POD_HANDLE_PREFIX}{container_id}")
}

/// Prefix of pod handles.
pub const POD_HANDLE_PREFIX: &str = "k8s-pod-network.";

/// What a tunnel address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Ipip,
    Vxlan,
    VxlanV6,
}

impl TunnelKind {
    fn prefix(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "ipip-tunnel-addr-",
            TunnelKind::Vxlan => "vxlan-tunnel-addr-",
            TunnelKind::VxlanV6 => "vxlan-v6-tunnel-addr-",
        }
    }

    /// The `type` attribute stored with the address.
    pub fn attr_type(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "ipipTunnelAddress",
            TunnelKind::Vxlan => "vxlanTunnelAddress",
            TunnelKind::VxlanV6 => "vxlanV6TunnelAddress",
        }
    }
}

/// The handle of a node's tunnel address, e.g. `vxlan-tunnel-addr-node1`.
pub fn tunnel_handle(kind: TunnelKind, node: &str) -> String {
    format!("{}{node}", kind.prefix())
}

/// The node a tunnel handle belongs to, if `handle` is one.
pub fn tunnel_handle_node(handle: &str) -> Option<&str> {
    [TunnelKind::Ipip, TunnelKind::VxlanV6, TunnelKind::Vxlan]
        .into_iter()
        .find_map(|k| handle.strip_prefix(k.prefix()))
}

/// Keys of the secondary attributes stored with each address.
pub mod attr {
    pub const NAMESPACE: &str = "namespace";
    pub const POD: &str = "pod";
    pub const NODE: &str = "node";
    pub const TYPE: &str = "type";
    /// `type` of pod addresses.
    pub const TYPE_POD: &str = "pod";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_follow_calico_names() {
        assert_eq!(pod_handle("abc"), "k8s-pod-network.abc");
        let t = tunnel_handle(TunnelKind::Vxlan, "n-1");
        assert_eq!(t, "vxlan-tunnel-addr-n-1");
        assert_eq!(tunnel_handle_node(&t), Some("n-1"));
        assert_eq!(
            tunnel_handle_node(&tunnel_handle(TunnelKind::VxlanV6, "n")),
            Some("n")
        );
        assert_eq!(tunnel_handle_node("k8s-pod-network.x"), None);
    }
}
