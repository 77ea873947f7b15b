//! The contracts themselves, called directly on anvil: Rust hashing equals
//! Solidity's, and the checks the Rust backends also make off-chain are
//! enforced on-chain too.

#![allow(clippy::unwrap_used)]

use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionReceipt;
use alloy_primitives::{Address, B256, Bytes, Signature, U256};
use perun_adjudicator::bindings::adjudicator::Adjudicator::AdjudicatorErrors as A;
use perun_adjudicator::bindings::eth_holder::AssetHolder::WithdrawalAuth as HolderAuth;
use perun_adjudicator::bindings::eth_holder::AssetHolderETH::AssetHolderETHErrors as H;
use perun_adjudicator::bindings::{Adjudicator, AssetHolderERC20, AssetHolderETH};
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::types::{WithdrawalAuth, withdrawal_hash};
use perun_adjudicator::{Deployment, deploy, funding_id};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};
use rand::Rng;

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
            chainId: random_u256(&mut rng),
            adjudicator: random_address(&mut rng),
            funding: (0..rng.gen_range(1..=3))
                .map(|_| (0..n).map(|_| random_u256(&mut rng)).collect())
                .collect(),
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
    let funding = vec![vec![U256::from(1), U256::from(2)]];
    let params = Params::payment(
        domain(&d),
        60,
        U256::from(7),
        vec![alice.address(), bob.address()],
        funding.clone(),
    );
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.eth_holder,
    };
    let state = State::initial(&params, Allocation::new(vec![asset], funding));
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
        vec![U256::from(1), U256::from(1)],
    );
    assert!(matches!(
        herr(so.call().await.unwrap_err()),
        H::NotAdjudicator(_)
    ));
    // The value sent must equal the amount.
    let dep = h
        .deposit(channel, alice.address(), U256::ZERO, U256::from(10))
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
        nonce: U256::ZERO,
    };
    let hauth = holder_auth(&auth);
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
    let (params, state) = perun_adjudicator::testing::empty_channel(
        d.adjudicator,
        vec![alice.address(), bob.address()],
        d.eth_holder,
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

/// A channel listing one address twice is refused before anything is settled, so it cannot
/// count that participant's deposit twice and drain other channels' money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_participant_cannot_drain_the_holder() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let a = LocalAccount::random();
    // Someone else's money in the holder.
    deposit_eth(
        &p,
        &d,
        alloy_primitives::B256::repeat_byte(5),
        Address::repeat_byte(5),
        0,
        1_000,
    )
    .await;
    let (params, mut state) = channel(&d, vec![a.address(), a.address()], &[&[10, 10]]);
    deposit_eth(&p, &d, state.channelId, a.address(), 0, 10).await;
    state.isFinal = true;
    let sig = sig_bytes(&a.sign_hash(state.hash()).unwrap());
    let call = adj.concludeFinal((&params).into(), (&state).into(), vec![sig.clone(), sig]);
    let err = call.call().await.unwrap_err();
    assert!(matches!(
        err.as_decoded_interface_error::<A>().unwrap(),
        A::DuplicateParticipant(e) if e.index == U256::from(1)
    ));
}

fn eth(d: &Deployment) -> Asset {
    Asset {
        chainId: U256::from(CHAIN_ID),
        holder: d.eth_holder,
    }
}

fn rows(funding: &[&[u64]]) -> Vec<Vec<U256>> {
    funding
        .iter()
        .map(|r| r.iter().map(|x| U256::from(*x)).collect())
        .collect()
}

/// A payment channel of `d` over ether, version-0 balances (and funding) `funding`.
fn channel(d: &Deployment, participants: Vec<Address>, funding: &[&[u64]]) -> (Params, State) {
    channel_over(d, participants, vec![eth(d)], funding)
}

fn channel_over(
    d: &Deployment,
    participants: Vec<Address>,
    assets: Vec<Asset>,
    funding: &[&[u64]],
) -> (Params, State) {
    let params = Params::payment(
        domain(d),
        60,
        U256::from(rand::random::<u64>()),
        participants,
        rows(funding),
    );
    let state = State::initial(&params, Allocation::new(assets, rows(funding)));
    (params, state)
}

fn sign_all(params: &Params, state: &State, parties: &[&LocalAccount]) -> Vec<Bytes> {
    let mut s = SignedState::new(state.clone());
    for (i, p) in parties.iter().enumerate() {
        s.sign(params, i, *p).unwrap();
    }
    s.signatures().unwrap().iter().map(sig_bytes).collect()
}

