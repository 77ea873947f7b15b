//! The payments layer (issue 15, points 1–3 and its bad input), on the
//! simulated ledger over real libp2p: reservations, partial sends,
//! cancels, drops, expected payments, the incoming stream, channel
//! selection, opening a channel when none covers a payment, a peer that
//! refuses, and many tasks reserving, sending and cancelling at once with
//! the books checked against the channels.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, Options, Party, introduce, open, party};
use perun::channel::{Allocation, Asset, Phase, U256};
use perun::client::payments::{IncomingPolicy, OpenPolicy, Payments, PaymentsConfig};
use perun::client::{Channel, ChannelProposal, Error};
use rand::{Rng, SeedableRng};

fn u(x: u64) -> U256 {
    U256::from(x)
}

const WAIT: Duration = Duration::from_secs(10);

async fn two(ledger: &Ledger, deposit: u64) -> (Party, Party) {
    let a = party(ledger, u(deposit), &Options::default()).await;
    let b = party(ledger, u(deposit), &Options::default()).await;
    introduce(&[&a, &b]).await;
    (a, b)
}

/// Alice proposes a channel where she deposits `mine` and Bob `theirs`;
/// Alice's handle and Bob's.
async fn channel2(
    ledger: &Ledger,
    a: &Party,
    b: &mut Party,
    mine: u64,
    theirs: u64,
) -> [Channel; 2] {
    let prop = ChannelProposal::payment(
        vec![a.participant(), b.participant()],
        Allocation::new(vec![ledger.asset()], vec![vec![u(mine), u(theirs)]]),
        60,
    );
    let client = a.client.clone();
    let opening = tokio::spawn(async move { client.propose_channel(prop).await });
    let bobs = b.accepted().await;
    [opening.await.unwrap().unwrap(), bobs]
}

/// A `Payments` of `a` that opens a channel (depositing 200) when none
/// covers a reservation.
fn opening_payments(a: &Party) -> Payments {
    Payments::with_config(
        &a.client,
        PaymentsConfig::default().open_channels(OpenPolicy {
            deposit: u(200),
            challenge_duration: 60,
        }),
    )
    .unwrap()
}

/// Alice's handle on a new channel (see [`channel2`]).
async fn channel(ledger: &Ledger, a: &Party, b: &mut Party, mine: u64, theirs: u64) -> Channel {
    let [ch, _] = channel2(ledger, a, b, mine, theirs).await;
    ch
}

fn mine(ch: &Channel) -> U256 {
    ch.state().state.outcome.balances[0][ch.index()]
}

