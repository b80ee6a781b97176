//! Margay's BGP speaker.
//!
//! - [`fsm`]: the session state machine (RFC 4271 §8), pure.
//! - [`rib`]: Adj-RIB-In, Loc-RIB, Adj-RIB-Out, the decision process, route
//!   reflection, policy and graceful-restart stale handling, pure.
//! - [`session`] (private) and [`speaker`]: the tokio driver, and the embedding API
//!   ([`Speaker::start`] → [`SpeakerHandle`], [`BestRouteStream`]).
//! - [`sockopt`]: TCP-MD5 and TTL security socket options.
//!
//! The speaker never writes to the kernel: embedders subscribe to best-route changes
//! and install what they want. `docs/bgp.md` describes the architecture.

pub mod config;
pub mod fsm;
pub mod rib;
mod session;
pub mod sockopt;
pub mod speaker;

pub use config::{AddressFamily, ConfigError, GracefulRestartConfig, PeerConfig, SpeakerConfig};
pub use fsm::{ConnectMode, State};
pub use margay_bgp_wire as wire;
pub use rib::{NextHopMode, PathAttrs, Policy};
pub use session::{PeerStats, SessionStatus};
pub use speaker::{
    BestRoute, BestRouteChange, BestRouteStream, Histogram, MessageCounts, Metrics, PathStatus,
    PeerStatus, RouteOrigin, RouteStatus, Speaker, SpeakerError, SpeakerHandle,
};
