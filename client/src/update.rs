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
//!
//! An update that fails after some peer signed it (another peer refused,
//! a conflict, a crash) burns its version: the proposer tells the peers
//! that signed to drop it (an `UpdateReject` sent as a request: an abort)
//! and its next proposal uses a higher version. Versions may skip numbers
//! (`limits::MAX_VERSION_STEP`), so a half-done update never blocks a
//! channel, with any number of participants.

use std::sync::Arc;

use perun_channel::{Phase, SignedState, State};
use perun_persistence::Change;
use perun_wire::{
    Message, PeerId, RejectKind, Responder, Update, UpdateAccept, UpdateCommit, UpdateReject,
    UpdateWithCommit,
};
use tracing::{Instrument, debug, error, info_span, warn};

use crate::core::{ChannelCore, HeldCommit, InFlight, Locked, Shared};
use crate::deliver::{deliver_commit, reject, send_abort};
use crate::handler::{IncomingUpdate, UpdateResponder};
use crate::later::{Chore, Later};
use crate::{Error, Result};

/// Runs one update we propose, start to finish.
pub(crate) async fn propose(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    f: impl FnOnce(&mut State) -> std::result::Result<(), String>,
) -> Result<SignedState> {
    let one = core.update_lock.clone().lock_owned().await;
    let span = info_span!("update", channel = %core.id, me = core.index);
    async {
        // A restored channel first tells its peers where it stands.
        if !*core.synced.borrow() {
            let mut synced = core.synced.subscribe();
            let wait = shared.timeouts.sync + shared.timeouts.update_wait;
            if tokio::time::timeout(wait, synced.wait_for(|s| *s))
                .await
                .is_err()
            {
                return Err(Error::Timeout("sync after restart"));
            }
        }
        // An update a peer proposed may still be waiting for its commit.
        // Waited for without the update lock: the resync that brings the
        // commit, or shows the update dead, takes it (held, a caller that
        // retries at once kept the resync out for good).
        let mut one = one;
        if core.phase() == Phase::Updating {
            let until = tokio::time::Instant::now() + shared.timeouts.update_wait;
            while core.phase() == Phase::Updating {
                drop(one);
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                core.wait_phase(left, "earlier update", |p| p != Phase::Updating)
                    .await?;
                one = core.update_lock.clone().lock_owned().await;
            }
        }
        let (next, hash, base, burst, ride) = {
            let mut l = core.locked.lock().await;
            let cur = l.machine.current().ok_or(Error::Phase(l.machine.phase()))?;
            // The state this proposal builds on. The current state only
            // ever moves to a higher version, so its version names it (no
            // hashing on the hot path).
            let cur_version = cur.state.version;
            // Right after our own update, on its state: a burst. Its commit
            // rides with this update, and this update's commit waits for
            // the next one.
            let burst = core.rides.load(std::sync::atomic::Ordering::Relaxed)
                && l.last_own_commit.is_some_and(|(v, at)| {
                    v == cur_version && at.elapsed() < crate::core::COMMIT_RIDE_WINDOW
                });
            let mut next = cur.state.next();
            next.version = l.next_version().ok_or(Error::Phase(l.machine.phase()))?;
            f(&mut next).map_err(Error::InvalidUpdate)?;
            l.machine
                .stage_update(next.clone(), core.index, shared.apps.rules(&core.params)?)?;
            l.staged_actor = Some(core.index);
            // A newer proposal supersedes an older failed one.
            l.pending = None;
            l.announce(core);
            let hash = l
                .machine
                .staged_hash()
                .ok_or(Error::Phase(l.machine.phase()))?;
            // Our held commit is of the state `next` builds on, unless a
            // newer state came meanwhile (then it goes on its own).
            let (ride, stray) = match l.held.take() {
                Some(h) if h.commit.version == cur_version => (Some(h), None),
                other => (None, other),
            };
            if let Some(h) = stray {
                spawn_delivery(shared, core, h);
            }
            (next, hash, cur_version, burst, ride)
        };
        // Our proposal is staged: from here the update runs to its end,
        // whatever the caller does (a dropped future would leave it
        // staged, its peers' signatures unanswered and the channel
        // `Updating` for good).
        let staged = Staged {
            next,
            hash,
            base,
            burst,
            ride,
        };
        let rest =
            finish(shared.clone(), core.clone(), one, staged).instrument(tracing::Span::current());
        crate::to_end::ToEnd::of_client(shared, rest).await
    }
    .instrument(span)
    .await
}

/// What a failed proposal of ours is known by: its version, its state's
/// hash, and the version of the state it was built on.
#[derive(Debug, Clone, Copy)]
struct Proposal {
    version: u64,
    hash: perun_channel::B256,
    base: u64,
}

