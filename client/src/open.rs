//! The channel proposal protocol (DESIGN §8).
//!
//! Proposer: `Proposal` to every peer → all `ProposalAccept` (any reject or
//! failure aborts and tells the others) → nonce from everyone's share →
//! persist, then `Signing0` with our version-0 signature → every peer's
//! signature → (n > 2) `UpdateCommit` with the full set → fund → active.

use std::sync::Arc;

use perun_adjudicator::FundingRequest;
use perun_channel::{
    Address, Allocation, B256, Bytes, Machine, Params, Phase, SignedState, State, derive_nonce,
};
use perun_wire::{
    Message, Participant, PeerId, Proposal, ProposalAccept, ProposalReject, Refusal, RefusalCode,
    Responder, Signing0, UpdateAccept,
};
use rand::RngCore;
use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::core::{ChannelCore, Pending, Shared, lock, set_phase};
use crate::deliver::send_commit;
use crate::handler::{IncomingProposal, ProposalDecision, ProposalResponder};
use crate::{Channel, Error, Result};

/// What the proposer wants: who, with how much, under which rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelProposal {
    /// Every participant in index order, the proposer included.
    pub participants: Vec<Participant>,
    /// Initial balances, `balances[asset][participant]`.
    pub allocation: Allocation,
    /// Seconds a registered state can be refuted.
    pub challenge_duration: u64,
    /// The app contract; zero for a payment channel.
    pub app: Address,
    /// Initial app data (empty for payment channels).
    pub app_data: Bytes,
}

impl ChannelProposal {
    /// A payment channel proposal.
    pub fn payment(
        participants: Vec<Participant>,
        allocation: Allocation,
        challenge_duration: u64,
    ) -> Self {
        Self {
            participants,
            allocation,
            challenge_duration,
            app: Address::ZERO,
            app_data: Bytes::new(),
        }
    }
}

fn random_word() -> B256 {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    B256::from(b)
}

/// The params and version-0 state a proposal describes once the nonce is known. Every
/// participant funds its version-0 balances.
fn channel_of(p: &Proposal, nonce_shares: &[B256]) -> Result<(Params, State)> {
    let params = Params {
        challengeDuration: p.challenge_duration,
        nonce: derive_nonce(nonce_shares),
        participants: p.participants.iter().map(|x| x.address).collect(),
        app: p.app,
        chainId: p.domain.chain_id,
        adjudicator: p.domain.adjudicator,
        funding: p.allocation.balances.clone(),
    };
    let mut state = State::initial(&params, p.allocation.clone());
    state.appData = p.app_data.clone();
    state.validate(&params)?;
    Ok((params, state))
}

/// Checks a proposal's shape, its sender, and finds our index in it.
fn check_proposal(shared: &Shared, from: Option<PeerId>, p: &Proposal) -> Result<usize> {
    let n = p.participants.len();
    let me = (shared.account.address(), shared.wire.local_peer_id());
    let index = p
        .participants
        .iter()
        .position(|x| (x.address, x.peer) == me)
        .ok_or(Error::NotAParticipant {
            address: me.0,
            peer: me.1,
        })?;
    let proposer = p
        .participants
        .get(p.proposer)
        .ok_or(Error::Channel(perun_channel::Error::Index(p.proposer)))?;
    if let Some(from) = from
        && (proposer.peer != from || index == p.proposer)
    {
        return Err(Error::Protocol {
            peer: from,
            reason: "proposal not sent by its proposer".into(),
        });
    }
    let mut peers: Vec<PeerId> = p.participants.iter().map(|x| x.peer).collect();
    peers.sort();
    if let Some(w) = peers.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::DuplicatePeer(w[0]));
    }
    let ours = shared.adjudicator.domain();
    if p.domain != ours {
        return Err(Error::WrongDomain {
            ours,
            theirs: p.domain,
        });
    }
    if let Some((index, asset)) = p
        .allocation
        .assets
        .iter()
        .enumerate()
        .find(|(_, a)| !shared.funder.supports(a))
    {
        return Err(Error::UnsupportedAsset {
            index,
            chain_id: asset.chainId,
            holder: asset.holder,
        });
    }
    let (params, state) = channel_of(p, &vec![B256::ZERO; n])?;
    // An app channel's version 0 must be a start of its app: every later
    // state is checked against it, on-chain too.
    shared
        .apps
        .rules(&params)?
        .valid_init(&params, &state)
        .map_err(|reason| {
            warn!(app = %params.app, %reason, "proposal with an invalid initial app state");
            perun_channel::Error::App(reason)
        })?;
    Ok(index)
}

