//! The chain index's figures (issue 15): a full scan of `blocks` blocks
//! holding `channels` channels' events of the account (and `others` of
//! other accounts), then a rescan from the stored cursor after more blocks.
//!
//! On a fresh anvil: one `depositEth` per channel id (1 wei, its own block),
//! spread evenly over the range with `anvil_mine`, so the scan's 50 queries
//! of 2,000 blocks each meet about 20 logs each. The index keeps its cursor
//! and findings in a `RedbPersister` in the scratch directory (each save
//! fsynced), as a client's would. Then `rescan_new` more blocks (10 of them
//! with a new deposit) are mined and the index scans again from its cursor:
//! it must read exactly the new blocks and the last
//! [`IndexConfig::reread`] (64) before them.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use perun::adjudicator::bindings::AssetHolderETH;
use perun::adjudicator::{Adjudicator, EthAdjudicator};
use perun::channel::{Address, B256, U256};
use perun::client::{ChainIndex, IndexConfig};
use perun::persistence::{Persister, RedbPersister};
use perun::wallet::Account;
use serde_json::{Value, json};

use crate::Res;
use crate::setup::Chain;

/// Blocks mined after the full scan before the rescan.
const RESCAN_NEW: u64 = 1_000;
/// New deposits among them.
const RESCAN_DEPOSITS: u64 = 10;

/// Mines `n` empty blocks in one call.
async fn mine(chain: &Chain, n: u64) -> Res<()> {
    Ok(chain.anvil.mine_batch(n).await?)
}

/// The channel ids of the benchmark: distinct, not real channels (a deposit
/// needs none), `tag` apart for the account and the others.
fn channel(tag: u8, i: u64) -> B256 {
    let mut id = [0x5a; 32];
    id[0] = tag;
    id[24..].copy_from_slice(&i.to_be_bytes());
    B256::from(id)
}

/// Runs the part; returns its figures as JSON.
pub(crate) async fn measure(work: &Path, channels: u64, others: u64, blocks: u64) -> Res<Value> {
    let chain = Chain::start().await?;
    let me = Arc::new(chain.anvil.funded_account().await?);
    let other = chain.anvil.funded_account().await?;
    let holders = [
        AssetHolderETH::new(
            chain.deployment.eth_holder,
            chain.anvil.provider(&me).await?,
        ),
        AssetHolderETH::new(
            chain.deployment.eth_holder,
            chain.anvil.provider(&other).await?,
        ),
    ];
    let deposit = |who: usize, id: B256| {
        let holder = holders[who].clone();
        let participant = if who == 0 {
            me.address()
        } else {
            other.address()
        };
        async move {
            holder
                .depositEth(id, participant, U256::ZERO)
                .value(U256::from(1))
                .send()
                .await?
                .get_receipt()
                .await?;
            Res::Ok(())
        }
    };
    let start_block = chain.anvil.block_number().await?;
    let events = channels + others;
    let gap = (blocks / events.max(1)).max(1);
    // Every `stride`-th deposit is the other account's.
    let stride = events.checked_div(others).map_or(u64::MAX, |s| s.max(1));
    let (mut mine_count, mut theirs) = (0u64, 0u64);
    let t = Instant::now();
    for i in 0..events {
        if theirs < others && i % stride == stride - 1 {
            deposit(1, channel(1, i)).await?;
            theirs += 1;
        } else {
            deposit(0, channel(0, i)).await?;
            mine_count += 1;
        }
        mine(&chain, gap - 1).await?;
    }
    let head = chain.anvil.block_number().await?;
    if head < start_block + blocks {
        mine(&chain, start_block + blocks - head).await?;
    }
    let head = chain.anvil.block_number().await?;
    println!(
        "    {events} deposits over blocks {start_block}..={head} in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let store: Arc<dyn Persister> =
        Arc::new(RedbPersister::open(work.join("chain-index.redb")).await?);
    let adj: Arc<dyn Adjudicator> =
        Arc::new(EthAdjudicator::connect(&chain.anvil.ws_url(), &me, chain.config.clone()).await?);
    let index = ChainIndex::new(adj, store, me.clone(), IndexConfig::default())?;
    let t = Instant::now();
    let view = index.scan().await?;
    let scan_ms = t.elapsed().as_secs_f64() * 1e3;
    let found = view.channels.len() as u64;
    if found != mine_count {
        return Err(format!("the scan found {found} channels, expected {mine_count}").into());
    }
    let full = view.scan.clone();

    for i in 0..RESCAN_DEPOSITS {
        deposit(0, channel(2, i)).await?;
        mine(&chain, RESCAN_NEW / RESCAN_DEPOSITS - 1).await?;
    }
    let t = Instant::now();
    let view = index.scan().await?;
    let rescan_ms = t.elapsed().as_secs_f64() * 1e3;
    let new_blocks = view.scan.to - full.to;
    let reread = IndexConfig::default().reread;
    if view.scan.blocks_read != new_blocks + reread {
        return Err(format!(
            "the rescan read {} blocks, not the {new_blocks} new ones and the last {reread}",
            view.scan.blocks_read
        )
        .into());
    }
    if view.channels.len() as u64 != mine_count + RESCAN_DEPOSITS {
        return Err(format!("the rescan found {} channels", view.channels.len()).into());
    }
    let me_addr: Address = me.address();
    println!(
        "    full scan {scan_ms:.0} ms ({} blocks, {} queries, {found} channels of {me_addr}); rescan {rescan_ms:.1} ms ({} blocks: {new_blocks} new + {reread})",
        full.blocks_read, full.queries, view.scan.blocks_read
    );
    Ok(json!({
        "scan_ms": scan_ms,
        "blocks": full.blocks_read,
        "queries": full.queries,
        "channels": found,
        "other_deposits": theirs,
        "rescan_ms": rescan_ms,
        "rescan_blocks_read": view.scan.blocks_read,
        "rescan_new_blocks": new_blocks,
    }))
}
