//! Reorgs (issue 7): on anvil, with the chain backends waiting two blocks
//! (`EthConfig.confirmations = 2`), a stale registration that a chain
//! reorganisation drops before it is two blocks deep never makes the honest
//! watcher act, not even a watcher restarted while the registration is at the
//! chain's head, and the channel keeps working afterwards. The control case:
//! a stale registration that stays is still refuted once it is deep enough.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::time::Duration;

use common::{Ledger, Options, open, parties, restart};
use perun::adjudicator::testing::Anvil;
use perun::adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, SignedChannel, WithdrawRequest,
};
use perun::channel::{Phase, U256};
use perun::client::ChannelEvent;

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const DEPTH: u64 = 2;
const CHALLENGE: u64 = 60;
const WAIT: Duration = Duration::from_secs(60);
/// How long the honest client gets to (wrongly) react while the stale
/// registration is at the chain's head.
const WINDOW: Duration = Duration::from_secs(3);

fn u(x: u64) -> U256 {
    U256::from(x)
}

fn anvil_of(ledger: &Ledger) -> &Anvil {
    match ledger {
        Ledger::Anvil { anvil, .. } => anvil,
        Ledger::Sim(_) => unreachable!("reorgs need anvil"),
    }
}

async fn head(anvil: &Anvil) -> u64 {
    anvil.block_number().await.unwrap()
}

/// Waits until the chain's head reaches `n`.
async fn head_reaches(anvil: &Anvil, n: u64) {
    tokio::time::timeout(WAIT, async {
        while head(anvil).await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("blocks are mined");
}

/// An anvil ledger whose clients' backends wait `DEPTH` blocks, and the
/// config a cheater uses who trusts blocks at once.
async fn deep_anvil() -> (Ledger, EthConfig) {
    let mut ledger = Ledger::anvil().await;
    let Ledger::Anvil { config, .. } = &mut ledger else {
        unreachable!("anvil ledger");
    };
    config.confirmations = Some(DEPTH);
    let instant = EthConfig {
        confirmations: Some(0),
        ..config.clone()
    };
    (ledger, instant)
}

/// Bob registers a stale state while the chain stands still; Alice's client
/// restarts with it one block deep at the head, then a reorg replaces its
/// block. Alice's client sends nothing and stays `Active`, her money stays put,
/// and the channel updates and settles cooperatively afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reorged_registration_is_ignored() {
    let (ledger, instant) = deep_anvil().await;
    let anvil = anvil_of(&ledger);
    // Blocks keep coming, as on a live chain, so confirmations arrive.
    let miner = anvil.start_miner(Duration::from_millis(100));

    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let mut chans = open(&ledger, &mut ps, u(EACH)).await;
    let (bob, alice) = (chans.pop().unwrap(), chans.pop().unwrap());
    bob.pay(0, 0, u(100)).await.unwrap();
    let stale = bob.state(); // Bob still has 900 here ...
    for _ in 0..5 {
        bob.pay(0, 0, u(100)).await.unwrap(); // ... and 400 after these.
    }
    let latest = common::caught_up(&[alice.clone(), bob.clone()]).await;
    assert_eq!(latest.state.version, 6);
    let alice_addr = ps[0].client.address();
    assert_eq!(ledger.balance(alice_addr).await, u(MINT - EACH));

    // The chain stands still while Bob cheats: only transactions mine blocks.
    let paused = miner.pause().await;
    let cheat = EthAdjudicator::connect(&anvil.ws_url(), &ps[1].account, instant)
        .await
        .unwrap();
    cheat
        .register(&SignedChannel {
            params: bob.params().clone(),
            state: stale,
        })
        .await
        .unwrap();
    let at = head(anvil).await;
    let id = alice.id();
    assert_eq!(
        cheat.dispute(id).await.unwrap().map(|d| d.version),
        Some(1),
        "the stale registration is at the head"
    );
    let (_, alice_adj) = ledger.backends(&ps[0].account).await;
    assert_eq!(
        alice_adj.dispute(id).await.unwrap(),
        None,
        "Alice's backend does not trust it yet"
    );

    // Alice's client restarts now: its watcher reads the chain at once.
    drop(alice); // The old client's handle keeps its store open.
    let alice_party = restart(&ledger, ps.remove(0)).await;
    ps.insert(0, alice_party);
    common::introduce(&ps).await;
    let alice = ps[0].client.channel(&id).expect("channel restored");
    let mut alice_events = alice.events();
    assert_eq!(alice.phase(), Phase::Active);
    // Nothing Alice's client does may touch the chain: the head stays put.
    let reacted = tokio::time::timeout(WINDOW, head_reaches(anvil, at + 1)).await;
    assert!(reacted.is_err(), "Alice's client sent a transaction");
    assert_eq!(alice.phase(), Phase::Active);

    // The reorg: the registration's block is replaced by an empty one.
    let depth = head(anvil).await - at + 1;
    anvil.reorg(depth).await.unwrap();
    assert_eq!(head(anvil).await, at, "same height, other block");
    assert_eq!(
        cheat.dispute(id).await.unwrap(),
        None,
        "the reorg dropped it"
    );
    drop(paused);
    head_reaches(anvil, at + 2 * DEPTH + 2).await;

    // The honest side did nothing: nothing registered on-chain at all, the
    // channel is active on both sides and Alice's money is where it was.
    assert_eq!(cheat.dispute(id).await.unwrap(), None);
    assert_eq!(alice_adj.dispute(id).await.unwrap(), None);
    assert_eq!(alice.phase(), Phase::Active);
    assert_eq!(bob.phase(), Phase::Active);
    assert_eq!(ledger.balance(alice_addr).await, u(MINT - EACH));

    // The channel still works: an update, then a cooperative settle.
    alice.pay(1, 0, u(50)).await.unwrap();
    let latest = common::caught_up(&[alice.clone(), bob.clone()]).await;
    assert_eq!(latest.state.version, 7);
    alice.settle().await.unwrap();
    bob.settle().await.unwrap();
    assert_eq!(alice.phase(), Phase::Withdrawn);
    assert_eq!(bob.phase(), Phase::Withdrawn);
    let fin = alice.state().state;
    assert!(fin.isFinal);
    assert_eq!(fin.outcome.balances[0], vec![u(1_550), u(450)]);
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT - EACH) + fin.outcome.balances[0][i],
            "participant {i} got exactly its share of the final state"
        );
    }
    // Alice's application never saw the dropped registration: every event
    // up to the watcher's final `Withdrawn` is free of it.
    let seen = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        while let Some(ev) = alice_events.next().await {
            let done = matches!(ev, ChannelEvent::Withdrawn);
            seen.push(ev);
            if done {
                return seen;
            }
        }
        seen
    })
    .await
    .unwrap();
    assert!(
        matches!(seen.last(), Some(ChannelEvent::Withdrawn)),
        "events {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, ChannelEvent::Chain(AdjudicatorEvent::Registered { .. }))),
        "the dropped registration was delivered: {seen:?}"
    );
}