/// Runs the proposer's side.
pub(crate) async fn propose(shared: &Arc<Shared>, spec: ChannelProposal) -> Result<Channel> {
    // To its end, whatever the caller does: a dropped future must not
    // leave a deposit sent for a channel this client no longer follows,
    // nor peers waiting on a half-run proposal.
    crate::to_end::ToEnd::of_client(shared, propose_to_end(shared.clone(), spec)).await
}

async fn propose_to_end(shared: Arc<Shared>, spec: ChannelProposal) -> Result<Channel> {
    let shared = &shared;
    let proposal = Proposal {
        proposal_id: random_word(),
        challenge_duration: spec.challenge_duration,
        domain: shared.adjudicator.domain(),
        proposer: 0,
        participants: spec.participants,
        allocation: spec.allocation,
        app: spec.app,
        app_data: spec.app_data,
        nonce_share: random_word(),
    };
    let index = check_proposal(shared, None, &proposal)?;
    let proposal = Proposal {
        proposer: index,
        ..proposal
    };
    let span = info_span!("propose_channel", proposal = %proposal.proposal_id, me = index);
    async move {
        let n = proposal.participants.len();
        let peers: Vec<PeerId> = proposal.participants.iter().map(|x| x.peer).collect();
        let sends = peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(i, peer)| {
                let msg = Message::Proposal(proposal.clone());
                async move { (i, *peer, shared.wire.send(*peer, &msg).await) }
            });
        let replies = futures::future::join_all(sends).await;
        let mut shares = vec![B256::ZERO; n];
        shares[index] = proposal.nonce_share;
        let mut failure = None;
        let mut accepted = Vec::new();
        for (i, peer, reply) in replies {
            match reply {
                Ok(Message::ProposalAccept(a))
                    if a.proposal_id == proposal.proposal_id
                        && a.index == i
                        && a.address == proposal.participants[i].address =>
                {
                    shares[i] = a.nonce_share;
                    accepted.push(peer);
                }
                Ok(Message::ProposalReject(r)) if r.proposal_id == proposal.proposal_id => {
                    failure.get_or_insert(Error::Rejected {
                        index: i,
                        reason: r.reason,
                    });
                }
                Ok(other) => {
                    warn!(%peer, ?other, "bad reply to a proposal");
                    failure.get_or_insert(Error::Protocol {
                        peer,
                        reason: "bad reply to a proposal".into(),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e.into());
                }
            }
        }
        if let Some(e) = failure {
            abort(shared, &proposal, index, &accepted, &e).await;
            return Err(e);
        }
        let (params, state0) = channel_of(&proposal, &shares)?;
        let mut machine = Machine::new(params, index, state0)?;
        machine.set_phase(Phase::Signing0)?;
        if shared.stopped() {
            // A stopped client signs nothing (see `update::respond_update`).
            return Err(Error::Closed);
        }
        let signature = machine.sign_staged(shared.account.as_ref())?;
        let core = ChannelCore::new(machine, peers, 0)?;
        {
            let l = core.locked.lock().await;
            shared
                .persister
                .channel_created(&core.record(&l.machine))
                .await?;
        }
        shared.insert_channel(core.clone());
        debug!(channel = %core.id, "version 0 signed and stored");

        let msg = Message::Signing0(Signing0 {
            proposal_id: proposal.proposal_id,
            nonce_shares: shares,
            signature,
        });
        let replies = shared.broadcast(&core, &msg).await;
        let res = collect_signing0(shared, &core, replies).await;
        let full = match res {
            Ok(full) => full,
            Err(e) => {
                // Nothing is funded yet; forget the channel.
                shared.forget_channel(core.id).await;
                return Err(e);
            }
        };
        if n > 2 {
            send_commit(shared, &core, &full).await;
        }
        fund_and_activate(shared, core).await
    }
    .instrument(span)
    .await
}

