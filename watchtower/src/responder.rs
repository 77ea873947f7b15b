//! The responder: answers disputes for the tower's users (DESIGN §12).
//!
//! It follows every `Registered` and `Concluded` event of the adjudicator
//! through a [`RegistrationFeed`] and acts through an `Arc<dyn Adjudicator>`
//! (an `EthAdjudicator`, with the client's transaction queue, or a
//! `SimLedger` in tests):
//!
//! 1. `Registered{id, nonce, ..}` → `locator = ChannelSecret{id, nonce}.locator()`,
//!    one index lookup. No appointment: nothing happens. Otherwise a durable
//!    [`Job`] is created (its appointments become `dispute_triggered`) and a
//!    task drives it.
//!    Every `Registered` is also kept until its channel concludes
//!    ([`crate::store::OpenDispute`]): an appointment stored while the
//!    dispute runs, or at the locator of a job that ended for want of a
//!    valid blob, starts the job then.
//! 2. The cursor: a [`FeedItem::Scanned`] mark is stored only after every
//!    event before it was turned into a durable job, and in one transaction
//!    with the disputes seen since the last mark, so a restart from
//!    `cursor + 1` misses no dispute (an event may come twice; jobs are keyed
//!    by channel, so that is harmless).
//! 3. A job re-reads the dispute from the chain before every decision and
//!    every transaction. It opens every appointment's blob with the
//!    channel's secret ([`scheme::open`]); a refused blob is recorded and
//!    warned about and never costs a transaction. It **refutes** only with
//!    a valid, fully signed state newer than the registered one, and after
//!    the timeout (chain time: the backend refuses to conclude early and
//!    sends nothing) **concludes**, so payouts go to the participants.
//!    `Concluded` on-chain ends the job (`resolved`).
//! 4. Before each transaction the job's phase (`Refuting{version}`,
//!    `Concluding{version}`) is committed. A restarted responder resumes
//!    every unfinished job; one whose transaction may be in flight first
//!    waits [`Config::resume_grace`] for it to show on-chain, then decides
//!    from the chain, so a refutation or conclusion the chain shows is
//!    never sent again. A refutation is not held back when the challenge
//!    period would end within the grace: a duplicate costs gas, a missed
//!    refutation the users' funds.
//!
//! Every failure (node, store) is retried with capped exponential backoff;
//! job tasks run under a supervisor that restarts them after a panic. The
//! responder ends only when told to stop.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use alloy_primitives::Address;
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, Dispute, FeedItem, RegistrationFeed, SignedChannel,
};
use perun_channel::{ChannelId, Params, SignedState, State};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::scheme::{self, ChannelSecret};
use crate::store::{Job, JobPhase, JobStart, OpenDispute, Refusal, Seen, Status, Store};
use crate::{Error, Result};

/// The responder's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often a running dispute is read again (ms). Chain time decides
    /// when a dispute can be concluded, and it can jump; so the job polls
    /// rather than sleeping until a local clock says so.
    pub poll_ms: u64,
    /// First pause after a failure (ms); it doubles up to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest pause between retries (ms).
    pub retry_max_ms: u64,
    /// After a restart, how long (ms) a job whose transaction may be in
    /// flight waits for the chain to show it before sending it again (a
    /// refutation waits only while the challenge period, by the tower's
    /// clock, outlasts the grace and two polls).
    pub resume_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_ms: 5_000,
            retry_min_ms: 500,
            retry_max_ms: 60_000,
            resume_grace_ms: 30_000,
        }
    }
}

impl Config {
    fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(1))
    }

    /// The pause before retry `attempt` (1, 2, ...): doubling from
    /// `retry_min_ms`, capped at `retry_max_ms`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let ms = self
            .retry_min_ms
            .max(1)
            .saturating_mul(1u64 << shift)
            .min(self.retry_max_ms.max(1));
        Duration::from_millis(ms)
    }
}

/// What the responder is doing, for `/health`.
#[derive(Debug, Clone)]
pub enum Health {
    /// Not started yet (or connecting to the node).
    Starting,
    /// The node cannot be reached; retrying.
    Connecting(Arc<perun_adjudicator::Error>),
    /// Scanning; the feed's last range succeeded.
    Scanning,
    /// The feed's last scan failed; it retries.
    Retrying(Arc<perun_adjudicator::Error>),
    /// Stopped (shutdown).
    Stopped,
}

