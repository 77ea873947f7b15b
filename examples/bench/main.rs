//! End-to-end benchmark of the SDK against the floor measured in the same
//! run: real clients over libp2p on 127.0.0.1, the real contracts on a local
//! anvil with instant mining, redb on the real disk.
//!
//! Run it with `cargo xtask bench` (release build, writes
//! `target/bench/summary.json`), or directly:
//! `cargo run --release --example bench -- [--quick] [--out PATH]`.
//! `--quick` uses small counts so the whole harness runs in seconds;
//! `--only floor|durable|memory|restore|tower|tower_watch|chain_index|payments`
//! runs one part (for a profiler), or several separated by commas;
//! `--merge OUT RUN...` writes the medians and ranges of several runs'
//! summaries (what `cargo xtask bench --runs N` does).
//!
//! # The figures
//! - `updates_per_s_durable` / `updates_per_s_memory`: one two-party channel,
//!   Alice calls `pay` again and again, one at a time (after a warm-up), with
//!   both clients on a `RedbPersister` in `target/bench/tmp` (default options)
//!   resp. a `MemoryPersister`; measured updates over the time spent in
//!   `pay` (so the fsync probes between batches do not count). Bob runs in
//!   a child process of his own ([`peer`]), as a peer does in deployment:
//!   in one process the clients would share the wallet's memo of checked
//!   signatures and never recover each other's.
//! - `update_latency_p50_ms` / `update_latency_p99_ms`: the durable `pay`
//!   calls' latencies; `update_latency_memory_p50_ms` / `_p99_ms` the
//!   in-memory ones; `durable_p99_over_p50` / `memory_p99_over_p50` their
//!   tails (issue 17: at most 2).
//! - `disk_p99_over_p50`: the same tail of the disk alone, an update's two
//!   syncs in turn (`floor_fsync_pair_p99_ms` its p99), sampled as many
//!   times as the updates, between their batches; `floor_update_p99_ms` the
//!   floor without its fsyncs plus that p99, and `durable_p99_floor_ratio`
//!   the durable p99 over it: near 1, the disk's own tail is the update's.
//! - `floor_fsync_spaced_ms`: the floor's write and sync, each after a pause
//!   of busy CPU as long as half the floor without its fsyncs (what an
//!   update does between its two syncs), sampled between the same batches;
//!   `floor_spaced_update_ms` the floor with it in place of
//!   `floor_fsync_ms`, and `floor_ratio_spaced` the durable p50 over that
//!   (information: how much of `floor_ratio`'s gap is the disk's pause).
//! - `memory_floor_ratio`: the in-memory p50 over `floor_no_fsync_ms`, the
//!   floor without its two fsyncs (issue 17: at most 1.15).
//! - `recoveries_per_update`: signatures Alice's process recovered per
//!   sequential durable update (checks the wallet's memo could not answer):
//!   at least 1, Bob's, or the part fails.
//! - `cpu_bound_updates_per_s`: the updates per second this machine's cores
//!   could sign and check: cores ÷ `aggregate_crypto_cpu_ms_per_update`,
//!   one update's 2 signatures + 2 checks as CPU time on a probe thread,
//!   sampled every 50 ms during the 100-channel run
//!   ([`floor::CryptoDuring`]; the p50 of the samples, `_p90_ms` their
//!   spread);
//!   `aggregate_cpu_bound_ratio` is the 100-channel figure over it (issue
//!   17: at least 0.75). This guest's crypto alternates between two speeds
//!   within seconds, so the crypto timed at another moment of the run (the
//!   floor's, `floor_crypto_ms_per_update`) can bound another machine: the
//!   `_sequential` variants divide by that instead.
//! - `aggregate_updates_per_s_100ch`: 100 durable channels between the same
//!   two clients, one task per channel paying in a loop for a fixed time;
//!   `aggregate_cores_busy` is both processes' CPU time (Alice's and Bob's)
//!   over that run's wall time (at the machine's core count the run is
//!   CPU-bound), and `aggregate_cpu_ms_per_update` their CPU time per
//!   update. `aggregate_writes_per_transaction` is Alice's store's mean
//!   group-commit batch meanwhile, `aggregate_batch_waits_per_s` how often
//!   its writer waited for a fuller one (`RedbOptions::batch_wait`).
//! - `aggregate_floor_updates_per_s`: the floor at as many channels, right
//!   after that run ([`floor_many`]): the same updates made of nothing but
//!   their primitives (2 signatures, 2 checks, a request and its reply over
//!   `perun_wire`, a group-committed durable write on each side).
//!   `aggregate_floor_cpu_bound_ratio` is it over the bound of a crypto
//!   probe run during it (how near the cores' crypto even the primitives
//!   come: the rest is the network's, the disk's and the scheduler's), and
//!   `aggregate_over_floor` the SDK's `aggregate_cpu_bound_ratio` over it
//!   (each run against its own moment's crypto speed; the SDK's share);
//!   `aggregate_floor_cpu_ms_per_update`, `_cores_busy`,
//!   `_writes_per_sync` and `_crypto_cpu_ms_per_update` as for the SDK's.
//! - `open_channel_ms`: median of `propose_channel` calls (proposal, version-0
//!   signatures, both deposits mined, `Active`), durable.
//! - `restore_10k_channels_ms` / `rss_bytes_per_channel_10k`: 10,000 active
//!   channels written into a redb file, then, in a fresh child process with
//!   every peer offline, the time from opening the store until every
//!   restored channel is protected (its watcher subscribed and read the
//!   chain), and the resident memory it adds, per channel.
//!   `restore_client_built_ms` is the part until the client's constructor
//!   returned (what `restore_10k_channels_ms` measured before issue 12).
//! - `payments_per_s` / `payments_raw_pay_per_s` / `payments_ratio`: one
//!   durable channel, batches of `Payments::reserve` + `send` alternating
//!   with batches of raw `pay` (see [`payments`]); both clients in this
//!   process (Bob's payments follower is an API of his client), so only
//!   the ratio compares with the figures above.
//!
//! - `chain_index_scan_100k_blocks_ms`: the client's chain index (issue 15)
//!   scans 100,000 blocks holding 1,000 channels' deposits of its account
//!   (and 200 of another) from the deployment block, on a fresh anvil, its
//!   cursor and findings in redb; `chain_index_rescan_blocks_read` /
//!   `chain_index_rescan_ms`: after 1,000 more blocks (10 new deposits) it
//!   scans again from the stored cursor, reading the new blocks and the last
//!   64 only (`chain_index_rescan_new_blocks` + 64; the part fails otherwise).
//!
//! # The floor
//! What one durable update cannot avoid, measured in this process on the
//! same disk directory (see [`floor`]): the responder signs and the proposer
//! signs (2 signatures); each checks the other's signature (2 checks); the
//! responder persists its signature before replying and the proposer
//! persists the fully signed state before `pay` returns (2 `fdatasync`s);
//! the request and its reply (1 network round trip of an `Update`-size
//! message over `perun_wire`). `floor_ratio` = durable p50 / floor: how much
//! the SDK adds on top of physics.

