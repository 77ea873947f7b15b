//! The conformance suite: every scenario runs against SimLedger and anvil, with
//! ether and with an ERC20 token, and must give the same results and errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, Bytes, Signature, U256};
use common::{Env, Kind, board, next_event, within};
use perun_adjudicator::types::{WithdrawalAuth, withdrawal_hash};
use perun_adjudicator::{
    AdjudicatorEvent, AppRevert, Error, FundingRequest, ProgressRequest, RevertReason,
    SignedChannel, WithdrawRequest,
};
use perun_channel::tictactoe::Illegal;
use perun_channel::{Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

const CHALLENGE: u64 = 100;

/// secp256k1's order: `(r, n - s, !v)` is the malleable twin of a signature.
fn high_s_twin(sig: &Signature) -> Signature {
    let n = U256::from_be_slice(&[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ]);
    Signature::new(sig.r(), n - sig.s(), !sig.v())
}

async fn fund_all(env: &Env, params: &Params, state: &State) {
    let reqs = (0..env.parties.len()).map(|i| {
        env.funders[i].fund(FundingRequest {
            params: params.clone(),
            state: state.clone(),
            index: i,
            timeout: Duration::from_secs(20),
        })
    });
    for r in futures_util::future::join_all(reqs).await {
        r.unwrap();
    }
}

fn withdraw_req(
    env: &Env,
    params: &Params,
    state: &State,
    i: usize,
    receiver: Address,
) -> WithdrawRequest {
    WithdrawRequest {
        params: params.clone(),
        state: state.clone(),
        index: i,
        account: env.parties[i].clone(),
        receiver,
    }
}

fn signed(params: &Params, state: perun_channel::SignedState) -> SignedChannel {
    SignedChannel {
        params: params.clone(),
        state,
    }
}

/// Fund, close cooperatively with a final state: payouts arrive at once; withdrawing
/// afterwards (twice) pays nothing and is Ok.
async fn cooperative_close(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, state0) = env.channel(CHALLENGE, &[100, 50]);
    fund_all(&env, &params, &state0).await;
    assert_eq!(env.holdings(&state0, a).await, (U256::from(100), false));
    assert_eq!(env.holdings(&state0, b).await, (U256::from(50), false));
    // Funding again deposits nothing more.
    fund_all(&env, &params, &state0).await;
    assert_eq!(env.holdings(&state0, a).await, (U256::from(100), false));
    let mut events = env.adj[0].subscribe(state0.channelId).await.unwrap();

    let before = (env.balance(a).await, env.balance(b).await);
    let mut fin = state0.next();
    fin.outcome.balances[0] = vec![U256::from(30), U256::from(120)];
    fin.isFinal = true;
    let fin_signed = signed(&params, env.sign_all(&params, &fin));
    env.adj[1].conclude(&fin_signed).await.unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(30),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(b).await,
        before.1 + U256::from(120),
        "{}",
        env.name
    );
    let d = env.adj[0].dispute(state0.channelId).await.unwrap().unwrap();
    assert!(d.concluded);
    assert_eq!(d.version, 1);
    assert!(matches!(
        env.adj[0].conclude(&fin_signed).await,
        Err(Error::AlreadyConcluded)
    ));

    for _ in 0..2 {
        env.adj[0]
            .withdraw(&withdraw_req(&env, &params, &fin, 0, a))
            .await
            .unwrap();
        env.adj[1]
            .withdraw(&withdraw_req(&env, &params, &fin, 1, b))
            .await
            .unwrap();
    }
    assert_eq!(env.balance(a).await, before.0 + U256::from(30));
    assert_eq!(env.balance(b).await, before.1 + U256::from(120));
    assert_eq!(env.holdings(&fin, a).await, (U256::ZERO, true));

    let e = within("Concluded", next_event(&mut events))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e,
        AdjudicatorEvent::Concluded {
            id: state0.channelId,
            version: 1
        }
    );
}

/// One party never funds: the funding timeout names it; the funded party then recovers
/// its deposit by registering version 0 and concluding the under-funded channel.
async fn funding_timeout_then_recover(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, state0) = env.channel(CHALLENGE, &[70, 30]);
    let err = env.funders[0]
        .fund(FundingRequest {
            params: params.clone(),
            state: state0.clone(),
            index: 0,
            timeout: Duration::from_millis(500),
        })
        .await
        .unwrap_err();
    match err {
        Error::FundingTimeout { missing } => assert_eq!(missing, vec![(1, b)], "{}", env.name),
        other => panic!("{}: expected FundingTimeout, got {other:?}", env.name),
    }
    assert_eq!(env.holdings(&state0, a).await, (U256::from(70), false));

    let before = env.balance(a).await;
    let s0 = signed(&params, env.sign_all(&params, &state0));
    env.adj[0].register(&s0).await.unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    env.adj[0].conclude(&s0).await.unwrap();
    // Under-funded: each gets back exactly its deposit (a: 70, b: nothing).
    assert_eq!(
        env.balance(a).await,
        before + U256::from(70),
        "{}",
        env.name
    );
    assert_eq!(env.holdings(&state0, b).await, (U256::ZERO, true));
    env.adj[0]
        .withdraw(&withdraw_req(&env, &params, &state0, 0, a))
        .await
        .unwrap();
    assert_eq!(env.balance(a).await, before + U256::from(70));
}

