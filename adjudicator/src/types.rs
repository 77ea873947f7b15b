//! What callers hand to the [`Funder`](crate::Funder) and
//! [`Adjudicator`](crate::Adjudicator), and what they get back.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use alloy_primitives::{Address, B256, Signature, U256, keccak256};
use alloy_sol_types::SolValue;
use perun_channel::{ChannelId, Domain, Params, SignedState, State};
use perun_wallet::Account;
use tokio::sync::Notify;

use crate::{Error, Result};

/// Fund one participant's share of a channel and wait for everybody else's.
#[derive(Debug, Clone)]
pub struct FundingRequest {
    /// The channel's parameters.
    pub params: Params,
    /// The version-0 state: its allocation is what every participant deposits.
    pub state: State,
    /// The index of the participant this funder deposits for.
    pub index: usize,
    /// How long to wait for the other participants' deposits (its own setting,
    /// unrelated to the challenge duration).
    pub timeout: Duration,
}

impl FundingRequest {
    /// Checks the request before any money moves: deposits for a channel another deployment
    /// settles, or whose funding is not version 0's balances, could never be paid out as agreed.
    pub(crate) fn check(&self, domain: Domain) -> Result<()> {
        check_domain(&self.params, domain)?;
        self.params.validate()?;
        self.state.validate(&self.params)?;
        check_assets(&self.state, domain)?;
        if self.params.funding != self.state.outcome.balances {
            tracing::warn!("funding request whose funding is not version 0's balances");
            return Err(Error::FundingMismatch);
        }
        if self.state.version != 0 {
            tracing::warn!(
                version = self.state.version,
                "funding a state other than version 0"
            );
            return Err(Error::Channel(perun_channel::Error::Version {
                expected: 0,
                got: self.state.version,
            }));
        }
        if self.index >= self.params.participants.len() {
            return Err(Error::Channel(perun_channel::Error::Index(self.index)));
        }
        Ok(())
    }
}

/// A channel's params with a (fully) signed state, as registered or concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedChannel {
    /// The channel's parameters.
    pub params: Params,
    /// The state and its signatures.
    pub state: SignedState,
}

/// The adjudicator's `WrongDomain` rule: the params must name this backend's chain and adjudicator.
pub(crate) fn check_domain(params: &Params, domain: Domain) -> Result<()> {
    if params.domain() == domain {
        return Ok(());
    }
    tracing::warn!(chain_id = %params.chainId, adjudicator = %params.adjudicator, "channel of another deployment");
    Err(Error::WrongDomain {
        chain_id: params.chainId,
        adjudicator: params.adjudicator,
    })
}

impl SignedChannel {
    /// Checks that the state is valid for the params and every participant signed it,
    /// mapping failures to the errors the contract would give.
    pub(crate) fn check(&self, domain: Domain) -> Result<B256> {
        self.check_unsigned(domain)?;
        check_signatures(&self.params, &self.state)?;
        Ok(self.state.state.hash())
    }
}

impl SignedChannel {
    /// Checks the params and the state, but not the signatures (`conclude` of a registered state).
    pub(crate) fn check_unsigned(&self, domain: Domain) -> Result<()> {
        check_domain(&self.params, domain)?;
        self.params.validate()?;
        self.state.state.validate(&self.params)?;
        check_assets(&self.state.state, domain)
    }
}

/// Rejects a state that names the same asset holder twice: each holder settles a
/// channel once, so such a channel could never conclude and its deposits would be stuck.
pub(crate) fn check_assets(state: &State, domain: Domain) -> Result<()> {
    let assets = &state.outcome.assets;
    for (i, a) in assets.iter().enumerate() {
        if a.chainId != domain.chain_id {
            tracing::warn!(index = i, chain_id = %a.chainId, "asset on another chain");
            return Err(Error::ForeignAsset {
                index: i,
                chain_id: a.chainId,
            });
        }
        if assets[..i].iter().any(|b| b.holder == a.holder) {
            tracing::warn!(holder = %a.holder, "asset listed twice");
            return Err(Error::DuplicateAsset(a.holder));
        }
    }
    Ok(())
}

