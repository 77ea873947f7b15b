//! Adversarial review of issue 16 (app channels), contract and adjudicator side.
//!
//! Each test names the attack it tries; every one is refused. Two were real
//! findings of the review, fixed since: a first move after its window
//! (`a_first_move_after_its_window_is_refused`, `late_first_move_*`: the
//! contract now refuses it with `TimeoutPassed`) and an app reverting with one
//! of the adjudicator's errors (`an_apps_error_is_never_mistaken_for_the_adjudicators`:
//! the contract wraps the app's verdict in `AppRejected(bytes)`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::SolError;
use alloy_primitives::{Address, Bytes, LogData, Signature, U256};
use common::{Env, Kind, board, next_event, within};
use perun_adjudicator::bindings::Adjudicator;
use perun_adjudicator::bindings::adjudicator::Adjudicator::AdjudicatorErrors as A;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Adjudicator as _, AdjudicatorEvent, Deployment, Error, EthAdjudicator, EthConfig,
    FundingRequest, ProgressRequest, SignedChannel, deploy,
};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};

const CD: u64 = 60;

// ---------------------------------------------------------------- raw-contract helpers

struct Raw {
    anvil: Anvil,
    p: DynProvider,
    d: Deployment,
    adj: Adjudicator::AdjudicatorInstance<DynProvider>,
    ttt: Address,
    a: LocalAccount,
    b: LocalAccount,
}

async fn raw() -> Raw {
    let anvil = Anvil::spawn().await.unwrap();
    let deployer = anvil.funded_account().await.unwrap();
    let p = anvil.provider(&deployer).await.unwrap();
    let d = deploy(&p).await.unwrap();
    let ttt = perun_adjudicator::deploy_tictactoe(&p).await.unwrap();
    let adj = Adjudicator::new(d.adjudicator, p.clone());
    Raw {
        anvil,
        p,
        d,
        adj,
        ttt,
        a: LocalAccount::random(),
        b: LocalAccount::random(),
    }
}

impl Raw {
    fn eth(&self) -> Asset {
        Asset {
            chainId: U256::from(CHAIN_ID),
            holder: self.d.eth_holder,
        }
    }

    /// A 5/5 tic-tac-toe channel (app `app`), empty board, A (0) to move.
    fn channel(&self, app: Address) -> (Params, State) {
        let funding = vec![vec![U256::from(5), U256::from(5)]];
        let mut params = Params::payment(
            Domain {
                chain_id: U256::from(CHAIN_ID),
                adjudicator: self.d.adjudicator,
            },
            CD,
            U256::from(rand::random::<u64>()),
            vec![self.a.address(), self.b.address()],
            funding.clone(),
        );
        params.app = app;
        let mut s0 = State::initial(&params, Allocation::new(vec![self.eth()], funding));
        s0.appData = board(0, [0; 9]);
        (params, s0)
    }

    fn sigs(&self, params: &Params, s: &State) -> Vec<Bytes> {
        let mut ss = SignedState::new(s.clone());
        ss.sign(params, 0, &self.a).unwrap();
        ss.sign(params, 1, &self.b).unwrap();
        ss.signatures().unwrap().iter().map(sig_bytes).collect()
    }

    async fn deposit(&self, params: &Params) {
        let h = perun_adjudicator::bindings::AssetHolderETH::new(self.d.eth_holder, self.p.clone());
        for who in [self.a.address(), self.b.address()] {
            let r = h
                .deposit(params.channel_id(), who, U256::ZERO, U256::from(5))
                .value(U256::from(5))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
            assert!(r.status());
        }
    }

    async fn register(&self, params: &Params, s: &State) -> TransactionReceipt {
        mined(
            self.adj
                .register(params.into(), s.into(), self.sigs(params, s)),
        )
        .await
    }

    fn who(&self, actor: usize) -> &LocalAccount {
        if actor == 0 { &self.a } else { &self.b }
    }