fn holder_auth(a: &WithdrawalAuth) -> HolderAuth {
    HolderAuth {
        channelId: a.channelId,
        participant: a.participant,
        receiver: a.receiver,
        amount: a.amount,
        nonce: a.nonce,
    }
}

async fn deposit_eth(
    p: &DynProvider,
    d: &Deployment,
    channel: alloy_primitives::B256,
    who: Address,
    expected: u64,
    amount: u64,
) -> TransactionReceipt {
    let h = AssetHolderETH::new(d.eth_holder, p.clone());
    let r = h
        .deposit(channel, who, U256::from(expected), U256::from(amount))
        .value(U256::from(amount))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(r.status());
    r
}

async fn mined(
    call: alloy::contract::CallBuilder<
        &DynProvider,
        std::marker::PhantomData<impl alloy::sol_types::SolCall>,
    >,
) -> TransactionReceipt {
    let r = call.send().await.unwrap().get_receipt().await.unwrap();
    assert!(r.status());
    r
}

/// The events of type `E` in a receipt.
fn events<E: alloy::sol_types::SolEvent>(r: &TransactionReceipt) -> Vec<E> {
    r.logs()
        .iter()
        .filter_map(|l| l.log_decode::<E>().ok())
        .map(|l| l.inner.data)
        .collect()
}

fn revert_of(e: alloy::contract::Error) -> A {
    e.as_decoded_interface_error::<A>().unwrap()
}

/// The attack: A gets B to sign a final v1, aborts, pays B in v2 (registered), then
/// tries `concludeFinal(v1)`. The old final state cannot override the registered newer one;
/// v2 concludes and B gets 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_final_state_cannot_override_a_registered_newer_one() {
    let (anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (params, s0) = channel(&d, vec![a.address(), b.address()], &[&[5, 5]]);
    deposit_eth(&p, &d, s0.channelId, a.address(), 0, 5).await;
    deposit_eth(&p, &d, s0.channelId, b.address(), 0, 5).await;
    let mut v1 = s0.next();
    v1.isFinal = true;
    let mut v2 = s0.next().next();
    v2.outcome.balances[0] = vec![U256::from(2), U256::from(8)];
    let parties = [&a, &b];
    mined(adj.register(
        (&params).into(),
        (&v2).into(),
        sign_all(&params, &v2, &parties),
    ))
    .await;
    let err = adj
        .concludeFinal(
            (&params).into(),
            (&v1).into(),
            sign_all(&params, &v1, &parties),
        )
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(err), A::VersionTooLow(e) if e.registered == 2 && e.got == 1));
    anvil.increase_time(61).await.unwrap();
    mined(adj.conclude((&params).into(), (&v2).into())).await;
    assert_eq!(p.get_balance(a.address()).await.unwrap(), U256::from(2));
    assert_eq!(p.get_balance(b.address()).await.unwrap(), U256::from(8));
}

/// Deposits above the funding stay with their depositor: 15 against 5/5 pays Alice her 10;
/// with a payment (outcome 2/8) Alice's 5 surplus comes on top of her 2. The events name the
/// channel, the participant and the amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surplus_stays_with_its_depositor() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    for (outcome, want) in [([5u64, 5u64], [10u64, 5u64]), ([2, 8], [7, 8])] {
        let (a, b) = (LocalAccount::random(), LocalAccount::random());
        let (params, s0) = channel(&d, vec![a.address(), b.address()], &[&[5, 5]]);
        let id = s0.channelId;
        let r = deposit_eth(&p, &d, id, a.address(), 0, 5).await;
        let dep = events::<AssetHolderETH::Deposited>(&r);
        assert_eq!(dep.len(), 1);
        assert_eq!(
            (dep[0].channelId, dep[0].participant, dep[0].amount),
            (id, a.address(), U256::from(5))
        );
        // Alice pays 5 too many.
        let r = deposit_eth(&p, &d, id, a.address(), 5, 5).await;
        assert_eq!(
            events::<AssetHolderETH::Deposited>(&r)[0].amount,
            U256::from(5)
        );
        deposit_eth(&p, &d, id, b.address(), 0, 5).await;
        let mut fin = s0.next();
        fin.outcome.balances[0] = outcome.iter().map(|x| U256::from(*x)).collect();
        fin.isFinal = true;
        let r = mined(adj.concludeFinal(
            (&params).into(),
            (&fin).into(),
            sign_all(&params, &fin, &[&a, &b]),
        ))
        .await;
        assert_eq!(
            p.get_balance(a.address()).await.unwrap(),
            U256::from(want[0])
        );
        assert_eq!(
            p.get_balance(b.address()).await.unwrap(),
            U256::from(want[1])
        );
        let concluded = events::<Adjudicator::Concluded>(&r);
        assert_eq!(concluded.len(), 1);
        assert_eq!(concluded[0].channelId, id);
        let set = events::<AssetHolderETH::OutcomeSet>(&r);
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].channelId, id);
        let paid: Vec<_> = events::<AssetHolderETH::Paid>(&r)
            .into_iter()
            .map(|e| (e.channelId, e.participant, e.amount))
            .collect();
        assert_eq!(
            paid,
            vec![
                (id, a.address(), U256::from(want[0])),
                (id, b.address(), U256::from(want[1]))
            ]
        );
    }
}

