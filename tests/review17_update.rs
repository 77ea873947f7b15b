//! From an adversarial review of the update protocol's issue-17 changes: a
//! commit riding with the next update, the proposer's signature made ahead
//! (`Presigned`), the memoised staged hash, a peer's commit held unsaved
//! and stored a moment later. The first two tests failed before the write
//! of a peer's commit was retried; the others guard suspicions that turned
//! out fine.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::time::Duration;

use common::{Ledger, Options, initial, introduce, open, parties, two_party_params};
use perun::channel::{Machine, Params, PaymentApp, Phase, Presigned, SignedState, State, U256};
use perun::persistence::Change;
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Message, Update, UpdateCommit, UpdateWithCommit};

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// A write that stores a peer's commit on its own: a fully signed state
/// and no signature of ours (the flush chore's write, `Locked::flush_unsaved`).
fn flush_only(changes: &[Change]) -> bool {
    changes.iter().any(|c| matches!(c, Change::Committed(_)))
        && !changes.iter().any(|c| matches!(c, Change::Staged(_)))
}

/// Alice and Bob (with `bob_opts`) on a channel; Alice pays once and
/// Bob's write of her commit on its own fails once. Returns the payment's
/// version once that failure happened.
async fn alice_pays_and_bobs_write_fails_once(
    ledger: &Ledger,
    bob_opts: &Options,
    failures: &common::Failures,
) -> (Vec<common::Party>, Vec<perun::client::Channel>, u64) {
    let mut ps = vec![
        common::party(ledger, u(1_000_000), &Options::default()).await,
        common::party(ledger, u(1_000_000), bob_opts).await,
    ];
    introduce(&ps).await;
    let chans = open(ledger, &mut ps, u(1_000)).await;
    failures.arm(1);
    let v = chans[0].pay(1, 0, u(10)).await.unwrap().state.version;
    tokio::time::timeout(Duration::from_secs(10), async {
        while failures.injected() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("Bob's write of Alice's commit failed once");
    (ps, chans, v)
}

/// Bob acknowledges Alice's commit before he stores it (DESIGN §8: "a
/// peer's commit stored on its own a moment later"), so Alice's delivery,
/// with its retries, ends at once. The chore that stores it
/// (`update::run_chore`, `Chore::Flush`) tries once: a transient failure
/// is only logged ("a sync restores it", but nothing marks the channel
/// unsynced, and a `Sync` would not write it anyway: Alice's latest is not
/// newer than Bob's in-memory current), `flush_pending` is cleared and
/// nothing queues another try. The commit then stays unsaved in memory (a
/// crash loses it) and unpublished: Bob's `state()`, `wait_for_version`,
/// `updates()` (and so the payments layer) never see the payment, until
/// some later write of the channel happens to carry it; on an idle channel
/// that is never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_commit_whose_write_fails_once_is_stored_on_a_retry() {
    let ledger = Ledger::sim().await;
    let (bob_opts, failures) = common::failing_writes(flush_only);
    let (ps, chans, v) = alice_pays_and_bobs_write_fails_once(&ledger, &bob_opts, &failures).await;
    // A transient failure should be retried: Bob's store and his readers
    // should get the state Alice (and Bob, in memory) hold fully signed.
    let seen = chans[1].wait_for_version(v, Duration::from_secs(8)).await;
    let stored = ps[1]
        .persister
        .load(chans[1].id())
        .await
        .unwrap()
        .unwrap()
        .current
        .map(|c| c.state.version);
    assert!(
        seen.is_ok() && stored == Some(v),
        "Bob took Alice's commit of version {v} (acknowledged it), but after one failed \
         write it is neither stored (store at {stored:?}) nor shown to readers ({:?})",
        seen.map(|s| s.state.version)
    );
}

/// While the retry of a failed write waits out its backoff, a newer commit
/// queues no write of its own (`flush_pending` is set): it wakes the retry
/// instead. Before that (a second review's finding), the newer commit
/// stayed unsaved and unseen by readers for the whole backoff (up to
/// `retry_max`, 30 s by default) though the store worked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_a_healed_write_failure_is_not_held_for_the_backoff() {
    let ledger = Ledger::sim().await;
    let (mut bob_opts, failures) = common::failing_writes(flush_only);
    bob_opts.timeouts = Some(perun::client::Timeouts {
        retry_min: Duration::from_secs(30),
        retry_max: Duration::from_secs(30),
        ..common::test_timeouts(bob_opts.funding_timeout)
    });
    let (ps, chans, v1) = alice_pays_and_bobs_write_fails_once(&ledger, &bob_opts, &failures).await;
    // The store works again. Alice pays again: Bob's signature write
    // carries v1; the commit of v2 is held unsaved and left to a flush.
    let v2 = chans[0].pay(1, 0, u(10)).await.unwrap().state.version;
    assert!(v2 > v1);
    let t = std::time::Instant::now();
    let seen = chans[1].wait_for_version(v2, Duration::from_secs(40)).await;
    let took = t.elapsed();
    assert!(seen.is_ok(), "v{v2} never shown");
    // Well under the 30 s backoff, with room for a loaded machine.
    assert!(
        took < Duration::from_secs(10),
        "Bob's readers saw v{v2} only {took:?} after Alice's update returned (the store \
         worked again; the retrier slept out its 30 s backoff with flush_pending set)"
    );
    for p in &ps {
        p.client.shutdown().await;
    }
}

