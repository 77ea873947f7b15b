//! Forcing a move in an app channel on-chain: the peer stopped answering,
//! so our move goes to the adjudicator (`progress`) instead.
//!
//! 1. The base is the state registered on-chain, or (no dispute yet, or one
//!    we will refute) our latest fully signed state, which the watcher
//!    registers first.
//! 2. The move is checked by the generic rule and the app's, with us as the
//!    actor, at version `base + 1` (the adjudicator allows exactly one step).
//! 3. We never sign two different states of one version: a version we
//!    signed before (an off-chain update we answered) is signed again only
//!    with the same contents. The signed move is stored as the channel's
//!    staged state before the signature leaves the process, so a restart
//!    knows it too.
//! 4. The watcher sends it once its window opens (after the refutation
//!    period, or while the progression timeout runs) and reports back.

use std::sync::Arc;

use perun_adjudicator::Dispute;
use perun_channel::{AppRejection, Phase, SignedState, State};
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
    let app = shared.apps.rules(&core.params)?;
    let span = info_span!("force_update", channel = %core.id, me = core.index);
    async move {
        let d = shared.adjudicator.dispute(core.id).await?;
        let latest = core.latest().await.ok_or(Error::Phase(core.phase()))?;
        let base = base(core, d.as_ref(), &latest)?;
        let mut next = f(&base).map_err(|e| perun_channel::Error::App(AppRejection::from(e)))?;
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
            // first, so no off-chain update is signed from here on.
            crate::watcher::force_close(shared, core).await?;
        }
        let signature = sign_once(shared, core, &next).await?;
        let version = next.version;
        info!(from = base.version, version, "forcing our move on-chain");
        let forced = core.forced();
        let mut status = forced.status.subscribe();
        forced.status.send_replace(Forcing::Pending(Box::new(ForcedMove {
            from: base,
            to: next.clone(),
            signature,
        })));
        crate::watcher::nudge(core);
        loop {
            match &*status.borrow_and_update() {
                Forcing::Landed(v) if *v == version => return Ok(next),
                Forcing::Moot(v, reason) if *v == version => {
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

/// The state our move follows.
fn base(core: &ChannelCore, d: Option<&Dispute>, latest: &SignedState) -> Result<State> {
    match d {
        None => Ok(latest.state.clone()),
        Some(d) if d.concluded => Err(Error::MoveMoot {
            version: d.version.saturating_add(1),
            reason: MootReason::Concluded,
        }),
        // The watcher refutes with our latest before the window opens.
        Some(d) if !d.progressed && latest.state.version > d.version => Ok(latest.state.clone()),
        Some(d) => core
            .registered_state(d, Some(latest))
            .ok_or(Error::RegisteredStateUnknown {
                version: d.version,
                hash: d.state_hash,
            }),
    }
}

fn closing(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Registered | Phase::Concluded | Phase::Withdrawn
    )
}

/// Signs `next` as our forced move, never a second state of a version we
/// signed: the signed move is stored (as the channel's staged state, so a
/// restart knows we signed it) before the signature leaves the process.
async fn sign_once(
    shared: &Shared,
    core: &ChannelCore,
    next: &State,
) -> Result<perun_channel::Signature> {
    let (version, hash) = (next.version, next.hash());
    let mut l = core.locked.lock().await;
    let signed = l.machine.last_signed();
    let again =
        signed == Some((version, hash)) || *crate::core::lock(&core.forced().signed) == Some(hash);
    if let Some((top, _)) = signed
        && version <= top
        && !again
    {
        warn!(
            version,
            top, "a different state of this version was signed before; not signing the move"
        );
        return Err(perun_channel::Error::DoubleSign(version).into());
    }
    let mut s = SignedState::new(next.clone());
    let sig = s.sign(&core.params, core.index, shared.account.as_ref())?;
    if l.write(shared, core, vec![Change::Staged(s)]).await? {
        l.announce(core);
    }
    *crate::core::lock(&core.forced().signed) = Some(hash);
    Ok(sig)
}
