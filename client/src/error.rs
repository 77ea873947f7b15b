//! The client's error type.

use perun_channel::ChannelId;
use perun_wire::PeerId;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A channel rule was violated (by us or by a peer).
    #[error("channel rule: {0}")]
    Channel(#[from] perun_channel::Error),
    /// The transport failed (peer unreachable, timed out, refused the frame).
    #[error("wire: {0}")]
    Wire(#[from] perun_wire::Error),
    /// The durable store failed; nothing was signed or sent after it.
    #[error("persistence: {0}")]
    Persistence(#[from] perun_persistence::Error),
    /// The chain backend failed.
    #[error("chain: {0}")]
    Chain(#[from] perun_adjudicator::Error),
    /// The wallet failed.
    #[error("wallet: {0}")]
    Wallet(#[from] perun_wallet::Error),
    /// A peer rejected our proposal or update; nothing changed.
    #[error("participant {index} rejected: {reason}")]
    Rejected {
        /// The rejecting participant's index.
        index: usize,
        /// The reason it gave.
        reason: String,
    },
    /// Two participants proposed an update at the same time and ours lost
    /// (the lower participant index wins). Retry.
    #[error("concurrent update conflict; retry")]
    Conflict,
    /// A peer sent something the protocol does not allow at this point.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        /// The offending peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
    /// The closure passed to `try_update` refused to build a next state.
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    /// A step did not finish within its timeout.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// No channel with this id is known to the client.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// The operation does not fit the channel's phase.
    #[error("channel is {0:?}; operation not possible")]
    Phase(perun_channel::Phase),
    /// The client was misconfigured.
    #[error("configuration: {0}")]
    Config(String),
    /// The client has shut down.
    #[error("client is shut down")]
    Closed,
}

impl Error {
    /// Whether retrying the same operation later can succeed (a lost
    /// conflict, a busy peer, a timeout).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict | Error::Timeout(_))
            || matches!(self, Error::Channel(perun_channel::Error::Busy))
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
