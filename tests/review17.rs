//! Review of issue 17's changes (commit rides with the next update, the redb
//! writer's record cache, the staged hash). The tests without a `check_`
//! prefix failed on the code as reviewed (a refused ride failed an honest
//! update for good, a peer of the previous release failed every other
//! update, a held commit kept a stopped client alive, a deserialized machine
//! was not equal to itself, `validate_transition` took another channel's
//! states, and, older, concurrent payments stalled for `update_wait`);
//! `check_*` tests guard what held already.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Ledger, Options, initial, open, parties, two_party_params};
use perun::channel::{
    Address, Allocation, Asset, Domain, Machine, Params, PaymentApp, Phase, SignedState, State,
    U256,
};
use perun::client::{Error, IncomingUpdate, UpdateHandler, UpdateResponder};
use perun::persistence::{Change, ChannelRecord, MemoryPersister, Persister, RedbPersister};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{
    Config, Handle, Incoming, Message, Node, PeerId, Refusal, RefusalCode, RejectKind, Update,
    UpdateCommit, UpdateReject, UpdateWithCommit,
};

fn u(x: u64) -> U256 {
    U256::from(x)
}

// ---------------------------------------------------------------------------
// channel crate: `staged_hash`, `validate_for`
// ---------------------------------------------------------------------------

/// `Machine` derives `PartialEq` and `Deserialize`, and `staged_hash` is a
/// cache that serde skips: a machine that went through serde is no longer
/// equal to itself (the derived equality compares the cache).
#[test]
fn machine_equals_itself_after_serde() {
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let params = two_party_params(&a, &b);
    let m = Machine::new(params.clone(), 0, initial(&params)).unwrap();
    let json = serde_json::to_string(&m).unwrap();
    let back: Machine = serde_json::from_str(&json).unwrap();
    assert_eq!(
        back.staged_hash(),
        m.staged_hash(),
        "the hash itself is recomputed"
    );
    assert_eq!(
        back, m,
        "a machine round-tripped through serde equals the original"
    );
}

/// A machine restored via serde still signs exactly the staged state.
#[test]
fn check_machine_from_serde_signs_the_staged_state() {
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let params = two_party_params(&a, &b);
    let mut m = Machine::new(params.clone(), 0, initial(&params)).unwrap();
    let json = serde_json::to_string(&m).unwrap();
    let mut back: Machine = serde_json::from_str(&json).unwrap();
    m.set_phase(Phase::Signing0).unwrap();
    back.set_phase(Phase::Signing0).unwrap();
    let s1 = m.sign_staged(&a).unwrap();
    let s2 = back.sign_staged(&a).unwrap();
    assert_eq!(s1, s2);
    back.add_signature(1, b.sign_hash(initial(&params).hash()).unwrap())
        .unwrap();
    let cur = back.commit_staged().unwrap().clone();
    cur.verify_all(&params).unwrap();
}

/// `State::validate_transition` (public) used to check `next` against the
/// params' channel id; it now trusts `self.channelId`. A pair of states of
/// another channel passes as a transition of `params`' channel.
#[test]
fn validate_transition_refuses_a_pair_of_another_channels_states() {
    let (a, b) = (LocalAccount::random(), LocalAccount::random());
    let params = two_party_params(&a, &b);
    let mut cur = initial(&params);
    cur.channelId.0[0] ^= 1; // a state of some other channel
    let mut next = cur.next();
    next.outcome.balances[0][0] -= u(1);
    next.outcome.balances[0][1] += u(1);
    let res = cur.validate_transition(&params, &next, 0, &PaymentApp);
    assert!(
        matches!(res, Err(perun::channel::Error::ChannelIdMismatch { .. })),
        "states of another channel are not a transition of this one: {res:?}"
    );
}

// ---------------------------------------------------------------------------
// persistence: the redb writer's record cache
// ---------------------------------------------------------------------------

struct TestChannel {
    params: Params,
    accounts: Vec<LocalAccount>,
}

