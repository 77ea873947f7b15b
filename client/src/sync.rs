//! `Sync`: after a restart or reconnect, each side tells where it stands on
//! a channel, so a half-done update is completed or dropped on both sides.
//!
//! The proposer of an update signs last, so the only half-done state that
//! can exist is one some *responders* signed. Three cases:
//! - a side that missed the commit adopts the other's fully signed state;
//! - in a 2-party channel, the proposer completes a state the responder
//!   signed, but only if it is the very proposal it remembers failing
//!   (`Locked::pending`): a peer must never get us to sign a state we did
//!   not propose;
//! - otherwise the responder drops its staged state once its proposer shows
//!   it does not hold it (it restarted, or gave up). That version is burnt,
//!   and every side learns so and proposes past it.
//!
//! Every state taken from a peer is verified (all signatures, the
//! transition rule).

use std::sync::Arc;

use perun_channel::{Phase, SignedState};
use perun_wire::{Message, PeerId, Refusal, RefusalCode, Responder, Sync};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::channel::ChannelCore;
use crate::client::Inner;
use crate::update::send_commit;
use crate::{Error, Result};

/// Our `Sync` for a channel, if version 0 is fully signed.
async fn ours(core: &ChannelCore) -> Option<Sync> {
    let l = core.locked.lock().await;
    let latest = l.machine.current()?.clone();
    Some(Sync {
        channel_id: core.id,
        index: core.index,
        phase: l.machine.phase(),
        latest,
        staged: l.machine.staged().cloned(),
    })
}

/// Folds a peer's `Sync` into our machine. Returns a state we completed
/// (and must hand out with a commit).
///
/// `sent` is `Some(what we had staged when we sent our Sync)` when `theirs`
/// is the reply to it: the reply says nothing about a state we staged after
/// sending (its proposer may have proposed it since), so only that one may
/// be dropped. A peer's Sync *request* is current: a restored channel does
/// not propose before its sync is done.
async fn merge(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    peer: PeerId,
    theirs: &Sync,
    sent: Option<Option<perun_channel::B256>>,
) -> Result<Option<SignedState>> {
    let mut l = core.locked.lock().await;
    let cur = l.machine.current().map(|c| c.state.version);
    // A newer fully signed state: adopt it (the machine verifies every signature).
    if cur.is_some_and(|v| theirs.latest.state.version > v) {
        let mut trial = l.machine.clone();
        trial.adopt(theirs.latest.clone())?;
        l.commit_trial(inner, core, trial).await?;
        info!(
            version = theirs.latest.state.version,
            "adopted a state from sync"
        );
        return Ok(None);
    }
    let peer_index = core.peer_index(&peer);
    let staged_now = l.machine.staged().map(|st| st.state.hash());
    if sent.is_none_or(|sent| sent == staged_now) {
        abandon_if_proposer_dropped(core, &mut l, peer_index, theirs);
    }
    let Some(staged) = &theirs.staged else {
        return Ok(None);
    };
    let Some(cur) = cur else {
        return Ok(None);
    };
    if staged.state.version > cur {
        // Whatever happens to it, nobody may sign that version again with
        // other contents: propose past it.
        l.burnt = l.burnt.max(staged.state.version);
    }
    // A state the peer signed for our update that we never completed.
    let ours = l.pending == Some(staged.state.hash());
    if !ours || l.machine.phase() != Phase::Active || core.params.participants.len() != 2 {
        return Ok(None);
    }
    let mut trial = l.machine.clone();
    if let Err(e) = trial.stage_update(staged.state.clone(), core.index, inner.app.as_ref()) {
        warn!(%peer, error = %e, "peer's staged state is not an update of ours; ignored");
        return Ok(None);
    }
    for (i, sig) in staged.sigs.iter().enumerate() {
        if let (Some(sig), true) = (sig, i != core.index) {
            trial.add_signature(i, *sig)?;
        }
    }
    trial.sign_staged(inner.account.as_ref())?;
    trial.commit_staged()?;
    let full = l.commit_trial(inner, core, trial).await?;
    l.pending = None;
    info!(
        version = full.state.version,
        "completed a half-done update from sync"
    );
    Ok(Some(full))
}

