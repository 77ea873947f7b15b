//! The dispute watcher: one supervised task per funded channel, from
//! funding until our funds are withdrawn.
//!
//! The watcher subscribes to the channel's chain events, reads the
//! channel's history (the backend ends it with `CaughtUp`: from then on the
//! channel is *protected*), and takes a [`step`] whenever something may
//! have changed: an event, a nudge (a move to a closing phase: `settle`, a
//! final update, `force_close`), and a periodic re-read in every phase (`chain_recheck` at a random
//! offset per channel while nothing runs on-chain, `dispute_poll` while a
//! dispute runs), so a lost event is found anyway.
//!
//! Faults are normal here:
//! - a failed step is retried with capped exponential backoff
//!   ([`Timeouts::backoff`](crate::Timeouts::backoff)) until it succeeds or
//!   the chain makes it moot, each retry reported as
//!   [`ChannelEvent::Retry`];
//! - an event stream that ends or fails is subscribed again (with backoff);
//! - the task itself runs under a supervisor that restarts it if it ever
//!   panics (a bug in a backend or here);
//! - chain reads of all watchers share their own concurrency limit, apart
//!   from the syncs of a restore, so a watcher never waits behind a peer.
//!
//! It stops when the channel is withdrawn or the client shuts down.

mod progress;
mod step;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use perun_adjudicator::{AdjudicatorEvent, EventStream};
use perun_channel::Phase;
use rand::Rng;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

use crate::core::{ChannelCore, Shared};
use crate::event::{ChannelEvent, WatchStatus, WatcherStep};
use crate::{Error, Result};
use step::Outcome;

/// Starts the channel's watcher unless it runs already (then wakes it).
pub(crate) fn spawn(shared: &Arc<Shared>, core: &Arc<ChannelCore>) {
    let start = core.watch_status.send_if_modified(|s| {
        let idle = matches!(s, WatchStatus::Idle | WatchStatus::Done);
        if idle {
            *s = WatchStatus::Starting;
        }
        idle
    });
    if !start {
        nudge(core);
        return;
    }
    // Its own root span: the watcher outlives the protocol step that started it.
    let span = info_span!(parent: None, "watcher", channel = %core.id, me = core.index);
    tokio::spawn(supervise(shared.clone(), core.clone()).instrument(span));
}

/// Asks the running watcher for a fresh look at the chain.
pub(crate) fn nudge(core: &ChannelCore) {
    core.nudge.notify_one();
}

/// How a watcher run ended.
enum Exit {
    /// Our funds are withdrawn.
    Done,
    /// The client shuts down.
    Stopped,
}

/// Runs the watcher, restarting it after a panic, until it is done.
async fn supervise(shared: Arc<Shared>, core: Arc<ChannelCore>) {
    let mut watcher = Watcher {
        shared: shared.clone(),
        core: core.clone(),
        failures: 0,
    };
    let mut restarts = 0u32;
    loop {
        let run = std::panic::AssertUnwindSafe(watcher.run()).catch_unwind();
        // A step's failures are retried inside `run`; only a panic (a bug,
        // in a backend or here) ends it early.
        let error = tokio::select! {
            res = run => match res {
                Ok(Exit::Done) => {
                    core.watch_status.send_replace(WatchStatus::Done);
                    core.emit(ChannelEvent::Withdrawn);
                    break;
                }
                Ok(Exit::Stopped) => break,
                Err(_) => Error::WatcherPanicked,
            },
            () = shared.stopping() => break,
        };
        restarts += 1;
        let pause = shared.timeouts.backoff(restarts);
        error!(error = %error, restarts, ?pause, "watcher stopped; restarting it");
        core.emit(ChannelEvent::WatcherRestarted {
            error: Arc::new(error),
        });
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shared.stopping() => break,
        }
    }
    if core.phase() != Phase::Withdrawn {
        core.watch_status.send_replace(WatchStatus::Idle);
    }
    debug!("watcher ended");
}

/// One channel's watcher.
struct Watcher {
    shared: Arc<Shared>,
    core: Arc<ChannelCore>,
    /// Consecutive failed steps.
    failures: u32,
}

