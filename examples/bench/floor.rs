//! The floor: the primitives one durable two-party update cannot avoid,
//! each measured on its own (p50) in this process (the round trip's other
//! end in a child).
//!
//! - sign: `SignedState::sign` of a realistic two-party state (hash +
//!   EIP-191 secp256k1 signature), as the responder and the proposer do.
//!   Measured alone here and again between batches of the durable updates
//!   ([`CryptoProbe`]), like the check; the floor uses the interleaved
//!   samples when there are any;
//! - check: public key recovery + compare, as each side does with the
//!   other's signature (each side hashes the new state once, counted with
//!   its signature);
//! - fsync: `write_at` of ~400 bytes into a preallocated file in the
//!   benchmark's directory, then `sync_data`, as each side's store must
//!   make its write durable once. Measured alone here and again between
//!   batches of the durable updates ([`FsyncProbe`]); the floor uses the
//!   interleaved samples when there are any;
//! - round trip: an `Update` request answered with an `UpdateAccept` over a
//!   real `perun_wire` connection on 127.0.0.1 to a node in a child
//!   process, as Bob is for the updates ([`crate::peer`]). Measured alone
//!   here and again between batches of the updates ([`RoundTripProbe`]),
//!   like the others: this guest's round trip moves by a third between
//!   minutes.
//!
//! `floor = 2 sign + 2 check + 2 fsync + 1 round trip`.
//!
//! Its fsyncs come back to back. An update's cannot: each follows the other
//! by the update's other work, about half the floor without its fsyncs.
//! `floor_fsync_spaced_ms` samples the same write and sync after such a
//! pause, alternating between two files as an update's two stores do
//! ([`PairProbe::sample_spaced`]), and `floor_ratio_spaced` compares the
//! update with the floor built on it (information, not a target). The
//! pause comes from the standalone floor, measured before the updates.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use perun::channel::{Address, Allocation, Asset, Params, SignedState, State, U256};
use perun::wallet::signature::recover;
use perun::wallet::{Account, LocalAccount};
use perun::wire::{Config, Message, Node, PeerId, Update, UpdateAccept, generate_key};

use crate::Res;
use crate::peer::{Process, addr_strings, first_addr, ready_field, serve_until_stdin_closes};
use crate::stats::Samples;

/// The p50 of each primitive, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Floor {
    /// One state signature.
    pub(crate) sign_ms: f64,
    /// One signature check.
    pub(crate) verify_ms: f64,
    /// One small durable write.
    pub(crate) fsync_ms: f64,
    /// One request/response over the wire.
    pub(crate) round_trip_ms: f64,
}

impl Floor {
    /// What one durable update cannot avoid, in milliseconds.
    pub(crate) fn update_ms(&self) -> f64 {
        self.without_fsync_ms() + 2.0 * self.fsync_ms
    }

    /// The same without its two syncs (what an in-memory update cannot
    /// avoid).
    pub(crate) fn without_fsync_ms(&self) -> f64 {
        without_fsync_ms(self.sign_ms, self.verify_ms, self.round_trip_ms)
    }
}

/// The floor of an update without its syncs from its parts' p50s, in
/// milliseconds: two signatures, two checks, one round trip.
pub(crate) fn without_fsync_ms(sign_ms: f64, verify_ms: f64, round_trip_ms: f64) -> f64 {
    2.0 * sign_ms + 2.0 * verify_ms + round_trip_ms
}

/// Measures every primitive; fsync in `dir`.
pub(crate) async fn measure(dir: &Path, iterations: usize) -> Res<Floor> {
    let (sign_ms, verify_ms) = crypto(iterations)?;
    let fsync_ms = fsync(dir, (iterations / 10).max(50))?;
    let round_trip_ms = round_trip(iterations).await?;
    Ok(Floor {
        sign_ms,
        verify_ms,
        fsync_ms,
        round_trip_ms,
    })
}

/// A two-party payment channel's state as the benchmark channels hold it.
pub(crate) fn sample_state(alice: &LocalAccount, bob: &LocalAccount) -> (Params, State) {
    let wei = U256::from(10u64).pow(U256::from(15));
    let domain = perun::channel::Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let params = Params::payment(
        domain,
        60,
        U256::from(42),
        vec![alice.address(), bob.address()],
        vec![vec![wei, wei]],
    );
    let asset = Asset {
        chainId: U256::from(31337),
        holder: Address::repeat_byte(0xee),
    };
    let state = State::initial(&params, Allocation::new(vec![asset], vec![vec![wei, wei]]));
    (params, state)
}

