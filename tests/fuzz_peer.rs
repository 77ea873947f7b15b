//! A seeded protocol fuzzer with a hostile peer (in the style of
//! rust-lightning's `chanmon_consistency`): Alice is a real, honest client
//! on the simulated ledger, her store wrapped by a [`SignLog`] and by a log
//! of this file ([`AliceLog`]); Bob is replaced by an evil twin
//! ([`common::evil_twin`]) that holds Bob's signing and network keys and
//! sends, per seed, a schedule of valid and mutated protocol messages:
//! updates and updates carrying commits with random versions, allocations,
//! channel ids, actors and final flags; commits with good and bad signature
//! sets; `Sync`s claiming random states; aborts naming random versions;
//! replays of its earlier messages; proposals, `Signing0`s and messages
//! that are no requests at all; now and then several at once, a counter-
//! proposal of the same version while Alice's own is in flight, or a
//! registration on-chain mid-schedule. It answers Alice's own requests (her
//! payments, commits, aborts and syncs) honestly, wrongly, late or never.
//! Per seed Alice is participant 0 or 1 (as 1, the twin's lower index wins
//! every same-version race), pays (spawned, with timeouts) and restarts on
//! her store at random moments. A seed ends with one of: the twin turns
//! honest (Alice must still be able to pay, then settles), goes silent,
//! registers a state it holds (the worst for Alice, the newest, or any),
//! concludes a final state Alice signed, or goes on fuzzing (and
//! registering) while Alice settles, Alice maybe restarting meanwhile.
//! Each seed prints its counts: what was tried and refused, and which deep
//! paths of the SDK its log shows were taken (`sdk_*`).
//!
//! Invariants, checked throughout and at the end of every seed:
//! 1. Alice never signs two states of one version (her log, and
//!    `SignLog::assert_no_double_sign`).
//! 2. Every signature of Alice's that reaches the twin was in her store
//!    first.
//! 3. Alice's current state is always fully signed with valid signatures,
//!    and her balance in every state she stored signed is at least her
//!    balance when the twin took over minus the payments she started (her
//!    update handler signs only updates that do not lower her balance).
//! 4. Nothing panics, and Alice can still close: cooperatively with a twin
//!    that turned honest, or on-chain with a silent or hostile twin; no
//!    payment or twin action hangs; she withdraws (on the ledger) at least
//!    the bound of (3), and at least her balance in the state she closed
//!    from.
//!
//! `FUZZ_SEED=n` runs one seed, `FUZZ_SEEDS=a..b` or `FUZZ_SEEDS=a,b,c` several
//! (default 1..4), `FUZZ_STEPS` the steps per seed (default 40);
//! `FUZZ_LEDGER=anvil` or `both` runs on anvil (real contracts, redb; no
//! restarts there) instead of / as well as the simulated ledger;
//! `FUZZ_RESTARTS=0` leaves Alice's restarts out; `FUZZ_LOG=<filter>` prints
//! the SDK's log lines.
//! Run: `cargo test --features perun/testing --test fuzz_peer -- --nocapture`.

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::sign_log::SignLog;
use common::{Ledger, Options};
use perun::adjudicator::SignedChannel;
use perun::channel::{Address, B256, ChannelId, Phase, Signature, SignedState, State, U256};
use perun::client::{
    Channel, IncomingProposal, IncomingUpdate, ProposalHandler, ProposalResponder, Timeouts,
    UpdateHandler, UpdateResponder,
};
use perun::persistence::{Change, ChannelRecord, Persister};
use perun::wallet::{Account, LocalAccount};
use perun::wire::{
    Message, PeerId, RejectKind, Responder, Sync as SyncMsg, Update, UpdateAccept, UpdateCommit,
    UpdateReject, UpdateWithCommit,
};

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const CHALLENGE: u64 = 60;
const STEP: u64 = perun::channel::limits::MAX_VERSION_STEP;

fn u(x: u64) -> U256 {
    U256::from(x)
}

// ---------------------------------------------------------------- PRNG

/// splitmix64: small, deterministic, good enough for schedules.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> Option<T> {
        if xs.is_empty() {
            None
        } else {
            Some(xs[self.below(xs.len() as u64) as usize].clone())
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("FUZZ_SEED") {
        return vec![s.trim().parse().expect("FUZZ_SEED is a number")];
    }
    let spec = std::env::var("FUZZ_SEEDS").unwrap_or_else(|_| "1..4".into());
    if let Some((a, b)) = spec.split_once("..") {
        let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
        return (a..b).collect();
    }
    spec.split(',').map(|s| s.trim().parse().unwrap()).collect()
}

/// `FUZZ_SELFTEST=bound` (Alice's own payments are left out of the bound)
/// or `log_late` (the log hears of writes late): each must make the fuzzer
/// report violations, showing its checks can fail. (Alice's handler alone
/// cannot be the test: the transition rule already refuses a peer's
/// update that takes from her, so a handler signing every valid update
/// loses her nothing.)
fn selftest(what: &str) -> bool {
    std::env::var("FUZZ_SELFTEST").is_ok_and(|v| v == what)
}