impl Health {
    /// A stable name for the state.
    pub fn name(&self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Connecting(_) => "connecting",
            Health::Scanning => "ok",
            Health::Retrying(_) => "retrying",
            Health::Stopped => "stopped",
        }
    }
}

/// Counters and health of a responder, shared with the API.
#[derive(Debug)]
pub struct Stats {
    /// Disputes with at least one appointment of ours.
    pub disputes_seen: AtomicU64,
    /// Refutations the tower sent that landed.
    pub refutations: AtomicU64,
    /// Conclusions the tower sent that landed.
    pub conclusions: AtomicU64,
    /// Blobs refused when their dispute came (no transaction).
    pub bad_blobs: AtomicU64,
    /// Blobs the responder decrypted (a refused one once per job run, not
    /// at every step).
    pub blobs_opened: AtomicU64,
    /// Jobs started (or restarted) by an appointment that came while its
    /// dispute ran: not counted in `disputes_seen`.
    pub late_jobs: AtomicU64,
    /// `Registered` events not kept because the kept disputes were at
    /// [`crate::store::MAX_OPEN_DISPUTES`].
    pub disputes_not_kept: AtomicU64,
    /// Failed chain or store steps, each retried.
    pub retries: AtomicU64,
    /// Jobs running now.
    pub active_jobs: AtomicU64,
    /// The stored cursor (last scanned block).
    pub cursor: AtomicU64,
    health: Mutex<Health>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            disputes_seen: AtomicU64::new(0),
            refutations: AtomicU64::new(0),
            conclusions: AtomicU64::new(0),
            bad_blobs: AtomicU64::new(0),
            blobs_opened: AtomicU64::new(0),
            late_jobs: AtomicU64::new(0),
            disputes_not_kept: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            active_jobs: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            health: Mutex::new(Health::Starting),
        }
    }
}

impl Stats {
    /// The responder's state.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets the responder's state.
    pub fn set_health(&self, h: Health) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = h;
    }

    /// The `responder` object of `/health`.
    pub fn health_json(&self) -> serde_json::Value {
        let h = self.health();
        let error = match &h {
            Health::Connecting(e) | Health::Retrying(e) => Some(e.to_string()),
            _ => None,
        };
        serde_json::json!({
            "status": h.name(),
            "cursor": self.cursor.load(Ordering::Relaxed),
            "active_jobs": self.active_jobs.load(Ordering::Relaxed),
            "error": error,
        })
    }

    /// The responder's lines of `/metrics` (Prometheus text).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "perun_tower_disputes_seen_total",
                "Disputes with an appointment of the tower's users.",
                &self.disputes_seen,
            ),
            (
                "perun_tower_refutations_total",
                "Refutations the tower sent that landed.",
                &self.refutations,
            ),
            (
                "perun_tower_conclusions_total",
                "Conclusions the tower sent that landed.",
                &self.conclusions,
            ),
            (
                "perun_tower_bad_blobs_total",
                "Blobs refused when their dispute came (no transaction).",
                &self.bad_blobs,
            ),
            (
                "perun_tower_blobs_opened_total",
                "Blobs the responder decrypted (a refused one once per job run).",
                &self.blobs_opened,
            ),
            (
                "perun_tower_late_jobs_total",
                "Jobs started by an appointment that came while its dispute ran.",
                &self.late_jobs,
            ),
            (
                "perun_tower_disputes_not_kept_total",
                "Registered events not kept: the kept disputes were at their cap.",
                &self.disputes_not_kept,
            ),
            (
                "perun_tower_responder_retries_total",
                "Failed chain or store steps of the responder (each retried).",
                &self.retries,
            ),
        ];
        for (name, help, v) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        let gauges = [
            (
                "perun_tower_active_jobs",
                "Disputes the responder drives now.",
                self.active_jobs.load(Ordering::Relaxed),
            ),
            (
                "perun_tower_cursor_block",
                "Last block whose events are processed.",
                self.cursor.load(Ordering::Relaxed),
            ),
            (
                "perun_tower_responder_up",
                "1 while the responder's last scan succeeded.",
                u64::from(matches!(self.health(), Health::Scanning)),
            ),
        ];
        for (name, help, v) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
        out
    }
}

