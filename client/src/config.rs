//! Client configuration.

use std::{future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use tern_protocol::{MAX_FRAME_DEFAULT, Platform};

use crate::{BackoffConfig, ClientError};

/// The byte stream a [`Client`](crate::Client) speaks the protocol over. All carry the same
/// length-prefixed frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// One TCP connection, plain (the default).
    #[default]
    Tcp,
    /// One TCP connection carrying TLS 1.3 or 1.2. ALPN `tern/1` is offered; a server that
    /// selects no protocol is accepted. The server's certificate is checked against
    /// [`ClientConfig::ca`], as for QUIC.
    Tls,
    /// One QUIC connection (TLS 1.3, ALPN `tern/1`) carrying one bidirectional stream that the
    /// client opens. The server's certificate is checked against [`ClientConfig::ca`].
    Quic,
    /// One logical session over a plain TCP connection and a QUIC connection at once (the dual
    /// channel). [`ClientConfig::server`] names both: `TCP_ADDR,QUIC_ADDR`. Each `Send` goes out
    /// on both paths (the server stores it once and answers on both); deliveries arrive on both
    /// and are handed over once. When one path fails the session goes on over the other, and
    /// the lost path is added again in the background.
    Dual,
}

impl Transport {
    /// `tcp`, `tls`, `quic` or `dual`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Quic => "quic",
            Self::Dual => "dual",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to connect and behave. Build it with [`ClientConfig::new`] and change fields as needed;
/// every other field has the default written on it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` (or an IP socket address written out, `[::1]:7600` for IPv6) of the gateway's
    /// TCP, TLS or QUIC listener. For TLS and QUIC the host part is also the TLS server name the
    /// certificate must be valid for (an IP address for an IP literal, sent without SNI). For
    /// [`Transport::Dual`]: the TCP listener's and the QUIC listener's, comma-separated
    /// (`127.0.0.1:7600,127.0.0.1:7601`).
    pub server: String,
    /// TCP, TLS, QUIC or both TCP and QUIC (default TCP).
    pub transport: Transport,
    /// TLS and QUIC only: a PEM file with the certificate(s) to trust, and only those, e.g. the
    /// gateway's self-signed development certificate `<data-dir>/tls/cert.pem`. Default `None`:
    /// trust the Mozilla root certificates compiled into the client (`webpki-roots`); system
    /// certificate stores are not read. Read once by [`Client::connect`](crate::Client::connect).
    pub ca: Option<PathBuf>,
    /// TLS and QUIC only: the SHA-256 of the server's certificate (DER), to trust exactly that
    /// certificate, whatever its issuer, names and dates (the gateway logs it at start; for a
    /// PEM file: `openssl x509 -in cert.pem -outform DER | sha256sum`). The handshake's
    /// signature is still checked. Instead of `ca`, not with it: for a development certificate
    /// reached by a name it was not made for (a LAN address). Default `None`.
    pub pin: Option<[u8; 32]>,
    /// Signed token minted by the gateway (`tern-gateway token`).
    pub token: String,
    /// Stable id of this device or installation, 1..=64 bytes. A second login with the same id
    /// replaces (kicks) the first.
    pub device_id: String,
    /// Default: `Platform::Other`.
    pub platform: Platform,
    /// Sent in `Hello.client_version`. Default: `tern-rs/<crate version>`.
    pub client_version: String,
    /// The sync position to start from (a `SyncDone.user_version` the application stored);
    /// default 0, which syncs everything this device has not acknowledged.
    pub sync_version: u64,
    /// Ask the server to sync right after login (default true). A send-only client can turn it
    /// off; reconnects always sync.
    pub sync_on_login: bool,
    /// For a client without a sync position (`sync_version` 0, e.g. a new installation): its
    /// first sync brings at most the latest this many unacknowledged messages of each
    /// conversation (0, the default: all of them). The ones left out stay on the server for
    /// [`Client::history`](crate::Client::history); the conversation's
    /// [`ConversationState::skipped_to_seq`](tern_protocol::ConversationState) names the last
    /// one. Auto-ack then acknowledges past them, so later syncs of this device do not bring
    /// them either. Once that sync completes (or a live message arrived first), every sync,
    /// after a reconnect too, brings every message this device has not acknowledged.
    pub initial_sync_limit: u32,
    /// Acknowledge delivered messages automatically (default true): one `Ack` per conversation
    /// for the highest seq up to which every message was handed to the application, coalesced
    /// over everything read from the socket at once. Off: call [`Client::ack`](crate::Client::ack).
    pub auto_ack: bool,
    /// Reconnect after the connection is lost (default true).
    pub reconnect: bool,
    /// Reconnect delays (default 100 ms doubling to 10 s, full jitter).
    pub backoff: BackoffConfig,
    /// Bound on connect plus login (default 10 s): for TCP the TCP handshake, for TLS the TCP
    /// and the TLS handshake, for QUIC the QUIC and TLS handshake and opening the stream; then
    /// Hello and its HelloOk.
    pub connect_timeout: Duration,
    /// Bound on waiting for the answer to a request (default 30 s).
    pub request_timeout: Duration,
    /// Ping interval if the server's HelloOk does not give one (default 30 s).
    pub heartbeat_interval: Duration,
    /// Largest frame accepted from the server before HelloOk says otherwise (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Where fresh tokens come from (default none). With one, the client refreshes its token
    /// before it expires (when a tenth of its lifetime, at least a second, is left: `Refresh`,
    /// without reconnecting), and logs in with a fresh one when the server ended the session
    /// for an expired token (Kick `EXPIRED`, or `TOKEN_EXPIRED` at a reconnect) instead of
    /// stopping. Without one, see [`Client::refresh_token`](crate::Client::refresh_token).
    pub token_source: Option<TokenSource>,
}

