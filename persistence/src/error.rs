//! The persistence crate's error type.

use perun_channel::ChannelId;

/// Everything a [`Persister`](crate::Persister) can refuse or fail at.
///
/// Two kinds of error exist. *Rejections* (`UnknownChannel`, `AlreadyExists`,
/// `StaleVersion`, `VersionConflict`, `InvalidInput`, `LimitExceeded`, `BurntTooFar`) mean
/// the request was refused and nothing was written. *Failures* (`Storage`,
/// `Io`, `Corrupt`, `Closed`, ...) mean the store could not answer; a write
/// that failed this way may or may not be on disk, and the caller must not
/// treat it as durable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The channel is not in the store (never created, or removed).
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// `channel_created` for a channel that already exists with other contents.
    #[error("channel {0} already exists with different contents")]
    AlreadyExists(ChannelId),
    /// A state older than the stored fully signed state: persisting it would
    /// roll the channel back.
    #[error("channel {id}: version {got} is not newer than stored version {stored}")]
    StaleVersion {
        /// The channel.
        id: ChannelId,
        /// Version of the stored fully signed state.
        stored: u64,
        /// Version that was offered.
        got: u64,
    },
    /// A second, different fully signed state with the version already stored.
    #[error("channel {id}: a different fully signed state with version {version} is stored")]
    VersionConflict {
        /// The channel.
        id: ChannelId,
        /// The version both states carry.
        version: u64,
    },
    /// A metadata key or value ([`Persister::meta_put`](crate::Persister::meta_put))
    /// longer than the store takes.
    #[error("metadata {key:?}: {len} bytes, at most {max}")]
    MetaTooLarge {
        /// The key (cut to its first 64 bytes).
        key: String,
        /// The length offered.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The store has no metadata slot (a [`Persister`](crate::Persister)
    /// that does not implement [`meta_get`](crate::Persister::meta_get) and
    /// [`meta_put`](crate::Persister::meta_put)).
    #[error("this store keeps no metadata")]
    MetaUnsupported,
    /// The caller passed a record or state that breaks a channel rule.
    #[error("channel {id}: invalid input: {source}")]
    InvalidInput {
        /// The channel.
        id: ChannelId,
        /// The violated rule.
        #[source]
        source: perun_channel::Error,
    },
    /// The caller passed something outside this crate's own limits
    /// (peer ids, metadata, participant indices).
    #[error("channel {id}: {what}")]
    LimitExceeded {
        /// The channel.
        id: ChannelId,
        /// Which limit, and by how much.
        what: String,
    },
    /// A burnt version further past the current version than any proposal
    /// could skip.
    #[error("channel {id}: burnt version {burnt} is past the limit {cap}")]
    BurntTooFar {
        /// The channel.
        id: ChannelId,
        /// The burnt version offered.
        burnt: u64,
        /// The highest burnt version allowed now.
        cap: u64,
    },
    /// A stored record decoded but failed validation (bad signature, broken
    /// channel rule): the bytes on disk cannot be trusted.
    #[error("stored channel {id} is invalid: {defect}")]
    InvalidRecord {
        /// The channel (the key the record is stored under).
        id: ChannelId,
        /// What check failed.
        #[source]
        defect: RecordDefect,
    },
    /// Stored bytes that do not decode: checksum mismatch, truncation,
    /// unknown tag, or a database file redb cannot read.
    #[error("corrupted store{}: {reason}", id.map(|id| format!(" (channel {id})")).unwrap_or_default())]
    Corrupt {
        /// The channel whose record is damaged, when known.
        id: Option<ChannelId>,
        /// What is wrong.
        reason: String,
    },
    /// The file was written by a newer version of this crate.
    #[error("store schema version {found} is newer than the supported {supported}; upgrade perun")]
    SchemaTooNew {
        /// Schema version in the file.
        found: u64,
        /// Highest schema version this build understands.
        supported: u64,
    },
    /// A record encoded with a newer record format than this build understands.
    #[error("record format {found} is newer than the supported {supported}; upgrade perun")]
    FormatTooNew {
        /// Format byte in the record.
        found: u8,
        /// Highest format this build understands.
        supported: u8,
    },
    /// Another process (or handle) has the database file open.
    #[error("database file is already open elsewhere")]
    AlreadyOpen,
    /// An I/O error from the file system.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Any other error the storage engine (redb) reported, kept whole.
    #[error("storage engine: {0}")]
    Engine(#[source] redb::Error),
    /// The store's own failure (a writer that stopped, a check that could not run), described.
    #[error("storage: {0}")]
    Storage(String),
    /// The store's writer thread has stopped (after a fatal error or a panic
    /// inside the storage engine); reopen the store.
    #[error("persister is closed")]
    Closed,
}

impl Error {
    /// Whether this is a rejection: the request was refused and the store
    /// is unchanged.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Error::UnknownChannel(_)
                | Error::AlreadyExists(_)
                | Error::StaleVersion { .. }
                | Error::VersionConflict { .. }
                | Error::InvalidInput { .. }
                | Error::LimitExceeded { .. }
                | Error::BurntTooFar { .. }
                | Error::MetaTooLarge { .. }
                | Error::MetaUnsupported
        )
    }

    /// The channel the error is about, when it names one: a caller that
    /// loads many records tells the damaged ones apart by it.
    pub fn channel(&self) -> Option<ChannelId> {
        match self {
            Error::UnknownChannel(id) | Error::AlreadyExists(id) => Some(*id),
            Error::StaleVersion { id, .. }
            | Error::VersionConflict { id, .. }
            | Error::InvalidInput { id, .. }
            | Error::LimitExceeded { id, .. }
            | Error::BurntTooFar { id, .. }
            | Error::InvalidRecord { id, .. } => Some(*id),
            Error::Corrupt { id, .. } => *id,
            Error::SchemaTooNew { .. }
            | Error::FormatTooNew { .. }
            | Error::AlreadyOpen
            | Error::Io(_)
            | Error::Storage(_)
            | Error::Engine(_)
            | Error::MetaTooLarge { .. }
            | Error::MetaUnsupported
            | Error::Closed => None,
        }
    }
}

/// Why a record read from disk failed its checks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordDefect {
    /// The record is stored under a key its params do not hash to.
    #[error("its params hash to {actual}")]
    WrongKey {
        /// The id its params give.
        actual: ChannelId,
    },
    /// A check every created record passes failed (a signature, a limit,
    /// a channel rule).
    #[error(transparent)]
    Check(Box<Error>),
}

/// The persistence crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
