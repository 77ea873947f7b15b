//! The update protocol.
//!
//! The proposer signs *last*: it sends the unsigned next state to every
//! peer; each checks the transition, asks its handler, signs, persists its
//! signature and replies; the proposer then signs, persists the fully
//! signed state and hands the full signature set out in an
//! `UpdateCommit`. So nobody has signed a state that could lose a
//! conflict, and no participant ever signs two states with one version:
//! when two participants propose at once, the lower index wins and the
//! other one, which has not signed its own proposal, signs the winner's.

use std::sync::Arc;

use perun_channel::{Phase, SignedState, State};
use perun_persistence::Change;
use perun_wire::{
    Message, PeerId, RejectKind, Responder, Update, UpdateAccept, UpdateCommit, UpdateReject,
};
use tracing::{Instrument, debug, info_span, warn};

use crate::channel::{ChannelCore, persist};
use crate::client::Inner;
use crate::handler::{IncomingUpdate, UpdateResponder};
use crate::{Error, Result};

/// Runs one update we propose, start to finish.
pub(crate) async fn propose(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    f: impl FnOnce(&mut State) -> std::result::Result<(), String>,
) -> Result<SignedState> {
    let _one = core.update_lock.lock().await;
    let span = info_span!("update", channel = %core.id, me = core.index);
    async {
        // An update a peer proposed may still be waiting for its commit.
        core.wait_phase(inner.timeouts.update_wait, "earlier update", |p| {
            p != Phase::Updating
        })
        .await?;
        let (next, hash) = {
            let mut l = core.locked.lock().await;
            let cur = l.machine.current().ok_or(Error::Phase(l.machine.phase()))?;
            let mut next = cur.state.next();
            f(&mut next).map_err(Error::InvalidUpdate)?;
            l.machine
                .stage_update(next.clone(), core.index, inner.app.as_ref())?;
            l.staged_actor = Some(core.index);
            core.publish(&l.machine);
            let hash = next.hash();
            (next, hash)
        };
        let msg = Message::Update(Update {
            channel_id: core.id,
            state: next.clone(),
            actor: core.index,
        });
        let replies = inner.broadcast(core, &msg).await;

        let mut l = core.locked.lock().await;
        let ours = l.staged_actor == Some(core.index)
            && l.machine.staged().is_some_and(|s| s.state.hash() == hash);
        if !ours {
            // A lower-indexed participant's update replaced ours.
            return Err(Error::Conflict);
        }
        let mut failure = None;
        let mut sigs = Vec::with_capacity(replies.len());
        for (peer, index, reply) in replies {
            match reply {
                Ok(Message::UpdateAccept(a))
                    if a.channel_id == core.id && a.version == next.version && a.index == index =>
                {
                    sigs.push((index, a.signature))
                }
                Ok(Message::UpdateReject(r)) if r.channel_id == core.id => {
                    failure.get_or_insert(match r.kind {
                        RejectKind::Conflict => Error::Conflict,
                        RejectKind::Refused => Error::Rejected {
                            index,
                            reason: r.reason,
                        },
                    });
                }
                Ok(other) => {
                    warn!(%peer, ?other, "unexpected reply to an update");
                    failure.get_or_insert(Error::Protocol {
                        peer,
                        reason: "unexpected reply to an update".into(),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e.into());
                }
            }
        }
        let mut trial = l.machine.clone();
        if failure.is_none() {
            for (index, sig) in sigs {
                if let Err(e) = trial.add_signature(index, sig) {
                    warn!(index, error = %e, "peer signed badly");
                    failure = Some(e.into());
                    break;
                }
            }
        }
        if let Some(e) = failure {
            // Nobody has our signature on this state: dropping it is safe.
            l.drop_staged(core);
            return Err(e);
        }
        trial.sign_staged(inner.account.as_ref())?;
        trial.commit_staged()?;
        let full = match l.commit_trial(inner, core, trial).await {
            Ok(full) => full,
            Err(e) => {
                // Our signature never left: dropping the update is safe. The
                // peers' signatures stay with them until a `Sync` completes it.
                l.drop_staged(core);
                return Err(e);
            }
        };
        drop(l);
        send_commit(inner, core, &full).await;
        debug!(version = full.state.version, "update committed");
        Ok(full)
    }
    .instrument(span)
    .await
}

/// Hands the full signature set to every peer. A peer that misses it
/// learns the state on its next `Sync`; our state is already durable.
pub(crate) async fn send_commit(inner: &Arc<Inner>, core: &Arc<ChannelCore>, full: &SignedState) {
    let Ok(signatures) = full.signatures() else {
        return;
    };
    let msg = Message::UpdateCommit(UpdateCommit {
        channel_id: core.id,
        version: full.state.version,
        index: core.index,
        signatures,
    });
    for (peer, _, reply) in inner.broadcast(core, &msg).await {
        match reply {
            Ok(Message::Ack) => {}
            other => warn!(%peer, ?other, "peer did not acknowledge the commit"),
        }
    }
}

fn reject(core: &ChannelCore, version: u64, kind: RejectKind, reason: String) -> Message {
    Message::UpdateReject(UpdateReject {
        channel_id: core.id,
        version,
        index: core.index,
        reason,
        kind,
    })
}

/// Answers an `Update` a peer proposed.
pub(crate) async fn handle_update(
    inner: Arc<Inner>,
    peer: PeerId,
    u: Update,
    responder: Responder,
) {
    let Some(core) = inner.channel_core(&u.channel_id) else {
        warn!(%peer, channel = %u.channel_id, "update for an unknown channel");
        let _ = responder.reply(Message::UpdateReject(UpdateReject {
            channel_id: u.channel_id,
            version: u.state.version,
            index: 0,
            reason: "unknown channel".into(),
            kind: RejectKind::Refused,
        }));
        return;
    };
    let span = info_span!("handle_update", channel = %core.id, me = core.index, actor = u.actor);
    let reply = respond_update(&inner, &core, peer, u)
        .instrument(span)
        .await;
    let _ = responder.reply(reply);
}

async fn respond_update(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    peer: PeerId,
    u: Update,
) -> Message {
    let version = u.state.version;
    if u.actor == core.index || core.peer_index(&peer) != Some(u.actor) {
        warn!(%peer, actor = u.actor, "update from a peer that is not its actor");
        return reject(
            core,
            version,
            RejectKind::Refused,
            "sender is not the actor".into(),
        );
    }
    let hash = u.state.hash();
    if core.phase() == Phase::Funding {
        // The proposer saw every deposit a moment before we did.
        let _ = core
            .wait_phase(inner.timeouts.update_wait, "funding", |p| {
                p != Phase::Funding
            })
            .await;
    }
    let request = {
        let mut l = core.locked.lock().await;
        if l.machine.phase() == Phase::Updating {
            let mine = l.staged_actor == Some(core.index);
            let unsigned_by_me = l
                .machine
                .staged()
                .is_some_and(|s| s.sigs.get(core.index).is_none_or(Option::is_none));
            if mine && unsigned_by_me && u.actor < core.index {
                // The lower index wins; we have not signed our own proposal.
                debug!("concurrent update: the peer's lower index wins");
                if let Err(e) = l.machine.discard_staged() {
                    return reject(core, version, RejectKind::Conflict, e.to_string());
                }
                l.staged_actor = None;
            } else {
                return reject(
                    core,
                    version,
                    RejectKind::Conflict,
                    "update in flight".into(),
                );
            }
        }
        let Some(cur) = l.machine.current().map(|c| c.state.clone()) else {
            return reject(
                core,
                version,
                RejectKind::Refused,
                "channel not open".into(),
            );
        };
        if let Err(e) = l
            .machine
            .stage_update(u.state.clone(), u.actor, inner.app.as_ref())
        {
            warn!(%peer, error = %e, "invalid update");
            core.publish(&l.machine);
            return reject(core, version, RejectKind::Refused, e.to_string());
        }
        l.staged_actor = Some(u.actor);
        core.publish(&l.machine);
        IncomingUpdate {
            params: core.params.clone(),
            index: core.index,
            current: cur,
            next: u.state,
            actor: u.actor,
        }
    };

    let decision = ask_handler(inner, request).await;

    let mut l = core.locked.lock().await;
    let still_staged = l.staged_actor == Some(u.actor)
        && l.machine.staged().is_some_and(|s| s.state.hash() == hash);
    if !still_staged {
        return reject(core, version, RejectKind::Conflict, "superseded".into());
    }
    if let Err(reason) = decision {
        l.drop_staged(core);
        return reject(core, version, RejectKind::Refused, reason);
    }
    // Persist our signature before it leaves this process.
    let mut trial = l.machine.clone();
    let signed = trial
        .sign_staged(inner.account.as_ref())
        .map_err(Error::from)
        .map(|sig| (sig, trial.staged().cloned()));
    let sig = match signed {
        Ok((sig, Some(staged))) => {
            crate::failpoint::hit("update_before_persist").await;
            match persist(inner, core.id, vec![Change::Staged(staged)]).await {
                Ok(()) => {
                    crate::failpoint::hit("update_after_persist").await;
                    sig
                }
                Err(e) => {
                    warn!(error = %e, "could not persist our signature; refusing");
                    l.drop_staged(core);
                    return reject(core, version, RejectKind::Refused, "internal error".into());
                }
            }
        }
        Ok((_, None)) | Err(_) => {
            l.drop_staged(core);
            return reject(core, version, RejectKind::Refused, "cannot sign".into());
        }
    };
    l.machine = trial;
    Message::UpdateAccept(UpdateAccept {
        channel_id: core.id,
        version,
        index: core.index,
        signature: sig,
    })
}

async fn ask_handler(
    inner: &Arc<Inner>,
    request: IncomingUpdate,
) -> std::result::Result<(), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handler = inner.update_handler.clone();
    tokio::spawn(async move { handler.handle_update(request, UpdateResponder { tx }).await });
    match tokio::time::timeout(inner.timeouts.handler, rx).await {
        Ok(Ok(d)) => d,
        Ok(Err(_)) => Err("no decision".into()),
        Err(_) => Err("decision timed out".into()),
    }
}

