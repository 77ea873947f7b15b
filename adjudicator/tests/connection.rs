//! The connection to the node on anvil: a node that stops answering fails
//! every call within `rpc_timeout` (and its connection is replaced), a node's
//! refusal arrives as a typed error with its code and message, and a sender
//! that cannot pay for gas is told what it needs and has.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use alloy_primitives::U256;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Adjudicator, Deployment, Error, EthAdjudicator, EthConfig, EthFunder, Funder, FundingRequest,
    RpcFailure, SignedChannel, deploy,
};
use perun_channel::{Allocation, Asset, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

async fn setup() -> (Anvil, Deployment, EthConfig) {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig {
        rpc_timeout: Duration::from_secs(1),
        receipt_timeout: Duration::from_secs(20),
        ..EthConfig::from_deployment(&d)
    };
    (anvil, d, cfg)
}

/// A registration of a fresh channel at version 1, signed by two random parties.
fn registration(d: &perun_adjudicator::Deployment) -> SignedChannel {
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let (params, mut state) = perun_adjudicator::testing::empty_channel(
        d.adjudicator,
        parties.iter().map(|p| p.address()).collect(),
        d.eth_holder,
    );
    state.version = 1;
    let mut signed = SignedState::new(state);
    for (i, p) in parties.iter().enumerate() {
        signed.sign(&params, i, p).unwrap();
    }
    SignedChannel {
        params,
        state: signed,
    }
}

/// A stalled connection (bytes no longer carried, socket open): every call
/// fails with `RpcFailure::Timeout` within about `rpc_timeout`; after a few
/// the connection counts as dead and the next call opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_node_times_out_and_the_connection_is_replaced() {
    let (anvil, d, cfg) = setup().await;
    let relay = anvil.relay().await.unwrap();
    let account = anvil.funded_account().await.unwrap();
    let adj = EthAdjudicator::connect(&relay.ws_url(), &account, cfg)
        .await
        .unwrap();
    let req = registration(&d);
    let id = req.state.state.channelId;
    assert_eq!(adj.dispute(id).await.unwrap(), None);

    relay.stall(true);
    for _ in 0..3 {
        let started = Instant::now();
        let err = adj.dispute(id).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Rpc {
                    source: RpcFailure::Timeout(t),
                    ..
                } if t == Duration::from_secs(1)
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "bounded");
    }
    let err = adj.register(&req).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let before = relay.accepted();

    // The stalled socket stays stalled; the backend opens a new connection.
    relay.stall(false);
    adj.register(&req).await.unwrap();
    assert!(relay.accepted() > before, "a new connection");
    assert_eq!(adj.dispute(id).await.unwrap().map(|d| d.version), Some(1));
}

/// A node that refuses a transaction (here: it cannot sign for a backend
/// whose provider holds no key) answers with a typed error: the
/// operation, the node's code and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusal_is_typed() {
    let (anvil, d, cfg) = setup().await;
    let plain = ProviderBuilder::new()
        .connect_ws(WsConnect::new(anvil.ws_url()))
        .await
        .unwrap()
        .erased();
    let keyless = LocalAccount::random().address();
    anvil
        .set_balance(keyless, U256::from(10).pow(U256::from(20)))
        .await
        .unwrap();
    let adj = EthAdjudicator::new(plain, keyless, cfg).await.unwrap();
    match adj.register(&registration(&d)).await {
        Err(Error::Rpc {
            op: "register",
            source: RpcFailure::Node { code, message },
        }) => {
            assert_ne!(code, 0);
            assert!(!message.is_empty());
        }
        other => panic!("expected a node error, got {other:?}"),
    }
}

/// A sender with tokens but no ether for gas: funding gets
/// `InsufficientFunds` with the gas money it needs and the zero it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_without_gas_money_is_told_what_it_needs() {
    let (anvil, d, cfg) = setup().await;
    let payer = anvil.funded_account().await.unwrap();
    anvil
        .mint_token(d.token, &payer, U256::from(1_000))
        .await
        .unwrap();
    anvil
        .set_balance(payer.address(), U256::ZERO)
        .await
        .unwrap();
    let funder = EthFunder::connect(&anvil.ws_url(), &payer, cfg)
        .await
        .unwrap();
    let params = Params::payment(
        perun_channel::Domain {
            chain_id: U256::from(CHAIN_ID),
            adjudicator: d.adjudicator,
        },
        60,
        U256::from(rand::random::<u64>()),
        vec![payer.address(), LocalAccount::random().address()],
        vec![vec![U256::from(100), U256::ZERO]],
    );
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.erc20_holder,
    };
    let state = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::from(100), U256::ZERO]]),
    );
    let req = FundingRequest {
        params,
        state,
        index: 0,
        timeout: Duration::from_secs(5),
    };
    match funder.fund(req).await {
        Err(Error::InsufficientFunds { need, have }) => {
            assert_eq!(have, U256::ZERO);
            assert!(need > U256::from(21_000), "gas money: {need}");
        }
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    assert!(anvil.pool_hashes().await.unwrap().is_empty());
}
