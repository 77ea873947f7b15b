//! Crash consistency: a child process commits real signed states on several
//! channels in a loop and prints every acknowledged `(channel, version)`
//! on stdout right after its `Ok`. The parent kills it with SIGKILL at
//! random moments (some while it is still opening and recovering the
//! file; half of the children commit in two phases, half in one; most
//! make writes durable through the write-ahead log, some without it),
//! reopens the store after every kill and checks that
//!
//! - every record loads and passes full validation (every signature
//!   verifies, so a torn or mixed state would be caught);
//! - every channel holds a current state whose version is at least the
//!   last acknowledged one, with exactly the contents of that version;
//! - the state tables and the phase agree, which they only do if each
//!   multi-change write was applied atomically;
//! - a channel removed and created again over and over is present exactly
//!   when its last acknowledged step says so, and metadata (durable redb
//!   commits outside the log, which make earlier non-durable commits
//!   durable without moving the checkpoint) is at least the last
//!   acknowledged value.
//!
//! The last channel's states carry 40 KiB of app data, so the log fills and
//! is checkpointed every few dozen of its versions; some rounds run long
//! enough for that.
//!
//! This binary has its own `main` (`harness = false`): with
//! `PERUN_CRASH_CHILD=<path>` set it is the child, otherwise the parent.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestChannel;
use perun_channel::Phase;
use perun_persistence::{BatchWait, Change, Persister, RedbOptions, RedbPersister};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "PERUN_CRASH_CHILD";
const TWO_PHASE_ENV: &str = "PERUN_CRASH_TWO_PHASE";
const LOG_ENV: &str = "PERUN_CRASH_LOG";
const CHANNELS: u64 = 5;
/// The channel with large states (checkpoints).
const BIG: u64 = CHANNELS - 1;
const KILLS: usize = 60;
const SEED_BASE: u64 = 9000;

fn channel(c: u64) -> TestChannel {
    if c == BIG {
        TestChannel::new(SEED_BASE + c, 2, 1, 40 * 1024)
    } else {
        TestChannel::two_party(SEED_BASE + c)
    }
}

/// Removed and created again, over and over.
fn churn() -> TestChannel {
    TestChannel::two_party(SEED_BASE + 99)
}

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(path) => child(PathBuf::from(path)),
        None => parent(),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("flush");
}

/// Commits forever on every channel, acknowledging each durable commit.
fn child(path: PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let options = RedbOptions {
            two_phase_commit: std::env::var(TWO_PHASE_ENV).as_deref() != Ok("0"),
            write_ahead_log: std::env::var(LOG_ENV).as_deref() != Ok("0"),
            // Whenever all channels' writes share a batch, the writer
            // waits before the next one: kills land in those waits too.
            batch_wait: BatchWait::Always(std::time::Duration::from_millis(1)),
            ..RedbOptions::default()
        };
        let p: Arc<dyn Persister> = Arc::new(
            RedbPersister::open_with(&path, options)
                .await
                .expect("child: open"),
        );
        let existing: BTreeMap<_, _> = p
            .load_all()
            .await
            .expect("child: load_all")
            .into_iter()
            .map(|r| (r.id(), r))
            .collect();
        say("ready");
        let mut tasks = Vec::new();
        for c in 0..CHANNELS {
            let p = p.clone();
            let rec = existing.get(&channel(c).id()).cloned();
            tasks.push(tokio::spawn(async move {
                let ch = channel(c);
                let id = ch.id();
                let mut version = match rec.and_then(|r| r.current) {
                    Some(cur) => cur.state.version,
                    None => {
                        p.channel_created(&ch.record()).await.expect("create");
                        p.update(id, ch.commit(0)).await.expect("commit v0");
                        say(&format!("ack {c} 0"));
                        0
                    }
                };
                // Runs until killed; the bound only keeps the loop finite.
                while version < 1_000_000 {
                    version += 1;
                    p.update(id, ch.stage(version)).await.expect("stage");
                    p.update(id, ch.commit(version)).await.expect("commit");
                    say(&format!("ack {c} {version}"));
                }
            }));
        }
        tasks.push(tokio::spawn(churn_forever(
            p.clone(),
            existing.contains_key(&churn().id()),
        )));
        tasks.push(tokio::spawn(meta_forever(p.clone())));
        for t in tasks {
            t.await.expect("child task");
        }
    });
}

