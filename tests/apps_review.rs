//! Adversarial review of app channels (issue 16), client side.
//!
//! Each test states the property it checks. Tests named in the review
//! report as failing show a bug on the reviewed commit; the others verify
//! a property that holds.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use common::game::*;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, introduce, party, restart_opts};
use perun::adjudicator::{
    Adjudicator, EventStream, ProgressRequest, Result as AdjResult, SignedChannel, WithdrawRequest,
};
use perun::channel::tictactoe::{Board, Illegal, TicTacToe};
use perun::channel::{
    Address, Allocation, App, AppRejection, ChannelId, Params, Phase, SignedState, State, U256,
};
use perun::client::{ChannelEvent, ChannelProposal, Error, MootReason};
use perun::wallet::Account;
use perun::wire::{Message, RejectKind, Update, UpdateCommit};

on_both_ledgers!(a_progression_to_the_last_version_leaves_the_other_player_an_answer,);

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
    a_cancelled_force_update_then_another_move_never_signs_two_states_of_one_version,
    concurrent_force_updates_never_sign_two_states_of_one_version,
    a_pending_forced_move_is_sent_after_a_restart,
    after_a_restart_the_same_move_may_be_forced_again_but_no_other,
    force_update_on_an_unrefutable_stale_registration_ends_and_the_watcher_concludes,
    a_stale_registration_is_refuted_before_the_peer_can_progress,
    illegal_moves_over_the_wire_are_refused_and_change_nothing,
    proposals_with_a_played_board_or_an_unknown_app_are_refused,
    payment_channels_refuse_force_update,
);

// ---------------------------------------------------------------- harness

/// Records every progression a party's client hands its backend: what the
/// chain (and, on Ethereum, the mempool) sees of the party's signatures.
struct Recording {
    inner: Arc<dyn Adjudicator>,
    progressed: Arc<Mutex<Vec<ProgressRequest>>>,
}

#[async_trait]
impl Adjudicator for Recording {
    fn domain(&self) -> perun::channel::Domain {
        self.inner.domain()
    }
    async fn register(&self, req: &SignedChannel) -> AdjResult<()> {
        self.inner.register(req).await
    }
    async fn progress(&self, req: &ProgressRequest) -> AdjResult<()> {
        self.progressed.lock().unwrap().push(req.clone());
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

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(secs), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {secs} s"));
}

/// Bob (his own chain backend, his client gone) signs `to` as his move.
fn bob_signs(g: &Game, to: &State) -> perun::channel::Signature {
    let mut s = SignedState::new(to.clone());
    s.sign(g.chans[0].params(), 1, g.ps[1].account.as_ref())
        .unwrap()
}

// ------------------------------------------------ 6: huge version jumps

/// Bob registers version 1 (his turn), waits out the refutation period and
/// tries to progress with a legal move at version `u64::MAX`: no state could
/// follow it, so Alice could never answer and Bob's move, which hands him
/// the pot, would conclude. A move must be exactly one version on
/// (`VersionStep`); Bob's move at version 2 lands and Alice answers it.
async fn a_progression_to_the_last_version_leaves_the_other_player_an_answer(ledger: Ledger) {
    let g = game(ledger).await;
    let v1 = play(&g, 0, 4).await; // X centre; Bob's turn
    let params = g.chans[0].params().clone();
    g.ps[1].client.shutdown().await;
    let (_, bob_adj) = g.ledger.backends(&g.ps[1].account).await;
    bob_adj
        .register(&SignedChannel {
            params: params.clone(),
            state: v1.clone(),
        })
        .await
        .unwrap();
    g.ledger.advance(CHALLENGE + 1).await;
    let mut to = TicTacToe.play(&params, &v1.state, 1, 0).unwrap();
    to.version = u64::MAX;
    let signature = bob_signs(&g, &to);
    let mut events = g.chans[0].events();
    let jump = bob_adj
        .progress(&ProgressRequest {
            params: params.clone(),
            from: v1.state.clone(),
            to: to.clone(),
            actor: 1,
            signature,
        })
        .await;
    assert!(
        matches!(
            jump,
            Err(perun::adjudicator::Error::VersionStep {
                registered: 1,
                got: u64::MAX
            })
        ),
        "{jump:?}"
    );
    to.version = 2;
    let signature = bob_signs(&g, &to);
    bob_adj
        .progress(&ProgressRequest {
            params: params.clone(),
            from: v1.state.clone(),
            to: to.clone(),
            actor: 1,
            signature,
        })
        .await
        .unwrap();
    on_chain(&g, 2).await;
    // Alice's watcher tells her it is her move on Bob's state.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(ChannelEvent::YourMove { state }) = events.next().await
                && state.version == 2
            {
                return;
            }
        }
    })
    .await
    .expect("YourMove on version 2");
    let alice = &g.chans[0];
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        alice.force_update(|s| TicTacToe.play(&params, s, 0, 8)),
    )
    .await
    .expect("force_update returns");
    assert!(answer.is_ok(), "Alice answers Bob's move: {answer:?}");
}

