//! The tower's store: users, appointments, the locator index and the chain
//! cursor, in one redb file.
//!
//! # Tables (schema version 1)
//!
//! | table | key | value |
//! |---|---|---|
//! | `tower_info` | `&str` | `u64`: `"schema_version"`, `"cursor"` (last scanned block) |
//! | `tower_users` | user address (20 bytes) | [`Subscription`] |
//! | `tower_appointments` | user ‖ locator (52 bytes) | [`Appointment`] (sequence number, blob, user signature, start block, receipt, status) |
//! | `tower_locators` | locator (multimap) | user addresses holding it |
//! | `tower_jobs` | channel id (32 bytes) | [`Job`]: the responder's durable record of one dispute |
//! | `tower_open_disputes` | locator | [`OpenDispute`]: a running dispute the chain showed, kept so that an appointment arriving during it starts its job ([`disputes`]) |
//!
//! The multimap index makes a `Registered` event one lookup: its locator
//! gives every user with an appointment for it, whatever the number of
//! appointments stored.
//!
//! Values are `format ‖ postcard body`; a value that does not decode is an
//! [`Error::Corrupt`] naming its table, never data.
//!
//! # Durability
//!
//! Every write is one redb write transaction committed with
//! `Durability::Immediate`: when a method returns `Ok`, its change survives
//! `kill -9` and power loss. The API answers with a receipt only after
//! [`Store::add_appointment`] returned.
//!
//! The responder writes a job's phase *before* each transaction it sends
//! (DESIGN §12), so a restarted tower knows what may be in flight and asks
//! the chain whether it landed instead of sending it again.
//!
//! Calls are blocking (redb and `fsync`); async callers run them on
//! `tokio::task::spawn_blocking`.

use std::path::Path;

use alloy_primitives::{Address, U256};
use perun_channel::{ChannelId, State};
use redb::{
    Database, Durability, MultimapTableDefinition, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::scheme::Locator;
use crate::{Error, Result};

mod bytes;
mod disputes;
pub use disputes::{KEPT_AFTER_TIMEOUT, MAX_KEPT_STATE, Marked, OpenDispute, Seen};

/// The schema version this build writes and the newest it opens. Version 2
/// added `tower_jobs`: a build of version 1 must not open a store with
/// unfinished jobs it would ignore.
pub const SCHEMA_VERSION: u64 = 2;
const VALUE_FORMAT: u8 = 1;

const INFO: TableDefinition<&str, u64> = TableDefinition::new("tower_info");
const USERS: TableDefinition<&[u8; 20], &[u8]> = TableDefinition::new("tower_users");
const APPOINTMENTS: TableDefinition<&[u8; 52], &[u8]> = TableDefinition::new("tower_appointments");
const LOCATORS: MultimapTableDefinition<&[u8; 32], &[u8; 20]> =
    MultimapTableDefinition::new("tower_locators");
const JOBS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("tower_jobs");
const OPEN_DISPUTES: TableDefinition<&[u8; 32], &[u8]> =
    TableDefinition::new("tower_open_disputes");
const SCHEMA_KEY: &str = "schema_version";
const CURSOR_KEY: &str = "cursor";

pub use crate::messages::Subscription;

/// Where an appointment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Stored; no dispute seen for its locator.
    BeingWatched,
    /// A dispute with its locator started; the responder has it.
    DisputeTriggered,
    /// The dispute is over (refuted or concluded).
    Resolved,
}

/// The tower's signed promise to watch an appointment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The appointment's locator.
    pub locator: Locator,
    /// The tower watches from this block on (and acts on a dispute
    /// already running then, which it keeps until the channel concludes).
    pub start_block: u64,
    /// The user's signature over [`crate::messages::appointment_hash`] (65 bytes).
    pub user_signature: Vec<u8>,
    /// The tower's signature over [`crate::messages::receipt_hash`] (65 bytes).
    pub tower_signature: Vec<u8>,
}

/// A stored appointment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appointment {
    /// The user's sequence number for this locator (signed with the blob).
    pub seq: u64,
    /// The encrypted blob.
    #[serde(with = "bytes")]
    pub blob: Vec<u8>,
    /// The receipt the user got (it holds the user signature).
    pub receipt: Receipt,
    /// Where it is in its life.
    pub status: Status,
}

/// An appointment as a user sent it (signature checked by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAppointment {
    /// Who signed it.
    pub user: Address,
    /// Its locator.
    pub locator: Locator,
    /// The user's sequence number for the locator.
    pub seq: u64,
    /// The encrypted blob.
    pub blob: Vec<u8>,
    /// The user's 65-byte signature.
    pub user_signature: Vec<u8>,
}

/// What [`Store::add_appointment`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The durable appointment's receipt.
    pub receipt: Receipt,
    /// It replaced an older appointment of the same user and locator (no slot taken).
    pub replaced: bool,
    /// The very appointment stored already (a retry): nothing changed.
    pub unchanged: bool,
    /// The subscription after the change.
    pub subscription: Subscription,
}