/// A signed withdrawal authorisation works once: replaying it reverts with `WrongNonce`, and
/// the next one must carry the next nonce. A deposit after settlement is withdrawable at once
/// (its `Deposited` event names channel, participant and amount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_authorisations_are_single_use() {
    let (anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let relayer = anvil.funded_account().await.unwrap();
    let h = AssetHolderETH::new(d.eth_holder, anvil.provider(&relayer).await.unwrap());
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let (params, s0) = channel(&d, vec![alice.address(), bob.address()], &[&[0, 0]]);
    let mut fin = s0.next();
    fin.isFinal = true;
    mined(adj.concludeFinal(
        (&params).into(),
        (&fin).into(),
        sign_all(&params, &fin, &[&alice, &bob]),
    ))
    .await;
    let r = deposit_eth(&p, &d, s0.channelId, alice.address(), 0, 4).await;
    let deposited = events::<AssetHolderETH::Deposited>(&r);
    assert_eq!(
        (
            deposited[0].channelId,
            deposited[0].participant,
            deposited[0].amount
        ),
        (s0.channelId, alice.address(), U256::from(4))
    );
    assert!(
        h.holdings(s0.channelId, alice.address())
            .call()
            .await
            .unwrap()
            .settled
    );
    let receiver = LocalAccount::random().address();
    let auth = |nonce: u64| WithdrawalAuth {
        channelId: s0.channelId,
        participant: alice.address(),
        receiver,
        amount: U256::from(1),
        nonce: U256::from(nonce),
    };
    let signed = |a: &WithdrawalAuth| {
        sig_bytes(
            &alice
                .sign_hash(withdrawal_hash(d.eth_holder, U256::from(CHAIN_ID), a))
                .unwrap(),
        )
    };
    let first = auth(0);
    let r = mined(h.withdraw(holder_auth(&first), signed(&first))).await;
    let w = events::<AssetHolderETH::Withdrawn>(&r);
    assert_eq!(
        (w[0].channelId, w[0].participant, w[0].receiver, w[0].amount),
        (s0.channelId, alice.address(), receiver, U256::from(1))
    );
    for _ in 0..3 {
        let err = h
            .withdraw(holder_auth(&first), signed(&first))
            .call()
            .await
            .unwrap_err();
        assert!(matches!(
            err.as_decoded_interface_error::<H>().unwrap(),
            H::WrongNonce(e) if e.expected == U256::from(1) && e.got == U256::ZERO
        ));
    }
    let second = auth(1);
    mined(h.withdraw(holder_auth(&second), signed(&second))).await;
    assert_eq!(p.get_balance(receiver).await.unwrap(), U256::from(2));
    assert_eq!(
        h.withdrawNonces(alice.address()).call().await.unwrap(),
        U256::from(2)
    );
}

