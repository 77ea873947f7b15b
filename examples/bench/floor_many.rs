//! The floor at many channels: `n` two-party updates at once, each made of
//! nothing but what an update cannot avoid, timed like the SDK's
//! 100-channel run ([`crate::updates::aggregate`]) right after it.
//!
//! One update here: Alice hashes the state and signs it, sends it with her
//! signature as an `UpdateWithCommit` over a real `perun_wire` connection
//! to a node in a child process; there a task of its own (as the SDK's
//! dispatch spawns one) hashes it, checks her signature, signs, writes 400
//! bytes durably and answers with an `UpdateAccept`; Alice checks that
//! signature and writes 400 bytes durably. Each side's writes go through a
//! thread that syncs whatever is queued with one `fdatasync` (group commit,
//! never waiting for a fuller batch). No state machine, store, memo,
//! handler or event: what the SDK's run would reach if its own work cost
//! nothing. Its figures say how near the machine's crypto bound even that
//! comes (the network's and the disk's share), and how much of the rest is
//! the SDK's.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use perun::channel::{Address, B256, State, U256};
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
use crate::peer::{Process, parse_addrs, serve_until_stdin_closes};
use crate::stats::Samples;

/// The first argument that makes this binary the floor's answering node.
pub(crate) const CHILD_FLAG: &str = "--floor-many-child";

/// What the run measured.
#[derive(Debug)]
pub(crate) struct FloorMany {
    /// Updates completed over all channels.
    pub(crate) updates: u64,
    /// From the start to the last task's end.
    pub(crate) wall: Duration,
    /// Both processes' CPU time meanwhile.
    pub(crate) cpu: Duration,
    /// One update's crypto as CPU time, sampled meanwhile.
    pub(crate) crypto_during: Samples,
    /// Alice's durable writes, and the `fdatasync`s they shared.
    pub(crate) writes: u64,
    pub(crate) syncs: u64,
}