/// Register, refute, the version and timeout rules, conclude, events in chain order.
async fn dispute_rules(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, state0) = env.channel(CHALLENGE, &[100, 100]);
    fund_all(&env, &params, &state0).await;
    let id = state0.channelId;
    let mut events = env.adj[1].subscribe(id).await.unwrap();

    let mut s1 = state0.next();
    s1.outcome.balances[0] = vec![U256::from(90), U256::from(110)];
    let mut s2 = s1.next();
    s2.outcome.balances[0] = vec![U256::from(80), U256::from(120)];
    let s3 = s2.next();
    let (s1s, s2s, s3s) = (
        signed(&params, env.sign_all(&params, &s1)),
        signed(&params, env.sign_all(&params, &s2)),
        signed(&params, env.sign_all(&params, &s3)),
    );

    assert!(matches!(
        env.adj[0].conclude(&s1s).await,
        Err(Error::NotRegistered)
    ));
    env.adj[0].register(&s1s).await.unwrap();
    let d1 = env.adj[1].dispute(id).await.unwrap().unwrap();
    assert_eq!(
        (d1.version, d1.concluded, d1.state_hash),
        (1, false, s1.hash())
    );
    // Refute with a higher version; the timeout stays.
    env.adj[1].register(&s2s).await.unwrap();
    let d2 = env.adj[0].dispute(id).await.unwrap().unwrap();
    assert_eq!(
        (d2.version, d2.timeout, d2.state_hash),
        (2, d1.timeout, s2.hash())
    );
    // The registered state again is a no-op; lower versions are rejected.
    env.adj[0].register(&s2s).await.unwrap();
    assert_eq!(env.adj[0].dispute(id).await.unwrap().unwrap(), d2);
    assert!(matches!(
        env.adj[0].register(&s1s).await,
        Err(Error::VersionTooLow {
            registered: 2,
            got: 1
        })
    ));
    // Conclude before the timeout is rejected.
    assert!(matches!(
        env.adj[0].conclude(&s2s).await,
        Err(Error::TimeoutNotPassed { .. })
    ));

    env.ctl.advance(CHALLENGE + 1).await;
    // Refute after the timeout is rejected.
    assert!(matches!(
        env.adj[0].register(&s3s).await,
        Err(Error::TimeoutPassed)
    ));
    // Only the registered state concludes.
    assert!(matches!(
        env.adj[0].conclude(&s1s).await,
        Err(Error::WrongState)
    ));
    let before = (env.balance(a).await, env.balance(b).await);
    env.adj[0].conclude(&s2s).await.unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(80),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(b).await,
        before.1 + U256::from(120),
        "{}",
        env.name
    );
    assert!(matches!(
        env.adj[1].conclude(&s2s).await,
        Err(Error::AlreadyConcluded)
    ));
    assert!(matches!(
        env.adj[1].register(&s3s).await,
        Err(Error::AlreadyConcluded)
    ));
    assert!(env.adj[0].dispute(id).await.unwrap().unwrap().concluded);

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            within("events", next_event(&mut events))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        matches!(&got[0], AdjudicatorEvent::Registered { version: 1, state, timeout, nonce, .. } if *state == s1 && *timeout == d1.timeout && *nonce == params.nonce)
    );
    assert!(
        matches!(&got[1], AdjudicatorEvent::Registered { version: 2, state, nonce, .. } if *state == s2 && *nonce == params.nonce)
    );
    assert_eq!(got[2], AdjudicatorEvent::Concluded { id, version: 2 });
    // A late subscriber sees the same history.
    let mut late = env.adj[0].subscribe(id).await.unwrap();
    for want in &got {
        assert_eq!(&within("replay", late.next()).await.unwrap().unwrap(), want);
    }
}

/// Too few signatures, forged and high-s signatures, non-participants, early withdrawal,
/// a deposit larger than the depositor's funds.
/// Makes `params.funding` the state's balances again after a test changed them, and the
/// state's channel id follow.
fn rebind(params: &mut Params, state: &mut State) {
    params.funding = state.outcome.balances.clone();
    state.channelId = params.channel_id();
}

async fn bad_input(env: Env) {
    let (mut params, mut big) = env.channel(CHALLENGE, &[1, 1]);
    big.outcome.balances[0][0] = common::start_funds() * U256::from(10_000);
    rebind(&mut params, &mut big);
    let err = env.funders[0]
        .fund(FundingRequest {
            params: params.clone(),
            state: big.clone(),
            index: 0,
            timeout: Duration::from_millis(100),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InsufficientFunds { .. }),
        "{}: {err:?}",
        env.name
    );
    assert_eq!(
        env.holdings(&big, env.parties[0].address()).await,
        (U256::ZERO, false)
    );
    // The same holder twice: such a channel could never conclude, so nobody funds it.
    let (mut params2, mut twice) = env.channel(CHALLENGE, &[1, 1]);
    twice.outcome.assets.push(env.asset.clone());
    twice
        .outcome
        .balances
        .push(vec![U256::from(1), U256::from(1)]);
    rebind(&mut params2, &mut twice);
    let err = env.funders[0]
        .fund(FundingRequest {
            params: params2,
            state: twice,
            index: 0,
            timeout: Duration::from_millis(100),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Channel(perun_channel::Error::DuplicateAsset(1))),
        "{}: {err:?}",
        env.name
    );

    let (params, state0) = env.channel(CHALLENGE, &[10, 10]);
    fund_all(&env, &params, &state0).await;
    let s1 = state0.next();
    let full = env.sign_all(&params, &s1);

    let mut partial = perun_channel::SignedState::new(s1.clone());
    partial.sign(&params, 0, env.parties[0].as_ref()).unwrap();
    partial.sigs[1] = None;
    assert!(matches!(
        env.adj[0].register(&signed(&params, partial)).await,
        Err(Error::TooFewSignatures {
            expected: 2,
            got: 1
        })
    ));
    let mut short = full.clone();
    short.sigs.pop();
    assert!(matches!(
        env.adj[0].register(&signed(&params, short)).await,
        Err(Error::TooFewSignatures { .. })
    ));

    let mallory = LocalAccount::random();
    let mut forged = full.clone();
    forged.sigs[1] = Some(mallory.sign_hash(s1.hash()).unwrap());
    assert!(matches!(
        env.adj[0].register(&signed(&params, forged)).await,
        Err(Error::BadSignature { index: 1 })
    ));
    let mut twin = full.clone();
    twin.sigs[0] = Some(high_s_twin(&full.sigs[0].unwrap()));
    assert!(matches!(
        env.adj[0].register(&signed(&params, twin)).await,
        Err(Error::BadSignature { index: 0 })
    ));
    // Nothing was registered by the rejected calls.
    assert_eq!(env.adj[0].dispute(state0.channelId).await.unwrap(), None);

    // Withdrawing before conclusion, and by a non-participant.
    let req = withdraw_req(&env, &params, &s1, 0, env.parties[0].address());
    assert!(matches!(
        env.adj[0].withdraw(&req).await,
        Err(Error::NotConcluded)
    ));
    let stranger = WithdrawRequest {
        account: Arc::new(mallory.clone()),
        ..req.clone()
    };
    assert!(
        matches!(env.adj[0].withdraw(&stranger).await, Err(Error::NotParticipant(x)) if x == mallory.address())
    );
    let wrong_index = WithdrawRequest { index: 1, ..req };
    assert!(matches!(
        env.adj[0].withdraw(&wrong_index).await,
        Err(Error::NotParticipant(_))
    ));
}

