//! Protocol role tests (DESIGN §9): each runs against `SimLedger` with the
//! in-memory store, and against anvil (real contracts) with redb.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Ledger, Options, open, parties, proposal};
use perun::channel::{Phase, U256};
use perun::client::{
    AcceptWithin, Error, IncomingUpdate, Refusal, RejectAll, UpdateHandler, UpdateResponder,
};

on_both_ledgers!(
    two_parties_pay_both_ways_and_settle,
    three_parties_open_update_settle,
    rejected_proposal_moves_no_funds,
    rejected_update_keeps_the_old_state,
    concurrent_updates_never_diverge,
    three_parties_a_refusal_after_a_signature_burns_the_version,
    three_parties_concurrent_updates_never_get_stuck,
    a_panicking_update_handler_is_a_refusal,
    accept_within_refuses_short_challenges_and_big_deposits,
    unfundable_proposals_are_rejected,
);

const MINT: u64 = 1_000_000;

fn u(x: u64) -> U256 {
    U256::from(x)
}

async fn two_parties_pay_both_ways_and_settle(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    let (a, b) = (&chans[0], &chans[1]);
    assert_eq!(a.id(), b.id());
    let mut updates = b.updates();
    for i in 0..50u64 {
        a.pay(1, 0, u(7 + i % 3)).await.unwrap();
        b.pay(0, 0, u(3)).await.unwrap();
    }
    assert_eq!(common::caught_up(&chans).await.state.version, 100);
    // Bob saw every new state, in order.
    let mut last = 0;
    while last < 100 {
        let s = updates.next().await.unwrap();
        assert!(s.state.version > last);
        last = s.state.version;
    }
    let sent_by_a: u64 = (0..50).map(|i| 7 + i % 3).sum();
    let bal = &a.state().state.outcome.balances[0];
    assert_eq!(bal[0], u(1000 - sent_by_a + 150));
    assert_eq!(bal[1], u(1000 + sent_by_a - 150));
    common::settle_all_and_check(&ledger, &ps, &chans, u(MINT - 1000)).await;
}

async fn three_parties_open_update_settle(ledger: Ledger) {
    let mut ps = parties(&ledger, 3, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(100)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    chans[1].pay(2, 0, u(20)).await.unwrap();
    chans[2].pay(0, 0, u(5)).await.unwrap();
    common::caught_up(&chans).await;
    for c in &chans {
        assert_eq!(c.state().state.version, 3);
        assert_eq!(
            c.state().state.outcome.balances[0],
            vec![u(95), u(90), u(115)]
        );
        c.state().verify_all(c.params()).unwrap();
    }
    common::settle_all_and_check(&ledger, &ps, &chans, u(MINT - 100)).await;
}

async fn rejected_proposal_moves_no_funds(ledger: Ledger) {
    let mut ps = parties(&ledger, 1, u(MINT), &Options::default()).await;
    let bob_opts = Options {
        proposal_handler: Some(Arc::new(RejectAll)),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(MINT), &bob_opts).await);
    common::introduce(&ps).await;
    let err = ps[0]
        .client
        .propose_channel(proposal(&ledger, &ps, u(100)))
        .await
        .unwrap_err();
    match err {
        Error::Rejected { index, reason } => {
            assert_eq!(index, 1);
            assert_eq!(reason, "not accepting channels");
        }
        other => panic!("expected a rejection, got {other}"),
    }
    for p in &ps {
        assert_eq!(ledger.balance(p.client.address()).await, u(MINT));
        assert!(p.client.channels().is_empty());
    }
}

