//! The channel event scanner against a node that limits
//! `eth_getLogs` to a block range (most hosted endpoints do: 1,000–10,000
//! blocks), as the registration feed and the chain index already assume.
//!
//! From an adversarial review: the scanner read a new subscriber's history
//! in one `eth_getLogs` from the deployment block, in the same round as the
//! live range of every other channel, and retried a failed round unchanged,
//! for ever. Once the deployment was older than the node's range limit, a
//! single new subscription (a new channel, a watcher re-subscribing, a
//! restart) made every round fail: the new subscriber never got
//! `CaughtUp`, and every channel already watched stopped getting live
//! events.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy::providers::{DynProvider, Provider, RootProvider};
use alloy::rpc::types::{Filter, Log};
use alloy::transports::{RpcError, TransportResult};
use perun_adjudicator::testing::Anvil;
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EventStream, SignedChannel, deploy,
};
use perun_channel::{Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

/// The widest `eth_getLogs` the node answers (QuickNode, Ankr, many public
/// endpoints use 1,000–10,000; the feed's own default range is 2,000).
const MAX_RANGE: u64 = 1_000;

/// A provider whose node refuses `eth_getLogs` over more than `MAX_RANGE`
/// blocks, as hosted endpoints do ("-32005 block range too large").
struct RangeLimited {
    inner: DynProvider,
    refused: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Provider for RangeLimited {
    fn root(&self) -> &RootProvider {
        self.inner.root()
    }

    async fn get_logs(&self, filter: &Filter) -> TransportResult<Vec<Log>> {
        if let (Some(from), Some(to)) = (filter.get_from_block(), filter.get_to_block())
            && to.saturating_sub(from) + 1 > MAX_RANGE
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(RpcError::ErrorResp(alloy_json_rpc::ErrorPayload {
                code: -32005,
                message: format!("block range too large: {from}..={to}, at most {MAX_RANGE}")
                    .into(),
                data: None,
            }));
        }
        self.inner.get_logs(filter).await
    }
}

async fn next_event(events: &mut EventStream, wait: Duration) -> Option<AdjudicatorEvent> {
    tokio::time::timeout(wait, events.next())
        .await
        .ok()
        .flatten()
        .map(|e| e.unwrap())
}

/// Channel X is watched (its history read while the deployment was young)
/// and gets its live events. The chain grows past the node's range limit,
/// which the live scan follows without trouble (each round reads a few
/// blocks). Then channel Y subscribes: from then on no round succeeds, and
/// X, a channel that was protected a moment ago, never hears of a
/// registration of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_new_subscription_starves_every_stream_on_a_range_limited_node() {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig {
        confirmations: Some(0),
        ..EthConfig::from_deployment(&d)
    };
    // The cheater trusts blocks at once and talks to an unlimited node.
    let sender = EthAdjudicator::connect(&anvil.ws_url(), &deployer, cfg.clone())
        .await
        .unwrap();
    // The watcher's backend talks to a range-limited node.
    let account = anvil.funded_account().await.unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let limited = RangeLimited {
        inner: anvil.provider(&account).await.unwrap(),
        refused: refused.clone(),
    }
    .erased();
    let watcher = EthAdjudicator::new(limited, account.address(), cfg.clone())
        .await
        .unwrap();

    let parties = [LocalAccount::random(), LocalAccount::random()];
    let channel = || -> (Params, State) {
        perun_adjudicator::testing::empty_channel(
            cfg.adjudicator,
            parties.iter().map(|p| p.address()).collect(),
            d.eth_holder,
        )
    };
    let register = |(params, state): &(Params, State), version: u64| {
        let mut st = state.clone();
        st.version = version;
        let mut signed = SignedState::new(st);
        for (i, p) in parties.iter().enumerate() {
            signed.sign(params, i, p).unwrap();
        }
        SignedChannel {
            params: params.clone(),
            state: signed,
        }
    };

    // X subscribes while the deployment is young: history, then CaughtUp.
    let x = channel();
    let mut xs = watcher.subscribe(x.1.channelId).await.unwrap();
    assert!(matches!(
        next_event(&mut xs, Duration::from_secs(20)).await,
        Some(AdjudicatorEvent::CaughtUp { .. })
    ));

    // The chain grows past the node's range limit, a few hundred blocks at
    // a time: the live scan keeps up with it.
    for _ in 0..4 {
        anvil.mine_batch(300).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    assert!(anvil.block_number().await.unwrap() > d.block + MAX_RANGE);

    // Control: X gets a registration of its own, live.
    sender.register(&register(&x, 1)).await.unwrap();
    match next_event(&mut xs, Duration::from_secs(20)).await {
        Some(AdjudicatorEvent::Registered { version: 1, .. }) => {}
        other => panic!("control: X's live event, got {other:?}"),
    }
    // Not asserted to be 0: a live scan starved on a loaded machine may
    // fall over 1,000 blocks behind, have one query refused and halve it.
    let refused_before_y = refused.load(Ordering::SeqCst);

    // Y subscribes (a new channel, or a watcher re-subscribing).
    let y = channel();
    let mut ys = watcher.subscribe(y.1.channelId).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Something happens in X (a refutation here; a cheater's stale
    // registration is the case that matters).
    sender.register(&register(&x, 2)).await.unwrap();
    let got = next_event(&mut xs, Duration::from_secs(20)).await;
    let y_got = next_event(&mut ys, Duration::from_secs(1)).await;
    assert!(
        matches!(got, Some(AdjudicatorEvent::Registered { version: 2, .. })),
        "X, watched and caught up, must still get its live events after Y \
         subscribed; got {got:?} (Y got {y_got:?}); eth_getLogs refused {} times: \
         the scanner retries Y's history query from the deployment block, \
         {} blocks wide, for ever, and delivers nothing to anyone meanwhile \
         ({refused_before_y} refused before Y subscribed)",
        refused.load(Ordering::SeqCst),
        anvil.block_number().await.unwrap() - d.block + 1,
    );
}