impl Watcher {
    async fn run(&mut self) -> Exit {
        let (shared, core) = (self.shared.clone(), self.core.clone());
        let t = shared.timeouts;
        let now = Instant::now();
        // Spread the periodic reads of many channels over the interval.
        let mut recheck_at = now + jitter(t.chain_recheck);
        // A final state the peer asked for: give it time to conclude first.
        let mut final_grace: Option<Instant> = None;
        // The event stream, when there is one; the watcher steps on its
        // timers whether or not it has one (a backend may fail to
        // subscribe while its reads and transactions work).
        let mut stream = Stream::default();
        // On every (re)start, a closing channel acts at once; an open one
        // looks once the history is read (or if it never comes).
        let mut need = !matches!(
            core.phase(),
            Phase::Funding | Phase::Active | Phase::Updating
        );
        let mut first_read_at = Some(now + t.dispute_poll);
        let mut retry_at: Option<Instant> = None;
        loop {
            if stream.events.is_none() && stream.subscribe_at.is_some_and(|at| Instant::now() >= at)
            {
                self.subscribe(&mut stream).await;
            }
            if need {
                need = false;
                match step::step(&shared, &core).await {
                    Ok(outcome) => {
                        self.failures = 0;
                        self.ready(None);
                        first_read_at = None;
                        match outcome {
                            Outcome::Done => return Exit::Done,
                            Outcome::Poll => retry_at = Some(Instant::now() + t.dispute_poll),
                            Outcome::Idle => retry_at = None,
                        }
                    }
                    Err((step, e)) => {
                        // The history shows the registered state: read it
                        // again, unless it is still being delivered (an app
                        // channel's latest state comes in a later event than
                        // its registration) and has not stalled.
                        let reread = matches!(e, Error::RegisteredStateUnknown { .. });
                        let at = Instant::now() + self.failed(step, e);
                        retry_at = Some(at);
                        if reread && stream.events.is_some() {
                            if stream.complete {
                                stream.events = None;
                                stream.subscribe_at = Some(at);
                            } else if stream.stalled(&t) {
                                let (attempt, pause) = stream.replace_stalled(&t);
                                warn!(
                                    attempt,
                                    ?pause,
                                    "event stream delivered no history in time; subscribing again"
                                );
                                core.emit(ChannelEvent::Resubscribing {
                                    attempt,
                                    error: None,
                                });
                            }
                        }
                    }
                }
            }
            if core.phase() == Phase::Final && !core.settling.load(Ordering::SeqCst) {
                let at = *final_grace.get_or_insert_with(|| Instant::now() + t.settle_cooperative);
                if Instant::now() >= at {
                    debug!("nobody concluded the final state; concluding it");
                    core.settling.store(true, Ordering::SeqCst);
                    need = true;
                    continue;
                }
                retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
            }
            let wake = [
                Some(recheck_at),
                retry_at,
                first_read_at,
                stream.subscribe_at,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(recheck_at);
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(AdjudicatorEvent::CaughtUp { block, .. })) => {
                        stream.caught_up();
                        first_read_at = None;
                        self.ready(Some(block));
                    }
                    Some(Ok(ev)) => {
                        debug!(?ev, "chain event");
                        if let AdjudicatorEvent::Registered { state, .. }
                        | AdjudicatorEvent::Progressed { state, .. } = &ev
                        {
                            // Untrusted: a state outside the limits (an app
                            // contract may accept any data) is never kept.
                            match state.validate(&core.params) {
                                Ok(()) => core.note_registered(state.clone()),
                                Err(e) => warn!(error = %e, "chain event with an invalid state; ignored"),
                            }
                        }
                        core.emit(ChannelEvent::Chain(ev));
                        need = true;
                    }
                    ended => {
                        let error = match ended {
                            Some(Err(e)) => Some(Arc::new(Error::from(e))),
                            _ => None,
                        };
                        let (attempt, pause) = stream.ended(&t);
                        warn!(?error, attempt, ?pause, "event stream ended; subscribing again");
                        core.emit(ChannelEvent::Resubscribing { attempt, error });
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= recheck_at {
                        recheck_at = now + self.recheck_interval();
                        need = true;
                    }
                    if retry_at.is_some_and(|r| now >= r) {
                        retry_at = None;
                        need = true;
                    }
                    if first_read_at.is_some_and(|f| now >= f) {
                        first_read_at = None;
                        need = true;
                    }
                }
                () = core.nudge.notified() => need = true,
                () = shared.stopping() => return Exit::Stopped,
            }
        }
    }

    /// Subscribes; on failure schedules the next try with backoff.
    async fn subscribe(&self, stream: &mut Stream) {
        let t = self.shared.timeouts;
        match self.shared.adjudicator.subscribe(self.core.id).await {
            Ok(events) => stream.started(events),
            Err(e) => {
                stream.failures += 1;
                let pause = t.backoff(stream.failures);
                warn!(error = %e, attempt = stream.failures, ?pause, "subscribing failed; retrying");
                self.core.emit(ChannelEvent::Resubscribing {
                    attempt: stream.failures,
                    error: Some(Arc::new(e.into())),
                });
                stream.subscribe_at = Some(Instant::now() + pause);
            }
        }
    }

    /// Records a failed step and returns the pause before the next try.
    fn failed(&mut self, step: WatcherStep, e: Error) -> Duration {
        self.failures += 1;
        let delay = self.shared.timeouts.backoff(self.failures);
        warn!(?step, error = %e, attempt = self.failures, ?delay, "watcher step failed; retrying");
        self.core.emit(ChannelEvent::Retry {
            step,
            attempt: self.failures,
            delay,
            error: Arc::new(e),
        });
        delay
    }

    /// The watcher has read the chain: the channel is protected.
    fn ready(&self, block: Option<u64>) {
        let first = self.core.watch_status.send_if_modified(|s| {
            let first = *s == WatchStatus::Starting;
            if first {
                *s = WatchStatus::Watching;
            }
            first
        });
        if first {
            self.core.emit(ChannelEvent::Watching { block });
            debug!(?block, "watching");
        }
    }

    /// How long until the next periodic read in the current phase.
    fn recheck_interval(&self) -> Duration {
        match self.core.phase() {
            Phase::Funding | Phase::Active | Phase::Updating => self.shared.timeouts.chain_recheck,
            _ => self.shared.timeouts.dispute_poll,
        }
    }
}

