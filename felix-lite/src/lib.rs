//! `margay-node`, the node agent: it makes the kernel match the cluster's intent and keeps it
//! that way, and runs the BGP speaker.
//!
//! - [`config`]: the agent's settings, from a YAML file and the environment.
//! - [`autodetect`]: finding the node's BGP address the ways Calico users know.

pub mod agent;
pub mod autodetect;
pub mod bgp;
pub mod config;
pub mod http;
pub mod logging;
pub mod routes;