/// A participant whose address reverts on payment does not block the others: the push
/// to it fails and leaves a credit, which it withdraws to another receiver with a
/// signed authorisation; forged and high-s authorisations are refused.
async fn reverting_receiver(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, state0) = env.channel(CHALLENGE, &[40, 60]);
    fund_all(&env, &params, &state0).await;
    env.ctl.set_rejecting(b).await;
    let mut fin = state0.next();
    fin.isFinal = true;
    let before_a = env.balance(a).await;
    env.adj[0]
        .conclude(&signed(&params, env.sign_all(&params, &fin)))
        .await
        .unwrap();
    assert_eq!(
        env.balance(a).await,
        before_a + U256::from(40),
        "{}",
        env.name
    );
    assert_eq!(
        env.holdings(&fin, b).await,
        (U256::from(60), true),
        "{}",
        env.name
    );

    let holder = env.asset.holder;
    let receiver = LocalAccount::random().address();
    let auth = WithdrawalAuth {
        channelId: fin.channelId,
        participant: b,
        receiver,
        amount: U256::from(60),
        nonce: U256::ZERO,
    };
    let hash = withdrawal_hash(holder, env.asset.chainId, &auth);
    let mallory = LocalAccount::random();
    let forged = mallory.sign_hash(hash).unwrap();
    assert!(matches!(
        env.ctl
            .withdraw_signed(holder, &auth, Bytes::from(forged.as_bytes().to_vec()))
            .await,
        Err(Error::BadAuthorization)
    ));
    let good = env.parties[1].sign_hash(hash).unwrap();
    let twin = high_s_twin(&good);
    let r = env
        .ctl
        .withdraw_signed(holder, &auth, Bytes::from(twin.as_bytes().to_vec()))
        .await;
    assert!(
        matches!(r, Err(Error::BadAuthorization)),
        "{}: {r:?}",
        env.name
    );
    // An authorisation for another receiver does not carry over.
    let redirected = WithdrawalAuth {
        receiver: mallory.address(),
        ..auth.clone()
    };
    assert!(matches!(
        env.ctl
            .withdraw_signed(holder, &redirected, Bytes::from(good.as_bytes().to_vec()))
            .await,
        Err(Error::BadAuthorization)
    ));
    // Withdrawing to the reverting address itself fails and changes nothing.
    assert!(matches!(
        env.adj[1]
            .withdraw(&withdraw_req(&env, &params, &fin, 1, b))
            .await,
        Err(Error::PaymentFailed(x)) if x == b
    ));
    assert_eq!(env.holdings(&fin, b).await, (U256::from(60), true));

    env.adj[1]
        .withdraw(&withdraw_req(&env, &params, &fin, 1, receiver))
        .await
        .unwrap();
    assert_eq!(env.balance(receiver).await, U256::from(60), "{}", env.name);
    env.adj[1]
        .withdraw(&withdraw_req(&env, &params, &fin, 1, receiver))
        .await
        .unwrap();
    assert_eq!(env.balance(receiver).await, U256::from(60));
    assert_eq!(env.holdings(&fin, b).await, (U256::ZERO, true));
    let mut events = env.adj[0].subscribe(fin.channelId).await.unwrap();
    let e1 = within("Concluded", next_event(&mut events))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(e1, AdjudicatorEvent::Concluded { version: 1, .. }));
    let e2 = within("Withdrawn", next_event(&mut events))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e2,
        AdjudicatorEvent::Withdrawn {
            id: fin.channelId,
            holder,
            participant: b,
            receiver,
            amount: U256::from(60)
        }
    );
}

/// A channel over both assets, closed by dispute: every asset's outcome is pushed.
async fn multi_asset_dispute(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let row = |x: u64, y: u64| vec![U256::from(x), U256::from(y)];
    let (params, state0) = env.channel_over(
        CHALLENGE,
        vec![env.asset.clone(), env.other_asset.clone()],
        vec![vec![10, 20], vec![30, 40]],
    );
    fund_all(&env, &params, &state0).await;
    let mut s1 = state0.next();
    s1.outcome.balances = vec![row(25, 5), row(0, 70)];
    env.adj[1]
        .register(&signed(&params, env.sign_all(&params, &s1)))
        .await
        .unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    let (h0, h1) = (env.asset.holder, env.other_asset.holder);
    let before = [
        env.ctl.balance(h0, a).await,
        env.ctl.balance(h0, b).await,
        env.ctl.balance(h1, a).await,
        env.ctl.balance(h1, b).await,
    ];
    env.adj[1]
        .conclude(&signed(&params, env.sign_all(&params, &s1)))
        .await
        .unwrap();
    let after = [
        env.ctl.balance(h0, a).await,
        env.ctl.balance(h0, b).await,
        env.ctl.balance(h1, a).await,
        env.ctl.balance(h1, b).await,
    ];
    let gained: Vec<U256> = after.iter().zip(&before).map(|(x, y)| *x - *y).collect();
    assert_eq!(
        gained,
        vec![U256::from(25), U256::from(5), U256::ZERO, U256::from(70)],
        "{}",
        env.name
    );
}

