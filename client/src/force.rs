//! Forcing a move in an app channel on-chain: the peer stopped answering,
//! so our move goes to the adjudicator (`progress`) instead.
//!
//! 1. The base is the state registered on-chain, or (no dispute yet, or one
//!    we will refute) our latest fully signed state, which the watcher
//!    registers first.
//! 2. The move is checked by the generic rule and the app's, with us as the
//!    actor, at version `base + 1` (the adjudicator allows exactly one step).
//! 3. We never sign two different states of one version
//!    (`Machine::sign_forced`, the rule of every signature): a version we
//!    signed before is signed again only with the same contents. The signed
//!    move is stored as the channel's staged state before the signature
//!    leaves the process, so a restart knows it, and sends it
//!    (`ChannelCore::resume_forced_move`).
//! 4. The watcher sends it once its window opens (after the refutation
//!    period, or while the progression timeout runs) and reports back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use perun_adjudicator::Dispute;
use perun_channel::{AppRejection, Phase, State};
use perun_persistence::Change;
use tracing::{Instrument, info, info_span, warn};

use crate::core::{ChannelCore, ForcedMove, Forcing, Shared};
use crate::error::MootReason;
use crate::{Error, Result};

/// Builds our move with `f` from the dispute's state and has the watcher
/// send it; returns the move once the dispute's state is our move.
pub(crate) async fn force_update<E>(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    f: impl FnOnce(&State) -> std::result::Result<State, E>,
) -> Result<State>
where
    AppRejection: From<E>,
{
    if core.params.is_payment() {
        return Err(Error::NotAnAppChannel(core.id));
    }
    // A stopped client signs nothing and stores nothing that a restart would act on.
    if *shared.stop.borrow() {
        return Err(Error::Closed);
    }
    let app = shared.apps.rules(&core.params)?;
    let span = info_span!("force_update", channel = %core.id, me = core.index);
    async move {
        let (d, base) = base(shared, core).await?;
        let mut next = f(&base).map_err(|e| perun_channel::Error::App(AppRejection::from(e)))?;
        // The adjudicator takes exactly one version per move.
        next.version = base
            .version
            .checked_add(1)
            .ok_or(perun_channel::Error::Version {
                expected: u64::MAX,
                got: base.version,
            })?;
        base.validate_transition(&core.params, &next, core.index, app)?;
        if d.is_none() || !closing(core.phase()) {
            // A dispute gives the move its window; the phase is stored
            // first, so no off-chain update is signed from here on. Not
            // by a client stopped while the chain was read.
            if shared.stopped() {
                return Err(Error::Closed);
            }
            crate::watcher::force_close(shared, core).await?;
        }
        let signature = sign_once(shared, core, &next).await?;
        let (version, hash) = (next.version, next.hash());
        info!(from = base.version, version, "forcing our move on-chain");
        let forced = core.forced();
        let mut status = forced.status.subscribe();
        forced.status.send_replace(Forcing::Pending(Box::new(ForcedMove {
            from: Some(base),
            to: next.clone(),
            signature,
        })));
        // Signed and stored, the move is sent even if the caller stops
        // waiting (as after a restart): a withdrawal could not reach a copy
        // the watcher already sent, nor one a restart resumes.
        crate::watcher::nudge(core);
        loop {
            match &*status.borrow_and_update() {
                Forcing::Landed(h) if *h == hash => return Ok(next),
                Forcing::Moot(h, reason) if *h == hash => {
                    return Err(Error::MoveMoot {
                        version,
                        reason: reason.clone(),
                    });
                }
                _ => {}
            }
            tokio::select! {
                changed = status.changed() => if changed.is_err() {
                    return Err(Error::Closed);
                },
                () = shared.stopping() => return Err(Error::MoveMoot { version, reason: MootReason::Shutdown }),
            }
        }
    }
    .instrument(span)
    .await
}

/// How long `force_update` waits for the watcher to see the registered state.
const SEE_REGISTERED: Duration = Duration::from_secs(10);

/// The dispute, and the state our move follows: the registered one, or our
/// latest if the watcher registers it (nothing registered yet, or an older
/// state it can still refute). Waits briefly for the watcher to see a
/// registered state it has not read from the events yet.
async fn base(shared: &Shared, core: &ChannelCore) -> Result<(Option<Dispute>, State)> {
    let deadline = tokio::time::Instant::now() + SEE_REGISTERED;
    loop {
        let d = shared.adjudicator.dispute(core.id).await?;
        let latest = core.latest().await.ok_or(Error::Phase(core.phase()))?;
        let refutable = !core.forced().refute_closed.load(Ordering::SeqCst);
        let base = match &d {
            None => Some(latest.state.clone()),
            Some(d) if d.concluded => {
                return Err(Error::MoveMoot {
                    version: d.version.saturating_add(1),
                    reason: MootReason::Concluded,
                });
            }
            Some(d) if !d.progressed && refutable && latest.state.version > d.version => {
                Some(latest.state.clone())
            }
            Some(d) => core.registered_state(d, Some(&latest)),
        };
        match (base, d) {
            (Some(base), d) => return Ok((d, base)),
            (None, Some(d)) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::RegisteredStateUnknown {
                    version: d.version,
                    hash: d.state_hash,
                });
            }
            (None, _) => {
                crate::watcher::nudge(core);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn closing(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Registered | Phase::Concluded | Phase::Withdrawn
    )
}

/// Signs `next` as our forced move under the machine's rule (never a
/// second state of a version we signed, across restarts too: the signed
/// move is stored as the channel's staged state before it leaves).
async fn sign_once(
    shared: &Shared,
    core: &ChannelCore,
    next: &State,
) -> Result<perun_channel::Signature> {
    let mut l = core.locked.lock().await;
    // A stopped client signs nothing (DESIGN §8): a client started again
    // on this store would not know this move, and could force another.
    if shared.stopped() {
        return Err(Error::Closed);
    }
    let mut trial = l.machine.clone();
    let signed = trial
        .sign_forced(next, shared.account.as_ref())
        .inspect_err(|e| warn!(version = next.version, error = %e, "not signing the move"))?;
    let sig = signed
        .sigs
        .get(core.index)
        .cloned()
        .flatten()
        .ok_or(perun_channel::Error::MissingSignature(core.index))?;
    if l.write(shared, core, vec![Change::Staged(signed)]).await? {
        l.announce(core);
    }
    l.machine = trial;
    Ok(sig)
}
