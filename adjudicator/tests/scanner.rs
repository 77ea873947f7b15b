//! The shared event scanner on anvil: thousands of subscriptions of one
//! `EthAdjudicator` (and its clones) are served by one task; each stream gets
//! its own channel's events only, a late subscriber gets its channel's history
//! at the confirmation depth, and the task stops once every stream is gone.
//! A lost connection (cut once, or away for longer than alloy's own
//! reconnects) ends no stream and loses no event; dropping the adjudicator
//! ends them.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use alloy_primitives::B256;
use futures_util::FutureExt;
use perun_adjudicator::testing::Anvil;
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EventStream, SignedChannel, deploy,
};
use perun_channel::{ChannelId, Params, SignedState, State};
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
            confirmations: Some(confirmations),
            ..self.cfg.clone()
        };
        EthAdjudicator::connect(&self.anvil.ws_url(), &account, cfg)
            .await
            .unwrap()
    }

    /// A fresh channel's version-0 state.
    fn channel(&self) -> (Params, State) {
        perun_adjudicator::testing::empty_channel(
            self.cfg.adjudicator,
            self.parties.iter().map(|p| p.address()).collect(),
            self.holder,
        )
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

/// A watcher connected through a relay the test can cut.
async fn watcher_behind_relay(s: &Setup) -> (perun_adjudicator::testing::Relay, EthAdjudicator) {
    let relay = s.anvil.relay().await.unwrap();
    let account = s.anvil.funded_account().await.unwrap();
    let cfg = EthConfig {
        rpc_timeout: Duration::from_secs(2),
        ..s.cfg.clone()
    };
    let watcher = EthAdjudicator::connect(&relay.ws_url(), &account, cfg)
        .await
        .unwrap();
    (relay, watcher)
}

/// A websocket cut under a running subscription: alloy reconnects, the
/// stream stays open, and the registration made meanwhile arrives on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_websocket_loses_no_event() {
    let s = setup().await;
    let (relay, watcher) = watcher_behind_relay(&s).await;
    let ch = s.channel();
    let mut events = watcher.subscribe(ch.1.channelId).await.unwrap();
    caught_up(&mut events).await;

    relay.cut();
    s.register(&ch, 1).await;
    assert_eq!(next_registered(&mut events).await, (ch.1.channelId, 1));
    s.register(&ch, 2).await;
    assert_eq!(next_registered(&mut events).await, (ch.1.channelId, 2));
    assert!(relay.accepted() >= 2, "the watcher reconnected");
    assert!(!has_item(&mut events), "no event twice");
}

/// A node away for longer than alloy's reconnects (its websocket service
/// gives up): the scanner backs off, the backend builds a new provider from
/// the URL once the node is back, and the events registered meanwhile
/// arrive on the same stream; the backend's calls work again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_for_long_is_reconnected_and_no_event_is_lost() {
    let s = setup().await;
    let (relay, watcher) = watcher_behind_relay(&s).await;
    let (a, b) = (s.channel(), s.channel());
    let mut events_a = watcher.subscribe(a.1.channelId).await.unwrap();
    caught_up(&mut events_a).await;

    relay.refuse(true);
    relay.cut();
    s.register(&a, 1).await;
    s.register(&b, 3).await;
    // Longer than alloy's reconnect attempts (about 1.5 s): its service is gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let err = watcher.dispute(a.1.channelId).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!has_item(&mut events_a), "nothing while away");
    let before = relay.accepted();

    relay.refuse(false);
    assert_eq!(
        next_registered_within(&mut events_a, Duration::from_secs(30)).await,
        (a.1.channelId, 1)
    );
    assert!(relay.accepted() > before, "a new connection");
    assert_eq!(
        watcher
            .dispute(a.1.channelId)
            .await
            .unwrap()
            .map(|d| d.version),
        Some(1)
    );
    // A new subscription on the rebuilt provider gets its history.
    let mut events_b = watcher.subscribe(b.1.channelId).await.unwrap();
    assert_eq!(next_registered(&mut events_b).await, (b.1.channelId, 3));
    s.register(&a, 2).await;
    assert_eq!(next_registered(&mut events_a).await, (a.1.channelId, 2));
}

/// Node failures never end a stream; dropping the adjudicator (every clone)
/// does, and the scanner stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_adjudicator_ends_its_streams() {
    let s = setup().await;
    let watcher = s.watcher(0).await;
    let clone = watcher.clone();
    let mut running = watcher.scanner_running();
    let ch = s.channel();
    s.register(&ch, 1).await;
    let mut mine = watcher.subscribe(ch.1.channelId).await.unwrap();
    assert_eq!(next_registered(&mut mine).await.1, 1);
    caught_up(&mut mine).await;

    drop(watcher);
    s.register(&ch, 2).await;
    assert_eq!(
        next_registered(&mut mine).await.1,
        2,
        "a clone keeps it alive"
    );
    drop(clone);
    let end = tokio::time::timeout(Duration::from_secs(10), mine.next())
        .await
        .expect("the stream ends within 10 s");
    assert!(end.is_none(), "{end:?}");
    tokio::time::timeout(Duration::from_secs(10), running.wait_for(|r| !*r))
        .await
        .expect("the scanner stops")
        .unwrap();
}