/// Three parties, only the first funds: the timeout names both others; after the
/// second funds, only the third. Concluding version 0 refunds exactly the deposits.
async fn three_party_funding(env: Env) {
    let addrs = env.addresses();
    let (params, state0) = env.channel(CHALLENGE, &[5, 6, 7]);
    let fund = |i: usize| {
        env.funders[i].fund(FundingRequest {
            params: params.clone(),
            state: state0.clone(),
            index: i,
            timeout: Duration::from_millis(300),
        })
    };
    match fund(0).await {
        Err(Error::FundingTimeout { missing }) => {
            assert_eq!(missing, vec![(1, addrs[1]), (2, addrs[2])], "{}", env.name)
        }
        other => panic!("{}: {other:?}", env.name),
    }
    match fund(1).await {
        Err(Error::FundingTimeout { missing }) => assert_eq!(missing, vec![(2, addrs[2])]),
        other => panic!("{}: {other:?}", env.name),
    }
    let before: Vec<U256> =
        futures_util::future::join_all(addrs.iter().map(|a| env.balance(*a))).await;
    let s0 = signed(&params, env.sign_all(&params, &state0));
    env.adj[2].register(&s0).await.unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    env.adj[2].conclude(&s0).await.unwrap();
    let after: Vec<U256> =
        futures_util::future::join_all(addrs.iter().map(|a| env.balance(*a))).await;
    let gained: Vec<U256> = after.iter().zip(&before).map(|(x, y)| *x - *y).collect();
    assert_eq!(
        gained,
        vec![U256::from(5), U256::from(6), U256::ZERO],
        "{}",
        env.name
    );
}

/// A deposit names the holdings it expects: one computed from a stale read
/// is refused with `HoldingsChanged` (naming the slot, the expectation and
/// what is held) and moves nothing; funding then tops up exactly the rest.
async fn deposits_name_the_holdings_they_expect(env: Env) {
    let a = env.parties[0].address();
    let (params, state0) = env.channel(CHALLENGE, &[100, 0]);
    let (holder, id) = (env.asset.holder, state0.channelId);
    let thirty = U256::from(30);
    env.ctl
        .deposit(holder, id, a, U256::ZERO, thirty)
        .await
        .unwrap();
    assert_eq!(env.holdings(&state0, a).await, (thirty, false));
    match env.ctl.deposit(holder, id, a, U256::ZERO, thirty).await {
        Err(Error::HoldingsChanged {
            funding_id,
            expected,
            found,
        }) => {
            assert_eq!(funding_id, perun_adjudicator::funding_id(id, a));
            assert_eq!(
                (expected, found),
                (U256::ZERO, Some(thirty)),
                "{}",
                env.name
            );
        }
        other => panic!("{}: expected HoldingsChanged, got {other:?}", env.name),
    }
    assert_eq!(env.holdings(&state0, a).await, (thirty, false));
    env.funders[0]
        .fund(FundingRequest {
            params,
            state: state0.clone(),
            index: 0,
            timeout: Duration::from_secs(20),
        })
        .await
        .unwrap();
    assert_eq!(
        env.holdings(&state0, a).await,
        (U256::from(100), false),
        "{}",
        env.name
    );
}

/// The attack on both backends: a final v1 cannot conclude over a registered v2;
/// v2 concludes after its timeout and B gets 8.
async fn old_final_state_loses_to_registered_newer_one(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, s0) = env.channel(CHALLENGE, &[5, 5]);
    fund_all(&env, &params, &s0).await;
    let mut v1 = s0.next();
    v1.isFinal = true;
    let mut v2 = v1.next();
    v2.isFinal = false;
    v2.outcome.balances[0] = vec![U256::from(2), U256::from(8)];
    let v2s = signed(&params, env.sign_all(&params, &v2));
    env.adj[1].register(&v2s).await.unwrap();
    let r = env.adj[0]
        .conclude(&signed(&params, env.sign_all(&params, &v1)))
        .await;
    assert!(
        matches!(
            r,
            Err(Error::VersionTooLow {
                registered: 2,
                got: 1
            })
        ),
        "{}: {r:?}",
        env.name
    );
    let before = (env.balance(a).await, env.balance(b).await);
    env.ctl.advance(CHALLENGE + 1).await;
    env.adj[1].conclude(&v2s).await.unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(2),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(b).await,
        before.1 + U256::from(8),
        "{}",
        env.name
    );
}

/// Alice overpays by 5: the outcome 2/8 is paid, and her surplus comes back on top (7).
async fn surplus_goes_back_to_its_depositor(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, s0) = env.channel(CHALLENGE, &[5, 5]);
    fund_all(&env, &params, &s0).await;
    let five = U256::from(5);
    env.ctl
        .deposit(env.asset.holder, s0.channelId, a, five, five)
        .await
        .unwrap();
    assert_eq!(env.holdings(&s0, a).await, (U256::from(10), false));
    let mut fin = s0.next();
    fin.outcome.balances[0] = vec![U256::from(2), U256::from(8)];
    fin.isFinal = true;
    let before = (env.balance(a).await, env.balance(b).await);
    env.adj[1]
        .conclude(&signed(&params, env.sign_all(&params, &fin)))
        .await
        .unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(7),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(b).await,
        before.1 + U256::from(8),
        "{}",
        env.name
    );
    assert_eq!(env.holdings(&fin, a).await, (U256::ZERO, true));
}

