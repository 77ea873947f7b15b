//! The contracts themselves, called directly on anvil: Rust hashing equals
//! Solidity's, and the checks the Rust backends also make off-chain are
//! enforced on-chain too.

#![allow(clippy::unwrap_used)]

use alloy::providers::DynProvider;
use alloy_primitives::{Address, Bytes, Signature, U256};
use perun_adjudicator::bindings::adjudicator::Adjudicator::AdjudicatorErrors as A;
use perun_adjudicator::bindings::eth_holder::AssetHolder::WithdrawalAuth as HolderAuth;
use perun_adjudicator::bindings::eth_holder::AssetHolderETH::AssetHolderETHErrors as H;
use perun_adjudicator::bindings::{Adjudicator, AssetHolderETH};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::types::{WithdrawalAuth, withdrawal_hash};
use perun_adjudicator::{Deployment, deploy, funding_id};
use perun_channel::{Allocation, Asset, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};
use rand::Rng;

async fn setup() -> (Anvil, DynProvider, Deployment) {
    let anvil = Anvil::spawn().await.unwrap();
    let deployer = anvil.funded_account().await.unwrap();
    let p = anvil.provider(&deployer).await.unwrap();
    let d = deploy(&p).await.unwrap();
    (anvil, p, d)
}

fn random_address(rng: &mut impl Rng) -> Address {
    Address::from(rng.r#gen::<[u8; 20]>())
}

fn random_u256(rng: &mut impl Rng) -> U256 {
    // Mix small and full-width values so both zero-padded and dense words are encoded.
    if rng.r#gen::<bool>() {
        U256::from(rng.r#gen::<u64>())
    } else {
        U256::from_be_bytes(rng.r#gen::<[u8; 32]>())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_hashes_equal_solidity_hashes() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let holder = AssetHolderETH::new(d.eth_holder, p);
    let mut rng = rand::thread_rng();
    for round in 0..120 {
        let n = rng.gen_range(2..=6);
        let params = Params {
            challengeDuration: rng.r#gen(),
            nonce: random_u256(&mut rng),
            participants: (0..n).map(|_| random_address(&mut rng)).collect(),
            app: if round % 3 == 0 {
                Address::ZERO
            } else {
                random_address(&mut rng)
            },
        };
        let assets: Vec<Asset> = (0..rng.gen_range(1..=3))
            .map(|_| Asset {
                chainId: random_u256(&mut rng),
                holder: random_address(&mut rng),
            })
            .collect();
        let balances = assets
            .iter()
            .map(|_| (0..n).map(|_| random_u256(&mut rng)).collect())
            .collect();
        let len = rng.gen_range(0..200);
        let state = State {
            channelId: params.channel_id(),
            version: rng.r#gen(),
            outcome: Allocation::new(assets, balances),
            appData: Bytes::from((0..len).map(|_| rng.r#gen::<u8>()).collect::<Vec<_>>()),
            isFinal: rng.r#gen(),
        };
        let id = adj.channelId((&params).into()).call().await.unwrap();
        assert_eq!(id, params.channel_id(), "round {round}: {params:?}");
        let h = adj.hashState((&state).into()).call().await.unwrap();
        assert_eq!(h, state.hash(), "round {round}: {state:?}");
        let who = params.participants[round % n];
        let fid = holder.fundingId(id, who).call().await.unwrap();
        assert_eq!(fid, funding_id(id, who), "round {round}");
    }
}

fn sig_bytes(s: &Signature) -> Bytes {
    Bytes::from(s.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjudicator_rejects_bad_signatures_and_shapes() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p);
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let params = Params::payment(60, U256::from(7), vec![alice.address(), bob.address()]);
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.eth_holder,
    };
    let state = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::from(1), U256::from(2)]]),
    );
    let mut signed = SignedState::new(state.clone());
    signed.sign(&params, 0, &alice).unwrap();
    signed.sign(&params, 1, &bob).unwrap();
    let good: Vec<Bytes> = signed.signatures().unwrap().iter().map(sig_bytes).collect();

    let err = |r: Result<(), alloy::contract::Error>| {
        r.unwrap_err().as_decoded_interface_error::<A>().unwrap()
    };
    let register = |sigs: Vec<Bytes>, st: &State| {
        let call = adj.register((&params).into(), st.into(), sigs);
        async move { call.call().await.map(|_| ()) }
    };
    // Succeeds as a dry run with every signature.
    register(good.clone(), &state).await.unwrap();
    // Too few signatures.
    assert!(matches!(
        err(register(good[..1].to_vec(), &state).await),
        A::SignatureCount(_)
    ));
    // Forged: bob's slot signed by someone else.
    let mallory = LocalAccount::random();
    let forged = vec![
        good[0].clone(),
        sig_bytes(&mallory.sign_hash(state.hash()).unwrap()),
    ];
    assert!(
        matches!(err(register(forged, &state).await), A::WrongSigner(w) if w.index == U256::from(1))
    );
    // High s: the malleable twin of alice's signature. A signature that does
    // not parse names its index like a wrong signer does.
    let s0 = signed.sigs[0].unwrap();
    let n = U256::from_str_radix(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();
    let twin = Signature::new(s0.r(), n - s0.s(), !s0.v());
    assert!(matches!(
        err(register(vec![sig_bytes(&twin), good[1].clone()], &state).await),
        A::WrongSigner(w) if w.index == U256::ZERO
    ));
    // v outside {27, 28}.
    let mut bad_v = good[0].to_vec();
    bad_v[64] = 29;
    assert!(matches!(
        err(register(vec![Bytes::from(bad_v), good[1].clone()], &state).await),
        A::WrongSigner(w) if w.index == U256::ZERO
    ));
    // A signature of the wrong length.
    assert!(matches!(
        err(register(vec![good[0].clone(), Bytes::from(vec![1u8; 64])], &state).await),
        A::WrongSigner(w) if w.index == U256::from(1)
    ));
    // A state of another channel, and a balance row of the wrong length.
    let mut other = state.clone();
    other.channelId = alloy_primitives::B256::repeat_byte(1);
    assert!(matches!(
        err(register(good.clone(), &other).await),
        A::WrongChannel(_)
    ));
    let mut short = state.clone();
    short.outcome.balances[0].pop();
    assert!(matches!(
        err(register(good.clone(), &short).await),
        A::Dimensions(_)
    ));
    // concludeFinal needs a final state; conclude needs a registration.
    let cf = adj.concludeFinal((&params).into(), (&state).into(), good.clone());
    assert!(matches!(
        cf.call()
            .await
            .unwrap_err()
            .as_decoded_interface_error::<A>()
            .unwrap(),
        A::NotFinal(_)
    ));
    let c = adj.conclude((&params).into(), (&state).into());
    assert!(matches!(
        c.call()
            .await
            .unwrap_err()
            .as_decoded_interface_error::<A>()
            .unwrap(),
        A::NotRegistered(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_holder_guards() {
    let (_anvil, p, d) = setup().await;
    let h = AssetHolderETH::new(d.eth_holder, p);
    let herr = |e: alloy::contract::Error| e.as_decoded_interface_error::<H>().unwrap();
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let channel = alloy_primitives::B256::repeat_byte(9);

    // Only the adjudicator sets outcomes.
    let so = h.setOutcome(
        channel,
        vec![alice.address(), bob.address()],
        vec![U256::from(1), U256::from(1)],
    );
    assert!(matches!(
        herr(so.call().await.unwrap_err()),
        H::NotAdjudicator(_)
    ));
    // The value sent must equal the amount.
    let fid = funding_id(channel, alice.address());
    let dep = h
        .deposit(fid, U256::ZERO, U256::from(10))
        .value(U256::from(9));
    assert!(matches!(
        herr(dep.call().await.unwrap_err()),
        H::WrongValue(_)
    ));
    // Nothing can be withdrawn before the outcome is set.
    let auth = WithdrawalAuth {
        channelId: channel,
        participant: alice.address(),
        receiver: alice.address(),
        amount: U256::from(10),
    };
    let hauth = HolderAuth {
        channelId: auth.channelId,
        participant: auth.participant,
        receiver: auth.receiver,
        amount: auth.amount,
    };
    let sig = alice
        .sign_hash(withdrawal_hash(d.eth_holder, U256::from(CHAIN_ID), &auth))
        .unwrap();
    let w = h.withdraw(hauth.clone(), sig_bytes(&sig));
    assert!(matches!(
        herr(w.call().await.unwrap_err()),
        H::NotSettled(_)
    ));
    // An authorisation signed by someone other than the participant.
    let forged = bob
        .sign_hash(withdrawal_hash(d.eth_holder, U256::from(CHAIN_ID), &auth))
        .unwrap();
    let w = h.withdraw(hauth.clone(), sig_bytes(&forged));
    assert!(matches!(
        herr(w.call().await.unwrap_err()),
        H::WrongSigner(_)
    ));
    // An authorisation for another holder does not verify here.
    let elsewhere = alice
        .sign_hash(withdrawal_hash(d.erc20_holder, U256::from(CHAIN_ID), &auth))
        .unwrap();
    let w = h.withdraw(hauth, sig_bytes(&elsewhere));
    assert!(matches!(
        herr(w.call().await.unwrap_err()),
        H::WrongSigner(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_confirmations() {
    use perun_adjudicator::{
        Adjudicator as _, AdjudicatorEvent, EthAdjudicator, EthConfig, SignedChannel,
    };
    use std::time::Duration;

    let (anvil, p, d) = setup().await;
    let sender = anvil.funded_account().await.unwrap();
    let cfg = EthConfig::from_deployment(&d);
    let fast = EthAdjudicator::connect(&anvil.ws_url(), &sender, cfg.clone())
        .await
        .unwrap();
    let deep_cfg = EthConfig {
        confirmations: Some(2),
        ..cfg
    };
    let deep = EthAdjudicator::new(p, sender.address(), deep_cfg)
        .await
        .unwrap();

    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let params = Params::payment(60, U256::from(3), vec![alice.address(), bob.address()]);
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.eth_holder,
    };
    let state = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::ZERO, U256::ZERO]]),
    );
    let mut signed = SignedState::new(state.clone());
    signed.sign(&params, 0, &alice).unwrap();
    signed.sign(&params, 1, &bob).unwrap();
    let mut events = deep.subscribe(state.channelId).await.unwrap();
    // The (empty) history ends with CaughtUp.
    let caught_up = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(caught_up, AdjudicatorEvent::CaughtUp { .. }));
    fast.register(&SignedChannel {
        params,
        state: signed,
    })
    .await
    .unwrap();
    // One block deep is not enough.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err()
    );
    anvil.increase_time(1).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err()
    );
    anvil.increase_time(1).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(e, AdjudicatorEvent::Registered { version: 0, state: s, .. } if s == state));
}

/// A channel listing one address twice cannot count that participant's deposit twice and
/// drain other channels' money: the holder reverts the second settlement of the same slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_participant_cannot_drain_the_holder() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let h = AssetHolderETH::new(d.eth_holder, p.clone());
    let a = LocalAccount::random();
    // Someone else's money in the holder.
    let other = funding_id(
        alloy_primitives::B256::repeat_byte(5),
        Address::repeat_byte(5),
    );
    h.deposit(other, U256::ZERO, U256::from(1_000))
        .value(U256::from(1_000))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();

    let params = Params::payment(60, U256::from(1), vec![a.address(), a.address()]);
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.eth_holder,
    };
    let mut state = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::from(10), U256::from(10)]]),
    );
    let fid = funding_id(state.channelId, a.address());
    h.deposit(fid, U256::ZERO, U256::from(10))
        .value(U256::from(10))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    state.isFinal = true;
    let sig = sig_bytes(&a.sign_hash(state.hash()).unwrap());
    let call = adj.concludeFinal((&params).into(), (&state).into(), vec![sig.clone(), sig]);
    let err = call.call().await.unwrap_err();
    assert!(matches!(
        err.as_decoded_interface_error::<H>().unwrap(),
        H::AlreadySettled(_)
    ));
}
