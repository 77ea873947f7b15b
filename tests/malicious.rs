//! A dishonest peer's updates are rejected and change nothing (issue 6, §4).
//!
//! Alice (index 0) opens a channel with Bob (index 1) normally. Then Bob's
//! client stops and an "evil twin" takes over his network key: a raw wire
//! endpoint that sends whatever it likes. A third endpoint with a key of
//! its own plays an impostor.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::{Phase, SignedState, U256};
use perun::client::{Channel, Error};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{
    Config, Handle, Incoming, Message, Multiaddr, Node, PeerId, RejectKind, Update, UpdateAccept,
    UpdateCommit, UpdateWithCommit,
};

on_both_ledgers!(
    inflating_skipping_and_stealing_updates_are_rejected,
    bad_signatures_from_the_peer_are_rejected,
    updates_from_the_wrong_peer_are_rejected,
    a_state_alice_never_proposed_is_never_completed_from_sync,
    an_abandoned_update_still_takes_its_commit,
    a_failed_proposal_is_never_completed_on_a_newer_state,
    a_huge_aborted_version_does_not_block_alice,
    after_signing_a_final_state_alice_signs_nothing_else,
    a_signed_final_state_still_binds_alice_after_a_restart,
    a_huge_synced_version_does_not_block_alice,
    a_commit_riding_with_an_update_is_checked_like_a_commit,
);

struct Setup {
    _ledger: Ledger,
    alice: Channel,
    bob_key: LocalAccount,
    alice_peer: PeerId,
    alice_addrs: Vec<Multiaddr>,
    evil: Handle,
    evil_in: Option<Incoming>,
    _parties: Vec<common::Party>,
}

/// Opens Alice–Bob, then replaces Bob by an endpoint with his network key.
async fn setup(ledger: Ledger) -> Setup {
    setup_with(ledger, &Options::default()).await
}

async fn setup_with(ledger: Ledger, opts: &Options) -> Setup {
    let mut ps = parties(&ledger, 2, U256::from(1_000_000u64), opts).await;
    let chans = open(&ledger, &mut ps, U256::from(100u64)).await;
    chans[0].pay(1, 0, U256::from(10u64)).await.unwrap();
    let (evil, evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let alice_client = &ps[0].client;
    let alice_addrs = alice_client.listen_addrs().await.unwrap();
    Setup {
        _ledger: ledger,
        alice: chans[0].clone(),
        bob_key,
        alice_peer: alice_client.peer_id(),
        alice_addrs,
        evil,
        evil_in: Some(evil_in),
        _parties: ps,
    }
}

async fn send_update(s: &Setup, state: perun::channel::State, actor: usize) -> Message {
    let msg = Message::Update(Update {
        channel_id: s.alice.id(),
        state,
        actor,
    });
    s.evil.send(s.alice_peer, &msg).await.unwrap()
}

/// The twin signs the first update Alice proposes, as Bob would, and
/// returns its state.
fn sign_first_update(
    mut incoming: Incoming,
    bob_key: LocalAccount,
) -> tokio::task::JoinHandle<perun::channel::State> {
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            if let Message::Update(u) = msg {
                r.reply(common::accept(&bob_key, &u, 1)).unwrap();
                return u.state;
            }
        }
        panic!("no update arrived");
    })
}

/// The twin tells Alice that Bob's update of `version` is aborted (an
/// `UpdateReject` sent as a request); Alice acknowledges it.
async fn twin_aborts(s: &Setup, version: u64) {
    let abort = Message::UpdateReject(perun::wire::UpdateReject {
        channel_id: s.alice.id(),
        version,
        index: 1,
        reason: "aborted".into(),
        kind: RejectKind::Refused,
    });
    assert_eq!(
        s.evil.send(s.alice_peer, &abort).await.unwrap(),
        Message::Ack
    );
}

fn assert_refused(reply: &Message, what: &str) {
    match reply {
        Message::UpdateReject(r) => assert_eq!(r.kind, RejectKind::Refused, "{what}: {r:?}"),
        other => panic!("{what}: expected a rejection, got {other:?}"),
    }
}

fn assert_unchanged(alice: &Channel, before: &SignedState) {
    assert_eq!(&alice.state(), before);
    assert_eq!(alice.phase(), Phase::Active);
}