/// A signed withdrawal authorisation works once (`WrongNonce` on replay, the next needs the
/// next nonce), and a deposit after settlement adds to a credit instead of replacing it.
async fn withdrawal_auth_is_single_use_and_credits_add(env: Env) {
    let b = env.parties[1].address();
    let (params, s0) = env.channel(CHALLENGE, &[40, 60]);
    fund_all(&env, &params, &s0).await;
    env.ctl.set_rejecting(b).await;
    let mut fin = s0.next();
    fin.isFinal = true;
    env.adj[0]
        .conclude(&signed(&params, env.sign_all(&params, &fin)))
        .await
        .unwrap();
    assert_eq!(env.holdings(&fin, b).await, (U256::from(60), true));
    let holder = env.asset.holder;
    let receiver = LocalAccount::random().address();
    let auth = |nonce: u64| WithdrawalAuth {
        channelId: fin.channelId,
        participant: b,
        receiver,
        amount: U256::from(10),
        nonce: U256::from(nonce),
    };
    let sig = |a: &WithdrawalAuth| {
        let hash = withdrawal_hash(holder, env.asset.chainId, a);
        Bytes::from(env.parties[1].sign_hash(hash).unwrap().as_bytes().to_vec())
    };
    let first = auth(0);
    env.ctl
        .withdraw_signed(holder, &first, sig(&first))
        .await
        .unwrap();
    for _ in 0..2 {
        let r = env.ctl.withdraw_signed(holder, &first, sig(&first)).await;
        assert!(
            matches!(&r, Err(Error::WrongNonce { expected, got }) if *expected == U256::from(1) && got.is_zero()),
            "{}: {r:?}",
            env.name
        );
    }
    let second = auth(1);
    env.ctl
        .withdraw_signed(holder, &second, sig(&second))
        .await
        .unwrap();
    assert_eq!(env.balance(receiver).await, U256::from(20), "{}", env.name);
    assert_eq!(env.holdings(&fin, b).await, (U256::from(40), true));
    // A deposit after settlement is credited on top.
    env.ctl
        .deposit(holder, fin.channelId, b, U256::from(40), U256::from(5))
        .await
        .unwrap();
    assert_eq!(
        env.holdings(&fin, b).await,
        (U256::from(45), true),
        "{}",
        env.name
    );
    // The backend's own withdrawal (signed with the current nonce where it must be) takes the rest.
    env.adj[1]
        .withdraw(&withdraw_req(&env, &params, &fin, 1, receiver))
        .await
        .unwrap();
    assert_eq!(env.balance(receiver).await, U256::from(65), "{}", env.name);
}

/// A channel naming another chain or adjudicator is refused before any transaction.
async fn another_domain_is_refused(env: Env) {
    let (params, s0) = env.channel(CHALLENGE, &[0, 0]);
    let elsewhere = [
        perun_channel::Domain {
            chain_id: env.domain.chain_id + U256::from(1),
            ..env.domain
        },
        perun_channel::Domain {
            adjudicator: Address::repeat_byte(0x77),
            ..env.domain
        },
    ];
    for domain in elsewhere {
        let mut p = params.clone();
        p.chainId = domain.chain_id;
        p.adjudicator = domain.adjudicator;
        let mut s = s0.clone();
        s.channelId = p.channel_id();
        let r = env.adj[0].register(&signed(&p, env.sign_all(&p, &s))).await;
        assert!(
            matches!(&r, Err(Error::WrongDomain { chain_id, adjudicator }) if *chain_id == domain.chain_id && *adjudicator == domain.adjudicator),
            "{}: {r:?}",
            env.name
        );
        let r = env.funders[0]
            .fund(FundingRequest {
                params: p.clone(),
                state: s.clone(),
                index: 0,
                timeout: Duration::from_millis(100),
            })
            .await;
        assert!(
            matches!(r, Err(Error::WrongDomain { .. })),
            "{}: {r:?}",
            env.name
        );
    }
    assert_eq!(env.adj[0].dispute(s0.channelId).await.unwrap(), None);
    assert!(env.funders[0].supports(&env.asset));
    assert!(!env.funders[0].supports(&perun_channel::Asset {
        chainId: env.asset.chainId,
        holder: Address::repeat_byte(0x66),
    }));
    assert!(!env.funders[0].supports(&perun_channel::Asset {
        chainId: env.asset.chainId + U256::from(1),
        holder: env.asset.holder,
    }));
}

/// An asset whose holder is not one of ours is skipped at settlement; the good asset pays.
async fn a_foreign_holder_is_skipped(env: Env) {
    let a = env.parties[0].address();
    let foreign = perun_channel::Asset {
        chainId: env.asset.chainId,
        holder: LocalAccount::random().address(),
    };
    let (params, s0) = env.channel_over(
        CHALLENGE,
        vec![foreign, env.asset.clone()],
        vec![vec![0, 0], vec![10, 0]],
    );
    env.ctl
        .deposit(
            env.asset.holder,
            s0.channelId,
            a,
            U256::ZERO,
            U256::from(10),
        )
        .await
        .unwrap();
    let mut fin = s0.next();
    fin.isFinal = true;
    let before = env.balance(a).await;
    env.adj[1]
        .conclude(&signed(&params, env.sign_all(&params, &fin)))
        .await
        .unwrap();
    assert_eq!(
        env.balance(a).await,
        before + U256::from(10),
        "{}",
        env.name
    );
}

