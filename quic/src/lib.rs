//! QUIC transport for Tern: quinn-proto's state machines driven by glommio, one endpoint per
//! core, all cores sharing one UDP port.
//!
//! # What it does
//!
//! * [`tls`]: loads the server certificate and key from PEM files, or for development creates a
//!   self-signed pair under `<data_dir>/tls/`; builds the quinn-proto server configuration, a
//!   rustls server configuration for TLS over TCP, and a client configuration that trusts one
//!   certificate. ALPN is `tern/1` everywhere.
//! * [`QuicSetup`] runs on the main thread before the executors start. It binds one UDP socket
//!   per core with SO_REUSEPORT on the same address, and creates a forwarding channel for every
//!   ordered pair of cores. It returns one [`CoreQuic`] per core, which is `Send`.
//! * [`CoreQuic::start`] runs inside the core's executor. It starts the core's endpoint and
//!   returns a [`Listener`] whose [`accept`](Listener::accept) yields connections whose
//!   handshake completed. A [`Connection`] accepts and opens bidirectional streams, which are
//!   `futures_lite` [`AsyncRead`](futures_lite::AsyncRead) / [`AsyncWrite`](futures_lite::AsyncWrite)
//!   byte streams.
//!
//! # What it does not do
//!
//! It knows nothing about chat: it yields connections and byte streams. It has no client side
//! (Tern clients use quinn on tokio; [`tls::client_config_trusting`] is the one client-side
//! helper). It offers no unidirectional streams (a peer's are stopped) and no unreliable
//! datagrams (they are dropped). It accepts no 0-RTT data. It does not set "don't fragment" on
//! its sockets, so path MTU discovery is off and packets stay at 1200 bytes. It uses no GSO,
//! GRO or ECN: one `sendmsg` per datagram. Local addresses are not tracked per packet: on a host
//! with several addresses, bind to a specific one, or replies may leave from a different source
//! address than the peer used.
//!
//! # How a datagram finds its connection
//!
//! The kernel spreads datagrams over the cores' sockets by a hash of the 4-tuple. That
//! keeps a connection on one core until the client's address changes (NAT rebinding,
//! migration); then its datagrams may arrive at another core, whose endpoint does not know the
//! connection and would answer with a stateless reset.
//!
//! So every connection ID this server issues names its core: the first byte is the core index
//! (see [`route`]). Each core's reader looks at the destination connection ID of every
//! datagram before its endpoint does. Short-header packets and Handshake packets whose ID names
//! another core go to that core over a glommio shared channel, as bytes plus the peer's
//! address. The owning core feeds them to its endpoint as if it had read them itself, and
//! answers from its own socket, which has the same address and port. A forwarded datagram is
//! never forwarded again. Initial and 0-RTT packets (new connections, with client-chosen IDs)
//! are handled by whichever core receives them: that core becomes the connection's owner. Each core's ID generator also rejects IDs naming another core, so a
//! datagram that ends up on the wrong core is dropped, never answered with a reset.
//! [`Stats`] counts forwarded datagrams in both directions.
//!
//! # The driver
//!
//! Per core: one reader task reads the socket and routes datagrams; one task per peer core
//! receives forwarded datagrams; one task per connection drives its quinn-proto `Connection`.
//! It feeds the connection its queued datagrams, sends what the connection produces, fires its
//! timer and relays events. Input and output per turn are bounded, and a driver with work left
//! yields, so a busy connection cannot starve the others on the core. Each connection's timer is
//! one glommio timer re-armed from `poll_timeout`. Everything is single-threaded per core:
//! `Rc<RefCell<..>>` state, std wakers, no locks.
//!
//! # Caveats for the executor
//!
//! * Every core must call [`CoreQuic::start`]: it waits until the forwarding channels to and
//!   from every other core are connected (it keeps the reactor ticking meanwhile, since glommio
//!   notices a peer connecting only when the reactor turns). Call it in the same order,
//!   relative to other such waits (a channel mesh join), on every core.
//! * [`Listener`], [`Connection`] and the streams are not `Send`: a connection lives and dies on
//!   the core whose endpoint accepted it. Hand work to other cores by message, not by moving
//!   the connection.
//! * Dropping the [`Listener`] does not stop the endpoint (its tasks keep serving until the
//!   executor ends); call [`Listener::close`] and then [`Listener::wait_idle`] to shut down.
//! * glommio executors need locked memory (`io_memory` plus the rings). While its socket is
//!   idle, each core holds one receive buffer (2 KiB by default) from that `io_memory`.
#![forbid(unsafe_code)]

#[cfg(feature = "driver")]
mod connection;
#[cfg(feature = "driver")]
mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod route;
#[cfg(feature = "driver")]
mod setup;
#[cfg(feature = "driver")]
mod stats;
#[cfg(feature = "driver")]
mod stream;
pub mod tls;

#[cfg(feature = "driver")]
pub use connection::Connection;
#[cfg(feature = "driver")]
pub use endpoint::Listener;
pub use quinn_proto::{ConnectionError, TransportConfig, VarInt};
#[cfg(feature = "driver")]
pub use setup::{CoreQuic, QuicError, QuicSetup};
#[cfg(feature = "driver")]
pub use stats::{Stats, StatsSnapshot};
#[cfg(feature = "driver")]
pub use stream::{RecvStream, SendStream};

/// quinn-proto, re-exported so that its configuration types match this crate's.
pub use quinn_proto;