// --------------------------------------------------- 3: double signing

/// The forced move's version as every progression Alice handed her backend
/// saw it: never two different states of one version.
fn assert_one_state_per_version(progressed: &[ProgressRequest]) {
    for a in progressed {
        for b in progressed {
            assert!(
                a.to.version != b.to.version || a.to.hash() == b.to.hash(),
                "Alice signed two different states of version {}: cells {:?} and {:?}",
                a.to.version,
                Board::decode(&a.to.appData).unwrap().cells,
                Board::decode(&b.to.appData).unwrap().cells,
            );
        }
    }
}

fn recording_alice(rec: &Arc<Mutex<Vec<ProgressRequest>>>) -> impl FnOnce(Address) -> Options {
    let rec = rec.clone();
    move |app| Options {
        wrap_adjudicator: Some(Box::new(move |inner| {
            Arc::new(Recording {
                inner,
                progressed: rec.clone(),
            }) as Arc<dyn Adjudicator>
        })),
        ..app_opts(app)
    }
}

/// Alice forces a move; the application gives up waiting for it (drops the
/// future, e.g. a timeout) and forces another move. The first move was
/// already handed to the chain (every poll tries it while the refutation
/// period runs; on Ethereum a sent transaction may still be mined), so two
/// states of the same version signed by Alice are out: Bob (anyone) may
/// pick the one he likes. `sign_once` compares with `machine.last_signed`,
/// which a forced move never updates.
async fn a_cancelled_force_update_then_another_move_never_signs_two_states_of_one_version(
    ledger: Ledger,
) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let g = game_with(ledger, recording_alice(&rec)).await;
    play(&g, 0, 4).await;
    play(&g, 1, 0).await; // Alice's turn at version 2
    g.ps[1].client.shutdown().await;
    let alice = &g.chans[0];
    let params = alice.params().clone();
    let first = tokio::time::timeout(
        Duration::from_secs(1),
        alice.force_update(|s| TicTacToe.play(&params, s, 0, 8)),
    )
    .await;
    assert!(first.is_err(), "the window is not open yet: {first:?}");
    wait_until("the first move handed to the chain", 10, || {
        !rec.lock().unwrap().is_empty()
    })
    .await;
    let second = tokio::time::timeout(
        Duration::from_secs(1),
        alice.force_update(|s| TicTacToe.play(&params, s, 0, 6)),
    )
    .await;
    // Either refused (DoubleSign), or pending: then its signature goes out too.
    if let Ok(r) = &second {
        println!("second force_update: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_one_state_per_version(&rec.lock().unwrap());
}

/// Two force_update calls at once (two UI clicks) with different moves.
async fn concurrent_force_updates_never_sign_two_states_of_one_version(ledger: Ledger) {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let g = game_with(ledger, recording_alice(&rec)).await;
    play(&g, 0, 4).await;
    play(&g, 1, 0).await;
    g.ps[1].client.shutdown().await;
    let alice = g.chans[0].clone();
    let params = alice.params().clone();
    let spawn = |cell| {
        let (alice, params) = (alice.clone(), params.clone());
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, cell))
                .await
        })
    };
    let (a, b) = (spawn(8), spawn(6));
    tokio::time::sleep(Duration::from_secs(1)).await;
    g.ledger.advance(CHALLENGE + 1).await;
    let ra = tokio::time::timeout(Duration::from_secs(20), a).await;
    let rb = tokio::time::timeout(Duration::from_secs(20), b).await;
    println!("a: {ra:?}\nb: {rb:?}");
    assert_one_state_per_version(&rec.lock().unwrap());
    // At most one of the two may claim its move landed, and it must be the
    // state on-chain.
    let d = g.adj.dispute(alice.id()).await.unwrap().unwrap();
    for r in [ra, rb] {
        if let Ok(Ok(Ok(st))) = r {
            assert_eq!(
                st.hash(),
                d.state_hash,
                "force_update returned a move that is not on-chain"
            );
        }
    }
}

