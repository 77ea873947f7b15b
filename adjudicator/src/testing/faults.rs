//! [`FaultyChain`]: any backend with seeded faults on its calls and event
//! streams, for chaos tests of what drives it (the client, a watcher).
//!
//! Calls and streams are numbered in the order they reach the wrapper; the
//! fault plan of call `n` is [`FaultConfig::call_plan`]`(n)` and that of the
//! `k`-th event of the stream opened by call `n` is
//! [`FaultConfig::event_plan`]`(n, k)`. Sequential callers therefore replay
//! the same faults for the same seed; concurrent callers can reach the shared
//! counter in another order from run to run.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use perun_channel::ChannelId;
use tracing::debug;

use super::schedule::{delay, draw, hits};
use crate::{
    Adjudicator, Dispute, Error, EventStream, Funder, FundingRequest, ProgressRequest, Result,
    RpcFailure, SignedChannel, WithdrawRequest,
};

mod stream;

/// Fault rates of a [`FaultyChain`]; each rate is a probability in
/// `0.0..=1.0` (values outside act as the nearest bound).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Seeds the schedule: the same seed gives the same plan.
    pub seed: u64,
    /// A call fails with [`RpcFailure::Injected`] before reaching the backend
    /// (nothing happened). Pre-empts the other call faults.
    pub fail_before: f64,
    /// A call reaches the backend and takes effect, but the caller gets
    /// [`RpcFailure::Injected`] (a lost answer or receipt).
    pub fail_after: f64,
    /// A call waits up to [`max_delay`](Self::max_delay) before reaching the backend.
    pub delay: f64,
    /// The longest injected delay, of a call or an event.
    pub max_delay: Duration,
    /// A call runs twice on the backend (a resent request); the caller gets
    /// the first result.
    pub duplicate: f64,
    /// An event is lost (a missed log).
    pub event_drop: f64,
    /// An event is delivered twice.
    pub event_duplicate: f64,
    /// An event is held back and delivered after the next one.
    pub event_reorder: f64,
    /// An event is delivered after a delay of up to `max_delay` (later
    /// events of the stream wait behind it).
    pub event_delay: f64,
    /// Instead of an event the stream yields an injected
    /// [`Error::Rpc`] and ends, as when a backend's scanner fails.
    pub stream_end: f64,
}

impl FaultConfig {
    /// No faults: the wrapper is transparent.
    pub fn none(seed: u64) -> Self {
        Self {
            seed,
            fail_before: 0.0,
            fail_after: 0.0,
            delay: 0.0,
            max_delay: Duration::ZERO,
            duplicate: 0.0,
            event_drop: 0.0,
            event_duplicate: 0.0,
            event_reorder: 0.0,
            event_delay: 0.0,
            stream_end: 0.0,
        }
    }

    /// A flaky node, for chaos runs: 10 % of calls fail before and 5 % after
    /// taking effect, 20 % wait up to 100 ms, 5 % run twice; of the events,
    /// 5 % are lost, 5 % repeated, 5 % reordered, 10 % delayed, and 2 % end
    /// their stream. Every rule still holds; only the answers suffer.
    pub fn chaos(seed: u64) -> Self {
        Self {
            seed,
            fail_before: 0.10,
            fail_after: 0.05,
            delay: 0.20,
            max_delay: Duration::from_millis(100),
            duplicate: 0.05,
            event_drop: 0.05,
            event_duplicate: 0.05,
            event_reorder: 0.05,
            event_delay: 0.10,
            stream_end: 0.02,
        }
    }

    /// What the schedule does to call `n` (0-based, over all calls of the
    /// wrapper and its clones). Each fault is its own draw; `fail_before`
    /// pre-empts the rest.
    pub fn call_plan(&self, n: u64) -> CallPlan {
        let d = |kind: u64| draw(self.seed, &[CALLS, n, kind]);
        if hits(self.fail_before, d(0)) {
            return CallPlan {
                fail_before: true,
                ..CallPlan::default()
            };
        }
        CallPlan {
            fail_before: false,
            fail_after: hits(self.fail_after, d(1)),
            delay: hits(self.delay, d(2)).then(|| delay(self.max_delay, d(3))),
            duplicate: hits(self.duplicate, d(4)),
        }
    }

    /// What the schedule does to event `k` (0-based) of the stream opened by
    /// call `stream`. One draw picks at most one fault, so each happens at
    /// exactly its rate while the event rates sum to at most 1 (later kinds
    /// in the order end, drop, duplicate, reorder, delay get the rest).
    pub fn event_plan(&self, stream: u64, k: u64) -> EventPlan {
        let mut u = draw(self.seed, &[EVENTS, stream, k]);
        for (rate, plan) in [
            (self.stream_end, EventPlan::End),
            (self.event_drop, EventPlan::Drop),
            (self.event_duplicate, EventPlan::Duplicate),
            (self.event_reorder, EventPlan::Reorder),
        ] {
            if hits(rate, u) {
                return plan;
            }
            u -= rate.max(0.0);
        }
        if hits(self.event_delay, u) {
            let wait = delay(self.max_delay, draw(self.seed, &[EVENTS, stream, k, 1]));
            return EventPlan::Delay(wait);
        }
        EventPlan::Deliver
    }
}

