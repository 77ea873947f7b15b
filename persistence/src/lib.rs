//! Durable storage of channel states.
//!
//! Not built yet. This crate will own the `Persister` trait and its
//! durability contract (`Ok` means the data survives `kill -9` and power
//! loss), the `MemoryPersister` for fast tests and the `RedbPersister`
//! embedded default.
