//! The resource types. Field names and defaults follow Calico's, so its users recognise them;
//! where Margay departs, `docs/resources.md` says why.
//!
//! Every type is a cluster-scoped CRD of `margay.io/v1` generated with `kube::CustomResource`.
//! [`MargayResource`] ties each to its [`Kind`] in the datastore and to its validation.

mod bgp;
mod common;
mod ipam;
mod node;
mod pool;

pub use bgp::*;
pub use common::*;
pub use ipam::*;
pub use node::*;
pub use pool::*;

use crate::store::Kind;
use crate::validation::ValidationErrors;
use kube::core::ClusterResourceScope;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// What the datastore needs to know of a resource type.
pub trait MargayResource:
    kube::Resource<DynamicType = (), Scope = ClusterResourceScope>
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The datastore kind of this type.
    const KIND: Kind;

    /// Checks every field; each error names the field path, the value and the reason.
    fn validate(&self) -> Result<(), ValidationErrors>;
}

/// Validates `metadata.name` as a Kubernetes object name.
pub(crate) fn check_name(meta: &kube::core::ObjectMeta, errs: &mut ValidationErrors) {
    let name = meta.name.as_deref().unwrap_or("");
    if !crate::names::is_dns_subdomain(name) {
        errs.add(
            "metadata.name",
            name,
            "must be a lower-case DNS subdomain (a-z, 0-9, '-', '.'), at most 253 characters",
        );
    }
}

/// Checks that an object whose name is derived from its content carries that name.
pub(crate) fn check_derived_name(
    meta: &kube::core::ObjectMeta,
    want: &str,
    from: &str,
    errs: &mut ValidationErrors,
) {
    let name = meta.name.as_deref().unwrap_or("");
    if name != want {
        errs.add(
            "metadata.name",
            name,
            format!("must be {want:?}, the name derived from {from}"),
        );
    }
}

macro_rules! margay_resource {
    ($($ty:ty => $kind:ident),* $(,)?) => {
        $(impl MargayResource for $ty {
            const KIND: Kind = Kind::$kind;
            fn validate(&self) -> Result<(), ValidationErrors> {
                let mut errs = ValidationErrors::new();
                self.check(&mut errs);
                errs.into_result()
            }
        })*
    };
}

margay_resource! {
    IPPool => IPPool,
    IPAMBlock => IPAMBlock,
    BlockAffinity => BlockAffinity,
    IPAMHandle => IPAMHandle,
    IPAMConfig => IPAMConfig,
    IPReservation => IPReservation,
    BGPConfiguration => BGPConfiguration,
    BGPPeer => BGPPeer,
    Node => Node,
    WorkloadEndpoint => WorkloadEndpoint,
}
