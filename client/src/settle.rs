//! Closing a channel: cooperatively when the peers answer, on-chain alone
//! when they do not. Either way the channel's watcher takes the on-chain
//! steps (with its retries); `settle` waits for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use perun_channel::Phase;
use tokio::sync::broadcast::error::RecvError;
use tracing::{Instrument, info, info_span, warn};

use crate::core::{ChannelCore, Shared};
use crate::event::ChannelEvent;
use crate::{Error, Result, watcher};

/// Consecutive failed watcher steps after which `settle` stops waiting
/// (the watcher goes on trying in the background).
pub(crate) const SETTLE_MAX_FAILURES: u32 = 20;

pub(crate) async fn settle(shared: &Arc<Shared>, core: &Arc<ChannelCore>) -> Result<()> {
    // A stopped client starts no close: a failed final update would go
    // on-chain and store `Registered`, which the next start acts on.
    if shared.stopped() {
        return Err(Error::Closed);
    }
    let span = info_span!("settle", channel = %core.id, me = core.index);
    async {
        // Listen before anything happens, so no retry report is missed.
        let events = core.subscribe_events();
        // Both sides may settle at once: their final updates conflict, and
        // the loser signs the winner's. Retry a few times before going on-chain.
        let mut attempts = 0;
        while matches!(core.phase(), Phase::Active | Phase::Updating) {
            attempts += 1;
            let finalise = crate::update::propose(shared, core, |s| {
                s.isFinal = true;
                Ok(())
            });
            let res = tokio::time::timeout(shared.timeouts.settle_cooperative, finalise).await;
            if core.phase() == Phase::Final {
                // Ours or a peer's final update went through.
                break;
            }
            if !matches!(core.phase(), Phase::Active | Phase::Updating) {
                // The watcher moved the channel on meanwhile (a dispute runs on-chain).
                info!(phase = ?core.phase(), "a dispute runs on-chain; the watcher settles the channel");
                break;
            }
            match res {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.is_retryable() && attempts < 4 => {
                    let _ = core
                        .wait_phase(shared.timeouts.update_wait, "peer's update", |p| {
                            p != Phase::Updating
                        })
                        .await;
                }
                // Stopped meanwhile: the final update failed because the
                // client stopped, not because the peers would not sign.
                Ok(Err(_)) | Err(_) if shared.stopped() => return Err(Error::Closed),
                Ok(Err(e)) => {
                    warn!(error = %e, "peers did not sign the final state; closing on-chain");
                    watcher::force_close(shared, core).await?;
                }
                Err(_) => {
                    warn!("peers are silent; closing on-chain");
                    watcher::force_close(shared, core).await?;
                }
            }
        }
        match core.phase() {
            Phase::Withdrawn => return Ok(()),
            Phase::Final => core.settling.store(true, Ordering::SeqCst),
            // A channel whose funding failed: recover the deposits.
            Phase::Funding => watcher::force_close(shared, core).await?,
            Phase::Registered | Phase::Concluded => {}
            p => return Err(Error::Phase(p)),
        }
        // Starts the watcher, or wakes it for a fresh look at the chain.
        watcher::spawn(shared, core);
        until_withdrawn(shared, core, events).await
    }
    .instrument(span)
    .await
}

/// Waits until the channel is withdrawn; fails with [`Error::Stalled`]
/// once a watcher step failed [`SETTLE_MAX_FAILURES`] times in a row (or the
/// watcher had to be restarted that often), and with [`Error::Closed`] when
/// the client shuts down.
async fn until_withdrawn(
    shared: &Shared,
    core: &ChannelCore,
    mut events: tokio::sync::broadcast::Receiver<ChannelEvent>,
) -> Result<()> {
    let mut phase = core.phase_changes();
    let mut restarts = 0u32;
    loop {
        if *phase.borrow_and_update() == Phase::Withdrawn {
            return Ok(());
        }
        tokio::select! {
            changed = phase.changed() => if changed.is_err() {
                return Err(Error::Closed);
            },
            ev = events.recv() => match ev {
                // `attempt` counts failures in a row: the watcher resets it
                // whenever a step (a read, too) succeeds.
                Ok(ChannelEvent::Retry { attempt, error, .. }) if attempt >= SETTLE_MAX_FAILURES => {
                    return Err(Error::Stalled { attempts: attempt, last: error });
                }
                Ok(ChannelEvent::WatcherRestarted { error }) => {
                    restarts += 1;
                    if restarts >= SETTLE_MAX_FAILURES {
                        return Err(Error::Stalled { attempts: restarts, last: error });
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(Error::Closed),
            },
            () = shared.stopping() => return Err(Error::Closed),
        }
    }
}
