//! The responder on `SimLedger` (fast): it refutes an old registered state
//! with the newest appointment and concludes after the timeout; it spends
//! nothing on refused blobs or on states that are not newer; a restart in
//! the middle of a job resumes it without a second refutation; disputes
//! that started while it was down are found from the cursor.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::{Address, U256};
use async_trait::async_trait;
use perun_adjudicator::{
    Adjudicator, Dispute, EventStream, Funder, FundingRequest, SignedChannel, SimLedger,
    WithdrawRequest,
};
use perun_channel::{Allocation, Asset, ChannelId, Domain, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};
use perun_watchtower::responder::{Config, Responder, Stats};
use perun_watchtower::scheme::{ChannelSecret, seal};
use perun_watchtower::store::{Job, JobPhase, NewAppointment, OpenDispute, Seen, Status, Store};
use rand::RngCore;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const ETH: Address = Address::repeat_byte(0xee);

/// Counts the chain calls that could cost gas, and can freeze one (a
/// process killed while a transaction is out).
struct Counting {
    ledger: SimLedger,
    /// `register` calls that reached the ledger.
    registers: AtomicU64,
    /// `conclude` calls made (any result).
    conclude_calls: AtomicU64,
    /// `conclude` calls that concluded.
    concludes: AtomicU64,
    /// `dispute` reads (RPC calls on a node).
    reads: AtomicU64,
    /// While set, `dispute` reads wait (a slow node); `held` says one did.
    hold_reads: AtomicBool,
    held: AtomicBool,
    /// Freeze after the next `register` reached the ledger.
    freeze_after_register: AtomicBool,
    /// Freeze before the next `register` reaches the ledger.
    freeze_before_register: AtomicBool,
    /// Fail this many of the next `dispute` reads and `register` calls with
    /// a transient node error (each), before they reach the ledger.
    fail_reads: AtomicU64,
    fail_registers: AtomicU64,
    /// Fail this many of the next `register` calls as `EthAdjudicator`
    /// does when the account cannot pay the gas ("insufficient funds").
    broke_registers: AtomicU64,
    /// Until the instant, `dispute` answers this older dispute: as
    /// `EthAdjudicator::dispute` reads at the confirmation depth while a
    /// transaction's checks read the latest block.
    lagging: std::sync::Mutex<Option<(Option<Dispute>, std::time::Instant)>>,
}

/// A node that did not answer.
fn node_down(op: &'static str) -> perun_adjudicator::Error {
    perun_adjudicator::Error::rpc(op, perun_adjudicator::RpcFailure::Injected(1))
}

fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl Counting {
    /// For the next 1.5 s `dispute` answers `old`: the confirmed view of a
    /// chain whose latest block already shows something newer.
    fn lag_with(&self, old: Option<Dispute>) {
        *self.lagging.lock().unwrap() =
            Some((old, std::time::Instant::now() + Duration::from_millis(1500)));
    }

    fn new(ledger: SimLedger) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            registers: AtomicU64::new(0),
            conclude_calls: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            hold_reads: AtomicBool::new(false),
            held: AtomicBool::new(false),
            concludes: AtomicU64::new(0),
            freeze_after_register: AtomicBool::new(false),
            freeze_before_register: AtomicBool::new(false),
            fail_reads: AtomicU64::new(0),
            fail_registers: AtomicU64::new(0),
            broke_registers: AtomicU64::new(0),
            lagging: std::sync::Mutex::new(None),
        })
    }
}

