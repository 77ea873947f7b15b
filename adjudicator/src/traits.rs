//! The two interfaces the client drives the chain through, as `Arc<dyn _>`.
//!
//! # What a backend promises (the client relies on every line)
//! - **Idempotence.** Every call may be repeated, with the same result or a
//!   "moot" error: `register` of the state that is registered already is
//!   `Ok` and sends nothing; `conclude` of a concluded channel is
//!   [`Error::AlreadyConcluded`](crate::Error::AlreadyConcluded); `withdraw`
//!   pays what is still credited and is `Ok` with nothing left; `fund` never
//!   deposits twice for one funding slot, across retries, concurrent calls
//!   and restarts (a deposit names the holdings it expects, and a second one
//!   for the same slot cannot land).
//! - **Errors are typed.** A call that failed without a verdict of the chain
//!   (no answer, a dropped connection, a late receipt) is
//!   [`Error::is_transient`](crate::Error::is_transient); the caller retries
//!   it. Anything else is a rule of the contracts, the same on every backend.
//! - **Events.** `subscribe` delivers the channel's past events in chain
//!   order, then one [`CaughtUp`](crate::AdjudicatorEvent::CaughtUp), then live
//!   events as their blocks reach the confirmation depth. After a reorg deeper
//!   than that, or a reconnect, an event may come again; events are hints,
//!   [`Adjudicator::dispute`] is the truth. A backend keeps its streams alive
//!   across node failures where it can; a stream that ends anyway (`None`, or
//!   an `Err` item) must be re-subscribed by the caller.
//! - **Reads.** `dispute` and the funding checks read at the confirmation
//!   depth, so a registration a shallower reorg drops is never reported.

use async_trait::async_trait;
use perun_channel::{Asset, ChannelId, Domain};

use crate::history::ChainHistory;
use crate::{
    Dispute, EventStream, FundingRequest, ProgressRequest, Result, SignedChannel, WithdrawRequest,
};

/// Locks a participant's share of a channel on-chain.
#[async_trait]
pub trait Funder: Send + Sync {
    /// Deposits this participant's share (whatever is still missing of it) and
    /// waits until every participant's share is on-chain, or the funding timeout
    /// passes ([`Error::FundingTimeout`](crate::Error::FundingTimeout) names who did not fund).
    /// Never deposits twice for the same slot, however often it is called.
    async fn fund(&self, req: FundingRequest) -> Result<()>;
    /// Whether this funder can deposit `asset` (its chain and holder are ones it is configured
    /// for). A channel with an asset no funder of ours supports must not be opened: its
    /// balances in that asset would be worthless.
    fn supports(&self, asset: &Asset) -> bool;
}

/// Settles channels on-chain: disputes, conclusion, withdrawal, events.
#[async_trait]
pub trait Adjudicator: Send + Sync {
    /// The deployment this backend settles channels on: channels must name it in their params.
    fn domain(&self) -> Domain;
    /// Registers a fully signed state, or refutes the registered one with a
    /// newer version. `Ok` without a transaction if exactly this state is
    /// registered already.
    async fn register(&self, req: &SignedChannel) -> Result<()>;
    /// Advances an app channel's dispute by one move (the contract's `progress`): `req.to`,
    /// signed by its actor alone, follows the registered state `req.from` by the app's rules.
    /// The first progression comes after the refutation period and ends registration; each
    /// restarts the timeout. `Ok` without a transaction if `req.to` is registered already.
    /// The app's verdict is [`Error::AppRejected`](crate::Error::AppRejected).
    async fn progress(&self, req: &ProgressRequest) -> Result<()>;
    /// A final state concludes at once (`concludeFinal`); any other state must
    /// be the registered one and its timeout must have passed (in an app channel
    /// whose dispute was never progressed, a second challenge duration too: the
    /// window for the first progression).
    async fn conclude(&self, req: &SignedChannel) -> Result<()>;
    /// Pays out whatever is still credited to the participant; a second call pays nothing and is `Ok`.
    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()>;
    /// The channel's events: its past ones in chain order, then
    /// [`CaughtUp`](crate::AdjudicatorEvent::CaughtUp), then live ones, each
    /// once its block is as deep as the backend's confirmation depth. After a
    /// reorg deeper than that an event may come again: act on [`Adjudicator::dispute`].
    async fn subscribe(&self, id: ChannelId) -> Result<EventStream>;
    /// The channel's on-chain dispute, if any, as of the newest block at the
    /// backend's confirmation depth (a registration a shallower reorg can drop
    /// is not reported).
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>>;
    /// The deployment's logs by block range and the holders' credits, for
    /// rebuilding the list of an account's channels and what the chain owes
    /// it (the client's chain index); `None` (the default) if this backend
    /// cannot read them. See [`ChainHistory`] for its contract.
    fn history(&self) -> Option<&dyn ChainHistory> {
        None
    }
}
