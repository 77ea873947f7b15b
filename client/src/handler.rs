//! How applications decide on incoming proposals and updates.
//!
//! A handler gets a *responder* by value; `accept` and `reject` consume it,
//! so deciding twice does not compile. Dropping a responder without
//! deciding rejects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use perun_channel::{Address, Asset, Params, State, U256};
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
    /// The channel's parameters, shared with the channel (not copied for
    /// every update).
    pub params: Arc<Params>,
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

/// Accepts every valid proposal and update, whatever the deposit, challenge
/// duration or app: **for tests only**. A peer could lock all of your
/// funds in a channel whose challenge is one second, and win any dispute
/// while you blink. Use [`AcceptWithin`] and [`AcceptPaymentsToMe`] for
/// real money. Channels opened by accepting come out of the receiver
/// returned by [`AcceptAllForTesting::new`].
#[derive(Debug, Clone)]
pub struct AcceptAllForTesting {
    opened: mpsc::Sender<Result<Channel>>,
}

impl AcceptAllForTesting {
    /// The handler and the receiver of channels it opened (or failed to).
    pub fn new() -> (Arc<Self>, Opened) {
        let (opened, rx) = mpsc::channel(OPENED_CAPACITY);
        (Arc::new(Self { opened }), rx)
    }
}

#[async_trait]
impl ProposalHandler for AcceptAllForTesting {
    async fn handle_proposal(&self, _proposal: IncomingProposal, responder: ProposalResponder) {
        accept_into(&self.opened, responder).await;
    }
}

/// Channels a ready-made handler opened (or failed to open), for the
/// application to take. It holds at most [`OPENED_CAPACITY`]: while that
/// many wait, further proposals are rejected, so an application that stops
/// reading cannot be made to hold channels without bound.
pub type Opened = mpsc::Receiver<Result<Channel>>;

/// How many opened channels may wait in an [`Opened`] receiver.
pub const OPENED_CAPACITY: usize = 256;

/// Accepts if the receiver has room for the outcome (reserved first), else
/// rejects.
async fn accept_into(opened: &mpsc::Sender<Result<Channel>>, responder: ProposalResponder) {
    match opened.try_reserve() {
        Ok(slot) => slot.send(responder.accept().await),
        Err(_) => {
            tracing::warn!("opened channels are not being taken; proposal rejected");
            responder.reject(format!(
                "{OPENED_CAPACITY} opened channels wait for the application"
            ));
        }
    }
}

#[async_trait]
impl UpdateHandler for AcceptAllForTesting {
    async fn handle_update(&self, _update: IncomingUpdate, responder: UpdateResponder) {
        responder.accept();
    }
}

/// Why [`AcceptWithin`] refuses a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The challenge duration is shorter than our minimum: we could not
    /// be sure to answer a stale registration in time.
    ChallengeTooShort {
        /// The proposal's challenge duration.
        proposed: Duration,
        /// Our minimum.
        min: Duration,
    },
    /// The proposal asks us to deposit an asset we did not list.
    AssetNotAccepted(Asset),
    /// Our deposit of `asset` would exceed our maximum for it.
    DepositTooHigh {
        /// The asset.
        asset: Asset,
        /// What the proposal asks us to deposit.
        asked: U256,
        /// Our maximum.
        max: U256,
    },
    /// The channel runs an app this handler was not told to accept
    /// ([`AcceptWithin::accept_app`]).
    App(Address),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ChallengeTooShort { proposed, min } => write!(
                f,
                "challenge duration {} s is below our minimum of {} s",
                proposed.as_secs(),
                min.as_secs()
            ),
            Self::AssetNotAccepted(a) => {
                write!(
                    f,
                    "asset {} on chain {} is not accepted",
                    a.holder, a.chainId
                )
            }
            Self::DepositTooHigh { asset, asked, max } => write!(
                f,
                "deposit {asked} of asset {} exceeds our maximum {max}",
                asset.holder
            ),
            Self::App(app) => write!(f, "app channels ({app}) are not accepted"),
        }
    }
}

