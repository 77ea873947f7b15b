//! The client figures: opening channels, sequential and concurrent updates.

use std::time::{Duration, Instant};

use perun::channel::U256;
use perun::client::Channel;

use crate::Res;
use crate::setup::{Chain, Pair};
use crate::stats::Samples;

/// Sequential updates on one channel.
#[derive(Debug)]
pub(crate) struct Sequential {
    /// Updates per second: measured updates over the time spent in `pay`.
    pub(crate) per_s: f64,
    /// Each measured `pay`'s latency.
    pub(crate) latency: Samples,
}

/// Set, each measured sequential update is bracketed by two marker system
/// calls that a system-wide trace can see (`diagnostics/update_trace.sh`):
/// `statx` of a missing path, without flags before the update and with
/// `AT_SYMLINK_NOFOLLOW` after it.
const MARKS_VAR: &str = "PERUN_BENCH_MARKS";

enum MarkAt {
    Start,
    End,
}

fn mark(at: MarkAt) {
    // The calls fail (the path does not exist); only their trace matters.
    let _ = match at {
        MarkAt::Start => std::fs::metadata("/perun-bench-mark"),
        MarkAt::End => std::fs::symlink_metadata("/perun-bench-mark"),
    };
}

/// Measured updates between two calls of the `between` hook.
pub(crate) const BATCH: usize = 100;

/// `warmup` unmeasured payments of 1 wei, then `measured` timed ones, one
/// at a time; `between` runs after every [`BATCH`] of them, outside the
/// timing.
pub(crate) async fn sequential(
    ch: &Channel,
    warmup: usize,
    measured: usize,
    mut between: impl FnMut() -> Res<()>,
) -> Res<Sequential> {
    let one = U256::from(1);
    for _ in 0..warmup {
        ch.pay(1, 0, one).await?;
    }
    let mut lat = Vec::with_capacity(measured);
    let marks = std::env::var_os(MARKS_VAR).is_some();
    for i in 0..measured {
        if marks {
            mark(MarkAt::Start);
        }
        let t = Instant::now();
        ch.pay(1, 0, one).await?;
        lat.push(t.elapsed());
        if marks {
            mark(MarkAt::End);
        }
        if (i + 1).is_multiple_of(BATCH) {
            between()?;
        }
    }
    let busy: Duration = lat.iter().sum();
    Ok(Sequential {
        per_s: measured as f64 / busy.as_secs_f64(),
        latency: Samples::new(lat),
    })
}

/// Opens `n` channels one after the other; returns them with each
/// `propose_channel`'s time to `Active`.
pub(crate) async fn open_timed(
    pair: &mut Pair,
    chain: &Chain,
    n: usize,
) -> Res<(Vec<Channel>, Vec<Duration>)> {
    let mut chans = Vec::with_capacity(n);
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        chans.push(pair.open(chain.asset()).await?);
        took.push(t.elapsed());
    }
    Ok((chans, took))
}

/// Many channels updating at once.
#[derive(Debug)]
pub(crate) struct Aggregate {
    /// Updates completed over all channels.
    pub(crate) updates: u64,
    /// From the start signal to the last task's end.
    pub(crate) wall: Duration,
    /// Latency of every update.
    pub(crate) latency: Samples,
    /// CPU time both clients (their stores and transports) used
    /// meanwhile: this process's, plus Bob's when he runs in his own.
    pub(crate) cpu: Duration,
}

impl Aggregate {
    /// Updates per second over all channels.
    pub(crate) fn per_s(&self) -> f64 {
        self.updates as f64 / self.wall.as_secs_f64()
    }

    /// How many cores were busy on average: below the machine's count, the
    /// run is bounded by waiting (fsyncs, round trips), not by the CPU.
    pub(crate) fn cores_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    /// CPU time per update, in milliseconds, both sides together.
    pub(crate) fn cpu_ms_per_update(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e3 / self.updates.max(1) as f64
    }
}

/// One task per channel pays 1 wei in a loop until `run_for` passed.
/// `peer_cpu` is Bob's process's CPU time so far, if he has one.
pub(crate) async fn aggregate(
    chans: &[Channel],
    run_for: Duration,
    peer_cpu: impl Fn() -> Res<Option<Duration>>,
) -> Res<Aggregate> {
    let cpu =
        || -> Res<Duration> { Ok(crate::stats::cpu_time()? + peer_cpu()?.unwrap_or_default()) };
    let cpu_before = cpu()?;
    let started = Instant::now();
    let deadline = started + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for ch in chans {
        let ch = ch.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                ch.pay(1, 0, U256::from(1)).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, perun::client::Error>(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let wall = started.elapsed();
    Ok(Aggregate {
        updates: all.len() as u64,
        wall,
        latency: Samples::new(all),
        cpu: cpu()?.saturating_sub(cpu_before),
    })
}
