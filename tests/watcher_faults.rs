//! A channel's watcher when its store hangs, and deposits that land after
//! it withdrew: from an adversarial review, each test failed before its
//! fix.
//!
//! - `a_hung_store_does_not_keep_the_watcher_from_refuting` and
//!   `a_hung_fsync_on_the_callers_thread_does_not_keep_the_watcher_from_refuting`:
//!   the refutation waited for a disk write under the channel's lock
//!   (`enter_closing`).
//! - `a_late_deposit_is_swept_even_if_the_first_withdrawal_fails` and
//!   `a_deposit_still_in_flight_when_the_channel_is_withdrawn_is_swept`: a
//!   deposit of ours that landed after the watcher withdrew was swept by one
//!   `withdraw` call at one moment (`open.rs`, `sweep_late_deposit`), never
//!   again.
//! - `a_failed_write_of_the_active_phase_is_tried_again`: a funded opening
//!   failed on one failed write of its phase and stayed in `Funding`.
//! - `an_app_move_is_answered_after_a_stalled_resubscription`: a
//!   registered state the client does not hold is learnt from the event
//!   history, and a stream that never delivered it was never replaced.
//! - `a_registered_state_we_signed_is_concluded_without_any_event`: nor
//!   was our own staged state used when the peer registered it.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::flaky::Flaky;
use common::{Ledger, Options, Party, bob_registers, open};
use perun::adjudicator::Adjudicator;
use perun::channel::{ChannelId, Phase, U256};
use perun::persistence::{Change, ChannelRecord, Persister};

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// DESIGN §8: "On-chain steps never wait for the disk: if the phase cannot
/// be stored, it moves in memory and the step goes ahead." Alice's store
/// stops answering (it does not fail: it hangs). Bob registers a stale
/// state. Alice's watcher reads the dispute, then stores the phase
/// `Registered` under the channel's lock before it refutes
/// (`enter_closing`, and `ChannelCore::latest` takes the same lock): the
/// write never returns, and the refutation is never sent. Bob's stale
/// state stands and concludes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_store_does_not_keep_the_watcher_from_refuting() {
    let ledger = Ledger::sim().await;
    let (alice_opts, store) = common::failing_writes(|_| true);
    let mut ps: Vec<Party> = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    let (stale, latest) = common::stale_and_latest(&chans).await;
    // Bob goes rogue (his own client would refute his stale state).
    ps[1].client.shutdown().await;
    store.hang();
    let adj: Arc<dyn Adjudicator> = bob_registers(&ledger, &ps[1], &chans[1], stale).await;
    refutes_within_20_s(&adj, &chans[0], &latest, "").await;
}

/// Alice's store fails to record her funded channel as `Active` three
/// times (a transient disk error). The opening tries again and hands out an
/// active channel, which then pays; it once returned the error and left the
/// funded channel in `Funding` until a restart, while Bob had it active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_write_of_the_active_phase_is_tried_again() {
    use perun::channel::Phase;
    let ledger = Ledger::sim().await;
    let (alice_opts, store) = common::failing_writes(|changes| {
        changes
            .iter()
            .any(|c| matches!(c, Change::Phase(Phase::Active)))
    });
    let mut ps: Vec<Party> = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    store.arm(3);
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    assert_eq!(store.injected(), 3);
    assert_eq!(chans[0].phase(), Phase::Active);
    chans[0].pay(1, 0, u(10)).await.unwrap();
    assert_eq!(chans[0].state().state.version, 1);
}

/// Alice's watcher refutes Bob's stale registration with `latest` within
/// 20 s (`why` adds to the failure message).
async fn refutes_within_20_s(
    adj: &Arc<dyn Adjudicator>,
    ch: &perun::client::Channel,
    latest: &perun::channel::SignedState,
    why: &str,
) {
    let id = ch.id();
    let refuted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if adj
                .dispute(id)
                .await
                .unwrap()
                .is_some_and(|d| d.version == latest.state.version)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let d = adj.dispute(id).await.unwrap().unwrap();
    assert!(
        refuted.is_ok(),
        "Alice's watcher must refute Bob's stale version 1 with version {} although her \
         store hangs; after 20 s the chain still holds version {} (phase {:?}){why}",
        latest.state.version,
        d.version,
        ch.phase(),
    );
}

