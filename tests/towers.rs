//! The client side of the watchtowers (issue 14, point 5), against real
//! towers served in-process on 127.0.0.1 with their redb stores, and
//! channels on the simulated ledger: receipts for the latest state under
//! both policies, `tower_status`, a down tower that catches up, a tower
//! whose receipts are signed by the wrong key, and receipts and the
//! appointment counter across a client restart (redb).

#![allow(clippy::unwrap_used)] // Tests may panic on failure.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Ledger, Options, Party, introduce, open, party, restart_opts};
use perun::channel::{Address, U256};
use perun::client::{AppointmentPolicy, Channel, ChannelEvent, Error, TowerConfig, TowerStatus};
use perun::persistence::TowerRecord;
use perun::wallet::{Account, LocalAccount, signature_bytes};
use perun::watchtower::api::{self, Config, Tower};
use perun::watchtower::scheme::{ChannelSecret, open as open_blob};
use perun::watchtower::store::Store;
use perun::watchtower::{Receipt, messages};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// A tower served in-process until dropped.
struct TowerProc {
    addr: SocketAddr,
    tower: Arc<Tower>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for TowerProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve_tower(listener: TcpListener, key: &LocalAccount) -> TowerProc {
    serve_tower_with(listener, key, Config::default()).await
}

async fn serve_tower_with(listener: TcpListener, key: &LocalAccount, config: Config) -> TowerProc {
    serve_tower_at(listener, key, config, api::system_clock()).await
}

/// A tower with `config` whose clock is `clock`.
async fn serve_tower_at(
    listener: TcpListener,
    key: &LocalAccount,
    config: Config,
    clock: api::Clock,
) -> TowerProc {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("tower.redb")).unwrap();
    let account = LocalAccount::from_bytes(&key.secret_bytes()).unwrap();
    let tower = Arc::new(Tower::new(store, Arc::new(account), config, clock).unwrap());
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(listener, tower.clone(), async {
        let _ = stopped.await;
    }));
    TowerProc {
        addr,
        tower,
        stop: Some(stop),
        _dir: dir,
    }
}

async fn start_tower(key: &LocalAccount) -> TowerProc {
    serve_tower(TcpListener::bind("127.0.0.1:0").await.unwrap(), key).await
}

fn config(addr: SocketAddr, key: &LocalAccount) -> TowerConfig {
    TowerConfig::new(format!("http://{addr}"), key.address())
}