/// Schedule lanes, so call and event draws never coincide.
const CALLS: u64 = 1;
const EVENTS: u64 = 2;

/// The faults planned for one call ([`FaultConfig::call_plan`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallPlan {
    /// Fail without calling the backend.
    pub fail_before: bool,
    /// Call the backend, then fail.
    pub fail_after: bool,
    /// Wait this long before calling.
    pub delay: Option<Duration>,
    /// Call the backend twice.
    pub duplicate: bool,
}

/// The fault planned for one event ([`FaultConfig::event_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPlan {
    /// Deliver it as it is.
    Deliver,
    /// Lose it.
    Drop,
    /// Deliver it twice.
    Duplicate,
    /// Deliver it after the next event.
    Reorder,
    /// Deliver it after this long.
    Delay(Duration),
    /// End the stream with an injected error instead.
    End,
}

/// How many faults a [`FaultyChain`] injected, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Calls made (faulty or not).
    pub calls: u64,
    /// Calls failed before reaching the backend.
    pub failed_before: u64,
    /// Calls failed after taking effect.
    pub failed_after: u64,
    /// Calls delayed.
    pub delayed: u64,
    /// Calls run twice.
    pub duplicated: u64,
    /// Events the backend's streams delivered to the wrapper.
    pub events: u64,
    /// Events lost.
    pub events_dropped: u64,
    /// Events delivered twice.
    pub events_duplicated: u64,
    /// Events delivered after the one behind them.
    pub events_reordered: u64,
    /// Events delayed.
    pub events_delayed: u64,
    /// Streams ended by an injected error.
    pub streams_ended: u64,
}

impl FaultStats {
    /// All injected faults together.
    pub fn faults_injected(&self) -> u64 {
        self.failed_before
            + self.failed_after
            + self.delayed
            + self.duplicated
            + self.events_dropped
            + self.events_duplicated
            + self.events_reordered
            + self.events_delayed
            + self.streams_ended
    }
}

impl fmt::Display for FaultStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} faults in {} calls and {} events: failed before {}, failed after {}, \
             delayed {}, duplicated {}; events dropped {}, duplicated {}, reordered {}, \
             delayed {}; streams ended {}",
            self.faults_injected(),
            self.calls,
            self.events,
            self.failed_before,
            self.failed_after,
            self.delayed,
            self.duplicated,
            self.events_dropped,
            self.events_duplicated,
            self.events_reordered,
            self.events_delayed,
            self.streams_ended,
        )
    }
}

/// The live counters behind [`FaultStats`].
#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    failed_before: AtomicU64,
    failed_after: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    events: AtomicU64,
    events_dropped: AtomicU64,
    events_duplicated: AtomicU64,
    events_reordered: AtomicU64,
    events_delayed: AtomicU64,
    streams_ended: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> FaultStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            calls: get(&self.calls),
            failed_before: get(&self.failed_before),
            failed_after: get(&self.failed_after),
            delayed: get(&self.delayed),
            duplicated: get(&self.duplicated),
            events: get(&self.events),
            events_dropped: get(&self.events_dropped),
            events_duplicated: get(&self.events_duplicated),
            events_reordered: get(&self.events_reordered),
            events_delayed: get(&self.events_delayed),
            streams_ended: get(&self.streams_ended),
        }
    }
}

/// A backend ([`Adjudicator`] and [`Funder`]) with faults injected by a seeded
/// schedule ([`FaultConfig`]); usable wherever the backend is, as
/// `Arc<dyn Adjudicator>` and `Arc<dyn Funder>`.
///
/// Injected failures are [`Error::Rpc`] with [`RpcFailure::Injected`]`(n)`,
/// `n` the call's number (for a stream end: the number of the `subscribe`
/// call that opened it), so they are [`Error::is_transient`] like the node
/// failures they stand for. `dispute` may fail or be delayed but never
/// answers wrongly. Clones share the schedule, the switch and the stats.
///
/// ```
/// use perun_adjudicator::testing::{FaultConfig, FaultyChain};
/// use perun_adjudicator::{Adjudicator, SimLedger};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let config = FaultConfig { fail_before: 1.0, ..FaultConfig::none(7) };
/// let chain = FaultyChain::wrap(SimLedger::new(1337), config);
/// let id = perun_channel::B256::repeat_byte(1);
/// let err = chain.dispute(id).await.unwrap_err();
/// assert!(err.is_transient()); // "dispute: injected fault #0"
/// chain.set_enabled(false);
/// assert_eq!(chain.dispute(id).await.unwrap(), None);
/// assert_eq!(chain.stats().faults_injected(), 1);
/// # });
/// ```
#[derive(Clone)]
pub struct FaultyChain {
    shared: Arc<Shared>,
}

