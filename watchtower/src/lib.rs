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
//! - [`messages`]: the hashes users and the tower sign.
//! - [`json`]: the API's request and response bodies (serde only).
//! - [`client`]: an HTTP/1.1 client of the API that checks the tower's signatures.
//! - `api` (feature `server`): the HTTP/JSON API (axum): endpoints, errors, rate limits, metrics.
//! - `batch` (feature `server`): group commit of appointments (one writer thread, one `fsync` per batch).
//! - `responder` (feature `server`): the chain side: follows disputes, refutes with a newer state, concludes.
//! - `service` (feature `server`): the API and the supervised responder in one call (what the binary runs).
//! - `store` (feature `server`): the redb store of users, appointments, the locator index and the chain cursor.
//! - [`error`]: the crate's one error enum.
//!
//! # Features
//! - `server` (default): the tower itself (the API server, its store, the
//!   binary). A client that only talks to towers depends on this crate with
//!   `default-features = false`, without axum, redb or clap.

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod batch;
pub mod client;
pub mod error;
pub mod json;
pub mod messages;
#[cfg(feature = "server")]
pub mod responder;
pub mod scheme;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;

pub use client::{Receipt, TowerClient};
pub use error::{Error, Result};
pub use messages::Subscription;
pub use scheme::{ChannelSecret, Locator, open, seal};