mod chain_index;
mod floor;
mod floor_many;
mod merge;
mod payments;
mod peer;
mod report;
mod restore;
mod setup;
mod stats;
mod tower;
mod updates;

use std::path::PathBuf;
use std::time::Duration;

/// The benchmark's error type: every part reports its failure as text.
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How much work each part does.
#[derive(Debug, Clone)]
pub(crate) struct Counts {
    /// Updates before measuring.
    pub(crate) warmup: usize,
    /// Sequential updates measured.
    pub(crate) measured: usize,
    /// Channels opened one by one for `open_channel_ms`.
    pub(crate) opens: usize,
    /// Channels updating at once.
    pub(crate) concurrent_channels: usize,
    /// How long they update.
    pub(crate) concurrent_for: Duration,
    /// Channels restored by the child process.
    pub(crate) restore_channels: usize,
    /// Iterations of each floor primitive (fsync: a tenth of it).
    pub(crate) floor_iterations: usize,
    /// Keep-alive connections (one user each) sending appointments to the tower.
    pub(crate) tower_connections: usize,
    /// Appointments each of them sends.
    pub(crate) tower_per_conn: usize,
    /// Appointments stored for the tower's per-block cost and memory.
    pub(crate) tower_stored: usize,
    /// Blocks with a dispute each that the tower scans.
    pub(crate) tower_dispute_blocks: usize,
    /// Pairs of 100-payment batches (raw `pay`, `Payments`) measured.
    pub(crate) payment_batches: usize,
    /// Channels of the account whose events the chain index scans.
    pub(crate) index_channels: u64,
    /// Deposits of other accounts among them.
    pub(crate) index_others: u64,
    /// Blocks the events are spread over.
    pub(crate) index_blocks: u64,
}