/// Verifies one signature per participant, in order.
pub(crate) fn check_signatures(params: &Params, signed: &SignedState) -> Result<()> {
    let n = params.participants.len();
    let got = signed.sigs.iter().filter(|s| s.is_some()).count();
    if signed.sigs.len() != n || got != n {
        tracing::warn!(expected = n, got, "state with too few signatures");
        return Err(Error::TooFewSignatures { expected: n, got });
    }
    let hash = signed.state.hash();
    for (index, (sig, addr)) in signed.sigs.iter().zip(&params.participants).enumerate() {
        let ok = sig
            .as_ref()
            .is_some_and(|s| perun_wallet::verify(hash, s, *addr).is_ok());
        if !ok {
            tracing::warn!(index, "invalid state signature");
            return Err(Error::BadSignature { index });
        }
    }
    Ok(())
}

/// One move in an app channel's dispute: `to`, signed by participant `actor` alone,
/// follows the registered state `from` (the adjudicator's `progress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressRequest {
    /// The channel's parameters (`app` must be set).
    pub params: Params,
    /// The state registered on-chain now.
    pub from: State,
    /// The state after the actor's move.
    pub to: State,
    /// The index of the participant whose move it is.
    pub actor: usize,
    /// The actor's EIP-191 signature of `to`'s hash, as in [`SignedState`].
    pub signature: Signature,
}

impl ProgressRequest {
    /// Checks what does not depend on the chain, in the contract's order (`_checkState` of
    /// `to`, `NoApp`), and returns `to`'s hash.
    pub(crate) fn check(&self, domain: Domain) -> Result<B256> {
        check_domain(&self.params, domain)?;
        self.params.validate()?;
        self.to.validate(&self.params)?;
        check_assets(&self.to, domain)?;
        if self.params.is_payment() {
            tracing::warn!("progress in a payment channel");
            return Err(Error::NoApp);
        }
        Ok(self.to.hash())
    }

    /// Whether `to` is the dispute's state already (a repeated call): nothing to do.
    pub(crate) fn done(&self, d: Option<&Dispute>, to_hash: B256) -> bool {
        d.is_some_and(|d| !d.concluded && d.state_hash == to_hash)
    }

    /// The contract's rules after `NoApp`, up to the app's: the dispute, its phase at chain
    /// time `now`, the versions, the actor and its signature, the assets and sums. One place
    /// for both backends' checks.
    pub(crate) fn check_dispute(&self, d: Option<&Dispute>, now: u64) -> Result<()> {
        let d = d.ok_or(Error::NotRegistered)?;
        if d.concluded {
            return Err(Error::AlreadyConcluded);
        }
        if self.from.hash() != d.state_hash {
            tracing::warn!(
                version = self.from.version,
                "progress from a state that is not the registered one"
            );
            return Err(Error::WrongState);
        }
        if !d.progressed {
            if now < d.timeout {
                return Err(Error::TimeoutNotPassed {
                    timeout: d.timeout,
                    now,
                });
            }
            // The first move's deadline: the registered state's conclusion.
            if now >= d.timeout.saturating_add(self.params.challengeDuration) {
                return Err(Error::TimeoutPassed);
            }
        } else if now >= d.timeout {
            return Err(Error::TimeoutPassed);
        }
        if self.from.isFinal {
            return Err(Error::Channel(perun_channel::Error::Final));
        }
        if self.from.version.checked_add(1) != Some(self.to.version) {
            tracing::warn!(
                registered = self.from.version,
                got = self.to.version,
                "a move that is not one version on"
            );
            return Err(Error::VersionStep {
                registered: self.from.version,
                got: self.to.version,
            });
        }
        let Some(signer) = self.params.participants.get(self.actor) else {
            tracing::warn!(actor = self.actor, "progress by a non-participant index");
            return Err(Error::Channel(perun_channel::Error::Index(self.actor)));
        };
        if perun_wallet::verify(self.to.hash(), &self.signature, *signer).is_err() {
            tracing::warn!(actor = self.actor, "progress with a forged actor signature");
            return Err(Error::BadSignature { index: self.actor });
        }
        let (a, b) = (&self.from.outcome, &self.to.outcome);
        if a.assets != b.assets {
            return Err(Error::Channel(perun_channel::Error::AssetsChanged));
        }
        let sum = |xs: &[U256]| xs.iter().try_fold(U256::ZERO, |s, x| s.checked_add(*x));
        for (i, (x, y)) in a.balances.iter().zip(&b.balances).enumerate() {
            // The contract's checked sums revert on overflow (`Panic`); both are refused.
            match (sum(x), sum(y)) {
                (Some(sx), Some(sy)) if sx == sy => {}
                (None, _) | (_, None) => return Err(Error::Overflow),
                _ => return Err(Error::Channel(perun_channel::Error::SumChanged(i))),
            }
        }
        Ok(())
    }