/// The adjudicator checks what only the client checked before: distinct participants, a
/// challenge duration within 1 s ..= 365 days, and the params' chain and deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_are_checked_on_chain() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let try_register = |params: Params, parties: Vec<LocalAccount>| {
        let adj = adj.clone();
        async move {
            let (_, s) = (
                0,
                State::initial(
                    &params,
                    Allocation::new(
                        vec![eth(&d)],
                        vec![vec![U256::ZERO; params.participants.len()]],
                    ),
                ),
            );
            let refs: Vec<&LocalAccount> = parties.iter().collect();
            let sigs = sign_all(&params, &s, &refs);
            adj.register((&params).into(), (&s).into(), sigs)
                .call()
                .await
                .map(|_| ())
        }
    };
    let (base, _) = channel(&d, vec![a.address(), b.address()], &[&[0, 0]]);
    let both = || vec![a.clone(), b.clone()];
    try_register(base.clone(), both()).await.unwrap();
    let mut dup = base.clone();
    dup.participants = vec![a.address(), b.address(), a.address()];
    dup.funding = vec![vec![U256::ZERO; 3]];
    let err = try_register(dup, vec![a.clone(), b.clone(), a.clone()])
        .await
        .unwrap_err();
    assert!(matches!(revert_of(err), A::DuplicateParticipant(e) if e.index == U256::from(2)));
    for cd in [0, 365 * 24 * 3600 + 1] {
        let mut q = base.clone();
        q.challengeDuration = cd;
        let err = try_register(q, both()).await.unwrap_err();
        assert!(matches!(revert_of(err), A::ChallengeDuration(e) if e.got == cd));
    }
    let mut q = base.clone();
    q.challengeDuration = 365 * 24 * 3600;
    try_register(q, both()).await.unwrap();
    // Another chain, another deployment.
    let mut q = base.clone();
    q.chainId = U256::from(1);
    let err = try_register(q, both()).await.unwrap_err();
    assert!(matches!(
        revert_of(err),
        A::WrongDomain(e) if e.chainId == U256::from(1) && e.adjudicator == d.adjudicator
    ));
    let mut q = base.clone();
    q.adjudicator = d.eth_holder;
    let err = try_register(q, both()).await.unwrap_err();
    assert!(matches!(
        revert_of(err),
        A::WrongDomain(e) if e.chainId == U256::from(CHAIN_ID) && e.adjudicator == d.eth_holder
    ));
    // Funding with a row too short.
    let mut q = base;
    q.funding = vec![vec![U256::ZERO]];
    let err = try_register(q, both()).await.unwrap_err();
    assert!(matches!(revert_of(err), A::Dimensions(_)));
}

/// A state signed for one deployment is refused by another deployment on the same chain:
/// the channel id binds the adjudicator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_of_another_deployment_is_refused() {
    let (_anvil, p, d) = setup().await;
    let other = deploy(&p).await.unwrap();
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (params, s0) = channel(&d, vec![a.address(), b.address()], &[&[0, 0]]);
    let sigs = sign_all(&params, &s0, &[&a, &b]);
    let theirs = Adjudicator::new(other.adjudicator, p.clone());
    let err = theirs
        .register((&params).into(), (&s0).into(), sigs.clone())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(err), A::WrongDomain(e) if e.adjudicator == d.adjudicator));
    // Rebinding the params to the other deployment changes the id: the signatures are worthless.
    let mut q = params.clone();
    q.adjudicator = other.adjudicator;
    let mut s = s0.clone();
    s.channelId = q.channel_id();
    let err = theirs
        .register((&q).into(), (&s).into(), sigs)
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(err), A::WrongSigner(_)));
}

/// Registering the registered state again is a no-op (no revert, no event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_the_registered_state_again_is_a_no_op() {
    let (_anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (params, s0) = channel(&d, vec![a.address(), b.address()], &[&[0, 0]]);
    let s1 = s0.next();
    let sigs = sign_all(&params, &s1, &[&a, &b]);
    let r = mined(adj.register((&params).into(), (&s1).into(), sigs.clone())).await;
    assert_eq!(events::<Adjudicator::Registered>(&r).len(), 1);
    let before = adj.disputes(s1.channelId).call().await.unwrap();
    let r = mined(adj.register((&params).into(), (&s1).into(), sigs)).await;
    assert!(r.logs().is_empty());
    let after = adj.disputes(s1.channelId).call().await.unwrap();
    assert_eq!(
        (before.version, before.timeout, before.phase),
        (after.version, after.timeout, after.phase)
    );
}

/// A holder without code, a holder of another deployment and a holder listed a second time
/// are skipped (`OutcomeSkipped`), and the channel's good asset is paid out regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_holder_does_not_block_the_good_asset() {
    let (_anvil, p, d) = setup().await;
    let other = deploy(&p).await.unwrap();
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let eoa = LocalAccount::random().address();
    let on_chain = |holder| Asset {
        chainId: U256::from(CHAIN_ID),
        holder,
    };
    let (params, s0) = channel_over(
        &d,
        vec![a.address(), b.address()],
        vec![on_chain(eoa), eth(&d), on_chain(other.eth_holder), eth(&d)],
        &[&[0, 0], &[3, 4], &[0, 0], &[0, 0]],
    );
    deposit_eth(&p, &d, s0.channelId, a.address(), 0, 3).await;
    deposit_eth(&p, &d, s0.channelId, b.address(), 0, 4).await;
    let mut fin = s0.next();
    fin.isFinal = true;
    let r = mined(adj.concludeFinal(
        (&params).into(),
        (&fin).into(),
        sign_all(&params, &fin, &[&a, &b]),
    ))
    .await;
    assert_eq!(p.get_balance(a.address()).await.unwrap(), U256::from(3));
    assert_eq!(p.get_balance(b.address()).await.unwrap(), U256::from(4));
    let skipped: Vec<_> = events::<Adjudicator::OutcomeSkipped>(&r)
        .into_iter()
        .map(|e| (e.channelId, e.holder))
        .collect();
    let id = s0.channelId;
    assert_eq!(
        skipped,
        vec![(id, eoa), (id, other.eth_holder), (id, d.eth_holder)]
    );
}

