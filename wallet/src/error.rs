//! The wallet's error type.

use alloy_primitives::Address;

/// Everything that can go wrong while handling keys and signatures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A signature was not exactly 65 bytes long.
    #[error("signature must be 65 bytes, got {0}")]
    SignatureLength(usize),
    /// The recovery byte was not 27 or 28.
    #[error("signature recovery byte v must be 27 or 28, got {0}")]
    BadRecoveryId(u8),
    /// `s` is in the upper half of the curve order; such signatures are
    /// malleable and rejected everywhere, as the contracts do.
    #[error("signature s is not in the lower half of the curve order (malleable)")]
    HighS,
    /// `r` or `s` was zero or not below the curve order.
    #[error("signature scalar out of range")]
    ScalarOutOfRange,
    /// The signature is well formed but no public key could be recovered from it.
    #[error("public key recovery failed")]
    Recovery,
    /// The signature recovers to a different address than expected.
    #[error("signature is by {recovered}, expected {expected}")]
    WrongSigner {
        /// The address the signature was expected to come from.
        expected: Address,
        /// The address the signature actually recovers to.
        recovered: Address,
    },
    /// The bytes are not a valid secp256k1 secret key.
    #[error("invalid secret key")]
    InvalidKey,
    /// Signing failed inside the ECDSA implementation.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The wallet holds no account for this address.
    #[error("no account for address {0}")]
    UnknownAccount(Address),
    /// A keystore file is malformed or uses unsupported parameters.
    #[error("invalid keystore: {0}")]
    Keystore(String),
    /// The keystore's MAC does not match: wrong password or a corrupted file.
    #[error("keystore MAC mismatch (wrong password or corrupted file)")]
    KeystoreMac,
    /// Reading or writing a keystore file failed.
    #[error("keystore I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The wallet's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
