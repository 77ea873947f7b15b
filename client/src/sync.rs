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
//!
//! # When a `Sync` happens
//! - after a restore, with every peer of every open channel;
//! - whenever a channel may disagree with a peer: a commit or abort the
//!   peer did not take, a commit we waited for in vain (`sweep_commits`),
//!   our own update whose answer got lost, a restore sync that failed, a
//!   peer's proposal we refuse as no valid move from our state. Such
//!   a (channel, peer) pair is *unsynced*; a resync worker per peer syncs
//!   it with backoff until it succeeds, and at once when the peer's
//!   connection comes back.

use std::sync::Arc;

use perun_channel::{Phase, SignedState};
use perun_wire::{Message, PeerId, Refusal, RefusalCode, Responder, Sync};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::core::{ChannelCore, Locked, Shared, lock};
use crate::deliver::{keep_unsynced, mark_unsynced, send_commit};
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
    shared: &Arc<Shared>,
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
        l.commit_trial(shared, core, trial).await?;
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
    forget_pending_the_peer_lacks(&mut l, theirs);
    let Some(staged) = &theirs.staged else {
        return Ok(None);
    };
    let Some(cur) = cur else {
        return Ok(None);
    };
    if staged.state.version > cur {
        // Whatever happens to it, nobody may sign that version again with
        // other contents: propose past it.
        l.burn(shared, core, staged.state.version).await;
    }
    // A state the peer signed for our update that we never completed.
    // ... and only on the state it was built on: on a newer one it would
    // undo the updates in between.
    let base_now = l.machine.current().map(|c| c.state.version);
    let ours = l
        .pending
        .is_some_and(|p| p.proposal == staged.state.hash() && Some(p.base) == base_now);
    if !ours || l.machine.phase() != Phase::Active || core.params.participants.len() != 2 {
        return Ok(None);
    }
    if shared.stopped() {
        // A stopped client signs nothing (see `update::respond_update`).
        return Ok(None);
    }
    let mut trial = l.machine.clone();
    if let Err(e) = trial.stage_update(
        staged.state.clone(),
        core.index,
        shared.apps.rules(&core.params)?,
    ) {
        warn!(%peer, error = %e, "peer's staged state is not an update of ours; ignored");
        return Ok(None);
    }
    for (i, sig) in staged.sigs.iter().enumerate() {
        if let (Some(sig), true) = (sig, i != core.index) {
            trial.add_signature(i, *sig)?;
        }
    }
    trial.sign_staged(shared.account.as_ref())?;
    trial.commit_staged()?;
    let full = l.commit_trial(shared, core, trial).await?;
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
    l: &mut Locked,
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

/// Forgets our failed proposal (`Locked::pending`) once the peer's `Sync`
/// shows it holds neither that state nor anything newer: it refused it or
/// has not got it yet. Only we could complete it, from a `Sync` that shows
/// the peer signed it; keeping it for a signature that may come later
/// would keep what it reserved (a payment in doubt) out of reach, and a
/// peer that does sign it later drops it once our `Sync` shows we do not
/// hold it. Safe whatever the peer says: our signature never left, so a
/// peer that claims to lack the state only gives up its own chance to
/// have it. (Only 2-party channels have a `pending`; the peer's index was
/// checked by the caller.)
fn forget_pending_the_peer_lacks(l: &mut Locked, theirs: &Sync) {
    let Some(p) = l.pending else {
        return;
    };
    let holds = theirs
        .staged
        .as_ref()
        .is_some_and(|s| s.state.hash() == p.proposal);
    if !holds && theirs.latest.state.version <= p.base {
        debug!(
            base = p.base,
            "the peer does not hold our failed proposal; forgetting it"
        );
        l.pending = None;
    }
}