/// A fee-on-transfer token is credited with what arrived, not what was sent; an under-funded
/// slot then refunds exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fee_on_transfer_deposits_credit_what_arrived() {
    use perun_adjudicator::bindings::{AssetHolderERC20, TestFeeToken};
    let (anvil, p, d) = setup().await;
    let me = anvil.funded_account().await.unwrap();
    let pm = anvil.provider(&me).await.unwrap();
    let token = *TestFeeToken::deploy(pm.clone()).await.unwrap().address();
    let holder = *AssetHolderERC20::deploy(pm.clone(), d.adjudicator, token)
        .await
        .unwrap()
        .address();
    let t = TestFeeToken::new(token, pm.clone());
    mined(t.mint(me.address(), U256::from(1_000))).await;
    mined(t.approve(holder, U256::from(100))).await;
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let asset = Asset {
        chainId: U256::from(CHAIN_ID),
        holder,
    };
    let (params, s0) = channel_over(
        &d,
        vec![a.address(), b.address()],
        vec![asset],
        &[&[100, 0]],
    );
    let h = AssetHolderETH::new(holder, pm.clone());
    let r = mined(h.deposit(s0.channelId, a.address(), U256::ZERO, U256::from(100))).await;
    let dep = events::<AssetHolderETH::Deposited>(&r);
    assert_eq!(
        (dep[0].amount, U256::from(99)),
        (U256::from(99), U256::from(99))
    );
    let held = h.holdings(s0.channelId, a.address()).call().await.unwrap();
    assert_eq!(held.amount, U256::from(99));
    // 99 < 100: the slot is short of its funding, so Alice gets back what arrived (less the
    // token's fee on the way out).
    let mut fin = s0.next();
    fin.outcome.balances[0] = vec![U256::ZERO, U256::from(100)];
    fin.isFinal = true;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let r = mined(adj.concludeFinal(
        (&params).into(),
        (&fin).into(),
        sign_all(&params, &fin, &[&a, &b]),
    ))
    .await;
    let paid = events::<AssetHolderETH::Paid>(&r);
    assert_eq!(paid.len(), 1);
    assert_eq!(
        (paid[0].participant, paid[0].amount),
        (a.address(), U256::from(99))
    );
}

// Attacks found in review: a payout that calls back into the next holder, and a deposit aimed
// at another variable's slot.

fn u(x: u64) -> U256 {
    U256::from(x)
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

/// A move is exactly one version on: a jump (here to 2^64 - 1, after which
/// no answer could follow, or skipping one) is refused by the adjudicator
/// itself (`VersionStep`); the move at the next version lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_must_be_one_version_on() {
    use perun_channel::tictactoe::TicTacToe;
    let (anvil, p, d) = setup().await;
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    let app = perun_adjudicator::deploy_tictactoe(&p).await.unwrap();
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let (mut params, _) = channel(&d, vec![a.address(), b.address()], &[&[5, 5]]);
    params.app = app;
    let mut s0 = State::initial(&params, Allocation::new(vec![eth(&d)], rows(&[&[5, 5]])));
    s0.appData = TicTacToe::initial_data(0);
    let parties = [&a, &b];
    mined(adj.register(
        (&params).into(),
        (&s0).into(),
        sign_all(&params, &s0, &parties),
    ))
    .await;
    anvil.increase_time(61).await.unwrap();
    let mv = TicTacToe.play(&params, &s0, 0, 4).unwrap();
    for version in [u64::MAX, 2] {
        let mut to = mv.clone();
        to.version = version;
        let sig = a.sign_hash(to.hash()).unwrap();
        let err = adj
            .progress(
                (&params).into(),
                (&s0).into(),
                (&to).into(),
                U256::ZERO,
                sig_bytes(&sig),
            )
            .call()
            .await
            .unwrap_err();
        assert!(
            matches!(revert_of(err), A::VersionStep(e) if e.registered == 0 && e.got == version),
            "version {version}"
        );
    }
    let sig = a.sign_hash(mv.hash()).unwrap();
    mined(adj.progress(
        (&params).into(),
        (&s0).into(),
        (&mv).into(),
        U256::ZERO,
        sig_bytes(&sig),
    ))
    .await;
}
