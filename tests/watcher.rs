//! The watcher under faults (issue 12): each fault the issue found, on
//! `SimLedger` and on anvil with redb. A failed registration is retried; an
//! event stream that ends is subscribed again; a watcher that panics is
//! restarted; a channel the peer concluded while we were offline is
//! withdrawn; a stale state that stood past its challenge period because we
//! were offline is concluded (and `settle` returns); a responder whose
//! commit was lost in a partition gets it by `Sync` when the connection
//! comes back.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use common::flaky::Flaky;
use common::relay::Relay;
use common::{
    Ledger, Options, Party, WAIT, bob_registers, bob_withdraws, on_chain_version, open, parties,
    restart,
};
use perun::channel::{Phase, SignedState, U256};
use perun::client::{
    ChannelEvent, IncomingUpdate, UpdateHandler, UpdateResponder, WatchStatus, WatcherStep,
};

on_both_ledgers!(
    failed_refute_is_retried,
    ended_event_stream_is_subscribed_again,
    panicking_watcher_is_restarted,
    concluded_while_offline_is_withdrawn,
    too_late_to_refute_concludes_what_is_registered,
    lost_commit_arrives_by_sync_when_the_connection_is_back,
    funding_resumed_after_the_peer_closed_deposits_nothing,
);

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const CHALLENGE: u64 = 60;

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Alice (with `alice` options) and Bob (defaults), introduced.
async fn alice_and_bob(ledger: &Ledger, alice: Options) -> Vec<Party> {
    let ps = vec![
        common::party(ledger, u(MINT), &alice).await,
        common::party(ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    ps
}

/// Alice's options with her adjudicator wrapped in a [`Flaky`], and the wrapper.
fn flaky_alice() -> (Options, Arc<std::sync::Mutex<Option<Arc<Flaky>>>>) {
    Flaky::wrapping(Options::default())
}

/// Every event a channel reports until it is withdrawn (or `WAIT` passes).
fn collect(mut events: perun::client::EventStream) -> tokio::task::JoinHandle<Vec<ChannelEvent>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(ev) = events.next().await {
                let done = matches!(ev, ChannelEvent::Withdrawn);
                seen.push(ev);
                if done {
                    return;
                }
            }
        })
        .await;
        seen
    })
}

async fn check_balances(ledger: &Ledger, ps: &[Party], st: &SignedState) {
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            u(MINT - EACH) + st.state.outcome.balances[0][i],
            "{}: participant {i} got exactly its share of version {}",
            ledger.name(),
            st.state.version
        );
    }
}

/// Bob cheats with his stale state; Alice's watcher must refute, conclude
/// and withdraw; then Bob withdraws and the balances are checked.
async fn cheat_and_settle(
    ledger: &Ledger,
    ps: &[Party],
    chans: &[perun::client::Channel],
    stale: SignedState,
    latest: &SignedState,
) {
    ps[1].client.shutdown().await;
    let adj = bob_registers(ledger, &ps[1], &chans[1], stale).await;
    on_chain_version(&adj, &chans[0], latest.state.version).await;
    ledger.advance(CHALLENGE + 1).await;
    chans[0]
        .wait_for_phase(Phase::Withdrawn, WAIT)
        .await
        .unwrap();
    bob_withdraws(&adj, &ps[1], &chans[1], latest).await;
    check_balances(ledger, ps, latest).await;
}

/// An RPC hiccup on the refutation (twice) while the channel is Active: the
/// watcher retries it, reports each retry, and the stale state never stands.
async fn failed_refute_is_retried(ledger: Ledger) {
    let (opts, flaky) = flaky_alice();
    let mut ps = alice_and_bob(&ledger, opts).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (stale, latest) = common::stale_and_latest(&chans).await;
    let flaky = flaky.lock().unwrap().clone().unwrap();
    flaky.fail_registers.store(2, Ordering::SeqCst);
    let seen = collect(chans[0].events());
    cheat_and_settle(&ledger, &ps, &chans, stale, &latest).await;
    let seen = seen.await.unwrap();
    let retries = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                ChannelEvent::Retry {
                    step: WatcherStep::Refute {
                        registered: 1,
                        ours: 6
                    },
                    ..
                }
            )
        })
        .count();
    assert_eq!(retries, 2, "each failed refutation is reported: {seen:?}");
    assert!(seen.iter().any(|e| matches!(
        e,
        ChannelEvent::StepDone(WatcherStep::Refute { ours: 6, .. })
    )));
    assert_eq!(flaky.injected.load(Ordering::SeqCst), 2);
}