/// An adjudicator whose next `fails` withdrawals fail before reaching the
/// chain (a node that did not answer): transient, retry and it works. With
/// `slow_first`, its first withdrawal lands, raises the flag, and returns
/// only 4 s later (an `EthAdjudicator` waiting for confirmations): the
/// watcher sits in `Concluded` meanwhile.
struct FailWithdraw {
    inner: Arc<dyn Adjudicator>,
    fails: Arc<std::sync::atomic::AtomicU32>,
    slow_first: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[async_trait::async_trait]
impl Adjudicator for FailWithdraw {
    fn domain(&self) -> perun::channel::Domain {
        self.inner.domain()
    }
    async fn register(
        &self,
        req: &perun::adjudicator::SignedChannel,
    ) -> perun::adjudicator::Result<()> {
        self.inner.register(req).await
    }
    async fn progress(
        &self,
        req: &perun::adjudicator::ProgressRequest,
    ) -> perun::adjudicator::Result<()> {
        self.inner.progress(req).await
    }
    async fn conclude(
        &self,
        req: &perun::adjudicator::SignedChannel,
    ) -> perun::adjudicator::Result<()> {
        self.inner.conclude(req).await
    }
    async fn withdraw(
        &self,
        req: &perun::adjudicator::WithdrawRequest,
    ) -> perun::adjudicator::Result<()> {
        if self
            .fails
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(perun::adjudicator::Error::Rpc {
                op: "withdraw",
                source: perun::adjudicator::RpcFailure::Injected(0),
            });
        }
        let res = self.inner.withdraw(req).await;
        if let Some(landed) = &self.slow_first
            && !landed.swap(true, Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        res
    }
    async fn subscribe(
        &self,
        id: ChannelId,
    ) -> perun::adjudicator::Result<perun::adjudicator::EventStream> {
        self.inner.subscribe(id).await
    }
    async fn dispute(
        &self,
        id: ChannelId,
    ) -> perun::adjudicator::Result<Option<perun::adjudicator::Dispute>> {
        self.inner.dispute(id).await
    }
    fn history(&self) -> Option<&dyn perun::adjudicator::ChainHistory> {
        self.inner.history()
    }
}

/// Alice's funder as an `EthFunder` behaves when her deposit transaction
/// sits in the pool (a fee spike under her fee cap) until the channel was
/// closed with version 0 and concluded: the deposit lands in the concluded
/// channel (the holder takes it: a deposit after the conclusion is
/// withdrawable at once), and funding reports failure.
struct LateDeposit {
    sim: Arc<perun::adjudicator::SimLedger>,
    how: Lands,
}

/// How the late deposit lands and what funding reports.
enum Lands {
    /// Mined before `fund` returns `FundingTimeout`; then the next
    /// withdrawal fails (`fails` set to 1, for [`FailWithdraw`]).
    ThenOneWithdrawalFails(Arc<AtomicU32>),
    /// `fund` reports the transient `ReceiptTimeout` (the queue keeps the
    /// transaction going, as documented) and it is mined a second later;
    /// `landed` holds what it came to.
    InFlight(Arc<std::sync::Mutex<Option<perun::adjudicator::Result<()>>>>),
    /// Mined, and `fund` reports success (every deposit is in).
    AndFundingSucceeds,
    /// Mined once the watcher's (slow, [`FailWithdraw::slow_first`])
    /// withdrawal landed and before it returned; `fund` reports success
    /// or, `ok` false, a timeout.
    WhileTheWatcherConcludes {
        landed: Arc<std::sync::atomic::AtomicBool>,
        ok: bool,
    },
}

#[async_trait::async_trait]
impl perun::adjudicator::Funder for LateDeposit {
    async fn fund(
        &self,
        req: perun::adjudicator::FundingRequest,
    ) -> perun::adjudicator::Result<()> {
        let id = req.state.channelId;
        if let Lands::WhileTheWatcherConcludes { landed, .. } = &self.how {
            while !landed.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            while !self.sim.dispute(id).await?.is_some_and(|d| d.concluded) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Alice's watcher has withdrawn her (empty) share by now
            // (nothing on-chain tells: her share is zero either way).
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let me = req.params.participants[req.index];
        let holder = req.state.outcome.assets[0].holder;
        let amount = req.params.funding_of(0, req.index);
        match &self.how {
            Lands::ThenOneWithdrawalFails(fails) => {
                self.sim
                    .deposit_to(holder, me, id, me, U256::ZERO, amount)
                    .unwrap();
                fails.store(1, Ordering::SeqCst);
                Err(perun::adjudicator::Error::FundingTimeout {
                    missing: vec![(1, req.params.participants[1])],
                })
            }
            Lands::AndFundingSucceeds => {
                self.sim
                    .deposit_to(holder, me, id, me, U256::ZERO, amount)
                    .unwrap();
                Ok(())
            }
            Lands::WhileTheWatcherConcludes { ok, .. } => {
                self.sim
                    .deposit_to(holder, me, id, me, U256::ZERO, amount)
                    .unwrap();
                if *ok {
                    Ok(())
                } else {
                    Err(perun::adjudicator::Error::FundingTimeout {
                        missing: vec![(1, req.params.participants[1])],
                    })
                }
            }
            Lands::InFlight(landed) => {
                let (sim, landed) = (self.sim.clone(), landed.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let res = sim.deposit_to(holder, me, id, me, U256::ZERO, amount);
                    *landed.lock().unwrap() = Some(res);
                });
                Err(perun::adjudicator::Error::ReceiptTimeout {
                    op: "deposit",
                    tx: perun::channel::B256::repeat_byte(0xde),
                    waited: Duration::from_secs(120),
                })
            }
        }
    }