#[async_trait]
impl Adjudicator for Counting {
    fn domain(&self) -> Domain {
        self.ledger.domain()
    }
    async fn register(&self, req: &SignedChannel) -> perun_adjudicator::Result<()> {
        if self.freeze_before_register.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if take_one(&self.fail_registers) {
            return Err(node_down("register"));
        }
        self.registers.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.broke_registers) {
            return Err(perun_adjudicator::Error::InsufficientFunds {
                need: U256::from(1_000_000u64),
                have: U256::ZERO,
            });
        }
        let r = self.ledger.register(req).await;
        if self.freeze_after_register.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        r
    }
    async fn progress(
        &self,
        req: &perun_adjudicator::ProgressRequest,
    ) -> perun_adjudicator::Result<()> {
        self.ledger.progress(req).await
    }
    async fn conclude(&self, req: &SignedChannel) -> perun_adjudicator::Result<()> {
        self.conclude_calls.fetch_add(1, Ordering::SeqCst);
        let r = self.ledger.conclude(req).await;
        if r.is_ok() {
            self.concludes.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
    async fn withdraw(&self, req: &WithdrawRequest) -> perun_adjudicator::Result<()> {
        self.ledger.withdraw(req).await
    }
    async fn subscribe(&self, id: ChannelId) -> perun_adjudicator::Result<EventStream> {
        self.ledger.subscribe(id).await
    }
    async fn dispute(&self, id: ChannelId) -> perun_adjudicator::Result<Option<Dispute>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        while self.hold_reads.load(Ordering::SeqCst) {
            self.held.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if take_one(&self.fail_reads) {
            return Err(node_down("dispute"));
        }
        let lag = *self
            .lagging
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((old, until)) = lag
            && std::time::Instant::now() < until
        {
            return Ok(old);
        }
        self.ledger.dispute(id).await
    }
}

struct Setup {
    ledger: SimLedger,
    alice: LocalAccount,
    bob: LocalAccount,
    params: Params,
    initial: State,
    store: Store,
    _dir: tempfile::TempDir,
}

const DEPOSIT: u64 = 50;
const MINTED: u64 = 100;

async fn setup() -> Setup {
    setup_in(std::env::temp_dir()).await
}

/// As [`setup`], with the store in a temporary directory under `tmp`.
async fn setup_in(tmp: impl AsRef<std::path::Path>) -> Setup {
    let ledger = SimLedger::new(1337);
    // The chain's clock near the wall clock, as on a real chain: the
    // responder reads the time left in a challenge period by its own clock.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    ledger.advance(wall);
    ledger.add_asset(ETH);
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    for who in [alice.address(), bob.address()] {
        ledger.mint(ETH, who, U256::from(MINTED));
    }
    let funding = vec![vec![U256::from(DEPOSIT); 2]];
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let params = Params::payment(
        ledger.domain(),
        60,
        U256::from_be_bytes(nonce),
        vec![alice.address(), bob.address()],
        funding.clone(),
    );
    let asset = Asset {
        chainId: U256::from(1337),
        holder: ETH,
    };
    let initial = State::initial(&params, Allocation::new(vec![asset], funding));
    for index in 0..2 {
        let req = FundingRequest {
            params: params.clone(),
            state: initial.clone(),
            index,
            timeout: Duration::ZERO,
        };
        let _ = ledger.fund(req).await;
    }
    let dir = tempfile::tempdir_in(tmp).unwrap();
    let store = Store::open(dir.path().join("tower.redb")).unwrap();
    Setup {
        ledger,
        alice,
        bob,
        params,
        initial,
        store,
        _dir: dir,
    }
}

impl Setup {
    /// Version `v`, Alice holding `DEPOSIT + v` and Bob the rest, signed by both.
    fn state(&self, v: u64) -> SignedState {
        let mut st = self.initial.clone();
        st.version = v;
        st.outcome.balances[0][0] = U256::from(DEPOSIT + v);
        st.outcome.balances[0][1] = U256::from(DEPOSIT - v);
        let mut s = SignedState::new(st);
        s.sign(&self.params, 0, &self.alice).unwrap();
        s.sign(&self.params, 1, &self.bob).unwrap();
        s
    }

    fn id(&self) -> ChannelId {
        self.params.channel_id()
    }

    fn locator(&self) -> perun_watchtower::Locator {
        ChannelSecret::of(&self.params).locator()
    }

    /// `user` registers with the tower and stores `blob` at the channel's locator.
    fn appoint(&self, user: Address, blob: Vec<u8>) {
        self.appoint_seq(user, 1, blob);
    }

    /// As [`Self::appoint`], with sequence number `seq` (a higher one
    /// replaces the user's appointment).
    fn appoint_seq(&self, user: Address, seq: u64, blob: Vec<u8>) {
        self.store.register(user, 10, u64::MAX).unwrap();
        self.store
            .add_appointment(
                NewAppointment {
                    user,
                    locator: self.locator(),
                    seq,
                    blob,
                    user_signature: vec![0; 65],
                },
                0,
                |_, _, _| Ok(vec![0; 65]),
            )
            .unwrap();
    }

    /// Alice's appointment with version `v`.
    fn appoint_version(&self, v: u64) {
        let (_, blob) = seal(&self.params, &self.state(v)).unwrap();
        self.appoint(self.alice.address(), blob);
    }

    /// Bob registers version `v` himself.
    async fn bob_registers(&self, v: u64) {
        self.ledger
            .register(&SignedChannel {
                params: self.params.clone(),
                state: self.state(v),
            })
            .await
            .unwrap();
    }

    fn status(&self, user: Address) -> Status {
        self.store
            .appointment(user, self.locator())
            .unwrap()
            .unwrap()
            .status
    }

    async fn dispute(&self) -> Option<Dispute> {
        self.ledger.dispute(self.id()).await.unwrap()
    }

    /// The channel's job exists and is over.
    fn job_done(&self) -> bool {
        self.store
            .job(self.id())
            .unwrap()
            .is_some_and(|j| j.phase == JobPhase::Done)
    }
}

/// 200 random bytes: a blob that opens to nothing.
fn junk() -> Vec<u8> {
    let mut junk = vec![0u8; 200];
    rand::thread_rng().fill_bytes(&mut junk);
    junk
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("the responder stops on shutdown")
            .unwrap();
    }
}

