//! The perun client.
//!
//! Not built yet. This crate will own `Client` (the multi-party channel
//! proposal protocol) and the `Channel` controller (the update protocol,
//! the dispute watcher, restore and sync), with the `ProposalHandler` and
//! `UpdateHandler` traits applications plug their rules into.