/// What one [`Store::reclaim`] transaction dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Users dropped.
    pub users: u64,
    /// Appointments dropped.
    pub appointments: u64,
    /// Values that did not decode; their users were kept.
    pub undecodable: u64,
    /// Where the next call goes on (its `after`).
    pub next: Option<Address>,
    /// Every user was looked at: the pass is complete.
    pub done: bool,
}

/// The head of a [`Job`] record ([`decode_head`]): its first fields,
/// without what it learned since (refutation, conclusion, and the
/// refusals, which may be long).
#[derive(Deserialize)]
struct JobHead {
    channel: ChannelId,
    nonce: U256,
    locator: Locator,
    phase: JobPhase,
    registered: Option<State>,
}

/// The first fields of a stored value as `T`, the rest unread (a blob, a
/// job's refusals); `None` if they do not decode.
fn decode_head<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => postcard::take_from_bytes(body).ok().map(|(v, _)| v),
        _ => None,
    }
}

/// Whether `new` is a newer registered state than `old` (none is oldest).
fn registered_newer(old: Option<&State>, new: Option<&State>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => n.version > o.version,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// A job record, whole if it decodes, else from its head if that does (a
/// record damaged past it): the job runs on as if it had sent and refused
/// nothing yet (a repeated transaction meets the chain's checks; a blob
/// refused before is opened again). Every reader of job records decodes
/// through here, so a record that [`start_job_in`] finds running from its
/// head alone does run (a review found one damaged past its head neither
/// replaced nor run). `None` (warned about) if not even the head decodes.
fn decode_job(bytes: &[u8]) -> Option<Job> {
    match decode::<Job>("tower_jobs", bytes) {
        Ok(job) => Some(job),
        Err(e) => {
            let Some(h) = decode_head::<JobHead>(bytes) else {
                tracing::warn!(error = %e, "a job record does not decode; passing it over");
                return None;
            };
            tracing::warn!(channel = %h.channel, error = %e, "a job record is damaged past its head; running it from its head");
            Some(Job {
                channel: h.channel,
                nonce: h.nonce,
                locator: h.locator,
                phase: h.phase,
                registered: h.registered,
                refuted: None,
                concluded: false,
                refused: Vec::new(),
            })
        }
    }
}

/// An appointment's status, read without copying its blob; `None` if the
/// value does not decode.
fn status_of(bytes: &[u8]) -> Option<Status> {
    #[derive(Deserialize)]
    struct StatusOnly<'a> {
        _seq: u64,
        #[serde(borrow)]
        _blob: &'a [u8],
        _receipt: Receipt,
        status: Status,
    }
    decode_head::<StatusOnly<'_>>(bytes).map(|a| a.status)
}

/// Where the responder is with one dispute. Written *before* the transaction
/// it names, so after a crash the tower checks the chain for it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// The dispute was seen; nothing sent yet.
    Triggered,
    /// A refutation with this version is being sent (or was sent).
    Refuting {
        /// The version of the state the tower registers.
        version: u64,
    },
    /// A conclusion of this version is being sent (or was sent).
    Concluding {
        /// The version of the registered state the tower concludes.
        version: u64,
    },
    /// Over: the channel is concluded on-chain, the dispute is gone, or no
    /// appointment could act on it.
    Done,
}

/// Why the responder refused an appointment's blob (it sends nothing for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// Longer than the blob limit, or too short for a nonce and a tag.
    Size,
    /// The AEAD tag does not verify with the channel's key.
    Decrypt,
    /// The plaintext does not decode.
    Garbage,
    /// The params are not this channel's.
    WrongChannel,
    /// The state is invalid or not signed by every participant.
    BadState,
}

impl Refusal {
    /// The refusal `scheme::open`'s error stands for (`None`: not a blob error).
    pub fn of(e: &Error) -> Option<Self> {
        Some(match e {
            Error::TooLarge { .. } | Error::TooShort(_) => Self::Size,
            Error::Decrypt => Self::Decrypt,
            Error::EmptyPlaintext
            | Error::PlaintextFormat(_)
            | Error::PlaintextBody(_)
            | Error::PlaintextTrailing(_)
            | Error::PlaintextSignature { .. } => Self::Garbage,
            Error::WrongChannel { .. } => Self::WrongChannel,
            Error::BadState(_) => Self::BadState,
            _ => return None,
        })
    }
}

/// The responder's durable record of one dispute (`tower_jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The disputed channel.
    pub channel: ChannelId,
    /// Its `params.nonce` (from `Registered`): with the id, it opens the blobs.
    pub nonce: U256,
    /// The appointments' locator.
    pub locator: Locator,
    /// Where the job is.
    pub phase: JobPhase,
    /// The newest registered state an event showed (to conclude it when it
    /// is not one of ours).
    pub registered: Option<State>,
    /// The version of the refutation of ours that landed, if any.
    pub refuted: Option<u64>,
    /// Whether a conclusion of ours landed.
    pub concluded: bool,
    /// Users whose blob was refused, and why.
    pub refused: Vec<(Address, Refusal)>,
}

