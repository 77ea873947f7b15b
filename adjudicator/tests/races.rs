//! Lost races on anvil: a transaction that passed its simulation but reverts
//! once mined, because another party's transaction came first in the same
//! block, is reported as the rule it broke, not as an opaque revert.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use alloy_primitives::Bytes;
use perun_adjudicator::bindings::Adjudicator;
use perun_adjudicator::testing::Anvil;
use perun_adjudicator::{
    Adjudicator as _, Error, EthAdjudicator, EthConfig, SignedChannel, deploy,
};
use perun_channel::{SignedState, State};
use perun_wallet::{Account, LocalAccount};

/// Waits until `n` transactions wait in anvil's pool.
async fn pool_holds(anvil: &Anvil, n: u64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while anvil.pending_transactions().await.unwrap() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("transactions reach the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_after_a_conclusion_in_the_same_block_is_already_concluded() {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let cfg = EthConfig::from_deployment(&d);
    let (a_sender, b_sender) = (
        anvil.funded_account().await.unwrap(),
        anvil.funded_account().await.unwrap(),
    );
    let b = EthAdjudicator::connect(&anvil.ws_url(), &b_sender, cfg.clone())
        .await
        .unwrap();
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let (params, state) = perun_adjudicator::testing::empty_channel(
        d.adjudicator,
        parties.iter().map(|p| p.address()).collect(),
        d.eth_holder,
    );
    let sign = |mut st: State, version: u64, fin: bool| {
        st.version = version;
        st.isFinal = fin;
        let mut s = SignedState::new(st);
        for (i, p) in parties.iter().enumerate() {
            s.sign(&params, i, p).unwrap();
        }
        SignedChannel {
            params: params.clone(),
            state: s,
        }
    };
    let (fin, old) = (sign(state.clone(), 2, true), sign(state, 1, false));

    anvil.set_automine(false).await.unwrap();
    // Bob's registration passes its simulation (nothing is concluded yet) and waits in the pool.
    let registering = tokio::spawn(async move { b.register(&old).await });
    pool_holds(&anvil, 1).await;
    // Alice's final conclusion arrives later but pays more, so it is mined first.
    let adj = Adjudicator::new(d.adjudicator, anvil.provider(&a_sender).await.unwrap());
    let sigs = fin
        .state
        .sigs
        .iter()
        .map(|s| Bytes::from(s.unwrap().as_bytes().to_vec()))
        .collect();
    let gwei = 1_000_000_000u128;
    let concluding = adj
        .concludeFinal((&params).into(), (&fin.state.state).into(), sigs)
        .gas(1_000_000) // Estimated after the registration, it would run out first.
        .max_fee_per_gas(2_000 * gwei)
        .max_priority_fee_per_gas(1_000 * gwei)
        .send()
        .await
        .unwrap();
    pool_holds(&anvil, 2).await;
    anvil.mine(1).await.unwrap();
    assert!(concluding.get_receipt().await.unwrap().status());
    let err = registering.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::AlreadyConcluded), "{err}");
    let reader = EthAdjudicator::connect(&anvil.ws_url(), &deployer, cfg)
        .await
        .unwrap();
    let dispute = reader.dispute(params.channel_id()).await.unwrap().unwrap();
    assert!(dispute.concluded);
    assert_eq!(dispute.version, 2);
}
