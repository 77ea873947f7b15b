//! An app channel's on-chain game through a flaky chain (issue 16 under the
//! faults standard): every chain call of both players may fail before or
//! after taking effect, run twice or stall, and chain events may be lost,
//! repeated, reordered or delayed. Each seeded schedule plays tic-tac-toe to
//! the end on-chain; the money invariant is checked at the end: the winner
//! holds both stakes, the loser none, nothing is created or lost.
//! `APPS_SEED=<seed>` replays one schedule.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, Options, parties};
use perun::adjudicator::testing::{FaultConfig, FaultyChain};
use perun::adjudicator::{Adjudicator, Funder};
use perun::channel::tictactoe::{Board, TicTacToe};
use perun::channel::{Allocation, Phase, State, U256};
use perun::client::{Channel, ChannelEvent, ChannelProposal, Error, MootReason};

const STAKE: u64 = 1_000;
const CHALLENGE: u64 = 60;
const SCHEDULES: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_on_chain_game_through_a_flaky_chain_pays_the_winner() {
    let seeds: Vec<u64> = match std::env::var("APPS_SEED") {
        Ok(s) => vec![s.parse().expect("APPS_SEED is a number")],
        Err(_) => (0..SCHEDULES).map(|i| 0xa990_0000 + i).collect(),
    };
    for seed in seeds {
        println!("APPS_SEED={seed}");
        tokio::time::timeout(Duration::from_secs(60), schedule(seed))
            .await
            .unwrap_or_else(|_| {
                panic!("schedule {seed} did not finish; replay with APPS_SEED={seed}")
            });
    }
}

/// Retries `force_update` through transient chain failures, as an
/// application would. A move reported moot because the dispute moved past
/// it landed after all if its state is what the chain went on from (its
/// answer was lost, its event too, and the other player answered): the
/// money check at the end tells.
async fn force(ch: &Channel, who: usize, cell: usize) -> (u64, Option<State>) {
    let params = ch.params().clone();
    for _ in 0..200 {
        match ch
            .force_update(|s| TicTacToe.play(&params, s, who, cell))
            .await
        {
            Ok(s) => return (s.version, Some(s)),
            Err(Error::MoveMoot {
                version,
                reason: MootReason::ChainMoved { registered },
            }) if registered > version => {
                println!(
                    "participant {who}: move {version} reported moot, the chain is at {registered}"
                );
                return (version, None);
            }
            Err(Error::Chain(e)) if e.is_transient() => {}
            Err(Error::RegisteredStateUnknown { .. }) => {}
            Err(e) => panic!("participant {who} forcing cell {cell}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("participant {who} could not force cell {cell}");
}

async fn your_move(events: &mut perun::client::EventStream, version: u64) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(ChannelEvent::YourMove { state }) = events.next().await
                && state.version == version
            {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no YourMove on version {version}"));
}

async fn schedule(seed: u64) {
    let ledger = Ledger::sim().await;
    let Ledger::Sim(sim) = &ledger else {
        unreachable!()
    };
    let app = ledger.tictactoe().await;
    let faulty: Arc<std::sync::Mutex<Vec<FaultyChain>>> = Arc::default();
    let (sim2, faulty2) = (sim.clone(), faulty.clone());
    let opts = Options {
        apps: vec![(app, Arc::new(TicTacToe))],
        // Lost events are caught by the periodic read: make it quick here.
        timeouts: Some(perun::client::Timeouts {
            chain_recheck: Duration::from_millis(500),
            ..common::test_timeouts(Duration::from_secs(30))
        }),
        wrap_adjudicator: Some(Box::new(move |inner: Arc<dyn Adjudicator>| {
            let funder: Arc<dyn Funder> = sim2.clone();
            // Each party draws its own schedule from the seed.
            let n = faulty2.lock().unwrap().len() as u64;
            let chain = FaultyChain::new(inner, funder, FaultConfig::chaos(seed.wrapping_add(n)));
            faulty2.lock().unwrap().push(chain.clone());
            Arc::new(chain) as Arc<dyn Adjudicator>
        })),
        ..Options::default()
    };
    let mut ps = parties(&ledger, 2, U256::from(10 * STAKE), &opts).await;
    let start = [
        ledger.balance(ps[0].client.address()).await,
        ledger.balance(ps[1].client.address()).await,
    ];
    let mut proposal = ChannelProposal::payment(
        vec![ps[0].participant(), ps[1].participant()],
        Allocation::new(
            vec![ledger.asset()],
            vec![vec![U256::from(STAKE), U256::from(STAKE)]],
        ),
        CHALLENGE,
    );
    proposal.app = app;
    proposal.app_data = TicTacToe::initial_data(0);
    let alice = ps[0].client.propose_channel(proposal).await.unwrap();
    let bob = ps[1].accepted().await;
    let chans = [alice, bob];
    let mut events = [chans[0].events(), chans[1].events()];
    // X 4 off-chain; then O 0, X 1, O 3, X 5, O 6 on-chain: O wins the left column.
    let params = chans[0].params().clone();
    let s1 = TicTacToe
        .play(&params, &chans[0].state().state, 0, 4)
        .unwrap();
    chans[0]
        .try_update(|s| {
            *s = s1.clone();
            Ok(())
        })
        .await
        .unwrap();
    chans[1]
        .wait_for_version(1, Duration::from_secs(10))
        .await
        .unwrap();
    let bob_first = {
        let bob = chans[1].clone();
        tokio::spawn(async move { force(&bob, 1, 0).await })
    };
    // The refutation period passes once Bob's registration is on-chain.
    let reader: Arc<dyn Adjudicator> = sim.clone();
    common::on_chain_version(&reader, &chans[0], 1).await;
    ledger.advance(CHALLENGE + 1).await;
    let mut last = bob_first.await.unwrap();
    for (who, cell) in [(0, 1), (1, 3), (0, 5), (1, 6)] {
        println!(
            "seed {seed}: version {} on-chain; participant {who} to mark {cell}",
            last.0
        );
        your_move(&mut events[who], last.0).await;
        last = force(&chans[who], who, cell).await;
    }
    println!("seed {seed}: game over at version {}", last.0);
    if let Some(last) = last.1 {
        assert!(last.isFinal);
        assert_eq!(Board::decode(&last.appData).unwrap().winner(), Some(1));
    }
    for ch in &chans {
        ch.wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let injected: u64 = faulty
        .lock()
        .unwrap()
        .iter()
        .map(FaultyChain::faults_injected)
        .sum();
    let end = [
        ledger.balance(ps[0].client.address()).await,
        ledger.balance(ps[1].client.address()).await,
    ];
    println!("seed {seed}: {injected} faults injected");
    assert_eq!(
        end[0],
        start[0] - U256::from(STAKE),
        "seed {seed}: Alice lost her stake"
    );
    assert_eq!(
        end[1],
        start[1] + U256::from(STAKE),
        "seed {seed}: Bob won the pot"
    );
    for p in ps.drain(..) {
        p.client.shutdown().await;
    }
}