async fn inflating_skipping_and_stealing_updates_are_rejected(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();

    let mut inflate = before.state.next();
    inflate.outcome.balances[0][1] += U256::from(50u64);
    assert_refused(&send_update(&s, inflate, 1).await, "inflated balance");

    // Versions may skip burnt ones, but only so far.
    let mut skip = before.state.next();
    skip.version += perun::channel::limits::MAX_VERSION_STEP;
    skip.outcome.balances[0][1] -= U256::from(1u64);
    skip.outcome.balances[0][0] += U256::from(1u64);
    assert_refused(&send_update(&s, skip, 1).await, "version too far ahead");

    let repeat = before.state.clone();
    assert_refused(&send_update(&s, repeat, 1).await, "repeated version");

    let mut steal = before.state.next();
    steal.outcome.balances[0][0] -= U256::from(50u64);
    steal.outcome.balances[0][1] += U256::from(50u64);
    assert_refused(&send_update(&s, steal, 1).await, "taking Alice's funds");

    let mut claim_alice = before.state.next();
    claim_alice.outcome.balances[0][0] -= U256::from(50u64);
    claim_alice.outcome.balances[0][1] += U256::from(50u64);
    assert_refused(
        &send_update(&s, claim_alice, 0).await,
        "claiming to be Alice",
    );

    let mut other_channel = before.state.next();
    other_channel.channelId.0[0] ^= 1;
    assert_refused(&send_update(&s, other_channel, 1).await, "wrong channel id");

    assert_unchanged(&s.alice, &before);

    // A valid update from the same peer still goes through afterwards.
    let mut fair = before.state.next();
    fair.outcome.balances[0][1] -= U256::from(5u64);
    fair.outcome.balances[0][0] += U256::from(5u64);
    match send_update(&s, fair.clone(), 1).await {
        Message::UpdateAccept(a) => assert_eq!(a.version, fair.version),
        other => panic!("a fair update is accepted, got {other:?}"),
    }
    // Commits with a wrong or a missing signature are refused; the staged
    // update is not applied.
    let alice_real = alice_staged_sig(&s, &fair).await;
    let on_old_state = s.bob_key.sign_hash(before.state.hash()).unwrap();
    for signatures in [vec![alice_real, on_old_state], vec![alice_real]] {
        let bad_commit = Message::UpdateCommit(UpdateCommit {
            channel_id: s.alice.id(),
            version: fair.version,
            index: 1,
            signatures,
        });
        assert!(s.evil.send(s.alice_peer, &bad_commit).await.is_err());
        assert_eq!(s.alice.state(), before);
    }
    // Bob's honest commit completes it.
    let bob_sig = s.bob_key.sign_hash(fair.hash()).unwrap();
    let good_commit = Message::UpdateCommit(UpdateCommit {
        channel_id: s.alice.id(),
        version: fair.version,
        index: 1,
        signatures: vec![alice_real, bob_sig],
    });
    assert_eq!(
        s.evil.send(s.alice_peer, &good_commit).await.unwrap(),
        Message::Ack
    );
    let done = s
        .alice
        .wait_for_version(fair.version, Duration::from_secs(10));
    assert_eq!(done.await.unwrap().state, fair);
}

/// Alice's signature on her staged `st`, as her `Sync` reports it. Bob's
/// `Sync` shows him holding `st` (unsigned, as its proposer does until the
/// commit); if it did not, Alice would drop the update he gave up.
async fn alice_staged_sig(s: &Setup, st: &perun::channel::State) -> perun::wallet::Signature {
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Updating,
        latest: s.alice.state(),
        staged: Some(SignedState {
            state: st.clone(),
            sigs: vec![None, None],
        }),
    });
    match s.evil.send(s.alice_peer, &sync).await.unwrap() {
        Message::Sync(theirs) => {
            let staged = theirs.staged.expect("Alice has the update staged");
            assert_eq!(&staged.state, st);
            staged.sigs[0].expect("Alice signed it")
        }
        other => panic!("expected Alice's Sync, got {other:?}"),
    }
}

