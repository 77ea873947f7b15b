//! A buyer pays a seller per item through the payments layer, on the real
//! contracts on a local anvil, over libp2p on 127.0.0.1, with redb stores.
//!
//! For each item the seller expects the price ([`Payments::expect`]) and
//! the buyer reserves it before the item is delivered
//! ([`Payments::reserve`]); once it is delivered the buyer sends it
//! ([`Payments::send`]; one item gets a discount, so only part of the
//! reservation is sent). One delivery fails: the buyer cancels that
//! reservation and the seller's expectation times out. The seller signs
//! only payments it expects ([`IncomingPolicy::OnlyExpected`]).
//!
//! Run it with `cargo xtask demo payments`.

use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::{Anvil, CHAIN_ID};
use perun::adjudicator::{EthAdjudicator, EthConfig, EthFunder, deploy};
use perun::channel::{Allocation, Asset, U256};
use perun::client::payments::{IncomingPolicy, Payments, PaymentsConfig};
use perun::client::{AcceptWithin, ChannelProposal, Client, Error, Participant};
use perun::persistence::RedbPersister;
use perun::wallet::LocalAccount;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// 10^-6 ETH in wei.
const MICRO: u64 = 1_000_000_000_000;

fn eth(wei: U256) -> String {
    let micro = wei / U256::from(MICRO);
    format!(
        "{}.{:0>6} ETH",
        micro / U256::from(1_000_000u64),
        micro % U256::from(1_000_000u64)
    )
}

async fn client(
    anvil: &Anvil,
    config: &EthConfig,
    account: LocalAccount,
    dir: &std::path::Path,
    name: &str,
    accept: Option<AcceptWithin>,
) -> Res<Client> {
    let url = anvil.ws_url();
    let funder = EthFunder::connect(&url, &account, config.clone()).await?;
    let adjudicator = EthAdjudicator::connect(&url, &account, config.clone()).await?;
    let persister = RedbPersister::open(dir.join(format!("{name}.redb"))).await?;
    let mut builder = Client::builder()
        .account(Arc::new(account))
        .funder(Arc::new(funder))
        .adjudicator(Arc::new(adjudicator))
        .persister(Arc::new(persister));
    if let Some(accept) = accept {
        builder = builder.proposal_handler(Arc::new(accept));
    }
    Ok(builder.build().await?)
}

