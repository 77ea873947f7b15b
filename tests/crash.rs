//! Crash recovery (issue 7, §6): Bob's client runs in a child process that
//! is stopped at a protocol step (a failpoint), killed with SIGKILL, and
//! restarted from its redb file. In every case the channel ends settled,
//! both parties hold exactly what the latest state both signed gives them,
//! and nothing is stuck. Alice runs in this process; both use the real
//! contracts on anvil.
//!
//! Runs as its own program (`harness = false`): the same binary is Bob's
//! process when `PERUN_CRASH_ROLE=bob`.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A test program.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use common::{Ledger, Options, Party, Scenario};
use perun::adjudicator::{EthAdjudicator, EthConfig, EthFunder, SignedChannel, WithdrawRequest};
use perun::channel::{Allocation, Phase, SignedState, U256};
use perun::client::{AcceptAllForTesting, Channel, Client, Timeouts};
use perun::persistence::RedbPersister;
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Multiaddr, PeerId};

const MINT: u64 = 1_000_000;
const EACH: u64 = 1_000;
const CHALLENGE: u64 = 60;
const WAIT: Duration = Duration::from_secs(60);

fn u(x: u64) -> U256 {
    U256::from(x)
}

/// Runs every crash scenario (each with its own anvil, Alice here, Bob in
/// a child process), or Bob's process when `PERUN_CRASH_ROLE=bob`.
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("PERUN_CRASH_ROLE").as_deref() == Ok("bob") {
        rt.block_on(bob_main());
        return;
    }
    let scenarios: &[(&str, Scenario)] = &[
        ("accepted", || Box::pin(crash_after_accepting())),
        ("signed0", || Box::pin(crash_after_signing0())),
        ("funding", || Box::pin(crash_during_funding())),
        ("update_before_persist", || {
            Box::pin(crash_during_update("update_before_persist", 7))
        }),
        ("update_after_persist", || {
            Box::pin(crash_during_update("update_after_persist", 8))
        }),
        (
            "propose_before_commit",
            || Box::pin(crash_while_proposing()),
        ),
        ("settle_concluded", || Box::pin(crash_during_settle())),
        ("refute", || Box::pin(crash_during_dispute())),
    ];
    common::run_scenarios(&rt, "crash at", scenarios, Duration::from_secs(180));
}

// ---------------------------------------------------------------- Bob (child)

/// Opens Bob's store, waiting while it is still locked: his failpoint stops
/// him by running `kill -STOP`, and a child forked for that holds copies of
/// his files (the store's lock) until it execs. Killed meanwhile, Bob can
/// leave it behind him for a moment (a CI run's restart failed
/// `AlreadyOpen` so).
async fn open_store(path: &str) -> RedbPersister {
    for _ in 0..100 {
        match RedbPersister::open(path).await {
            Err(perun::persistence::Error::AlreadyOpen) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened => return opened.unwrap(),
        }
    }
    panic!("{path} still locked after 5 s")
}

