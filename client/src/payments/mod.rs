//! Payments to peers, over whatever channels the client has with them.
//!
//! A dApp that wants to pay a peer should not have to pick channels. The
//! [`Payments`] layer reserves an amount first (so a service can be
//! rendered knowing the money is there), sends all or part of it later, and
//! waits for payments it expects from peers. It keeps **books** on top of the
//! channels: the amounts reserved on each channel, and the payments
//! expected from each peer. Balances always come from the channels' latest
//! fully signed states, so the books never disagree with them. The books
//! live in memory: reservations and expectations end with the process (the
//! channels, and with them every balance, are durable as always).
//!
//! # Which channels it uses
//! Two-party payment channels (no app) that are funded and open (`Active`
//! or `Updating`), per asset ([`Asset`]: chain and holder). A payment is
//! one update on one channel: [`reserve`](Payments::reserve) picks, among
//! the channels with the peer that hold the asset, **the one with the
//! smallest free balance that covers the amount** (free: our balance less
//! what is reserved on it), ties going to the lowest channel id. Big
//! channels so stay free for big payments. If none covers it, it fails with
//! [`Error::InsufficientFunds`], whose `available` is the most any one
//! channel could give; or, with [`PaymentsConfig::open_channels`], it
//! proposes a new channel to the peer first.
//!
//! # Example
//! ```no_run
//! # async fn f(client: perun_client::Client, seller: perun_wire::PeerId,
//! #     eth: perun_channel::Asset) -> perun_client::Result<()> {
//! use perun_channel::U256;
//! use perun_client::payments::Payments;
//!
//! let payments = Payments::new(&client)?;
//! let r = payments.reserve(seller, &eth, U256::from(100)).await?; // before the service
//! payments.send(r, U256::from(80)).await?; // after it: 80 paid, 20 released
//! let r = payments.reserve(seller, &eth, U256::from(100)).await?;
//! payments.cancel(r); // the service failed
//! # Ok(()) }
//! ```
//!
//! A reservation is sent or cancelled once; the compiler sees to it:
//! ```compile_fail,E0382
//! # async fn f(p: perun_client::payments::Payments, r: perun_client::payments::Reservation) {
//! p.send(r, perun_channel::U256::from(1)).await;
//! p.cancel(r); // use of a moved value
//! # }
//! ```

mod books;
mod handler;
mod track;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use perun_channel::{Allocation, Asset, ChannelId, Phase, U256};
use perun_wire::{Participant, PeerId};
use tokio::sync::{broadcast, oneshot, watch};
use tracing::{Instrument, debug, info_span, warn};

use crate::core::{ChannelCore, Shared, lock};
use crate::handler::UpdateHandler;
use crate::{Channel, ChannelProposal, Client, Error, Result};
pub use books::Received;
use books::{Books, Candidate};
pub use handler::PaymentsHandler;

/// How many incoming payments an [`IncomingStream`] buffers for a slow
/// reader before it skips some.
pub const INCOMING_BUFFER: usize = 1024;

/// Which incoming updates the [`PaymentsHandler`] signs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IncomingPolicy {
    /// Any update in which none of our balances decreases: payments to us,
    /// and the final update of a cooperative close. The default.
    #[default]
    AnyPaymentToMe,
    /// Like `AnyPaymentToMe`, but a payment must also be expected
    /// ([`Payments::expect`]): each asset's increase is at most what is
    /// still expected from the paying peer in it.
    OnlyExpected,
}

/// When no channel with a peer covers a reservation, propose a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPolicy {
    /// Our deposit in the new channel: this, or the reservation's amount if
    /// that is more. The peer deposits nothing.
    pub deposit: U256,
    /// The new channel's challenge duration, in seconds.
    pub challenge_duration: u64,
}

/// How a [`Payments`] behaves. The default: any payment to us is accepted,
/// no channel is opened on its own, and the client's update handler is
/// replaced by a [`PaymentsHandler`].
#[derive(Debug, Clone, Default)]
pub struct PaymentsConfig {
    incoming: IncomingPolicy,
    open: Option<OpenPolicy>,
    keep_update_handler: bool,
}

