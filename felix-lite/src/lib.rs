//! `margay-node`, the node agent: it makes the kernel match the cluster's intent and keeps it
//! that way, and runs the BGP speaker.
//!
//! - [`config`]: the agent's settings, from a YAML file and the environment.

pub mod agent;
pub mod config;
pub mod http;
pub mod logging;
pub mod routes;
