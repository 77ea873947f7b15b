//! The app-channel part of a dispute step: send our pending move once its
//! window is open, and tell the application when the move is ours.

use std::sync::Arc;

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
    let version = m.to.version;
    let moot = |reason| {
        warn!(version, %reason, "our forced move will not land");
        forced.status.send_replace(Forcing::Moot(version, reason));
    };
    if d.state_hash == m.to.hash() {
        forced.status.send_replace(Forcing::Landed(version));
        return None;
    }
    if d.state_hash != m.from.hash() {
        if !d.progressed && d.version < m.from.version {
            // Our registration of the base is still on its way.
            return Some(Ok(Outcome::Poll));
        }
        moot(MootReason::ChainMoved {
            registered: d.version,
        });
        return None;
    }
    let step = WatcherStep::Progress {
        from: m.from.version,
        version,
    };
    let req = ProgressRequest {
        params: core.params.clone(),
        from: m.from,
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
            forced.status.send_replace(Forcing::Landed(version));
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
        Err(E::AlreadyConcluded) => {
            moot(MootReason::Concluded);
            Some(Ok(Outcome::Poll))
        }
        // The chain moved between our read and the transaction: read again.
        Err(E::WrongState) => Some(Ok(Outcome::Poll)),
        Err(e) if e.is_transient() => Some(Err((step, e.into()))),
        Err(e) => {
            moot(MootReason::Refused(Arc::new(e)));
            None
        }
    }
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