async fn bad_signatures_from_the_peer_are_rejected(ledger: Ledger) {
    let mut s = setup(ledger).await;
    let before = s.alice.state();
    let bob_key = s.bob_key.clone();
    // The evil twin answers every update with a signature on something else.
    let mut incoming = s.evil_in.take().unwrap();
    let responder = tokio::spawn(async move {
        let mut answered = 0;
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            if let Message::Update(u) = msg {
                let mut other = u.state.clone();
                other.version += 7;
                let sig = match answered {
                    0 => bob_key.sign_hash(other.hash()).unwrap(), // signs another state
                    _ => LocalAccount::random().sign_hash(u.state.hash()).unwrap(), // wrong key
                };
                answered += 1;
                r.reply(Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: 1,
                    signature: sig,
                }))
                .unwrap();
                if answered == 2 {
                    break;
                }
            }
        }
    });
    for what in ["signature on another state", "signature by another key"] {
        // The first request may still meet Alice's closing connection to the
        // real Bob; only a reply from the twin counts.
        let mut tries = 0;
        loop {
            match s.alice.pay(1, 0, U256::from(1u64)).await {
                Err(Error::Channel(_)) => break,
                Err(Error::Wire(e)) if tries < 5 => {
                    tries += 1;
                    eprintln!("{what}: transport error {e}, retrying");
                }
                other => panic!("{what}: expected a signature error, got {other:?}"),
            }
        }
        assert_unchanged(&s.alice, &before);
    }
    tokio::time::timeout(Duration::from_secs(10), responder)
        .await
        .unwrap()
        .unwrap();
}

async fn updates_from_the_wrong_peer_are_rejected(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let (mallory, _mallory_in) = Node::start(Config::new(perun::wire::generate_key()))
        .await
        .unwrap();
    for addr in &s.alice_addrs {
        mallory
            .add_address(s.alice_peer, addr.clone())
            .await
            .unwrap();
    }
    let mut fair = before.state.next();
    fair.outcome.balances[0][1] -= U256::from(5u64);
    fair.outcome.balances[0][0] += U256::from(5u64);
    for actor in [0, 1] {
        let msg = Message::Update(Update {
            channel_id: s.alice.id(),
            state: fair.clone(),
            actor,
        });
        let reply = mallory.send(s.alice_peer, &msg).await.unwrap();
        assert_refused(&reply, "update from an impostor");
    }
    assert_unchanged(&s.alice, &before);
}

/// A `Sync` may hand a 2-party proposer back the state its peer signed for
/// it, to complete; a peer must not get Alice to sign a state she never
/// proposed that way. Here Bob's twin offers one where Alice pays him.
async fn a_state_alice_never_proposed_is_never_completed_from_sync(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let mut theft = before.state.next();
    theft.outcome.balances[0][0] -= U256::from(50u64);
    theft.outcome.balances[0][1] += U256::from(50u64);
    let bob_sig = s.bob_key.sign_hash(theft.hash()).unwrap();
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Active,
        latest: before.clone(),
        staged: Some(SignedState {
            state: theft.clone(),
            sigs: vec![None, Some(bob_sig)],
        }),
    });
    for _ in 0..2 {
        match s.evil.send(s.alice_peer, &sync).await.unwrap() {
            Message::Sync(theirs) => {
                assert_eq!(theirs.latest, before);
                assert!(theirs.staged.is_none(), "Alice staged nothing");
            }
            other => panic!("expected Alice's Sync, got {other:?}"),
        }
    }
    assert_unchanged(&s.alice, &before);
    // Alice's next proposal skips the version Bob claims to have signed.
    let mut fair = before.state.next();
    fair.version += 1;
    fair.outcome.balances[0][0] -= U256::from(1u64);
    fair.outcome.balances[0][1] += U256::from(1u64);
    let twin = sign_first_update(s.evil_in.unwrap(), s.bob_key.clone());
    let paid = s.alice.pay(1, 0, U256::from(1u64));
    let (paid, proposed) = tokio::join!(paid, twin);
    assert_eq!(proposed.unwrap(), fair);
    assert_eq!(paid.unwrap().state, fair);
}

