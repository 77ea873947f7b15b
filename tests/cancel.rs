//! Callers that give up: a `pay` future dropped at any moment (before its
//! request left, while the peer signs, while our store writes, while our
//! commit rides with the next update) leaves a channel that still updates,
//! whose two sides end on the same state, and that settles paying each
//! side exactly its share. Both sides pay and both cancel, on redb stores.
//!
//! A `propose_channel` dropped at any moment still opens its channel (the
//! peer accepted, both deposited): every one of them settles, and each
//! side gets back exactly what it deposited.
//!
//! The cancellation delays are seeded (`PERUN_TEST_SEED`, printed), so a
//! failing run can be repeated; concurrent timing still varies.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::{Phase, U256};
use perun::client::Error;
use rand::{Rng, SeedableRng};

on_both_ledgers!(
    payments_cancelled_at_random_moments_leave_a_working_channel,
    channel_proposals_cancelled_at_random_moments_still_open,
);

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Pays 1 from `from` to the other side until it goes through; a conflict
/// (both sides proposed at once, or a version burnt by a cancelled update)
/// is retried.
async fn pay_until_done(chans: &[perun::client::Channel], from: usize) {
    for _ in 0..20 {
        match chans[from].pay(1 - from, 0, u(1)).await {
            Ok(_) => return,
            Err(e @ (Error::Conflict | Error::Timeout(_))) => {
                eprintln!(
                    "party {from}: {e}; phases {:?} {:?}",
                    chans[0].phase(),
                    chans[1].phase()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("party {from} cannot pay after the cancellations: {e}"),
        }
    }
    panic!("party {from} cannot pay after the cancellations: conflicts only");
}

fn seeded() -> rand::rngs::StdRng {
    let seed = std::env::var("PERUN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6_221_079);
    eprintln!("PERUN_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

async fn payments_cancelled_at_random_moments_leave_a_working_channel(ledger: Ledger) {
    let mut rng = seeded();
    let opts = Options {
        redb: true,
        ..Options::default()
    };
    let mut ps = parties(&ledger, 2, u(MINT), &opts).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;

    // How long a payment takes here (debug or release, this machine):
    // cancelling within up to twice that hits every step of one.
    let mut took = Vec::new();
    for from in [0, 1, 0, 1, 0] {
        let t = std::time::Instant::now();
        chans[from].pay(1 - from, 0, u(1)).await.unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    // The span follows the machine's speed of the moment (a loaded machine
    // is slower than while it was measured): shorter after an update that
    // completed, longer after one that was cut, about half of them cut.
    let mut span = took[2].as_secs_f64() * 2.0;

    let (mut done, mut cancelled, mut failed) = (5, 0, 0);
    for round in 0..600 {
        if round >= 150 && cancelled >= 20 {
            break;
        }
        let from = rng.gen_range(0..2);
        let after = Duration::from_secs_f64(span * rng.gen_range(0.0..1.0));
        match tokio::time::timeout(after, chans[from].pay(1 - from, 0, u(1))).await {
            Ok(Ok(_)) => {
                done += 1;
                span *= 0.9;
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => {
                cancelled += 1;
                span *= 1.1;
            }
        }
    }
    eprintln!(
        "{}: {done} done, {cancelled} cancelled, {failed} failed",
        ledger.name()
    );
    assert!(cancelled >= 20, "the delays cancel often enough");

    // Each side pays again, for good; then both hold the same state.
    pay_until_done(&chans, 0).await;
    pay_until_done(&chans, 1).await;
    let last = chans[1].state();
    let alice = chans[0]
        .wait_for_version(last.state.version, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(alice, last, "both sides end on the same state");
    assert!(last.is_fully_signed());
    let held: U256 = last.state.outcome.balances[0].iter().copied().sum();
    assert_eq!(held, u(2 * EACH), "no wei appeared or vanished");
    assert!(
        last.state.version > done,
        "every completed payment moved the version"
    );

    common::settle_all_and_check(&ledger, &ps, &chans, u(MINT - EACH)).await;
}

async fn channel_proposals_cancelled_at_random_moments_still_open(ledger: Ledger) {
    const OPENS: usize = 6;
    let mut rng = seeded();
    let opts = Options {
        redb: true,
        ..Options::default()
    };
    let mut ps = parties(&ledger, 2, u(MINT), &opts).await;
    // One open as the caller waits for it: how long an open takes here.
    let t = std::time::Instant::now();
    let first = open(&ledger, &mut ps, u(EACH)).await;
    let span = u64::try_from(t.elapsed().as_micros()).unwrap().max(1);
    for _ in 1..OPENS {
        let prop = common::proposal(&ledger, &ps, u(EACH));
        let after = Duration::from_micros(rng.gen_range(0..span));
        let _ = tokio::time::timeout(after, ps[0].client.propose_channel(prop)).await;
    }
    // Every proposal Bob accepted opens at his end and at Alice's.
    for _ in 1..OPENS {
        ps[1].accepted().await;
    }
    let mut theirs = ps[1].client.channels();
    let mut ours = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ours.len() < OPENS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Alice follows every channel Bob opened"
        );
        ours = ps[0].client.channels();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((ours.len(), theirs.len()), (OPENS, OPENS));
    drop(first);
    ours.sort_by_key(perun::client::Channel::id);
    theirs.sort_by_key(perun::client::Channel::id);
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a.id(), b.id());
        a.wait_for_phase(Phase::Active, Duration::from_secs(30))
            .await
            .unwrap();
        a.settle().await.unwrap();
        b.settle().await.unwrap();
    }
    for p in &ps {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT),
            "{}: every deposit came back",
            ledger.name()
        );
    }
}