/// Completes a staged state with the full signature set from its proposer.
pub(crate) async fn handle_commit(
    inner: Arc<Inner>,
    peer: PeerId,
    c: UpdateCommit,
    responder: Responder,
) {
    let reply = match inner.channel_core(&c.channel_id) {
        None => {
            warn!(%peer, channel = %c.channel_id, "commit for an unknown channel");
            Err("unknown channel".to_string())
        }
        Some(core) => {
            let span = info_span!("handle_commit", channel = %core.id, version = c.version);
            apply_commit(&inner, &core, peer, c).instrument(span).await
        }
    };
    let _ = match reply {
        Ok(()) => responder.reply(Message::Ack),
        Err(reason) => responder.refuse(perun_wire::Refusal::new(
            perun_wire::RefusalCode::Malformed,
            reason,
        )),
    };
}

async fn apply_commit(
    inner: &Arc<Inner>,
    core: &Arc<ChannelCore>,
    peer: PeerId,
    c: UpdateCommit,
) -> std::result::Result<(), String> {
    if core.peer_index(&peer) != Some(c.index) {
        warn!(%peer, index = c.index, "commit from a peer that is not who it claims");
        return Err("sender is not the participant it claims".into());
    }
    let mut l = core.locked.lock().await;
    if l.machine
        .current()
        .is_some_and(|s| s.state.version >= c.version)
    {
        return Ok(()); // Already have it (a repeated commit).
    }
    let Some(staged) = l.machine.staged() else {
        return Err("nothing staged".into());
    };
    if staged.state.version != c.version || l.staged_actor.is_some_and(|a| a != c.index) {
        warn!(%peer, "commit does not match the staged update");
        return Err("commit does not match the staged update".into());
    }
    if c.signatures.len() != core.params.participants.len() {
        return Err("wrong number of signatures".into());
    }
    let mut trial = l.machine.clone();
    for (i, sig) in c.signatures.iter().enumerate() {
        let have = trial
            .staged()
            .and_then(|s| s.sigs.get(i).copied().flatten());
        if have.is_none()
            && let Err(e) = trial.add_signature(i, *sig)
        {
            warn!(%peer, index = i, error = %e, "bad signature in commit");
            return Err(e.to_string());
        }
    }
    trial.commit_staged().map_err(|e| e.to_string())?;
    l.commit_trial(inner, core, trial)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
