//! The API over a real socket: the happy path with verified signatures,
//! every bad input's code and status, rate limits, and a restart.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256};
use common::{get, post, request};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State, U256};
use perun_wallet::{Account, LocalAccount, parse_signature, recover, signature_bytes};
use perun_watchtower::api::{self, Config, RateLimit, Tower};
use perun_watchtower::messages;
use perun_watchtower::scheme::{MAX_BLOB_LEN, seal};
use perun_watchtower::store::{Status, Store};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    addr: SocketAddr,
    tower: Arc<Tower>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    now: Arc<AtomicU64>,
}

impl Server {
    async fn start(path: &Path, tower_key: &LocalAccount, config: Config) -> Self {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock_now = Arc::clone(&now);
        let store = Store::open(path).expect("store");
        let account = LocalAccount::from_bytes(&tower_key.secret_bytes()).expect("key");
        let tower = Arc::new(
            Tower::new(
                store,
                Arc::new(account),
                config,
                Arc::new(move || clock_now.load(Ordering::SeqCst)),
            )
            .expect("tower"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let t = Arc::clone(&tower);
        let task = tokio::spawn(async move {
            api::serve(listener, t, async {
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
            now,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }
}

fn hex(b: &[u8]) -> String {
    format!("0x{}", ::hex::encode(b))
}

fn sig(account: &LocalAccount, hash: B256) -> String {
    hex(&signature_bytes(&account.sign_hash(hash).expect("sign")))
}

fn channel(nonce: u64) -> (Params, SignedState) {
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let domain = Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let balances = vec![vec![U256::from(10), U256::from(10)]];
    let params = Params::payment(
        domain,
        60,
        U256::from(nonce),
        vec![alice.address(), bob.address()],
        balances.clone(),
    );
    let asset = Asset {
        chainId: U256::from(31337),
        holder: Address::repeat_byte(0xaa),
    };
    let state = State::initial(&params, Allocation::new(vec![asset], balances));
    let mut signed = SignedState::new(state);
    signed.sign(&params, 0, &alice).expect("sign");
    signed.sign(&params, 1, &bob).expect("sign");
    (params, signed)
}

fn register_body(tower: Address, user: &LocalAccount) -> Value {
    json!({ "user": user.address(), "signature": sig(user, messages::register_hash(tower, user.address())) })
}

fn appointment_body(user: &LocalAccount, locator: B256, blob: &[u8]) -> Value {
    appointment_seq(user, locator, 1, blob)
}

fn appointment_seq(user: &LocalAccount, locator: B256, seq: u64, blob: &[u8]) -> Value {
    json!({
        "locator": locator,
        "seq": seq,
        "blob": hex(blob),
        "signature": sig(user, messages::appointment_hash(&locator, seq, blob)),
    })
}

fn get_appointment_body(tower: Address, user: &LocalAccount, locator: B256) -> Value {
    json!({ "locator": locator, "signature": sig(user, messages::get_appointment_hash(tower, &locator)) })
}

fn subscription_body(tower: Address, user: &LocalAccount) -> Value {
    json!({ "user": user.address(), "signature": sig(user, messages::get_subscription_hash(tower, user.address())) })
}

fn recovers(hash: B256, sig_hex: &Value) -> Address {
    let s = sig_hex.as_str().expect("signature string");
    let bytes = ::hex::decode(s.trim_start_matches("0x")).expect("hex");
    recover(hash, &parse_signature(&bytes).expect("canonical")).expect("recover")
}

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("tower.redb")
}

#[tokio::test]
async fn register_add_replace_and_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let config = Config {
        slots_per_registration: 3,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    let (addr, tw) = (srv.addr, tower_key.address());
    let user = LocalAccount::random();

    let health = get(addr, "/health").await;
    assert_eq!(health.status, 200);

    let r = post(addr, "/register", &register_body(tw, &user)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let sub = r.json();
    assert_eq!(sub["slots_total"], 3);
    assert_eq!(sub["slots_used"], 0);
    let expiry = sub["expiry"].as_u64().expect("expiry");
    assert_eq!(expiry, 1_000_000 + Config::default().subscription_secs);
    let signed_sub = perun_watchtower::store::Subscription {
        slots_total: 3,
        slots_used: 0,
        expiry,
    };
    assert_eq!(
        recovers(
            messages::subscription_hash(user.address(), &signed_sub),
            &sub["tower_signature"]
        ),
        tw
    );

    // An appointment with a real sealed blob; the receipt verifies.
    let (params, signed) = channel(7);
    let (locator, blob) = seal(&params, &signed).expect("seal");
    let body = appointment_body(&user, locator, &blob);
    let r = post(addr, "/add_appointment", &body).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let receipt = r.json();
    assert_eq!(receipt["user_signature"], body["signature"]);
    let start = receipt["start_block"].as_u64().expect("start");
    let user_sig = ::hex::decode(
        body["signature"]
            .as_str()
            .expect("s")
            .trim_start_matches("0x"),
    )
    .expect("hex");
    assert_eq!(
        recovers(
            messages::receipt_hash(tw, &locator, start, &user_sig),
            &receipt["tower_signature"]
        ),
        tw
    );
    // The same locator again (a newer state) replaces it: no slot.
    let (_, blob2) = seal(&params, &signed).expect("seal");
    let newer = appointment_seq(&user, locator, 2, &blob2);
    let r = post(addr, "/add_appointment", &newer).await;
    assert_eq!(r.status, 200);
    // The same request again (a retry) gets the same receipt.
    let retry = post(addr, "/add_appointment", &newer).await;
    assert_eq!((retry.status, retry.json()), (200, r.json()));
    // Replaying the older request cannot bring the older blob back.
    let replay = post(addr, "/add_appointment", &body).await;
    assert_eq!(
        (replay.status, replay.code()),
        (409, "stale_appointment".to_string())
    );
    let (_, blob3) = seal(&params, &signed).expect("seal");
    let same_seq = post(
        addr,
        "/add_appointment",
        &appointment_seq(&user, locator, 2, &blob3),
    )
    .await;
    assert_eq!(
        (same_seq.status, same_seq.code()),
        (409, "stale_appointment".to_string())
    );
    let r = post(
        addr,
        "/get_subscription_info",
        &subscription_body(tw, &user),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["slots_used"], 1);
    let stored = srv
        .tower
        .store()
        .appointment(user.address(), locator)
        .expect("get");
    assert_eq!(stored.expect("stored").blob, blob2);

    // Statuses.
    let status = |v: Value| v["status"].as_str().expect("status").to_string();
    let r = post(
        addr,
        "/get_appointment",
        &get_appointment_body(tw, &user, locator),
    )
    .await;
    assert_eq!(status(r.json()), "being_watched");
    let r = post(
        addr,
        "/get_appointment",
        &get_appointment_body(tw, &user, B256::ZERO),
    )
    .await;
    assert_eq!((r.status, status(r.json())), (200, "not_found".into()));
    for (s, name) in [
        (Status::DisputeTriggered, "dispute_triggered"),
        (Status::Resolved, "resolved"),
    ] {
        srv.tower
            .store()
            .set_status(user.address(), locator, s)
            .expect("set");
        let r = post(
            addr,
            "/get_appointment",
            &get_appointment_body(tw, &user, locator),
        )
        .await;
        assert_eq!(status(r.json()), name);
    }
    // Another user cannot see it.
    let eve = LocalAccount::random();
    post(addr, "/register", &register_body(tw, &eve)).await;
    let r = post(
        addr,
        "/get_appointment",
        &get_appointment_body(tw, &eve, locator),
    )
    .await;
    assert_eq!(status(r.json()), "not_found");

    let m = get(addr, "/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).expect("utf8");
    assert!(text.contains("perun_tower_users 2\n"), "{text}");
    assert!(text.contains("perun_tower_appointments 1\n"), "{text}");
    assert!(text.contains(
        "perun_tower_requests_total{endpoint=\"add_appointment\",status=\"200\",code=\"ok\"} 3\n"
    ));
    srv.stop().await;
}

#[tokio::test]
async fn bad_input_gets_its_code_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let config = Config {
        slots_per_registration: 1,
        subscription_secs: 100,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    let (addr, tw) = (srv.addr, tower_key.address());
    let user = LocalAccount::random();
    let expect = |r: common::Reply, status: u16, code: &str| {
        assert_eq!(
            (r.status, r.code()),
            (status, code.to_string()),
            "{:?}",
            r.json()
        );
    };

    expect(
        request(addr, "POST", "/register", b"{not json").await,
        400,
        "malformed_request",
    );
    expect(
        request(addr, "POST", "/add_appointment", b"[]").await,
        400,
        "malformed_request",
    );
    let mut extra = register_body(tw, &user);
    extra["slots"] = json!(1_000_000);
    expect(
        post(addr, "/register", &extra).await,
        400,
        "malformed_request",
    );
    let mut bad_hex = appointment_body(&user, B256::ZERO, b"x");
    bad_hex["blob"] = json!("0xzz");
    expect(
        post(addr, "/add_appointment", &bad_hex).await,
        400,
        "malformed_request",
    );
    let mut short_sig = register_body(tw, &user);
    short_sig["signature"] = json!("0x1234");
    expect(
        post(addr, "/register", &short_sig).await,
        400,
        "malformed_request",
    );

    // Unknown user.
    let blob = vec![0u8; 64];
    expect(
        post(
            addr,
            "/add_appointment",
            &appointment_body(&user, B256::ZERO, &blob),
        )
        .await,
        404,
        "unknown_user",
    );
    expect(
        post(
            addr,
            "/get_subscription_info",
            &subscription_body(tw, &user),
        )
        .await,
        404,
        "unknown_user",
    );
    // Wrong signatures: by someone else, for another tower, not canonical.
    let mallory = LocalAccount::random();
    let mut forged = register_body(tw, &user);
    forged["signature"] = json!(sig(&mallory, messages::register_hash(tw, user.address())));
    expect(
        post(addr, "/register", &forged).await,
        401,
        "wrong_signature",
    );
    let other_tower = register_body(Address::repeat_byte(9), &user);
    expect(
        post(addr, "/register", &other_tower).await,
        401,
        "wrong_signature",
    );
    let mut high_v = register_body(tw, &user);
    high_v["signature"] = json!(hex(&[0x11; 65]));
    expect(
        post(addr, "/register", &high_v).await,
        401,
        "wrong_signature",
    );

    // Registered: one slot.
    assert_eq!(
        post(addr, "/register", &register_body(tw, &user))
            .await
            .status,
        200
    );
    let a = post(
        addr,
        "/add_appointment",
        &appointment_body(&user, B256::ZERO, &blob),
    )
    .await;
    assert_eq!(a.status, 200);
    expect(
        post(
            addr,
            "/add_appointment",
            &appointment_body(&user, B256::repeat_byte(1), &blob),
        )
        .await,
        403,
        "no_free_slot",
    );
    // Oversized blob (fits the body) and oversized body.
    let big = vec![0u8; MAX_BLOB_LEN + 1];
    expect(
        post(
            addr,
            "/add_appointment",
            &appointment_body(&user, B256::ZERO, &big),
        )
        .await,
        413,
        "blob_too_large",
    );
    let huge = vec![b' '; Config::default().max_body + 1];
    expect(
        request(addr, "POST", "/add_appointment", &huge).await,
        413,
        "body_too_large",
    );
    // Expired.
    srv.now.fetch_add(101, Ordering::SeqCst);
    expect(
        post(
            addr,
            "/add_appointment",
            &appointment_body(&user, B256::ZERO, &blob),
        )
        .await,
        403,
        "subscription_expired",
    );
    expect(get(addr, "/nope").await, 404, "not_found");

    // Nothing refused changed the store.
    assert_eq!(srv.tower.store().counts().expect("counts"), (1, 1));
    let m = String::from_utf8(get(addr, "/metrics").await.body).expect("utf8");
    assert!(m.contains("code=\"wrong_signature\"} 3\n"), "{m}");
    srv.stop().await;
}

#[tokio::test]
async fn floods_are_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let slow = RateLimit {
        burst: 5,
        per_second: 0.01,
    };
    let config = Config {
        user_rate: slow,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    let (addr, tw) = (srv.addr, tower_key.address());
    let (user, other) = (LocalAccount::random(), LocalAccount::random());
    assert_eq!(
        post(addr, "/register", &register_body(tw, &user))
            .await
            .status,
        200
    );
    assert_eq!(
        post(addr, "/register", &register_body(tw, &other))
            .await
            .status,
        200
    );
    let mut limited = 0;
    for i in 0..20u8 {
        let r = post(
            addr,
            "/add_appointment",
            &appointment_body(&user, B256::repeat_byte(i), b"blob"),
        )
        .await;
        if r.status == 429 {
            assert_eq!(r.code(), "rate_limited");
            limited += 1;
        }
    }
    // One for register, four appointments, then the bucket is empty.
    assert_eq!(limited, 16);
    assert_eq!(srv.tower.store().counts().expect("counts").1, 4);
    // Another user is not affected.
    let r = post(
        addr,
        "/add_appointment",
        &appointment_body(&other, B256::ZERO, b"blob"),
    )
    .await;
    assert_eq!(r.status, 200);
    srv.stop().await;

    // One IP, many users: the IP bucket stops it before any signature is checked.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        ip_rate: slow,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = post(
            srv.addr,
            "/register",
            &register_body(tw, &LocalAccount::random()),
        )
        .await;
        codes.push(r.status);
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429]);
    srv.stop().await;
}

#[tokio::test]
async fn receipted_appointments_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let user = LocalAccount::random();
    let tw = tower_key.address();
    let (params, signed) = channel(9);
    let (locator, blob) = seal(&params, &signed).expect("seal");
    let srv = Server::start(&db(&dir), &tower_key, Config::default()).await;
    assert_eq!(
        post(srv.addr, "/register", &register_body(tw, &user))
            .await
            .status,
        200
    );
    let r = post(
        srv.addr,
        "/add_appointment",
        &appointment_body(&user, locator, &blob),
    )
    .await;
    assert_eq!(r.status, 200);
    srv.stop().await;

    let srv = Server::start(&db(&dir), &tower_key, Config::default()).await;
    let r = post(
        srv.addr,
        "/get_appointment",
        &get_appointment_body(tw, &user, locator),
    )
    .await;
    assert_eq!(r.json()["status"], "being_watched");
    let r = post(
        srv.addr,
        "/get_subscription_info",
        &subscription_body(tw, &user),
    )
    .await;
    assert_eq!(r.json()["slots_used"], 1);
    // The stored blob still opens with the channel's secret.
    let stored = srv
        .tower
        .store()
        .appointment(user.address(), locator)
        .expect("get")
        .expect("present");
    let (p, s) =
        perun_watchtower::open(&perun_watchtower::ChannelSecret::of(&params), &stored.blob)
            .expect("open");
    assert_eq!((p, s), (params, signed));
    assert_eq!(
        srv.tower.store().users_for(locator).expect("index"),
        vec![user.address()]
    );
    srv.stop().await;
}

#[tokio::test]
async fn slow_and_idle_connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let config = Config {
        max_connections: 2,
        header_timeout_secs: 1,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    // Two sockets that never finish their headers hold both connection slots...
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(srv.addr)
            .await
            .expect("connect");
        s.write_all(b"POST /register HTTP/1.1\r\nHost: t")
            .await
            .expect("write");
        slow.push(s);
    }
    // ...until the header timeout closes them; then an honest request is served.
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), get(srv.addr, "/health"))
        .await
        .expect("served after the slow sockets timed out");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited for a slot"
    );
    for mut s in slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the slow socket was closed");
    }
    srv.stop().await;
}