/// Our proposal, staged: what finishing it needs.
struct Staged {
    next: State,
    hash: perun_channel::B256,
    /// The version it builds on.
    base: u64,
    burst: bool,
    ride: Option<HeldCommit>,
}

/// Sends a staged proposal, collects the signatures, commits and stores
/// it, or fails it (the version burnt where a peer may have signed).
async fn finish(
    shared: Arc<Shared>,
    core: Arc<ChannelCore>,
    _one: tokio::sync::OwnedMutexGuard<()>,
    staged: Staged,
) -> Result<SignedState> {
    let (shared, core) = (&shared, &core);
    let Staged {
        next,
        hash,
        base,
        burst,
        ride,
    } = staged;
    // The message takes the state: the machine holds it staged, and a
    // failure needs only its version and hash.
    let proposal = Proposal {
        version: next.version,
        hash,
        base,
    };
    let update = Update {
        channel_id: core.id,
        state: next,
        actor: core.index,
    };
    let (msg, mut riding) = match ride {
        Some(h) => (
            Message::UpdateWithCommit(UpdateWithCommit {
                commit: h.commit.clone(),
                update,
            }),
            Some(Riding::new(shared, core, h)),
        ),
        None => (Message::Update(update), None),
    };
    // A key in this process signs while the peers' answers are on the
    // way (once the request is handed to the transport; the yield lets
    // the transport's task run first where it can). The signature
    // stays here until every peer signed (`sign_staged_with` below)
    // and leaves only once the state is stored, so the proposer still
    // signs last; any other signer signs then.
    let account = shared.account.as_ref();
    let (mut replies, made) = futures::join!(shared.broadcast(core, &msg), async {
        if !account.signs_in_process() {
            return None;
        }
        tokio::task::yield_now().await;
        perun_channel::Presigned::new(account, hash).ok()
    });
    if let Some(held) = riding.as_mut().and_then(Riding::take) {
        if replies.iter().any(|(_, _, r)| unreadable(r)) {
            // A peer could not read the request (a release without
            // `UpdateWithCommit`): it processed nothing. It gets the
            // commit, then the update, each on its own, and this
            // channel rides no more.
            core.rides
                .store(false, std::sync::atomic::Ordering::Relaxed);
            crate::deliver::send_update_commit(shared, core, held.commit).await;
            let plain = match msg {
                Message::UpdateWithCommit(m) => Message::Update(m.update),
                other => other,
            };
            for (peer, _, reply) in replies.iter_mut().filter(|(_, _, r)| unreadable(r)) {
                *reply = shared.wire.send(*peer, &plain).await;
            }
        } else if !replies
            .iter()
            .all(|(_, _, r)| matches!(r, Ok(Message::UpdateAccept(_))))
        {
            // A peer that signed the update took the commit first; one
            // that did not may lack it (it did not answer, or it
            // refused the commit): hand it out again on its own (a
            // repeated commit is harmless; a peer that still cannot
            // take it gets it by `Sync`).
            spawn_delivery(shared, core, held);
        }
    }

    let mut l = core.locked.lock().await;
    let ours = l.staged_actor == Some(core.index) && l.machine.staged_hash() == Some(hash);
    // Our proposal was built on `base`. If a newer state arrived
    // meanwhile (an update we had given up on was completed after all),
    // it would apply to the wrong state: not what the caller asked for.
    let same_base = l.machine.current().is_some_and(|c| c.state.version == base);
    let mut failure = (!ours || !same_base).then_some(Error::Conflict);
    let mut signed_by = Vec::new();
    let mut unknown = false;
    let mut conflicted = false;
    let mut sigs = Vec::with_capacity(replies.len());
    for (peer, index, reply) in replies {
        match reply {
            Ok(Message::UpdateAccept(a))
                if a.channel_id == core.id && a.version == proposal.version && a.index == index =>
            {
                signed_by.push(peer);
                sigs.push((index, a.signature))
            }
            Ok(Message::UpdateReject(r)) if r.channel_id == core.id => {
                conflicted |= r.kind == RejectKind::Conflict;
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
                unknown = true;
                failure.get_or_insert(Error::Protocol {
                    peer,
                    reason: "unexpected reply to an update".into(),
                });
            }
            Err(e) => {
                unknown = true;
                failure.get_or_insert(e.into());
            }
        }
    }
    // Only our own proposal, still staged on its base, takes the
    // signatures (all or none); a failure below drops it.
    if failure.is_none()
        && let Err(e) = l.machine.add_signatures(&sigs)
    {
        warn!(error = %e, "peer signed badly");
        failure = Some(e.into());
    }
    if let Some(e) = failure {
        if conflicted {
            // The peer may have signed another state of this version
            // (in an update that failed, perhaps before a restart of
            // ours): skipping it costs nothing, retrying it forever would.
            l.burn(shared, core, proposal.version).await;
        }
        fail(shared, core, l, proposal, ours, unknown, signed_by).await;
        return Err(e);
    }
    crate::failpoint::hit("propose_before_commit").await;
    if shared.stopped() {
        // A stopped client signs nothing (see `respond_update`); our
        // signature never left, and the peers that signed hear so.
        fail(shared, core, l, proposal, true, false, signed_by).await;
        return Err(Error::Closed);
    }
    // Our signature goes on a copy, into the machine once stored.
    let (full, signed) = match l.machine.sign_staged_copy(shared.account.as_ref(), made) {
        Ok(copy) => copy,
        Err(e) => {
            // Our signature never left: dropping the update is safe,
            // and the peers that signed hear so.
            fail(shared, core, l, proposal, true, false, signed_by).await;
            return Err(e.into());
        }
    };
    let full = match l.commit_signed(shared, core, full, signed).await {
        Ok(full) => full,
        Err(e) => {
            // Our signature never left: dropping the update is safe.
            fail(shared, core, l, proposal, true, false, signed_by).await;
            return Err(e);
        }
    };
    // Our state is durable and fully signed: the update is done for us.
    // The peers get the signatures in the background (a peer that gets
    // our next update first waits for this commit, see
    // `respond_update`); in a burst, with our next update.
    let version = full.state.version;
    let Some(commit) = crate::deliver::commit_of(core, &full) else {
        // Cannot be: `full` was just stored fully signed (a commit needs
        // every signature). Nothing to hand out then; a peer left waiting
        // asks for the state by `Sync` (`sync::sweep_commits`).
        warn!(version, "our commit lacks a signature; not handing it out");
        drop(l);
        return Ok(full);
    };
    let held = HeldCommit {
        commit,
        in_flight: InFlight::new(shared),
    };
    l.last_own_commit = Some((version, std::time::Instant::now()));
    if burst {
        l.held = Some(held);
        drop(l);
        shared.later.after(
            crate::core::COMMIT_RIDE_WAIT,
            Chore::Deliver {
                core: Arc::downgrade(core),
                version,
            },
        );
    } else {
        drop(l);
        spawn_delivery(shared, core, held);
    }
    debug!(version, "update committed");
    Ok(full)
}