    /// Dry run of `progress(from, to)` by `actor`, signed by `signer`.
    async fn try_progress(
        &self,
        params: &Params,
        from: &State,
        to: &State,
        actor: usize,
        signer: &LocalAccount,
    ) -> Result<(), alloy::contract::Error> {
        let sig = signer.sign_hash(to.hash()).unwrap();
        self.adj
            .progress(
                params.into(),
                from.into(),
                to.into(),
                U256::from(actor),
                sig_bytes(&sig),
            )
            .call()
            .await
            .map(|_| ())
    }

    async fn progress(&self, params: &Params, from: &State, to: &State, actor: usize) {
        let sig = self.who(actor).sign_hash(to.hash()).unwrap();
        mined(self.adj.progress(
            params.into(),
            from.into(),
            to.into(),
            U256::from(actor),
            sig_bytes(&sig),
        ))
        .await;
    }

    /// Sends `progress` in a block stamped `at` without a gas estimate; the receipt's status.
    async fn progress_at(
        &self,
        at: u64,
        params: &Params,
        from: &State,
        to: &State,
        actor: usize,
    ) -> bool {
        self.next_timestamp(at).await;
        let sig = self.who(actor).sign_hash(to.hash()).unwrap();
        self.adj
            .progress(
                params.into(),
                from.into(),
                to.into(),
                U256::from(actor),
                sig_bytes(&sig),
            )
            .gas(2_000_000)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap()
            .status()
    }

    async fn conclude_at(&self, at: u64, params: &Params, s: &State) -> bool {
        self.next_timestamp(at).await;
        self.adj
            .conclude(params.into(), s.into())
            .gas(2_000_000)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap()
            .status()
    }

    async fn next_timestamp(&self, at: u64) {
        self.anvil
            .admin()
            .raw_request::<_, serde_json::Value>("evm_setNextBlockTimestamp".into(), (at,))
            .await
            .unwrap();
    }

    async fn dispute(&self, params: &Params) -> (u64, u64, u8) {
        let d = self.adj.disputes(params.channel_id()).call().await.unwrap();
        (d.version, d.timeout, d.phase)
    }
}

fn sig_bytes(s: &Signature) -> Bytes {
    Bytes::from(s.as_bytes().to_vec())
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

fn revert_of(e: alloy::contract::Error) -> A {
    e.as_decoded_interface_error::<A>()
        .unwrap_or_else(|| panic!("not an adjudicator error: {e:?}"))
}

/// The app's own revert data: the adjudicator wraps it in `AppRejected(bytes)`.
fn raw_revert(e: alloy::contract::Error) -> Bytes {
    match e.as_decoded_interface_error::<A>() {
        Some(A::AppRejected(r)) => r.reason,
        other => panic!("not the app's verdict: {other:?}"),
    }
}

/// The tic-tac-toe state after a move: `cells`, `next` to move, the pot of 10 with `pot_to`.
fn ttt(prev: &State, next: u8, cells: [u8; 9], pot_to: usize, fin: bool) -> State {
    let mut s = prev.next();
    s.appData = board(next, cells);
    s.outcome.balances[0] = vec![U256::ZERO; 2];
    s.outcome.balances[0][pot_to] = U256::from(10);
    s.isFinal = fin;
    s
}

// ---------------------------------------------------------------- 1. early conclusion

/// Attack 1: conclude an app channel early. Right after registration, after the refutation
/// timeout but inside the first-move window, after a progression before its timeout; and
/// `concludeFinal` with an older fully signed final state after progressions. All refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_conclusion_is_refused() {
    let r = raw().await;
    let (params, s0) = r.channel(r.ttt);
    r.deposit(&params).await;
    // A final v1 both signed earlier (say a cooperative close offer), then play went on.
    let mut old_final = s0.next();
    old_final.isFinal = true;
    let s2 = {
        let mut s = ttt(&s0, 1, [1, 0, 0, 0, 0, 0, 0, 0, 0], 0, false);
        s.version = 2;
        s
    };
    r.register(&params, &s2).await;
    let (_, t0, phase) = r.dispute(&params).await;
    assert_eq!(phase, 0);
    let e = r
        .adj
        .conclude((&params).into(), (&s2).into())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::TimeoutNotPassed(t) if t.timeout == t0));
    // Refutation over, first-move window open: still no conclusion.
    r.anvil.increase_time(CD + 1).await.unwrap();
    let e = r
        .adj
        .conclude((&params).into(), (&s2).into())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::TimeoutNotPassed(t) if t.timeout == t0 + CD));
    // B moves; A answers; the old final state cannot jump over the moves.
    let s3 = ttt(&s2, 0, [1, 2, 0, 0, 0, 0, 0, 0, 0], 1, false);
    r.progress(&params, &s2, &s3, 1).await;
    let e = r
        .adj
        .conclude((&params).into(), (&s3).into())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::TimeoutNotPassed(_)));
    let e = r
        .adj
        .concludeFinal(
            (&params).into(),
            (&old_final).into(),
            r.sigs(&params, &old_final),
        )
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::VersionTooLow(v) if v.registered == 3 && v.got == 1));
    // A fully signed final state of the registered version 2 (below the progressed 3).
    let mut fin2 = s2.clone();
    fin2.isFinal = true;
    let e = r
        .adj
        .concludeFinal((&params).into(), (&fin2).into(), r.sigs(&params, &fin2))
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::VersionTooLow(v) if v.registered == 3 && v.got == 2));
    // Nor a conclusion with the pre-progression state (its timeout passed long ago).
    r.anvil.increase_time(CD / 2).await.unwrap();
    let e = r
        .adj
        .conclude((&params).into(), (&s2).into())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(
        revert_of(e),
        A::TimeoutNotPassed(_) | A::WrongState(_)
    ));
}