/// The README's handler: a day's challenge at least, and at most 500 of
/// our own. A 60-second challenge and a deposit of 501 are refused with
/// their reason; a proposal within the limits opens. (An asset the client
/// cannot fund never reaches a handler: `unfundable_proposals_are_rejected`.)
async fn accept_within_refuses_short_challenges_and_big_deposits(ledger: Ledger) {
    let mut ps = parties(&ledger, 1, u(MINT), &Options::default()).await;
    let (accept, mut opened) = AcceptWithin::new([(ledger.asset(), u(500))]);
    let bob_opts = Options {
        proposal_handler: Some(Arc::new(accept)),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(MINT), &bob_opts).await);
    common::introduce(&ps).await;
    let day = AcceptWithin::DEFAULT_MIN_CHALLENGE;
    let too_short = proposal(&ledger, &ps, u(100));
    let mut too_big = proposal(&ledger, &ps, u(501));
    too_big.challenge_duration = day.as_secs();
    let refusals = [
        (
            too_short,
            Refusal::ChallengeTooShort {
                proposed: Duration::from_secs(60),
                min: day,
            },
        ),
        (
            too_big,
            Refusal::DepositTooHigh {
                asset: ledger.asset(),
                asked: u(501),
                max: u(500),
            },
        ),
    ];
    for (p, why) in refusals {
        match ps[0].client.propose_channel(p).await {
            Err(Error::Rejected { index: 1, reason }) => assert_eq!(reason, why.to_string()),
            other => panic!("expected {why}, got {other:?}"),
        }
    }
    for p in &ps {
        assert_eq!(ledger.balance(p.client.address()).await, u(MINT));
        assert!(p.client.channels().is_empty());
    }
    let mut fine = proposal(&ledger, &ps, u(500));
    fine.challenge_duration = day.as_secs();
    let (alice, bob) = tokio::join!(ps[0].client.propose_channel(fine), opened.recv());
    assert_eq!(alice.unwrap().id(), bob.unwrap().unwrap().id());
}

/// A funder that claims it can fund every asset (so its owner proposes what the peer cannot fund).
struct ClaimsAll(Arc<dyn perun::adjudicator::Funder>);

#[async_trait]
impl perun::adjudicator::Funder for ClaimsAll {
    async fn fund(
        &self,
        req: perun::adjudicator::FundingRequest,
    ) -> perun::adjudicator::Result<()> {
        self.0.fund(req).await
    }

    fn supports(&self, _: &perun::channel::Asset) -> bool {
        true
    }
}

/// A channel with an asset the funder cannot deposit (a holder it is not configured for)
/// is never opened: the proposer refuses before sending, a responder rejects with the
/// reason, and no channel goes Active, no money moves.
async fn unfundable_proposals_are_rejected(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let foreign = perun::channel::Asset {
        chainId: ledger.asset().chainId,
        holder: perun::channel::Address::repeat_byte(0x99),
    };
    let with_foreign = |mut prop: perun::client::ChannelProposal| {
        prop.allocation.assets.push(foreign.clone());
        prop.allocation.balances.push(vec![u(1); 2]);
        prop
    };
    let err = ps[0]
        .client
        .propose_channel(with_foreign(proposal(&ledger, &ps, u(100))))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedAsset { index: 1, holder, .. } if *holder == foreign.holder),
        "{}: {err}",
        ledger.name()
    );

    // A proposer whose funder claims everything: Bob's funder does not support the asset.
    let (claims, _) = ledger.backends(&ledger.account(u(0)).await).await;
    let alice_opts = Options {
        funder: Some(Arc::new(ClaimsAll(claims))),
        ..Options::default()
    };
    let alice = common::party(&ledger, u(MINT), &alice_opts).await;
    let bob = ps.pop().unwrap();
    common::introduce(&[&alice, &bob]).await;
    let err = alice
        .client
        .propose_channel(with_foreign(proposal(&ledger, &[&alice, &bob], u(100))))
        .await
        .unwrap_err();
    match err {
        Error::Rejected { index, reason } => {
            assert_eq!(index, 1);
            assert!(reason.contains("not fundable"), "{reason}");
        }
        other => panic!("{}: expected a rejection, got {other}", ledger.name()),
    }
    for p in [&alice, &bob, &ps[0]] {
        assert!(p.client.channels().is_empty(), "{}", ledger.name());
        assert_eq!(ledger.balance(p.client.address()).await, u(MINT));
    }
}

struct NoThanks;

