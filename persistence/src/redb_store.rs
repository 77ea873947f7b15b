//! [`RedbPersister`]: the embedded default store, on one redb file.
//!
//! # File layout (schema version 1)
//!
//! | table | key | value |
//! |---|---|---|
//! | `perun_info` | `&str` | `u64`; key `"schema_version"` holds [`SCHEMA_VERSION`] |
//! | `perun_channels` | channel id (32 bytes) | params, index, phase, peers, metadata, burnt version ([`crate::codec`]) |
//! | `perun_current` | channel id | the latest fully signed state |
//! | `perun_staged` | channel id | the staged, partially signed state |
//! | `perun_meta` | `&str` | the metadata slot ([`Persister::meta_put`]): the caller's bytes |
//!
//! States live in their own tables so a commit rewrites only the state it
//! changes, not the params and peers.
//!
//! # Threads and group commit
//!
//! The writer's state (the database, its log, the cache) sits behind one
//! lock; a batch runs with it held. A dedicated writer thread serves the
//! queue: calls send a request over a channel and await a one-shot reply.
//! One exception: an `update` that finds the store idle (no other update
//! in progress, nothing queued or running) on a multi-thread tokio runtime
//! of two workers or more runs its batch of one on the caller's thread,
//! which blocks for that one `fsync` (the caller waits for it anyway) and
//! saves the two thread hand-offs
//! ([`RedbOptions::write_on_caller_when_idle`]). A request counts as
//! queued until the thread has run it, so no write overtakes one sent
//! before it. Every other call, and every call from a current-thread
//! runtime, is the thread's: no redb work and no `fsync` blocks such an
//! executor.
//!
//! The thread takes every request that
//! is queued when it becomes free and applies all writes in one redb write
//! transaction, made durable by one `fsync`: with the log (the default),
//! the log record's, after which the callers hear back and the transaction
//! commits without durability (a batch of updates of cached records is
//! planned from the cache and opens its transaction only then); without
//! it, a commit with
//! `Durability::Immediate` (one-phase by default, see
//! [`RedbOptions::two_phase_commit`]) before the callers hear back.
//! Concurrent channels therefore share one `fsync` per batch, and each
//! caller's `Ok` still means its own write is durable. While more requests
//! wait, the database commit of answered cached batches is deferred (at
//! most `DEFER_MAX` entries): the next batch's log `fsync` goes first,
//! and the database takes several batches in one commit once the queue is
//! empty. Every read, metadata write, write batch of the general path and
//! checkpoint is served by the same thread after everything before it
//! committed. A write on a caller's thread is only ever the fast path:
//! one update of a cached record, logged with room to spare, while fewer
//! than 64 entries are deferred; those entries wait for the thread (it is
//! woken at 64, and applies them before any read or close; a crash replays
//! them from the log).
//!
//! A metadata write (`meta_put`, rare: the chain index stores its cursor
//! once per scan) is its own durable transaction, outside the log. The
//! `perun_meta` table is created on first use, so stores of older builds
//! open unchanged (schema version 1) and older builds ignore the table.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use perun_channel::ChannelId;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    Table, TableDefinition, TableError, WriteTransaction,
};
use tokio::sync::oneshot;
use tracing::{debug, debug_span, error, info, instrument, warn};

use crate::codec::{decode_meta, decode_state, encode_meta, encode_state};
use crate::cpu_busy::CpuBusy;
use crate::error::RecordDefect;
use crate::wal::{self, Wal};
use crate::{Change, ChannelRecord, Error, Persister, Result};

/// The schema version this build writes and the newest it opens.
pub const SCHEMA_VERSION: u64 = 1;

const INFO: TableDefinition<&str, u64> = TableDefinition::new("perun_info");
const SCHEMA_KEY: &str = "schema_version";
/// The last log record a durable commit of the database covers.
const WAL_SEQ_KEY: &str = "wal_seq";
/// The database's random id, which its log records carry.
const DB_ID_KEY: &str = "database_id";
const CHANNELS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("perun_channels");
const CURRENT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("perun_current");
const STAGED: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("perun_staged");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("perun_meta");

/// Settings of a [`RedbPersister`].
#[derive(Debug, Clone)]
pub struct RedbOptions {
    /// Commit in two phases (flush the new commit slot, then flip to it and
    /// flush again). Off by default, as in redb: one-phase commit is crash
    /// safe for crashes and power loss (the commit slot is checksummed, and
    /// a commit whose `fsync` did not return was never acknowledged, so
    /// nothing was sent on the strength of it). Two-phase commit only adds
    /// protection against an attacker who controls the order in which pages
    /// reach the disk *and* can crash the process mid-`fsync` (redb's design
    /// doc); such an attacker could edit the file anyway. It costs a second
    /// `fsync` per commit, and an update needs one commit on each side.
    pub two_phase_commit: bool,
    /// Make each batch durable with one small write to a log next to the
    /// database (`<file>.wal`) instead of a durable redb commit, which
    /// writes several pages; the database catches up at checkpoints (see
    /// the `wal` module). On by default: it roughly halves the latency of a
    /// durable write. A log left by an earlier run is always replayed.
    pub write_ahead_log: bool,
    /// redb's page cache, in bytes.
    pub cache_size: usize,
    /// Most requests folded into one write transaction.
    pub max_batch: usize,
    /// An `update` that finds the store idle (no other update in progress,
    /// nothing queued or running) runs on the caller's thread instead of
    /// the writer thread's, when the caller is on a multi-thread tokio
    /// runtime with two workers or more: the same log append and `fsync`,
    /// without the two thread hand-offs (the caller waking the writer, the
    /// writer waking the caller): 26–74 µs less per update on a 2-vCPU KVM
    /// guest (BENCHMARKS.md, issue 17). That worker thread blocks for the
    /// one `fsync` meanwhile (a task it had just woken waits with it); the
    /// runtime's other workers go on. On by default; turn it off where an
    /// `fsync` can take long (a slow or overloaded disk) and the runtime
    /// has other latency-critical work. Only the fast path runs there (see
    /// the module docs); anything else, and writes that find others queued,
    /// go to the writer thread and share its `fsync`. A multi-thread
    /// handle entered from inside a current-thread runtime counts as
    /// multi-thread: that runtime's thread then blocks for the `fsync`.
    pub write_on_caller_when_idle: bool,
    /// Whether the writer thread waits for more writes before it takes a
    /// batch, after a batch of several writes ([`BATCH_WAIT_FROM`] or
    /// more). By default it waits 1 ms, and only while the machine's CPUs
    /// are all busy and this process is one of those keeping them busy
    /// ([`BatchWait::WhenCpusBusy`]): then each `fsync` and commit it saves
    /// is CPU for signing other channels' updates, and the wait costs no
    /// throughput (BENCHMARKS.md, issue 17: writes per batch about 7 → 13
    /// and about 4 % more updates at 100 channels on a 2-vCPU guest). A
    /// single channel's writes are never kept waiting.
    pub batch_wait: BatchWait,
}

/// The writer thread waits before a batch only after one of at least this
/// many writes: fewer means little load, where waiting is only latency.
pub const BATCH_WAIT_FROM: usize = 4;

/// The longest wait [`BatchWait`] may ask for; longer ones are cut to it
/// (closing the store waits for the writer thread, so for a wait too).
pub const MAX_BATCH_WAIT: Duration = Duration::from_millis(100);

