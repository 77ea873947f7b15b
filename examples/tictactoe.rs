//! Tic-tac-toe in an app channel: Alice (X) and Bob (O) stake 0.5 ETH each
//! and play over libp2p, every move checked by the same rules off-chain
//! (`perun::channel::tictactoe`) and on-chain (`TicTacToeApp.sol`). When
//! Alice is about to win, Bob walks away; Alice forces her winning move
//! on-chain (`Channel::force_update`), the adjudicator checks it with the
//! app contract, and her watcher concludes and withdraws the pot. The
//! boards and the chain events are printed.
//!
//! Run it with `cargo xtask demo tictactoe`. `RUST_LOG` selects log output.

use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{
    AdjudicatorEvent, EthAdjudicator, EthConfig, EthFunder, deploy, deploy_tictactoe,
};
use perun::channel::tictactoe::{Board, TicTacToe};
use perun::channel::{Address, Allocation, Asset, Phase, State, U256};
use perun::client::{
    AcceptPaymentsToMe, AcceptWithin, Channel, ChannelEvent, ChannelProposal, Client, Participant,
};
use perun::persistence::RedbPersister;
use perun::wallet::{Account, LocalAccount};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const CHALLENGE: u64 = 60;

fn eth(wei: U256) -> String {
    let milli = wei / U256::from(1_000_000_000_000_000u64);
    format!(
        "{}.{:0>3} ETH",
        milli / U256::from(1000),
        milli % U256::from(1000)
    )
}

/// A player's client: knows the tic-tac-toe contract's rules and accepts
/// games of up to 1 ETH.
async fn client(
    anvil: &Anvil,
    config: &EthConfig,
    eth_asset: &Asset,
    app: Address,
    account: LocalAccount,
    dir: &std::path::Path,
    name: &str,
) -> Res<(Client, perun::client::Opened)> {
    let url = anvil.ws_url();
    let one_eth = U256::from(10u64).pow(U256::from(18));
    let (accept, opened) = AcceptWithin::new([(eth_asset.clone(), one_eth)]);
    // The short challenge suits this demo on a local anvil only.
    let accept = accept
        .min_challenge(Duration::from_secs(CHALLENGE))
        .accept_app(app);
    let client = Client::builder()
        .account(Arc::new(account.clone()))
        .funder(Arc::new(
            EthFunder::connect(&url, &account, config.clone()).await?,
        ))
        .adjudicator(Arc::new(
            EthAdjudicator::connect(&url, &account, config.clone()).await?,
        ))
        .persister(Arc::new(
            RedbPersister::open(dir.join(format!("{name}.redb"))).await?,
        ))
        .app(app, Arc::new(TicTacToe))
        .proposal_handler(Arc::new(accept))
        // In an app channel it signs every move the rules allow.
        .update_handler(Arc::new(AcceptPaymentsToMe))
        .timeouts(perun::client::Timeouts {
            dispute_poll: Duration::from_millis(200),
            ..Default::default()
        })
        .build()
        .await?;
    Ok((client, opened))
}

fn show(state: &State) {
    if let Some(board) = Board::decode(&state.appData) {
        for line in board.to_string().lines() {
            println!("      {line}");
        }
    }
    println!(
        "      version {}: Alice holds {}, Bob {}{}",
        state.version,
        eth(state.outcome.balances[0][0]),
        eth(state.outcome.balances[0][1]),
        if state.isFinal { " (final)" } else { "" }
    );
}

fn describe(ev: &ChannelEvent) -> Option<String> {
    Some(match ev {
        ChannelEvent::Chain(AdjudicatorEvent::Registered { version, .. }) => {
            format!("[chain]   Registered version {version}")
        }
        ChannelEvent::Chain(AdjudicatorEvent::Progressed { version, actor, .. }) => {
            format!("[chain]   Progressed to version {version} by participant {actor}")
        }
        ChannelEvent::Chain(AdjudicatorEvent::Concluded { version, .. }) => {
            format!("[chain]   Concluded at version {version}")
        }
        ChannelEvent::Chain(AdjudicatorEvent::Withdrawn {
            participant,
            amount,
            ..
        }) => format!("[chain]   Withdrawn {} by {participant}", eth(*amount)),
        ChannelEvent::Step(step) => format!("[watcher] {step:?} ..."),
        ChannelEvent::StepDone(step) => format!("[watcher] {step:?} done"),
        ChannelEvent::Phase(p) => format!("[phase]   {p:?}"),
        _ => return None,
    })
}

