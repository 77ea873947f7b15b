//! What users and the tower sign. Every hash starts with its own domain
//! tag, and no tag is a prefix of another, so a signature for one purpose
//! is never valid for another; the register and query messages name the
//! tower, so they do not replay at another tower. The appointment hash
//! names no tower: a client sends the same signed appointment to each of
//! its towers.
//!
//! All signatures are EIP-191 `personal_sign` over the 32-byte hash
//! (`perun_wallet::Account::sign_hash`), 65 bytes `r ‖ s ‖ v`.

use alloy_primitives::{Address, B256, keccak256};

use serde::{Deserialize, Serialize};

use crate::scheme::Locator;

/// A user's subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Appointments the user may hold at once.
    pub slots_total: u32,
    /// Appointments the user holds.
    pub slots_used: u32,
    /// Unix time (seconds) after which the tower takes no new appointments from the user.
    pub expiry: u64,
}

fn tagged(tag: &[u8], parts: &[&[u8]]) -> B256 {
    let mut buf = Vec::with_capacity(tag.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    buf.extend_from_slice(tag);
    for p in parts {
        buf.extend_from_slice(p);
    }
    keccak256(buf)
}

/// The user signs this to register: `keccak256("perun/tower/register/v1" ‖ tower ‖ user)`.
pub fn register_hash(tower: Address, user: Address) -> B256 {
    tagged(
        b"perun/tower/register/v1",
        &[tower.as_slice(), user.as_slice()],
    )
}

/// The tower signs a subscription:
/// `keccak256("perun/tower/subscription/v1" ‖ user ‖ slots_total (4, BE) ‖ expiry (8, BE))`.
pub fn subscription_hash(user: Address, sub: &Subscription) -> B256 {
    tagged(
        b"perun/tower/subscription/v1",
        &[
            user.as_slice(),
            &sub.slots_total.to_be_bytes(),
            &sub.expiry.to_be_bytes(),
        ],
    )
}

/// The user signs an appointment:
/// `keccak256("perun/tower/appointment/v1" ‖ locator ‖ seq (8, BE) ‖ blob)`.
///
/// `seq` grows with each appointment the user sends for a locator, so an
/// older request replayed by whoever saw it cannot replace a newer blob.
/// The tag keeps the user's other signatures from reading as appointments
/// (without it, any signed preimage of 40 bytes or more parsed as one).
/// It names no tower: one appointment goes to every tower of the channel.
pub fn appointment_hash(locator: &Locator, seq: u64, blob: &[u8]) -> B256 {
    tagged(
        b"perun/tower/appointment/v1",
        &[locator.as_slice(), &seq.to_be_bytes(), blob],
    )
}

/// The tower signs a receipt:
/// `keccak256("perun/tower/receipt/v1" ‖ tower ‖ locator ‖ start_block (8, BE) ‖ user_signature)`.
///
/// With the user signature it binds the blob, so a user holding the receipt
/// and the blob can prove what the tower accepted.
pub fn receipt_hash(tower: Address, locator: &Locator, start_block: u64, user_sig: &[u8]) -> B256 {
    tagged(
        b"perun/tower/receipt/v1",
        &[
            tower.as_slice(),
            locator.as_slice(),
            &start_block.to_be_bytes(),
            user_sig,
        ],
    )
}

/// The user signs this to ask for an appointment's status:
/// `keccak256("perun/tower/get_appointment/v1" ‖ tower ‖ locator)`.
pub fn get_appointment_hash(tower: Address, locator: &Locator) -> B256 {
    tagged(
        b"perun/tower/get_appointment/v1",
        &[tower.as_slice(), locator.as_slice()],
    )
}

/// The user signs this to ask for its subscription:
/// `keccak256("perun/tower/get_subscription_info/v1" ‖ tower ‖ user)`.
pub fn get_subscription_hash(tower: Address, user: Address) -> B256 {
    tagged(
        b"perun/tower/get_subscription_info/v1",
        &[tower.as_slice(), user.as_slice()],
    )
}
