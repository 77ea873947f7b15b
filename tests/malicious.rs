//! A dishonest peer's updates are rejected and change nothing (issue 6, §4).
//!
//! Alice (index 0) opens a channel with Bob (index 1) normally. Then Bob's
//! client stops and an "evil twin" takes over his network key: a raw wire
//! endpoint that sends whatever it likes. A third endpoint with a key of
//! its own plays an impostor.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::{Phase, SignedState, U256};
use perun::client::{Channel, Error};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{
    Config, Handle, Incoming, Message, Multiaddr, Node, PeerId, RejectKind, Update, UpdateAccept,
    UpdateCommit,
};

on_both_ledgers!(
    inflating_skipping_and_stealing_updates_are_rejected,
    bad_signatures_from_the_peer_are_rejected,
    updates_from_the_wrong_peer_are_rejected,
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
    let mut ps = parties(&ledger, 2, U256::from(1_000_000u64), &Options::default()).await;
    let chans = open(&ledger, &mut ps, U256::from(100u64)).await;
    chans[0].pay(1, 0, U256::from(10u64)).await.unwrap();
    let bob = &ps[1];
    let bob_key = LocalAccount::from_bytes(&bob.account.secret_bytes()).unwrap();
    bob.client.shutdown().await;
    let (evil, evil_in) = Node::start(Config::new(bob.key.clone())).await.unwrap();
    let alice_client = &ps[0].client;
    let alice_addrs = alice_client.listen_addrs().await.unwrap();
    for addr in &alice_addrs {
        evil.add_address(alice_client.peer_id(), addr.clone())
            .await
            .unwrap();
    }
    for addr in evil.listen_addrs().await.unwrap() {
        alice_client
            .add_peer(evil.local_peer_id(), addr)
            .await
            .unwrap();
    }
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

    let mut skip = before.state.next();
    skip.version += 1;
    skip.outcome.balances[0][1] -= U256::from(1u64);
    skip.outcome.balances[0][0] += U256::from(1u64);
    assert_refused(&send_update(&s, skip, 1).await, "skipped version");

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
    assert_eq!(s.alice.state().state, fair);
}

/// Alice's signature on her staged `st`, as her `Sync` reports it.
async fn alice_staged_sig(s: &Setup, st: &perun::channel::State) -> perun::wallet::Signature {
    let sync = Message::Sync(perun::wire::Sync {
        channel_id: s.alice.id(),
        index: 1,
        phase: Phase::Active,
        latest: s.alice.state(),
        staged: None,
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