async fn collect_signing0(
    shared: &Arc<Shared>,
    core: &Arc<ChannelCore>,
    replies: Vec<(PeerId, usize, perun_wire::Result<Message>)>,
) -> Result<SignedState> {
    let mut l = core.locked.lock().await;
    let mut trial = l.machine.clone();
    for (peer, i, reply) in replies {
        match reply? {
            Message::UpdateAccept(UpdateAccept {
                channel_id,
                version: 0,
                index,
                signature,
            }) if channel_id == core.id && index == i => trial.add_signature(i, signature)?,
            Message::UpdateReject(r) => {
                return Err(Error::Rejected {
                    index: i,
                    reason: r.reason,
                });
            }
            other => {
                warn!(%peer, ?other, "bad reply to Signing0");
                return Err(Error::Protocol {
                    peer,
                    reason: "bad reply to Signing0".into(),
                });
            }
        }
    }
    trial.commit_staged()?;
    let full = l.commit_trial(shared, core, trial).await?;
    Ok(full)
}

/// Finishes funding a channel restored in `Funding` (deposits are
/// idempotent: only what is still missing is paid).
pub(crate) async fn resume_funding(
    shared: &Arc<Shared>,
    core: Arc<ChannelCore>,
) -> Result<Channel> {
    fund_and_activate(shared, core).await
}

/// Deposits our share, waits for everyone's, and marks the channel active.
async fn fund_and_activate(shared: &Arc<Shared>, core: Arc<ChannelCore>) -> Result<Channel> {
    // A responder of an n-party channel holds the version-0 commit unsaved
    // for a moment: store it, with the phase `Funding`, before any
    // deposit, so a restart after the deposit goes on funding. A failed
    // write is tried again while the funding timeout lasts: giving up
    // leaves every peer waiting for our deposit until then.
    let deadline = tokio::time::Instant::now() + shared.timeouts.funding;
    let mut attempt = 0u32;
    let state = loop {
        let mut l = core.locked.lock().await;
        match l.flush_unsaved(shared, &core).await {
            Ok(()) => {
                break l
                    .machine
                    .current()
                    .map(|c| c.state.clone())
                    .ok_or(Error::Phase(l.machine.phase()))?;
            }
            Err(e) => {
                drop(l);
                attempt = attempt.saturating_add(1);
                let pause = shared.timeouts.backoff(attempt);
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(e);
                }
                warn!(channel = %core.id, attempt, retry_in = ?pause, error = %e, "could not store the opening state before funding; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.stopping() => return Err(Error::Closed),
                }
            }
        }
    };
    let req = FundingRequest {
        params: Params::clone(&core.params),
        state,
        index: core.index,
        timeout: shared.timeouts.funding,
    };
    // Watch the chain from funding on: deposits are at stake from now.
    crate::watcher::spawn(shared, &core);
    crate::tower::spawn(shared, &core);
    crate::failpoint::hit("funding").await;
    // Deposits never overpay (the funder names the holdings it expects), so
    // a call that failed without a verdict is simply made again, until the
    // funding timeout.
    // It stops once the channel left `Funding` (the watcher found it
    // closing or concluded on-chain: depositing then would only strand money).
    let deadline = tokio::time::Instant::now() + shared.timeouts.funding;
    let mut attempt = 0;
    let funded = loop {
        if core.phase() != Phase::Funding {
            break Err(Error::Phase(core.phase()));
        }
        let fund = shared
            .funder
            .fund(req.clone())
            .instrument(info_span!("fund", channel = %core.id, attempt));
        let res = tokio::select! {
            res = fund => res.map_err(Error::from),
            () = shared.stopping() => return Err(Error::Closed),
        };
        match res {
            Err(Error::Chain(e)) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                attempt += 1;
                let pause = shared.timeouts.backoff(attempt);
                warn!(channel = %core.id, error = %e, ?pause, "funding failed; trying again");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.stopping() => return Err(Error::Closed),
                }
            }
            other => break other,
        }
    };
    if core.phase() != Phase::Funding || funded.is_err() {
        // The channel closes without us funding it to the end. A deposit of
        // ours may still be in flight (a transient failure, or the funder
        // saw it land as the watcher was closing): whenever it lands after
        // the watcher's withdrawal, it is credited to us in a concluded
        // channel whose record is gone. So once the watcher is done, sweep
        // (withdrawing is idempotent), again for a while.
        sweep_once_withdrawn(shared, &core);
    }
    if core.phase() != Phase::Funding {
        return Err(funded.err().unwrap_or(Error::Phase(core.phase())));
    }
    if let Err(e) = funded {
        warn!(channel = %core.id, error = %e, "funding failed; recovering deposits via version 0");
        // Register version 0: once its challenge period is over the holders
        // pay every deposit back (an under-funded channel refunds), and the
        // watcher withdraws ours.
        if let Err(close) = crate::watcher::force_close(shared, &core).await {
            warn!(channel = %core.id, error = %close, "could not start closing the channel");
        }
        return Err(e);
    }
    // Funded: a store that fails to record it is tried again (the channel
    // is no use to anyone in `Funding`, and every peer has it active) until
    // it works, the channel moves on, the client stops, or a funding
    // timeout passes (a store that stays broken: the error comes back, and
    // a restart finds the channel funded).
    let deadline = tokio::time::Instant::now() + shared.timeouts.funding;
    let mut attempt = 0u32;
    loop {
        match set_phase(shared, &core, Phase::Active).await {
            Ok(()) => break,
            Err(Error::Persistence(e))
                if !e.is_rejection()
                    && core.phase() == Phase::Funding
                    && tokio::time::Instant::now()
                        + shared.timeouts.backoff(attempt.saturating_add(1))
                        < deadline =>
            {
                attempt = attempt.saturating_add(1);
                let pause = shared.timeouts.backoff(attempt);
                warn!(channel = %core.id, attempt, retry_in = ?pause, error = %e, "could not store the funded channel as active; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.stopping() => return Err(Error::Closed),
                }
            }
            Err(e) => {
                // The watcher moved it on meanwhile (closing): as above.
                sweep_once_withdrawn(shared, &core);
                return Err(e);
            }
        }
    }
    info!(channel = %core.id, "channel active");
    Ok(Channel::new(core, shared.clone()))
}