/// When the writer thread waits for a fuller batch ([`RedbOptions::batch_wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchWait {
    /// Never: every batch is what is queued when the thread gets free.
    Never,
    /// This long, while less than a tenth of the machine's CPU time is idle
    /// and this process used at least half a CPU (read from `/proc/stat`
    /// and `/proc/self/stat` at most every 100 ms; off Linux, never). A
    /// CPU limit of a container is not seen: there the CPUs may never look
    /// busy, and the writer never waits.
    WhenCpusBusy(Duration),
    /// This long, whatever the CPUs do: for throughput over latency, or to
    /// test batching.
    Always(Duration),
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            two_phase_commit: false,
            write_ahead_log: true,
            cache_size: 64 * 1024 * 1024,
            max_batch: 1024,
            write_on_caller_when_idle: true,
            batch_wait: BatchWait::WhenCpusBusy(Duration::from_millis(1)),
        }
    }
}

/// Counters of the store's writes, to see group commit at work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedbStats {
    /// Write transactions committed.
    pub transactions: u64,
    /// Write requests acknowledged by those transactions.
    pub writes: u64,
    /// Updates run on the caller's thread
    /// ([`RedbOptions::write_on_caller_when_idle`]).
    pub on_caller: u64,
    /// Times the writer thread waited for a fuller batch
    /// ([`RedbOptions::batch_wait`]).
    pub batch_waits: u64,
}

impl RedbStats {
    /// What happened between `earlier` (an older reading) and this one.
    pub fn since(&self, earlier: &RedbStats) -> RedbStats {
        RedbStats {
            transactions: self.transactions.saturating_sub(earlier.transactions),
            writes: self.writes.saturating_sub(earlier.writes),
            on_caller: self.on_caller.saturating_sub(earlier.on_caller),
            batch_waits: self.batch_waits.saturating_sub(earlier.batch_waits),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    writes: AtomicU64,
    on_caller: AtomicU64,
    batch_waits: AtomicU64,
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Request {
    Create(Box<ChannelRecord>, Reply<()>),
    Update(ChannelId, Vec<Change>, Reply<()>),
    Remove(ChannelId, Reply<()>),
    Ids(Reply<Vec<ChannelId>>),
    Load(ChannelId, Reply<Option<ChannelRecord>>),
    LoadAll(Reply<Vec<ChannelRecord>>),
    MetaGet(String, Reply<Option<Vec<u8>>>),
    MetaPut(String, Vec<u8>, Reply<()>),
    /// Has the thread let the database catch up with the log at once, after
    /// writes on callers' threads (not counted as queued).
    CatchUp,
}

impl Request {
    /// A channel write: what a batch's `fsync` is shared by.
    fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Create(..) | Request::Update(..) | Request::Remove(..)
        )
    }
}

/// A [`Persister`] on one redb file, with group commit (see the module docs).
///
/// Dropping it stops the writer thread and waits for the batch in progress
/// to finish, so the file can be reopened right after the drop.
pub struct RedbPersister {
    sender: Option<mpsc::Sender<Request>>,
    worker: Option<JoinHandle<()>>,
    path: PathBuf,
    counters: Arc<Counters>,
    store: Arc<Store>,
}

/// What the writer thread and the callers share: the writer's state (whoever
/// holds the lock runs a batch on it; `None` once the store closed) and how
/// many requests wait in the queue.
struct Store {
    writer: Mutex<Option<Writer>>,
    queued: AtomicUsize,
    /// `update` calls in progress, on either path.
    writing: AtomicUsize,
    /// [`RedbOptions::write_on_caller_when_idle`].
    write_on_caller: bool,
}

/// Deferred log entries after which a write on a caller's thread wakes the
/// writer thread to apply them (a wake-up every 64 such writes, not one
/// per write); with this many deferred, writes go to the thread.
const NUDGE_AT: usize = 64;

/// Room the log must have left for a write on a caller's thread (an update
/// logs a few kilobytes at most; a full log means a checkpoint, which is
/// the thread's).
const INLINE_ROOM: usize = 256 * 1024;

impl std::fmt::Debug for RedbPersister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbPersister")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbPersister {
    /// Opens (or creates) the store at `path` with default options, doing
    /// the file work on the store's own thread.
    ///
    /// Fails with [`Error::SchemaTooNew`] for a file written by a newer
    /// build, [`Error::Corrupt`] for a file that is not a readable perun
    /// store, [`Error::AlreadyOpen`] if another handle holds it.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RedbOptions::default()).await
    }

    /// [`open`](Self::open) with explicit options.
    pub async fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        let (tx, rx) = oneshot::channel();
        let mut this = Self::spawn(path.as_ref(), options, move |r| {
            let _ = tx.send(r);
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(this),
            Ok(Err(e)) => {
                this.shutdown();
                Err(e)
            }
            Err(_) => {
                this.shutdown();
                Err(Error::Closed)
            }
        }
    }

    /// [`open_with`](Self::open_with) for callers outside an async context;
    /// blocks until the file is open.
    pub fn open_blocking(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut this = Self::spawn(path.as_ref(), options, move |r| {
            let _ = tx.send(r);
        })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(this),
            Ok(Err(e)) => {
                this.shutdown();
                Err(e)
            }
            Err(_) => {
                this.shutdown();
                Err(Error::Closed)
            }
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many transactions and acknowledged writes so far; `writes /
    /// transactions` is the mean group-commit batch.
    pub fn stats(&self) -> RedbStats {
        RedbStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
            on_caller: self.counters.on_caller.load(Ordering::Relaxed),
            batch_waits: self.counters.batch_waits.load(Ordering::Relaxed),
        }
    }

    fn spawn(
        path: &Path,
        options: RedbOptions,
        ready: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let file = path.to_path_buf();
        let counters = Arc::new(Counters::default());
        let writer_counters = counters.clone();
        let store = Arc::new(Store {
            writer: Mutex::new(None),
            queued: AtomicUsize::new(0),
            writing: AtomicUsize::new(0),
            write_on_caller: options.write_on_caller_when_idle,
        });
        let thread_store = store.clone();
        let worker = std::thread::Builder::new()
            .name("perun-redb-writer".into())
            .spawn(move || {
                let opened = catch_unwind(AssertUnwindSafe(|| {
                    Writer::open(&file, &options, writer_counters)
                }))
                .unwrap_or_else(|_| {
                    Err(Error::Corrupt {
                        id: None,
                        reason: "storage engine panicked while opening the file".into(),
                    })
                });
                match opened {
                    Ok(writer) => {
                        *lock_writer(&thread_store) = Some(writer);
                        ready(Ok(()));
                        run(&thread_store, &receiver, options.batch_wait);
                    }
                    Err(e) => {
                        warn!(path = %file.display(), error = %e, "persistence: cannot open store");
                        ready(Err(e));
                    }
                }
            })?;
        Ok(Self {
            sender: Some(sender),
            worker: Some(worker),
            path: path.to_path_buf(),
            counters,
            store,
        })
    }

    fn shutdown(&mut self) {
        self.sender.take();
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            error!("persistence: writer thread panicked");
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn send(&self, req: Request) -> Result<()> {
        let sender = self.sender.as_ref().ok_or(Error::Closed)?;
        self.store.queued.fetch_add(1, Ordering::SeqCst);
        sender.send(req).map_err(|_| {
            self.store.queued.fetch_sub(1, Ordering::SeqCst);
            Error::Closed
        })
    }

    /// A write, on the caller's thread if the store is idle.
    async fn write(&self, make: impl FnOnce(Reply<()>) -> Request) -> Result<()> {
        let _writing = Writing::new(&self.store.writing);
        let (tx, rx) = oneshot::channel();
        let req = make(tx);
        if let Some(req) = self.try_inline(req) {
            self.send(req)?;
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Runs `req` on this thread if the store is idle (no other update in
    /// progress, nothing queued, the writer free) and the option allows it;
    /// otherwise hands it back.
    fn try_inline(&self, req: Request) -> Option<Request> {
        // Another write in progress means writes come in groups (many
        // channels at once): they go to the thread, whose batches share an
        // `fsync` (BENCHMARKS.md: without this, the 100-channel run lost 3 %).
        if !self.store.write_on_caller
            || self.store.writing.load(Ordering::SeqCst) != 1
            || self.store.queued.load(Ordering::SeqCst) != 0
            || !on_multi_thread_runtime()
        {
            return Some(req);
        }
        let Ok(mut guard) = self.store.writer.try_lock() else {
            return Some(req);
        };
        let Some(writer) = guard.as_mut() else {
            return Some(req);
        };
        // Only the fast path runs here.
        if !writer.inline_fast_path(&req) {
            return Some(req);
        }
        self.counters.on_caller.fetch_add(1, Ordering::Relaxed);
        let ok = writer.guarded(|w| w.process(vec![req]));
        let behind = ok && writer.deferred.len() >= NUDGE_AT;
        if !ok {
            // As on the thread (the request's reply was dropped:
            // `Error::Closed`).
            close_after_panic(guard);
            return None;
        }
        drop(guard);
        if behind && let Some(sender) = &self.sender {
            // The thread lets the database catch up, off the callers' path.
            let _ = sender.send(Request::CatchUp);
        }
        None
    }
}

impl Drop for RedbPersister {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl Persister for RedbPersister {
    #[instrument(level = "debug", skip_all, fields(channel = %ch.id()))]
    async fn channel_created(&self, ch: &ChannelRecord) -> Result<()> {
        // Signature checks are CPU work: do them here, in parallel across
        // callers, rather than on the single writer thread.
        ch.validate().inspect_err(
            |e| warn!(channel = %ch.id(), error = %e, "persistence: record rejected"),
        )?;
        self.call(|r| Request::Create(Box::new(ch.clone()), r))
            .await
    }

    #[instrument(level = "debug", skip_all, fields(channel = %id, changes = changes.len()))]
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> Result<()> {
        self.write(|r| Request::Update(id, changes, r)).await
    }

    #[instrument(level = "debug", skip_all, fields(channel = %id))]
    async fn channel_removed(&self, id: ChannelId) -> Result<()> {
        self.call(|r| Request::Remove(id, r)).await
    }

    async fn channel_ids(&self) -> Result<Vec<ChannelId>> {
        self.call(Request::Ids).await
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>> {
        let rec = self.call(|r| Request::Load(id, r)).await?;
        // Checked here, not on the writer thread: signature checks are the
        // bulk of a load, and concurrent loads then use every core.
        if let Some(rec) = &rec {
            check_loaded(id, rec)?;
        }
        Ok(rec)
    }

    #[instrument(level = "debug", skip_all)]
    async fn load_all(&self) -> Result<Vec<ChannelRecord>> {
        let records = self.call(Request::LoadAll).await?;
        check_all_loaded(records).await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.call(|r| Request::MetaGet(key.to_owned(), r)).await
    }

    #[instrument(level = "debug", skip_all, fields(key, len = value.len()))]
    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        crate::persister::check_meta(key, value)?;
        self.call(|r| Request::MetaPut(key.to_owned(), value.to_vec(), r))
            .await
    }
}

/// Checks every loaded record, spread over the available cores.
async fn check_all_loaded(records: Vec<ChannelRecord>) -> Result<Vec<ChannelRecord>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = records.len().div_ceil(cores).max(1);
    tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let workers: Vec<_> = records
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().try_for_each(|r| check_loaded(r.id(), r)))
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| Error::Storage("record check panicked".into()))??;
            }
            Ok::<(), Error>(())
        })?;
        Ok::<_, Error>(records)
    })
    .await
    .map_err(|e| Error::Storage(format!("record check task failed: {e}")))?
}

