//! The shared event scanner on anvil: thousands of subscriptions of one
//! `EthAdjudicator` (and its clones) are served by one task; each stream gets
//! its own channel's events only, a late subscriber gets its channel's history
//! at the confirmation depth, and the task stops once every stream is gone.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use alloy_primitives::{B256, U256};
use futures_util::FutureExt;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EventStream, SignedChannel, deploy,
};
use perun_channel::{Allocation, Asset, ChannelId, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

/// A chain with the contracts and a backend that registers (trusting blocks at once).
struct Setup {
    anvil: Anvil,
    cfg: EthConfig,
    sender: EthAdjudicator,
    holder: alloy_primitives::Address,
    parties: [LocalAccount; 2],
}

async fn setup() -> Setup {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig::from_deployment(&d);
    let sender = EthAdjudicator::connect(&anvil.ws_url(), &deployer, cfg.clone())
        .await
        .unwrap();
    Setup {
        anvil,
        cfg,
        sender,
        holder: d.eth_holder,
        parties: [LocalAccount::random(), LocalAccount::random()],
    }
}

impl Setup {
    /// A backend of its own (own connection, own scanner) waiting `confirmations` blocks.
    async fn watcher(&self, confirmations: u64) -> EthAdjudicator {
        let account = self.anvil.funded_account().await.unwrap();
        let cfg = EthConfig {
            confirmations,
            ..self.cfg.clone()
        };
        EthAdjudicator::connect(&self.anvil.ws_url(), &account, cfg)
            .await
            .unwrap()
    }

    /// A fresh channel's version-0 state.
    fn channel(&self) -> (Params, State) {
        let params = Params::payment(
            60,
            U256::from(rand::random::<u64>()),
            self.parties.iter().map(|p| p.address()).collect(),
        );
        let asset = Asset {
            chainId: U256::from(CHAIN_ID),
            holder: self.holder,
        };
        let state = State::initial(
            &params,
            Allocation::new(vec![asset], vec![vec![U256::ZERO, U256::ZERO]]),
        );
        (params, state)
    }

    /// Registers the channel at `version`, signed by both parties.
    async fn register(&self, (params, state): &(Params, State), version: u64) {
        let mut st = state.clone();
        st.version = version;
        let mut signed = SignedState::new(st);
        for (i, p) in self.parties.iter().enumerate() {
            signed.sign(params, i, p).unwrap();
        }
        let req = SignedChannel {
            params: params.clone(),
            state: signed,
        };
        self.sender.register(&req).await.unwrap();
    }
}

/// The next item of a stream other than `CaughtUp`, which must be a
/// `Registered` event: (channel, version).
async fn next_registered(events: &mut EventStream) -> (ChannelId, u64) {
    next_registered_within(events, Duration::from_secs(20)).await
}

async fn next_registered_within(events: &mut EventStream, wait: Duration) -> (ChannelId, u64) {
    loop {
        let ev = tokio::time::timeout(wait, events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("no chain error");
        match ev {
            AdjudicatorEvent::Registered { id, version, .. } => return (id, version),
            AdjudicatorEvent::CaughtUp { .. } => {}
            other => panic!("expected Registered, got {other:?}"),
        }
    }
}

/// Waits for the `CaughtUp` that ends a new subscription's history.
async fn caught_up(events: &mut EventStream) {
    let ev = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("CaughtUp within 20 s")
        .expect("stream open")
        .expect("no chain error");
    assert!(
        matches!(ev, AdjudicatorEvent::CaughtUp { .. }),
        "expected CaughtUp, got {ev:?}"
    );
}

/// Whether the stream has an item other than `CaughtUp` ready now (the
/// scanner delivers one round's events to every stream in one pass, so after
/// a stream got a round's event, every other stream has its own from that
/// round too).
fn has_item(events: &mut EventStream) -> bool {
    loop {
        match events.next().now_or_never() {
            Some(Some(Ok(AdjudicatorEvent::CaughtUp { .. }))) => {}
            Some(_) => return true,
            None => return false,
        }
    }
}

/// 2,000 channels subscribed at once through one adjudicator and its clone:
/// the events of three of them reach their subscribers only (both
/// subscribers of one channel get them), a history event registered before
/// the subscription comes first, and a subscriber joining after the events
/// gets its channel's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_subscriptions_route_events_to_their_channel() {
    let s = setup().await;
    let watcher = s.watcher(0).await;
    let clone = watcher.clone();
    let (a, b, c) = (s.channel(), s.channel(), s.channel());
    let (ida, idb, idc) = (a.1.channelId, b.1.channelId, c.1.channelId);

    // History: `a` is registered before anyone subscribes.
    s.register(&a, 1).await;

    let mut ids: Vec<ChannelId> = (0..1_996)
        .map(|_| B256::from(rand::random::<[u8; 32]>()))
        .collect();
    ids.extend([ida, idb, idc, idb]);
    let subscribe = ids.iter().enumerate().map(|(i, id)| {
        // Half through the clone: both share the one scanner.
        let adj = if i % 2 == 0 { &watcher } else { &clone };
        adj.subscribe(*id)
    });
    let mut streams: Vec<EventStream> = futures_util::future::join_all(subscribe)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(streams.len(), 2_000);
    assert!(*watcher.scanner_running().borrow());

    let at = |id: ChannelId| ids.iter().position(|x| *x == id).unwrap();
    let (ia, ib, ic, ib2) = (at(ida), at(idb), at(idc), 1_999);
    assert_eq!(next_registered(&mut streams[ia]).await, (ida, 1));

    s.register(&b, 2).await;
    s.register(&c, 3).await;
    s.register(&a, 4).await;
    assert_eq!(next_registered(&mut streams[ib]).await, (idb, 2));
    assert_eq!(next_registered(&mut streams[ib2]).await, (idb, 2));
    assert_eq!(next_registered(&mut streams[ic]).await, (idc, 3));
    assert_eq!(next_registered(&mut streams[ia]).await, (ida, 4));
    for (i, events) in streams.iter_mut().enumerate() {
        assert!(
            !has_item(events),
            "stream {i} got an event of another channel"
        );
    }

    // Late subscribers get the whole history, then `CaughtUp`, then live events.
    let mut late_b = clone.subscribe(idb).await.unwrap();
    let mut late_a = watcher.subscribe(ida).await.unwrap();
    assert_eq!(next_registered(&mut late_b).await, (idb, 2));
    assert_eq!(next_registered(&mut late_a).await, (ida, 1));
    assert_eq!(next_registered(&mut late_a).await, (ida, 4));
    caught_up(&mut late_a).await;
    caught_up(&mut late_b).await;
    assert!(
        !has_item(&mut late_a) && !has_item(&mut late_b),
        "no duplicate"
    );
    s.register(&b, 5).await;
    assert_eq!(next_registered(&mut late_b).await, (idb, 5));
    assert_eq!(next_registered(&mut streams[ib]).await, (idb, 5));
    assert_eq!(next_registered(&mut streams[ib2]).await, (idb, 5));
    assert!(!has_item(&mut late_b) && !has_item(&mut streams[ib]));
}

/// With `confirmations = 2`, a late subscriber's history stops at the same
/// depth as live events: a registration one block deep is not in it, and
/// arrives (once) when it is two deep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_waits_for_the_confirmation_depth() {
    let s = setup().await;
    let watcher = s.watcher(2).await;
    let (deep, shallow) = (s.channel(), s.channel());
    s.register(&deep, 1).await;
    s.anvil.mine(2).await.unwrap();
    s.register(&shallow, 7).await;
    s.anvil.mine(1).await.unwrap();

    // `shallow` joins no later than `deep`: when `deep`'s history has arrived,
    // `shallow`'s (up to the same block) has too.
    let mut late_shallow = watcher.subscribe(shallow.1.channelId).await.unwrap();
    let mut late_deep = watcher.subscribe(deep.1.channelId).await.unwrap();
    assert_eq!(next_registered(&mut late_deep).await.1, 1);
    assert!(
        !has_item(&mut late_shallow),
        "one block deep is not deep enough"
    );

    s.anvil.mine(1).await.unwrap();
    assert_eq!(next_registered(&mut late_shallow).await.1, 7);
    s.anvil.mine(3).await.unwrap();
    // A later event of `deep` still comes through after the blocks above were scanned.
    s.register(&deep, 8).await;
    s.anvil.mine(2).await.unwrap();
    assert_eq!(next_registered(&mut late_deep).await.1, 8);
    assert!(!has_item(&mut late_shallow), "no duplicate");
}