/// Alice signs Bob's update; Bob's `Sync` then shows he does not hold it
/// (as after his restart), so Alice drops it and is free to go on. Had Bob
/// completed it after all, his commit still applies: it is fully signed,
/// and Alice signed it.
async fn an_abandoned_update_still_takes_its_commit(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let mut fair = before.state.next();
    fair.outcome.balances[0][1] -= U256::from(5u64);
    fair.outcome.balances[0][0] += U256::from(5u64);
    let alice_sig = match send_update(&s, fair.clone(), 1).await {
        Message::UpdateAccept(a) => a.signature,
        other => panic!("a fair update is accepted, got {other:?}"),
    };
    assert_eq!(s.alice.phase(), Phase::Updating);
    let gave_up = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Active,
        latest: before.clone(),
        staged: None,
    });
    assert!(matches!(
        s.evil.send(s.alice_peer, &gave_up).await.unwrap(),
        Message::Sync(_)
    ));
    assert_unchanged(&s.alice, &before);
    let bob_sig = s.bob_key.sign_hash(fair.hash()).unwrap();
    let commit = Message::UpdateCommit(UpdateCommit {
        channel_id: s.alice.id(),
        version: fair.version,
        index: 1,
        signatures: vec![alice_sig, bob_sig],
    });
    assert_eq!(
        s.evil.send(s.alice_peer, &commit).await.unwrap(),
        Message::Ack
    );
    let done = s
        .alice
        .wait_for_version(fair.version, Duration::from_secs(10));
    assert_eq!(done.await.unwrap().state, fair);
    assert_eq!(s.alice.phase(), Phase::Active);
}

