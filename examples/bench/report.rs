//! Runs every part (each time-boxed; a part that fails or overruns is
//! recorded under `errors` and its figures are `null`), writes
//! `summary.json` and prints the table with the targets of issue 8.

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::floor::{self, Floor};
use crate::restore;
use crate::setup::{Chain, Pair, Store};
use crate::stats::Samples;
use crate::updates::{self, Sequential};
use crate::{Options, Res};

/// The collected figures.
struct Summary {
    figures: Map<String, Value>,
    errors: Map<String, Value>,
    /// The one part to run, if not all.
    only: Option<String>,
}

impl Summary {
    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.into(), value.into());
    }

    /// Runs `part` within `time_box`; records its failure instead of stopping.
    async fn part<T>(
        &mut self,
        name: &str,
        time_box: Duration,
        part: impl Future<Output = Res<T>>,
    ) -> Option<T> {
        if self
            .only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|part| part == name))
        {
            return None;
        }
        println!("==> {name}");
        let t = Instant::now();
        let res = match tokio::time::timeout(time_box, part).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.errors.insert(name.into(), json!(e.to_string()));
                None
            }
            Err(_) => {
                self.errors
                    .insert(name.into(), json!(format!("timed out after {time_box:?}")));
                None
            }
        };
        match &res {
            Some(_) => println!("    done in {:.1} s", t.elapsed().as_secs_f64()),
            None => println!("    FAILED: {}", self.errors[name]),
        }
        res
    }
}

/// Runs the whole benchmark and writes `opts.out`.
pub(crate) async fn run_all(opts: &Options) -> Res<()> {
    let started = Instant::now();
    let load_at_start = load_average();
    let c = &opts.counts;
    if opts.work.exists() {
        std::fs::remove_dir_all(&opts.work)?;
    }
    std::fs::create_dir_all(&opts.work)?;
    let mut s = Summary {
        figures: Map::new(),
        errors: Map::new(),
        only: opts.only.clone(),
    };
    let chain = Chain::start().await?;

    let floor = s
        .part(
            "floor",
            Duration::from_secs(120),
            floor::measure(&opts.work, c.floor_iterations),
        )
        .await;
    // Half of what an update does between its two syncs, by the floor.
    let gap = floor.map(|f| Duration::from_secs_f64(f.without_fsync_ms().max(0.0) / 2e3));
    let durable = s
        .part(
            "durable",
            Duration::from_secs(600),
            durable(&chain, opts, gap),
        )
        .await;
    let memory = s
        .part("memory", Duration::from_secs(300), memory(&chain, opts))
        .await;
    let restored = s
        .part(
            "restore",
            Duration::from_secs(660),
            restore::measure(
                &chain,
                &opts.work.join("restore"),
                c.restore_channels,
                Duration::from_secs(600),
            ),
        )
        .await;

    let tower = s
        .part(
            "tower",
            Duration::from_secs(300),
            crate::tower::appointments_per_s(&opts.work, c.tower_connections, c.tower_per_conn),
        )
        .await;
    s.set("tower_appointments_per_s", tower);
    let watch = s
        .part(
            "tower_watch",
            Duration::from_secs(900),
            crate::tower::watch_cost(&chain, &opts.work, c.tower_stored, c.tower_dispute_blocks),
        )
        .await;
    record_tower_watch(&mut s, watch.as_ref(), c.tower_stored);
    let index = s
        .part(
            "chain_index",
            // Anvil mines ~100 empty blocks/s once its chain is long: most of it is setup.
            Duration::from_secs(3_000),
            crate::chain_index::measure(
                &opts.work,
                c.index_channels,
                c.index_others,
                c.index_blocks,
            ),
        )
        .await;
    record_chain_index(&mut s, index.as_ref(), c.index_blocks);

    let payments = s
        .part(
            "payments",
            Duration::from_secs(300),
            crate::payments::measure(&chain, opts, c.payment_batches),
        )
        .await;
    for key in ["payments_per_s", "payments_raw_pay_per_s", "payments_ratio"] {
        s.set(key, payments.as_ref().and_then(|p| p[key].as_f64()));
    }

    let floor = interleaved(&mut s, floor, durable.as_ref());
    record_floor(&mut s, floor, durable.as_ref());
    record_durable(&mut s, durable.as_ref());
    s.set("updates_per_s_memory", memory.as_ref().map(|m| m.seq.per_s));
    s.set(
        "update_latency_memory_p50_ms",
        memory.as_ref().map(|m| m.seq.latency.p50()),
    );
    s.set(
        "update_latency_memory_p99_ms",
        memory.as_ref().map(|m| m.seq.latency.ms(0.99)),
    );
    record_issue17(&mut s, floor, durable.as_ref(), memory.as_ref());
    record_restore(
        &mut s,
        restored.as_ref().map(|r| &r.json),
        c.restore_channels,
    );
    s.set("bench_seconds", started.elapsed().as_secs_f64());

    let out = json!({
        "figures": s.figures,
        "errors": s.errors,
        "counts": counts_json(opts),
        "machine": machine(&opts.work, load_at_start),
    });
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&out)?)?;
    print_table(&s.figures, None);
    if opts.quick {
        println!(
            "(--quick: small counts; the figures exercise the harness, they are not the targets' figures)"
        );
    }
    println!("\nwritten to {}", opts.out.display());
    if !s.errors.is_empty() {
        println!("errors: {}", Value::Object(s.errors.clone()));
    }
    drop(chain);
    Ok(())
}

