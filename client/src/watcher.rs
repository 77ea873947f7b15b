//! The dispute watcher: one task per funded channel.
//!
//! Every decision is derived from the chain, re-read right before acting
//! ([`Adjudicator::dispute`](perun_adjudicator::Adjudicator::dispute)), never
//! from an event alone, so duplicated, reordered, replayed or reorged-away
//! events cannot make the watcher act wrongly, and a restarted client picks
//! up where it left off:
//!
//! - a registered version older than our latest fully signed state is
//!   refuted with that state;
//! - once the challenge timeout passed, the registered state is concluded
//!   (unless someone already did);
//! - once concluded, our funds are withdrawn (withdrawal is idempotent).

use std::sync::Arc;

use perun_adjudicator::{AdjudicatorEvent, Dispute, SignedChannel, WithdrawRequest};
use perun_channel::{Phase, SignedState, State};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::channel::ChannelCore;
use crate::channel::set_phase;
use crate::client::Inner;
use crate::{Error, Result};

/// Starts the channel's watcher unless it runs already.
pub(crate) fn spawn(inner: &Arc<Inner>, core: &Arc<ChannelCore>) {
    if core
        .watching
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let (inner, core) = (inner.clone(), core.clone());
    let span = info_span!("watcher", channel = %core.id, me = core.index);
    tokio::spawn(
        async move {
            let mut stop = inner.stop.subscribe();
            tokio::select! {
                res = run(&inner, &core) => if let Err(e) = res {
                    warn!(error = %e, "watcher stopped");
                },
                _ = stop.wait_for(|s| *s) => debug!("client shut down"),
            }
            core.watching
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        .instrument(span),
    );
}

async fn run(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    // `subscribe` fails only if the chain is unreachable; the caller logs it.
    let mut events = inner.adjudicator.subscribe(core.id).await?;
    // The chain may have moved while we were not watching (restart). A
    // restore starts thousands of watchers: a few read the chain at a time.
    {
        let _permit = inner.resume_permits.clone().acquire_owned().await;
        step(inner, core).await;
    }
    let mut tick = tokio::time::interval(inner.timeouts.dispute_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while core.phase() != Phase::Withdrawn {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    debug!(?ev, "chain event");
                    if let AdjudicatorEvent::Registered { state, .. } = &ev {
                        core.note_registered(state.clone());
                    }
                    core.announce(ev);
                    step(inner, core).await;
                }
                Some(Err(e)) => warn!(error = %e, "bad chain event ignored"),
                None => return Err(Error::Closed),
            },
            _ = tick.tick(), if core.phase() == Phase::Registered || core.phase() == Phase::Concluded => {
                step(inner, core).await;
            }
        }
    }
    Ok(())
}

/// One watcher step. A failure (a transaction that lost a race with a
/// peer's, a dropped connection) is logged; the next event or tick retries
/// from a fresh read of the chain.
async fn step(inner: &Arc<Inner>, core: &Arc<ChannelCore>) {
    // Boxed: an idle watcher (10,000 of them in a big client) then does not
    // carry the space of a dispute step in its own future.
    if let Err(e) = Box::pin(act(inner, core)).await {
        warn!(error = %e, "dispute step failed; will retry");
    }
}