/// What [`Store::start_job`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStart {
    /// A new dispute: the job was created.
    New,
    /// The channel's job had ended; it runs again.
    Reopened,
    /// The job runs already (its registered state was updated if newer).
    Running,
}

/// What the store holds at most, so no user (registration is free) can fill
/// the tower's disk: new users and new appointments past these are
/// [`Error::TowerFull`]; renewals stop adding slots at the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreLimits {
    /// Users in all.
    pub max_users: u64,
    /// Appointments in all (each at most `MAX_BLOB_LEN` = 32 KiB: the
    /// default bounds the blobs at 32 GiB, about 1 GiB at a two-party
    /// channel's 700 bytes).
    pub max_appointments: u64,
    /// Slots one user can hold, however often it renews.
    pub max_slots_per_user: u32,
    /// Running disputes kept for appointments that arrive during them
    /// ([`OpenDispute`]); past it, a nearer-ending dispute takes the place
    /// of the one ending last.
    pub max_open_disputes: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_users: 1_000_000,
            max_appointments: 1_000_000,
            max_slots_per_user: 100_000,
            max_open_disputes: 100_000,
        }
    }
}

/// The redb store. Cheap to clone (an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Store {
    db: std::sync::Arc<Database>,
    limits: StoreLimits,
    /// Every locator with an appointment, in memory: the responder's test
    /// for each `Registered` event is one hash lookup, whatever the number
    /// of appointments, and only a hit reads redb. A superset of the
    /// index: a locator is added before its transaction commits (an aborted
    /// one leaves a harmless extra entry). SipHash with a random key, since
    /// users choose locators.
    locators: std::sync::Arc<std::sync::RwLock<std::collections::HashSet<Locator>>>,
    /// The kept disputes' channels and locators ([`disputes`]).
    open_ids: std::sync::Arc<disputes::OpenIds>,
    /// Jobs that appointments started, for the responder.
    started: std::sync::Arc<disputes::Started>,
    /// When [`Store::mark_scanned`] next drops disputes long over (unix seconds).
    next_prune: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_extend(v, vec![VALUE_FORMAT]).map_err(|e| Error::Corrupt {
        table: "encode",
        reason: e.to_string(),
    })
}

/// [`decode`] for a value the caller can go on without: one that does not
/// decode (a disk fault, a damaged row) is logged and passed over, so it
/// costs only itself. It once failed the transaction that read it, and
/// the responder, which retries a failed store call until it succeeds,
/// stopped for every channel (a damaged job row: before it read the feed).
fn decode_or_skip<T: for<'a> Deserialize<'a>>(table: &'static str, bytes: &[u8]) -> Option<T> {
    match decode(table, bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "a stored value does not decode; passing it over");
            None
        }
    }
}

fn decode<T: for<'a> Deserialize<'a>>(table: &'static str, bytes: &[u8]) -> Result<T> {
    let corrupt = |reason: String| Error::Corrupt { table, reason };
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => {
            let (v, rest) = postcard::take_from_bytes(body).map_err(|e| corrupt(e.to_string()))?;
            if rest.is_empty() {
                Ok(v)
            } else {
                Err(corrupt(format!("{} trailing bytes", rest.len())))
            }
        }
        Some((f, _)) => Err(corrupt(format!("unknown value format {f}"))),
        None => Err(corrupt("empty value".into())),
    }
}

fn appointment_key(user: Address, locator: Locator) -> [u8; 52] {
    let mut k = [0u8; 52];
    k[..20].copy_from_slice(user.as_slice());
    k[20..].copy_from_slice(locator.as_slice());
    k
}

/// The open tables one appointment touches.
struct Tables<'a, 't> {
    users: &'a mut redb::Table<'t, &'static [u8; 20], &'static [u8]>,
    appointments: &'a mut redb::Table<'t, &'static [u8; 52], &'static [u8]>,
    index: &'a mut redb::MultimapTable<'t, &'static [u8; 32], &'static [u8; 20]>,
}