/// Bob's process: a client on redb that takes commands on stdin.
async fn bob_main() {
    common::init_logs();
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let account = LocalAccount::from_slice(&hex(&env("BOB_KEY"))).unwrap();
    let (d, url) = common::deployment_from_env();
    let cfg = EthConfig::from_deployment(&d);
    let key = perun::wire::load_or_generate_key(std::path::Path::new(&env("NET_KEY"))).unwrap();
    let (accept_all, mut opened) = AcceptAllForTesting::new();
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
        .persister(Arc::new(open_store(&env("DB")).await))
        .proposal_handler(accept_all.clone())
        .update_handler(accept_all)
        .peer(
            env("ALICE_PEER").parse().unwrap(),
            env("ALICE_ADDR").parse().unwrap(),
        )
        .timeouts(Timeouts {
            dispute_poll: Duration::from_millis(50),
            settle_cooperative: Duration::from_secs(5),
            funding: Duration::from_secs(60),
            ..Timeouts::default()
        })
        .build()
        .await
        .unwrap();
    let addr = client.listen_addrs().await.unwrap()[0].clone();
    say(&format!("READY {} {addr}", client.peer_id()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            Some(ch) = opened.recv() => if let Err(e) = ch {
                say(&format!("OPEN_FAILED {e}"));
            },
            line = rx.recv() => {
                let Some(line) = line else { return };
                let reply = match (line.as_str(), current(&client).await) {
                    ("status", Some(ch)) => format!("STATUS {:?} {}", ch.phase(), ch.state().state.version),
                    ("status", None) => "STATUS none".into(),
                    ("settle", Some(ch)) => match ch.settle().await {
                        Ok(()) => "OK".into(),
                        Err(e) => format!("ERR {e}"),
                    },
                    (cmd, Some(ch)) if cmd.starts_with("pay ") => {
                        let amount: u64 = cmd[4..].parse().unwrap();
                        match ch.pay(0, 0, u(amount)).await {
                            Ok(s) => format!("OK {}", s.state.version),
                            Err(e) => format!("ERR {e}"),
                        }
                    }
                    (other, _) => format!("ERR cannot {other}"),
                };
                say(&reply);
            }
        }
    }
}

