//! Disputes the chain shows, kept while they run (`tower_open_disputes`), so
//! that an appointment arriving in the middle of one is acted on.
//!
//! A `Registered` event whose locator has no appointment used to be
//! forgotten at once, and a job that ended for want of a valid blob stayed
//! ended: an appointment stored afterwards (a client back from a long
//! absence, or resending to a tower that lost it) was only watched for the
//! *next* dispute, while the running one concluded the stale state. Every
//! `Registered` event is public, so keeping it tells the tower nothing a
//! node does not; the locator still names the channel only to whoever
//! holds its id and nonce.
//!
//! The responder buffers what the feed shows between two cursor marks
//! ([`Seen`]) and stores it in the mark's transaction
//! ([`Store::mark_scanned`]): no write per event, and a restart from the
//! cursor reads the same events again. An appointment stored at a kept
//! locator starts (or restarts) the channel's job in its own transaction
//! ([`Store::add_appointments`]); the two transactions are serialized by
//! redb, and each checks for the other's half (the mark looks for
//! appointments stored since the event was handled), so neither order loses
//! the job. Jobs started that way are handed to the responder through
//! [`Store::started_jobs`].
//!
//! A `Registered` whose locator holds appointments is kept in the same
//! transaction that starts its job ([`Store::start_job_keeping`]): the job
//! may end (its only blob refused) before the next mark, and an appointment
//! arriving then must find the dispute kept (a review found the good
//! appointment lost in that window).
//!
//! Kept until the channel's `Concluded` event, or a day after the
//! challenge period's end by the tower's clock (nothing can be refuted
//! then; chain time follows the wall clock within seconds); at most
//! [`StoreLimits::max_open_disputes`](super::StoreLimits) (100,000): past
//! it a dispute ending sooner takes the place of the one ending last, so
//! disputes registered with year-long challenge periods cannot hold the
//! room. Each registered state is kept only up to [`MAX_KEPT_STATE`] bytes
//! (a job without it can still refute, and concludes once it has seen the
//! state or someone else concluded).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use alloy_primitives::U256;
use perun_channel::{ChannelId, State};
use redb::{Durability, ReadableMultimapTable, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use super::{
    APPOINTMENTS, CURSOR_KEY, INFO, JOBS, Job, JobPhase, JobStart, LOCATORS, OPEN_DISPUTES, Store,
    VALUE_FORMAT, decode, encode, start_job_in,
};
use crate::Result;
use crate::scheme::{ChannelSecret, Locator};

/// The largest registered state kept with its dispute (encoded bytes).
pub const MAX_KEPT_STATE: usize = 4096;
/// How long after its challenge period's end a dispute is kept (seconds).
pub const KEPT_AFTER_TIMEOUT: u64 = 86_400;
/// How often kept disputes are checked for their end (seconds).
const PRUNE_EVERY: u64 = 3_600;

/// A running dispute as its newest `Registered` event showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenDispute {
    /// When its challenge period ends (chain seconds). First in the
    /// encoding: the hourly check decodes only this.
    pub timeout: u64,
    /// The channel. Second: the hourly check reads it with the timeout.
    pub channel: ChannelId,
    /// The registered version (kept when the state is not).
    pub version: u64,
    /// Its `params.nonce`: with the id, the locator and the blobs' key.
    pub nonce: U256,
    /// The registered state, unless larger than [`MAX_KEPT_STATE`].
    pub registered: Option<State>,
}

impl OpenDispute {
    /// The locator of the channel's appointments.
    pub fn locator(&self) -> Locator {
        ChannelSecret {
            channel_id: self.channel,
            nonce: self.nonce,
        }
        .locator()
    }

    /// A job for it, as a `Registered` event would start one.
    pub fn job(&self, locator: Locator) -> Job {
        Job {
            channel: self.channel,
            nonce: self.nonce,
            locator,
            phase: JobPhase::Triggered,
            registered: self.registered.clone(),
            refuted: None,
            concluded: false,
            refused: Vec::new(),
        }
    }
}