fn config() -> Config {
    Config {
        poll_ms: 20,
        retry_min_ms: 10,
        retry_max_ms: 100,
        resume_grace_ms: 300,
    }
}

fn start(s: &Setup, chain: &Arc<Counting>) -> Running {
    start_with(s, chain, config())
}

/// A responder that polls a running dispute every 200 ms (about 6 times in
/// the 1.2 s the spin tests watch).
fn start_polling_slowly(s: &Setup, chain: &Arc<Counting>) -> Running {
    start_with(
        s,
        chain,
        Config {
            poll_ms: 200,
            ..config()
        },
    )
}

fn start_with(s: &Setup, chain: &Arc<Counting>, config: Config) -> Running {
    let stats = Arc::new(Stats::default());
    let r = Responder::new(
        s.store.clone(),
        Arc::clone(chain) as Arc<dyn Adjudicator>,
        config,
        Arc::clone(&stats),
    );
    let ledger = s.ledger.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(r.run(move |from| ledger.registrations(from), async move {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        task,
        stats,
    }
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..1500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The balances Alice and Bob hold after the channel paid version `v`.
fn paid(v: u64) -> (U256, U256) {
    (U256::from(MINTED + v), U256::from(MINTED - v))
}

fn balances(s: &Setup) -> (U256, U256) {
    (
        s.ledger.balance(ETH, s.alice.address()),
        s.ledger.balance(ETH, s.bob.address()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refutes_an_old_state_and_concludes_after_the_timeout() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    assert_eq!(s.status(s.alice.address()), Status::BeingWatched);
    s.bob_registers(2).await;
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    assert_eq!(s.status(s.alice.address()), Status::DisputeTriggered);
    // Before the timeout nothing concludes, however often the tower looks.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!s.dispute().await.unwrap().concluded);
    s.ledger.advance(61);
    until("the conclusion", async || {
        s.dispute().await.is_some_and(|d| d.concluded)
    })
    .await;
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.disputes_seen.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.refutations.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.conclusions.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.bad_blobs.load(Ordering::SeqCst), 0);
    let text = r.stats.metrics_text();
    assert!(text.contains("perun_tower_refutations_total 1"), "{text}");
    assert_eq!(s.store.job(s.id()).unwrap().unwrap().phase, JobPhase::Done);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_state_registered_is_concluded_without_a_refutation() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(5).await;
    until("the dispute is seen", async || {
        s.status(s.alice.address()) == Status::DisputeTriggered
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert!(s.dispute().await.unwrap().concluded);
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 0);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_blobs_cost_no_transaction() {
    let s = setup().await;
    // Garbage.
    let mut garbage = vec![0u8; 200];
    rand::thread_rng().fill_bytes(&mut garbage);
    let carol = Address::repeat_byte(0xca);
    s.appoint(carol, garbage);
    // A newer state signed by Bob twice (Alice's signature missing).
    let mut forged = s.state(9);
    let bobs = s.bob.sign_hash(forged.state.hash()).unwrap();
    forged.sigs[0] = Some(bobs);
    let (_, bad_sigs) = seal(&s.params, &forged).unwrap();
    let dave = Address::repeat_byte(0xda);
    s.appoint(dave, bad_sigs);
    // A blob of another channel under this locator (it does not decrypt).
    let other = Params {
        nonce: s.params.nonce + U256::from(1),
        ..s.params.clone()
    };
    let (_, foreign) = seal(&other, &s.state(9)).unwrap();
    let erin = Address::repeat_byte(0xe1);
    s.appoint(erin, foreign);

    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("every blob refused", async || {
        r.stats.bad_blobs.load(Ordering::SeqCst) == 3
    })
    .await;
    until("resolved", async || s.status(carol) == Status::Resolved).await;
    s.ledger.advance(61);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chain.registers.load(Ordering::SeqCst), 0);
    assert_eq!(chain.conclude_calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.dispute().await.unwrap().version, 2);
    let job = s.store.job(s.id()).unwrap().unwrap();
    assert_eq!(job.refused.len(), 3, "{job:?}");
    r.stop().await;
}

/// Bob knows his channel's locator from the start (he knows the nonce), and
/// registration is free: before he disputes, he plants junk under the
/// locator from many users. Each step of the job opens every blob at the
/// locator; the tower must still answer in time, and the junk must not cost
/// it more than one look per blob (no quadratic work, no blocking of the
/// runtime the API and the other jobs share), nor a decryption per blob at
/// every step (a refused blob is not opened again while it stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_planted_at_the_locator_does_not_stall_the_job() {
    const JUNK: usize = 60_000;
    // On tmpfs where there is one: the setup stores 60,000 users.
    let shm = std::path::Path::new("/dev/shm");
    let s = if shm.is_dir() {
        setup_in(shm).await
    } else {
        setup().await
    };
    s.appoint_version(5);
    let users = junk_users(JUNK);
    plant(&s, &users, 1);

    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    s.ledger.advance(61);
    // Every later step opens the same 60,001 blobs again: each must stay
    // linear (the old code scanned the refusal list once per blob).
    let t0 = std::time::Instant::now();
    until("the conclusion", async || {
        s.dispute().await.is_some_and(|d| d.concluded)
    })
    .await;
    let took = t0.elapsed();
    // The bound only has to tell linear steps over 60,001 blobs from
    // quadratic ones; a loaded machine gets the slack.
    assert!(
        took < Duration::from_secs(30),
        "the conclusion took {took:?}"
    );
    assert_eq!(balances(&s), paid(5));
    assert_eq!(r.stats.bad_blobs.load(Ordering::SeqCst), JUNK as u64);
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    // Each junk blob is decrypted once, not at every step (refuting and
    // concluding took at least two).
    let opened = r.stats.blobs_opened.load(Ordering::SeqCst);
    assert!(
        opened < 2 * JUNK as u64,
        "{opened} blobs decrypted for {JUNK} junk ones and one good one"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_not_newer_than_the_registered_one_is_not_sent() {
    let s = setup().await;
    s.appoint_version(3);
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(4).await;
    until("the dispute is seen", async || {
        s.status(s.alice.address()) == Status::DisputeTriggered
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chain.registers.load(Ordering::SeqCst), 0);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 0);
    // After the timeout the registered state is concluded, so the offline user is paid.
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(4));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 0);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    r.stop().await;
}

/// Killed right after its refutation reached the chain (nothing recorded
/// after it): the restarted responder sees it on-chain and does not send it
/// again; it concludes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_refutation_does_not_refute_again() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    chain.freeze_after_register.store(true, Ordering::SeqCst);
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    // The job says a refutation may be in flight; the responder "dies".
    let job = s.store.job(s.id()).unwrap().unwrap();
    assert_eq!(job.phase, JobPhase::Refuting { version: 5 });
    assert_eq!(job.refuted, None);
    r.task.abort();

    let r = start(&s, &chain);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.refutations.load(Ordering::SeqCst), 0);
    r.stop().await;
}

/// Killed after writing `Refuting` but before the transaction left: the
/// restarted responder waits out the grace, finds nothing on-chain and
/// refutes (once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_refutation_left_sends_it_once() {
    restart_before_the_refutation_left(config(), "the refutation").await;
}

/// As above, but the challenge period ends within the grace: the restarted
/// responder does not wait the grace out (the period would be over, and
/// the stale state concluded) but refutes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_near_the_end_of_the_challenge_refutes_without_waiting() {
    let long_grace = Config {
        resume_grace_ms: 120_000,
        ..config()
    };
    // The 60 s challenge period ends within the 120 s grace.
    restart_before_the_refutation_left(long_grace, "the refutation, well before the 120 s grace")
        .await;
}