// ------------------------------------------- 4: restarts mid-dispute

/// Alice forces her winning move; her client restarts before the window
/// opens. The move is signed and stored (as the staged state): the
/// restarted watcher should still send it and Alice be paid the pot,
/// without her application having to ask again.
async fn a_pending_forced_move_is_sent_after_a_restart(ledger: Ledger) {
    let mut g = alice_about_to_win(ledger, app_opts).await;
    g.ps[1].client.shutdown().await;
    let id = g.chans[0].id();
    let params = g.chans[0].params().clone();
    let forcing = {
        let alice = g.chans[0].clone();
        let params = params.clone();
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    on_chain(&g, 4).await;
    move_stored(&g, 5).await;
    let alice = g.ps.remove(0);
    let alice = restart_opts(&g.ledger, alice, &app_opts(g.app)).await;
    let r = forcing.await.unwrap();
    println!("force_update before the restart: {r:?}");
    let ch = alice.client.channel(&id).expect("restored");
    g.ledger.advance(CHALLENGE + 1).await;
    let landed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if g.adj
                .dispute(id)
                .await
                .unwrap()
                .is_some_and(|d| d.version == 5)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        landed.is_ok(),
        "the stored forced move was not sent after the restart; phase {:?}",
        ch.phase()
    );
    ch.wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        g.ledger.balance(alice.client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

/// After a restart the forced move is known: the same move may be forced
/// again (it lands, Alice is paid), a different one of the same version is
/// refused as a double signature.
async fn after_a_restart_the_same_move_may_be_forced_again_but_no_other(ledger: Ledger) {
    let mut g = alice_about_to_win(ledger, app_opts).await;
    g.ps[1].client.shutdown().await;
    let id = g.chans[0].id();
    let params = g.chans[0].params().clone();
    let forcing = {
        let alice = g.chans[0].clone();
        let params = params.clone();
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    on_chain(&g, 4).await;
    move_stored(&g, 5).await;
    let alice = g.ps.remove(0);
    let alice = restart_opts(&g.ledger, alice, &app_opts(g.app)).await;
    let _ = forcing.await.unwrap();
    let ch = alice.client.channel(&id).expect("restored");
    assert!(ch.phase() >= Phase::Registered, "phase {:?}", ch.phase());
    // Another move of version 5: refused.
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        ch.force_update(|s| TicTacToe.play(&params, s, 0, 8)),
    )
    .await
    .expect("refused at once");
    assert!(
        matches!(
            other,
            Err(Error::Channel(
                perun::channel::Error::DoubleSign(5)
                    | perun::channel::Error::SignedFinal { version: 5, .. }
            ))
        ),
        "{other:?}"
    );
    // The same move: lands once the window opens.
    let again = {
        let ch = ch.clone();
        let params = params.clone();
        tokio::spawn(async move { ch.force_update(|s| TicTacToe.play(&params, s, 0, 6)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.ledger.advance(CHALLENGE + 1).await;
    let landed = tokio::time::timeout(Duration::from_secs(20), again)
        .await
        .expect("lands")
        .unwrap()
        .unwrap();
    assert_eq!(landed.version, 5);
    ch.wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        g.ledger.balance(alice.client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

/// Bob registers version 1 (X moved: Alice holds the pot, Bob's turn) while
/// Alice is offline longer than the refutation period. Back, Alice cannot
/// refute any more; her application forces a move from her latest state
/// (version 4). That move can never land (the base is not registered and
/// never will be): force_update must end (MoveMoot), and the watcher must
/// conclude version 1, which pays Alice the pot, once its timeout passes.
async fn force_update_on_an_unrefutable_stale_registration_ends_and_the_watcher_concludes(
    ledger: Ledger,
) {
    let mut g = alice_about_to_win(ledger, app_opts).await;
    let params = g.chans[0].params().clone();
    // Rebuild version 1 from scratch: both sign it (Bob could, holding Alice's signature).
    let genesis = {
        let mut st = State::initial(
            &params,
            Allocation::new(
                vec![g.ledger.asset()],
                vec![vec![U256::from(STAKE), U256::from(STAKE)]],
            ),
        );
        st.appData = TicTacToe::initial_data(0);
        st
    };
    let mut v1 = SignedState::new(TicTacToe.play(&params, &genesis, 0, 4).unwrap());
    v1.sign(&params, 0, g.ps[0].account.as_ref()).unwrap();
    v1.sign(&params, 1, g.ps[1].account.as_ref()).unwrap();
    g.ps[1].client.shutdown().await;
    // Alice goes offline.
    let alice = g.ps.remove(0);
    alice.client.shutdown().await;
    let (_, bob_adj) = g.ledger.backends(&g.ps[0].account).await;
    bob_adj
        .register(&SignedChannel {
            params: params.clone(),
            state: v1.clone(),
        })
        .await
        .unwrap();
    g.ledger.advance(CHALLENGE + 1).await;
    // Alice is back: too late to refute.
    let alice = restart_opts(&g.ledger, alice, &app_opts(g.app)).await;
    let ch = alice.client.channel(&v1.state.channelId).expect("restored");
    let forcing = {
        let ch = ch.clone();
        let params = params.clone();
        tokio::spawn(async move { ch.force_update(|s| TicTacToe.play(&params, s, 0, 6)).await })
    };
    // It must end before the chain moves on (generous: a loaded machine),
    // refusing the move: on the registered state (version 1 is Bob's
    // turn), or, if it built the move on its own version 4 first, as moot
    // once it finds version 1 registered. Which comes first is a race.
    // Giving up on finding that state (after 10 s) would be a failure of
    // its own.
    let forced = tokio::time::timeout(Duration::from_secs(30), forcing).await;
    let hangs = forced.is_err();
    if let Ok(res) = forced {
        let res = res.expect("force_update panicked");
        assert!(
            matches!(
                res,
                Err(Error::Channel(_))
                    | Err(Error::MoveMoot {
                        reason: MootReason::ChainMoved { registered: 1 },
                        ..
                    })
            ),
            "force_update on an unrefutable base: {res:?}"
        );
    }
    g.ledger.advance(CHALLENGE + 1).await;
    let concluded = ch
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(15))
        .await;
    assert!(
        !hangs && concluded.is_ok(),
        "force_update hangs: {hangs} (its base, version 4, can never be registered); \
         the watcher concludes version 1 and withdraws: {concluded:?} (phase {:?})",
        ch.phase()
    );
    assert_eq!(
        g.ledger.balance(alice.client.address()).await,
        g.start[0] + U256::from(STAKE),
        "version 1 pays Alice the pot"
    );
}

// ------------------------------------------------ 5: stale registration

/// Bob registers an old state (version 1, his turn); Alice's watcher
/// refutes with version 4 within the refutation period, so Bob's
/// progression from version 1 is refused; Bob (silent) then loses the pot.
async fn a_stale_registration_is_refuted_before_the_peer_can_progress(ledger: Ledger) {
    let g = game(ledger).await;
    let v1 = play(&g, 0, 4).await;
    play(&g, 1, 0).await;
    play(&g, 0, 2).await;
    let v4 = play(&g, 1, 1).await; // Alice's turn; Bob holds the pot
    play(&g, 0, 8).await; // version 5: Bob's turn; Alice holds the pot
    let _ = v4;
    let params = g.chans[0].params().clone();
    g.ps[1].client.shutdown().await;
    let (_, bob_adj) = g.ledger.backends(&g.ps[1].account).await;
    bob_adj
        .register(&SignedChannel {
            params: params.clone(),
            state: v1.clone(),
        })
        .await
        .unwrap();
    on_chain(&g, 5).await; // refuted
    g.ledger.advance(CHALLENGE + 1).await;
    let mut to = TicTacToe.play(&params, &v1.state, 1, 1).unwrap();
    to.version = 2;
    let signature = bob_signs(&g, &to);
    let e = bob_adj
        .progress(&ProgressRequest {
            params,
            from: v1.state.clone(),
            to,
            actor: 1,
            signature,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, perun::adjudicator::Error::WrongState), "{e:?}");
    g.ledger.advance(CHALLENGE + 1).await;
    g.chans[0]
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        g.ledger.balance(g.ps[0].client.address()).await,
        g.start[0] + U256::from(STAKE)
    );
}

// ----------------------------------------- 1: illegal moves on the wire

/// Bob's client stops and an evil twin with his network key sends moves:
/// each illegal one is refused (`Refused`) and Alice's state is unchanged;
/// a legal one is signed.
async fn illegal_moves_over_the_wire_are_refused_and_change_nothing(ledger: Ledger) {
    let g = game(ledger).await;
    for (who, cell) in [(0, 4), (1, 0), (0, 2)] {
        play(&g, who, cell).await; // Bob's turn at version 3
    }
    let alice = &g.chans[0];
    let params = alice.params().clone();
    let before = alice.state();
    let (evil, _evil_in, bob_key) = common::evil_twin(&g.ps, 1, 0).await;
    let alice_client = &g.ps[0].client;
    let send = |state: State, actor: usize| {
        let msg = Message::Update(Update {
            channel_id: alice.id(),
            state,
            actor,
        });
        let evil = evil.clone();
        let to = alice_client.peer_id();
        async move { evil.send(to, &msg).await.unwrap() }
    };
    let cur = before.state.clone();
    let legal = TicTacToe.play(&params, &cur, 1, 8).unwrap();
    let with_board = |f: &dyn Fn(&mut Board)| {
        let mut b = Board::decode(&legal.appData).unwrap();
        f(&mut b);
        let mut s = legal.clone();
        s.appData = b.encode();
        s
    };
    let mut cases: Vec<(&str, State, usize)> = vec![
        (
            "occupied",
            with_board(&|b| {
                b.cells[8] = None;
                b.cells[4] = Some(1);
            }),
            1,
        ),
        ("several cells", with_board(&|b| b.cells[7] = Some(1)), 1),
        ("no move", with_board(&|b| b.cells[8] = None), 1),
        ("wrong mark", with_board(&|b| b.cells[8] = Some(0)), 1),
        ("wrong next", with_board(&|b| b.next = 1), 1),
        (
            "overwrite own",
            with_board(&|b| {
                b.cells[8] = None;
                b.cells[0] = None;
            }),
            1,
        ),
        (
            "claims Alice's move",
            TicTacToe.play(&params, &cur, 1, 8).unwrap(),
            0,
        ),
    ];
    let mut s = legal.clone();
    s.outcome.balances[0].swap(0, 1);
    cases.push(("Alice keeps the pot", s, 1));
    let mut s = legal.clone();
    s.outcome.balances[0] = vec![U256::from(STAKE), U256::from(STAKE)];
    cases.push(("split pot", s, 1));
    let mut s = legal.clone();
    s.isFinal = true;
    cases.push(("final but not over", s, 1));
    let mut s = legal.clone();
    let mut data = s.appData.to_vec();
    data.push(0);
    s.appData = data.into();
    cases.push(("bad data", s, 1));
    let mut s = with_board(&|b| {
        b.cells[8] = None;
        b.cells[4] = Some(1);
    });
    s.version += 2;
    cases.push(("occupied at a skipped version", s, 1));
    for (what, state, actor) in cases {
        match send(state, actor).await {
            Message::UpdateReject(r) => {
                assert_eq!(r.kind, RejectKind::Refused, "{what}: {r:?}");
                println!("{what}: refused: {}", r.reason);
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        assert_eq!(alice.state(), before, "{what}");
        assert_eq!(alice.phase(), Phase::Active, "{what}");
    }
    // A legal move is signed; committed with Bob's signature, Alice holds it.
    let reply = send(legal.clone(), 1).await;
    let Message::UpdateAccept(a) = reply else {
        panic!("a legal move is signed: {reply:?}")
    };
    let bob_sig = bob_key.sign_hash(legal.hash()).unwrap();
    let commit = Message::UpdateCommit(UpdateCommit {
        channel_id: alice.id(),
        version: legal.version,
        index: 1,
        signatures: vec![a.signature, bob_sig],
    });
    evil.send(alice_client.peer_id(), &commit).await.unwrap();
    alice
        .wait_for_version(legal.version, Duration::from_secs(10))
        .await
        .unwrap();
    // Now it is Alice's move: Bob moving again is out of turn.
    let cur = alice.state().state;
    let mut twice = cur.next();
    let mut b = Board::decode(&cur.appData).unwrap();
    b.cells[7] = Some(1);
    b.next = 0;
    twice.appData = b.encode();
    match send(twice, 1).await {
        Message::UpdateReject(r) => {
            assert_eq!(r.kind, RejectKind::Refused, "out of turn: {r:?}");
            println!("out of turn: refused: {}", r.reason);
        }
        other => panic!("out of turn: expected a refusal, got {other:?}"),
    }
    assert_eq!(alice.state().state, cur);
}

// ------------------------------------------------ 2: bad proposals

/// Tic-tac-toe's moves, but any start: a proposer that cheats on version 0.
#[derive(Debug)]
struct AnyStart;

impl App for AnyStart {
    fn valid_transition(
        &self,
        params: &Params,
        from: &State,
        to: &State,
        actor: usize,
    ) -> Result<(), AppRejection> {
        TicTacToe.valid_transition(params, from, to, actor)
    }
}

/// Bob proposes a board that is already played (his O in the centre, or a
/// board already won, or not a board), or an app Alice does not know:
/// Alice refuses before anything is signed or funded.
async fn proposals_with_a_played_board_or_an_unknown_app_are_refused(ledger: Ledger) {
    let app = ledger.tictactoe().await;
    let unknown = Address::repeat_byte(0x99);
    let alice = party(&ledger, U256::from(10 * STAKE), &app_opts(app)).await;
    let bob_opts = Options {
        apps: vec![(app, Arc::new(AnyStart)), (unknown, Arc::new(AnyStart))],
        ..Options::default()
    };
    let bob = party(&ledger, U256::from(10 * STAKE), &bob_opts).await;
    let ps = vec![alice, bob];
    introduce(&ps).await;
    let bob_start = ledger.balance(ps[1].client.address()).await;
    let mut played = Board::new(0);
    played.cells[4] = Some(1);
    let mut won = Board::new(0);
    for c in [0, 1, 2] {
        won.cells[c] = Some(1);
    }
    let cases: Vec<(&str, Address, perun::channel::Bytes)> = vec![
        ("O in the centre", app, played.encode()),
        ("already won by O", app, won.encode()),
        ("not a board", app, vec![0u8; 11].into()),
        ("empty data", app, Vec::new().into()),
        ("unknown app", unknown, TicTacToe::initial_data(0)),
    ];
    for (what, a, data) in cases {
        let mut proposal = ChannelProposal::payment(
            vec![ps[1].participant(), ps[0].participant()],
            Allocation::new(
                vec![ledger.asset()],
                vec![vec![U256::from(STAKE), U256::from(STAKE)]],
            ),
            CHALLENGE,
        );
        proposal.app = a;
        proposal.app_data = data;
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            ps[1].client.propose_channel(proposal),
        )
        .await
        .expect("answered");
        println!("{what}: {r:?}");
        assert!(r.is_err(), "{what}: Alice opened it");
    }
    assert!(ps[0].client.channels().is_empty());
    assert_eq!(ledger.balance(ps[1].client.address()).await, bob_start);
}

// ------------------------------------------------ 7: payment channels

async fn payment_channels_refuse_force_update(ledger: Ledger) {
    let mut ps = common::parties(&ledger, 2, U256::from(1_000u64), &Options::default()).await;
    let chans = common::open(&ledger, &mut ps, U256::from(100u64)).await;
    let r = chans[0]
        .force_update(|s| Ok::<State, Illegal>(s.clone()))
        .await;
    assert!(matches!(r, Err(Error::NotAnAppChannel(_))), "{r:?}");
    assert_eq!(chans[0].phase(), Phase::Active);
    let _ = ChannelEvent::Withdrawn;
}