impl TestChannel {
    fn new(seed: u64) -> Self {
        let accounts: Vec<LocalAccount> = (0..2).map(|_| LocalAccount::random()).collect();
        let domain = Domain {
            chain_id: U256::from(31337),
            adjudicator: Address::repeat_byte(0xad),
        };
        let params = Params::payment(
            domain,
            60,
            U256::from(seed),
            accounts.iter().map(Account::address).collect(),
            vec![vec![u(1_000_000); 2]],
        );
        Self { params, accounts }
    }
    fn id(&self) -> perun::channel::ChannelId {
        self.params.channel_id()
    }
    fn state(&self, version: u64) -> State {
        let asset = Asset {
            chainId: U256::from(31337),
            holder: Address::repeat_byte(0x10),
        };
        let mut st = State::initial(
            &self.params,
            Allocation::new(
                vec![asset],
                vec![vec![u(1_000_000 - version), u(1_000_000 + version)]],
            ),
        );
        st.version = version;
        st
    }
    fn signed_by(&self, version: u64, signers: &[usize]) -> SignedState {
        let mut st = SignedState::new(self.state(version));
        for &i in signers {
            st.sign(&self.params, i, &self.accounts[i]).unwrap();
        }
        st
    }
    fn signed(&self, version: u64) -> SignedState {
        self.signed_by(version, &[0, 1])
    }
    fn record(&self) -> ChannelRecord {
        ChannelRecord {
            params: self.params.clone(),
            index: 0,
            phase: Phase::Active,
            current: Some(self.signed(0)),
            staged: None,
            peers: vec![b"peer-0".to_vec(), b"peer-1".to_vec()],
            metadata: b"m".to_vec(),
            burnt: 0,
        }
    }
}

/// Writes that land in one batch (several updates of one channel, a refused
/// change between them, remove and create again) leave the redb store, its
/// cache and the file after a reopen exactly where the in-memory store is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_redb_record_cache_matches_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let redb = RedbPersister::open(&path).await.unwrap();
    let mem = MemoryPersister::new();
    let ch = TestChannel::new(1);
    let other = TestChannel::new(2);
    let id = ch.id();
    for p in [&redb as &dyn Persister, &mem] {
        p.channel_created(&ch.record()).await.unwrap();
        p.channel_created(&other.record()).await.unwrap();
    }
    // Warm the cache.
    for p in [&redb as &dyn Persister, &mem] {
        p.update(id, vec![Change::Staged(ch.signed_by(1, &[0]))])
            .await
            .unwrap();
    }
    let rounds: Vec<Vec<Change>> = vec![
        vec![Change::Committed(ch.signed(1))],
        vec![Change::Staged(ch.signed_by(2, &[0]))],
        // Refused: older than current.
        vec![Change::Committed(ch.signed(0))],
        // Refused in the middle of a list: all or nothing.
        vec![
            Change::Metadata(b"half".to_vec()),
            Change::Committed(ch.signed_by(2, &[0])),
        ],
        vec![Change::Committed(ch.signed(2)), Change::Burnt(3)],
        vec![Change::Metadata(b"after".to_vec())],
        // A conflicting state of version 2.
        vec![Change::Committed({
            let mut s = ch.state(2);
            s.outcome.balances[0][0] -= u(1);
            s.outcome.balances[0][1] += u(1);
            let mut st = SignedState::new(s);
            st.sign(&ch.params, 0, &ch.accounts[0]).unwrap();
            st.sign(&ch.params, 1, &ch.accounts[1]).unwrap();
            st
        })],
        vec![Change::Staged(ch.signed_by(4, &[1]))],
    ];
    for p in [&redb as &dyn Persister, &mem] {
        // All at once: the redb writer takes them in one or a few batches.
        let results = futures::future::join_all(
            rounds
                .iter()
                .cloned()
                .map(|changes| async move { p.update(id, changes).await.is_ok() }),
        )
        .await;
        eprintln!("results: {results:?}");
    }
    let from_redb = redb.load(id).await.unwrap().unwrap();
    let from_mem = mem.load(id).await.unwrap().unwrap();
    assert_eq!(from_redb, from_mem, "redb after a batch");
    // Remove and create again in one go, then update the new record.
    let fresh = {
        let mut r = ch.record();
        r.metadata = b"again".to_vec();
        r
    };
    for p in [&redb as &dyn Persister, &mem] {
        let (a, b, c) = tokio::join!(
            p.channel_removed(id),
            p.channel_created(&fresh),
            p.update(id, vec![Change::Staged(ch.signed_by(1, &[0]))])
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
        p.update(id, vec![Change::Committed(ch.signed(1))])
            .await
            .unwrap();
    }
    assert_eq!(
        redb.load(id).await.unwrap().unwrap(),
        mem.load(id).await.unwrap().unwrap(),
        "redb after remove + create"
    );
    drop(redb);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        match RedbPersister::open(&path).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "reopen: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        reopened.load(id).await.unwrap().unwrap(),
        mem.load(id).await.unwrap().unwrap(),
        "the file after a reopen"
    );
    assert_eq!(
        reopened.load(other.id()).await.unwrap().unwrap(),
        mem.load(other.id()).await.unwrap().unwrap()
    );
}

