//! A watchtower for perun state channels: it keeps encrypted appointments
//! for clients that may go offline, and answers disputes for them.
//!
//! The tower learns nothing about a channel before a dispute starts: an
//! appointment is a locator and an encrypted blob, both derived from the
//! channel's nonce, which first appears on-chain with `Registered`
//! (DESIGN §12).
//!
//! # Layout
//! - [`scheme`]: locators, blob keys, sealing and opening blobs (client and tower).
//! - [`api`]: the HTTP/JSON API (axum): endpoints and their JSON, errors, rate limits, metrics.
//! - [`batch`]: group commit of appointments (one writer thread, one `fsync` per batch).
//! - [`messages`]: the hashes users and the tower sign.
//! - [`responder`]: the chain side: follows disputes, refutes with a newer state, concludes.
//! - [`service`]: the API and the supervised responder in one call (what the binary runs).
//! - [`store`]: the redb store of users, appointments, the locator index and the chain cursor.
//! - [`error`]: the crate's one error enum.

pub mod api;
pub mod batch;
pub mod error;
pub mod messages;
pub mod responder;
pub mod scheme;
pub mod service;
pub mod store;

pub use error::{Error, Result};
pub use scheme::{ChannelSecret, Locator, open, seal};
