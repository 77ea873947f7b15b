//! The signing interfaces the SDK depends on.

use std::fmt::Debug;
use std::sync::Arc;

use alloy_primitives::{Address, B256, Signature};

use crate::Result;

/// An on-chain identity that can sign channel states.
///
/// Signing is synchronous: a state signature is on the hot path of every
/// update, and a local key signs in tens of microseconds. A remote signer
/// (HSM, KMS) can implement this with `tokio::task::block_in_place`.
pub trait Account: Send + Sync + Debug {
    /// The account's Ethereum address.
    fn address(&self) -> Address;

    /// Signs a 32-byte hash the EIP-191 way (`"\x19Ethereum Signed Message:\n32" ‖ hash`),
    /// returning a low-`s` signature with `v ∈ {27, 28}`.
    fn sign_hash(&self, hash: B256) -> Result<Signature>;

    /// Whether a signature made here stays in this process until the
    /// caller hands it out (a key in memory), so a signature that is never
    /// used is as if never made. Only such an account lets the client sign
    /// an update it proposed while the peers' answers are on the way (the
    /// signature leaves only once the update is complete); a remote signer
    /// or a hardware wallet, whose signatures exist outside the process,
    /// keeps the default `false` and signs once every peer has signed.
    fn signs_in_process(&self) -> bool {
        false
    }
}

/// A collection of accounts, looked up by address.
pub trait Wallet: Send + Sync + Debug {
    /// The account for `address`, if this wallet holds it.
    fn account(&self, address: Address) -> Result<Arc<dyn Account>>;

    /// Every address this wallet can sign for.
    fn addresses(&self) -> Vec<Address>;
}