impl FloorMany {
    pub(crate) fn per_s(&self) -> f64 {
        self.updates as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn cores_busy(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub(crate) fn cpu_ms_per_update(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e3 / self.updates.max(1) as f64
    }

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
    let bob_id: PeerId = ready["peer"]
        .as_str()
        .ok_or("the floor child's ready line lacks peer")?
        .parse()?;
    let bob: Address = ready["address"]
        .as_str()
        .ok_or("the floor child's ready line lacks address")?
        .parse()?;
    let addr = parse_addrs(&ready)?
        .into_iter()
        .next()
        .ok_or("no listen address")?;
    let (node, _inbound) = Node::start(Config::new(generate_key())).await?;
    node.dial(bob_id, Some(addr)).await?;
    let log = Arc::new(GroupLog::open(&dir.join("floor-many-alice.log"))?);
    let peer = Peer {
        node,
        id: bob_id,
        address: bob,
    };
    let peer = Arc::new(peer);
    // Every channel once before the clock starts (connections, lanes).
    let mut states = Vec::with_capacity(channels);
    for i in 0..channels {
        let (_, mut state) = sample_state(&alice, &LocalAccount::random());
        state.channelId = B256::from(U256::from(i + 1));
        update(&peer, &alice, &mut state, &log).await?;
        states.push(state);
    }
    let cpu = || -> Res<Duration> { Ok(crate::stats::cpu_time()? + child.cpu_time()?) };
    let (writes_before, syncs_before) = log.counts();
    let cpu_before = cpu()?;
    let during = CryptoDuring::start();
    let started = Instant::now();
    let deadline = started + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for mut state in states {
        let (peer, alice, log) = (peer.clone(), alice.clone(), log.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                update(&peer, &alice, &mut state, &log).await?;
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
    peer.node.shutdown().await;
    child.shutdown().await?;
    Ok(FloorMany {
        updates,
        wall,
        cpu,
        crypto_during,
        writes: writes - writes_before,
        syncs: syncs - syncs_before,
    })
}

/// Bob's node as Alice sees it.
struct Peer {
    node: Handle,
    id: PeerId,
    address: Address,
}

/// One update on `state`'s channel, Alice's side.
async fn update(peer: &Peer, alice: &LocalAccount, state: &mut State, log: &GroupLog) -> Res<()> {
    state.version += 1;
    let hash = state.hash();
    let ours = alice.sign_hash(hash)?;
    let msg = Message::UpdateWithCommit(UpdateWithCommit {
        commit: UpdateCommit {
            channel_id: state.channelId,
            version: state.version,
            index: 0,
            // The SDK's commit carries every participant's signature; Bob
            // checks only Alice's (the other is his own): here it fills
            // the message to the same size.
            signatures: vec![ours, ours],
        },
        update: Update {
            channel_id: state.channelId,
            state: state.clone(),
            actor: 0,
        },
    });
    let Message::UpdateAccept(accept) = peer.node.send(peer.id, &msg).await? else {
        return Err("the floor child did not accept".into());
    };
    if recover(hash, &accept.signature)? != peer.address {
        return Err("the floor child's signature recovered another signer".into());
    }
    log.write(record(&[ours.as_bytes(), accept.signature.as_bytes()]))
        .await
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

/// The child: answers every `UpdateWithCommit` as Bob would, each in a
/// task of its own, until its standard input closes. Arguments: the
/// directory of its log, Alice's address.
pub(crate) async fn child(args: &[String]) -> Res<()> {
    let dir = PathBuf::from(args.first().ok_or("the floor child needs a directory")?);
    let alice: Address = args
        .get(1)
        .ok_or("the floor child needs Alice's address")?
        .parse()?;
    let bob = Arc::new(LocalAccount::random());
    let log = Arc::new(GroupLog::open(&dir.join("floor-many-bob.log"))?);
    let (node, mut inbound) = Node::start(Config::new(generate_key())).await?;
    let addrs: Vec<String> = node
        .listen_addrs()
        .await?
        .iter()
        .map(ToString::to_string)
        .collect();
    let address = bob.address();
    let server = tokio::spawn(async move {
        while let Some(req) = inbound.next().await {
            let (_, msg, responder) = req.into_parts();
            let (bob, log) = (bob.clone(), log.clone());
            tokio::spawn(async move {
                let Message::UpdateWithCommit(m) = msg else {
                    return;
                };
                match answer(&bob, alice, &log, m).await {
                    Ok(reply) => {
                        let _ = responder.reply(reply);
                    }
                    // Alice's update then fails, and the run with it.
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

/// Bob's side of one update.
async fn answer(
    bob: &LocalAccount,
    alice: Address,
    log: &GroupLog,
    m: UpdateWithCommit,
) -> Res<Message> {
    let hash = m.update.state.hash();
    let theirs = m.commit.signatures.first().ok_or("no signature")?;
    if recover(hash, theirs)? != alice {
        return Err("Alice's signature recovered another signer".into());
    }
    let ours = bob.sign_hash(hash)?;
    log.write(record(&[theirs.as_bytes(), ours.as_bytes()]))
        .await?;
    Ok(Message::UpdateAccept(UpdateAccept {
        channel_id: m.update.channel_id,
        version: m.update.state.version,
        index: 1,
        signature: ours,
    }))
}

/// A preallocated file whose writes share one `fdatasync` per batch: a
/// thread takes every queued record, writes them as one, syncs, and
/// acknowledges each; after a batch of several it waits for a fuller one,
/// as the SDK's store does while the CPUs are busy (they are, here).
struct GroupLog {
    queue: mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>,
    writes: Arc<AtomicU64>,
    syncs: Arc<AtomicU64>,
}

impl GroupLog {
    const RECORD: usize = 400;
    /// Written with zeros and synced first, so an append never changes the
    /// file's size; wraps around at its end.
    const SIZE: u64 = 8 * 1024 * 1024;
    /// How long the thread waits for a fuller batch: the one that gave
    /// this run the most updates per second on a 2-vCPU guest (1 ms, the
    /// SDK's default [`perun::persistence::RedbOptions::batch_wait`]: 5
    /// writes per sync and 0.72 of the crypto bound; 2 ms: 11 and 0.76–0.77;
    /// 3 ms: 20 and 0.75; BENCHMARKS.md). The floor's round is shorter
    /// than the SDK's, so it needs longer to fill a batch as full.
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
