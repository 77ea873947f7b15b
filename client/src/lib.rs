//! The perun client: opens channels with peers, updates them off-chain and
//! settles them on-chain.
//!
//! # Layout
//! Three layers; each module uses only the ones below it.
//!
//! - **Public handles:** [`client`] ([`Client`], [`ClientBuilder`]),
//!   [`channel`] ([`Channel`]), with [`handler`] (the application's
//!   [`ProposalHandler`] / [`UpdateHandler`] and ready-made ones),
//!   [`tower`] ([`TowerConfig`], [`AppointmentPolicy`], [`TowerStatus`]:
//!   appointments with watchtowers, sent by a background task per channel),
//!   [`payments`] ([`Payments`]: reserve, send and expect payments over the
//!   channels with a peer; built from a `Client`),
//!   [`recover`] ([`ChainIndex`]: this account's channels and credits
//!   rebuilt from the chain's logs, and `recover_funds`).
//! - **Protocols:** [`open`] (the multi-party proposal protocol), `update`
//!   (the proposer signs last, so a lost conflict never costs a signature),
//!   `sync` (after a restore, and with every peer that may disagree with us:
//!   resync on reconnect), `watcher` (the supervised per-channel dispute
//!   watcher: refute, conclude, withdraw, with retries), `settle`
//!   (cooperative close, or on-chain through the watcher), `restore` and
//!   `dispatch` (incoming requests to their protocol).
//! - **Shared core:** `core` (the client's shared parts, each channel's
//!   core and its locked machine), `apps` (the app rules by contract address), `deliver` (commits and aborts to peers),
//!   [`event`], [`config`] ([`Timeouts`], [`Limits`]), [`error`] (the crate's one error
//!   enum).
//!
//! # Example
//! ```no_run
//! # async fn demo(alice: perun_client::Client, bob: perun_client::Client,
//! #     alloc: perun_channel::Allocation) -> perun_client::Result<()> {
//! use perun_client::{ChannelProposal, Participant};
//! let participants = vec![
//!     Participant { address: alice.address(), peer: alice.peer_id() },
//!     Participant { address: bob.address(), peer: bob.peer_id() },
//! ];
//! let channel = alice
//!     .propose_channel(ChannelProposal::payment(participants, alloc, 60))
//!     .await?;
//! channel.pay(1, 0, perun_channel::U256::from(5)).await?; // 5 units of asset 0 to Bob
//! channel.settle().await?;
//! # Ok(()) }
//! ```

mod apps;
pub mod channel;
pub mod client;
pub mod config;
mod core;
mod deliver;
mod dispatch;
pub mod error;
pub mod event;
mod failpoint;
mod force;
pub mod handler;
mod later;
pub mod open;
pub mod payments;
pub mod recover;
mod restore;
mod settle;
mod sync;
mod to_end;
pub mod tower;
mod update;
mod watcher;

pub use channel::{Channel, EventStream, UpdateStream};
pub use client::{Client, ClientBuilder, DamagedRecord, SHUTDOWN_GRACE};
pub use config::{Limits, TimeoutRule, Timeouts};
pub use error::{Error, MootReason, Result};
pub use event::{ChannelEvent, WatchStatus, WatcherStep};
pub use handler::{
    AcceptAllForTesting, AcceptPaymentsToMe, AcceptWithin, IncomingProposal, IncomingUpdate,
    OPENED_CAPACITY, Opened, ProposalHandler, ProposalResponder, Refusal, RejectAll, UpdateHandler,
    UpdateResponder,
};
pub use open::ChannelProposal;
pub use payments::Payments;
pub use perun_adjudicator::AdjudicatorEvent;
pub use perun_wire::Participant;
pub use recover::{
    ChainAmount, ChainChannel, ChainIndex, ChainView, Credit, IndexConfig, Recovered, ScanReport,
    Unread,
};
pub use tower::{AppointmentPolicy, TowerConfig, TowerStatus};
