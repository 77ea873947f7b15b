//! One look at the chain and the on-chain step it calls for.
//!
//! Every decision is derived from the chain, re-read right before acting
//! ([`Adjudicator::dispute`](perun_adjudicator::Adjudicator::dispute)),
//! never from an event alone, so duplicated, reordered, replayed, lost or
//! reorged-away events cannot make the watcher act wrongly, and a restarted
//! client picks up where it left off. Each outcome on-chain has a path to
//! `Withdrawn`:
//!
//! | on-chain | our phase | step |
//! |---|---|---|
//! | nothing | `Registered` (we close) | register our latest state |
//! | nothing | `Final` | conclude the final state (`concludeFinal`) |
//! | nothing | other | none |
//! | dispute, older than our latest | any | refute with our latest; if the challenge period is over, conclude what is registered |
//! | dispute, ours or newer | any | app channel: our pending move once its window opens (`progress`); conclude once the challenge period is over |
//! | dispute, progressed | any | app channel: no refutation; moves only, then conclude |
//! | concluded | any | `→ Concluded`, withdraw, `→ Withdrawn` |

use std::sync::Arc;
use std::sync::atomic::Ordering;

use perun_adjudicator::{Dispute, SignedChannel, WithdrawRequest};
use perun_channel::{Phase, SignedState};
use tracing::{debug, info, warn};

use crate::core::{ChannelCore, Shared, enter_closing_within, set_phase};
use crate::event::{ChannelEvent, WatcherStep};
use crate::{Error, Result};

/// What a step left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing runs on-chain that concerns us: look again at the next recheck.
    Idle,
    /// A dispute runs (or a transaction just landed): look again soon.
    Poll,
    /// Our funds are withdrawn.
    Done,
}

/// A failed step: which one, and why.
pub(crate) type Failed = (WatcherStep, Error);

/// Reads the chain and takes the step it calls for.
pub(crate) async fn step(shared: &Arc<Shared>, core: &Arc<ChannelCore>) -> Result<Outcome, Failed> {
    if core.phase() == Phase::Withdrawn {
        return Ok(Outcome::Done);
    }
    let d = {
        // Reads of all watchers share one limit; transactions queue per account.
        let _permit = shared.watch_permits.acquire().await;
        shared
            .adjudicator
            .dispute(core.id)
            .await
            .map_err(|e| (WatcherStep::Read, e.into()))?
    };
    let latest = core.latest_for_chain().await;
    match d {
        None => nothing_on_chain(shared, core, latest).await,
        Some(d) if d.concluded => {
            super::progress::concluded(core, &d);
            withdraw(shared, core, &d, latest.as_ref()).await
        }
        Some(d) => dispute_running(shared, core, &d, latest).await,
    }
}

async fn nothing_on_chain(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    latest: Option<SignedState>,
) -> Result<Outcome, Failed> {
    let phase = core.phase();
    match phase {
        // We close on-chain and nothing is registered (yet, or a reorg
        // deeper than the confirmation depth dropped it): register.
        Phase::Registered | Phase::Concluded => {
            let latest = latest.ok_or((WatcherStep::Read, Error::Phase(phase)))?;
            let version = latest.state.version;
            register(shared, core, latest, WatcherStep::Register { version }).await
        }
        Phase::Final if core.settling.load(Ordering::SeqCst) => {
            let latest = latest.ok_or((WatcherStep::Read, Error::Phase(phase)))?;
            conclude(shared, core, latest).await
        }
        _ => Ok(Outcome::Idle),
    }
}

