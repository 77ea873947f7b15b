//! perun: state channels on Ethereum.
//!
//! Parties lock funds in an on-chain contract once, trade signed state
//! updates off-chain at network speed, and touch the chain again only to
//! close a channel or to win a dispute. This crate re-exports the SDK's
//! crates under one name:
//!
//! | module | crate | holds |
//! |---|---|---|
//! | [`wallet`] | `perun-wallet` | accounts, EIP-191 signatures, keystores |
//! | [`channel`] | `perun-channel` | params, states, hashing, validity rules, phases |
//! | [`wire`] | `perun-wire` | protocol messages and the libp2p transport |
//! | [`persistence`] | `perun-persistence` | the durable store of channel states |
//! | [`adjudicator`] | `perun-adjudicator` | contracts and chain backends |
//! | [`client`] | `perun-client` | the client and channel controllers |
//! | [`watchtower`] | `perun-watchtower` | the watchtower's privacy scheme, signed messages, JSON and HTTP client (the server with its feature `server`) |
//!
//! # Features
//! - `testing`: test harnesses for an application's integration tests, as
//!   `perun::adjudicator::testing` (anvil, the JSON-RPC fault proxy
//!   `RpcProxy`, the fault-injecting backend wrapper `FaultyChain`). Enable
//!   it in `[dev-dependencies]` only: `perun = { ..., features = ["testing"] }`.

pub use perun_adjudicator as adjudicator;
pub use perun_channel as channel;
pub use perun_client as client;
pub use perun_persistence as persistence;
pub use perun_wallet as wallet;
pub use perun_watchtower as watchtower;
pub use perun_wire as wire;

/// The README's code blocks, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