/// Concurrent appointments share transactions (group commit), yet slots
/// are never overspent: with 5 slots, exactly 5 of 40 new locators sent at
/// once are taken, and every receipt names a stored appointment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appointments_never_overspend_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let user = Arc::new(LocalAccount::random());
    let tw = tower_key.address();
    let config = Config {
        slots_per_registration: 5,
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    assert_eq!(
        post(srv.addr, "/register", &register_body(tw, &user))
            .await
            .status,
        200
    );
    let addr = srv.addr;
    let sends: Vec<_> = (0..40u8)
        .map(|i| {
            let user = Arc::clone(&user);
            tokio::spawn(async move {
                let locator = B256::repeat_byte(i);
                let r = post(
                    addr,
                    "/add_appointment",
                    &appointment_body(&user, locator, &[i; 64]),
                )
                .await;
                (locator, r)
            })
        })
        .collect();
    let mut taken = Vec::new();
    for s in sends {
        let (locator, r) = s.await.expect("send");
        match r.status {
            200 => taken.push(locator),
            _ => assert_eq!(r.code(), "no_free_slot"),
        }
    }
    assert_eq!(taken.len(), 5);
    for l in taken {
        assert!(
            srv.tower
                .store()
                .appointment(user.address(), l)
                .expect("read")
                .is_some()
        );
    }
    srv.stop().await;
}