/// The chain index's figures (the scan's key names its block count).
fn record_chain_index(s: &mut Summary, index: Option<&Value>, blocks: u64) {
    let get = |k: &str| index.and_then(|v| v.get(k)).cloned();
    let key = if blocks == 100_000 {
        "chain_index_scan_100k_blocks_ms".to_string()
    } else {
        format!("chain_index_scan_{blocks}_blocks_ms")
    };
    s.set(&key, get("scan_ms"));
    s.set("chain_index_channels", get("channels"));
    s.set("chain_index_scan_queries", get("queries"));
    s.set("chain_index_rescan_ms", get("rescan_ms"));
    s.set("chain_index_rescan_blocks_read", get("rescan_blocks_read"));
    s.set("chain_index_rescan_new_blocks", get("rescan_new_blocks"));
}

/// The tower's figures with an empty store and with `stored` appointments.
fn record_tower_watch(s: &mut Summary, watch: Option<&Value>, stored: usize) {
    let get = |which: &str, key: &str| watch.and_then(|w| w[which][key].as_f64());
    let full_key = if stored == 100_000 {
        "tower_channels_watched_100k_rss_bytes".to_string()
    } else {
        format!("tower_channels_watched_{stored}_rss_bytes")
    };
    s.set(&full_key, get("full", "rss_bytes"));
    s.set("tower_rss_bytes_empty", get("empty", "rss_bytes"));
    s.set("tower_block_cost_us_full", get("full", "block_cost_us"));
    s.set("tower_block_cost_us_empty", get("empty", "block_cost_us"));
    let ratio = get("full", "block_cost_us")
        .zip(get("empty", "block_cost_us"))
        .map(|(f, e)| f / e);
    s.set("tower_block_cost_ratio", ratio);
    s.set("tower_watch_blocks", get("full", "blocks"));
    s.set("tower_start_ms_full", get("full", "start_ms"));
}

/// fsync samples taken after each batch of sequential durable updates.
const FSYNCS_PER_BATCH: usize = 10;
/// Signatures and checks timed after each batch of them.
const CRYPTO_PER_BATCH: usize = 20;
/// Round trips sampled between two batches of sequential updates.
const ROUND_TRIPS_PER_BATCH: usize = 20;

