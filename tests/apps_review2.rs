//! Second adversarial review of app channels (issue 16), client side: the
//! fixes of the first review (force_update's base, sign_once, the Withdraw
//! guard, resume after restart, Landed/Moot by hash).
//!
//! Four were real findings on the reviewed commit, fixed since: a dropped
//! call withdrew another call's identical move (the drop guard is gone: a
//! signed, stored move is always sent), a move that landed late was reported
//! moot, `force_update` after `shutdown` closed the channel and signed, and
//! the withdrawal was undone by a restart. Every test passes now.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use common::game::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, restart_opts};
use perun::adjudicator::{
    Adjudicator, EventStream, ProgressRequest, Result as AdjResult, SignedChannel, WithdrawRequest,
};
use perun::channel::tictactoe::TicTacToe;
use perun::channel::{Address, ChannelId, Phase, SignedState, U256};
use perun::client::ChannelEvent;
use perun::wire::{Message, Update};

/// Sim-only tests (the client logic under review does not depend on the backend).
macro_rules! on_sim {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sim() {
                super::$name($crate::common::Ledger::sim().await).await
            }
        }
    )*};
}

on_sim!(
    a_dropped_force_update_does_not_withdraw_a_concurrent_call_of_the_same_move,
    a_move_that_landed_before_the_peer_concluded_is_not_reported_moot,
    a_signed_forced_move_is_sent_even_if_its_caller_stopped_waiting,
    force_update_after_shutdown_ends_and_signs_nothing,
    a_peer_proposal_we_signed_is_not_resumed_as_our_move,
);

// ---------------------------------------------------------------- harness

/// A backend wrapper: records progressions; `hook` may take over a call.
struct Wrapped {
    inner: Arc<dyn Adjudicator>,
    progressed: Arc<Mutex<Vec<ProgressRequest>>>,
    hook: Option<Arc<ProgressHook>>,
}

type ProgressHook = dyn Fn(
        Arc<dyn Adjudicator>,
        ProgressRequest,
    ) -> futures::future::BoxFuture<'static, Option<AdjResult<()>>>
    + Send
    + Sync;

#[async_trait]
impl Adjudicator for Wrapped {
    fn domain(&self) -> perun::channel::Domain {
        self.inner.domain()
    }
    async fn register(&self, req: &SignedChannel) -> AdjResult<()> {
        self.inner.register(req).await
    }
    async fn progress(&self, req: &ProgressRequest) -> AdjResult<()> {
        self.progressed.lock().unwrap().push(req.clone());
        if let Some(h) = &self.hook
            && let Some(r) = h(self.inner.clone(), req.clone()).await
        {
            return r;
        }
        self.inner.progress(req).await
    }
    async fn conclude(&self, req: &SignedChannel) -> AdjResult<()> {
        self.inner.conclude(req).await
    }
    async fn withdraw(&self, req: &WithdrawRequest) -> AdjResult<()> {
        self.inner.withdraw(req).await
    }
    async fn subscribe(&self, id: ChannelId) -> AdjResult<EventStream> {
        self.inner.subscribe(id).await
    }
    async fn dispute(&self, id: ChannelId) -> AdjResult<Option<perun::adjudicator::Dispute>> {
        self.inner.dispute(id).await
    }
}

fn wrapped_opts(
    rec: &Arc<Mutex<Vec<ProgressRequest>>>,
    hook: Option<Arc<ProgressHook>>,
) -> impl Fn(Address) -> Options + Clone {
    let rec = rec.clone();
    move |app| {
        let (rec, hook) = (rec.clone(), hook.clone());
        Options {
            wrap_adjudicator: Some(Box::new(move |inner| {
                Arc::new(Wrapped {
                    inner,
                    progressed: rec.clone(),
                    hook: hook.clone(),
                }) as Arc<dyn Adjudicator>
            })),
            ..app_opts(app)
        }
    }
}

// ------------------------------------------- the Withdraw guard

