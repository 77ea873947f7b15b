//! Measures what 10,000 event subscriptions of one `EthAdjudicator` cost on
//! anvil: the time of the `subscribe` calls, the time until every stream has
//! its channel's history, the resident memory they add (from
//! `/proc/self/statm`), and how long a live event then takes to arrive.
//!
//! `cargo run --release -p perun-adjudicator --features testing --example subscribe_scale [N]`

use std::time::{Duration, Instant};

use alloy_primitives::{B256, U256};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EventStream, Result, SignedChannel,
    deploy,
};
use perun_channel::{Allocation, Asset, ChannelId, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

/// Channels with an on-chain registration before the subscriptions (their history).
const REGISTERED: usize = 20;
/// Empty blocks mined before subscribing, so history queries walk some chain.
const HISTORY_BLOCKS: u64 = 2_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn next_version(events: &mut EventStream) -> Result<u64> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .map_err(|_| perun_adjudicator::Error::Anvil("no event within 60 s".into()))?
            .ok_or_else(|| perun_adjudicator::Error::Anvil("stream ended".into()))??;
        match ev {
            AdjudicatorEvent::Registered { version, .. } => return Ok(version),
            AdjudicatorEvent::CaughtUp { .. } => continue,
            other => {
                return Err(perun_adjudicator::Error::Anvil(format!(
                    "unexpected event {other:?}"
                )));
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let anvil = Anvil::spawn().await?;
    let deployer = anvil.funded_account().await?;
    let d = deploy(&anvil.provider(&deployer).await?).await?;
    let cfg = EthConfig::from_deployment(&d);
    let sender = EthAdjudicator::connect(&anvil.ws_url(), &deployer, cfg.clone()).await?;
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let sign = |params: &Params, state: &State, version: u64| -> Result<SignedChannel> {
        let mut st = state.clone();
        st.version = version;
        let mut signed = SignedState::new(st);
        for (i, p) in parties.iter().enumerate() {
            signed.sign(params, i, p)?;
        }
        Ok(SignedChannel {
            params: params.clone(),
            state: signed,
        })
    };
    let mut channels = Vec::new();
    for _ in 0..REGISTERED {
        let params = Params::payment(
            sender.domain(),
            60,
            U256::from(rand::random::<u64>()),
            parties.iter().map(|p| p.address()).collect(),
            vec![vec![U256::ZERO, U256::ZERO]],
        );
        let asset = Asset {
            chainId: U256::from(CHAIN_ID),
            holder: d.eth_holder,
        };
        let state = State::initial(
            &params,
            Allocation::new(vec![asset], vec![vec![U256::ZERO, U256::ZERO]]),
        );
        sender.register(&sign(&params, &state, 1)?).await?;
        channels.push((params, state));
    }
    anvil.mine(HISTORY_BLOCKS).await?;
    let watcher_account = anvil.funded_account().await?;
    let watcher = EthAdjudicator::connect(&anvil.ws_url(), &watcher_account, cfg).await?;

    let mut ids: Vec<ChannelId> = (0..n.saturating_sub(REGISTERED))
        .map(|_| B256::from(rand::random::<[u8; 32]>()))
        .collect();
    ids.extend(channels.iter().map(|(_, s)| s.channelId));
    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut streams = Vec::with_capacity(ids.len());
    for id in &ids {
        streams.push(watcher.subscribe(*id).await?);
    }
    let subscribed = t0.elapsed();
    // The registered channels subscribed last: once they have their history,
    // every stream before them has had its history query answered.
    let first_registered = ids.len() - REGISTERED;
    for events in &mut streams[first_registered..] {
        next_version(events).await?;
    }
    let caught_up = t0.elapsed();
    let rss_after = rss_bytes();

    let (params, state) = &channels[0];
    let t1 = Instant::now();
    sender.register(&sign(params, state, 2)?).await?;
    let live = next_version(&mut streams[first_registered]).await?;
    let live_latency = t1.elapsed();

    let grown = rss_after.saturating_sub(rss_before);
    println!("subscriptions           {}", ids.len());
    println!("history blocks          {}", HISTORY_BLOCKS + 1);
    println!("subscribe calls         {:.1} ms", ms(subscribed));
    println!("all histories delivered {:.1} ms", ms(caught_up));
    println!(
        "RSS before / after      {} / {} KiB",
        rss_before / 1024,
        rss_after / 1024
    );
    println!(
        "RSS per subscription    {} bytes",
        grown / u64::try_from(ids.len().max(1)).unwrap_or(1)
    );
    println!(
        "live event (v{live})     {:.1} ms from sending the registration",
        ms(live_latency)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}