/// Bob's twin aborts a made-up far version (so Alice's next proposal is
/// numbered far ahead), lets Alice's payment of 10 fail without an answer,
/// then pays Alice 30 in a lower version, and finally hands Alice's failed
/// proposal back in a `Sync`, signed. Completing it now would apply it to
/// the newer state and take Bob's 30 back: Alice must refuse.
async fn a_failed_proposal_is_never_completed_on_a_newer_state(ledger: Ledger) {
    let mut s = setup(ledger).await;
    let before = s.alice.state();
    let far = before.state.version + 1_000;
    twin_aborts(&s, far).await;
    // Alice pays 10; the twin takes the proposal and never answers.
    let mut incoming = s.evil_in.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let twin = tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut held = Vec::new();
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            match msg {
                Message::Update(u) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(u.state);
                    }
                    held.push(r); // no answer
                }
                _ => drop(r),
            }
        }
    });
    let paid = s.alice.pay(1, 0, U256::from(10u64)).await;
    assert!(paid.is_err(), "the twin never answered: {paid:?}");
    let proposal = rx.await.unwrap();
    assert!(proposal.version > far, "numbered past the burnt version");
    assert_unchanged(&s.alice, &before);
    // The twin pays Alice 30 in a lower version; Alice signs it.
    let mut gift = before.state.next();
    gift.outcome.balances[0][1] -= U256::from(30u64);
    gift.outcome.balances[0][0] += U256::from(30u64);
    let alice_sig = match send_update(&s, gift.clone(), 1).await {
        Message::UpdateAccept(a) => a.signature,
        other => panic!("a payment to Alice is accepted, got {other:?}"),
    };
    let commit = Message::UpdateCommit(UpdateCommit {
        channel_id: s.alice.id(),
        version: gift.version,
        index: 1,
        signatures: vec![alice_sig, s.bob_key.sign_hash(gift.hash()).unwrap()],
    });
    assert_eq!(
        s.evil.send(s.alice_peer, &commit).await.unwrap(),
        Message::Ack
    );
    let received = s
        .alice
        .wait_for_version(gift.version, Duration::from_secs(10))
        .await
        .unwrap();
    // Now the twin hands back Alice's old proposal, signed by Bob.
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Updating,
        latest: received.clone(),
        staged: Some(SignedState {
            state: proposal.clone(),
            sigs: vec![None, Some(s.bob_key.sign_hash(proposal.hash()).unwrap())],
        }),
    });
    match s.evil.send(s.alice_peer, &sync).await.unwrap() {
        Message::Sync(theirs) => {
            assert_eq!(theirs.latest, received, "Alice stays on the newer state");
            assert!(theirs.staged.is_none());
        }
        other => panic!("expected Alice's Sync, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_unchanged(&s.alice, &received);
    assert_eq!(
        s.alice.state().state.outcome.balances[0][0],
        before.state.outcome.balances[0][0] + U256::from(30u64)
    );
    twin.abort();
}

/// An abort naming version 2^64 − 6 cannot push Alice's next version out
/// of reach: her next payment is still a valid transition, and goes through.
async fn a_huge_aborted_version_does_not_block_alice(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    twin_aborts(&s, u64::MAX - 5).await;
    let twin = sign_first_update(s.evil_in.unwrap(), s.bob_key.clone());
    let paid = s.alice.pay(1, 0, U256::from(1u64));
    let (paid, proposed) = tokio::join!(paid, twin);
    let proposed = proposed.unwrap();
    assert!(proposed.version <= before.state.version + perun::channel::limits::MAX_VERSION_STEP);
    assert_eq!(paid.unwrap().state, proposed);
}

/// The attack of issue 13: Bob's twin proposes a final state, Alice signs
/// it, the twin aborts it and then pays Alice in a newer state. Had Alice
/// signed that one, Bob could conclude the final state on-chain and take
/// the payment back. Alice refuses it, and refuses to propose anything
/// herself: the channel is closing.
async fn after_signing_a_final_state_alice_signs_nothing_else(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let mut fin = before.state.next();
    fin.isFinal = true;
    match send_update(&s, fin.clone(), 1).await {
        Message::UpdateAccept(a) => assert_eq!(a.version, fin.version),
        other => panic!("Alice should sign the final state, got {other:?}"),
    }
    twin_aborts(&s, fin.version).await;
    assert_unchanged(&s.alice, &before);

    let mut pays_alice = before.state.next();
    pays_alice.version = fin.version + 1;
    pays_alice.outcome.balances[0][1] -= U256::from(3u64);
    pays_alice.outcome.balances[0][0] += U256::from(3u64);
    let reply = send_update(&s, pays_alice, 1).await;
    assert_refused(&reply, "a state after a signed final one");
    assert_unchanged(&s.alice, &before);

    match s.alice.pay(1, 0, U256::from(1u64)).await {
        Err(Error::Channel(perun::channel::Error::SignedFinal { version, hash })) => {
            assert_eq!((version, hash), (fin.version, fin.hash()));
        }
        other => panic!("Alice's own update after a signed final state: {other:?}"),
    }
    assert_unchanged(&s.alice, &before);
}

/// A `Sync` whose staged state names version 2^64 − 1 burns at most
/// `MAX_VERSION_STEP − 1` versions past Alice's state (and that is what she
/// stores): her next payment is still a valid transition, and goes through.
async fn a_huge_synced_version_does_not_block_alice(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let mut far = before.state.next();
    far.version = u64::MAX;
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Updating,
        latest: before.clone(),
        staged: Some(SignedState {
            sigs: vec![None, Some(s.bob_key.sign_hash(far.hash()).unwrap())],
            state: far,
        }),
    });
    assert!(matches!(
        s.evil.send(s.alice_peer, &sync).await.unwrap(),
        Message::Sync(_)
    ));
    assert_unchanged(&s.alice, &before);
    let twin = sign_first_update(s.evil_in.unwrap(), s.bob_key.clone());
    let paid = s.alice.pay(1, 0, U256::from(1u64));
    let (paid, proposed) = tokio::join!(paid, twin);
    let proposed = proposed.unwrap();
    assert_eq!(
        proposed.version,
        before.state.version + perun::channel::limits::MAX_VERSION_STEP,
        "past the capped burnt version, and no further"
    );
    assert_eq!(paid.unwrap().state, proposed);
}