/// Accepts payment-channel proposals within limits: a challenge duration
/// of at least [`min_challenge`](Self::min_challenge) (default
/// [`DEFAULT_MIN_CHALLENGE`](Self::DEFAULT_MIN_CHALLENGE), a day) and, for
/// each asset, our own deposit at most its listed maximum (an asset not
/// listed is refused). Anything else is rejected with a [`Refusal`] as the
/// reason. Channels opened by accepting come out of the receiver returned
/// by [`AcceptWithin::new`].
///
/// ```
/// use std::time::Duration;
/// use perun_channel::{Address, Asset, U256};
/// use perun_client::AcceptWithin;
///
/// let eth = Asset { chainId: U256::from(1), holder: Address::repeat_byte(0xee) };
/// let one_ether = U256::from(10).pow(U256::from(18));
/// let (handler, _opened) = AcceptWithin::new([(eth, one_ether)]);
/// let handler = handler.min_challenge(Duration::from_secs(6 * 3600));
/// # let _ = handler;
/// ```
#[derive(Debug, Clone)]
pub struct AcceptWithin {
    min_challenge: Duration,
    max_deposit: HashMap<Asset, U256>,
    apps: Vec<Address>,
    opened: mpsc::Sender<Result<Channel>>,
}

impl AcceptWithin {
    /// The default minimum challenge duration: a day, so a client that is
    /// down for hours (an update, a crash loop, a night) still refutes.
    pub const DEFAULT_MIN_CHALLENGE: Duration = Duration::from_secs(24 * 3600);

    /// A handler that accepts these assets up to these deposits of ours,
    /// and the receiver of the channels it opened (or failed to).
    pub fn new(max_deposit: impl IntoIterator<Item = (Asset, U256)>) -> (Self, Opened) {
        let (opened, rx) = mpsc::channel(OPENED_CAPACITY);
        let handler = Self {
            min_challenge: Self::DEFAULT_MIN_CHALLENGE,
            max_deposit: max_deposit.into_iter().collect(),
            apps: Vec::new(),
            opened,
        };
        (handler, rx)
    }

    /// Sets the shortest challenge duration accepted.
    pub fn min_challenge(mut self, min: Duration) -> Self {
        self.min_challenge = min;
        self
    }

    /// Also accepts channels of the app contract at `app` (within the same
    /// deposit and challenge limits). Its rules must be registered with the
    /// client ([`ClientBuilder::app`](crate::ClientBuilder::app)); the
    /// proposal's initial app data was checked by them before this handler
    /// is asked.
    pub fn accept_app(mut self, app: Address) -> Self {
        self.apps.push(app);
        self
    }

    /// Why this handler refuses `p`, if it does.
    pub fn refusal(&self, p: &IncomingProposal) -> Option<Refusal> {
        let proposed = Duration::from_secs(p.proposal.challenge_duration);
        if proposed < self.min_challenge {
            return Some(Refusal::ChallengeTooShort {
                proposed,
                min: self.min_challenge,
            });
        }
        if p.proposal.app != Address::ZERO && !self.apps.contains(&p.proposal.app) {
            return Some(Refusal::App(p.proposal.app));
        }
        for (i, asset) in p.proposal.allocation.assets.iter().enumerate() {
            let Some(max) = self.max_deposit.get(asset) else {
                return Some(Refusal::AssetNotAccepted(asset.clone()));
            };
            let asked = p.my_balance(i).unwrap_or(U256::ZERO);
            if asked > *max {
                return Some(Refusal::DepositTooHigh {
                    asset: asset.clone(),
                    asked,
                    max: *max,
                });
            }
        }
        None
    }
}

#[async_trait]
impl ProposalHandler for AcceptWithin {
    async fn handle_proposal(&self, proposal: IncomingProposal, responder: ProposalResponder) {
        match self.refusal(&proposal) {
            Some(why) => {
                tracing::info!(from = %proposal.from, %why, "proposal refused");
                responder.reject(why.to_string());
            }
            None => accept_into(&self.opened, responder).await,
        }
    }
}