/// Our held commit while it rides with an update: handed out on its own
/// if the update is dropped on the way (its caller gave up), so a peer
/// never waits for a `Sync` to learn of it.
struct Riding {
    held: Option<HeldCommit>,
    shared: Arc<Shared>,
    core: Arc<ChannelCore>,
}

impl Riding {
    fn new(shared: &Arc<Shared>, core: &Arc<ChannelCore>, held: HeldCommit) -> Self {
        Self {
            held: Some(held),
            shared: shared.clone(),
            core: core.clone(),
        }
    }

    /// The commit, now that the update's answers are in.
    fn take(&mut self) -> Option<HeldCommit> {
        self.held.take()
    }
}

impl Drop for Riding {
    fn drop(&mut self) {
        if let Some(held) = self.held.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            spawn_delivery(&self.shared, &self.core, held);
        }
    }
}

/// A peer's answer that says it could not read the request at all.
fn unreadable(reply: &perun_wire::Result<Message>) -> bool {
    matches!(reply, Err(perun_wire::Error::Refused(r)) if r.code == perun_wire::RefusalCode::Malformed)
}

/// Hands a commit of ours to every peer in the background, with retries.
fn spawn_delivery(shared: &Arc<Shared>, core: &Arc<ChannelCore>, held: HeldCommit) {
    let span = info_span!("commit", version = held.commit.version);
    tokio::spawn(
        deliver_commit(shared.clone(), core.clone(), held.commit, held.in_flight).instrument(span),
    );
}