/// The control case: with the same confirmation depth, a stale registration
/// that stays on the chain is refuted once it is `DEPTH` blocks deep, and the
/// dispute ends with the latest state's balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirmed_registration_is_refuted() {
    let (ledger, instant) = deep_anvil().await;
    let anvil = anvil_of(&ledger);
    let _miner = anvil.start_miner(Duration::from_millis(100));
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (alice, bob) = (&chans[0], &chans[1]);
    bob.pay(0, 0, u(100)).await.unwrap();
    let stale = bob.state();
    for _ in 0..5 {
        bob.pay(0, 0, u(100)).await.unwrap();
    }
    let latest = common::caught_up(&chans).await;
    assert_eq!(latest.state.version, 6);
    let mut events = alice.events();
    ps[1].client.shutdown().await;
    let cheat = EthAdjudicator::connect(&anvil.ws_url(), &ps[1].account, instant)
        .await
        .unwrap();
    cheat
        .register(&SignedChannel {
            params: bob.params().clone(),
            state: stale,
        })
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(ChannelEvent::Chain(AdjudicatorEvent::Registered { version: 1, .. })) => {
                    return;
                }
                Some(_) => {}
                None => panic!("Alice's client stopped"),
            }
        }
    })
    .await
    .expect("Alice sees the registration once it is deep enough");
    tokio::time::timeout(WAIT, async {
        while cheat
            .dispute(alice.id())
            .await
            .unwrap()
            .is_none_or(|d| d.version != 6)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Alice refutes with version 6");
    alice.wait_for_phase(Phase::Registered, WAIT).await.unwrap();
    ledger.advance(CHALLENGE + 1).await;
    alice.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    cheat
        .withdraw(&WithdrawRequest {
            params: bob.params().clone(),
            state: latest.state.clone(),
            index: 1,
            account: ps[1].account.clone(),
            receiver: ps[1].client.address(),
        })
        .await
        .unwrap();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT - EACH) + latest.state.outcome.balances[0][i],
            "participant {i} got exactly its share of the latest state"
        );
    }
}
