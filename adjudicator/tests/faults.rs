//! `FaultyChain` over `SimLedger`: the schedule is a function of the seed,
//! injected failures are transient, fail-after takes effect, event faults
//! happen at their rates, and switched off the wrapper is transparent.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::{Address, U256};
use async_trait::async_trait;
use perun_adjudicator::testing::{EventPlan, FaultConfig, FaultyChain};
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, Dispute, Error, EventStream, Funder, FundingRequest, Result,
    RpcFailure, SignedChannel, SimLedger, WithdrawRequest,
};
use perun_channel::{Allocation, Asset, ChannelId, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

const CHAIN: u64 = 1337;

/// A ledger with one asset and a two-party channel funded by nobody yet.
struct Fixture {
    ledger: SimLedger,
    params: Params,
    state: State,
    parties: [LocalAccount; 2],
}

impl Fixture {
    fn new() -> Self {
        let ledger = SimLedger::new(CHAIN);
        let eth = Address::repeat_byte(0xee);
        ledger.add_asset(eth);
        let parties = [LocalAccount::random(), LocalAccount::random()];
        for p in &parties {
            ledger.mint(eth, p.address(), U256::from(1_000));
        }
        let params = Params::payment(
            ledger.domain(),
            3_600,
            U256::from(rand::random::<u64>()),
            parties.iter().map(|p| p.address()).collect(),
            vec![vec![U256::from(10); 2]],
        );
        let asset = Asset {
            chainId: U256::from(CHAIN),
            holder: eth,
        };
        let state = State::initial(
            &params,
            Allocation::new(vec![asset], vec![vec![U256::from(10); 2]]),
        );
        Self {
            ledger,
            params,
            state,
            parties,
        }
    }

    fn id(&self) -> ChannelId {
        self.state.channelId
    }

    /// The channel's state at `version`, signed by both.
    fn signed(&self, version: u64, is_final: bool) -> SignedChannel {
        let mut state = self.state.clone();
        state.version = version;
        state.isFinal = is_final;
        let mut signed = SignedState::new(state);
        for (i, p) in self.parties.iter().enumerate() {
            signed.sign(&self.params, i, p).unwrap();
        }
        SignedChannel {
            params: self.params.clone(),
            state: signed,
        }
    }

    /// Registers versions `1..=n` on the ledger itself: `n` events of history.
    async fn history(&self, n: u64) {
        for v in 1..=n {
            self.ledger.register(&self.signed(v, false)).await.unwrap();
        }
    }

    fn chain(&self, config: FaultConfig) -> FaultyChain {
        FaultyChain::wrap(self.ledger.clone(), config)
    }
}

/// The injected failure `n` of `op`, or a panic naming what came instead.
fn assert_injected<T: std::fmt::Debug>(r: Result<T>, op: &str, n: u64) {
    match r {
        Err(e @ Error::Rpc { .. }) => {
            assert!(e.is_transient(), "{e}");
            match e {
                Error::Rpc {
                    op: got,
                    source: RpcFailure::Injected(k),
                } => assert_eq!((got, k), (op, n)),
                other => panic!("expected injected fault, got {other}"),
            }
        }
        other => panic!("expected injected fault #{n} of {op}, got {other:?}"),
    }
}

/// Reads a stream until it ends, failing if that takes more than a minute.
async fn drain(mut stream: EventStream) -> Vec<Result<AdjudicatorEvent>> {
    let mut items = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("stream stalled")
    {
        items.push(item);
    }
    items
}

/// Reads items until (and with) `CaughtUp`, failing on an `Err` item or an end.
async fn until_caught_up(stream: &mut EventStream) -> Vec<AdjudicatorEvent> {
    let mut events = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("stream stalled")
            .expect("stream ended")
            .unwrap();
        let done = matches!(e, AdjudicatorEvent::CaughtUp { .. });
        events.push(e);
        if done {
            return events;
        }
    }
}