/// Removes and creates the churn channel in turn, saying each step before
/// it is issued and once it is acknowledged.
async fn churn_forever(p: Arc<dyn Persister>, mut present: bool) {
    let ch = churn();
    loop {
        if present {
            say("issue remove");
            p.channel_removed(ch.id()).await.expect("remove");
            say("ack removed");
        } else {
            say("issue create");
            p.channel_created(&ch.record()).await.expect("create churn");
            p.update(ch.id(), vec![Change::Committed(ch.signed(0))])
                .await
                .expect("churn v0");
            say("ack created");
        }
        present = !present;
    }
}

/// Writes a growing metadata value every 3 ms.
async fn meta_forever(p: Arc<dyn Persister>) {
    let start = match p.meta_get("m").await.expect("meta_get") {
        Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
        None => 0,
    };
    for v in start + 1.. {
        p.meta_put("m", &v.to_le_bytes()).await.expect("meta_put");
        say(&format!("meta {v}"));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// What the children acknowledged, over all rounds.
#[derive(Default)]
struct Seen {
    /// The highest acknowledged version of each channel.
    acked: BTreeMap<u64, u64>,
    /// The churn channel's last step: "issue remove", "ack removed", ...
    churn_last: Option<String>,
    meta: u64,
}

impl Seen {
    /// Takes one line of the child's; returns whether it was an ack of a
    /// channel's version.
    fn record(&mut self, line: &str) -> bool {
        if let Some(rest) = line.strip_prefix("ack ") {
            if rest == "removed" || rest == "created" {
                self.churn_last = Some(line.to_owned());
                return false;
            }
            let mut parts = rest.split(' ').map(|x| x.parse::<u64>().expect("number"));
            let (c, v) = (parts.next().expect("c"), parts.next().expect("v"));
            let e = self.acked.entry(c).or_insert(v);
            *e = (*e).max(v);
            return true;
        }
        if line.starts_with("issue ") {
            self.churn_last = Some(line.to_owned());
        } else if let Some(v) = line.strip_prefix("meta ") {
            self.meta = self.meta.max(v.parse().expect("meta"));
        }
        false
    }
}

struct Round {
    acks: usize,
    killed_before_ready: bool,
}

/// Runs one child, kills it after `delay` (counted from "ready", from its
/// first acknowledged commit when `after_ack`, or from the start when
/// `before_ready`), and folds what it acknowledged into `seen`.
fn run_child(
    exe: &Path,
    path: &Path,
    delay: Duration,
    (before_ready, after_ack): (bool, bool),
    two_phase: bool,
    log: bool,
    seen: &mut Seen,
) -> Round {
    let mut child: Child = Command::new(exe)
        .env(CHILD_ENV, path)
        .env(TWO_PHASE_ENV, if two_phase { "1" } else { "0" })
        .env(LOG_ENV, if log { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ready = false;
    let mut acks = 0;
    let mut record = |line: &str, ready: &mut bool, acks: &mut usize| {
        if line == "ready" {
            *ready = true;
        } else if seen.record(line) {
            *acks += 1;
        }
    };
    let start = Instant::now();
    if !before_ready {
        let deadline = start + Duration::from_secs(60);
        while !ready || (after_ack && acks == 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => record(&line, &mut ready, &mut acks),
                Err(e) => panic!("child never became ready, or never acknowledged: {e}"),
            }
        }
    }
    let kill_at = Instant::now() + delay;
    loop {
        let left = kill_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(line) => record(&line, &mut ready, &mut acks),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                panic!("child exited before it was killed: {status}");
            }
        }
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "child was killed");
    // Everything printed before the kill is still in the pipe.
    for line in rx.iter() {
        record(&line, &mut ready, &mut acks);
    }
    reader.join().expect("reader");
    Round {
        acks,
        killed_before_ready: !ready,
    }
}

/// Reopens the store and checks it against everything acknowledged so far.
fn verify(rt: &tokio::runtime::Runtime, path: &Path, seen: &Seen, round: usize) {
    let acked = &seen.acked;
    let p = RedbPersister::open_blocking(path, RedbOptions::default())
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
    let records: BTreeMap<_, _> = rt
        .block_on(p.load_all())
        .unwrap_or_else(|e| panic!("round {round}: load_all failed: {e}"))
        .into_iter()
        .map(|r| (r.id(), r))
        .collect();
    for c in 0..CHANNELS {
        let ch = channel(c);
        let Some(rec) = records.get(&ch.id()) else {
            assert!(
                !acked.contains_key(&c),
                "round {round}: channel {c} acknowledged but missing"
            );
            continue;
        };
        // Full validation already ran in load_all; check the contents too.
        rec.to_machine().expect("restorable");
        match (&rec.current, &rec.staged, rec.phase) {
            (None, Some(st), Phase::Signing0) => {
                assert_eq!(st, &ch.signed_by(0, &[0]), "round {round}: channel {c}");
                assert!(
                    !acked.contains_key(&c),
                    "round {round}: channel {c} lost v0"
                );
            }
            (Some(cur), staged, phase) => {
                let v = cur.state.version;
                assert_eq!(
                    cur,
                    &ch.signed(v),
                    "round {round}: channel {c} v{v} contents"
                );
                let min = acked.get(&c).copied().unwrap_or(0);
                assert!(
                    v >= min,
                    "round {round}: channel {c} holds v{v} but v{min} was acknowledged"
                );
                match (staged, phase) {
                    (None, Phase::Active) => {}
                    (Some(st), Phase::Updating) => {
                        assert_eq!(st, &ch.signed_by(v + 1, &[0]), "round {round}: staged")
                    }
                    other => panic!("round {round}: channel {c}: staged/phase mismatch {other:?}"),
                }
            }
            other => panic!("round {round}: channel {c}: impossible record {other:?}"),
        }
    }
    let churned = records.get(&churn().id());
    match seen.churn_last.as_deref() {
        Some("ack removed") => assert!(
            churned.is_none(),
            "round {round}: removal acked, channel back"
        ),
        Some("ack created") => assert!(
            churned.is_some(),
            "round {round}: creation acked, channel gone"
        ),
        _ => {}
    }
    if let Some(rec) = churned {
        rec.to_machine().expect("churn restorable");
    }
    let meta = rt
        .block_on(p.meta_get("m"))
        .unwrap_or_else(|e| panic!("round {round}: meta_get failed: {e}"))
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    assert!(
        meta >= seen.meta,
        "round {round}: metadata {meta}, {} acknowledged",
        seen.meta
    );
}

fn parent() {
    let started = Instant::now();
    let seed: u64 = std::env::var("PERUN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test: seed {seed} (set PERUN_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().expect("current exe");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut seen = Seen::default();
    let (mut total_acks, mut rounds_with_acks, mut early_kills) = (0, 0, 0);
    for round in 0..KILLS {
        let before_ready = rng.gen_bool(0.2);
        let two_phase = rng.gen_bool(0.5);
        // Mostly with the write-ahead log (the default), sometimes without,
        // so both paths and the switch between them crash too.
        let log = rng.gen_bool(0.75);
        // The clock starts at "ready", or (two in three short rounds) at
        // the first acknowledged commit: a child that a loaded machine
        // slows still gets killed mid-writing in most rounds.
        let (delay, after_ack) = if before_ready {
            (Duration::from_micros(rng.gen_range(0..8_000)), false)
        } else if rng.gen_bool(0.15) {
            // Long enough for the big channel to fill the log.
            (
                Duration::from_micros(rng.gen_range(150_000..400_000)),
                false,
            )
        } else {
            let delay = Duration::from_micros(rng.gen_range(0..80_000));
            (delay, rng.gen_bool(2.0 / 3.0))
        };
        let r = run_child(
            &exe,
            &path,
            delay,
            (before_ready, after_ack),
            two_phase,
            log,
            &mut seen,
        );
        total_acks += r.acks;
        rounds_with_acks += usize::from(r.acks > 0);
        early_kills += usize::from(r.killed_before_ready);
        verify(&rt, &path, &seen, round);
    }
    let elapsed = started.elapsed();
    println!(
        "crash test: {KILLS} kills ({early_kills} before the child was ready), {total_acks} acknowledged commits, \
         {rounds_with_acks} rounds with acks, final versions {:?}, metadata {}, {elapsed:.1?}",
        seen.acked, seen.meta
    );
    assert!(
        seen.acked.len() == CHANNELS as usize,
        "every channel made progress"
    );
    assert!(
        rounds_with_acks >= KILLS / 3,
        "most kills interrupted a running child ({rounds_with_acks} of {KILLS})"
    );
}
