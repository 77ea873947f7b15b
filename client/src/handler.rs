//! How applications decide on incoming proposals and updates.
//!
//! A handler gets a *responder* by value; `accept` and `reject` consume it,
//! so deciding twice does not compile. Dropping a responder without
//! deciding rejects.

use std::sync::Arc;

use async_trait::async_trait;
use perun_channel::{Address, Params, State};
use perun_wire::{PeerId, Proposal};
use tokio::sync::{mpsc, oneshot};

use crate::{Channel, Error, Result};

/// An incoming channel proposal.
#[derive(Debug, Clone)]
pub struct IncomingProposal {
    /// The proposal as received (already checked for shape and sender).
    pub proposal: Proposal,
    /// The authenticated peer that sent it (the proposer).
    pub from: PeerId,
    /// Our index among the proposal's participants.
    pub index: usize,
}

impl IncomingProposal {
    /// Our initial balance of asset `asset`.
    pub fn my_balance(&self, asset: usize) -> Option<perun_channel::U256> {
        self.proposal
            .allocation
            .balances
            .get(asset)?
            .get(self.index)
            .copied()
    }
}

pub(crate) enum ProposalDecision {
    Accept(oneshot::Sender<Result<Channel>>),
    Reject(String),
}

/// Answers one proposal, exactly once.
#[derive(Debug)]
pub struct ProposalResponder {
    pub(crate) tx: oneshot::Sender<ProposalDecision>,
}

impl std::fmt::Debug for ProposalDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposalDecision::Accept(_) => f.write_str("Accept"),
            ProposalDecision::Reject(r) => write!(f, "Reject({r})"),
        }
    }
}

impl ProposalResponder {
    /// Accepts, and waits until the channel is signed, funded and active.
    pub async fn accept(self) -> Result<Channel> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(ProposalDecision::Accept(tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Rejects with a reason the proposer will see.
    pub fn reject(self, reason: impl Into<String>) {
        let _ = self.tx.send(ProposalDecision::Reject(reason.into()));
    }
}

/// Decides on channel proposals.
#[async_trait]
pub trait ProposalHandler: Send + Sync {
    /// Called once per valid incoming proposal, on its own task.
    async fn handle_proposal(&self, proposal: IncomingProposal, responder: ProposalResponder);
}

/// An update a peer proposes on one of our channels.
#[derive(Debug, Clone)]
pub struct IncomingUpdate {
    /// The channel's parameters.
    pub params: Params,
    /// Our index in the channel.
    pub index: usize,
    /// The current fully signed state.
    pub current: State,
    /// The proposed next state (already checked against the transition rule).
    pub next: State,
    /// The proposing participant's index.
    pub actor: usize,
}

impl IncomingUpdate {
    /// Whether none of our balances decreases.
    pub fn pays_me_or_keeps(&self) -> bool {
        self.current
            .outcome
            .balances
            .iter()
            .zip(&self.next.outcome.balances)
            .all(|(old, new)| new.get(self.index) >= old.get(self.index))
    }

    /// The channel's id.
    pub fn channel_id(&self) -> perun_channel::ChannelId {
        self.current.channelId
    }

    /// Our on-chain address.
    pub fn my_address(&self) -> Option<Address> {
        self.params.participants.get(self.index).copied()
    }
}

/// Answers one update, exactly once.
#[derive(Debug)]
pub struct UpdateResponder {
    pub(crate) tx: oneshot::Sender<std::result::Result<(), String>>,
}

impl UpdateResponder {
    /// Signs the update.
    pub fn accept(self) {
        let _ = self.tx.send(Ok(()));
    }

    /// Refuses the update with a reason the proposer will see.
    pub fn reject(self, reason: impl Into<String>) {
        let _ = self.tx.send(Err(reason.into()));
    }
}

/// Decides on updates peers propose. The transition rule (versions, sums,
/// who may take what) is checked before the handler is asked; the handler
/// adds the application's own policy.
#[async_trait]
pub trait UpdateHandler: Send + Sync {
    /// Called once per valid incoming update, on its own task.
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder);
}

/// Accepts every valid proposal and update. Channels opened by accepting
/// come out of the receiver returned by [`AcceptAll::new`].
#[derive(Debug, Clone)]
pub struct AcceptAll {
    opened: mpsc::UnboundedSender<Result<Channel>>,
}

impl AcceptAll {
    /// The handler and the receiver of channels it opened (or failed to).
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Result<Channel>>) {
        let (opened, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { opened }), rx)
    }
}

#[async_trait]
impl ProposalHandler for AcceptAll {
    async fn handle_proposal(&self, _proposal: IncomingProposal, responder: ProposalResponder) {
        let _ = self.opened.send(responder.accept().await);
    }
}

#[async_trait]
impl UpdateHandler for AcceptAll {
    async fn handle_update(&self, _update: IncomingUpdate, responder: UpdateResponder) {
        responder.accept();
    }
}

/// Accepts an update only if none of our balances decreases: payments to
/// us, and the final update that closes the channel as it stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptPaymentsToMe;

#[async_trait]
impl UpdateHandler for AcceptPaymentsToMe {
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder) {
        if update.pays_me_or_keeps() {
            responder.accept();
        } else {
            responder.reject("update decreases my balance");
        }
    }
}

/// Rejects every proposal (the default for a client that only proposes).
#[derive(Debug, Clone, Copy, Default)]
pub struct RejectAll;

#[async_trait]
impl ProposalHandler for RejectAll {
    async fn handle_proposal(&self, _proposal: IncomingProposal, responder: ProposalResponder) {
        responder.reject("not accepting channels");
    }
}