/// Dropping every stream stops the scanner task, although the adjudicator
/// lives on; a new subscription starts it again with full history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_stream_stops_the_scanner() {
    let s = setup().await;
    let watcher = s.watcher(0).await;
    let mut running = watcher.scanner_running();
    assert!(!*running.borrow_and_update());
    let ch = s.channel();
    s.register(&ch, 1).await;

    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(
            watcher
                .subscribe(B256::from(rand::random::<[u8; 32]>()))
                .await
                .unwrap(),
        );
    }
    let mut mine = watcher.subscribe(ch.1.channelId).await.unwrap();
    assert_eq!(next_registered(&mut mine).await.1, 1);
    assert!(*running.borrow_and_update());

    drop(mine);
    drop(streams);
    tokio::time::timeout(Duration::from_secs(10), running.wait_for(|r| !*r))
        .await
        .expect("the scanner stops within 10 s")
        .unwrap();

    let mut again = watcher.subscribe(ch.1.channelId).await.unwrap();
    assert!(*watcher.scanner_running().borrow());
    assert_eq!(next_registered(&mut again).await.1, 1);
    s.register(&ch, 2).await;
    assert_eq!(next_registered(&mut again).await.1, 2);
}

/// A node that goes away (and a connection that gives up reconnecting)
/// reaches every stream as an `Err`, after which the stream ends, and the
/// scanner stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_ends_every_stream_with_an_error() {
    use alloy::providers::{Provider, ProviderBuilder, WsConnect};

    let s = setup().await;
    let ws = WsConnect::new(s.anvil.ws_url())
        .with_max_retries(1)
        .with_retry_interval(Duration::from_millis(100));
    let provider = ProviderBuilder::new().connect_ws(ws).await.unwrap();
    let reader = LocalAccount::random().address();
    let watcher = EthAdjudicator::new(provider.erased(), reader, s.cfg.clone())
        .await
        .unwrap();
    let mut running = watcher.scanner_running();
    let ch = s.channel();
    s.register(&ch, 1).await;
    let mut mine = watcher.subscribe(ch.1.channelId).await.unwrap();
    let mut other = watcher
        .subscribe(B256::from(rand::random::<[u8; 32]>()))
        .await
        .unwrap();
    assert_eq!(next_registered(&mut mine).await.1, 1);

    caught_up(&mut mine).await;
    caught_up(&mut other).await;
    drop(s);
    for events in [&mut mine, &mut other] {
        let item = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("the error within 20 s");
        assert!(matches!(item, Some(Err(_))), "{item:?}");
        assert!(
            events.next().await.is_none(),
            "the stream ends after the error"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), running.wait_for(|r| !*r))
        .await
        .expect("the scanner stops")
        .unwrap();
}