    fn supports(&self, _: &perun::channel::Asset) -> bool {
        true
    }
}

/// `open.rs` sweeps a deposit of ours that landed after the watcher had
/// withdrawn (`sweep_late_deposit`), but with exactly one `withdraw` call:
/// if that call fails (any RPC call can), the deposit stays credited in a
/// concluded channel whose record was already deleted (`Withdrawn`), and
/// nothing ever tries again. Alice's 1,000 are stranded until someone
/// thinks of running `recover_funds` by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_deposit_is_swept_even_if_the_first_withdrawal_fails() {
    let ledger = Ledger::sim().await;
    let Ledger::Sim(sim) = &ledger else {
        unreachable!()
    };
    let fails = Arc::new(AtomicU32::new(0));
    let alice_opts = Options {
        funder: Some(Arc::new(LateDeposit {
            sim: sim.clone(),
            how: Lands::ThenOneWithdrawalFails(fails.clone()),
        })),
        wrap_adjudicator: Some(Box::new({
            let fails = fails.clone();
            move |inner| {
                Arc::new(FailWithdraw {
                    inner,
                    fails: fails.clone(),
                    slow_first: None,
                }) as Arc<dyn Adjudicator>
            }
        })),
        ..Options::default()
    };
    let (ps, id) = bob_closes_the_channel_alice_funds_late(&ledger, &alice_opts).await;
    // The sweep runs on a task of its own; its first withdrawal meets the
    // injected failure.
    tokio::time::timeout(common::WAIT, async {
        while fails.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the sweep's withdrawal was tried");
    alice_gets_her_deposit_back(&ledger, &ps[0].client, id, "retried after one failed call").await;
}

/// The late deposit lands and the funder reports the channel funded, while
/// the watcher has withdrawn already: the move to `Active` is refused
/// (`Withdrawn` is final), and the deposit must be swept all the same (a
/// review found only a failed funding swept; this one stayed credited in
/// the concluded channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_deposit_reported_as_funded_is_swept() {
    let ledger = Ledger::sim().await;
    let Ledger::Sim(sim) = &ledger else {
        unreachable!()
    };
    let alice_opts = Options {
        funder: Some(Arc::new(LateDeposit {
            sim: sim.clone(),
            how: Lands::AndFundingSucceeds,
        })),
        ..Options::default()
    };
    let (ps, id) = bob_closes_the_channel_alice_funds_late(&ledger, &alice_opts).await;
    alice_gets_her_deposit_back(&ledger, &ps[0].client, id, "funding said it succeeded").await;
}

/// The late deposit lands after the watcher's withdrawal landed but before
/// the watcher stored `Withdrawn` (still `Concluded`: its withdrawal waits
/// for confirmations). A review found it swept only if the phase was
/// `Withdrawn` just when funding returned: here it stayed credited, whether
/// the funder reported success or a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_deposit_landing_while_the_watcher_concludes_is_swept() {
    for ok in [true, false] {
        let ledger = Ledger::sim().await;
        let Ledger::Sim(sim) = &ledger else {
            unreachable!()
        };
        let landed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let alice_opts = Options {
            funder: Some(Arc::new(LateDeposit {
                sim: sim.clone(),
                how: Lands::WhileTheWatcherConcludes {
                    landed: landed.clone(),
                    ok,
                },
            })),
            wrap_adjudicator: Some(Box::new({
                let landed = landed.clone();
                move |inner| {
                    Arc::new(FailWithdraw {
                        inner,
                        fails: Arc::default(),
                        slow_first: Some(landed.clone()),
                    }) as Arc<dyn Adjudicator>
                }
            })),
            ..Options::default()
        };
        let (ps, id) = bob_closes_the_channel_alice_funds_late(&ledger, &alice_opts).await;
        let why = format!("it landed while the watcher concluded; the funder said ok: {ok}");
        alice_gets_her_deposit_back(&ledger, &ps[0].client, id, &why).await;
    }
}