/// Both backends' `ChainHistory` tell the same story of a channel: the
/// deposits, the outcome's payout and credit (a receiver that refuses), the
/// conclusion, in chain order; the credit reads as the holdings, and
/// withdrawing a credit that is not there pays nothing.
async fn history_tells_the_same_story(env: Env) {
    use perun_adjudicator::ChainFact;
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (params, state0) = env.channel(CHALLENGE, &[40, 60]);
    fund_all(&env, &params, &state0).await;
    env.ctl.set_rejecting(b).await;
    let mut fin = state0.next();
    fin.isFinal = true;
    env.adj[0]
        .conclude(&signed(&params, env.sign_all(&params, &fin)))
        .await
        .unwrap();
    let history = env.adj[0].history().expect("both backends keep history");
    let to = history.confirmed_block().await.unwrap();
    let page = history.logs(history.first_block(), to).await.unwrap();
    assert!(
        page.rejected.is_empty(),
        "{}: {:?}",
        env.name,
        page.rejected
    );
    let id = fin.channelId;
    let holder = env.asset.holder;
    let facts: Vec<ChainFact> = page
        .logs
        .iter()
        .filter(|l| l.channel == id)
        .map(|l| l.fact.clone())
        .collect();
    let deposit = |participant, amount: u64| ChainFact::Deposited {
        holder,
        participant,
        amount: U256::from(amount),
    };
    assert_eq!(facts.len(), 5, "{}: {facts:?}", env.name);
    assert!(facts[..2].contains(&deposit(a, 40)) && facts[..2].contains(&deposit(b, 60)));
    assert_eq!(
        facts[2..],
        [
            ChainFact::Paid {
                holder,
                participant: a,
                amount: U256::from(40)
            },
            ChainFact::Credited {
                holder,
                participant: b,
                amount: U256::from(60)
            },
            ChainFact::Concluded { version: 1 },
        ],
        "{}",
        env.name
    );
    let positions: Vec<_> = page.logs.iter().map(|l| (l.block, l.log_index)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "chain order");
    assert_eq!(
        history.credit(holder, id, b).await.unwrap(),
        (U256::from(60), true)
    );
    let none = history
        .withdraw_credit(holder, id, env.parties[0].clone())
        .await
        .unwrap();
    assert_eq!(none, U256::ZERO, "{}", env.name);
}

/// The tic-tac-toe state after a move: `cells` and `next` on the board, the whole pot of
/// `pot` with participant `pot_to` (the mover, or the winner), final if `fin`.
fn ttt(prev: &State, next: u8, cells: [u8; 9], pot_to: usize, pot: u64, fin: bool) -> State {
    let mut s = prev.next();
    s.appData = board(next, cells);
    s.outcome.balances[0] = vec![U256::ZERO; 2];
    s.outcome.balances[0][pot_to] = U256::from(pot);
    s.isFinal = fin;
    s
}

/// `to` by `actor`, signed by `signer` (the actor itself unless a test forges it).
fn move_req(
    params: &Params,
    from: &State,
    to: &State,
    actor: usize,
    signer: &LocalAccount,
) -> ProgressRequest {
    ProgressRequest {
        params: params.clone(),
        from: from.clone(),
        to: to.clone(),
        actor,
        signature: signer.sign_hash(to.hash()).unwrap(),
    }
}

/// The app's reason for refusing a move, on either backend.
fn illegal(env: &Env, r: perun_adjudicator::Result<()>) -> Illegal {
    match r {
        Err(Error::AppRejected { rejection, data }) => {
            assert_eq!(
                data.is_some(),
                env.name == "anvil",
                "revert data kept on-chain only"
            );
            rejection
                .downcast_ref::<Illegal>()
                .cloned()
                .unwrap_or_else(|| panic!("{}: not a tic-tac-toe reason: {rejection}", env.name))
        }
        other => panic!("{}: expected the app's rejection, got {other:?}", env.name),
    }
}