/// What the durable pair measured.
struct Durable {
    open: crate::stats::Samples,
    sequential: Sequential,
    /// The floor's round trip sampled between the sequential updates.
    round_trips: Samples,
    /// The fsync floor sampled between the sequential updates.
    fsync: crate::stats::Samples,
    /// The same, each sync after a pause as long as an update's other work
    /// between its syncs (empty without the floor part).
    fsync_spaced: crate::stats::Samples,
    /// The disk part of as many sequential updates, sampled between their
    /// batches ([`floor::PairProbe`]).
    fsync_pairs: crate::stats::Samples,
    /// Signatures and checks timed between the sequential updates.
    signs: crate::stats::Samples,
    checks: crate::stats::Samples,
    aggregate: updates::Aggregate,
    /// One update's crypto as CPU time, sampled during `aggregate`
    /// ([`floor::CryptoDuring`]).
    crypto_during: crate::stats::Samples,
    /// The floor at as many channels, right after `aggregate` (its
    /// failure is recorded on its own, the figures above stand).
    floor_many: std::result::Result<crate::floor_many::FloorMany, String>,
    channels: usize,
}

/// One durable pair, Bob in a process of his own: the first channel for
/// the sequential figures, then more opened one by one for
/// `open_channel_ms`, then up to `concurrent_channels` updating at once.
async fn durable(chain: &Chain, opts: &Options, gap: Option<Duration>) -> Res<Durable> {
    let c = &opts.counts;
    let mut pair = Pair::start_apart(chain, Store::Durable, &opts.work.join("durable")).await?;
    let (mut chans, mut took) = updates::open_timed(&mut pair, chain, 1).await?;
    // The fsync floor is sampled between batches of these updates, in the
    // same directory, so both see the same disk.
    let mut probe = floor::FsyncProbe::new(&opts.work.join("durable"))?;
    let mut pairs = floor::PairProbe::new(&opts.work.join("durable"))?;
    let mut crypto = floor::CryptoProbe::new();
    let mut trips = floor::RoundTripProbe::start(ROUND_TRIPS_PER_BATCH).await?;
    let sequential = updates::sequential(&chans[0], c.warmup, c.measured, async || {
        probe.sample(FSYNCS_PER_BATCH)?;
        if let Some(gap) = gap {
            pairs.sample_spaced(FSYNCS_PER_BATCH, gap)?;
        }
        crypto.sample(CRYPTO_PER_BATCH)?;
        trips.sample(ROUND_TRIPS_PER_BATCH).await?;
        pairs.sample(updates::BATCH)
    })
    .await?;
    let fsync = probe.finish()?;
    let (fsync_pairs, fsync_spaced) = pairs.finish()?;
    let (signs, checks) = crypto.finish();
    let round_trips = trips.finish().await?;
    println!(
        "    sequential durable: {:.0} updates/s, p50 {:.2} ms",
        sequential.per_s,
        sequential.latency.p50()
    );
    let (more, more_took) =
        updates::open_timed(&mut pair, chain, c.opens.saturating_sub(1)).await?;
    chans.extend(more);
    took.extend(more_took);
    let open = crate::stats::Samples::new(took);
    println!(
        "    open_channel median {:.0} ms over {} opens",
        open.p50(),
        c.opens
    );
    let rest = c.concurrent_channels.saturating_sub(chans.len());
    let t = Instant::now();
    let (more, _) = updates::open_timed(&mut pair, chain, rest).await?;
    chans.extend(more);
    println!(
        "    opened {rest} more channels in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let during = floor::CryptoDuring::start();
    let aggregate = updates::aggregate(
        &chans,
        c.concurrent_for,
        || pair.bob_cpu_time(),
        pair.alice_store.as_deref(),
    )
    .await?;
    let crypto_during = during.finish()?;
    let channels = chans.len();
    drop(chans);
    pair.shutdown().await?;
    let floor_many =
        crate::floor_many::run(&opts.work.join("floor-many"), channels, c.concurrent_for)
            .await
            .map_err(|e| e.to_string());
    match &floor_many {
        Ok(m) => println!(
            "    the floor at {channels} channels: {:.0} updates/s",
            m.pace.per_s()
        ),
        Err(e) => println!("    the floor at {channels} channels FAILED: {e}"),
    }
    Ok(Durable {
        open,
        sequential,
        round_trips,
        fsync,
        fsync_spaced,
        fsync_pairs,
        signs,
        checks,
        aggregate,
        crypto_during,
        floor_many,
        channels,
    })
}

/// The in-memory updates and the floor's parts sampled between their
/// batches (the floor without fsyncs they are compared with).
struct Memory {
    seq: Sequential,
    signs: Samples,
    checks: Samples,
    round_trips: Samples,
}

impl Memory {
    /// The floor without its fsyncs, from this run's own samples.
    fn floor_ms(&self) -> f64 {
        floor::without_fsync_ms(self.signs.p50(), self.checks.p50(), self.round_trips.p50())
    }
}

/// One in-memory pair, Bob in a process of his own, one channel,
/// sequential updates; the floor's crypto and round trip are sampled
/// between their batches, as for the durable ones.
async fn memory(chain: &Chain, opts: &Options) -> Res<Memory> {
    let c = &opts.counts;
    let mut pair = Pair::start_apart(chain, Store::Memory, &opts.work.join("memory")).await?;
    let ch = pair.open(chain.asset()).await?;
    let mut crypto = floor::CryptoProbe::new();
    let mut trips = floor::RoundTripProbe::start(ROUND_TRIPS_PER_BATCH).await?;
    let seq = updates::sequential(&ch, c.warmup, c.measured, async || {
        crypto.sample(CRYPTO_PER_BATCH)?;
        trips.sample(ROUND_TRIPS_PER_BATCH).await
    })
    .await?;
    let (signs, checks) = crypto.finish();
    let round_trips = trips.finish().await?;
    drop(ch);
    pair.shutdown().await?;
    Ok(Memory {
        seq,
        signs,
        checks,
        round_trips,
    })
}

/// The floor, with the fsync and crypto parts taken from the samples
/// between the durable updates when there are any (the standalone figures
/// are kept too), as every figure compared with the floor uses it.
fn interleaved(s: &mut Summary, floor: Option<Floor>, durable: Option<&Durable>) -> Option<Floor> {
    let mut f = floor?;
    s.set("floor_fsync_standalone_ms", f.fsync_ms);
    s.set("floor_sign_standalone_ms", f.sign_ms);
    s.set("floor_verify_standalone_ms", f.verify_ms);
    if let Some(d) = durable.filter(|d| !d.fsync.is_empty()) {
        f.fsync_ms = d.fsync.p50();
        s.set("floor_fsync_interleaved_p99_ms", d.fsync.ms(0.99));
    }
    if let Some(d) = durable.filter(|d| !d.signs.is_empty() && !d.checks.is_empty()) {
        f.sign_ms = d.signs.p50();
        f.verify_ms = d.checks.p50();
    }
    s.set("floor_round_trip_standalone_ms", f.round_trip_ms);
    if let Some(d) = durable.filter(|d| !d.round_trips.is_empty()) {
        f.round_trip_ms = d.round_trips.p50();
    }
    Some(f)
}

/// The floor and the durable update against it.
fn record_floor(s: &mut Summary, floor: Option<Floor>, durable: Option<&Durable>) {
    let Some(f) = floor else {
        s.set("floor_update_ms", Value::Null);
        s.set("floor_ratio", Value::Null);
        return;
    };
    s.set("floor_update_ms", f.update_ms());
    s.set("floor_sign_ms", f.sign_ms);
    s.set("floor_verify_ms", f.verify_ms);
    s.set("floor_fsync_ms", f.fsync_ms);
    s.set("floor_round_trip_ms", f.round_trip_ms);
    s.set(
        "floor_ratio",
        durable.map(|d| d.sequential.latency.p50() / f.update_ms()),
    );
    // The floor with syncs as an update can have them (information).
    let spaced = durable
        .filter(|d| !d.fsync_spaced.is_empty())
        .map(|d| d.fsync_spaced.p50());
    s.set("floor_fsync_spaced_ms", spaced);
    let spaced_floor = spaced.map(|ms| f.update_ms() + 2.0 * (ms - f.fsync_ms));
    s.set("floor_spaced_update_ms", spaced_floor);
    s.set(
        "floor_ratio_spaced",
        durable
            .zip(spaced_floor)
            .map(|(d, f)| d.sequential.latency.p50() / f),
    );
}

/// Issue 17's derived figures: the in-memory update against the floor
/// without its fsyncs, the tails against the medians, and the number of
/// updates per second this machine's cores could sign and check.
fn record_issue17(
    s: &mut Summary,
    floor: Option<Floor>,
    durable: Option<&Durable>,
    memory: Option<&Memory>,
) {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let no_fsync = floor.map(|f| f.without_fsync_ms());
    s.set("floor_no_fsync_ms", no_fsync);
    // The in-memory updates against the floor sampled between their own
    // batches (a minute after the durable ones, the guest may be in
    // another spell).
    s.set("memory_floor_no_fsync_ms", memory.map(Memory::floor_ms));
    s.set(
        "memory_floor_ratio",
        memory.map(|m| m.seq.latency.p50() / m.floor_ms()),
    );
    let tail = |l: &crate::stats::Samples| l.ms(0.99) / l.p50();
    s.set("memory_p99_over_p50", memory.map(|m| tail(&m.seq.latency)));
    s.set(
        "durable_p99_over_p50",
        durable.map(|d| tail(&d.sequential.latency)),
    );
    // The same tail of the disk alone: an update's two syncs in turn, as
    // many times, between the updates' batches. The update's p99 against the
    // floor's (its parts without the disk, plus that p99) says how much
    // tail the SDK adds to the disk's own.
    let pairs = durable.map(|d| &d.fsync_pairs);
    s.set("disk_p99_over_p50", pairs.map(tail));
    s.set("floor_fsync_pair_p99_ms", pairs.map(|p| p.ms(0.99)));
    let floor_p99 = no_fsync.zip(pairs).map(|(f, p)| f + p.ms(0.99));
    s.set("floor_update_p99_ms", floor_p99);
    s.set(
        "durable_p99_floor_ratio",
        durable
            .zip(floor_p99)
            .map(|(d, f)| d.sequential.latency.ms(0.99) / f),
    );
    // Every update costs two signatures and two checks, whichever side
    // makes them: that CPU, spread over every core, bounds the aggregate.
    // Measured as CPU time during the 100-channel run itself (none without
    // samples); the floor's crypto (between the sequential batches,
    // another moment of this machine's two crypto speeds) gives the
    // `_sequential` variant.
    let per_s = |ms: f64| cores as f64 * 1e3 / ms;
    let floor_crypto = floor.map(|f| 2.0 * f.sign_ms + 2.0 * f.verify_ms);
    // The p50: the probe's slower samples are partly its own (caches cold
    // after its pause, preemption charged to it), and a profile of the run
    // agrees with the p50 within a few per cent (BENCHMARKS.md).
    let sampled = durable.map(|d| &d.crypto_during).filter(|c| !c.is_empty());
    let during = sampled.map(crate::stats::Samples::p50);
    s.set("floor_crypto_ms_per_update", floor_crypto);
    s.set("aggregate_crypto_cpu_ms_per_update", during);
    s.set("aggregate_crypto_cpu_p90_ms", sampled.map(|c| c.ms(0.9)));
    let aggregate = durable.map(|d| d.aggregate.pace.per_s());
    let bound = during.map(per_s);
    s.set("cpu_bound_updates_per_s", bound);
    let ratio = aggregate.zip(bound).map(|(a, b)| a / b);
    s.set("aggregate_cpu_bound_ratio", ratio);
    // The floor at as many channels, against its own probe's bound.
    if let Some(Err(e)) = durable.map(|d| &d.floor_many) {
        s.errors.insert("floor_many".into(), json!(e));
    }
    let many = durable.and_then(|d| d.floor_many.as_ref().ok());
    let many_crypto = many
        .map(|m| &m.crypto_during)
        .filter(|c| !c.is_empty())
        .map(crate::stats::Samples::p50);
    s.set(
        "aggregate_floor_updates_per_s",
        many.map(|m| m.pace.per_s()),
    );
    s.set(
        "aggregate_floor_cpu_ms_per_update",
        many.map(|m| m.pace.cpu_ms_per_update()),
    );
    s.set(
        "aggregate_floor_cores_busy",
        many.map(|m| m.pace.cores_busy()),
    );
    s.set(
        "aggregate_floor_writes_per_sync",
        many.and_then(|m| m.writes_per_sync()),
    );
    s.set("aggregate_floor_crypto_cpu_ms_per_update", many_crypto);
    let floor_bound = many
        .zip(many_crypto)
        .map(|(m, c)| m.pace.per_s() / per_s(c));
    s.set("aggregate_floor_cpu_bound_ratio", floor_bound);
    // Each run against its own moment's crypto bound: a change of the
    // guest's crypto speed between the two runs cancels.
    s.set(
        "aggregate_over_floor",
        ratio.zip(floor_bound).map(|(r, f)| r / f),
    );
    let sequential = floor_crypto.map(per_s);
    s.set("cpu_bound_updates_per_s_sequential", sequential);
    s.set(
        "aggregate_cpu_bound_ratio_sequential",
        aggregate.zip(sequential).map(|(a, b)| a / b),
    );
}

fn record_durable(s: &mut Summary, d: Option<&Durable>) {
    s.set("updates_per_s_durable", d.map(|d| d.sequential.per_s));
    s.set(
        "update_latency_p50_ms",
        d.map(|d| d.sequential.latency.p50()),
    );
    s.set(
        "update_latency_p99_ms",
        d.map(|d| d.sequential.latency.ms(0.99)),
    );
    s.set(
        "update_latency_mean_ms",
        d.map(|d| d.sequential.latency.mean_ms()),
    );
    s.set(
        "recoveries_per_update",
        d.map(|d| d.sequential.recoveries_per_update),
    );
    s.set(
        "aggregate_updates_per_s_100ch",
        d.map(|d| d.aggregate.pace.per_s()),
    );
    s.set("aggregate_channels", d.map(|d| d.channels));
    s.set(
        "aggregate_cores_busy",
        d.map(|d| d.aggregate.pace.cores_busy()),
    );
    s.set(
        "aggregate_cpu_ms_per_update",
        d.map(|d| d.aggregate.pace.cpu_ms_per_update()),
    );
    let store = d.and_then(|d| d.aggregate.store);
    s.set(
        "aggregate_writes_per_transaction",
        store
            .filter(|s| s.transactions > 0)
            .map(|s| s.writes as f64 / s.transactions as f64),
    );
    s.set(
        "aggregate_batch_waits_per_s",
        d.zip(store)
            .map(|(d, s)| s.batch_waits as f64 / d.aggregate.pace.wall.as_secs_f64()),
    );
    s.set(
        "aggregate_latency_p50_ms",
        d.map(|d| d.aggregate.latency.p50()),
    );
    s.set(
        "aggregate_latency_p99_ms",
        d.map(|d| d.aggregate.latency.ms(0.99)),
    );
    s.set("open_channel_ms", d.map(|d| d.open.p50()));
}

fn record_restore(s: &mut Summary, r: Option<&Value>, n: usize) {
    let field = |k: &str| r.and_then(|r| r.get(k)).and_then(Value::as_f64);
    s.set("restore_10k_channels_ms", field("restore_ms"));
    s.set("restore_client_built_ms", field("built_ms"));
    s.set("restore_watching", field("watching"));
    s.set("restore_store_open_ms", field("store_open_ms"));
    s.set("restore_channels", field("channels"));
    s.set("restore_records_written_ms", field("records_written_ms"));
    let per_channel = |after: Option<f64>| match (after, field("rss_before_bytes")) {
        (Some(a), Some(b)) => Some((a - b) / n as f64),
        _ => None,
    };
    s.set(
        "rss_bytes_per_channel_10k",
        per_channel(field("rss_after_settle_bytes")),
    );
    s.set(
        "rss_bytes_per_channel_at_restore",
        per_channel(field("rss_restored_bytes")),
    );
}

fn counts_json(opts: &Options) -> Value {
    let c = &opts.counts;
    json!({
        "quick": opts.quick,
        "warmup_updates": c.warmup,
        "measured_updates": c.measured,
        "open_samples": c.opens,
        "concurrent_channels": c.concurrent_channels,
        "concurrent_seconds": c.concurrent_for.as_secs_f64(),
        "restore_channels": c.restore_channels,
        "floor_iterations": c.floor_iterations,
        "tower_connections": c.tower_connections,
        "tower_per_conn": c.tower_per_conn,
        "tower_stored": c.tower_stored,
        "tower_dispute_blocks": c.tower_dispute_blocks,
        "payment_batches": c.payment_batches,
        "index_channels": c.index_channels,
        "index_other_deposits": c.index_others,
        "index_blocks": c.index_blocks,
        "persister": format!(
            "RedbPersister default options (two_phase_commit: {})",
            perun::persistence::RedbOptions::default().two_phase_commit
        ),
    })
}

/// Output of a command, trimmed, or `None` if it failed.
fn command(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `/proc/loadavg`: 1, 5 and 15 minute load, running/total tasks.
fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Where the figures come from: the machine, its load and the commit.
fn machine(work: &Path, load_at_start: Option<String>) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
    let dirty = command("git", &["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "date": command("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "git_commit": command("git", &["rev-parse", "HEAD"]),
        "git_dirty": dirty,
        "kernel": command("uname", &["-sr"]),
        "disk_dir": work.display().to_string(),
        "disk_fs": command("stat", &["-f", "-c", "%T", &work.display().to_string()]),
    })
}

/// A figure's target (issues 8, 14, 15 and 17): `(at most?, bound)`.
pub(crate) fn target(key: &str) -> Option<(bool, f64)> {
    Some(match key {
        // Issue 17: the SDK within 30 % of what an update cannot avoid.
        "floor_ratio" => (true, 1.3),
        "updates_per_s_durable" => (false, 500.0),
        // Issue 17 (was 2,000 in issue 8).
        "updates_per_s_memory" => (false, 3_000.0),
        // Issue 17: the in-memory update within 15 % of the floor without
        // its fsyncs, no long tail on either store, and 100 channels at
        // three quarters of what the cores could sign and check.
        "memory_floor_ratio" => (true, 1.15),
        "durable_p99_over_p50" => (true, 2.0),
        "memory_p99_over_p50" => (true, 2.0),
        "aggregate_cpu_bound_ratio" => (false, 0.75),
        "update_latency_p99_ms" => (true, 5.0),
        "aggregate_updates_per_s_100ch" => (false, 2_000.0),
        "open_channel_ms" => (true, 200.0),
        "restore_10k_channels_ms" => (true, 2_000.0),
        "rss_bytes_per_channel_10k" => (true, 16.0 * 1024.0),
        // Issue 14: durable, signed receipts.
        "tower_appointments_per_s" => (false, 2_000.0),
        // Issue 14: the per-block cost must not grow with the appointments
        // stored (100,000 against none; the margin is the node's jitter).
        "tower_block_cost_ratio" => (true, 2.0),
        // Issue 15: the payments layer within 10 % of raw `pay`.
        "payments_ratio" => (false, 0.9),
        _ => return None,
    })
}

/// The table's rows, in reading order.
pub(crate) const ROWS: &[&str] = &[
    "updates_per_s_durable",
    "updates_per_s_memory",
    "update_latency_p50_ms",
    "update_latency_p99_ms",
    "durable_p99_over_p50",
    "disk_p99_over_p50",
    "floor_update_p99_ms",
    "durable_p99_floor_ratio",
    "update_latency_memory_p50_ms",
    "update_latency_memory_p99_ms",
    "memory_p99_over_p50",
    "floor_no_fsync_ms",
    "memory_floor_no_fsync_ms",
    "memory_floor_ratio",
    "aggregate_updates_per_s_100ch",
    "cpu_bound_updates_per_s",
    "aggregate_cpu_bound_ratio",
    "cpu_bound_updates_per_s_sequential",
    "aggregate_cpu_bound_ratio_sequential",
    "aggregate_crypto_cpu_ms_per_update",
    "aggregate_crypto_cpu_p90_ms",
    "aggregate_floor_updates_per_s",
    "aggregate_floor_cpu_bound_ratio",
    "aggregate_over_floor",
    "floor_crypto_ms_per_update",
    "floor_update_ms",
    "floor_ratio",
    "floor_spaced_update_ms",
    "floor_ratio_spaced",
    "open_channel_ms",
    "restore_10k_channels_ms",
    "rss_bytes_per_channel_10k",
    "tower_appointments_per_s",
    "tower_block_cost_ratio",
    "tower_block_cost_us_full",
    "tower_block_cost_us_empty",
    "tower_channels_watched_100k_rss_bytes",
    "tower_rss_bytes_empty",
    "payments_per_s",
    "payments_raw_pay_per_s",
    "payments_ratio",
    "chain_index_scan_100k_blocks_ms",
    "chain_index_rescan_ms",
    "chain_index_rescan_blocks_read",
    "chain_index_rescan_new_blocks",
    "chain_index_channels",
    "floor_sign_ms",
    "floor_verify_ms",
    "floor_fsync_ms",
    "floor_fsync_spaced_ms",
    "floor_round_trip_ms",
    "floor_round_trip_standalone_ms",
    "floor_fsync_standalone_ms",
    "floor_sign_standalone_ms",
    "floor_verify_standalone_ms",
    "floor_fsync_interleaved_p99_ms",
    "floor_fsync_pair_p99_ms",
    "update_latency_mean_ms",
    "recoveries_per_update",
    "aggregate_channels",
    "aggregate_cores_busy",
    "aggregate_cpu_ms_per_update",
    "aggregate_writes_per_transaction",
    "aggregate_batch_waits_per_s",
    "aggregate_latency_p50_ms",
    "aggregate_latency_p99_ms",
    "aggregate_floor_cpu_ms_per_update",
    "aggregate_floor_cores_busy",
    "aggregate_floor_writes_per_sync",
    "aggregate_floor_crypto_cpu_ms_per_update",
    "restore_store_open_ms",
    "restore_client_built_ms",
    "restore_channels",
    "restore_watching",
    "rss_bytes_per_channel_at_restore",
    "bench_seconds",
];

/// A figure as the table shows it.
fn shown(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        }
    })
}

