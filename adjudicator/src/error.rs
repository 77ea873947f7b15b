//! The crate's one error type, shared by every backend so that a caller (and
//! the conformance suite) sees the same error for the same broken rule.

use alloy_primitives::{Address, U256};

/// Why a funding, dispute or withdrawal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The params or the state break a channel rule (dimensions, channel id, limits).
    #[error("invalid channel: {0}")]
    Channel(#[from] perun_channel::Error),
    /// Fewer signatures than participants, or a slot is empty.
    #[error("state carries too few signatures: {got} of {expected}")]
    TooFewSignatures {
        /// Number of participants.
        expected: usize,
        /// Signatures present.
        got: usize,
    },
    /// A signature does not recover to its participant (forged, wrong state, high `s`, bad `v`).
    #[error("signature {index} is invalid")]
    BadSignature {
        /// Whose signature.
        index: usize,
    },
    /// A withdrawal authorisation not signed by its participant (forged, high `s`, bad `v`).
    #[error("withdrawal authorisation is not signed by its participant")]
    BadAuthorization,
    /// The acting account is not the participant it claims to be.
    #[error("{0} is not a participant of this channel at the given index")]
    NotParticipant(Address),
    /// Not every participant funded before the funding timeout.
    #[error("funding timed out; not funded: {missing:?}")]
    FundingTimeout {
        /// `(index, address)` of every participant whose deposit is missing.
        missing: Vec<(usize, Address)>,
    },
    /// The channel is already concluded.
    #[error("channel already concluded")]
    AlreadyConcluded,
    /// A refutation came after the dispute's timeout.
    #[error("the dispute's timeout has passed")]
    TimeoutPassed,
    /// A refutation did not carry a strictly higher version.
    #[error("version {got} does not exceed the registered version {registered}")]
    VersionTooLow {
        /// The version on-chain.
        registered: u64,
        /// The version offered.
        got: u64,
    },
    /// Concluding a channel that has no registered dispute.
    #[error("no dispute is registered for this channel")]
    NotRegistered,
    /// Concluding before the dispute's timeout.
    #[error("the dispute times out at {timeout}, now is {now}")]
    TimeoutNotPassed {
        /// The dispute's timeout (chain seconds).
        timeout: u64,
        /// The chain's time when checked.
        now: u64,
    },
    /// The state to conclude is not the registered one.
    #[error("state is not the registered state")]
    WrongState,
    /// `concludeFinal` needs a final state.
    #[error("state is not final")]
    NotFinal,
    /// Withdrawing before the channel's outcome is set.
    #[error("the channel's outcome is not set yet")]
    NotConcluded,
    /// A state lists the same asset holder twice.
    #[error("asset holder {0} listed twice")]
    DuplicateAsset(Address),
    /// An asset whose holder this backend does not know.
    #[error("unknown asset holder {0}")]
    UnknownAsset(Address),
    /// The account cannot pay for a deposit.
    #[error("insufficient funds: need {need}, have {have}")]
    InsufficientFunds {
        /// The amount required.
        need: U256,
        /// The amount available.
        have: U256,
    },
    /// Paying the withdrawal's receiver failed.
    #[error("payment to {0} failed")]
    PaymentFailed(Address),
    /// A timestamp or amount does not fit.
    #[error("arithmetic overflow")]
    Overflow,
    /// The wallet could not sign.
    #[error("wallet: {0}")]
    Wallet(#[from] perun_wallet::Error),
    /// The node or the transport failed.
    #[error("chain: {0}")]
    Chain(String),
    /// A transaction reverted for a reason not listed above.
    #[error("transaction reverted: {0}")]
    Reverted(String),
    /// A chain event that does not decode or does not belong to the channel.
    #[error("bad event: {0}")]
    BadEvent(String),
    /// The anvil test harness failed.
    #[error("anvil: {0}")]
    Anvil(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