/// As above, with Alice restarted between the twin's abort and its newer
/// state: the final state she signed is in her store, so the restored
/// channel still refuses to sign anything else.
async fn a_signed_final_state_still_binds_alice_after_a_restart(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let id = s.alice.id();
    let mut fin = before.state.next();
    fin.isFinal = true;
    match send_update(&s, fin.clone(), 1).await {
        Message::UpdateAccept(a) => assert_eq!(a.version, fin.version),
        other => panic!("Alice should sign the final state, got {other:?}"),
    }
    twin_aborts(&s, fin.version).await;

    // Every handle on Alice's old client goes, or its store stays open.
    let Setup {
        _ledger: ledger,
        alice: old,
        alice_peer,
        evil,
        _parties: mut parties,
        ..
    } = s;
    drop(old);
    let alice = common::restart(&ledger, parties.remove(0)).await;
    for addr in alice.client.listen_addrs().await.unwrap() {
        evil.add_address(alice.client.peer_id(), addr)
            .await
            .unwrap();
    }
    let restored = alice.client.channel(&id).expect("restored");
    assert_eq!(restored.state(), before);

    let mut pays_alice = before.state.next();
    pays_alice.version = fin.version + 1;
    pays_alice.outcome.balances[0][1] -= U256::from(3u64);
    pays_alice.outcome.balances[0][0] += U256::from(3u64);
    // The twin's old connection went down with Alice's old client: retry
    // until it has dialled her again.
    let msg = Message::Update(Update {
        channel_id: id,
        state: pays_alice,
        actor: 1,
    });
    let mut reply = None;
    for _ in 0..50 {
        match evil.send(alice_peer, &msg).await {
            Ok(r) => {
                reply = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let reply = reply.expect("the twin reaches the restarted Alice");
    assert_refused(&reply, "a state after a signed final one, after a restart");
    assert_eq!(restored.state(), before);
    parties.push(alice);
}

/// Bob's `UpdateWithCommit` (DESIGN §8): the carried commit is checked as an
/// `UpdateCommit` would be, and one that does not belong to its update, or
/// does not check out, refuses the whole request and changes nothing.
async fn a_commit_riding_with_an_update_is_checked_like_a_commit(ledger: Ledger) {
    let s = setup(ledger).await;
    let before = s.alice.state();
    let bob_pays = |st: &perun::channel::State, x: u64| {
        let mut next = st.next();
        next.outcome.balances[0][1] -= U256::from(x);
        next.outcome.balances[0][0] += U256::from(x);
        next
    };
    let fair = bob_pays(&before.state, 5);
    let alice_sig = match send_update(&s, fair.clone(), 1).await {
        Message::UpdateAccept(a) => a.signature,
        other => panic!("a fair update is accepted, got {other:?}"),
    };
    let bob_sig = s.bob_key.sign_hash(fair.hash()).unwrap();
    let on_old_state = s.bob_key.sign_hash(before.state.hash()).unwrap();
    let next = bob_pays(&fair, 5);
    let commit = |channel_id, index, version, signatures| UpdateCommit {
        channel_id,
        version,
        index,
        signatures,
    };
    let (evil, alice_peer, channel_id) = (&s.evil, s.alice_peer, s.alice.id());
    let send = |commit: UpdateCommit, state: perun::channel::State| {
        let msg = Message::UpdateWithCommit(UpdateWithCommit {
            commit,
            update: Update {
                channel_id,
                state,
                actor: 1,
            },
        });
        async move { evil.send(alice_peer, &msg).await }
    };
    let id = s.alice.id();
    let mut other_id = id;
    other_id.0[0] ^= 1;
    let good = vec![alice_sig, bob_sig];
    for (what, c) in [
        (
            "a commit by another sender",
            commit(id, 0, fair.version, good.clone()),
        ),
        (
            "a commit not older than its update",
            commit(id, 1, next.version, good.clone()),
        ),
        (
            "a commit of another channel",
            commit(other_id, 1, fair.version, good.clone()),
        ),
        (
            "a signature on another state",
            commit(id, 1, fair.version, vec![alice_sig, on_old_state]),
        ),
        (
            "a missing signature",
            commit(id, 1, fair.version, vec![alice_sig]),
        ),
    ] {
        assert!(send(c, next.clone()).await.is_err(), "{what} is refused");
        assert_eq!(s.alice.state(), before, "{what} changes nothing");
    }
    // A good commit is taken even when the update it carries is refused.
    let mut inflate = fair.next();
    inflate.outcome.balances[0][1] += U256::from(50u64);
    assert_refused(
        &send(commit(id, 1, fair.version, good.clone()), inflate)
            .await
            .unwrap(),
        "an inflating update after a good commit",
    );
    let done = s
        .alice
        .wait_for_version(fair.version, Duration::from_secs(10));
    assert_eq!(done.await.unwrap().state, fair);
    // Carried again (a repeated commit is harmless) with a fair update: signed.
    match send(commit(id, 1, fair.version, good), next.clone())
        .await
        .unwrap()
    {
        Message::UpdateAccept(a) => assert_eq!(a.version, next.version),
        other => panic!("a fair update after its commit is accepted, got {other:?}"),
    }
    assert_eq!(s.alice.state().state, fair);
}

/// How Bob's twin answers Alice's first `Sync` once it serves as an
/// honest Bob ([`serve_as_honest_bob`]).
#[derive(Debug, Clone, Copy)]
enum FirstSync {
    /// Truthfully, like every later one.
    Truthful,
    /// It says it still holds the dead update (and then neither commits
    /// nor aborts it).
    ClaimsTheUpdate,
    /// A `Sync` under the wrong index: a bad reply.
    WrongIndex,
    /// A `Busy` refusal, as a peer at its request cap sends.
    Busy,
}

/// The test timeouts with `update_wait`.
fn quick(update_wait: Duration) -> Options {
    Options {
        timeouts: Some(perun::client::Timeouts {
            update_wait,
            ..common::test_timeouts(Options::default().funding_timeout)
        }),
        ..Options::default()
    }
}

/// Restarts Alice's client on her store with `opts` (every handle on the
/// old one goes first, or its store stays open), and introduces her and
/// Bob's twin to each other again.
async fn restart_alice(s: Setup, opts: &Options) -> Setup {
    let Setup {
        _ledger: ledger,
        alice,
        bob_key,
        alice_peer,
        evil,
        evil_in,
        _parties: mut parties,
        ..
    } = s;
    let id = alice.id();
    drop(alice);
    let restarted = common::restart_opts(&ledger, parties.remove(0), opts).await;
    let alice_addrs = restarted.client.listen_addrs().await.unwrap();
    for addr in &alice_addrs {
        evil.add_address(alice_peer, addr.clone()).await.unwrap();
    }
    for addr in evil.listen_addrs().await.unwrap() {
        restarted
            .client
            .add_peer(evil.local_peer_id(), addr)
            .await
            .unwrap();
    }
    let alice = restarted.client.channel(&id).expect("restored");
    parties.insert(0, restarted);
    Setup {
        _ledger: ledger,
        alice,
        bob_key,
        alice_peer,
        alice_addrs,
        evil,
        evil_in,
        _parties: parties,
    }
}

/// Opens the channel with timeouts of `update_wait`, then Bob's twin
/// proposes that Bob pays Alice 1 and never commits it: Alice signed it
/// and waits `Updating`. Returns the setup and the state before.
async fn alice_holds_a_dead_update(update_wait: Duration) -> (Setup, SignedState) {
    let s = setup_with(Ledger::sim().await, &quick(update_wait)).await;
    let before = s.alice.state();
    let mut dead = before.state.next();
    dead.outcome.balances[0][1] -= U256::from(1u64);
    dead.outcome.balances[0][0] += U256::from(1u64);
    assert!(matches!(
        send_update(&s, dead, 1).await,
        Message::UpdateAccept(_)
    ));
    assert_eq!(s.alice.phase(), Phase::Updating);
    (s, before)
}

/// From now on Bob's twin answers as an honest Bob that never got the
/// update it proposed: it signs Alice's updates, and its `Sync` stands on
/// Alice's latest state with nothing staged (`first` may answer her first
/// `Sync` otherwise). Counts her `Sync`s.
fn serve_as_honest_bob(s: &mut Setup, first: FirstSync) -> Arc<AtomicUsize> {
    let syncs = Arc::new(AtomicUsize::new(0));
    let (key, count) = (s.bob_key.clone(), syncs.clone());
    let mut incoming = s.evil_in.take().unwrap();
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            let reply = match msg {
                Message::Update(u) => common::accept(&key, &u, 1),
                Message::UpdateWithCommit(m) => common::accept(&key, &m.update, 1),
                Message::Sync(theirs) => {
                    let mut ours = perun::wire::Sync {
                        channel_id: theirs.channel_id,
                        index: 1,
                        phase: Phase::Active,
                        latest: theirs.latest.clone(),
                        staged: None,
                    };
                    match (count.fetch_add(1, Ordering::SeqCst), first) {
                        (0, FirstSync::ClaimsTheUpdate) => {
                            ours.phase = Phase::Updating;
                            ours.staged = theirs.staged;
                        }
                        (0, FirstSync::WrongIndex) => ours.index = 0,
                        (0, FirstSync::Busy) => {
                            let busy =
                                perun::wire::Refusal::new(perun::wire::RefusalCode::Busy, "busy");
                            let _ = r.refuse(busy);
                            continue;
                        }
                        _ => {}
                    }
                    Message::Sync(ours)
                }
                _ => Message::Ack,
            };
            let _ = r.reply(reply);
        }
    });
    syncs
}

