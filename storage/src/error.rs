//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in the storage layer.
///
/// Mapping to wire error codes (done by the gateway):
/// [`StorageError::is_unavailable`] errors are transient and map to `UNAVAILABLE`
/// (the client retries with the same client message id, which is safe thanks to
/// idempotency); [`StorageError::InvalidArgument`] maps to `INVALID_ARGUMENT`;
/// everything else is an internal server error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The data directory is already open in this process; there is exactly one writer per
    /// directory.
    #[error("data directory {path} is already open in this process")]
    AlreadyOpen {
        /// The directory (canonicalised).
        path: PathBuf,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {path} is locked by another process ({detail})")]
    Locked {
        /// The directory.
        path: PathBuf,
        /// The backend's message.
        detail: String,
    },
    /// The directory was written by a format version this build cannot read.
    #[error(
        "data directory {path} has storage format version {found}; this build supports {supported}"
    )]
    UnsupportedFormat {
        /// The directory.
        path: PathBuf,
        /// The version found in the directory.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A record carries a record-format version this build does not know.
    #[error("record format version {found} is not supported (this build reads {supported})")]
    UnknownRecordVersion {
        /// Leading version byte of the record.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// A stored record or key does not parse.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
    /// The batch holding this write could not be committed; nothing of it was acknowledged and
    /// no sequence number was consumed. Retrying is safe.
    #[error("commit failed, the write was not stored: {0}")]
    CommitFailed(String),
    /// Any other error reported by the storage engine or the file system.
    #[error("storage backend error: {0}")]
    Backend(String),
    /// The store was closed (or its writer thread is gone).
    #[error("the store is closed")]
    Closed,
    /// The request itself is invalid (too long an id, id 0, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// No more internal ids can be allocated in this id space.
    #[error("internal id space exhausted")]
    IdSpaceExhausted,
}

impl StorageError {
    /// True for transient errors that the gateway reports as "unavailable, retry".
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::CommitFailed(_) | StorageError::Backend(_) | StorageError::Closed
        )
    }
}

/// Converts a RocksDB error. Deliberately not a `From` impl: no RocksDB type may appear in
/// the public API, not even in a trait impl.
#[cfg(feature = "store")]
pub(crate) fn backend(e: rocksdb::Error) -> StorageError {
    StorageError::Backend(e.into_string())
}

/// Result alias of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
