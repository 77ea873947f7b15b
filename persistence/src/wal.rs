//! The write-ahead log in front of redb: one small sequential write and one
//! `fdatasync` per group commit, instead of a durable redb commit.
//!
//! A redb commit copies and writes several B-tree pages and then syncs
//! them: about three times the cost of syncing one small write on the same
//! disk (`BENCHMARKS.md`). With the log on, the writer applies each batch
//! to a redb write transaction, appends the batch's table changes, already
//! encoded, to this log, syncs the log, acknowledges, and then commits the
//! transaction *without* durability (before it serves any read; a commit
//! that fails closes the store, and a reopen replays the log). Every so often, and when the log is full, a
//! durable redb commit (a checkpoint) makes everything so far durable in
//! the database itself and records the last sequence number it covers, and
//! the log starts over from its beginning.
//!
//! After a crash, redb is back at its last durable commit and the log is
//! replayed from the beginning: records carry consecutive sequence numbers
//! and a checksum, so replay stops at the first torn, stale (left over from
//! before the log started over) or out-of-sequence record, and skips those
//! the checkpoint already covers. A record is acknowledged only after its
//! `fdatasync`, so a torn record was never acknowledged.
//!
//! The file is preallocated with zeros and synced once, so an append writes
//! in place and its `fdatasync` need not update the file's size.
//!
//! Record: `magic u32 ‖ db u64 ‖ seq u64 ‖ len u32 ‖ payload ‖
//! crc32(db ‖ seq ‖ len ‖ payload)`, little-endian. `db` is the database's
//! random id: a log left beside another database (one deleted and created
//! anew) is never replayed into it. Payload: `count u32`, then per channel its 32-byte id and
//! three slots (channel, current, staged), each `0` (untouched), `1`
//! (removed) or `2 ‖ len u32 ‖ bytes` (set to the encoded value).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use perun_channel::ChannelId;
use tracing::{debug, warn};

/// The log file's preallocated size. A batch that does not fit forces a
/// checkpoint first; one larger than the whole log grows the file.
pub(crate) const LOG_SIZE: u64 = 8 * 1024 * 1024;

const MAGIC: u32 = 0x4c57_5250; // "PRWL"
const HEADER: usize = 4 + 8 + 8 + 4;
const TRAILER: usize = 4;
/// Largest record replay accepts: a bad length cannot make it allocate much.
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// What one batch does to one channel's three table entries:
/// `None` untouched, `Some(None)` removed, `Some(Some(bytes))` set.
pub(crate) type Slot = Option<Option<Vec<u8>>>;

/// One channel's changes in a logged batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: ChannelId,
    pub(crate) meta: Slot,
    pub(crate) current: Slot,
    pub(crate) staged: Slot,
}

/// A logged batch, as replay finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) entries: Vec<Entry>,
}

/// The open log file.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// The database this log belongs to.
    db: u64,
    /// Where the next record goes.
    pos: u64,
    /// The file's length (at least [`LOG_SIZE`]).
    len: u64,
}

/// Makes `path`'s directory entry durable: a new file whose entry is
/// lost in a power cut is lost with everything written to it.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The log next to a store file: `<store>.wal`.
pub(crate) fn path_for(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

impl Wal {
    /// Opens (or creates and preallocates) the log of database `db` and
    /// reads every valid record of it from the beginning, in order.
    pub(crate) fn open(path: &Path, db: u64) -> io::Result<(Self, Vec<Record>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut len = file.metadata()?.len();
        if len < LOG_SIZE {
            preallocate(&file, len, LOG_SIZE)?;
            len = LOG_SIZE;
            sync_parent(path)?;
        }
        let records = read_records(&file, len, db);
        debug!(path = %path.display(), records = records.len(), "persistence: log opened");
        let wal = Self {
            file,
            path: path.to_path_buf(),
            db,
            pos: 0,
            len,
        };
        Ok((wal, records))
    }

    /// Whether a record with this payload fits before the end of the log.
    pub(crate) fn fits(&self, payload_len: usize) -> bool {
        self.pos + record_len(payload_len) as u64 <= self.len
    }

    /// Appends a record and syncs it: once this returns, it survives a crash.
    pub(crate) fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let rec = frame(self.db, seq, payload)?;
        self.file.write_all_at(&rec, self.pos)?;
        self.pos += rec.len() as u64;
        if self.pos > self.len {
            // A record larger than the log: the file grew.
            self.len = self.pos;
        }
        self.file.sync_data()
    }

    /// Starts over at the beginning (after a checkpoint made every record
    /// durable in the database). Old records stay until overwritten;
    /// replay skips them (stale sequence numbers).
    pub(crate) fn reset(&mut self) {
        self.pos = 0;
    }

    /// The log file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Encodes a batch's entries as a record payload.
pub(crate) fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + entries.len() * 512);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        for slot in [&e.meta, &e.current, &e.staged] {
            match slot {
                None => out.push(0),
                Some(None) => out.push(1),
                Some(Some(bytes)) => {
                    out.push(2);
                    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
    }
    out
}

fn record_len(payload_len: usize) -> usize {
    HEADER + payload_len + TRAILER
}

fn frame(db: u64, seq: u64, payload: &[u8]) -> io::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_RECORD)
        .ok_or_else(|| io::Error::other("log record too large"))?;
    let mut rec = Vec::with_capacity(record_len(payload.len()));
    rec.extend_from_slice(&MAGIC.to_le_bytes());
    rec.extend_from_slice(&db.to_le_bytes());
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(payload);
    let crc = crc32fast::hash(&rec[4..]);
    rec.extend_from_slice(&crc.to_le_bytes());
    Ok(rec)
}