/// Ends a proposal of ours that failed after it was sent. Its version is
/// burnt (a peer may have signed it); the peers that signed are told to
/// drop it. A 2-party proposal whose answer is unknown is remembered, so
/// the peer's `Sync` can still complete it if it signed and stored it.
async fn fail(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    mut l: tokio::sync::MutexGuard<'_, Locked>,
    proposal: Proposal,
    ours: bool,
    unknown: bool,
    signed_by: Vec<PeerId>,
) {
    if unknown || !signed_by.is_empty() {
        // Someone may hold a signature on this version; stored before the
        // abort goes out, so even our restart cannot make us propose it again.
        l.burn(shared, core, proposal.version).await;
    }
    if ours {
        l.drop_staged(core);
    }
    l.pending = (unknown && core.peers.len() == 2).then_some(crate::core::Pending2 {
        proposal: proposal.hash,
        base: proposal.base,
    });
    drop(l);
    if unknown {
        // A peer may hold our proposal signed, or be stuck on it: a `Sync`
        // once it is reachable completes or drops it on both sides.
        for (_, peer) in core.others() {
            crate::deliver::mark_unsynced(shared, core.id, peer);
        }
    }
    send_abort(shared, core, proposal.version, signed_by).await;
}

/// Answers a proposer's abort of an update it could not complete: the
/// staged state is dropped if it is that proposer's (or of unknown origin,
/// restored from disk). Idempotent.
pub(crate) async fn handle_abort(
    shared: Arc<Shared>,
    peer: PeerId,
    r: UpdateReject,
    responder: Responder,
) {
    let Some(core) = shared.channel_core(&r.channel_id) else {
        let _ = responder.refuse(perun_wire::Refusal::new(
            perun_wire::RefusalCode::Unauthorized,
            "unknown channel",
        ));
        return;
    };
    if core.peer_index(&peer) != Some(r.index) {
        crate::dispatch::warn_limited!(%peer, index = r.index, "abort from a peer that is not who it claims");
        let _ = responder.refuse(perun_wire::Refusal::new(
            perun_wire::RefusalCode::Unauthorized,
            "wrong participant",
        ));
        return;
    }
    let span = info_span!("handle_abort", channel = %core.id, version = r.version, actor = r.index);
    async {
        let mut l = core.locked.lock().await;
        let theirs = l.machine.phase() == Phase::Updating
            && l.staged_actor.is_none_or(|a| a == r.index)
            && l.staged_actor != Some(core.index)
            && l.machine
                .staged()
                .is_some_and(|s| s.state.version == r.version);
        if theirs {
            debug!("the proposer aborted its update");
            l.abandon_staged(&core);
        }
        l.burn(&shared, &core, r.version).await;
    }
    .instrument(span)
    .await;
    let _ = responder.reply(Message::Ack);
}

