//! Funding that cannot overpay, on anvil: a deposit names the holdings it
//! expects, so a retry after a receipt timeout, a second deposit for the same
//! slot in the same block, or a deposit that raced another never lands twice;
//! funding reads the holdings again and tops up exactly the share.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use alloy::providers::Provider;
use alloy_primitives::{Address, B256, U256};
use perun_adjudicator::bindings::AssetHolderETH;
use perun_adjudicator::bindings::eth_holder::AssetHolderETH::AssetHolderETHErrors as H;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Deployment, Error, EthConfig, EthFunder, Funder, FundingRequest, deploy, funding_id,
};
use perun_channel::{Allocation, Asset, Params, State};
use perun_wallet::{Account, LocalAccount};

const GWEI: u128 = 1_000_000_000;
const SHARE: u64 = 1_000;

struct Setup {
    anvil: Anvil,
    d: Deployment,
    cfg: EthConfig,
    /// The participant funded for (index 0); someone else pays.
    params: Params,
}

async fn setup(receipt_timeout: Duration) -> Setup {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig {
        receipt_timeout,
        ..EthConfig::from_deployment(&d)
    };
    let params = Params::payment(
        perun_channel::Domain {
            chain_id: U256::from(CHAIN_ID),
            adjudicator: d.adjudicator,
        },
        60,
        U256::from(rand::random::<u64>()),
        vec![
            LocalAccount::random().address(),
            LocalAccount::random().address(),
        ],
        vec![vec![U256::from(SHARE), U256::ZERO]],
    );
    Setup {
        anvil,
        d,
        cfg,
        params,
    }
}

impl Setup {
    /// Version 0 over `holder`: participant 0 brings `SHARE`, participant 1 nothing.
    fn state(&self, holder: Address) -> State {
        let asset = Asset {
            chainId: U256::from(CHAIN_ID),
            holder,
        };
        State::initial(
            &self.params,
            Allocation::new(vec![asset], vec![vec![U256::from(SHARE), U256::ZERO]]),
        )
    }

    fn request(&self, state: &State) -> FundingRequest {
        FundingRequest {
            params: self.params.clone(),
            state: state.clone(),
            index: 0,
            timeout: Duration::from_secs(10),
        }
    }

    fn fid(&self, state: &State) -> B256 {
        funding_id(state.channelId, self.params.participants[0])
    }

    async fn held(&self, holder: Address, state: &State) -> U256 {
        AssetHolderETH::new(holder, self.anvil.admin().clone())
            .holdings(state.channelId, self.params.participants[0])
            .call()
            .await
            .unwrap()
            .amount
    }

    async fn pool(&self) -> usize {
        self.anvil.pool_hashes().await.unwrap().len()
    }

    async fn pool_holds(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.pool().await != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the pool does not reach {n} transactions"));
    }

    async fn funder(&self) -> (LocalAccount, EthFunder) {
        let payer = self.anvil.funded_account().await.unwrap();
        let funder = EthFunder::connect(&self.anvil.ws_url(), &payer, self.cfg.clone())
            .await
            .unwrap();
        (payer, funder)
    }
}

/// `fund` that times out waiting for its receipt, called again: the second
/// call joins the deposit in flight (one transaction in the pool), and once
/// it is mined the slot holds exactly the share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_fund_deposits_once() {
    let s = setup(Duration::from_secs(1)).await;
    let (_, funder) = s.funder().await;
    let state = s.state(s.d.eth_holder);
    s.anvil.set_automine(false).await.unwrap();

    let first = match funder.fund(s.request(&state)).await {
        Err(Error::ReceiptTimeout {
            op: "deposit", tx, ..
        }) => tx,
        other => panic!("expected ReceiptTimeout, got {other:?}"),
    };
    match funder.fund(s.request(&state)).await {
        Err(Error::ReceiptTimeout { tx, .. }) => assert_eq!(tx, first),
        other => panic!("expected ReceiptTimeout, got {other:?}"),
    }
    assert_eq!(s.pool().await, 1, "no second deposit");
    s.anvil.mine(1).await.unwrap();
    funder.fund(s.request(&state)).await.unwrap();
    assert_eq!(s.held(s.d.eth_holder, &state).await, U256::from(SHARE));
    assert_eq!(s.pool().await, 0);
}

