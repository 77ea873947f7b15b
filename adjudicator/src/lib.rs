//! The on-chain half of perun.
//!
//! Not built yet. This crate will own the Solidity adjudicator and asset
//! holders (`contracts/`) with their compiled artifacts, the `Funder` and
//! `Adjudicator` traits, the Ethereum backend over alloy, `SimLedger` (an
//! in-memory ledger with the same rules) and the anvil test harness.