fn versions(events: &[AdjudicatorEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| match e {
            AdjudicatorEvent::Registered { version, .. } => *version,
            AdjudicatorEvent::CaughtUp { .. } => 0,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn wrappers_are_shareable() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<FaultyChain>();
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<perun_adjudicator::testing::RpcProxy>();
}

#[test]
fn same_seed_same_plan() {
    let (a, b, c) = (
        FaultConfig::chaos(7),
        FaultConfig::chaos(7),
        FaultConfig::chaos(8),
    );
    let calls = |cfg: &FaultConfig| (0..2_000).map(|n| cfg.call_plan(n)).collect::<Vec<_>>();
    let events = |cfg: &FaultConfig| {
        (0..50)
            .flat_map(|s| (0..100).map(move |k| (s, k)))
            .map(|(s, k)| cfg.event_plan(s, k))
            .collect::<Vec<_>>()
    };
    assert_eq!(calls(&a), calls(&b));
    assert_eq!(events(&a), events(&b));
    assert_ne!(calls(&a), calls(&c));
    assert_ne!(events(&a), events(&c));
    // The preset injects every kind somewhere in a few thousand draws.
    let ev = events(&a);
    for kind in [
        EventPlan::Drop,
        EventPlan::Duplicate,
        EventPlan::Reorder,
        EventPlan::End,
    ] {
        assert!(ev.contains(&kind), "{kind:?} never planned");
    }
    assert!(ev.iter().any(|p| matches!(p, EventPlan::Delay(_))));
    let cs = calls(&a);
    assert!(cs.iter().any(|p| p.fail_before) && cs.iter().any(|p| p.fail_after));
    assert!(cs.iter().any(|p| p.duplicate) && cs.iter().any(|p| p.delay.is_some()));
}

/// The same calls in the same order against two wrappers with one seed give
/// the same outcomes and stats; another seed gives others.
#[tokio::test]
async fn same_seed_same_outcomes() {
    /// An outcome without the channel id (which differs between fixtures).
    fn summary<T: std::fmt::Debug>(r: &Result<T>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => format!("err {e}"),
        }
    }
    async fn run(seed: u64) -> (Vec<String>, perun_adjudicator::testing::FaultStats) {
        let fx = Fixture::new();
        let chain = fx.chain(FaultConfig {
            max_delay: Duration::from_millis(5),
            ..FaultConfig::chaos(seed)
        });
        let mut outcomes = Vec::new();
        for v in 1..=40 {
            outcomes.push(summary(&chain.register(&fx.signed(v, false)).await));
            let d = chain.dispute(fx.id()).await.map(|d| d.map(|d| d.version));
            outcomes.push(summary(&d));
        }
        let stream = loop {
            match chain.subscribe(fx.id()).await {
                Ok(stream) => break stream,
                Err(e) => outcomes.push(format!("err {e}")),
            }
        };
        for item in drain_history(stream).await {
            let item = item.map(|e| versions(&[e]));
            outcomes.push(summary(&item));
        }
        (outcomes, chain.stats())
    }
    let (a, b, c) = (run(11).await, run(11).await, run(12).await);
    assert_eq!(a, b);
    assert!(a.1.faults_injected() > 0, "{}", a.1);
    assert!(a.0.iter().any(|o| o.contains("injected fault")));
    assert_ne!(a, c);
}

/// The items a stream delivers up to its `CaughtUp` or its end (the
/// history, which is all there is: nothing is registered meanwhile).
async fn drain_history(mut stream: EventStream) -> Vec<Result<AdjudicatorEvent>> {
    let mut items = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("stream stalled")
    {
        let last = !matches!(item, Ok(AdjudicatorEvent::Registered { .. }));
        items.push(item);
        if last {
            break;
        }
    }
    items
}

#[tokio::test]
async fn fail_before_is_transient_and_does_nothing() {
    let fx = Fixture::new();
    let chain = fx.chain(FaultConfig {
        fail_before: 1.0,
        // Pre-empted by fail_before.
        fail_after: 1.0,
        duplicate: 1.0,
        ..FaultConfig::none(1)
    });
    assert_injected(chain.register(&fx.signed(1, false)).await, "register", 0);
    assert_injected(chain.dispute(fx.id()).await, "dispute", 1);
    assert_injected(chain.subscribe(fx.id()).await, "subscribe", 2);
    assert_injected(chain.conclude(&fx.signed(2, true)).await, "conclude", 3);
    let req = FundingRequest {
        params: fx.params.clone(),
        state: fx.state.clone(),
        index: 0,
        timeout: Duration::ZERO,
    };
    assert_injected(chain.fund(req).await, "fund", 4);
    assert_eq!(fx.ledger.dispute(fx.id()).await.unwrap(), None);
    let stats = chain.stats();
    assert_eq!((stats.calls, stats.failed_before), (5, 5));
    assert_eq!(stats.faults_injected(), 5, "{stats}");
}

#[tokio::test]
async fn fail_after_leaves_the_effect() {
    let fx = Fixture::new();
    let chain = fx.chain(FaultConfig {
        fail_after: 1.0,
        ..FaultConfig::none(2)
    });
    assert_injected(chain.register(&fx.signed(1, false)).await, "register", 0);
    let d = fx.ledger.dispute(fx.id()).await.unwrap().unwrap();
    assert_eq!((d.version, d.concluded), (1, false));
    // A read is never failed after the fact: it tells the truth.
    assert_eq!(chain.dispute(fx.id()).await.unwrap(), Some(d));
    // The retry of the lost answer is a no-op, and answered with an error again.
    assert_injected(chain.register(&fx.signed(1, false)).await, "register", 2);
    assert_injected(chain.conclude(&fx.signed(2, true)).await, "conclude", 3);
    assert!(fx.ledger.dispute(fx.id()).await.unwrap().unwrap().concluded);
    assert_eq!(chain.stats().failed_after, 3);
}

/// Counts the calls that reach it; subscribe and dispute go to a ledger.
struct Counting {
    calls: AtomicU64,
    ledger: SimLedger,
}

#[async_trait]
impl Adjudicator for Counting {
    fn domain(&self) -> perun_channel::Domain {
        self.ledger.domain()
    }
    async fn register(&self, _: &SignedChannel) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn progress(&self, _: &perun_adjudicator::ProgressRequest) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn conclude(&self, _: &SignedChannel) -> Result<()> {
        // The second run of a conclude sees the channel concluded.
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => Ok(()),
            _ => Err(Error::AlreadyConcluded),
        }
    }
    async fn withdraw(&self, _: &WithdrawRequest) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.ledger.subscribe(id).await
    }
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.ledger.dispute(id).await
    }
}