impl PaymentsConfig {
    /// Which incoming updates to sign.
    pub fn incoming(mut self, policy: IncomingPolicy) -> Self {
        self.incoming = policy;
        self
    }

    /// Propose a new channel when none covers a reservation (off by
    /// default: opening a channel costs a deposit and gas). The peer's
    /// address is taken from an earlier channel with it; a peer we never
    /// had a channel with stays [`Error::UnknownPeer`].
    pub fn open_channels(mut self, policy: OpenPolicy) -> Self {
        self.open = Some(policy);
        self
    }

    /// Leave the client's update handler as it is (for a client that also
    /// runs app channels, whose updates may lower our balances). Then the
    /// application's handler alone decides on incoming updates.
    pub fn keep_update_handler(mut self) -> Self {
        self.keep_update_handler = true;
        self
    }
}

/// What we hold with one peer in one asset, over every open channel with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The asset.
    pub asset: Asset,
    /// What we can still reserve: our balances less what is reserved.
    pub spendable: U256,
    /// What open reservations hold.
    pub reserved: U256,
    /// What we expect from the peer and has not arrived yet.
    pub incoming: U256,
    /// The peer's balances: the most it can still pay us over these channels.
    pub receivable: U256,
}

/// An amount held on one channel for a payment to one peer; give it to
/// [`Payments::send`] or [`Payments::cancel`]. Dropping it releases it.
#[derive(Debug)]
#[must_use = "a reservation holds funds until it is sent, cancelled or dropped"]
pub struct Reservation {
    id: u64,
    owner: Weak<Inner>,
    peer: PeerId,
    channel: ChannelId,
    asset: Asset,
    amount: U256,
}

impl Reservation {
    /// The amount held.
    pub fn amount(&self) -> U256 {
        self.amount
    }
    /// The peer the payment goes to.
    pub fn peer(&self) -> PeerId {
        self.peer
    }
    /// The channel it is held on.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }
    /// The asset.
    pub fn asset(&self) -> &Asset {
        &self.asset
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(inner) = self.owner.upgrade() {
            lock(&inner.books).release(self.id);
        }
    }
}

/// A payment that was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The channel it went over.
    pub channel: ChannelId,
    /// The version of the channel's state that pays it.
    pub version: u64,
    /// The amount paid.
    pub amount: U256,
}

/// A payment that arrived: our balance grew in a new fully signed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingPayment {
    /// The peer that paid.
    pub peer: PeerId,
    /// The channel.
    pub channel: ChannelId,
    /// The asset.
    pub asset: Asset,
    /// How much our balance grew.
    pub amount: U256,
    /// The version of the state that pays it.
    pub version: u64,
}

/// Incoming payments, as they arrive.
#[derive(Debug)]
pub struct IncomingStream {
    rx: broadcast::Receiver<IncomingPayment>,
}