async fn dispute_running(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    d: &Dispute,
    latest: Option<SignedState>,
) -> Result<Outcome, Failed> {
    // The refutation must not wait for the disk.
    enter_closing_within(shared, core, Phase::Registered).await;
    // After the first progression only moves follow (`register` reverts).
    if let Some(latest) = latest
        .as_ref()
        .filter(|l| !d.progressed && l.state.version > d.version)
    {
        let step = WatcherStep::Refute {
            registered: d.version,
            ours: latest.state.version,
        };
        info!(
            registered = d.version,
            ours = latest.state.version,
            "refuting a stale state"
        );
        crate::failpoint::hit("refute").await;
        match register(shared, core, latest.clone(), step).await {
            // The challenge period is over: what is registered stands.
            Err((_, Error::Chain(perun_adjudicator::Error::TimeoutPassed))) => {
                core.forced().refute_closed.store(true, Ordering::SeqCst);
                warn!(
                    registered = d.version,
                    ours = latest.state.version,
                    "too late to refute: the challenge period is over; concluding the registered state"
                );
            }
            other => return other,
        }
    }
    let Some(registered) = core.registered_state(d, latest.as_ref()) else {
        warn!(
            version = d.version,
            "registered state not seen in any event yet; reading the history again"
        );
        return Err((
            WatcherStep::Conclude { version: d.version },
            Error::RegisteredStateUnknown {
                version: d.version,
                hash: d.state_hash,
            },
        ));
    };
    if !core.params.is_payment()
        && let Some(out) = super::progress::step(shared, core, d, &registered).await
    {
        return out;
    }
    conclude(shared, core, SignedState::new(registered)).await
}

/// Registers `state` (a refutation or a first registration).
async fn register(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    state: SignedState,
    step: WatcherStep,
) -> Result<Outcome, Failed> {
    core.emit(ChannelEvent::Step(step));
    let req = SignedChannel {
        params: perun_channel::Params::clone(&core.params),
        state,
    };
    match shared.adjudicator.register(&req).await {
        Ok(()) => {
            core.note_registered(req.state.state);
            core.emit(ChannelEvent::StepDone(step));
            Ok(Outcome::Poll)
        }
        // Someone registered something at least as new, or concluded, first:
        // the next read decides.
        Err(
            perun_adjudicator::Error::VersionTooLow { .. }
            | perun_adjudicator::Error::AlreadyConcluded,
        ) => Ok(Outcome::Poll),
        Err(e) => Err((step, e.into())),
    }
}

/// Concludes `state`: the registered one after its timeout, or our fully
/// signed final state at once. Withdraws right after.
async fn conclude(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    state: SignedState,
) -> Result<Outcome, Failed> {
    let version = state.state.version;
    let step = WatcherStep::Conclude { version };
    let req = SignedChannel {
        params: perun_channel::Params::clone(&core.params),
        state,
    };
    let tag = version.saturating_add(1);
    if core.conclude_announced.swap(tag, Ordering::SeqCst) != tag {
        core.emit(ChannelEvent::Step(step));
    }
    match shared.adjudicator.conclude(&req).await {
        Ok(()) => {
            info!(version, "concluded");
            core.emit(ChannelEvent::StepDone(step));
            crate::failpoint::hit("settle_concluded").await;
            Ok(Outcome::Poll)
        }
        Err(perun_adjudicator::Error::AlreadyConcluded) => Ok(Outcome::Poll),
        Err(perun_adjudicator::Error::TimeoutNotPassed { timeout, now }) => {
            debug!(timeout, now, "the challenge period runs");
            Ok(Outcome::Poll)
        }
        Err(e) => Err((step, e.into())),
    }
}

/// The channel is concluded on-chain: `→ Concluded`, withdraw, `→ Withdrawn`.
async fn withdraw(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    d: &Dispute,
    latest: Option<&SignedState>,
) -> Result<Outcome, Failed> {
    let step = WatcherStep::Withdraw;
    // Only the assets matter for a withdrawal; every state of the channel has the same.
    let state = core
        .registered_state(d, latest)
        .or_else(|| latest.map(|l| l.state.clone()))
        .ok_or((step, Error::Phase(core.phase())))?;
    enter_closing_within(shared, core, Phase::Concluded).await;
    core.emit(ChannelEvent::Step(step));
    let req = WithdrawRequest {
        params: perun_channel::Params::clone(&core.params),
        state,
        index: core.index,
        account: shared.account.clone(),
        receiver: shared.account.address(),
    };
    shared
        .adjudicator
        .withdraw(&req)
        .await
        .map_err(|e| (step, e.into()))?;
    set_phase(shared, core, Phase::Withdrawn)
        .await
        .map_err(|e| (step, e))?;
    core.emit(ChannelEvent::StepDone(step));
    info!("withdrawn");
    Ok(Outcome::Done)
}
