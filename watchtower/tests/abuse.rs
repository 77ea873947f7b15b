//! The watchtower's responder and API under faults and hostile clients,
//! from an adversarial review: each test failed before its fix and states
//! the scenario it proves.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy_primitives::{Address, U256};
use async_trait::async_trait;
use perun_adjudicator::{
    Adjudicator, Dispute, EventStream, Funder, FundingRequest, SignedChannel, SimLedger,
    WithdrawRequest,
};
use perun_channel::{Allocation, Asset, ChannelId, Params, SignedState, State};
use perun_wallet::{Account, LocalAccount};
use perun_watchtower::api::{self, Tower};
use perun_watchtower::responder::{Config, Responder, Stats};
use perun_watchtower::scheme::{ChannelSecret, seal};
use perun_watchtower::store::{NewAppointment, Store};
use rand::RngCore;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const ETH: Address = Address::repeat_byte(0xee);
const DEPOSIT: u64 = 50;
const MINTED: u64 = 100;

/// A chain the responder acts on: the ledger, plus two faults of a real node
/// and account.
///
/// * `broke_registers`: this many `register` calls fail as the
///   `EthAdjudicator` fails them when the tower's account cannot pay gas
///   (`txqueue.rs`: "insufficient funds" → `Error::InsufficientFunds`).
/// * `lagging`: until the instant, `dispute()` returns the stored (older)
///   dispute: `EthAdjudicator::dispute` reads at the *confirmed* block
///   (`adjudicator.rs` `dispute`: `confirmed()`), while `register`'s
///   pre-check reads the *latest* one (`eth.rs` `dispute`: `latest()`), so
///   for `confirmations` blocks after someone else's registration the two
///   views differ. The ledger's `register` answers `Ok` for the state that
///   is registered already, exactly as `EthAdjudicator::register` does.
struct Chain {
    ledger: SimLedger,
    register_calls: AtomicU64,
    conclude_calls: AtomicU64,
    broke_registers: AtomicU64,
    lagging: Mutex<Option<(Option<Dispute>, std::time::Instant)>>,
}

fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl Chain {
    fn new(ledger: SimLedger) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            register_calls: AtomicU64::new(0),
            conclude_calls: AtomicU64::new(0),
            broke_registers: AtomicU64::new(0),
            lagging: Mutex::new(None),
        })
    }
}

