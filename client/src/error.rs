//! The client's error type.

use perun_channel::ChannelId;
use perun_wire::PeerId;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A cap on what peers can make us hold is reached ([`Limits`](crate::Limits));
    /// the peer's request was refused and nothing changed.
    #[error("{what} at its limit of {limit}")]
    Busy {
        /// Which cap.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// A step did not finish within its timeout.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// No channel with this id is known to the client.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// The operation does not fit the channel's phase.
    #[error("channel is {0:?}; operation not possible")]
    Phase(perun_channel::Phase),
    /// `ClientBuilder::build` lacks a required part.
    #[error("the client builder needs {0}")]
    Missing(&'static str),
    /// A proposal does not list us (our address with our peer id).
    #[error("we ({address}, {peer}) are not among the proposal's participants")]
    NotAParticipant {
        /// Our on-chain address.
        address: perun_channel::Address,
        /// Our peer id.
        peer: PeerId,
    },
    /// A proposal lists one peer for two participants.
    #[error("peer {0} appears twice in the proposal")]
    DuplicatePeer(PeerId),
    /// The configured [`Timeouts`](crate::Timeouts) break a relation the
    /// protocol relies on.
    #[error("timeouts: {0}")]
    Timeouts(crate::config::TimeoutRule),
    /// A proposal names another deployment (chain, adjudicator) than ours: its states could
    /// not be settled by our adjudicator.
    #[error("proposal names chain {} adjudicator {}, ours is chain {} adjudicator {}", theirs.chain_id, theirs.adjudicator, ours.chain_id, ours.adjudicator)]
    WrongDomain {
        /// Our adjudicator's deployment.
        ours: perun_channel::Domain,
        /// The proposal's.
        theirs: perun_channel::Domain,
    },
    /// A proposal has an asset our funder cannot deposit (another chain, a holder it is not
    /// configured for): balances in it would be worthless, so the channel is not opened.
    #[error("asset {index} (chain {chain_id}, holder {holder}) is not fundable here")]
    UnsupportedAsset {
        /// The asset's index in the allocation.
        index: usize,
        /// Its chain.
        chain_id: perun_channel::U256,
        /// Its holder.
        holder: perun_channel::Address,
    },
    /// The client has shut down.
    #[error("client is shut down")]
    Closed,
    /// A state is registered on-chain that the watcher has not seen in any
    /// event yet; it reads the channel's history again.
    #[error("registered state {hash} (version {version}) not seen in any event yet")]
    RegisteredStateUnknown {
        /// The registered version.
        version: u64,
        /// The registered state's hash.
        hash: perun_channel::B256,
    },
    /// The watcher's on-chain steps failed this many times in a row. It keeps
    /// trying in the background; `settle` stops waiting for it.
    #[error("the watcher failed {attempts} times in a row; last: {last}")]
    Stalled {
        /// Consecutive failures.
        attempts: u32,
        /// The last failure.
        last: std::sync::Arc<Error>,
    },
    /// A stored channel names a peer id that does not decode.
    #[error("stored peer id of participant {index} does not decode")]
    StoredPeerId {
        /// The participant's index.
        index: usize,
    },
    /// Stored channels could not be restored (with
    /// [`ClientBuilder::refuse_damaged_records`](crate::ClientBuilder::refuse_damaged_records)).
    #[error("{} stored channel(s) could not be restored{}", .0.len(), .0.first().map(|d| format!("; first {}: {}", d.id, d.error)).unwrap_or_default())]
    DamagedRecords(Vec<crate::DamagedRecord>),
    /// A watchtower call failed: the tower is down or slow, refused the
    /// request (its stable code is in the source), or answered with a
    /// signature that is not its configured key's.
    #[error("watchtower {tower}: {source}")]
    Tower {
        /// The tower's configured address.
        tower: perun_channel::Address,
        /// What went wrong.
        #[source]
        source: std::sync::Arc<perun_watchtower::Error>,
    },
    /// A watchtower configuration the client refuses at `build`.
    #[error("watchtower {tower}: {reason}")]
    TowerConfig {
        /// The tower's address.
        tower: perun_channel::Address,
        /// What is wrong.
        reason: &'static str,
    },
    /// A watchtower no longer holds the channel's appointment (it dropped
    /// the channel's identity, long after its subscription expired, or
    /// lost its store): the client sends the latest state again.
    #[error("watchtower {tower} no longer holds the channel's appointment; sending it again")]
    TowerLostAppointment {
        /// The tower's address.
        tower: perun_channel::Address,
    },
    /// A watchtower renewed the channel's subscription only until a time
    /// already past by this machine's clock (a skewed clock, or a tower
    /// with very short subscriptions): tried again with backoff.
    #[error("watchtower {tower} renewed until {expiry}, already past here ({now})")]
    TowerExpiryPast {
        /// The tower's address.
        tower: perun_channel::Address,
        /// The expiry it answered (unix seconds).
        expiry: u64,
        /// This machine's time then (unix seconds).
        now: u64,
    },
    /// A channel's watchtower task panicked (a bug); its supervisor
    /// restarted it (reported as `ChannelEvent::WatcherRestarted`).
    #[error("the watchtower task panicked")]
    TowerTaskPanicked,
    /// The watcher panicked (a bug); its supervisor restarted it.
    #[error("the watcher panicked")]
    WatcherPanicked,
    /// No channel with the peer can cover the amount (payments).
    #[error(
        "insufficient funds: {requested} requested, at most {available} available in one channel"
    )]
    InsufficientFunds {
        /// The most any one channel with the peer can give now.
        available: perun_channel::U256,
        /// What was asked for.
        requested: perun_channel::U256,
    },
    /// A payment amount of zero (payments).
    #[error("amount must not be zero")]
    ZeroAmount,
    /// Amounts that would sum above 2^256 − 1 (payments).
    #[error("amounts sum above 2^256 - 1")]
    AmountOverflow,
    /// No open two-party payment channel with the peer (payments).
    #[error("no open payment channel with peer {0}")]
    UnknownPeer(PeerId),
    /// None of the open channels with the peer holds the asset (payments).
    #[error("no channel with peer {peer} holds asset {} on chain {}", asset.holder, asset.chainId)]
    UnknownAsset {
        /// The peer.
        peer: PeerId,
        /// The asset asked for (boxed: it would double the enum's size).
        asset: Box<perun_channel::Asset>,
    },
    /// `send` asked for more than the reservation holds; the reservation
    /// was released (payments).
    #[error("{requested} is more than the {reserved} reserved")]
    ExceedsReservation {
        /// What the reservation held.
        reserved: perun_channel::U256,
        /// What `send` asked for.
        requested: perun_channel::U256,
    },
    /// A client has one payments layer at a time; another one is alive.
    #[error("this client already has a payments layer")]
    PaymentsInUse,
    /// A reservation made by another `Payments` (payments).
    #[error("the reservation belongs to another payments layer")]
    ForeignReservation,
    /// An expected payment did not arrive in time (payments).
    #[error("expected {expected}, {arrived} arrived in time")]
    NotReceived {
        /// What was expected.
        expected: perun_channel::U256,
        /// What arrived for it before the timeout.
        arrived: perun_channel::U256,
    },
    /// More is reserved on a channel than our balance in it: something paid
    /// from the channel outside the payments layer.
    #[error("channel {channel}: {reserved} reserved but the balance is {balance}")]
    BooksOverdrawn {
        /// The channel.
        channel: ChannelId,
        /// What is reserved on it.
        reserved: perun_channel::U256,
        /// Our balance in it.
        balance: perun_channel::U256,
    },
    /// The adjudicator backend cannot read the chain's history
    /// ([`Adjudicator::history`](perun_adjudicator::Adjudicator::history) is
    /// `None`): no chain index, no `recover_funds`.
    #[error("the chain backend cannot read the chain's history")]
    NoChainHistory,
    /// A log the chain index refused (it is skipped, never counted).
    #[error("untrusted log at block {block} index {log_index}: {reason}")]
    UntrustedLog {
        /// The block it claims.
        block: u64,
        /// Its index in the block.
        log_index: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `force_update` on a payment channel: only app channels have moves
    /// to force (a payment channel closes with `settle`).
    #[error("channel {0} is a payment channel; only app channels are progressed on-chain")]
    NotAnAppChannel(ChannelId),
    /// Our forced move of `version` will never land on-chain.
    #[error("forced move of version {version} will not land: {reason}")]
    MoveMoot {
        /// The move's version.
        version: u64,
        /// Why.
        reason: MootReason,
    },
}

