//! Closing a channel: cooperatively when the peers answer, on-chain alone
//! when they do not.

use std::sync::Arc;

use perun_adjudicator::{SignedChannel, WithdrawRequest};
use perun_channel::Phase;
use tracing::{Instrument, info, info_span, warn};

use crate::channel::{ChannelCore, set_phase};
use crate::client::Inner;
use crate::{Error, Result, watcher};

pub(crate) async fn settle(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    let span = info_span!("settle", channel = %core.id, me = core.index);
    async {
        // Both sides may settle at once: their final updates conflict, and
        // the loser signs the winner's. Retry a few times before going on-chain.
        let mut attempts = 0;
        while matches!(core.phase(), Phase::Active | Phase::Updating) {
            attempts += 1;
            let finalise = crate::update::propose(inner, core, |s| {
                s.isFinal = true;
                Ok(())
            });
            match tokio::time::timeout(inner.timeouts.settle_cooperative, finalise).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.is_retryable() && attempts < 4 => {
                    let _ = core
                        .wait_phase(inner.timeouts.update_wait, "peer's update", |p| {
                            p != Phase::Updating
                        })
                        .await;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "peers did not sign the final state; closing on-chain");
                    return dispute_close(inner, core).await;
                }
                Err(_) => {
                    warn!("peers are silent; closing on-chain");
                    return dispute_close(inner, core).await;
                }
            }
        }
        match core.phase() {
            Phase::Final | Phase::Concluded => conclude_and_withdraw(inner, core).await,
            Phase::Withdrawn => Ok(()),
            Phase::Funding | Phase::Registered => dispute_close(inner, core).await,
            p => Err(Error::Phase(p)),
        }
    }
    .instrument(span)
    .await
}

/// Registers our latest state (unless a dispute runs already) and drives
/// the dispute until our funds are withdrawn.
async fn dispute_close(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    watcher::force_close(inner, core).await?;
    watcher::until_withdrawn(inner, core).await
}

/// From `Final` (or a concluded channel): conclude on-chain, then withdraw our share.
pub(crate) async fn conclude_and_withdraw(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
) -> Result<()> {
    let _one = core.act_lock.lock().await;
    let (phase, current) = {
        let l = core.locked.lock().await;
        (l.machine.phase(), l.machine.current().cloned())
    };
    let current = current.ok_or(Error::Phase(phase))?;
    if phase == Phase::Final {
        let req = SignedChannel {
            params: core.params.clone(),
            state: current.clone(),
        };
        match inner.adjudicator.conclude(&req).await {
            Ok(()) | Err(perun_adjudicator::Error::AlreadyConcluded) => {}
            Err(e) => return Err(e.into()),
        }
        set_phase(inner, core, Phase::Concluded).await?;
        info!(version = current.state.version, "concluded");
        crate::failpoint::hit("settle_concluded").await;
    }
    if core.phase() == Phase::Concluded {
        let req = WithdrawRequest {
            params: core.params.clone(),
            state: current.state.clone(),
            index: core.index,
            account: inner.account.clone(),
            receiver: inner.account.address(),
        };
        inner.adjudicator.withdraw(&req).await?;
        set_phase(inner, core, Phase::Withdrawn).await?;
        info!("withdrawn");
    }
    match core.phase() {
        Phase::Withdrawn => Ok(()),
        p => Err(Error::Phase(p)),
    }
}