/// The same one-shot write on the n-party opening path: a responder holds
/// the version-0 commit unsaved and stores it before it deposits
/// (`open::fund_and_activate`). One failed write there must not end its
/// funding (every peer would wait out the funding timeout for a refund).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responders_opening_write_that_fails_once_is_tried_again_before_funding() {
    let ledger = Ledger::sim().await;
    let (bob_opts, failures) = common::failing_writes(flush_only);
    failures.arm(1);
    let mut ps = vec![
        common::party(&ledger, u(1_000_000), &Options::default()).await,
        common::party(&ledger, u(1_000_000), &bob_opts).await,
        common::party(&ledger, u(1_000_000), &Options::default()).await,
    ];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    assert_eq!(failures.injected(), 1, "Bob's opening write failed once");
    for c in &chans {
        assert_eq!(c.phase(), Phase::Active);
    }
    let stored = ps[1].persister.load(chans[1].id()).await.unwrap().unwrap();
    assert_eq!(stored.current.map(|c| c.state.version), Some(0));
}

// ---------------------------------------------------------------------------
// channel crate: `Presigned` and the memoised staged hash
// ---------------------------------------------------------------------------

/// An active machine for participant `me` of (a, b), at version 0.
fn active(a: &LocalAccount, b: &LocalAccount, me: usize) -> (Params, Machine) {
    let params = two_party_params(a, b);
    let st = initial(&params);
    let mut m = Machine::new(params.clone(), me, st.clone()).unwrap();
    m.set_phase(Phase::Signing0).unwrap();
    let keys = [a, b];
    m.sign_staged(keys[me]).unwrap();
    m.add_signature(1 - me, keys[1 - me].sign_hash(st.hash()).unwrap())
        .unwrap();
    m.commit_staged().unwrap();
    m.set_phase(Phase::Active).unwrap();
    (params, m)
}

fn pays(st: &State, from: usize, x: u64) -> State {
    let mut next = st.next();
    next.outcome.balances[0][from] -= u(x);
    next.outcome.balances[0][1 - from] += u(x);
    next
}

/// A signature made ahead for one state is never taken for another: not
/// for a state staged later in its place with the same version, nor one
/// made by another account. `sign_staged_with` then signs afresh, and
/// what it returns verifies on the staged state.
#[test]
fn a_presigned_signature_is_only_taken_for_its_own_state() {
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (params, mut m) = active(&a, &b, 0);
    let cur = m.current().unwrap().state.clone();
    let first = pays(&cur, 0, 5);
    let second = pays(&cur, 0, 7);
    assert_eq!(first.version, second.version);
    m.stage_update(first.clone(), 0, &PaymentApp).unwrap();
    let made = Presigned::new(&a, m.staged_hash().unwrap()).unwrap();
    let by_b = Presigned::new(&b, m.staged_hash().unwrap()).unwrap();
    // The peer's lower index wins (or the proposal fails): dropped, and
    // another state of that version staged.
    m.discard_staged().unwrap();
    m.stage_update(second.clone(), 0, &PaymentApp).unwrap();
    assert_eq!(
        m.staged_hash(),
        Some(second.hash()),
        "the memo follows the staged state"
    );
    let (copy, signed) = m.sign_staged_copy(&a, Some(made)).unwrap();
    assert_eq!(signed.hash(), second.hash());
    assert_ne!(signed.signature(), made.signature());
    perun::channel::signed::verify_sig(&params, &second, 0, &signed.signature()).unwrap();
    assert_eq!(copy.state, second);
    let sig = m.sign_staged_with(&a, Some(by_b)).unwrap();
    perun::channel::signed::verify_sig(&params, &second, 0, &sig).unwrap();
    // And the first state of that version can no longer be signed at all.
    m.add_signature(1, b.sign_hash(second.hash()).unwrap())
        .unwrap();
    m.commit_staged().unwrap();
    let mut again = first.clone();
    again.version = second.version;
    assert!(m.stage_update(again, 0, &PaymentApp).is_err());
}