// ---------------------------------------------------------------- 2. progress tricks

/// Attack 2: progress by a non-actor, with a forged signature, with another participant's
/// signature, from an unregistered state, during the refutation period, of another channel,
/// changing assets or sums, and after conclusion. All refused with the expected reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_tricks_are_refused() {
    let r = raw().await;
    let (params, s0) = r.channel(r.ttt);
    r.deposit(&params).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    // During the refutation period.
    let e = r
        .try_progress(&params, &s1, &s2, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::TimeoutNotPassed(_)));
    r.anvil.increase_time(CD + 1).await.unwrap();
    // Out of turn (A moves for B's turn, with her own key): the app refuses.
    let mut a_move = ttt(&s1, 0, [1, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    a_move.appData = board(1, [1, 0, 0, 0, 1, 0, 0, 0, 0]);
    let e = r
        .try_progress(&params, &s1, &a_move, 0, &r.a)
        .await
        .unwrap_err();
    let data = raw_revert(e);
    assert_eq!(
        perun_adjudicator::eth::tictactoe_reason(&data),
        Some(perun_channel::tictactoe::Illegal::NotYourTurn {
            expected: 1,
            actor: 0
        })
    );
    // B's move signed by A (claimed as actor 1), by a stranger.
    let mallory = LocalAccount::random();
    for signer in [&r.a, &mallory] {
        let e = r
            .try_progress(&params, &s1, &s2, 1, signer)
            .await
            .unwrap_err();
        assert!(matches!(revert_of(e), A::WrongSigner(w) if w.index == U256::from(1)));
    }
    // Actor index out of range.
    let e = r
        .try_progress(&params, &s1, &s2, 2, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::BadActor(_)));
    // From a state that is not the registered one (s0, never registered).
    let s1b = ttt(&s0, 1, [1, 0, 0, 0, 0, 0, 0, 0, 0], 0, false);
    let e = r
        .try_progress(&params, &s0, &s1b, 0, &r.a)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::WrongState(_)));
    // `to` of another channel (same params otherwise).
    let mut other = s2.clone();
    other.channelId = alloy_primitives::B256::repeat_byte(7);
    let e = r
        .try_progress(&params, &s1, &other, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::WrongChannel(_)));
    // Sums changed (B mints himself 1 more), assets changed (another holder, an extra asset).
    let mut richer = s2.clone();
    richer.outcome.balances[0][1] = U256::from(11);
    let e = r
        .try_progress(&params, &s1, &richer, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::SumChanged(_)));
    let mut moved = s2.clone();
    moved.outcome.assets[0].holder = r.d.erc20_holder;
    let e = r
        .try_progress(&params, &s1, &moved, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::AssetsChanged(_)));
    let mut extra = s2.clone();
    extra.outcome.assets.push(Asset {
        chainId: U256::from(CHAIN_ID),
        holder: r.d.erc20_holder,
    });
    extra.outcome.balances.push(vec![U256::ZERO, U256::from(1)]);
    let e = r
        .try_progress(&params, &s1, &extra, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::AssetsChanged(_)));
    let mut wide = s2.clone();
    wide.outcome.balances[0].push(U256::ZERO);
    let e = r
        .try_progress(&params, &s1, &wide, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::Dimensions(_)));
    // Overflowing balances whose wrapped sum matches: a checked-sum panic, not a pass.
    let mut wrap = s2.clone();
    wrap.outcome.balances[0] = vec![U256::MAX, U256::from(11)];
    assert!(r.try_progress(&params, &s1, &wrap, 1, &r.b).await.is_err());
    // The real move lands; after conclusion, nothing.
    r.progress(&params, &s1, &s2, 1).await;
    r.anvil.increase_time(CD + 1).await.unwrap();
    mined(r.adj.conclude((&params).into(), (&s2).into())).await;
    let s3 = ttt(&s2, 1, [2, 0, 0, 0, 1, 0, 0, 0, 1], 0, false);
    let e = r
        .try_progress(&params, &s2, &s3, 0, &r.a)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::AlreadyConcluded(_)));
    // B got the pot: 10 wei.
    assert_eq!(
        r.p.get_balance(r.b.address()).await.unwrap(),
        U256::from(10)
    );
}

