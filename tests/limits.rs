//! The client's caps on remote input (DESIGN §8): pending proposals per
//! peer are capped, refused at once with the typed reason, and given back
//! when a proposal is signed or its handler times out.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Ledger, Options, open, proposal};
use perun::channel::U256;
use perun::client::{Error, IncomingProposal, Limits, ProposalHandler, ProposalResponder};

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Never decides (the handler timeout decides for it); says when a
/// proposal reached it.
#[derive(Default)]
struct NeverDecides {
    reached: tokio::sync::Notify,
}

#[async_trait]
impl ProposalHandler for NeverDecides {
    async fn handle_proposal(&self, _p: IncomingProposal, responder: ProposalResponder) {
        self.reached.notify_one();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(responder);
    }
}

fn one_pending() -> Limits {
    Limits {
        proposals_per_peer: 1,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_proposal_gives_its_place_back() {
    let ledger = Ledger::sim().await;
    let opts = Options {
        limits: Some(one_pending()),
        ..Options::default()
    };
    let mut ps = common::parties(&ledger, 2, u(1_000_000), &opts).await;
    // One pending proposal per peer, yet channel after channel opens: each
    // one's place is free again once its version 0 is signed.
    for _ in 0..3 {
        let chans = open(&ledger, &mut ps, u(10)).await;
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    assert_eq!(ps[1].client.channels().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposals_past_the_cap_are_rejected_at_once() {
    let ledger = Ledger::sim().await;
    let mut ps = common::parties(&ledger, 1, u(1_000_000), &Options::default()).await;
    let mut timeouts = common::test_timeouts(Duration::from_secs(30));
    // Long enough that "at once" below cannot be the first's place
    // coming free.
    timeouts.handler = Duration::from_secs(4);
    let never = Arc::new(NeverDecides::default());
    let bob_opts = Options {
        proposal_handler: Some(never.clone()),
        limits: Some(one_pending()),
        timeouts: Some(timeouts),
        ..Options::default()
    };
    ps.push(common::party(&ledger, u(1_000_000), &bob_opts).await);
    common::introduce(&ps).await;
    let alice = ps[0].client.clone();
    let prop = proposal(&ledger, &ps, u(10));
    // The first waits for Bob's handler, which never decides ...
    let first = {
        let (alice, prop) = (alice.clone(), prop.clone());
        tokio::spawn(async move { alice.propose_channel(prop).await })
    };
    never.reached.notified().await;
    // ... so the second is over the cap, and rejected at once.
    let t = Instant::now();
    match alice.propose_channel(prop.clone()).await {
        Err(Error::Rejected { index: 1, reason }) => {
            assert_eq!(reason, "pending proposals at its limit of 1");
        }
        other => panic!("expected a rejection at the cap, got {other:?}"),
    }
    // Before the handler timeout (4 s) ends the first: not its place coming
    // free (an event, not a clock bound a loaded machine could miss).
    assert!(
        !first.is_finished(),
        "rejected only after {:?}, once the first ended",
        t.elapsed()
    );
    // The handler timeout rejects the first and gives its place back: the
    // next one reaches the handler again.
    match first.await.unwrap() {
        Err(Error::Rejected { reason, .. }) => assert_eq!(reason, "no decision"),
        other => panic!("expected no decision, got {other:?}"),
    }
    match alice.propose_channel(prop).await {
        Err(Error::Rejected { reason, .. }) => assert_eq!(reason, "no decision"),
        other => panic!("expected no decision, got {other:?}"),
    }
    for p in &ps {
        assert!(p.client.channels().is_empty());
    }
}