/// The responder. Build it with [`Responder::new`], run it with [`Responder::run`].
pub struct Responder {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    chain: Arc<dyn Adjudicator>,
    config: Config,
    stats: Arc<Stats>,
    /// The running job tasks, each with the bell that wakes it.
    jobs: Mutex<HashMap<ChannelId, Arc<Notify>>>,
    /// What the feed showed since the last cursor mark, stored with the next one.
    seen: Mutex<Seen>,
    /// The blobs refused by a job that ended with nothing to send, by
    /// channel (user → `seq`): an appointment arriving later restarts the
    /// job, which then opens only what changed, not every blob at the
    /// locator again (at most [`REFUSALS_KEPT`] channels; dropped when the
    /// channel concludes).
    refusals: Mutex<HashMap<ChannelId, HashMap<Address, u64>>>,
    stop: watch::Receiver<bool>,
}

impl Responder {
    /// A responder over `store`, acting through `chain`, reporting to `stats`.
    pub fn new(
        store: Store,
        chain: Arc<dyn Adjudicator>,
        config: Config,
        stats: Arc<Stats>,
    ) -> Self {
        let (stop_tx, stop) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                store,
                chain,
                config,
                stats,
                jobs: Mutex::new(HashMap::new()),
                seen: Mutex::new(Seen::default()),
                refusals: Mutex::new(HashMap::new()),
                stop,
            }),
            stop: stop_tx,
        }
    }

    /// Resumes every unfinished job, then follows the feed that `feed`
    /// makes from the first block not yet processed (`cursor + 1`), until
    /// `shutdown` resolves. Failures are retried; it returns only then.
    pub async fn run<F>(self, feed: F, shutdown: impl Future<Output = ()>)
    where
        F: FnOnce(u64) -> RegistrationFeed,
    {
        let Self { inner, stop } = self;
        tokio::pin!(shutdown);
        let work = async {
            let (jobs, cursor) = inner
                .retrying("resume", |s| Ok((s.unfinished_jobs()?, s.cursor()?)))
                .await;
            inner.stats.cursor.store(cursor, Ordering::Relaxed);
            for job in jobs {
                info!(channel = %job.channel, phase = ?job.phase, "resuming a dispute");
                inner.spawn_job(job.channel, true);
            }
            let mut feed = feed(cursor.saturating_add(1));
            // Up until a scan fails: a feed that is caught up sends no mark
            // until the next block.
            inner.stats.set_health(Health::Scanning);
            let scan = async {
                loop {
                    let item = feed.next().await;
                    inner.handle(item).await;
                }
            };
            // Jobs that appointments started, on their own loop: a wake-up
            // here never cancels a scan in flight.
            let late = async {
                loop {
                    for id in inner.store.started_jobs().await {
                        inner.late_job(id);
                    }
                }
            };
            tokio::join!(scan, late);
        };
        tokio::select! {
            () = work => {}
            () = &mut shutdown => {}
        }
        let _ = stop.send(true);
        inner.stats.set_health(Health::Stopped);
        info!("responder stopped");
    }
}

/// A step's verdict.
enum Next {
    /// The job is over.
    Done,
    /// Step again after this long (or when woken).
    Wait(Duration),
}

/// The appointments of a job, opened.
struct Opened {
    /// Every user with an appointment at the locator.
    users: Vec<Address>,
    /// Each appointment read, by user and `seq`: a job ends with nothing
    /// to send only if the locator still holds just these.
    read: Vec<(Address, u64)>,
    /// The channel's params and the newest valid state among them.
    best: Option<(Params, SignedState)>,
}