#[async_trait]
impl UpdateHandler for NoThanks {
    async fn handle_update(&self, _u: IncomingUpdate, responder: UpdateResponder) {
        responder.reject("no thanks");
    }
}

async fn rejected_update_keeps_the_old_state(ledger: Ledger) {
    let mut ps = parties(&ledger, 1, u(MINT), &Options::default()).await;
    let bob_opts = Options {
        update_handler: Some(Arc::new(NoThanks)),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(MINT), &bob_opts).await);
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(100)).await;
    let before = chans[0].state();
    match chans[0].pay(1, 0, u(1)).await {
        Err(Error::Rejected { index: 1, reason }) => assert_eq!(reason, "no thanks"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(chans[0].state(), before);
    assert_eq!(chans[1].state(), before);
    assert_eq!(chans[0].phase(), Phase::Active);
    assert_eq!(chans[1].phase(), Phase::Active);
    // Bob's own updates still work.
    chans[1].pay(0, 0, u(1)).await.unwrap();
    assert_eq!(common::caught_up(&chans).await.state.version, 1);
}

async fn concurrent_updates_never_diverge(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(10_000)).await;
    let (a, b) = (chans[0].clone(), chans[1].clone());
    let mut conflicts = 0;
    for _ in 0..100 {
        let (ra, rb) = tokio::join!(a.pay(1, 0, u(2)), b.pay(0, 0, u(1)));
        for r in [ra, rb] {
            match r {
                Ok(_) => {}
                Err(e) if e.is_retryable() => conflicts += 1,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        // Both sides agree after every round.
        common::caught_up(&[a.clone(), b.clone()]).await;
    }
    let v = a.state().state.version;
    eprintln!("{}: {v} committed, {conflicts} conflicts", ledger.name());
    assert_eq!(
        v + conflicts,
        200,
        "every attempt either committed or lost a conflict"
    );
    let bal = &a.state().state.outcome.balances[0];
    assert_eq!(bal[0] + bal[1], u(20_000));
}

/// Refuses the first update it is asked about, accepts every later one.
struct RefuseFirst(AtomicBool);

#[async_trait]
impl UpdateHandler for RefuseFirst {
    async fn handle_update(&self, _u: IncomingUpdate, responder: UpdateResponder) {
        if self.0.swap(true, Ordering::SeqCst) {
            responder.accept();
        } else {
            responder.reject("not this one");
        }
    }
}

/// Waits until no party has an update in flight.
async fn all_active(chans: &[perun::client::Channel]) {
    for c in chans {
        c.wait_for_phase(Phase::Active, Duration::from_secs(30))
            .await
            .expect("no update stays half done");
    }
}

/// Bob signs Alice's update, Carol refuses it: Alice aborts, Bob drops his
/// signed state at once, and version 1 is burnt. The channel goes on with
/// versions 2 and 3, and settles on them.
async fn three_parties_a_refusal_after_a_signature_burns_the_version(ledger: Ledger) {
    let mut ps = parties(&ledger, 2, u(MINT), &Options::default()).await;
    let carol_opts = Options {
        update_handler: Some(Arc::new(RefuseFirst(AtomicBool::new(false)))),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(MINT), &carol_opts).await);
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(100)).await;
    match chans[0].pay(1, 0, u(10)).await {
        Err(Error::Rejected { index: 2, reason }) => assert_eq!(reason, "not this one"),
        other => panic!("expected Carol's refusal, got {other:?}"),
    }
    for c in &chans {
        assert_eq!(c.phase(), Phase::Active, "the abort reached everyone");
        assert_eq!(c.state().state.version, 0);
    }
    assert_eq!(chans[1].pay(2, 0, u(5)).await.unwrap().state.version, 2);
    assert_eq!(chans[0].pay(1, 0, u(10)).await.unwrap().state.version, 3);
    let st = common::caught_up(&chans).await;
    assert_eq!(st.state.outcome.balances[0], vec![u(90), u(105), u(105)]);
    common::settle_all_and_check(&ledger, &ps, &chans, u(MINT - 100)).await;
}