#[async_trait]
impl Funder for Counting {
    async fn fund(&self, _: FundingRequest) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn supports(&self, asset: &Asset) -> bool {
        self.ledger.supports(asset)
    }
}

#[tokio::test]
async fn duplicate_runs_twice_and_returns_the_first_result() {
    let fx = Fixture::new();
    let backend = Arc::new(Counting {
        calls: AtomicU64::new(0),
        ledger: fx.ledger.clone(),
    });
    let chain = FaultyChain::new(
        backend.clone(),
        backend.clone(),
        FaultConfig {
            duplicate: 1.0,
            ..FaultConfig::none(3)
        },
    );
    let calls = || backend.calls.load(Ordering::SeqCst);
    chain.conclude(&fx.signed(1, true)).await.unwrap();
    assert_eq!(calls(), 2);
    chain.register(&fx.signed(1, false)).await.unwrap();
    assert_eq!(calls(), 4);
    let req = FundingRequest {
        params: fx.params.clone(),
        state: fx.state.clone(),
        index: 0,
        timeout: Duration::ZERO,
    };
    chain.fund(req).await.unwrap();
    assert_eq!(calls(), 6);
    // The second stream is dropped; the first works.
    let mut stream = chain.subscribe(fx.id()).await.unwrap();
    assert_eq!(calls(), 8);
    assert_eq!(versions(&until_caught_up(&mut stream).await), [0]);
    // `dispute` runs once.
    chain.dispute(fx.id()).await.unwrap();
    assert_eq!(calls(), 9);
    assert_eq!(chain.stats().duplicated, 4);
}