    /// The dispute's timeout after this progression at chain time `now`.
    pub(crate) fn timeout(&self, now: u64) -> Result<u64> {
        if self.to.isFinal {
            return Ok(now);
        }
        now.checked_add(self.params.challengeDuration)
            .ok_or(Error::Overflow)
    }
}

/// Withdraw one participant's share of a concluded channel.
#[derive(Clone)]
pub struct WithdrawRequest {
    /// The channel's parameters.
    pub params: Params,
    /// The concluded state (its assets say which holders to withdraw from).
    pub state: State,
    /// The participant's index.
    pub index: usize,
    /// The participant's account: it signs the withdrawal authorisation.
    pub account: Arc<dyn Account>,
    /// Where the money goes.
    pub receiver: Address,
}

impl fmt::Debug for WithdrawRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithdrawRequest")
            .field("channel", &self.state.channelId)
            .field("index", &self.index)
            .field("account", &self.account.address())
            .field("receiver", &self.receiver)
            .finish()
    }
}

impl WithdrawRequest {
    /// Checks that the account is the participant at `index` of a valid state.
    pub(crate) fn check(&self, domain: Domain) -> Result<Address> {
        check_domain(&self.params, domain)?;
        self.params.validate()?;
        self.state.validate(&self.params)?;
        check_assets(&self.state, domain)?;
        let me = self.account.address();
        if self.params.participants.get(self.index) != Some(&me) {
            tracing::warn!(%me, index = self.index, "withdrawal by a non-participant");
            return Err(Error::NotParticipant(me));
        }
        Ok(me)
    }
}

/// A channel's dispute as stored on-chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispute {
    /// The registered (or final) version.
    pub version: u64,
    /// Chain time (seconds) after which the dispute can be concluded.
    pub timeout: u64,
    /// Whether the outcome has been pushed to the asset holders.
    pub concluded: bool,
    /// `keccak256(abi.encode(state))` of the registered state; zero after a
    /// direct `concludeFinal` (no state was registered).
    pub state_hash: B256,
    /// Whether an app channel's dispute was progressed (`progress`) and is not concluded:
    /// registration and refutation are over, and `timeout` is the deadline for the next move.
    /// False once concluded (the contract keeps one phase byte: open, concluded, progressed).
    pub progressed: bool,
}

impl Dispute {
    /// When the registered `state` of a channel with `params` may be concluded: the timeout,
    /// or, for an app channel never progressed whose state is not final, one challenge
    /// duration later (the window for the first progression).
    pub fn conclude_at(&self, params: &Params, state: &State) -> u64 {
        if !params.is_payment() && !self.progressed && !state.isFinal {
            self.timeout.saturating_add(params.challengeDuration)
        } else {
            self.timeout
        }
    }
}

