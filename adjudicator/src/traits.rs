//! The two interfaces the client drives the chain through, as `Arc<dyn _>`.

use async_trait::async_trait;
use perun_channel::ChannelId;

use crate::{Dispute, EventStream, FundingRequest, Result, SignedChannel, WithdrawRequest};

/// Locks a participant's share of a channel on-chain.
#[async_trait]
pub trait Funder: Send + Sync {
    /// Deposits this participant's share (whatever is still missing of it) and
    /// waits until every participant's share is on-chain, or the funding timeout
    /// passes ([`Error::FundingTimeout`](crate::Error::FundingTimeout) names who did not fund).
    async fn fund(&self, req: FundingRequest) -> Result<()>;
}

/// Settles channels on-chain: disputes, conclusion, withdrawal, events.
#[async_trait]
pub trait Adjudicator: Send + Sync {
    /// Registers a fully signed state, or refutes the registered one with a newer version.
    async fn register(&self, req: &SignedChannel) -> Result<()>;
    /// A final state concludes at once (`concludeFinal`); any other state must
    /// be the registered one and its timeout must have passed.
    async fn conclude(&self, req: &SignedChannel) -> Result<()>;
    /// Pays out whatever is still credited to the participant; a second call pays nothing and is `Ok`.
    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()>;
    /// The channel's events, from its first on-chain event on, in chain order,
    /// each once its block is as deep as the backend's confirmation depth. After a
    /// reorg deeper than that an event may come again: act on [`Adjudicator::dispute`].
    async fn subscribe(&self, id: ChannelId) -> Result<EventStream>;
    /// The channel's on-chain dispute, if any, as of the newest block at the
    /// backend's confirmation depth (a registration a shallower reorg can drop
    /// is not reported).
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>>;
}
