//! Adversarial review of b466c5f (late appointments). Harness copied from
//! tests/responder.rs.

#![allow(clippy::unwrap_used, dead_code, unused_imports)]


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
use perun_watchtower::store::{JobPhase, NewAppointment, Status, Store};
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
    /// `dispute` reads (review: RPC calls).
    reads: AtomicU64,
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
            concludes: AtomicU64::new(0),
            freeze_after_register: AtomicBool::new(false),
            freeze_before_register: AtomicBool::new(false),
            fail_reads: AtomicU64::new(0),
            fail_registers: AtomicU64::new(0),
            broke_registers: AtomicU64::new(0),
            lagging: std::sync::Mutex::new(None),
            reads: AtomicU64::new(0),
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


