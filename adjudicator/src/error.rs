//! The crate's one error type, shared by every backend so that a caller (and
//! the conformance suite) sees the same error for the same broken rule.
//!
//! Errors keep what they are about: the operation, the transaction hash, the
//! decoded revert with its arguments. [`Error::is_transient`] says whether the
//! same call may succeed later (a node that did not answer, a dropped
//! connection), as opposed to a rule the chain enforces.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256};

/// Why a call to the node failed (no verdict of the contracts: the call may
/// succeed if repeated).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RpcFailure {
    /// The node did not answer within the configured time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection to the node is gone; the backend reconnects.
    #[error("connection to the node lost")]
    Disconnected,
    /// The node answered with a JSON-RPC error (rate limit, overload, an
    /// unknown block after a reorg, ...).
    #[error("node error {code}: {message}")]
    Node {
        /// The JSON-RPC error code.
        code: i64,
        /// The node's message.
        message: String,
    },
    /// The node's answer did not decode.
    #[error("undecodable answer: {0}")]
    Decode(Arc<dyn std::error::Error + Send + Sync>),
    /// The transport failed in another way.
    #[error("transport: {0}")]
    Transport(Arc<dyn std::error::Error + Send + Sync>),
    /// A fault injected by a test's seeded schedule (see `testing::faults`).
    #[error("injected fault #{0}")]
    Injected(u64),
    /// The node answered, but without something it must have (the latest
    /// block, a block a moment ago reported, a deployment's block number).
    #[error("the node's answer lacks {0}")]
    Missing(&'static str),
    /// After a reconnect the endpoint serves another chain; the backend does
    /// not use it.
    #[error("the node serves chain {got}, not {expected}")]
    WrongChain {
        /// The chain id the backend was built for.
        expected: u64,
        /// The chain id the node reports now.
        got: u64,
    },
}

/// Why a transaction (or its simulation) reverted, decoded from its revert data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevertReason {
    /// `revert("...")` / `require(cond, "...")`.
    #[error("{0:?}")]
    Message(String),
    /// A Solidity panic (`0x11` overflow, `0x01` assert, ...).
    #[error("panic {0:#x}")]
    Panic(U256),
    /// A custom error of one of our contracts that has no variant of
    /// [`Error`] of its own: its name and its arguments, rendered.
    #[error("{name}({})", args.join(", "))]
    Custom {
        /// The error's name in the contract's ABI.
        name: &'static str,
        /// Its arguments, in order.
        args: Vec<String>,
    },
    /// Revert data that matches no known error.
    #[error("unknown revert data {0}")]
    Unknown(Bytes),
    /// A revert without data (out of gas, a failed call without reason).
    #[error("no revert data")]
    Empty,
}