/// Attack 2, timing: exactly at `block.timestamp == timeout`. The refutation period is over
/// (register reverts, the first move lands); a following move exactly at its timeout is too
/// late while `conclude` at that second succeeds. No second where both or neither apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_boundaries_are_exact() {
    let r = raw().await;
    let (params, s0) = r.channel(r.ttt);
    r.deposit(&params).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    let (_, t1, _) = r.dispute(&params).await;
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    assert!(
        !r.progress_at(t1 - 1, &params, &s1, &s2, 1).await,
        "one second early"
    );
    assert!(
        r.progress_at(t1, &params, &s1, &s2, 1).await,
        "at the timeout"
    );
    let (_, t2, phase) = r.dispute(&params).await;
    assert_eq!((t2, phase), (t1 + CD, 2));
    let s3 = ttt(&s2, 1, [2, 0, 0, 0, 1, 0, 0, 0, 1], 0, false);
    assert!(
        !r.conclude_at(t2 - 1, &params, &s2).await,
        "conclusion one second before the move's timeout"
    );
    assert!(
        !r.progress_at(t2, &params, &s2, &s3, 0).await,
        "a move at its timeout is late"
    );
    assert!(r.conclude_at(t2 + 1, &params, &s2).await);
}

/// Attack 2/3, the first-move window: the state registered without a move concludes at
/// `timeout + challengeDuration` (DESIGN §4: "the window in which the participant whose move
/// it is can make it"). Every later move must come before the timeout the previous one set,
/// but the FIRST move has no end: after the window closed (conclusion allowed) the player
/// who sat it out can still move as long as nobody concluded, e.g. by front-running the
/// winner's `conclude`, which then reverts `WrongState`. Expected: `TimeoutPassed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_move_after_its_window_is_refused() {
    let r = raw().await;
    let (params, s0) = r.channel(r.ttt);
    r.deposit(&params).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    let (_, t1, _) = r.dispute(&params).await;
    // The window is over: A may conclude now (dry run succeeds) ...
    r.next_timestamp(t1 + CD + 30).await;
    r.anvil
        .admin()
        .raw_request::<_, serde_json::Value>("evm_mine".into(), ())
        .await
        .unwrap();
    r.adj
        .conclude((&params).into(), (&s1).into())
        .call()
        .await
        .unwrap();
    // ... yet B, who let the window pass, still moves (and takes the pot, restarting it).
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    let late = r.try_progress(&params, &s1, &s2, 1, &r.b).await;
    assert!(
        matches!(late.map_err(revert_of), Err(A::TimeoutPassed(_))),
        "a first move after its window (timeout + challengeDuration) must be refused"
    );
}