/// The memoised staged hash is always the staged state's: through a
/// commit, a discard, an adoption that drops the staged state, a
/// complete_staged, and a machine rebuilt from its parts.
#[test]
fn the_staged_hash_memo_never_goes_stale() {
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (params, mut m) = active(&a, &b, 1);
    let in_step = |m: &Machine| {
        assert_eq!(
            m.staged_hash(),
            m.staged().map(|s| s.state.hash()),
            "staged hash memo"
        );
    };
    let cur = m.current().unwrap().state.clone();
    let s1 = pays(&cur, 0, 5);
    m.stage_update(s1.clone(), 0, &PaymentApp).unwrap();
    in_step(&m);
    m.sign_staged(&b).unwrap();
    // Completed by a commit that carries garbage in our own slot: our own
    // signature is kept, the state is committed with it.
    let garbage = a.sign_hash(cur.hash()).unwrap();
    let a1 = a.sign_hash(s1.hash()).unwrap();
    let full = m.complete_staged(&[a1, garbage]).unwrap().clone();
    full.verify_all(&params).unwrap();
    in_step(&m);
    let s2 = pays(&s1, 0, 5);
    m.stage_update(s2.clone(), 0, &PaymentApp).unwrap();
    m.discard_staged().unwrap();
    in_step(&m);
    let mut s3 = pays(&s1, 0, 6);
    s3.version = s2.version + 1;
    m.stage_update(s3.clone(), 0, &PaymentApp).unwrap();
    in_step(&m);
    // A newer fully signed state adopted (from a Sync) drops the staged one.
    let mut s4 = pays(&s1, 0, 9);
    s4.version = s3.version + 1;
    let adopted = SignedState {
        state: s4.clone(),
        sigs: vec![
            Some(a.sign_hash(s4.hash()).unwrap()),
            Some(b.sign_hash(s4.hash()).unwrap()),
        ],
    };
    m.adopt(adopted).unwrap();
    in_step(&m);
    let s5 = pays(&s4, 0, 1);
    m.stage_update(s5.clone(), 0, &PaymentApp).unwrap();
    let rebuilt = Machine::restore(
        params.clone(),
        1,
        Phase::Active,
        m.current().cloned(),
        m.staged().cloned(),
    )
    .unwrap();
    in_step(&rebuilt);
    assert_eq!(rebuilt.staged_hash(), Some(s5.hash()));
}

// ---------------------------------------------------------------------------
// A ride with garbage in the receiver's own slot, from an evil twin
// ---------------------------------------------------------------------------

/// Bob's twin carries a commit whose signature in Alice's own slot is
/// garbage (a valid signature of Bob's on another state). Alice keeps her
/// own signature (`complete_staged` keeps what it holds), so the state she
/// stores and shows verifies whole; the update riding with it is answered
/// as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ride_with_garbage_in_our_own_slot_stores_our_signature() {
    let ledger = Ledger::sim().await;
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(100)).await;
    let (evil, _evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let alice = &chans[0];
    let alice_peer = ps[0].client.peer_id();
    let before = alice.state();
    let bob_pays = |st: &State, x: u64| pays(st, 1, x);
    let fair = bob_pays(&before.state, 5);
    let upd = Message::Update(Update {
        channel_id: alice.id(),
        state: fair.clone(),
        actor: 1,
    });
    match evil.send(alice_peer, &upd).await.unwrap() {
        Message::UpdateAccept(_) => {}
        other => panic!("a fair update is accepted, got {other:?}"),
    }
    let garbage = bob_key.sign_hash(before.state.hash()).unwrap();
    let next = bob_pays(&fair, 5);
    let msg = Message::UpdateWithCommit(UpdateWithCommit {
        commit: UpdateCommit {
            channel_id: alice.id(),
            version: fair.version,
            index: 1,
            signatures: vec![garbage, bob_key.sign_hash(fair.hash()).unwrap()],
        },
        update: Update {
            channel_id: alice.id(),
            state: next.clone(),
            actor: 1,
        },
    });
    match evil.send(alice_peer, &msg).await.unwrap() {
        Message::UpdateAccept(a) => assert_eq!(a.version, next.version),
        other => panic!("the ride is taken and its update signed, got {other:?}"),
    }
    let got = alice
        .wait_for_version(fair.version, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.state, fair);
    got.verify_all(alice.params()).unwrap();
    let stored = ps[0].persister.load(alice.id()).await.unwrap().unwrap();
    let cur = stored.current.unwrap();
    assert_eq!(cur.state, fair);
    cur.verify_all(alice.params()).unwrap();
}

/// A peer's commit whose write keeps failing is retried until it is
/// stored, but not past `shutdown`: there it is tried once more and the
/// task ends (the next start gets the commit back from the peer). Before,
/// it went on retrying, and warning, for as long as the stopped client's
/// handle lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_write_that_keeps_failing_stops_retrying_at_shutdown() {
    let ledger = Ledger::sim().await;
    let (mut bob_opts, failures) = common::failing_writes(flush_only);
    bob_opts.timeouts = Some(perun::client::Timeouts {
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(100),
        ..common::test_timeouts(bob_opts.funding_timeout)
    });
    let (ps, _chans, _) = alice_pays_and_bobs_write_fails_once(&ledger, &bob_opts, &failures).await;
    failures.arm(u32::MAX);
    tokio::time::timeout(Duration::from_secs(10), async {
        while failures.injected() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the write is retried while the client runs");
    ps[1].client.shutdown().await;
    // A try that passed its stop check just before `shutdown` may still
    // land late on a loaded machine: wait until none came for three retry
    // intervals (a task that goes on retrying never gets there).
    let mut after = failures.injected();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = failures.injected();
        if now == after {
            break;
        }
        after = now;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        failures.injected(),
        after,
        "the stopped client still retries the write"
    );
}