/// The event stream ends (a node connection the backend could not hide),
/// right after its history and later while the channel is open: the
/// watcher subscribes again each time, and still refutes a stale state.
async fn ended_event_stream_is_subscribed_again(ledger: Ledger) {
    let (opts, flaky) = flaky_alice();
    let mut ps = alice_and_bob(&ledger, opts).await;
    let flaky = flaky.lock().unwrap().clone().unwrap();
    // The first two subscriptions end right after their history.
    flaky.end_streams.store(2, Ordering::SeqCst);
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let seen = collect(chans[0].events());
    let (stale, latest) = common::stale_and_latest(&chans).await;
    // End the open stream until the watcher reported two re-subscriptions
    // (an end during its backoff finds no stream to end).
    let mut events = chans[0].events();
    let mut reported = 0;
    tokio::time::timeout(WAIT, async {
        while reported < 2 {
            flaky.end_open_streams();
            let pause = tokio::time::sleep(Duration::from_millis(300));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    ev = events.next() => {
                        if matches!(ev, Some(ChannelEvent::Resubscribing { .. })) {
                            reported += 1;
                        }
                    }
                    () = &mut pause => break,
                }
            }
        }
    })
    .await
    .expect("two re-subscriptions");
    wait_watching(&chans[0]).await;
    cheat_and_settle(&ledger, &ps, &chans, stale, &latest).await;
    let seen = seen.await.unwrap();
    let resubscribed = seen
        .iter()
        .filter(|e| matches!(e, ChannelEvent::Resubscribing { .. }))
        .count();
    assert!(resubscribed >= 2, "re-subscriptions reported: {seen:?}");
    assert_eq!(flaky.end_streams.load(Ordering::SeqCst), 0);
}