impl Dispute {
    /// The contract's rule for a registration on top of this dispute at
    /// chain time `now`: not concluded, before the timeout, a strictly
    /// higher version. One place for both backends' checks.
    pub(crate) fn check_refutation(&self, now: u64, version: u64) -> Result<()> {
        if self.concluded {
            return Err(Error::AlreadyConcluded);
        }
        if self.progressed {
            tracing::warn!("registration after the dispute was progressed");
            return Err(Error::AlreadyProgressed);
        }
        if now >= self.timeout {
            return Err(Error::TimeoutPassed);
        }
        if version <= self.version {
            return Err(Error::VersionTooLow {
                registered: self.version,
                got: version,
            });
        }
        Ok(())
    }
}

impl Dispute {
    /// The contract's rule for `concludeFinal` of a final state with `version` on top of this
    /// dispute: not concluded, and no newer version registered (an old final state must not
    /// override a newer registered one).
    pub(crate) fn check_final(&self, version: u64) -> Result<()> {
        if self.concluded {
            return Err(Error::AlreadyConcluded);
        }
        if self.version > version {
            tracing::warn!(
                registered = self.version,
                got = version,
                "final state older than the registered one"
            );
            return Err(Error::VersionTooLow {
                registered: self.version,
                got: version,
            });
        }
        Ok(())
    }
}

/// A chain event about one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdjudicatorEvent {
    /// A state was registered or refuted.
    Registered {
        /// The channel.
        id: ChannelId,
        /// The registered version.
        version: u64,
        /// When the dispute can be concluded (chain seconds).
        timeout: u64,
        /// The channel's `params.nonce`: on-chain from the first registration on, so a
        /// watchtower derives an appointment's locator from the event alone.
        nonce: U256,
        /// The registered state.
        state: State,
    },
    /// An app channel's dispute was progressed by `actor`'s move to `state`.
    Progressed {
        /// The channel.
        id: ChannelId,
        /// The new state's version.
        version: u64,
        /// When the dispute concludes unless progressed again (chain seconds).
        timeout: u64,
        /// Whose move it was.
        actor: usize,
        /// The new state.
        state: State,
    },
    /// The outcome was pushed to the asset holders.
    Concluded {
        /// The channel.
        id: ChannelId,
        /// The concluded version.
        version: u64,
    },
    /// Every event of the channel up to chain position `block` has been
    /// delivered: what follows is live. Sent once per subscription, right
    /// after the channel's past events, so a subscriber knows when it has
    /// read the channel's whole history (no `Registered` before this means no
    /// dispute as of `block`). `block` is a block number on Ethereum and an
    /// event count on [`SimLedger`](crate::SimLedger).
    CaughtUp {
        /// The channel.
        id: ChannelId,
        /// The chain position the history reaches.
        block: u64,
    },
    /// A participant's credit was paid out by a withdrawal.
    Withdrawn {
        /// The channel.
        id: ChannelId,
        /// The asset holder that paid.
        holder: Address,
        /// Whose credit.
        participant: Address,
        /// Who received it.
        receiver: Address,
        /// How much.
        amount: U256,
    },
}

/// The events of one channel, in chain order. Dropping it ends the subscription.
///
/// An idle stream is one small allocation (no preallocated buffer), since a
/// client holds one per open channel.
#[derive(Debug)]
pub struct EventStream {
    slot: Arc<Mutex<Slot>>,
    /// The backend's count of open streams, told when this one is dropped.
    streams: Option<Arc<OpenStreams>>,
}