/// The responder (with `config`) is killed after it wrote `Refuting` and
/// before the transaction left; restarted, it refutes (once, by `what`)
/// and concludes.
async fn restart_before_the_refutation_left(config: Config, what: &str) {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    chain.freeze_before_register.store(true, Ordering::SeqCst);
    let r = start_with(&s, &chain, config);
    s.bob_registers(2).await;
    until("the job in Refuting", async || {
        s.store
            .job(s.id())
            .unwrap()
            .is_some_and(|j| j.phase == JobPhase::Refuting { version: 5 })
    })
    .await;
    r.task.abort();
    assert_eq!(s.dispute().await.unwrap().version, 2);

    let r = start_with(&s, &chain, config);
    until(what, async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    r.stop().await;
}

/// A dispute that starts while the tower is down is found from the stored
/// cursor when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispute_started_while_down_is_found_from_the_cursor() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.stop().await;
    let before = s.store.cursor().unwrap();
    s.bob_registers(2).await;
    let r = start(&s, &chain);
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert!(s.store.cursor().unwrap() > before);
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.disputes_seen.load(Ordering::SeqCst), 1);
    r.stop().await;
}

/// Bob registers a stale state while the tower holds nothing for the
/// channel; Alice's appointment arrives during the challenge period (a
/// client back from an absence, or resending to a tower that lost it). The
/// tower refutes with it, though the dispute's event is long scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appointment_that_arrives_during_the_dispute_is_acted_on() {
    let s = setup().await;
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the dispute is kept", async || {
        s.store.open_dispute(s.locator()).unwrap().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(r.stats.disputes_seen.load(Ordering::SeqCst), 0);
    s.appoint_version(5);
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(r.stats.late_jobs.load(Ordering::SeqCst), 1);
    let text = r.stats.metrics_text();
    assert!(text.contains("perun_tower_late_jobs_total 1"), "{text}");
    // Concluded: the kept dispute goes with the next mark.
    until("the dispute is dropped", async || {
        s.store.open_dispute(s.locator()).unwrap().is_none()
    })
    .await;
    r.stop().await;
}

