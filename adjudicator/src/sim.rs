//! [`SimLedger`]: an in-memory chain with the contracts' rules, for fast
//! protocol tests. The conformance suite runs against it and anvil alike, so
//! the two cannot drift.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use alloy_primitives::{Address, B256, Signature, U256};
use async_trait::async_trait;
use perun_channel::{App, AppRejection, Asset, ChannelId, Domain, Params, State};
use tokio::sync::Notify;
use tracing::{Instrument, debug, info_span, warn};

use crate::history::{ChainFact, ChainHistory, ChainLog, LogPage};
use crate::types::{EventSender, WithdrawalAuth, event_channel, withdrawal_hash};
use crate::{
    Adjudicator, AdjudicatorEvent, AppRevert, Dispute, Error, EventStream, FeedItem, Funder,
    FundingRequest, ProgressRequest, RegistrationFeed, Result, RevertReason, SignedChannel,
    WithdrawRequest, funding_id,
};

/// An in-memory ledger: accounts with balances per asset, asset holders, the
/// adjudicator's disputes, and a clock that only moves when told to.
///
/// Clones share the same ledger. Deposits are paid from the depositing
/// participant's own balance (see [`SimLedger::mint`]).
#[derive(Debug, Clone)]
pub struct SimLedger {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    chain_id: U256,
    /// The simulated adjudicator's address: channels must name it (and the chain id).
    adjudicator: Address,
    /// (holder, participant) => the nonce its next signed withdrawal must carry.
    withdraw_nonces: HashMap<(Address, Address), U256>,
    now: u64,
    holders: HashSet<Address>,
    /// (holder, account) => balance of that asset in the account.
    wallets: HashMap<(Address, Address), U256>,
    /// (holder, funding id) => (amount, outcome set).
    holdings: HashMap<(Address, B256), (U256, bool)>,
    disputes: HashMap<ChannelId, (Dispute, B256)>,
    rejecting: HashSet<Address>,
    /// App address => its rules, as the app contract deployed there would check them.
    apps: HashMap<Address, Arc<dyn App>>,
    history: HashMap<ChannelId, Vec<AdjudicatorEvent>>,
    /// Events emitted so far: the ledger's "block height" for `CaughtUp`.
    height: u64,
    subscribers: HashMap<ChannelId, Vec<EventSender>>,
    /// Every `Registered` and `Concluded` event with the height after it, for registration feeds.
    disputes_log: Vec<(u64, AdjudicatorEvent)>,
    /// Wakes registration feeds on a new event.
    feeds: Arc<Notify>,
    /// Every channel log, as the contracts would emit them: log `i` is in
    /// "block" `i + 1`, for [`ChainHistory`].
    chain_log: Vec<ChainLog>,
}

impl Inner {
    /// Appends a channel log in a block of its own.
    fn log(&mut self, channel: ChannelId, fact: ChainFact) {
        let block = self.chain_log.len() as u64 + 1;
        self.chain_log.push(ChainLog {
            block,
            log_index: 0,
            channel,
            fact,
        });
    }

    fn emit(&mut self, id: ChannelId, event: AdjudicatorEvent) {
        debug!(?event, "sim event");
        match &event {
            AdjudicatorEvent::Registered {
                version, timeout, ..
            } => self.log(
                id,
                ChainFact::Registered {
                    version: *version,
                    timeout: *timeout,
                },
            ),
            AdjudicatorEvent::Concluded { version, .. } => {
                self.log(id, ChainFact::Concluded { version: *version });
            }
            // The chain history reads no `Progressed` logs (on Ethereum neither).
            AdjudicatorEvent::Progressed { .. } => {}
            AdjudicatorEvent::Withdrawn {
                holder,
                participant,
                receiver,
                amount,
                ..
            } => self.log(
                id,
                ChainFact::Withdrawn {
                    holder: *holder,
                    participant: *participant,
                    receiver: *receiver,
                    amount: *amount,
                },
            ),
            AdjudicatorEvent::CaughtUp { .. } => {}
        }
        self.height += 1;
        if matches!(
            event,
            AdjudicatorEvent::Registered { .. } | AdjudicatorEvent::Concluded { .. }
        ) {
            self.disputes_log.push((self.height, event.clone()));
            self.feeds.notify_waiters();
        }
        self.history.entry(id).or_default().push(event.clone());
        if let Some(subs) = self.subscribers.get_mut(&id) {
            subs.retain(|s| s.send(Ok(event.clone())));
        }
    }