impl IncomingStream {
    /// The next payment; `None` once the [`Payments`] is gone. A reader
    /// more than [`INCOMING_BUFFER`] payments behind skips the oldest
    /// (logged); the books ([`Payments::expect`]) never miss one.
    pub async fn next(&mut self) -> Option<IncomingPayment> {
        loop {
            match self.rx.recv().await {
                Ok(p) => return Some(p),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "incoming payments reader lags");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A payment we expect; `.await` it. Resolves with [`Received`] once that
/// much has arrived from the peer in the asset (counting from the moment
/// [`Payments::expect`] was called), or fails with [`Error::NotReceived`]
/// after the timeout. A payment from the peer in the asset that was
/// accepted but is not yet committed when the timeout passes is waited
/// for (at most 30 s more): its commit may be a moment away. Dropping it
/// forgets the expectation.
#[derive(Debug)]
#[must_use = "an expectation does nothing unless awaited"]
pub struct Expectation {
    inner: Weak<Inner>,
    peer: PeerId,
    asset: Asset,
    amount: U256,
    id: u64,
    timeout: Duration,
    rx: Option<oneshot::Receiver<Received>>,
}

impl Expectation {
    async fn wait(mut self) -> Result<Received> {
        let Some(rx) = self.rx.take() else {
            return Err(Error::Closed);
        };
        let mut rx = rx;
        match tokio::time::timeout(self.timeout, &mut rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => {
                if let Some(r) = self.await_claims(&mut rx).await {
                    return r;
                }
                let forgot = self
                    .inner
                    .upgrade()
                    .and_then(|i| lock(&i.books).forget(self.peer, &self.asset, self.id));
                match forgot {
                    Some(arrived) => Err(Error::NotReceived {
                        expected: self.amount,
                        arrived,
                    }),
                    // Met between the timeout and the lock.
                    None => rx.try_recv().map_err(|_| Error::Closed),
                }
            }
        }
    }

    /// Past the timeout: while an update bringing the peer's money in the
    /// asset was let in and is neither booked nor dead, its commit may be
    /// a moment away (held for the peer's next write, or coming by
    /// `Sync`); the expectation waits for it rather than call money that
    /// is arriving `NotReceived`. Only updates let in by the timeout
    /// count, so this waits at most [`books::EARMARK_LIFE`] more.
    /// `Some` if it resolved meanwhile.
    async fn await_claims(&self, rx: &mut oneshot::Receiver<Received>) -> Option<Result<Received>> {
        let timed_out = std::time::Instant::now();
        let ended = self
            .inner
            .upgrade()
            .map(|i| lock(&i.books).claims_ended())?;
        loop {
            let notified = ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = self.inner.upgrade().and_then(|i| {
                let mut books = lock(&i.books);
                end_dropped_claims(&i, &mut books);
                books.claimed_until(self.peer, &self.asset, timed_out)
            })?;
            tracing::debug!(peer = %self.peer, "expectation past its timeout waits for a payment let in");
            tokio::select! {
                r = &mut *rx => return Some(r.map_err(|_| Error::Closed)),
                () = notified => {}
                () = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }
}

impl Drop for Expectation {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.books).forget(self.peer, &self.asset, self.id);
        }
    }
}

impl std::future::IntoFuture for Expectation {
    type Output = Result<Received>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Received>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// Ends the claim of the update each channel dropped last (read from the
/// channel, so a decision made right after a drop sees it before the
/// follower does).
fn end_dropped_claims(inner: &Inner, books: &mut Books) {
    for id in books.claimed_channels() {
        if let Some(core) = inner.shared.channel_core(&id) {
            books.dead(id, *core.dropped.borrow());
        }
    }
}

/// Held while a channel with one (peer, asset) is being opened.
type OpeningLock = Arc<tokio::sync::Mutex<()>>;

pub(crate) struct Inner {
    shared: Arc<Shared>,
    books: Mutex<Books>,
    incoming: broadcast::Sender<IncomingPayment>,
    config: PaymentsConfig,
    /// One channel opening at a time per (peer, asset): concurrent
    /// reservations that none covers would each open one otherwise, and a
    /// peer that does not answer must not hold up openings with others.
    /// An entry per pair that ever needed an opening (a few bytes each).
    opening: Mutex<HashMap<(PeerId, Asset), OpeningLock>>,
}

/// The layer's hold on its client, kept by the `Payments` clones and the
/// payments they still run, and by nothing else: the books ([`Inner`])
/// are also held for a moment by the layer's own tasks (a follower
/// booking a state, a reservation's drop), which must not keep a dropped
/// layer in use.
struct Owner {
    shared: Arc<Shared>,
    /// Our handler, and the one it replaced (put back when we go).
    handlers: Option<(Arc<dyn UpdateHandler>, Arc<dyn UpdateHandler>)>,
    /// Dropped with the last `Payments`: stops the tracker.
    _alive: watch::Sender<()>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some((ours, previous)) = self.handlers.take() {
            let mut installed = self
                .shared
                .update_handler
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if std::ptr::addr_eq(Arc::as_ptr(&installed), Arc::as_ptr(&ours)) {
                *installed = previous;
            }
        }
        // Before the next `Payments` may be made, so it never loses its news.
        self.shared.unfollow_channels();
        self.shared
            .payments_active
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// The payments layer over one [`Client`]'s channels. Cheap to clone.
/// See the [module docs](self).
#[derive(Clone)]
pub struct Payments {
    inner: Arc<Inner>,
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("client", &self.inner.shared)
            .finish_non_exhaustive()
    }
}

impl Payments {
    /// The payments layer with the default [`PaymentsConfig`]: the client's
    /// update handler becomes a [`PaymentsHandler`] that signs payments to
    /// us only. Call it inside a Tokio runtime (it starts a task that
    /// follows the channels); fails with [`Error::Missing`] outside one.
    pub fn new(client: &Client) -> Result<Self> {
        Self::with_config(client, PaymentsConfig::default())
    }

    /// The payments layer with `config`.
    ///
    /// One per client at a time: a second one while the first lives (any
    /// clone, or a [`send`](Self::send) or a [`reserve`](Self::reserve)'s
    /// channel opening whose caller gave up but that still runs) fails
    /// with [`Error::PaymentsInUse`], since two sets of books would promise
    /// the same funds twice. Dropping the last clone puts back the update
    /// handler it replaced, and a new one may be made at once.
    pub fn with_config(client: &Client, config: PaymentsConfig) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| Error::Missing("a Tokio runtime"))?;
        let shared = &client.shared;
        if shared
            .payments_active
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::PaymentsInUse);
        }
        let (alive, stopped) = watch::channel(());
        let keep = config.keep_update_handler;
        let mut handlers = None;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            if !keep {
                let ours: Arc<dyn UpdateHandler> =
                    Arc::new(PaymentsHandler::new(weak.clone(), config.incoming));
                let mut installed = shared
                    .update_handler
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                let previous = std::mem::replace(&mut *installed, ours.clone());
                handlers = Some((ours, previous));
            }
            Inner {
                shared: shared.clone(),
                books: Mutex::new(Books::default()),
                incoming: broadcast::channel(INCOMING_BUFFER).0,
                config,
                opening: Mutex::new(HashMap::new()),
            }
        });
        let owner = Arc::new(Owner {
            shared: shared.clone(),
            handlers,
            _alive: alive,
        });
        let (news_tx, news) = tokio::sync::mpsc::unbounded_channel();
        shared.follow_channels(track::carries_payments, news_tx);
        runtime.spawn(track::track(Arc::downgrade(&inner), news, stopped));
        Ok(Self { inner, owner })
    }

    /// This layer's update handler, for an application that keeps its own
    /// ([`PaymentsConfig::keep_update_handler`]) and hands payment
    /// channels' updates on to it.
    pub fn handler(&self) -> PaymentsHandler {
        PaymentsHandler::new(Arc::downgrade(&self.inner), self.inner.config.incoming)
    }

    /// What we hold with `peer`, per asset of the channels with it. Empty
    /// for a peer without an open channel.
    pub fn balance(&self, peer: PeerId) -> Vec<Balance> {
        self.balances_with(Some(peer))
            .remove(&peer)
            .unwrap_or_default()
    }

    /// What we hold with every peer we have an open channel with.
    pub fn balances(&self) -> HashMap<PeerId, Vec<Balance>> {
        self.balances_with(None)
    }

    /// The balances with `only` (or every peer).
    fn balances_with(&self, only: Option<PeerId>) -> HashMap<PeerId, Vec<Balance>> {
        let mut books = lock(&self.inner.books);
        self.settle_doubts(&mut books);
        let mut out: HashMap<PeerId, Vec<Balance>> = HashMap::new();
        for core in self.inner.shared.channel_cores() {
            let Some(peer) = usable(&core).filter(|p| only.is_none_or(|o| o == *p)) else {
                continue;
            };
            let st = core.state.borrow();
            let outcome = &st.state.outcome;
            for (i, asset) in outcome.assets.iter().enumerate() {
                let mine = held_by(outcome, i, core.index);
                let theirs = held_by(outcome, i, 1 - core.index);
                let reserved = books.reserved(core.id, i);
                let list = out.entry(peer).or_default();
                let k = match list.iter().position(|b| &b.asset == asset) {
                    Some(k) => k,
                    None => {
                        list.push(Balance {
                            asset: asset.clone(),
                            spendable: U256::ZERO,
                            reserved: U256::ZERO,
                            incoming: books.incoming(peer, asset),
                            receivable: U256::ZERO,
                        });
                        list.len() - 1
                    }
                };
                let b = &mut list[k];
                b.spendable = b.spendable.saturating_add(mine.saturating_sub(reserved));
                b.reserved = b.reserved.saturating_add(reserved);
                b.receivable = b.receivable.saturating_add(theirs);
            }
        }
        out
    }

    /// Holds `amount` of `asset` for a payment to `peer` on one channel
    /// (see the [module docs](self) for which). Fails with
    /// [`Error::ZeroAmount`], [`Error::UnknownPeer`] (no open payment
    /// channel with the peer), [`Error::UnknownAsset`] (none of them holds
    /// the asset) or [`Error::InsufficientFunds`]. Concurrent reservations
    /// never hold more than a channel's balance.
    pub async fn reserve(&self, peer: PeerId, asset: &Asset, amount: U256) -> Result<Reservation> {
        let uncovered = |e: &Error| {
            matches!(
                e,
                Error::InsufficientFunds { .. }
                    | Error::UnknownPeer(_)
                    | Error::UnknownAsset { .. }
            )
        };
        let first = self.try_reserve(peer, asset, amount);
        if self.inner.config.open.is_none() || !first.as_ref().is_err_and(uncovered) {
            return first;
        }
        let pair = lock(&self.inner.opening)
            .entry((peer, asset.clone()))
            .or_default()
            .clone();
        let one = pair.lock_owned().await;
        // A channel another reservation opened meanwhile may cover it.
        match self.try_reserve(peer, asset, amount) {
            Err(e) if uncovered(&e) => {
                // The opening holds the lock to its end, even if this
                // caller gives up: a retry waits for that channel instead
                // of opening (and funding) a second one.
                let (this, owned) = (self.clone(), asset.clone());
                let opening = async move {
                    let _one = one;
                    this.open_channel(peer, &owned, amount, e).await
                };
                crate::to_end::ToEnd::of_client(&self.inner.shared, opening).await?;
                self.try_reserve(peer, asset, amount)
            }
            other => other,
        }
    }

    fn try_reserve(&self, peer: PeerId, asset: &Asset, amount: U256) -> Result<Reservation> {
        if amount.is_zero() {
            return Err(Error::ZeroAmount);
        }
        let mut books = lock(&self.inner.books);
        self.settle_doubts(&mut books);
        let mut with_peer = false;
        let mut candidates = Vec::new();
        for core in self.inner.shared.channel_cores() {
            if usable(&core) != Some(peer) {
                continue;
            }
            with_peer = true;
            let st = core.state.borrow();
            let Some(i) = st.state.outcome.assets.iter().position(|a| a == asset) else {
                continue;
            };
            let balance = held_by(&st.state.outcome, i, core.index);
            candidates.push(Candidate {
                id: core.id,
                asset: i,
                balance,
            });
        }
        if !with_peer {
            return Err(Error::UnknownPeer(peer));
        }
        if candidates.is_empty() {
            return Err(Error::UnknownAsset {
                peer,
                asset: Box::new(asset.clone()),
            });
        }
        let (id, hold) = books.reserve(&candidates, amount)?;
        debug!(%peer, channel = %hold.channel, %amount, "reserved");
        Ok(Reservation {
            id,
            owner: Arc::downgrade(&self.inner),
            peer,
            channel: hold.channel,
            asset: asset.clone(),
            amount,
        })
    }

    /// Proposes a channel to `peer` funded by us alone, for a reservation
    /// no channel covered (`why`).
    async fn open_channel(
        &self,
        peer: PeerId,
        asset: &Asset,
        amount: U256,
        why: Error,
    ) -> Result<()> {
        let Some(policy) = self.inner.config.open.clone() else {
            return Err(why);
        };
        // From any channel the peer was ever in with us, settled ones
        // included (they leave the client: `Limits::withdrawn_kept`).
        let Some(address) = self.inner.shared.peer_address(&peer).await else {
            return Err(Error::UnknownPeer(peer));
        };
        let me = Participant {
            address: self.inner.shared.account.address(),
            peer: self.inner.shared.wire.local_peer_id(),
        };
        let deposit = policy.deposit.max(amount);
        let proposal = ChannelProposal::payment(
            vec![me, Participant { address, peer }],
            Allocation::new(vec![asset.clone()], vec![vec![deposit, U256::ZERO]]),
            policy.challenge_duration,
        );
        crate::open::propose(&self.inner.shared, proposal)
            .instrument(info_span!("payments_open", %peer, %deposit))
            .await?;
        Ok(())
    }

    /// Pays `amount` (at most the reserved amount) to the reservation's
    /// peer on its channel; the rest is released at once. Returns once the
    /// new state is fully signed and durable here.
    ///
    /// On an error the reservation ends and the channel stays as it was:
    /// [`Error::ZeroAmount`], [`Error::ExceedsReservation`],
    /// [`Error::ForeignReservation`] (made by another `Payments`),
    /// [`Error::Phase`] (the channel is closing), or what the update
    /// failed with ([`Error::Rejected`] when the peer refuses,
    /// [`Error::Conflict`]...). Its amount is released, except when the
    /// peer's answer was lost ([`Error::Wire`], [`Error::Timeout`],
    /// [`Error::Protocol`]): the peer may have signed and may still
    /// complete the update on a later sync, so the amount stays reserved
    /// (in [`Balance::reserved`]) until the channel's state moves past the
    /// one the payment was built on (the payment completed, or any later
    /// update made it impossible) or our next proposal on the channel
    /// replaces it.
    pub async fn send(&self, reservation: Reservation, amount: U256) -> Result<Sent> {
        if !Weak::ptr_eq(&reservation.owner, &Arc::downgrade(&self.inner)) {
            return Err(Error::ForeignReservation);
        }
        if amount.is_zero() {
            return Err(Error::ZeroAmount);
        }
        if amount > reservation.amount {
            return Err(Error::ExceedsReservation {
                reserved: reservation.amount,
                requested: amount,
            });
        }
        let core = self
            .inner
            .shared
            .channel_core(&reservation.channel)
            .ok_or(Error::UnknownChannel(reservation.channel))?;
        let (asset, to) = {
            let books = lock(&self.inner.books);
            let hold = books
                .hold(reservation.id)
                .ok_or(Error::ForeignReservation)?;
            (hold.asset, 1 - core.index)
        };
        if usable(&core).is_none() {
            return Err(Error::Phase(core.phase()));
        }
        lock(&self.inner.books).sending(reservation.id, amount);
        // From here the payment runs to its end (`pay` would, a caller
        // that gives up notwithstanding), and so does its bookkeeping: the
        // hold is released, or kept in doubt, only when the update ended.
        // A payment still running keeps the layer in use, as a clone would:
        // its hold is in these books.
        let (inner, owner) = (self.inner.clone(), self.owner.clone());
        let sending = async move {
            let _owner = owner;
            Self::sent(&inner, core, reservation, to, asset, amount).await
        };
        crate::to_end::ToEnd::of_client(&self.inner.shared, sending).await
    }

    /// Pays a reservation's `amount` on its channel and settles its hold.
    async fn sent(
        inner: &Arc<Inner>,
        core: Arc<ChannelCore>,
        reservation: Reservation,
        to: usize,
        asset: usize,
        amount: U256,
    ) -> Result<Sent> {
        let channel = Channel::new(core.clone(), inner.shared.clone());
        // The hold stays until the update returned: its state is then the
        // channel's, so the balance already shows the payment.
        let paid = channel
            .pay(to, asset, amount)
            .instrument(info_span!("payment", channel = %reservation.channel, %amount))
            .await;
        let st = match paid {
            Ok(st) => st,
            Err(e) => {
                if outcome_unknown(&e) {
                    // What the failed proposal was built on, as the update
                    // left it: the state readers see may lag behind (a
                    // peer's commit not stored yet), and one read before
                    // `pay` may be older still (`propose` waits out a
                    // peer's update). No pending proposal: it cannot land
                    // any more, and the hold goes with the reservation.
                    let pending = core.locked.lock().await.pending;
                    if let Some(p) = pending {
                        warn!(channel = %reservation.channel, %amount, error = %e,
                            "payment outcome unknown; the amount stays reserved until the channel moves on");
                        lock(&inner.books).doubt(reservation.id, p.base, p.proposal);
                    }
                }
                return Err(e);
            }
        };
        drop(reservation);
        Ok(Sent {
            channel: st.state.channelId,
            version: st.state.version,
            amount,
        })
    }

    /// Releases a reservation without paying.
    pub fn cancel(&self, reservation: Reservation) {
        drop(reservation);
    }

    /// Expects `amount` of `asset` from `peer`, counted from now; `.await`
    /// the [`Expectation`]. Expectations from one peer in one asset are met
    /// in the order they were made. Any peer and asset may be expected (a
    /// buyer may open its channel after the order); one that never pays
    /// times out. Fails with [`Error::ZeroAmount`], or
    /// [`Error::AmountOverflow`] if what is expected from the peer in the
    /// asset would pass 2^256 − 1.
    ///
    /// ```no_run
    /// # async fn f(p: perun_client::payments::Payments, buyer: perun_wire::PeerId,
    /// #     eth: perun_channel::Asset) -> perun_client::Result<()> {
    /// let paid = p.expect(buyer, &eth, perun_channel::U256::from(80), std::time::Duration::from_secs(30))?;
    /// paid.await?; // or Error::NotReceived { expected, arrived }
    /// # Ok(()) }
    /// ```
    pub fn expect(
        &self,
        peer: PeerId,
        asset: &Asset,
        amount: U256,
        timeout: Duration,
    ) -> Result<Expectation> {
        // Money in a state we hold or signed already is not for this
        // expectation, even if the follower books it after (a peer's
        // commit is stored with our next write). Read before the books are
        // locked: a state signed after this read is after `expect`.
        let after = self
            .inner
            .shared
            .channel_cores()
            .into_iter()
            .filter(|c| track::carries_payments(c) && c.peers.contains(&peer))
            .map(|c| {
                let answered = c.answered.load(std::sync::atomic::Ordering::Relaxed);
                (c.id, c.state.borrow().state.version.max(answered))
            })
            .collect();
        let (id, rx) = lock(&self.inner.books).expect(peer, asset.clone(), amount, after)?;
        Ok(Expectation {
            inner: Arc::downgrade(&self.inner),
            peer,
            asset: asset.clone(),
            amount,
            id,
            timeout,
            rx: Some(rx),
        })
    }

    /// The payments that arrive from now on.
    pub fn incoming(&self) -> IncomingStream {
        IncomingStream {
            rx: self.inner.incoming.subscribe(),
        }
    }

    /// Checks the books against the channels: on every channel, for every
    /// asset, what open reservations promise (those not being sent: a
    /// payment under way may already be out of the balance) is at most our
    /// balance. Fails with
    /// [`Error::BooksOverdrawn`] naming the first channel where it is not
    /// (a payment made on the channel outside this layer can cause it).
    pub fn audit(&self) -> Result<()> {
        let mut books = lock(&self.inner.books);
        self.settle_doubts(&mut books);
        for ((channel, asset), reserved) in books.promised() {
            // A channel that left the client was withdrawn: nothing can be
            // sent on it, so what it promised overdraws nothing.
            let Some(core) = self.inner.shared.channel_core(&channel) else {
                continue;
            };
            let balance = held_by(&core.state.borrow().state.outcome, asset, core.index);
            if reserved > balance {
                return Err(Error::BooksOverdrawn {
                    channel,
                    reserved,
                    balance,
                });
            }
        }
        Ok(())
    }

    /// How many reservations are open.
    pub fn open_reservations(&self) -> usize {
        lock(&self.inner.books).open_holds()
    }

    /// How many sends with an unknown outcome still hold their amount.
    pub fn payments_in_doubt(&self) -> usize {
        let mut books = lock(&self.inner.books);
        self.settle_doubts(&mut books);
        books.doubts().len()
    }

    /// Releases the doubts that are settled: the channel left the client
    /// or is closing, its state moved past the payment's base, or the
    /// payment's proposal no longer waits for the peer's sync (checked
    /// without waiting; a busy channel keeps its doubt for now).
    fn settle_doubts(&self, books: &mut Books) {
        if books.doubts().is_empty() {
            return;
        }
        let shared = &self.inner.shared;
        books.settle_doubts(|d| {
            let Some(core) = shared.channel_core(&d.channel) else {
                return true;
            };
            if usable(&core).is_none() || core.state.borrow().state.version > d.base {
                return true;
            }
            core.locked
                .try_lock()
                .is_ok_and(|l| l.pending.is_none_or(|p| p.proposal != d.proposal))
        });
    }
}