fn steps() -> usize {
    std::env::var("FUZZ_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

// ---------------------------------------------------------------- counters

#[derive(Default)]
struct Counts {
    map: Mutex<BTreeMap<String, u64>>,
}

impl Counts {
    fn add(&self, what: &str) {
        *self
            .map
            .lock()
            .unwrap()
            .entry(what.to_string())
            .or_default() += 1;
    }
    fn dump(&self) -> String {
        self.map
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

// ---------------------------------------------------------------- Alice's store log

/// What Alice stored signed, for invariants 1–3.
struct AliceLog {
    alice: Address,
    /// version → hashes of the states stored with Alice's signature.
    signed: Mutex<BTreeMap<u64, BTreeSet<B256>>>,
    /// Alice's balance when the twin took over, minus the payments started
    /// (i128 so a bug cannot wrap it).
    bound: Mutex<i128>,
    /// Whether `bound` is armed (set once the twin takes over).
    armed: std::sync::atomic::AtomicBool,
    violations: Mutex<Vec<String>>,
    counts: Arc<Counts>,
}

fn to_i128(x: U256) -> i128 {
    if x > U256::from(u128::MAX >> 2) {
        i128::MAX
    } else {
        x.to::<u128>() as i128
    }
}

impl AliceLog {
    fn new(alice: Address, counts: Arc<Counts>) -> Arc<Self> {
        Arc::new(Self {
            alice,
            signed: Mutex::default(),
            bound: Mutex::new(0),
            armed: false.into(),
            violations: Mutex::default(),
            counts,
        })
    }

    fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.violations.lock().unwrap().push(v);
    }

    fn bound(&self) -> i128 {
        *self.bound.lock().unwrap()
    }

    fn note(&self, how: &str, st: &SignedState) {
        let Some(Some(sig)) = st.sigs.get(ai()) else {
            return;
        };
        let hash = st.state.hash();
        match perun::wallet::recover(hash, sig) {
            Ok(a) if a == self.alice => {}
            other => {
                self.violation(format!(
                    "store took a state ({how}, v{}) whose slot 0 is not Alice's signature: {other:?}",
                    st.state.version
                ));
                return;
            }
        }
        self.counts.add("alice_stored_signed");
        let mut signed = self.signed.lock().unwrap();
        let set = signed.entry(st.state.version).or_default();
        set.insert(hash);
        if set.len() > 1 {
            self.violation(format!(
                "inv1: Alice stored two states of version {} signed: {set:?}",
                st.state.version
            ));
        }
        drop(signed);
        if self.armed.load(Ordering::SeqCst) {
            let mine = st
                .state
                .outcome
                .balances
                .first()
                .and_then(|r| r.get(ai()))
                .copied()
                .map(to_i128)
                .unwrap_or(-1);
            let bound = self.bound();
            if mine < bound {
                self.violation(format!(
                    "inv3: Alice stored ({how}) v{} signed with her balance {mine} below the bound {bound}: {:?}",
                    st.state.version, st.state
                ));
            }
        }
    }

    /// Invariant 2: a signature of Alice's on `hash` (version `version`)
    /// reached the twin: it must be in her store.
    fn seen_on_wire(&self, what: &str, version: u64, hash: B256) {
        self.counts.add("alice_sigs_seen_on_wire");
        let stored = self
            .signed
            .lock()
            .unwrap()
            .get(&version)
            .is_some_and(|s| s.contains(&hash));
        if !stored {
            self.violation(format!(
                "inv2: Alice's signature on v{version} {hash} reached the twin ({what}) before it was stored"
            ));
        }
    }
}

struct Logged {
    inner: Arc<dyn Persister>,
    log: Arc<AliceLog>,
}

#[async_trait]
impl Persister for Logged {
    async fn channel_created(&self, ch: &ChannelRecord) -> perun::persistence::Result<()> {
        self.inner.channel_created(ch).await?;
        for st in ch.current.iter().chain(&ch.staged) {
            self.log.note("created", st);
        }
        Ok(())
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> perun::persistence::Result<()> {
        let states: Vec<(&'static str, SignedState)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Staged(st) => Some(("staged", st.clone())),
                Change::Committed(st) => Some(("committed", st.clone())),
                _ => None,
            })
            .collect();
        self.inner.update(id, changes).await?;
        if selftest("log_late") {
            // Self-test of invariant 2: the log learns of a write late.
            let log = self.log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for (how, st) in &states {
                    log.note(how, st);
                }
            });
            return Ok(());
        }
        for (how, st) in &states {
            self.log.note(how, st);
        }
        Ok(())
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
    async fn meta_get(&self, key: &str) -> perun::persistence::Result<Option<Vec<u8>>> {
        self.inner.meta_get(key).await
    }
    async fn meta_put(&self, key: &str, value: &[u8]) -> perun::persistence::Result<()> {
        self.inner.meta_put(key, value).await
    }
}

// ---------------------------------------------------------------- Alice's handlers

/// Alice's policy: sign only updates that do not lower her balance.
struct Policy {
    counts: Arc<Counts>,
}

#[async_trait]
impl UpdateHandler for Policy {
    async fn handle_update(&self, update: IncomingUpdate, responder: UpdateResponder) {
        if update.pays_me_or_keeps() {
            self.counts.add("handler_accepted");
            responder.accept();
        } else {
            self.counts.add("handler_refused");
            responder.reject("lowers my balance");
        }
    }
}

/// Alice accepts the one channel of the run when she is its responder
/// (`open` armed), and no channel the twin proposes later (her deposit is
/// not at stake).
struct AcceptFirst {
    open: std::sync::atomic::AtomicBool,
    opened: tokio::sync::mpsc::Sender<Channel>,
}

#[async_trait]
impl ProposalHandler for AcceptFirst {
    async fn handle_proposal(&self, _p: IncomingProposal, responder: ProposalResponder) {
        if self.open.swap(false, Ordering::SeqCst) {
            if let Ok(ch) = responder.accept().await {
                let _ = self.opened.send(ch).await;
            }
        } else {
            responder.reject("not from the fuzzer");
        }
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        handler: Duration::from_millis(1000),
        request: Duration::from_millis(1500),
        update_wait: Duration::from_millis(1000),
        sync: Duration::from_secs(3),
        funding: Duration::from_secs(30),
        dispute_poll: Duration::from_millis(50),
        settle_cooperative: Duration::from_secs(3),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_secs(1),
        ..Timeouts::default()
    }
}

// ---------------------------------------------------------------- the twin

/// How the twin answers Alice's requests.
const FUZZ: u8 = 0;
const HONEST: u8 = 1;
const SILENT: u8 = 2;

/// What the twin learnt and keeps, shared by its sender and its responder.
#[derive(Default)]
struct Knowledge {
    /// Every state seen (proposed by either side, or in a Sync), by hash.
    states: HashMap<B256, State>,
    /// Hashes of states seen, by version.
    by_version: BTreeMap<u64, BTreeSet<B256>>,
    /// Alice's signatures the twin holds (valid ones), by state hash.
    alice_sigs: HashMap<B256, Signature>,
    /// Alice's own proposals (from her `Update`s), newest last.
    alice_proposals: Vec<State>,
    /// States the twin proposed that Alice accepted (hash), newest last.
    accepted: Vec<B256>,
    /// Requests the twin sent that Alice answered well, for replays.
    sent: Vec<Message>,
    /// Commits the twin decided to send later.
    later: Vec<UpdateCommit>,
    /// Alice's update requests the twin holds without answering.
    held: Vec<Responder>,
}

impl Knowledge {
    fn see(&mut self, st: &State) -> B256 {
        let h = st.hash();
        self.states.entry(h).or_insert_with(|| st.clone());
        self.by_version.entry(st.version).or_default().insert(h);
        h
    }
}

struct Twin {
    id: ChannelId,
    params: perun::channel::Params,
    key: LocalAccount,
    alice_addr: Address,
    alice_peer: PeerId,
    evil: perun::wire::Handle,
    know: Mutex<Knowledge>,
    log: Arc<AliceLog>,
    counts: Arc<Counts>,
    mode: AtomicU8,
    rng: Mutex<Rng>,
    /// Alice's handle (the test's oracle of her current state).
    alice: Mutex<Option<Channel>>,
}

impl Twin {
    fn r(&self) -> std::sync::MutexGuard<'_, Rng> {
        self.rng.lock().unwrap()
    }

    fn bob_sig(&self, st: &State) -> Signature {
        self.key.sign_hash(st.hash()).unwrap()
    }

    /// Checks a signature the twin got from Alice on `st`; keeps it if it
    /// is hers (invariant 2: it must be in her store).
    fn alice_signed(&self, what: &str, st: &State, sig: &Signature) -> bool {
        let hash = {
            let mut k = self.know.lock().unwrap();
            k.see(st)
        };
        match perun::wallet::recover(hash, sig) {
            Ok(a) if a == self.alice_addr => {
                self.log.seen_on_wire(what, st.version, hash);
                self.know.lock().unwrap().alice_sigs.insert(hash, *sig);
                true
            }
            _ => false,
        }
    }

    /// A signature of Alice's on some state of `version` the twin knows.
    fn alice_signed_version(&self, what: &str, version: u64, sig: &Signature) {
        let candidates: Vec<State> = {
            let k = self.know.lock().unwrap();
            k.by_version
                .get(&version)
                .map(|hs| hs.iter().filter_map(|h| k.states.get(h).cloned()).collect())
                .unwrap_or_default()
        };
        for st in &candidates {
            if self.alice_signed(what, st, sig) {
                return;
            }
        }
        self.counts.add("alice_sig_of_unknown_state");
    }

    fn observe_sync(&self, what: &str, s: &SyncMsg) {
        for st in std::iter::once(&s.latest).chain(s.staged.iter()) {
            if let Some(Some(sig)) = st.sigs.get(ai())
                && !self.alice_signed(what, &st.state, sig)
                && s.index == ai()
            {
                self.log.violation(format!(
                    "Alice's Sync ({what}) carries a bad signature of hers on v{}",
                    st.state.version
                ));
            }
        }
    }

    fn observe_commit(&self, what: &str, c: &UpdateCommit) {
        if let Some(sig) = c.signatures.get(ai()) {
            self.alice_signed_version(what, c.version, sig);
        }
    }

    /// A fully signed state of the twin's making: any state Alice signed,
    /// with Bob's signature added.
    fn full(&self, hash: B256) -> Option<SignedState> {
        let k = self.know.lock().unwrap();
        let st = k.states.get(&hash)?.clone();
        let a = *k.alice_sigs.get(&hash)?;
        drop(k);
        let b = self.bob_sig(&st);
        Some(SignedState {
            state: st,
            sigs: pair(Some(a), Some(b)),
        })
    }

    fn fulls(&self) -> Vec<SignedState> {
        let hashes: Vec<B256> = self
            .know
            .lock()
            .unwrap()
            .alice_sigs
            .keys()
            .copied()
            .collect();
        let mut v: Vec<_> = hashes
            .into_iter()
            .filter_map(|h| self.full(h))
            .filter(|s| s.state.channelId == self.id)
            .collect();
        v.sort_by_key(|s| s.state.version);
        v
    }

    async fn send(&self, what: &'static str, msg: &Message) -> Option<Message> {
        self.counts.add(what);
        match tokio::time::timeout(Duration::from_secs(6), self.evil.send(self.alice_peer, msg))
            .await
        {
            Ok(Ok(reply)) => Some(reply),
            Ok(Err(_)) => {
                self.counts.add("twin_send_refused_or_failed");
                None
            }
            Err(_) => {
                self.counts.add("twin_send_timed_out");
                None
            }
        }
    }

    fn remember(&self, msg: &Message) {
        let mut k = self.know.lock().unwrap();
        if k.sent.len() < 200 {
            k.sent.push(msg.clone());
        }
    }

    // ------------------------------------------------ answering Alice

    async fn serve(self: Arc<Self>, mut incoming: perun::wire::Incoming) {
        while let Some(req) = incoming.next().await {
            let (_, msg, responder) = req.into_parts();
            let this = self.clone();
            tokio::spawn(async move { this.answer(msg, responder).await });
        }
    }

    async fn answer(self: Arc<Self>, msg: Message, responder: Responder) {
        let mode = self.mode.load(Ordering::SeqCst);
        match msg {
            Message::Update(u) => {
                self.counts.add("alice_update_requests");
                self.answer_update(u, responder, mode).await;
            }
            Message::UpdateWithCommit(m) => {
                self.counts.add("alice_update_with_commit_requests");
                self.observe_commit("commit riding with Alice's update", &m.commit);
                self.answer_update(m.update, responder, mode).await;
            }
            Message::UpdateCommit(c) => {
                self.counts.add("alice_commits");
                self.observe_commit("Alice's commit", &c);
                self.silent_or(mode, responder, Message::Ack).await;
            }
            Message::UpdateReject(r) => {
                self.counts.add("alice_aborts");
                let _ = r;
                self.silent_or(mode, responder, Message::Ack).await;
            }
            Message::Sync(s) => {
                self.counts.add("alice_syncs");
                self.observe_sync("Alice's Sync request", &s);
                let reply = self.sync_answer(&s, mode);
                match reply {
                    Some(r) => {
                        let _ = responder.reply(r);
                    }
                    None => self.hold(responder),
                }
            }
            other => {
                self.counts.add("alice_other_requests");
                let _ = other;
                drop(responder);
            }
        }
    }

    fn hold(&self, responder: Responder) {
        let mut k = self.know.lock().unwrap();
        if k.held.len() < 64 {
            k.held.push(responder);
        }
    }

    async fn silent_or(&self, mode: u8, responder: Responder, reply: Message) {
        let silent = mode == SILENT || (mode == FUZZ && self.r().chance(10));
        if silent {
            self.hold(responder);
        } else {
            let _ = responder.reply(reply);
        }
    }

    async fn answer_update(self: &Arc<Self>, u: Update, responder: Responder, mode: u8) {
        {
            let mut k = self.know.lock().unwrap();
            k.see(&u.state);
            k.alice_proposals.push(u.state.clone());
        }
        let honest = common::accept(&self.key, &u, bi());
        if mode == SILENT {
            self.hold(responder);
            return;
        }
        if mode == HONEST {
            self.counts.add("twin_answer_honest");
            let _ = responder.reply(honest);
            return;
        }
        let choice = self.r().below(100);
        let reply = match choice {
            0..=49 => {
                self.counts.add("twin_answer_honest");
                honest
            }
            50..=54 => {
                // Counter-propose: the twin's own update of the same
                // version while Alice's is in flight (the lower index
                // wins), then an answer to hers.
                self.counts.add("twin_answer_counter_propose");
                let cur = self.alice.lock().unwrap().as_ref().map(Channel::state);
                if let Some(cur) = cur {
                    let mut t = cur.state.next();
                    t.version = u.state.version;
                    let row = &mut t.outcome.balances[0];
                    let x = row[bi()].min(U256::from(1u64));
                    row[bi()] -= x;
                    row[ai()] += x;
                    self.propose_and_commit("twin_counter_update", t).await;
                }
                if self.r().chance(50) {
                    honest
                } else {
                    Message::UpdateReject(UpdateReject {
                        channel_id: u.channel_id,
                        version: u.state.version,
                        index: bi(),
                        reason: "mine wins".into(),
                        kind: RejectKind::Conflict,
                    })
                }
            }
            55..=59 => {
                self.counts.add("twin_answer_other_state");
                let mut other = u.state.clone();
                other.version += 1;
                Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: bi(),
                    signature: self.bob_sig(&other),
                })
            }
            60..=63 => {
                self.counts.add("twin_answer_wrong_index");
                Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: ai(),
                    signature: self.bob_sig(&u.state),
                })
            }
            64..=66 => {
                self.counts.add("twin_answer_wrong_version");
                Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version + 1,
                    index: bi(),
                    signature: self.bob_sig(&u.state),
                })
            }
            67..=70 => {
                self.counts.add("twin_answer_refused");
                Message::UpdateReject(UpdateReject {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: bi(),
                    reason: "no".into(),
                    kind: RejectKind::Refused,
                })
            }
            71..=74 => {
                self.counts.add("twin_answer_conflict");
                Message::UpdateReject(UpdateReject {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: bi(),
                    reason: "conflict".into(),
                    kind: RejectKind::Conflict,
                })
            }
            75..=79 => {
                self.counts.add("twin_answer_dropped");
                drop(responder);
                return;
            }
            80..=84 => {
                self.counts.add("twin_answer_held");
                self.hold(responder);
                return;
            }
            85..=91 => {
                // Late: after Alice's request timeout (or just before it).
                self.counts.add("twin_answer_late");
                let ms = self.r().range(1200, 2500);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = responder.reply(honest);
                });
                return;
            }
            92..=95 => {
                self.counts.add("twin_answer_wrong_message");
                if self.r().chance(50) {
                    Message::Ack
                } else {
                    Message::UpdateAccept(UpdateAccept {
                        channel_id: ChannelId::repeat_byte(9),
                        version: u.state.version,
                        index: bi(),
                        signature: self.bob_sig(&u.state),
                    })
                }
            }
            _ => {
                // Honest, and then a Sync handing the state back signed
                // (as a twin that "lost" the answer would).
                self.counts.add("twin_answer_honest_then_sync");
                let _ = responder.reply(honest);
                let this = self.clone();
                let st = u.state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    this.sync_with_staged(st).await;
                });
                return;
            }
        };
        let _ = responder.reply(reply);
    }

    fn sync_answer(&self, s: &SyncMsg, mode: u8) -> Option<Message> {
        let echo = SyncMsg {
            channel_id: self.id,
            index: bi(),
            phase: Phase::Active,
            latest: s.latest.clone(),
            staged: None,
        };
        if mode == SILENT {
            return None;
        }
        if mode == HONEST {
            return Some(Message::Sync(echo));
        }
        let mut r = self.r().clone();
        let c = r.below(100);
        *self.r() = r;
        Some(match c {
            0..=49 => {
                self.counts.add("twin_sync_answer_echo");
                Message::Sync(echo)
            }
            50..=74 => {
                self.counts.add("twin_sync_answer_random");
                Message::Sync(self.random_sync())
            }
            75..=84 => {
                self.counts.add("twin_sync_answer_wrong_index");
                let mut e = echo;
                e.index = ai();
                Message::Sync(e)
            }
            _ => {
                self.counts.add("twin_sync_answer_silent");
                return None;
            }
        })
    }

    async fn sync_with_staged(&self, st: State) {
        let latest = self.best_latest();
        let Some(latest) = latest else { return };
        let sync = SyncMsg {
            channel_id: self.id,
            index: bi(),
            phase: Phase::Updating,
            latest,
            staged: Some(SignedState {
                sigs: pair(None, Some(self.bob_sig(&st))),
                state: st,
            }),
        };
        let msg = Message::Sync(sync);
        if let Some(Message::Sync(theirs)) = self.send("twin_sync_staged_back", &msg).await {
            self.observe_sync("Alice's Sync reply", &theirs);
        }
    }

    /// The twin's newest fully signed state below `version`.
    fn best_below(&self, version: u64) -> Option<SignedState> {
        self.fulls()
            .into_iter()
            .filter(|f| f.state.version < version)
            .last()
    }

    /// The twin's newest fully signed state.
    fn best_latest(&self) -> Option<SignedState> {
        self.fulls().into_iter().last()
    }

    /// A Sync claiming random states.
    fn random_sync(&self) -> SyncMsg {
        let fulls = self.fulls();
        let mut r = self.r().clone();
        let latest = match r.below(4) {
            0 => fulls.first().cloned(),
            1 => fulls.last().cloned(),
            2 => r.pick(&fulls),
            _ => {
                // Forged: a newer state with a made-up slot 0.
                fulls.last().cloned().map(|mut f| {
                    f.state.version += r.range(1, 3);
                    f.sigs[ai()] = Some(LocalAccount::random().sign_hash(f.state.hash()).unwrap());
                    f.sigs[bi()] = Some(self.bob_sig(&f.state));
                    f
                })
            }
        }
        .or_else(|| fulls.last().cloned())
        .expect("the twin knows version 0");
        let staged = match r.below(6) {
            0 | 1 => None,
            2 => {
                // Alice's last proposal, signed by Bob: completes it if pending.
                let p = self.know.lock().unwrap().alice_proposals.last().cloned();
                p.map(|st| SignedState {
                    sigs: pair(None, Some(self.bob_sig(&st))),
                    state: st,
                })
            }
            3 => {
                // A theft, signed by Bob.
                let mut st = latest.state.next();
                st.version += r.below(3);
                let x = st.outcome.balances[0][ai()].min(u(r.range(1, 500)));
                st.outcome.balances[0][ai()] -= x;
                st.outcome.balances[0][bi()] += x;
                Some(SignedState {
                    sigs: pair(None, Some(self.bob_sig(&st))),
                    state: st,
                })
            }
            4 => {
                // A state Alice signed (staged somewhere).
                let a = self.know.lock().unwrap().accepted.last().copied();
                a.and_then(|h| self.full(h)).map(|mut f| {
                    if r.chance(50) {
                        f.sigs[bi()] = None;
                    }
                    f
                })
            }
            _ => {
                let mut st = latest.state.next();
                st.version = match r.below(3) {
                    0 => u64::MAX,
                    1 => latest.state.version + STEP,
                    _ => latest.state.version + r.range(2, 50),
                };
                Some(SignedState {
                    sigs: pair(None, Some(self.bob_sig(&st))),
                    state: st,
                })
            }
        };
        let phase = [
            Phase::Active,
            Phase::Updating,
            Phase::Final,
            Phase::Registered,
        ][r.below(4) as usize];
        *self.r() = r;
        SyncMsg {
            channel_id: self.id,
            index: bi(),
            phase,
            latest,
            staged,
        }
    }

    // ------------------------------------------------ the twin's own moves

    /// Proposes `st` and commits it if Alice signs.
    async fn propose_and_commit(&self, what: &'static str, st: State) {
        self.know.lock().unwrap().see(&st);
        let msg = Message::Update(Update {
            channel_id: self.id,
            state: st.clone(),
            actor: bi(),
        });
        match self.send(what, &msg).await {
            Some(Message::UpdateAccept(a)) => {
                self.counts.add("twin_counter_update_signed");
                if self.alice_signed("Alice's UpdateAccept", &st, &a.signature) {
                    self.know.lock().unwrap().accepted.push(st.hash());
                    let commit = Message::UpdateCommit(UpdateCommit {
                        channel_id: self.id,
                        version: st.version,
                        index: bi(),
                        signatures: pair(a.signature, self.bob_sig(&st)),
                    });
                    self.send("twin_commit_now", &commit).await;
                }
            }
            Some(Message::UpdateReject(r)) if r.kind == RejectKind::Conflict => {
                self.counts.add("twin_counter_update_conflict");
            }
            _ => self.counts.add("twin_counter_update_refused"),
        }
    }

    /// A mutated update on a base the twin picks.
    fn make_update(&self, alice_now: &SignedState) -> State {
        let mut r = self.r().clone();
        let base = match r.below(10) {
            0 => self.fulls().first().map(|f| f.state.clone()),
            1 => {
                let k = self.know.lock().unwrap();
                k.accepted.last().and_then(|h| k.states.get(h).cloned())
            }
            _ => None,
        }
        .unwrap_or_else(|| alice_now.state.clone());
        let cur = alice_now.state.version;
        let mut st = base.next();
        st.version = match r.below(100) {
            0..=54 => cur + 1,
            55..=64 => cur + 2,
            65..=72 => cur + r.range(3, 100),
            73..=76 => cur,
            77..=80 => cur.saturating_sub(r.range(1, 3)),
            81..=83 => u64::MAX - r.below(3),
            84..=86 => cur + STEP,
            87..=88 => cur + STEP + 1,
            _ => {
                let k = self.know.lock().unwrap();
                let last = k
                    .accepted
                    .last()
                    .and_then(|h| k.states.get(h))
                    .map_or(cur, |s| s.version);
                last + r.below(2)
            }
        };
        let (ia, ib) = (ai(), bi());
        let row = &mut st.outcome.balances[0];
        let x = u(r.range(1, 200));
        match r.below(100) {
            // Bob pays Alice.
            0..=49 => {
                let x = x.min(row[ib]);
                row[ib] -= x;
                row[ia] += x;
            }
            50..=59 => {}
            // Inflate.
            60..=66 => row[ib] += x,
            // Steal.
            67..=79 => {
                let x = x.min(row[ia]);
                row[ia] -= x;
                row[ib] += x;
            }
            // Shift everything to Bob.
            80..=84 => {
                let all = row[ia];
                row[ia] = U256::ZERO;
                row[ib] += all;
            }
            // Overflow.
            85..=87 => {
                row[ia] = U256::MAX;
            }
            // Another shape.
            88..=90 => {
                st.outcome.balances[0].push(u(1));
            }
            _ => {
                let x = x.min(row[ib]);
                row[ib] -= x;
                row[ia] += x;
                st.appData = vec![1u8, 2, 3].into();
            }
        }
        if r.chance(3) {
            st.isFinal = true;
        }
        if r.chance(4) {
            st.channelId.0[0] ^= 1;
        }
        *self.r() = r;
        st
    }

    /// One twin update (maybe carrying a commit) and its follow-up.
    async fn do_update(&self, alice: &Channel) {
        let now = alice.state();
        let st = self.make_update(&now);
        self.know.lock().unwrap().see(&st);
        let actor = {
            let mut r = self.r();
            match r.below(100) {
                0..=93 => bi(),
                94..=97 => ai(),
                _ => 5,
            }
        };
        let update = Update {
            channel_id: if self.r().chance(3) {
                ChannelId::repeat_byte(7)
            } else {
                self.id
            },
            state: st.clone(),
            actor,
        };
        let with_commit = self.r().chance(30);
        let msg = if with_commit {
            let commit = self.make_commit(Some(st.version));
            Message::UpdateWithCommit(UpdateWithCommit { commit, update })
        } else {
            Message::Update(update)
        };
        let what = if with_commit {
            "twin_update_with_commit"
        } else {
            "twin_update"
        };
        let Some(reply) = self.send(what, &msg).await else {
            return;
        };
        match reply {
            Message::UpdateAccept(a) => {
                self.counts.add("twin_update_accepted_by_alice");
                if a.version != st.version || a.channel_id != self.id || a.index != ai() {
                    self.log.violation(format!(
                        "Alice's accept of v{} names v{} channel {} index {}",
                        st.version, a.version, a.channel_id, a.index
                    ));
                }
                if !self.alice_signed("Alice's UpdateAccept", &st, &a.signature) {
                    self.log.violation(format!(
                        "Alice's accept of v{} carries a signature that is not hers on it",
                        st.version
                    ));
                    return;
                }
                self.remember(&msg);
                self.know.lock().unwrap().accepted.push(st.hash());
                self.follow_up(&st, a.signature).await;
            }
            Message::UpdateReject(r) => {
                if r.kind == RejectKind::Conflict {
                    self.counts.add("twin_update_conflict");
                } else {
                    self.counts.add("twin_update_refused");
                }
            }
            other => {
                self.counts.add("twin_update_odd_reply");
                eprintln!("odd reply to the twin's update: {}", other.kind());
            }
        }
    }

    /// After Alice signed the twin's `st`: commit now, later, never, badly,
    /// or abort.
    async fn follow_up(&self, st: &State, alice_sig: Signature) {
        let good = UpdateCommit {
            channel_id: self.id,
            version: st.version,
            index: bi(),
            signatures: vec![alice_sig, self.bob_sig(st)],
        };
        let c = self.r().below(100);
        match c {
            0..=49 => {
                let msg = Message::UpdateCommit(good);
                if let Some(Message::Ack) = self.send("twin_commit_now", &msg).await {
                    self.counts.add("twin_commit_acked");
                    self.remember(&msg);
                }
            }
            50..=64 => {
                self.counts.add("twin_commit_deferred");
                self.know.lock().unwrap().later.push(good);
            }
            65..=74 => self.counts.add("twin_commit_never"),
            75..=79 => {
                // Abort it, or show by Sync that it is not held, and then
                // commit it after all.
                if self.r().chance(50) {
                    self.abort(Some(st.version)).await;
                } else {
                    let latest = self.best_below(st.version);
                    if let Some(latest) = latest {
                        let msg = Message::Sync(SyncMsg {
                            channel_id: self.id,
                            index: bi(),
                            phase: Phase::Active,
                            latest,
                            staged: None,
                        });
                        if let Some(Message::Sync(theirs)) =
                            self.send("twin_sync_gave_up", &msg).await
                        {
                            self.observe_sync("Alice's Sync reply", &theirs);
                        }
                    }
                }
                let msg = Message::UpdateCommit(good);
                if let Some(Message::Ack) = self.send("twin_commit_after_abandon", &msg).await {
                    self.counts.add("twin_commit_acked");
                }
            }
            80..=89 => self.abort(Some(st.version)).await,
            _ => {
                let mut bad = good;
                bad.signatures[bi()] = self.bob_sig(&st.next());
                let msg = Message::UpdateCommit(bad);
                if let Some(Message::Ack) = self.send("twin_commit_bad_sig", &msg).await {
                    self.log.violation(format!(
                        "Alice acked a commit of v{} with a bad signature",
                        st.version
                    ));
                }
            }
        }
    }

    /// A commit for some version: good for a state Alice signed, or bad.
    fn make_commit(&self, below: Option<u64>) -> UpdateCommit {
        let fulls = self.fulls();
        let mut r = self.r().clone();
        let eligible: Vec<_> = fulls
            .iter()
            .filter(|f| below.is_none_or(|b| f.state.version < b))
            .cloned()
            .collect();
        let base = r.pick(&eligible).or_else(|| fulls.last().cloned());
        let (version, mut sigs) = match &base {
            Some(f) => (
                f.state.version,
                f.sigs.iter().map(|s| s.unwrap()).collect::<Vec<_>>(),
            ),
            None => (1, vec![]),
        };
        let mut index = bi();
        let mut version = version;
        match r.below(100) {
            0..=59 => {}
            60..=69 => {
                if let Some(s) = sigs.get_mut(bi()) {
                    *s = LocalAccount::random().sign_hash(B256::ZERO).unwrap();
                }
            }
            70..=74 => {
                sigs.pop();
            }
            75..=79 => index = ai(),
            80..=89 => version = version.saturating_add(r.range(1, 5)),
            _ => {
                // Alice's own proposal, with Bob's signature.
                let p = self.know.lock().unwrap().alice_proposals.last().cloned();
                if let Some(p) = p {
                    version = p.version;
                    sigs = pair(
                        LocalAccount::random().sign_hash(p.hash()).unwrap(),
                        self.bob_sig(&p),
                    );
                }
            }
        }
        *self.r() = r;
        UpdateCommit {
            channel_id: self.id,
            version,
            index,
            signatures: sigs,
        }
    }

    async fn do_commit(&self) {
        let deferred = {
            let mut k = self.know.lock().unwrap();
            if !k.later.is_empty() && self.r().chance(60) {
                let i = self.r().below(k.later.len() as u64) as usize;
                Some(k.later.remove(i))
            } else {
                None
            }
        };
        let (what, c) = match deferred {
            Some(c) => ("twin_commit_deferred_sent", c),
            None => ("twin_commit_random", self.make_commit(None)),
        };
        let msg = Message::UpdateCommit(c);
        if let Some(Message::Ack) = self.send(what, &msg).await {
            self.counts.add("twin_commit_acked");
            self.remember(&msg);
        }
    }

    async fn do_sync(&self, alice: &Channel) {
        let mut s = self.random_sync();
        if self.r().chance(35) {
            // Hand Alice's last proposal back, signed, on her current
            // state: completes it if it is her failed proposal (pending).
            let p = self.know.lock().unwrap().alice_proposals.last().cloned();
            if let Some(p) = p {
                self.counts.add("twin_sync_hands_back_proposal");
                s.latest = alice.state();
                s.phase = Phase::Updating;
                s.staged = Some(SignedState {
                    sigs: pair(None, Some(self.bob_sig(&p))),
                    state: p,
                });
            }
        }
        if self.r().chance(5) {
            s.index = ai();
        }
        if self.r().chance(3) {
            s.channel_id = ChannelId::repeat_byte(3);
        }
        let msg = Message::Sync(s);
        match self.send("twin_sync", &msg).await {
            Some(Message::Sync(theirs)) => {
                self.counts.add("twin_sync_answered");
                self.observe_sync("Alice's Sync reply", &theirs);
                self.remember(&msg);
            }
            Some(other) => {
                self.counts.add("twin_sync_odd_reply");
                eprintln!("odd reply to the twin's sync: {}", other.kind());
            }
            None => {}
        }
    }

    async fn abort(&self, version: Option<u64>) {
        let mut r = self.r().clone();
        let staged = {
            let k = self.know.lock().unwrap();
            k.accepted
                .last()
                .and_then(|h| k.states.get(h))
                .map(|s| s.version)
        };
        let cur = self.fulls().last().map_or(0, |f| f.state.version);
        let version = version.unwrap_or_else(|| match r.below(5) {
            0 => staged.unwrap_or(cur + 1),
            1 => cur + 1,
            2 => u64::MAX - r.below(5),
            3 => cur + STEP + r.below(3),
            _ => r.below(cur + 3),
        });
        let index = if r.chance(90) { bi() } else { ai() };
        *self.r() = r;
        let msg = Message::UpdateReject(UpdateReject {
            channel_id: self.id,
            version,
            index,
            reason: "aborted".into(),
            kind: RejectKind::Refused,
        });
        if let Some(Message::Ack) = self.send("twin_abort", &msg).await {
            self.remember(&msg);
        }
    }

    async fn replay(&self) {
        let m = {
            let k = self.know.lock().unwrap();
            let mut r = self.r();
            r.pick(&k.sent)
        };
        if let Some(m) = m {
            match self.send("twin_replay", &m).await {
                Some(Message::UpdateAccept(a)) => {
                    self.counts.add("twin_replay_signed_again");
                    let st = match &m {
                        Message::Update(u) => Some(u.state.clone()),
                        Message::UpdateWithCommit(x) => Some(x.update.state.clone()),
                        _ => None,
                    };
                    if let Some(st) = st
                        && !self.alice_signed("Alice's accept of a replay", &st, &a.signature)
                    {
                        self.log.violation(format!(
                            "Alice's accept of a replayed v{} is not her signature on it",
                            st.version
                        ));
                    }
                }
                Some(Message::Sync(theirs)) => self.observe_sync("replay", &theirs),
                _ => {}
            }
        }
    }

    /// One twin action, `c` in 0..100 picking which.
    async fn act(&self, alice: &Channel, c: u64) {
        match c {
            0..=37 => self.do_update(alice).await,
            38..=52 => self.do_commit().await,
            53..=70 => self.do_sync(alice).await,
            71..=81 => self.abort(None).await,
            82..=93 => self.replay().await,
            _ => self.junk(alice).await,
        }
    }

    /// Proposals, `Signing0`s, opening aborts and messages that are no requests.
    async fn junk(&self, alice: &Channel) {
        let c = self.r().below(5);
        let msg = match c {
            0 => Message::Ack,
            1 => Message::UpdateAccept(UpdateAccept {
                channel_id: self.id,
                version: alice.state().state.version + 1,
                index: bi(),
                signature: self.bob_sig(&alice.state().state),
            }),
            2 => Message::Signing0(perun::wire::Signing0 {
                proposal_id: B256::repeat_byte(self.r().below(256) as u8),
                nonce_shares: vec![B256::ZERO, B256::ZERO],
                signature: self.bob_sig(&alice.state().state),
            }),
            3 => Message::ProposalReject(perun::wire::ProposalReject {
                proposal_id: B256::repeat_byte(self.r().below(256) as u8),
                index: bi(),
                reason: "no".into(),
            }),
            _ => {
                let p = alice.params();
                let peers = alice.peers();
                Message::Proposal(perun::wire::Proposal {
                    proposal_id: B256::repeat_byte(self.r().below(256) as u8),
                    challenge_duration: CHALLENGE,
                    domain: p.domain(),
                    participants: vec![
                        perun::wire::Participant {
                            address: p.participants[bi()],
                            peer: peers[bi()],
                        },
                        perun::wire::Participant {
                            address: p.participants[ai()],
                            peer: peers[ai()],
                        },
                    ],
                    proposer: 0,
                    allocation: alice.state().state.outcome.clone(),
                    app: Address::ZERO,
                    app_data: Default::default(),
                    nonce_share: B256::repeat_byte(1),
                })
            }
        };
        let reply = self.send("twin_junk", &msg).await;
        if let Some(Message::ProposalAccept(_)) = reply {
            self.log
                .violation("Alice accepted a proposal her handler rejects".into());
        }
    }
}

