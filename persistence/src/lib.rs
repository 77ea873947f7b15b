//! Durable storage of channel states.
//!
//! A channel's funds are only as safe as its latest fully signed state: a
//! participant who loses it cannot refute an older state registered
//! on-chain. This crate stores that state (and everything else needed to
//! rebuild a channel after a restart) so that it survives `kill -9` and
//! power loss, and hands it back only after re-checking it, because bytes
//! read from disk are not trusted.
//!
//! # Layout
//! - [`persister`]: the [`Persister`] trait and its durability contract.
//! - [`record`]: [`ChannelRecord`] (what is stored per channel), [`Change`]
//!   and the rules both stores apply to them.
//! - [`memory`]: [`MemoryPersister`], the contract without a disk, for tests.
//! - [`redb_store`]: [`RedbPersister`], the embedded default: one redb file,
//!   a writer thread and group commit.
//! - `cpu_busy`: whether the machine's CPUs are all busy, which decides
//!   whether the writer thread waits for a fuller batch.
//! - `wal`: the write-ahead log that makes a batch durable with one small
//!   write instead of a durable redb commit; replayed on open.
//! - [`tower`]: [`TowerRecord`], the client's watchtower receipts and
//!   appointment counter, kept in a channel's metadata.
//! - [`chain_index`]: [`ChainIndexRecord`], the client's chain index (its
//!   cursor and findings), kept in the store's metadata slot
//!   ([`Persister::meta_get`] / [`Persister::meta_put`]).
//! - [`codec`]: the versioned, checksummed encoding of records on disk.
//! - [`error`]: the crate's one error enum.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use perun_channel::{Address, Allocation, Asset, Domain, Params, Phase, SignedState, State, U256};
//! use perun_persistence::{ChannelRecord, MemoryPersister, Persister};
//! use perun_wallet::{Account, LocalAccount};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
//! let domain = Domain { chain_id: U256::from(31337), adjudicator: Address::repeat_byte(0xad) };
//! let funding = vec![vec![U256::from(10), U256::from(10)]];
//! let params = Params::payment(domain, 60, U256::from(1), vec![alice.address(), bob.address()], funding.clone());
//! let asset = Asset { chainId: U256::from(31337), holder: Address::repeat_byte(0xaa) };
//! let alloc = Allocation::new(vec![asset], funding);
//! let mut initial = SignedState::new(State::initial(&params, alloc));
//! initial.sign(&params, 0, &alice)?;
//!
//! let store: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
//! let record = ChannelRecord {
//!     params: params.clone(),
//!     index: 0,
//!     phase: Phase::Signing0,
//!     current: None,
//!     staged: Some(initial.clone()),
//!     peers: vec![b"alice-peer".to_vec(), b"bob-peer".to_vec()],
//!     metadata: Vec::new(),
//!     burnt: 0,
//! };
//! let id = record.id();
//! store.channel_created(&record).await?;
//!
//! // Bob's signature arrives: persist the fully signed state and the new phase at once.
//! initial.sign(&params, 1, &bob)?;
//! store.update(id, vec![
//!     perun_persistence::Change::Committed(initial.clone()),
//!     perun_persistence::Change::Phase(Phase::Funding),
//! ]).await?;
//!
//! // After a restart: every record comes back validated, ready for Machine::restore.
//! let restored = store.load_all().await?;
//! let machine = restored[0].to_machine()?;
//! assert_eq!(machine.current(), Some(&initial));
//! assert_eq!(machine.staged(), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

pub mod chain_index;
pub mod codec;
mod cpu_busy;
pub mod error;
pub mod memory;
pub mod persister;
pub mod record;
pub mod redb_store;
pub mod tower;
mod wal;

pub use chain_index::{ChainIndexRecord, FactKind, IndexedFact};
pub use error::{Error, RecordDefect, Result};
pub use memory::MemoryPersister;
pub use persister::{MAX_META_KEY_LEN, MAX_META_VALUE_LEN, Persister};
pub use record::{Change, ChannelRecord, MAX_METADATA_LEN, MAX_PEER_ID_LEN};
pub use redb_store::{
    BATCH_WAIT_FROM, BatchWait, MAX_BATCH_WAIT, RedbOptions, RedbPersister, RedbStats,
    SCHEMA_VERSION,
};
pub use tower::{TowerReceipt, TowerRecord};