// ---------------------------------------------------------------------------
// client: commits riding with the next update
// ---------------------------------------------------------------------------

async fn sim() -> Ledger {
    Ledger::sim().await
}

/// Replaces party 1 of a 2-party channel by a raw endpoint with its network
/// key (after one payment, so everything is set up).
struct Twin {
    _ledger: Ledger,
    alice: perun::client::Channel,
    bob_key: LocalAccount,
    alice_peer: PeerId,
    evil: Handle,
    evil_in: Option<Incoming>,
    _parties: Vec<common::Party>,
}

async fn twin(ledger: Ledger) -> Twin {
    let mut ps = parties(&ledger, 2, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    let (evil, evil_in, bob_key) = common::evil_twin(&ps, 1, 0).await;
    let alice_client = &ps[0].client;
    Twin {
        _ledger: ledger,
        alice: chans[0].clone(),
        bob_key,
        alice_peer: alice_client.peer_id(),
        evil,
        evil_in: Some(evil_in),
        _parties: ps,
    }
}

/// A peer on the previous release: same protocol id (`/perun/wire/1`), it
/// signs `Update`s and takes `UpdateCommit`s, but cannot decode the new
/// `UpdateWithCommit` variant, which its wire refuses as `Malformed`.
/// Alice's back-to-back payments to it fail every other time: there is no
/// fallback to a plain `Update` (nor a protocol version bump).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_peer_of_the_previous_release_falls_back_to_plain_updates() {
    let mut t = twin(sim().await).await;
    let mut incoming = t.evil_in.take().unwrap();
    let bob_key = t.bob_key.clone();
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            let _ = match msg {
                Message::Update(u) => r.reply(common::accept(&bob_key, &u, 1)),
                Message::UpdateCommit(_) | Message::UpdateReject(_) => r.reply(Message::Ack),
                // What the previous release's wire answers to a frame it
                // cannot decode.
                Message::UpdateWithCommit(_) => r.refuse(Refusal::new(
                    RefusalCode::Malformed,
                    "unknown variant index 11",
                )),
                _ => r.refuse(Refusal::new(RefusalCode::NoReply, "not now")),
            };
        }
    });
    // Warm up the connection to the twin (the first request may meet the
    // closing connection to the real Bob).
    let mut ok = false;
    for _ in 0..10 {
        if t.alice.pay(1, 0, u(1)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a single payment to the old peer works");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut failures = Vec::new();
    for i in 0..10 {
        if let Err(e) = t.alice.pay(1, 0, u(1)).await {
            failures.push(format!("payment {i}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "back-to-back payments to a peer of the previous release fail: {failures:?}"
    );
}

/// A refused ride does not wedge the channel: after it, plain updates work
/// and the peer still gets every committed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_replayed_and_bogus_rides_change_nothing() {
    let t = twin(sim().await).await;
    let (evil, alice_peer, id) = (&t.evil, t.alice_peer, t.alice.id());
    let before = t.alice.state();
    let bob_pays = |st: &State, x: u64| {
        let mut next = st.next();
        next.outcome.balances[0][1] -= u(x);
        next.outcome.balances[0][0] += u(x);
        next
    };
    let send = |m: Message| async move { evil.send(alice_peer, &m).await };
    // Bob's fair update v+1, signed by Alice.
    let v1 = bob_pays(&before.state, 5);
    let mut alice_sig = None;
    for _ in 0..10 {
        match send(Message::Update(Update {
            channel_id: id,
            state: v1.clone(),
            actor: 1,
        }))
        .await
        {
            Ok(Message::UpdateAccept(a)) => {
                alice_sig = Some(a.signature);
                break;
            }
            other => {
                eprintln!("warm-up: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let alice_sig = alice_sig.expect("Alice signs a fair update");
    let bob_sig = t.bob_key.sign_hash(v1.hash()).unwrap();
    let commit1 = UpdateCommit {
        channel_id: id,
        version: v1.version,
        index: 1,
        signatures: vec![alice_sig, bob_sig],
    };
    let v2 = bob_pays(&v1, 5);
    let ride = Message::UpdateWithCommit(UpdateWithCommit {
        commit: commit1.clone(),
        update: Update {
            channel_id: id,
            state: v2.clone(),
            actor: 1,
        },
    });
    match send(ride.clone()).await.unwrap() {
        Message::UpdateAccept(a) => assert_eq!(a.version, v2.version),
        other => panic!("a fair ride is signed, got {other:?}"),
    }
    t.alice
        .wait_for_version(v1.version, Duration::from_secs(5))
        .await
        .unwrap();
    // The very same request again: nothing is signed twice, nothing moves.
    match send(ride.clone()).await {
        Ok(Message::UpdateReject(r)) => assert_eq!(r.kind, RejectKind::Conflict, "{r:?}"),
        other => panic!("a replayed ride is turned down, got {other:?}"),
    }
    assert_eq!(t.alice.state().state, v1);
    // Bob aborts v2, then rides another state of that version on the old
    // commit: Alice must not sign a second state of v2.
    let abort = Message::UpdateReject(UpdateReject {
        channel_id: id,
        version: v2.version,
        index: 1,
        reason: "aborted".into(),
        kind: RejectKind::Refused,
    });
    assert_eq!(send(abort).await.unwrap(), Message::Ack);
    let v2b = bob_pays(&v1, 7);
    assert_eq!(v2b.version, v2.version);
    let other = Message::UpdateWithCommit(UpdateWithCommit {
        commit: commit1.clone(),
        update: Update {
            channel_id: id,
            state: v2b,
            actor: 1,
        },
    });
    match send(other).await {
        Ok(Message::UpdateReject(_)) | Err(_) => {}
        Ok(m) => panic!("a second state of one version is never signed, got {m:?}"),
    }
    // A commit at a huge version riding with an update one above it.
    let mut huge = bob_pays(&v1, 1);
    huge.version = u64::MAX;
    let bogus = Message::UpdateWithCommit(UpdateWithCommit {
        commit: UpdateCommit {
            version: u64::MAX - 1,
            ..commit1.clone()
        },
        update: Update {
            channel_id: id,
            state: huge,
            actor: 1,
        },
    });
    assert!(send(bogus).await.is_err(), "a commit Alice never staged");
    assert_eq!(t.alice.state().state, v1);
    assert_eq!(t.alice.phase(), Phase::Active);
}

/// Accepts every update but those moving exactly `refuse` of asset 0.
struct RefuseAmount(U256);

#[async_trait]
impl UpdateHandler for RefuseAmount {
    async fn handle_update(&self, u: IncomingUpdate, r: UpdateResponder) {
        let moved = u.current.outcome.balances[0][0].abs_diff(u.next.outcome.balances[0][0]);
        if moved == self.0 {
            r.reject("not that amount");
        } else {
            r.accept();
        }
    }
}

/// The responder's handler refuses the update a commit rode with: the
/// commit is taken anyway and reaches the responder's readers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_a_commit_riding_with_a_refused_update_reaches_readers() {
    let ledger = sim().await;
    let opts = Options {
        update_handler: Some(Arc::new(RefuseAmount(u(7)))),
        ..Options::default()
    };
    let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    for round in 0..20 {
        chans[0].pay(1, 0, u(1)).await.unwrap();
        chans[0].pay(1, 0, u(1)).await.unwrap();
        let last = chans[0].state();
        assert!(matches!(
            chans[0].pay(1, 0, u(7)).await,
            Err(Error::Rejected { .. })
        ));
        let bob = chans[1]
            .wait_for_version(last.state.version, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("round {round}: Bob lacks the last state: {e}"));
        assert_eq!(bob, last);
    }
}

/// Three parties: one bursts; every peer ends with its last state in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_three_party_burst_reaches_every_peer() {
    let ledger = sim().await;
    let mut ps = parties(&ledger, 3, u(1_000_000), &Options::default()).await;
    let chans = open(&ledger, &mut ps, u(10_000)).await;
    for _ in 0..50 {
        chans[2].pay(0, 0, u(1)).await.unwrap();
    }
    let last = chans[2].state();
    for c in &chans[..2] {
        assert_eq!(
            c.wait_for_version(last.state.version, Duration::from_secs(10))
                .await
                .unwrap(),
            last
        );
    }
}

/// Test options with both clients on redb (sim ledger).
fn on_redb() -> Options {
    Options {
        redb: true,
        ..Options::default()
    }
}

/// Waits until `ch` holds exactly `state` (5 s at most).
async fn reaches(ch: &perun::client::Channel, state: &perun::channel::SignedState) {
    let got = ch
        .wait_for_version(state.state.version, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&got, state);
}

/// Test options with `update_wait` set to `d`.
fn waiting(d: Duration) -> Options {
    Options {
        timeouts: Some(perun::client::Timeouts {
            update_wait: d,
            ..common::test_timeouts(Duration::from_secs(30))
        }),
        ..Options::default()
    }
}

/// Whether `e` is the refusal of a whole `UpdateWithCommit` because of its
/// carried commit (an honest peer never refuses a plain `Update` as
/// malformed: "commit does not match the staged update", "nothing staged").
fn is_refused_ride(e: &Error) -> bool {
    matches!(e, Error::Wire(perun::wire::Error::Refused(r))
        if r.code == RefusalCode::Malformed)
}

/// Honest three-party traffic (all three pay at once, retrying retryable
/// errors): a peer that dropped a staged state as superseded refuses the
/// next update of its proposer as a whole, because the commit riding with
/// it no longer matches; the proposer's `pay` fails with a non-retryable
/// `Error::Wire(Refused(Malformed))` where a plain update gets a retryable
/// `Conflict`. (Timing dependent: pays for up to 12 s or until it happens.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_party_concurrent_bursts_complete() {
    let ledger = sim().await;
    let opts = waiting(Duration::from_millis(500));
    let mut ps = parties(&ledger, 3, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(100_000)).await;
    // Pay until a refused ride shows up, for at most 12 s.
    let hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (ch, hit) = (chans[i].clone(), hit.clone());
            tokio::spawn(async move {
                let (mut rides, mut other) = (Vec::new(), Vec::new());
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(12)
                    && !hit.load(std::sync::atomic::Ordering::Relaxed)
                {
                    match ch.pay((i + 1) % 3, 0, u(1)).await {
                        Ok(_) => {}
                        Err(e) if e.is_retryable() => {}
                        Err(e) if is_refused_ride(&e) => {
                            hit.store(true, std::sync::atomic::Ordering::Relaxed);
                            rides.push(e.to_string());
                        }
                        Err(e) => other.push(e.to_string()),
                    }
                }
                (rides, other)
            })
        })
        .collect();
    let mut rides = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, o) = t.await.unwrap();
        if !o.is_empty() {
            eprintln!("party {i}: other non-retryable errors: {o:?}");
        }
        rides.extend(r.into_iter().map(|e| format!("party {i}: {e}")));
    }
    assert!(
        rides.is_empty(),
        "honest updates failed for good on a refused ride: {rides:?}"
    );
}