#[tokio::test]
async fn delays_wait_up_to_the_max() {
    let fx = Fixture::new();
    let chain = fx.chain(FaultConfig {
        delay: 1.0,
        max_delay: Duration::from_millis(50),
        ..FaultConfig::none(4)
    });
    let start = std::time::Instant::now();
    for _ in 0..20 {
        chain.dispute(fx.id()).await.unwrap();
    }
    let waited = start.elapsed();
    let planned: Duration = (0..20)
        .map(|n| chain.config().call_plan(n).delay.unwrap())
        .sum();
    assert!(waited >= planned, "{waited:?} < {planned:?}");
    assert!(
        waited < planned + Duration::from_secs(2),
        "{waited:?} vs {planned:?}"
    );
    // Up to the max, spread out.
    assert!(
        planned > Duration::from_millis(100) && planned < Duration::from_millis(1_000),
        "{planned:?}"
    );
    assert_eq!(chain.stats().delayed, 20);
}

#[tokio::test]
async fn events_dropped_all() {
    let fx = Fixture::new();
    fx.history(3).await;
    let chain = fx.chain(FaultConfig {
        event_drop: 1.0,
        ..FaultConfig::none(5)
    });
    let mut stream = chain.subscribe(fx.id()).await.unwrap();
    // CaughtUp is never lost.
    assert_eq!(versions(&until_caught_up(&mut stream).await), [0]);
    fx.ledger.register(&fx.signed(4, false)).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(nothing.is_err(), "{nothing:?}");
    assert_eq!(chain.stats().events_dropped, 4);
    assert_eq!(chain.stats().events, 5);
}

#[tokio::test]
async fn events_duplicated_all() {
    let fx = Fixture::new();
    fx.history(3).await;
    let chain = fx.chain(FaultConfig {
        event_duplicate: 1.0,
        ..FaultConfig::none(6)
    });
    let mut stream = chain.subscribe(fx.id()).await.unwrap();
    assert_eq!(
        versions(&until_caught_up(&mut stream).await),
        [1, 1, 2, 2, 3, 3, 0]
    );
    fx.ledger.register(&fx.signed(4, false)).await.unwrap();
    for _ in 0..2 {
        let e = stream.next().await.unwrap().unwrap();
        assert_eq!(versions(&[e]), [4]);
    }
    assert_eq!(chain.stats().events_duplicated, 4);
}

#[tokio::test]
async fn events_reordered_all() {
    let fx = Fixture::new();
    fx.history(5).await;
    let chain = fx.chain(FaultConfig {
        event_reorder: 1.0,
        ..FaultConfig::none(7)
    });
    let mut stream = chain.subscribe(fx.id()).await.unwrap();
    // Pairs swap; the fifth is held and goes out before the CaughtUp barrier.
    assert_eq!(
        versions(&until_caught_up(&mut stream).await),
        [2, 1, 4, 3, 5, 0]
    );
    fx.ledger.register(&fx.signed(6, false)).await.unwrap();
    fx.ledger.register(&fx.signed(7, false)).await.unwrap();
    let live = [
        stream.next().await.unwrap().unwrap(),
        stream.next().await.unwrap().unwrap(),
    ];
    assert_eq!(versions(&live), [7, 6]);
    assert_eq!(chain.stats().events_reordered, 3);
}

#[tokio::test]
async fn stream_ends_with_an_injected_error() {
    let fx = Fixture::new();
    fx.history(2).await;
    let chain = fx.chain(FaultConfig {
        stream_end: 1.0,
        ..FaultConfig::none(8)
    });
    chain.dispute(fx.id()).await.unwrap();
    let items = drain(chain.subscribe(fx.id()).await.unwrap()).await;
    assert_eq!(items.len(), 1, "{items:?}");
    // The stream of call #1 ends at its first event.
    let mut items = items.into_iter();
    assert_injected(items.next().unwrap(), "subscribe", 1);
    assert_eq!(chain.stats().streams_ended, 1);
}