/// One appointment of [`Store::add_appointments`]: every check comes before
/// the first write, so a refusal leaves the tables as they were.
fn add_one(
    t: &mut Tables<'_, '_>,
    new: NewAppointment,
    now: u64,
    start_block: u64,
    max_appointments: u64,
    sign: &impl Fn(&Locator, u64, &[u8]) -> Result<Vec<u8>>,
) -> Result<Added> {
    let NewAppointment {
        user,
        locator,
        seq,
        blob,
        user_signature,
    } = new;
    let mut sub: Subscription = match t.users.get(&user.0.0)? {
        Some(v) => decode("tower_users", v.value())?,
        None => return Err(Error::UnknownUser(user)),
    };
    if now > sub.expiry {
        return Err(Error::Expired {
            user,
            expiry: sub.expiry,
        });
    }
    let key = appointment_key(user, locator);
    // One that does not decode is replaced (it holds its slot and index
    // entry already): refusing its user's fresh one would leave the
    // channel unprotected for good.
    let (exists, old): (bool, Option<Appointment>) = match t.appointments.get(&key)? {
        Some(v) => (true, decode_or_skip("tower_appointments", v.value())),
        None => (false, None),
    };
    if let Some(old) = old.as_ref().filter(|o| seq <= o.seq) {
        if old.seq == seq && old.blob == blob {
            return Ok(Added {
                receipt: old.receipt.clone(),
                replaced: true,
                unchanged: true,
                subscription: sub,
            });
        }
        return Err(Error::Stale {
            locator,
            seq,
            stored: old.seq,
        });
    }
    let replaced = exists;
    if !replaced && t.appointments.len()? >= max_appointments {
        return Err(Error::TowerFull {
            what: "appointments",
            max: max_appointments,
        });
    }
    if !replaced && sub.slots_used >= sub.slots_total {
        return Err(Error::NoFreeSlot {
            user,
            slots: sub.slots_total,
        });
    }
    let tower_signature = sign(&locator, start_block, &user_signature)?;
    if !replaced {
        sub.slots_used += 1;
        t.users.insert(&user.0.0, encode(&sub)?.as_slice())?;
        t.index.insert(&locator.0, &user.0.0)?;
    }
    let receipt = Receipt {
        locator,
        start_block,
        user_signature,
        tower_signature,
    };
    let appointment = Appointment {
        seq,
        blob,
        receipt: receipt.clone(),
        status: Status::BeingWatched,
    };
    t.appointments
        .insert(&key, encode(&appointment)?.as_slice())?;
    Ok(Added {
        receipt,
        replaced,
        unchanged: false,
        subscription: sub,
    })
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let db = Database::create(path)?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut info = txn.open_table(INFO)?;
            let found = info.get(SCHEMA_KEY)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(Error::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(v) if v == SCHEMA_VERSION => {}
                // Version 1 lacks only the jobs table, created below.
                Some(_) | None => {
                    info.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                }
            }
            txn.open_table(JOBS)?;
            txn.open_table(OPEN_DISPUTES)?;
            txn.open_table(USERS)?;
            txn.open_table(APPOINTMENTS)?;
            txn.open_multimap_table(LOCATORS)?;
        }
        txn.commit()?;
        let mut locators = std::collections::HashSet::new();
        {
            let txn = db.begin_read()?;
            let index = txn.open_multimap_table(LOCATORS)?;
            for entry in redb::ReadableMultimapTable::iter(&index)? {
                let (locator, _) = entry?;
                locators.insert(Locator::from(*locator.value()));
            }
        }
        let open_ids = disputes::load_open_ids(&db)?;
        Ok(Self {
            db: std::sync::Arc::new(db),
            limits: StoreLimits::default(),
            locators: std::sync::Arc::new(std::sync::RwLock::new(locators)),
            open_ids: std::sync::Arc::new(std::sync::Mutex::new(open_ids)),
            started: std::sync::Arc::default(),
            next_prune: std::sync::Arc::default(),
        })
    }

    /// The same store with `limits` (default [`StoreLimits::default`]).
    pub fn with_limits(mut self, limits: StoreLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether any user has an appointment at `locator` (memory only; a
    /// `true` may, rarely, name a locator whose transaction failed).
    pub fn watches(&self, locator: &Locator) -> bool {
        self.locators
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(locator)
    }

    /// Registers `user`, or renews its subscription: `slots` more slots and
    /// an expiry of `expiry` (never earlier than the one it has).
    pub fn register(&self, user: Address, slots: u32, expiry: u64) -> Result<Subscription> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let sub = {
            let mut users = txn.open_table(USERS)?;
            let old: Option<Subscription> = match users.get(&user.0.0)? {
                Some(v) => Some(decode("tower_users", v.value())?),
                None => None,
            };
            let cap = self.limits.max_slots_per_user;
            let sub = match old {
                Some(o) => Subscription {
                    slots_total: o
                        .slots_total
                        .saturating_add(slots)
                        .min(cap.max(o.slots_total)),
                    slots_used: o.slots_used,
                    expiry: o.expiry.max(expiry),
                },
                None => {
                    if users.len()? >= self.limits.max_users {
                        return Err(Error::TowerFull {
                            what: "users",
                            max: self.limits.max_users,
                        });
                    }
                    Subscription {
                        slots_total: slots.min(cap),
                        slots_used: 0,
                        expiry,
                    }
                }
            };
            users.insert(&user.0.0, encode(&sub)?.as_slice())?;
            sub
        };
        txn.commit()?;
        Ok(sub)
    }

    /// The subscription of `user`, if it registered.
    pub fn subscription(&self, user: Address) -> Result<Option<Subscription>> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        match users.get(&user.0.0)? {
            Some(v) => Ok(Some(decode("tower_users", v.value())?)),
            None => Ok(None),
        }
    }

    /// Stores an appointment durably and returns its receipt.
    ///
    /// Refuses an unknown user ([`Error::UnknownUser`]), an expired
    /// subscription at unix time `now` ([`Error::Expired`]) and a full one
    /// ([`Error::NoFreeSlot`]). The same user and locator again with a higher
    /// `seq` replaces the older appointment and takes no slot; a lower or
    /// equal `seq` is [`Error::Stale`], except the very same request again
    /// (same `seq` and blob: a client retrying a lost answer), which gets the
    /// stored receipt and changes nothing. `sign` makes the receipt's tower
    /// signature from the start block (the cursor); it runs inside the write
    /// transaction, so a receipt exists only for what is committed.
    pub fn add_appointment(
        &self,
        new: NewAppointment,
        now: u64,
        sign: impl Fn(&Locator, u64, &[u8]) -> Result<Vec<u8>>,
    ) -> Result<Added> {
        self.add_appointments(vec![new], now, sign)?
            .pop()
            .unwrap_or(Err(Error::Corrupt {
                table: "tower_appointments",
                reason: "a batch of one gave no result".into(),
            }))
    }

    /// Stores a batch of appointments in one durable transaction (group
    /// commit: one `fsync` for the batch) and returns one result per
    /// appointment, in order, each as [`add_appointment`](Self::add_appointment)
    /// would give it. A refused appointment changes nothing and does not
    /// affect the others; later ones see the earlier ones' changes (the same
    /// locator twice in a batch is a replacement). An error of the store
    /// itself fails the whole batch: nothing of it is stored.
    pub fn add_appointments(
        &self,
        batch: Vec<NewAppointment>,
        now: u64,
        sign: impl Fn(&Locator, u64, &[u8]) -> Result<Vec<u8>>,
    ) -> Result<Vec<Result<Added>>> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let (results, stored) = {
            let mut users = txn.open_table(USERS)?;
            let mut appointments = txn.open_table(APPOINTMENTS)?;
            let mut index = txn.open_multimap_table(LOCATORS)?;
            let start_block = txn
                .open_table(INFO)?
                .get(CURSOR_KEY)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut tables = Tables {
                users: &mut users,
                appointments: &mut appointments,
                index: &mut index,
            };
            let mut results = Vec::with_capacity(batch.len());
            let mut stored = Vec::new();
            for new in batch {
                let (user, locator) = (new.user, new.locator);
                let r = add_one(
                    &mut tables,
                    new,
                    now,
                    start_block,
                    self.limits.max_appointments,
                    &sign,
                );
                if let Ok(added) = &r {
                    // Before the commit: the set stays a superset of the index.
                    self.locators
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(added.receipt.locator);
                }
                // A retry of what is stored changes nothing and starts nothing.
                if r.as_ref().is_ok_and(|a| !a.unchanged) {
                    stored.push((user, locator));
                }
                // A store error leaves the transaction in an unknown state:
                // give up the whole batch (dropping `txn` aborts it).
                if let Err(e @ (Error::Store(_) | Error::Corrupt { .. })) = r {
                    return Err(e);
                }
                results.push(r);
            }
            (results, stored)
        };
        // An appointment at a running dispute's locator starts its job.
        let started = disputes::start_for_new_appointments(&txn, &stored)?;
        txn.commit()?;
        self.started.push(started);
        Ok(results)
    }

    /// The appointment of `user` at `locator`.
    pub fn appointment(&self, user: Address, locator: Locator) -> Result<Option<Appointment>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(APPOINTMENTS)?;
        // A damaged one is none: its user is told to send it again, which
        // replaces it.
        Ok(t.get(&appointment_key(user, locator))?
            .and_then(|v| decode_or_skip("tower_appointments", v.value())))
    }

    /// Every user with an appointment at `locator` (one index lookup).
    pub fn users_for(&self, locator: Locator) -> Result<Vec<Address>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_multimap_table(LOCATORS)?;
        let mut out = Vec::new();
        for v in t.get(&locator.0)? {
            out.push(Address::from(*v?.value()));
        }
        Ok(out)
    }

    /// Calls `f` with each appointment at `locator` in one read transaction,
    /// one at a time (the responder opens them without holding them all);
    /// returns every user holding one.
    pub fn each_at(
        &self,
        locator: Locator,
        mut f: impl FnMut(Address, Appointment) -> Result<()>,
    ) -> Result<Vec<Address>> {
        let txn = self.db.begin_read()?;
        let index = txn.open_multimap_table(LOCATORS)?;
        let t = txn.open_table(APPOINTMENTS)?;
        let mut users = Vec::new();
        for v in index.get(&locator.0)? {
            let user = Address::from(*v?.value());
            users.push(user);
            let found = t.get(&appointment_key(user, locator))?;
            if let Some(a) = found.and_then(|a| decode_or_skip("tower_appointments", a.value())) {
                f(user, a)?;
            }
        }
        Ok(users)
    }

    /// Sets the status of an appointment (the responder's bookkeeping);
    /// `false` if there is none.
    pub fn set_status(&self, user: Address, locator: Locator, status: Status) -> Result<bool> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let found = {
            let mut t = txn.open_table(APPOINTMENTS)?;
            let key = appointment_key(user, locator);
            let old: Option<Appointment> = match t.get(&key)? {
                Some(v) => Some(decode("tower_appointments", v.value())?),
                None => None,
            };
            match old {
                Some(mut a) => {
                    a.status = status;
                    t.insert(&key, encode(&a)?.as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    /// The last block the chain side scanned (0 before the first scan).
    pub fn cursor(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INFO)?;
        Ok(t.get(CURSOR_KEY)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Stores the last scanned block, durably.
    pub fn set_cursor(&self, block: u64) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(INFO)?.insert(CURSOR_KEY, block)?;
        txn.commit()?;
        Ok(())
    }

    /// Lowers the cursor to `block` if it is above (a reorg made the feed
    /// scan again from `block + 1`).
    pub fn rewind_cursor(&self, block: u64) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut t = txn.open_table(INFO)?;
            let cur = t.get(CURSOR_KEY)?.map(|v| v.value()).unwrap_or(0);
            if cur > block {
                t.insert(CURSOR_KEY, block)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records a `Registered` event for `job.channel` in one transaction: a
    /// new job (its appointments of `users` become
    /// [`Status::DisputeTriggered`]), or for a known job the newer of its
    /// registered states; a [`JobPhase::Done`] job starts again (the chain
    /// decides whether anything is left to do).
    pub fn start_job(&self, job: &Job, users: &[Address]) -> Result<JobStart> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let start = {
            let mut jobs = txn.open_table(JOBS)?;
            let mut t = txn.open_table(APPOINTMENTS)?;
            start_job_in(&mut jobs, &mut t, job, users, false)?
        };
        txn.commit()?;
        Ok(start)
    }

    /// The job of `channel`, if there is one.
    pub fn job(&self, channel: ChannelId) -> Result<Option<Job>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        // One damaged in its head is no job: the next event or appointment
        // at its channel writes a new one (`start_job_in`).
        Ok(t.get(&channel.0)?.and_then(|v| decode_job(v.value())))
    }

    /// Changes the job of `channel` with `f` in one durable transaction and
    /// returns it as stored (`None`: no such job).
    pub fn update_job(&self, channel: ChannelId, f: impl FnOnce(&mut Job)) -> Result<Option<Job>> {
        self.change_job(channel, None, f)
    }

    /// Ends the job of `channel` ([`JobPhase::Done`], after `f`) and sets
    /// the appointments of `users` at its locator to `status`, in one
    /// durable transaction.
    pub fn finish_job(
        &self,
        channel: ChannelId,
        users: &[Address],
        status: Status,
        f: impl FnOnce(&mut Job),
    ) -> Result<Option<Job>> {
        self.change_job(channel, Some((users, status)), |j| {
            f(j);
            j.phase = JobPhase::Done;
        })
    }

    /// [`finish_job`](Self::finish_job) for a job that found nothing to
    /// send in the appointments `read` (user, `seq`), over the appointments
    /// at its locator now, in one transaction, unless one was stored since
    /// (it joined the running job): then nothing changes and `false` comes
    /// back, so the job looks again rather than end with it unread.
    pub fn finish_job_unless_joined(
        &self,
        channel: ChannelId,
        read: &[(Address, u64)],
        status: Status,
    ) -> Result<bool> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut jobs = txn.open_table(JOBS)?;
            let mut job: Job = match jobs.get(&channel.0)? {
                Some(v) => match decode_job(v.value()) {
                    Some(job) => job,
                    None => return Ok(true),
                },
                None => return Ok(true),
            };
            let index = txn.open_multimap_table(LOCATORS)?;
            let mut t = txn.open_table(APPOINTMENTS)?;
            let read: std::collections::HashSet<(Address, u64)> = read.iter().copied().collect();
            let mut users = Vec::new();
            for u in redb::ReadableMultimapTable::get(&index, &job.locator.0)? {
                let user = Address::from(*u?.value());
                // The sequence number only (the first field), not the blob.
                let seq = match t.get(&appointment_key(user, job.locator))? {
                    Some(v) => decode_head::<u64>(v.value()),
                    None => continue,
                };
                let Some(seq) = seq else {
                    // Does not decode: nothing new can come of it.
                    users.push(user);
                    continue;
                };
                if !read.contains(&(user, seq)) {
                    return Ok(false);
                }
                users.push(user);
            }
            job.phase = JobPhase::Done;
            jobs.insert(&channel.0, encode(&job)?.as_slice())?;
            set_statuses(&mut t, &users, job.locator, status)?;
        }
        txn.commit()?;
        Ok(true)
    }

    fn change_job(
        &self,
        channel: ChannelId,
        statuses: Option<(&[Address], Status)>,
        f: impl FnOnce(&mut Job),
    ) -> Result<Option<Job>> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let job = {
            let mut jobs = txn.open_table(JOBS)?;
            let found = jobs.get(&channel.0)?;
            let Some(mut job) = found.and_then(|v| decode_job(v.value())) else {
                return Ok(None);
            };
            f(&mut job);
            jobs.insert(&channel.0, encode(&job)?.as_slice())?;
            if let Some((users, status)) = statuses {
                let mut t = txn.open_table(APPOINTMENTS)?;
                set_statuses(&mut t, users, job.locator, status)?;
            }
            job
        };
        txn.commit()?;
        Ok(Some(job))
    }

    /// Every job not [`JobPhase::Done`]: what a restarted responder resumes.
    pub fn unfinished_jobs(&self) -> Result<Vec<Job>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            if let Some(job) = decode_job(v.value())
                && job.phase != JobPhase::Done
            {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Drops users whose subscription expired before unix time
    /// `expired_before`, with their appointments: the tower's room is given
    /// back (registration is free, so abandoned junk could otherwise fill
    /// it for good). An appointment in a running dispute
    /// ([`Status::DisputeTriggered`]) stays, and so does its user: the
    /// responder works with it.
    ///
    /// One call is one write transaction, bounded twice, so it never holds
    /// the tower's single writer long: it looks at up to `users` users
    /// after `after` (in address order; `None`: from the first) and drops
    /// up to `appointments` appointments (a user holding more is dropped
    /// over several calls). Go on with [`Reclaimed::next`] until
    /// [`Reclaimed::done`].
    ///
    /// Reads only each appointment's status, not its blob. A value that
    /// does not decode keeps its user (counted in
    /// [`Reclaimed::undecodable`]) rather than stop every later pass at it.
    /// The in-memory locator set ([`Store::watches`]) stays a superset: a
    /// reclaimed locator leaves it at the next open (removing it here could
    /// race a new appointment at the same locator).
    pub fn reclaim(
        &self,
        expired_before: u64,
        after: Option<Address>,
        users: usize,
        appointments: usize,
    ) -> Result<Reclaimed> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut out = Reclaimed {
            next: after,
            ..Reclaimed::default()
        };
        {
            let mut user_table = txn.open_table(USERS)?;
            let mut table = txn.open_table(APPOINTMENTS)?;
            let mut index = txn.open_multimap_table(LOCATORS)?;
            // The users to look at, and whether each expired.
            let mut looked = Vec::new();
            {
                let from = after.map(|a| a.0.0);
                let range = match &from {
                    Some(k) => user_table.range::<&[u8; 20]>((
                        std::ops::Bound::Excluded(k),
                        std::ops::Bound::Unbounded,
                    ))?,
                    None => user_table.range::<&[u8; 20]>(..)?,
                };
                out.done = true;
                for entry in range {
                    if looked.len() >= users.max(1) {
                        out.done = false;
                        break;
                    }
                    let (k, v) = entry?;
                    let user = Address::from(*k.value());
                    let expired = match decode::<Subscription>("tower_users", v.value()) {
                        Ok(sub) => Some(sub.expiry < expired_before),
                        Err(_) => None,
                    };
                    looked.push((user, expired));
                }
            }
            let mut budget = appointments.max(1);
            for (user, expired) in looked {
                match expired {
                    Some(true) => {}
                    Some(false) => {
                        out.next = Some(user);
                        continue;
                    }
                    None => {
                        out.undecodable += 1;
                        out.next = Some(user);
                        continue;
                    }
                }
                // Up to `budget` of its appointments that may go; whether
                // any must stay, and whether more are left.
                let lo = appointment_key(user, Locator::ZERO);
                let hi = appointment_key(user, Locator::repeat_byte(0xff));
                let (mut drop, mut keep, mut more) = (Vec::new(), false, false);
                for entry in table.range::<&[u8; 52]>(&lo..=&hi)? {
                    let (k, v) = entry?;
                    match status_of(v.value()) {
                        Some(Status::DisputeTriggered) => keep = true,
                        Some(_) if drop.len() < budget => drop.push(*k.value()),
                        Some(_) => {
                            more = true;
                            break;
                        }
                        None => {
                            out.undecodable += 1;
                            keep = true;
                        }
                    }
                }
                for key in &drop {
                    table.remove(key)?;
                    let mut locator = [0u8; 32];
                    locator.copy_from_slice(&key[20..]);
                    index.remove(&locator, &user.0.0)?;
                }
                budget -= drop.len();
                out.appointments += drop.len() as u64;
                if (more || keep) && !drop.is_empty() {
                    // It stays, for now or for good: its slots are given back.
                    let sub = match user_table.get(&user.0.0)? {
                        Some(v) => decode::<Subscription>("tower_users", v.value()).ok(),
                        None => None,
                    };
                    if let Some(mut sub) = sub {
                        let freed = u32::try_from(drop.len()).unwrap_or(u32::MAX);
                        sub.slots_used = sub.slots_used.saturating_sub(freed);
                        user_table.insert(&user.0.0, encode(&sub)?.as_slice())?;
                    }
                }
                if more {
                    // Not finished with this user: the next call starts at it.
                    out.done = false;
                    break;
                }
                if !keep {
                    user_table.remove(&user.0.0)?;
                    out.users += 1;
                }
                out.next = Some(user);
            }
        }
        txn.commit()?;
        Ok(out)
    }

    /// How many users and appointments are stored.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?.len()?;
        let appointments = txn.open_table(APPOINTMENTS)?.len()?;
        Ok((users, appointments))
    }
}

