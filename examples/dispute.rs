//! A cheating peer is refuted: Bob registers an old state in which he had
//! more; Alice's watcher registers the latest one within the challenge
//! period, concludes it and withdraws. The chain events and the balances
//! are printed.
//!
//! Run it with `cargo xtask demo dispute`. `RUST_LOG` selects log output.

use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EthFunder, SignedChannel,
    WithdrawRequest, deploy,
};
use perun::channel::{Address, Allocation, Asset, Phase, U256};
use perun::client::{
    AcceptPaymentsToMe, AcceptWithin, ChannelEvent, ChannelProposal, Client, Participant,
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

async fn client(
    anvil: &Anvil,
    config: &EthConfig,
    eth_holder: Address,
    account: LocalAccount,
    dir: &std::path::Path,
    name: &str,
) -> Res<(Client, perun::client::Opened)> {
    let url = anvil.ws_url();
    // Up to 2 ETH of our own per channel; the short challenge suits this
    // demo on a local anvil only (the default minimum is a day).
    let eth = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: eth_holder,
    };
    let two_eth = U256::from(2) * U256::from(10u64).pow(U256::from(18));
    let (accept, opened) = AcceptWithin::new([(eth, two_eth)]);
    let accept = accept.min_challenge(Duration::from_secs(CHALLENGE));
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
        .proposal_handler(Arc::new(accept))
        .update_handler(Arc::new(AcceptPaymentsToMe))
        .timeouts(perun::client::Timeouts {
            dispute_poll: Duration::from_millis(200),
            ..Default::default()
        })
        .build()
        .await?;
    Ok((client, opened))
}

fn describe(ev: &ChannelEvent) -> String {
    match ev {
        ChannelEvent::Chain(AdjudicatorEvent::Registered {
            version,
            timeout,
            state,
            ..
        }) => format!(
            "[chain]   Registered version {version} (Alice {}, Bob {}), refutable until t={timeout}",
            eth(state.outcome.balances[0][0]),
            eth(state.outcome.balances[0][1])
        ),
        ChannelEvent::Chain(AdjudicatorEvent::Concluded { version, .. }) => {
            format!("[chain]   Concluded at version {version}")
        }
        ChannelEvent::Chain(AdjudicatorEvent::Withdrawn {
            participant,
            amount,
            ..
        }) => format!("[chain]   Withdrawn {} by {participant}", eth(*amount)),
        ChannelEvent::Chain(other) => format!("[chain]   {other:?}"),
        ChannelEvent::Step(step) => format!("[watcher] {step:?} ..."),
        ChannelEvent::StepDone(step) => format!("[watcher] {step:?} done"),
        ChannelEvent::Retry {
            step,
            attempt,
            delay,
            error,
        } => format!("[watcher] {step:?} failed ({error}); try {attempt} again in {delay:?}"),
        ChannelEvent::Phase(p) => format!("[phase]   {p:?}"),
        other => format!("[watcher] {other:?}"),
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The chain connections drop when anvil stops at the end; that is expected.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,alloy_pubsub=off,alloy_transport_ws=off",
                    )
                }),
        )
        .init();

    println!("starting anvil and deploying the contracts ...");
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let deployment = deploy(&anvil.provider(&deployer).await?).await?;
    let config = EthConfig::from_deployment(&deployment);
    let (alice_acc, bob_acc) = (anvil.funded_account().await?, anvil.funded_account().await?);
    let before = (
        anvil.eth_balance(alice_acc.address()).await?,
        anvil.eth_balance(bob_acc.address()).await?,
    );

    let dir = tempfile::tempdir()?;
    let (alice, _) = client(
        &anvil,
        &config,
        deployment.eth_holder,
        alice_acc.clone(),
        dir.path(),
        "alice",
    )
    .await?;
    let (bob, mut bob_opened) = client(
        &anvil,
        &config,
        deployment.eth_holder,
        bob_acc.clone(),
        dir.path(),
        "bob",
    )
    .await?;
    for addr in bob.listen_addrs().await? {
        alice.add_peer(bob.peer_id(), addr).await?;
    }
    let deposit = U256::from(10u64).pow(U256::from(18));
    let proposal = ChannelProposal::payment(
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
        Allocation::new(
            vec![Asset {
                chainId: U256::from(CHAIN_ID),
                holder: deployment.eth_holder,
            }],
            vec![vec![deposit, deposit]],
        ),
        CHALLENGE,
    );
    let (alice_ch, bob_ch) = tokio::join!(alice.propose_channel(proposal), bob_opened.recv());
    let (alice_ch, bob_ch) = (alice_ch?, bob_ch.ok_or("bob's handler stopped")??);
    println!("channel {} open, 1 ETH each", alice_ch.id());

    let tenth = deposit / U256::from(10);
    bob_ch.pay(0, 0, tenth).await?;
    let old = bob_ch.state();
    println!(
        "Bob pays Alice 0.1 ETH (version {}); Bob keeps a copy of this state",
        old.state.version
    );
    for _ in 0..4 {
        bob_ch.pay(0, 0, tenth).await?;
    }
    let sent = bob_ch.state().state.version;
    let latest = alice_ch
        .wait_for_version(sent, Duration::from_secs(10))
        .await?;
    println!(
        "Bob pays Alice 0.4 ETH more; latest version {}: Alice {}, Bob {}",
        latest.state.version,
        eth(latest.state.outcome.balances[0][0]),
        eth(latest.state.outcome.balances[0][1])
    );

    let mut events = alice_ch.events();
    println!("\nBob goes offline and registers his old state on-chain ...");
    bob.shutdown().await;
    let cheat = EthAdjudicator::connect(&anvil.ws_url(), &bob_acc, config.clone()).await?;
    cheat
        .register(&SignedChannel {
            params: alice_ch.params().clone(),
            state: old,
        })
        .await?;

    let params = alice_ch.params().clone();
    let id = alice_ch.id();
    let watch_events = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            println!("  {}", describe(&ev));
        }
    });
    // Alice's watcher refutes on its own; wait until the chain holds her state.
    loop {
        if cheat
            .dispute(id)
            .await?
            .is_some_and(|d| d.version == latest.state.version)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "Alice's watcher refuted with version {}",
        latest.state.version
    );
    println!("\n... {CHALLENGE} s of chain time pass ...");
    anvil.increase_time(CHALLENGE + 1).await?;
    alice_ch
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(60))
        .await?;
    println!("Alice's watcher concluded the dispute and withdrew her funds");
    cheat
        .withdraw(&WithdrawRequest {
            params,
            state: latest.state.clone(),
            index: 1,
            account: Arc::new(bob_acc.clone()),
            receiver: bob_acc.address(),
        })
        .await?;
    println!("Bob withdrew what the latest state gives him");
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch_events.abort();

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
        "  Alice {}  (the latest state gives her +0.500 ETH)",
        delta(before.0, after.0)
    );
    println!(
        "  Bob   {}  (he tried for -0.100 ETH; the latest state says -0.500 ETH)",
        delta(before.1, after.1)
    );
    alice.shutdown().await;
    drop((alice_ch, bob_ch, alice, bob, cheat));
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
