//! The app-channel part of a dispute step: send our pending move once its
//! window is open, and tell the application when the move is ours.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use perun_adjudicator::{Dispute, ProgressRequest};
use perun_channel::State;
use tracing::{debug, info, warn};

use super::step::{Failed, Outcome};
use crate::core::{ChannelCore, Forcing, Shared, lock};
use crate::error::MootReason;
use crate::event::{ChannelEvent, WatcherStep};

/// Takes the app step the dispute `d` (whose state is `registered`) calls
/// for; `None` if there is none and the caller goes on to conclude.
pub(super) async fn step(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    d: &Dispute,
    registered: &State,
) -> Option<Result<Outcome, Failed>> {
    let forced = core.forced();
    let pending = match &*forced.status.borrow() {
        Forcing::Pending(m) => Some((**m).clone()),
        _ => None,
    };
    let Some(m) = pending else {
        announce_our_move(shared, core, registered);
        return None;
    };
    let (version, hash) = (m.to.version, m.to.hash());
    let moot = |reason| {
        warn!(version, %reason, "our forced move will not land");
        forced.status.send_replace(Forcing::Moot(hash, reason));
    };
    // On-chain now, or seen on-chain before the dispute moved on (our
    // transaction landed but its answer was lost, and the others answered).
    if d.state_hash == hash || core.registered_matching(hash).is_some() {
        forced.status.send_replace(Forcing::Landed(hash));
        return None;
    }
    let from = match &m.from {
        Some(from) if from.hash() == d.state_hash => from.clone(),
        // The registration of our base is still on its way (we refute).
        Some(from)
            if !d.progressed
                && d.version < from.version
                && !forced.refute_closed.load(Ordering::SeqCst) =>
        {
            return Some(Ok(Outcome::Poll));
        }
        // A move restored from the store follows the registered state it is
        // a valid move of ours from.
        None if follows(shared, core, registered, &m.to) => registered.clone(),
        _ => {
            moot(MootReason::ChainMoved {
                registered: d.version,
            });
            return None;
        }
    };
    let step = WatcherStep::Progress {
        from: from.version,
        version,
    };
    let req = ProgressRequest {
        params: perun_channel::Params::clone(&core.params),
        from,
        to: m.to,
        actor: core.index,
        signature: m.signature,
    };
    use perun_adjudicator::Error as E;
    match shared.adjudicator.progress(&req).await {
        Ok(()) => {
            info!(from = req.from.version, version, "progressed with our move");
            core.emit(ChannelEvent::Step(step));
            core.note_registered(req.to);
            core.emit(ChannelEvent::StepDone(step));
            forced.status.send_replace(Forcing::Landed(hash));
            Some(Ok(Outcome::Poll))
        }
        Err(E::TimeoutNotPassed { timeout, now }) => {
            debug!(timeout, now, "the refutation period runs; our move waits");
            Some(Ok(Outcome::Poll))
        }
        Err(E::TimeoutPassed) => {
            moot(MootReason::WindowClosed);
            None
        }
        // Concluded meanwhile, perhaps on this very move (our first try
        // landed late): the next read decides (`concluded`).
        Err(E::AlreadyConcluded) => Some(Ok(Outcome::Poll)),
        // The chain moved between our read and the transaction: read again.
        Err(E::WrongState) => Some(Ok(Outcome::Poll)),
        Err(e) if e.is_transient() => Some(Err((step, e.into()))),
        Err(e) => {
            moot(MootReason::Refused(Arc::new(e)));
            None
        }
    }
}

/// The channel is concluded: a move of ours still pending either is the
/// concluded state (it landed; its answer was lost) or never will be.
pub(super) fn concluded(core: &ChannelCore, d: &Dispute) {
    if core.params.is_payment() {
        return;
    }
    let forced = core.forced();
    forced.status.send_if_modified(|s| match s {
        Forcing::Pending(m) => {
            let hash = m.to.hash();
            *s = if d.state_hash == hash || core.registered_matching(hash).is_some() {
                Forcing::Landed(hash)
            } else {
                warn!(
                    version = m.to.version,
                    "the channel concluded before our forced move landed"
                );
                Forcing::Moot(hash, MootReason::Concluded)
            };
            true
        }
        _ => false,
    });
}

/// Whether `to` is a move of ours from `registered`: one version on, and
/// allowed by the generic rule and the app's.
fn follows(shared: &Shared, core: &ChannelCore, registered: &State, to: &State) -> bool {
    registered.version.checked_add(1) == Some(to.version)
        && shared.apps.rules(&core.params).is_ok_and(|app| {
            registered
                .validate_transition(&core.params, to, core.index, app)
                .is_ok()
        })
}

/// Emits [`ChannelEvent::YourMove`] once per registered state on which it is
/// our move and no move of ours waits.
fn announce_our_move(shared: &Shared, core: &ChannelCore, registered: &State) {
    let Ok(app) = shared.apps.rules(&core.params) else {
        return;
    };
    if app.next_actor(&core.params, registered) != Some(core.index) {
        return;
    }
    let hash = registered.hash();
    let mut announced = lock(&core.forced().announced);
    if *announced != Some(hash) {
        *announced = Some(hash);
        info!(
            version = registered.version,
            "our move in the on-chain dispute"
        );
        core.emit(ChannelEvent::YourMove {
            state: registered.clone(),
        });
    }
}
