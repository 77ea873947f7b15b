//! The registration feed on anvil (and on `SimLedger`): every `Registered` and
//! `Concluded` event of the adjudicator, whichever channel, in chain order
//! with its block and the channel's `params.nonce`; a feed restarted from a
//! stored cursor yields only newer events; a node outage (behind
//! `RpcProxy`) is survived without losing or repeating an event.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use alloy_primitives::{Address, U256};
use perun_adjudicator::bindings::AssetHolderETH;
use perun_adjudicator::testing::{Anvil, RpcProxy};
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, FeedItem, RegistrationFeed,
    SignedChannel, SimLedger, deploy,
};
use perun_channel::{ChannelId, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};
use rand::RngCore;

struct Setup {
    anvil: Anvil,
    cfg: EthConfig,
    sender: EthAdjudicator,
    deployer: LocalAccount,
    holder: Address,
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
        deployer,
        holder: d.eth_holder,
        parties: [LocalAccount::random(), LocalAccount::random()],
    }
}

/// A channel with a full 256-bit random nonce and its version-0 state.
fn channel(s: &Setup) -> (Params, State) {
    let (mut params, state) = perun_adjudicator::testing::empty_channel(
        s.cfg.adjudicator,
        s.parties.iter().map(|p| p.address()).collect(),
        s.holder,
    );
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce[0] |= 0x80; // Above 2^255: no narrower type could carry it.
    params.nonce = U256::from_be_bytes(nonce);
    let state = State::initial(&params, state.outcome);
    (params, state)
}

fn signed(s: &Setup, (params, state): &(Params, State), version: u64, fin: bool) -> SignedChannel {
    let mut st = state.clone();
    st.version = version;
    st.isFinal = fin;
    let mut signed = SignedState::new(st);
    for (i, p) in s.parties.iter().enumerate() {
        signed.sign(params, i, p).unwrap();
    }
    SignedChannel {
        params: params.clone(),
        state: signed,
    }
}

impl Setup {
    /// Registers `version`; returns the block it was mined in (anvil mines one
    /// block per transaction, and nothing else is sent meanwhile).
    async fn register(&self, ch: &(Params, State), version: u64) -> u64 {
        self.sender
            .register(&signed(self, ch, version, false))
            .await
            .unwrap();
        self.anvil.block_number().await.unwrap()
    }

    /// Concludes the channel (final and fully signed: at once; else the registered state).
    async fn conclude(&self, ch: &(Params, State), version: u64, fin: bool) -> u64 {
        self.sender
            .conclude(&signed(self, ch, version, fin))
            .await
            .unwrap();
        self.anvil.block_number().await.unwrap()
    }

    /// A deposit into a channel that is never disputed: a holder's event, not the feed's.
    async fn deposit(&self, id: ChannelId) {
        let p = self.anvil.provider(&self.deployer).await.unwrap();
        AssetHolderETH::new(self.holder, p)
            .depositEth(id, self.parties[0].address(), U256::ZERO)
            .value(U256::from(1_000))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    }

    /// A backend of its own for the feed, connected to `url`.
    async fn watcher(&self, url: &str, rpc_timeout: Duration) -> EthAdjudicator {
        let account = self.anvil.funded_account().await.unwrap();
        let cfg = EthConfig {
            confirmations: Some(0),
            rpc_timeout,
            ..self.cfg.clone()
        };
        EthAdjudicator::connect(url, &account, cfg).await.unwrap()
    }
}

/// What a feed delivered up to a `Scanned` mark at or past a block.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<(u64, AdjudicatorEvent)>,
    scanned: Vec<u64>,
    retries: usize,
}