/// Alice pays Bob 1 until it goes through or `within` passes, retrying
/// each retryable failure after `pause`.
async fn alice_pays_through(s: &Setup, within: Duration, pause: Duration) -> SignedState {
    let deadline = tokio::time::Instant::now() + within;
    let mut tries = 0;
    let paid = loop {
        tries += 1;
        match s.alice.pay(1, 0, U256::from(1u64)).await {
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
            }
            other => break other,
        }
    };
    paid.unwrap_or_else(|e| panic!("still stuck after {tries} tries: {e}"))
}

/// Bob's twin proposes an update, Alice signs it, and the twin never
/// commits it; from then on it answers everything as an honest Bob would.
/// Alice pays and retries each retryable failure at once, as
/// `is_retryable` allows. Her resync with Bob, which drops the dead
/// update, needs her channel's update lock; her payment held it while it
/// waited for `Updating` to clear, and the resync counted the busy lock as
/// Bob unreachable and backed off: she stayed `Updating` for good (an
/// adversarial review of 3-party channels; the same code runs here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_retried_at_once_is_freed_from_a_dead_update_by_the_resync() {
    let (mut s, before) = alice_holds_a_dead_update(Duration::from_secs(2)).await;
    serve_as_honest_bob(&mut s, FirstSync::Truthful);
    let paid = alice_pays_through(&s, Duration::from_secs(30), Duration::ZERO).await;
    assert_eq!(
        paid.state.outcome.balances[0][1],
        before.state.outcome.balances[0][1] + U256::from(1u64)
    );
}