    fn holder(&self, holder: Address) -> Result<()> {
        if self.holders.contains(&holder) {
            Ok(())
        } else {
            warn!(%holder, "unknown asset holder");
            Err(Error::UnknownAsset(holder))
        }
    }

    /// What a holder's `holdings(channel, participant)` answers: the slot,
    /// settled once the channel is concluded (for every address, as the
    /// contract asks the adjudicator, not only for participants).
    fn slot(&self, holder: Address, channel: ChannelId, participant: Address) -> (U256, bool) {
        let (amount, settled) = self.held(holder, funding_id(channel, participant));
        let concluded = self
            .disputes
            .get(&channel)
            .is_some_and(|(d, _)| d.concluded);
        (amount, settled || concluded)
    }

    fn held(&self, holder: Address, fid: B256) -> (U256, bool) {
        self.holdings
            .get(&(holder, fid))
            .copied()
            .unwrap_or_default()
    }

    /// The holders' deposit rule (see [`SimLedger::deposit`]).
    fn deposit(
        &mut self,
        holder: Address,
        from: Address,
        fid: B256,
        expected_held: U256,
        amount: U256,
    ) -> Result<()> {
        let held = self.held(holder, fid).0;
        if held != expected_held {
            warn!(%fid, %expected_held, %held, "deposit met other holdings");
            return Err(Error::HoldingsChanged {
                funding_id: fid,
                expected: expected_held,
                found: Some(held),
            });
        }
        // The holders keep amounts below 2^255 (the top bit marks "settled").
        if held.checked_add(amount).is_none_or(|t| t.bit(255)) {
            return Err(Error::Overflow);
        }
        let have = self
            .wallets
            .get(&(holder, from))
            .copied()
            .unwrap_or_default();
        if have < amount {
            return Err(Error::InsufficientFunds { need: amount, have });
        }
        self.wallets.insert((holder, from), have - amount);
        self.holdings.entry((holder, fid)).or_default().0 += amount;
        Ok(())
    }

    /// The assets with their row index (checked requests name this chain only: `ForeignAsset`).
    fn local_assets(&self, state: &State) -> Vec<(usize, Address)> {
        state
            .outcome
            .assets
            .iter()
            .enumerate()
            .filter(|(_, a)| a.chainId == self.chain_id)
            .map(|(i, a)| (i, a.holder))
            .collect()
    }