/// Drops our staged update if its proposer is `peer` (or unknown: restored
/// from disk) and
/// the peer's `Sync` shows it neither holds that state nor moved past it:
/// the proposer restarted or gave up, and can no longer complete it.
fn abandon_if_proposer_dropped(
    core: &ChannelCore,
    l: &mut crate::channel::Locked,
    peer_index: Option<usize>,
    theirs: &Sync,
) {
    let Some(staged) = l.machine.staged() else {
        return;
    };
    // A state restored from disk has no known proposer: any peer that
    // neither holds it nor moved past it shows it cannot be completed now
    // (and if it is completed after all, its commit still applies).
    let by_peer = match l.staged_actor {
        Some(a) => Some(a) == peer_index && a != core.index,
        None => true,
    };
    let held = theirs
        .staged
        .as_ref()
        .is_some_and(|s| s.state.hash() == staged.state.hash());
    if l.machine.phase() == Phase::Updating
        && by_peer
        && !held
        && theirs.latest.state.version < staged.state.version
    {
        debug!(
            version = staged.state.version,
            "the proposer no longer holds our staged update; dropping it"
        );
        l.abandon_staged(core);
    }
}

/// Answers a peer's `Sync`: merge theirs, reply with ours.
pub(crate) async fn handle_sync(inner: Arc<Inner>, peer: PeerId, s: Sync, responder: Responder) {
    let Some(core) = inner.channel_core(&s.channel_id) else {
        let _ = responder.refuse(Refusal::new(RefusalCode::Unauthorized, "unknown channel"));
        return;
    };
    if core.peer_index(&peer) != Some(s.index) {
        warn!(%peer, index = s.index, "sync from a peer that is not who it claims");
        let _ = responder.refuse(Refusal::new(RefusalCode::Unauthorized, "wrong participant"));
        return;
    }
    let span = info_span!("handle_sync", channel = %core.id, %peer);
    async {
        let completed = match merge(&inner, &core, peer, &s, None).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "sync carried an invalid state");
                None
            }
        };
        match ours(&core).await {
            Some(reply) => {
                let _ = responder.reply(Message::Sync(reply));
            }
            None => {
                let _ =
                    responder.refuse(Refusal::new(RefusalCode::Unauthorized, "channel not open"));
            }
        }
        if let Some(full) = completed {
            let _ = send_commit(&inner, &core, &full).await;
        }
    }
    .instrument(span)
    .await
}

/// Sends our `Sync` to every peer and merges their answers. A peer that
/// cannot be reached is retried with backoff for `timeouts.sync` (it may be
/// restarting too, or its address may not be known yet).
pub(crate) async fn sync_with_peers(inner: &Arc<Inner>, core: &Arc<ChannelCore>) -> Result<()> {
    let span = info_span!("sync", channel = %core.id);
    async {
        let peers: Vec<(usize, PeerId)> = core
            .peers
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| *i != core.index)
            .collect();
        let syncs = peers
            .into_iter()
            .map(|(i, peer)| sync_one(inner, core, i, peer));
        for res in futures::future::join_all(syncs).await {
            res?;
        }
        Ok::<(), Error>(())
    }
    .instrument(span)
    .await
}

async fn sync_one(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    index: usize,
    peer: PeerId,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + inner.timeouts.sync;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let Some(mine) = ours(core).await else {
            return Ok(());
        };
        let sent = mine.staged.as_ref().map(|st| st.state.hash());
        match inner.wire.send(peer, &Message::Sync(mine)).await {
            Ok(Message::Sync(theirs)) if theirs.channel_id == core.id && theirs.index == index => {
                if let Some(full) = merge(inner, core, peer, &theirs, Some(sent)).await? {
                    let _ = send_commit(inner, core, &full).await;
                }
                return Ok(());
            }
            Ok(other) => {
                warn!(%peer, ?other, "bad reply to sync");
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                debug!(%peer, error = %e, "sync failed; retrying");
                let mut stop = inner.stop.subscribe();
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                warn!(%peer, error = %e, "sync failed; the peer syncs when it is back");
                return Ok(());
            }
        }
    }
}
