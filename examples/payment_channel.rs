//! Alice and Bob open a payment channel over libp2p on 127.0.0.1, backed
//! by the real contracts on a local anvil; Alice pays Bob 1,000 times off
//! chain, they settle cooperatively, and the on-chain balances are printed.
//!
//! Run it with `cargo xtask demo` (which installs anvil first). `RUST_LOG`
//! selects log output, e.g. `RUST_LOG=perun_client=debug`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{EthAdjudicator, EthConfig, EthFunder, deploy};
use perun::channel::{Address, Allocation, Asset, U256};
use perun::client::{AcceptPaymentsToMe, AcceptWithin, ChannelProposal, Client, Participant};
use perun::persistence::RedbPersister;
use perun::wallet::{Account, LocalAccount};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PAYMENTS: u64 = 1_000;

fn eth(wei: U256) -> String {
    let gwei = wei / U256::from(1_000_000_000u64);
    let whole = gwei / U256::from(1_000_000_000u64);
    let frac = gwei % U256::from(1_000_000_000u64);
    format!("{whole}.{frac:0>9} ETH")
}

async fn client(
    anvil: &Anvil,
    config: &EthConfig,
    eth_holder: Address,
    account: LocalAccount,
    dir: &std::path::Path,
    name: &str,
) -> Res<(Client, Option<perun::client::Opened>)> {
    let url = anvil.ws_url();
    let funder = EthFunder::connect(&url, &account, config.clone()).await?;
    let adjudicator = EthAdjudicator::connect(&url, &account, config.clone()).await?;
    let persister = RedbPersister::open(dir.join(format!("{name}.redb"))).await?;
    // Bob accepts up to 2 ETH of his own in a channel; the 60-second
    // challenge suits this demo on a local anvil only: keep the day-long
    // default (`AcceptWithin::DEFAULT_MIN_CHALLENGE`) on a real chain.
    let eth = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: eth_holder,
    };
    let (accept, opened) =
        AcceptWithin::new([(eth, U256::from(2) * U256::from(10u64).pow(U256::from(18)))]);
    let accept = accept.min_challenge(Duration::from_secs(60));
    let builder = Client::builder()
        .account(Arc::new(account))
        .funder(Arc::new(funder))
        .adjudicator(Arc::new(adjudicator))
        .persister(Arc::new(persister));
    let (builder, opened) = if name == "bob" {
        (
            builder
                .proposal_handler(Arc::new(accept))
                .update_handler(Arc::new(AcceptPaymentsToMe)),
            Some(opened),
        )
    } else {
        (builder, None)
    };
    Ok((builder.build().await?, opened))
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

    println!("starting anvil on 127.0.0.1 and deploying the contracts ...");
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let deployment = deploy(&anvil.provider(&deployer).await?).await?;
    let config = EthConfig::from_deployment(&deployment);
    println!("  adjudicator {}", deployment.adjudicator);
    println!("  ETH holder  {}", deployment.eth_holder);

    let (alice_acc, bob_acc) = (anvil.funded_account().await?, anvil.funded_account().await?);
    let (alice_addr, bob_addr) = (alice_acc.address(), bob_acc.address());
    let before = (
        anvil.eth_balance(alice_addr).await?,
        anvil.eth_balance(bob_addr).await?,
    );
    println!("\non-chain balances before:");
    println!("  Alice {alice_addr}: {}", eth(before.0));
    println!("  Bob   {bob_addr}: {}", eth(before.1));

    let dir = tempfile::tempdir()?;
    let (alice, _) = client(
        &anvil,
        &config,
        deployment.eth_holder,
        alice_acc,
        dir.path(),
        "alice",
    )
    .await?;
    let (bob, bob_opened) = client(
        &anvil,
        &config,
        deployment.eth_holder,
        bob_acc,
        dir.path(),
        "bob",
    )
    .await?;
    let mut bob_opened = bob_opened.ok_or("bob accepts channels")?;
    for addr in bob.listen_addrs().await? {
        alice.add_peer(bob.peer_id(), addr).await?;
    }
    println!(
        "\nAlice {} and Bob {} talk over libp2p",
        alice.peer_id(),
        bob.peer_id()
    );

    let deposit = U256::from(10u64).pow(U256::from(18)); // 1 ETH each
    let proposal = ChannelProposal::payment(
        vec![
            Participant {
                address: alice_addr,
                peer: alice.peer_id(),
            },
            Participant {
                address: bob_addr,
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
        60,
    );
    let started = Instant::now();
    let (alice_ch, bob_ch) = tokio::join!(alice.propose_channel(proposal), bob_opened.recv());
    let alice_ch = alice_ch?;
    let bob_ch = bob_ch.ok_or("bob's handler stopped")??;
    println!(
        "channel {} open and funded with {} each in {:?}",
        alice_ch.id(),
        eth(deposit),
        started.elapsed()
    );

    let price = U256::from(10u64).pow(U256::from(14)); // 0.0001 ETH
    let started = Instant::now();
    for i in 1..=PAYMENTS {
        alice_ch.pay(1, 0, price).await?;
        if i % 100 == 0 {
            println!(
                "  {i:>5} payments, state version {}",
                alice_ch.state().state.version
            );
        }
    }
    let took = started.elapsed();
    println!(
        "{PAYMENTS} payments in {took:?} ({:.0} updates/s, durable on both sides)",
        PAYMENTS as f64 / took.as_secs_f64()
    );
    // Bob stores each state right after Alice's `pay` returns.
    let last = alice_ch.state().state.version;
    let st = bob_ch
        .wait_for_version(last, Duration::from_secs(10))
        .await?
        .state;
    println!(
        "Bob's view: version {}, Alice {} / Bob {}",
        st.version,
        eth(st.outcome.balances[0][0]),
        eth(st.outcome.balances[0][1])
    );

    println!("\nsettling cooperatively (final state, concludeFinal, withdraw) ...");
    alice_ch.settle().await?;
    bob_ch.settle().await?;
    let fin = alice_ch.state().state;
    let after = (
        anvil.eth_balance(alice_addr).await?,
        anvil.eth_balance(bob_addr).await?,
    );
    let delta = |b: U256, a: U256| {
        if a >= b {
            format!("+{}", eth(a - b))
        } else {
            format!("-{}", eth(b - a))
        }
    };
    println!("\non-chain balances after:");
    println!("  Alice: {} ({})", eth(after.0), delta(before.0, after.0));
    println!("  Bob:   {} ({})", eth(after.1), delta(before.1, after.1));
    println!(
        "the channel moved {} from Alice to Bob (final state: Alice {}, Bob {}); the rest of each change is gas",
        eth(fin.outcome.balances[0][1] - deposit),
        eth(fin.outcome.balances[0][0]),
        eth(fin.outcome.balances[0][1])
    );
    // Close the clients (and their chain connections) before anvil stops.
    alice.shutdown().await;
    bob.shutdown().await;
    drop((alice_ch, bob_ch, alice, bob));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(anvil);
    Ok(())
}