/// Alice's application forces her winning move, and (a retry, a second UI
/// path) forces the same move again while the first call still waits. The
/// first call is then dropped (its caller's timeout): its Withdraw guard
/// clears the pending move by hash, which is also the second call's move.
/// The second call must still see its move land (and Alice take the pot).
async fn a_dropped_force_update_does_not_withdraw_a_concurrent_call_of_the_same_move(
    ledger: Ledger,
) {
    let g = alice_about_to_win(ledger, app_opts).await;
    g.ps[1].client.shutdown().await;
    let alice = g.chans[0].clone();
    let params = alice.params().clone();
    let second = {
        let (alice, params) = (alice.clone(), params.clone());
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    on_chain(&g, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = tokio::time::timeout(
        Duration::from_secs(1),
        alice.force_update(|s| TicTacToe.play(&params, s, 0, 6)),
    )
    .await;
    assert!(first.is_err(), "the window is not open yet: {first:?}");
    g.ledger.advance(CHALLENGE + 1).await;
    let r = tokio::time::timeout(Duration::from_secs(20), second).await;
    let v = dispute_version(&g).await;
    assert!(
        matches!(r, Ok(Ok(Ok(ref s))) if s.version == 5),
        "the second force_update of the same move: {r:?}; on-chain version {v:?} \
         (the dropped first call withdrew the move both calls wait for)"
    );
    alice
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        g.ledger.balance(g.ps[0].client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

/// The review found a dropped `force_update` withdrew its move in memory
/// while a restart sent it from the store. One behaviour now: a signed,
/// stored move is sent once its window opens, whether the caller still
/// waits, and across a restart (DESIGN §14).
async fn a_signed_forced_move_is_sent_even_if_its_caller_stopped_waiting(ledger: Ledger) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let opts = wrapped_opts(&rec, None);
    let mut g = alice_about_to_win(ledger, opts.clone()).await;
    g.ps[1].client.shutdown().await;
    let id = g.chans[0].id();
    let params = g.chans[0].params().clone();
    let forcing = {
        let alice = g.chans[0].clone();
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    // The caller stops waiting once the move is signed and stored.
    on_chain(&g, 4).await;
    move_stored(&g, 5).await;
    forcing.abort();
    let first = forcing.await;
    assert!(
        first.as_ref().is_err_and(|e| e.is_cancelled()),
        "the window is not open yet: {first:?}"
    );
    g.ledger.advance(CHALLENGE + 1).await;
    // The move is sent although nobody waits for it any more: the final
    // move concludes at once and Alice is paid, and a restart changes nothing.
    let alice = g.ps.remove(0);
    let alice = restart_opts(&g.ledger, alice, &opts(g.app)).await;
    let ch = alice.client.channel(&id).expect("restored");
    ch.wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(dispute_version(&g).await >= Some(5));
    assert_eq!(
        g.ledger.balance(alice.client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

// --------------------------------------------- Landed / Moot by hash

/// Alice's first `progress` is sent but its answer is lost (ReceiptTimeout;
/// on Ethereum the transaction stays queued and is mined later). Before
/// her retry, the move is mined and, being final (timeout = now), Bob
/// concludes at once; the retry gets AlreadyConcluded. The concluded state
/// IS Alice's move: force_update must return it, not MoveMoot(Concluded).
async fn a_move_that_landed_before_the_peer_concluded_is_not_reported_moot(ledger: Ledger) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let queued: Arc<Mutex<Option<ProgressRequest>>> = Arc::new(Mutex::new(None));
    let hook: Arc<ProgressHook> = {
        let (calls, queued) = (calls.clone(), queued.clone());
        Arc::new(move |inner: Arc<dyn Adjudicator>, req: ProgressRequest| {
            let (calls, queued) = (calls.clone(), queued.clone());
            Box::pin(async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Sent; its receipt is lost. It is mined later.
                    *queued.lock().unwrap() = Some(req.clone());
                    return Some(Err(perun::adjudicator::Error::ReceiptTimeout {
                        op: "progress",
                        tx: perun::channel::B256::ZERO,
                        waited: Duration::from_secs(1),
                    }));
                }
                let queued = queued.lock().unwrap().clone()?;
                // The queued transaction is mined as soon as the window
                // opens; Bob concludes the final state at once; then
                // Alice's retry reaches the chain.
                let mined = inner.progress(&queued).await;
                if mined.is_err() {
                    return Some(mined);
                }
                inner
                    .conclude(&SignedChannel {
                        params: queued.params.clone(),
                        state: SignedState::new(queued.to.clone()),
                    })
                    .await
                    .unwrap();
                Some(inner.progress(&req).await)
            }) as futures::future::BoxFuture<'static, Option<AdjResult<()>>>
        })
    };
    let g = alice_about_to_win(ledger, wrapped_opts(&rec, Some(hook))).await;
    g.ps[1].client.shutdown().await;
    let alice = g.chans[0].clone();
    let params = alice.params().clone();
    let forcing = {
        let (alice, params) = (alice.clone(), params.clone());
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    on_chain(&g, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.ledger.advance(CHALLENGE + 1).await;
    let r = tokio::time::timeout(Duration::from_secs(20), forcing)
        .await
        .expect("force_update returns")
        .unwrap();
    let d = g.adj.dispute(alice.id()).await.unwrap().unwrap();
    assert!(d.concluded && d.version == 5, "{d:?}");
    assert!(
        matches!(r, Ok(ref s) if s.hash() == d.state_hash),
        "Alice's move is the concluded state, yet force_update says {r:?}"
    );
    alice
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        g.ledger.balance(g.ps[0].client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

// ------------------------------------------------ shutdown

/// Alice's client shut down (no watcher runs): force_update must end
/// promptly, without closing the channel or signing a move (both stored:
/// the next start would register and send it).
async fn force_update_after_shutdown_ends_and_signs_nothing(ledger: Ledger) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let g = alice_about_to_win(ledger, wrapped_opts(&rec, None)).await;
    g.ps[1].client.shutdown().await;
    let alice = g.chans[0].clone();
    let params = alice.params().clone();
    g.ps[0].client.shutdown().await;
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        alice.force_update(|s| TicTacToe.play(&params, s, 0, 6)),
    )
    .await;
    println!(
        "force_update after shutdown: {r:?}; phase {:?}",
        alice.phase()
    );
    assert!(r.is_ok(), "force_update hangs after shutdown");
    assert!(r.unwrap().is_err());
    // It should refuse before closing the channel and signing a move that
    // the next start would send (resume_forced_move).
    assert_eq!(
        alice.phase(),
        Phase::Active,
        "a stopped client closed the channel (stored Registered) and signed a move"
    );
    assert!(
        rec.lock().unwrap().is_empty(),
        "a move was sent after shutdown"
    );
}

// ------------------------------------------------ resume on restore

/// Bob (an evil twin with his network key) proposes his move at version 4;
/// Alice signs it (stored as the staged state with her signature alone);
/// Bob never commits and registers version 3 instead. Alice restarts: her
/// staged state is Bob's move, not a forced move of hers; it must not be
/// sent as her move, and once Bob progresses (any move), Alice is told it
/// is her move and her forced answer lands.
async fn a_peer_proposal_we_signed_is_not_resumed_as_our_move(ledger: Ledger) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let opts = wrapped_opts(&rec, None);
    let mut g = game_with(ledger, opts.clone()).await;
    let mut v3 = None;
    for (who, cell) in [(0, 4), (1, 0), (0, 2)] {
        v3 = Some(play(&g, who, cell).await); // Bob's turn at version 3
    }
    let v3 = v3.unwrap();
    let id = g.chans[0].id();
    let params = g.chans[0].params().clone();
    let (evil, _evil_in, _bob_key) = common::evil_twin(&g.ps, 1, 0).await;
    let alice_client = &g.ps[0].client;
    let proposal = TicTacToe.play(&params, &v3.state, 1, 8).unwrap();
    let reply = evil
        .send(
            alice_client.peer_id(),
            &Message::Update(Update {
                channel_id: id,
                state: proposal.clone(),
                actor: 1,
            }),
        )
        .await
        .unwrap();
    assert!(matches!(reply, Message::UpdateAccept(_)), "{reply:?}");
    let (_, bob_adj) = g.ledger.backends(&g.ps[1].account).await;
    bob_adj
        .register(&SignedChannel {
            params: params.clone(),
            state: v3.clone(),
        })
        .await
        .unwrap();
    g.chans[0]
        .wait_for_phase(Phase::Registered, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alice = g.ps.remove(0);
    let alice = restart_opts(&g.ledger, alice, &opts(g.app)).await;
    let ch = alice.client.channel(&id).expect("restored");
    let mut events = ch.events();
    g.ledger.advance(CHALLENGE + 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        rec.lock()
            .unwrap()
            .iter()
            .all(|p| p.to.hash() != proposal.hash()),
        "Bob's proposal was sent as Alice's move"
    );
    // Bob moves on-chain (another cell than he proposed).
    let to = TicTacToe.play(&params, &v3.state, 1, 7).unwrap();
    let mut s = SignedState::new(to.clone());
    let signature = s.sign(&params, 1, g.ps[0].account.as_ref()).unwrap();
    bob_adj
        .progress(&ProgressRequest {
            params: params.clone(),
            from: v3.state.clone(),
            to: to.clone(),
            actor: 1,
            signature,
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(ChannelEvent::YourMove { state }) = events.next().await
                && state.version == 4
            {
                return;
            }
        }
    })
    .await
    .expect("YourMove on Bob's version 4");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        ch.force_update(|s| TicTacToe.play(&params, s, 0, 6)),
    )
    .await
    .expect("force_update returns");
    assert!(matches!(r, Ok(ref s) if s.version == 5), "{r:?}");
}