/// The same window on both backends, through the `Adjudicator` trait: the sim and the eth
/// backend agree (both accept the late first move), so the rule is broken in both.
async fn late_first_move(env: Env) {
    let (params, s0) = env.app_channel(CD, &[5, 5]);
    fund(&env, &params, &s0).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    let s1s = SignedChannel {
        params: params.clone(),
        state: env.sign_all(&params, &s1),
    };
    env.adj[0].register(&s1s).await.unwrap();
    env.ctl.advance(2 * CD + 10).await;
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    let req = ProgressRequest {
        params: params.clone(),
        from: s1.clone(),
        to: s2.clone(),
        actor: 1,
        signature: env.parties[1].sign_hash(s2.hash()).unwrap(),
    };
    let got = env.adj[1].progress(&req).await;
    assert!(
        matches!(got, Err(Error::TimeoutPassed)),
        "{}: late first move: {got:?}",
        env.name
    );
}

async fn fund(env: &Env, params: &Params, state: &State) {
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

#[tokio::test]
async fn late_first_move_sim() {
    late_first_move(Env::sim(Kind::Eth, 2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_first_move_anvil() {
    late_first_move(Env::anvil(Kind::Eth, 2).await).await;
}

// ---------------------------------------------------------------- 3. register vs progress

/// Attack 3: register (refute) after a progression, refute during the progression window,
/// progress from a registered final state. All refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_cannot_undo_moves() {
    let r = raw().await;
    let (params, s0) = r.channel(r.ttt);
    r.deposit(&params).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    r.anvil.increase_time(CD + 1).await.unwrap();
    // The window for the first move: a newer fully signed state is too late.
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    let e = r
        .adj
        .register((&params).into(), (&s2).into(), r.sigs(&params, &s2))
        .call()
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::TimeoutPassed(_)));
    r.progress(&params, &s1, &s2, 1).await;
    // After a move: no registration, not even of a newer state, nor the progressed one.
    let s3 = ttt(&s2, 1, [2, 0, 0, 0, 1, 0, 0, 0, 1], 0, false);
    for s in [&s3, &s2] {
        let e = r
            .adj
            .register((&params).into(), s.into(), r.sigs(&params, s))
            .call()
            .await
            .unwrap_err();
        assert!(matches!(revert_of(e), A::AlreadyProgressed(_)));
    }
    // A registered final state: concluded at once, nothing follows.
    let (params, s0) = r.channel(r.ttt);
    let mut f = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, true);
    f.outcome.balances[0] = vec![U256::from(5), U256::from(5)];
    r.register(&params, &f).await;
    r.anvil.increase_time(1).await.unwrap();
    let g = ttt(&f, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    let e = r.try_progress(&params, &f, &g, 1, &r.b).await.unwrap_err();
    assert!(matches!(revert_of(e), A::FinalState(_)));
}

// ---------------------------------------------------------------- 2/4. hostile apps

/// `push32 sel; push1 0xe0; shl; push0; mstore; push1 4; push0; revert`: reverts with a
/// bare 4-byte selector.
fn reverting_with(selector: [u8; 4]) -> Bytes {
    let mut c = vec![0x63];
    c.extend_from_slice(&selector);
    c.extend_from_slice(&[0x60, 0xe0, 0x1b, 0x5f, 0x52, 0x60, 0x04, 0x5f, 0xfd]);
    Bytes::from(c)
}

/// Attack 2/4: apps the proposer chose. An address without code, an app that burns all
/// gas, one that tries to write (LOG0: only fails under STATICCALL, so re-entry into the
/// adjudicator or a holder is impossible), one that reverts with 256 KiB of data. Every
/// move fails, and the registered state still concludes after the window and pays out:
/// no deposit is locked. A STOP-only app accepts anything: the generic rules still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_apps_cannot_lock_funds_or_reenter() {
    let r = raw().await;
    let burner = Address::repeat_byte(0xb0);
    let writer = Address::repeat_byte(0xb1);
    let huge = Address::repeat_byte(0xb2);
    let yes = Address::repeat_byte(0xb3);
    let eoa = Address::repeat_byte(0xb4);
    // JUMPDEST PUSH0 JUMP: loops until out of gas.
    r.anvil
        .set_code(burner, Bytes::from_static(&[0x5b, 0x5f, 0x56]))
        .await
        .unwrap();
    // PUSH0 PUSH0 LOG0 STOP.
    r.anvil
        .set_code(writer, Bytes::from_static(&[0x5f, 0x5f, 0xa0, 0x00]))
        .await
        .unwrap();
    // PUSH3 0x040000 PUSH0 REVERT.
    r.anvil
        .set_code(
            huge,
            Bytes::from_static(&[0x62, 0x04, 0x00, 0x00, 0x5f, 0xfd]),
        )
        .await
        .unwrap();
    r.anvil
        .set_code(yes, Bytes::from_static(&[0x00]))
        .await
        .unwrap();
    for app in [burner, writer, huge, eoa] {
        let (params, s0) = r.channel(app);
        r.deposit(&params).await;
        let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
        r.register(&params, &s1).await;
        r.anvil.increase_time(CD + 1).await.unwrap();
        let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
        assert!(
            !r.progress_at(r.anvil.now().await.unwrap() + 1, &params, &s1, &s2, 1)
                .await,
            "app {app}: the move must fail"
        );
        assert_eq!(r.dispute(&params).await.2, 0, "app {app}: not progressed");
        r.anvil.increase_time(CD).await.unwrap();
        let before = r.p.get_balance(r.a.address()).await.unwrap();
        mined(r.adj.conclude((&params).into(), (&s1).into())).await;
        assert_eq!(
            r.p.get_balance(r.a.address()).await.unwrap() - before,
            U256::from(10),
            "app {app}: the registered state pays"
        );
    }
    // A yes-app: the adjudicator's own rules still bind (sums, signature, version).
    let (params, s0) = r.channel(yes);
    r.deposit(&params).await;
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    r.anvil.increase_time(CD + 1).await.unwrap();
    let mut steal = s1.next();
    steal.outcome.balances[0] = vec![U256::ZERO, U256::from(11)];
    let e = r
        .try_progress(&params, &s1, &steal, 1, &r.b)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::SumChanged(_)));
    let e = r
        .try_progress(&params, &s1, &s1.next(), 1, &r.a)
        .await
        .unwrap_err();
    assert!(matches!(revert_of(e), A::WrongSigner(_)));
}