fn preallocate(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1024 * 1024];
    let mut at = from;
    while at < to {
        let n = zeros.len().min((to - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// Every valid record of database `db` from the start, stopping at the
/// first invalid or foreign one or the first whose sequence number does not
/// follow its predecessor's.
fn read_records(file: &File, len: u64, db: u64) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut pos = 0u64;
    while let Some((rec, next)) = read_one(file, pos, len, db) {
        if out
            .last()
            .is_some_and(|prev| prev.seq.checked_add(1) != Some(rec.seq))
        {
            break;
        }
        out.push(rec);
        pos = next;
    }
    out
}

fn read_one(file: &File, pos: u64, len: u64, db: u64) -> Option<(Record, u64)> {
    let mut header = [0u8; HEADER];
    if pos + HEADER as u64 > len {
        return None;
    }
    file.read_exact_at(&mut header, pos).ok()?;
    let magic = u32::from_le_bytes(header[0..4].try_into().ok()?);
    if magic != MAGIC {
        return None;
    }
    if u64::from_le_bytes(header[4..12].try_into().ok()?) != db {
        return None;
    }
    let seq = u64::from_le_bytes(header[12..20].try_into().ok()?);
    let plen = u32::from_le_bytes(header[20..24].try_into().ok()?) as usize;
    if plen > MAX_RECORD || pos + record_len(plen) as u64 > len {
        return None;
    }
    let mut rest = vec![0u8; plen + TRAILER];
    file.read_exact_at(&mut rest, pos + HEADER as u64).ok()?;
    let (payload, trailer) = rest.split_at(plen);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[4..]);
    hasher.update(payload);
    if hasher.finalize() != u32::from_le_bytes(trailer.try_into().ok()?) {
        return None;
    }
    match decode(payload) {
        Some(entries) => Some((Record { seq, entries }, pos + record_len(plen) as u64)),
        None => {
            // A valid checksum over an undecodable payload is not a torn
            // write; report it, and replay nothing from here on.
            warn!(
                seq,
                "persistence: log record with a valid checksum does not decode"
            );
            None
        }
    }
}

fn decode(mut b: &[u8]) -> Option<Vec<Entry>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    fn u32_le(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }
    fn slot(b: &mut &[u8]) -> Option<Slot> {
        match take(b, 1)?[0] {
            0 => Some(None),
            1 => Some(Some(None)),
            2 => {
                let n = u32_le(b)? as usize;
                Some(Some(Some(take(b, n)?.to_vec())))
            }
            _ => None,
        }
    }
    let count = u32_le(&mut b)? as usize;
    // Each entry takes at least 35 bytes: a bad count cannot allocate much.
    let mut entries = Vec::with_capacity(count.min(b.len() / 35));
    for _ in 0..count {
        let id: [u8; 32] = take(&mut b, 32)?.try_into().ok()?;
        entries.push(Entry {
            id: ChannelId::from(id),
            meta: slot(&mut b)?,
            current: slot(&mut b)?,
            staged: slot(&mut b)?,
        });
    }
    b.is_empty().then_some(entries)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(byte: u8, with: Slot) -> Entry {
        Entry {
            id: ChannelId::repeat_byte(byte),
            meta: None,
            current: with,
            staged: Some(None),
        }
    }

    fn open(path: &Path) -> (Wal, Vec<Record>) {
        Wal::open(path, 42).unwrap()
    }

    #[test]
    fn records_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        let (mut w, recs) = open(&path);
        assert!(recs.is_empty());
        for seq in 1..=5u64 {
            let e = vec![entry(seq as u8, Some(Some(vec![seq as u8; 300])))];
            w.append(seq, &encode(&e)).unwrap();
        }
        drop(w);
        let (_, recs) = open(&path);
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(recs[2].entries, vec![entry(3, Some(Some(vec![3; 300])))]);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        let (mut w, _) = open(&path);
        w.append(1, &encode(&[entry(1, Some(None))])).unwrap();
        let second_at = w.pos;
        w.append(2, &encode(&[entry(2, Some(Some(vec![7; 100])))]))
            .unwrap();
        // Flip one byte of the second record's payload.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], second_at + HEADER as u64 + 40)
            .unwrap();
        drop((w, f));
        let (_, recs) = open(&path);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].seq, 1);
    }

    #[test]
    fn after_starting_over_stale_records_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        let (mut w, _) = open(&path);
        for seq in 1..=3u64 {
            w.append(seq, &encode(&[entry(1, Some(Some(vec![1; 50])))]))
                .unwrap();
        }
        w.reset();
        // A record of the same size as the first: seqs 2 and 3 follow it
        // on disk, stale; they must not count as its successors.
        w.append(4, &encode(&[entry(1, Some(Some(vec![1; 50])))]))
            .unwrap();
        drop(w);
        let (_, recs) = open(&path);
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn a_record_larger_than_the_log_grows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        let (mut w, _) = open(&path);
        let big = vec![entry(9, Some(Some(vec![9; LOG_SIZE as usize])))];
        let payload = encode(&big);
        assert!(!w.fits(payload.len()));
        w.append(1, &payload).unwrap();
        drop(w);
        let (_, recs) = open(&path);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].entries, big);
    }

    #[test]
    fn another_databases_records_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        let (mut w, _) = open(&path);
        w.append(1, &encode(&[entry(1, Some(None))])).unwrap();
        drop(w);
        let (_, recs) = Wal::open(&path, 43).unwrap();
        assert!(recs.is_empty());
    }

    #[test]
    fn garbage_never_decodes_into_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb.wal");
        std::fs::write(&path, vec![0xa5; 4096]).unwrap();
        let (_, recs) = open(&path);
        assert!(recs.is_empty());
    }
}
