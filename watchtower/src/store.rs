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
//! Calls are blocking (redb and `fsync`); async callers run them on
//! `tokio::task::spawn_blocking`.

use std::path::Path;

use alloy_primitives::Address;
use redb::{
    Database, Durability, MultimapTableDefinition, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::scheme::Locator;
use crate::{Error, Result};

/// The schema version this build writes and the newest it opens.
pub const SCHEMA_VERSION: u64 = 1;
const VALUE_FORMAT: u8 = 1;

const INFO: TableDefinition<&str, u64> = TableDefinition::new("tower_info");
const USERS: TableDefinition<&[u8; 20], &[u8]> = TableDefinition::new("tower_users");
const APPOINTMENTS: TableDefinition<&[u8; 52], &[u8]> = TableDefinition::new("tower_appointments");
const LOCATORS: MultimapTableDefinition<&[u8; 32], &[u8; 20]> =
    MultimapTableDefinition::new("tower_locators");
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
    /// The tower watches from this block on.
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
    /// The subscription after the change.
    pub subscription: Subscription,
}

/// The redb store. Cheap to clone (an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Store {
    db: std::sync::Arc<Database>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_extend(v, vec![VALUE_FORMAT]).map_err(|e| Error::Corrupt {
        table: "encode",
        reason: e.to_string(),
    })
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
                Some(_) => {}
                None => {
                    info.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                }
            }
            txn.open_table(USERS)?;
            txn.open_table(APPOINTMENTS)?;
            txn.open_multimap_table(LOCATORS)?;
        }
        txn.commit()?;
        Ok(Self {
            db: std::sync::Arc::new(db),
        })
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
            let sub = match old {
                Some(o) => Subscription {
                    slots_total: o.slots_total.saturating_add(slots),
                    slots_used: o.slots_used,
                    expiry: o.expiry.max(expiry),
                },
                None => Subscription {
                    slots_total: slots,
                    slots_used: 0,
                    expiry,
                },
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
        sign: impl FnOnce(&Locator, u64, &[u8]) -> Result<Vec<u8>>,
    ) -> Result<Added> {
        let NewAppointment {
            user,
            locator,
            seq,
            blob,
            user_signature,
        } = new;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let added = {
            let mut users = txn.open_table(USERS)?;
            let mut sub: Subscription = match users.get(&user.0.0)? {
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
            let mut appointments = txn.open_table(APPOINTMENTS)?;
            let old: Option<Appointment> = match appointments.get(&key)? {
                Some(v) => Some(decode("tower_appointments", v.value())?),
                None => None,
            };
            if let Some(old) = old.as_ref().filter(|o| seq <= o.seq) {
                if old.seq == seq && old.blob == blob {
                    return Ok(Added {
                        receipt: old.receipt.clone(),
                        replaced: true,
                        subscription: sub,
                    });
                }
                return Err(Error::Stale {
                    locator,
                    seq,
                    stored: old.seq,
                });
            }
            let replaced = old.is_some();
            if !replaced {
                if sub.slots_used >= sub.slots_total {
                    return Err(Error::NoFreeSlot {
                        user,
                        slots: sub.slots_total,
                    });
                }
                sub.slots_used += 1;
                users.insert(&user.0.0, encode(&sub)?.as_slice())?;
                let mut index = txn.open_multimap_table(LOCATORS)?;
                index.insert(&locator.0, &user.0.0)?;
            }
            let start_block = txn
                .open_table(INFO)?
                .get(CURSOR_KEY)?
                .map(|v| v.value())
                .unwrap_or(0);
            let tower_signature = sign(&locator, start_block, &user_signature)?;
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
            appointments.insert(&key, encode(&appointment)?.as_slice())?;
            Added {
                receipt,
                replaced,
                subscription: sub,
            }
        };
        txn.commit()?;
        Ok(added)
    }

    /// The appointment of `user` at `locator`.
    pub fn appointment(&self, user: Address, locator: Locator) -> Result<Option<Appointment>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(APPOINTMENTS)?;
        match t.get(&appointment_key(user, locator))? {
            Some(v) => Ok(Some(decode("tower_appointments", v.value())?)),
            None => Ok(None),
        }
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

    /// How many users and appointments are stored.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?.len()?;
        let appointments = txn.open_table(APPOINTMENTS)?.len()?;
        Ok((users, appointments))
    }
}