/// One idempotent step of the dispute: refute, conclude or withdraw, as
/// the chain's current dispute requires. Serialised per channel.
pub(crate) async fn act(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    let _one = core.act_lock.lock().await;
    let Some(d) = inner.adjudicator.dispute(core.id).await? else {
        return Ok(()); // Nothing registered (or it was reorged away).
    };
    let latest = core.latest().await;
    if !d.concluded {
        if let Some(latest) = &latest
            && latest.state.version > d.version
        {
            info!(
                registered = d.version,
                ours = latest.state.version,
                "refuting a stale state"
            );
            crate::failpoint::hit("refute").await;
            let req = SignedChannel {
                params: core.params.clone(),
                state: latest.clone(),
            };
            match inner.adjudicator.register(&req).await {
                Ok(()) => core.note_registered(latest.state.clone()),
                Err(perun_adjudicator::Error::VersionTooLow { .. }) => {}
                Err(perun_adjudicator::Error::TimeoutPassed) => {
                    warn!("too late to refute: the challenge period is over")
                }
                Err(e) => return Err(e.into()),
            }
            mark_registered(inner, core).await?;
            return Ok(());
        }
        mark_registered(inner, core).await?;
        let Some(registered) = registered_state(core, &d, latest.as_ref()) else {
            warn!("registered state unknown; waiting for its event");
            return Ok(());
        };
        let req = SignedChannel {
            params: core.params.clone(),
            state: SignedState::new(registered),
        };
        match inner.adjudicator.conclude(&req).await {
            Ok(()) => info!(version = d.version, "concluded the dispute"),
            Err(perun_adjudicator::Error::AlreadyConcluded) => {}
            Err(perun_adjudicator::Error::TimeoutNotPassed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    withdraw(inner, core, &d, latest.as_ref()).await
}

/// Moves the machine to `Registered` if it is not there or past it.
async fn mark_registered(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    match core.phase() {
        Phase::Registered | Phase::Concluded | Phase::Withdrawn => Ok(()),
        p if p.can_transition_to(Phase::Registered) => {
            set_phase(inner, core, Phase::Registered).await
        }
        p => Err(Error::Phase(p)),
    }
}

/// The state whose hash is on-chain: ours, or one a registration event showed.
fn registered_state(
    core: &ChannelCore,
    d: &Dispute,
    latest: Option<&SignedState>,
) -> Option<State> {
    if let Some(l) = latest
        && l.state.hash() == d.state_hash
    {
        return Some(l.state.clone());
    }
    core.registered_matching(d.state_hash)
}

async fn withdraw(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    d: &Dispute,
    latest: Option<&SignedState>,
) -> Result<()> {
    if core.phase() == Phase::Withdrawn {
        return Ok(());
    }
    let state = registered_state(core, d, latest)
        .or_else(|| latest.map(|l| l.state.clone()))
        .ok_or(Error::Phase(core.phase()))?;
    if core.phase() != Phase::Concluded {
        set_phase(inner, core, Phase::Concluded).await?;
    }
    let req = WithdrawRequest {
        params: core.params.clone(),
        state,
        index: core.index,
        account: inner.account.clone(),
        receiver: inner.account.address(),
    };
    inner.adjudicator.withdraw(&req).await?;
    set_phase(inner, core, Phase::Withdrawn).await?;
    info!("withdrawn");
    Ok(())
}

/// Registers our latest fully signed state (a non-cooperative close or a
/// funding failure), then drives the dispute to the end.
pub(crate) async fn force_close(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    let latest = core.latest().await.ok_or(Error::Phase(core.phase()))?;
    if inner.adjudicator.dispute(core.id).await?.is_none() {
        let req = SignedChannel {
            params: core.params.clone(),
            state: latest.clone(),
        };
        match inner.adjudicator.register(&req).await {
            Ok(()) => {
                core.note_registered(latest.state.clone());
                info!(
                    version = latest.state.version,
                    "registered our latest state"
                );
            }
            // Someone registered as new a state, or concluded, first: the
            // dispute steps take it from there.
            Err(
                perun_adjudicator::Error::VersionTooLow { .. }
                | perun_adjudicator::Error::AlreadyConcluded,
            ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    mark_registered(inner, core).await?;
    spawn(inner, core);
    Ok(())
}

/// Consecutive failed dispute steps after which `settle` gives up.
const MAX_FAILED_STEPS: u32 = 20;

/// Waits until the channel is withdrawn, driving the dispute meanwhile.
/// Transient failures are retried; persistent ones end with the last error.
pub(crate) async fn until_withdrawn(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    let mut tick = tokio::time::interval(inner.timeouts.dispute_poll);
    let mut failures = 0;
    while core.phase() != Phase::Withdrawn {
        tick.tick().await;
        match act(inner, core).await {
            Ok(()) => failures = 0,
            Err(e) if failures < MAX_FAILED_STEPS => {
                failures += 1;
                warn!(error = %e, "dispute step failed; retrying");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
