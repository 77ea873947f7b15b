//! `state_committed` throughput and latency of `RedbPersister`, next to the
//! raw cost of one `fdatasync` on the same file system, in the same run.
//!
//! Run: `cargo bench -p perun-persistence --bench commit`
//! (`PERUN_BENCH_DIR` picks the directory; default: the target tmp dir,
//! which must be on the disk under test, not a tmpfs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestChannel;
use perun_persistence::{Persister, RedbOptions, RedbPersister};

const SINGLE_COMMITS: u64 = 400;
const CHANNELS: u64 = 100;
const PER_CHANNEL: u64 = 60;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Write 200 bytes in place and `fdatasync`, `n` times.
fn fsync_cost(dir: &Path, n: usize) -> (Duration, Duration) {
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("probe file");
    f.write_all(&[0u8; 4096]).expect("write");
    f.sync_all().expect("sync");
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(&[i as u8; 200]).expect("write");
        f.sync_data().expect("fdatasync");
        times.push(t.elapsed());
    }
    std::fs::remove_file(&path).expect("remove probe");
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

struct Single {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

struct Aggregate {
    per_sec: f64,
    mean_batch: f64,
}

async fn single(dir: &Path, options: RedbOptions) -> Single {
    let path = dir.join(format!("single-{}.redb", options.two_phase_commit));
    let p = RedbPersister::open_with(&path, options)
        .await
        .expect("open");
    let ch = TestChannel::two_party(1);
    p.channel_created(&ch.record()).await.expect("create");
    let states: Vec<_> = (0..=SINGLE_COMMITS).map(|v| ch.signed(v)).collect();
    p.state_committed(ch.id(), &states[0])
        .await
        .expect("warm-up");
    let mut times = Vec::with_capacity(states.len());
    let start = Instant::now();
    for st in &states[1..] {
        let t = Instant::now();
        p.state_committed(ch.id(), st).await.expect("commit");
        times.push(t.elapsed());
    }
    let total = start.elapsed();
    times.sort();
    drop(p);
    std::fs::remove_file(&path).expect("remove");
    Single {
        per_sec: SINGLE_COMMITS as f64 / total.as_secs_f64(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
    }
}

async fn aggregate(dir: &Path, options: RedbOptions) -> Aggregate {
    let path = dir.join(format!("many-{}.redb", options.two_phase_commit));
    let p = Arc::new(
        RedbPersister::open_with(&path, options)
            .await
            .expect("open"),
    );
    let mut work = Vec::new();
    for c in 0..CHANNELS {
        let ch = TestChannel::two_party(100 + c);
        p.channel_created(&ch.record()).await.expect("create");
        let states: Vec<_> = (0..PER_CHANNEL).map(|v| ch.signed(v)).collect();
        work.push((ch.id(), states));
    }
    let before = p.stats();
    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(id, states)| {
            let p = p.clone();
            tokio::spawn(async move {
                for st in &states {
                    p.state_committed(id, st).await.expect("commit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let total = start.elapsed();
    let after = p.stats();
    drop(Arc::into_inner(p).expect("only handle"));
    std::fs::remove_file(&path).expect("remove");
    let txns = (after.transactions - before.transactions).max(1);
    Aggregate {
        per_sec: (CHANNELS * PER_CHANNEL) as f64 / total.as_secs_f64(),
        mean_batch: (after.writes - before.writes) as f64 / txns as f64,
    }
}

fn main() {
    let base = std::env::var_os("PERUN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let (fsync_p50, fsync_p99) = fsync_cost(dir.path(), 300);
    println!("directory: {}", dir.path().display());
    println!(
        "raw fdatasync (200 B in place): p50 {:.2} ms, p99 {:.2} ms",
        ms(fsync_p50),
        ms(fsync_p99)
    );
    println!();
    println!(
        "| mode | 1 channel commits/s | p50 ms | p99 ms | 100 channels commits/s | mean batch |"
    );
    println!("|---|---|---|---|---|---|");
    for two_phase in [true, false] {
        let options = RedbOptions {
            two_phase_commit: two_phase,
            ..RedbOptions::default()
        };
        let s = rt.block_on(single(dir.path(), options.clone()));
        let a = rt.block_on(aggregate(dir.path(), options));
        println!(
            "| redb, {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} |",
            if two_phase {
                "2-phase commit"
            } else {
                "1-phase commit (default)"
            },
            s.per_sec,
            ms(s.p50),
            ms(s.p99),
            a.per_sec,
            a.mean_batch
        );
    }
    let (fsync_p50_end, _) = fsync_cost(dir.path(), 300);
    println!();
    println!(
        "raw fdatasync again at the end: p50 {:.2} ms",
        ms(fsync_p50_end)
    );
}