/// Bob's channel: the one not yet withdrawn, once it is past opening.
async fn current(client: &Client) -> Option<Channel> {
    let ch = client
        .channels()
        .into_iter()
        .find(|c| c.phase() != Phase::Withdrawn)
        .or_else(|| client.channels().pop())?;
    if matches!(ch.phase(), Phase::Signing0 | Phase::Funding) {
        let _ = ch.wait_for_phase(Phase::Active, WAIT).await;
    }
    Some(ch)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

// --------------------------------------------------------------- the parent

/// Bob's process as seen from the test.
struct Bob {
    child: Child,
    stdin: ChildStdin,
    lines: std_mpsc::Receiver<String>,
    history: std::cell::RefCell<Vec<String>>,
    peer: PeerId,
    addr: Multiaddr,
}

impl Bob {
    fn next_line(&self) -> String {
        match self.lines.recv_timeout(2 * WAIT) {
            Ok(line) => {
                let mut h = self.history.borrow_mut();
                if h.len() == 40 {
                    h.remove(0);
                }
                h.push(line.clone());
                line
            }
            Err(e) => panic!(
                "no line from Bob in time ({e}); his last lines:\n{}",
                self.history.borrow().join("\n")
            ),
        }
    }

    /// Waits for a line starting with `prefix`, skipping others.
    fn expect(&self, prefix: &str) -> String {
        loop {
            let l = self.next_line();
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let l = self.next_line();
            if l.starts_with("OK") || l.starts_with("ERR") || l.starts_with("STATUS") {
                return l;
            }
        }
    }

    /// SIGKILLs Bob at once: the failpoint's own stop (`kill -STOP`, a
    /// child process) takes milliseconds, in which his other threads run on
    /// (at `accepted`, far enough to store the channel).
    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

/// What Bob's process needs to (re)start.
struct BobSetup {
    account: LocalAccount,
    dir: tempfile::TempDir,
}

fn spawn_bob(
    ledger: &Ledger,
    setup: &BobSetup,
    alice: &Party,
    alice_addr: &Multiaddr,
    failpoint: Option<&str>,
) -> Bob {
    let Ledger::Anvil {
        anvil, deployment, ..
    } = ledger
    else {
        panic!("crash tests run on anvil")
    };
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("PERUN_CRASH_ROLE", "bob")
        .env(
            "BOB_KEY",
            perun::wallet::B256::from(setup.account.secret_bytes())
                .to_string()
                .trim_start_matches("0x"),
        )
        .envs(common::deployment_vars(deployment, anvil))
        .env("NET_KEY", setup.dir.path().join("net.key"))
        .env("DB", setup.dir.path().join("bob.redb"))
        .env("ALICE_PEER", alice.client.peer_id().to_string())
        .env("ALICE_ADDR", alice_addr.to_string())
        .env_remove("PERUN_FAILPOINT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(fp) = failpoint {
        cmd.env("PERUN_FAILPOINT", fp);
    }
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        let verbose = std::env::var_os("PERUN_CRASH_VERBOSE").is_some();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if verbose {
                eprintln!("bob> {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut bob = Bob {
        child,
        stdin,
        lines,
        history: Default::default(),
        peer: PeerId::random(),
        addr: alice_addr.clone(),
    };
    let ready = bob.expect("READY ");
    let mut parts = ready.split(' ').skip(1);
    bob.peer = parts.next().unwrap().parse().unwrap();
    bob.addr = parts.next().unwrap().parse().unwrap();
    bob
}

struct World {
    ledger: Ledger,
    alice: Party,
    alice_addr: Multiaddr,
    bob_setup: BobSetup,
}

async fn world() -> World {
    let ledger = Ledger::anvil().await;
    let alice = common::party(&ledger, u(MINT), &Options::default()).await;
    let alice_addr = alice.client.listen_addrs().await.unwrap()[0].clone();
    let account = ledger.account(u(MINT)).await;
    World {
        ledger,
        alice,
        alice_addr,
        bob_setup: BobSetup {
            account,
            dir: tempfile::tempdir().unwrap(),
        },
    }
}

impl World {
    fn bob(&self, failpoint: Option<&str>) -> Bob {
        spawn_bob(
            &self.ledger,
            &self.bob_setup,
            &self.alice,
            &self.alice_addr,
            failpoint,
        )
    }

    async fn meet(&self, bob: &Bob) {
        self.alice
            .client
            .add_peer(bob.peer, bob.addr.clone())
            .await
            .unwrap();
    }

    fn proposal(&self, bob: &Bob) -> perun::client::ChannelProposal {
        perun::client::ChannelProposal::payment(
            vec![
                self.alice.participant(),
                perun::client::Participant {
                    address: self.bob_setup.account.address(),
                    peer: bob.peer,
                },
            ],
            perun::channel::Allocation::new(
                vec![self.ledger.asset()],
                vec![vec![u(EACH), u(EACH)]],
            ),
            CHALLENGE,
        )
    }

    /// Both sides' balances equal `st`'s outcome (after everything is withdrawn).
    async fn check(&self, st: &SignedState) {
        let addrs = [
            self.alice.client.address(),
            self.bob_setup.account.address(),
        ];
        for (i, a) in addrs.iter().enumerate() {
            assert_eq!(
                self.ledger.balance(*a).await,
                u(MINT - EACH) + st.state.outcome.balances[0][i],
                "participant {i} holds exactly its share of the latest state"
            );
        }
    }

    /// Alice proposes a channel to a Bob who is killed at `failpoint`
    /// during the opening; returns Alice's proposal, still running.
    async fn propose_and_kill_bob_at(
        &self,
        failpoint: &str,
    ) -> tokio::task::JoinHandle<perun::client::Result<Channel>> {
        let bob = self.bob(Some(failpoint));
        self.meet(&bob).await;
        let prop = self.proposal(&bob);
        let alice = self.alice.client.clone();
        let opening = tokio::spawn(async move { alice.propose_channel(prop).await });
        bob.expect(&format!("FAILPOINT {failpoint}"));
        bob.kill();
        opening
    }

    /// Opens a channel with a running Bob.
    async fn open(&self, bob: &Bob) -> Channel {
        self.meet(bob).await;
        self.alice
            .client
            .propose_channel(self.proposal(bob))
            .await
            .unwrap()
    }

    /// Settles from both sides and checks the balances: the final state
    /// pays out Alice's latest state.
    async fn settle_both(&self, alice: &Channel, bob: &mut Bob) {
        let latest = alice.state().state.outcome;
        self.settle_both_on(alice, bob, &[latest]).await;
    }

    /// The same, where the final state may pay out any of `outcomes`.
    async fn settle_both_on(&self, alice: &Channel, bob: &mut Bob, outcomes: &[Allocation]) {
        // Bob's commands block this thread; Alice settles on a task of her own.
        let alice_settles = tokio::spawn({
            let alice = alice.clone();
            async move { alice.settle().await }
        });
        let b = bob.command("settle");
        alice_settles.await.unwrap().unwrap();
        assert_eq!(b, "OK", "Bob settles");
        let fin = alice.state();
        assert!(fin.state.isFinal);
        assert!(
            outcomes.contains(&fin.state.outcome),
            "final {:?}, expected one of {outcomes:?}",
            fin.state.outcome
        );
        self.check(&fin).await;
    }
}

async fn crash_after_accepting() {
    let w = world().await;
    let opening = w.propose_and_kill_bob_at("accepted").await;
    assert!(
        opening.await.unwrap().is_err(),
        "the proposal fails without Bob"
    );
    assert!(w.alice.client.channels().is_empty());
    // Nothing is stuck: a restarted Bob opens a new channel and settles it.
    let mut bob = w.bob(None);
    assert_eq!(bob.command("status"), "STATUS none");
    let ch = w.open(&bob).await;
    w.settle_both(&ch, &mut bob).await;
}

async fn crash_after_signing0() {
    let w = world().await;
    let opening = w.propose_and_kill_bob_at("signed0").await;
    // Bob restarts in `Funding` and deposits; Alice's funding completes.
    let mut bob = w.bob(None);
    w.meet(&bob).await;
    let ch = opening
        .await
        .unwrap()
        .expect("the channel opens after Bob's restart");
    // Bob sees the funding on his own schedule.
    wait_status(&mut bob, "STATUS Active 0").await;
    w.settle_both(&ch, &mut bob).await;
}

async fn crash_during_funding() {
    let w = world().await;
    let opening = w.propose_and_kill_bob_at("funding").await;
    let mut bob = w.bob(None);
    w.meet(&bob).await;
    let ch = opening
        .await
        .unwrap()
        .expect("the channel opens after Bob's restart");
    ch.pay(1, 0, u(5)).await.unwrap();
    w.settle_both(&ch, &mut bob).await;
}

async fn crash_during_update(failpoint: &str, amount: u64) {
    let w = world().await;
    let bob = w.bob(Some(failpoint));
    let ch = w.open(&bob).await;
    let before = ch.state();
    let paying = tokio::spawn({
        let ch = ch.clone();
        async move { ch.pay(1, 0, u(amount)).await }
    });
    bob.expect("FAILPOINT");
    bob.kill();
    assert!(
        paying.await.unwrap().is_err(),
        "the update fails while Bob is gone"
    );
    let mut bob = w.bob(None);
    w.meet(&bob).await;
    // After the restart both sides agree: on the old state if Bob had not
    // stored his signature. If he had, on the new one when his `Sync`
    // reaches Alice first (she completes her failed proposal with it), or
    // on the old one when hers reaches him first (she no longer holds it,
    // so he drops it: DESIGN §8, `Sync`). Which comes first is a race of
    // the two clients' reconnects; both outcomes are safe. Bob's `Sync`
    // may also come after they seemed to agree on the old one (he dropped
    // the update on Alice's, his own was still on its way): she completes
    // it then, and the next `Sync` brings him along. So the close may pay
    // out either state (a stress run saw the new one).
    let mut paid = before.state.outcome.clone();
    paid.balances[0][0] -= u(amount);
    paid.balances[0][1] += u(amount);
    let (expect, outcomes): (&[u64], _) = if failpoint == "update_after_persist" {
        (
            &[before.state.version, before.state.version + 1],
            vec![before.state.outcome.clone(), paid],
        )
    } else {
        (&[before.state.version], vec![before.state.outcome.clone()])
    };
    tokio::time::timeout(WAIT, async {
        loop {
            let st = bob.command("status");
            let v = ch.state().state.version;
            if expect.contains(&v) && st == format!("STATUS Active {v}") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both sides agree after the restart");
    w.settle_both_on(&ch, &mut bob, &outcomes).await;
}

/// Bob proposes a payment; Alice signs and stores it; Bob dies before he
/// signs. Nobody can complete that version now: Bob's `Sync` after his
/// restart shows Alice he does not hold it, she drops it, and the channel
/// goes on past the burnt version.
async fn crash_while_proposing() {
    let w = world().await;
    let mut bob = w.bob(Some("propose_before_commit"));
    let ch = w.open(&bob).await;
    writeln!(bob.stdin, "pay 9").unwrap();
    bob.stdin.flush().unwrap();
    bob.expect("FAILPOINT propose_before_commit");
    bob.kill();
    assert_eq!(ch.phase(), Phase::Updating, "Alice signed Bob's update");
    assert_eq!(ch.state().state.version, 0);

    let mut bob = w.bob(None);
    w.meet(&bob).await;
    ch.wait_for_phase(Phase::Active, WAIT)
        .await
        .expect("Alice drops the update Bob no longer holds");
    assert_eq!(ch.state().state.version, 0);
    // Version 1 is burnt: Alice's payment becomes version 2, Bob's version 3.
    let v2 = ch.pay(1, 0, u(3)).await.unwrap();
    assert_eq!(v2.state.version, 2);
    assert_eq!(bob.command("pay 4"), "OK 3");
    ch.wait_for_version(3, WAIT).await.unwrap();
    assert_eq!(
        ch.state().state.outcome.balances[0],
        vec![u(EACH + 1), u(EACH - 1)]
    );
    w.settle_both(&ch, &mut bob).await;
}

async fn wait_status(bob: &mut Bob, want: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            if bob.command("status").starts_with(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("Bob reaches {want}"));
}

async fn crash_during_settle() {
    let w = world().await;
    let mut bob = w.bob(Some("settle_concluded"));
    let ch = w.open(&bob).await;
    ch.pay(1, 0, u(11)).await.unwrap();
    writeln!(bob.stdin, "settle").unwrap();
    bob.stdin.flush().unwrap();
    bob.expect("FAILPOINT settle_concluded");
    bob.kill();
    // Bob concluded on-chain before he died; restarted, he withdraws.
    let mut bob = w.bob(None);
    w.meet(&bob).await;
    wait_status(&mut bob, "STATUS Withdrawn").await;
    // Alice's watcher saw the conclusion and may have withdrawn already;
    // settling again is a no-op then.
    assert!(matches!(
        ch.phase(),
        Phase::Final | Phase::Concluded | Phase::Withdrawn
    ));
    ch.settle().await.unwrap();
    assert_eq!(ch.phase(), Phase::Withdrawn);
    w.check(&ch.state()).await;
}

async fn crash_during_dispute() {
    let w = world().await;
    let mut bob = w.bob(Some("refute"));
    let ch = w.open(&bob).await;
    ch.pay(1, 0, u(100)).await.unwrap();
    let stale = ch.state(); // Alice 900, Bob 1100
    assert_eq!(bob.command("pay 300"), "OK 2");
    ch.pay(1, 0, u(400)).await.unwrap();
    let latest = ch.state(); // Alice 800, Bob 1200
    assert!(stale.state.outcome.balances[0][0] > latest.state.outcome.balances[0][0]);
    // Alice cheats with the older state, which gives her more, and goes away.
    let cheat = stale;
    w.alice.client.shutdown().await;
    let (_, adj) = w.ledger.backends(&w.alice.account).await;
    adj.register(&SignedChannel {
        params: ch.params().clone(),
        state: cheat,
    })
    .await
    .unwrap();
    bob.expect("FAILPOINT refute");
    bob.kill();
    // Restarted, Bob's watcher refutes at once.
    let mut bob = w.bob(None);
    tokio::time::timeout(WAIT, async {
        while adj.dispute(ch.id()).await.unwrap().unwrap().version != latest.state.version {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("Bob refutes after his restart");
    w.ledger.advance(CHALLENGE + 1).await;
    wait_status(&mut bob, "STATUS Withdrawn").await;
    adj.withdraw(&WithdrawRequest {
        params: ch.params().clone(),
        state: latest.state.clone(),
        index: 0,
        account: w.alice.account.clone(),
        receiver: w.alice.client.address(),
    })
    .await
    .unwrap();
    w.check(&latest).await;
}