// ------------------------------------------------ from an adversarial review
// Each of these failed before its fix.

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
    let srv = Server::start(
        &dir.path().join("tower.redb"),
        &LocalAccount::random(),
        config,
    )
    .await;
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
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
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
    let srv = Server::start(
        &dir.path().join("tower.redb"),
        &LocalAccount::random(),
        api::Config::default(),
    )
    .await;
    const N: usize = 600;
    for _ in 0..N {
        let r = common::request(srv.addr, "POST", "/register", b"{not json").await;
        assert!(r.status == 400 || r.status == 429, "{}", r.status);
    }
    srv.stop().await;
    let text = String::from_utf8_lossy(&buf.0.lock().expect("log buffer")).into_owned();
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
    let srv = Server::start(
        &dir.path().join("tower.redb"),
        &LocalAccount::random(),
        api::Config::default(),
    )
    .await;
    let tower = srv.tower.address();
    let user = LocalAccount::random();
    let sig = signature_bytes(
        &user
            .sign_hash(messages::register_hash(tower, user.address()))
            .expect("sign"),
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
    let seq = u64::from_be_bytes(pre[32..40].try_into().expect("8 bytes"));
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
        .expect("read");
    let sub = srv
        .tower
        .store()
        .subscription(user.address())
        .expect("read");
    srv.stop().await;
    assert_ne!(
        r.status, 200,
        "a register signature was taken as the user's appointment: stored {stored:?}, \
         subscription {sub:?}"
    );
}

