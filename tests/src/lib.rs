//! Margay's test harness, shared by every integration suite of the project.
//!
//! - [`EtcdProcess`]: a real etcd on free loopback ports with its own data directory, that can
//!   be stopped, killed, restarted and compacted.
//! - [`ApiServerProcess`]: a real kube-apiserver (from `KUBE_APISERVER_BIN`) with its own etcd
//!   and Margay's CRDs installed.
//! - [`netns`]: network namespaces joined by bridges, deleted when dropped.
//! - [`contract`]: the datastore contract suite, written once and run against every backend.
//!
//! Processes are stopped by their PID (SIGTERM, then SIGKILL after a grace period) when dropped,
//! and their temporary directories removed.

pub mod apiserver;
pub mod contract;
pub mod etcd;
pub mod netns;
mod ports;
mod process;

pub use apiserver::ApiServerProcess;
pub use etcd::EtcdProcess;
pub use ports::free_port;