impl Inner {
    /// Runs a store call on the blocking pool until it succeeds (a full or
    /// failing disk must not skip an event; shutdown drops the caller).
    async fn retrying<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl Fn(&Store) -> Result<T> + Send + Sync + Clone + 'static,
    ) -> T {
        let mut attempt = 0;
        loop {
            let store = self.store.clone();
            let f = f.clone();
            let res = tokio::task::spawn_blocking(move || f(&store))
                .await
                .map_err(Error::from)
                .and_then(|r| r);
            match res {
                Ok(v) => return v,
                Err(e) => {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    let pause = self.config.backoff(attempt);
                    error!(error = %e, what, attempt, ?pause, "store failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// One store call on the blocking pool.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store)).await?
    }

    /// Processes one feed item; returns once it is durable.
    async fn handle(self: &Arc<Self>, item: FeedItem) {
        match item {
            FeedItem::Event {
                block,
                event:
                    AdjudicatorEvent::Registered {
                        id,
                        version,
                        timeout,
                        nonce,
                        state,
                    },
            } => {
                let locator = ChannelSecret {
                    channel_id: id,
                    nonce,
                }
                .locator();
                // One hash lookup in memory for the many disputes that are
                // not ours; redb only for a hit.
                let open = OpenDispute {
                    timeout,
                    channel: id,
                    version,
                    nonce,
                    registered: Some(state.clone()),
                };
                let users = if self.store.watches(&locator) {
                    self.retrying("users_for", move |s| s.users_for(locator))
                        .await
                } else {
                    Vec::new()
                };
                if users.is_empty() {
                    // Kept with the next cursor mark, which also starts the
                    // job if an appointment arrives before it.
                    self.seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .registered
                        .push(open);
                    debug!(channel = %id, version, block, "a dispute without appointments");
                    return;
                }
                let job = Job {
                    channel: id,
                    nonce,
                    locator,
                    phase: JobPhase::Triggered,
                    registered: Some(state),
                    refuted: None,
                    concluded: false,
                    refused: Vec::new(),
                };
                let open = Arc::new(open);
                let (start, kept) = self
                    .retrying("start_job", move |s| {
                        s.start_job_keeping(&job, &users, &open, unix_now())
                    })
                    .await;
                if !kept {
                    self.stats.disputes_not_kept.fetch_add(1, Ordering::Relaxed);
                    warn!(channel = %id, version, "too many running disputes to keep this one of our users; an appointment arriving after its job ended will not restart it");
                }
                if start == JobStart::New {
                    self.stats.disputes_seen.fetch_add(1, Ordering::Relaxed);
                    info!(channel = %id, version, block, "dispute on a watched channel");
                }
                self.spawn_job(id, false);
            }
            FeedItem::Event {
                event: AdjudicatorEvent::Concluded { id, .. },
                ..
            } => {
                self.seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .concluded
                    .push(id);
                self.refusals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                self.wake(id);
            }
            FeedItem::Event { .. } => {}
            FeedItem::Scanned { block } => {
                let seen = Arc::new(std::mem::take(
                    &mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner),
                ));
                let marked = self
                    .retrying("mark_scanned", move |s| {
                        s.mark_scanned(block, &seen, unix_now())
                    })
                    .await;
                for id in marked.started {
                    self.late_job(id);
                }
                if marked.not_kept > 0 {
                    self.stats
                        .disputes_not_kept
                        .fetch_add(marked.not_kept, Ordering::Relaxed);
                    warn!(
                        not_kept = marked.not_kept,
                        "too many running disputes to keep; an appointment arriving during these will not start their job"
                    );
                }
                if marked.pruned > 0 {
                    debug!(pruned = marked.pruned, "dropped disputes over for a day");
                }
                self.stats.cursor.store(block, Ordering::Relaxed);
                self.stats.set_health(Health::Scanning);
            }
            FeedItem::Reorged { from } => {
                warn!(from, "reorg: scanning again");
                // A conclusion seen since the last mark may be gone with the
                // orphaned blocks (it comes again if not); a registration
                // kept for nothing only waits for its end.
                self.seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .concluded
                    .clear();
                let to = from.saturating_sub(1);
                self.retrying("rewind_cursor", move |s| s.rewind_cursor(to))
                    .await;
            }
            FeedItem::Retrying { error, delay } => {
                warn!(%error, ?delay, "scanning the chain failed; retrying");
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.stats.set_health(Health::Retrying(Arc::new(error)));
            }
        }
    }

    /// Told to stop, or the responder's `run` is gone (dropped or aborted).
    fn is_stopped(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Starts the task of a job that an appointment started while its
    /// dispute ran.
    fn late_job(self: &Arc<Self>, id: ChannelId) {
        self.stats.late_jobs.fetch_add(1, Ordering::Relaxed);
        info!(channel = %id, "an appointment came during a dispute; acting on it");
        self.spawn_job(id, false);
    }

    fn wake(&self, id: ChannelId) {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = jobs.get(&id) {
            n.notify_one();
        }
    }

    /// Starts the job's task unless it runs (then wakes it).
    fn spawn_job(self: &Arc<Self>, id: ChannelId, resumed: bool) {
        let notify = {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = jobs.get(&id) {
                n.notify_one();
                return;
            }
            let n = Arc::new(Notify::new());
            jobs.insert(id, n.clone());
            self.stats
                .active_jobs
                .store(jobs.len() as u64, Ordering::Relaxed);
            n
        };
        let span = info_span!(parent: None, "tower_job", channel = %id);
        tokio::spawn(
            Arc::clone(self)
                .supervise(id, notify, resumed)
                .instrument(span),
        );
    }

    /// Runs a job's task, restarting it after a panic, until it is done or
    /// the responder stops.
    async fn supervise(self: Arc<Self>, id: ChannelId, notify: Arc<Notify>, mut resumed: bool) {
        let mut restarts = 0u32;
        let mut stop = self.stop.clone();
        loop {
            if self.is_stopped() {
                break;
            }
            let task = tokio::spawn(
                Arc::clone(&self)
                    .drive(id, notify.clone(), resumed)
                    .in_current_span(),
            );
            match task.await {
                Ok(()) => break,
                Err(e) => {
                    restarts += 1;
                    // What it sent is in the job: resume as after a crash.
                    resumed = true;
                    let pause = self.config.backoff(restarts);
                    error!(error = %e, restarts, ?pause, "job task failed; restarting it");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            }
        }
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            jobs.remove(&id);
            self.stats
                .active_jobs
                .store(jobs.len() as u64, Ordering::Relaxed);
        }
        // A `Registered` that reopened the job after the task's last read
        // found it still in the map and only rang its bell: look once more.
        if self.is_stopped() {
            return;
        }
        match self.store_call(move |s| s.job(id)).await {
            Ok(Some(job)) if job.phase != JobPhase::Done => self.spawn_job(id, true),
            Ok(_) => {}
            Err(e) => error!(error = %e, "cannot re-read the job after its task ended"),
        }
    }

    /// Steps the job until it is done or the responder stops.
    async fn drive(self: Arc<Self>, id: ChannelId, notify: Arc<Notify>, resumed: bool) {
        let mut stop = self.stop.clone();
        let refused_seq = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .unwrap_or_default();
        let mut state = JobRun {
            grace: None,
            resumed,
            missing: 0,
            no_refute: None,
            refused_seq,
            nothing_to_send: false,
        };
        let mut failures = 0u32;
        loop {
            if self.is_stopped() {
                return;
            }
            let wait = match self.step(id, &mut state).await {
                Ok(Next::Done) => {
                    debug!("job done");
                    if state.nothing_to_send {
                        let mut kept = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
                        // Full: one makes room (a channel nobody concluded
                        // must not hold it for good).
                        if kept.len() >= REFUSALS_KEPT
                            && let Some(any) = kept.keys().next().copied()
                        {
                            kept.remove(&any);
                        }
                        kept.insert(id, std::mem::take(&mut state.refused_seq));
                    }
                    return;
                }
                Ok(Next::Wait(d)) => {
                    failures = 0;
                    d
                }
                Err(e) => {
                    failures += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    let pause = self.config.backoff(failures);
                    warn!(error = %e, attempt = failures, ?pause, "dispute step failed; retrying");
                    pause
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = notify.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Opens every appointment at the job's locator; records refusals (once per user and reason).
    ///
    /// Anyone who knows the locator (the other participants, from the
    /// start) can put any number of blobs under it, so this is linear in
    /// them and holds one blob at a time: it runs on the blocking pool, reads
    /// and opens each blob in turn, and looks refusals up in a set.
    async fn open(&self, job: &Job, run: &mut JobRun) -> Result<Opened> {
        let locator = job.locator;
        let secret = ChannelSecret {
            channel_id: job.channel,
            nonce: job.nonce,
        };
        let known: HashSet<(Address, Refusal)> = job.refused.iter().copied().collect();
        // A blob refused before is not decrypted again while it stays (its
        // user replacing it brings a higher `seq`).
        let refused_before = run.refused_seq.clone();
        let (users, read, best, refused, newly, opened) = self
            .store_call(move |s| {
                let mut best: Option<(Params, SignedState)> = None;
                let mut refused = Vec::new();
                let mut newly = Vec::new();
                let mut read = Vec::new();
                let mut opened = 0u64;
                let users = s.each_at(locator, |user, a| {
                    read.push((user, a.seq));
                    if refused_before.get(&user) == Some(&a.seq) {
                        return Ok(());
                    }
                    opened += 1;
                    match scheme::open(&secret, &a.blob) {
                        Ok((params, signed)) => {
                            if best
                                .as_ref()
                                .is_none_or(|(_, b)| signed.state.version > b.state.version)
                            {
                                best = Some((params, signed));
                            }
                        }
                        Err(e) => match Refusal::of(&e) {
                            Some(r) if !known.contains(&(user, r)) => {
                                newly.push((user, a.seq));
                                if refused.is_empty() {
                                    warn!(%user, error = %e, "refusing an appointment's blob: no transaction for it");
                                } else {
                                    debug!(%user, error = %e, "refusing an appointment's blob");
                                }
                                refused.push((user, r));
                            }
                            Some(_) => newly.push((user, a.seq)),
                            None => return Err(e),
                        },
                    }
                    Ok(())
                })?;
                Ok((users, read, best, refused, newly, opened))
            })
            .await?;
        run.refused_seq.extend(newly);
        self.stats.blobs_opened.fetch_add(opened, Ordering::Relaxed);
        if !refused.is_empty() {
            let n = refused.len() as u64;
            if n > 1 {
                warn!(
                    refused = n,
                    "refused blobs at this locator: no transaction for them"
                );
            }
            self.store_call(move |s| {
                s.update_job(secret.channel_id, |j| j.refused.extend(refused))
            })
            .await?;
            self.stats.bad_blobs.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Opened { users, read, best })
    }

    /// One look at the chain and the step it calls for.
    async fn step(&self, id: ChannelId, run: &mut JobRun) -> Result<Next> {
        let Some(job) = self.store_call(move |s| s.job(id)).await? else {
            return Ok(Next::Done);
        };
        if job.phase == JobPhase::Done {
            return Ok(Next::Done);
        }
        let opened = self.open(&job, run).await?;
        let users = opened.users.clone();
        let d = self.chain.dispute(id).await?;
        let d = match d {
            None => {
                // The event was a hint; a reorg may have dropped the registration.
                run.missing += 1;
                if run.missing < 3 {
                    return Ok(Next::Wait(self.config.poll()));
                }
                warn!("no dispute on-chain any more; watching again");
                self.store_call(move |s| s.finish_job(id, &users, Status::BeingWatched, |_| {}))
                    .await?;
                return Ok(Next::Done);
            }
            Some(d) => d,
        };
        run.missing = 0;
        if d.concluded {
            info!(version = d.version, "the dispute is concluded");
            self.store_call(move |s| s.finish_job(id, &users, Status::Resolved, |_| {}))
                .await?;
            return Ok(Next::Done);
        }
        let Some((params, best)) = opened.best else {
            // Nothing of ours can act: no gas for this dispute.
            warn!(
                appointments = users.len(),
                "no appointment opens to a valid state; nothing to send"
            );
            // Unless an appointment came meanwhile: it joined this job,
            // which must look again (a review found it lost here).
            let read = opened.read;
            let ended = self
                .store_call(move |s| s.finish_job_unless_joined(id, &read, Status::Resolved))
                .await?;
            if !ended {
                debug!("an appointment came while the job looked; looking again");
                return Ok(Next::Wait(Duration::ZERO));
            }
            run.nothing_to_send = true;
            return Ok(Next::Done);
        };
        let version = best.state.version;
        if version > d.version && run.no_refute != Some(version) {
            if let Some(w) = run.in_flight(&job.phase, JobPhase::Refuting { version }, &self.config)
            {
                if !self.ends_within_grace(&d) {
                    debug!(
                        version,
                        "a refutation may be in flight from before the restart; waiting"
                    );
                    return Ok(Next::Wait(w));
                }
                warn!(
                    version,
                    timeout = d.timeout,
                    "the challenge period ends within the grace: refuting again now rather than wait for one that may be in flight"
                );
            }
            return self.refute(id, &d, params, best, run).await;
        }
        self.conclude(id, &job, users, &d, (params, best), run)
            .await
    }

    /// Whether the dispute's challenge period ends before a grace and two
    /// polls are over. The chain's time is taken to be the tower's clock
    /// (block timestamps follow it within seconds); a clock that runs
    /// ahead costs at most a duplicate transaction's gas, one that runs
    /// behind waits as before.
    fn ends_within_grace(&self, d: &Dispute) -> bool {
        let now = unix_now();
        let margin_ms = self
            .config
            .resume_grace_ms
            .saturating_add(self.config.poll_ms.saturating_mul(2));
        d.timeout.saturating_sub(now) <= margin_ms.div_ceil(1000)
    }

    async fn refute(
        &self,
        id: ChannelId,
        d: &Dispute,
        params: Params,
        best: SignedState,
        run: &mut JobRun,
    ) -> Result<Next> {
        let version = best.state.version;
        // Durable before the transaction: a restart asks the chain first.
        self.store_call(move |s| s.update_job(id, |j| j.phase = JobPhase::Refuting { version }))
            .await?;
        run.resumed = false;
        info!(
            registered = d.version,
            ours = version,
            "refuting a stale state"
        );
        let req = SignedChannel {
            params,
            state: best,
        };
        match self.chain.register(&req).await {
            Ok(()) => {
                self.stats.refutations.fetch_add(1, Ordering::Relaxed);
                self.store_call(move |s| s.update_job(id, |j| j.refuted = Some(version)))
                    .await?;
                info!(version, "refuted");
                // The dispute is read at the confirmation depth, the
                // transaction's checks at the latest block: until the two
                // agree, the next look would only find the old version
                // again and refute once more, so it waits a poll.
                Ok(Next::Wait(self.config.poll()))
            }
            // Someone else's refutation or conclusion landed first (another
            // tower, the user's own client): as above.
            Err(
                perun_adjudicator::Error::VersionTooLow { .. }
                | perun_adjudicator::Error::AlreadyConcluded,
            ) => Ok(Next::Wait(self.config.poll())),
            Err(e) if refused_for_good(&e) => {
                // A contract rule refuses it (too late, ...): never retried.
                warn!(error = %e, version, "refutation refused; concluding what is registered");
                run.no_refute = Some(version);
                Ok(Next::Wait(Duration::ZERO))
            }
            // Anything else (the node, an account that cannot pay the gas,
            // a revert without a reason) is tried again with backoff until
            // the challenge period ends: giving up here would conclude the
            // stale state.
            Err(e) => {
                if matches!(e, perun_adjudicator::Error::InsufficientFunds { .. }) {
                    error!(error = %e, version, "the tower's account cannot pay for a refutation; top it up");
                }
                Err(e.into())
            }
        }
    }

    async fn conclude(
        &self,
        id: ChannelId,
        job: &Job,
        users: Vec<Address>,
        d: &Dispute,
        (params, best): (Params, SignedState),
        run: &mut JobRun,
    ) -> Result<Next> {
        let registered: Option<State> = if best.state.hash() == d.state_hash {
            Some(best.state)
        } else {
            job.registered
                .as_ref()
                .filter(|r| r.hash() == d.state_hash)
                .cloned()
        };
        let Some(registered) = registered else {
            debug!(
                version = d.version,
                "the registered state's event has not come yet"
            );
            return Ok(Next::Wait(self.config.poll()));
        };
        let version = registered.version;
        let phase = JobPhase::Concluding { version };
        if let Some(w) = run.in_flight(&job.phase, phase, &self.config) {
            debug!(
                version,
                "a conclusion may be in flight from before the restart; waiting"
            );
            return Ok(Next::Wait(w));
        }
        if job.phase != phase {
            // Durable before the transaction. The backend sends nothing
            // before the timeout, so this may stand a while with nothing sent.
            self.store_call(move |s| s.update_job(id, |j| j.phase = phase))
                .await?;
        }
        run.resumed = false;
        let req = SignedChannel {
            params,
            state: SignedState::new(registered),
        };
        match self.chain.conclude(&req).await {
            Ok(()) => {
                self.stats.conclusions.fetch_add(1, Ordering::Relaxed);
                info!(version, "concluded");
                self.store_call(move |s| {
                    s.finish_job(id, &users, Status::Resolved, |j| j.concluded = true)
                })
                .await?;
                Ok(Next::Done)
            }
            // Concluded by someone else; our view of the dispute (at the
            // confirmation depth) catches up within a few polls.
            Err(perun_adjudicator::Error::AlreadyConcluded) => Ok(Next::Wait(self.config.poll())),
            Err(perun_adjudicator::Error::TimeoutNotPassed { timeout, now }) => {
                let left = Duration::from_secs(timeout.saturating_sub(now));
                debug!(timeout, now, "the challenge period runs");
                Ok(Next::Wait(
                    left.clamp(Duration::from_millis(1), self.config.poll()),
                ))
            }
            // Someone registered another state meanwhile: read again.
            Err(perun_adjudicator::Error::WrongState | perun_adjudicator::Error::NotRegistered) => {
                Ok(Next::Wait(self.config.poll()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Channels whose refused blobs the responder remembers across job runs
/// ([`Inner::refusals`]); past it a restarted job opens every blob again.
const REFUSALS_KEPT: usize = 10_000;

/// The tower's clock in unix seconds (0 if it is before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_secs())
        .unwrap_or(0)
}

/// Whether a refutation failed on a rule the chain will keep enforcing:
/// the challenge period is over, the dispute moved on to app moves, or the
/// state itself is one the adjudicator refuses. Only these end the attempt.
fn refused_for_good(e: &perun_adjudicator::Error) -> bool {
    use perun_adjudicator::Error as E;
    matches!(
        e,
        E::TimeoutPassed
            | E::AlreadyProgressed
            | E::VersionStep { .. }
            | E::Channel(_)
            | E::TooFewSignatures { .. }
            | E::BadSignature { .. }
            | E::MalformedSignature
            | E::NotParticipant(_)
            | E::WrongDomain { .. }
            | E::Dimensions
            | E::ChallengeDuration(_)
            | E::DuplicateParticipant { .. }
    )
}

/// What one run of a job's task remembers (nothing durable).
struct JobRun {
    /// Until when a transaction from before a restart may still land.
    grace: Option<Instant>,
    /// The task started from a stored phase (after a restart or a panic).
    resumed: bool,
    /// Reads in a row that found no dispute.
    missing: u32,
    /// A version the contract refused to take as a refutation.
    no_refute: Option<u64>,
    /// Each user's blob refused in this run (or by the job's last run that
    /// ended with nothing to send), by its `seq`.
    refused_seq: HashMap<Address, u64>,
    /// The run ended because no blob opened to a state it could use.
    nothing_to_send: bool,
}

impl JobRun {
    /// How long to wait before sending `next` again, if the stored phase
    /// says it may have been sent before a restart.
    fn in_flight(
        &mut self,
        stored: &JobPhase,
        next: JobPhase,
        config: &Config,
    ) -> Option<Duration> {
        if !self.resumed || *stored != next {
            return None;
        }
        let until = *self
            .grace
            .get_or_insert_with(|| Instant::now() + Duration::from_millis(config.resume_grace_ms));
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.resumed = false;
            None
        } else {
            Some(left.min(config.poll()))
        }
    }
}
