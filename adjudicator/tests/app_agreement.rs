//! The Rust tic-tac-toe rules (`perun_channel::tictactoe::TicTacToe`) and the
//! deployed `TicTacToeApp` agree on every move of a few thousand random games:
//! both accept, or both reject for the same reason.
//!
//! Games come from a seeded proptest runner: legal moves mixed with illegal
//! ones (out of turn, an occupied cell, several or no changes, the wrong
//! mark, next actor, outcome or final flag, malformed data, a third
//! participant, moves after the game ended). A legal move (by the Rust
//! verdict) advances the game. The seed is printed; replay a run with
//! `AGREEMENT_SEED=<seed>`, and change its size with `AGREEMENT_GAMES=<n>`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use alloy_primitives::{Address, Bytes, U256};
use futures_util::StreamExt;
use perun_adjudicator::bindings::TicTacToeApp;
use perun_adjudicator::eth::tictactoe_reason;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_channel::tictactoe::{Board, Illegal, TicTacToe};
use perun_channel::{Allocation, App, Asset, Domain, Params, State};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// One random step of a game: what to try, and the randomness it uses.
#[derive(Debug, Clone)]
struct Step {
    kind: u8,
    cell: usize,
    other: usize,
    r: u64,
}

/// One random game: its setup and the steps tried.
#[derive(Debug, Clone)]
struct GamePlan {
    /// 3 participants now and then (`Participants`), else 2.
    three: bool,
    /// One or two assets.
    assets: usize,
    /// Who moves first.
    first: usize,
    /// Version-0 balances (also the funding), one row per asset; now and then huge.
    balances: Vec<[u64; 2]>,
    huge: bool,
    steps: Vec<Step>,
}

fn plan() -> impl Strategy<Value = GamePlan> {
    let step =
        (0u8..24, 0usize..9, 0usize..9, any::<u64>()).prop_map(|(kind, cell, other, r)| Step {
            kind,
            cell,
            other,
            r,
        });
    (
        prop::bool::weighted(0.03),
        1usize..=2,
        0usize..2,
        prop::collection::vec(any::<[u64; 2]>(), 2),
        prop::bool::weighted(0.02),
        prop::collection::vec(step, 1..14),
    )
        .prop_map(|(three, assets, first, balances, huge, steps)| GamePlan {
            three,
            assets,
            first,
            balances: balances
                .into_iter()
                .map(|[x, y]| [x % 1_000, y % 1_000])
                .collect(),
            huge,
            steps,
        })
}

/// One move to check: the game and step it comes from, for the report.
#[derive(Debug, Clone)]
struct Case {
    game: usize,
    step: usize,
    kind: u8,
    params: Params,
    from: State,
    to: State,
    actor: usize,
    rust: Result<(), Illegal>,
}

fn setup(p: &GamePlan, app: Address) -> (Params, State) {
    let domain = Domain {
        chain_id: U256::from(CHAIN_ID),
        adjudicator: Address::repeat_byte(0xad),
    };
    let n = if p.three { 3 } else { 2 };
    let rows: Vec<Vec<U256>> = (0..p.assets)
        .map(|i| {
            let mut row: Vec<U256> = p.balances[i].iter().map(|b| U256::from(*b)).collect();
            if p.huge && i == p.assets - 1 {
                row[0] = U256::MAX;
                row[1] = U256::from(1);
            }
            row.resize(n, U256::ZERO);
            row
        })
        .collect();
    let mut params = Params::payment(
        domain,
        60,
        U256::from(7),
        (1..=n as u8).map(Address::repeat_byte).collect(),
        rows.clone(),
    );
    params.app = app;
    let assets = (0..p.assets)
        .map(|i| Asset {
            chainId: U256::from(CHAIN_ID),
            holder: Address::repeat_byte(0xa0 + i as u8),
        })
        .collect();
    let mut s0 = State::initial(&params, Allocation::new(assets, rows));
    s0.appData = TicTacToe::initial_data(p.first);
    (params, s0)
}

