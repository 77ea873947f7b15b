//! The client side of the watchtowers (DESIGN §12, client policy): each
//! funded channel gets a supervised background task that keeps every
//! configured tower holding an appointment for its latest fully signed
//! state.
//!
//! The update path never waits for a tower: the task follows the
//! channel's published state, so a slow or down tower only delays its own
//! receipt. One round seals the latest state once (a fresh AEAD nonce),
//! signs it under a new sequence number, which is stored before it is
//! sent (so it grows across restarts), and sends it to every tower whose
//! receipt is older. Each receipt is checked (the tower's key, this
//! locator and this user signature) and stored in the channel's record
//! before it counts ([`Channel::tower_status`](crate::Channel::tower_status)).
//! A failed tower is tried again after the client's backoff
//! ([`Timeouts::backoff`](crate::Timeouts::backoff)), with a
//! [`ChannelEvent::TowerFailed`] for each failure.

mod renew;

pub(crate) use renew::spawn as spawn_renewals;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use perun_channel::{Address, ChannelId, Phase, SignedState};
use perun_persistence::tower::MAX_TOWERS;
use perun_persistence::{Change, TowerReceipt, TowerRecord};
use perun_wallet::Account;
use perun_watchtower::client::{Appointment, TowerClient};
use perun_watchtower::{Receipt, Subscription};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

use crate::core::{ChannelCore, Shared, lock};
use crate::event::ChannelEvent;
use crate::{Error, Result};

/// A tower the client keeps appointments with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TowerConfig {
    /// Its API, `http://host:port`.
    pub url: String,
    /// Its Ethereum address: every subscription and receipt it returns
    /// must be signed by this key.
    pub address: Address,
    /// The timeout of one call to it.
    pub timeout: Duration,
}

impl TowerConfig {
    /// The tower at `url` signing with `address`, with a 10 s timeout per call.
    pub fn new(url: impl Into<String>, address: Address) -> Self {
        Self {
            url: url.into(),
            address,
            timeout: perun_watchtower::client::DEFAULT_TIMEOUT,
        }
    }
}

/// When the client sends a channel's latest state to its towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppointmentPolicy {
    /// After every update (the tower always holds the latest state; it
    /// sees how often the channel updates).
    #[default]
    EveryUpdate,
    /// At most once per period per channel, with the latest state then
    /// (and always at [`Client::shutdown`](crate::Client::shutdown)): fewer
    /// requests, and the tower learns less of the update rate. A state
    /// newer than the tower's is at risk until the next send.
    AtMost(Duration),
}

/// What one tower holds for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TowerStatus {
    /// The tower's address.
    pub tower: Address,
    /// The state version its stored receipt covers (`None`: no receipt yet).
    pub version: Option<u64>,
    /// Whether that is the channel's latest fully signed state.
    pub latest: bool,
    /// The stored receipt, checked when it arrived: with [`blob`](Self::blob),
    /// the user's proof that the tower took the job.
    pub receipt: Option<TowerReceipt>,
    /// The sealed blob the receipt covers (the user's signature in the
    /// receipt is over it; it opens to the covered state with the channel's
    /// secret, `perun_watchtower::open`). `None` if it did not fit the
    /// channel's record (very large channels).
    pub blob: Option<Vec<u8>>,
    /// The channel's own identity at the towers (the receipt's user
    /// signature recovers to it; the client's account never shows), once
    /// an appointment was made.
    pub user: Option<Address>,
}

