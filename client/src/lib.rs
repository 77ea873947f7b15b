//! The perun client: opens channels with peers, updates them off-chain and
//! settles them on-chain.
//!
//! # Layout
//! - [`client`]: [`Client`] and its [`ClientBuilder`]; the dispatcher of
//!   incoming messages; restore of persisted channels on start.
//! - [`open`]: the multi-party channel proposal protocol.
//! - `update`: the update protocol (the proposer signs last, so a lost
//!   conflict never costs a signature).
//! - `settle`: cooperative close and withdrawal.
//! - `sync`: the `Sync` exchange that settles a half-done update.
//! - `watcher`: the per-channel dispute watcher (refute, conclude, withdraw).
//! - [`channel`]: the [`Channel`] controller.
//! - [`handler`]: [`ProposalHandler`] / [`UpdateHandler`] and ready-made ones.
//! - [`config`]: the protocol [`Timeouts`].
//! - [`error`]: the crate's one error enum.
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

pub mod channel;
pub mod client;
pub mod config;
pub mod error;
mod failpoint;
pub mod handler;
pub mod open;
mod settle;
mod sync;
mod update;
mod watcher;

pub use channel::{Channel, EventStream, UpdateStream};
pub use client::{Client, ClientBuilder, SHUTDOWN_GRACE};
pub use config::Timeouts;
pub use error::{Error, Result};
pub use handler::{
    AcceptAll, AcceptPaymentsToMe, IncomingProposal, IncomingUpdate, ProposalHandler,
    ProposalResponder, RejectAll, UpdateHandler, UpdateResponder,
};
pub use open::ChannelProposal;
pub use perun_adjudicator::AdjudicatorEvent;
pub use perun_wire::Participant;