#[async_trait]
impl Adjudicator for Chain {
    fn domain(&self) -> perun_channel::Domain {
        self.ledger.domain()
    }
    async fn register(&self, req: &SignedChannel) -> perun_adjudicator::Result<()> {
        self.register_calls.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.broke_registers) {
            return Err(perun_adjudicator::Error::InsufficientFunds {
                need: U256::from(1_000_000u64),
                have: U256::ZERO,
            });
        }
        self.ledger.register(req).await
    }
    async fn progress(
        &self,
        req: &perun_adjudicator::ProgressRequest,
    ) -> perun_adjudicator::Result<()> {
        self.ledger.progress(req).await
    }
    async fn conclude(&self, req: &SignedChannel) -> perun_adjudicator::Result<()> {
        self.conclude_calls.fetch_add(1, Ordering::SeqCst);
        self.ledger.conclude(req).await
    }
    async fn withdraw(&self, req: &WithdrawRequest) -> perun_adjudicator::Result<()> {
        self.ledger.withdraw(req).await
    }
    async fn subscribe(&self, id: ChannelId) -> perun_adjudicator::Result<EventStream> {
        self.ledger.subscribe(id).await
    }
    async fn dispute(&self, id: ChannelId) -> perun_adjudicator::Result<Option<Dispute>> {
        let lag = *self.lagging.lock().unwrap();
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

async fn setup() -> Setup {
    let ledger = SimLedger::new(1337);
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
    let dir = tempfile::tempdir().unwrap();
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

    /// Alice's appointment with version `v`.
    fn appoint_version(&self, v: u64) {
        let (_, blob) = seal(&self.params, &self.state(v)).unwrap();
        let user = self.alice.address();
        self.store.register(user, 10, u64::MAX).unwrap();
        self.store
            .add_appointment(
                NewAppointment {
                    user,
                    locator: self.locator(),
                    seq: 1,
                    blob,
                    user_signature: vec![0; 65],
                },
                0,
                |_, _, _| Ok(vec![0; 65]),
            )
            .unwrap();
    }

    async fn register(&self, v: u64) {
        self.ledger
            .register(&SignedChannel {
                params: self.params.clone(),
                state: self.state(v),
            })
            .await
            .unwrap();
    }

    async fn dispute(&self) -> Option<Dispute> {
        self.ledger.dispute(self.id()).await.unwrap()
    }

    fn balances(&self) -> (U256, U256) {
        (
            self.ledger.balance(ETH, self.alice.address()),
            self.ledger.balance(ETH, self.bob.address()),
        )
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
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn start(s: &Setup, chain: &Arc<Chain>) -> Running {
    start_polling(s, chain, 20)
}

fn start_polling(s: &Setup, chain: &Arc<Chain>, poll_ms: u64) -> Running {
    let stats = Arc::new(Stats::default());
    let r = Responder::new(
        s.store.clone(),
        Arc::clone(chain) as Arc<dyn Adjudicator>,
        Config {
            poll_ms,
            retry_min_ms: 10,
            retry_max_ms: 100,
            resume_grace_ms: 300,
        },
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

async fn eventually(within: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f().await
}

/// The tower's gas account runs dry just as Bob registers an old state
/// (version 2; Alice's appointment holds version 5). Its first refutation
/// fails with `InsufficientFunds` (what `EthAdjudicator` returns when the
/// node says "insufficient funds"); the operator tops the account up at
/// once, with 60 s of challenge period left. A tower that "retries until
/// done or moot" refutes now. `responder.rs` `refute` instead files the
/// error under "a contract rule refuses it" (`run.no_refute = Some(5)`) and
/// never tries version 5 again: after the timeout it concludes Bob's stale
/// state, and Alice loses 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfunded_tower_refutes_once_its_account_is_topped_up() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Chain::new(s.ledger.clone());
    chain.broke_registers.store(1, Ordering::SeqCst);
    let r = start(&s, &chain);
    s.register(2).await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            chain.register_calls.load(Ordering::SeqCst) >= 1
        })
        .await,
        "the tower never tried to refute"
    );
    // Funded again from here on; the challenge period has 60 s left.
    let refuted = eventually(Duration::from_secs(5), async || {
        s.dispute().await.is_some_and(|d| d.version == 5)
    })
    .await;
    let calls = chain.register_calls.load(Ordering::SeqCst);
    if !refuted {
        // Show what it costs: the challenge period ends, the tower concludes.
        s.ledger.advance(61);
        eventually(Duration::from_secs(3), async || {
            s.dispute().await.is_some_and(|d| d.concluded)
        })
        .await;
    }
    let d = s.dispute().await;
    let paid5 = (U256::from(MINTED + 5), U256::from(MINTED - 5));
    let bal = s.balances();
    r.stop().await;
    assert!(
        refuted,
        "the tower never refuted after one InsufficientFunds (register calls: {calls}); \
         after the timeout the dispute is {d:?} and Alice/Bob hold {bal:?} instead of {paid5:?}"
    );
}

/// Two towers hold Alice's appointment (the client sends the same one to
/// each). Bob registers version 2; the other tower's refutation with
/// version 5 lands first. For the confirmation depth (3 blocks on a real
/// chain) this tower's confirmed read still shows version 2, while
/// `EthAdjudicator::register` sees version 5 at the latest block and
/// answers `Ok` without sending. `responder.rs` `refute` then returns
/// `Wait(Duration::ZERO)`, so the job spins: every turn re-reads the job,
/// opens every blob at the locator, reads the chain twice, commits an
/// fsync'd job write, logs two `info!` lines and counts a "refutation that
/// landed", with no pause, until the block is confirmed. Here the lag is
/// 1.5 s; a bounded tower makes a handful of calls in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refutation_landed_by_another_tower_does_not_spin_the_job() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Chain::new(s.ledger.clone());
    s.register(2).await;
    let confirmed = s.dispute().await;
    assert_eq!(confirmed.map(|d| d.version), Some(2));
    *chain.lagging.lock().unwrap() = Some((
        confirmed,
        std::time::Instant::now() + Duration::from_millis(1500),
    ));
    // The other tower refutes with the same appointment's state.
    s.register(5).await;
    // Polling every 200 ms: a paced job asks about 6 times in 1.2 s.
    let r = start_polling(&s, &chain, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = chain.register_calls.load(Ordering::SeqCst);
    let retries = r.stats.retries.load(Ordering::SeqCst);
    r.stop().await;
    assert!(
        calls <= 10,
        "in 1.2 s of confirmation lag the job called register {calls} times \
         ({retries} retries): a busy loop"
    );
}

/// The same at the end of every dispute: the tower's appointment holds the
/// registered state, the challenge period is over, and the other tower (or
/// Alice's own client) concludes first. While this tower's confirmed read
/// still shows the dispute open, `EthAdjudicator::conclude`'s pre-check at
/// the latest block answers `AlreadyConcluded`, and `responder.rs`
/// `conclude` maps that to `Wait(Duration::ZERO)`: the job spins until the
/// conclusion is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conclusion_landed_by_another_tower_does_not_spin_the_job() {
    let s = setup().await;
    s.appoint_version(5);
    let chain = Chain::new(s.ledger.clone());
    s.register(5).await;
    s.ledger.advance(61);
    let confirmed = s.dispute().await;
    assert!(confirmed.is_some_and(|d| !d.concluded));
    *chain.lagging.lock().unwrap() = Some((
        confirmed,
        std::time::Instant::now() + Duration::from_millis(1500),
    ));
    // The other tower concludes.
    s.ledger
        .conclude(&SignedChannel {
            params: s.params.clone(),
            state: SignedState::new(s.state(5).state),
        })
        .await
        .unwrap();
    let r = start_polling(&s, &chain, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = chain.conclude_calls.load(Ordering::SeqCst);
    r.stop().await;
    assert!(
        calls <= 10,
        "in 1.2 s of confirmation lag the job called conclude {calls} times: a busy loop"
    );
}

// ---------------------------------------------------------------- the API

struct Server {
    addr: SocketAddr,
    tower: Arc<Tower>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(path: &Path, config: api::Config) -> Self {
        Self::start_at(path, config, Arc::new(AtomicU64::new(1_000_000))).await
    }

    async fn start_at(path: &Path, config: api::Config, now: Arc<AtomicU64>) -> Self {
        let store = Store::open(path).expect("store");
        let tower = Arc::new(
            Tower::new(
                store,
                Arc::new(LocalAccount::random()),
                config,
                Arc::new(move || now.load(Ordering::SeqCst)),
            )
            .expect("tower"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let served = Arc::clone(&tower);
        let task = tokio::spawn(async move {
            api::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Self {
            addr,
            tower,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// `api::serve` promises that "idle or slow sockets cannot pin the tower":
/// only the *headers* have a timeout. A client that sends complete headers
/// (`Content-Length: 100`, well under `max_body`) and then never sends the
/// body holds its connection slot for ever (axum waits for the body with no
/// deadline, and the per-IP bucket is checked only after the body is read).
/// `max_connections` such sockets (1024 by default; 4 here) shut the API
/// for everyone: no honest client can send an appointment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_do_not_pin_every_connection() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = api::Config {
        max_connections: 4,
        header_timeout_secs: 1,
        request_timeout_secs: 2,
        ..api::Config::default()
    };
    let srv = Server::start(&dir.path().join("tower.redb"), config).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(srv.addr)
            .await
            .expect("connect");
        s.write_all(
            b"POST /add_appointment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .expect("write");
        stalled.push(s);
    }
    // Once the stalled requests time out (2 s) an honest one is served.
    let served =
        tokio::time::timeout(Duration::from_secs(10), common::get(srv.addr, "/health")).await;
    drop(stalled);
    srv.stop().await;
    let r = served.expect(
        "an honest /health waited 10 s: four sockets with stalled bodies hold every connection slot",
    );
    assert_eq!(r.status, 200);
}

/// A shared buffer the log goes to.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An unauthenticated client sends 600 malformed requests. Each gets its
/// `malformed_request` (right), and each also writes an unthrottled `WARN`
/// line (`api.rs` `post_endpoint`: `warn!(.., "refused")`; a rate-limited
/// one writes two, with `check_ip`'s). The rest of the project logs bad
/// remote input at most once a second per site (`warn_limited!`,
/// `wire::node::Throttle`) so that a flood cannot grow the log without
/// bound; the tower's log grows with every hostile request.
#[tokio::test]
async fn a_flood_of_bad_requests_does_not_flood_the_log() {
    let buf = LogBuf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // A current-thread runtime: the server's tasks run on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Server::start(&dir.path().join("tower.redb"), api::Config::default()).await;
    const N: usize = 600;
    for _ in 0..N {
        let r = common::request(srv.addr, "POST", "/register", b"{not json").await;
        assert!(r.status == 400 || r.status == 429, "{}", r.status);
    }
    srv.stop().await;
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    let warns = text.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warns <= 20,
        "{N} bad requests from one client wrote {warns} WARN lines, e.g. {:?}",
        text.lines().next()
    );
}

/// `messages.rs` promises "a signature for one purpose is never valid for
/// another", but the appointment hash had no domain tag:
/// `keccak256(locator ‖ seq ‖ blob)` with a blob of any length (the API has
/// no minimum) covers every preimage of 40 bytes or more, so every other
/// message a user signs is also an appointment signature. Whoever sees a
/// user's `/register` request (the tower, or anyone on the path: the API
/// is plain HTTP) replays its signature as an appointment: the locator is
/// the tag's first 32 bytes, `seq` the next 8, the blob the rest. The tower
/// stores it under the user and takes one of the user's slots.
#[tokio::test]
async fn a_register_signature_is_not_an_appointment_signature() {
    use perun_wallet::signature_bytes;
    use perun_watchtower::messages;
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Server::start(&dir.path().join("tower.redb"), api::Config::default()).await;
    let tower = srv.tower.address();
    let user = LocalAccount::random();
    let sig = signature_bytes(
        &user
            .sign_hash(messages::register_hash(tower, user.address()))
            .unwrap(),
    );
    let sig_hex = format!("0x{}", hex::encode(sig));
    let r = common::post(
        srv.addr,
        "/register",
        &serde_json::json!({ "user": user.address(), "signature": sig_hex }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // The observer's forgery, from the register request alone.
    let mut pre = b"perun/tower/register/v1".to_vec();
    pre.extend_from_slice(tower.as_slice());
    pre.extend_from_slice(user.address().as_slice());
    let locator = alloy_primitives::B256::from_slice(&pre[..32]);
    let seq = u64::from_be_bytes(pre[32..40].try_into().unwrap());
    let blob = &pre[40..];
    // Before the appointment hash had its own tag, these two were equal.
    assert_ne!(
        messages::appointment_hash(&locator, seq, blob),
        messages::register_hash(tower, user.address())
    );
    let r = common::post(
        srv.addr,
        "/add_appointment",
        &serde_json::json!({
            "locator": locator,
            "seq": seq,
            "blob": format!("0x{}", hex::encode(blob)),
            "signature": sig_hex,
        }),
    )
    .await;
    let stored = srv
        .tower
        .store()
        .appointment(user.address(), locator)
        .unwrap();
    let sub = srv.tower.store().subscription(user.address()).unwrap();
    srv.stop().await;
    assert_ne!(
        r.status, 200,
        "a register signature was taken as the user's appointment: stored {stored:?}, \
         subscription {sub:?}"
    );
}

/// Registration is free, so the store is capped (`max_appointments`), but
/// nothing was ever given back: appointments of expired subscriptions kept
/// their place for ever. A hostile client that filled the cap once locked
/// every new channel of every honest user out (`tower_full`), even after
/// its subscriptions expired. Now a full store drops what users expired
/// for `reclaim_after_secs` hold. Here the cap is 4 and the attacker's
/// subscription expired long ago.
#[tokio::test]
async fn expired_junk_does_not_lock_new_users_out_for_ever() {
    use perun_wallet::signature_bytes;
    use perun_watchtower::messages;
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Arc::new(AtomicU64::new(1_000_000));
    let config = api::Config {
        slots_per_registration: 10,
        subscription_secs: 100,
        store: perun_watchtower::store::StoreLimits {
            max_appointments: 4,
            reclaim_after_secs: 1_000,
            ..Default::default()
        },
        ..api::Config::default()
    };
    let srv = Server::start_at(&dir.path().join("tower.redb"), config, Arc::clone(&now)).await;
    let tower = srv.tower.address();
    let sig = |who: &LocalAccount, h| {
        format!(
            "0x{}",
            hex::encode(signature_bytes(&who.sign_hash(h).unwrap()))
        )
    };
    let register = async |who: &LocalAccount| {
        let body = serde_json::json!({ "user": who.address(), "signature": sig(who, messages::register_hash(tower, who.address())) });
        common::post(srv.addr, "/register", &body).await
    };
    let appoint = async |who: &LocalAccount| {
        let mut l = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut l);
        let locator = alloy_primitives::B256::from(l);
        let blob = vec![7u8; 64];
        let body = serde_json::json!({
            "locator": locator, "seq": 1, "blob": format!("0x{}", hex::encode(&blob)),
            "signature": sig(who, messages::appointment_hash(&locator, 1, &blob)),
        });
        common::post(srv.addr, "/add_appointment", &body).await
    };
    let attacker = LocalAccount::random();
    assert_eq!(register(&attacker).await.status, 200);
    for _ in 0..4 {
        assert_eq!(appoint(&attacker).await.status, 200);
    }
    let honest = LocalAccount::random();
    assert_eq!(register(&honest).await.status, 200);
    // Full while the attacker's subscription runs (and for 1,000 s after).
    assert_eq!(appoint(&honest).await.code(), "tower_full");
    now.fetch_add(500, Ordering::SeqCst);
    assert_eq!(appoint(&attacker).await.code(), "subscription_expired");
    // Long after (here: far past the attacker's 100 s subscription). The
    // sweep runs at most every 10 s; the one above ran before the expiry.
    now.fetch_add(10_000, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The honest user renews (its own 100 s are long over too).
    assert_eq!(register(&honest).await.status, 200);
    let r = appoint(&honest).await;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    let attacker_left = srv.tower.store().subscription(attacker.address()).unwrap();
    srv.stop().await;
    assert_eq!(
        r.status, 200,
        "an honest user's appointment, with only an expired user's junk stored: {body}"
    );
    assert!(attacker_left.is_none(), "the expired user is gone too");
}