/// The raw bytes of a board (cells 0 empty, 1, 2), whatever `Board` would accept.
fn raw(data: &Bytes) -> Vec<u8> {
    data.to_vec()
}

/// The move `step` tries from `from`: a legal one where one exists, then mutated by its kind.
fn candidate(params: &Params, from: &State, step: &Step) -> (State, usize) {
    let cur = Board::decode(&from.appData).unwrap_or_default();
    let mut actor = cur.next;
    // The first empty cell at or after `step.cell`, else the cell itself.
    let empty = (0..9)
        .map(|k| (step.cell + k) % 9)
        .find(|c| cur.cells[*c].is_none())
        .unwrap_or(step.cell);
    let legal = TicTacToe.play(params, from, actor, empty).ok();
    let mut to = legal.clone().unwrap_or_else(|| {
        // No legal move (the game is over, three players): mark the cell anyway.
        let mut b = cur;
        b.cells[empty] = Some(actor);
        b.next = 1 - actor.min(1);
        let mut s = from.next();
        s.appData = b.encode();
        s.isFinal = b.is_over();
        s
    });
    let mut data = raw(&to.appData);
    let r = step.r;
    match step.kind {
        // Legal (or as close as the position allows).
        0..=9 => {}
        10 => {
            // Out of turn: the other player marks the cell.
            actor = 1 - cur.next;
            data[1 + empty] = actor as u8 + 1;
            data[0] = cur.next as u8;
        }
        11 => {
            // An occupied cell: any taken cell, marked by the actor.
            if let Some(c) = (0..9)
                .map(|k| (step.other + k) % 9)
                .find(|c| cur.cells[*c].is_some())
            {
                data = raw(&from.appData);
                data[1 + c] = actor as u8 + 1;
                data[0] = 1 - cur.next as u8;
            }
        }
        // Several moves: a second cell too (whatever it held, not the first).
        12 if step.other != empty => {
            data[1 + step.other] = if r.is_multiple_of(2) {
                actor as u8 + 1
            } else {
                2 - actor as u8
            };
        }
        13 => {
            // No move: the board unchanged, the turn passed.
            data = raw(&from.appData);
            data[0] = 1 - cur.next as u8;
        }
        14 => data[1 + empty] = 2 - actor as u8, // the other's mark
        15 => data[0] = (r % 3) as u8,           // the next actor 0, 1 or 2
        16 => {
            // The outcome: a balance moved, a row dropped or added, a row's length.
            let rows = &mut to.outcome.balances;
            match r % 5 {
                0 => rows[0].swap(0, 1),
                1 => rows[0][1] = rows[0][1].wrapping_add(U256::from(1 + r % 3)),
                2 => {
                    rows.pop();
                }
                3 => rows.push(vec![U256::ZERO; 2]),
                _ => {
                    if let Some(last) = rows.last_mut() {
                        last.push(U256::ZERO);
                    }
                }
            }
        }
        17 => to.isFinal = !to.isFinal,
        18 => {
            // Malformed data after the move: short, long, or a bad cell.
            match r % 3 {
                0 => {
                    data.pop();
                }
                1 => data.push(0),
                _ => data[1 + step.other] = 3 + (r % 250) as u8,
            }
        }
        19 => actor = 2 + (r % 3) as usize, // not a player
        // 20..: legal again, and the next steps continue the game.
        _ => {}
    }
    to.appData = Bytes::from(data);
    (to, actor)
}

