//! Channel history from the chain (issue 15, point 4): a client that lost
//! its store rebuilds the list of its channels from the contracts' logs and
//! `recover_funds` withdraws what the chain still owes it (a credit its
//! blocked push left, a deposit that came after the conclusion), once; a
//! rescan reads only the new blocks and the last 64; a reorg is not counted
//! twice. On `SimLedger` and on anvil (real contracts, redb).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;

use common::{Ledger, Options, bob_registers, open, parties};
use perun::adjudicator::bindings::{AssetHolderERC20, TestToken};
use perun::adjudicator::{Adjudicator, EthAdjudicator, EthConfig, SignedChannel};
use perun::channel::{Address, ChannelId, U256};
use perun::client::{ChainIndex, IndexConfig};
use perun::persistence::{MemoryPersister, Persister};
use perun::wallet::{Account, LocalAccount};

on_both_ledgers!(lost_store_recovers_credits_once);

const MINT: u64 = 1_000;
const EACH: u64 = 100;
const LATE: u64 = 7;

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Makes `who` refuse the asset (anvil: the test token's block list), or accept it again.
async fn set_blocked(ledger: &Ledger, who: Address, on: bool) {
    match ledger {
        Ledger::Sim(sim) => sim.set_rejecting(who, on),
        Ledger::Anvil {
            anvil, deployment, ..
        } => {
            // Anyone may set the test token's block list.
            let someone = anvil.funded_account().await.unwrap();
            TestToken::new(deployment.token, anvil.provider(&someone).await.unwrap())
                .setBlocked(who, on)
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
        }
    }
}

/// `who` deposits `amount` more into its own slot of the concluded channel,
/// which holds `held` for it.
async fn late_deposit(
    ledger: &Ledger,
    who: &LocalAccount,
    id: ChannelId,
    held: U256,
    amount: U256,
) {
    match ledger {
        Ledger::Sim(sim) => {
            let holder = ledger.asset().holder;
            sim.deposit_to(holder, who.address(), id, who.address(), held, amount)
                .unwrap();
        }
        Ledger::Anvil {
            anvil, deployment, ..
        } => {
            let p = anvil.provider(who).await.unwrap();
            TestToken::new(deployment.token, p.clone())
                .approve(deployment.erc20_holder, amount)
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
            AssetHolderERC20::new(deployment.erc20_holder, p)
                .deposit(id, who.address(), held, amount)
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
        }
    }
}

/// Alice's channel is concluded by Bob while her client is gone and the
/// token refuses her: her share stays credited; she deposits once more into
/// the concluded channel. A new client of hers with an empty store finds the
/// channel and gets both back with `recover_funds`; a second call withdraws
/// nothing, and a rescan reads the new blocks and the last 64 only.
async fn lost_store_recovers_credits_once(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let bob_ch = chans[1].clone();
    let id = bob_ch.id();
    bob_ch.pay(0, 0, u(30)).await.unwrap(); // Alice 130, Bob 70.
    let latest = common::caught_up(&chans).await;
    let alice = ps.remove(0);
    let bob = &ps[0];
    alice.client.shutdown().await;
    set_blocked(&ledger, alice.client.address(), true).await;

    let adj = bob_registers(&ledger, bob, &bob_ch, latest.clone()).await;
    ledger.advance(61).await;
    let req = SignedChannel {
        params: bob_ch.params().clone(),
        state: latest.clone(),
    };
    match adj.conclude(&req).await {
        Ok(()) | Err(perun::adjudicator::Error::AlreadyConcluded) => {}
        Err(e) => panic!("conclude: {e}"),
    }
    set_blocked(&ledger, alice.client.address(), false).await;
    let account = alice.account.clone();
    late_deposit(&ledger, &account, id, u(130), u(LATE)).await;
    assert_eq!(
        ledger.balance(account.address()).await,
        u(MINT - EACH - LATE)
    );

    // Alice lost her store: a new client with an empty one.
    let empty: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
    let alice = common::restart_with(&ledger, alice, empty).await;
    assert!(alice.client.channels().is_empty());
    let view = alice.client.chain_index().await.unwrap();
    assert_eq!(view.channels.len(), 1, "{}: {view:?}", ledger.name());
    let ch = &view.channels[0];
    assert_eq!(ch.id, id);
    assert_eq!(ch.deposits.len(), 2, "funding and the late deposit");
    assert_eq!(ch.registrations.len(), 1);
    assert_eq!(ch.concluded.map(|(v, _)| v), Some(latest.state.version));
    assert_eq!(ch.credited.len(), 1, "the blocked push");
    assert_eq!(view.credits.len(), 1);
    assert_eq!(view.credits[0].amount, u(130 + LATE));

    let got = alice.client.recover_funds().await.unwrap();
    assert!(got.failed.is_empty(), "{:?}", got.failed);
    assert_eq!(got.total(ledger.asset().holder), u(130 + LATE));
    assert_eq!(ledger.balance(account.address()).await, u(MINT + 30));
    let again = alice.client.recover_funds().await.unwrap();
    assert!(again.withdrawn.is_empty() && again.failed.is_empty());
    assert_eq!(ledger.balance(account.address()).await, u(MINT + 30));
    let view = alice.client.chain_index().await.unwrap();
    assert!(view.credits.is_empty());
    assert_eq!(view.channels[0].withdrawn.len(), 1, "withdrawn once");
    assert_eq!(view.channels[0].deposits.len(), 2, "nothing counted twice");
    if let Ledger::Anvil { anvil, .. } = &ledger {
        anvil.mine(100).await.unwrap();
        let cursor = alice.client.chain_index().await.unwrap().scan.to;
        anvil.mine(100).await.unwrap();
        let view = alice.client.chain_index().await.unwrap();
        assert_eq!(view.scan.from, cursor + 1 - 64);
        assert_eq!(view.scan.blocks_read, view.scan.to - cursor + 64);
        assert!(view.scan.to >= cursor + 100);
        assert_eq!(view.channels[0].deposits.len(), 2);
    }
}

/// On anvil: deposits the index found are dropped when a reorg removes
/// their blocks, and the blocks re-read after it count nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_is_not_counted_twice() {
    let ledger = Ledger::anvil().await;
    let Ledger::Anvil {
        anvil,
        deployment,
        config,
    } = &ledger
    else {
        unreachable!()
    };
    let me = Arc::new(anvil.funded_account().await.unwrap());
    let adj = EthAdjudicator::connect(&anvil.ws_url(), &me, EthConfig::clone(config))
        .await
        .unwrap();
    let adj: Arc<dyn Adjudicator> = Arc::new(adj);
    let store: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
    let index = || {
        let cfg = IndexConfig {
            reread: 64,
            range: 50,
        };
        ChainIndex::new(adj.clone(), store.clone(), me.clone(), cfg).unwrap()
    };
    let holder = perun::adjudicator::bindings::AssetHolderETH::new(
        deployment.eth_holder,
        anvil.provider(&me).await.unwrap(),
    );
    let deposit = |channel: u8| {
        let holder = holder.clone();
        let me = me.address();
        async move {
            holder
                .depositEth(ChannelId::repeat_byte(channel), me, U256::ZERO)
                .value(u(1_000))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
        }
    };
    deposit(1).await;
    anvil.mine(60).await.unwrap();
    deposit(2).await;
    anvil.mine(2).await.unwrap();
    let view = index().scan().await.unwrap();
    let ids = |v: &perun::client::ChainView| v.channels.iter().map(|c| c.id[0]).collect::<Vec<_>>();
    assert_eq!(ids(&view), vec![1, 2]);
    assert!(view.scan.queries > 1, "ranges of 50 blocks");

    // The last 3 blocks (channel 2's deposit among them) are replaced.
    anvil.reorg(3).await.unwrap();
    deposit(3).await;
    let view = index().scan().await.unwrap();
    assert_eq!(ids(&view), vec![1, 3], "channel 2's deposit is gone");
    assert!(view.scan.dropped >= 1);
    for c in &view.channels {
        assert_eq!(c.deposits.len(), 1, "counted once");
    }
    assert_eq!(
        view.credits,
        vec![],
        "deposits of open channels are no credits"
    );
}