// ---------------------------------------------------------------- one seed

fn check_current(alice: &Channel, log: &AliceLog, when: &str) {
    let cur = alice.state();
    if cur.sigs.iter().any(Option::is_none) {
        log.violation(format!(
            "inv3: Alice's current v{} is not fully signed ({when})",
            cur.state.version
        ));
    } else if let Err(e) = cur.verify_all(alice.params()) {
        log.violation(format!(
            "inv3: Alice's current v{} has a bad signature ({when}): {e}",
            cur.state.version
        ));
    }
}

/// A short name of an error's kind, for the counts.
fn err_kind(e: &perun::client::Error) -> String {
    let d = format!("{e:?}");
    let end = d.find(|c: char| !c.is_alphanumeric()).unwrap_or(d.len());
    let head = &d[..end];
    if head == "Channel" || head == "Wire" {
        let rest = &d[end + 1..];
        let end2 = rest
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(rest.len());
        format!("{head}::{}", &rest[..end2])
    } else {
        head.to_string()
    }
}

fn alice_balance(st: &SignedState) -> i128 {
    to_i128(st.state.outcome.balances[0][ai()])
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Alice's index in the channel this seed (the twin has the other one).
static ALICE: AtomicUsize = AtomicUsize::new(0);

fn ai() -> usize {
    ALICE.load(Ordering::SeqCst)
}

fn bi() -> usize {
    1 - ai()
}

/// `[alice, bob]` in channel index order.
fn pair<T>(alice: T, bob: T) -> Vec<T> {
    if ai() == 0 {
        vec![alice, bob]
    } else {
        vec![bob, alice]
    }
}

// ---------------------------------------------------------------- deep paths reached

/// Log lines of the SDK that show a deep path was taken (`debug!`/`info!`/
/// `warn!` messages of perun-client), counted from the formatted log.
/// Rate-limited warnings (`warn_limited!`) count at most once a second.
const NEEDLES: &[(&str, &str)] = &[
    (
        "completed a half-done update from sync",
        "sdk_completed_pending_from_sync",
    ),
    ("adopted a state from sync", "sdk_adopted_from_sync"),
    (
        "an update we had given up on was completed",
        "sdk_abandoned_then_committed",
    ),
    (
        "the proposer no longer holds our staged update",
        "sdk_dropped_staged_by_sync",
    ),
    ("the staged update was superseded", "sdk_staged_superseded"),
    ("the proposer aborted its update", "sdk_staged_aborted"),
    (
        "the peer does not hold our failed proposal",
        "sdk_pending_forgotten",
    ),
    (
        "a newer state was adopted under a staged update",
        "sdk_staged_dropped_under_adopt",
    ),
    (
        "waiting for the proposer's previous commit",
        "sdk_waited_for_commit",
    ),
    (
        "no commit from the proposer; asking it by Sync",
        "sdk_sweep_asked_sync",
    ),
    ("peer signed badly", "sdk_peer_signed_badly"),
    ("invalid update", "sdk_invalid_update"),
    ("sync carried an invalid state", "sdk_sync_invalid_state"),
    ("not an update of ours", "sdk_sync_staged_not_ours"),
    (
        "bad commit for an abandoned update",
        "sdk_bad_commit_abandoned",
    ),
    ("bad signature in commit", "sdk_bad_sig_in_commit"),
    ("update committed", "sdk_own_update_committed"),
    ("the peer's lower index wins", "sdk_lower_index_won"),
    (
        "peers did not sign the final state; closing on-chain",
        "sdk_settle_refused_onchain",
    ),
    (
        "peers are silent; closing on-chain",
        "sdk_settle_silent_onchain",
    ),
    ("too late to refute", "sdk_too_late_to_refute"),
    ("could not persist our signature", "sdk_persist_failed"),
    ("unexpected reply to an update", "sdk_unexpected_reply"),
];

static SDK_LINES: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

struct CountingWriter;

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        for (needle, key) in NEEDLES {
            if line.contains(needle) {
                *SDK_LINES.lock().unwrap().entry(key).or_default() += 1;
            }
        }
        if std::env::var_os("FUZZ_LOG").is_some() {
            eprint!("{line}");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn count_sdk_lines() {
    if std::env::var_os("RUST_LOG").is_some() {
        return; // common::init_logs prints them instead
    }
    let filter = std::env::var("FUZZ_LOG")
        .unwrap_or_else(|_| "perun_client=debug,perun_channel=debug".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(|| CountingWriter)
        .try_init();
}

fn sdk_lines() -> BTreeMap<&'static str, u64> {
    SDK_LINES.lock().unwrap().clone()
}

/// Restarts Alice (`ps[0]`) on her store and introduces her and the twin
/// to each other again.
async fn restart_alice(ledger: &Ledger, ps: &mut Vec<common::Party>, opts: &Options, twin: &Twin) {
    let who = ps.remove(0);
    ps.insert(0, common::restart_opts(ledger, who, opts).await);
    for addr in ps[0].client.listen_addrs().await.unwrap() {
        twin.evil.add_address(twin.alice_peer, addr).await.unwrap();
    }
    for addr in twin.evil.listen_addrs().await.unwrap() {
        ps[0]
            .client
            .add_peer(twin.evil.local_peer_id(), addr)
            .await
            .unwrap();
    }
}

async fn run_seed(seed: u64, n: usize, anvil: bool) -> (Vec<String>, String, Vec<String>) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    // Alice's index: as responder (1) the twin wins every same-version race.
    ALICE.store(rng.below(2) as usize, Ordering::SeqCst);
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel(1);
    let accept_first = Arc::new(AcceptFirst {
        open: (ai() == 1).into(),
        opened: opened_tx,
    });
    let ledger = if anvil {
        Ledger::anvil().await
    } else {
        Ledger::sim().await
    };
    let counts = Arc::new(Counts::default());
    let sign_log = SignLog::new();
    let account = ledger.account(u(MINT)).await;
    let log = AliceLog::new(account.address(), counts.clone());
    let alice_opts = Options {
        update_handler: Some(Arc::new(Policy {
            counts: counts.clone(),
        })),
        proposal_handler: Some(accept_first.clone()),
        timeouts: Some(timeouts()),
        wrap_persister: Some(Box::new({
            let (sign_log, log) = (sign_log.clone(), log.clone());
            move |inner| {
                Arc::new(Logged {
                    inner: sign_log.wrap(inner),
                    log: log.clone(),
                }) as Arc<dyn Persister>
            }
        })),
        ..Options::default()
    };
    let bob_opts = Options {
        timeouts: Some(timeouts()),
        ..Options::default()
    };
    let alice_party = common::party_with_account(&ledger, account, &alice_opts).await;
    let bob_party = common::party(&ledger, u(MINT), &bob_opts).await;
    let mut ps = vec![alice_party, bob_party];
    common::introduce(&ps).await;
    // `ps` is [Alice, Bob]; `chans` in channel index order.
    let chans = if ai() == 0 {
        common::open(&ledger, &mut ps, u(EACH)).await
    } else {
        let prop = common::proposal(&ledger, &[&ps[1], &ps[0]], u(EACH));
        let bob = ps[1].client.clone();
        let opening = tokio::spawn(async move { bob.propose_channel(prop).await });
        let alice_ch = tokio::time::timeout(Duration::from_secs(60), opened_rx.recv())
            .await
            .expect("Alice accepts within 60 s")
            .expect("handler alive");
        let bob_ch = opening.await.unwrap().expect("proposal succeeds");
        vec![bob_ch, alice_ch]
    };
    let alice = chans[ai()].clone();
    // A few honest payments first, so versions and balances move.
    for _ in 0..rng.below(3) {
        let from = rng.below(2) as usize;
        chans[from]
            .pay(1 - from, 0, u(rng.range(1, 100)))
            .await
            .unwrap();
        common::caught_up(&chans).await;
    }
    let (evil, evil_in, key) = common::evil_twin(&ps, 1, 0).await;
    let initial = alice.state();
    *log.bound.lock().unwrap() = alice_balance(&initial);
    log.armed.store(true, Ordering::SeqCst);
    let twin = Arc::new(Twin {
        id: alice.id(),
        params: alice.params().clone(),
        key,
        alice_addr: ps[0].client.address(),
        alice_peer: ps[0].client.peer_id(),
        evil,
        know: Mutex::default(),
        log: log.clone(),
        counts: counts.clone(),
        mode: AtomicU8::new(FUZZ),
        rng: Mutex::new(Rng(rng.next())),
        alice: Mutex::new(Some(alice.clone())),
    });
    // The twin knows everything so far, fully signed (Bob signed it all).
    {
        let mut k = twin.know.lock().unwrap();
        let h = k.see(&initial.state);
        k.alice_sigs.insert(h, initial.sigs[ai()].unwrap());
    }
    let serving = tokio::spawn(twin.clone().serve(evil_in));

    let pays_started = Arc::new(AtomicU64::new(0));
    let mut pays: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut twins: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // On anvil a restart reopens the redb file unwrapped (common::restart_opts),
    // which would blind the logs: no restarts there.
    let restarts = !anvil && std::env::var("FUZZ_RESTARTS").map_or(true, |v| v != "0");
    let mut alice = alice;
    let bob_adj_mid = ledger.backends(&ps[1].account).await.1;
    for step in 0..n {
        pays.retain(|p| !p.is_finished());
        let c = rng.below(100);
        match c {
            // Alice pays (spawned, with a timeout).
            0..=21 if pays.len() < 3 => {
                let amount = match rng.below(10) {
                    0 => u(0),
                    1 => u(EACH * 10), // more than she has: refused at home
                    _ => u(rng.range(1, 60)),
                };
                let bal = alice.state().state.outcome.balances[0][ai()];
                if amount <= bal {
                    // Counted before it can be signed: the bound never lags.
                    let a = amount.to::<u64>();
                    pays_started.fetch_add(a, Ordering::SeqCst);
                    if !selftest("bound") {
                        *log.bound.lock().unwrap() -= i128::from(a);
                    }
                }
                counts.add("alice_pay_started");
                let (ch, counts) = (alice.clone(), counts.clone());
                let kind = rng.below(10);
                let (a, b) = (ai(), bi());
                pays.push(tokio::spawn(async move {
                    let res = tokio::time::timeout(Duration::from_secs(6), async {
                        if kind == 0 {
                            // Alice takes from Bob: the twin may sign it.
                            ch.try_update(move |s| {
                                let row = &mut s.outcome.balances[0];
                                let x = amount.min(row[b]);
                                row[b] -= x;
                                row[a] += x;
                                Ok(())
                            })
                            .await
                        } else {
                            ch.pay(b, 0, amount).await
                        }
                    })
                    .await;
                    match res {
                        Ok(Ok(_)) => counts.add("alice_pay_committed"),
                        Ok(Err(e)) => {
                            counts.add("alice_pay_failed");
                            counts.add(&format!("alice_pay_err[{}]", err_kind(&e)));
                        }
                        Err(_) => counts.add("alice_pay_timed_out"),
                    }
                }));
            }
            0..=21 => counts.add("alice_pay_skipped_busy"),
            // Alice restarts on her store (in-flight payments and all).
            22..=23 if restarts => {
                counts.add("alice_restart");
                restart_alice(&ledger, &mut ps, &alice_opts, &twin).await;
                alice = ps[0].client.channel(&twin.id).expect("restored channel");
                *twin.alice.lock().unwrap() = Some(alice.clone());
            }
            // Rarely, the twin registers a state it holds mid-schedule (and
            // goes on): Alice's watcher answers while updates are in flight.
            24 if rng.chance(40) => {
                let fulls = twin.fulls();
                if let Some(pick) = rng.pick(&fulls) {
                    let req = SignedChannel {
                        params: twin.params.clone(),
                        state: pick,
                    };
                    if bob_adj_mid.register(&req).await.is_ok() {
                        counts.add("twin_registered_mid_schedule");
                    }
                }
            }
            22..=88 => {
                // The twin acts; now and then without waiting for the
                // answer, so its messages race each other and Alice's.
                twins.retain(|t| !t.is_finished());
                let c = rng.below(100);
                if twins.len() < 3 && rng.chance(25) {
                    counts.add("twin_action_concurrent");
                    let (twin, alice) = (twin.clone(), alice.clone());
                    twins.push(tokio::spawn(async move { twin.act(&alice, c).await }));
                } else {
                    twin.act(&alice, c).await;
                }
            }
            _ => {
                counts.add("pause");
                tokio::time::sleep(Duration::from_millis(rng.range(0, 400))).await;
            }
        }
        if rng.chance(30) {
            tokio::time::sleep(Duration::from_millis(rng.range(0, 30))).await;
        }
        check_current(&alice, &log, &format!("step {step}"));
    }
    for p in pays.drain(..).chain(twins.drain(..)) {
        if tokio::time::timeout(Duration::from_secs(20), p)
            .await
            .is_err()
        {
            log.violation("inv4: a payment or twin action did not end within 20 s".into());
        }
    }
    check_current(&alice, &log, "after the schedule");

    // ------------------------------------------------ closing
    let ending = rng.below(5);
    let (_, adj) = ledger.backends(&ps[0].account).await;
    let ending_name = match ending {
        0 => "honest",
        1 => "silent",
        2 => "registers",
        3 => "concludes",
        _ => "fuzzy",
    };
    twin.mode.store(
        match ending {
            0 => HONEST,
            4 => FUZZ,
            _ => SILENT,
        },
        Ordering::SeqCst,
    );
    // Let Alice's in-flight business end (sweeps, resyncs) before closing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if ending == 0 {
        // Liveness: with the twin honest again, Alice can still pay (unless
        // the channel is closing, she signed a final state, or the twin
        // left no version to propose: DESIGN §8, known and left).
        let mut ok = false;
        let mut last = String::new();
        pays_started.fetch_add(1, Ordering::SeqCst);
        *log.bound.lock().unwrap() -= 1;
        for _ in 0..10 {
            match tokio::time::timeout(Duration::from_secs(8), alice.pay(bi(), 0, u(1))).await {
                Ok(Ok(_)) => {
                    ok = true;
                    counts.add("final_pay_ok");
                    break;
                }
                Ok(Err(e)) => {
                    last = err_kind(&e);
                    if matches!(
                        e,
                        perun::client::Error::Channel(
                            perun::channel::Error::SignedFinal { .. }
                                | perun::channel::Error::WrongPhase { .. }
                                | perun::channel::Error::Version { .. }
                        ) | perun::client::Error::Phase(_)
                    ) || alice.state().state.outcome.balances[0][ai()].is_zero()
                    {
                        ok = true;
                        counts.add(&format!("final_pay_excused[{last}]"));
                        break;
                    }
                }
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if !ok {
            log.violation(format!(
                "inv4: with the twin honest, Alice cannot pay any more (last: {last}; phase {:?}, v{})",
                alice.phase(),
                alice.state().state.version
            ));
        }
    }
    let mut registered: Option<SignedState> = None;
    if ending == 2 || ending == 3 {
        let fulls = twin.fulls();
        let pick = match (ending, rng.below(3)) {
            // A final state Alice signed: concluded at once.
            (3, _) => fulls.iter().rev().find(|f| f.state.isFinal).cloned(),
            (_, 0) => fulls
                .iter()
                .min_by_key(|f| (alice_balance(f), f.state.version))
                .cloned(),
            (_, 1) => fulls.last().cloned(),
            _ => rng.pick(&fulls),
        }
        .or_else(|| fulls.last().cloned());
        if let Some(pick) = pick {
            let (_, bob_adj) = ledger.backends(&ps[1].account).await;
            let req = SignedChannel {
                params: twin.params.clone(),
                state: pick.clone(),
            };
            let res = if pick.state.isFinal {
                bob_adj.conclude(&req).await
            } else {
                bob_adj.register(&req).await
            };
            match res {
                Ok(()) => {
                    counts.add(if pick.state.isFinal {
                        "twin_concluded_final"
                    } else {
                        "twin_registered"
                    });
                    registered = Some(pick);
                    // And goes on fuzzing off-chain for a while.
                    twin.mode.store(FUZZ, Ordering::SeqCst);
                    for _ in 0..8 {
                        let c = rng.below(100);
                        twin.act(&alice, c).await;
                    }
                    twin.mode.store(SILENT, Ordering::SeqCst);
                }
                Err(e) => eprintln!("seed {seed}: the twin's registration failed: {e}"),
            }
        }
    }
    let before_close = alice.state();
    check_current(&alice, &log, "before closing");
    let settling = tokio::spawn({
        let alice = alice.clone();
        async move { alice.settle().await }
    });
    // "fuzzy": the twin goes on fuzzing (and may register) while Alice settles.
    let bob_adj = ledger.backends(&ps[1].account).await.1;
    let fuzzing = (ending == 4).then(|| {
        let (twin, alice) = (twin.clone(), alice.clone());
        let mut r = Rng(rng.next());
        let counts = counts.clone();
        tokio::spawn(async move {
            loop {
                if r.chance(4) {
                    let fulls = twin.fulls();
                    if let Some(pick) = r.pick(&fulls) {
                        let req = SignedChannel {
                            params: twin.params.clone(),
                            state: pick,
                        };
                        if bob_adj.register(&req).await.is_ok() {
                            counts.add("twin_registered_while_settling");
                        }
                    }
                }
                let c = r.below(100);
                twin.act(&alice, c).await;
                tokio::time::sleep(Duration::from_millis(r.range(0, 200))).await;
            }
        })
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut settled = None;
    let mut advanced = 0;
    let mut settling = settling;
    // In "fuzzy", Alice may restart while she settles (and settles again).
    let mut restart_at = (ending == 4 && restarts && rng.chance(40))
        .then(|| tokio::time::Instant::now() + Duration::from_millis(rng.range(100, 3000)));
    while tokio::time::Instant::now() < deadline {
        if restart_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            restart_at = None;
            counts.add("alice_restart_while_settling");
            restart_alice(&ledger, &mut ps, &alice_opts, &twin).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), settling).await;
            let Some(back) = ps[0].client.channel(&twin.id) else {
                // Withdrawn before the restart: nothing left to restore.
                counts.add("alice_restart_after_withdrawn");
                settled = Some(Ok(Ok(())));
                break;
            };
            alice = back;
            *twin.alice.lock().unwrap() = Some(alice.clone());
            settling = tokio::spawn({
                let alice = alice.clone();
                async move { alice.settle().await }
            });
        }
        if settling.is_finished() {
            settled = Some(settling.await);
            break;
        }
        // Advance the clock only once the chain holds Alice's latest (or
        // newer): before that, the clock would outrun her refutation.
        let latest = alice.state().state.version;
        if let Ok(Some(d)) = adj.dispute(alice.id()).await
            && !d.concluded
            && d.version >= latest
        {
            ledger.advance(CHALLENGE + 1).await;
            advanced += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(f) = fuzzing {
        f.abort();
    }
    let mut violations: Vec<String> = Vec::new();
    match settled {
        None => violations.push(format!(
            "inv4: Alice's settle did not finish within 90 s (ending {ending_name}; phase {:?}, v{})",
            alice.phase(),
            alice.state().state.version
        )),
        Some(Err(e)) => violations.push(format!("inv4: settle task panicked: {e}")),
        Some(Ok(Err(e))) => {
            // Stalled: the watcher goes on; wait for the phase.
            eprintln!("seed {seed}: settle returned {e}; waiting for Withdrawn");
            if alice
                .wait_for_phase(Phase::Withdrawn, Duration::from_secs(30))
                .await
                .is_err()
            {
                violations.push(format!("inv4: settle failed ({e}) and Alice never withdrew"));
            }
        }
        Some(Ok(Ok(()))) => {}
    }
    let payout = to_i128(ledger.balance(ps[0].client.address()).await) - i128::from(MINT - EACH);
    let bound = log.bound();
    if payout < bound {
        violations.push(format!(
            "inv4: Alice withdrew {payout}, below the bound {bound} (ending {ending_name}, registered {:?})",
            registered.as_ref().map(|r| r.state.version)
        ));
    }
    let from = alice_balance(&before_close);
    if payout < from {
        violations.push(format!(
            "inv4: Alice withdrew {payout}, below her balance {from} in v{} she closed from (ending {ending_name}, registered {:?})",
            before_close.state.version,
            registered.as_ref().map(|r| (r.state.version, alice_balance(r)))
        ));
    }
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sign_log.assert_no_double_sign();
    })) {
        violations.push(format!("inv1 (SignLog): {e:?}"));
    }
    let mut all = log.violations.lock().unwrap().clone();
    all.extend(violations);
    let violations = all;
    let summary = format!(
        "seed {seed}: alice=#{} ending={ending_name} advanced={advanced} v{}→v{} alice {}→{} payout={payout} bound={bound} pays_started={} | {}",
        ai(),
        initial.state.version,
        alice.state().state.version,
        alice_balance(&initial),
        alice_balance(&alice.state()),
        pays_started.load(Ordering::SeqCst),
        counts.dump()
    );
    serving.abort();
    twin.know.lock().unwrap().held.clear();
    for p in &ps {
        p.client.shutdown().await;
    }
    let counts = counts.dump().split(' ').map(str::to_string).collect();
    (violations, summary, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_peer_fuzz() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    count_sdk_lines();
    let n = steps();
    let mut failed = Vec::new();
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let ledgers: Vec<bool> = match std::env::var("FUZZ_LEDGER").as_deref() {
        Ok("anvil") => vec![true],
        Ok("both") => vec![false, true],
        _ => vec![false],
    };
    for (seed, anvil) in seeds()
        .into_iter()
        .flat_map(|s| ledgers.iter().map(move |a| (s, *a)))
    {
        let panics_before = PANICS.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        let lines_before = sdk_lines();
        let (violations, summary, counts) = run_seed(seed, n, anvil).await;
        let summary = format!("[{}] {summary}", if anvil { "anvil" } else { "sim" });
        let deep: Vec<String> = sdk_lines()
            .into_iter()
            .filter_map(|(k, v)| {
                let d = v - lines_before.get(k).copied().unwrap_or(0);
                (d > 0).then(|| format!("{k}={d}"))
            })
            .collect();
        for kv in counts.iter().chain(&deep) {
            if let Some((k, v)) = kv.split_once('=') {
                *total.entry(k.to_string()).or_default() += v.parse::<u64>().unwrap_or(0);
            }
        }
        println!(
            "{summary} | {} ({:.1} s)",
            deep.join(" "),
            started.elapsed().as_secs_f64()
        );
        let panics = PANICS.load(Ordering::SeqCst) - panics_before;
        if panics > 0 {
            println!("seed {seed}: {panics} panic(s) in the process (see above)");
            failed.push(format!("seed {seed}: {panics} panic(s)"));
        }
        for v in violations {
            println!("seed {seed}: VIOLATION {v}");
            failed.push(format!("seed {seed}: {v}"));
        }
    }
    println!(
        "TOTAL over {} seed(s): {}",
        seeds().len(),
        total
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(
        failed.is_empty(),
        "{} violation(s):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
