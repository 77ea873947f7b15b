//! Disputes (issue 7): the watcher refutes stale registrations, concludes
//! and withdraws; `settle` closes alone when the peer is silent; a channel
//! whose peer never funds fails with `FundingTimeout` and its deposits come
//! back. Each test runs against `SimLedger` and against anvil with redb.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, open, parties};
use perun::adjudicator::{Funder, FundingRequest};
use perun::channel::{Phase, SignedState, U256};
use perun::client::Error;

on_both_ledgers!(
    stale_registration_is_refuted,
    latest_registration_is_only_withdrawn,
    silent_peer_settles_on_chain,
    funding_timeout_names_the_peer_and_refunds,
);

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const CHALLENGE: u64 = 60;
const WAIT: Duration = Duration::from_secs(60);

fn u(x: u64) -> U256 {
    U256::from(x)
}

use common::{bob_registers, bob_withdraws, on_chain_version, registered};

async fn check_balances(ledger: &Ledger, ps: &[common::Party], st: &SignedState) {
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT - EACH) + st.state.outcome.balances[0][i],
            "{}: participant {i} got exactly its share of the latest state",
            ledger.name()
        );
    }
}

async fn stale_registration_is_refuted(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (alice, bob) = (&chans[0], &chans[1]);
    bob.pay(0, 0, u(100)).await.unwrap();
    let stale = bob.state(); // Bob still has 900 here ...
    for _ in 0..5 {
        bob.pay(0, 0, u(100)).await.unwrap(); // ... and 400 after these.
    }
    let latest = common::caught_up(&chans).await;
    assert_eq!(latest.state.version, 6);
    let mut events = alice.events();
    ps[1].client.shutdown().await;
    let adj = bob_registers(&ledger, &ps[1], bob, stale.clone()).await;

    registered(&mut events, 1).await; // Alice's watcher saw Bob's cheat ...
    on_chain_version(&adj, alice, 6).await; // ... and refuted it.
    alice.wait_for_phase(Phase::Registered, WAIT).await.unwrap();
    ledger.advance(CHALLENGE + 1).await;
    alice.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    bob_withdraws(&adj, &ps[1], bob, &latest).await;
    check_balances(&ledger, &ps, &latest).await;
}

async fn latest_registration_is_only_withdrawn(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (alice, bob) = (&chans[0], &chans[1]);
    alice.pay(1, 0, u(250)).await.unwrap();
    let latest = common::caught_up(&chans).await;
    let mut events = alice.events();
    ps[1].client.shutdown().await;
    let adj = bob_registers(&ledger, &ps[1], bob, latest.clone()).await;
    registered(&mut events, 1).await;
    ledger.advance(CHALLENGE + 1).await;
    alice.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    bob_withdraws(&adj, &ps[1], bob, &latest).await;
    check_balances(&ledger, &ps, &latest).await;
    // Alice never registered anything herself.
    let d = adj.dispute(alice.id()).await.unwrap().unwrap();
    assert_eq!(d.version, 1);
    assert!(d.concluded);
}

async fn silent_peer_settles_on_chain(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (alice, bob) = (chans[0].clone(), &chans[1]);
    bob.pay(0, 0, u(300)).await.unwrap();
    let latest = common::caught_up(&chans).await;
    ps[1].client.shutdown().await; // Bob goes silent.
    let settling = tokio::spawn({
        let alice = alice.clone();
        async move { alice.settle().await }
    });
    alice.wait_for_phase(Phase::Registered, WAIT).await.unwrap();
    // `Registered` means "closing on-chain": wait for the registration itself.
    let (_, adj) = ledger.backends(&ps[1].account).await;
    on_chain_version(&adj, &alice, latest.state.version).await;
    ledger.advance(CHALLENGE + 1).await;
    tokio::time::timeout(WAIT, settling)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(alice.phase(), Phase::Withdrawn);
    // Bob comes back later and takes his share.
    bob_withdraws(&adj, &ps[1], bob, &latest).await;
    check_balances(&ledger, &ps, &latest).await;
}

/// A funder that never deposits and reports a timeout naming itself.
struct NeverFunds;

#[async_trait]
impl Funder for NeverFunds {
    async fn fund(&self, req: FundingRequest) -> perun::adjudicator::Result<()> {
        tokio::time::sleep(req.timeout).await;
        Err(perun::adjudicator::Error::FundingTimeout {
            missing: vec![(req.index, req.params.participants[req.index])],
        })
    }

    /// It claims every asset, so proposals reach the funding step.
    fn supports(&self, _: &perun::channel::Asset) -> bool {
        true
    }
}

async fn funding_timeout_names_the_peer_and_refunds(ledger: Ledger) {
    let alice_opts = Options {
        funding_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let bob_opts = Options {
        funder: Some(Arc::new(NeverFunds)),
        funding_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let mut ps = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &bob_opts).await,
    ];
    common::introduce(&ps).await;
    let bob_addr = ps[1].client.address();
    let prop = common::proposal(&ledger, &ps, u(EACH));
    let alice_client = ps[0].client.clone();
    let err = alice_client.propose_channel(prop).await.unwrap_err();
    match &err {
        Error::Chain(perun::adjudicator::Error::FundingTimeout { missing }) => {
            assert_eq!(missing, &vec![(1, bob_addr)], "names Bob")
        }
        other => panic!("expected FundingTimeout, got {other}"),
    }
    match tokio::time::timeout(WAIT, ps[1].opened.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Err(Error::Chain(perun::adjudicator::Error::FundingTimeout { .. })) => {}
        other => panic!("Bob's accept fails too, got {other:?}"),
    }
    // Alice's deposit is locked until version 0's challenge period ends.
    assert_eq!(ledger.balance(alice_client.address()).await, u(MINT - EACH));
    let alice = alice_client
        .channels()
        .pop()
        .expect("Alice keeps the channel to recover it");
    alice.wait_for_phase(Phase::Registered, WAIT).await.unwrap();
    let (_, adj) = ledger.backends(&ps[0].account).await;
    on_chain_version(&adj, &alice, 0).await;
    ledger.advance(CHALLENGE + 1).await;
    alice.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    assert_eq!(ledger.balance(alice_client.address()).await, u(MINT));
    assert_eq!(ledger.balance(bob_addr).await, u(MINT));
}
