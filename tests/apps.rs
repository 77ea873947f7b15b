//! App channels end to end (issue 16): tic-tac-toe played off-chain, a
//! player who stops answering forced on-chain, moves answered on-chain
//! until the game ends, and illegal moves refused with their reason.
//! Each test runs on the simulated ledger and on anvil (the real
//! adjudicator and `TicTacToeApp.sol`, redb stores).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use common::game::*;

use std::time::Duration;

use common::Ledger;
use perun::channel::tictactoe::{Board, Illegal, TicTacToe};
use perun::channel::{Phase, State, U256};
use perun::client::{ChannelEvent, Error};

on_both_ledgers!(
    a_silent_player_is_forced_on_chain_and_the_winner_is_paid,
    both_players_move_on_chain_until_the_game_ends,
    illegal_moves_are_refused_with_their_reason,
    a_stale_registration_is_refuted_and_silence_forfeits,
);

/// Waits until `ch` has an event matching `f`.
async fn event(
    ch: &mut perun::client::EventStream,
    what: &str,
    f: impl Fn(&ChannelEvent) -> bool,
) -> ChannelEvent {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ev = ch.next().await.expect("event stream open");
            if f(&ev) {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 60 s"))
}

/// Bob stops answering when Alice is about to win: Alice forces her
/// winning move on-chain and is paid the pot.
async fn a_silent_player_is_forced_on_chain_and_the_winner_is_paid(ledger: Ledger) {
    let g = game(ledger).await;
    // X: 4, O: 0, X: 2, O: 1; Alice's 6 wins on the diagonal.
    for (who, cell) in [(0, 4), (1, 0), (0, 2), (1, 1)] {
        play(&g, who, cell).await;
    }
    let alice = &g.chans[0];
    let params = alice.params().clone();
    // Bob's client is gone: Alice's off-chain move fails.
    g.ps[1].client.shutdown().await;
    let offchain = alice
        .try_update(|s| {
            *s = TicTacToe
                .play(&params, &alice.state().state, 0, 6)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await;
    assert!(offchain.is_err(), "Bob is gone: {offchain:?}");

    let mut events = alice.events();
    let forcing = {
        let alice = alice.clone();
        let params = params.clone();
        tokio::spawn(async move {
            alice
                .force_update(|s| TicTacToe.play(&params, s, 0, 6))
                .await
        })
    };
    // Our latest state is registered first; the move waits for the refutation period.
    on_chain(&g, 4).await;
    if forcing.is_finished() {
        panic!(
            "the move must wait for the refutation period: {:?}",
            forcing.await
        );
    }
    g.ledger.advance(CHALLENGE + 1).await;
    let landed = tokio::time::timeout(Duration::from_secs(60), forcing)
        .await
        .expect("the move lands")
        .unwrap()
        .unwrap();
    assert!(landed.isFinal);
    assert_eq!(Board::decode(&landed.appData).unwrap().winner(), Some(0));
    event(&mut events, "progression", |e| {
        matches!(
            e,
            ChannelEvent::StepDone(perun::client::WatcherStep::Progress { version: 5, .. })
        )
    })
    .await;
    // A final move concludes at once; Alice withdraws the pot.
    alice
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
        .await
        .unwrap();
    let alice_addr = g.ps[0].client.address();
    assert_eq!(
        g.ledger.balance(alice_addr).await,
        g.start[0] + U256::from(STAKE),
        "the winner holds both stakes"
    );
}

/// Alice forces a move; Bob's client tells him it is his move and he
/// answers on-chain, and so on until Bob wins; both withdraw what the
/// final board says.
async fn both_players_move_on_chain_until_the_game_ends(ledger: Ledger) {
    let g = game(ledger).await;
    play(&g, 0, 4).await; // X centre, off-chain
    let (alice, bob) = (&g.chans[0], &g.chans[1]);
    let params = alice.params().clone();
    let mut bob_events = bob.events();
    let mut alice_events = alice.events();
    // On-chain: O 0 (Bob forces it), X 1, O 3, X 5, O 6: O wins the left column.
    let moves: [(usize, usize); 5] = [(1, 0), (0, 1), (1, 3), (0, 5), (1, 6)];
    let forcing = {
        let bob = bob.clone();
        let params = params.clone();
        tokio::spawn(async move { bob.force_update(|s| TicTacToe.play(&params, s, 1, 0)).await })
    };
    on_chain(&g, 1).await;
    g.ledger.advance(CHALLENGE + 1).await;
    let mut last = forcing.await.unwrap().unwrap();
    for &(who, cell) in &moves[1..] {
        // The mover's watcher says it is its move on the dispute's state.
        let events = if who == 0 {
            &mut alice_events
        } else {
            &mut bob_events
        };
        let version = last.version;
        let ev = event(
            events,
            "YourMove",
            |e| matches!(e, ChannelEvent::YourMove { state } if state.version == version),
        )
        .await;
        let ChannelEvent::YourMove { state } = ev else {
            unreachable!()
        };
        assert_eq!(state, last);
        let ch = &g.chans[who];
        last = ch
            .force_update(|s| TicTacToe.play(&params, s, who, cell))
            .await
            .unwrap();
    }
    // X: 4, 1, 5; O: 0, 3, 6: O wins the left column.
    assert!(last.isFinal);
    assert_eq!(Board::decode(&last.appData).unwrap().winner(), Some(1));
    for ch in &g.chans {
        ch.wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let (a, b) = (g.ps[0].client.address(), g.ps[1].client.address());
    assert_eq!(g.ledger.balance(a).await, g.start[0] - U256::from(STAKE));
    assert_eq!(g.ledger.balance(b).await, g.start[1] + U256::from(STAKE));
}

fn reason(e: Error) -> Illegal {
    match e {
        Error::Channel(perun::channel::Error::App(r)) => *r.downcast_ref::<Illegal>().unwrap(),
        other => panic!("expected an app reason, got {other:?}"),
    }
}

/// Out of turn, an occupied cell, after the game ended: refused before
/// anything is signed or sent, with the app's reason (a peer's proposal
/// goes through the same check before we sign, see `tests/apps_attack.rs`);
/// a move forced after the game is over is refused too.
async fn illegal_moves_are_refused_with_their_reason(ledger: Ledger) {
    let g = game(ledger).await;
    let (alice, bob) = (&g.chans[0], &g.chans[1]);
    let params = alice.params().clone();
    play(&g, 0, 4).await;
    let before = alice.state();
    // Out of turn: refused locally with the typed reason.
    let mut bad = before.state.clone();
    let mut board = Board::decode(&bad.appData).unwrap();
    board.cells[0] = Some(0);
    board.next = 1;
    bad.appData = board.encode();
    let e = alice
        .update(|s| {
            *s = State {
                version: s.version,
                ..bad.clone()
            }
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(e),
        Illegal::NotYourTurn {
            expected: 1,
            actor: 0
        }
    );
    // Occupied: Bob marks the centre.
    let mut occupied = before.state.clone();
    let mut board = Board::decode(&occupied.appData).unwrap();
    board.cells[4] = Some(1);
    board.next = 0;
    occupied.appData = board.encode();
    let e = bob
        .update(|s| {
            *s = State {
                version: s.version,
                ..occupied.clone()
            }
        })
        .await
        .unwrap_err();
    assert_eq!(reason(e), Illegal::Occupied(4));
    assert_eq!(alice.state(), before);
    assert_eq!(bob.state(), before);
    // Finish the game: X 4, O 0, X 2, O 1, X 6 wins.
    for (who, cell) in [(1, 0), (0, 2), (1, 1), (0, 6)] {
        play(&g, who, cell).await;
    }
    let over = alice.state();
    assert!(over.state.isFinal);
    let e = bob
        .try_update(|s| {
            *s = TicTacToe
                .play(&params, &over.state, 1, 8)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidUpdate(ref r) if r.contains("over")),
        "{e:?}"
    );
    // Forcing a move after the end: the app (through `play`) refuses it.
    let e = bob
        .force_update(|s| TicTacToe.play(&params, s, 1, 8))
        .await
        .unwrap_err();
    assert_eq!(reason(e), Illegal::GameOver);
}

/// Bob registers an old state in which he holds the pot: Alice's watcher
/// refutes it with her latest, Bob cannot progress from his old state, and
/// when he stays silent Alice's latest concludes after the window for the
/// first move: she holds the pot.
async fn a_stale_registration_is_refuted_and_silence_forfeits(ledger: Ledger) {
    let g = game(ledger).await;
    play(&g, 0, 4).await;
    let old = play(&g, 1, 0).await.state; // Bob holds the pot
    let old_signed = g.chans[1].state();
    assert_eq!(old_signed.state, old);
    let latest = play(&g, 0, 2).await.state; // Alice holds the pot
    let bob = &g.ps[1];
    bob.client.shutdown().await;
    let adj = common::bob_registers(&g.ledger, bob, &g.chans[1], old_signed).await;
    on_chain(&g, latest.version).await; // refuted by Alice's watcher
    g.ledger.advance(CHALLENGE + 1).await;
    // Bob's move on his old state: not the registered state.
    let params = g.chans[0].params().clone();
    let stale_move = TicTacToe.play(&params, &old, 1, 8);
    assert!(stale_move.is_err(), "not Bob's move on his own state");
    let from_old = {
        let mut s = TicTacToe.play(&params, &latest, 1, 8).unwrap();
        s.version = old.version + 1;
        s
    };
    let mut signed = perun::channel::SignedState::new(from_old.clone());
    let signature = signed.sign(&params, 1, bob.account.as_ref()).unwrap();
    let e = adj
        .progress(&perun::adjudicator::ProgressRequest {
            params: params.clone(),
            from: old.clone(),
            to: from_old,
            actor: 1,
            signature,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, perun::adjudicator::Error::WrongState),
        "progress from a state that is not registered: {e:?}"
    );
    // Bob stays silent through the window for the first move.
    g.ledger.advance(CHALLENGE + 1).await;
    g.chans[0]
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
        .await
        .unwrap();
    let a = g.ps[0].client.address();
    assert_eq!(g.ledger.balance(a).await, g.start[0] + U256::from(STAKE));
}