/// What a stream and its sender share.
#[derive(Debug, Default)]
struct Slot {
    queue: VecDeque<Result<AdjudicatorEvent>>,
    waker: Option<Waker>,
    /// The sender is gone: once the queue is drained the stream ends.
    ended: bool,
    /// The stream is gone: sending is pointless.
    dropped: bool,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // A panic while holding the lock cannot leave the queue half-written.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The backend's end of an [`EventStream`]; dropping it ends the stream.
#[derive(Debug)]
pub(crate) struct EventSender {
    slot: Arc<Mutex<Slot>>,
}

/// How many of a backend's streams are open; wakes the backend when a stream
/// is added (by the backend itself) or the last one is dropped.
#[derive(Debug, Default)]
pub(crate) struct OpenStreams {
    open: AtomicUsize,
    /// Notified on a new subscription and when no stream is left.
    pub(crate) changed: Notify,
}

impl OpenStreams {
    /// Counts one more open stream and wakes the backend.
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// How many streams are open.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A connected sender and stream; `streams` (if any) is told when the stream is dropped.
pub(crate) fn event_channel(streams: Option<Arc<OpenStreams>>) -> (EventSender, EventStream) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (
        EventSender { slot: slot.clone() },
        EventStream { slot, streams },
    )
}

impl EventSender {
    /// Queues an item; `false` if the stream was dropped.
    pub(crate) fn send(&self, item: Result<AdjudicatorEvent>) -> bool {
        let mut s = lock(&self.slot);
        if s.dropped {
            return false;
        }
        s.queue.push_back(item);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        true
    }

    /// Whether the stream was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.slot).dropped
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        s.ended = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

impl EventStream {
    /// The next event; `None` once the backend has stopped. An `Err` reports a
    /// broken connection; the stream ends after it. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<AdjudicatorEvent>> {
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.slot);
            if let Some(item) = s.queue.pop_front() {
                return Poll::Ready(Some(item));
            }
            if s.ended {
                return Poll::Ready(None);
            }
            match &mut s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        {
            let mut s = lock(&self.slot);
            s.dropped = true;
            s.queue = VecDeque::new();
            s.waker = None;
        }
        if let Some(streams) = &self.streams
            && streams.open.fetch_sub(1, Ordering::AcqRel) == 1
        {
            streams.changed.notify_one();
        }
    }
}

/// The sending end of an [`EventStream`], for backends outside this crate
/// (and wrappers around one): [`EventStream::pair`].
#[derive(Debug)]
pub struct EventSink(EventSender);

impl EventSink {
    /// Queues an event (or an error, after which a reader should subscribe
    /// again); `false` once the stream was dropped.
    pub fn send(&self, item: Result<AdjudicatorEvent>) -> bool {
        self.0.send(item)
    }

    /// Whether the stream was dropped (stop sending).
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl EventStream {
    /// A connected sink and stream: what a [`Adjudicator`](crate::Adjudicator)
    /// implementation returns from `subscribe`. Dropping the sink ends the
    /// stream once its queue is drained.
    pub fn pair() -> (EventSink, EventStream) {
        let (tx, rx) = event_channel(None);
        (EventSink(tx), rx)
    }
}

/// `keccak256(abi.encode(channelId, participant))`: a participant's deposit slot.
pub fn funding_id(channel: ChannelId, participant: Address) -> B256 {
    keccak256((channel, participant).abi_encode())
}

alloy_sol_types::sol! {
    /// A participant's authorisation to pay its credit in a channel to `receiver`
    /// (the asset holders' `WithdrawalAuth`). `nonce` is the participant's current
    /// `withdrawNonces` entry at the holder: each authorisation works once.
    #[derive(Debug, PartialEq, Eq)]
    struct WithdrawalAuth {
        bytes32 channelId;
        address participant;
        address receiver;
        uint256 amount;
        uint256 nonce;
    }
}

/// The hash a participant signs (EIP-191) to authorise a withdrawal:
/// `keccak256(abi.encode(holder, chainId, auth))`, bound to one holder on one chain.
pub fn withdrawal_hash(holder: Address, chain_id: U256, auth: &WithdrawalAuth) -> B256 {
    keccak256((holder, chain_id, auth.clone()).abi_encode())
}