/// Whether a failed update may still complete: the peer's answer was lost.
fn outcome_unknown(e: &Error) -> bool {
    matches!(
        e,
        Error::Wire(_) | Error::Timeout(_) | Error::Protocol { .. }
    )
}

/// What participant `who` holds of asset `asset` in `outcome` (zero if
/// the outcome has no such entry).
pub(crate) fn held_by(outcome: &Allocation, asset: usize, who: usize) -> U256 {
    outcome
        .balances
        .get(asset)
        .and_then(|r| r.get(who))
        .copied()
        .unwrap_or_default()
}

/// What `who` gains in each asset from `from` to `to` (states of one
/// channel: same assets), the assets whose balance grew only.
pub(crate) fn gains<'a>(
    from: &Allocation,
    to: &'a Allocation,
    who: usize,
) -> impl Iterator<Item = (&'a Asset, U256)> {
    to.assets.iter().enumerate().filter_map(move |(i, asset)| {
        let grows = held_by(to, i, who).saturating_sub(held_by(from, i, who));
        (!grows.is_zero()).then_some((asset, grows))
    })
}

/// The peer of a channel the payments layer may draw on: two participants,
/// no app, funded and not closing.
fn usable(core: &ChannelCore) -> Option<PeerId> {
    (core.peers.len() == 2
        && core.params.app == perun_channel::Address::ZERO
        && matches!(core.phase(), Phase::Active | Phase::Updating))
    .then(|| core.peers[1 - core.index])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests may panic on failure.

    use perun_adjudicator::SimLedger;
    use perun_wallet::LocalAccount;

    use super::*;

    /// The layer's own tasks hold its books for a moment (a follower
    /// booking a state, a reservation's drop). One that does so right as
    /// the last `Payments` goes must not keep the layer in use, nor put a
    /// handler back later over the next layer's. A CI run failed on this
    /// race (`a_channel_is_opened_when_none_covers_the_payment_if_asked`);
    /// here the task's hold is taken by hand.
    #[tokio::test]
    async fn the_last_handle_gives_the_layer_up_whoever_holds_its_books() {
        let ledger = Arc::new(SimLedger::new(1337));
        let client = Client::builder()
            .account(Arc::new(LocalAccount::random()))
            .funder(ledger.clone())
            .adjudicator(ledger)
            .build()
            .await
            .unwrap();
        let installed = || client.shared.update_handler();
        let before = installed();
        let first = Payments::new(&client).unwrap();
        let copy = first.clone();
        let booking = first.inner.clone();
        drop(first);
        assert!(
            matches!(Payments::new(&client), Err(Error::PaymentsInUse)),
            "a clone still lives"
        );
        drop(copy);
        assert!(
            Arc::ptr_eq(&installed(), &before),
            "the handler is put back"
        );
        let second = Payments::new(&client).unwrap();
        let ours = installed();
        assert!(!Arc::ptr_eq(&ours, &before));
        drop(booking);
        assert!(
            Arc::ptr_eq(&installed(), &ours),
            "the first layer's books going leave the second's handler alone"
        );
        drop(second);
        assert!(Arc::ptr_eq(&installed(), &before));
        client.shutdown().await;
    }
}
