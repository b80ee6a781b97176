//! Margay's resource model and datastore.
//!
//! - [`resources`]: the types users edit (IPPool, BGPPeer, ...) and the ones Margay's components
//!   write (IPAMBlock, BlockAffinity, ...), generated into CRDs of group `margay.io/v1`.
//! - [`validation`]: field-path errors for every resource.
//! - [`selector`]: the label-selector expression language of `nodeSelector` / `peerSelector`.
//! - [`names`]: how object names are derived from CIDRs and nodes, so they never collide.
//! - [`store`]: the datastore contract with compare-and-swap, and its backends.
//! - [`crd`]: CRD generation, used by `margay-crdgen` and the check that the committed CRDs
//!   match the types.

pub mod crd;
pub mod names;
pub mod resources;
pub mod selector;
pub mod store;
pub mod time;
pub mod validation;

pub use resources::*;
pub use store::{
    Backend, Commit, Committed, DatastoreConfig, Kind, Lenient, ReadSet, Reads, Revision, Store,
    StoreError, WatchEvent,
};
