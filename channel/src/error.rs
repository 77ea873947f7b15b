//! The channel crate's error type.

use alloy_primitives::{Address, B256};

use crate::Phase;

/// A violated channel rule. Every variant is a reason to refuse a state or
/// an update; none of them leaves a [`Machine`](crate::Machine) changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Number of participants outside `2..=16`.
    #[error("channel needs 2..=16 participants, got {0}")]
    Participants(usize),
    /// A participant address appears twice or is the zero address.
    #[error("participant {0} is zero or listed twice")]
    BadParticipant(Address),
    /// Challenge duration outside 1 s ..= 365 days (the adjudicator's bounds).
    #[error("challenge duration of {0} s is outside 1 s ..= 365 days")]
    ChallengeDuration(u64),
    /// The funding matrix does not have one row per asset of one entry per participant.
    #[error("funding must be {assets} rows of {participants} entries")]
    FundingDimensions {
        /// Expected number of rows (the state's assets).
        assets: usize,
        /// Expected entries per row (the participants).
        participants: usize,
    },
    /// Number of assets outside `1..=16`.
    #[error("channel needs 1..=16 assets, got {0}")]
    Assets(usize),
    /// `appData` longer than the limit.
    #[error("appData is {0} bytes, limit is {limit}", limit = crate::limits::MAX_APP_DATA)]
    AppDataTooLarge(usize),
    /// The same asset (chain and holder) is listed twice; such a channel
    /// could never be concluded on-chain.
    #[error("asset {0} is listed twice")]
    DuplicateAsset(usize),
    /// A payment channel (app = 0) carried app data.
    #[error("payment channels carry no appData")]
    PaymentAppData,
    /// The balance matrix does not have one row per asset and one entry per participant.
    #[error("balances must be {assets} rows of {participants} entries")]
    Dimensions {
        /// Expected number of rows.
        assets: usize,
        /// Expected entries per row.
        participants: usize,
    },
    /// The state names another channel.
    #[error("state is for channel {got}, expected {expected}")]
    ChannelIdMismatch {
        /// The id derived from the params.
        expected: B256,
        /// The id in the state.
        got: B256,
    },
    /// The current state is final; nothing may follow it.
    #[error("state is final")]
    Final,
    /// The next version is not newer than the current one, or too far ahead.
    #[error(
        "version must be at least {expected} (and at most `MAX_VERSION_STEP` ahead), got {got}"
    )]
    Version {
        /// `current + 1`.
        expected: u64,
        /// What the update carried.
        got: u64,
    },
    /// The set or order of assets changed.
    #[error("assets changed")]
    AssetsChanged,
    /// The per-asset sum of balances changed (value created or destroyed).
    #[error("sum of balances of asset {0} changed")]
    SumChanged(usize),
    /// A balance sum overflowed 256 bits.
    #[error("balance overflow in asset {0}")]
    Overflow(usize),
    /// A participant other than the actor lost funds.
    #[error("participant {participant} would lose funds in asset {asset} to actor {actor}")]
    TakesOthersFunds {
        /// The acting participant.
        actor: usize,
        /// Whose balance decreased.
        participant: usize,
        /// In which asset.
        asset: usize,
    },
    /// A participant index out of range.
    #[error("participant index {0} out of range")]
    Index(usize),
    /// The channel's app refused the state; the app's typed reason is kept
    /// ([`AppRejection::downcast_ref`](crate::app::AppRejection::downcast_ref)).
    #[error("app refused: {0}")]
    App(crate::app::AppRejection),
    /// An app channel whose app this client does not know: its states cannot be checked.
    #[error("no rules known for app {0}")]
    UnknownApp(Address),
    /// A signature is missing.
    #[error("signature of participant {0} missing")]
    MissingSignature(usize),
    /// A signature does not verify for its participant.
    #[error("signature of participant {index} invalid: {reason}")]
    BadSignature {
        /// Whose signature.
        index: usize,
        /// Why it failed.
        reason: String,
    },
    /// The number of signature slots does not match the participants.
    #[error("expected {expected} signature slots, got {got}")]
    SignatureCount {
        /// Number of participants.
        expected: usize,
        /// Number of slots present.
        got: usize,
    },
    /// Signing this state would sign a second, different state with a version
    /// already signed.
    #[error("version {0} was already signed with different contents")]
    DoubleSign(u64),
    /// This participant signed the final state `version` (its hash `hash`):
    /// the channel is closing, and no other state of it is ever signed, or a
    /// newer state could lose to that final one on-chain.
    #[error("signed the final state {version} ({hash}); no other state of this channel is signed")]
    SignedFinal {
        /// The final state's version.
        version: u64,
        /// The final state's hash.
        hash: alloy_primitives::B256,
    },
    /// An operation that the current phase does not allow.
    #[error("{op} is not allowed in phase {phase:?}")]
    WrongPhase {
        /// The attempted operation.
        op: &'static str,
        /// The phase the machine is in.
        phase: Phase,
    },
    /// A phase transition outside the transition table.
    #[error("illegal phase transition {from:?} -> {to:?}")]
    IllegalTransition {
        /// Current phase.
        from: Phase,
        /// Requested phase.
        to: Phase,
    },
    /// No update is staged.
    #[error("no staged state")]
    NothingStaged,
    /// An update is already in flight.
    #[error("an update is already in flight")]
    Busy,
    /// Signing failed in the wallet.
    #[error("wallet: {0}")]
    Wallet(#[source] WalletError),
}

/// A wallet error, kept whole (shared, since the channel's errors compare
/// equal by what they say).
#[derive(Debug, Clone)]
pub struct WalletError(pub std::sync::Arc<perun_wallet::Error>);

impl PartialEq for WalletError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for WalletError {}

impl std::fmt::Display for WalletError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for WalletError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl From<perun_wallet::Error> for Error {
    fn from(e: perun_wallet::Error) -> Self {
        Error::Wallet(WalletError(std::sync::Arc::new(e)))
    }
}

/// The channel crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
