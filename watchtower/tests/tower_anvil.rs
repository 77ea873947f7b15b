//! The `perun-watchtower` binary on anvil, killed with SIGKILL during
//! disputes: after its refutation and before the conclusion of one channel,
//! and while a second channel's dispute starts. Restarted on the same
//! database it refutes each stale state once, concludes each channel once
//! (the tower account's nonce counts its transactions) and the participants
//! are paid the latest states' balances. An appointment sent after its
//! dispute started (and after a kill) is acted on too. Fails loudly
//! without anvil (`cargo xtask setup`).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy_primitives::{B256, U256};
use perun_adjudicator::bindings::AssetHolderETH;
use perun_adjudicator::testing::{Anvil, CHAIN_ID};
use perun_adjudicator::{
    Adjudicator, Deployment, EthAdjudicator, EthConfig, SignedChannel, deploy,
};
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State};
use perun_wallet::keystore::{self, ScryptParams};
use perun_wallet::{Account, LocalAccount, signature_bytes};
use perun_watchtower::messages;
use perun_watchtower::scheme::seal;
use rand::RngCore;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_perun-watchtower");
const DEPOSIT: u64 = 1_000_000;

/// The tower process; killed with SIGKILL on drop.
struct Tower(Child);

impl Tower {
    fn kill9(&mut self) {
        // `Child::kill` is SIGKILL on unix.
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Tower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex(b: &[u8]) -> String {
    format!("0x{}", ::hex::encode(b))
}

fn sig(account: &LocalAccount, hash: B256) -> String {
    hex(&signature_bytes(&account.sign_hash(hash).unwrap()))
}

struct Channel {
    params: Params,
    initial: State,
}

struct World {
    anvil: Anvil,
    d: Deployment,
    deployer: LocalAccount,
    bob_chain: EthAdjudicator,
    alice: LocalAccount,
    bob: LocalAccount,
    tower: LocalAccount,
    dir: tempfile::TempDir,
    listen: SocketAddr,
}

impl World {
    async fn new() -> Self {
        let anvil = Anvil::spawn()
            .await
            .expect("anvil is required: run cargo xtask setup");
        let deployer = anvil.funded_account().await.unwrap();
        let d = deploy(&anvil.provider(&deployer).await.unwrap())
            .await
            .unwrap();
        let bob_chain =
            EthAdjudicator::connect(&anvil.ws_url(), &deployer, EthConfig::from_deployment(&d))
                .await
                .unwrap();
        let tower = anvil.funded_account().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        keystore::save(
            &tower,
            dir.path().join("tower.json"),
            "pw",
            ScryptParams::LIGHT,
        )
        .unwrap();
        std::fs::write(dir.path().join("pw"), "pw\n").unwrap();
        std::fs::write(
            dir.path().join("tower.toml"),
            "[responder]\npoll_ms = 200\nretry_min_ms = 100\nretry_max_ms = 1000\nresume_grace_ms = 1000\n",
        )
        .unwrap();
        Self {
            anvil,
            d,
            deployer,
            bob_chain,
            alice: LocalAccount::random(),
            bob: LocalAccount::random(),
            tower,
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            dir,
        }
    }

    fn start_tower(&self) -> Tower {
        let p = |f: &str| self.dir.path().join(f);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p("tower.log"))
            .unwrap();
        Tower(
            Command::new(BIN)
                .arg("--rpc")
                .arg(self.anvil.ws_url())
                .arg("--adjudicator")
                .arg(self.d.adjudicator.to_string())
                .arg("--from-block")
                .arg(self.d.block.to_string())
                .arg("--keystore")
                .arg(p("tower.json"))
                .arg("--password-file")
                .arg(p("pw"))
                .arg("--db")
                .arg(p("tower.redb"))
                .arg("--listen")
                .arg(self.listen.to_string())
                .arg("--config")
                .arg(p("tower.toml"))
                .env("RUST_LOG", "info,perun_watchtower=debug")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tower.log")).unwrap_or_default()
    }

    /// Waits until the tower answers and its responder has scanned.
    async fn until_ready(&self) {
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                let h = common::get(self.listen, "/health").await.json();
                if h["responder"]["status"] == "ok" {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the tower never became ready; log:\n{}", self.log());
    }

    /// A funded channel between Alice and Bob (the deployer deposits both shares).
    async fn channel(&self) -> Channel {
        let domain = Domain {
            chain_id: U256::from(CHAIN_ID),
            adjudicator: self.d.adjudicator,
        };
        let funding = vec![vec![U256::from(DEPOSIT); 2]];
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let params = Params::payment(
            domain,
            60,
            U256::from_be_bytes(nonce),
            vec![self.alice.address(), self.bob.address()],
            funding.clone(),
        );
        let asset = Asset {
            chainId: U256::from(CHAIN_ID),
            holder: self.d.eth_holder,
        };
        let initial = State::initial(&params, Allocation::new(vec![asset], funding));
        let provider = self.anvil.provider(&self.deployer).await.unwrap();
        let holder = AssetHolderETH::new(self.d.eth_holder, provider);
        for who in [self.alice.address(), self.bob.address()] {
            holder
                .depositEth(params.channel_id(), who, U256::ZERO)
                .value(U256::from(DEPOSIT))
                .send()
                .await
                .unwrap()
                .get_receipt()
                .await
                .unwrap();
        }
        Channel { params, initial }
    }

    /// Version `v` of `ch`: Alice `DEPOSIT + 1000 v`, Bob the rest; fully signed.
    fn state(&self, ch: &Channel, v: u64) -> SignedState {
        let mut st = ch.initial.clone();
        st.version = v;
        st.outcome.balances[0][0] = U256::from(DEPOSIT + 1000 * v);
        st.outcome.balances[0][1] = U256::from(DEPOSIT - 1000 * v);
        let mut s = SignedState::new(st);
        s.sign(&ch.params, 0, &self.alice).unwrap();
        s.sign(&ch.params, 1, &self.bob).unwrap();
        s
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = common::post(self.listen, path, &body).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
        r.json()
    }

    async fn register_alice(&self) {
        let user = self.alice.address();
        self.post(
            "/register",
            json!({ "user": user, "signature": sig(&self.alice, messages::register_hash(self.tower.address(), user)) }),
        )
        .await;
    }

    /// Alice hands the tower an appointment for version `v` of `ch`.
    async fn appoint(&self, ch: &Channel, v: u64) -> B256 {
        let (locator, blob) = seal(&ch.params, &self.state(ch, v)).unwrap();
        self.post(
            "/add_appointment",
            json!({
                "locator": locator,
                "seq": 1,
                "blob": hex(&blob),
                "signature": sig(&self.alice, messages::appointment_hash(&locator, 1, &blob)),
            }),
        )
        .await;
        locator
    }

    async fn status(&self, locator: B256) -> String {
        let tower = self.tower.address();
        let r = self
            .post(
                "/get_appointment",
                json!({ "locator": locator, "signature": sig(&self.alice, messages::get_appointment_hash(tower, &locator)) }),
            )
            .await;
        r["status"].as_str().unwrap().to_string()
    }

    /// Bob registers version `v` of `ch` (sent by the deployer's account).
    async fn bob_registers(&self, ch: &Channel, v: u64) {
        self.bob_chain
            .register(&SignedChannel {
                params: ch.params.clone(),
                state: self.state(ch, v),
            })
            .await
            .unwrap();
    }

    async fn dispute(&self, ch: &Channel) -> Option<perun_adjudicator::Dispute> {
        self.bob_chain
            .dispute(ch.params.channel_id())
            .await
            .unwrap()
    }

    /// The tower account's transactions so far (its nonce), read over JSON-RPC.
    async fn tower_txs(&self) -> u64 {
        let tower = self.tower.address();
        self.rpc_u64("eth_getTransactionCount", json!([tower, "latest"]))
            .await
    }

    /// The node's latest block number.
    async fn block_number(&self) -> u64 {
        self.rpc_u64("eth_blockNumber", json!([])).await
    }

    /// A JSON-RPC call answering a hex quantity.
    async fn rpc_u64(&self, method: &str, params: Value) -> u64 {
        let url = self.anvil.http_url();
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let r = common::post(
            addr,
            "/",
            &json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
        )
        .await;
        let n = r.json()["result"].as_str().unwrap().to_string();
        u64::from_str_radix(n.trim_start_matches("0x"), 16).unwrap()
    }

    async fn until(&self, what: &str, mut f: impl AsyncFnMut() -> bool) {
        for _ in 0..300 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}; tower log:\n{}", self.log());
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_killed_during_disputes_refutes_once_and_concludes_once() {
    let w = World::new().await;
    let one = w.channel().await;
    let two = w.channel().await;
    let mut tower = w.start_tower();
    w.until_ready().await;

    // Alice registers with the tower and hands it her latest states.
    w.register_alice().await;
    let loc_one = w.appoint(&one, 5).await;
    let loc_two = w.appoint(&two, 7).await;
    assert_eq!(w.status(loc_one).await, "being_watched");

    // Bob registers an old state of channel one; the tower refutes it.
    w.bob_registers(&one, 2).await;
    w.until("the refutation of channel one", async || {
        w.dispute(&one).await.is_some_and(|d| d.version == 5)
    })
    .await;
    assert_eq!(w.tower_txs().await, 1);
    assert_eq!(w.status(loc_one).await, "dispute_triggered");

    // SIGKILL after the refutation, before the conclusion; while it is
    // down, Bob registers an old state of channel two.
    tower.kill9();
    w.bob_registers(&two, 3).await;
    assert!(!w.dispute(&one).await.unwrap().concluded);

    let _tower = w.start_tower();
    w.until_ready().await;
    w.until("the refutation of channel two", async || {
        w.dispute(&two).await.is_some_and(|d| d.version == 7)
    })
    .await;
    // Channel one's refutation is not sent again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.tower_txs().await, 2);

    // The challenge periods end: the tower concludes both channels.
    w.anvil.increase_time(61).await.unwrap();
    w.anvil.mine(1).await.unwrap();
    w.until("both conclusions", async || {
        w.dispute(&one).await.is_some_and(|d| d.concluded)
            && w.dispute(&two).await.is_some_and(|d| d.concluded)
    })
    .await;
    w.until("both resolved", async || {
        w.status(loc_one).await == "resolved" && w.status(loc_two).await == "resolved"
    })
    .await;
    // Nothing more goes out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.tower_txs().await, 4, "2 refutations + 2 conclusions");

    // Paid straight to the participants: the latest states' balances.
    let alice = w.anvil.eth_balance(w.alice.address()).await.unwrap();
    let bob = w.anvil.eth_balance(w.bob.address()).await.unwrap();
    assert_eq!(alice, U256::from(2 * DEPOSIT + 1000 * (5 + 7)));
    assert_eq!(bob, U256::from(2 * DEPOSIT - 1000 * (5 + 7)));

    let text = String::from_utf8(common::get(w.listen, "/metrics").await.body).unwrap();
    assert_eq!(metric(&text, "perun_tower_refutations_total"), 1);
    assert_eq!(metric(&text, "perun_tower_conclusions_total"), 2);
    assert_eq!(metric(&text, "perun_tower_bad_blobs_total"), 0);
    assert_eq!(metric(&text, "perun_tower_responder_up"), 1);
}

/// SIGKILL at random moments around the conclusions (before one is sent,
/// while it is out, after it landed but before the job recorded it): the
/// restarted tower never sends one twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_killed_around_the_conclusions_concludes_each_once() {
    let w = World::new().await;
    let channels = [w.channel().await, w.channel().await, w.channel().await];
    let mut tower = w.start_tower();
    w.until_ready().await;
    w.register_alice().await;
    let mut locators = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        locators.push(w.appoint(ch, 4 + i as u64).await);
        w.bob_registers(ch, 1).await;
    }
    w.until("three refutations", async || {
        let mut all = true;
        for (i, ch) in channels.iter().enumerate() {
            all &= w
                .dispute(ch)
                .await
                .is_some_and(|d| d.version == 4 + i as u64);
        }
        all
    })
    .await;
    assert_eq!(w.tower_txs().await, 3);

    w.anvil.increase_time(61).await.unwrap();
    w.anvil.mine(1).await.unwrap();
    // Kill it a few times while it concludes, at random points.
    for _ in 0..3 {
        let pause = rand::random::<u64>() % 400;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        tower.kill9();
        tower = w.start_tower();
        w.until_ready().await;
    }
    w.until("every conclusion", async || {
        let mut all = true;
        for ch in &channels {
            all &= w.dispute(ch).await.is_some_and(|d| d.concluded);
        }
        all
    })
    .await;
    for l in &locators {
        let l = *l;
        w.until("resolved", async || w.status(l).await == "resolved")
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.tower_txs().await, 6, "3 refutations + 3 conclusions");
    let alice = w.anvil.eth_balance(w.alice.address()).await.unwrap();
    assert_eq!(alice, U256::from(3 * DEPOSIT + 1000 * (4 + 5 + 6)));
    drop(tower);
}

/// Bob registers a stale state while the tower holds nothing for the
/// channel, and the tower scans past it; it is then killed and restarted.
/// Alice's appointment arrives only now, during the challenge period: the
/// tower keeps running disputes (over the kill), so it refutes, and
/// concludes once the period is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appointment_sent_during_the_dispute_is_acted_on_after_a_kill() {
    let w = World::new().await;
    let ch = w.channel().await;
    let mut tower = w.start_tower();
    w.until_ready().await;
    w.bob_registers(&ch, 2).await;
    let head = w.block_number().await;
    w.until("the tower scanned past the registration", async || {
        let h = common::get(w.listen, "/health").await.json();
        h["responder"]["cursor"].as_u64().is_some_and(|c| c >= head)
    })
    .await;
    tower.kill9();
    let _tower = w.start_tower();
    w.until_ready().await;

    w.register_alice().await;
    let locator = w.appoint(&ch, 5).await;
    w.until("the refutation", async || {
        w.dispute(&ch).await.is_some_and(|d| d.version == 5)
    })
    .await;
    w.anvil.increase_time(61).await.unwrap();
    w.anvil.mine(1).await.unwrap();
    w.until("resolved", async || w.status(locator).await == "resolved")
        .await;
    assert!(w.dispute(&ch).await.unwrap().concluded);
    assert_eq!(w.tower_txs().await, 2, "1 refutation + 1 conclusion");
    let alice = w.anvil.eth_balance(w.alice.address()).await.unwrap();
    assert_eq!(alice, U256::from(DEPOSIT + 1000 * 5));
    let text = String::from_utf8(common::get(w.listen, "/metrics").await.body).unwrap();
    assert_eq!(metric(&text, "perun_tower_late_jobs_total"), 1);
}