    /// Who has not deposited their share yet, as `(index, address)`.
    fn missing(&self, params: &Params, state: &State) -> Vec<(usize, Address)> {
        let assets = self.local_assets(state);
        params
            .participants
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                assets.iter().any(|(a, holder)| {
                    let need = params.funding_of(*a, *i);
                    self.held(*holder, funding_id(state.channelId, **p)).0 < need
                })
            })
            .map(|(i, p)| (i, *p))
            .collect()
    }

    /// The adjudicator's `_pushOutcome` and the holders' `setOutcome`: a holder that is not one
    /// of ours, or is listed a second time, is skipped. A holder pays the outcome plus each
    /// participant's surplus if every slot holds its funding and the outcome sums to the
    /// funding, and otherwise exactly what each slot holds; a failed push is credited.
    fn push_outcome(&mut self, id: ChannelId, params: &Params, state: &State) -> Result<()> {
        let mut plan: Vec<(Address, Vec<U256>)> = Vec::new();
        for (a, holder) in self.local_assets(state) {
            if !self.holders.contains(&holder) || plan.iter().any(|(h, _)| *h == holder) {
                warn!(%holder, "outcome skipped: not our holder, or listed twice");
                continue;
            }
            let row = state.outcome.balances.get(a).ok_or(Error::Dimensions)?;
            let funding = params.funding.get(a).ok_or(Error::Dimensions)?;
            let mut held = Vec::new();
            let mut covered = true;
            for (p, f) in params.participants.iter().zip(funding) {
                let (h, settled) = self.held(holder, funding_id(id, *p));
                if settled {
                    return Err(Error::AlreadyConcluded);
                }
                covered &= h >= *f;
                held.push(h);
            }
            let sum = |xs: &[U256]| xs.iter().try_fold(U256::ZERO, |s, x| s.checked_add(*x));
            let pay = match (sum(funding), sum(row)) {
                (Some(funded), Some(owed)) if covered && funded == owed => row
                    .iter()
                    .zip(&held)
                    .zip(funding)
                    .map(|((o, h), f)| o.saturating_add(*h - *f))
                    .collect(),
                _ => held,
            };
            plan.push((holder, pay));
        }
        for (holder, pay) in plan {
            // Settle and empty every slot first, as the holder does before any payment.
            for p in &params.participants {
                self.holdings
                    .insert((holder, funding_id(id, *p)), (U256::ZERO, true));
            }
            for (p, amount) in params.participants.iter().zip(pay) {
                let fid = funding_id(id, *p);
                if amount.is_zero() || self.rejecting.contains(p) {
                    // Credits add (the slot was emptied when it was settled).
                    let credit = self.held(holder, fid).0.saturating_add(amount);
                    self.holdings.insert((holder, fid), (credit, true));
                    if !amount.is_zero() {
                        let fact = ChainFact::Credited {
                            holder,
                            participant: *p,
                            amount,
                        };
                        self.log(id, fact);
                    }
                } else {
                    self.holdings.insert((holder, fid), (U256::ZERO, true));
                    let w = self.wallets.entry((holder, *p)).or_default();
                    *w = w.saturating_add(amount);
                    let fact = ChainFact::Paid {
                        holder,
                        participant: *p,
                        amount,
                    };
                    self.log(id, fact);
                }
            }
        }
        Ok(())
    }

    fn domain(&self) -> Domain {
        Domain {
            chain_id: self.chain_id,
            adjudicator: self.adjudicator,
        }
    }
}

impl SimLedger {
    /// The simulated adjudicator's address (part of [`Adjudicator::domain`]).
    pub const ADJUDICATOR: Address = Address::repeat_byte(0xad);

