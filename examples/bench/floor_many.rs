//! The floor at many channels: `n` two-party updates at once, each made of
//! nearly nothing but what an update cannot avoid, timed like the SDK's
//! 100-channel run ([`crate::updates::aggregate`]) right after it.
//!
//! One update here runs as the SDK's does in a burst: Alice hashes the new
//! state and sends it as an `UpdateWithCommit` carrying the last state's
//! signatures over a real `perun_wire` connection to a node in a child
//! process, signing it while the request is on its way; there a task of
//! its own (as the SDK's dispatch spawns one) checks her signature of the
//! last state, hashes and signs the new one, writes 400 bytes durably and
//! answers with an `UpdateAccept`; Alice checks that signature and writes
//! 400 bytes durably. Each side's writes go through a thread that syncs
//! whatever is queued with one `fdatasync` (group commit, with a wait for
//! fuller batches). No state machine (no transition rules, no guard against
//! signing a version twice), store, memo, handler or event: what the SDK's
//! run would reach if its own work cost nothing. Its figures say how near
//! the machine's crypto bound even that comes (the network's, the disk's
//! and the scheduler's share), and how much of the rest is the SDK's.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use perun::channel::{Address, B256, Signature, State, U256};
use perun::persistence::BATCH_WAIT_FROM;
use perun::wallet::signature::recover;
use perun::wallet::{Account, LocalAccount};
use perun::wire::node::Handle;
use perun::wire::{
    Config, Message, Node, PeerId, Update, UpdateAccept, UpdateCommit, UpdateWithCommit,
    generate_key,
};
use tokio::sync::oneshot;

use crate::Res;
use crate::floor::{CryptoDuring, sample_state};
use crate::peer::{Process, addr_strings, first_addr, ready_field, serve_until_stdin_closes};
use crate::stats::Samples;
use crate::updates::Pace;

/// The first argument that makes this binary the floor's answering node.
pub(crate) const CHILD_FLAG: &str = "--floor-many-child";

/// What the run measured.
#[derive(Debug)]
pub(crate) struct FloorMany {
    /// Updates, wall time and both processes' CPU time.
    pub(crate) pace: Pace,
    /// One update's crypto as CPU time, sampled meanwhile.
    pub(crate) crypto_during: Samples,
    /// Alice's durable writes.
    pub(crate) writes: u64,
    /// The `fdatasync`s those writes shared.
    pub(crate) syncs: u64,
}

impl FloorMany {
    pub(crate) fn writes_per_sync(&self) -> Option<f64> {
        (self.syncs > 0).then(|| self.writes as f64 / self.syncs as f64)
    }
}

/// `channels` tasks update for `run_for` against a child process; its and
/// Alice's logs lie in `dir`.
pub(crate) async fn run(dir: &Path, channels: usize, run_for: Duration) -> Res<FloorMany> {
    std::fs::create_dir_all(dir)?;
    let alice = Arc::new(LocalAccount::random());
    let (child, ready) = Process::spawn(&[
        CHILD_FLAG.to_string(),
        dir.display().to_string(),
        alice.address().to_string(),
    ])
    .await?;
    let id: PeerId = ready_field(&ready, "peer")?.parse()?;
    let address: Address = ready_field(&ready, "address")?.parse()?;
    let addr = first_addr(&ready)?;
    let (node, _inbound) = Node::start(Config::new(generate_key())).await?;
    node.dial(id, Some(addr)).await?;
    let bob = Arc::new(Bob { node, id, address });
    let cpu = || -> Res<Duration> { Ok(crate::stats::cpu_time()? + child.cpu_time()?) };
    let measured = measure(&bob, &alice, dir, channels, run_for, cpu).await;
    // Also after a failure: the node's tasks would run on through the
    // parts after this one (the child is killed when dropped).
    bob.node.shutdown().await;
    child.shutdown().await?;
    measured
}

/// The run proper; `cpu` is both processes' CPU time so far.
async fn measure(
    bob: &Arc<Bob>,
    alice: &Arc<LocalAccount>,
    dir: &Path,
    channels: usize,
    run_for: Duration,
    cpu: impl Fn() -> Res<Duration>,
) -> Res<FloorMany> {
    let log = Arc::new(GroupLog::open(&dir.join("floor-many-alice.log"))?);
    // Every channel once before the clock starts (connections, lanes).
    let mut chans = Vec::with_capacity(channels);
    for i in 0..channels {
        let (_, mut state) = sample_state(alice, &LocalAccount::random());
        state.channelId = B256::from(U256::from(i + 1));
        let mut ch = Chan { state, last: None };
        update(bob, alice, &mut ch, &log).await?;
        chans.push(ch);
    }
    let (writes_before, syncs_before) = log.counts();
    let cpu_before = cpu()?;
    let during = CryptoDuring::start();
    let started = Instant::now();
    let deadline = started + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for mut ch in chans {
        let (bob, alice, log) = (bob.clone(), alice.clone(), log.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                update(&bob, &alice, &mut ch, &log).await?;
                n += 1;
            }
            Res::Ok(n)
        });
    }
    let mut updates = 0;
    while let Some(done) = tasks.join_next().await {
        updates += done??;
    }
    let wall = started.elapsed();
    let cpu = cpu()?.saturating_sub(cpu_before);
    let crypto_during = during.finish()?;
    let (writes, syncs) = log.counts();
    Ok(FloorMany {
        pace: Pace { updates, wall, cpu },
        crypto_during,
        writes: writes - writes_before,
        syncs: syncs - syncs_before,
    })
}