struct Shared {
    adjudicator: Arc<dyn Adjudicator>,
    funder: Arc<dyn Funder>,
    config: FaultConfig,
    enabled: AtomicBool,
    stats: Counters,
}

impl fmt::Debug for FaultyChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyChain")
            .field("config", &self.shared.config)
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl FaultyChain {
    /// Wraps an adjudicator and a funder (usually the same backend); faults are on.
    pub fn new(
        adjudicator: Arc<dyn Adjudicator>,
        funder: Arc<dyn Funder>,
        config: FaultConfig,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                adjudicator,
                funder,
                config,
                enabled: AtomicBool::new(true),
                stats: Counters::default(),
            }),
        }
    }

    /// Wraps one backend that is both (a [`SimLedger`](crate::SimLedger), say).
    pub fn wrap<B: Adjudicator + Funder + 'static>(backend: B, config: FaultConfig) -> Self {
        let backend = Arc::new(backend);
        Self::new(backend.clone(), backend, config)
    }

    /// Turns injection on or off for later calls and events (also of streams
    /// already open); off, the wrapper is transparent, so a test can let
    /// everything settle at its end. Calls and events are still counted.
    pub fn set_enabled(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::Release);
    }

    /// Whether faults are being injected.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Acquire)
    }

    /// The schedule's configuration.
    pub fn config(&self) -> &FaultConfig {
        &self.shared.config
    }

    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.stats.snapshot()
    }

    /// How many faults were injected so far.
    pub fn faults_injected(&self) -> u64 {
        self.stats().faults_injected()
    }

    /// Takes the next call number.
    fn next_call(&self) -> u64 {
        self.shared.stats.calls.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs the next call under its plan.
    async fn call<T, F, Fut>(&self, op: &'static str, reads_only: bool, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run(self.next_call(), op, reads_only, call).await
    }

    /// Runs call `n` under its plan: `call` reaches the backend, `reads_only`
    /// limits the faults to failing before and delaying.
    async fn run<T, F, Fut>(&self, n: u64, op: &'static str, reads_only: bool, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let stats = &self.shared.stats;
        if !self.is_enabled() {
            return call().await;
        }
        let plan = self.shared.config.call_plan(n);
        if plan.fail_before {
            bump(&stats.failed_before);
            debug!(op, n, "injected: fail before the call");
            return Err(injected(op, n));
        }
        if let Some(wait) = plan.delay {
            bump(&stats.delayed);
            debug!(op, n, ?wait, "injected: delay");
            tokio::time::sleep(wait).await;
        }
        let first = call().await;
        if reads_only {
            return first;
        }
        if plan.duplicate {
            bump(&stats.duplicated);
            debug!(op, n, "injected: duplicate call");
            let _ = call().await;
        }
        if plan.fail_after {
            bump(&stats.failed_after);
            debug!(op, n, ok = first.is_ok(), "injected: fail after the call");
            return Err(injected(op, n));
        }
        first
    }
}

/// An injected transient failure of `op` at schedule position `n`.
fn injected(op: &'static str, n: u64) -> Error {
    Error::Rpc {
        op,
        source: RpcFailure::Injected(n),
    }
}

#[async_trait]
impl Funder for FaultyChain {
    async fn fund(&self, req: FundingRequest) -> Result<()> {
        let funder = &self.shared.funder;
        self.call("fund", false, || funder.fund(req.clone())).await
    }

    fn supports(&self, asset: &perun_channel::Asset) -> bool {
        self.shared.funder.supports(asset)
    }
}

#[async_trait]
impl Adjudicator for FaultyChain {
    fn domain(&self) -> perun_channel::Domain {
        self.shared.adjudicator.domain()
    }

    async fn register(&self, req: &SignedChannel) -> Result<()> {
        let adj = &self.shared.adjudicator;
        self.call("register", false, || adj.register(req)).await
    }

    async fn progress(&self, req: &ProgressRequest) -> Result<()> {
        let adj = &self.shared.adjudicator;
        self.call("progress", false, || adj.progress(req)).await
    }

    async fn conclude(&self, req: &SignedChannel) -> Result<()> {
        let adj = &self.shared.adjudicator;
        self.call("conclude", false, || adj.conclude(req)).await
    }

    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()> {
        let adj = &self.shared.adjudicator;
        self.call("withdraw", false, || adj.withdraw(req)).await
    }

    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        let adj = &self.shared.adjudicator;
        let n = self.next_call();
        let inner = self
            .run(n, "subscribe", false, || adj.subscribe(id))
            .await?;
        Ok(stream::faulty(self.shared.clone(), n, inner))
    }

    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        let adj = &self.shared.adjudicator;
        self.call("dispute", true, || adj.dispute(id)).await
    }
}