/// Alice's only appointment was damaged (it does not open), so the job for
/// Bob's stale registration ended with nothing to send; her client then
/// replaces it with a good one while the challenge period runs. The job
/// starts again and refutes. The same holds when the appointment arrives
/// while the tower is down: the job is durable and resumed at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_appointment_after_a_refused_one_restarts_the_job_even_across_a_restart() {
    let s = setup().await;
    s.appoint(s.alice.address(), junk());
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the job ends with nothing to send", async || s.job_done()).await;
    r.stop().await;
    let (_, blob) = seal(&s.params, &s.state(5)).unwrap();
    s.appoint_seq(s.alice.address(), 2, blob);
    assert_eq!(s.status(s.alice.address()), Status::DisputeTriggered);
    let r = start(&s, &chain);
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(balances(&s), paid(5));
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    r.stop().await;
}

/// `n` random users.
fn junk_users(n: usize) -> Vec<Address> {
    (0..n)
        .map(|_| {
            let mut a = [0u8; 20];
            rand::thread_rng().fill_bytes(&mut a);
            Address::from(a)
        })
        .collect()
}

/// Each of `users` registers and stores the shortest blob the tower takes
/// (a nonce and a tag: it opens to nothing) at the channel's locator.
fn plant(s: &Setup, users: &[Address], seq: u64) {
    for u in users {
        s.store.register(*u, 1, u64::MAX).unwrap();
    }
    for chunk in users.chunks(256) {
        let batch = chunk
            .iter()
            .map(|&user| NewAppointment {
                user,
                locator: s.locator(),
                seq,
                blob: vec![0; 28],
                user_signature: vec![0; 65],
            })
            .collect();
        for r in s
            .store
            .add_appointments(batch, 0, |_, _, _| Ok(vec![0; 65]))
            .unwrap()
        {
            r.unwrap();
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// From a review of the late-appointment change (b466c5f); each failed on it.

/// A `Registered` whose locator holds an appointment starts the job at
/// once, and the job may end (its only blob refused) before the range's
/// cursor mark. A good appointment stored in that window found no kept
/// dispute, and the mark skipped events that had a job: the job stayed
/// Done while the stale state ran to its conclusion. Now the responder
/// keeps the dispute in the job's own transaction, and a mark checks every
/// event for appointments stored since. Both orders of the store calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appointment_stored_after_the_job_ended_but_before_the_mark_is_acted_on() {
    for keeping in [true, false] {
        appointment_after_the_job_ended(keeping).await;
    }
}

async fn appointment_after_the_job_ended(keeping: bool) {
    let s = setup().await;
    // Alice's old appointment does not open (damaged / junk).
    s.appoint(s.alice.address(), junk());
    let stale = s.state(2).state;
    // handle(Registered): users non-empty -> start_job, seen gets (d, true).
    let job = Job {
        channel: s.id(),
        nonce: s.params.nonce,
        locator: s.locator(),
        phase: JobPhase::Triggered,
        registered: Some(stale.clone()),
        refuted: None,
        concluded: false,
        refused: Vec::new(),
    };
    let open = OpenDispute {
        timeout: now_secs() + 60,
        channel: s.id(),
        version: 2,
        nonce: s.params.nonce,
        registered: Some(stale.clone()),
    };
    if keeping {
        // What the responder does now: the job and the kept dispute at once.
        s.store
            .start_job_keeping(&job, &[s.alice.address()], &open, now_secs())
            .unwrap();
    } else {
        s.store.start_job(&job, &[s.alice.address()]).unwrap();
    }
    // The job task: nothing opens -> finish_job(Resolved) -> Done.
    s.store
        .finish_job(s.id(), &[s.alice.address()], Status::Resolved, |_| {})
        .unwrap();
    // Alice's client comes back and replaces her appointment with a good one.
    let (_, blob) = seal(&s.params, &s.state(5)).unwrap();
    s.appoint_seq(s.alice.address(), 2, blob);
    // The range's cursor mark.
    if keeping {
        assert_eq!(
            s.store.job(s.id()).unwrap().unwrap().phase,
            JobPhase::Triggered,
            "the appointment restarts the job in its own transaction"
        );
    }
    let seen = Seen {
        registered: vec![open],
        concluded: vec![],
    };
    let marked = s.store.mark_scanned(7, &seen, now_secs()).unwrap();
    let phase = s.store.job(s.id()).unwrap().unwrap().phase;
    assert!(
        phase != JobPhase::Done,
        "a good appointment is stored at the locator of a running dispute, but the job stays {phase:?} \
         (mark started {:?}, alice's status {:?}, dispute kept: {})",
        marked.started,
        s.status(s.alice.address()),
        s.store.open_dispute(s.locator()).unwrap().is_some()
    );
}

/// Every appointment stored at a kept locator whose job was Done reopened
/// it, an unchanged resend too, and each reopened run decrypted every blob
/// at the locator again: each API call (users are free) cost N
/// decryptions, a chain read and two durable writes. Now a resend starts
/// nothing, and a replacement restarts the job opening only what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_one_appointment_does_not_reopen_all_blobs_each_time() {
    const JUNK: usize = 300;
    const RESENDS: u64 = 20;
    let s = setup().await;
    let users = junk_users(JUNK);
    plant(&s, &users, 1);
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the job ends and the dispute is kept", async || {
        s.job_done() && s.store.open_dispute(s.locator()).unwrap().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let opened0 = r.stats.blobs_opened.load(Ordering::SeqCst);
    let reads0 = chain.reads.load(Ordering::SeqCst);
    for _ in 0..RESENDS {
        // The same appointment again, unchanged (a client retrying).
        s.store
            .add_appointment(
                NewAppointment {
                    user: users[0],
                    locator: s.locator(),
                    seq: 1,
                    blob: vec![0; 28],
                    user_signature: vec![0; 65],
                },
                0,
                |_, _, _| Ok(vec![0; 65]),
            )
            .unwrap();
        until("the job ends again", async || s.job_done()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let opened = r.stats.blobs_opened.load(Ordering::SeqCst) - opened0;
    let reads = chain.reads.load(Ordering::SeqCst) - reads0;
    let late = r.stats.late_jobs.load(Ordering::SeqCst);
    assert!(
        opened == 0 && late == 0,
        "{RESENDS} unchanged resends of one junk appointment made the tower decrypt {opened} blobs \
         ({JUNK} at the locator), read the chain {reads} times, start {late} late jobs"
    );
    // Replacements (a higher seq each) restart the job; each run opens the
    // one blob that changed.
    for seq in 2..2 + RESENDS {
        s.store
            .add_appointment(
                NewAppointment {
                    user: users[0],
                    locator: s.locator(),
                    seq,
                    blob: vec![1; 28],
                    user_signature: vec![0; 65],
                },
                0,
                |_, _, _| Ok(vec![0; 65]),
            )
            .unwrap();
        until("the restarted job ends", async || {
            r.stats.late_jobs.load(Ordering::SeqCst) == seq - 1 && s.job_done()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let opened = r.stats.blobs_opened.load(Ordering::SeqCst) - opened0;
    r.stop().await;
    assert_eq!(
        opened, RESENDS,
        "one decryption per replacement, not {JUNK}"
    );
}

/// The job's step opened the blobs (only Alice's damaged one: refused) and
/// waits for the node's answer; Alice's client replaces her appointment
/// with a good one (v5) in that window. It joins the running job, which is
/// not woken; the step then found nothing to send from its earlier read
/// and ended the job, so nothing read the new one. Now the job ends only if
/// the locator holds just what it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appointment_joining_a_job_that_is_about_to_end_with_nothing_is_acted_on() {
    let s = setup().await;
    s.appoint_seq(s.alice.address(), 1, junk());
    let chain = Counting::new(s.ledger.clone());
    chain.hold_reads.store(true, Ordering::SeqCst);
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the job reads the dispute", async || {
        chain.held.load(Ordering::SeqCst)
    })
    .await;
    let (_, blob) = seal(&s.params, &s.state(5)).unwrap();
    s.appoint_seq(s.alice.address(), 2, blob);
    chain.hold_reads.store(false, Ordering::SeqCst);
    until(
        "the refutation with the appointment that joined",
        async || s.dispute().await.is_some_and(|d| d.version == 5),
    )
    .await;
    assert_ne!(s.store.job(s.id()).unwrap().unwrap().phase, JobPhase::Done);
    r.stop().await;
}

/// The same race end to end through the responder. Our dispute
/// is first in a range that holds many more watched disputes (a tower back
/// from downtime, or a busy block range), so the cursor mark comes long
/// after our job's task ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_end_to_end_a_good_appointment_before_the_mark_is_lost() {
    const OTHERS: usize = 400;
    let s = setup().await;
    s.appoint(s.alice.address(), junk());
    // Bob registers the stale state while the tower is down...
    s.bob_registers(2).await;
    // ...and so do many other watched channels after him, in the same range.
    let asset = Asset {
        chainId: U256::from(1337),
        holder: ETH,
    };
    let funding = vec![vec![U256::from(1u64); 2]];
    for i in 0..OTHERS {
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let p = Params::payment(
            s.ledger.domain(),
            60,
            U256::from_be_bytes(nonce),
            vec![s.alice.address(), s.bob.address()],
            funding.clone(),
        );
        let st = State::initial(&p, Allocation::new(vec![asset.clone()], funding.clone()));
        let mut signed = SignedState::new(st);
        signed.sign(&p, 0, &s.alice).unwrap();
        signed.sign(&p, 1, &s.bob).unwrap();
        let user = Address::with_last_byte((i % 200) as u8 + 1);
        s.store.register(user, 10_000, u64::MAX).unwrap();
        s.store
            .add_appointment(
                NewAppointment {
                    user,
                    locator: ChannelSecret::of(&p).locator(),
                    seq: 1,
                    blob: vec![0; 28],
                    user_signature: vec![0; 65],
                },
                0,
                |_, _, _| Ok(vec![0; 65]),
            )
            .unwrap();
        s.ledger
            .register(&SignedChannel {
                params: p,
                state: signed,
            })
            .await
            .unwrap();
    }
    let chain = Counting::new(s.ledger.clone());
    let r = start(&s, &chain);
    // Alice's client comes back as soon as the job for her channel ended.
    let t0 = std::time::Instant::now();
    loop {
        if s.job_done() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no job");
        tokio::task::yield_now().await;
    }
    let (_, blob) = seal(&s.params, &s.state(5)).unwrap();
    s.appoint_seq(s.alice.address(), 2, blob);
    let cursor = s.store.cursor().unwrap();
    assert_eq!(
        cursor, 0,
        "precondition: the mark came before the appointment; rerun"
    );
    let mut refuted = false;
    for _ in 0..300 {
        if s.dispute().await.is_some_and(|d| d.version == 5) {
            refuted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let job = s.store.job(s.id()).unwrap().unwrap();
    let cursor_after = s.store.cursor().unwrap();
    r.stop().await;
    assert!(
        refuted,
        "Alice's good appointment (v5) came during Bob's stale dispute (v2) and was never acted on: \
         job {:?}, kept {}, alice {:?}, cursor {} -> {}",
        job.phase,
        s.store.open_dispute(s.locator()).unwrap().is_some(),
        s.status(s.alice.address()),
        cursor,
        cursor_after
    );
}

/// Node failures on reads and on the refutation are retried with backoff
/// until the refutation lands (once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_failures_are_retried_until_the_refutation_lands() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    chain.fail_reads.store(3, Ordering::SeqCst);
    chain.fail_registers.store(2, Ordering::SeqCst);
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the refutation", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    assert_eq!(chain.fail_reads.load(Ordering::SeqCst), 0);
    assert_eq!(chain.fail_registers.load(Ordering::SeqCst), 0);
    assert!(r.stats.retries.load(Ordering::SeqCst) >= 5);
    s.ledger.advance(61);
    until("resolved", async || {
        s.status(s.alice.address()) == Status::Resolved
    })
    .await;
    assert_eq!(chain.registers.load(Ordering::SeqCst), 1);
    assert_eq!(chain.concludes.load(Ordering::SeqCst), 1);
    assert_eq!(balances(&s), paid(5));
    r.stop().await;
}

// ------------------------------------------------ from an adversarial review
// Each of these failed before its fix.

/// The tower's gas account runs dry just as Bob registers an old state
/// (version 2; Alice's appointment holds version 5): its first refutation
/// fails with `InsufficientFunds`, and the operator tops the account up at
/// once, with the challenge period still running. The refutation was
/// filed under "a contract rule refuses it" and never tried again: after
/// the timeout the tower concluded Bob's stale state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfunded_tower_refutes_once_its_account_is_topped_up() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    chain.broke_registers.store(1, Ordering::SeqCst);
    let r = start(&s, &chain);
    s.bob_registers(2).await;
    until("the refutation lands after the failed one", async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    assert_eq!(chain.registers.load(Ordering::SeqCst), 2);
    r.stop().await;
}

/// Another tower's refutation with version 5 lands first. For the
/// confirmation depth this tower's read still shows version 2, while the
/// transaction's check sees version 5 and answers `Ok` without sending:
/// the job looked again at once, and spun (639 calls in 1.2 s) until the
/// block was confirmed. Polling every 200 ms, a paced job asks about 6
/// times in 1.2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refutation_landed_by_another_tower_does_not_spin_the_job() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    s.bob_registers(2).await;
    let confirmed = s.dispute().await;
    assert_eq!(confirmed.as_ref().map(|d| d.version), Some(2));
    chain.lag_with(confirmed);
    s.bob_registers(5).await; // as the other tower would
    let r = start_polling_slowly(&s, &chain);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = chain.registers.load(Ordering::SeqCst);
    r.stop().await;
    assert!(
        calls <= 10,
        "in 1.2 s of confirmation lag the job called register {calls} times: a busy loop"
    );
}

/// The same at the end of a dispute: another tower (or Alice's client)
/// concludes first; `AlreadyConcluded` made the job look again at once
/// (2,342 calls in 1.2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conclusion_landed_by_another_tower_does_not_spin_the_job() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Counting::new(s.ledger.clone());
    s.bob_registers(5).await;
    s.ledger.advance(61);
    let confirmed = s.dispute().await;
    assert!(confirmed.as_ref().is_some_and(|d| !d.concluded));
    chain.lag_with(confirmed);
    s.ledger
        .conclude(&SignedChannel {
            params: s.params.clone(),
            state: SignedState::new(s.state(5).state),
        })
        .await
        .unwrap();
    let r = start_polling_slowly(&s, &chain);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = chain.conclude_calls.load(Ordering::SeqCst);
    r.stop().await;
    assert!(
        calls <= 10,
        "in 1.2 s of confirmation lag the job called conclude {calls} times: a busy loop"
    );
}