impl Counts {
    fn full() -> Self {
        Self {
            warmup: 100,
            measured: 2_000,
            opens: 10,
            concurrent_channels: 100,
            concurrent_for: Duration::from_secs(10),
            restore_channels: 10_000,
            floor_iterations: 2_000,
            tower_connections: 32,
            tower_per_conn: 500,
            tower_stored: 100_000,
            tower_dispute_blocks: 500,
            payment_batches: 10,
            index_channels: 1_000,
            index_others: 200,
            index_blocks: 100_000,
        }
    }

    fn quick() -> Self {
        Self {
            warmup: 10,
            measured: 200,
            opens: 3,
            concurrent_channels: 10,
            concurrent_for: Duration::from_secs(2),
            restore_channels: 500,
            floor_iterations: 500,
            tower_connections: 8,
            tower_per_conn: 100,
            tower_stored: 5_000,
            tower_dispute_blocks: 50,
            payment_batches: 2,
            index_channels: 50,
            index_others: 10,
            index_blocks: 5_000,
        }
    }
}

/// Command-line options of the parent process.
#[derive(Debug)]
pub(crate) struct Options {
    /// Small counts.
    pub(crate) quick: bool,
    /// Where `summary.json` goes.
    pub(crate) out: PathBuf,
    /// Scratch directory on the real disk (next to `out`).
    pub(crate) work: PathBuf,
    /// The work counts.
    pub(crate) counts: Counts,
    /// Run only these parts (comma-separated names: `floor`, `durable`,
    /// `memory`, `restore`, ...), e.g. under a profiler.
    pub(crate) only: Option<String>,
}

fn options(args: &[String]) -> Res<Options> {
    let mut quick = false;
    let mut out = PathBuf::from("target/bench/summary.json");
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a path")?),
            "--only" => only = Some(it.next().ok_or("--only needs a part")?.clone()),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; use [--quick] [--out PATH] [--only PART]"
                )
                .into());
            }
        }
    }
    let work = out
        .parent()
        .map(|p| p.join("tmp"))
        .unwrap_or_else(|| PathBuf::from("tmp"));
    let counts = if quick {
        Counts::quick()
    } else {
        Counts::full()
    };
    Ok(Options {
        quick,
        out,
        work,
        counts,
        only,
    })
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("error,alloy_pubsub=off,alloy_transport_ws=off")
    });
    // Standard error: a child's standard output carries its lines to the
    // parent.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some(restore::CHILD_FLAG) {
        // No log subscriber: the child measures the client alone.
        return runtime.block_on(restore::child(&args[1..]));
    }
    if args.first().map(String::as_str) == Some(floor::ECHO_FLAG) {
        return runtime.block_on(floor::echo_child());
    }
    if args.first().map(String::as_str) == Some(peer::CHILD_FLAG) {
        // Bob's process logs as the parent does (errors only by default).
        init_logs();
        return runtime.block_on(peer::child(&args[1..]));
    }
    if args.first().map(String::as_str) == Some(floor_many::CHILD_FLAG) {
        return runtime.block_on(floor_many::child(&args[1..]));
    }
    if args.first().map(String::as_str) == Some(tower::CHILD_FLAG) {
        return runtime.block_on(tower::child(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("--merge") {
        let out = args.get(1).ok_or("--merge OUT RUN...")?;
        let runs: Vec<PathBuf> = args[2..].iter().map(PathBuf::from).collect();
        return merge::merge(std::path::Path::new(out), &runs);
    }
    init_logs();
    let opts = options(&args)?;
    runtime.block_on(report::run_all(&opts))
}