    /// An empty ledger for chain `chain_id`; the clock starts at 1 s (a chain's time is never 0).
    pub fn new(chain_id: u64) -> Self {
        let inner = Inner {
            chain_id: U256::from(chain_id),
            adjudicator: Self::ADJUDICATOR,
            now: 1,
            ..Inner::default()
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chain id assets must name to be settled here.
    pub fn chain_id(&self) -> U256 {
        self.lock().chain_id
    }

    /// Registers an asset holder (the simulated counterpart of a deployed holder).
    pub fn add_asset(&self, holder: Address) {
        self.lock().holders.insert(holder);
    }

    /// Credits `amount` of the asset held by `holder` to `account`.
    pub fn mint(&self, holder: Address, account: Address, amount: U256) {
        let mut inner = self.lock();
        let w = inner.wallets.entry((holder, account)).or_default();
        *w = w.saturating_add(amount);
    }

    /// `account`'s balance of the asset held by `holder`.
    pub fn balance(&self, holder: Address, account: Address) -> U256 {
        self.lock()
            .wallets
            .get(&(holder, account))
            .copied()
            .unwrap_or_default()
    }

    /// What `holder` holds for a funding id, and whether the outcome is set.
    pub fn holdings(&self, holder: Address, fid: B256) -> (U256, bool) {
        self.lock().held(holder, fid)
    }

    /// Deploys an app: `progress` in channels whose `params.app` is `address` checks `app`'s
    /// rules, as the app contract there would. `progress` with any other app is rejected
    /// ([`Error::AppRejected`]), as a call to an address without code reverts.
    pub fn add_app(&self, address: Address, app: Arc<dyn App>) {
        self.lock().apps.insert(address, app);
    }

    /// Makes `account` refuse payments, like a contract that reverts on receipt.
    pub fn set_rejecting(&self, account: Address, rejecting: bool) {
        let mut inner = self.lock();
        if rejecting {
            inner.rejecting.insert(account);
        } else {
            inner.rejecting.remove(&account);
        }
    }

    /// The ledger's clock, in seconds.
    pub fn now(&self) -> u64 {
        self.lock().now
    }

    /// Moves the clock forward.
    pub fn advance(&self, secs: u64) {
        let mut inner = self.lock();
        inner.now = inner.now.saturating_add(secs);
    }

    /// The holders' `deposit(fid, expectedHeld, amount)`, paid from `from`'s
    /// balance: refused with [`Error::HoldingsChanged`] unless exactly
    /// `expected_held` is held for `fid`, so a deposit computed from a read of
    /// the holdings lands at most once.
    pub fn deposit(
        &self,
        holder: Address,
        from: Address,
        fid: B256,
        expected_held: U256,
        amount: U256,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.holder(holder)?;
        inner.deposit(holder, from, fid, expected_held, amount)?;
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// [`deposit`](Self::deposit) for the participant's slot in `channel`,
    /// which also leaves a `Deposited` log in the ledger's
    /// [`ChainHistory`] (a deposit by funding id alone cannot name the
    /// channel). After the channel is concluded the deposit is withdrawable.
    pub fn deposit_to(
        &self,
        holder: Address,
        from: Address,
        channel: ChannelId,
        participant: Address,
        expected_held: U256,
        amount: U256,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.holder(holder)?;
        let fid = funding_id(channel, participant);
        inner.deposit(holder, from, fid, expected_held, amount)?;
        let fact = ChainFact::Deposited {
            holder,
            participant,
            amount,
        };
        inner.log(channel, fact);
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Every `Registered` and `Concluded` event, past and future, whose
    /// height (the ledger's event count after it) is at least `from`: the
    /// counterpart of [`EthAdjudicator::registrations`](crate::EthAdjudicator::registrations).
    pub fn registrations(&self, from: u64) -> RegistrationFeed {
        let notify = self.lock().feeds.clone();
        RegistrationFeed::sim(SimFeed {
            ledger: self.clone(),
            next: from,
            notify,
            queue: VecDeque::new(),
        })
    }

    /// The participant's current withdrawal nonce at `holder` (the holders' `withdrawNonces`).
    pub fn withdraw_nonce(&self, holder: Address, participant: Address) -> U256 {
        self.lock()
            .withdraw_nonces
            .get(&(holder, participant))
            .copied()
            .unwrap_or_default()
    }

    /// The holders' `withdraw(auth, sig)` for a caller that is not the participant:
    /// `sig` must be the participant's signature of [`withdrawal_hash`], and `auth.nonce` the
    /// participant's current nonce, which the call advances (each authorisation works once).
    pub fn withdraw_signed(
        &self,
        holder: Address,
        auth: &WithdrawalAuth,
        sig: &Signature,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.holder(holder)?;
        let key = (holder, auth.participant);
        let expected = inner.withdraw_nonces.get(&key).copied().unwrap_or_default();
        if auth.nonce != expected {
            warn!(participant = %auth.participant, %expected, got = %auth.nonce, "withdrawal authorisation with a stale nonce");
            return Err(Error::WrongNonce {
                expected,
                got: auth.nonce,
            });
        }
        let hash = withdrawal_hash(holder, inner.chain_id, auth);
        if perun_wallet::verify(hash, sig, auth.participant).is_err() {
            warn!(participant = %auth.participant, "forged withdrawal authorisation");
            return Err(Error::BadAuthorization);
        }
        withdraw_credit(&mut inner, holder, auth)?;
        inner
            .withdraw_nonces
            .insert(key, expected.saturating_add(U256::from(1)));
        Ok(())
    }
}

/// A [`RegistrationFeed`] over a [`SimLedger`]: heights stand for blocks.
#[derive(Debug)]
pub(crate) struct SimFeed {
    ledger: SimLedger,
    /// The first height not delivered yet.
    next: u64,
    notify: Arc<Notify>,
    queue: VecDeque<FeedItem>,
}

impl SimFeed {
    /// The next item: the logged events from `next` on, then a `Scanned` mark at the height.
    pub(crate) async fn next(&mut self) -> FeedItem {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return item;
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: an event emitted after it wakes us.
            notified.as_mut().enable();
            {
                let inner = self.ledger.lock();
                if inner.height >= self.next {
                    let log = &inner.disputes_log;
                    let start = log.partition_point(|(h, _)| *h < self.next);
                    self.queue
                        .extend(log[start..].iter().map(|(block, event)| FeedItem::Event {
                            block: *block,
                            event: event.clone(),
                        }));
                    self.queue.push_back(FeedItem::Scanned {
                        block: inner.height,
                    });
                    self.next = inner.height.saturating_add(1);
                    continue;
                }
            }
            notified.await;
        }
    }
}

/// Pays up to `auth.amount` of the participant's credit to the receiver.
fn withdraw_credit(inner: &mut Inner, holder: Address, auth: &WithdrawalAuth) -> Result<()> {
    let fid = funding_id(auth.channelId, auth.participant);
    let (credit, settled) = inner.slot(holder, auth.channelId, auth.participant);
    if !settled {
        return Err(Error::NotConcluded);
    }
    let amount = credit.min(auth.amount);
    if amount.is_zero() {
        return Ok(());
    }
    if inner.rejecting.contains(&auth.receiver) {
        return Err(Error::PaymentFailed(auth.receiver));
    }
    inner
        .holdings
        .insert((holder, fid), (credit - amount, true));
    let w = inner.wallets.entry((holder, auth.receiver)).or_default();
    *w = w.saturating_add(amount);
    inner.emit(
        auth.channelId,
        AdjudicatorEvent::Withdrawn {
            id: auth.channelId,
            holder,
            participant: auth.participant,
            receiver: auth.receiver,
            amount,
        },
    );
    Ok(())
}

#[async_trait]
impl Funder for SimLedger {
    async fn fund(&self, req: FundingRequest) -> Result<()> {
        let span = info_span!("sim_fund", channel = %req.state.channelId, index = req.index);
        self.fund_inner(req).instrument(span).await
    }

    fn supports(&self, asset: &Asset) -> bool {
        let inner = self.lock();
        asset.chainId == inner.chain_id && inner.holders.contains(&asset.holder)
    }
}

impl SimLedger {
    async fn fund_inner(&self, req: FundingRequest) -> Result<()> {
        req.check(self.lock().domain())?;
        let me = req.params.participants[req.index];
        let fid = funding_id(req.state.channelId, me);
        {
            let mut inner = self.lock();
            let assets = inner.local_assets(&req.state);
            let mut deposits = Vec::new();
            for (a, holder) in &assets {
                inner.holder(*holder)?;
                let need = req.params.funding_of(*a, req.index);
                let (held, settled) = inner.held(*holder, fid);
                if settled {
                    warn!(%holder, "the channel is concluded already; not depositing");
                    return Err(Error::AlreadyConcluded);
                }
                let missing = need.saturating_sub(held);
                let have = inner
                    .wallets
                    .get(&(*holder, me))
                    .copied()
                    .unwrap_or_default();
                if have < missing {
                    return Err(Error::InsufficientFunds {
                        need: missing,
                        have,
                    });
                }
                // The holders keep amounts below 2^255 (the top bit marks "settled").
                if held.checked_add(missing).is_none_or(|t| t.bit(255)) {
                    return Err(Error::Overflow);
                }
                deposits.push((*holder, held, missing));
            }
            for (holder, held, amount) in deposits {
                if !amount.is_zero() {
                    inner.deposit(holder, me, fid, held, amount)?;
                    let fact = ChainFact::Deposited {
                        holder,
                        participant: me,
                        amount,
                    };
                    inner.log(req.state.channelId, fact);
                }
            }
        }
        self.changed.notify_waiters();
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self.lock().missing(&req.params, &req.state).is_empty() {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(req.timeout, wait).await.is_err() {
            let missing = self.lock().missing(&req.params, &req.state);
            if !missing.is_empty() {
                warn!(?missing, "funding timed out");
                return Err(Error::FundingTimeout { missing });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Adjudicator for SimLedger {
    fn domain(&self) -> Domain {
        self.lock().domain()
    }

    async fn register(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let _g = info_span!("sim_register", channel = %state.channelId, version = state.version)
            .entered();
        let hash = req.check(self.domain())?;
        let id = state.channelId;
        let mut inner = self.lock();
        let now = inner.now;
        let (mut d, _) = inner.disputes.get(&id).copied().unwrap_or((
            Dispute {
                version: 0,
                timeout: 0,
                concluded: false,
                state_hash: B256::ZERO,
                progressed: false,
            },
            B256::ZERO,
        ));
        if d.timeout != 0 && !d.concluded && d.state_hash == hash {
            debug!("state registered already; nothing to do");
            return Ok(());
        }
        if d.timeout == 0 {
            d.timeout = if state.isFinal {
                now
            } else {
                now.checked_add(req.params.challengeDuration)
                    .ok_or(Error::Overflow)?
            };
        } else {
            d.check_refutation(now, state.version)?;
            if state.isFinal {
                d.timeout = now;
            }
        }
        d.version = state.version;
        d.state_hash = hash;
        inner.disputes.insert(id, (d, hash));
        inner.emit(
            id,
            AdjudicatorEvent::Registered {
                id,
                version: state.version,
                timeout: d.timeout,
                nonce: req.params.nonce,
                state: state.clone(),
            },
        );
        Ok(())
    }

    async fn conclude(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let _g = info_span!("sim_conclude", channel = %state.channelId, version = state.version)
            .entered();
        let id = state.channelId;
        if state.isFinal && req.state.is_fully_signed() {
            req.check(self.domain())?;
            let mut inner = self.lock();
            let prev = inner.disputes.get(&id).copied();
            if let Some((d, _)) = prev {
                d.check_final(state.version)?;
            }
            let hash = prev.map(|(d, _)| d.state_hash).unwrap_or_default();
            inner.push_outcome(id, &req.params, state)?;
            let d = Dispute {
                version: state.version,
                timeout: inner.now,
                concluded: true,
                state_hash: hash,
                progressed: false,
            };
            inner.disputes.insert(id, (d, hash));
            inner.emit(
                id,
                AdjudicatorEvent::Concluded {
                    id,
                    version: state.version,
                },
            );
            return Ok(());
        }
        req.check_unsigned(self.domain())?;
        let mut inner = self.lock();
        let (mut d, hash) = inner
            .disputes
            .get(&id)
            .copied()
            .ok_or(Error::NotRegistered)?;
        if d.concluded {
            return Err(Error::AlreadyConcluded);
        }
        let at = d.conclude_at(&req.params, state);
        if inner.now < at {
            return Err(Error::TimeoutNotPassed {
                timeout: at,
                now: inner.now,
            });
        }
        if state.hash() != hash {
            warn!("conclude with a state that is not the registered one");
            return Err(Error::WrongState);
        }
        inner.push_outcome(id, &req.params, state)?;
        d.concluded = true;
        // The contract keeps one phase: concluded replaces progressed.
        d.progressed = false;
        inner.disputes.insert(id, (d, hash));
        inner.emit(
            id,
            AdjudicatorEvent::Concluded {
                id,
                version: state.version,
            },
        );
        Ok(())
    }

    async fn progress(&self, req: &ProgressRequest) -> Result<()> {
        let to = &req.to;
        let _g = info_span!("sim_progress", channel = %to.channelId, version = to.version, actor = req.actor)
            .entered();
        let hash = req.check(self.domain())?;
        let id = to.channelId;
        let mut inner = self.lock();
        let now = inner.now;
        let prev = inner.disputes.get(&id).map(|(d, _)| *d);
        if req.done(prev.as_ref(), hash) {
            debug!("state progressed to already; nothing to do");
            return Ok(());
        }
        req.check_dispute(prev.as_ref(), now)?;
        let Some(app) = inner.apps.get(&req.params.app).cloned() else {
            warn!(app = %req.params.app, "progress with an unknown app");
            return Err(Error::AppRejected {
                rejection: AppRejection::new(AppRevert {
                    reason: RevertReason::Empty,
                }),
                data: None,
            });
        };
        if let Err(rejection) = app.valid_transition(&req.params, &req.from, to, req.actor) {
            warn!(%rejection, "the app rejected the move");
            return Err(Error::AppRejected {
                rejection,
                data: None,
            });
        }
        let mut d = prev.ok_or(Error::NotRegistered)?;
        d.version = to.version;
        d.progressed = true;
        d.timeout = req.timeout(now)?;
        d.state_hash = hash;
        inner.disputes.insert(id, (d, hash));
        inner.emit(
            id,
            AdjudicatorEvent::Progressed {
                id,
                version: to.version,
                timeout: d.timeout,
                actor: req.actor,
                state: to.clone(),
            },
        );
        Ok(())
    }

    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()> {
        let _g =
            info_span!("sim_withdraw", channel = %req.state.channelId, index = req.index).entered();
        let me = req.check(self.domain())?;
        let id = req.state.channelId;
        let mut inner = self.lock();
        let fid = funding_id(id, me);
        let assets = inner.local_assets(&req.state);
        for (_, holder) in &assets {
            inner.holder(*holder)?;
            if !inner.held(*holder, fid).1 {
                return Err(Error::NotConcluded);
            }
        }
        for (_, holder) in assets {
            let auth = WithdrawalAuth {
                channelId: id,
                participant: me,
                receiver: req.receiver,
                amount: U256::MAX,
                // The participant's own call needs no nonce.
                nonce: U256::ZERO,
            };
            withdraw_credit(&mut inner, holder, &auth)?;
        }
        Ok(())
    }

    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        let (tx, rx) = event_channel(None);
        let mut inner = self.lock();
        for e in inner.history.get(&id).into_iter().flatten() {
            // The receiver is alive: we hold it.
            let _ = tx.send(Ok(e.clone()));
        }
        let _ = tx.send(Ok(AdjudicatorEvent::CaughtUp {
            id,
            block: inner.height,
        }));
        inner.subscribers.entry(id).or_default().push(tx);
        Ok(rx)
    }

    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        Ok(self.lock().disputes.get(&id).map(|(d, _)| *d))
    }

    fn history(&self) -> Option<&dyn ChainHistory> {
        Some(self)
    }
}

/// Heights stand for blocks: log `i` is block `i + 1`, every block is
/// confirmed, and there are no reorgs.
#[async_trait]
impl ChainHistory for SimLedger {
    fn first_block(&self) -> u64 {
        1
    }

    async fn confirmed_block(&self) -> Result<u64> {
        Ok(self.lock().chain_log.len() as u64)
    }

    async fn logs(&self, from: u64, to: u64) -> Result<LogPage> {
        let inner = self.lock();
        let logs = inner
            .chain_log
            .iter()
            .filter(|l| (from..=to).contains(&l.block))
            .cloned()
            .collect();
        Ok(LogPage {
            logs,
            rejected: Vec::new(),
        })
    }

    async fn credit(
        &self,
        holder: Address,
        channel: ChannelId,
        participant: Address,
    ) -> Result<(U256, bool)> {
        let inner = self.lock();
        inner.holder(holder)?;
        Ok(inner.slot(holder, channel, participant))
    }

    async fn withdraw_credit(
        &self,
        holder: Address,
        channel: ChannelId,
        account: Arc<dyn perun_wallet::Account>,
    ) -> Result<U256> {
        let me = account.address();
        let mut inner = self.lock();
        inner.holder(holder)?;
        let (credit, settled) = inner.slot(holder, channel, me);
        if !settled {
            return Err(Error::NotConcluded);
        }
        let auth = WithdrawalAuth {
            channelId: channel,
            participant: me,
            receiver: me,
            amount: credit,
            nonce: U256::ZERO,
        };
        withdraw_credit(&mut inner, holder, &auth)?;
        Ok(credit)
    }
}