/// Answers a peer's `Sync`: merge theirs, reply with ours.
pub(crate) async fn handle_sync(shared: Arc<Shared>, peer: PeerId, s: Sync, responder: Responder) {
    let Some(core) = shared.channel_core(&s.channel_id) else {
        let _ = responder.refuse(Refusal::new(RefusalCode::Unauthorized, "unknown channel"));
        return;
    };
    if core.peer_index(&peer) != Some(s.index) {
        crate::dispatch::warn_limited!(%peer, index = s.index, "sync from a peer that is not who it claims");
        let _ = responder.refuse(Refusal::new(RefusalCode::Unauthorized, "wrong participant"));
        return;
    }
    let span = info_span!("handle_sync", channel = %core.id, %peer);
    async {
        let completed = match merge(&shared, &core, peer, &s, None).await {
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
            send_commit(&shared, &core, &full).await;
        }
    }
    .instrument(span)
    .await
}

/// Sends our `Sync` to every peer and merges their answers (after a
/// restore). A peer that cannot be reached is retried with backoff for
/// `timeouts.sync` (it may be restarting too), then left to the resync.
pub(crate) async fn sync_with_peers(shared: &Arc<Shared>, core: &Arc<ChannelCore>) -> Result<()> {
    let span = info_span!("sync", channel = %core.id);
    async {
        let syncs = core
            .others()
            .map(|(i, peer)| sync_retrying(shared, core, i, peer));
        for res in futures::future::join_all(syncs).await {
            res?;
        }
        Ok::<(), Error>(())
    }
    .instrument(span)
    .await
}

async fn sync_retrying(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    index: usize,
    peer: PeerId,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + shared.timeouts.sync;
    let mut attempt = 0;
    loop {
        match exchange(shared, core, index, peer).await {
            Ok(()) => return Ok(()),
            Err(Exchange::Merge(e)) => return Err(e),
            Err(Exchange::Refused(e)) => {
                warn!(%peer, error = %e, "peer refused our sync");
                return Ok(());
            }
            Err(Exchange::Unreachable(e)) => {
                attempt += 1;
                let pause = shared.timeouts.backoff(attempt);
                if tokio::time::Instant::now() + pause >= deadline {
                    debug!(%peer, error = %e, "peer unreachable; it is synced once reachable");
                    mark_unsynced(shared, core.id, peer);
                    return Ok(());
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.stopping() => return Ok(()),
                }
            }
        }
    }
}

/// Why one `Sync` exchange failed.
enum Exchange {
    /// The peer did not answer: try again later.
    Unreachable(Error),
    /// The peer answered, but not with a `Sync` (it refused: it does not
    /// know the channel, or it is not open there): retrying will not help.
    Refused(Error),
    /// Its answer could not be merged (a bad state, a failed write).
    Merge(Error),
}

/// One `Sync` request to `peer` and the merge of its answer.
async fn exchange(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    index: usize,
    peer: PeerId,
) -> std::result::Result<(), Exchange> {
    let Some(mine) = ours(core).await else {
        return Ok(());
    };
    let sent = mine.staged.as_ref().map(|st| st.state.hash());
    match shared.wire.send(peer, &Message::Sync(mine)).await {
        Ok(Message::Sync(theirs)) if theirs.channel_id == core.id && theirs.index == index => {
            let completed = merge(shared, core, peer, &theirs, Some(sent))
                .await
                .map_err(Exchange::Merge)?;
            if let Some(full) = completed {
                send_commit(shared, core, &full).await;
            }
            Ok(())
        }
        Ok(other) => {
            crate::dispatch::warn_limited!(%peer, ?other, "bad reply to sync");
            Err(Exchange::Refused(Error::Protocol {
                peer,
                reason: "bad reply to sync".into(),
            }))
        }
        // A `Busy` or `Stalled` refusal is the peer's load, not its answer.
        Err(e) if e.is_transient() => Err(Exchange::Unreachable(e.into())),
        Err(e @ perun_wire::Error::Refused(_)) => Err(Exchange::Refused(e.into())),
        Err(e) => Err(Exchange::Unreachable(e.into())),
    }
}