#[tokio::test]
async fn events_at_their_rates() {
    let fx = Fixture::new();
    let n = 400;
    fx.history(n).await;
    let cfg = FaultConfig {
        event_drop: 0.2,
        event_duplicate: 0.1,
        event_reorder: 0.1,
        event_delay: 0.1,
        max_delay: Duration::from_millis(2),
        ..FaultConfig::none(9)
    };
    let chain = fx.chain(cfg);
    let mut stream = chain.subscribe(fx.id()).await.unwrap();
    let got = versions(&until_caught_up(&mut stream).await);
    let stats = chain.stats();
    // Exactly what the plan says, which is close to the rates. CaughtUp
    // (event n) may be delayed, never lost or repeated.
    let plans: Vec<_> = (0..=n).map(|k| cfg.event_plan(0, k)).collect();
    let count = |p: EventPlan| plans[..n as usize].iter().filter(|q| **q == p).count() as u64;
    assert_eq!(stats.events, n + 1);
    assert_eq!(stats.events_dropped, count(EventPlan::Drop));
    assert_eq!(stats.events_duplicated, count(EventPlan::Duplicate));
    let delayed = plans
        .iter()
        .filter(|p| matches!(p, EventPlan::Delay(_)))
        .count() as u64;
    assert_eq!(stats.events_delayed, delayed);
    let near = |got: u64, rate: f64| (got as f64 - rate * n as f64).abs() < 0.05 * n as f64;
    assert!(near(stats.events_dropped, 0.2), "{stats}");
    assert!(near(stats.events_duplicated, 0.1), "{stats}");
    assert!(near(stats.events_delayed, 0.1), "{stats}");
    assert!(stats.events_reordered > 0, "{stats}");
    // Every event is delivered as often as planned, CaughtUp once and last.
    assert_eq!(got.last(), Some(&0));
    assert_eq!(
        got.len() as u64,
        n - stats.events_dropped + stats.events_duplicated + 1
    );
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_ne!(sorted, got, "nothing was reordered");
}

#[tokio::test]
async fn disabled_is_transparent() {
    let fx = Fixture::new();
    fx.history(3).await;
    let all = FaultConfig {
        fail_before: 1.0,
        event_drop: 1.0,
        ..FaultConfig::none(10)
    };
    let chain = fx.chain(all);
    let mut stream = chain.subscribe(fx.id()).await;
    assert!(stream.is_err());
    chain.set_enabled(false);
    assert!(!chain.is_enabled());
    stream = chain.subscribe(fx.id()).await;
    let mut stream = stream.unwrap();
    assert_eq!(versions(&until_caught_up(&mut stream).await), [1, 2, 3, 0]);
    // Clones share the switch and the stats; as trait objects they work too.
    let adj: Arc<dyn Adjudicator> = Arc::new(chain.clone());
    let funder: Arc<dyn Funder> = Arc::new(chain.clone());
    adj.register(&fx.signed(4, false)).await.unwrap();
    assert_eq!(versions(&[stream.next().await.unwrap().unwrap()]), [4]);
    let req = FundingRequest {
        params: fx.params.clone(),
        state: fx.state.clone(),
        index: 0,
        timeout: Duration::ZERO,
    };
    // Only participant 0 funds: the ledger's own timeout, not an injected fault.
    assert!(matches!(
        funder.fund(req).await,
        Err(Error::FundingTimeout { .. })
    ));
    let stats = chain.stats();
    assert_eq!((stats.calls, stats.faults_injected()), (4, 1), "{stats}");
    // On again, the open stream loses events again.
    chain.set_enabled(true);
    fx.ledger.register(&fx.signed(5, false)).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(nothing.is_err(), "{nothing:?}");
}