/// The commit sweep asked the proposer of a dead update once. An answer
/// that did not settle it (the twin still claims the update, answers
/// under a wrong index, or is `Busy`) left Alice `Updating` for good,
/// although every later answer would have been truthful (found by
/// `tests/fuzz_peer.rs`, seed 3072). She asks again every `update_wait`,
/// and a `Busy` refusal is retried like an unreachable peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_answer_that_does_not_settle_a_dead_update_is_asked_again() {
    for first in [
        FirstSync::ClaimsTheUpdate,
        FirstSync::WrongIndex,
        FirstSync::Busy,
    ] {
        let (mut s, _) = alice_holds_a_dead_update(Duration::from_secs(1)).await;
        let syncs = serve_as_honest_bob(&mut s, first);
        alice_pays_through(&s, Duration::from_secs(20), Duration::from_millis(500)).await;
        assert!(syncs.load(Ordering::SeqCst) >= 2, "{first:?}");
    }
}

/// The same after Alice restarts with the dead update staged: its
/// proposer is not stored, so the sweep never asked about it, and one
/// unsettling answer to her restore `Sync` left her `Updating` for good
/// (review of d63c94d). A restored update is asked about `update_wait`
/// after the restart, of every peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_dead_update_is_asked_about_again() {
    for first in [FirstSync::ClaimsTheUpdate, FirstSync::WrongIndex] {
        let (mut s, _) = alice_holds_a_dead_update(Duration::from_secs(1)).await;
        let syncs = serve_as_honest_bob(&mut s, first);
        let s = restart_alice(s, &quick(Duration::from_secs(1))).await;
        assert_eq!(s.alice.phase(), Phase::Updating, "restored with it staged");
        alice_pays_through(&s, Duration::from_secs(20), Duration::from_millis(500)).await;
        assert!(syncs.load(Ordering::SeqCst) >= 2, "{first:?}");
    }
}