#[tokio::main]
async fn main() -> Res<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("error,alloy_pubsub=off,alloy_transport_ws=off")
            }),
        )
        .init();

    println!("starting anvil on 127.0.0.1 and deploying the contracts ...");
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let deployment = deploy(&anvil.provider(&deployer).await?).await?;
    let config = EthConfig::from_deployment(&deployment);
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: deployment.eth_holder,
    };

    let dir = tempfile::tempdir()?;
    let (buyer_acc, seller_acc) = (anvil.funded_account().await?, anvil.funded_account().await?);
    let buyer = client(&anvil, &config, buyer_acc, dir.path(), "buyer", None).await?;
    // The seller deposits nothing; the 60-second challenge suits a local
    // anvil only (keep the day-long default on a real chain).
    let (accept, mut opened) = AcceptWithin::new([(asset.clone(), U256::ZERO)]);
    let accept = accept.min_challenge(Duration::from_secs(60));
    let seller = client(
        &anvil,
        &config,
        seller_acc,
        dir.path(),
        "seller",
        Some(accept),
    )
    .await?;
    for addr in seller.listen_addrs().await? {
        buyer.add_peer(seller.peer_id(), addr).await?;
    }

    let deposit = U256::from(50_000 * MICRO); // 0.05 ETH
    let proposal = ChannelProposal::payment(
        vec![
            Participant {
                address: buyer.address(),
                peer: buyer.peer_id(),
            },
            Participant {
                address: seller.address(),
                peer: seller.peer_id(),
            },
        ],
        Allocation::new(vec![asset.clone()], vec![vec![deposit, U256::ZERO]]),
        60,
    );
    let (channel, seller_channel) = tokio::join!(buyer.propose_channel(proposal), opened.recv());
    let channel = channel?;
    let seller_channel = seller_channel.ok_or("the seller's handler stopped")??;
    println!(
        "channel {} funded: the buyer deposited {}",
        channel.id(),
        eth(deposit)
    );

    let buyer_pay = Payments::new(&buyer)?;
    let seller_pay = Payments::with_config(
        &seller,
        PaymentsConfig::default().incoming(IncomingPolicy::OnlyExpected),
    )?;
    let mut incoming = seller_pay.incoming();
    let seller_id = seller.peer_id();
    let buyer_id = buyer.peer_id();

    let items = [
        ("espresso", 1_800),
        ("croissant", 2_500),
        ("newspaper", 900),
        ("juice", 3_200),
        ("muffin", 2_100),
    ];
    for (n, (item, price)) in items.into_iter().enumerate() {
        let price = U256::from(price * MICRO);
        println!("\nitem {}: {item} for {}", n + 1, eth(price));
        // The seller waits for the price; the buyer holds it before delivery.
        let paid = seller_pay.expect(buyer_id, &asset, price, Duration::from_secs(2))?;
        let held = buyer_pay.reserve(seller_id, &asset, price).await?;
        let b = &buyer_pay.balance(seller_id)[0];
        println!(
            "  buyer reserved it: spendable {}, reserved {}",
            eth(b.spendable),
            eth(b.reserved)
        );
        match item {
            "newspaper" => {
                println!("  delivery failed: the buyer cancels the reservation");
                buyer_pay.cancel(held);
                match paid.await {
                    Err(Error::NotReceived { expected, arrived }) => println!(
                        "  the seller's expectation timed out: expected {}, arrived {}",
                        eth(expected),
                        eth(arrived)
                    ),
                    other => return Err(format!("the seller got {other:?}").into()),
                }
            }
            _ => {
                // The juice was warm: 20 % off, the rest of the reservation is released.
                let amount = if item == "juice" {
                    price * U256::from(8) / U256::from(10)
                } else {
                    price
                };
                let sent = buyer_pay.send(held, amount).await;
                match (sent, item) {
                    (Ok(s), _) => println!(
                        "  delivered; the buyer paid {} (state version {})",
                        eth(s.amount),
                        s.version
                    ),
                    (Err(e), _) => return Err(e.into()),
                }
                if amount < price {
                    // Only the discounted amount arrives: the seller adjusts its expectation.
                    drop(paid);
                    let got = incoming.next().await.ok_or("no incoming payment")?;
                    println!(
                        "  the seller received {} (a discount; its expectation is dropped)",
                        eth(got.amount)
                    );
                } else {
                    let got = paid.await?;
                    let p = incoming.next().await.ok_or("no incoming payment")?;
                    println!(
                        "  the seller's expected {} arrived (version {})",
                        eth(got.amount),
                        p.version
                    );
                }
            }
        }
    }

    let b = &buyer_pay.balance(seller_id)[0];
    println!(
        "\nbuyer's books: spendable {}, reserved {}, open reservations {}",
        eth(b.spendable),
        eth(b.reserved),
        buyer_pay.open_reservations()
    );
    let s = &seller_pay.balance(buyer_id)[0];
    println!(
        "seller's books: spendable {}, the buyer can still pay {}",
        eth(s.spendable),
        eth(s.receivable)
    );

    println!("\nsettling cooperatively ...");
    let before = anvil.eth_balance(seller.address()).await?;
    channel.settle().await?;
    seller_channel.settle().await?;
    let after = anvil.eth_balance(seller.address()).await?;
    let fin = channel.state().state.outcome.balances[0].clone();
    println!("final state: buyer {}, seller {}", eth(fin[0]), eth(fin[1]));
    // The buyer's `concludeFinal` pushes both payouts; the seller sends no transaction.
    println!(
        "the seller's account on-chain: {} -> {}",
        eth(before),
        eth(after)
    );
    buyer.shutdown().await;
    seller.shutdown().await;
    Ok(())
}
