//! Back-to-back updates (DESIGN §8, issue 17): a proposer in a burst hands
//! each commit out inside its next update (`UpdateWithCommit`) and the last
//! one on its own a moment later. The peer must still end up with every
//! state, in time, whichever side bursts, and also when the proposer shuts
//! down right after its burst. Dishonest carried commits: `tests/malicious.rs`.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Ledger, Options, open, parties};
use perun::channel::U256;

on_both_ledgers!(
    a_burst_ends_with_the_peer_holding_its_last_state,
    bursts_in_turn_both_complete,
    a_commit_held_unsaved_is_stored_at_shutdown,
);

fn u(x: u64) -> U256 {
    U256::from(x)
}

async fn a_burst_ends_with_the_peer_holding_its_last_state(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    let mut seen = chans[1].updates();
    for _ in 0..100 {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    let last = chans[0].state();
    let bob = chans[1]
        .wait_for_version(last.state.version, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(bob, last, "Bob holds Alice's last state of the burst");
    assert_eq!(bob.state.outcome.balances[0][1], u(1_100));
    // Every state reached Bob's readers, in order.
    let mut versions = Vec::new();
    while versions.last() != Some(&last.state.version) {
        let st = tokio::time::timeout(Duration::from_secs(5), seen.next())
            .await
            .unwrap()
            .unwrap();
        versions.push(st.state.version);
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    // A second burst, and Alice shuts down right after it: her held commit
    // still reaches Bob (shutdown waits for commits in flight).
    for _ in 0..20 {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    let last = chans[0].state();
    ps[0].client.shutdown().await;
    let bob = chans[1]
        .wait_for_version(last.state.version, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(bob, last);
}

async fn bursts_in_turn_both_complete(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    for round in 0..5 {
        // Each side bursts right after the other: the first update of a
        // burst meets the other side's last commit still held or in flight.
        for _ in 0..20 {
            chans[0].pay(1, 0, u(2)).await.unwrap();
        }
        for _ in 0..20 {
            chans[1].pay(0, 0, u(1)).await.unwrap();
        }
        // Bob proposed last: Alice gets his last commit a moment later.
        let b = chans[1].state();
        let a = chans[0]
            .wait_for_version(b.state.version, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a, b, "round {round}");
    }
    let st = chans[0].state().state;
    assert_eq!(st.outcome.balances[0][0], u(1_000 - 5 * 20));
    assert_eq!(st.outcome.balances[0][1], u(1_000 + 5 * 20));
}

/// A burst's held commit rides with the next update; if that update fails
/// on the way (the peer never answers it: the request times out), the
/// commit still goes out on its own at once, not only with a later `Sync`.
/// The caller gives up first, which no longer stops the update
/// (`tests/cancel.rs`): its task runs until the request's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_ride_is_dropped_goes_on_its_own() {
    use perun::wire::Message;
    let ledger = Ledger::sim().await;
    let opts = Options {
        request_timeout: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    chans[0].pay(1, 0, u(1)).await.unwrap();
    let (evil, mut evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (ride_tx, mut rides) = tokio::sync::mpsc::unbounded_channel();
    // The twin signs plain updates, takes commits, and, once armed, never
    // answers a ride.
    let armed = Arc::new(AtomicBool::new(false));
    let armed_twin = armed.clone();
    let twin = tokio::spawn(async move {
        let mut unanswered = Vec::new();
        while let Some(req) = evil_in.next().await {
            let (_, msg, r) = req.into_parts();
            match msg {
                Message::Update(up) => {
                    let _ = r.reply(common::accept(&bob_key, &up, 1));
                }
                Message::UpdateCommit(c) => {
                    let _ = seen_tx.send(c.version);
                    let _ = r.reply(Message::Ack);
                }
                Message::UpdateWithCommit(w) if armed_twin.load(Ordering::SeqCst) => {
                    let _ = ride_tx.send(w.commit.version);
                    unanswered.push(r);
                }
                Message::UpdateWithCommit(w) => {
                    let _ = r.reply(common::accept(&bob_key, &w.update, 1));
                }
                // Alice syncs with the twin as it connects: it stands where
                // she does (unanswered, her first payment waited 30 s).
                Message::Sync(s) => {
                    let _ = r.reply(Message::Sync(perun::wire::Sync {
                        index: 1,
                        staged: None,
                        ..s
                    }));
                }
                _ => unanswered.push(r),
            }
        }
        drop(evil);
    });
    // Two payments back to back, the second's commit held for a third
    // that follows at once and carries it; the twin does not answer that
    // ride, the caller gives up. A burst is a matter of milliseconds (a
    // loaded machine may miss its window, and the first requests may meet
    // Alice's closing connection to Bob): try again until the third rode.
    let mut second = None;
    for _ in 0..20 {
        armed.store(false, Ordering::SeqCst);
        let a = chans[0].pay(1, 0, u(1)).await;
        let b = chans[0].pay(1, 0, u(1)).await;
        if let (Ok(a), Ok(b)) = (a, b)
            && b.state.version == a.state.version + 1
        {
            while rides.try_recv().is_ok() {}
            armed.store(true, Ordering::SeqCst);
            let third =
                tokio::time::timeout(Duration::from_millis(300), chans[0].pay(1, 0, u(1))).await;
            if third.is_err() && rides.try_recv() == Ok(b.state.version) {
                second = Some(b);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.expect("a third payment carries the second's commit and is not answered");
    // At once, not after a `Sync`; the bound only allows for a slow machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .expect("the held commit reaches the twin on its own")
            .unwrap();
        if v == second.state.version {
            break;
        }
    }
    twin.abort();
}

/// Bob takes Alice's commit and holds it unsaved, to ride with his next
/// write; his chore that would store it on its own is held back (as on a
/// stalled runtime). `shutdown` must store it itself before it returns: a
/// process that exits then would otherwise lose it (a `Sync` would bring
/// it back, but only once both are up again).
async fn a_commit_held_unsaved_is_stored_at_shutdown(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    let id = chans[0].id();
    let before = chans[1].state().state.version;
    ps[1].client.hold_chores_for_testing(true);
    let paid = chans[0].pay(1, 0, u(5)).await.unwrap();
    // Alice's shutdown waits until Bob acknowledged the commit: he has
    // taken it by then (his phase left `Updating` with it).
    ps[0].client.shutdown().await;
    assert_eq!(chans[1].phase(), perun::channel::Phase::Active);
    let stored = |p: &common::Party| {
        let persister = p.persister.clone();
        async move {
            let rec = persister.load(id).await.unwrap().unwrap();
            rec.current.unwrap().state.version
        }
    };
    assert_eq!(
        stored(&ps[1]).await,
        before,
        "Bob holds the commit unsaved while his chores are held back"
    );
    assert_eq!(
        chans[1].state().state.version,
        before,
        "readers wait for it too"
    );
    ps[1].client.shutdown().await;
    assert_eq!(
        stored(&ps[1]).await,
        paid.state.version,
        "shutdown stored the commit"
    );
    ps[1].client.hold_chores_for_testing(false);
}