/// An app channel's dispute: progress only after the refutation period, the actor's
/// signature alone, the app's typed reasons on both backends, each move restarting the
/// timeout, registration over after the first move, too late after the timeout, and the
/// last valid state concluding. A payment channel cannot be progressed.
async fn app_dispute_rules(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (alice, bob) = (env.parties[0].as_ref(), env.parties[1].as_ref());
    let (params, s0) = env.app_channel(CHALLENGE, &[100, 100]);
    fund_all(&env, &params, &s0).await;
    let id = s0.channelId;
    let mut events = env.adj[1].subscribe(id).await.unwrap();

    // Alice's first move, signed by both off-chain, is registered.
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, 200, false);
    let s1s = signed(&params, env.sign_all(&params, &s1));
    env.adj[0].register(&s1s).await.unwrap();
    let d1 = env.adj[0].dispute(id).await.unwrap().unwrap();
    assert!(!d1.progressed);
    // Bob's answer, signed by Bob alone: not during the refutation period.
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, 200, false);
    let p2 = move_req(&params, &s1, &s2, 1, bob);
    assert!(matches!(
        env.adj[1].progress(&p2).await,
        Err(Error::TimeoutNotPassed { .. })
    ));
    env.ctl.advance(CHALLENGE + 1).await;
    // Nobody moved yet: conclusion waits for the progression window.
    match env.adj[0].conclude(&s1s).await {
        Err(Error::TimeoutNotPassed { timeout, .. }) => {
            assert_eq!(timeout, d1.timeout + CHALLENGE, "{}", env.name)
        }
        other => panic!("{}: conclude in the window: {other:?}", env.name),
    }
    // Out of turn, an occupied cell: the app's reasons.
    let again = ttt(&s1, 0, [1, 0, 0, 0, 1, 0, 0, 0, 0], 0, 200, false);
    assert_eq!(
        illegal(
            &env,
            env.adj[0]
                .progress(&move_req(&params, &s1, &again, 0, alice))
                .await
        ),
        Illegal::NotYourTurn {
            expected: 1,
            actor: 0
        }
    );
    let occupied = ttt(&s1, 0, [0, 0, 0, 0, 2, 0, 0, 0, 0], 1, 200, false);
    assert_eq!(
        illegal(
            &env,
            env.adj[1]
                .progress(&move_req(&params, &s1, &occupied, 1, bob))
                .await
        ),
        Illegal::Occupied(4)
    );
    // Bob's move signed by Alice; a move from a state that is not the registered one.
    assert!(matches!(
        env.adj[1]
            .progress(&move_req(&params, &s1, &s2, 1, alice))
            .await,
        Err(Error::BadSignature { index: 1 })
    ));
    let other = ttt(&s0, 1, [1, 0, 0, 0, 0, 0, 0, 0, 0], 0, 200, false);
    assert!(matches!(
        env.adj[0]
            .progress(&move_req(&params, &s0, &other, 0, alice))
            .await,
        Err(Error::WrongState)
    ));
    // Bob's move lands, and restarts the timeout; again is a no-op.
    env.adj[1].progress(&p2).await.unwrap();
    let d2 = env.adj[0].dispute(id).await.unwrap().unwrap();
    assert_eq!(
        (d2.version, d2.progressed, d2.state_hash, d2.concluded),
        (2, true, s2.hash(), false)
    );
    assert!(d2.timeout > d1.timeout);
    env.adj[0].progress(&p2).await.unwrap();
    assert_eq!(env.adj[0].dispute(id).await.unwrap().unwrap(), d2);
    // Registration is over: not even a newer fully signed state.
    let s9 = ttt(&s2, 1, [2, 0, 0, 0, 1, 0, 0, 1, 0], 0, 200, false);
    assert!(matches!(
        env.adj[0]
            .register(&signed(&params, env.sign_all(&params, &s9)))
            .await,
        Err(Error::AlreadyProgressed)
    ));
    // Alice answers before the timeout: the timeout restarts again.
    env.ctl.advance(CHALLENGE / 2).await;
    let s3 = ttt(&s2, 1, [2, 0, 0, 0, 1, 0, 0, 0, 1], 0, 200, false);
    env.adj[0]
        .progress(&move_req(&params, &s2, &s3, 0, alice))
        .await
        .unwrap();
    let d3 = env.adj[0].dispute(id).await.unwrap().unwrap();
    assert_eq!((d3.version, d3.progressed), (3, true));
    assert!(d3.timeout > d2.timeout);
    let s3c = signed(&params, SignedState::new(s3.clone()));
    assert!(matches!(
        env.adj[0].conclude(&s3c).await,
        Err(Error::TimeoutNotPassed { timeout, .. }) if timeout == d3.timeout
    ));
    // Bob stays silent past the timeout: too late to answer.
    env.ctl.advance(CHALLENGE + 1).await;
    let s4 = ttt(&s3, 0, [2, 2, 0, 0, 1, 0, 0, 0, 1], 1, 200, false);
    assert!(matches!(
        env.adj[1]
            .progress(&move_req(&params, &s3, &s4, 1, bob))
            .await,
        Err(Error::TimeoutPassed)
    ));
    // The last valid state concludes: Alice, the last mover, holds the pot.
    let before = (env.balance(a).await, env.balance(b).await);
    env.adj[1].conclude(&s3c).await.unwrap();
    let d4 = env.adj[0].dispute(id).await.unwrap().unwrap();
    assert_eq!(
        (d4.version, d4.concluded, d4.progressed),
        (3, true, false),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(200),
        "{}",
        env.name
    );
    assert_eq!(env.balance(b).await, before.1, "{}", env.name);
    assert!(matches!(
        env.adj[1]
            .progress(&move_req(&params, &s3, &s4, 1, bob))
            .await,
        Err(Error::AlreadyConcluded)
    ));

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            within("events", next_event(&mut events))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(matches!(
        &got[0],
        AdjudicatorEvent::Registered { version: 1, .. }
    ));
    assert_eq!(
        got[1],
        AdjudicatorEvent::Progressed {
            id,
            version: 2,
            timeout: d2.timeout,
            actor: 1,
            state: s2.clone()
        }
    );
    assert!(
        matches!(&got[2], AdjudicatorEvent::Progressed { version: 3, actor: 0, state, timeout, .. } if *state == s3 && *timeout == d3.timeout)
    );
    assert_eq!(got[3], AdjudicatorEvent::Concluded { id, version: 3 });

    // A payment channel has no moves to enforce.
    let (pp, p0) = env.channel(CHALLENGE, &[10, 10]);
    fund_all(&env, &pp, &p0).await;
    let p1 = p0.next();
    env.adj[0]
        .register(&signed(&pp, env.sign_all(&pp, &p1)))
        .await
        .unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    let p2 = p1.next();
    assert!(matches!(
        env.adj[0]
            .progress(&move_req(&pp, &p1, &p2, 0, alice))
            .await,
        Err(Error::NoApp)
    ));
}

