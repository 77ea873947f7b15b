//! Attacks on the v2 contracts found in review (anvil): a payout that calls
//! back into the next holder, and a deposit aimed at another variable's slot.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

use alloy::providers::{DynProvider, Provider};
use alloy_primitives::{Address, B256, Bytes, U256};
use perun_adjudicator::bindings::{Adjudicator, AssetHolderERC20, AssetHolderETH};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::types::{WithdrawalAuth, withdrawal_hash};
use perun_adjudicator::{Deployment, deploy};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

mod hook {
    alloy::sol!(
        #[sol(rpc)]
        HookToken,
        "contracts/artifacts/HookToken.json"
    );
}
mod rh {
    alloy::sol!(
        #[sol(rpc)]
        ReentryHook,
        "contracts/artifacts/ReentryHook.json"
    );
}

async fn setup() -> (Anvil, DynProvider, Deployment) {
    let anvil = Anvil::spawn().await.unwrap();
    let deployer = anvil.funded_account().await.unwrap();
    let p = anvil.provider(&deployer).await.unwrap();
    let d = deploy(&p).await.unwrap();
    (anvil, p, d)
}

fn domain(d: &Deployment) -> Domain {
    Domain {
        chain_id: U256::from(CHAIN_ID),
        adjudicator: d.adjudicator,
    }
}

fn u(x: u64) -> U256 {
    U256::from(x)
}

fn sign_all(params: &Params, state: &State, parties: &[&LocalAccount]) -> Vec<Bytes> {
    let mut s = SignedState::new(state.clone());
    for (i, p) in parties.iter().enumerate() {
        s.sign(params, i, *p).unwrap();
    }
    s.signatures()
        .unwrap()
        .iter()
        .map(|s| Bytes::from(s.as_bytes().to_vec()))
        .collect()
}

/// `withdrawNonces[x]` lives at `keccak(pad(x) ‖ 0)`. Were the amounts stored at
/// `keccak(channelId ‖ participant)`, a deposit for channel `pad(x)` and participant 0 would add
/// to x's nonce and kill every authorisation x signed in advance. Their slots hash 96 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_cannot_reach_a_withdraw_nonce() {
    let (_anvil, p, d) = setup().await;
    let h = AssetHolderETH::new(d.eth_holder, p.clone());
    let victim = LocalAccount::random().address();
    let cid = B256::left_padding_from(victim.as_slice());
    assert_eq!(h.withdrawNonces(victim).call().await.unwrap(), U256::ZERO);
    for (held, amount) in [(0, 1), (1, 41)] {
        let r = h
            .deposit(cid, Address::ZERO, u(held), u(amount))
            .value(u(amount))
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
        assert!(r.status());
    }
    assert_eq!(h.withdrawNonces(victim).call().await.unwrap(), U256::ZERO);
    assert_eq!(
        h.holdings(cid, Address::ZERO).call().await.unwrap().amount,
        u(42)
    );
}

/// The adjudicator pushes the outcome holder by holder. A loser whose first-asset payout calls
/// back (an ERC777-style hook) tries to withdraw its whole deposit from the second asset's
/// holder before that holder's outcome is set (the channel is concluded already); had it
/// worked, that holder would find the slot short and refund deposits, voiding the outcome
/// (Bob 5 ETH instead of 8). `settled` says no while the push runs, so the hook's withdrawal
/// fails, the hook token's payout becomes a credit, and Bob gets his 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_hook_cannot_withdraw_from_a_holder_still_to_be_settled() {
    let (anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let alice = anvil.funded_account().await.unwrap();
    let pa = anvil.provider(&alice).await.unwrap();
    let bob = LocalAccount::random();
    let token = hook::HookToken::deploy(p.clone()).await.unwrap();
    let th = *AssetHolderERC20::deploy(p.clone(), d.adjudicator, *token.address())
        .await
        .unwrap()
        .address();
    let assets = vec![
        Asset {
            chainId: u(CHAIN_ID),
            holder: th,
        },
        Asset {
            chainId: u(CHAIN_ID),
            holder: d.eth_holder,
        },
    ];
    let funding = vec![vec![u(1), u(1)], vec![u(5), u(5)]];
    let params = Params::payment(
        domain(&d),
        60,
        U256::from(rand::random::<u64>()),
        vec![alice.address(), bob.address()],
        funding.clone(),
    );
    let s0 = State::initial(&params, Allocation::new(assets, funding));
    let id = s0.channelId;
    // Deposits: tokens and ether for both.
    token
        .mint(alice.address(), u(3))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    hook::HookToken::new(*token.address(), pa.clone())
        .approve(th, u(2))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let tholder = AssetHolderERC20::new(th, pa.clone());
    for who in [alice.address(), bob.address()] {
        assert!(
            tholder
                .deposit(id, who, U256::ZERO, u(1))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap()
                .status()
        );
    }
    let eh = AssetHolderETH::new(d.eth_holder, p.clone());
    for who in [alice.address(), bob.address()] {
        assert!(
            eh.deposit(id, who, U256::ZERO, u(5))
                .value(u(5))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap()
                .status()
        );
    }
    // Alice arms her hook with a withdrawal of her ether slot, signed in advance.
    let auth = WithdrawalAuth {
        channelId: id,
        participant: alice.address(),
        receiver: alice.address(),
        amount: U256::MAX,
        nonce: U256::ZERO,
    };
    let sig = alice
        .sign_hash(withdrawal_hash(d.eth_holder, u(CHAIN_ID), &auth))
        .unwrap();
    let sb = sig.as_bytes();
    let hk = rh::ReentryHook::deploy(
        pa.clone(),
        d.eth_holder,
        id,
        alice.address(),
        B256::from_slice(&sb[..32]),
        B256::from_slice(&sb[32..64]),
        sb[64],
    )
    .await
    .unwrap();
    hook::HookToken::new(*token.address(), pa.clone())
        .setHook(*hk.address())
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    // Alice lost 3 ETH in the channel: final outcome ETH 2 / 8.
    let mut fin = s0.next();
    fin.outcome.balances[1] = vec![u(2), u(8)];
    fin.isFinal = true;
    let a_before = p.get_balance(alice.address()).await.unwrap();
    let r = adj
        .concludeFinal(
            (&params).into(),
            (&fin).into(),
            sign_all(&params, &fin, &[&alice, &bob]),
        )
        .gas(2_000_000)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(r.status());
    let a_gain = p.get_balance(alice.address()).await.unwrap() - a_before;
    let b = p.get_balance(bob.address()).await.unwrap();
    assert_eq!(b, u(8), "Bob gets his 8 of the outcome");
    assert_eq!(a_gain, u(2), "Alice gets her 2, not her deposit of 5");
}