/// Prints every row with its target; `ranges` (min, max over several
/// runs) adds a column.
pub(crate) fn print_table(figures: &Map<String, Value>, ranges: Option<&Map<String, Value>>) {
    let range_head = if ranges.is_some() { "range" } else { "" };
    println!(
        "\n{:<34} {:>14}  {:<10} {:<4} {range_head}",
        "figure", "value", "target", "met"
    );
    for key in ROWS {
        let value = figures.get(*key).and_then(Value::as_f64);
        let (goal, met) = match (target(key), value) {
            (Some((at_most, bound)), v) => (
                format!("{}{bound}", if at_most { "<= " } else { ">= " }),
                match v {
                    Some(v) if (at_most && v <= bound) || (!at_most && v >= bound) => "yes",
                    Some(_) => "NO",
                    None => "n/a",
                },
            ),
            (None, _) => (String::new(), ""),
        };
        let range = ranges
            .and_then(|r| r.get(*key))
            .and_then(Value::as_array)
            .map(|mm| {
                let at = |i: usize| mm.get(i).and_then(Value::as_f64);
                format!("{} – {}", shown(at(0)), shown(at(1)))
            })
            .unwrap_or_default();
        println!(
            "{key:<34} {:>14}  {goal:<10} {met:<4} {range}",
            shown(value)
        );
    }
}