/// Bob's node as Alice sees it.
struct Bob {
    node: Handle,
    id: PeerId,
    address: Address,
}

/// One channel as Alice drives it.
struct Chan {
    state: State,
    /// The last state's version and both signatures: its commit rides with
    /// the next update, as the SDK's does in a burst.
    last: Option<(u64, Signature, Signature)>,
}

/// One update of `ch`, Alice's side.
async fn update(bob: &Bob, alice: &LocalAccount, ch: &mut Chan, log: &GroupLog) -> Res<()> {
    ch.state.version += 1;
    let hash = ch.state.hash();
    let channel_id = ch.state.channelId;
    let update = Update {
        channel_id,
        state: ch.state.clone(),
        actor: 0,
    };
    let msg = match ch.last {
        Some((version, ours, theirs)) => Message::UpdateWithCommit(UpdateWithCommit {
            commit: UpdateCommit {
                channel_id,
                version,
                index: 0,
                signatures: vec![ours, theirs],
            },
            update,
        }),
        None => Message::Update(update),
    };
    // As the SDK's proposer does: her signature is made while the request
    // is on its way, and leaves with the next update.
    let (reply, ours) = futures::join!(bob.node.send(bob.id, &msg), async {
        tokio::task::yield_now().await;
        alice.sign_hash(hash)
    });
    let Message::UpdateAccept(accept) = reply? else {
        return Err("the floor child did not accept".into());
    };
    let ours = ours?;
    if recover(hash, &accept.signature)? != bob.address {
        return Err("the floor child's signature recovered another signer".into());
    }
    log.write(record(&[ours.as_bytes(), accept.signature.as_bytes()]))
        .await?;
    ch.last = Some((ch.state.version, ours, accept.signature));
    Ok(())
}

/// A 400-byte record (the floor's durable write) starting with `parts`.
fn record(parts: &[[u8; 65]]) -> Vec<u8> {
    let mut r = Vec::with_capacity(GroupLog::RECORD);
    for p in parts {
        r.extend_from_slice(p);
    }
    r.resize(GroupLog::RECORD, 0);
    r
}

/// What Bob signed last on each channel: its version and hash, to check
/// Alice's signature of it when its commit comes.
type Signed = Mutex<HashMap<B256, (u64, B256)>>;

/// The child: answers every update as Bob would, each in a task of its
/// own, until its standard input closes. Arguments: the directory of its
/// log, Alice's address.
pub(crate) async fn child(args: &[String]) -> Res<()> {
    let dir = PathBuf::from(args.first().ok_or("the floor child needs a directory")?);
    let alice: Address = args
        .get(1)
        .ok_or("the floor child needs Alice's address")?
        .parse()?;
    let bob = Arc::new(LocalAccount::random());
    let log = Arc::new(GroupLog::open(&dir.join("floor-many-bob.log"))?);
    let signed = Arc::new(Signed::default());
    let (node, mut inbound) = Node::start(Config::new(generate_key())).await?;
    let addrs = addr_strings(&node.listen_addrs().await?);
    let address = bob.address();
    let server = tokio::spawn(async move {
        while let Some(req) = inbound.next().await {
            let (_, msg, responder) = req.into_parts();
            let (bob, log, signed) = (bob.clone(), log.clone(), signed.clone());
            tokio::spawn(async move {
                match answer(&bob, alice, &log, &signed, msg).await {
                    Ok(reply) => {
                        let _ = responder.reply(reply);
                    }
                    // The responder dropped unanswered refuses the request:
                    // Alice's update fails, and the run with it.
                    Err(e) => eprintln!("floor child: {e}"),
                }
            });
        }
    });
    let ready = serde_json::json!({
        "peer": node.local_peer_id().to_string(),
        "addrs": addrs,
        "address": address.to_string(),
    });
    let served = serve_until_stdin_closes(&ready).await;
    server.abort();
    node.shutdown().await;
    served
}

