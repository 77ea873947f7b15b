//! The tic-tac-toe game the app-channel tests play (`tests/apps*.rs`):
//! Alice (X, index 0) and Bob (O) stake `STAKE` each in a channel of the
//! tic-tac-toe app (`Ledger::tictactoe`: the contract on anvil, the Rust
//! rules on the simulated ledger).

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::Adjudicator;
use perun::channel::tictactoe::TicTacToe;
use perun::channel::{Address, Allocation, SignedState, U256};
use perun::client::{Channel, ChannelProposal};

use super::{Ledger, Options, Party, introduce, party};

pub const STAKE: u64 = 1_000;
pub const CHALLENGE: u64 = 60;

pub struct Game {
    pub ledger: Ledger,
    pub app: Address,
    pub adj: Arc<dyn Adjudicator>,
    pub ps: Vec<Party>,
    pub chans: Vec<Channel>,
    pub start: Vec<U256>,
}

pub fn app_opts(app: Address) -> Options {
    Options {
        apps: vec![(app, Arc::new(TicTacToe))],
        ..Options::default()
    }
}

/// Alice (X, index 0, `alice_opts`) and Bob (O) open a tic-tac-toe channel.
pub async fn game_with(ledger: Ledger, alice_opts: impl FnOnce(Address) -> Options) -> Game {
    let app = ledger.tictactoe().await;
    let alice = party(&ledger, U256::from(10 * STAKE), &alice_opts(app)).await;
    let bob = party(&ledger, U256::from(10 * STAKE), &app_opts(app)).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let mut start = Vec::new();
    for p in &ps {
        start.push(ledger.balance(p.client.address()).await);
    }
    let stakes = vec![vec![U256::from(STAKE), U256::from(STAKE)]];
    let mut proposal = ChannelProposal::payment(
        vec![ps[0].participant(), ps[1].participant()],
        Allocation::new(vec![ledger.asset()], stakes),
        CHALLENGE,
    );
    proposal.app = app;
    proposal.app_data = TicTacToe::initial_data(0);
    let alice = ps[0].client.propose_channel(proposal).await.unwrap();
    let bob = ps[1].accepted().await;
    let (_, adj) = ledger.backends(&ps[0].account).await;
    Game {
        ledger,
        app,
        adj,
        ps,
        chans: vec![alice, bob],
        start,
    }
}

pub async fn game(ledger: Ledger) -> Game {
    game_with(ledger, app_opts).await
}

/// `who` marks `cell` off-chain; both hold the result.
pub async fn play(g: &Game, who: usize, cell: usize) -> SignedState {
    let ch = &g.chans[who];
    let params = ch.params().clone();
    let signed = ch
        .try_update(|s| {
            *s = TicTacToe
                .play(&params, &ch.state().state, who, cell)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
        .unwrap();
    g.chans[1 - who]
        .wait_for_version(signed.state.version, Duration::from_secs(10))
        .await
        .unwrap();
    signed
}

pub async fn on_chain(g: &Game, version: u64) {
    super::on_chain_version(&g.adj, &g.chans[0], version).await;
}

/// The game after X 4, O 0, X 2, O 1: Alice's 6 wins on the diagonal.
pub async fn alice_about_to_win(
    ledger: Ledger,
    alice_opts: impl FnOnce(Address) -> Options,
) -> Game {
    let g = game_with(ledger, alice_opts).await;
    for (who, cell) in [(0, 4), (1, 0), (0, 2), (1, 1)] {
        play(&g, who, cell).await;
    }
    g
}

/// The channel's dispute version on-chain, if any.
pub async fn dispute_version(g: &Game) -> Option<u64> {
    g.adj
        .dispute(g.chans[0].id())
        .await
        .unwrap()
        .map(|d| d.version)
}

/// Waits until Alice's store holds her forced move `version` (the staged
/// state, signed by her): what a restart or a dropped caller relies on.
pub async fn move_stored(g: &Game, version: u64) {
    let id = g.chans[0].id();
    let stored = async {
        loop {
            let rec = g.ps[0].persister.load(id).await.ok().flatten();
            if rec
                .and_then(|r| r.staged)
                .is_some_and(|s| s.state.version == version)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(super::WAIT, stored)
        .await
        .expect("the forced move is stored");
}