/// Sweeps a late deposit ([`sweep_late_deposit`]) once the watcher has
/// withdrawn, on a task of its own: the watcher may be in `Concluded` (its
/// withdrawal waiting for confirmations, its store write retried) or still
/// closing.
fn sweep_once_withdrawn(shared: &Arc<Shared>, core: &Arc<ChannelCore>) {
    let (shared, core) = (shared.clone(), core.clone());
    tokio::spawn(
        async move {
            let mut phases = core.phase_changes();
            tokio::select! {
                r = phases.wait_for(|p| *p == Phase::Withdrawn) => if r.is_err() { return },
                () = shared.stopping() => return,
            }
            sweep_late_deposit(&shared, &core).await;
        }
        .instrument(info_span!("sweep_late_deposit")),
    );
}

/// Withdraws whatever is still credited to us in a withdrawn channel: a
/// deposit of ours that landed after the watcher withdrew. The watcher is
/// done and the record gone, so nothing else would. A deposit whose
/// transaction is still queued may land later, so this sweeps again with
/// backoff for one funding timeout, and retries a failed sweep until it
/// succeeds once after that (a sweep with nothing credited sends nothing).
/// Stops at shutdown; `Client::recover_funds` finds what is left then.
async fn sweep_late_deposit(shared: &Arc<Shared>, core: &Arc<ChannelCore>) {
    let Some(latest) = core.latest().await else {
        return;
    };
    let req = perun_adjudicator::WithdrawRequest {
        params: Params::clone(&core.params),
        state: latest.state,
        index: core.index,
        account: shared.account.clone(),
        receiver: shared.account.address(),
    };
    let until = tokio::time::Instant::now() + shared.timeouts.funding;
    let mut attempt = 0u32;
    loop {
        let swept = shared.adjudicator.withdraw(&req).await;
        if let Err(e) = &swept {
            warn!(channel = %core.id, error = %e, attempt, "could not withdraw a late deposit; trying again");
        }
        if swept.is_ok() && tokio::time::Instant::now() >= until {
            return;
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(shared.timeouts.backoff(attempt)) => {}
            () = shared.stopping() => {
                warn!(channel = %core.id, "shutdown: a late deposit may be left credited; recover_funds finds it");
                return;
            }
        }
    }
}

/// Tells the peers that accepted that the proposal is off.
async fn abort(shared: &Arc<Shared>, p: &Proposal, index: usize, peers: &[PeerId], why: &Error) {
    let msg = Message::ProposalReject(ProposalReject {
        proposal_id: p.proposal_id,
        index,
        reason: format!("aborted: {why}"),
    });
    let sends = peers.iter().map(|peer| shared.wire.send(*peer, &msg));
    futures::future::join_all(sends).await;
}

fn reject_proposal(p: &Proposal, index: usize, reason: String) -> Message {
    Message::ProposalReject(ProposalReject {
        proposal_id: p.proposal_id,
        index,
        reason,
    })
}