/// Bob's side of one update: the ridden commit checked, the new state
/// signed and written.
async fn answer(
    bob: &LocalAccount,
    alice: Address,
    log: &GroupLog,
    signed: &Signed,
    msg: Message,
) -> Res<Message> {
    let (commit, update) = match msg {
        Message::UpdateWithCommit(m) => (Some(m.commit), m.update),
        Message::Update(u) => (None, u),
        _ => return Err("not an update".into()),
    };
    let lock = || {
        signed
            .lock()
            .map_err(|_| "the floor child's map is poisoned")
    };
    if let Some(c) = &commit {
        let Some((_, hash)) = lock()?
            .get(&c.channel_id)
            .copied()
            .filter(|(v, _)| *v == c.version)
        else {
            return Err("a commit of a state Bob did not sign".into());
        };
        let theirs = c.signatures.first().ok_or("a commit without signatures")?;
        if recover(hash, theirs)? != alice {
            return Err("Alice's signature recovered another signer".into());
        }
    }
    let hash = update.state.hash();
    let ours = bob.sign_hash(hash)?;
    lock()?.insert(update.channel_id, (update.state.version, hash));
    log.write(record(&[ours.as_bytes()])).await?;
    Ok(Message::UpdateAccept(UpdateAccept {
        channel_id: update.channel_id,
        version: update.state.version,
        index: 1,
        signature: ours,
    }))
}

/// A preallocated file whose writes share one `fdatasync` per batch: a
/// thread takes every queued record, writes them as one, syncs, and
/// acknowledges each; after a batch of several it waits for a fuller one,
/// as the SDK's store does while the CPUs are busy (they are, here). The
/// thread is not joined: it ends when the log is dropped.
struct GroupLog {
    queue: mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>,
    writes: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
}

impl GroupLog {
    const RECORD: usize = 400;
    /// Written with zeros and synced first, so an append never changes the
    /// file's size; wraps around at its end (a batch holds at most one
    /// record per channel, far less than this).
    const SIZE: u64 = 8 * 1024 * 1024;
    /// How long the thread waits for a fuller batch. Single runs on a
    /// 2-vCPU guest (BENCHMARKS.md): 1 ms, the SDK's default
    /// ([`perun::persistence::RedbOptions::batch_wait`]), gave 5–6 writes
    /// per sync and 0.71–0.72 of the crypto bound; 2 ms 11–13 and
    /// 0.73–0.75; 3 ms 21 and 0.73, with fewer cores busy. The floor's
    /// round is shorter than the SDK's, so it needs longer to fill a batch.
    const BATCH_WAIT: Duration = Duration::from_millis(2);

    fn open(path: &Path) -> Res<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)?;
        let zeros = vec![0u8; 1024 * 1024];
        for i in 0..Self::SIZE / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64)?;
        }
        file.sync_all()?;
        let (tx, rx) = mpsc::channel();
        let (writes, syncs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counts = (writes.clone(), syncs.clone());
        std::thread::Builder::new()
            .name("floor-log".into())
            .spawn(move || Self::run(&file, &rx, &counts.0, &counts.1))?;
        Ok(Self {
            queue: tx,
            writes,
            syncs,
        })
    }

    /// Appends `record`; returns once it is durable.
    async fn write(&self, record: Vec<u8>) -> Res<()> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((record, tx))
            .map_err(|_| "the floor's log thread stopped")?;
        rx.await.map_err(|_| "the floor's log failed a write")?;
        Ok(())
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.syncs.load(Ordering::Relaxed),
        )
    }

    /// The thread: stops when every sender is gone, or on an I/O error
    /// (the queued writers then see their acknowledgement dropped).
    fn run(
        file: &File,
        rx: &mpsc::Receiver<(Vec<u8>, oneshot::Sender<()>)>,
        writes: &AtomicU64,
        syncs: &AtomicU64,
    ) {
        let mut at = 0;
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.clear();
            batch.extend_from_slice(&first.0);
            acks.push(first.1);
            while let Ok((record, ack)) = rx.try_recv() {
                batch.extend_from_slice(&record);
                acks.push(ack);
            }
            if at + batch.len() as u64 > Self::SIZE {
                at = 0;
            }
            if let Err(e) = file
                .write_all_at(&batch, at)
                .and_then(|()| file.sync_data())
            {
                eprintln!("floor log: {e}");
                return;
            }
            at += batch.len() as u64;
            writes.fetch_add(acks.len() as u64, Ordering::Relaxed);
            syncs.fetch_add(1, Ordering::Relaxed);
            let taken = acks.len();
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
            // After a batch of several, a fuller next one.
            if taken >= BATCH_WAIT_FROM {
                std::thread::sleep(Self::BATCH_WAIT);
            }
        }
    }
}
