//! What `RedbPersister` does with files it did not write itself: newer
//! schemas, garbage, flipped bytes, records swapped between channels,
//! a second opener. None of it may panic or return altered data.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::TestChannel;
use perun_persistence::{
    BatchWait, Error, Persister, RedbOptions, RedbPersister, RedbStats, SCHEMA_VERSION,
};
use rand::{Rng, SeedableRng};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const INFO: TableDefinition<&str, u64> = TableDefinition::new("perun_info");
const CURRENT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("perun_current");

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("store.redb")
}

/// `ch`'s current state in the store in `dir`, opened anew.
async fn current_after_reopen(
    dir: &tempfile::TempDir,
    ch: &TestChannel,
) -> Option<perun_channel::SignedState> {
    let p = RedbPersister::open(db_path(dir)).await.expect("reopen");
    p.load(ch.id())
        .await
        .expect("load")
        .expect("present")
        .current
}

/// A store in `dir` opened with `options`, holding `ch` committed at
/// versions `0..versions`, one at a time.
async fn committed(
    dir: &tempfile::TempDir,
    options: RedbOptions,
    ch: &TestChannel,
    versions: u64,
) -> RedbPersister {
    let p = RedbPersister::open_with(db_path(dir), options)
        .await
        .expect("open");
    p.channel_created(&ch.record()).await.expect("create");
    for v in 0..versions {
        p.state_committed(ch.id(), &ch.signed(v))
            .await
            .expect("commit");
    }
    p
}

/// A store with two channels at version 1 and 2, closed again.
async fn populated(path: &Path) -> (TestChannel, TestChannel) {
    let (a, b) = (TestChannel::two_party(100), TestChannel::two_party(101));
    let p = RedbPersister::open(path).await.expect("open");
    for ch in [&a, &b] {
        let mut rec = ch.record();
        rec.metadata = b"MARKER-perun-metadata-MARKER".to_vec();
        p.channel_created(&rec).await.expect("create");
        p.state_committed(ch.id(), &ch.signed(0)).await.expect("v0");
    }
    p.state_committed(a.id(), &a.signed(1)).await.expect("a v1");
    p.state_committed(b.id(), &b.signed(2)).await.expect("b v2");
    (a, b)
}

#[tokio::test]
async fn newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    populated(&path).await;
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(INFO)
            .expect("info")
            .insert("schema_version", SCHEMA_VERSION + 1)
            .expect("insert");
        txn.commit().expect("commit");
    }
    let err = RedbPersister::open(&path).await.expect_err("newer schema");
    assert!(
        matches!(err, Error::SchemaTooNew { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    let db = redb::Database::create(&path).expect("raw open");
    let txn = db.begin_read().expect("txn");
    let version = txn
        .open_table(INFO)
        .expect("info")
        .get("schema_version")
        .expect("get")
        .map(|v| v.value());
    assert_eq!(version, Some(SCHEMA_VERSION + 1), "file not downgraded");
}

#[tokio::test]
async fn missing_schema_version_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    populated(&path).await;
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        txn.delete_table(INFO).expect("delete");
        txn.commit().expect("commit");
    }
    let err = RedbPersister::open(&path).await.expect_err("no schema");
    assert!(matches!(err, Error::Corrupt { id: None, .. }), "{err}");
}