/// Why a funding, dispute or withdrawal operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A signature the contract could not parse at all (wrong length, high
    /// `s`); the off-chain checks normally name the index before this.
    #[error("a signature is malformed")]
    MalformedSignature,
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
    /// A deposit met holdings other than the ones it was computed for (a
    /// deposit for the same slot landed first): nothing was deposited.
    #[error("holdings of {funding_id} changed: expected {expected}, found {found:?}")]
    HoldingsChanged {
        /// The funding slot.
        funding_id: B256,
        /// What the deposit expected to find.
        expected: U256,
        /// What the chain holds now (if known).
        found: Option<U256>,
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
    /// A progression did not carry exactly the registered version + 1 (a
    /// jump would leave the next player no version to answer with).
    #[error("a move must carry version {} (the registered {registered} + 1), not {got}", registered.saturating_add(1))]
    VersionStep {
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
    /// The params name another deployment (chain id, adjudicator) than this backend's: the
    /// adjudicator would refuse them (`WrongDomain`), and deposits for them could never be
    /// settled here.
    #[error("the channel names chain {chain_id} and adjudicator {adjudicator}, not this backend's")]
    WrongDomain {
        /// The chain id the params name.
        chain_id: U256,
        /// The adjudicator the params name.
        adjudicator: Address,
    },
    /// Asset `index` is on another chain than the adjudicator's (its `ForeignAsset`): a
    /// channel settles all its assets on one chain, so such an asset could never be paid out.
    #[error("asset {index} is on chain {chain_id}, not the adjudicator's")]
    ForeignAsset {
        /// The asset's index.
        index: usize,
        /// The chain it names.
        chain_id: U256,
    },
    /// A participant is listed twice (the adjudicator's `DuplicateParticipant`).
    #[error("participant {index} is listed twice")]
    DuplicateParticipant {
        /// The index of the second occurrence.
        index: usize,
    },
    /// The challenge duration is outside the adjudicator's bounds (1 s ..= 365 days).
    #[error("challenge duration of {0} s is outside 1 s ..= 365 days")]
    ChallengeDuration(u64),
    /// Balances or funding do not have one row per asset of one entry per participant
    /// (the adjudicator's `Dimensions`).
    #[error("balances or funding do not match the assets and participants")]
    Dimensions,
    /// A funding request whose params' funding is not its version-0 balances: the holders pay
    /// the outcome only when every slot holds its funding, so the two must agree.
    #[error("the params' funding is not the version-0 balances")]
    FundingMismatch,
    /// A signed withdrawal authorisation carries another nonce than the participant's current
    /// one: it was used already (or is not the next one).
    #[error("withdrawal authorisation nonce {got}, expected {expected}")]
    WrongNonce {
        /// The participant's current nonce at the holder.
        expected: U256,
        /// The authorisation's nonce.
        got: U256,
    },
    /// A configured asset holder is not bound to the configured adjudicator: outcomes would
    /// never reach it, so deposits there could never be paid out.
    #[error("asset holder {holder} is bound to {bound:?}, not to adjudicator {adjudicator}")]
    HolderNotBound {
        /// The holder.
        holder: Address,
        /// What its `adjudicator()` returned (`None`: no answer, or no code there).
        bound: Option<Address>,
        /// The configured adjudicator.
        adjudicator: Address,
    },
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
    /// `progress` in a payment channel (`params.app` is zero): only app channels have moves to
    /// enforce (the adjudicator's `NoApp`).
    #[error("a payment channel cannot be progressed")]
    NoApp,
    /// A registration or refutation after the dispute was progressed: from the first
    /// progression on, only `progress` moves the dispute (the adjudicator's `AlreadyProgressed`).
    #[error("the dispute was progressed; registration is over")]
    AlreadyProgressed,
    /// The app rejected a progression. `data` is the app contract's revert data on Ethereum
    /// (`None` on [`SimLedger`](crate::SimLedger)); `rejection` is the app's typed reason: the
    /// Rust app's on the sim, the revert decoded into the same type where this crate knows the
    /// app (tic-tac-toe: [`perun_channel::tictactoe::Illegal`]), else an [`AppRevert`].
    #[error("the app rejected the move: {rejection}")]
    AppRejected {
        /// Why, typed: `rejection.downcast_ref::<Illegal>()` and the like.
        rejection: perun_channel::AppRejection,
        /// The revert data as the app contract returned it.
        data: Option<Bytes>,
    },
    /// The wallet could not sign.
    #[error("wallet: {0}")]
    Wallet(#[from] perun_wallet::Error),
    /// A call to the node failed; the same call may succeed later.
    #[error("{op}: {source}")]
    Rpc {
        /// What was being done (`"eth_getLogs"`, `"register"`, ...).
        op: &'static str,
        /// Why it failed.
        #[source]
        source: RpcFailure,
    },
    /// A transaction was sent but its receipt did not reach the confirmation
    /// depth in time. It may still land: the transaction queue keeps it.
    #[error("{op}: no receipt for {tx} within {waited:?}")]
    ReceiptTimeout {
        /// What the transaction does.
        op: &'static str,
        /// Its hash (the latest, if its fee was bumped).
        tx: B256,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The transaction queue did not send the transaction within the
    /// caller's wait (other transactions of the account went first); it
    /// stays queued and is sent in turn.
    #[error("{op}: not sent within {waited:?}; still queued")]
    NotSent {
        /// What the transaction does.
        op: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A transaction, or its simulation (`tx: None`), reverted for a reason
    /// no other variant covers.
    #[error("{op} reverted{}: {reason}", tx.map(|t| format!(" in {t}")).unwrap_or_default())]
    Reverted {
        /// What the transaction does.
        op: &'static str,
        /// The mined transaction, if it got that far.
        tx: Option<B256>,
        /// The decoded revert.
        reason: RevertReason,
    },
    /// The fee a transaction needs (at least the current base fee) is above
    /// the configured cap. Nothing was sent; the transaction queue keeps the
    /// request and sends it once the base fee is below the cap again.
    #[error("{op}: needs {needed} wei per gas, above the cap of {cap}")]
    FeeCapExceeded {
        /// What the transaction does.
        op: &'static str,
        /// The max fee per gas it would need.
        needed: u128,
        /// `EthConfig::max_fee_per_gas`.
        cap: u128,
    },
    /// A chain event that does not decode or does not belong to the channel.
    #[error("bad event from {address} (topic {topic}): {reason}")]
    BadEvent {
        /// The emitting contract.
        address: Address,
        /// The event's first topic.
        topic: B256,
        /// What is wrong with it.
        reason: BadEventReason,
    },
    /// The backend was shut down, or its transaction queue's task died (the
    /// next call starts a new one).
    #[error("the chain backend has stopped")]
    Stopped,
    /// The anvil test harness failed.
    #[error("anvil: {0}")]
    Anvil(String),
    /// The JSON-RPC fault proxy of the test harness failed.
    #[error("fault proxy: {0}")]
    Proxy(#[from] ProxyError),
}

/// An app contract's revert that this crate has no Rust type for, as an
/// [`AppRejection`](perun_channel::AppRejection) of [`Error::AppRejected`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct AppRevert {
    /// The revert, decoded as far as the known ABIs allow.
    pub reason: RevertReason,
}

/// Why the test harness's JSON-RPC fault proxy failed, or closed a connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The proxy could not listen on 127.0.0.1.
    #[error("listening on 127.0.0.1: {0}")]
    Listen(Arc<std::io::Error>),
    /// The upstream URL is not `ws://host:port[/path]`.
    #[error("upstream {0:?} is not a ws://host:port URL")]
    UpstreamUrl(String),
    /// The upstream node could not be reached or dropped the connection.
    #[error("upstream {url}: {source}")]
    Upstream {
        /// The node's URL.
        url: String,
        /// What failed.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A client's connection failed (I/O, websocket or HTTP protocol).
    #[error("client connection: {0}")]
    Client(Arc<dyn std::error::Error + Send + Sync>),
    /// A client or the node sent something that is not JSON-RPC.
    #[error("{from} sent garbage: {reason}")]
    Garbage {
        /// Who sent it.
        from: ProxySide,
        /// What is wrong with it.
        reason: GarbageReason,
    },
}

/// One side of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxySide {
    /// The client connected to the proxy.
    Client,
    /// The node behind the proxy.
    Upstream,
}

impl std::fmt::Display for ProxySide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxySide::Client => "the client",
            ProxySide::Upstream => "the upstream node",
        })
    }
}