/// Alice (with `opts`, towers and all) and Bob (no towers) with a channel.
async fn alice_and_bob(ledger: &Ledger, opts: &Options) -> (Vec<Party>, Vec<Channel>) {
    let alice = party(ledger, u(1_000_000), opts).await;
    let bob = party(ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let chans = open(ledger, &mut ps, u(1000)).await;
    (ps, chans)
}

/// Alice (with `tower` alone, on redb if asked) and Bob with a channel,
/// once Alice's first payment is covered by the tower.
async fn covered_by(
    ledger: &Ledger,
    tower: &TowerProc,
    key: &LocalAccount,
    redb: bool,
) -> (Options, Vec<Party>, Vec<Channel>) {
    let opts = Options {
        towers: vec![config(tower.addr, key)],
        redb,
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(ledger, &opts).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "first receipt", all_latest).await;
    (opts, ps, chans)
}

/// Polls until `pred` holds for the channel's tower status.
async fn wait_status(ch: &Channel, what: &str, pred: impl Fn(&[TowerStatus]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = ch.tower_status();
        if pred(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_latest(s: &[TowerStatus]) -> bool {
    !s.is_empty() && s.iter().all(|t| t.latest)
}

/// The stored receipt verifies, and the tower's stored blob opens (with the
/// channel's secret, as on a dispute) to the channel's latest state; the
/// tower knows the channel's own identity, never `account`.
fn check_covered(ch: &Channel, account: Address, status: &TowerStatus, tower: &Tower) {
    let user = status.user.expect("the channel's tower identity");
    assert_ne!(user, account, "the tower never sees the client's account");
    let r = status.receipt.clone().expect("a receipt");
    assert_eq!(r.tower, tower.address());
    Receipt {
        tower: r.tower,
        locator: r.locator,
        start_block: r.start_block,
        user_signature: r.user_signature.clone(),
        tower_signature: r.tower_signature.clone(),
    }
    .verify()
    .expect("receipt signed by the tower");
    let secret = ChannelSecret::of(ch.params());
    assert_eq!(r.locator, secret.locator());
    let stored = tower
        .store()
        .appointment(user, r.locator)
        .unwrap()
        .expect("the tower holds the appointment");
    assert_eq!(stored.seq, r.seq);
    let (_, state) = open_blob(&secret, &stored.blob).expect("blob opens");
    assert_eq!(state, ch.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_update_reaches_the_tower() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let opts = Options {
        towers: vec![config(tower.addr, &key)],
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(&ledger, &opts).await;
    let mut events = chans[0].events();
    for _ in 0..5 {
        chans[0].pay(1, 0, u(10)).await.unwrap();
    }
    wait_status(&chans[0], "receipt for the latest state", all_latest).await;
    let status = chans[0].tower_status();
    assert_eq!(status[0].version, Some(chans[0].state().state.version));
    check_covered(&chans[0], ps[0].client.address(), &status[0], &tower.tower);
    // Bob configured no tower.
    assert!(chans[1].tower_status().is_empty());
    // Receipts were announced.
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.next().await {
            if let ChannelEvent::TowerReceipt { tower, .. } = ev {
                return tower;
            }
        }
        panic!("events ended");
    })
    .await
    .unwrap();
    assert_eq!(got, key.address());
    // The channel's identity is registered; its appointment is watched.
    let rec = ps[0].persister.load(chans[0].id()).await.unwrap().unwrap();
    let identity = TowerRecord::decode(chans[0].id(), &rec.metadata)
        .unwrap()
        .identity
        .expect("the channel's tower identity is stored");
    let identity = LocalAccount::from_bytes(&identity).unwrap();
    assert_eq!(Some(identity.address()), status[0].user);
    let client =
        perun::watchtower::TowerClient::new(&format!("http://{}", tower.addr), key.address())
            .unwrap();
    let st = client
        .get_appointment(&identity, status[0].receipt.as_ref().unwrap().locator)
        .await
        .unwrap();
    assert_eq!(st, perun::watchtower::json::AppointmentStatus::BeingWatched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_policy_holds_back_and_flushes_at_shutdown() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let opts = Options {
        towers: vec![config(tower.addr, &key)],
        policy: AppointmentPolicy::AtMost(Duration::from_secs(3600)),
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(&ledger, &opts).await;
    // Version 0 needs no tower; the first update's appointment goes at once
    // (nothing was sent yet).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        chans[0].tower_status()[0].version,
        None,
        "no appointment for version 0"
    );
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "first receipt", |s| s[0].version.is_some()).await;
    let first = chans[0].tower_status()[0].version;
    for _ in 0..3 {
        chans[0].pay(1, 0, u(10)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = chans[0].tower_status();
    assert_eq!(s[0].version, first, "held back within the period");
    assert!(!s[0].latest);
    let latest = chans[0].state();
    // Shutdown sends the latest state first.
    ps[0].client.shutdown().await;
    let s = chans[0].tower_status();
    assert!(s[0].latest, "flushed at shutdown: {s:?}");
    check_covered(&chans[0], ps[0].client.address(), &s[0], &tower.tower);
    // And it is in the store, for the next start.
    let rec = ps[0].persister.load(chans[0].id()).await.unwrap().unwrap();
    let towers = TowerRecord::decode(chans[0].id(), &rec.metadata).unwrap();
    assert_eq!(
        towers.receipt(key.address()).map(|r| r.version),
        Some(latest.state.version)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_tower_is_reported_and_catches_up() {
    let ledger = Ledger::sim().await;
    let (up_key, down_key) = (LocalAccount::random(), LocalAccount::random());
    let up = start_tower(&up_key).await;
    // A port nobody listens on yet.
    let down_addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = Options {
        towers: vec![config(up.addr, &up_key), config(down_addr, &down_key)],
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(&ledger, &opts).await;
    let mut events = chans[0].events();
    // Updates do not wait for the down tower.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), chans[0].pay(1, 0, u(10)))
            .await
            .expect("an update is not slowed by a down tower")
            .unwrap();
    }
    let failed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.next().await {
            if let ChannelEvent::TowerFailed { tower, error, .. } = ev {
                return (tower, error);
            }
        }
        panic!("events ended");
    })
    .await
    .unwrap();
    assert_eq!(failed.0, down_key.address());
    assert!(
        matches!(&*failed.1, Error::Tower { tower, .. } if *tower == down_key.address()),
        "{:?}",
        failed.1
    );
    // The other tower covers the channel meanwhile.
    wait_status(&chans[0], "the up tower covers", |s| {
        s[0].latest && s[1].version.is_none()
    })
    .await;
    check_covered(
        &chans[0],
        ps[0].client.address(),
        &chans[0].tower_status()[0],
        &up.tower,
    );

    // The down tower starts: the retry brings it the latest state.
    let down = serve_tower(TcpListener::bind(down_addr).await.unwrap(), &down_key).await;
    wait_status(&chans[0], "the late tower caught up", all_latest).await;
    check_covered(
        &chans[0],
        ps[0].client.address(),
        &chans[0].tower_status()[1],
        &down.tower,
    );
}

/// A fake tower on 127.0.0.1: `answer(head, body)` makes the JSON answer
/// of each request (head lower-cased), sent with status 200.
async fn fake_tower(
    answer: impl Fn(&str, &serde_json::Value) -> serde_json::Value + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read the head and a Content-Length body.
                let (head, body) = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let n = s.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let body = answer(&head, &req).to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

fn hex(b: &[u8]) -> String {
    format!("0x{}", ::hex::encode(b))
}

/// A subscription answer signed by `key`.
fn subscription_answer(
    key: &LocalAccount,
    user: Address,
    sub: perun::watchtower::Subscription,
) -> serde_json::Value {
    let sig = key
        .sign_hash(messages::subscription_hash(user, &sub))
        .unwrap();
    serde_json::json!({ "user": user, "slots_total": sub.slots_total, "slots_used": sub.slots_used,
        "expiry": sub.expiry, "tower_signature": hex(&signature_bytes(&sig)) })
}

/// A receipt answer for an appointment request, signed by `signer`.
fn receipt_answer(
    tower: Address,
    signer: &LocalAccount,
    req: &serde_json::Value,
) -> serde_json::Value {
    let locator: perun::channel::B256 = req["locator"].as_str().unwrap().parse().unwrap();
    let user_sig =
        ::hex::decode(req["signature"].as_str().unwrap().trim_start_matches("0x")).unwrap();
    let sig = signer
        .sign_hash(messages::receipt_hash(tower, &locator, 1, &user_sig))
        .unwrap();
    serde_json::json!({ "locator": locator, "start_block": 1,
        "user_signature": hex(&user_sig), "tower_signature": hex(&signature_bytes(&sig)) })
}

/// A fake tower that signs subscriptions with its real key but receipts
/// with another one.
async fn impostor(key: LocalAccount) -> SocketAddr {
    let other = LocalAccount::random();
    fake_tower(move |head, req| {
        if head.starts_with("post /register") {
            let user: Address = req["user"].as_str().unwrap().parse().unwrap();
            let sub = perun::watchtower::Subscription {
                slots_total: 10,
                slots_used: 0,
                expiry: u64::MAX / 2,
            };
            subscription_answer(&key, user, sub)
        } else {
            // Signed by the wrong key.
            receipt_answer(key.address(), &other, req)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_signed_by_the_wrong_key_is_refused() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let fake = impostor(LocalAccount::from_bytes(&key.secret_bytes()).unwrap()).await;
    let opts = Options {
        towers: vec![config(fake, &key)],
        ..Options::default()
    };
    let (_ps, chans) = alice_and_bob(&ledger, &opts).await;
    let mut events = chans[0].events();
    chans[0].pay(1, 0, u(10)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.next().await {
            if let ChannelEvent::TowerFailed { error, .. } = ev {
                return error;
            }
        }
        panic!("events ended");
    })
    .await
    .unwrap();
    assert!(
        matches!(&*error, Error::Tower { source, .. }
            if matches!(**source, perun::watchtower::Error::WrongTowerSignature { what: "receipt", .. })),
        "{error:?}"
    );
    let s = chans[0].tower_status();
    assert_eq!(s[0].version, None, "no receipt kept: {s:?}");
    assert!(s[0].receipt.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipts_and_the_counter_survive_a_restart() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let opts = Options {
        towers: vec![config(tower.addr, &key)],
        redb: true,
        ..Options::default()
    };
    let (mut ps, chans) = alice_and_bob(&ledger, &opts).await;
    for _ in 0..3 {
        chans[0].pay(1, 0, u(10)).await.unwrap();
    }
    wait_status(&chans[0], "receipt before the restart", all_latest).await;
    let before = chans[0].tower_status()[0].receipt.clone().unwrap();
    let id = chans[0].id();
    drop(chans);

    let alice = ps.remove(0);
    let alice = restart_opts(&ledger, alice, &opts).await;
    ps.insert(0, alice);
    introduce(&ps).await;
    let ch = ps[0].client.channel(&id).expect("restored");
    // The receipt came back from the redb file.
    let s = ch.tower_status();
    assert_eq!(s[0].receipt.as_ref(), Some(&before), "{s:?}");
    assert!(s[0].latest);
    // The next appointment's seq is above every one the tower saw: the
    // tower takes it (a reused seq would be `stale_appointment`).
    let bob_ch = ps[1].client.channel(&id).unwrap();
    common::caught_up(&[ch.clone(), bob_ch]).await;
    ch.pay(1, 0, u(10)).await.unwrap();
    wait_status(&ch, "receipt after the restart", all_latest).await;
    let after = ch.tower_status()[0].receipt.clone().unwrap();
    assert!(after.seq > before.seq, "{} > {}", after.seq, before.seq);
    check_covered(
        &ch,
        ps[0].client.address(),
        &ch.tower_status()[0],
        &tower.tower,
    );
}

/// A tower that accepts connections and never answers (hung, overloaded).
async fn silent_tower() -> SocketAddr {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_tower_does_not_slow_updates() {
    let ledger = Ledger::sim().await;
    let addr = silent_tower().await;
    let key = LocalAccount::random();
    let opts = Options {
        towers: vec![TowerConfig {
            timeout: Duration::from_secs(10),
            ..config(addr, &key)
        }],
        ..Options::default()
    };
    let (_ps, chans) = alice_and_bob(&ledger, &opts).await;
    let mut events = chans[0].events();
    let t = std::time::Instant::now();
    for _ in 0..10 {
        chans[0].pay(1, 0, u(1)).await.unwrap();
    }
    // Had they waited for the tower, the first alone would take 10 s (a
    // bound no loaded machine's scheduling reaches).
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "10 updates took {:?}: they waited for the tower",
        t.elapsed()
    );
    let error = tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(ev) = events.next().await {
            if let ChannelEvent::TowerFailed { error, .. } = ev {
                return error;
            }
        }
        panic!("events ended");
    })
    .await
    .unwrap();
    assert!(
        matches!(&*error, Error::Tower { source, .. }
            if matches!(**source, perun::watchtower::Error::Timeout { .. })),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tower_that_lost_us_gets_a_new_registration() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let first = start_tower(&key).await;
    let addr = first.addr;
    let opts = Options {
        towers: vec![config(addr, &key)],
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(&ledger, &opts).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "first tower", all_latest).await;
    // The tower comes back on the same address with an empty store: the
    // next appointment is refused `unknown_user`, the client registers
    // again and sends it once more.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "rebind: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let second = serve_tower(listener, &key).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "the new tower", all_latest).await;
    check_covered(
        &chans[0],
        ps[0].client.address(),
        &chans[0].tower_status()[0],
        &second.tower,
    );
}

/// Privacy (issue 14, 3): before a dispute the tower must not be able to
/// tell which channel an appointment belongs to. Were the tower's user the
/// client's on-chain account (the participant `Deposited` names next to the
/// channel id), the tower would link the locator to the channel; each
/// channel shows the towers an identity of its own instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tower_never_sees_a_participant_address() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let opts = Options {
        towers: vec![config(tower.addr, &key)],
        ..Options::default()
    };
    let (ps, chans) = alice_and_bob(&ledger, &opts).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "receipt for the latest state", all_latest).await;
    let locator = ChannelSecret::of(chans[0].params()).locator();
    let users = tower.tower.store().users_for(locator).unwrap();
    assert_eq!(users.len(), 1, "one appointment for the channel");
    for p in chans[0].params().participants.iter() {
        assert!(
            !users.contains(p),
            "the tower's user {p} is a participant of the channel it watches"
        );
        assert!(
            tower.tower.store().subscription(*p).unwrap().is_none(),
            "participant {p} is registered with the tower"
        );
    }
    drop(ps);
}

// ------------------------------------------------ from an adversarial review
// Both failed before their fixes.

/// The version of the state `tower` (the client's first) holds for the
/// channel, if any.
fn held_version(ch: &Channel, tower: &Tower) -> Option<u64> {
    held_version_at(ch, tower, 0)
}

/// The same for the client's tower number `at`.
fn held_version_at(ch: &Channel, tower: &Tower, at: usize) -> Option<u64> {
    let user = ch.tower_status()[at].user?;
    let secret = ChannelSecret::of(ch.params());
    let stored = tower.store().appointment(user, secret.locator()).unwrap()?;
    let (_, state) = open_blob(&secret, &stored.blob).ok()?;
    Some(state.state.version)
}

/// Alice's towers: `good` and a silent one with `timeout` per call. The good
/// one gets a minute, so a call that a loaded machine slows is not counted
/// as failed (the bounds below are on the silent tower's timeout).
async fn good_and_silent(good: &TowerProc, key: &LocalAccount, timeout: Duration) -> Options {
    let silent = silent_tower().await;
    Options {
        towers: vec![
            TowerConfig {
                timeout: Duration::from_secs(60),
                ..config(good.addr, key)
            },
            TowerConfig {
                timeout,
                ..config(silent, &LocalAccount::random())
            },
        ],
        ..Options::default()
    }
}

/// A round sent one appointment to every due tower and waited for all
/// (`join_all`) before it looked at the channel again: the second
/// payment's state reached the good tower only after the silent tower's
/// call timed out (4.7 s of a 5 s timeout), and again each time its backoff
/// ran out. Alice offline then, the only working tower held a stale state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_tower_does_not_hold_up_the_good_one() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let good = start_tower(&key).await;
    let silent = Duration::from_secs(20);
    let opts = good_and_silent(&good, &key, silent).await;
    let (_ps, chans) = alice_and_bob(&ledger, &opts).await;
    let ch = &chans[0];
    ch.pay(1, 0, u(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ch.pay(1, 0, u(1)).await.unwrap();
    let latest = ch.state().state.version;
    let t = std::time::Instant::now();
    while t.elapsed() < 2 * silent && held_version(ch, &good.tower) != Some(latest) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        t.elapsed() < silent / 2,
        "the good tower held the latest version {latest} only after {:?} (the silent \
         tower's timeout is {silent:?})",
        t.elapsed()
    );
}

/// Registering held the tower's subscription lock across the `/register`
/// call, so every channel's registration with the silent tower waited for
/// the one before it to time out, each holding one of the 32 round permits:
/// four channels with a 2 s timeout took 7.7 s; 32 with the default 10 s,
/// minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_tower_does_not_serialise_every_channel() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let good = start_tower(&key).await;
    let timeout = Duration::from_secs(8);
    let opts = good_and_silent(&good, &key, timeout).await;
    let alice = party(&ledger, u(1_000_000), &opts).await;
    let bob = party(&ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let mut chans = Vec::new();
    for _ in 0..4 {
        chans.push(open(&ledger, &mut ps, u(1000)).await.remove(0));
    }
    for _ in 0..2 {
        for r in futures::future::join_all(chans.iter().map(|c| c.pay(1, 0, u(1)))).await {
            r.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t = std::time::Instant::now();
    let all_latest = || {
        chans
            .iter()
            .all(|c| held_version(c, &good.tower) == Some(c.state().state.version))
    };
    while t.elapsed() < 5 * timeout && !all_latest() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    assert!(
        took < 2 * timeout,
        "the good tower held every channel's latest state only after {took:?} \
         (the silent tower's timeout {timeout:?}, 4 channels)"
    );
}

/// A proxy in front of `upstream` that holds each new connection for
/// `delay` before it connects it (a tower far away, or busy: every call of
/// the tower client is a connection of its own).
async fn slow_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = l.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    addr
}

/// An address nothing listens on: a tower that is down (its calls fail at
/// once with "connection refused"). The socket stays bound, not listening,
/// while the test holds it, so no other test's listener takes the port.
fn down_tower() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A round stopped waiting 500 ms after the *first answer*, whatever it
/// was: a tower that is down answers first (connection refused, in
/// microseconds) and cut off every good tower slower than 500 ms. Now only
/// a receipt starts the clock. The shutdown flush,
/// which exists so that the towers hold the latest state while the client
/// is offline, then leaves the only working tower without it: Alice goes
/// offline and the tower that is up cannot refute a stale state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_tower_cuts_off_a_slow_good_one_at_the_shutdown_flush() {
    down_and_slow(AppointmentPolicy::AtMost(Duration::from_secs(3600)), true).await;
}

/// The same without a shutdown, on every update: the rounds that retry the
/// slow tower retry the down one with it (the same backoff), so each is cut
/// off again 500 ms after the down tower's refusal, for as long as the
/// down tower stays down. (Alone, the slow tower holds the latest state
/// within 1.5 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_tower_keeps_a_slow_good_one_without_any_state() {
    down_and_slow(AppointmentPolicy::EveryUpdate, false).await;
}

/// Alice with a tower that is down and a working one 700 ms a call away
/// pays three times; `shutdown`: then she goes offline.
async fn down_and_slow(policy: AppointmentPolicy, shutdown: bool) {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let good = start_tower(&key).await;
    // 700 ms per call: register + add_appointment is 1.4 s, well inside the
    // tower client's timeout (10 s by default).
    let slow = slow_proxy(good.addr, Duration::from_millis(700)).await;
    let (_down_socket, down) = down_tower();
    let opts = Options {
        towers: vec![
            TowerConfig::new(format!("http://{down}"), LocalAccount::random().address()),
            TowerConfig::new(format!("http://{slow}"), key.address()),
        ],
        policy,
        ..Options::default()
    };
    let alice = party(&ledger, u(1_000_000), &opts).await;
    let bob = party(&ledger, u(1_000_000), &Options::default()).await;
    let mut ps = vec![alice, bob];
    introduce(&ps).await;
    let chans = open(&ledger, &mut ps, u(1000)).await;
    let ch = &chans[0];
    for _ in 0..3 {
        ch.pay(1, 0, u(1)).await.unwrap();
    }
    let latest = ch.state().state.version;
    let held = || held_version_at(ch, &good.tower, 1);
    if shutdown {
        // Alice stays a moment, then goes offline: the flush sends the
        // latest state to every tower.
        tokio::time::sleep(Duration::from_secs(3)).await;
        ps[0].client.shutdown().await;
    } else {
        // Alone, the slow tower holds the latest state within 1.5 s.
        let until = std::time::Instant::now() + Duration::from_secs(8);
        while std::time::Instant::now() < until && held() != Some(latest) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Whatever the client recorded, the good tower's store is what counts.
    let held = held();
    assert_eq!(
        held,
        Some(latest),
        "the working (slow, 700 ms a call) tower holds version {held:?} (shutdown flush: \
         {shutdown}), the channel is at {latest}; the client's view (version, latest) \
         per tower: {:?}",
        ch.tower_status()
            .iter()
            .map(|t| (t.version, t.latest))
            .collect::<Vec<_>>()
    );
}

/// A channel record full of receipts from towers the client no longer
/// uses (32, from configurations before restarts) once refused the
/// configured tower's receipt, and the round started again at once, for
/// good: the oldest receipt of a tower gone now makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_full_of_past_towers_makes_room_for_the_current_one() {
    use perun::persistence::{Change, TowerReceipt, tower::MAX_TOWERS};
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let (opts, mut ps, chans) = covered_by(&ledger, &tower, &key, true).await;
    let id = chans[0].id();
    drop(chans);
    // The stored record as 32 past towers left it: the current tower's
    // receipt gone, the identity and counter kept.
    let stored = ps[0].persister.load(id).await.unwrap().unwrap();
    let mut record = TowerRecord::decode(id, &stored.metadata).unwrap();
    let mine = record.receipts.pop().unwrap();
    let past = |t: u8| TowerReceipt {
        tower: Address::repeat_byte(t),
        seq: u64::from(t),
        ..mine.clone()
    };
    record.receipts = (1..=MAX_TOWERS as u8).map(past).collect();
    record.blobs.clear();
    ps[0]
        .persister
        .update(id, vec![Change::Metadata(record.encode().unwrap())])
        .await
        .unwrap();

    let alice = ps.remove(0);
    let alice = restart_opts(&ledger, alice, &opts).await;
    ps.insert(0, alice);
    introduce(&ps).await;
    let ch = ps[0].client.channel(&id).expect("restored");
    assert_eq!(ch.tower_status()[0].receipt, None);
    let bob_ch = ps[1].client.channel(&id).unwrap();
    common::caught_up(&[ch.clone(), bob_ch]).await;
    ch.pay(1, 0, u(10)).await.unwrap();
    wait_status(&ch, "the current tower's receipt", all_latest).await;
    check_covered(
        &ch,
        ps[0].client.address(),
        &ch.tower_status()[0],
        &tower.tower,
    );
    let stored = ps[0].persister.load(id).await.unwrap().unwrap();
    let record = TowerRecord::decode(id, &stored.metadata).unwrap();
    assert_eq!(record.receipts.len(), MAX_TOWERS);
    assert!(
        record.receipt(Address::repeat_byte(1)).is_none(),
        "the oldest past tower's receipt made room"
    );
    assert!((2..=MAX_TOWERS as u8).all(|t| record.receipt(Address::repeat_byte(t)).is_some()));
}

/// A tower drops users whose subscription expired a while ago
/// (`reclaim_after_secs`). A channel's worker renews only when it sends,
/// so an idle channel once lost its only appointment while its status
/// still said covered: the client renews every covered channel's
/// subscription on its own, before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_channel_keeps_its_appointment_past_its_first_subscription() {
    idle_channel_keeps_its_appointment(false).await;
}

/// As above across a restart: subscriptions are not stored, so the
/// restarted client renews each covered channel's at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_idle_channel_keeps_its_appointment() {
    idle_channel_keeps_its_appointment(true).await;
}

async fn idle_channel_keeps_its_appointment(restart: bool) {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let short = Config {
        subscription_secs: 4,
        reclaim_after_secs: 1,
        reclaim_interval_secs: 1,
        ..Config::default()
    };
    let tower = serve_tower_with(listener, &key, short).await;
    let (opts, mut ps, mut chans) = covered_by(&ledger, &tower, &key, restart).await;
    let status = chans[0].tower_status()[0].clone();
    let (user, locator) = (status.user.unwrap(), status.receipt.unwrap().locator);
    let first = tower
        .tower
        .store()
        .subscription(user)
        .unwrap()
        .unwrap()
        .expiry;
    if restart {
        let id = chans[0].id();
        chans.clear();
        let alice = ps.remove(0);
        let alice = restart_opts(&ledger, alice, &opts).await;
        ps.insert(0, alice);
        chans.push(ps[0].client.channel(&id).expect("restored"));
    }
    // Three subscription lengths with no update: renewed, never dropped.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            tower
                .tower
                .store()
                .appointment(user, locator)
                .unwrap()
                .is_some(),
            "the tower dropped the idle channel's appointment"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = tower
        .tower
        .store()
        .subscription(user)
        .unwrap()
        .unwrap()
        .expiry;
    assert!(
        expiry > now && expiry >= first + 8,
        "renewed: {first} -> {expiry} at {now}"
    );
    assert!(chans[0].tower_status()[0].latest);
}

const DAY: u64 = 24 * 60 * 60;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A client offline longer than its subscription plus the tower's
/// `reclaim_after_secs` comes back: the tower dropped its identity with its
/// appointment. The client finds that at start (no slot used), drops the
/// receipt and sends the latest state again. Before (a review's finding),
/// its renewal registered a fresh user and took it for a renewal: the
/// status said covered, nothing was sent, and the tower held nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_back_after_the_tower_reclaimed_it_sends_its_state_again() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The tower's clock: the system's plus an offset the test moves on.
    let offset = Arc::new(AtomicU64::new(0));
    let clock_offset = offset.clone();
    let clock: api::Clock = Arc::new(move || unix_now() + clock_offset.load(Ordering::SeqCst));
    let config = Config {
        // Defaults (365 days, 90 days), a pass every second.
        reclaim_interval_secs: 1,
        ..Config::default()
    };
    let proc = serve_tower_at(listener, &key, config, clock).await;
    let tower = proc.tower.clone();
    let (opts, mut ps, chans) = covered_by(&ledger, &proc, &key, true).await;
    let status = chans[0].tower_status()[0].clone();
    let (user, locator) = (status.user.unwrap(), status.receipt.unwrap().locator);
    let id = chans[0].id();
    drop(chans);

    // Alice is away 365 + 91 days (her renewal, due 30 days before the
    // expiry by her own clock, never comes while she is away): the tower's
    // pass drops her identity and its appointment.
    offset.store(456 * DAY, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tower.store().subscription(user).unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never reclaimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tower.store().appointment(user, locator).unwrap().is_none());

    // Alice comes back: her client renews every covered identity at start.
    let alice = ps.remove(0);
    let alice = restart_opts(&ledger, alice, &opts).await;
    ps.insert(0, alice);
    let ch = ps[0].client.channel(&id).expect("restored");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tower.store().subscription(user).unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewal at start never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The state goes to the tower again, and the status says so only then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = ch.tower_status()[0].clone();
        let held = tower.store().appointment(user, locator).unwrap();
        assert!(
            held.is_some() || !status.latest,
            "the tower holds no appointment for the channel, yet its status says \
             the tower holds the latest state (version {:?})",
            status.version
        );
        if held.is_some() && status.latest {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the state never went to the tower again: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proc);
}

/// Counts the tower's answered `/register` requests (its `/metrics`).
async fn registrations(addr: std::net::SocketAddr) -> u64 {
    requests(addr, "register").await
}

/// Counts the tower's answered requests to `endpoint` (its `/metrics`).
async fn requests(addr: std::net::SocketAddr, endpoint: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let prefix = format!("perun_tower_requests_total{{endpoint=\"{endpoint}\"");
    out.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Subscriptions are not stored: a restarted client reads each covered
/// identity's (a read at the tower) and renews none that is not due,
/// rather than register every identity again at every start (each a write
/// with an fsync at the tower: 10,000 channels, 10,000 writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_reads_subscriptions_rather_than_renew_them() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let tower = start_tower(&key).await;
    let (opts, mut ps, chans) = covered_by(&ledger, &tower, &key, true).await;
    drop(chans);
    let registered = registrations(tower.addr).await;
    let read = requests(tower.addr, "get_subscription_info").await;
    let alice = ps.remove(0);
    let _alice = restart_opts(&ledger, alice, &opts).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while requests(tower.addr, "get_subscription_info").await == read {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted client never looked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        registrations(tower.addr).await,
        registered,
        "registered again at start"
    );
}

/// A tower whose answered expiry is already past by the client's clock
/// (clock skew larger than the subscription, a short `subscription_secs`, a
/// buggy or hostile tower) is asked again an hour later, not at once: a
/// review found every covered identity registered again once a second, for
/// good (with 10,000 channels a stream of writes at the tower).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tower_whose_expiry_is_past_here_is_not_asked_again_at_once() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The tower's clock is 400 days behind: its 365-day subscriptions
    // end 35 days ago by the client's clock.
    let clock: api::Clock = Arc::new(|| unix_now() - 400 * DAY);
    let proc = serve_tower_at(listener, &key, Config::default(), clock).await;
    let addr = proc.addr;
    let (_opts, _ps, _chans) = covered_by(&ledger, &proc, &key, false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = registrations(addr).await;
    // The channel is idle for 6 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = registrations(addr).await;
    assert!(
        after - before <= 1,
        "an idle channel registered {} times in 6 s ({before} -> {after})",
        after - before
    );
    drop(proc);
}

/// A tower that loses its store while the client runs is found at the
/// next look (hourly, or 8 times per subscription length: here every 5 s)
/// and gets the state again; before (a review's finding), a running
/// client looked only at its next renewal, months later, and the status
/// said covered all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tower_that_loses_its_store_while_the_client_runs_gets_the_state_again() {
    let ledger = Ledger::sim().await;
    let key = LocalAccount::random();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forty = Config {
        subscription_secs: 40,
        ..Config::default()
    };
    let tower = serve_tower_with(listener, &key, forty).await;
    let (_opts, _ps, chans) = covered_by(&ledger, &tower, &key, false).await;
    let status = chans[0].tower_status()[0].clone();
    let (user, locator) = (status.user.unwrap(), status.receipt.unwrap().locator);
    // The tower loses everything (emptied in place).
    let r = tower
        .tower
        .store()
        .reclaim(u64::MAX, None, 1000, 10_000)
        .unwrap();
    assert_eq!(r.users, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tower
        .tower
        .store()
        .appointment(user, locator)
        .unwrap()
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "20 s after the tower lost its store it still holds nothing (status {:?})",
            chans[0].tower_status()[0].version
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_status(&chans[0], "covered again", all_latest).await;
}

/// A tower that answers slowly holds up only its own channels: another
/// tower's lost appointment is sent again at once after a restart, not
/// once the slow tower's checks are over (a review's finding: with 10,000
/// channels and 6 s answers, two hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_tower_does_not_hold_up_another_towers_lost_appointment() {
    let ledger = Ledger::sim().await;
    let (ka, kb) = (LocalAccount::random(), LocalAccount::random());
    let a = start_tower(&ka).await;
    let b = start_tower(&kb).await;
    let slow_b = slow_proxy(b.addr, Duration::from_secs(6)).await;
    let opts = Options {
        towers: vec![
            config(a.addr, &ka),
            TowerConfig {
                timeout: Duration::from_secs(20),
                ..config(slow_b, &kb)
            },
        ],
        redb: true,
        ..Options::default()
    };
    let (mut ps, chans) = alice_and_bob(&ledger, &opts).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "both receipts", all_latest).await;
    let id = chans[0].id();
    let status = chans[0].tower_status()[0].clone();
    let (user, locator) = (status.user.unwrap(), status.receipt.unwrap().locator);
    drop(chans);
    // Tower A loses the identity (reclaimed, or a lost store).
    a.tower
        .store()
        .reclaim(u64::MAX, None, 1000, 10_000)
        .unwrap();
    let alice = ps.remove(0);
    let alice = restart_opts(&ledger, alice, &opts).await;
    let started = tokio::time::Instant::now();
    let ch = alice.client.channel(&id).expect("restored");
    while a
        .tower
        .store()
        .appointment(user, locator)
        .unwrap()
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "3 s after the restart tower A still holds nothing (status A: {:?}): \
             its lost appointment waits for slow tower B",
            ch.tower_status()[0].version
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A hostile tower that takes every appointment but says, at every look,
/// that the identity holds none (no slot used) and that its subscription
/// ends in 2 s: the client believes a second loss only 10 minutes after
/// the first, so the tower cannot make every channel write and send in a
/// loop (a review's finding: 2 writes per channel every 1 to 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tower_that_keeps_saying_it_lost_us_is_believed_once_per_gap() {
    let ledger = Ledger::sim().await;
    let key = Arc::new(LocalAccount::random());
    let appointments = Arc::new(AtomicU64::new(0));
    let liar = {
        let (key, appointments) = (key.clone(), appointments.clone());
        fake_tower(move |head, req| {
            if head.starts_with("post /add_appointment") {
                appointments.fetch_add(1, Ordering::SeqCst);
                receipt_answer(key.address(), &key, req)
            } else {
                let user: Address = req["user"].as_str().unwrap().parse().unwrap();
                let sub = perun::watchtower::Subscription {
                    slots_total: 10,
                    slots_used: 0,
                    expiry: unix_now() + 2,
                };
                subscription_answer(&key, user, sub)
            }
        })
        .await
    };
    let opts = Options {
        towers: vec![config(liar, &key)],
        ..Options::default()
    };
    let (_ps, chans) = alice_and_bob(&ledger, &opts).await;
    chans[0].pay(1, 0, u(10)).await.unwrap();
    wait_status(&chans[0], "a receipt", all_latest).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let sent = appointments.load(Ordering::SeqCst);
    assert!(
        sent <= 2,
        "{sent} appointments in 8 s: the lie was believed every time"
    );
}
