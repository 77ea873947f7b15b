//! The crate's one error enum.

use perun_channel::ChannelId;

/// Everything that can go wrong in the tower: the blob scheme, the store
/// and start-up. The API maps each to a stable code (`api::ApiError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The blob is longer than [`crate::scheme::MAX_BLOB_LEN`].
    #[error("blob of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The blob is too short to hold a nonce and a tag.
    #[error("blob of {0} bytes is too short")]
    TooShort(usize),
    /// The AEAD tag does not verify: a wrong key (another channel) or a tampered blob.
    #[error("blob does not decrypt with this channel's key")]
    Decrypt,
    /// The decrypted plaintext is empty.
    #[error("blob plaintext is empty")]
    EmptyPlaintext,
    /// The plaintext's format byte is not one this build reads.
    #[error("blob plaintext has the unknown format {0}")]
    PlaintextFormat(u8),
    /// The plaintext's body does not decode.
    #[error("blob plaintext does not decode: {0}")]
    PlaintextBody(#[source] postcard::Error),
    /// Bytes follow the plaintext's body.
    #[error("blob plaintext has {0} trailing bytes")]
    PlaintextTrailing(usize),
    /// A signature in the plaintext is not a signature.
    #[error("blob signature {index} does not parse: {source}")]
    PlaintextSignature {
        /// The participant's index.
        index: usize,
        /// Why.
        #[source]
        source: perun_wallet::Error,
    },
    /// The decrypted params are not this channel's.
    #[error("blob names channel {found}, expected {expected}")]
    WrongChannel {
        /// The channel the key was derived for.
        expected: ChannelId,
        /// The channel the params hash to.
        found: ChannelId,
    },
    /// The decrypted state is invalid or not signed by every participant.
    #[error("blob state is not valid and fully signed: {0}")]
    BadState(#[source] perun_channel::Error),
    /// Encoding the plaintext failed.
    #[error("encoding blob: {0}")]
    EncodeBlob(#[source] postcard::Error),
    /// Encrypting the plaintext failed (the AEAD gives no detail).
    #[error("sealing the blob failed")]
    Seal,
    /// Encoding a request to the tower failed.
    #[error("encoding the request: {0}")]
    EncodeRequest(#[source] serde_json::Error),
    /// The tower's HTTP address is not one the client can use.
    #[error("tower url {url:?}: {reason}")]
    Url {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tower did not answer within the client's timeout.
    #[error("tower did not answer {what} within {after:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The HTTP exchange failed (connection refused or reset, bad framing).
    #[error("http: {0}")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The tower's answer is longer than the client reads.
    #[error("tower answer exceeds {max} bytes")]
    ResponseTooLarge {
        /// The limit.
        max: usize,
    },
    /// The tower refused the request with one of its stable error codes.
    #[error("tower refused ({status} {code}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The stable code (`unknown_user`, `stale_appointment`, ...).
        code: String,
        /// The tower's message.
        message: String,
    },
    /// The tower's answer is not the JSON the API promises.
    #[error("tower answer does not decode: {0}")]
    BadResponse(#[source] serde_json::Error),
    /// A hex field of the tower's answer is not hex.
    #[error("tower answer's {field} is not hex: {source}")]
    BadHex {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: hex::FromHexError,
    },
    /// The tower answered about something other than what was asked (a
    /// receipt for another appointment, a subscription of another user, a
    /// status of another locator).
    #[error("tower answered {what} for something else than asked")]
    WrongAnswer {
        /// What the answer was (`receipt`, `subscription`, `status`).
        what: &'static str,
    },
    /// A signature in the tower's answer is not by the tower, or the answer
    /// is not for what was asked.
    #[error("tower answer for {what} is not signed by {expected} (signed by {found:?})")]
    WrongTowerSignature {
        /// What the signature covers (`receipt`, `subscription`).
        what: &'static str,
        /// The tower's address, as configured.
        expected: alloy_primitives::Address,
        /// Who signed it, if the signature recovers at all.
        found: Option<alloy_primitives::Address>,
    },
    /// The store failed (redb).
    #[cfg(feature = "server")]
    #[error("store: {0}")]
    Store(#[source] Box<redb::Error>),
    /// A stored value does not decode: the file is damaged or from a newer build.
    #[error("store value in {table} does not decode: {reason}")]
    Corrupt {
        /// The table it is in.
        table: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's schema is newer than this build.
    #[error("store schema {found} is newer than {supported}")]
    SchemaTooNew {
        /// The schema found.
        found: u64,
        /// The newest this build opens.
        supported: u64,
    },
    /// The user never registered.
    #[error("unknown user {0}")]
    UnknownUser(alloy_primitives::Address),
    /// The user's subscription expired.
    #[error("subscription of {user} expired at {expiry}")]
    Expired {
        /// The user.
        user: alloy_primitives::Address,
        /// Its expiry (unix seconds).
        expiry: u64,
    },
    /// Every slot of the user's subscription holds an appointment.
    #[error("{user} has no free slot of {slots}")]
    NoFreeSlot {
        /// The user.
        user: alloy_primitives::Address,
        /// Its slots in all.
        slots: u32,
    },
    /// The tower holds as many users or appointments as it is configured
    /// to ([`crate::store::StoreLimits`]).
    #[error("the tower is full: at most {max} {what}")]
    TowerFull {
        /// What ran out: `users` or `appointments`.
        what: &'static str,
        /// The configured maximum.
        max: u64,
    },
    /// An appointment not newer than the stored one of the same user and
    /// locator (a replay or an out-of-order resend).
    #[error("appointment {seq} for {locator} is not newer than the stored {stored}")]
    Stale {
        /// The locator.
        locator: crate::scheme::Locator,
        /// The sequence number sent.
        seq: u64,
        /// The stored appointment's sequence number.
        stored: u64,
    },
    /// A chain call of the responder failed (see `perun_adjudicator::Error::is_transient`).
    #[error("chain: {0}")]
    Chain(#[from] perun_adjudicator::Error),
    /// A blocking store task did not finish (it panicked or the runtime shut down).
    #[error("store task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Signing or a key failed.
    #[error(transparent)]
    Wallet(#[from] perun_wallet::Error),
    /// Reading a file or binding a socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The appointment writer thread could not be started.
    #[error("starting the appointment writer: {0}")]
    Thread(#[source] std::io::Error),
    /// The appointment writer thread is gone (it panicked or the tower is shutting down).
    #[error("the appointment writer stopped")]
    WriterGone,
    /// The configuration is not valid.
    #[error("config: {0}")]
    Config(String),
}

#[cfg(feature = "server")]
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(Box::new(e.into()))
            }
        }
    )*};
}
#[cfg(feature = "server")]
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