#[tokio::test]
async fn garbage_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let real = dir.path().join("real.redb");
    populated(&real).await;
    let expected = RedbPersister::open(&real)
        .await
        .expect("open")
        .load_all()
        .await
        .expect("load_all");
    let real_bytes = std::fs::read(&real).expect("read");

    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("zeros 4 KiB".into(), vec![0; 4096]),
        ("text".into(), b"this is not a database".to_vec()),
        (
            "random 64 KiB".into(),
            (0..65536).map(|_| rng.r#gen::<u8>()).collect(),
        ),
        (
            "first half of a real file".into(),
            real_bytes[..real_bytes.len() / 2].to_vec(),
        ),
        (
            "first 100 bytes of a real file".into(),
            real_bytes[..100].to_vec(),
        ),
    ];
    let mut zeroed_header = real_bytes.clone();
    zeroed_header[..512].fill(0);
    cases.push(("zeroed header".into(), zeroed_header));
    for i in 0..20 {
        let mut b = real_bytes.clone();
        let at = rng.gen_range(0..b.len());
        let len = rng.gen_range(1..=4096).min(b.len() - at);
        rng.fill(&mut b[at..at + len]);
        cases.push((format!("random run {i} at {at}+{len}"), b));
    }

    for (what, bytes) in cases {
        let path = dir.path().join("case.redb");
        std::fs::write(&path, &bytes).expect("write");
        // Opening may fail or succeed (damage in unused pages is harmless);
        // when it succeeds, loading either fails or returns valid records.
        match RedbPersister::open(&path).await {
            Err(e) => {
                eprintln!("{what}: open: {e}");
                assert!(
                    matches!(e, Error::Corrupt { .. } | Error::Storage(_)),
                    "{what}: {e}"
                );
            }
            Ok(p) => match p.load_all().await {
                Err(e) => {
                    eprintln!("{what}: load_all: {e}");
                    assert!(!e.is_rejection(), "{what}: {e}");
                }
                Ok(records) => {
                    // Damage that redb and the record checks cannot see
                    // must have hit unused pages: the data is intact.
                    eprintln!("{what}: {} intact records", records.len());
                    assert_eq!(records, expected, "{what}: no silent change or loss");
                }
            },
        }
        std::fs::remove_file(&path).expect("remove");
    }
}

/// Flips bytes of one stored record on disk: the damage is reported as an
/// error naming that channel, never returned as data.
#[tokio::test]
async fn flipped_record_bytes_are_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    populated(&path).await;
    let mut bytes = std::fs::read(&path).expect("read");
    let marker = b"MARKER-perun-metadata-MARKER";
    let hits: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "marker found in the file");
    for at in hits {
        bytes[at + 7] ^= 0x20;
    }
    std::fs::write(&path, &bytes).expect("write");
    let p = RedbPersister::open(&path).await.expect("open");
    let err = p.load_all().await.expect_err("damage detected");
    assert!(
        matches!(err, Error::Corrupt { id: Some(_), .. }),
        "names the channel: {err}"
    );
}

/// A well-formed state of another channel stored under this channel's key
/// (a "mixed" record) fails validation on load.
#[tokio::test]
async fn state_of_another_channel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let (a, b) = populated(&path).await;
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut cur = txn.open_table(CURRENT).expect("table");
            let b_state = cur
                .get(&b.id().0)
                .expect("get")
                .expect("b")
                .value()
                .to_vec();
            cur.insert(&a.id().0, b_state.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let p = RedbPersister::open(&path).await.expect("open");
    let err = p.load_all().await.expect_err("mixed record");
    assert!(
        matches!(err, Error::InvalidRecord { id, .. } if id == a.id()),
        "{err}"
    );
    assert!(matches!(
        p.load(a.id()).await,
        Err(Error::InvalidRecord { .. })
    ));
    // The undamaged channel can still be loaded on its own.
    let rec = p.load(b.id()).await.expect("load b").expect("present");
    assert_eq!(rec.current, Some(b.signed(2)));
}

#[tokio::test]
async fn state_without_channel_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let (a, _) = populated(&path).await;
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut cur = txn.open_table(CURRENT).expect("table");
            let a_state = cur
                .get(&a.id().0)
                .expect("get")
                .expect("a")
                .value()
                .to_vec();
            cur.insert(&[9u8; 32], a_state.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let p = RedbPersister::open(&path).await.expect("open");
    assert!(matches!(
        p.load_all().await,
        Err(Error::Corrupt { id: Some(id), .. }) if id.0 == [9u8; 32]
    ));
}

#[tokio::test]
async fn second_open_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let first = RedbPersister::open(&path).await.expect("open");
    assert!(matches!(
        RedbPersister::open(&path).await,
        Err(Error::AlreadyOpen)
    ));
    drop(first);
    RedbPersister::open_blocking(&path, RedbOptions::default()).expect("reopen");
}