/// `who` marks `cell` off-chain; returns the new fully signed state.
async fn play(ch: &Channel, who: usize, cell: usize) -> perun::client::Result<State> {
    let params = ch.params().clone();
    let cur = ch.state().state;
    let signed = ch
        .try_update(|s| {
            *s = TicTacToe
                .play(&params, &cur, who, cell)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await?;
    Ok(signed.state)
}

#[tokio::main]
async fn main() -> Res<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The chain connections drop when anvil stops at the end; that is expected.
                tracing_subscriber::EnvFilter::new("warn,alloy_pubsub=off,alloy_transport_ws=off")
            }),
        )
        .init();

    println!("starting anvil, deploying the adjudicator and the tic-tac-toe app ...");
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let provider = anvil.provider(&deployer).await?;
    let deployment = deploy(&provider).await?;
    let app = deploy_tictactoe(&provider).await?;
    let config = EthConfig::from_deployment(&deployment);
    let eth_asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: deployment.eth_holder,
    };
    let (alice_acc, bob_acc) = (anvil.funded_account().await?, anvil.funded_account().await?);
    let before = (
        anvil.eth_balance(alice_acc.address()).await?,
        anvil.eth_balance(bob_acc.address()).await?,
    );

    let dir = tempfile::tempdir()?;
    let (alice, _) = client(
        &anvil,
        &config,
        &eth_asset,
        app,
        alice_acc.clone(),
        dir.path(),
        "alice",
    )
    .await?;
    let (bob, mut bob_opened) = client(
        &anvil,
        &config,
        &eth_asset,
        app,
        bob_acc.clone(),
        dir.path(),
        "bob",
    )
    .await?;
    for addr in bob.listen_addrs().await? {
        alice.add_peer(bob.peer_id(), addr).await?;
    }
    let stake = U256::from(10u64).pow(U256::from(18)) / U256::from(2);
    let mut proposal = ChannelProposal::payment(
        vec![
            Participant {
                address: alice.address(),
                peer: alice.peer_id(),
            },
            Participant {
                address: bob.address(),
                peer: bob.peer_id(),
            },
        ],
        Allocation::new(vec![eth_asset.clone()], vec![vec![stake, stake]]),
        CHALLENGE,
    );
    proposal.app = app;
    proposal.app_data = TicTacToe::initial_data(0);
    let (alice_ch, bob_ch) = tokio::join!(alice.propose_channel(proposal), bob_opened.recv());
    let (alice_ch, bob_ch) = (alice_ch?, bob_ch.ok_or("bob's handler stopped")??);
    println!(
        "game {} open at {app}: 0.5 ETH each, Alice is X and moves first",
        alice_ch.id()
    );
    println!("the mover holds the pot until the other answers; a win takes it, a draw refunds\n");

    for (who, cell) in [(0, 4), (1, 0), (0, 2), (1, 1)] {
        let (ch, other) = if who == 0 {
            (&alice_ch, &bob_ch)
        } else {
            (&bob_ch, &alice_ch)
        };
        let state = play(ch, who, cell).await?;
        // The other player holds it once the commit arrives.
        other
            .wait_for_version(state.version, Duration::from_secs(10))
            .await?;
        println!("  {} marks cell {cell} (off-chain):", ["Alice", "Bob"][who]);
        show(&state);
    }

    println!("\nBob sees Alice's winning move coming and walks away ...");
    bob.shutdown().await;
    match play(&alice_ch, 0, 6).await {
        Ok(_) => return Err("Bob answered after all".into()),
        Err(e) => println!("  Alice's move 6 off-chain: {e}"),
    }

    let mut events = alice_ch.events();
    let printer = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            if let Some(line) = describe(&ev) {
                println!("  {line}");
            }
        }
    });
    println!("\nAlice forces the move on-chain: her latest state is registered first ...");
    let params = alice_ch.params().clone();
    let forcing = {
        let ch = alice_ch.clone();
        tokio::spawn(async move { ch.force_update(|s| TicTacToe.play(&params, s, 0, 6)).await })
    };
    let adj = EthAdjudicator::connect(&anvil.ws_url(), &alice_acc, config.clone()).await?;
    use perun::adjudicator::Adjudicator;
    while adj.dispute(alice_ch.id()).await?.map(|d| d.version) != Some(4) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("\n... the {CHALLENGE} s refutation period passes (Bob does not refute) ...");
    anvil.increase_time(CHALLENGE + 1).await?;
    let landed = forcing.await??;
    println!("Alice's move is on-chain, checked by TicTacToeApp.validTransition:");
    show(&landed);
    alice_ch
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    printer.abort();

    let after = (
        anvil.eth_balance(alice_acc.address()).await?,
        anvil.eth_balance(bob_acc.address()).await?,
    );
    let delta = |b: U256, a: U256| {
        if a >= b {
            format!("+{}", eth(a - b))
        } else {
            format!("-{}", eth(b - a))
        }
    };
    println!("\non-chain balance changes (including gas):");
    println!(
        "  Alice {}  (she won Bob's 0.5 ETH stake)",
        delta(before.0, after.0)
    );
    println!(
        "  Bob   {}  (his stake; he walked away)",
        delta(before.1, after.1)
    );
    alice.shutdown().await;
    drop((alice_ch, bob_ch, alice, bob, adj));
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
