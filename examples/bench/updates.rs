//! The client figures: opening channels, sequential and concurrent updates.

use std::time::{Duration, Instant};

use perun::channel::U256;
use perun::client::Channel;
use perun::persistence::{RedbPersister, RedbStats};

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
    /// Signatures this process recovered per measured update (a check that
    /// missed the wallet's memo): at least one, the peer's, when the peer
    /// runs in a process of its own ([`crate::peer`]).
    pub(crate) recoveries_per_update: f64,
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
/// timing, and one unmeasured payment follows it: the first update after
/// the hook's pause (tens of milliseconds of probes) finds the runtime's
/// threads parked and no burst to ride, and took about 1.5 times the p50,
/// a cost of the probes, not of updates.
pub(crate) async fn sequential(
    ch: &Channel,
    warmup: usize,
    measured: usize,
    mut between: impl AsyncFnMut() -> Res<()>,
) -> Res<Sequential> {
    let one = U256::from(1);
    for _ in 0..warmup {
        ch.pay(1, 0, one).await?;
    }
    let mut lat = Vec::with_capacity(measured);
    let marks = std::env::var_os(MARKS_VAR).is_some();
    let misses_before = perun::wallet::memo::misses();
    // The hook's own recoveries, and the unmeasured update after it, are
    // not the measured updates'.
    let mut hook_misses = 0;
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
            let before = perun::wallet::memo::misses();
            between().await?;
            ch.pay(1, 0, one).await?;
            hook_misses += perun::wallet::memo::misses() - before;
        }
    }
    let recovered = perun::wallet::memo::misses() - misses_before - hook_misses;
    let recoveries_per_update = recovered as f64 / measured.max(1) as f64;
    // Each update's check of the peer's signature is a recovery in
    // deployment; fewer means the figures leave it out (the peer shares
    // this process's memo).
    if (recovered as usize) < measured {
        return Err(format!(
            "{recovered} signature recoveries over {measured} updates: the peer's \
             signatures were never checked cold, the figures would be flattered"
        )
        .into());
    }
    let busy: Duration = lat.iter().sum();
    Ok(Sequential {
        per_s: measured as f64 / busy.as_secs_f64(),
        latency: Samples::new(lat),
        recoveries_per_update,
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

/// Updates completed by many channels at once, over how long and for how
/// much CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Updates completed over all channels.
    pub(crate) updates: u64,
    /// From the start signal to the last task's end.
    pub(crate) wall: Duration,
    /// CPU time both sides used meanwhile: this process's, plus the other
    /// side's process's.
    pub(crate) cpu: Duration,
}

impl Pace {
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

/// Many channels updating at once.
#[derive(Debug)]
pub(crate) struct Aggregate {
    /// Updates, wall time and both clients' CPU time (their stores and
    /// transports).
    pub(crate) pace: Pace,
    /// Latency of every update.
    pub(crate) latency: Samples,
    /// Alice's store meanwhile (durable only): its writes, write
    /// transactions and waits for fuller batches.
    pub(crate) store: Option<RedbStats>,
}

/// One task per channel pays 1 wei in a loop until `run_for` passed.
/// `peer_cpu` is Bob's process's CPU time so far, if he has one.
pub(crate) async fn aggregate(
    chans: &[Channel],
    run_for: Duration,
    peer_cpu: impl Fn() -> Res<Option<Duration>>,
    store: Option<&RedbPersister>,
) -> Res<Aggregate> {
    let stats_before = store.map(RedbPersister::stats);
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
        pace: Pace {
            updates: all.len() as u64,
            wall,
            cpu: cpu()?.saturating_sub(cpu_before),
        },
        latency: Samples::new(all),
        store: store
            .zip(stats_before)
            .map(|(s, before)| s.stats().since(&before)),
    })
}