/// Answers an `Update` a peer proposed.
pub(crate) async fn handle_update(
    shared: Arc<Shared>,
    peer: PeerId,
    u: Update,
    responder: Responder,
) {
    let Some(core) = shared.channel_core(&u.channel_id) else {
        crate::dispatch::warn_limited!(%peer, channel = %u.channel_id, "update for an unknown channel");
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
    let reply = respond_update(&shared, &core, peer, u)
        .instrument(span)
        .await;
    let _ = responder.reply(reply);
}

/// Answers an update that carries its proposer's previous commit: the
/// commit is taken as an `UpdateCommit` would be, then the update is
/// answered. A commit that does not fit refuses the whole request (its
/// proposer hands the commit out again, or `Sync` settles it).
pub(crate) async fn handle_update_with_commit(
    shared: Arc<Shared>,
    peer: PeerId,
    m: UpdateWithCommit,
    responder: Responder,
) {
    let UpdateWithCommit { commit, update } = m;
    let refuse = |reason: &str| {
        perun_wire::Refusal::new(perun_wire::RefusalCode::Malformed, reason.to_string())
    };
    if commit.channel_id != update.channel_id
        || commit.index != update.actor
        || commit.version >= update.state.version
    {
        crate::dispatch::warn_limited!(%peer, channel = %update.channel_id, "a commit that does not belong to its update");
        let _ = responder.refuse(refuse("the commit does not belong to the update"));
        return;
    }
    let Some(core) = shared.channel_core(&update.channel_id) else {
        // As for a plain update: the peer learns the channel is unknown.
        handle_update(shared, peer, update, responder).await;
        return;
    };
    let span = info_span!("handle_update", channel = %core.id, me = core.index, actor = update.actor, commit = commit.version);
    let taken = async {
        let mut l = core.locked.lock().await;
        match take_commit(&core, &mut l, peer, &commit) {
            Ok(false) => Ok(()),
            Ok(true) => {
                hold_unsaved(&shared, &core, &mut l);
                Ok(())
            }
            Err(refusal) => Err(refusal),
        }
    }
    .instrument(span.clone())
    .await;
    match taken {
        Ok(()) => {}
        // An honest race: we moved on from the update this commit is for.
        // Answer as a plain update would have been answered then: the
        // proposer retries, and hands the commit out on its own (it then
        // reaches us by `Sync` if we still cannot take it).
        Err(CommitRefusal::Elsewhere(why)) => {
            let _ = responder.reply(reject(
                &core,
                update.state.version,
                RejectKind::Conflict,
                format!("the commit it carries: {why}"),
            ));
            return;
        }
        Err(refusal @ CommitRefusal::Bad(_)) => {
            let _ = responder.refuse(refuse(&refusal.to_string()));
            return;
        }
    }
    let reply = respond_update(&shared, &core, peer, update)
        .instrument(span)
        .await;
    let _ = responder.reply(reply);
}

async fn respond_update(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    peer: PeerId,
    u: Update,
) -> Message {
    let version = u.state.version;
    if u.actor == core.index || core.peer_index(&peer) != Some(u.actor) {
        crate::dispatch::warn_limited!(%peer, actor = u.actor, "update from a peer that is not its actor");
        return reject(
            core,
            version,
            RejectKind::Refused,
            "sender is not the actor".into(),
        );
    }
    if core.phase() == Phase::Funding {
        // The proposer saw every deposit a moment before we did.
        let _ = core
            .wait_phase(shared.timeouts.update_wait, "funding", |p| {
                p != Phase::Funding
            })
            .await;
    }
    // The commit of the update before is on its way (an update returns to
    // its proposer before its peers have the commit): take it first. Each
    // phase change is a fresh look at the machine, not at the phase: the
    // commit may move it to `Active` and a proposal of ours back to
    // `Updating` before this task runs again.
    let mut changes = core.subscribe_phase();
    let deadline = tokio::time::Instant::now() + shared.timeouts.update_wait;
    while awaits_commit(core, version).await {
        debug!("waiting for the proposer's previous commit");
        if !matches!(
            tokio::time::timeout_at(deadline, changes.changed()).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    // The staged proposal's hash, once it is staged.
    let hash;
    let request = {
        let mut l = core.locked.lock().await;
        if l.machine.phase() == Phase::Updating {
            // Bad input changes nothing: an update that is no valid move
            // from our state may not push out the staged one (another
            // peer's, honest) on its way to being refused.
            let valid = l.machine.current().map(|c| {
                shared.apps.rules(&core.params).and_then(|app| {
                    c.state
                        .validate_transition(&core.params, &u.state, u.actor, app)
                })
            });
            if let Some(Err(e)) = valid {
                drop(l);
                return refuse_invalid(shared, core, peer, version, &e);
            }
            let staged_version = l.machine.staged().map_or(0, |s| s.state.version);
            let mine = l.staged_actor == Some(core.index);
            let unsigned_by_me = l
                .machine
                .staged()
                .is_some_and(|s| s.sigs.get(core.index).is_none_or(Option::is_none));
            // A newer version is proposed and the staged update's commit
            // did not come (we waited for it above): it failed and its
            // version is burnt. Should it have been completed after all,
            // its commit still applies (`Locked::abandoned`).
            let moved_on = !mine && version > staged_version;
            if mine && unsigned_by_me && u.actor < core.index {
                // The lower index wins; we have not signed our own proposal.
                debug!("concurrent update: the peer's lower index wins");
                if let Err(e) = l.machine.discard_staged() {
                    return reject(core, version, RejectKind::Conflict, e.to_string());
                }
                l.staged_actor = None;
            } else if moved_on {
                debug!(staged_version, "the staged update was superseded");
                l.abandon_staged(core);
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
        let staged = shared
            .apps
            .rules(&core.params)
            .and_then(|app| l.machine.stage_update(u.state.clone(), u.actor, app));
        if let Err(e) = staged {
            l.announce(core);
            if let perun_channel::Error::DoubleSign(v) = e {
                // We signed another state of this version in an update that
                // failed; the proposer retries with a newer version.
                l.note_burnt(v);
                return reject(core, version, RejectKind::Conflict, e.to_string());
            }
            drop(l);
            return refuse_invalid(shared, core, peer, version, &e);
        }
        l.staged_actor = Some(u.actor);
        l.announce(core);
        hash = l.machine.staged_hash();
        IncomingUpdate {
            params: core.params.clone(),
            index: core.index,
            current: cur,
            next: u.state,
            actor: u.actor,
        }
    };

    let decision = ask_handler(shared, request).await;

    let mut l = core.locked.lock().await;
    let still_staged =
        l.staged_actor == Some(u.actor) && hash.is_some() && l.machine.staged_hash() == hash;
    if !still_staged {
        return reject(core, version, RejectKind::Conflict, "superseded".into());
    }
    // A client that was shut down signs nothing: its tasks may outlive
    // `shutdown` (this one waited for a commit and a handler), and a new
    // client on the same store, unaware of this signature, could sign
    // another state of the version (a seeded consistency test found it).
    // `shutdown` takes every channel's lock after setting the flag, so a
    // signature checked here before is stored before it returns.
    if shared.stopped() {
        l.drop_staged(core);
        return reject(core, version, RejectKind::Conflict, "shutting down".into());
    }
    if let Err(reason) = decision {
        l.drop_staged(core);
        return reject(core, version, RejectKind::Refused, reason);
    }
    // Persist our signature before it leaves this process: signed on a
    // copy, which is stored; the machine takes the signature after that.
    let account = shared.account.as_ref();
    let (staged, signed) = match l.machine.sign_staged_copy(account, None) {
        Ok(copy) => copy,
        Err(_) => {
            l.drop_staged(core);
            return reject(core, version, RejectKind::Refused, "cannot sign".into());
        }
    };
    crate::failpoint::hit("update_before_persist").await;
    let stored = l.write(shared, core, vec![Change::Staged(staged)]).await;
    let taken = stored.and_then(|carried| {
        l.machine
            .sign_staged_with(account, Some(signed))
            .map(|sig| (sig, carried))
            .map_err(Error::from)
    });
    let (sig, carried) = match taken {
        Ok(done) => {
            crate::failpoint::hit("update_after_persist").await;
            done
        }
        Err(e) => {
            warn!(error = %e, "could not persist our signature; refusing");
            l.drop_staged(core);
            return reject(core, version, RejectKind::Refused, "internal error".into());
        }
    };
    l.signed_at = Some(std::time::Instant::now());
    core.answered
        .fetch_max(version, std::sync::atomic::Ordering::Relaxed);
    if carried {
        // The previous commit rode along: readers may see it now.
        l.announce(core);
    }
    drop(l);
    Message::UpdateAccept(UpdateAccept {
        channel_id: core.id,
        version,
        index: core.index,
        signature: sig,
    })
}

/// Refuses a peer's update that is no valid move from our state, and syncs
/// with its proposer: an honest proposer builds on the state it holds, so
/// we may stand on different states (a third party committed to one of us
/// only), and a `Sync` hands the newer fully signed one across. Call
/// without the channel's lock.
fn refuse_invalid(
    shared: &Shared,
    core: &ChannelCore,
    peer: PeerId,
    version: u64,
    e: &perun_channel::Error,
) -> Message {
    warn!(%peer, error = %e, "invalid update");
    crate::deliver::mark_unsynced(shared, core.id, peer);
    reject(core, version, RejectKind::Refused, e.to_string())
}

/// Whether we hold, signed, a peer's older update whose commit has not
/// arrived yet, while a newer one is proposed.
async fn awaits_commit(core: &ChannelCore, version: u64) -> bool {
    if core.phase() != Phase::Updating {
        return false;
    }
    let l = core.locked.lock().await;
    l.staged_actor != Some(core.index)
        && l.machine.staged().is_some_and(|s| {
            s.state.version < version && s.sigs.get(core.index).is_some_and(Option::is_some)
        })
}

async fn ask_handler(
    shared: &Arc<Shared>,
    request: IncomingUpdate,
) -> std::result::Result<(), String> {
    use futures::FutureExt;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handler = shared.update_handler();
    // Run in this task (no hand-off on the hot path); a handler that panics
    // is a refusal, not a lost task with a staged update left behind. The
    // handler may also keep the responder and decide later.
    let decide = async move {
        let ran =
            std::panic::AssertUnwindSafe(handler.handle_update(request, UpdateResponder { tx }))
                .catch_unwind()
                .await;
        match ran {
            Ok(()) => rx.await.unwrap_or_else(|_| Err("no decision".into())),
            Err(_) => {
                warn!("update handler panicked");
                Err("handler failed".into())
            }
        }
    };
    tokio::time::timeout(shared.timeouts.handler, decide)
        .await
        .unwrap_or_else(|_| Err("decision timed out".into()))
}

/// Completes a staged state with the full signature set from its proposer.
///
/// The acknowledgement goes out before our own write: the proposer's state
/// is durable already and our signature went out earlier, so the write only
/// saves us a `Sync` after a crash, and the proposer need not wait for it.
/// The new state is held unsaved ([`hold_unsaved`]): readers see it once
/// our next write, or a flush a moment later, has stored it.
pub(crate) async fn handle_commit(
    shared: Arc<Shared>,
    peer: PeerId,
    c: UpdateCommit,
    responder: Responder,
) {
    let Some(core) = shared.channel_core(&c.channel_id) else {
        crate::dispatch::warn_limited!(%peer, channel = %c.channel_id, "commit for an unknown channel");
        let _ = responder.refuse(perun_wire::Refusal::new(
            perun_wire::RefusalCode::Malformed,
            "unknown channel",
        ));
        return;
    };
    let span = info_span!("handle_commit", channel = %core.id, version = c.version);
    async {
        let mut l = core.locked.lock().await;
        match take_commit(&core, &mut l, peer, &c) {
            Ok(false) => {
                let _ = responder.reply(Message::Ack);
            }
            Ok(true) => {
                // Installed before the ack: once the proposer knows we
                // have it, our phase has left `Updating` (its `shutdown`
                // waits for that ack).
                hold_unsaved(&shared, &core, &mut l);
                let _ = responder.reply(Message::Ack);
            }
            Err(refusal) => {
                let _ = responder.refuse(perun_wire::Refusal::new(
                    perun_wire::RefusalCode::Malformed,
                    refusal.to_string(),
                ));
            }
        }
    }
    .instrument(span)
    .await
}

/// Why a commit could not be taken.
#[derive(Debug)]
enum CommitRefusal {
    /// It is for an update we do not hold (any more): we dropped it as
    /// superseded, or staged another one meanwhile. An honest proposer
    /// meets this in a race; a `Sync` settles who holds what.
    Elsewhere(&'static str),
    /// It is wrong: another sender, a missing or bad signature.
    Bad(String),
}

impl std::fmt::Display for CommitRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommitRefusal::Elsewhere(why) => why,
            CommitRefusal::Bad(why) => why,
        })
    }
}

/// A commit for an update we dropped as abandoned (its proposer completed
/// it after all): the fully signed state is adopted like one from a `Sync`
/// (checked whole before the machine changes).
fn commit_abandoned(
    l: &mut Locked,
    peer: PeerId,
    c: &UpdateCommit,
) -> std::result::Result<bool, CommitRefusal> {
    let Some(abandoned) = l
        .abandoned
        .as_ref()
        .filter(|a| a.state.version == c.version)
    else {
        return Err(CommitRefusal::Elsewhere("nothing staged"));
    };
    let full = SignedState {
        state: abandoned.state.clone(),
        sigs: c.signatures.iter().copied().map(Some).collect(),
    };
    if let Err(e) = l.machine.adopt(full) {
        warn!(%peer, error = %e, "bad commit for an abandoned update");
        return Err(CommitRefusal::Bad(e.to_string()));
    }
    debug!(
        version = c.version,
        "an update we had given up on was completed"
    );
    Ok(true)
}

/// Applies a peer's commit without storing it yet (see `Locked::unsaved`):
/// the proposer has it durably, we have our signed copy on disk, and our
/// next write, or one a moment later, stores it. Readers see it once stored.
fn hold_unsaved(shared: &Arc<Shared>, core: &Arc<ChannelCore>, l: &mut Locked) {
    let Some(version) = l.machine.current().map(|c| c.state.version) else {
        return;
    };
    l.installed();
    l.unsaved = Some(version);
    l.announce(core);
    if l.flush_pending {
        // The task already waiting stores whatever is unsaved then; one
        // waiting out a failed write's backoff tries again now.
        if let Some(wake) = &l.flush_retry {
            wake.notify_one();
        }
        return;
    }
    l.flush_pending = true;
    shared.later.after(
        crate::core::COMMIT_FLUSH_DELAY,
        Chore::Flush {
            core: Arc::downgrade(core),
        },
    );
}

/// Runs the client's chores for later ([`crate::later`]) as they fall due,
/// for as long as the client exists (also after `shutdown`, as the tasks
/// it replaces did); `stop`'s sender going away says the client is gone.
pub(crate) async fn run_chores(
    shared: std::sync::Weak<Shared>,
    later: Arc<Later>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let chores = tokio::select! {
            chores = later.due() => chores,
            changed = stop.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for chore in chores {
            run_chore(&shared, chore);
        }
    }
}

/// One chore. It never waits here: one whose channel is busy, or that has
/// a write to make, goes on a task of its own (the queue must not stall).
/// Nothing here may panic: the runner is every channel's only one.
fn run_chore(shared: &Arc<Shared>, chore: Chore) {
    match chore {
        Chore::Deliver { core, version } => {
            let Some(core) = core.upgrade() else {
                return;
            };
            if let Ok(mut l) = core.locked.try_lock() {
                hand_out_held(shared, &core, &mut l, version);
                return;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut l = core.locked.lock().await;
                hand_out_held(&shared, &core, &mut l, version);
            });
        }
        Chore::Flush { core: weak } => {
            let Some(core) = weak.upgrade() else {
                return;
            };
            if let Ok(mut l) = core.locked.try_lock()
                && l.unsaved.is_none()
            {
                l.flush_pending = false;
                return;
            }
            tokio::spawn(flush_until_stored(Arc::downgrade(shared), weak));
        }
    }
}

/// Stores a channel's unsaved commit, retrying with the client's backoff
/// until it is stored (by this write or another) or moot (the client or
/// the channel is gone). The peer heard we took it and will not send it
/// again, and a `Sync` would not bring it back either: its state is
/// already ours in memory. While this runs `flush_pending` stays set, so
/// a newer commit rides on this task's next try.
///
/// At shutdown it tries once more at once and then ends: the next start
/// has only the older stored state, and its sync with the peer (who holds
/// the commit, fully signed) brings the newer one back.
async fn flush_until_stored(shared: std::sync::Weak<Shared>, core: std::sync::Weak<ChannelCore>) {
    let mut attempt = 0u32;
    let wake = Arc::new(tokio::sync::Notify::new());
    loop {
        let (Some(shared), Some(core)) = (shared.upgrade(), core.upgrade()) else {
            return;
        };
        let last = shared.stopped();
        let pause = {
            let mut l = core.locked.lock().await;
            match l.flush_unsaved(&shared, &core).await {
                Ok(()) => {
                    l.flush_pending = false;
                    l.flush_retry = None;
                    return;
                }
                Err(e) if last => {
                    l.flush_pending = false;
                    l.flush_retry = None;
                    error!(channel = %core.id, attempt, error = %e, "stopped with a peer's commit unstored; the next start gets it back from the peer");
                    return;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let pause = shared.timeouts.backoff(attempt);
                    warn!(channel = %core.id, attempt, retry_in = ?pause, error = %e, "could not store a peer's commit; retrying");
                    l.flush_retry = Some(wake.clone());
                    pause
                }
            }
        };
        // Neither the client nor the channel is kept alive by the wait; a
        // shutdown cuts it short for the last try.
        let stopping = {
            let mut stop = shared.stop.subscribe();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        drop((shared, core));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
            () = stopping => {}
        }
    }
}

/// Hands out our held commit of `version` on its own, if it still waits to
/// ride (delivery runs on a task of its own).
fn hand_out_held(shared: &Arc<Shared>, core: &Arc<ChannelCore>, l: &mut Locked, version: u64) {
    if let Some(h) = l.held.take_if(|h| h.commit.version == version) {
        spawn_delivery(shared, core, h);
    }
}

/// Checks a commit against the staged state and, if it completes it, makes
/// it the machine's current state (not stored yet: see [`hold_unsaved`]).
/// Returns whether it did; `false` if we have that state already (a
/// repeated commit). A refused commit changes nothing.
fn take_commit(
    core: &ChannelCore,
    l: &mut Locked,
    peer: PeerId,
    c: &UpdateCommit,
) -> std::result::Result<bool, CommitRefusal> {
    if core.peer_index(&peer) != Some(c.index) {
        crate::dispatch::warn_limited!(%peer, index = c.index, "commit from a peer that is not who it claims");
        return Err(CommitRefusal::Bad(
            "sender is not the participant it claims".into(),
        ));
    }
    if l.machine
        .current()
        .is_some_and(|s| s.state.version >= c.version)
    {
        return Ok(false);
    }
    // Every commit carries our signature: one for a version we never
    // signed is not a race, it is made up.
    if l.machine.last_signed().is_none_or(|(v, _)| c.version > v) {
        crate::dispatch::warn_limited!(%peer, version = c.version, "commit for a version we never signed");
        return Err(CommitRefusal::Bad(
            "a commit for a version we never signed".into(),
        ));
    }
    let Some(staged) = l.machine.staged() else {
        return commit_abandoned(l, peer, c);
    };
    if staged.state.version != c.version || l.staged_actor.is_some_and(|a| a != c.index) {
        crate::dispatch::warn_limited!(%peer, "commit does not match the staged update");
        return Err(CommitRefusal::Elsewhere(
            "commit does not match the staged update",
        ));
    }
    if c.signatures.len() != core.params.participants.len() {
        return Err(CommitRefusal::Bad("wrong number of signatures".into()));
    }
    // The signatures we lack are all checked before any is taken.
    if let Err(e) = l.machine.complete_staged(&c.signatures) {
        warn!(%peer, error = %e, "bad signature in commit");
        return Err(CommitRefusal::Bad(e.to_string()));
    }
    Ok(true)
}