/// Waits until the channel's watcher has read the chain.
async fn wait_watching(ch: &perun::client::Channel) {
    tokio::time::timeout(WAIT, async {
        while ch.watch_status() != WatchStatus::Watching {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watcher reads the chain");
}

/// A backend bug makes the watcher panic: its supervisor restarts it, and
/// the restarted watcher refutes.
async fn panicking_watcher_is_restarted(ledger: Ledger) {
    let (opts, flaky) = flaky_alice();
    let mut ps = alice_and_bob(&ledger, opts).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (stale, latest) = common::stale_and_latest(&chans).await;
    let flaky = flaky.lock().unwrap().clone().unwrap();
    flaky.panic_disputes.store(1, Ordering::SeqCst);
    let seen = collect(chans[0].events());
    cheat_and_settle(&ledger, &ps, &chans, stale, &latest).await;
    let seen = seen.await.unwrap();
    assert!(
        seen.iter()
            .any(|e| matches!(e, ChannelEvent::WatcherRestarted { .. })),
        "restart reported: {seen:?}"
    );
    assert_eq!(chans[0].watch_status(), WatchStatus::Done);
}

/// Alice is offline while Bob registers the latest state and concludes it.
/// Back online, her restored channel (`Active` on disk) goes to `Concluded`
/// and `Withdrawn`, with her share of that state.
async fn concluded_while_offline_is_withdrawn(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    chans[1].pay(0, 0, u(300)).await.unwrap();
    let latest = common::caught_up(&chans).await;
    let id = chans[0].id();
    ps[0].client.shutdown().await;
    // Bob closes on-chain; his own watcher concludes and withdraws.
    let adj = bob_registers(&ledger, &ps[1], &chans[1], latest.clone()).await;
    on_chain_version(&adj, &chans[1], latest.state.version).await;
    ledger.advance(CHALLENGE + 1).await;
    chans[1]
        .wait_for_phase(Phase::Withdrawn, WAIT)
        .await
        .unwrap();
    assert!(adj.dispute(id).await.unwrap().unwrap().concluded);

    let bob_ch = chans[1].clone();
    drop(chans); // Alice's handles keep her old client (and its store) alive.
    let alice = restart(&ledger, ps.remove(0)).await;
    ps.insert(0, alice);
    let ch = ps[0].client.channel(&id).expect("restored");
    ch.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    drop(bob_ch);
    check_balances(&ledger, &ps, &latest).await;
}

/// Alice is offline for longer than the challenge period of Bob's stale
/// registration. Back online, her watcher cannot refute any more: it
/// concludes what is registered and withdraws, so she is paid (her share
/// of the stale state) instead of nobody ever being paid; `settle` returns.
async fn too_late_to_refute_concludes_what_is_registered(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (stale, _latest) = common::stale_and_latest(&chans).await;
    let id = chans[0].id();
    ps[0].client.shutdown().await;
    // Bob cheats (his own client would refute his stale state).
    ps[1].client.shutdown().await;
    let adj = bob_registers(&ledger, &ps[1], &chans[1], stale.clone()).await;
    on_chain_version(&adj, &chans[1], 1).await;
    ledger.advance(CHALLENGE + 1).await;

    let bob_ch = chans[1].clone();
    drop(chans); // Alice's handles keep her old client (and its store) alive.
    let alice = restart(&ledger, ps.remove(0)).await;
    ps.insert(0, alice);
    let ch = ps[0].client.channel(&id).expect("restored");
    tokio::time::timeout(WAIT, ch.settle())
        .await
        .expect("settle returns")
        .unwrap();
    assert_eq!(ch.phase(), Phase::Withdrawn);
    bob_withdraws(&adj, &ps[1], &bob_ch, &stale).await;
    check_balances(&ledger, &ps, &stale).await;
}

/// Accepts every update; on version `cut_at` it first tells the relay to
/// lose everything Alice sends Bob from now on.
struct CutBeforeSigning {
    relay: Arc<Relay>,
    cut_at: u64,
}

#[async_trait]
impl UpdateHandler for CutBeforeSigning {
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder) {
        if update.next.version == self.cut_at {
            self.relay.drop_back(true);
        }
        responder.accept();
    }
}

/// Bob is reachable only over the connection he opens (he listens nowhere)
/// through a relay. Right as he signs Alice's third payment, the relay
/// starts losing what Alice sends him: her commit never arrives, and Bob is
/// left `Updating`. Alice's update is done for her. Then the relay cuts the
/// connection and forwards again: Bob's resync reconnects, the two exchange
/// `Sync`, Bob gets version 3, and the channel goes on in both directions.
async fn lost_commit_arrives_by_sync_when_the_connection_is_back(ledger: Ledger) {
    let alice = common::party(
        &ledger,
        u(MINT),
        &Options {
            request_timeout: Some(Duration::from_secs(1)),
            ..Options::default()
        },
    )
    .await;
    // "/ip4/127.0.0.1/tcp/<port>"
    let target = alice.client.listen_addrs().await.unwrap()[0].to_string();
    let port: u16 = target.rsplit('/').next().unwrap().parse().unwrap();
    let relay = Arc::new(Relay::start(([127, 0, 0, 1], port).into()).await);
    let bob = common::party(
        &ledger,
        u(MINT),
        &Options {
            dial_only: true,
            request_timeout: Some(Duration::from_secs(1)),
            update_handler: Some(Arc::new(CutBeforeSigning {
                relay: relay.clone(),
                cut_at: 3,
            })),
            timeouts: Some(perun::client::Timeouts {
                update_wait: Duration::from_secs(1),
                ..common::test_timeouts(Duration::from_secs(30))
            }),
            ..Options::default()
        },
    )
    .await;
    bob.client
        .add_peer(alice.client.peer_id(), relay.multiaddr())
        .await
        .unwrap();
    // Bob proposes (Alice cannot dial him).
    let mut ps = vec![bob, alice];
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (bob_ch, alice_ch) = (&chans[0], &chans[1]);
    for _ in 0..3 {
        alice_ch.pay(0, 0, u(10)).await.unwrap();
    }
    assert_eq!(alice_ch.state().state.version, 3);
    // Bob signed version 3 but its commit is lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bob_ch.phase(), Phase::Updating, "Bob waits for the commit");
    assert_eq!(bob_ch.state().state.version, 2);
    // The partition ends: the connection drops, and new ones get through.
    relay.drop_back(false);
    relay.cut();
    let st = bob_ch
        .wait_for_version(3, Duration::from_secs(20))
        .await
        .expect("Bob gets version 3 by Sync once the connection is back");
    assert_eq!(st, alice_ch.state());
    tokio::time::timeout(Duration::from_secs(10), async {
        while bob_ch.phase() != Phase::Active {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Bob is no longer Updating");
    bob_ch.pay(1, 0, u(5)).await.unwrap();
    alice_ch.pay(0, 0, u(5)).await.unwrap();
    let fin = common::caught_up(&chans).await;
    assert_eq!(
        fin.state.outcome.balances[0],
        vec![u(EACH + 30), u(EACH - 30)]
    );
}

/// Eight stale registrations in one block, refuted by one client from one
/// account: every refutation lands (the transaction queue orders the
/// nonces), and every channel ends with the latest state's balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_stale_registrations_in_one_block_are_all_refuted() {
    const N: usize = 8;
    let ledger = Ledger::anvil().await;
    let Ledger::Anvil { anvil, .. } = &ledger else {
        unreachable!("anvil ledger");
    };
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let mut chans = Vec::new();
    for _ in 0..N {
        chans.push(open(&ledger, &mut ps, u(EACH)).await);
    }
    let mut stale = Vec::new();
    for c in &chans {
        c[1].pay(0, 0, u(100)).await.unwrap();
        stale.push(c[1].state());
        c[1].pay(0, 0, u(100)).await.unwrap();
        common::caught_up(c).await;
    }
    ps[1].client.shutdown().await;
    let (_, cheat) = ledger.backends(&ps[1].account).await;
    anvil.set_automine(false).await.unwrap();
    let registrations: Vec<_> = chans
        .iter()
        .zip(stale)
        .map(|(c, old)| {
            let (cheat, params) = (cheat.clone(), c[1].params().clone());
            tokio::spawn(async move {
                cheat
                    .register(&perun::adjudicator::SignedChannel { params, state: old })
                    .await
            })
        })
        .collect();
    tokio::time::timeout(WAIT, async {
        while anvil.pending_transactions().await.unwrap() < N as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all eight registrations wait in the pool");
    anvil.mine(1).await.unwrap();
    anvil.set_automine(true).await.unwrap();
    for r in registrations {
        r.await.unwrap().unwrap();
    }
    for c in &chans {
        on_chain_version(&cheat, &c[0], 2).await;
    }
    ledger.advance(CHALLENGE + 1).await;
    for c in &chans {
        c[0].wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
        bob_withdraws(&cheat, &ps[1], &c[1], &c[1].state()).await;
    }
    // Each channel paid Alice 200 of Bob's deposit.
    assert_eq!(
        ledger.balance(ps[0].client.address()).await,
        u(MINT + 200 * N as u64)
    );
    assert_eq!(
        ledger.balance(ps[1].client.address()).await,
        u(MINT - 200 * N as u64)
    );
}

/// A funder that never finishes (the process is about to crash mid-funding).
struct Hangs;

#[async_trait]
impl perun::adjudicator::Funder for Hangs {
    async fn fund(
        &self,
        _req: perun::adjudicator::FundingRequest,
    ) -> perun::adjudicator::Result<()> {
        std::future::pending().await
    }

    fn supports(&self, _: &perun::channel::Asset) -> bool {
        true
    }
}

/// Bob accepts but "crashes" before depositing. Alice's funding times out;
/// she closes with version 0, which refunds her once the challenge period
/// is over. Bob then restarts: his channel comes back in `Funding`, but it
/// is concluded on-chain, so he deposits nothing (a deposit now would be
/// stranded) and his watcher takes the channel to `Withdrawn`.
async fn funding_resumed_after_the_peer_closed_deposits_nothing(ledger: Ledger) {
    let alice = common::party(
        &ledger,
        u(MINT),
        &Options {
            funding_timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await;
    let bob = common::party(
        &ledger,
        u(MINT),
        &Options {
            funder: Some(Arc::new(Hangs)),
            ..Options::default()
        },
    )
    .await;
    let mut ps = vec![alice, bob];
    common::introduce(&ps).await;
    let prop = common::proposal(&ledger, &ps, u(EACH));
    let alice_client = ps[0].client.clone();
    alice_client.propose_channel(prop).await.unwrap_err();
    // Bob is down from here on, so his watcher cannot see the close (it
    // would withdraw, and the withdrawn channel would leave his store).
    ps[1].client.shutdown().await;
    let alice_ch = alice_client.channels().pop().unwrap();
    let id = alice_ch.id();
    let (_, adj) = ledger.backends(&ps[0].account).await;
    on_chain_version(&adj, &alice_ch, 0).await;
    ledger.advance(CHALLENGE + 1).await;
    alice_ch
        .wait_for_phase(Phase::Withdrawn, WAIT)
        .await
        .unwrap();
    drop(alice_ch);
    assert_eq!(ledger.balance(ps[0].client.address()).await, u(MINT));

    let bob = restart(&ledger, ps.remove(1)).await;
    let bob_ch = bob.client.channel(&id).expect("restored in Funding");
    bob_ch.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
    // Give a stray deposit time to land, had one been sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger.balance(bob.client.address()).await, u(MINT));
    ps.push(bob);
}