/// Two parties with one channel of 100 each, and a `Payments` for each.
async fn pair(ledger: &Ledger) -> (Vec<Party>, Vec<Channel>, Payments, Payments) {
    let (a, b) = two(ledger, 1000).await;
    let mut ps = vec![a, b];
    let chans = open(ledger, &mut ps, u(100)).await;
    let pa = Payments::new(&ps[0].client).unwrap();
    let pb = Payments::new(&ps[1].client).unwrap();
    (ps, chans, pa, pb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_send_cancel_and_drop_keep_the_books() {
    let ledger = Ledger::sim().await;
    let (ps, chans, pa, pb) = pair(&ledger).await;
    let bob = ps[1].client.peer_id();
    let alice = ps[0].client.peer_id();
    let eth = ledger.asset();
    let mut incoming = pb.incoming();

    let r = pa.reserve(bob, &eth, u(60)).await.unwrap();
    assert_eq!((r.amount(), r.channel()), (u(60), chans[0].id()));
    let bal = &pa.balance(bob)[0];
    assert_eq!(
        (bal.spendable, bal.reserved, bal.receivable),
        (u(40), u(60), u(100))
    );
    // 50 more cannot be covered while 60 are held.
    match pa.reserve(bob, &eth, u(50)).await {
        Err(Error::InsufficientFunds {
            available,
            requested,
        }) => {
            assert_eq!((available, requested), (u(40), u(50)))
        }
        other => panic!("{other:?}"),
    }
    let sent = pa.send(r, u(25)).await.unwrap();
    assert_eq!((sent.amount, sent.version), (u(25), 1));
    assert_eq!(mine(&chans[0]), u(75));
    let bal = &pa.balance(bob)[0];
    assert_eq!(
        (bal.spendable, bal.reserved),
        (u(75), U256::ZERO),
        "the rest is released"
    );

    let p = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.peer, p.amount, p.version, p.channel),
        (alice, u(25), 1, chans[0].id())
    );

    let r = pa.reserve(bob, &eth, u(75)).await.unwrap();
    pa.cancel(r);
    let r = pa.reserve(bob, &eth, u(75)).await.unwrap();
    drop(r);
    assert_eq!(pa.balance(bob)[0].spendable, u(75));
    assert_eq!(pa.open_reservations(), 0);
    pa.audit().unwrap();
    pb.audit().unwrap();
    // Bob's view: 125 in the channel, Alice can still pay 75.
    assert_eq!(pb.balance(alice)[0].receivable, u(75));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_errors_and_leaves_the_channel_alone() {
    let ledger = Ledger::sim().await;
    let (ps, chans, pa, pb) = pair(&ledger).await;
    let bob = ps[1].client.peer_id();
    let eth = ledger.asset();
    let other = Asset {
        holder: perun::channel::Address::repeat_byte(0x42),
        ..eth.clone()
    };

    assert!(matches!(
        pa.reserve(bob, &eth, U256::ZERO).await,
        Err(Error::ZeroAmount)
    ));
    let stranger = perun::wire::generate_key().public().to_peer_id();
    assert!(
        matches!(pa.reserve(stranger, &eth, u(1)).await, Err(Error::UnknownPeer(p)) if p == stranger)
    );
    assert!(matches!(
        pa.reserve(bob, &other, u(1)).await,
        Err(Error::UnknownAsset { .. })
    ));
    assert!(matches!(
        pa.reserve(bob, &eth, U256::MAX).await,
        Err(Error::InsufficientFunds { .. })
    ));

    // More than reserved: refused, and the reservation is released.
    let r = pa.reserve(bob, &eth, u(10)).await.unwrap();
    match pa.send(r, u(11)).await {
        Err(Error::ExceedsReservation {
            reserved,
            requested,
        }) => assert_eq!((reserved, requested), (u(10), u(11))),
        other => panic!("{other:?}"),
    }
    let r = pa.reserve(bob, &eth, u(10)).await.unwrap();
    assert!(matches!(
        pa.send(r, U256::ZERO).await,
        Err(Error::ZeroAmount)
    ));
    // A reservation of another payments layer (Bob's) is not Alice's to send.
    let alice = ps[0].client.peer_id();
    let theirs = pb.reserve(alice, &eth, u(10)).await.unwrap();
    assert!(matches!(
        pa.send(theirs, u(5)).await,
        Err(Error::ForeignReservation)
    ));
    assert_eq!(
        pb.open_reservations(),
        0,
        "a foreign reservation is released at its owner"
    );
    // Expected sums above 2^256 - 1.
    let _big = pb.expect(alice, &eth, U256::MAX, WAIT).unwrap();
    assert!(matches!(
        pb.expect(alice, &eth, u(1), WAIT),
        Err(Error::AmountOverflow)
    ));

    assert_eq!(chans[0].state().state.version, 0, "nothing was sent");
    assert_eq!(pa.open_reservations(), 0);
    assert_eq!(pa.balance(bob)[0].spendable, u(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expected_payments_resolve_and_time_out_and_unexpected_ones_are_refused() {
    let ledger = Ledger::sim().await;
    let (a, b) = two(&ledger, 1000).await;
    let mut ps = vec![a, b];
    let chans = open(&ledger, &mut ps, u(100)).await;
    let pa = Payments::new(&ps[0].client).unwrap();
    let pb = Payments::with_config(
        &ps[1].client,
        PaymentsConfig::default().incoming(IncomingPolicy::OnlyExpected),
    )
    .unwrap();
    let (alice, bob, eth) = (
        ps[0].client.peer_id(),
        ps[1].client.peer_id(),
        ledger.asset(),
    );

    // Nothing expected: Bob refuses, Alice's reservation is released.
    let r = pa.reserve(bob, &eth, u(10)).await.unwrap();
    match pa.send(r, u(10)).await {
        Err(Error::Rejected { reason, .. }) => assert!(reason.contains("not expected"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(pa.open_reservations(), 0);
    assert_eq!(mine(&chans[0]), u(100));

    let first = pb.expect(alice, &eth, u(30), WAIT).unwrap();
    // 5 s: the three payments below must be booked before it runs out,
    // on a loaded machine too.
    let second = pb
        .expect(alice, &eth, u(20), Duration::from_secs(5))
        .unwrap();
    assert_eq!(pb.balance(alice)[0].incoming, u(50));
    let mut incoming = pb.incoming();
    for amount in [10, 20, 5] {
        let r = pa.reserve(bob, &eth, u(amount)).await.unwrap();
        pa.send(r, u(amount)).await.unwrap();
    }
    // Booked (the 5 too) before `second`'s 5 s run out.
    for _ in 0..3 {
        tokio::time::timeout(WAIT, incoming.next())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(first.await.unwrap().amount, u(30));
    match second.await {
        Err(Error::NotReceived { expected, arrived }) => {
            assert_eq!((expected, arrived), (u(20), u(5)))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pb.balance(alice)[0].incoming, U256::ZERO);
    // Over what is expected: refused.
    let _third = pb.expect(alice, &eth, u(5), WAIT).unwrap();
    let r = pa.reserve(bob, &eth, u(6)).await.unwrap();
    assert!(matches!(
        pa.send(r, u(6)).await,
        Err(Error::Rejected { .. })
    ));
    assert_eq!(mine(&chans[1]), u(135));
}

/// Bob's tracker gets to run only after the payments landed (its runtime
/// is not driven until then): both are still booked, on the channel open
/// before `Payments` was made and on one opened after. A CI run lost a
/// payment when the tracker read each channel's baseline once it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_made_before_the_tracker_runs_are_booked() {
    let ledger = Ledger::sim().await;
    let (a, b) = two(&ledger, 1000).await;
    let mut ps = vec![a, b];
    let old = open(&ledger, &mut ps, u(100)).await;
    let pa = Payments::new(&ps[0].client).unwrap();
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pb = {
        let _on_idle = idle.enter();
        Payments::new(&ps[1].client).unwrap()
    };
    let (alice, eth) = (ps[0].client.peer_id(), ledger.asset());
    let paid = pb.expect(alice, &eth, u(55), WAIT).unwrap();
    let (pa_, pb_) = ps.split_at_mut(1);
    let [new, bobs_new] = channel2(&ledger, &pa_[0], &mut pb_[0], 50, 0).await;
    let bob = ps[1].client.peer_id();
    for amount in [10, 45] {
        let r = pa.reserve(bob, &eth, u(amount)).await.unwrap();
        pa.send(r, u(amount)).await.unwrap();
    }
    assert_eq!((mine(&new), mine(&old[0])), (u(40), u(55)), "both paid");
    // Bob holds both payments before his tracker may run.
    for ch in [&bobs_new, &old[1]] {
        ch.wait_for_version(1, WAIT).await.unwrap();
    }
    let got = tokio::task::spawn_blocking(move || {
        idle.block_on(paid.into_future()).map_err(|e| e.to_string())
    });
    assert_eq!(got.await.unwrap().unwrap().amount, u(55));
    drop(pb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_uses_the_smallest_channel_that_covers_it() {
    let ledger = Ledger::sim().await;
    let (a, mut b) = two(&ledger, 1000).await;
    let big = channel(&ledger, &a, &mut b, 100, 0).await;
    let small = channel(&ledger, &a, &mut b, 50, 0).await;
    let pa = Payments::new(&a.client).unwrap();
    let (bob, eth) = (b.client.peer_id(), ledger.asset());

    let r1 = pa.reserve(bob, &eth, u(40)).await.unwrap();
    assert_eq!(r1.channel(), small.id());
    let r2 = pa.reserve(bob, &eth, u(60)).await.unwrap();
    assert_eq!(r2.channel(), big.id());
    assert_eq!(pa.balance(bob)[0].spendable, u(50));
    pa.send(r2, u(60)).await.unwrap();
    pa.send(r1, u(40)).await.unwrap();
    assert_eq!((mine(&big), mine(&small)), (u(40), u(10)));
    // 41 fits in neither channel, though together they hold 50.
    assert!(matches!(pa.reserve(bob, &eth, u(41)).await,
        Err(Error::InsufficientFunds { available, .. }) if available == u(40)));
    // A closed channel is not drawn on.
    small.settle().await.unwrap();
    assert_eq!(pa.balance(bob)[0].spendable, u(40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_is_opened_when_none_covers_the_payment_if_asked() {
    let ledger = Ledger::sim().await;
    let (a, mut b) = two(&ledger, 1000).await;
    let first = channel(&ledger, &a, &mut b, 20, 0).await;
    let pa = opening_payments(&a);
    let (bob, eth) = (b.client.peer_id(), ledger.asset());
    let r = pa.reserve(bob, &eth, u(50)).await.unwrap();
    assert_ne!(r.channel(), first.id());
    pa.send(r, u(50)).await.unwrap();
    let opened = a
        .client
        .channels()
        .into_iter()
        .find(|c| c.id() != first.id())
        .unwrap();
    assert_eq!(
        opened.state().state.outcome.balances[0],
        vec![u(150), u(50)]
    );
    assert_eq!(opened.phase(), Phase::Active);
    // Without the option, the same shortfall is an error.
    drop(pa);
    let plain = Payments::new(&a.client).unwrap();
    assert!(matches!(
        plain.reserve(bob, &eth, u(500)).await,
        Err(Error::InsufficientFunds { .. })
    ));
}

/// Bob's handler: accepts every update after a pause (the update is
/// surely under way when Alice's caller gives up).
struct SlowAccept;

#[async_trait::async_trait]
impl perun::client::UpdateHandler for SlowAccept {
    async fn handle_update(
        &self,
        _update: perun::client::IncomingUpdate,
        responder: perun::client::UpdateResponder,
    ) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        responder.accept();
    }
}

/// A send whose caller gives up while the update is out: the payment goes
/// on, and its amount stays held until it ended, so no other reservation
/// is promised the same money.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_dropped_mid_update_keeps_its_hold_until_the_update_ends() {
    let ledger = Ledger::sim().await;
    let a = party(&ledger, u(1000), &Options::default()).await;
    let slow = Options {
        update_handler: Some(Arc::new(SlowAccept)),
        ..Options::default()
    };
    let b = party(&ledger, u(1000), &slow).await;
    introduce(&[&a, &b]).await;
    let mut ps = vec![a, b];
    let chans = open(&ledger, &mut ps, u(100)).await;
    let pa = Payments::new(&ps[0].client).unwrap();
    let (bob, eth) = (ps[1].client.peer_id(), ledger.asset());
    let before = chans[0].state().state.version;
    let r = pa.reserve(bob, &eth, u(60)).await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(50), pa.send(r, u(60))).await;
    assert!(gave_up.is_err(), "the caller gave up during the update");
    assert!(
        matches!(
            pa.reserve(bob, &eth, u(60)).await,
            Err(Error::InsufficientFunds { available, .. }) if available == u(40)
        ),
        "the 60 are spoken for while the update is out"
    );
    let st = chans[0]
        .wait_for_version(before + 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(st.state.outcome.balances[0], vec![u(40), u(160)]);
    // The hold ends right after the update returned to the run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pa.balance(bob)[0].reserved != U256::ZERO {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hold ends with the update"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A reservation that opens a channel and whose caller gives up during
/// the opening: the opening goes on, and a retry waits for that channel
/// instead of opening (and funding) a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_dropped_while_its_channel_opens_opens_one_channel() {
    let ledger = Ledger::sim().await;
    let (a, mut b) = two(&ledger, 1000).await;
    let first = channel(&ledger, &a, &mut b, 20, 0).await;
    let pa = opening_payments(&a);
    let (bob, eth) = (b.client.peer_id(), ledger.asset());
    // Gives up long before the opening (deposits, signatures) can end;
    // should it end anyway (a stalled runtime polls late), it must have
    // reserved on the new channel.
    match tokio::time::timeout(Duration::from_micros(200), pa.reserve(bob, &eth, u(50))).await {
        Err(_) => {}
        Ok(Ok(r)) => {
            assert_ne!(r.channel(), first.id());
            pa.cancel(r);
        }
        Ok(Err(e)) => panic!("the first reservation failed: {e}"),
    }
    let r = pa.reserve(bob, &eth, u(50)).await.unwrap();
    assert_ne!(r.channel(), first.id());
    pa.send(r, u(50)).await.unwrap();
    let chans = a.client.channels();
    assert_eq!(chans.len(), 2, "one channel opened, not two");
    assert_eq!(ledger.balance(a.client.address()).await, u(1000 - 20 - 200));
}

/// Many tasks on both sides reserve, send, cancel and drop at random
/// (seeded) on two channels; the books never hold more than a channel's
/// balance, and at the end every reservation is released and the money
/// moved is exactly what the sends report, on both sides.
///
/// Each case prints its seed; `PAYMENTS_SEED=<seed>` replays one.
#[test]
fn concurrent_reservations_never_overspend() {
    use proptest::prelude::*;
    if let Some(seed) = std::env::var("PAYMENTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        return rt.block_on(run_concurrently(seed, 8));
    }
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 4,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(any::<u64>(), 4usize..12), |(seed, tasks)| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_concurrently(seed, tasks));
            Ok(())
        })
        .unwrap();
}

async fn run_concurrently(seed: u64, tasks: usize) {
    eprintln!("seed {seed}, {tasks} tasks (PAYMENTS_SEED={seed} replays it)");
    let ledger = Ledger::sim().await;
    let (a, mut b) = two(&ledger, 10_000).await;
    let c1 = channel2(&ledger, &a, &mut b, 300, 300).await;
    let c2 = channel2(&ledger, &a, &mut b, 200, 100).await;
    let pa = Payments::new(&a.client).unwrap();
    let pb = Payments::new(&b.client).unwrap();
    let eth = ledger.asset();
    let sides = [
        (pa.clone(), b.client.peer_id()),
        (pb.clone(), a.client.peer_id()),
    ];
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let auditor = {
        let (pa, pb, done) = (pa.clone(), pb.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                pa.audit().unwrap();
                pb.audit().unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (p, peer) = sides[t % 2].clone();
        let eth = eth.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ t as u64);
        handles.push(tokio::spawn(async move {
            let mut sent = U256::ZERO;
            for _ in 0..15 {
                let amount = u(rng.gen_range(1..120));
                let r = match p.reserve(peer, &eth, amount).await {
                    Ok(r) => r,
                    Err(Error::InsufficientFunds {
                        available,
                        requested,
                    }) => {
                        assert!(available < requested);
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                match rng.gen_range(0..4) {
                    0 => p.cancel(r),
                    1 => drop(r),
                    _ => {
                        let part = u(rng.gen_range(1..=amount.to::<u64>()));
                        match p.send(r, part).await {
                            Ok(s) => sent += s.amount,
                            // Both sides propose at once: the higher index loses and retries later.
                            Err(e) if e.is_retryable() => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }
            sent
        }));
    }
    let mut sent = [U256::ZERO; 2];
    for (t, h) in handles.into_iter().enumerate() {
        sent[t % 2] += h.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    auditor.await.unwrap();
    assert_eq!((pa.open_reservations(), pb.open_reservations()), (0, 0));
    eprintln!(
        "seed {seed}: {tasks} tasks sent {} and {}",
        sent[0], sent[1]
    );
    // (On a loaded machine the higher index may lose every conflict.)
    assert!(!(sent[0] + sent[1]).is_zero(), "payments were made");
    assert_eq!((pa.payments_in_doubt(), pb.payments_in_doubt()), (0, 0));
    // Both sides hold the same newest state of each channel.
    let st = common::caught_up(&c1).await;
    let st2 = common::caught_up(&c2).await;
    let alice_now = st.state.outcome.balances[0][0] + st2.state.outcome.balances[0][0];
    // Alice started with 500 in the two channels.
    assert_eq!(alice_now + sent[0], u(500) + sent[1], "seed {seed}");
    let bal = &pa.balance(b.client.peer_id())[0];
    assert_eq!(bal.spendable, alice_now);
}