/// Attack 5/2: the eth backend tells an app's revert from the adjudicator's by its
/// selector alone (`revert::decode`: adjudicator errors first). An app whose own error
/// shares a name and signature with one of the adjudicator's (`WrongState()`,
/// `AlreadyConcluded()`, `TimeoutPassed()`: natural names for an app) is reported as that
/// adjudicator error, not `AppRejected`; the watcher then polls forever (`WrongState`) or
/// gives the move up for the wrong reason (`AlreadyConcluded`, `TimeoutPassed`). The sim
/// reports `AppRejected` for the same app. Expected: `AppRejected` on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_error_is_never_mistaken_for_the_adjudicators() {
    use perun_adjudicator::bindings::adjudicator::Adjudicator as Adj;
    let r = raw().await;
    let payer = r.anvil.funded_account().await.unwrap();
    let eth = EthAdjudicator::new(
        r.anvil.provider(&payer).await.unwrap(),
        payer.address(),
        EthConfig::from_deployment(&r.d),
    )
    .await
    .unwrap();
    let mut wrong = Vec::new();
    for (i, sel) in [
        Adj::WrongState::SELECTOR,
        Adj::AlreadyConcluded::SELECTOR,
        Adj::TimeoutPassed::SELECTOR,
    ]
    .into_iter()
    .enumerate()
    {
        let app = Address::repeat_byte(0xc0 + i as u8);
        r.anvil.set_code(app, reverting_with(sel)).await.unwrap();
        let (params, s0) = r.channel(app);
        let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
        r.register(&params, &s1).await;
        r.anvil.increase_time(CD + 1).await.unwrap();
        let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
        let req = ProgressRequest {
            params: params.clone(),
            from: s1.clone(),
            to: s2.clone(),
            actor: 1,
            signature: r.b.sign_hash(s2.hash()).unwrap(),
        };
        let got = tokio::time::timeout(Duration::from_secs(30), eth.progress(&req))
            .await
            .unwrap();
        let (_, _, phase) = r.dispute(&params).await;
        assert_eq!(phase, 0, "nothing happened on-chain");
        if !matches!(got, Err(Error::AppRejected { .. })) {
            wrong.push(format!("{sel:?}: {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "app reverts reported as the adjudicator's: {wrong:#?}"
    );
}

// ---------------------------------------------------------------- 6. forged logs

/// Attack 6: another contract emits a log with `Progressed`'s topic for the channel (a move
/// B never made, paying B the pot). The subscription ignores it; the real move arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_progressed_log_is_ignored() {
    use alloy::sol_types::SolEvent;
    use perun_adjudicator::bindings::adjudicator::Adjudicator as Adj;
    let r = raw().await;
    let payer = r.anvil.funded_account().await.unwrap();
    let eth = EthAdjudicator::new(
        r.anvil.provider(&payer).await.unwrap(),
        payer.address(),
        EthConfig::from_deployment(&r.d),
    )
    .await
    .unwrap();
    let (params, s0) = r.channel(r.ttt);
    let id = params.channel_id();
    let s1 = ttt(&s0, 1, [0, 0, 0, 0, 1, 0, 0, 0, 0], 0, false);
    r.register(&params, &s1).await;
    let mut events = eth.subscribe(id).await.unwrap();
    let first = within("registered", next_event(&mut events))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, AdjudicatorEvent::Registered { .. }));
    // The forger: LOG2(data, Progressed topic, channel id) with the ABI data of a fake move.
    let fake = ttt(&s1, 0, [2, 2, 2, 0, 1, 0, 0, 0, 0], 1, true);
    let log = Adj::Progressed {
        channelId: id,
        version: fake.version,
        timeout: 1,
        actor: 1,
        state: (&fake).into(),
    }
    .encode_log_data();
    let forger = Address::repeat_byte(0xf0);
    r.anvil.set_code(forger, log_emitter(&log)).await.unwrap();
    let tx = alloy::rpc::types::TransactionRequest::default()
        .to(forger)
        .gas_limit(1_000_000);
    let rc =
        r.p.send_transaction(tx)
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap();
    assert!(rc.status());
    assert_eq!(rc.inner.logs().len(), 1, "the forged log was emitted");
    // The real move.
    r.anvil.increase_time(CD + 1).await.unwrap();
    let s2 = ttt(&s1, 0, [2, 0, 0, 0, 1, 0, 0, 0, 0], 1, false);
    r.progress(&params, &s1, &s2, 1).await;
    let next = within("progressed", next_event(&mut events))
        .await
        .unwrap()
        .unwrap();
    match next {
        AdjudicatorEvent::Progressed { state, .. } => assert_eq!(state, s2),
        other => panic!("expected the real move, got {other:?}"),
    }
}