/// Starts the client's resync: a worker per peer with unsynced channels,
/// woken by new marks and by the peer's connection coming back. Runs until
/// the client stops.
pub(crate) fn spawn_resync(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let mut marks = shared.resync_wake.subscribe();
    let mut peers = shared.wire.peer_events();
    tokio::spawn(async move {
        loop {
            // Only a weak reference while waiting: a client dropped without
            // `shutdown` must be freed.
            let Some(stopped) = weak.upgrade().map(|s| s.stop.subscribe()) else {
                return;
            };
            let mut stopped = stopped;
            let peer = tokio::select! {
                m = marks.recv() => match m {
                    Ok(peer) => Some(peer),
                    // Missed some marks: look at every peer.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                ev = peers.recv() => match ev {
                    Ok(perun_wire::PeerEvent::Connected(peer)) => {
                        debug!(%peer, "peer connected");
                        Some(peer)
                    }
                    Ok(perun_wire::PeerEvent::Disconnected(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = stopped.wait_for(|s| *s) => return,
            };
            let Some(shared) = weak.upgrade() else { return };
            let peers: Vec<PeerId> = match peer {
                Some(p) => vec![p],
                None => lock(&shared.unsynced).keys().copied().collect(),
            };
            for peer in peers {
                poke_resync(&shared, peer);
            }
        }
    });
    spawn_commit_sweep(shared);
}

/// Starts `peer`'s resync worker if it has unsynced channels, or wakes it.
fn poke_resync(shared: &Arc<Shared>, peer: PeerId) {
    if !lock(&shared.unsynced).contains_key(&peer) {
        return;
    }
    let mut workers = lock(&shared.resyncing);
    if let Some(poke) = workers.get(&peer) {
        poke.notify_one();
        return;
    }
    let poke = Arc::new(tokio::sync::Notify::new());
    workers.insert(peer, poke.clone());
    let span = info_span!(parent: None, "resync", %peer);
    tokio::spawn(resync_peer(shared.clone(), peer, poke).instrument(span));
}

/// Channels synced with one peer at once by its resync worker.
const RESYNC_CONCURRENCY: usize = 16;

/// Syncs every unsynced channel with `peer` until none is left; backs off
/// while the peer is unreachable, and tries at once when poked.
async fn resync_peer(shared: Arc<Shared>, peer: PeerId, poke: Arc<tokio::sync::Notify>) {
    use futures::StreamExt;
    let mut attempt = 0u32;
    loop {
        let ids: Vec<perun_channel::ChannelId> = {
            let mut unsynced = lock(&shared.unsynced);
            let ids: Vec<_> = unsynced
                .get(&peer)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            if ids.is_empty() {
                unsynced.remove(&peer);
                lock(&shared.resyncing).remove(&peer);
                debug!("in sync with the peer");
                return;
            }
            ids
        };
        // One channel at a time until one reaches the peer or not (a busy
        // one tells nothing): if the peer is away, do not try thousands.
        let mut results = Vec::new();
        let mut rest = ids.iter().copied();
        for id in rest.by_ref() {
            let r = resync_one(&shared, peer, id).await;
            results.push(r);
            if r != Resync::Busy {
                break;
            }
        }
        if results.last() == Some(&Resync::Done) {
            let more: Vec<Resync> = futures::stream::iter(rest)
                .map(|id| resync_one(&shared, peer, id))
                .buffer_unordered(RESYNC_CONCURRENCY)
                .collect()
                .await;
            results.extend(more);
        }
        let pause = if results.contains(&Resync::Unreachable) {
            attempt += 1;
            let pause = shared.timeouts.backoff(attempt);
            debug!(attempt, ?pause, "peer not reachable; resync later");
            pause
        } else if results.contains(&Resync::Busy) {
            // The peer answers; a channel's own update runs. Soon again,
            // without backing off: it ends within a request's time.
            attempt = 0;
            shared.timeouts.backoff(1)
        } else {
            attempt = 0;
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = poke.notified() => attempt = 0,
            () = shared.stopping() => {
                lock(&shared.resyncing).remove(&peer);
                return;
            }
        }
    }
}

/// How one channel's resync went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// Synced, or nothing left to sync.
    Done,
    /// One of our updates runs on the channel: it stays unsynced, to be
    /// tried again soon.
    Busy,
    /// The peer could not be reached: it stays unsynced.
    Unreachable,
}

/// Syncs one unsynced channel with `peer`.
async fn resync_one(shared: &Arc<Shared>, peer: PeerId, id: perun_channel::ChannelId) -> Resync {
    // Unmarked first: a mark made during the exchange (a commit it sends
    // that the peer does not take) must survive it.
    if let Some(set) = lock(&shared.unsynced).get_mut(&peer) {
        set.remove(&id);
    }
    let Some(core) = shared.channel_core(&id) else {
        return Resync::Done;
    };
    let (Some(index), true) = (
        core.peer_index(&peer),
        matches!(core.phase(), Phase::Active | Phase::Updating | Phase::Final),
    ) else {
        // Closing on-chain (or not our peer): nothing to agree on off-chain.
        return Resync::Done;
    };
    // No update of ours may start while our `Sync` is out: the peer takes a
    // `Sync` request as where we stand now. If one runs, try again later.
    let Ok(_quiet) = core.update_lock.try_lock() else {
        keep_unsynced(shared, id, peer);
        return Resync::Busy;
    };
    let span = info_span!("resync", channel = %id);
    match exchange(shared, &core, index, peer).instrument(span).await {
        Ok(()) => Resync::Done,
        Err(Exchange::Merge(e)) => {
            crate::dispatch::warn_limited!(channel = %id, error = %e, "peer's sync did not merge; not retried now");
            Resync::Done
        }
        Err(Exchange::Refused(e)) => {
            crate::dispatch::warn_limited!(channel = %id, error = %e, "peer refused our sync; not retried now");
            Resync::Done
        }
        Err(Exchange::Unreachable(e)) => {
            debug!(channel = %id, error = %e, "sync failed");
            keep_unsynced(shared, id, peer);
            Resync::Unreachable
        }
    }
}

/// Every so often, marks the channels whose commit did not come within
/// `update_wait` after we signed as unsynced with their proposer: a `Sync`
/// then brings the commit (or shows the update was given up), so a
/// responder is never left `Updating` by a proposer that answers. Again
/// every `update_wait` while the update stays staged.
fn spawn_commit_sweep(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let period = (shared.timeouts.update_wait / 2).max(std::time::Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { return };
            if shared.stopped() {
                return;
            }
            sweep_commits(&shared).await;
        }
    });
}

async fn sweep_commits(shared: &Arc<Shared>) {
    for core in shared.channel_cores() {
        if core.phase() != Phase::Updating {
            continue;
        }
        let ask: Vec<PeerId> = {
            let mut l = core.locked.lock().await;
            let late = l
                .signed_at
                .is_some_and(|at| at.elapsed() >= shared.timeouts.update_wait);
            if !late || l.machine.phase() != Phase::Updating {
                continue;
            }
            // Asked again after another `update_wait` while the update
            // stays: the peer's answer need not settle it (it may say it
            // still holds the update, then neither commit nor abort it).
            l.signed_at = Some(std::time::Instant::now());
            match l.staged_actor {
                // Our own proposal: its run (or its failure's sync) decides.
                Some(a) if a == core.index => Vec::new(),
                Some(a) => core.peers.get(a).copied().into_iter().collect(),
                // Restored: the proposer is not stored, so every peer.
                None => core.others().map(|(_, p)| p).collect(),
            }
        };
        for peer in ask {
            info!(channel = %core.id, %peer, "no commit for the update we signed; asking by Sync");
            mark_unsynced(shared, core.id, peer);
        }
    }
}
