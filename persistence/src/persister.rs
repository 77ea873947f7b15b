//! The [`Persister`] trait and its durability contract.

use async_trait::async_trait;
use perun_channel::{ChannelId, Phase, SignedState};

use crate::{Change, ChannelRecord, Result};

/// The longest key [`Persister::meta_put`] takes, in bytes.
pub const MAX_META_KEY_LEN: usize = 256;
/// The largest value [`Persister::meta_put`] takes, in bytes (a chain
/// index of tens of thousands of channels fits).
pub const MAX_META_VALUE_LEN: usize = 32 * 1024 * 1024;

/// Durable storage of channels, shared by all channel tasks as
/// `Arc<dyn Persister>`.
///
/// # Durability contract
///
/// When a writing method returns `Ok`, the data it was given survives
/// `kill -9` of the process and a power loss of the machine (to the extent
/// the disk honours `fsync`): a later [`load_all`](Self::load_all), in this
/// process or after a restart, returns it. A write is atomic: after a crash
/// the store holds either the whole write or none of it, never a torn or
/// mixed record. When a writing method returns `Err`, the caller must
/// assume nothing was persisted; for a *rejection*
/// ([`Error::is_rejection`](crate::Error::is_rejection)) it is guaranteed
/// that nothing changed.
///
/// The client's rules that rest on this (DESIGN §7): persist a state before
/// sending a signature on it; persist the fully signed state before
/// `update()` returns or a handler is told the update is done.
///
/// # Semantics
///
/// - Every method except [`channel_created`](Self::channel_created) and the
///   loaders fails with [`Error::UnknownChannel`](crate::Error::UnknownChannel)
///   for a channel that is not stored, and changes nothing.
/// - Every write is idempotent: repeating a call that returned `Ok` (for
///   example after a timeout, not knowing whether it landed) returns `Ok`
///   and leaves the store as the first call did. The one exception is
///   [`channel_removed`](Self::channel_removed), whose repetition reports
///   `UnknownChannel`: the channel is gone either way.
/// - The store never rolls a channel back: a fully signed state older than
///   the stored one, or a different one with the same version, is refused.
/// - States are checked for shape on write (valid for the channel's params,
///   one signature slot per participant); every signature is verified when
///   a record is loaded, so a record damaged on disk is reported as an
///   error naming the channel, never returned.
/// - Calls from many tasks may run concurrently. Calls on different
///   channels are independent; concurrent calls on one channel are applied
///   one after the other in some order, each seeing the previous one's
///   result (the client keeps one update in flight per channel anyway).
/// - A call whose future is dropped before it completes may or may not
///   have been persisted; the store is consistent either way.
#[async_trait]
pub trait Persister: Send + Sync {
    /// Stores a new channel. Validates the whole record first
    /// ([`ChannelRecord::validate`]). Storing an identical record again is
    /// `Ok`; a different record for an existing id is
    /// [`Error::AlreadyExists`](crate::Error::AlreadyExists).
    async fn channel_created(&self, ch: &ChannelRecord) -> Result<()>;

    /// Applies `changes` to one channel in order, atomically: all of them
    /// become durable together, or (on error) none does. This lets the
    /// client persist a state and the phase it moves to in one write.
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> Result<()>;

    /// Stores a partially signed state under signature, replacing any
    /// staged state. Its version must be newer than the current state's
    /// ([`Error::StaleVersion`](crate::Error::StaleVersion) otherwise).
    async fn state_staged(&self, id: ChannelId, st: &SignedState) -> Result<()> {
        self.update(id, vec![Change::Staged(st.clone())]).await
    }

    /// Stores a fully signed state as the channel's current state and clears
    /// a staged state of the same or a lower version. A state with a missing
    /// signature slot is refused; so is one older than the stored current
    /// state, or a different one with the same version
    /// ([`Error::VersionConflict`](crate::Error::VersionConflict)).
    async fn state_committed(&self, id: ChannelId, st: &SignedState) -> Result<()> {
        self.update(id, vec![Change::Committed(st.clone())]).await
    }

    /// Drops the staged state, if any (the update was rejected or timed
    /// out).
    async fn staged_discarded(&self, id: ChannelId) -> Result<()> {
        self.update(id, vec![Change::DiscardStaged]).await
    }

    /// Records the channel's new phase. The store does not judge the
    /// transition: the machine already did.
    async fn phase_changed(&self, id: ChannelId, phase: Phase) -> Result<()> {
        self.update(id, vec![Change::Phase(phase)]).await
    }

    /// Deletes the channel and everything stored for it.
    async fn channel_removed(&self, id: ChannelId) -> Result<()>;

    /// The ids of every stored channel, in ascending order, without
    /// decoding their records.
    async fn channel_ids(&self) -> Result<Vec<ChannelId>>;

    /// One channel's record, validated, or `None` if it is not stored.
    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>>;

    /// Every stored channel, validated, in ascending id order.
    ///
    /// Fails as a whole if any record is damaged, naming the channel
    /// ([`Error::Corrupt`](crate::Error::Corrupt) or
    /// [`Error::InvalidRecord`](crate::Error::InvalidRecord)): nothing is
    /// skipped silently. A caller that wants to restore the other channels
    /// anyway can walk [`channel_ids`](Self::channel_ids) with
    /// [`load`](Self::load).
    async fn load_all(&self) -> Result<Vec<ChannelRecord>>;

    /// The value last stored under `key` in the store's metadata slot,
    /// `None` if none was. The slot holds what belongs to no channel (the
    /// client's chain index: its cursor and findings) and outlives every
    /// channel. Values are the caller's bytes, returned as stored: a caller
    /// that cannot trust the disk checksums its own encoding.
    ///
    /// The default (a store without a slot) fails with
    /// [`Error::MetaUnsupported`](crate::Error::MetaUnsupported).
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let _ = key;
        Err(crate::Error::MetaUnsupported)
    }

    /// Replaces the value under `key` with the durability contract of every
    /// write: atomic (the old value or the new one after a crash, never a
    /// mix) and durable once `Ok`; idempotent. A key longer than
    /// [`MAX_META_KEY_LEN`] or a value longer than [`MAX_META_VALUE_LEN`]
    /// is refused with [`Error::MetaTooLarge`](crate::Error::MetaTooLarge) and changes nothing.
    ///
    /// The default (a store without a slot) fails with
    /// [`Error::MetaUnsupported`](crate::Error::MetaUnsupported).
    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        let _ = (key, value);
        Err(crate::Error::MetaUnsupported)
    }
}

/// Refuses a key or value over the metadata limits (both stores apply it).
pub(crate) fn check_meta(key: &str, value: &[u8]) -> Result<()> {
    let too_large = |len, max| crate::Error::MetaTooLarge {
        key: key.chars().take(64).collect(),
        len,
        max,
    };
    if key.len() > MAX_META_KEY_LEN {
        return Err(too_large(key.len(), MAX_META_KEY_LEN));
    }
    if value.len() > MAX_META_VALUE_LEN {
        return Err(too_large(value.len(), MAX_META_VALUE_LEN));
    }
    Ok(())
}