/// Answers a `Proposal`: checks it, asks the handler, and on accept waits
/// (in the background) for `Signing0`.
pub(crate) async fn handle_proposal(
    shared: Arc<Shared>,
    peer: PeerId,
    p: Proposal,
    responder: Responder,
) {
    let span = info_span!("handle_proposal", proposal = %p.proposal_id, %peer);
    async move {
        let index = match check_proposal(&shared, Some(peer), &p) {
            Ok(i) => i,
            Err(e) => {
                crate::dispatch::warn_limited!(error = %e, "invalid proposal");
                // Our index if we are listed (any in-range index otherwise): a reply that
                // breaks the wire's limits would reach the proposer as garbage, not as the reason.
                let me = (shared.account.address(), shared.wire.local_peer_id());
                let index = p
                    .participants
                    .iter()
                    .position(|x| (x.address, x.peer) == me)
                    .unwrap_or(0);
                let _ = responder.reply(reject_proposal(&p, index, e.to_string()));
                return;
            }
        };
        // Held while the handler decides and, accepted, until the channel
        // is funded or failed.
        let slot = match shared.proposals.enter(peer) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = responder.reply(reject_proposal(&p, index, e.to_string()));
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        let handler = shared.proposal_handler.clone();
        let incoming = IncomingProposal {
            proposal: p.clone(),
            from: peer,
            index,
        };
        let deciding = tokio::spawn(async move {
            handler
                .handle_proposal(incoming, ProposalResponder { tx })
                .await
        });
        let decision = tokio::time::timeout(shared.timeouts.handler, rx).await;
        if decision.is_err() {
            // Nobody waits for this decision any more; a handler that hangs
            // must not pile up tasks past the proposal caps.
            deciding.abort();
        }
        let done = match decision {
            Ok(Ok(ProposalDecision::Accept(done))) => done,
            // The place is free before the proposer hears: its next
            // proposal must not find it still taken.
            Ok(Ok(ProposalDecision::Reject(reason))) => {
                drop(slot);
                let _ = responder.reply(reject_proposal(&p, index, reason));
                return;
            }
            Ok(Err(_)) | Err(_) => {
                drop(slot);
                let _ = responder.reply(reject_proposal(&p, index, "no decision".into()));
                return;
            }
        };
        let share = random_word();
        let id = p.proposal_id;
        let address = shared.account.address();
        lock(&shared.pending).insert(
            id,
            Pending {
                proposal: p,
                from: peer,
                index,
                share,
                done,
                _slot: slot,
            },
        );
        let _ = responder.reply(Message::ProposalAccept(ProposalAccept {
            proposal_id: id,
            index,
            nonce_share: share,
            address,
        }));
        crate::failpoint::hit_now("accepted").await;
        // Give up if Signing0 does not come. Hold only a weak reference
        // meanwhile, so a client that shuts down is not kept alive.
        let timeout = shared.timeouts.signing;
        let weak = Arc::downgrade(&shared);
        drop(shared);
        tokio::time::sleep(timeout).await;
        if let Some(shared) = weak.upgrade()
            && let Some(p) = lock(&shared.pending).remove(&id)
        {
            warn!("no Signing0 in time; proposal dropped");
            let _ = p.done.send(Err(Error::Timeout("version-0 signatures")));
        }
    }
    .instrument(span)
    .await
}

/// The proposer called a proposal off.
pub(crate) fn handle_abort(
    shared: &Arc<Shared>,
    peer: PeerId,
    r: ProposalReject,
    responder: Responder,
) {
    let mut pending = lock(&shared.pending);
    match pending.remove(&r.proposal_id) {
        Some(p) if p.from == peer => {
            let _ = p.done.send(Err(Error::Rejected {
                index: r.index,
                reason: r.reason,
            }));
        }
        Some(p) => {
            crate::dispatch::warn_limited!(%peer, "abort from a peer that is not the proposer");
            pending.insert(r.proposal_id, p);
        }
        None => {}
    }
    let _ = responder.reply(Message::Ack);
}