/// The end of a game: a winning move must be final and pay the winner, concludes at once,
/// and nothing follows it; a registered board that is won already takes no move; with no
/// move in the window the registered state concludes.
async fn app_game_end(env: Env) {
    let (a, b) = (env.parties[0].address(), env.parties[1].address());
    let (alice, bob) = (env.parties[0].as_ref(), env.parties[1].as_ref());

    // Alice is about to win (she moves, the pot is Bob's after his last move).
    let (params, s0) = env.app_channel(CHALLENGE, &[100, 100]);
    fund_all(&env, &params, &s0).await;
    let mut s4 = s0.clone();
    s4.version = 4;
    s4.appData = board(0, [1, 1, 0, 2, 2, 0, 0, 0, 0]);
    s4.outcome.balances[0] = vec![U256::ZERO, U256::from(200)];
    env.adj[0]
        .register(&signed(&params, env.sign_all(&params, &s4)))
        .await
        .unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    let not_final = ttt(&s4, 1, [1, 1, 1, 2, 2, 0, 0, 0, 0], 0, 200, false);
    assert_eq!(
        illegal(
            &env,
            env.adj[0]
                .progress(&move_req(&params, &s4, &not_final, 0, alice))
                .await
        ),
        Illegal::WrongFinal
    );
    let unpaid = ttt(&s4, 1, [1, 1, 1, 2, 2, 0, 0, 0, 0], 1, 200, true);
    assert_eq!(
        illegal(
            &env,
            env.adj[0]
                .progress(&move_req(&params, &s4, &unpaid, 0, alice))
                .await
        ),
        Illegal::WrongOutcome(0)
    );
    let won = ttt(&s4, 1, [1, 1, 1, 2, 2, 0, 0, 0, 0], 0, 200, true);
    env.adj[0]
        .progress(&move_req(&params, &s4, &won, 0, alice))
        .await
        .unwrap();
    let d = env.adj[1].dispute(s0.channelId).await.unwrap().unwrap();
    assert!(d.progressed && d.version == 5);
    // Nothing follows a final state: its timeout is now.
    let after = ttt(&won, 0, [1, 1, 1, 2, 2, 2, 0, 0, 0], 1, 200, false);
    assert!(matches!(
        env.adj[1]
            .progress(&move_req(&params, &won, &after, 1, bob))
            .await,
        Err(Error::TimeoutPassed)
    ));
    let before = (env.balance(a).await, env.balance(b).await);
    env.adj[1]
        .conclude(&signed(&params, SignedState::new(won.clone())))
        .await
        .unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(200),
        "{}",
        env.name
    );
    assert_eq!(env.balance(b).await, before.1, "{}", env.name);

    // A board registered (not final) with a line on it already: the game is over.
    let (params, s0) = env.app_channel(CHALLENGE, &[100, 100]);
    fund_all(&env, &params, &s0).await;
    let mut w = s0.clone();
    w.version = 5;
    w.appData = board(1, [1, 1, 1, 2, 2, 0, 0, 0, 0]);
    w.outcome.balances[0] = vec![U256::from(150), U256::from(50)];
    let ws = signed(&params, env.sign_all(&params, &w));
    env.adj[0].register(&ws).await.unwrap();
    let d = env.adj[0].dispute(s0.channelId).await.unwrap().unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    let late = ttt(&w, 0, [1, 1, 1, 2, 2, 2, 0, 0, 0], 1, 200, false);
    assert_eq!(
        illegal(
            &env,
            env.adj[1]
                .progress(&move_req(&params, &w, &late, 1, bob))
                .await
        ),
        Illegal::GameOver
    );
    // Nobody moves in the window: the registered state concludes after it.
    assert!(matches!(
        env.adj[0].conclude(&ws).await,
        Err(Error::TimeoutNotPassed { timeout, .. }) if timeout == d.timeout + CHALLENGE
    ));
    env.ctl.advance(CHALLENGE).await;
    let before = (env.balance(a).await, env.balance(b).await);
    env.adj[0].conclude(&ws).await.unwrap();
    assert_eq!(
        env.balance(a).await,
        before.0 + U256::from(150),
        "{}",
        env.name
    );
    assert_eq!(
        env.balance(b).await,
        before.1 + U256::from(50),
        "{}",
        env.name
    );

    // An app address without the app: the move is rejected (a call to no code reverts
    // without data; the sim knows no rules there).
    let (mut params, mut s0) = env.app_channel(CHALLENGE, &[100, 100]);
    params.app = Address::repeat_byte(0x99);
    s0.channelId = params.channel_id();
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, 200, false);
    env.adj[0]
        .register(&signed(&params, env.sign_all(&params, &s1)))
        .await
        .unwrap();
    env.ctl.advance(CHALLENGE + 1).await;
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, 200, false);
    match env.adj[1]
        .progress(&move_req(&params, &s1, &s2, 1, bob))
        .await
    {
        Err(Error::AppRejected { rejection, .. }) => assert_eq!(
            rejection.downcast_ref::<AppRevert>(),
            Some(&AppRevert {
                reason: RevertReason::Empty
            }),
            "{}",
            env.name
        ),
        other => panic!("{}: a move with no app: {other:?}", env.name),
    }

    // A registered final state (its timeout is now) takes no move either.
    let (params, s0) = env.app_channel(CHALLENGE, &[100, 100]);
    let mut f = ttt(&s0, 1, [1, 1, 1, 2, 2, 0, 0, 0, 0], 0, 200, true);
    f.version = 5;
    env.adj[0]
        .register(&signed(&params, env.sign_all(&params, &f)))
        .await
        .unwrap();
    let next = ttt(&f, 0, [1, 1, 1, 2, 2, 2, 0, 0, 0], 1, 200, false);
    assert!(matches!(
        env.adj[1]
            .progress(&move_req(&params, &f, &next, 1, bob))
            .await,
        Err(Error::Channel(perun_channel::Error::Final))
    ));
}

macro_rules! conformance {
    ($($name:ident: $n:expr),* $(,)?) => {
        mod sim_eth { use super::*; $(#[tokio::test] async fn $name() { super::$name(Env::sim(Kind::Eth, $n).await).await })* }
        mod sim_erc20 { use super::*; $(#[tokio::test] async fn $name() { super::$name(Env::sim(Kind::Erc20, $n).await).await })* }
        mod anvil_eth { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Env::anvil(Kind::Eth, $n).await).await })* }
        mod anvil_erc20 { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Env::anvil(Kind::Erc20, $n).await).await })* }
    };
}

conformance!(
    cooperative_close: 2,
    funding_timeout_then_recover: 2,
    dispute_rules: 2,
    bad_input: 2,
    reverting_receiver: 2,
    multi_asset_dispute: 2,
    three_party_funding: 3,
    deposits_name_the_holdings_they_expect: 2,
    old_final_state_loses_to_registered_newer_one: 2,
    surplus_goes_back_to_its_depositor: 2,
    withdrawal_auth_is_single_use_and_credits_add: 2,
    another_domain_is_refused: 2,
    a_foreign_holder_is_skipped: 2,
    history_tells_the_same_story: 2,
    app_dispute_rules: 2,
    app_game_end: 2,
);
