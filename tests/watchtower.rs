//! Watchtowers on anvil (issue 14): real contracts, a real tower (its HTTP
//! API on 127.0.0.1 and its responder, `perun_watchtower::service`), real
//! clients over libp2p.
//!
//! - `alice_sigkilled`: the demo's story with Alice's process killed by
//!   SIGKILL once the tower holds her latest state; Bob registers an old
//!   state; the tower refutes and concludes; Alice starts again (a new
//!   process on her redb file) and finds the channel withdrawn with the
//!   latest state's balance.
//! - `two_towers_one_down`: Alice keeps appointments with two towers, one
//!   of which never answers; she is told so (events, `tower_status`), the
//!   other one covers her while she is offline.
//! - `tower_stores_nothing`: a tower that signs receipts and keeps nothing;
//!   nobody defends Alice, but the receipt her client kept (with the blob it
//!   covers) proves the tower took the job for her latest state.
//!
//! The tower's own crash and restart during a dispute are tested on the
//! binary in `watchtower/tests/tower_anvil.rs`.
//!
//! Runs as its own program (`harness = false`): the same binary is Alice's
//! process when `PERUN_TOWER_ROLE=alice`. `cargo test --features
//! perun/testing --test watchtower -- <name>` runs one scenario.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A test program.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, Options, Scenario};
use perun::adjudicator::testing::Anvil;
use perun::adjudicator::{Adjudicator, Deployment, EthAdjudicator, EthConfig, EthFunder};
use perun::channel::{Phase, SignedState, U256};
use perun::client::{
    AcceptAllForTesting, ChannelEvent, ChannelProposal, Client, Participant, TowerConfig,
};
use perun::persistence::RedbPersister;
use perun::wallet::{Account, LocalAccount};
use perun::watchtower::ChannelSecret;
use perun_watchtower::service::{Service, ServiceConfig};

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const PAY: u64 = 100;
const PAYMENTS: u64 = 5;
const CHALLENGE: u64 = 60;
const WAIT: Duration = Duration::from_secs(60);

fn u(x: u64) -> U256 {
    U256::from(x)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("PERUN_TOWER_ROLE").as_deref() == Ok("alice") {
        rt.block_on(alice_main());
        return;
    }
    let scenarios: &[(&str, Scenario)] = &[
        ("alice_sigkilled", || Box::pin(alice_sigkilled())),
        ("two_towers_one_down", || Box::pin(two_towers_one_down())),
        ("tower_stores_nothing", || Box::pin(tower_stores_nothing())),
    ];
    common::run_scenarios(&rt, "watchtower", scenarios, Duration::from_secs(240));
}

// ------------------------------------------------------------------ helpers

fn parts(ledger: &Ledger) -> (&Anvil, &Deployment, &EthConfig) {
    match ledger {
        Ledger::Anvil {
            anvil,
            deployment,
            config,
        } => (anvil, deployment, config),
        Ledger::Sim(_) => unreachable!("anvil only"),
    }
}