/// What the feed showed since the last cursor mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Each `Registered` event whose locator had no appointment when it
    /// was handled (the others are kept by [`Store::start_job_keeping`]).
    pub registered: Vec<OpenDispute>,
    /// Channels whose `Concluded` event came.
    pub concluded: Vec<ChannelId>,
}

impl Seen {
    /// Nothing to store but the cursor.
    pub fn is_empty(&self) -> bool {
        self.registered.is_empty() && self.concluded.is_empty()
    }
}

/// What [`Store::mark_scanned`] did besides moving the cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marked {
    /// Jobs started because an appointment was stored at the locator after
    /// the event was handled and before this mark (the responder starts
    /// their tasks).
    pub started: Vec<ChannelId>,
    /// Disputes not kept: as many as allowed were, all ending sooner.
    pub not_kept: u64,
    /// Kept disputes dropped as over (their challenge period ended more
    /// than [`KEPT_AFTER_TIMEOUT`] ago).
    pub pruned: u64,
}

/// Jobs started by an appointment, waiting for the responder.
#[derive(Debug, Default)]
pub(super) struct Started {
    ids: Mutex<Vec<ChannelId>>,
    bell: tokio::sync::Notify,
}

impl Started {
    pub(super) fn push(&self, ids: impl IntoIterator<Item = ChannelId>) {
        let mut q = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let before = q.len();
        for id in ids {
            if !q.contains(&id) {
                q.push(id);
            }
        }
        if q.len() > before {
            self.bell.notify_one();
        }
    }
}

/// The open disputes' channel → locator map, in memory (for `Concluded`,
/// which names only the channel). A superset of the table: added before
/// the commit, removed after it.
pub(super) type OpenIds = Mutex<HashMap<ChannelId, Locator>>;

/// Loads [`OpenIds`] from the table.
pub(super) fn load_open_ids(db: &redb::Database) -> Result<HashMap<ChannelId, Locator>> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let t = txn.open_table(OPEN_DISPUTES)?;
    let mut out = HashMap::new();
    for row in t.iter()? {
        let (k, v) = row?;
        // The channel only; a row that does not decode is pruned hourly
        // and must not keep the tower from starting.
        if let Some((_, channel)) = timeout_of(v.value()) {
            out.insert(channel, Locator::from(*k.value()));
        }
    }
    Ok(out)
}

/// Encodes `d`, without its state if that makes it larger than allowed.
fn encode_kept(d: &OpenDispute) -> Result<Vec<u8>> {
    let bytes = encode(d)?;
    if bytes.len() <= MAX_KEPT_STATE + 128 {
        return Ok(bytes);
    }
    encode(&OpenDispute {
        registered: None,
        ..d.clone()
    })
}

/// A kept dispute's timeout and channel, read without decoding the state
/// (postcard encodes a struct's fields in order).
fn timeout_of(bytes: &[u8]) -> Option<(u64, ChannelId)> {
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => postcard::take_from_bytes::<(u64, ChannelId)>(body)
            .ok()
            .map(|v| v.0),
        _ => None,
    }
}

/// Whether a dispute with this timeout is over for the keeping, at `now`.
fn over(timeout: u64, now: u64) -> bool {
    timeout.saturating_add(KEPT_AFTER_TIMEOUT) < now
}