/// Future of a [`TokenSource`]: a new token, or why there is none (logged; asked again later).
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Gives the client a fresh token of the same user, typically from the application's backend
/// (which mints it with the gateway's secret or its token endpoint).
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenSource {
    /// A source that calls `fetch` for each new token.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(fetch())))
    }

    pub(crate) fn fetch(&self) -> TokenFuture {
        (self.0)()
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource(..)")
    }
}

impl ClientConfig {
    /// A config with the given server address, token and device id, and defaults otherwise.
    pub fn new(
        server: impl ToString,
        token: impl Into<String>,
        device_id: impl Into<String>,
    ) -> Self {
        Self {
            server: server.to_string(),
            transport: Transport::Tcp,
            ca: None,
            pin: None,
            token: token.into(),
            device_id: device_id.into(),
            platform: Platform::Other,
            client_version: concat!("tern-rs/", env!("CARGO_PKG_VERSION")).to_owned(),
            sync_version: 0,
            sync_on_login: true,
            initial_sync_limit: 0,
            auto_ack: true,
            reconnect: true,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
            max_frame_bytes: MAX_FRAME_DEFAULT,
            token_source: None,
        }
    }

    /// Checks the fields once, naming the first bad one.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: &str| Err(ClientError::Config(what.to_owned()));
        if self.server.is_empty() {
            return bad("server: empty");
        }
        for (transport, server) in self.paths()? {
            if matches!(transport, Transport::Tls | Transport::Quic) {
                crate::transport::server_name(&server)?;
            }
        }
        if self.token.is_empty() {
            return bad("token: empty");
        }
        if self.device_id.is_empty() || self.device_id.len() > 64 {
            return bad("device_id: must be 1..=64 bytes");
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return bad("backoff: initial must be > 0 and <= max");
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval: must be > 0");
        }
        if self.pin.is_some() && self.ca.is_some() {
            return bad("pin: give either a CA file or a certificate pin, not both");
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes: must be at least 1024");
        }
        Ok(())
    }

    /// The connections a session is made of: one, or for [`Transport::Dual`] a TCP and a
    /// QUIC one, each with its address.
    pub(crate) fn paths(&self) -> Result<Vec<(Transport, String)>, ClientError> {
        if self.transport != Transport::Dual {
            return Ok(vec![(self.transport, self.server.clone())]);
        }
        match self.server.split(',').map(str::trim).collect::<Vec<_>>()[..] {
            [tcp, quic] if !tcp.is_empty() && !quic.is_empty() => Ok(vec![
                (Transport::Tcp, tcp.to_owned()),
                (Transport::Quic, quic.to_owned()),
            ]),
            _ => Err(ClientError::Config(format!(
                "server: `{}`: the dual transport needs the TCP and the QUIC address, \
                 comma-separated (TCP_ADDR,QUIC_ADDR)",
                self.server
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_are_named_and_tls_ones_need_a_certificate_name() {
        let names: Vec<&str> = [
            Transport::Tcp,
            Transport::Tls,
            Transport::Quic,
            Transport::Dual,
        ]
        .into_iter()
        .map(Transport::as_str)
        .collect();
        assert_eq!(names, ["tcp", "tls", "quic", "dual"]);

        // `a b` names no certificate: fine for plain TCP, refused up front for TLS and QUIC.
        let mut config = ClientConfig::new("a b:7600", "t", "d");
        assert!(config.validate().is_ok());
        for transport in [Transport::Tls, Transport::Quic] {
            config.transport = transport;
            assert_eq!(
                config.validate().unwrap_err().to_string(),
                "invalid client config: server: `a b` is neither a DNS name nor an IP address, \
                 so it cannot name the server's TLS certificate",
                "{transport}"
            );
        }
    }

    #[test]
    fn dual_needs_a_tcp_and_a_quic_address() {
        let mut config = ClientConfig::new("127.0.0.1:7600, 127.0.0.1:7601", "t", "d");
        config.transport = Transport::Dual;
        assert_eq!(
            config.paths().unwrap(),
            [
                (Transport::Tcp, "127.0.0.1:7600".to_owned()),
                (Transport::Quic, "127.0.0.1:7601".to_owned())
            ]
        );
        assert!(config.validate().is_ok());
        for server in ["127.0.0.1:7600", "127.0.0.1:7600,", "a:1,b:2,c:3"] {
            config.server = server.into();
            assert_eq!(
                config.validate().unwrap_err().to_string(),
                format!(
                    "invalid client config: server: `{server}`: the dual transport needs the TCP \
                     and the QUIC address, comma-separated (TCP_ADDR,QUIC_ADDR)"
                )
            );
        }
        // The QUIC address must name the certificate.
        config.server = "127.0.0.1:7600,a b:7601".into();
        assert!(config.validate().unwrap_err().to_string().contains("`a b`"));
    }
}