/// Opens a 3-party channel and replaces party 2 (Carol) by a raw endpoint
/// with her network key.
struct Twin3 {
    _ledger: Ledger,
    chans: Vec<perun::client::Channel>,
    carol_key: LocalAccount,
    evil: Handle,
    evil_in: Option<Incoming>,
    peers: Vec<PeerId>,
    _parties: Vec<common::Party>,
}

async fn twin3(ledger: Ledger, opts: &Options) -> Twin3 {
    let mut ps = parties(&ledger, 3, u(1_000_000), opts).await;
    let mut chans = open(&ledger, &mut ps, u(1_000)).await;
    let peers: Vec<PeerId> = ps.iter().map(|p| p.client.peer_id()).collect();
    let carol = &ps[2];
    let carol_key = LocalAccount::from_bytes(&carol.account.secret_bytes()).unwrap();
    chans.truncate(2);
    carol.client.shutdown().await;
    let (evil, evil_in) = Node::start(Config::new(carol.key.clone())).await.unwrap();
    for p in &ps[..2] {
        for addr in p.client.listen_addrs().await.unwrap() {
            evil.add_address(p.client.peer_id(), addr).await.unwrap();
        }
        for addr in evil.listen_addrs().await.unwrap() {
            p.client.add_peer(evil.local_peer_id(), addr).await.unwrap();
        }
    }
    Twin3 {
        _ledger: ledger,
        chans,
        carol_key,
        evil,
        evil_in: Some(evil_in),
        peers,
        _parties: ps,
    }
}