/// Renew a subscription when this much of it is left (or a quarter of its
/// length, if that is less): a client offline for weeks around that time
/// still renews before the tower drops its appointments
/// (`reclaim_after_secs` past the expiry).
const RENEW_MARGIN_SECS: u64 = 30 * 24 * 60 * 60;
/// Appointment rounds (one per channel, to every lagging tower) at once.
const ROUNDS_AT_ONCE: usize = 32;
/// How long [`Towers::flush`] waits at most.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Codes after which registering again may help.
fn needs_registration(e: &perun_watchtower::Error) -> bool {
    matches!(e, perun_watchtower::Error::Refused { code, .. }
        if matches!(code.as_str(), "unknown_user" | "subscription_expired" | "no_free_slot"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The least time between two registrations of one identity before a
/// send, whatever the subscription says (a tower whose expiry is past by
/// our clock must not cost a registration per appointment).
const REREGISTER_GAP_SECS: u64 = 5;

/// A subscription as the client last saw it.
#[derive(Debug, Clone, Copy)]
struct Held {
    sub: Subscription,
    /// Its length (expiry minus the time a registration answered), in
    /// seconds; after a start, the time it had left when first read.
    span: u64,
    /// When it arrived (unix seconds).
    received: u64,
}

/// The longest time between two looks at a subscription (a read at the
/// tower): a tower that lost its store is found within it.
const CHECK_EVERY_SECS: u64 = 60 * 60;

impl Held {
    /// What a registration answered.
    fn new(sub: Subscription) -> Self {
        let now = unix_now();
        Self {
            sub,
            span: sub.expiry.saturating_sub(now),
            received: now,
        }
    }

    /// What a read answered: the length stays what it was known to be (the
    /// time left shrinks with every read, and renewal would never come).
    fn read(sub: Subscription, before: Option<&Held>) -> Self {
        let mut h = Self::new(sub);
        h.span = before.map_or(h.span, |b| b.span.max(h.span));
        h
    }

    /// When to renew it (unix seconds).
    fn renew_at(&self) -> u64 {
        let margin = RENEW_MARGIN_SECS.min(self.span / 4);
        self.sub.expiry.saturating_sub(margin)
    }

    /// When to look at it again (unix seconds): hourly, or 8 times per
    /// length for short subscriptions.
    fn check_at(&self) -> u64 {
        let every = CHECK_EVERY_SECS.min(self.span / 8).max(1);
        self.received.saturating_add(every)
    }

    /// When to look at it next: a check or a renewal, whichever is first.
    fn due_at(&self) -> u64 {
        self.renew_at().min(self.check_at())
    }

    /// Good for a send without registering first.
    fn fresh(&self) -> bool {
        self.sub.slots_used < self.sub.slots_total
            && (unix_now() < self.renew_at()
                || unix_now() < self.received.saturating_add(REREGISTER_GAP_SECS))
    }
}

/// One tower: its client and the subscription of each channel's identity
/// with it.
#[derive(Debug)]
struct Link {
    client: TowerClient,
    subs: tokio::sync::Mutex<HashMap<Address, Held>>,
    /// Wakes the renewal task: a subscription changed.
    renewals: Arc<tokio::sync::Notify>,
}

impl Link {
    /// Registers (or renews) `user` unless a subscription with time and
    /// slots left is known; wakes the renewal task with the news.
    async fn ensure_registered(
        &self,
        user: &dyn Account,
        force: bool,
    ) -> Result<(), perun_watchtower::Error> {
        let known = self.subs.lock().await.get(&user.address()).copied();
        if !force && known.is_some_and(|h| h.fresh()) {
            return Ok(());
        }
        self.register(user).await?;
        self.renewals.notify_one();
        Ok(())
    }

    /// Registers (or renews) `user` and keeps what the tower answered.
    async fn register(&self, user: &dyn Account) -> Result<Held, perun_watchtower::Error> {
        // Not under the lock: every channel's identity registers on its
        // own, and a tower that hangs must not queue them all behind one
        // call (two registrations of one identity at once only renew it).
        let held = Held::new(self.client.register(user).await?);
        self.subs.lock().await.insert(user.address(), held);
        debug!(tower = %self.client.tower(), user = %user.address(), "registered with tower");
        Ok(held)
    }

    /// Forgets `user`'s subscription (its channel is withdrawn).
    async fn forget(&self, user: Address) {
        self.subs.lock().await.remove(&user);
    }

    async fn send(
        &self,
        user: &dyn Account,
        a: &Appointment,
    ) -> Result<Receipt, perun_watchtower::Error> {
        self.ensure_registered(user, false).await?;
        match self.client.add_appointment(a).await {
            Err(e) if needs_registration(&e) => {
                // Expired, out of slots, or the tower lost us: renew, try once more.
                self.ensure_registered(user, true).await?;
                self.client.add_appointment(a).await
            }
            r => r,
        }
    }
}

/// How long a round waits for the other towers once one has given a
/// receipt: a tower that hangs (until the client's timeout) must not hold
/// the others' next appointment back. A tower cut off is retried with its
/// backoff.
const LAGGARD_WAIT: Duration = Duration::from_millis(500);

/// Runs one round's calls, and returns every answer that came by
/// [`LAGGARD_WAIT`] after the first receipt; the calls still running then
/// are dropped and count as timed out.
async fn answers_without_laggards<F>(
    sends: impl IntoIterator<Item = F>,
    due: &[usize],
) -> Vec<(usize, Result<Receipt, perun_watchtower::Error>)>
where
    F: std::future::Future<Output = (usize, Result<Receipt, perun_watchtower::Error>)>,
{
    use futures::StreamExt;
    let mut running: futures::stream::FuturesUnordered<F> = sends.into_iter().collect();
    let mut results = Vec::with_capacity(due.len());
    let mut cutoff: Option<tokio::time::Instant> = None;
    loop {
        let next = match cutoff {
            None => running.next().await,
            Some(at) => match tokio::time::timeout_at(at, running.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        let Some(answer) = next else {
            return results;
        };
        // Only a receipt starts the clock: a tower that is down fails in
        // microseconds, and must not cut a slow good one off every round.
        if answer.1.is_ok() {
            cutoff.get_or_insert_with(|| tokio::time::Instant::now() + LAGGARD_WAIT);
        }
        results.push(answer);
    }
    drop(running);
    let answered: HashSet<usize> = results.iter().map(|(i, _)| *i).collect();
    for &i in due.iter().filter(|i| !answered.contains(i)) {
        results.push((
            i,
            Err(perun_watchtower::Error::Timeout {
                what: "an appointment (another tower had answered)",
                after: LAGGARD_WAIT,
            }),
        ));
    }
    results
}

/// The towers of one client and the per-channel records.
pub(crate) struct Towers {
    links: Vec<Link>,
    policy: AppointmentPolicy,
    channels: Mutex<HashMap<ChannelId, Arc<Entry>>>,
    /// Bumped by [`Towers::flush`]: every channel sends at once.
    flush: watch::Sender<u64>,
    /// Appointment rounds running at once, over all channels.
    permits: tokio::sync::Semaphore,
    /// Wakes the renewal task ([`renew`]).
    renewals: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Towers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Towers")
            .field("towers", &self.links.len())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// One channel's tower record and its worker's progress.
#[derive(Debug)]
struct Entry {
    record: Mutex<TowerRecord>,
    /// Its worker was started.
    started: std::sync::atomic::AtomicBool,
    /// The last flush generation the worker has served.
    flushed: watch::Sender<u64>,
    /// Wakes the worker: a tower lost its receipt ([`renew`]).
    wake: tokio::sync::Notify,
    /// The record changed outside the worker (a receipt dropped): the
    /// worker stores it.
    unsaved: std::sync::atomic::AtomicBool,
}

impl Towers {
    /// Checks every config (the URL) before anything starts.
    pub(crate) fn new(configs: Vec<TowerConfig>, policy: AppointmentPolicy) -> Result<Self> {
        if configs.len() > MAX_TOWERS {
            return Err(Error::TowerConfig {
                tower: configs[MAX_TOWERS].address,
                reason: "more towers than a channel record keeps receipts of (32)",
            });
        }
        for (i, c) in configs.iter().enumerate() {
            if configs[..i].iter().any(|d| d.address == c.address) {
                return Err(Error::TowerConfig {
                    tower: c.address,
                    reason: "configured twice",
                });
            }
        }
        let renewals = Arc::new(tokio::sync::Notify::new());
        let links = configs
            .into_iter()
            .map(|c| {
                let client = TowerClient::new(&c.url, c.address)
                    .map_err(|source| Error::Tower {
                        tower: c.address,
                        source: Arc::new(source),
                    })?
                    .with_timeout(c.timeout);
                Ok(Link {
                    client,
                    subs: tokio::sync::Mutex::new(HashMap::new()),
                    renewals: renewals.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            links,
            policy,
            channels: Mutex::new(HashMap::new()),
            flush: watch::channel(0).0,
            permits: tokio::sync::Semaphore::new(ROUNDS_AT_ONCE),
            renewals,
        })
    }

    fn entry(&self, id: ChannelId, record: impl FnOnce() -> TowerRecord) -> Arc<Entry> {
        lock(&self.channels)
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Entry {
                    record: Mutex::new(record()),
                    started: std::sync::atomic::AtomicBool::new(false),
                    flushed: watch::channel(*self.flush.borrow()).0,
                    wake: tokio::sync::Notify::new(),
                    unsaved: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Takes a restored channel's stored record (its `metadata`), so its
    /// receipts show at once and its counter goes on from where it was.
    pub(crate) fn restore(&self, id: ChannelId, metadata: &[u8]) {
        self.entry(id, || match TowerRecord::decode(id, metadata) {
            Ok(r) => r,
            // The counter is lost: restart it from the clock, far above any
            // count this channel could have reached.
            Err(e) => {
                error!(channel = %id, error = %e, "stored tower record does not decode; starting a new one");
                TowerRecord {
                    seq: unix_now().saturating_mul(1 << 20),
                    ..TowerRecord::default()
                }
            }
        });
    }

    /// What each tower holds for `core`'s channel.
    pub(crate) fn status(&self, core: &ChannelCore) -> Vec<TowerStatus> {
        let entry = lock(&self.channels).get(&core.id).cloned();
        let record = entry.map(|e| lock(&e.record).clone()).unwrap_or_default();
        let latest = core.state.borrow().state.version;
        let user = identity_address(&record);
        self.links
            .iter()
            .map(|l| {
                let receipt = record.receipt(l.client.tower()).cloned();
                let version = receipt.as_ref().map(|r| r.version);
                let blob = receipt
                    .as_ref()
                    .and_then(|r| record.blob(r.seq))
                    .map(<[u8]>::to_vec);
                TowerStatus {
                    tower: l.client.tower(),
                    version,
                    latest: version == Some(latest),
                    receipt,
                    blob,
                    user,
                }
            })
            .collect()
    }

    /// Makes every channel send its latest state now and waits (at most
    /// `timeout`) until each has had one round: before shutdown, so a
    /// policy of [`AppointmentPolicy::AtMost`] loses no state.
    pub(crate) async fn flush(&self, timeout: Duration) {
        let mut generation = 0;
        self.flush.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        // Only channels with a worker: a restored record whose channel did
        // not start (damaged) has nobody to answer.
        let entries: Vec<_> = lock(&self.channels)
            .values()
            .filter(|e| e.started.load(std::sync::atomic::Ordering::SeqCst))
            .cloned()
            .collect();
        let all = futures::future::join_all(entries.iter().map(|e| {
            let mut rx = e.flushed.subscribe();
            async move {
                let _ = rx.wait_for(|g| *g >= generation).await;
            }
        }));
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("not every channel reached its towers before shutdown");
        }
    }
}

/// The address of the channel's tower identity, once it has one.
fn identity_address(record: &TowerRecord) -> Option<Address> {
    record
        .identity
        .and_then(|k| perun_wallet::LocalAccount::from_bytes(&k).ok())
        .map(|a| a.address())
}

/// Starts `core`'s tower worker, unless the client has no towers or one runs.
pub(crate) fn spawn(shared: &Arc<Shared>, core: &Arc<ChannelCore>) {
    let Some(towers) = shared.towers.clone() else {
        return;
    };
    let entry = towers.entry(core.id, TowerRecord::default);
    if entry
        .started
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let backoff = vec![Backoff::default(); towers.links.len()];
    let worker = Worker {
        shared: shared.clone(),
        towers,
        core: core.clone(),
        entry,
        backoff,
        last_sent: None,
    };
    let span = info_span!(parent: None, "towers", channel = %core.id);
    tokio::spawn(supervise(worker).instrument(span));
}

/// Runs the worker, restarting it after a panic, until the channel is
/// withdrawn or the client stops.
async fn supervise(mut w: Worker) {
    let mut restarts = 0u32;
    loop {
        let shared = w.shared.clone();
        let run = std::panic::AssertUnwindSafe(w.run()).catch_unwind();
        tokio::select! {
            res = run => match res {
                Ok(()) => break,
                Err(_) => {
                    restarts += 1;
                    let pause = shared.timeouts.backoff(restarts);
                    error!(restarts, ?pause, "tower worker panicked; restarting it");
                    w.core.emit(ChannelEvent::WatcherRestarted {
                        error: Arc::new(Error::TowerTaskPanicked),
                    });
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shared.stopping() => break,
                    }
                }
            },
            () = shared.stopping() => break,
        }
    }
    // A withdrawn channel needs no tower; a stopped client's channels keep
    // their status readable.
    if w.core.phase() == Phase::Withdrawn {
        lock(&w.towers.channels).remove(&w.core.id);
        let user = identity_address(&lock(&w.entry.record));
        if let Some(user) = user {
            for l in &w.towers.links {
                l.forget(user).await;
            }
        }
    }
    // Nobody waits on a worker that is gone.
    w.entry.flushed.send_replace(u64::MAX);
    debug!("tower worker ended");
}

/// One tower's retry state in a worker.
#[derive(Debug, Clone, Copy, Default)]
struct Backoff {
    failures: u32,
    next_try: Option<Instant>,
}

struct Worker {
    shared: Arc<Shared>,
    towers: Arc<Towers>,
    core: Arc<ChannelCore>,
    entry: Arc<Entry>,
    backoff: Vec<Backoff>,
    last_sent: Option<Instant>,
}

impl Worker {
    async fn run(&mut self) {
        let mut state_rx = self.core.state.subscribe();
        let mut phase_rx = self.core.phase_changes();
        let mut flush_rx = self.towers.flush.subscribe();
        loop {
            if self.shared.stopped() || self.core.phase() == Phase::Withdrawn {
                return;
            }
            if self
                .entry
                .unsaved
                .swap(false, std::sync::atomic::Ordering::SeqCst)
                && let Err(e) = self.save().await
            {
                // The next round stores it with its receipts; a restart
                // finds the tower's loss again at once.
                warn!(error = %e, "could not store a dropped tower receipt");
            }
            let latest = state_rx.borrow_and_update().clone();
            let flush = *flush_rx.borrow_and_update();
            let flushing = flush > *self.entry.flushed.borrow();
            let now = Instant::now();
            let lagging = self.lagging(&latest);
            let due: Vec<usize> = lagging
                .iter()
                .copied()
                .filter(|&i| flushing || self.backoff[i].next_try.is_none_or(|t| t <= now))
                .collect();
            let mut wake = lagging
                .iter()
                .filter_map(|&i| self.backoff[i].next_try)
                .filter(|t| *t > now)
                .min();
            let gate = match self.towers.policy {
                AppointmentPolicy::EveryUpdate => None,
                AppointmentPolicy::AtMost(period) => self
                    .last_sent
                    .map(|l| l + period)
                    .filter(|g| *g > now && !flushing),
            };
            if !due.is_empty() {
                match gate {
                    Some(g) => wake = Some(wake.map_or(g, |w| w.min(g))),
                    None => {
                        self.round(&latest, &due).await;
                        self.last_sent = Some(Instant::now());
                        if flushing {
                            self.entry.flushed.send_replace(flush);
                        }
                        continue;
                    }
                }
            } else if flushing {
                self.entry.flushed.send_replace(flush);
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = state_rx.changed() => if r.is_err() { return },
                r = phase_rx.changed() => if r.is_err() { return },
                r = flush_rx.changed() => if r.is_err() { return },
                () = self.entry.wake.notified() => {}
                () = sleep => {}
                () = self.shared.stopping() => return,
            }
        }
    }

    /// Towers whose receipt covers an older state than `latest`. Version 0
    /// needs no tower (no state can be older; whoever concludes it pays
    /// everyone), and leaving it out keeps the first appointment from
    /// following the on-chain funding in time.
    fn lagging(&self, latest: &SignedState) -> Vec<usize> {
        if !latest.is_fully_signed() || latest.state.version == 0 {
            return Vec::new();
        }
        let record = lock(&self.entry.record);
        let version = latest.state.version;
        self.towers
            .links
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                record
                    .receipt(l.client.tower())
                    .is_none_or(|r| r.version < version)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Stores the record in the channel's metadata.
    async fn save(&self) -> Result<()> {
        let bytes = lock(&self.entry.record).encode()?;
        self.shared
            .persister
            .update(self.core.id, vec![Change::Metadata(bytes)])
            .await?;
        Ok(())
    }

    /// One appointment, sent to the towers `due`.
    async fn round(&mut self, latest: &SignedState, due: &[usize]) {
        let version = latest.state.version;
        let (seq, identity) = {
            let mut r = lock(&self.entry.record);
            r.seq += 1;
            let key = *r
                .identity
                .get_or_insert_with(|| perun_wallet::LocalAccount::random().secret_bytes());
            (r.seq, key)
        };
        let user = match perun_wallet::LocalAccount::from_bytes(&identity) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                let e = Arc::new(Error::Wallet(e));
                for &i in due {
                    self.failed(i, version, e.clone());
                }
                return;
            }
        };
        // The sequence number and the identity are durable before any tower
        // sees them.
        if let Err(e) = self.save().await {
            let e = Arc::new(e);
            for &i in due {
                self.failed(i, version, e.clone());
            }
            return;
        }
        let appointment = match Appointment::new(&self.core.params, latest, seq, user.as_ref()) {
            Ok(a) => a,
            Err(e) => {
                // Sealing or signing failed (a state over the blob limit, a
                // wallet error): every tower misses this version.
                let source = Arc::new(e);
                for &i in due {
                    let tower = self.towers.links[i].client.tower();
                    let error = Error::Tower {
                        tower,
                        source: source.clone(),
                    };
                    self.failed(i, version, Arc::new(error));
                }
                return;
            }
        };
        // Bounds the calls of all channels together (a restart with
        // thousands of lagging channels must not open thousands of sockets).
        let towers = self.towers.clone();
        let Ok(_permit) = towers.permits.acquire().await else {
            return;
        };
        let sends = due.iter().map(|&i| {
            let (link, a, user) = (&self.towers.links[i], &appointment, user.as_ref());
            async move { (i, link.send(user, a).await) }
        });
        let results = answers_without_laggards(sends, due).await;
        // What the record held before: restored if the new receipts cannot be
        // stored (an older receipt that is durable still counts).
        let before = lock(&self.entry.record).clone();
        let current = |a: &Address| towers.links.iter().any(|l| l.client.tower() == *a);
        let mut stored = Vec::new();
        let mut refused = Vec::new();
        for (i, res) in results {
            let tower = self.towers.links[i].client.tower();
            match res {
                Ok(r) => {
                    let receipt = TowerReceipt {
                        tower,
                        version,
                        seq,
                        locator: r.locator,
                        start_block: r.start_block,
                        user_signature: r.user_signature,
                        tower_signature: r.tower_signature,
                    };
                    if lock(&self.entry.record).put(receipt, current) {
                        self.backoff[i] = Backoff::default();
                        stored.push(tower);
                    } else {
                        // Never expected (a newer receipt of ours is stored,
                        // or no room); backed off, so a round cannot spin.
                        refused.push(i);
                    }
                }
                Err(e) => self.failed(
                    i,
                    version,
                    Arc::new(Error::Tower {
                        tower,
                        source: Arc::new(e),
                    }),
                ),
            }
        }
        for i in refused {
            let tower = self.towers.links[i].client.tower();
            let error = Error::TowerConfig {
                tower,
                reason: "its receipt was not kept (a newer one is stored, or no room)",
            };
            self.failed(i, version, Arc::new(error));
        }
        if stored.is_empty() {
            return;
        }
        // The blob the new receipts cover, stored with them (evidence).
        lock(&self.entry.record).keep_blob(seq, &appointment.blob);
        match self.save().await {
            Ok(()) => {
                for tower in stored {
                    debug!(%tower, version, seq, "tower receipt stored");
                    self.core
                        .emit(ChannelEvent::TowerReceipt { tower, version });
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                warn!(error = %e, "could not store tower receipts; sending again");
                // Not durable: the new receipts go back to the stored ones
                // (keeping the new `seq`, which is durable), so the next
                // round sends again. Only theirs: a receipt the renewal task
                // dropped meanwhile (its tower lost the appointment) stays
                // dropped.
                {
                    let mut r = lock(&self.entry.record);
                    r.receipts.retain(|x| !stored.contains(&x.tower));
                    r.receipts.extend(
                        before
                            .receipts
                            .into_iter()
                            .filter(|x| stored.contains(&x.tower)),
                    );
                    r.blobs = before.blobs;
                }
                let towers = self.towers.clone();
                for (i, l) in towers.links.iter().enumerate() {
                    if stored.contains(&l.client.tower()) {
                        self.failed(i, version, e.clone());
                    }
                }
            }
        }
    }

    fn failed(&mut self, i: usize, version: u64, error: Arc<Error>) {
        let b = &mut self.backoff[i];
        b.failures = b.failures.saturating_add(1);
        let delay = self.shared.timeouts.backoff(b.failures);
        b.next_try = Some(Instant::now() + delay);
        let tower = self.towers.links[i].client.tower();
        warn!(%tower, version, attempt = b.failures, ?delay, error = %error, "tower appointment failed");
        self.core.emit(ChannelEvent::TowerFailed {
            tower,
            version,
            attempt: b.failures,
            delay,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_refused_at_build() {
        let a = Address::repeat_byte(1);
        let ok = TowerConfig::new("http://127.0.0.1:1", a);
        assert!(Towers::new(vec![ok.clone()], AppointmentPolicy::default()).is_ok());
        let twice = Towers::new(vec![ok.clone(), ok.clone()], AppointmentPolicy::default());
        assert!(matches!(twice, Err(Error::TowerConfig { tower, .. }) if tower == a));
        let many = (0..=MAX_TOWERS as u8)
            .map(|i| TowerConfig::new("http://127.0.0.1:1", Address::repeat_byte(i)))
            .collect();
        assert!(matches!(
            Towers::new(many, AppointmentPolicy::default()),
            Err(Error::TowerConfig { .. })
        ));
        let url = Towers::new(
            vec![TowerConfig::new("https://tower", a)],
            AppointmentPolicy::default(),
        );
        assert!(
            matches!(&url, Err(Error::Tower { source, .. })
                if matches!(**source, perun_watchtower::Error::Url { .. })),
            "{url:?}"
        );
    }
}
