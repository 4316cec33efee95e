//! Errors of the framing layer and the wire error codes every layer maps its errors to.

use crate::v1::ErrorCode;

/// A frame could not be decoded or encoded.
///
/// Every variant maps to a wire [`ErrorCode`] with [`CodecError::code`], so a server can answer
/// the peer with [`CodecError::to_frame`] before (if [`CodecError::is_fatal`]) closing.
///
/// What the decoder leaves in the read buffer after each error:
///
/// | variant           | buffer                                   | can decoding continue? |
/// |-------------------|------------------------------------------|------------------------|
/// | [`FrameTooLarge`](Self::FrameTooLarge) | untouched               | no: close the connection |
/// | [`EmptyFrame`](Self::EmptyFrame)       | the 4-byte prefix consumed | framing intact         |
/// | [`Decode`](Self::Decode)               | the whole frame consumed   | framing intact         |
/// | [`MissingBody`](Self::MissingBody)     | the whole frame consumed   | yes                    |
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length prefix (when decoding) or the encoded body (when encoding) is larger than the
    /// codec's `max_frame_bytes`. Nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length of the frame body in bytes, without the 4-byte prefix.
        len: usize,
        /// The codec's limit.
        max: usize,
    },
    /// The length prefix is 0. A `Frame` always has a body, so its encoding is never empty.
    #[error("zero-length frame")]
    EmptyFrame,
    /// The frame body is not a valid protobuf encoding of `Frame`.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The frame decoded but has no body. This is how a message type added in a newer protocol
    /// revision shows up: protobuf skips the unknown field and the `oneof` stays empty.
    #[error("frame (request {request_id}) has no known body")]
    MissingBody {
        /// The request id of the frame, so the answer can name the request it rejects.
        request_id: u64,
    },
}

impl CodecError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::EmptyFrame | Self::Decode(_) => ErrorCode::BadFrame,
            Self::MissingBody { .. } => ErrorCode::UnknownMessage,
        }
    }

    /// The request id the error answers: the frame's own for [`CodecError::MissingBody`],
    /// otherwise 0 (the request id could not be read).
    pub fn request_id(&self) -> u64 {
        match self {
            Self::MissingBody { request_id } => *request_id,
            _ => 0,
        }
    }

    /// True if the connection must be closed after reporting this error.
    pub fn is_fatal(&self) -> bool {
        self.code().is_fatal()
    }

    /// The `Error` frame to send to the peer for this error.
    pub fn to_frame(&self) -> crate::Frame {
        crate::Frame::error(
            self.request_id(),
            self.code(),
            self.to_string(),
            self.is_fatal(),
        )
    }
}

impl ErrorCode {
    /// True if the server closes the connection after sending an `Error` with this code.
    ///
    /// This is the server's policy for each code and what docs/PROTOCOL.md documents; the
    /// `fatal` flag of the `Error` message on the wire is authoritative.
    pub fn is_fatal(self) -> bool {
        match self {
            // The stream cannot be trusted or the session cannot start.
            Self::BadFrame
            | Self::FrameTooLarge
            | Self::UnsupportedVersion
            | Self::Unauthenticated
            | Self::TokenInvalid
            | Self::TokenExpired
            | Self::TokenRevoked
            | Self::LoginTimeout
            | Self::SessionNotFound
            | Self::AlreadyAuthenticated
            | Self::TooManyDevices
            | Self::ConnectionLimit => true,
            // The request failed; the session goes on.
            Self::Unspecified
            | Self::UnknownMessage
            | Self::UnexpectedMessage
            | Self::InvalidArgument
            | Self::PayloadTooLarge
            | Self::NotFound
            | Self::Conflict
            | Self::RateLimited
            | Self::LimitExceeded
            | Self::Forbidden
            | Self::Blocked
            | Self::Muted
            | Self::NotMember
            | Self::Internal
            | Self::Unavailable
            | Self::Timeout => false,
        }
    }

    /// The name of the code as written in tern.proto, e.g. `"FRAME_TOO_LARGE"`.
    pub fn name(self) -> &'static str {
        self.as_str_name()
    }

    /// The wire number of the code, e.g. 1002.
    pub fn number(self) -> i32 {
        self as i32
    }
}