/// Deterministic form of the above. Alice (0) pays Bob (1) back to back;
/// Carol (2, a raw endpoint) proposes her own update to Bob while Alice's
/// second payment is staged, and signs Alice's payment only after Bob, as
/// his `update_wait` runs out, dropped it as superseded (as a slow but
/// honest Carol would with default timeouts: `handler` = `update_wait` =
/// 10 s). Alice commits that payment and holds its commit; her next payment
/// carries it; Bob cannot take it (his staged state is Carol's) and refuses
/// the whole request. With a plain `Update` Bob answers `Conflict`
/// (retryable); with the ride Alice gets `Error::Wire(Refused(Malformed))`,
/// which `settle` would even take as a reason to close on-chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_peer_refusing_a_ride_answers_conflict() {
    let opts = waiting(Duration::from_millis(300));
    let mut t = twin3(sim().await, &opts).await;
    let alice = t.chans[0].clone();
    // The version Carol interferes with and the state it builds on.
    let trap: Arc<std::sync::Mutex<Option<(u64, State)>>> = Arc::default();
    let mut incoming = t.evil_in.take().unwrap();
    let (evil, carol_key, bob_peer, trap2) = (
        t.evil.clone(),
        t.carol_key.clone(),
        t.peers[1],
        trap.clone(),
    );
    tokio::spawn(async move {
        while let Some(req) = incoming.next().await {
            let (_, msg, r) = req.into_parts();
            let update = match msg {
                Message::Update(u) => u,
                Message::UpdateWithCommit(m) => m.update,
                Message::UpdateCommit(_) | Message::UpdateReject(_) => {
                    let _ = r.reply(Message::Ack);
                    continue;
                }
                _ => {
                    let _ = r.refuse(Refusal::new(RefusalCode::NoReply, "not now"));
                    continue;
                }
            };
            let armed = trap2.lock().unwrap().clone();
            let (evil, carol_key) = (evil.clone(), carol_key.clone());
            tokio::spawn(async move {
                if let Some((v, base)) = armed.filter(|(v, _)| *v == update.state.version) {
                    // Bob has signed Alice's update by now.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let mut mine = base.next();
                    mine.version = v + 1;
                    mine.outcome.balances[0][2] -= U256::from(1u64);
                    mine.outcome.balances[0][0] += U256::from(1u64);
                    let reply = evil
                        .send(
                            bob_peer,
                            &Message::Update(Update {
                                channel_id: update.channel_id,
                                state: mine,
                                actor: 2,
                            }),
                        )
                        .await;
                    eprintln!("Bob answered Carol's update: {reply:?}");
                }
                let _ = r.reply(common::accept(&carol_key, &update, 2));
            });
        }
    });
    // Warm up the connections to the twin.
    let mut ok = false;
    for _ in 0..10 {
        if alice.pay(1, 0, u(1)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "Alice can pay with the twin in the channel");
    t.chans[1]
        .wait_for_version(alice.state().state.version, Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let base = alice.state().state;
    // Payment 1 (on `base`), payment 2 (Carol interferes), payment 3 (the
    // ride), back to back.
    let mut after_one = base.next();
    after_one.outcome.balances[0][0] -= u(1);
    after_one.outcome.balances[0][1] += u(1);
    *trap.lock().unwrap() = Some((base.version + 2, after_one));
    alice.pay(1, 0, u(1)).await.unwrap();
    alice.pay(1, 0, u(1)).await.unwrap();
    let third = alice.pay(1, 0, u(1)).await;
    eprintln!("third payment: {third:?}");
    if let Err(e) = &third {
        assert!(
            e.is_retryable(),
            "an honest peer's refusal of the carried commit fails the update for good: {e}"
        );
    }
}

/// Both sides of a 2-party channel pay at once (retrying conflicts). Not
/// caused by the reviewed changes, found while checking them: a responder
/// that waits for the previous commit (`respond_update`, `awaits_commit`)
/// waits for the phase to leave `Updating`; when the commit comes, its own
/// retrying proposal stages at once, the waiter never sees `Active` and
/// sits out all of `update_wait` (10 s by default) while the proposer is
/// blocked and the other side burns a version per retry. Here
/// `update_wait` is 30 s (the stalled request gives up at `request`, 15 s);
/// a payment must not take 8 s (a bound a loaded machine's scheduling
/// never reaches, that stall always does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_payments_never_stall_for_update_wait() {
    let ledger = sim().await;
    let opts = waiting(Duration::from_secs(30));
    let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(10_000)).await;
    let mut slow = Vec::new();
    for round in 0..20 {
        let tasks: Vec<_> = (0..2)
            .map(|i| {
                let ch = chans[i].clone();
                tokio::spawn(async move {
                    let mut slowest = Duration::ZERO;
                    let mut done = 0;
                    while done < 20 {
                        let t0 = Instant::now();
                        match ch.pay(1 - i, 0, u(1)).await {
                            Ok(_) => done += 1,
                            Err(e) if e.is_retryable() => {}
                            Err(e) => panic!("party {i}: {e}"),
                        }
                        slowest = slowest.max(t0.elapsed());
                    }
                    slowest
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let slowest = t.await.unwrap();
            if slowest >= Duration::from_secs(8) {
                slow.push(format!("round {round}, party {i}: {slowest:?}"));
            }
        }
        let newest = chans.iter().map(|c| c.state().state.version).max().unwrap();
        let a = chans[0]
            .wait_for_version(newest, Duration::from_secs(20))
            .await
            .unwrap();
        let b = chans[1]
            .wait_for_version(newest, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.state.outcome.balances[0][0], u(10_000));
    }
    assert!(slow.is_empty(), "payments stalled: {slow:?}");
}

/// The responder restarts (redb) right after taking a ride: its unsaved
/// commit is either stored or recovered by `Sync`, and both sides go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_responder_restart_right_after_a_burst() {
    let ledger = sim().await;
    let opts = on_redb();
    let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
    let chans = open(&ledger, &mut ps, u(1_000)).await;
    for _ in 0..20 {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    let last = chans[0].state();
    let alice = chans[0].clone();
    drop(chans); // Bob's handle would keep his old client (and store) open.
    let bob = ps.pop().unwrap();
    let bob = common::restart_opts(&ledger, bob, &opts).await;
    ps.push(bob);
    common::introduce(&ps).await;
    let bob_ch = ps[1].client.channel(&alice.id()).unwrap();
    reaches(&bob_ch, &last).await;
    for _ in 0..20 {
        alice.pay(1, 0, u(1)).await.unwrap();
    }
    let last = alice.state();
    reaches(&bob_ch, &last).await;
}

/// A held commit (`Locked::held`) owns an `InFlight`, which owns an
/// `Arc<Shared>`; `Shared` owns the channel cores that own `Locked`. If the
/// runtime stops while a commit is held (within 1 ms of a burst's last
/// update: the timer task that would take it is dropped), the cycle keeps
/// the client alive for good: its store stays open, so the same process
/// cannot open it again. Without a held commit the store reopens.
#[test]
fn a_held_commit_does_not_keep_the_client_alive() {
    fn reopen_after(burst_then_stop_at_once: bool) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = rt.block_on(async move {
            let ledger = Ledger::sim().await;
            let opts = on_redb();
            let mut ps = parties(&ledger, 2, u(1_000_000), &opts).await;
            let chans = open(&ledger, &mut ps, u(1_000)).await;
            for _ in 0..5 {
                chans[0].pay(1, 0, u(1)).await.unwrap();
            }
            if !burst_then_stop_at_once {
                // The held commit goes out; nothing is held any more.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let dir = ps[0].dir.take().unwrap();
            drop(chans);
            drop(ps);
            dir
        });
        drop(rt);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = dir.path().join("perun.redb");
        rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match RedbPersister::open(&path).await {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => return Err(e.to_string()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    }
    reopen_after(false).expect("control: no held commit, the store reopens");
    let mut failed = 0;
    for _ in 0..3 {
        if let Err(e) = reopen_after(true) {
            eprintln!("store still open: {e}");
            failed += 1;
        }
    }
    assert_eq!(
        failed, 0,
        "a client whose runtime stopped with a held commit never releases its store"
    );
}