/// The games of the plan, every move they try, with the Rust verdict.
fn cases(seed: u64, games: usize, app: Address) -> Vec<Case> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    );
    let strategy = plan();
    let mut out = Vec::new();
    for game in 0..games {
        let p = strategy.new_tree(&mut runner).unwrap().current();
        let (params, mut from) = setup(&p, app);
        for (i, step) in p.steps.iter().enumerate() {
            let (mut to, actor) = candidate(&params, &from, step);
            // Malformed data before the move, now and then.
            let mut from_used = from.clone();
            if step.kind == 20 {
                let mut d = raw(&from.appData);
                d.truncate(9);
                from_used.appData = Bytes::from(d);
            }
            to.channelId = from.channelId;
            let rust = TicTacToe
                .valid_transition(&params, &from_used, &to, actor)
                .map_err(|r| *r.downcast_ref::<Illegal>().expect("a tic-tac-toe reason"));
            let ok = rust.is_ok();
            out.push(Case {
                game,
                step: i,
                kind: step.kind,
                params: params.clone(),
                from: from_used,
                to: to.clone(),
                actor,
                rust,
            });
            if ok {
                from = to;
            }
        }
    }
    out
}

/// The contract's verdict: accepted, or its revert as the Rust reason (`None`: not one).
type Verdict = Result<(), Option<Illegal>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_solidity_rules_agree_on_random_games() {
    let seed = std::env::var("AGREEMENT_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("AGREEMENT_SEED is a u64"))
        .unwrap_or_else(rand::random);
    let games = std::env::var("AGREEMENT_GAMES")
        .ok()
        .map(|s| s.parse::<usize>().expect("AGREEMENT_GAMES is a number"))
        .unwrap_or(3_000);
    println!("app agreement: seed {seed} ({games} games); replay with AGREEMENT_SEED={seed}");

    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let provider = anvil.provider(&deployer).await.unwrap();
    let app = perun_adjudicator::deploy_tictactoe(&provider)
        .await
        .unwrap();
    let contract = TicTacToeApp::new(app, provider);

    let cases = cases(seed, games, app);
    let started = Instant::now();
    let verdicts: Vec<(usize, Verdict, Option<Bytes>)> =
        futures_util::stream::iter(cases.iter().enumerate())
            .map(|(k, c)| {
                let call = contract.validTransition(
                    (&c.params).into(),
                    (&c.from).into(),
                    (&c.to).into(),
                    U256::from(c.actor),
                );
                async move {
                    match call.call().await {
                        Ok(_) => (k, Ok(()), None),
                        Err(e) => {
                            let data = e.as_revert_data();
                            let reason = data.as_ref().and_then(|d| tictactoe_reason(d));
                            (k, Err(reason), data)
                        }
                    }
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;

    let mut accepted = 0;
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let mut mismatches = Vec::new();
    for (k, sol, data) in verdicts {
        let c = &cases[k];
        let same = match (&c.rust, &sol) {
            (Ok(()), Ok(())) => {
                accepted += 1;
                true
            }
            (Err(r), Err(Some(s))) => {
                let name = format!("{r:?}");
                let name = name
                    .split(['(', ' '])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                *reasons.entry(name).or_default() += 1;
                r == s
            }
            _ => false,
        };
        if !same {
            mismatches.push(format!(
                "game {} step {} (kind {}): rust {:?}, solidity {:?} (revert {:?})\n  from {:?}\n  to {:?}\n  actor {}",
                c.game, c.step, c.kind, c.rust, sol, data, c.from, c.to, c.actor
            ));
        }
    }
    println!(
        "app agreement: {} moves ({accepted} legal) in {:?}; rejections by reason: {reasons:?}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        mismatches.is_empty(),
        "seed {seed}: {} of {} moves disagree; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every reason must have come up, or the generator has gone blind somewhere.
    for want in [
        "Participants",
        "BadData",
        "GameOver",
        "NotYourTurn",
        "Occupied",
        "NoMove",
        "SeveralMoves",
        "WrongMark",
        "WrongNextActor",
        "WrongOutcome",
        "WrongFinal",
    ] {
        assert!(
            reasons.contains_key(want),
            "seed {seed}: no move was refused with {want}"
        );
    }
    assert!(
        accepted > cases.len() / 5,
        "seed {seed}: too few legal moves ({accepted})"
    );
}
