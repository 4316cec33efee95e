//! The SDK's error type.

use std::{io, path::PathBuf, sync::Arc};

use tern_protocol::{CodecError, ErrorCode, KickReason};

/// Everything a [`Client`](crate::Client) call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered the request with an `Error` frame.
    #[error("{}: {message}", code.name())]
    Server {
        /// The wire error code (tern.proto `ErrorCode`).
        code: ErrorCode,
        /// The server's human-readable text; for display only.
        message: String,
    },
    /// The connection was lost before the answer arrived, or the client is between connections.
    /// The request may or may not have reached the server. Sends do not fail this way while the
    /// client reconnects (they go out again, see
    /// [`Client::send_with_id`](crate::Client::send_with_id)); with reconnects off, retry a send
    /// with the same id.
    #[error("disconnected from the server")]
    Disconnected,
    /// The client was closed, or stopped for good (see [`Event::Stopped`](crate::Event)).
    #[error("client closed")]
    Closed,
    /// The server kicked this connection and the client does not reconnect.
    #[error("kicked by the server: {}: {message}", reason.as_str_name())]
    Kicked {
        /// Why.
        reason: KickReason,
        /// The server's text.
        message: String,
    },
    /// No answer within the configured request or connect timeout.
    #[error("timed out")]
    Timeout,
    /// The socket failed (connect, read or write).
    #[error("i/o error: {0}")]
    Io(Arc<io::Error>),
    /// The server sent bytes that are not a valid frame.
    #[error("invalid frame from the server: {0}")]
    Codec(#[from] CodecError),
    /// A request is larger than the server's frame limit (`HelloOk.max_frame_bytes`): it was not
    /// sent, and the connection goes on.
    #[error("request of {len} bytes exceeds the server's frame limit of {max} bytes")]
    RequestTooLarge {
        /// The encoded request's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The server sent a frame that makes no sense at this point (e.g. no HelloOk to Hello).
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// A [`ClientConfig`](crate::ClientConfig) field is invalid; the text names it.
    #[error("invalid client config: {0}")]
    Config(String),
    /// The CA file ([`ClientConfig::ca`](crate::ClientConfig::ca)) cannot be used: it cannot be
    /// read, is not PEM, or holds no usable certificate.
    #[error("CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS handshake (of a TLS-over-TCP or a QUIC connection) failed: most often the
    /// server's certificate is not trusted (wrong or missing
    /// [`ClientConfig::ca`](crate::ClientConfig::ca)) or not valid for the host name in
    /// [`ClientConfig::server`](crate::ClientConfig::server); over TLS also a server that does
    /// not speak TLS, closes the connection during the handshake, or refuses ALPN `tern/1`.
    #[error("TLS handshake with {server} failed: {reason}")]
    Tls {
        /// The configured server address.
        server: String,
        /// What went wrong, with the TLS alert or certificate error.
        reason: String,
    },
    /// QUIC only: the server does not speak ALPN protocol `tern/1`: it is not a Tern gateway,
    /// or one that speaks another protocol version. (Over TLS, ALPN is optional; a server that
    /// refuses `tern/1` fails with [`ClientError::Tls`].)
    #[error("{server} does not speak the Tern protocol over QUIC (ALPN tern/1): {reason}")]
    Alpn {
        /// The configured server address.
        server: String,
        /// What the handshake said.
        reason: String,
    },
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl ClientError {
    /// The wire error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True if reconnecting cannot help: the server rejected the login itself (bad, expired or
    /// revoked token; unsupported protocol version).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::TokenInvalid
                    | ErrorCode::TokenExpired
                    | ErrorCode::TokenRevoked
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::Unauthenticated
            )
        ) || matches!(
            self,
            Self::Config(_) | Self::CaFile { .. } | Self::Kicked { .. } | Self::Closed
        )
    }

    pub(crate) fn from_wire(e: &tern_protocol::Error) -> Self {
        Self::Server {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message.clone(),
        }
    }
}

/// Result with [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