/// Openers racing to create one new store end up with one store: one of
/// them holds it, the others are refused, and no temporary file is left.
#[test]
fn racing_creators_share_one_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let results: Vec<_> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..4)
            .map(|_| s.spawn(|| RedbPersister::open_blocking(&path, RedbOptions::default())))
            .collect();
        opens.into_iter().map(|h| h.join().expect("join")).collect()
    });
    let (held, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(held.len(), 1, "exactly one opener holds the store");
    for r in &refused {
        assert!(matches!(r, Err(Error::AlreadyOpen)), "{r:?}");
    }
    drop(held);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["store.redb", "store.redb.wal"]);
    RedbPersister::open_blocking(&path, RedbOptions::default()).expect("reopen");
}

/// Commits versions `0..versions` of every channel, one task per channel,
/// all at once; the store's counters before and after.
async fn commit_concurrently(
    p: &Arc<RedbPersister>,
    channels: &[TestChannel],
    versions: u64,
) -> (RedbStats, RedbStats) {
    let before = p.stats();
    let mut tasks = Vec::new();
    for ch in channels {
        let (p, id) = (p.clone(), ch.id());
        let states: Vec<_> = (0..versions).map(|v| ch.signed(v)).collect();
        tasks.push(tokio::spawn(async move {
            for st in states {
                p.state_committed(id, &st).await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (before, p.stats())
}

/// Concurrent writers share transactions, and every one of them is
/// acknowledged only as part of a committed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_are_grouped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every write on the writer thread, whose batching is what this shows:
    // a writer that found the store idle would commit alone, and how many
    // do depends on the machine's load.
    let opts = RedbOptions {
        write_on_caller_when_idle: false,
        ..RedbOptions::default()
    };
    let p = Arc::new(
        RedbPersister::open_with(db_path(&dir), opts)
            .await
            .expect("open"),
    );
    let channels: Vec<TestChannel> = (0..50).map(|s| TestChannel::two_party(200 + s)).collect();
    for ch in &channels {
        p.channel_created(&ch.record()).await.expect("create");
    }
    let (before, after) = commit_concurrently(&p, &channels, 4).await;
    let writes = after.writes - before.writes;
    let txns = after.transactions - before.transactions;
    assert_eq!(writes, 200);
    // Each task waits for its write, so batches are small unless the writer
    // is slow: the bound says "shared", not "how much".
    assert!(
        txns <= writes * 3 / 4,
        "group commit: {writes} writes in {txns} transactions"
    );
    let p = Arc::into_inner(p).expect("only handle");
    drop(p);
    let p = RedbPersister::open(db_path(&dir)).await.expect("reopen");
    assert_eq!(p.load_all().await.expect("load_all").len(), channels.len());
    for ch in &channels {
        let rec = p.load(ch.id()).await.expect("load").expect("present");
        assert_eq!(rec.current, Some(ch.signed(3)));
    }
}

/// With [`BatchWait::Always`], the writer thread waits after a batch of
/// several writes, so each round of 50 concurrent writers lands in a few
/// transactions; a lone writer's batches of one never wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_more_writes_only_after_a_batch_of_several() {
    // Every write on the writer thread: a writer that found the store idle
    // would write on its own thread, in a transaction of its own, and how
    // many do depends on the machine's load (a CI run counted 113
    // transactions so).
    let wait = RedbOptions {
        batch_wait: BatchWait::Always(Duration::from_millis(20)),
        write_on_caller_when_idle: false,
        ..RedbOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Arc::new(
        RedbPersister::open_with(db_path(&dir), wait.clone())
            .await
            .expect("open"),
    );
    let channels: Vec<TestChannel> = (0..50).map(|s| TestChannel::two_party(600 + s)).collect();
    for ch in &channels {
        p.channel_created(&ch.record()).await.expect("create");
    }
    let rounds = 8;
    let (before, after) = commit_concurrently(&p, &channels, rounds).await;
    let (writes, txns) = (
        after.writes - before.writes,
        after.transactions - before.transactions,
    );
    assert_eq!(writes, 50 * rounds);
    // Once a batch had several, the thread waits for the round's other
    // writers. Here 11-47 transactions; without the wait, 170-220.
    assert!(txns <= writes / 4, "{writes} writes in {txns} transactions");
    assert!(after.batch_waits > before.batch_waits);
    drop(p);
    let p = RedbPersister::open(db_path(&dir)).await.expect("reopen");
    for ch in &channels {
        let rec = p.load(ch.id()).await.expect("load").expect("present");
        assert_eq!(rec.current, Some(ch.signed(rounds - 1)));
    }
    drop(p);

    // One channel at a time, every write on the writer thread: batches of
    // one, which never wait.
    let lone = RedbOptions {
        batch_wait: BatchWait::Always(Duration::from_millis(50)),
        write_on_caller_when_idle: false,
        ..RedbOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = committed(&dir, lone, &TestChannel::two_party(700), 20).await;
    let stats = p.stats();
    assert_eq!((stats.writes, stats.on_caller), (21, 0));
    assert_eq!(stats.batch_waits, 0);
}

/// Sequential updates on a multi-thread runtime find the store idle and run
/// on the caller's thread; each is durable all the same, and the database
/// catches up with the log behind them (more than `NUDGE_AT` of them here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_writes_on_the_callers_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ch = TestChannel::two_party(310);
    {
        let p = committed(&dir, RedbOptions::default(), &ch, 300).await;
        // A write that finds the thread busy (after the create, and while it
        // catches up once 64 entries are behind) goes to the thread; one
        // that finds 64 behind does too, so more than 64 here also shows
        // the thread caught up. At least half: a loaded machine can leave
        // the thread busy for a few writes in a row; with the fast path off
        // or broken it is 0, and with no catching up at most 64.
        let stats = p.stats();
        assert!(stats.on_caller >= 150, "{stats:?}");
        assert_eq!(stats.writes, 301, "{stats:?}");
        // A read is served by the thread, after the deferred entries.
        let rec = p.load(ch.id()).await.expect("load").expect("present");
        assert_eq!(rec.current, Some(ch.signed(299)));
    }
    assert_eq!(current_after_reopen(&dir, &ch).await, Some(ch.signed(299)));
}

/// A write refused on the caller's thread (a stale version, as a hostile
/// or confused caller may send) is an error that changes nothing: the
/// store keeps the newer state, and the next write goes the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_on_the_callers_thread_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ch = TestChannel::two_party(315);
    {
        let p = committed(&dir, RedbOptions::default(), &ch, 3).await;
        // A write finds the thread busy now and then (catching up after the
        // create); the refusal is the same either way, so repeat it until
        // one ran on the caller's thread.
        let mut on_caller = false;
        for _ in 0..100 {
            let before = p.stats().on_caller;
            let err = p
                .state_committed(ch.id(), &ch.signed(1))
                .await
                .expect_err("stale");
            common::assert_stale(&err, 2, 1);
            if p.stats().on_caller > before {
                on_caller = true;
                break;
            }
        }
        assert!(on_caller, "no refusal ran on the caller's thread");
        p.state_committed(ch.id(), &ch.signed(3)).await.expect("v3");
    }
    assert_eq!(current_after_reopen(&dir, &ch).await, Some(ch.signed(3)));
}

/// On a current-thread runtime, or a multi-thread one with one worker, a
/// write never blocks the runtime's only thread, and with the option off no
/// write runs on the caller's thread.
#[tokio::test]
async fn writes_stay_on_the_writer_thread_where_they_must() {
    async fn on_caller(dir: &tempfile::TempDir, options: RedbOptions) -> u64 {
        let ch = TestChannel::two_party(320);
        committed(dir, options, &ch, 5).await.stats().on_caller
    }
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(on_caller(&dir, RedbOptions::default()).await, 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let off = RedbOptions {
        write_on_caller_when_idle: false,
        ..RedbOptions::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let n = std::thread::spawn(move || rt.block_on(on_caller(&dir, off)))
        .join()
        .expect("thread");
    assert_eq!(n, 0);
    // One worker: blocking it would stall the whole runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = std::thread::spawn(move || rt.block_on(on_caller(&dir, RedbOptions::default())))
        .join()
        .expect("thread");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn one_phase_commit_option_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let options = RedbOptions {
        two_phase_commit: false,
        ..RedbOptions::default()
    };
    let ch = TestChannel::two_party(300);
    {
        let p = RedbPersister::open_with(&path, options.clone())
            .await
            .expect("open");
        p.channel_created(&ch.record()).await.expect("create");
        p.state_committed(ch.id(), &ch.signed(0)).await.expect("v0");
    }
    let p = RedbPersister::open_with(&path, options)
        .await
        .expect("reopen");
    let rec = p.load(ch.id()).await.expect("load").expect("present");
    assert_eq!(rec.current, Some(ch.signed(0)));
}

/// The write-ahead log is 8 MiB: states with 60 KiB of app data fill it
/// several times over. Each time it fills, a checkpoint makes the database
/// durable and the log starts over; it never grows, and nothing is lost.
#[tokio::test]
async fn the_log_starts_over_when_full_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.redb");
    let ch = TestChannel::new(77, 2, 1, 60 * 1024);
    let id = ch.id();
    {
        let p = RedbPersister::open(&path).await.expect("open");
        p.channel_created(&ch.record()).await.expect("create");
        for v in 0..300 {
            p.state_committed(id, &ch.signed(v)).await.expect("commit");
        }
    }
    let log = std::fs::metadata(dir.path().join("big.redb.wal")).expect("log file");
    assert_eq!(log.len(), 8 * 1024 * 1024, "the log never grows");
    let p = RedbPersister::open(&path).await.expect("reopen");
    let rec = p.load(id).await.expect("load").expect("record");
    assert_eq!(rec.current.expect("current").state.version, 299);
}

/// A log left beside a database it does not belong to (here: the database
/// was deleted and created anew) is never replayed into it.
#[tokio::test]
async fn a_log_of_another_database_is_not_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let ch = TestChannel::two_party(5);
    let wal = dir.path().join("s.redb.wal");
    {
        let p = RedbPersister::open(&path).await.expect("open");
        p.channel_created(&ch.record()).await.expect("create");
        p.state_committed(ch.id(), &ch.signed(0)).await.expect("v0");
        // Keep the log as it is before the clean close checkpoints it.
        std::fs::copy(&wal, dir.path().join("keep")).expect("copy log");
    }
    std::fs::remove_file(&path).expect("remove db");
    std::fs::rename(dir.path().join("keep"), &wal).expect("restore log");
    let p = RedbPersister::open(&path)
        .await
        .expect("a new database opens");
    assert!(p.load_all().await.expect("load").is_empty());
}

/// With the log, a write is answered before the database commits it
/// (DESIGN §2): a read right after the answer sees it, a refused write
/// after it changes nothing, and a reopen sees the last one. Crashes
/// between the answer and the commit: `tests/crash.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_write_is_read_back_at_once_and_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let ch = TestChannel::two_party(400);
    let id = ch.id();
    {
        let p = RedbPersister::open(&path).await.expect("open");
        p.channel_created(&ch.record()).await.expect("create");
        for v in 0..50 {
            p.state_committed(id, &ch.signed(v)).await.expect("commit");
            let rec = p.load(id).await.expect("load").expect("present");
            assert_eq!(rec.current, Some(ch.signed(v)), "read right after v{v}");
            if v > 0 {
                assert!(
                    p.state_committed(id, &ch.signed(v - 1)).await.is_err(),
                    "an older state is refused"
                );
                let rec = p.load(id).await.expect("load").expect("present");
                assert_eq!(rec.current, Some(ch.signed(v)), "unchanged by the refusal");
            }
        }
    }
    let p = RedbPersister::open(&path).await.expect("reopen");
    let rec = p.load(id).await.expect("load").expect("present");
    assert_eq!(rec.current, Some(ch.signed(49)));
}