/// p50 of signing and of checking a signature, in milliseconds.
fn crypto(iterations: usize) -> Res<(f64, f64)> {
    let mut probe = CryptoProbe::new();
    probe.sample(iterations)?;
    let (signs, checks) = probe.finish();
    Ok((signs.p50(), checks.p50()))
}

/// Signatures and checks of a realistic state, timed one by one: the
/// crypto part of the floor. Used alone and between batches of the
/// durable updates: on a shared host this guest's crypto runs at two
/// speeds that alternate within a second (a signature 25 or 37 µs,
/// BENCHMARKS.md), and the floor should see the mix the updates see.
pub(crate) struct CryptoProbe {
    alice: LocalAccount,
    params: Params,
    state: State,
    signs: Vec<Duration>,
    checks: Vec<Duration>,
}

impl CryptoProbe {
    pub(crate) fn new() -> Self {
        let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
        let (params, state) = sample_state(&alice, &bob);
        Self {
            alice,
            params,
            state,
            signs: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Times `n` signatures, each of a new version (its hash and
    /// signature), and their checks (key recovery and compare: an update
    /// hashes each new state once per side, with its signature).
    pub(crate) fn sample(&mut self, n: usize) -> Res<()> {
        for _ in 0..n {
            self.state.version += 1;
            let t = Instant::now();
            let hash = self.state.hash();
            let sig = self.alice.sign_hash(hash)?;
            self.signs.push(t.elapsed());
            // Not `verify_sig`: it hashes again, and its memo knows the
            // signature it just made.
            let t = Instant::now();
            let signer = recover(hash, &sig)?;
            self.checks.push(t.elapsed());
            if signer != self.params.participants[0] {
                return Err("the floor's check recovered another signer".into());
            }
        }
        Ok(())
    }

    /// Every signature's and every check's time so far.
    pub(crate) fn finish(self) -> (Samples, Samples) {
        (Samples::new(self.signs), Samples::new(self.checks))
    }
}

/// The crypto of one update (two signatures and two checks of a realistic
/// state: per side one hash of the new state, a signature of it, and a key
/// recovery and a compare for the other side's, as each side hashes a new
/// state once) timed as CPU time on a thread of its own, sampled while the
/// 100-channel run goes on: the signature CPU that run meets, under its
/// load and in the machine's speed of the moment. CPU time, not wall time:
/// the probe waits for a core like every thread of that run, and only its
/// own work counts. One update's crypto every 50 ms, about 0.3 % of a core.
/// Only meaningful while the cores are busy: on an idle machine each sample
/// after the pause finds cold caches (about 30 % slower).
pub(crate) struct CryptoDuring {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Duration>, String>>>,
}

impl CryptoDuring {
    const EVERY: Duration = Duration::from_millis(50);

    pub(crate) fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
            let (_, mut state) = sample_state(&alice, &bob);
            let mut took = Vec::new();
            loop {
                std::thread::park_timeout(Self::EVERY);
                if stopped.load(Ordering::Relaxed) {
                    return Ok(took);
                }
                let t = thread_cpu();
                for _ in 0..2 {
                    state.version += 1;
                    let hash = state.hash();
                    let sig = alice.sign_hash(hash).map_err(|e| e.to_string())?;
                    // Not `verify`: its memo would answer without a recovery.
                    let signer = recover(hash, &sig).map_err(|e| e.to_string())?;
                    if signer != alice.address() {
                        return Err("the probe's check recovered another signer".into());
                    }
                }
                took.push(thread_cpu().saturating_sub(t));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the probe; every update's crypto CPU time it sampled.
    pub(crate) fn finish(mut self) -> Res<Samples> {
        let thread = self.stop_thread().ok_or("the crypto probe is gone")?;
        let took = thread.join().map_err(|_| "the crypto probe panicked")??;
        Ok(Samples::new(took))
    }

    fn stop_thread(&mut self) -> Option<std::thread::JoinHandle<Result<Vec<Duration>, String>>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        thread.thread().unpark();
        Some(thread)
    }
}

impl Drop for CryptoDuring {
    /// A run that failed or timed out still stops the probe: it must not
    /// sign on through the parts after it.
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Small durable writes into a preallocated file in the benchmark's
/// directory: the fsync part of the floor. Used alone and between batches
/// of durable updates, so the floor sees the disk as the updates do (a
/// shared disk's fsync latency swings with other writers).
pub(crate) struct FsyncProbe {
    file: std::fs::File,
    path: std::path::PathBuf,
    slot: u64,
    took: Vec<Duration>,
}

impl FsyncProbe {
    const RECORD: usize = 400;
    const SLOTS: u64 = 1024;

    /// Creates the file and writes it full of zeros (synced), so each
    /// measured write changes data only: neither the file's size nor its
    /// blocks (a sparse file's first write to a page allocates one, which
    /// its sync must make durable too). The store's log is made the same
    /// way.
    pub(crate) fn new(dir: &Path) -> Res<Self> {
        Self::named(dir, "floor-fsync.bin")
    }

    fn named(dir: &Path, name: &str) -> Res<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        file.write_all_at(&vec![0u8; (Self::SLOTS * 512) as usize], 0)?;
        file.sync_all()?;
        Ok(Self {
            file,
            path,
            slot: 0,
            took: Vec::new(),
        })
    }

    /// Times `n` writes of ~400 bytes, each followed by `sync_data`.
    pub(crate) fn sample(&mut self, n: usize) -> Res<()> {
        for _ in 0..n {
            let took = self.write_one()?;
            self.took.push(took);
        }
        Ok(())
    }

    /// One write of ~400 bytes and its `sync_data`, timed.
    fn write_one(&mut self) -> Res<Duration> {
        let record = [0x5au8; Self::RECORD];
        let t = Instant::now();
        self.file.write_all_at(&record, self.slot * 512)?;
        self.file.sync_data()?;
        self.slot = (self.slot + 1) % Self::SLOTS;
        Ok(t.elapsed())
    }

    /// Every sample so far; removes the file.
    pub(crate) fn finish(self) -> Res<Samples> {
        let Self {
            file, path, took, ..
        } = self;
        drop(file);
        std::fs::remove_file(&path)?;
        Ok(Samples::new(took))
    }
}

/// The disk part of sequential durable updates, and nothing else: two
/// small durable writes in turn, each in its own file (the responder's
/// store, then the proposer's). Sampled between batches of the updates, as
/// many as they, so both meet the same spells of a slow disk (a virtual
/// disk's syncs slow down several-fold for tens of milliseconds at a time,
/// and both syncs of an update meet such a spell).
///
/// The same files also give the floor's write and sync as an update meets
/// it ([`sample_spaced`](Self::sample_spaced)).
pub(crate) struct PairProbe {
    responder: FsyncProbe,
    proposer: FsyncProbe,
    took: Vec<Duration>,
    spaced: Vec<Duration>,
}

impl PairProbe {
    pub(crate) fn new(dir: &Path) -> Res<Self> {
        Ok(Self {
            responder: FsyncProbe::named(dir, "floor-fsync-a.bin")?,
            proposer: FsyncProbe::named(dir, "floor-fsync-b.bin")?,
            took: Vec::new(),
            spaced: Vec::new(),
        })
    }

    /// Times `n` pairs of syncs.
    pub(crate) fn sample(&mut self, n: usize) -> Res<()> {
        for _ in 0..n {
            let took = self.responder.write_one()? + self.proposer.write_one()?;
            self.took.push(took);
        }
        Ok(())
    }

    /// Times `n` single syncs, alternating between the files, each after
    /// `gap` without I/O, as in an update, where signatures, checks and
    /// messages lie between them (this thread spins meanwhile; in an update
    /// other threads work while the syncing one waits). On this guest's
    /// virtual disk that alone makes a sync slower than the floor's
    /// back-to-back ones (BENCHMARKS.md); no update can sync back to back.
    pub(crate) fn sample_spaced(&mut self, n: usize, gap: Duration) -> Res<()> {
        for i in 0..n {
            let quiet = Instant::now();
            while quiet.elapsed() < gap {
                std::hint::spin_loop();
            }
            let file = if i % 2 == 0 {
                &mut self.responder
            } else {
                &mut self.proposer
            };
            let took = file.write_one()?;
            self.spaced.push(took);
        }
        Ok(())
    }

    /// Every pair so far and every spaced sync; removes the files.
    pub(crate) fn finish(self) -> Res<(Samples, Samples)> {
        // Both files go, even if one cannot.
        let (a, b) = (self.responder.finish(), self.proposer.finish());
        a?;
        b?;
        Ok((Samples::new(self.took), Samples::new(self.spaced)))
    }
}

/// p50 of writing ~400 bytes and `sync_data`, in milliseconds.
fn fsync(dir: &Path, iterations: usize) -> Res<f64> {
    let mut probe = FsyncProbe::new(dir)?;
    probe.sample(iterations)?;
    Ok(probe.finish()?.p50())
}

fn update_msg(state: &State) -> Message {
    Message::Update(Update {
        channel_id: state.channelId,
        state: state.clone(),
        actor: 0,
    })
}

/// The first argument that makes this binary the round trip's answering
/// node.
pub(crate) const ECHO_FLAG: &str = "--echo-child";

/// p50 of an `Update` request answered by an `UpdateAccept`, in
/// milliseconds (see [`RoundTripProbe`]).
async fn round_trip(iterations: usize) -> Res<f64> {
    let mut probe = RoundTripProbe::start(iterations / 10).await?;
    probe.sample(iterations).await?;
    Ok(probe.finish().await?.p50())
}

/// Round trips of an `Update` request answered by an `UpdateAccept`, with
/// the answering node in a child process: the updates it is the floor of
/// run Bob in a process of his own ([`crate::peer`]), so both cross the
/// same process boundary. Used alone and between batches of the updates.
pub(crate) struct RoundTripProbe {
    node: perun::wire::Handle,
    echo: Process,
    peer: PeerId,
    msg: Message,
    took: Vec<Duration>,
}

impl RoundTripProbe {
    /// Starts the echo child, connects, and sends `warmup` unmeasured
    /// requests.
    pub(crate) async fn start(warmup: usize) -> Res<Self> {
        let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
        let (_, state) = sample_state(&alice, &bob);
        let (echo, ready) = Process::spawn(&[ECHO_FLAG.to_string()]).await?;
        let peer: PeerId = ready_field(&ready, "peer")?.parse()?;
        let addr = first_addr(&ready)?;
        let (node, _incoming) = Node::start(Config::new(generate_key())).await?;
        node.dial(peer, Some(addr)).await?;
        let msg = update_msg(&state);
        for _ in 0..warmup {
            node.send(peer, &msg).await?;
        }
        Ok(Self {
            node,
            echo,
            peer,
            msg,
            took: Vec::new(),
        })
    }

    /// Times `n` round trips, one at a time.
    pub(crate) async fn sample(&mut self, n: usize) -> Res<()> {
        for _ in 0..n {
            let t = Instant::now();
            self.node.send(self.peer, &self.msg).await?;
            self.took.push(t.elapsed());
        }
        Ok(())
    }

    /// Every round trip so far; stops the child.
    pub(crate) async fn finish(self) -> Res<Samples> {
        self.node.shutdown().await;
        self.echo.shutdown().await?;
        Ok(Samples::new(self.took))
    }
}

/// The echo child: answers every `Update` with a signed `UpdateAccept`
/// until its standard input closes.
pub(crate) async fn echo_child() -> Res<()> {
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let (params, state) = sample_state(&alice, &bob);
    let sig = SignedState::new(state).sign(&params, 1, &bob)?;
    let (b, mut b_in) = Node::start(Config::new(generate_key())).await?;
    let addrs = addr_strings(&b.listen_addrs().await?);
    let server = tokio::spawn(async move {
        while let Some(req) = b_in.next().await {
            let (_, msg, responder) = req.into_parts();
            if let Message::Update(u) = msg {
                let _ = responder.reply(Message::UpdateAccept(UpdateAccept {
                    channel_id: u.channel_id,
                    version: u.state.version,
                    index: 1,
                    signature: sig,
                }));
            }
        }
    });
    let ready = serde_json::json!({ "peer": b.local_peer_id().to_string(), "addrs": addrs });
    let served = serve_until_stdin_closes(&ready).await;
    server.abort();
    b.shutdown().await;
    served
}