/// Answers `Signing0`: derives the channel, checks the proposer's
/// signature, persists ours, replies with it, then funds in the background.
pub(crate) async fn handle_signing0(
    shared: Arc<Shared>,
    peer: PeerId,
    s: Signing0,
    responder: Responder,
) {
    let pending = {
        let mut map = lock(&shared.pending);
        match map.remove(&s.proposal_id) {
            Some(p) if p.from == peer => Some(p),
            Some(p) => {
                map.insert(s.proposal_id, p);
                None
            }
            None => None,
        }
    };
    let Some(pending) = pending else {
        crate::dispatch::warn_limited!(%peer, proposal = %s.proposal_id, "Signing0 for no pending proposal of this peer");
        let _ = responder.refuse(Refusal::new(RefusalCode::Unauthorized, "no such proposal"));
        return;
    };
    let span = info_span!("handle_signing0", proposal = %s.proposal_id, me = pending.index);
    let signed = sign0(&shared, &pending, &s).instrument(span.clone()).await;
    // The proposal's place among the pending ones is given back before
    // anyone hears of its end: at once if refused, else once its channel
    // is funded or failed (a peer that never deposits must not pile up
    // channels waiting for funding).
    let Pending {
        done,
        index,
        _slot: slot,
        ..
    } = pending;
    match signed {
        Ok((core, signature)) => {
            let _ = responder.reply(Message::UpdateAccept(UpdateAccept {
                channel_id: core.id,
                version: 0,
                index,
                signature,
            }));
            crate::failpoint::hit("signed0").await;
            tokio::spawn(
                async move {
                    let res = async {
                        let committed = core
                            .wait_phase(shared.timeouts.signing, "version-0 commit", |p| {
                                p != Phase::Signing0
                            })
                            .await;
                        // The commit may come just as the wait gives up: a
                        // channel it moved on is funded as any other.
                        if let Err(e) = committed
                            && forget_unfunded(&shared, &core).await
                        {
                            return Err(e);
                        }
                        fund_and_activate(&shared, core).await
                    }
                    .await;
                    drop(slot);
                    let _ = done.send(res);
                }
                .instrument(span),
            );
        }
        Err(e) => {
            span.in_scope(|| warn!(error = %e, "Signing0 refused"));
            drop(slot);
            let _ = responder.reply(Message::UpdateReject(perun_wire::UpdateReject {
                channel_id: B256::ZERO,
                version: 0,
                index,
                reason: e.to_string(),
                kind: perun_wire::RejectKind::Refused,
            }));
            let _ = done.send(Err(e));
        }
    }
}

/// Forgets a channel whose version 0 never became complete here (still
/// `Signing0`): nothing of ours is deposited before it does, and the peers
/// can refund theirs with version 0 on-chain. A proposer that never sends
/// the commit must not leave a channel in memory and a record in the
/// store for good (every accepted proposal would). Returns whether it
/// forgot it (not if the commit came meanwhile).
pub(crate) async fn forget_unfunded(shared: &Shared, core: &ChannelCore) -> bool {
    let l = core.locked.lock().await;
    if l.machine.phase() != Phase::Signing0 {
        return false;
    }
    warn!(channel = %core.id, "the version-0 commit never came; forgetting the channel");
    shared.forget_channel(core.id).await;
    drop(l);
    true
}

async fn sign0(
    shared: &Arc<Shared>,
    pending: &Pending,
    s: &Signing0,
) -> Result<(Arc<ChannelCore>, perun_wallet::Signature)> {
    let p = &pending.proposal;
    let n = p.participants.len();
    if s.nonce_shares.len() != n || s.nonce_shares.get(pending.index) != Some(&pending.share) {
        return Err(Error::Protocol {
            peer: pending.from,
            reason: "nonce shares do not include ours".into(),
        });
    }
    let (params, state0) = channel_of(p, &s.nonce_shares)?;
    let mut machine = Machine::new(params, pending.index, state0)?;
    machine.set_phase(Phase::Signing0)?;
    machine.add_signature(p.proposer, s.signature)?;
    if shared.stopped() {
        return Err(Error::Closed);
    }
    let signature = machine.sign_staged(shared.account.as_ref())?;
    if n == 2 {
        // We now hold both signatures: version 0 is complete.
        machine.commit_staged()?;
    }
    let peers = p.participants.iter().map(|x| x.peer).collect();
    let core = ChannelCore::new(machine, peers, 0)?;
    {
        // Persist before our signature leaves this process.
        let l = core.locked.lock().await;
        shared
            .persister
            .channel_created(&core.record(&l.machine))
            .await?;
    }
    shared.insert_channel(core.clone());
    Ok((core, signature))
}