/// What is wrong with a message that is not JSON-RPC.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum GarbageReason {
    /// It does not parse as JSON.
    #[error("not JSON: {0}")]
    NotJson(Arc<dyn std::error::Error + Send + Sync>),
    /// JSON, but not a request (object with a `method`), a response (object
    /// with an `id`) or a non-empty batch of them, as its direction requires.
    #[error("JSON but not a JSON-RPC {expected}")]
    NotJsonRpc {
        /// What was expected (`"request"`, `"response or notification"`).
        expected: &'static str,
    },
    /// A binary websocket frame (JSON-RPC travels as text).
    #[error("a binary frame of {0} bytes")]
    Binary(usize),
    /// Bytes that break the HTTP or websocket protocol (a malformed request
    /// or frame, invalid UTF-8 in a text frame, an oversized message).
    #[error("a protocol violation: {0}")]
    Protocol(Arc<dyn std::error::Error + Send + Sync>),
    /// An HTTP body above the proxy's limit.
    #[error("a body above {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

/// What is wrong with a chain event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadEventReason {
    /// Its data does not decode as the event's ABI.
    #[error("does not decode: {0}")]
    Decode(String),
    /// It names another channel than the one it was routed to.
    #[error("belongs to channel {0}")]
    OtherChannel(B256),
    /// Not an event this backend knows.
    #[error("unexpected event")]
    Unexpected,
    /// Not a log of the block range that was asked for, of the chain that
    /// was checked, or marked removed (a node's answer cannot place it).
    #[error("not a log of blocks {from}..={to} of the checked chain (block {block:?})")]
    NotInRange {
        /// The first block asked for.
        from: u64,
        /// The last block asked for.
        to: u64,
        /// The block the log claims, if any.
        block: Option<u64>,
    },
}

impl Error {
    /// Whether repeating the same call later may succeed: the node did not
    /// answer, a connection dropped, a receipt is late, a transaction is
    /// still queued or priced out by the fee cap, the queue's task died, or
    /// a deposit raced another for the same slot. Rules the chain enforces
    /// (a wrong state, a passed timeout, ...) are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Rpc { .. }
                | Error::ReceiptTimeout { .. }
                | Error::NotSent { .. }
                | Error::HoldingsChanged { .. }
                | Error::FeeCapExceeded { .. }
                | Error::Stopped
        )
    }

    /// A transient RPC failure of `op`.
    pub fn rpc(op: &'static str, source: RpcFailure) -> Self {
        Error::Rpc { op, source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