/// Bob deposits, Alice's funding fails (her funder decides how her deposit
/// lands late), Bob closes the channel with version 0 once his funding
/// timeout passed, and it concludes: returns both parties and the id.
async fn bob_closes_the_channel_alice_funds_late(
    ledger: &Ledger,
    alice_opts: &Options,
) -> (Vec<Party>, ChannelId) {
    let Ledger::Sim(sim) = ledger else {
        unreachable!()
    };
    let bob_opts = Options {
        funding_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let ps: Vec<Party> = vec![
        common::party(ledger, u(MINT), alice_opts).await,
        common::party(ledger, u(MINT), &bob_opts).await,
    ];
    common::introduce(&ps).await;
    let alice = ps[0].client.clone();
    let prop = common::proposal(ledger, &ps, u(EACH));
    let opening = tokio::spawn({
        let alice = alice.clone();
        async move { alice.propose_channel(prop).await }
    });
    let id = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Some(ch) = alice.channels().pop()
                && sim.dispute(ch.id()).await.unwrap().is_some()
            {
                return ch.id();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Bob closes the unfunded channel with version 0");
    ledger.advance(61).await;
    opening.await.unwrap().unwrap_err();
    (ps, id)
}

/// Alice's balance is back to what she minted within 15 s: her late
/// deposit was withdrawn (`why` says what made it hard).
async fn alice_gets_her_deposit_back(
    ledger: &Ledger,
    alice: &perun::client::Client,
    id: ChannelId,
    why: &str,
) {
    let Ledger::Sim(sim) = ledger else {
        unreachable!()
    };
    let alice_addr = alice.address();
    let back = tokio::time::timeout(common::WAIT, async {
        while ledger.balance(alice_addr).await != u(MINT) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (credit, settled) = sim.holdings(
        ledger.asset().holder,
        perun::adjudicator::funding_id(id, alice_addr),
    );
    assert!(
        back.is_ok(),
        "Alice's late deposit must be withdrawn ({why}); 60 s later she has {} of {MINT}, \
         {credit} stays credited to her in the concluded channel (settled: {settled}), and \
         the channel is {:?} (its record deleted from her store)",
        ledger.balance(alice_addr).await,
        alice.channel(&id).map(|c| c.phase()),
    );
}

/// The same sweep, without any failed call: Alice's deposit is still in the
/// transaction queue when her funding loop sees the channel `Withdrawn`;
/// `sweep_late_deposit` withdraws at once, finds nothing credited yet, and
/// returns. The deposit lands a second later in the concluded channel
/// (the holder takes it) and nothing ever withdraws it: the watcher is done
/// and the channel's record is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_still_in_flight_when_the_channel_is_withdrawn_is_swept() {
    let ledger = Ledger::sim().await;
    let Ledger::Sim(sim) = &ledger else {
        unreachable!()
    };
    let landed = Arc::new(std::sync::Mutex::new(None));
    let alice_opts = Options {
        funder: Some(Arc::new(LateDeposit {
            sim: sim.clone(),
            how: Lands::InFlight(landed.clone()),
        })),
        ..Options::default()
    };
    let (ps, id) = bob_closes_the_channel_alice_funds_late(&ledger, &alice_opts).await;
    // The deposit lands a second after funding gave up (and the sweep ran).
    let _ = tokio::time::timeout(common::WAIT, async {
        while landed.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        matches!(*landed.lock().unwrap(), Some(Ok(()))),
        "the late deposit landed in the concluded channel"
    );
    alice_gets_her_deposit_back(
        &ledger,
        &ps[0].client,
        id,
        "it landed after the first sweep",
    )
    .await;
}

// ------------------------------------------------------------------------
// A store that hangs in `fsync`, as the default store does it.

/// Releases the stalled `fsync` when the test ends (also on a failed
/// assertion), so the runtime can shut down.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Alice's real redb store ([`Options::redb`], default `RedbOptions`), with
/// a disk whose `fsync` stops returning once `armed`.
///
/// `RedbPersister::update` on an idle store runs its batch of one, `fsync`
/// included, on the caller's thread inside the caller's poll
/// (`RedbOptions::write_on_caller_when_idle`, on by default; module docs of
/// `redb_store`): unarmed, this wrapper polls the real store's update once
/// and counts the updates that were done (durable) within that one poll.
/// Armed, the first update blocks its thread the way that inline `fsync`
/// does on a hung disk, and later ones wait (asynchronously) behind it, as
/// a request queued for the writer thread waits for the writer's lock.
struct FsyncStalls {
    inner: Arc<dyn Persister>,
    armed: Arc<AtomicBool>,
    stalling: AtomicBool,
    released: Arc<AtomicBool>,
    inline: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl Persister for FsyncStalls {
    async fn channel_created(&self, ch: &ChannelRecord) -> perun::persistence::Result<()> {
        self.inner.channel_created(ch).await
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> perun::persistence::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            if !self.stalling.swap(true, Ordering::SeqCst) {
                // The inline `fsync` that does not return: the thread is stuck.
                let t = std::time::Instant::now();
                while !self.released.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            } else {
                while !self.released.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            return self.inner.update(id, changes).await;
        }
        let mut fut = self.inner.update(id, changes);
        let first = {
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            fut.as_mut().poll(&mut cx)
        };
        match first {
            std::task::Poll::Ready(r) => {
                self.inline.fetch_add(1, Ordering::SeqCst);
                r
            }
            std::task::Poll::Pending => fut.await,
        }
    }
    async fn channel_removed(&self, id: ChannelId) -> perun::persistence::Result<()> {
        self.inner.channel_removed(id).await
    }
    async fn channel_ids(&self) -> perun::persistence::Result<Vec<ChannelId>> {
        self.inner.channel_ids().await
    }
    async fn load(&self, id: ChannelId) -> perun::persistence::Result<Option<ChannelRecord>> {
        self.inner.load(id).await
    }
    async fn load_all(&self) -> perun::persistence::Result<Vec<ChannelRecord>> {
        self.inner.load_all().await
    }
}

/// The first fix of the test above bounded the closing phase's write with
/// a `tokio::time::timeout`. That bounds a write that hangs
/// asynchronously, but the client's own store writes an idle channel's
/// update on the caller's thread, `fsync` included, within one poll: a
/// hung `fsync` there blocked the watcher's task, and the timeout was never
/// polled. The write now runs on a task of its own. (Precondition checked
/// first: with Alice's real redb store, her updates are durable within the
/// one poll of the caller.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_fsync_on_the_callers_thread_does_not_keep_the_watcher_from_refuting() {
    let ledger = Ledger::sim().await;
    let armed = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicBool::new(false));
    let _release = Release(released.clone());
    let inline = Arc::new(AtomicU32::new(0));
    let alice_opts = Options {
        redb: true,
        wrap_persister: Some(Box::new({
            let (armed, released, inline) = (armed.clone(), released.clone(), inline.clone());
            move |inner| {
                Arc::new(FsyncStalls {
                    inner,
                    armed: armed.clone(),
                    stalling: AtomicBool::new(false),
                    released: released.clone(),
                    inline: inline.clone(),
                }) as Arc<dyn Persister>
            }
        })),
        ..Options::default()
    };
    let mut ps = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    // Whether a write finds the store idle depends on the machine's load:
    // pay until one has (a store that never writes inline never gets there).
    for _ in 0..100 {
        if inline.load(Ordering::SeqCst) > 0 {
            break;
        }
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    let (stale, latest) = common::stale_and_latest(&chans).await;
    let inline = inline.load(Ordering::SeqCst);
    assert!(
        inline > 0,
        "precondition: the redb store wrote some of Alice's updates (fsync and all) \
         within the caller's poll"
    );
    // Bob goes rogue (his own client would refute his stale state).
    ps[1].client.shutdown().await;
    armed.store(true, Ordering::SeqCst);
    let adj: Arc<dyn Adjudicator> = bob_registers(&ledger, &ps[1], &chans[1], stale).await;
    let why = format!(" ({inline} updates were durable within one poll before)");
    refutes_within_20_s(&adj, &chans[0], &latest, &why).await;
}

/// Alice's watcher (events through a `Flaky`) with timeouts short enough
/// for a stalled stream to be given up on within the test.
fn watched_alice(base: Options) -> (Options, Arc<std::sync::Mutex<Option<Arc<Flaky>>>>) {
    Flaky::wrapping(Options {
        timeouts: Some(perun::client::Timeouts {
            // Without events, the periodic read finds the dispute.
            chain_recheck: Duration::from_millis(500),
            ..common::test_timeouts(Duration::from_secs(30))
        }),
        ..base
    })
}

/// Waits until the watcher subscribed `n` times in all.
async fn subscribed(chain: &Flaky, n: u32) {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while chain.subscriptions.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < until,
            "the watcher subscribed again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bob's twin gets Alice's signature on a newer state that pays her 5 and
/// never commits it; Bob registers it. Every `Registered` event is lost
/// and every subscription stalls (no history, no end: a silent node
/// connection). The registered state is Alice's staged update, which she
/// signed herself: she needs no event to conclude it. Before, the watcher
/// knew registered states only from events (or its latest state), so it
/// never concluded and the money stayed locked (review of 2026-12-06; the
/// stall itself: `an_app_move_is_answered_after_a_stalled_resubscription`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registered_state_we_signed_is_concluded_without_any_event() {
    use perun::wallet::Account;
    let ledger = Ledger::sim().await;
    let (alice_opts, slot) = watched_alice(Options::default());
    let mut ps = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(EACH)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    let before = common::caught_up(&chans).await;
    let alice = chans[0].clone();
    drop(chans);
    let chain = slot.lock().unwrap().clone().unwrap();
    let (evil, _evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let mut newer = before.state.next();
    newer.outcome.balances[0][1] -= u(5);
    newer.outcome.balances[0][0] += u(5);
    let update = perun::wire::Message::Update(perun::wire::Update {
        channel_id: alice.id(),
        state: newer.clone(),
        actor: 1,
    });
    let alice_sig = match evil.send(ps[0].client.peer_id(), &update).await.unwrap() {
        perun::wire::Message::UpdateAccept(a) => a.signature,
        other => panic!("Alice accepts a payment to her, got {other:?}"),
    };
    let newer = perun::channel::SignedState {
        sigs: vec![
            Some(alice_sig),
            Some(bob_key.sign_hash(newer.hash()).unwrap()),
        ],
        state: newer,
    };
    chain.lose_dispute_events.store(true, Ordering::SeqCst);
    chain.stall_new_streams.store(true, Ordering::SeqCst);
    let (_, bob_adj) = ledger.backends(&ps[1].account).await;
    bob_adj
        .register(&perun::adjudicator::SignedChannel {
            params: alice.params().clone(),
            state: newer.clone(),
        })
        .await
        .unwrap();
    ledger.advance(common::game::CHALLENGE + 1).await;
    // The watcher finds the registration by its periodic read.
    alice
        .wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("Alice never concluded the state she signed: {e}"));
    assert_eq!(
        ledger.balance(alice.params().participants[0]).await,
        u(MINT - EACH) + newer.state.outcome.balances[0][0],
    );
}

/// The same fault on an app channel (tic-tac-toe): Bob forces his move
/// on-chain, its `Progressed` event is lost and Alice's new subscription
/// stalls. She was never told it is her move and could not answer it
/// (`RegisteredStateUnknown`): at its timeout Bob would conclude holding
/// the pot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_move_is_answered_after_a_stalled_resubscription() {
    use perun::channel::tictactoe::TicTacToe;
    use perun::client::ChannelEvent;
    let slot = Arc::new(std::sync::Mutex::new(None));
    let keep = slot.clone();
    let g = common::game::game_with(Ledger::sim().await, move |app| {
        let (opts, inner) = watched_alice(common::game::app_opts(app));
        *keep.lock().unwrap() = Some(inner);
        opts
    })
    .await;
    let chain = slot
        .lock()
        .unwrap()
        .take()
        .and_then(|s: Arc<std::sync::Mutex<Option<Arc<Flaky>>>>| s.lock().unwrap().clone())
        .expect("Alice's adjudicator");
    common::game::play(&g, 0, 4).await; // X takes the centre (version 1)
    let (alice, bob) = (g.chans[0].clone(), g.chans[1].clone());
    let params = alice.params().clone();
    let mut alice_events = alice.events();
    let forcing = {
        let params = params.clone();
        tokio::spawn(async move { bob.force_update(|s| TicTacToe.play(&params, s, 1, 0)).await })
    };
    common::game::on_chain(&g, 1).await;
    alice
        .wait_for_phase(Phase::Registered, Duration::from_secs(30))
        .await
        .unwrap();
    let before = chain.subscriptions.load(Ordering::SeqCst);
    chain.lose_dispute_events.store(true, Ordering::SeqCst);
    chain.stall_new_streams.store(true, Ordering::SeqCst);
    g.ledger.advance(common::game::CHALLENGE + 1).await;
    assert_eq!(forcing.await.unwrap().unwrap().version, 2);
    subscribed(&chain, before + 1).await;
    chain.lose_dispute_events.store(false, Ordering::SeqCst);
    chain.stall_new_streams.store(false, Ordering::SeqCst);
    let told = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match alice_events.next().await {
                Some(ChannelEvent::YourMove { state }) if state.version == 2 => return,
                Some(_) => {}
                None => panic!("event stream ended"),
            }
        }
    })
    .await;
    assert!(told.is_ok(), "Alice was never told it is her move");
    let answer = alice
        .force_update(|st| TicTacToe.play(&params, st, 0, 1))
        .await;
    assert!(answer.is_ok(), "Alice cannot answer Bob's move: {answer:?}");
}