/// In a payment channel, accepts an update only if none of our balances
/// decreases: payments to us, and the final update that closes the channel
/// as it stands. In an app channel the app's rules, checked before any
/// handler is asked, decide: every valid move is signed (a game's rules
/// say what the other player may take).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptPaymentsToMe;

#[async_trait]
impl UpdateHandler for AcceptPaymentsToMe {
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder) {
        if !update.params.is_payment() || update.pays_me_or_keeps() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests may panic on failure.

    use super::*;

    /// An application that does not take its opened channels gets no more:
    /// once the receiver is full, a proposal is rejected, not accepted.
    #[tokio::test]
    async fn a_full_opened_receiver_rejects_proposals() {
        let (handler, mut opened) = AcceptAllForTesting::new();
        for _ in 0..OPENED_CAPACITY {
            handler.opened.try_send(Err(Error::Closed)).unwrap();
        }
        let (tx, rx) = oneshot::channel();
        accept_into(&handler.opened, ProposalResponder { tx }).await;
        match rx.await.unwrap() {
            ProposalDecision::Reject(r) => assert!(r.contains("wait for the application"), "{r}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        // Taking one makes room: the next proposal is accepted.
        opened.recv().await.unwrap().unwrap_err();
        let (tx, rx) = oneshot::channel();
        let accepting = tokio::spawn({
            let handler = handler.clone();
            async move { accept_into(&handler.opened, ProposalResponder { tx }).await }
        });
        match rx.await.unwrap() {
            ProposalDecision::Accept(done) => drop(done.send(Err(Error::Closed))),
            other => panic!("expected an acceptance, got {other:?}"),
        }
        accepting.await.unwrap();
    }

    fn incoming(asset: Asset, mine: u64, challenge: u64) -> IncomingProposal {
        let peer = perun_wire::PeerId::random();
        let who = |b| perun_wire::Participant {
            address: Address::repeat_byte(b),
            peer,
        };
        IncomingProposal {
            proposal: Proposal {
                proposal_id: perun_channel::B256::repeat_byte(1),
                domain: perun_channel::Domain {
                    chain_id: U256::from(1),
                    adjudicator: Address::repeat_byte(0xad),
                },
                challenge_duration: challenge,
                participants: vec![who(1), who(2)],
                proposer: 0,
                allocation: perun_channel::Allocation::new(
                    vec![asset],
                    vec![vec![U256::from(1), U256::from(mine)]],
                ),
                app: Address::ZERO,
                app_data: perun_channel::Bytes::new(),
                nonce_share: perun_channel::B256::repeat_byte(2),
            },
            from: peer,
            index: 1,
        }
    }

    #[test]
    fn accept_within_names_each_refusal() {
        let eth = Asset {
            chainId: U256::from(1),
            holder: Address::repeat_byte(0xee),
        };
        let other = Asset {
            chainId: U256::from(1),
            holder: Address::repeat_byte(0x77),
        };
        let day = AcceptWithin::DEFAULT_MIN_CHALLENGE;
        let (h, _opened) = AcceptWithin::new([(eth.clone(), U256::from(10))]);
        assert_eq!(h.refusal(&incoming(eth.clone(), 10, day.as_secs())), None);
        assert_eq!(
            h.refusal(&incoming(other.clone(), 1, day.as_secs())),
            Some(Refusal::AssetNotAccepted(other))
        );
        assert_eq!(
            h.refusal(&incoming(eth.clone(), 11, day.as_secs())),
            Some(Refusal::DepositTooHigh {
                asset: eth.clone(),
                asked: U256::from(11),
                max: U256::from(10)
            })
        );
        let h = h.min_challenge(Duration::from_secs(3600));
        assert_eq!(h.refusal(&incoming(eth.clone(), 1, 3600)), None);
        assert_eq!(
            h.refusal(&incoming(eth, 1, 3599)),
            Some(Refusal::ChallengeTooShort {
                proposed: Duration::from_secs(3599),
                min: Duration::from_secs(3600)
            })
        );
    }
}