/// Two deposits for the same slot, both computed from "nothing held", in one
/// block: the second reverts with `HoldingsChanged` (naming the slot, what
/// it expected and what was held) and the slot holds exactly one share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deposit_for_the_same_holdings_reverts() {
    let s = setup(Duration::from_secs(30)).await;
    let state = s.state(s.d.eth_holder);
    let fid = s.fid(&state);
    let share = U256::from(SHARE);
    let mut sent = Vec::new();
    let mut wallets = Vec::new();
    for _ in 0..2 {
        let payer = s.anvil.funded_account().await.unwrap();
        wallets.push(s.anvil.provider(&payer).await.unwrap());
    }
    s.anvil.set_automine(false).await.unwrap();
    for (i, w) in wallets.iter().enumerate() {
        let tip = (2 - i as u128) * GWEI; // The first pays more: it goes first.
        let pending = AssetHolderETH::new(s.d.eth_holder, w.clone())
            .deposit(state.channelId, s.params.participants[0], U256::ZERO, share)
            .value(share)
            .gas(100_000)
            .max_fee_per_gas(10 * GWEI)
            .max_priority_fee_per_gas(tip)
            .send()
            .await
            .unwrap();
        sent.push(*pending.tx_hash());
    }
    s.pool_holds(2).await;
    s.anvil.mine(1).await.unwrap();
    let admin = s.anvil.admin();
    let first = admin
        .get_transaction_receipt(sent[0])
        .await
        .unwrap()
        .unwrap();
    let second = admin
        .get_transaction_receipt(sent[1])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.block_number, second.block_number, "one block");
    assert!(first.status());
    assert!(!second.status(), "the second deposit reverted");
    assert_eq!(s.held(s.d.eth_holder, &state).await, share);
    // The same call at that block says why, with the arguments.
    let err = AssetHolderETH::new(s.d.eth_holder, wallets[1].clone())
        .deposit(state.channelId, s.params.participants[0], U256::ZERO, share)
        .value(share)
        .call()
        .await
        .unwrap_err();
    match err.as_decoded_interface_error::<H>() {
        Some(H::HoldingsChanged(e)) => {
            assert_eq!((e.fundingId, e.expected, e.held), (fid, U256::ZERO, share));
        }
        other => panic!("expected HoldingsChanged, got {other:?}"),
    }
}

/// A deposit of half the share by someone else lands first in the same block
/// as funding's own: funding's deposit reverts with `HoldingsChanged`, it reads
/// the holdings again and deposits the other half, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funding_tops_up_after_another_deposit_came_first() {
    let s = setup(Duration::from_secs(30)).await;
    let (_, funder) = s.funder().await;
    let state = s.state(s.d.eth_holder);
    let half = U256::from(SHARE / 2);
    let other = s.anvil.funded_account().await.unwrap();
    let other = s.anvil.provider(&other).await.unwrap();
    s.anvil.set_automine(false).await.unwrap();

    let req = s.request(&state);
    let funding = tokio::spawn(async move { funder.fund(req).await });
    s.pool_holds(1).await;
    let _front = AssetHolderETH::new(s.d.eth_holder, other)
        .deposit(state.channelId, s.params.participants[0], U256::ZERO, half)
        .value(half)
        .gas(100_000)
        .max_fee_per_gas(100 * GWEI)
        .max_priority_fee_per_gas(50 * GWEI)
        .send()
        .await
        .unwrap();
    s.pool_holds(2).await;
    s.anvil.mine(1).await.unwrap();
    assert_eq!(s.held(s.d.eth_holder, &state).await, half);
    s.pool_holds(1).await;
    s.anvil.mine(1).await.unwrap();
    funding.await.unwrap().unwrap();
    assert_eq!(s.held(s.d.eth_holder, &state).await, U256::from(SHARE));
    assert_eq!(s.pool().await, 0);
}

/// The ERC20 path: an approval and a deposit, each retried after a receipt
/// timeout, each sent once; the slot holds exactly the share and the payer
/// paid exactly the share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_erc20_fund_approves_and_deposits_once() {
    let s = setup(Duration::from_secs(1)).await;
    let (payer, funder) = s.funder().await;
    let minted = U256::from(10 * SHARE);
    s.anvil.mint_token(s.d.token, &payer, minted).await.unwrap();
    let state = s.state(s.d.erc20_holder);
    s.anvil.set_automine(false).await.unwrap();

    for op in ["approve", "deposit"] {
        let first = match funder.fund(s.request(&state)).await {
            Err(Error::ReceiptTimeout { op: got, tx, .. }) if got == op => tx,
            other => panic!("expected ReceiptTimeout of {op}, got {other:?}"),
        };
        match funder.fund(s.request(&state)).await {
            Err(Error::ReceiptTimeout { op: got, tx, .. }) if got == op => assert_eq!(tx, first),
            other => panic!("expected ReceiptTimeout of {op}, got {other:?}"),
        }
        assert_eq!(s.pool().await, 1, "one {op}");
        s.anvil.mine(1).await.unwrap();
    }
    funder.fund(s.request(&state)).await.unwrap();
    assert_eq!(s.held(s.d.erc20_holder, &state).await, U256::from(SHARE));
    assert_eq!(
        s.anvil
            .token_balance(s.d.token, payer.address())
            .await
            .unwrap(),
        minted - U256::from(SHARE)
    );
    assert_eq!(s.pool().await, 0);
}