/// Why a forced move will never land.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MootReason {
    /// The dispute's state is no longer the one the move follows (the other
    /// player moved, or a newer state was registered); it is now `registered`.
    #[error("the dispute moved on to version {registered}")]
    ChainMoved {
        /// The version registered now.
        registered: u64,
    },
    /// The progression window closed before the move could be sent.
    #[error("the progression window closed")]
    WindowClosed,
    /// The channel was concluded.
    #[error("the channel is concluded")]
    Concluded,
    /// The adjudicator or the app contract refused it.
    #[error("refused on-chain: {0}")]
    Refused(std::sync::Arc<perun_adjudicator::Error>),
    /// The client shut down while it waited.
    #[error("the client shut down")]
    Shutdown,
}

impl Error {
    /// Whether it failed only because something else ran at the same time
    /// (a conflicting update; a busy channel, peer or store; a timeout
    /// waiting for one): retrying soon can succeed. Cooperative settlement
    /// retries these before it goes on-chain. A peer out of reach is not
    /// included: see [`is_transient`](Self::is_transient).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Conflict | Error::Timeout(_) | Error::Busy { .. }
        ) || matches!(self, Error::Channel(perun_channel::Error::Busy))
            || matches!(self, Error::Wire(perun_wire::Error::Refused(r))
                if r.code == perun_wire::RefusalCode::Busy)
    }

    /// Whether the same operation can succeed later: it is
    /// [retryable](Self::is_retryable), or a peer was out of reach for now
    /// (not dialable, the connection closed, no reply in time:
    /// [`perun_wire::Error::is_transient`]). A payment that failed so may
    /// have reached the peer; the update protocol resolves that (DESIGN
    /// §8), and a retry is a new update.
    ///
    /// ```
    /// use perun_client::Error;
    /// let offline = Error::Wire(perun_wire::Error::ConnectionClosed);
    /// assert!(offline.is_transient() && !offline.is_retryable());
    /// assert!(Error::Conflict.is_transient());
    /// assert!(!Error::Wire(perun_wire::Error::UnsupportedProtocol).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        self.is_retryable() || matches!(self, Error::Wire(e) if e.is_transient())
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