impl Store {
    /// Stores the cursor `block` and what the feed showed before it, in one
    /// durable transaction: `Concluded` channels' disputes are dropped,
    /// `Registered` ones kept (the newer state wins), and a kept dispute
    /// whose locator gained appointments since its event was handled gets
    /// its job ([`Marked::started`]). Once an hour (by `now`, unix seconds)
    /// disputes over for a day are dropped.
    pub fn mark_scanned(&self, block: u64, seen: &Seen, now: u64) -> Result<Marked> {
        let mut out = Marked::default();
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut gone = Vec::new();
        {
            let mut open = txn.open_table(OPEN_DISPUTES)?;
            let mut ids = self.open_ids.lock().unwrap_or_else(PoisonError::into_inner);
            let index = txn.open_multimap_table(LOCATORS)?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut appointments = txn.open_table(APPOINTMENTS)?;
            for d in &seen.registered {
                let locator = d.locator();
                let merged =
                    match keep_in(&mut open, &mut ids, d, now, self.limits.max_open_disputes)? {
                        Keep::Kept(m) => Some(*m),
                        Keep::Past => None,
                        Keep::Full => {
                            out.not_kept += 1;
                            None
                        }
                    };
                // An appointment stored since the event was handled; the
                // in-memory locator set (a superset, added to before each
                // commit) spares the index read for the disputes not ours.
                if !self.watches(&locator) {
                    continue;
                }
                let merged = merged.as_ref().unwrap_or(d);
                let mut users = Vec::new();
                for u in index.get(&locator.0)? {
                    users.push(alloy_primitives::Address::from(*u?.value()));
                }
                if users.is_empty() {
                    continue;
                }
                let start = start_job_in(
                    &mut jobs,
                    &mut appointments,
                    &merged.job(locator),
                    &users,
                    false,
                )?;
                if start != JobStart::Running {
                    out.started.push(d.channel);
                }
            }
            // After the registrations: a conclusion is final, whatever came
            // before it in the same range.
            for id in &seen.concluded {
                if let Some(locator) = ids.get(id) {
                    open.remove(&locator.0)?;
                    gone.push(*id);
                }
            }
            if now >= self.next_prune.load(Ordering::Relaxed) {
                let mut ended = Vec::new();
                for row in open.iter()? {
                    let (k, v) = row?;
                    match timeout_of(v.value()) {
                        Some((t, id)) if over(t, now) => ended.push((*k.value(), Some(id))),
                        Some(_) => {}
                        // Does not decode: nothing can use it.
                        None => ended.push((*k.value(), None)),
                    }
                }
                for (k, id) in &ended {
                    open.remove(k)?;
                    gone.extend(*id);
                }
                out.pruned = ended.len() as u64;
            }
            txn.open_table(INFO)?.insert(CURSOR_KEY, block)?;
        }
        txn.commit()?;
        if now >= self.next_prune.load(Ordering::Relaxed) {
            self.next_prune
                .store(now.saturating_add(PRUNE_EVERY), Ordering::Relaxed);
        }
        let mut ids = self.open_ids.lock().unwrap_or_else(PoisonError::into_inner);
        for id in gone {
            ids.remove(&id);
        }
        Ok(out)
    }

    /// [`Store::start_job`] for a `Registered` event whose locator holds
    /// appointments, keeping the dispute in the same transaction (see the
    /// module docs: the job may end before the next mark). The flag says
    /// whether the dispute was kept: `false` when the kept disputes are at
    /// their cap and all end sooner (the caller counts and warns; an
    /// appointment arriving after this job ended starts nothing).
    pub fn start_job_keeping(
        &self,
        job: &Job,
        users: &[alloy_primitives::Address],
        dispute: &OpenDispute,
        now: u64,
    ) -> Result<(JobStart, bool)> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let start = {
            let mut open = txn.open_table(OPEN_DISPUTES)?;
            let mut ids = self.open_ids.lock().unwrap_or_else(PoisonError::into_inner);
            let kept = keep_in(
                &mut open,
                &mut ids,
                dispute,
                now,
                self.limits.max_open_disputes,
            )?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut appointments = txn.open_table(APPOINTMENTS)?;
            let start = start_job_in(&mut jobs, &mut appointments, job, users, false)?;
            (start, !matches!(kept, Keep::Full))
        };
        txn.commit()?;
        Ok(start)
    }

    /// The kept dispute at `locator`, if any.
    pub fn open_dispute(&self, locator: Locator) -> Result<Option<OpenDispute>> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(OPEN_DISPUTES)?;
        match t.get(&locator.0)? {
            Some(v) => Ok(Some(decode("tower_open_disputes", v.value())?)),
            None => Ok(None),
        }
    }

    /// Waits until appointments started jobs that the responder has not
    /// taken yet, and takes them (cancel-safe: nothing is taken until it
    /// returns).
    pub async fn started_jobs(&self) -> Vec<ChannelId> {
        loop {
            let taken = std::mem::take(
                &mut *self
                    .started
                    .ids
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            if !taken.is_empty() {
                return taken;
            }
            self.started.bell.notified().await;
        }
    }
}