/// Maps a redb error to ours, keeping the distinctions a caller acts on.
fn db_err(e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::DatabaseAlreadyOpen => Error::AlreadyOpen,
        redb::Error::Corrupted(reason) => Error::Corrupt { id: None, reason },
        redb::Error::Io(e) => Error::Io(e),
        redb::Error::TableTypeMismatch { table, .. } => Error::Corrupt {
            id: None,
            reason: format!("table {table} has an unexpected type"),
        },
        other => Error::Engine(other),
    }
}

/// Why one request in a batch did not go through.
enum Failure {
    /// Refused before writing anything; the rest of the batch goes on.
    Refused(Error),
    /// The storage engine failed; the transaction is abandoned.
    Fatal(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Refused(e)
    }
}

fn fatal(e: impl Into<redb::Error>) -> Failure {
    Failure::Fatal(db_err(e).to_string())
}

/// A write that passed every check, as the bytes to put in each table.
/// `Some(None)` deletes the entry; `None` leaves it alone.
#[derive(Default, Clone)]
struct Plan {
    meta: Option<Option<Vec<u8>>>,
    current: Option<Option<Vec<u8>>>,
    staged: Option<Option<Vec<u8>>>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.meta.is_none() && self.current.is_none() && self.staged.is_none()
    }

    /// The log's record of this plan for channel `id`.
    fn entry(&self, id: ChannelId) -> wal::Entry {
        self.clone().into_entry(id)
    }

    fn into_entry(self, id: ChannelId) -> wal::Entry {
        wal::Entry {
            id,
            meta: self.meta,
            current: self.current,
            staged: self.staged,
        }
    }
}

/// What a durable batch still owes the database: its open transaction
/// (the general path) or its log entries (a batch planned from the cache).
enum Unapplied {
    Txn(Box<WriteTransaction>),
    Entries(Vec<wal::Entry>),
}

