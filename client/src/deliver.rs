//! Handing fully signed states and aborts to peers.
//!
//! A commit is retried a few times; a peer that still has not taken it is
//! marked *unsynced* for the channel, and the resync task (`sync.rs`)
//! exchanges `Sync` with it as soon as it can be reached, so a responder is
//! never left `Updating` for good.

use std::sync::Arc;

use perun_channel::SignedState;
use perun_wire::{Message, PeerId, RejectKind, UpdateCommit, UpdateReject};
use tracing::{debug, warn};

use crate::core::{ChannelCore, InFlight, Shared, lock};

/// Pauses between attempts to hand a commit to a peer that did not take it.
const COMMIT_RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(5),
];

/// Hands the full signature set to every peer in the background (an update
/// returned to its proposer already), retrying a peer that did not
/// acknowledge it (a repeated commit is harmless).
pub(crate) async fn deliver_commit(
    shared: Arc<Shared>,
    core: Arc<ChannelCore>,
    commit: UpdateCommit,
    _in_flight: InFlight,
) {
    hand_out(
        &shared,
        &core,
        Message::UpdateCommit(commit),
        &COMMIT_RETRIES,
    )
    .await;
}

/// Hands the full signature set to every peer once.
pub(crate) async fn send_commit(shared: &Arc<Shared>, core: &Arc<ChannelCore>, full: &SignedState) {
    if let Some(commit) = commit_of(core, full) {
        send_update_commit(shared, core, commit).await;
    }
}

/// [`send_commit`] of a commit made already.
pub(crate) async fn send_update_commit(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    commit: UpdateCommit,
) {
    hand_out(shared, core, Message::UpdateCommit(commit), &[]).await;
}

/// Sends the commit, then again after each pause to the peers that did not
/// take it; a peer still without it is marked unsynced: it gets the state
/// with the next `Sync`.
async fn hand_out(
    shared: &Arc<Shared>,
    core: &ChannelCore,
    msg: Message,
    retries: &[std::time::Duration],
) {
    let mut missing = unacked(shared, &msg, peers_of(core)).await;
    for pause in retries {
        if missing.is_empty() || shared.stopped() {
            break;
        }
        tokio::time::sleep(*pause).await;
        missing = unacked(shared, &msg, missing).await;
    }
    if !missing.is_empty() {
        if retries.is_empty() {
            debug!(
                ?missing,
                "peers did not take the commit; they get it by Sync"
            );
        } else {
            warn!(
                ?missing,
                "peers did not take the commit; they get it by Sync once reachable"
            );
        }
        for peer in missing {
            mark_unsynced(shared, core.id, peer);
        }
    }
}

/// Tells the peers that signed a failed update of ours to drop it; a peer
/// that does not take the abort is marked unsynced (a `Sync` shows it we no
/// longer hold the update).
pub(crate) async fn send_abort(
    shared: &Arc<Shared>,
    core: &ChannelCore,
    version: u64,
    signed_by: Vec<PeerId>,
) {
    if signed_by.is_empty() {
        return;
    }
    let abort = reject(core, version, RejectKind::Refused, "update aborted".into());
    let missing = unacked(shared, &abort, signed_by).await;
    if !missing.is_empty() {
        warn!(
            ?missing,
            version, "peers did not take the abort; they drop the update on their next sync"
        );
        for peer in missing {
            mark_unsynced(shared, core.id, peer);
        }
    }
}

/// Remembers that `peer` may not know our latest state of `channel`, and
/// wakes the resync (started by the client: `sync::spawn_resync`).
pub(crate) fn mark_unsynced(shared: &Shared, channel: perun_channel::ChannelId, peer: PeerId) {
    keep_unsynced(shared, channel, peer);
    let _ = shared.resync_wake.send(peer);
}

/// Marks `peer` unsynced for `channel` without waking its resync worker
/// (the worker itself, putting back a channel it could not sync yet).
pub(crate) fn keep_unsynced(shared: &Shared, channel: perun_channel::ChannelId, peer: PeerId) {
    lock(&shared.unsynced)
        .entry(peer)
        .or_default()
        .insert(channel);
}

/// Our commit of `full`: its full signature set (`None` if one is missing).
pub(crate) fn commit_of(core: &ChannelCore, full: &SignedState) -> Option<UpdateCommit> {
    let signatures = full.signatures().ok()?;
    Some(UpdateCommit {
        channel_id: core.id,
        version: full.state.version,
        index: core.index,
        signatures,
    })
}

/// Every participant but us.
fn peers_of(core: &ChannelCore) -> Vec<PeerId> {
    core.others().map(|(_, p)| p).collect()
}

/// Sends `msg` to `peers` at once; returns those that did not answer `Ack`.
async fn unacked(shared: &Shared, msg: &Message, peers: Vec<PeerId>) -> Vec<PeerId> {
    let sends = peers
        .into_iter()
        .map(|peer| async move { (peer, shared.wire.send(peer, msg).await) });
    let mut missing = Vec::new();
    for (peer, reply) in futures::future::join_all(sends).await {
        if !matches!(reply, Ok(Message::Ack)) {
            debug!(%peer, ?reply, "peer did not acknowledge");
            missing.push(peer);
        }
    }
    missing
}

/// Our `UpdateReject` for `version`.
pub(crate) fn reject(
    core: &ChannelCore,
    version: u64,
    kind: RejectKind,
    reason: String,
) -> Message {
    Message::UpdateReject(UpdateReject {
        channel_id: core.id,
        version,
        index: core.index,
        reason,
        kind,
    })
}