/// Sets the status of the appointments of `users` at `locator` (missing ones
/// are skipped: a user may have none any more).
fn set_statuses(
    t: &mut redb::Table<'_, &'static [u8; 52], &'static [u8]>,
    users: &[Address],
    locator: Locator,
    status: Status,
) -> Result<()> {
    for user in users {
        let key = appointment_key(*user, locator);
        let found = t.get(&key)?;
        // One with that status already is not rewritten (blob and all).
        if found.as_ref().and_then(|v| status_of(v.value())) == Some(status) {
            continue;
        }
        let old: Option<Appointment> =
            found.and_then(|v| decode_or_skip("tower_appointments", v.value()));
        if let Some(mut a) = old {
            a.status = status;
            t.insert(&key, encode(&a)?.as_slice())?;
        }
    }
    Ok(())
}

/// [`Store::start_job`] inside a write transaction. The appointments of
/// `users` become [`Status::DisputeTriggered`] when the job is new or
/// reopened, or always with `mark_always` (a new appointment joining a
/// running job; a `Registered` for a running job leaves them, as they are
/// marked already and there may be many).
fn start_job_in(
    jobs: &mut redb::Table<'_, &'static [u8; 32], &'static [u8]>,
    appointments: &mut redb::Table<'_, &'static [u8; 52], &'static [u8]>,
    job: &Job,
    users: &[Address],
    mark_always: bool,
) -> Result<JobStart> {
    // A record damaged in its head is replaced, as if there were none.
    let (unchanged, old) = {
        let found = jobs.get(&job.channel.0)?;
        // A running job that this changes nothing of is not decoded whole: its
        // record ends with every refusal at its locator (anyone may add junk
        // there once the dispute is public), and each appointment joining the
        // job comes here, in the one writer (a review measured 5.4 s for 256
        // appointments at 100,000 refusals).
        let unchanged = found
            .as_ref()
            .and_then(|v| decode_head::<JobHead>(v.value()))
            .is_some_and(|h| {
                h.phase != JobPhase::Done
                    && !registered_newer(h.registered.as_ref(), job.registered.as_ref())
            });
        let old: Option<Job> = if unchanged {
            None
        } else {
            found.and_then(|v| decode_job(v.value()))
        };
        (unchanged, old)
    };
    let (stored, start) = match old {
        None if unchanged => (None, JobStart::Running),
        None => (Some(job.clone()), JobStart::New),
        Some(mut old) => {
            let newer = registered_newer(old.registered.as_ref(), job.registered.as_ref());
            if newer {
                old.registered.clone_from(&job.registered);
            }
            if old.phase == JobPhase::Done {
                old.phase = JobPhase::Triggered;
                (Some(old), JobStart::Reopened)
            } else {
                // Rewritten only if it changed: a running job's record holds
                // every refusal at its locator, and appointments joining it
                // must not copy that each time.
                (newer.then_some(old), JobStart::Running)
            }
        }
    };
    if let Some(stored) = stored {
        jobs.insert(&job.channel.0, encode(&stored)?.as_slice())?;
    }
    if mark_always || start != JobStart::Running {
        set_statuses(appointments, users, job.locator, Status::DisputeTriggered)?;
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_head_reads_a_whole_job_records_phase_and_state() {
        let job = Job {
            channel: ChannelId::repeat_byte(1),
            nonce: U256::from(7u64),
            locator: Locator::repeat_byte(2),
            phase: JobPhase::Refuting { version: 9 },
            registered: None,
            refuted: Some(3),
            concluded: true,
            refused: vec![(Address::repeat_byte(4), Refusal::Decrypt); 3],
        };
        let head: JobHead = decode_head(&encode(&job).unwrap()).unwrap();
        assert_eq!(head.phase, job.phase);
        assert_eq!(head.registered, None);
        assert!(decode_head::<JobHead>(&[VALUE_FORMAT, 1, 2]).is_none());
    }
}
