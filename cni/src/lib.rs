//! Margay's CNI plugins.
//!
//! - `margay`: attaches a pod with a cali-style veth, a /32 (and /128) address, a link route to
//!   169.254.1.1 and a default route via it, and a /32 host route on the node.
//! - `margay-ipam`: hands out addresses from Margay's block allocator.
//!
//! [`spec`] is the protocol (versions, environment, errors, results); [`config`] is the network
//! configuration.

pub mod config;
pub mod install;
pub mod spec;
pub mod token;