/// Reads the feed until it has scanned `block`.
async fn read_until(feed: &mut RegistrationFeed, block: u64, wait: Duration) -> Seen {
    let mut seen = Seen::default();
    tokio::time::timeout(wait, async {
        loop {
            match feed.next().await {
                FeedItem::Event { block, event } => seen.events.push((block, event)),
                FeedItem::Scanned { block: b } => {
                    if let Some(last) = seen.scanned.last() {
                        assert!(b > *last, "marks go forward: {b} after {last}");
                    }
                    seen.scanned.push(b);
                    if b >= block {
                        return;
                    }
                }
                FeedItem::Reorged { from } => panic!("no reorg here (from {from})"),
                FeedItem::Retrying { error, .. } => {
                    assert!(error.is_transient(), "{error}");
                    seen.retries += 1;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the feed scanned block {block} in time; got {seen:?}"));
    seen
}

/// (block, channel, version, nonce) of `Registered`, (block, channel, version) of `Concluded`.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Reg(u64, ChannelId, u64, U256),
    Con(u64, ChannelId, u64),
}

fn summary(seen: &Seen) -> Vec<Got> {
    seen.events
        .iter()
        .map(|(block, e)| match e {
            AdjudicatorEvent::Registered {
                id,
                version,
                nonce,
                state,
                ..
            } => {
                assert_eq!(state.channelId, *id);
                assert_eq!(state.version, *version);
                Got::Reg(*block, *id, *version, *nonce)
            }
            AdjudicatorEvent::Concluded { id, version } => Got::Con(*block, *id, *version),
            other => panic!("the feed yields disputes only, got {other:?}"),
        })
        .collect()
}

/// Twelve channels, all funded (deposit events at the holder), four of them
/// disputed in every way (registered; refuted; registered and concluded
/// after the timeout; concluded final at once): the feed yields exactly
/// their events, in chain order, each with its block and the channel's
/// 256-bit nonce, over ranges of three blocks; a feed restarted after the
/// stored cursor yields only the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_yields_every_dispute_once_with_nonce_and_block_and_restarts_from_a_cursor() {
    let s = setup().await;
    let start = s.anvil.block_number().await.unwrap();
    let chans: Vec<_> = (0..12).map(|_| channel(&s)).collect();
    for ch in &chans {
        s.deposit(ch.1.channelId).await;
    }
    let (a, b, c, d) = (&chans[2], &chans[5], &chans[7], &chans[11]);
    let nonce = |ch: &(Params, State)| ch.0.nonce;
    let id = |ch: &(Params, State)| ch.1.channelId;
    let mut want = Vec::new();
    let blk = s.register(a, 1).await;
    want.push(Got::Reg(blk, id(a), 1, nonce(a)));
    let blk = s.register(b, 4).await;
    want.push(Got::Reg(blk, id(b), 4, nonce(b)));
    let blk = s.register(a, 2).await;
    want.push(Got::Reg(blk, id(a), 2, nonce(a)));
    let blk = s.conclude(c, 3, true).await;
    want.push(Got::Con(blk, id(c), 3));
    s.anvil.increase_time(61).await.unwrap();
    let blk = s.conclude(b, 4, false).await;
    want.push(Got::Con(blk, id(b), 4));
    let blk = s.register(d, 7).await;
    want.push(Got::Reg(blk, id(d), 7, nonce(d)));
    let head = s.anvil.block_number().await.unwrap();

    let watcher = s.watcher(&s.anvil.ws_url(), Duration::from_secs(20)).await;
    let mut feed = watcher.registrations_in_ranges(start, 3);
    let seen = read_until(&mut feed, head, Duration::from_secs(30)).await;
    assert_eq!(summary(&seen), want);
    assert!(
        seen.scanned.len() >= 6,
        "ranges of 3 blocks: {:?}",
        seen.scanned
    );
    assert_eq!(seen.retries, 0);
    // The nonce really is the params' nonce: it gives back the channel id.
    for ch in [a, b, d] {
        let mut p = ch.0.clone();
        p.nonce = seen
            .events
            .iter()
            .find_map(|(_, e)| match e {
                AdjudicatorEvent::Registered { id, nonce, .. } if *id == ch.1.channelId => {
                    Some(*nonce)
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(p.channel_id(), ch.1.channelId);
    }

    // The caller stored `head` as its cursor; a restart from after it sees only what is newer.
    drop(feed);
    let blk = s.register(d, 8).await;
    let e = channel(&s);
    let blk2 = s.register(&e, 1).await;
    let mut feed = watcher.registrations(head + 1);
    let seen = read_until(&mut feed, blk2, Duration::from_secs(30)).await;
    assert_eq!(
        summary(&seen),
        vec![
            Got::Reg(blk, id(d), 8, nonce(d)),
            Got::Reg(blk2, id(&e), 1, nonce(&e))
        ]
    );
    // Live: a registration after the feed caught up arrives too.
    let f = channel(&s);
    let blk3 = s.register(&f, 3).await;
    let seen = read_until(&mut feed, blk3, Duration::from_secs(30)).await;
    assert_eq!(summary(&seen), vec![Got::Reg(blk3, id(&f), 3, nonce(&f))]);
}

/// The node goes away behind `RpcProxy` (every connection cut, requests
/// held) while channels are disputed: the feed reports `Retrying` and keeps
/// going, and once the node is back it yields every registration made
/// meanwhile, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_survives_a_node_outage() {
    let s = setup().await;
    let proxy = RpcProxy::start(&s.anvil.ws_url()).await.unwrap();
    let watcher = s.watcher(&proxy.ws_url(), Duration::from_secs(1)).await;
    let start = s.anvil.block_number().await.unwrap();
    let mut feed = watcher.registrations(start);
    let (a, b) = (channel(&s), channel(&s));
    let b1 = s.register(&a, 1).await;
    let seen = read_until(&mut feed, b1, Duration::from_secs(30)).await;
    assert_eq!(
        summary(&seen),
        vec![Got::Reg(b1, a.1.channelId, 1, a.0.nonce)]
    );

    proxy.stall(true);
    proxy.disconnect_all();
    let b2 = s.register(&b, 2).await;
    let b3 = s.register(&a, 5).await;
    // Long enough for the feed to notice (it waits up to 4 s for a header
    // first) and for the websocket service to give up reconnecting.
    let mut retries = 0;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match feed.next().await {
                FeedItem::Retrying { error, .. } => {
                    assert!(error.is_transient(), "{error}");
                    retries += 1;
                }
                other => panic!("nothing but retries while the node is away: {other:?}"),
            }
        }
    })
    .await;
    assert!(retries >= 1, "the outage was noticed");

    proxy.stall(false);
    let seen = read_until(&mut feed, b3, Duration::from_secs(60)).await;
    assert_eq!(
        summary(&seen),
        vec![
            Got::Reg(b2, b.1.channelId, 2, b.0.nonce),
            Got::Reg(b3, a.1.channelId, 5, a.0.nonce)
        ]
    );
    // Still live after the outage.
    let b4 = s.register(&b, 3).await;
    let seen = read_until(&mut feed, b4, Duration::from_secs(30)).await;
    assert_eq!(
        summary(&seen),
        vec![Got::Reg(b4, b.1.channelId, 3, b.0.nonce)]
    );
}

/// A failing `eth_getLogs` (a node refusing the query) halves the range and
/// loses nothing: once the node answers again the events come, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_retries_refused_log_queries() {
    let s = setup().await;
    let proxy = RpcProxy::start(&s.anvil.ws_url()).await.unwrap();
    let watcher = s.watcher(&proxy.ws_url(), Duration::from_secs(5)).await;
    let start = s.anvil.block_number().await.unwrap();
    let chans: Vec<_> = (0..3).map(|_| channel(&s)).collect();
    let mut want = Vec::new();
    for (i, ch) in chans.iter().enumerate() {
        let blk = s.register(ch, i as u64 + 1).await;
        want.push(Got::Reg(blk, ch.1.channelId, i as u64 + 1, ch.0.nonce));
    }
    proxy.block_method("eth_getLogs", true);
    let mut feed = watcher.registrations(start);
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(20), feed.next())
            .await
            .unwrap()
        {
            FeedItem::Retrying { .. } => {}
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    proxy.block_method("eth_getLogs", false);
    let head = s.anvil.block_number().await.unwrap();
    let seen = read_until(&mut feed, head, Duration::from_secs(30)).await;
    assert_eq!(summary(&seen), want);
}

/// `SimLedger`'s feed: past and live registrations and conclusions with the
/// nonce, heights as blocks, and a restart from a cursor.
#[tokio::test]
async fn sim_feed_yields_past_and_live_disputes() {
    let ledger = SimLedger::new(31337);
    let holder = Address::repeat_byte(0xee);
    ledger.add_asset(holder);
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let chan = || {
        let (mut params, state) = perun_adjudicator::testing::empty_channel(
            SimLedger::ADJUDICATOR,
            parties.iter().map(|p| p.address()).collect(),
            holder,
        );
        params.nonce = U256::MAX - U256::from(rand::thread_rng().next_u64());
        let state = State::initial(&params, state.outcome);
        (params, state)
    };
    let sign = |(params, state): &(Params, State), version: u64, fin: bool| {
        let mut st = state.clone();
        st.version = version;
        st.isFinal = fin;
        let mut signed = SignedState::new(st);
        for (i, p) in parties.iter().enumerate() {
            signed.sign(params, i, p).unwrap();
        }
        SignedChannel {
            params: params.clone(),
            state: signed,
        }
    };
    let (a, b) = (chan(), chan());
    ledger.register(&sign(&a, 1, false)).await.unwrap();
    ledger.conclude(&sign(&b, 2, true)).await.unwrap();
    let mut feed = ledger.registrations(0);
    let mut items = Vec::new();
    let cursor = loop {
        match feed.next().await {
            FeedItem::Event { block, event } => items.push((block, event)),
            FeedItem::Scanned { block } => break block,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(cursor, 2);
    assert!(matches!(&items[..], [
        (1, AdjudicatorEvent::Registered { id, version: 1, nonce, .. }),
        (2, AdjudicatorEvent::Concluded { version: 2, .. }),
    ] if *id == a.1.channelId && *nonce == a.0.nonce));

    // Live.
    let next = tokio::spawn(async move {
        let item = feed.next().await;
        (item, feed)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    ledger.register(&sign(&a, 3, false)).await.unwrap();
    let (item, _) = next.await.unwrap();
    assert!(
        matches!(
            item,
            FeedItem::Event {
                block: 3,
                event: AdjudicatorEvent::Registered { version: 3, .. }
            }
        ),
        "{item:?}"
    );

    // From the cursor: only what is newer.
    let mut feed = ledger.registrations(cursor + 1);
    let mut got = HashMap::new();
    loop {
        match feed.next().await {
            FeedItem::Event { block, event } => {
                got.insert(block, event);
            }
            FeedItem::Scanned { block } => {
                assert_eq!(block, 3);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got.len(), 1);
    assert!(matches!(
        got.get(&3),
        Some(AdjudicatorEvent::Registered { version: 3, .. })
    ));
}

/// A reorg deeper than the confirmation depth (an anvil snapshot reverted
/// under the feed): the feed notices that a block it delivered was replaced,
/// says so (`Reorged`), and yields the new chain's registration in that block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_rescans_after_a_deep_reorg() {
    let s = setup().await;
    let watcher = s.watcher(&s.anvil.ws_url(), Duration::from_secs(20)).await;
    let start = s.anvil.block_number().await.unwrap();
    let mut feed = watcher.registrations(start);
    let (a, b) = (channel(&s), channel(&s));
    let snapshot = s.anvil.snapshot().await.unwrap();
    let b1 = s.register(&a, 1).await;
    let seen = read_until(&mut feed, b1, Duration::from_secs(30)).await;
    assert_eq!(
        summary(&seen),
        vec![Got::Reg(b1, a.1.channelId, 1, a.0.nonce)]
    );

    s.anvil.revert(snapshot).await.unwrap();
    let b2 = s.register(&b, 2).await;
    assert_eq!(
        b2, b1,
        "the new chain's registration sits in the replaced block"
    );
    s.anvil.mine(2).await.unwrap();
    let mut reorged = None;
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match feed.next().await {
                FeedItem::Reorged { from } => reorged = Some(from),
                FeedItem::Event { block, event } => events.push((block, event)),
                FeedItem::Scanned { block } if block >= b2 + 2 => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the feed followed the new chain");
    assert!(reorged.is_some_and(|from| from <= b1), "{reorged:?}");
    let seen = Seen {
        events,
        ..Seen::default()
    };
    assert_eq!(
        summary(&seen),
        vec![Got::Reg(b2, b.1.channelId, 2, b.0.nonce)]
    );
}