/// Runtime code that emits `log` (LOG2 over its data) and stops: the data is copied from
/// the code itself.
fn log_emitter(log: &LogData) -> Bytes {
    let data = log.data.to_vec();
    let topics = log.topics();
    // prefix: PUSH2 len PUSH2 off PUSH0 CODECOPY ; PUSH32 t1 PUSH32 t0 PUSH2 len PUSH0 LOG2 STOP
    let prefix_len = 3 + 3 + 1 + 1 + 33 + 33 + 3 + 1 + 1 + 1;
    let len = data.len() as u16;
    let off = prefix_len as u16;
    let mut c = vec![0x61];
    c.extend_from_slice(&len.to_be_bytes());
    c.push(0x61);
    c.extend_from_slice(&off.to_be_bytes());
    c.extend_from_slice(&[0x5f, 0x39]);
    c.push(0x7f);
    c.extend_from_slice(topics[1].as_slice());
    c.push(0x7f);
    c.extend_from_slice(topics[0].as_slice());
    c.push(0x61);
    c.extend_from_slice(&len.to_be_bytes());
    c.extend_from_slice(&[0x5f, 0xa2, 0x00]);
    assert_eq!(c.len(), prefix_len);
    c.extend_from_slice(&data);
    Bytes::from(c)
}
