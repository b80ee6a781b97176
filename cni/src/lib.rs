//! Margay's CNI plugins.
//!
//! - `margay`: attaches a pod with a cali-style veth, a /32 (and /128) address, a link route to
//!   169.254.1.1 and a default route via it, and a /32 host route on the node.
//! - `margay-ipam`: hands out addresses from Margay's block allocator.
//!
//! [`spec`] is the protocol (versions, environment, errors, results); [`config`] is the network
//! configuration; [`plugin`] runs the commands; [`netsetup`] is the kernel side, [`datastore`]
//! the datastore side and [`state`] what the plugin keeps on the node. `docs/cni.md` documents
//! the configuration and every Margay error code.

pub mod config;
pub mod datastore;
pub mod install;
mod logging;
pub mod netsetup;
pub mod plugin;
pub mod spec;
pub mod token;

pub use plugin::{run, run_plugin, PluginType};