/// A tower (API and responder) with its own funded account and store.
async fn tower(ledger: &Ledger, dir: &std::path::Path) -> (Service, TowerConfig) {
    let (anvil, _, config) = parts(ledger);
    let account = Arc::new(anvil.funded_account().await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = ServiceConfig::new(anvil.ws_url(), config.clone());
    cfg.responder = perun_watchtower::responder::Config {
        poll_ms: 100,
        retry_min_ms: 50,
        retry_max_ms: 1_000,
        resume_grace_ms: 1_000,
    };
    let service = Service::start(account, &dir.join("tower.redb"), listener, cfg)
        .await
        .unwrap();
    // Ready once the responder has connected and scanned.
    tokio::time::timeout(WAIT, async {
        while service.stats().health().name() != "ok" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the tower's responder comes up");
    let tc = TowerConfig::new(
        format!("http://{}", service.addr()),
        service.tower().address(),
    );
    (service, tc)
}

/// Waits until `ch`'s tower `tower` holds a receipt for its latest state.
async fn covered(ch: &perun::client::Channel, tower: perun::channel::Address) {
    tokio::time::timeout(WAIT, async {
        while !ch
            .tower_status()
            .iter()
            .any(|s| s.tower == tower && s.latest)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the tower's receipt for the latest state");
}

/// Waits until the channel is concluded on-chain.
async fn concluded(adj: &Arc<dyn Adjudicator>, id: perun::channel::ChannelId) {
    tokio::time::timeout(WAIT, async {
        while !adj.dispute(id).await.unwrap().is_some_and(|d| d.concluded) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the dispute is concluded");
}

/// Waits until the tower counted `refutations` and `conclusions`, then
/// checks that it counted no more.
async fn counted(tower: &Service, refutations: u64, conclusions: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = tower.stats();
    let now = || {
        (
            stats.refutations.load(Relaxed),
            stats.conclusions.load(Relaxed),
        )
    };
    let _ = tokio::time::timeout(WAIT, async {
        while now().0 < refutations || now().1 < conclusions {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        now(),
        (refutations, conclusions),
        "the tower's refutations and conclusions"
    );
}

/// Bob pays Alice one payment, keeps that state, then pays the rest;
/// returns (the old state, the latest).
async fn bob_pays(bob_ch: &perun::client::Channel) -> (SignedState, SignedState) {
    bob_ch.pay(0, 0, u(PAY)).await.unwrap();
    let old = bob_ch.state();
    for _ in 1..PAYMENTS {
        bob_ch.pay(0, 0, u(PAY)).await.unwrap();
    }
    (old, bob_ch.state())
}

/// Both hold what `st` gives them (each minted `MINT` and put in `EACH`).
async fn check_balances(ledger: &Ledger, who: [perun::channel::Address; 2], st: &SignedState) {
    for (i, a) in who.into_iter().enumerate() {
        let want = u(MINT) - u(EACH) + st.state.outcome.balances[0][i];
        assert_eq!(ledger.balance(a).await, want, "participant {i}'s balance");
    }
}

// ------------------------------------------------------------ Alice (child)

/// Alice's process, configured by environment variables: opens a channel
/// with Bob (or, with `RESTART`, restores it), then reports on stdout.
async fn alice_main() {
    common::init_logs();
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let account = LocalAccount::from_slice(&hex::decode(env("ALICE_KEY")).unwrap()).unwrap();
    let (d, url) = common::deployment_from_env();
    let cfg = EthConfig::from_deployment(&d);
    let key = perun::wire::load_or_generate_key(std::path::Path::new(&env("NET_KEY"))).unwrap();
    let (accept_all, _opened) = AcceptAllForTesting::new();
    let client = Client::builder()
        .account(Arc::new(account.clone()))
        .network_key(key)
        .funder(Arc::new(
            EthFunder::connect(&url, &account, cfg.clone())
                .await
                .unwrap(),
        ))
        .adjudicator(Arc::new(
            EthAdjudicator::connect(&url, &account, cfg).await.unwrap(),
        ))
        .persister(Arc::new(RedbPersister::open(env("DB")).await.unwrap()))
        .proposal_handler(accept_all.clone())
        .update_handler(accept_all)
        .watchtower(TowerConfig::new(
            env("TOWER_URL"),
            env("TOWER").parse().unwrap(),
        ))
        .timeouts(common::test_timeouts(Duration::from_secs(60)))
        .build()
        .await
        .unwrap();
    if let Ok(id) = std::env::var("RESTART") {
        let ch = client.channel(&id.parse().unwrap()).expect("restored");
        ch.wait_for_phase(Phase::Withdrawn, WAIT).await.unwrap();
        println!("WITHDRAWN");
        client.shutdown().await;
        return;
    }
    let bob = Participant {
        address: env("BOB").parse().unwrap(),
        peer: env("BOB_PEER").parse().unwrap(),
    };
    client
        .add_peer(bob.peer, env("BOB_ADDR").parse().unwrap())
        .await
        .unwrap();
    let asset = perun::channel::Asset {
        chainId: U256::from(perun::adjudicator::testing::CHAIN_ID),
        holder: d.erc20_holder,
    };
    let proposal = ChannelProposal::payment(
        vec![
            Participant {
                address: client.address(),
                peer: client.peer_id(),
            },
            bob,
        ],
        perun::channel::Allocation::new(vec![asset], vec![vec![u(EACH), u(EACH)]]),
        CHALLENGE,
    );
    let ch = client.propose_channel(proposal).await.unwrap();
    ch.wait_for_version(PAYMENTS, WAIT).await.unwrap();
    covered(&ch, env("TOWER").parse().unwrap()).await;
    println!("COVERED {}", ch.state().state.version);
    // Wait for the SIGKILL.
    std::future::pending::<()>().await;
}

/// Alice's process with the common variables and `extra` ones.
fn spawn_alice(
    vars: &[(String, String)],
    extra: &[(&str, String)],
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("PERUN_TOWER_ROLE", "alice")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// The next line Alice prints (blocking; run on the blocking pool).
async fn next_line(
    mut out: BufReader<std::process::ChildStdout>,
) -> (String, BufReader<std::process::ChildStdout>) {
    tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        (line.trim().to_string(), out)
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------- scenarios

/// The demo's story, with Alice killed by SIGKILL.
async fn alice_sigkilled() {
    let ledger = Ledger::anvil().await;
    let dir = tempfile::tempdir().unwrap();
    let (tower, tc) = tower(&ledger, dir.path()).await;
    let mut bob = common::party(&ledger, u(MINT), &Options::default()).await;
    let alice_acc = ledger.account(u(MINT)).await;
    let alice = alice_acc.address();
    let (anvil, d, _) = parts(&ledger);
    let vars: Vec<(String, String)> = [
        ("ALICE_KEY", hex::encode(alice_acc.secret_bytes())),
        (
            "NET_KEY",
            dir.path().join("alice.key").display().to_string(),
        ),
        ("DB", dir.path().join("alice.redb").display().to_string()),
        ("TOWER_URL", tc.url.clone()),
        ("TOWER", tc.address.to_string()),
    ]
    .into_iter()
    .chain(common::deployment_vars(d, anvil))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bob_addr = bob.client.listen_addrs().await.unwrap()[0].to_string();
    let (mut child, out) = spawn_alice(
        &vars,
        &[
            ("BOB", bob.client.address().to_string()),
            ("BOB_PEER", bob.client.peer_id().to_string()),
            ("BOB_ADDR", bob_addr),
        ],
    );
    let bob_ch = bob.accepted().await;
    let (old, latest) = bob_pays(&bob_ch).await;
    let (line, _out) = next_line(out).await;
    assert_eq!(line, format!("COVERED {}", latest.state.version));
    // Gone, without a word: SIGKILL.
    child.kill().unwrap();
    child.wait().unwrap();

    let id = bob_ch.id();
    bob.client.shutdown().await;
    let adj = common::bob_registers(&ledger, &bob, &bob_ch, old).await;
    common::on_chain_version(&adj, &bob_ch, latest.state.version).await;
    ledger.advance(CHALLENGE + 1).await;
    concluded(&adj, id).await;
    // The chain shows each transaction as soon as it is mined; the tower
    // counts it once its receipt is back, a moment later under load.
    counted(&tower, 1, 1).await;
    // Payouts went straight to both: Bob is paid without withdrawing.
    check_balances(&ledger, [alice, bob.client.address()], &latest).await;

    // Alice comes back: her restored channel ends withdrawn.
    let (mut again, out) = spawn_alice(&vars, &[("RESTART", id.to_string())]);
    let (line, _out) = next_line(out).await;
    assert_eq!(line, "WITHDRAWN");
    assert!(again.wait().unwrap().success());
    check_balances(&ledger, [alice, bob.client.address()], &latest).await;
    tower.stop().await.unwrap();
}

/// Two towers, one of which never answers: Alice is told, the other covers her.
async fn two_towers_one_down() {
    let ledger = Ledger::anvil().await;
    let dir = tempfile::tempdir().unwrap();
    let (tower, up) = tower(&ledger, dir.path()).await;
    let down = {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        TowerConfig::new(
            format!("http://{}", l.local_addr().unwrap()),
            LocalAccount::random().address(),
        )
    };
    let alice_opts = Options {
        towers: vec![down.clone(), up.clone()],
        ..Options::default()
    };
    let mut ps = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = common::open(&ledger, &mut ps, u(EACH)).await;
    let mut events = chans[0].events();
    let (old, latest) = bob_pays(&chans[1]).await;
    common::caught_up(&chans).await;
    covered(&chans[0], up.address).await;
    // The down tower is reported, with the version it missed.
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(ChannelEvent::TowerFailed { tower, .. }) = events.next().await
                && tower == down.address
            {
                return;
            }
        }
    })
    .await
    .expect("a TowerFailed event for the down tower");
    let status = chans[0].tower_status();
    let of = |t| status.iter().find(|s| s.tower == t).unwrap();
    assert_eq!(of(down.address).version, None);
    assert_eq!(of(up.address).version, Some(latest.state.version));

    // Alice goes offline; Bob cheats; the tower that is up answers.
    let id = chans[0].id();
    ps[0].client.shutdown().await;
    ps[1].client.shutdown().await;
    let adj = common::bob_registers(&ledger, &ps[1], &chans[1], old).await;
    common::on_chain_version(&adj, &chans[1], latest.state.version).await;
    ledger.advance(CHALLENGE + 1).await;
    concluded(&adj, id).await;
    check_balances(
        &ledger,
        [ps[0].client.address(), ps[1].client.address()],
        &latest,
    )
    .await;
    drop(chans);
    tower.stop().await.unwrap();
}

/// A tower that takes appointments, signs receipts and keeps nothing (its
/// store is gone, no responder). Nobody defends Alice; the receipt her
/// client stored, with the blob it covers, proves the tower took the job.
async fn tower_stores_nothing() {
    use perun_watchtower::api::{self, Config, Tower};
    let ledger = Ledger::anvil().await;
    let dir = tempfile::tempdir().unwrap();
    let tower_key = Arc::new(LocalAccount::random());
    let db = dir.path().join("lazy.redb");
    let tower = Arc::new(
        Tower::new(
            perun_watchtower::store::Store::open(&db).unwrap(),
            Arc::clone(&tower_key),
            Config::default(),
            api::system_clock(),
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(api::serve(listener, Arc::clone(&tower), async {
        let _ = stopped.await;
    }));
    let lazy = TowerConfig::new(url, tower_key.address());
    let alice_opts = Options {
        towers: vec![lazy.clone()],
        ..Options::default()
    };
    let mut ps = vec![
        common::party(&ledger, u(MINT), &alice_opts).await,
        common::party(&ledger, u(MINT), &Options::default()).await,
    ];
    common::introduce(&ps).await;
    let chans = common::open(&ledger, &mut ps, u(EACH)).await;
    let (old, latest) = bob_pays(&chans[1]).await;
    common::caught_up(&chans).await;
    covered(&chans[0], lazy.address).await;
    // The tower forgets everything.
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    drop(tower);
    std::fs::remove_file(&db).unwrap();

    // Alice goes offline; Bob cheats and nobody refutes.
    let id = chans[0].id();
    let params = chans[0].params().clone();
    let alice_address = params.participants[0];
    let mut chans = chans;
    let bob_ch = chans.pop().unwrap();
    drop(chans); // Alice's handle keeps her old client (and its store) alive.
    let alice = ps.remove(0);
    let alice = common::restart_opts(
        &ledger,
        alice,
        &Options {
            towers: vec![lazy.clone()],
            ..Options::default()
        },
    )
    .await;
    let restored = alice.client.channel(&id).expect("restored");
    let status = restored.tower_status();
    alice.client.shutdown().await;
    ps[0].client.shutdown().await;
    let adj = common::bob_registers(&ledger, &ps[0], &bob_ch, old.clone()).await;
    ledger.advance(CHALLENGE + 1).await;
    adj.conclude(&perun::adjudicator::SignedChannel {
        params: params.clone(),
        state: old.clone(),
    })
    .await
    .unwrap();
    concluded(&adj, id).await;
    assert_eq!(
        adj.dispute(id).await.unwrap().unwrap().version,
        old.state.version,
        "nobody refuted"
    );

    // The proof, from Alice's store after her restart: the tower signed a
    // receipt for this channel's locator, over Alice's signature of a blob
    // that holds the latest state.
    let mine = status
        .iter()
        .find(|s| s.tower == lazy.address)
        .expect("the lazy tower's status");
    let r = mine.receipt.clone().expect("the stored receipt");
    assert_eq!(r.version, latest.state.version);
    let receipt = perun::watchtower::Receipt {
        tower: r.tower,
        locator: r.locator,
        start_block: r.start_block,
        user_signature: r.user_signature.clone(),
        tower_signature: r.tower_signature.clone(),
    };
    receipt.verify().expect("signed by the tower");
    let secret = ChannelSecret::of(&params);
    assert_eq!(r.locator, secret.locator(), "for this channel");
    let blob = mine
        .blob
        .clone()
        .expect("the blob is kept with the receipt");
    let signer = perun::wallet::recover(
        perun::watchtower::messages::appointment_hash(&r.locator, r.seq, &blob),
        &perun::wallet::parse_signature(&r.user_signature).unwrap(),
    )
    .unwrap();
    // The channel's own identity at the tower (Alice holds its key in her
    // store), never her on-chain account.
    assert_eq!(Some(signer), mine.user, "the channel's appointment");
    assert_ne!(signer, alice_address, "the tower never saw Alice's account");
    let (_, signed) = perun::watchtower::open(&secret, &blob).expect("the blob opens");
    assert_eq!(signed, latest, "the blob holds the latest state");
}
