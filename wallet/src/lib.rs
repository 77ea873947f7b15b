//! Keys and signatures for perun state channels.
//!
//! Every off-chain state is authorised by an ECDSA signature of each
//! participant over the state's hash, signed the EIP-191 way so that the
//! on-chain adjudicator can check it with `ecrecover`. This crate owns that
//! one signing scheme and nothing else.
//!
//! # Layout
//! - [`signature`]: EIP-191 digests, strict parsing (low-`s`, `v ∈ {27, 28}`),
//!   recovery and verification.
//! - [`account`]: the [`Account`] and [`Wallet`] traits the rest of the SDK
//!   signs through.
//! - [`local`]: [`LocalAccount`] (a k256 key in memory) and [`LocalWallet`].
//! - [`keystore`]: encrypted JSON keystores (Web3 secret storage v3).
//! - [`error`]: the crate's one error enum.
//!
//! # Example
//! ```
//! use perun_wallet::{Account, LocalAccount, B256, verify};
//!
//! let alice = LocalAccount::random();
//! let hash = B256::repeat_byte(7);
//! let sig = alice.sign_hash(hash)?;
//! verify(hash, &sig, alice.address())?;
//! # Ok::<(), perun_wallet::Error>(())
//! ```

pub mod account;
pub mod error;
pub mod keystore;
pub mod local;
pub mod signature;

pub use account::{Account, Wallet};
pub use alloy_primitives::{Address, B256, Signature, U256, keccak256};
pub use error::{Error, Result};
pub use local::{LocalAccount, LocalWallet};
pub use signature::{eip191_digest, memo, parse_signature, recover, signature_bytes, verify};