/// The watcher's event stream and when to subscribe again.
struct Stream {
    events: Option<EventStream>,
    /// When to subscribe (again), if there is no stream.
    subscribe_at: Option<Instant>,
    /// When the current stream was opened.
    since: Instant,
    /// Whether it delivered the channel's history.
    complete: bool,
    /// Subscriptions in a row that failed or ended early.
    failures: u32,
    /// Streams in a row replaced for delivering no history in time.
    stalls: u32,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            events: None,
            subscribe_at: Some(Instant::now()),
            since: Instant::now(),
            complete: false,
            failures: 0,
            stalls: 0,
        }
    }
}

impl Stream {
    fn started(&mut self, events: EventStream) {
        self.events = Some(events);
        self.subscribe_at = None;
        self.since = Instant::now();
        self.complete = false;
    }

    fn caught_up(&mut self) {
        self.complete = true;
        self.stalls = 0;
    }

    /// The next event; never resolves without a stream.
    async fn next(&mut self) -> Option<perun_adjudicator::Result<AdjudicatorEvent>> {
        match &mut self.events {
            Some(events) => events.next().await,
            None => std::future::pending().await,
        }
    }

    /// It has not delivered the channel's history within its wait: a
    /// backend's stream may hang, and a registered state we do not hold
    /// is learnt only from that history. The wait is `retry_max` times
    /// the stalls in a row so far (plus one), so a long but live history
    /// read is not restarted for ever; a stream that catches up resets it.
    fn stalled(&self, t: &crate::Timeouts) -> bool {
        let wait = t.retry_max.saturating_mul(self.stalls.saturating_add(1));
        !self.complete && self.since.elapsed() >= wait
    }

    /// Gives up on a stalled stream: when to subscribe again, as for one
    /// that ended early.
    fn replace_stalled(&mut self, t: &crate::Timeouts) -> (u32, Duration) {
        self.stalls = self.stalls.saturating_add(1);
        self.ended(t)
    }

    /// The stream ended: when to subscribe again. A stream that ended
    /// before its history or soon after opening counts as a failure and
    /// backs off (a backend whose streams die at once must not be spun on);
    /// one that lived is replaced at once.
    fn ended(&mut self, t: &crate::Timeouts) -> (u32, Duration) {
        self.events = None;
        let early = !self.complete || self.since.elapsed() < t.retry_max;
        self.failures = if early { self.failures + 1 } else { 0 };
        let pause = if early {
            t.backoff(self.failures)
        } else {
            Duration::ZERO
        };
        self.subscribe_at = Some(Instant::now() + pause);
        (self.failures, pause)
    }
}

/// A random point in `0..=period`.
fn jitter(period: Duration) -> Duration {
    let ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Closes the channel on-chain: `→ Registered` (stored, so a restart goes
/// on closing), and the watcher registers our latest state (unless a
/// dispute runs already) and drives the dispute to the end.
pub(crate) async fn force_close(shared: &Arc<Shared>, core: &Arc<ChannelCore>) -> Result<()> {
    let stored = crate::core::enter_closing(shared, core, Phase::Registered).await;
    spawn(shared, core);
    nudge(core);
    stored
}
