//! [`MemoryPersister`]: the contract's semantics without a disk, for tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use perun_channel::ChannelId;
use tracing::{debug, warn};

use crate::{Change, ChannelRecord, Error, Persister, Result};

/// Keeps every record in process memory.
///
/// It applies exactly the rules of [`RedbPersister`](crate::RedbPersister)
/// (the conformance suite runs against both), but "durable" here means
/// "until the value is dropped": use it where a test does not restart the
/// process. Share one through an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryPersister {
    channels: Mutex<BTreeMap<ChannelId, ChannelRecord>>,
    /// The metadata slot ([`Persister::meta_put`]).
    meta: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryPersister {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ChannelId, ChannelRecord>> {
        // A panic while holding the lock cannot leave a half-applied record:
        // every write replaces a whole record computed beforehand.
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn meta_lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // Every write replaces a whole value.
        self.meta
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Persister for MemoryPersister {
    async fn channel_created(&self, ch: &ChannelRecord) -> Result<()> {
        let id = ch.id();
        ch.validate()
            .inspect_err(|e| warn!(channel = %id, error = %e, "persistence: record rejected"))?;
        let mut channels = self.lock();
        match channels.get(&id) {
            Some(existing) if existing == ch => Ok(()),
            Some(_) => Err(Error::AlreadyExists(id)),
            None => {
                channels.insert(id, ch.clone());
                debug!(channel = %id, "persistence: channel created");
                Ok(())
            }
        }
    }

    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> Result<()> {
        let mut channels = self.lock();
        let rec = channels.get_mut(&id).ok_or(Error::UnknownChannel(id))?;
        rec.apply_all(id, changes)?;
        Ok(())
    }

    async fn channel_removed(&self, id: ChannelId) -> Result<()> {
        self.lock()
            .remove(&id)
            .map(|_| ())
            .ok_or(Error::UnknownChannel(id))
    }

    async fn channel_ids(&self) -> Result<Vec<ChannelId>> {
        Ok(self.lock().keys().copied().collect())
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ChannelRecord>> {
        Ok(self.lock().get(&id).cloned())
    }

    async fn load_all(&self) -> Result<Vec<ChannelRecord>> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta_lock().get(key).cloned())
    }

    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        crate::persister::check_meta(key, value)?;
        self.meta_lock().insert(key.to_owned(), value.to_vec());
        Ok(())
    }
}
