//! The Tern gateway: the server behind `tern-gateway`.
//!
//! One glommio executor per core. Each core accepts on the shared TCP port (SO_REUSEPORT),
//! reads Hello, and hands the connection to the core that owns the user ([`route::Router`]).
//! A conversation is owned by the core of its hash: only that core submits its appends to the
//! store, whose single writer thread group-commits them and assigns sequence numbers. Cores
//! talk over glommio's lock-free channel mesh. docs/architecture.md draws the whole path.
//!
//! Groups ([`groups`]) are owned by the core of their conversation, which checks permissions
//! and fans each message out once per core.
//!
//! Live rooms ([`rooms`]) are memory only: each core indexes its viewers, the room's owner
//! core numbers its messages and fans them out once per core.
//!
//! The admin and push HTTP API ([`api`]) runs on a side thread with its own (tokio) runtime and
//! reaches the cores only through [`admin::Bridge`].
//!
//! Push notifications for devices that are offline ([`notify`]: APNs, FCM or a webhook) are
//! sent from the same side runtime.
//!
//! What this crate does not do (yet): run as a cluster of nodes.

pub mod admin;
pub mod api;
pub mod config;
pub mod core;
pub mod groups;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod park;
pub mod ports;
pub mod presence;
pub mod push;
pub mod push_api;
pub mod rooms;
pub mod route;
pub mod server;
pub mod session;
pub mod side;
pub mod social;
pub mod sys;
#[cfg(test)]
mod test_side;
pub mod token;
pub mod transport;
pub mod webhook;

pub use config::Config;

/// A hash map for the per-delivery lookups: ahash instead of the standard SipHash, which cost
/// about a sixth of a core's time in group fan-out. Its keys are seeded at random per map, so
/// keys a client influences (room ids are hashes of room names) cannot be chosen to collide.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// The set counterpart of [`FastMap`].
pub type FastSet<T> = std::collections::HashSet<T, ahash::RandomState>;
#[cfg(feature = "rocks")]
pub use server::run;
pub use server::{GatewayError, Ready, run_with_store};