/// Pays, retrying a retryable failure after a pause that differs per
/// party (as an application would); returns how many attempts failed.
async fn pay_retrying(c: &perun::client::Channel, to: usize, amount: u64) -> u64 {
    for attempt in 0..100u64 {
        match c.pay(to, 0, u(amount)).await {
            Ok(_) => return attempt,
            Err(e) if e.is_retryable() => {
                let pause = (c.index() as u64 + 1) * (attempt % 4 + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    panic!("a payment never got through");
}

/// All three pay at once, round after round. Conflicts abort updates that
/// others already signed; nobody is left with a half-done update, every
/// payment gets through on a retry, and the balances are exact.
async fn three_parties_concurrent_updates_never_get_stuck(ledger: Ledger) {
    let mut ps = parties(&ledger, 3, u(MINT), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    let mut conflicts = 0;
    for _ in 0..20 {
        let (r0, r1, r2) = tokio::join!(
            pay_retrying(&chans[0], 1, 3),
            pay_retrying(&chans[1], 2, 2),
            pay_retrying(&chans[2], 0, 1),
        );
        conflicts += r0 + r1 + r2;
        all_active(&chans).await;
        common::caught_up(&chans).await;
    }
    let st = common::caught_up(&chans).await;
    eprintln!(
        "{}: 60 payments at version {} after {conflicts} retries",
        ledger.name(),
        st.state.version
    );
    assert!(st.state.version >= 60);
    assert_eq!(st.state.outcome.balances[0], vec![u(960), u(1020), u(1020)]);
    common::settle_all_and_check(&ledger, &ps, &chans, u(MINT - 1000)).await;
}

/// Panics on the first update it is asked about, accepts later ones.
struct PanicsFirst(AtomicBool);

#[async_trait]
impl UpdateHandler for PanicsFirst {
    async fn handle_update(&self, _u: IncomingUpdate, responder: UpdateResponder) {
        if !self.0.swap(true, Ordering::SeqCst) {
            panic!("the application's handler has a bug");
        }
        responder.accept();
    }
}

/// A handler that panics refuses the update; nothing is left staged, and
/// the channel goes on.
async fn a_panicking_update_handler_is_a_refusal(ledger: Ledger) {
    let mut ps = parties(&ledger, 1, u(MINT), &Options::default()).await;
    let bob_opts = Options {
        update_handler: Some(Arc::new(PanicsFirst(AtomicBool::new(false)))),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(MINT), &bob_opts).await);
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(100)).await;
    match chans[0].pay(1, 0, u(1)).await {
        Err(Error::Rejected { index: 1, reason }) => assert_eq!(reason, "handler failed"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    all_active(&chans).await;
    assert_eq!(chans[0].pay(1, 0, u(1)).await.unwrap().state.version, 1);
    assert_eq!(common::caught_up(&chans).await.state.version, 1);
}

/// A handler that may take longer than the peer waits for its answer is a
/// configuration error, caught when the client is built.
#[tokio::test]
async fn timeouts_that_do_not_fit_together_fail_the_build() {
    let sim = Arc::new(perun::adjudicator::SimLedger::new(1337));
    let build = |t: perun::client::Timeouts| {
        perun::client::Client::builder()
            .account(Arc::new(perun::wallet::LocalAccount::random()))
            .funder(sim.clone())
            .adjudicator(sim.clone())
            .timeouts(t)
            .build()
    };
    let slow = perun::client::Timeouts {
        handler: Duration::from_secs(20),
        request: Duration::from_secs(15),
        ..perun::client::Timeouts::default()
    };
    match build(slow).await {
        Err(Error::Timeouts(perun::client::TimeoutRule::HandlerFitsRequest {
            handler,
            request,
        })) => {
            assert_eq!(
                (handler, request),
                (Duration::from_secs(20), Duration::from_secs(15))
            );
        }
        other => panic!("expected a timeout rule, got {:?}", other.map(|_| ())),
    }
    let ok = build(perun::client::Timeouts::default()).await.unwrap();
    ok.shutdown().await;
}