struct Tables<'txn> {
    channels: Table<'txn, &'static [u8; 32], &'static [u8]>,
    current: Table<'txn, &'static [u8; 32], &'static [u8]>,
    staged: Table<'txn, &'static [u8; 32], &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> std::result::Result<Self, TableError> {
        Ok(Self {
            channels: txn.open_table(CHANNELS)?,
            current: txn.open_table(CURRENT)?,
            staged: txn.open_table(STAGED)?,
        })
    }

    /// The stored record of `id`, decoded but not validated.
    fn read(&self, id: ChannelId) -> std::result::Result<Option<ChannelRecord>, Failure> {
        read_record(&self.channels, &self.current, &self.staged, id)
    }

    /// Applies a log entry (replayed, or logged before the database took it).
    fn apply_entry(&mut self, e: wal::Entry) -> std::result::Result<(), Failure> {
        let plan = Plan {
            meta: e.meta,
            current: e.current,
            staged: e.staged,
        };
        self.apply(e.id, plan)
    }

    fn apply(&mut self, id: ChannelId, plan: Plan) -> std::result::Result<(), Failure> {
        let key = &id.0;
        for (table, change) in [
            (&mut self.channels, plan.meta),
            (&mut self.current, plan.current),
            (&mut self.staged, plan.staged),
        ] {
            match change {
                Some(Some(bytes)) => {
                    table.insert(key, bytes.as_slice()).map_err(fatal)?;
                }
                Some(None) => {
                    table.remove(key).map_err(fatal)?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

fn read_record(
    channels: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    current: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    staged: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    id: ChannelId,
) -> std::result::Result<Option<ChannelRecord>, Failure> {
    let key = &id.0;
    let Some(meta) = channels.get(key).map_err(fatal)? else {
        return Ok(None);
    };
    let meta = decode_meta(id, meta.value())?;
    let cur = match current.get(key).map_err(fatal)? {
        Some(v) => Some(decode_state(id, v.value())?),
        None => None,
    };
    let stg = match staged.get(key).map_err(fatal)? {
        Some(v) => Some(decode_state(id, v.value())?),
        None => None,
    };
    Ok(Some(meta.into_record(cur, stg)))
}

/// Checks a record read from disk: its key must be its params' hash and it
/// must pass every rule a freshly created record passes.
fn check_loaded(id: ChannelId, rec: &ChannelRecord) -> Result<()> {
    let actual = rec.id();
    let result = if actual != id {
        Err(RecordDefect::WrongKey { actual })
    } else {
        rec.validate().map_err(|e| RecordDefect::Check(Box::new(e)))
    };
    result.map_err(|defect| {
        warn!(channel = %id, %defect, "persistence: stored record failed validation");
        Error::InvalidRecord { id, defect }
    })
}

/// The writer thread's state: the open database and its log.
struct Writer {
    db: Database,
    options: RedbOptions,
    counters: Arc<Counters>,
    /// The write-ahead log, if on.
    wal: Option<Wal>,
    /// The next log record's sequence number.
    next_seq: u64,
    /// Set when a durable write failed after the database had taken it:
    /// what readers would see may not be durable, so the store refuses
    /// everything until it is reopened (which replays the log).
    broken: Option<String>,
    /// The records this thread last wrote, decoded: a write to a channel
    /// in here neither reads nor decodes the stored record. Entries change
    /// only after their transaction is durable; any failure empties it.
    records: HashMap<ChannelId, ChannelRecord>,
    /// Logged entries of answered batches that the database has not taken
    /// yet: while more requests wait, the next batch's log `fsync` goes
    /// first, and the database takes several batches in one commit. Applied
    /// before anything reads or commits the database, once the queue is
    /// empty, and at `DEFER_MAX` entries.
    deferred: Vec<wal::Entry>,
}

/// Most logged entries the database may lag behind by.
const DEFER_MAX: usize = 1024;

/// Largest log sequence number an open accepts (a store writing a million
/// batches a second would take 290,000 years to reach it), so the writer's
/// `next_seq + 1` cannot overflow.
const MAX_SEQ: u64 = u64::MAX / 2;

/// Records the writer keeps decoded (beyond this, it starts over: a store
/// with more channels updating at once reads the rest from redb's cache).
const RECORD_CACHE: usize = 1024;

impl Writer {
    fn open(path: &Path, options: &RedbOptions, counters: Arc<Counters>) -> Result<Self> {
        if !path.try_exists()? {
            create_in_place(path)?;
        }
        let db = Database::builder()
            .set_cache_size(options.cache_size)
            .create(path)
            .map_err(|e| match db_err(e) {
                // redb reports a file it cannot parse as these I/O kinds.
                Error::Io(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    Error::Corrupt {
                        id: None,
                        reason: format!("not a readable redb file: {e}"),
                    }
                }
                other => other,
            })?;
        check_schema(&db)?;
        let mut this = Self {
            db,
            options: options.clone(),
            counters,
            wal: None,
            next_seq: 1,
            broken: None,
            records: HashMap::new(),
            deferred: Vec::new(),
        };
        let log = wal::path_for(path);
        if options.write_ahead_log || log.exists() {
            let (w, records) = Wal::open(&log, this.database_id()?)?;
            this.next_seq = this.replay(records)? + 1;
            if options.write_ahead_log {
                this.wal = Some(w);
            } else {
                drop(w);
                std::fs::remove_file(&log)?;
            }
        }
        info!(path = %path.display(), log = this.wal.is_some(), "persistence: store opened");
        Ok(this)
    }

    /// This database's random id (created on first use), which its log
    /// records carry: a log never replays into another database.
    fn database_id(&self) -> Result<u64> {
        {
            let txn = self.db.begin_read().map_err(db_err)?;
            let info = txn.open_table(INFO).map_err(db_err)?;
            if let Some(id) = info.get(DB_ID_KEY).map_err(db_err)? {
                return Ok(id.value());
            }
        }
        let id = rand::random::<u64>();
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut info = txn.open_table(INFO).map_err(db_err)?;
            info.insert(DB_ID_KEY, id).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(id)
    }

    /// Applies the log records a durable commit does not cover yet, makes
    /// them durable, and returns the last sequence number now covered.
    fn replay(&self, records: Vec<wal::Record>) -> Result<u64> {
        let applied = {
            let txn = self.db.begin_read().map_err(db_err)?;
            let info = txn.open_table(INFO).map_err(db_err)?;
            info.get(WAL_SEQ_KEY)
                .map_err(db_err)?
                .map_or(0, |v| v.value())
        };
        let todo: Vec<_> = records.into_iter().filter(|r| r.seq > applied).collect();
        let last = todo.last().map_or(applied, |r| r.seq);
        if last > MAX_SEQ {
            // Bytes from disk: no store gets near this by writing, and the
            // writer counts on from here unchecked.
            return Err(Error::Corrupt {
                id: None,
                reason: format!("the write-ahead log's sequence number {last} is out of range"),
            });
        }
        if todo.is_empty() {
            return Ok(applied);
        }
        if todo.first().is_some_and(|r| r.seq != applied + 1) {
            // A gap between the database and the log: records are missing.
            return Err(Error::Corrupt {
                id: None,
                reason: format!(
                    "the write-ahead log starts at record {} but the database covers only up \
                     to {applied}: the log belongs to another copy of the database (delete \
                     the .wal file only if the database was replaced on purpose)",
                    todo.first().map_or(0, |r| r.seq)
                ),
            });
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut tables = Tables::open(&txn).map_err(db_err)?;
            for rec in &todo {
                for e in &rec.entries {
                    tables.apply_entry(e.clone()).map_err(failure_to_error)?;
                }
            }
            let mut info = txn.open_table(INFO).map_err(db_err)?;
            info.insert(WAL_SEQ_KEY, last).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        info!(
            records = todo.len(),
            up_to = last,
            "persistence: replayed the log"
        );
        Ok(last)
    }

    /// A durable commit that covers every log record up to `seq`; the log
    /// then starts over.
    fn checkpoint(&mut self, seq: u64) -> std::result::Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| db_err(e).to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| db_err(e).to_string())?;
        txn.set_two_phase_commit(self.options.two_phase_commit);
        {
            let mut info = txn.open_table(INFO).map_err(|e| db_err(e).to_string())?;
            info.insert(WAL_SEQ_KEY, seq)
                .map_err(|e| db_err(e).to_string())?;
        }
        txn.commit().map_err(|e| db_err(e).to_string())?;
        if let Some(w) = self.wal.as_mut() {
            w.reset();
            debug!(seq, log = %w.path().display(), "persistence: checkpoint");
        }
        Ok(())
    }

    /// Whether `req` may run on a caller's thread: an update of a cached
    /// record with the log on, the log with room for it and little
    /// deferred, so it is one append and one `fsync`, never a checkpoint,
    /// a commit of the database or a read of it.
    fn inline_fast_path(&self, req: &Request) -> bool {
        let Request::Update(id, ..) = req else {
            return false;
        };
        self.broken.is_none()
            && self.records.contains_key(id)
            && self.wal.as_ref().is_some_and(|w| w.fits(INLINE_ROOM))
            && self.deferred.len() < NUDGE_AT
    }

    /// Applies what is deferred and checkpoints: a clean close leaves
    /// nothing for the next open to replay.
    fn close(&mut self) {
        if !self.guarded(Self::apply_deferred) {
            return;
        }
        if self.wal.is_some()
            && self.broken.is_none()
            && let Err(e) = self.checkpoint(self.next_seq - 1)
        {
            warn!(error = %e, "persistence: final checkpoint failed; the log is replayed on open");
        }
    }

    /// Runs one batch.
    fn process(&mut self, batch: Vec<Request>) {
        if let Some(why) = &self.broken {
            let why = why.clone();
            for r in batch {
                fail(r, &why);
            }
            return;
        }
        let (mut writes, mut reads, mut metas) = (Vec::new(), Vec::new(), Vec::new());
        let mut catch_up = false;
        for r in batch {
            match r {
                Request::CatchUp => catch_up = true,
                _ if r.is_write() => writes.push(r),
                Request::MetaPut(key, value, reply) => metas.push((key, value, reply)),
                _ => reads.push(r),
            }
        }
        if !writes.is_empty() {
            self.write_batch(writes);
        }
        if catch_up || !metas.is_empty() || !reads.is_empty() {
            self.apply_deferred();
        }
        // A commit that failed after its callers heard back leaves the
        // database behind the log: nothing else in this batch may use it.
        if let Some(why) = &self.broken {
            for (_, _, reply) in metas {
                let _ = reply.send(Err(Error::Storage(why.clone())));
            }
            for r in reads {
                fail(r, why);
            }
            return;
        }
        for (key, value, reply) in metas {
            let _ = reply.send(self.meta_put(&key, &value));
        }
        if !reads.is_empty() {
            self.read_batch(reads);
        }
    }

    fn write_batch(&mut self, writes: Vec<Request>) {
        let span = debug_span!("persist_batch", writes = writes.len());
        let _guard = span.enter();
        let writes = match self.write_cached(writes) {
            Ok(()) => return,
            Err(writes) => writes,
        };
        // This path plans from the database.
        self.apply_deferred();
        if let Some(why) = &self.broken {
            let why = why.clone();
            for r in writes {
                fail(r, &why);
            }
            return;
        }
        let mut accepted: Vec<Reply<()>> = Vec::with_capacity(writes.len());
        let mut logged: Vec<wal::Entry> = Vec::new();
        // The records as this batch leaves them (`None`: removed), for the
        // cache once the batch is durable.
        let mut written: Vec<(ChannelId, Option<ChannelRecord>)> = Vec::new();
        let cache = &mut self.records;
        let logging = self.wal.is_some();
        let mut pending = writes.into_iter();
        let outcome = (|| -> std::result::Result<Option<WriteTransaction>, String> {
            let mut txn = self.db.begin_write().map_err(|e| db_err(e).to_string())?;
            // With the log, the log write makes the batch durable.
            let durability = if logging {
                Durability::None
            } else {
                Durability::Immediate
            };
            txn.set_durability(durability)
                .map_err(|e| db_err(e).to_string())?;
            txn.set_two_phase_commit(self.options.two_phase_commit);
            let mut wrote = false;
            {
                let mut tables = Tables::open(&txn).map_err(|e| db_err(e).to_string())?;
                for req in pending.by_ref() {
                    let (result, reply) = match req {
                        Request::Create(rec, reply) => {
                            let planned = plan_create(&tables, &rec);
                            if planned.as_ref().is_ok_and(|(_, p)| !p.is_empty()) {
                                written.push((rec.id(), Some(*rec)));
                            }
                            (planned, reply)
                        }
                        Request::Update(id, changes, reply) => {
                            let planned = plan_update(&tables, cache, id, changes);
                            let planned = planned.map(|(plan, rec)| {
                                written.push((id, Some(rec)));
                                (id, plan)
                            });
                            (planned, reply)
                        }
                        Request::Remove(id, reply) => {
                            cache.remove(&id);
                            written.push((id, None));
                            (plan_remove(&tables, id), reply)
                        }
                        _ => continue,
                    };
                    match result {
                        Ok((id, plan)) => {
                            if !plan.is_empty() {
                                if logging {
                                    logged.push(plan.entry(id));
                                }
                                if let Err(f) = tables.apply(id, plan) {
                                    let e = failure_to_error(f).to_string();
                                    let _ = reply.send(Err(Error::Storage(e.clone())));
                                    return Err(e);
                                }
                                wrote = true;
                            }
                            accepted.push(reply);
                        }
                        Err(Failure::Refused(e)) => {
                            let _ = reply.send(Err(e));
                        }
                        Err(Failure::Fatal(e)) => {
                            let _ = reply.send(Err(Error::Storage(e.clone())));
                            return Err(e);
                        }
                    }
                }
            }
            if wrote {
                Ok(Some(txn))
            } else {
                txn.abort().map_err(|e| db_err(e).to_string())?;
                Ok(None)
            }
        })();
        // With the log, the batch is durable once its record is: callers
        // hear so before the database commits it (off their critical
        // path; every read is served after this batch, so none sees the
        // database without it).
        let outcome = match outcome {
            Ok(Some(txn)) if !logging => txn
                .commit()
                .map(|()| (true, None))
                .map_err(|e| db_err(e).to_string()),
            Ok(Some(txn)) => self
                .make_durable(&wal::encode(&logged), Unapplied::Txn(Box::new(txn)))
                .map(|after| (true, after)),
            Ok(None) => Ok((false, None)),
            Err(e) => Err(e),
        };
        if let Err(e) = self.finish_batch(outcome, accepted, written) {
            for req in pending {
                fail(req, &e);
            }
        }
    }

    /// The common batch, with its database work after the replies: every
    /// write updates a different channel whose record is cached, and the
    /// log is on. Planned from the cache alone, logged, answered, and only
    /// then applied to the database and committed. Any other batch comes
    /// back untouched for the general path.
    fn write_cached(&mut self, writes: Vec<Request>) -> std::result::Result<(), Vec<Request>> {
        let mut seen = HashSet::with_capacity(writes.len());
        let cached = |r: &Request, seen: &mut HashSet<ChannelId>| match r {
            Request::Update(id, ..) => self.records.contains_key(id) && seen.insert(*id),
            _ => false,
        };
        if self.wal.is_none() || !writes.iter().all(|r| cached(r, &mut seen)) {
            return Err(writes);
        }
        let mut accepted: Vec<Reply<()>> = Vec::with_capacity(writes.len());
        // Logged first, then applied as they are (no copy for the database).
        let mut logged: Vec<wal::Entry> = Vec::with_capacity(writes.len());
        let mut written: Vec<(ChannelId, Option<ChannelRecord>)> = Vec::with_capacity(writes.len());
        for req in writes {
            let (id, changes, reply, rec) = match req {
                Request::Update(id, changes, reply) => match self.records.remove(&id) {
                    Some(rec) => (id, changes, reply, rec),
                    None => {
                        fail(
                            Request::Update(id, changes, reply),
                            "internal: record not cached",
                        );
                        continue;
                    }
                },
                other => {
                    fail(other, "internal: not an update");
                    continue;
                }
            };
            match plan_record(rec, &mut self.records, id, changes) {
                Ok((plan, rec)) => {
                    if !plan.is_empty() {
                        logged.push(plan.into_entry(id));
                    }
                    written.push((id, Some(rec)));
                    accepted.push(reply);
                }
                Err(Failure::Refused(e)) => {
                    let _ = reply.send(Err(e));
                }
                Err(Failure::Fatal(e)) => {
                    // Planning from the cache does no storage work, so it
                    // refuses rather than fails; should it fail, nothing
                    // was written for this request and the record has left
                    // the cache (the next write reads it from the tables).
                    let _ = reply.send(Err(Error::Storage(e)));
                }
            }
        }
        let outcome = if logged.is_empty() {
            Ok((false, None))
        } else {
            let payload = wal::encode(&logged);
            self.make_durable(&payload, Unapplied::Entries(logged))
                .map(|after| (true, after))
        };
        // A failure is answered to every caller of the batch.
        let _ = self.finish_batch(outcome, accepted, written);
        Ok(())
    }

    /// Makes a batch durable with the log: its record, if it fits, and the
    /// database's part is handed back to follow the replies; otherwise the
    /// database commits it and a checkpoint makes that durable.
    fn make_durable(
        &mut self,
        payload: &[u8],
        unapplied: Unapplied,
    ) -> std::result::Result<Option<Unapplied>, String> {
        if self.wal.as_ref().is_some_and(|w| w.fits(payload.len())) {
            self.log_batch(payload)?;
            Ok(Some(unapplied))
        } else {
            self.apply_deferred();
            if let Some(why) = &self.broken {
                return Err(why.clone());
            }
            self.commit_unapplied(unapplied)?;
            self.checkpoint_batch()?;
            Ok(None)
        }
    }

    /// Ends a batch of writes. Durable (`Ok((wrote, after))`): the cache
    /// takes the records as the batch left them (`None`: removed), every
    /// accepted caller hears `Ok`, then `after` reaches the database.
    /// Failed: the cache is emptied, every accepted caller hears the
    /// error, which is handed back for the batch's other requests.
    fn finish_batch(
        &mut self,
        outcome: std::result::Result<(bool, Option<Unapplied>), String>,
        accepted: Vec<Reply<()>>,
        written: Vec<(ChannelId, Option<ChannelRecord>)>,
    ) -> std::result::Result<(), String> {
        let (wrote, after) = match outcome {
            Ok(done) => done,
            Err(e) => {
                error!(error = %e, "persistence: write transaction failed");
                self.records.clear();
                for reply in accepted {
                    let _ = reply.send(Err(Error::Storage(e.clone())));
                }
                return Err(e);
            }
        };
        if self.records.len() + written.len() > RECORD_CACHE {
            self.records.clear();
        }
        for (id, rec) in written {
            match rec {
                Some(rec) => self.records.insert(id, rec),
                None => self.records.remove(&id),
            };
        }
        debug!(
            acked = accepted.len(),
            wrote, "persistence: batch committed"
        );
        if wrote {
            self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .writes
            .fetch_add(accepted.len() as u64, Ordering::Relaxed);
        for reply in accepted {
            let _ = reply.send(Ok(()));
        }
        match after {
            Some(Unapplied::Entries(entries)) => {
                self.deferred.extend(entries);
                if self.deferred.len() >= DEFER_MAX {
                    self.apply_deferred();
                }
            }
            Some(txn @ Unapplied::Txn(_)) => {
                if let Err(e) = self.commit_unapplied(txn) {
                    self.behind_the_log(e);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Runs `work` on this thread's database. A panic inside the storage
    /// engine must not take the caller down: `false` then, and the thread
    /// stops; every pending reply is dropped and callers see
    /// `Error::Closed`.
    fn guarded(&mut self, work: impl FnOnce(&mut Self)) -> bool {
        if catch_unwind(AssertUnwindSafe(|| work(self))).is_err() {
            error!("persistence: storage engine panicked; store closed");
            return false;
        }
        true
    }

    /// Applies the deferred entries in one commit (see `deferred`).
    fn apply_deferred(&mut self) {
        if self.deferred.is_empty() || self.broken.is_some() {
            return;
        }
        let entries = std::mem::take(&mut self.deferred);
        if let Err(e) = self.apply_commit(entries) {
            self.behind_the_log(e);
        }
    }

    /// Commits what a durable batch still owes the database.
    fn commit_unapplied(&self, unapplied: Unapplied) -> std::result::Result<(), String> {
        match unapplied {
            Unapplied::Txn(txn) => txn.commit().map_err(|e| db_err(e).to_string()),
            Unapplied::Entries(entries) => self.apply_commit(entries),
        }
    }

    /// A batch its callers heard was durable (in the log) did not reach the
    /// database: nothing may read or write it until a reopen replays the
    /// log.
    fn behind_the_log(&mut self, e: impl std::fmt::Display) {
        error!(error = %e, "persistence: commit after the log failed; store closed");
        self.broken = Some(format!(
            "commit after the log failed ({e}); reopen the store"
        ));
        self.records.clear();
    }

    /// Applies planned changes in one redb transaction committed without
    /// durability (the log or a checkpoint makes them durable).
    fn apply_commit(&self, entries: Vec<wal::Entry>) -> std::result::Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| db_err(e).to_string())?;
        txn.set_durability(Durability::None)
            .map_err(|e| db_err(e).to_string())?;
        txn.set_two_phase_commit(self.options.two_phase_commit);
        {
            let mut tables = Tables::open(&txn).map_err(|e| db_err(e).to_string())?;
            for e in entries {
                tables
                    .apply_entry(e)
                    .map_err(|f| failure_to_error(f).to_string())?;
            }
        }
        txn.commit().map_err(|e| db_err(e).to_string())
    }

    /// Makes a batch durable by appending its log record (the caller
    /// checked that it fits). A failure here breaks the store (see
    /// `broken`).
    fn log_batch(&mut self, payload: &[u8]) -> std::result::Result<(), String> {
        let seq = self.next_seq;
        let result = match self.wal.as_mut() {
            Some(w) => w.append(seq, payload).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        self.logged(result)
    }

    /// Makes a batch the database committed (not durably) durable when the
    /// log is too full for its record: a checkpoint covers it as well.
    fn checkpoint_batch(&mut self) -> std::result::Result<(), String> {
        let result = self.checkpoint(self.next_seq);
        self.logged(result)
    }

    fn logged(
        &mut self,
        result: std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        match result {
            Ok(()) => {
                self.next_seq += 1;
                Ok(())
            }
            Err(e) => {
                let why = format!("durable write failed ({e}); reopen the store");
                error!(error = %e, "persistence: log write failed; store closed");
                self.broken = Some(why.clone());
                Err(why)
            }
        }
    }

    /// One metadata value, in its own durable transaction (a durable commit
    /// also makes earlier non-durable ones durable; replaying their log
    /// records later rewrites the same values, which is harmless).
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        txn.set_two_phase_commit(self.options.two_phase_commit);
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(key, value).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        debug!(key, len = value.len(), "persistence: metadata stored");
        Ok(())
    }

    fn read_batch(&self, reads: Vec<Request>) {
        let txn = match self.db.begin_read() {
            Ok(txn) => txn,
            Err(e) => {
                let msg = db_err(e).to_string();
                for r in reads {
                    fail(r, &msg);
                }
                return;
            }
        };
        for r in reads {
            match r {
                Request::Ids(reply) => {
                    let _ = reply.send(read_ids(&txn));
                }
                Request::Load(id, reply) => {
                    let _ = reply.send(read_one(&txn, id));
                }
                Request::LoadAll(reply) => {
                    let _ = reply.send(read_all(&txn));
                }
                Request::MetaGet(key, reply) => {
                    let _ = reply.send(read_meta(&txn, &key));
                }
                other => fail(other, "internal: write request in read batch"),
            }
        }
    }
}

/// Counts an `update` call in progress until dropped (also when its future
/// is).
struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// With the queue empty, lets the database catch up with the log, once
/// the callers just answered had the core: a caller woken on this core
/// would otherwise wait for the commit (about 35 µs an update on a 2-vCPU
/// KVM guest, BENCHMARKS.md). A request that came meanwhile goes first.
/// `false` if the storage engine panicked (the store is closed).
fn catch_up_when_idle(store: &Store) -> bool {
    let behind = lock_writer(store)
        .as_ref()
        .is_some_and(|w| !w.deferred.is_empty());
    if !behind {
        return true;
    }
    std::thread::yield_now();
    if store.queued.load(Ordering::SeqCst) != 0 {
        return true;
    }
    let mut guard = lock_writer(store);
    if let Some(w) = guard.as_mut()
        && !w.guarded(Writer::apply_deferred)
    {
        close_after_panic(guard);
        return false;
    }
    true
}

/// Closes the store after a panic in the storage engine: every later call
/// sees `Error::Closed`. The database is dropped outside the lock, and a
/// panic in its drop stays here.
fn close_after_panic(mut guard: MutexGuard<'_, Option<Writer>>) {
    let dead = guard.take();
    drop(guard);
    if let Some(dead) = dead
        && catch_unwind(AssertUnwindSafe(move || drop(dead))).is_err()
    {
        error!("persistence: storage engine panicked while closing");
    }
}

fn lock_writer(store: &Store) -> MutexGuard<'_, Option<Writer>> {
    store.writer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the caller runs on a multi-thread tokio runtime with two workers
/// or more, where a worker blocked for one write leaves the others running.
/// On a current-thread runtime, a one-worker one or outside tokio every
/// write goes to the writer thread.
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| {
        h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && h.metrics().num_workers() >= 2
    })
}

/// The writer thread: takes every queued request, runs them as one batch.
fn run(store: &Store, receiver: &mpsc::Receiver<Request>, wait: BatchWait) {
    let mut cpus = CpuBusy::default();
    let mut last_batch = 0;
    loop {
        let pause = match wait {
            _ if last_batch < BATCH_WAIT_FROM => None,
            BatchWait::Never => None,
            BatchWait::WhenCpusBusy(d) => cpus.busy().then_some(d),
            BatchWait::Always(d) => Some(d),
        };
        if let Some(pause) = pause {
            // A caller that finds the store idle meanwhile writes on its
            // own thread: the lock is free.
            std::thread::sleep(pause.min(MAX_BATCH_WAIT));
        }
        let waited = pause.is_some();
        let first = match receiver.try_recv() {
            Ok(first) => first,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                if !catch_up_when_idle(store) {
                    return;
                }
                match receiver.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            }
        };
        let mut guard = lock_writer(store);
        let Some(w) = guard.as_mut() else {
            // A panic on a caller's thread closed the store: as after one
            // here, the thread stops and every caller sees `Error::Closed`.
            return;
        };
        let mut batch = vec![first];
        while batch.len() < w.options.max_batch.max(1) {
            match receiver.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let taken = batch
            .iter()
            .filter(|r| !matches!(r, Request::CatchUp))
            .count();
        // Only writes share an `fsync`: a batch of reads is no reason to
        // wait for the next one.
        last_batch = batch.iter().filter(|r| r.is_write()).count();
        if waited {
            w.counters.batch_waits.fetch_add(1, Ordering::Relaxed);
        }
        let ok = w.guarded(|w| w.process(batch));
        // Queued until applied: no caller's write overtakes one the thread
        // took off the queue but had not run yet.
        store.queued.fetch_sub(taken, Ordering::SeqCst);
        if !ok {
            close_after_panic(guard);
            return;
        }
    }
    let mut guard = lock_writer(store);
    if let Some(mut w) = guard.take() {
        w.close();
    }
    debug!("persistence: writer thread stopped");
}

fn fail(req: Request, msg: &str) {
    let err = || Error::Storage(msg.to_owned());
    match req {
        Request::Create(_, r)
        | Request::Update(_, _, r)
        | Request::Remove(_, r)
        | Request::MetaPut(_, _, r) => {
            let _ = r.send(Err(err()));
        }
        Request::Ids(r) => {
            let _ = r.send(Err(err()));
        }
        Request::Load(_, r) => {
            let _ = r.send(Err(err()));
        }
        Request::LoadAll(r) => {
            let _ = r.send(Err(err()));
        }
        Request::MetaGet(_, r) => {
            let _ = r.send(Err(err()));
        }
        Request::CatchUp => {}
    }
}

fn plan_create(
    tables: &Tables<'_>,
    rec: &ChannelRecord,
) -> std::result::Result<(ChannelId, Plan), Failure> {
    let id = rec.id();
    if let Some(existing) = tables.read(id)? {
        return if existing == *rec {
            Ok((id, Plan::default()))
        } else {
            Err(Error::AlreadyExists(id).into())
        };
    }
    let encode = |st: &Option<_>| st.as_ref().map(encode_state).transpose();
    Ok((
        id,
        Plan {
            meta: Some(Some(encode_meta(rec)?)),
            current: Some(encode(&rec.current)?),
            staged: Some(encode(&rec.staged)?),
        },
    ))
}

/// Plans an update of `id` on its record, taken from `cache` (where it is
/// no longer) or read from the tables; returns the plan and the record as
/// the update leaves it.
fn plan_update(
    tables: &Tables<'_>,
    cache: &mut HashMap<ChannelId, ChannelRecord>,
    id: ChannelId,
    changes: Vec<Change>,
) -> std::result::Result<(Plan, ChannelRecord), Failure> {
    let rec = match cache.remove(&id) {
        Some(rec) => rec,
        None => {
            let rec = tables.read(id)?.ok_or(Error::UnknownChannel(id))?;
            // Bytes from disk: checked as a load checks them (its key is
            // its params' hash, the params valid), which is what the cheap
            // checks of each write (`check_shape`) rely on. Once per record
            // this thread has not cached.
            check_loaded(id, &rec)?;
            rec
        }
    };
    plan_record(rec, cache, id, changes)
}

/// Plans `changes` on `rec`, the record of `id` taken out of `cache` (put
/// back unchanged if they are refused); returns the plan and the record as
/// the changes leave it.
fn plan_record(
    mut rec: ChannelRecord,
    cache: &mut HashMap<ChannelId, ChannelRecord>,
    id: ChannelId,
    changes: Vec<Change>,
) -> std::result::Result<(Plan, ChannelRecord), Failure> {
    let dirty = match rec.apply_all(id, changes) {
        Ok(dirty) => dirty,
        Err(e) => {
            // Refused: the record is unchanged and stays cached.
            cache.insert(id, rec);
            return Err(e.into());
        }
    };
    let mut plan = Plan::default();
    if dirty.meta {
        plan.meta = Some(Some(encode_meta(&rec)?));
    }
    if dirty.current {
        plan.current = Some(rec.current.as_ref().map(encode_state).transpose()?);
    }
    if dirty.staged {
        plan.staged = Some(rec.staged.as_ref().map(encode_state).transpose()?);
    }
    Ok((plan, rec))
}

fn plan_remove(
    tables: &Tables<'_>,
    id: ChannelId,
) -> std::result::Result<(ChannelId, Plan), Failure> {
    if tables.channels.get(&id.0).map_err(fatal)?.is_none() {
        return Err(Error::UnknownChannel(id).into());
    }
    Ok((
        id,
        Plan {
            meta: Some(None),
            current: Some(None),
            staged: Some(None),
        },
    ))
}

fn failure_to_error(f: Failure) -> Error {
    match f {
        Failure::Refused(e) => e,
        Failure::Fatal(msg) => Error::Storage(msg),
    }
}

fn read_ids(txn: &ReadTransaction) -> Result<Vec<ChannelId>> {
    let channels = txn.open_table(CHANNELS).map_err(db_err)?;
    let mut ids = Vec::with_capacity(usize::try_from(channels.len().map_err(db_err)?).unwrap_or(0));
    for entry in channels.iter().map_err(db_err)? {
        let (key, _) = entry.map_err(db_err)?;
        ids.push(ChannelId::from(*key.value()));
    }
    Ok(ids)
}

fn read_one(txn: &ReadTransaction, id: ChannelId) -> Result<Option<ChannelRecord>> {
    let channels = txn.open_table(CHANNELS).map_err(db_err)?;
    let current = txn.open_table(CURRENT).map_err(db_err)?;
    let staged = txn.open_table(STAGED).map_err(db_err)?;
    // Checked by the caller (`load`), off the writer thread.
    read_record(&channels, &current, &staged, id).map_err(failure_to_error)
}

/// The metadata value under `key`; none before the table's first write.
fn read_meta(txn: &ReadTransaction, key: &str) -> Result<Option<Vec<u8>>> {
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(db_err(e)),
    };
    Ok(meta.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
}

fn read_all(txn: &ReadTransaction) -> Result<Vec<ChannelRecord>> {
    let span = debug_span!("persist_load_all");
    let _guard = span.enter();
    let channels = txn.open_table(CHANNELS).map_err(db_err)?;
    let current = txn.open_table(CURRENT).map_err(db_err)?;
    let staged = txn.open_table(STAGED).map_err(db_err)?;
    let mut out = Vec::new();
    for entry in channels.iter().map_err(db_err)? {
        let (key, _) = entry.map_err(db_err)?;
        let id = ChannelId::from(*key.value());
        let rec = read_record(&channels, &current, &staged, id)
            .map_err(failure_to_error)
            .inspect_err(|e| warn!(channel = %id, error = %e, "persistence: unreadable record"))?
            .ok_or_else(|| Error::Storage(format!("channel {id} vanished during load")))?;
        if rec.id() != id {
            // The rest of the checks run in `check_all_loaded`, off this thread.
            check_loaded(id, &rec)?;
        }
        out.push(rec);
    }
    // A state without its channel can only come from damage: report it
    // rather than silently ignoring data.
    for (name, table) in [("current", &current), ("staged", &staged)] {
        for entry in table.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            if channels.get(key.value()).map_err(db_err)?.is_none() {
                let id = ChannelId::from(*key.value());
                warn!(channel = %id, table = name, "persistence: state without channel");
                return Err(Error::Corrupt {
                    id: Some(id),
                    reason: format!("{name} state stored without its channel record"),
                });
            }
        }
    }
    debug!(channels = out.len(), "persistence: loaded");
    Ok(out)
}

/// Creates an empty store under a name of its own beside `path` and links
/// it into place once its header and schema are durable, so that a crash
/// while redb writes a new file never leaves a half-written file at the
/// store's path (it would not open again). The link never replaces a
/// file: if another process created the store first, this one opens
/// theirs (and finds it locked while they hold it). A crash before the
/// link leaves an unused `<file>.creating.*` behind.
fn create_in_place(path: &Path) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".creating.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let tmp = path.with_file_name(name);
    let created = (|| -> Result<()> {
        {
            let db = Database::create(&tmp).map_err(db_err)?;
            check_schema(&db)?;
        }
        std::fs::File::open(&tmp)?.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e.into()),
            _ => Ok(()),
        }
    })();
    // After the link it is a second name of the store; before, a file
    // nobody needs.
    if let Err(e) = std::fs::remove_file(&tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %tmp.display(), error = %e, "persistence: cannot remove the file a new store was made in");
    }
    created?;
    Ok(wal::sync_parent(path)?)
}

