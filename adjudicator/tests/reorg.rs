//! Reorgs on anvil: with `confirmations = 2`, a registration that a reorg
//! drops before it is two blocks deep is never reported, neither by the event
//! stream nor by `dispute()`; a reorg deeper than that is noticed and the
//! stream rescans the new chain instead of skipping it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use perun_adjudicator::testing::Anvil;
use perun_adjudicator::{
    Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, EventStream, SignedChannel, deploy,
};
use perun_channel::{Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

const DEPTH: u64 = 2;

/// A chain with the contracts, a cheater's backend that trusts blocks at once
/// and a watcher's backend that waits `DEPTH` blocks.
struct Setup {
    anvil: Anvil,
    cheater: EthAdjudicator,
    watcher: EthAdjudicator,
    params: Params,
    parties: [LocalAccount; 2],
    state: State,
}

async fn setup() -> Setup {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig::from_deployment(&d);
    let cheater = EthAdjudicator::connect(&anvil.ws_url(), &deployer, cfg.clone())
        .await
        .unwrap();
    let watcher_account = anvil.funded_account().await.unwrap();
    let deep = EthConfig {
        confirmations: Some(DEPTH),
        ..cfg
    };
    let watcher = EthAdjudicator::connect(&anvil.ws_url(), &watcher_account, deep)
        .await
        .unwrap();
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let (params, state) = perun_adjudicator::testing::empty_channel(
        d.adjudicator,
        parties.iter().map(|p| p.address()).collect(),
        d.eth_holder,
    );
    let s = Setup {
        anvil,
        cheater,
        watcher,
        params,
        parties,
        state,
    };
    // Enough history that `head - DEPTH` exists from the start.
    s.mine(DEPTH + 1).await;
    s
}

impl Setup {
    /// The channel's state at `version`, signed by both parties.
    fn signed(&self, version: u64) -> SignedChannel {
        let mut st = self.state.clone();
        st.version = version;
        let mut signed = SignedState::new(st);
        for (i, p) in self.parties.iter().enumerate() {
            signed.sign(&self.params, i, p).unwrap();
        }
        SignedChannel {
            params: self.params.clone(),
            state: signed,
        }
    }

    async fn mine(&self, blocks: u64) {
        self.anvil.mine(blocks).await.unwrap();
    }

    async fn head(&self) -> u64 {
        self.anvil.block_number().await.unwrap()
    }

    async fn version(&self, adj: &EthAdjudicator) -> Option<u64> {
        adj.dispute(self.state.channelId)
            .await
            .unwrap()
            .map(|d| d.version)
    }
}

/// The next `Registered` event's version (past the `CaughtUp` after the history).
async fn next_registered(events: &mut EventStream) -> u64 {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event within 20 s")
            .expect("stream open")
            .expect("no chain error");
        match ev {
            AdjudicatorEvent::Registered { version, .. } => return version,
            AdjudicatorEvent::CaughtUp { .. } => {}
            other => panic!("expected Registered, got {other:?}"),
        }
    }
}

/// `anvil_reorg` replaces the registration's block (and the one on top) with
/// empty blocks at the same heights while it is one block deep: neither the
/// stream nor `dispute()` of the waiting backend ever shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_reorg_hides_the_dropped_registration() {
    let s = setup().await;
    let id = s.state.channelId;
    let mut events = s.watcher.subscribe(id).await.unwrap();

    s.cheater.register(&s.signed(1)).await.unwrap();
    let at = s.head().await;
    assert_eq!(
        s.version(&s.cheater).await,
        Some(1),
        "at the head it is there"
    );
    s.mine(DEPTH - 1).await;
    assert_eq!(
        s.version(&s.watcher).await,
        None,
        "{} block(s) deep is not deep enough",
        DEPTH - 1
    );

    // Replace the registration's block and everything after it.
    let depth = s.head().await - at + 1;
    s.anvil.reorg(depth).await.unwrap();
    assert_eq!(
        s.head().await,
        at + depth - 1,
        "same height after the reorg"
    );
    assert_eq!(s.version(&s.cheater).await, None, "the reorg dropped it");
    s.mine(2 * DEPTH + 1).await;
    assert_eq!(s.version(&s.watcher).await, None);

    // A registration that stays: the first event the stream delivers is this
    // one, so the dropped registration was never delivered.
    s.cheater.register(&s.signed(3)).await.unwrap();
    s.mine(DEPTH).await;
    assert_eq!(next_registered(&mut events).await, 3);
    assert_eq!(s.version(&s.watcher).await, Some(3));
}

/// A revert deeper than the confirmation depth replaces a registration the
/// stream already delivered: the stream notices the replaced blocks and
/// delivers the new chain's registration, which sits in blocks it had
/// scanned before, and `dispute()` follows the new chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_reorg_is_rescanned() {
    let s = setup().await;
    let id = s.state.channelId;
    let mut events = s.watcher.subscribe(id).await.unwrap();
    let snapshot = s.anvil.snapshot().await.unwrap();

    s.cheater.register(&s.signed(1)).await.unwrap();
    s.mine(DEPTH).await;
    assert_eq!(next_registered(&mut events).await, 1);
    assert_eq!(s.version(&s.watcher).await, Some(1));

    s.anvil.revert(snapshot).await.unwrap();
    assert_eq!(s.version(&s.cheater).await, None, "the revert dropped it");
    s.cheater.register(&s.signed(5)).await.unwrap();
    s.mine(DEPTH).await;
    assert_eq!(next_registered(&mut events).await, 5);
    assert_eq!(s.version(&s.watcher).await, Some(5));
}
