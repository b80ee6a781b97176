//! RIBs and route selection, without I/O.
//!
//! - [`attrs`]: path attributes as stored, and UPDATE → RIB input.
//! - [`table`]: the route table (Adj-RIBs-In after policy + Loc-RIB) with its change
//!   journal.
//! - [`decision`]: RFC 4271 §9.1 best path, RFC 4456 tie-breaks, ECMP.
//! - [`export`]: import loop checks, export rules (route reflection, eBGP, next
//!   hops), the per-peer Adj-RIB-Out and UPDATE packing.
//! - [`group`]: update groups, one Adj-RIB-Out and one encoding for peers that are
//!   sent the same UPDATEs.
//! - [`policy`]: prefix lists, community matching, attribute setting.
//! - [`graceful`]: the graceful-restart helper's stale-route state per peer.
//! - [`refresh`]: route refresh answers and requests with the RFC 7313 markers.

pub mod attrs;
pub mod decision;
pub mod export;
pub mod graceful;
pub mod group;
pub mod policy;
pub mod refresh;
pub mod table;

pub use attrs::{route_update, PathAttrs, RouteUpdate};
pub use decision::{Path, PeerIdx, Source, SourceKind, LOCAL};
pub use export::{
    collect, encode, AdjRibOut, ExportCtx, ImportCtx, ImportReject, NextHopMode, OutBatch,
};
pub use policy::Policy;
pub use table::{Entry, EntryId, Rib};