/// Reads the schema version without writing anything, then initialises a
/// new file. A newer or missing version is an error, never overwritten.
fn check_schema(db: &Database) -> Result<()> {
    let txn = db.begin_read().map_err(db_err)?;
    let found = match txn.open_table(INFO) {
        Ok(info) => Some(info.get(SCHEMA_KEY).map_err(db_err)?.map(|v| v.value())),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(db_err(e)),
    };
    let has_data = match txn.open_table(CHANNELS) {
        Ok(t) => !t.is_empty().map_err(db_err)?,
        Err(TableError::TableDoesNotExist(_)) => false,
        Err(e) => return Err(db_err(e)),
    };
    drop(txn);
    match found {
        Some(Some(v)) if v > SCHEMA_VERSION => Err(Error::SchemaTooNew {
            found: v,
            supported: SCHEMA_VERSION,
        }),
        Some(Some(SCHEMA_VERSION)) => {
            // Open every table once to check its key and value types.
            let txn = db.begin_read().map_err(db_err)?;
            for def in [CHANNELS, CURRENT, STAGED] {
                match txn.open_table(def) {
                    Ok(_) | Err(TableError::TableDoesNotExist(_)) => {}
                    Err(e) => return Err(db_err(e)),
                }
            }
            match txn.open_table(META) {
                Ok(_) | Err(TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db_err(e)),
            }
            Ok(())
        }
        Some(Some(v)) => Err(Error::Corrupt {
            id: None,
            reason: format!("unknown schema version {v}"),
        }),
        Some(None) => Err(Error::Corrupt {
            id: None,
            reason: "schema version missing".into(),
        }),
        None if has_data => Err(Error::Corrupt {
            id: None,
            reason: "channel records without a schema version".into(),
        }),
        None => {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut info = txn.open_table(INFO).map_err(db_err)?;
                info.insert(SCHEMA_KEY, SCHEMA_VERSION).map_err(db_err)?;
                for def in [CHANNELS, CURRENT, STAGED] {
                    txn.open_table(def).map_err(db_err)?;
                }
            }
            txn.commit().map_err(db_err)?;
            info!(
                version = SCHEMA_VERSION,
                "persistence: new store initialised"
            );
            Ok(())
        }
    }
}