/// Registration is free, so junk can fill a tower. A user whose
/// subscription expired more than `reclaim_after_secs` ago is dropped with
/// its appointments by the tower's own periodic pass, and new users fit
/// again; a user whose subscription runs is never touched.
#[tokio::test]
async fn long_expired_users_give_their_room_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tower_key = LocalAccount::random();
    let config = Config {
        subscription_secs: 100,
        reclaim_after_secs: 50,
        reclaim_interval_secs: 1,
        store: perun_watchtower::store::StoreLimits {
            max_users: 2,
            max_appointments: 2,
            max_slots_per_user: 10,
            ..perun_watchtower::store::StoreLimits::default()
        },
        ..Config::default()
    };
    let srv = Server::start(&db(&dir), &tower_key, config).await;
    let (addr, tw) = (srv.addr, tower_key.address());
    let (junk, kept, late) = (
        LocalAccount::random(),
        LocalAccount::random(),
        LocalAccount::random(),
    );
    let r = post(addr, "/register", &register_body(tw, &junk)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let (params, signed) = channel(1);
    let (locator, blob) = seal(&params, &signed).expect("seal");
    let r = post(
        addr,
        "/add_appointment",
        &appointment_body(&junk, locator, &blob),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());

    // The junk's subscription runs out; `kept` registers later, so its
    // subscription still runs when the junk's is 50 s past expiry.
    srv.now.fetch_add(90, Ordering::SeqCst);
    let r = post(addr, "/register", &register_body(tw, &kept)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let (params2, signed2) = channel(2);
    let (locator2, blob2) = seal(&params2, &signed2).expect("seal");
    let r = post(
        addr,
        "/add_appointment",
        &appointment_body(&kept, locator2, &blob2),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = post(addr, "/register", &register_body(tw, &late)).await;
    assert_eq!((r.status, r.code()), (503, "tower_full".into()));

    // 149 s: the junk expired 49 s ago; the pass (every second) keeps it.
    srv.now.fetch_add(59, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        srv.tower
            .store()
            .subscription(junk.address())
            .expect("read")
            .is_some()
    );
    // 151 s: 51 s past its expiry; the next pass drops it.
    srv.now.fetch_add(2, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv
        .tower
        .store()
        .subscription(junk.address())
        .expect("read")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the periodic pass never dropped the junk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        srv.tower
            .store()
            .appointment(junk.address(), locator)
            .expect("read"),
        None
    );
    assert!(
        srv.tower
            .store()
            .appointment(kept.address(), locator2)
            .expect("read")
            .is_some()
    );
    let r = post(addr, "/register", &register_body(tw, &late)).await;
    assert_eq!(r.status, 200, "room again: {:?}", r.json());
    let (params3, signed3) = channel(3);
    let (locator3, blob3) = seal(&params3, &signed3).expect("seal");
    let r = post(
        addr,
        "/add_appointment",
        &appointment_body(&late, locator3, &blob3),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let metrics = String::from_utf8(get(addr, "/metrics").await.body).expect("utf8");
    assert!(
        metrics.contains("perun_tower_reclaimed_users_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("perun_tower_reclaimed_appointments_total 1\n"),
        "{metrics}"
    );
    srv.stop().await;
}