/// What [`keep_in`] did with a dispute.
enum Keep {
    /// Kept (merged with what was): this.
    Kept(Box<OpenDispute>),
    /// Over for more than a day already (a history read from far back).
    Past,
    /// The room is taken by disputes that all end sooner.
    Full,
}

/// Keeps `d` in the open table, merged with what is kept for its locator
/// (the newer registration wins: an event may come again on a rescan, or
/// out of order). At `max`, the kept dispute ending last gives its place
/// to `d` if `d` ends sooner: one scan of the table, only when full.
fn keep_in(
    open: &mut redb::Table<'_, &'static [u8; 32], &'static [u8]>,
    ids: &mut HashMap<ChannelId, Locator>,
    d: &OpenDispute,
    now: u64,
    max: u64,
) -> Result<Keep> {
    let locator = d.locator();
    // A kept row that does not decode (damaged, or an older layout) is
    // replaced: it must not stop every later mark.
    let kept: Option<OpenDispute> = match open.get(&locator.0)? {
        Some(v) => decode("tower_open_disputes", v.value()).ok(),
        None => None,
    };
    let merged = match kept {
        Some(k) if (k.version, k.timeout) >= (d.version, d.timeout) => k,
        Some(_) => d.clone(),
        None if over(d.timeout, now) => return Ok(Keep::Past),
        None if open.len()? >= max => {
            // Disputes already over go first, all of them (they are kept a
            // day for clock skew, and would otherwise always end sooner
            // than a live one); else the one ending last, if after `d`.
            let mut over_now = Vec::new();
            let mut last: Option<([u8; 32], u64, Option<ChannelId>)> = None;
            for row in open.iter()? {
                let (k, v) = row?;
                // One that does not decode goes first.
                let (t, id) = match timeout_of(v.value()) {
                    Some((t, id)) => (t, Some(id)),
                    None => (0, None),
                };
                if t < now {
                    over_now.push((*k.value(), id));
                } else if last.as_ref().is_none_or(|l| t > l.1) {
                    last = Some((*k.value(), t, id));
                }
            }
            let victims = match last {
                _ if !over_now.is_empty() => over_now,
                Some((k, t, id)) if t > d.timeout => vec![(k, id)],
                _ => return Ok(Keep::Full),
            };
            for (k, id) in victims {
                open.remove(&k)?;
                if let Some(id) = id {
                    ids.remove(&id);
                }
            }
            d.clone()
        }
        None => d.clone(),
    };
    ids.insert(d.channel, locator);
    open.insert(&locator.0, encode_kept(&merged)?.as_slice())?;
    Ok(Keep::Kept(Box::new(merged)))
}

/// Inside [`Store::add_appointments`]' transaction: starts the job of each
/// kept dispute at the locator of an appointment just stored (the
/// appointment joins a running job), and returns the channels whose job is
/// new or reopened.
pub(super) fn start_for_new_appointments(
    txn: &redb::WriteTransaction,
    stored: &[(alloy_primitives::Address, Locator)],
) -> Result<Vec<ChannelId>> {
    let mut started = Vec::new();
    if stored.is_empty() {
        return Ok(started);
    }
    let open = txn.open_table(OPEN_DISPUTES)?;
    let mut jobs = txn.open_table(JOBS)?;
    let mut appointments = txn.open_table(APPOINTMENTS)?;
    for (user, locator) in stored {
        let Some(v) = open.get(&locator.0)? else {
            continue;
        };
        // A row that does not decode starts nothing (and fails no batch).
        let Ok(d) = decode::<OpenDispute>("tower_open_disputes", v.value()) else {
            continue;
        };
        let start = start_job_in(
            &mut jobs,
            &mut appointments,
            &d.job(*locator),
            &[*user],
            true,
        )?;
        if start != JobStart::Running && !started.contains(&d.channel) {
            started.push(d.channel);
        }
    }
    Ok(started)
}
